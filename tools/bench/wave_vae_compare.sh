#!/usr/bin/env bash
# Times the waveform VAE's training step in melvae and in its PyTorch twin,
# back to back on this machine, after checking that the twin computes the
# same loss from the same weights and batch.
#
#   bash tools/bench/wave_vae_compare.sh [SETTING] [PYTHON]
#
# SETTING: a file of configs/settings/ (default wave_vae_tiny); PYTHON: an
# interpreter with torch, numpy, safetensors (default /tmp/refvenv/bin/python).
# Run it on an idle machine: the load average is printed before each side.
set -euo pipefail
cd "$(dirname "$0")/../.."
setting="${1:-wave_vae_tiny}"
python="${2:-/tmp/refvenv/bin/python}"
dump="$(mktemp -d)"
trap 'rm -rf "$dump"' EXIT
cargo build --release --example wave_vae_throughput
echo "load average before melvae: $(cut -d' ' -f1-3 /proc/loadavg)"
target/release/examples/wave_vae_throughput --setting "$setting" --steps 10 --dump "$dump"
echo "load average before PyTorch: $(cut -d' ' -f1-3 /proc/loadavg)"
"$python" tools/bench/wave_vae_twin.py "$dump" --steps 10
