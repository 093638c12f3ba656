#!/usr/bin/env bash
# Times a model family's training step in melvae and in its PyTorch twin,
# back to back on this machine, after checking that the twin computes the
# same loss from the same weights and batch.
#
#   bash tools/bench/twin_compare.sh FAMILY [SETTING] [PYTHON]
#
# FAMILY: wave_vae (twin tools/bench/wave_vae_twin.py) or vocos (the `vocos`
# package, tools/bench/vocos_twin.py); SETTING: a file of configs/settings/
# (default FAMILY_tiny); PYTHON: an interpreter with torch, numpy,
# safetensors (and vocos) (default /tmp/refvenv/bin/python). Run it on an
# idle machine: the load average is printed before each side.
set -euo pipefail
cd "$(dirname "$0")/../.."
family="${1:?usage: twin_compare.sh wave_vae|vocos [SETTING] [PYTHON]}"
case "$family" in
  wave_vae|vocos) ;;
  *) echo "twin_compare.sh: unknown family '$family' (wave_vae or vocos)" >&2; exit 2 ;;
esac
setting="${2:-${family}_tiny}"
python="${3:-/tmp/refvenv/bin/python}"
dump="$(mktemp -d)"
trap 'rm -rf "$dump"' EXIT
cargo build --release --example "${family}_throughput"
echo "load average before melvae: $(cut -d' ' -f1-3 /proc/loadavg)"
"target/release/examples/${family}_throughput" --setting "$setting" --steps 10 --dump "$dump"
echo "load average before PyTorch: $(cut -d' ' -f1-3 /proc/loadavg)"
"$python" "tools/bench/${family}_twin.py" "$dump" --steps 10
