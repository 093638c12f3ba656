#!/usr/bin/env bash
# Times a model family's training step in melvae and in its PyTorch twin,
# back to back on this machine, after checking that the twin computes the
# same loss from the same weights and batch.
#
#   bash tools/bench/twin_compare.sh FAMILY [SETTING] [PYTHON]
#
# FAMILY: wave_vae or vqvae (a level of the hierarchical waveform VQ-VAE)
# (example wave_vae_throughput, twin tools/bench/wave_vae_twin.py), vocos
# (the `vocos` package, tools/bench/vocos_twin.py), mel_vae (the mel VAE:
# example mel_vae_throughput, twin tools/bench/mel_vae_twin.py), or one of
# the token models mel_vqvae, gpt, gpt_vae, echolancer, lstm_prior (the
# hierarchy's priors) (example mel_tokens_throughput, twin
# tools/bench/mel_tokens_twin.py); SETTING: a file of configs/settings/
# (default FAMILY_tiny, so echolancer_tiny for echolancer;
# gpt_vae_tiny_stage2 for gpt_vae, vqvae_8_tiny for vqvae, prior_8_tiny
# (with a context) for lstm_prior, tiny for mel_vae, whose settings are
# tiny and setting1); PYTHON: an interpreter with torch,
# numpy, safetensors, librosa (and vocos) (default
# /tmp/refvenv/bin/python). Run it on an idle machine: the load average is
# printed before each side.
set -euo pipefail
cd "$(dirname "$0")/../.."
usage="usage: twin_compare.sh wave_vae|vqvae|vocos|mel_vae|mel_vqvae|gpt|gpt_vae|echolancer|lstm_prior [SETTING] [PYTHON]"
family="${1:?$usage}"
case "$family" in
  wave_vae|vocos)
    example="${family}_throughput"; twin="${family}_twin.py"; default="${family}_tiny" ;;
  mel_vae)
    example=mel_vae_throughput; twin=mel_vae_twin.py; default=tiny ;;
  mel_vqvae|gpt|echolancer)
    example=mel_tokens_throughput; twin=mel_tokens_twin.py; default="${family}_tiny" ;;
  gpt_vae)
    example=mel_tokens_throughput; twin=mel_tokens_twin.py; default=gpt_vae_tiny_stage2 ;;
  vqvae)
    example=wave_vae_throughput; twin=wave_vae_twin.py; default=vqvae_8_tiny ;;
  lstm_prior)
    example=mel_tokens_throughput; twin=mel_tokens_twin.py; default=prior_8_tiny ;;
  *) echo "twin_compare.sh: unknown family '$family' ($usage)" >&2; exit 2 ;;
esac
setting="${2:-$default}"
python="${3:-/tmp/refvenv/bin/python}"
dump="$(mktemp -d)"
trap 'rm -rf "$dump"' EXIT
cargo build --release --example "$example"
echo "load average before melvae: $(cut -d' ' -f1-3 /proc/loadavg)"
"target/release/examples/$example" --setting "$setting" --steps 10 --dump "$dump"
echo "load average before PyTorch: $(cut -d' ' -f1-3 /proc/loadavg)"
"$python" "tools/bench/$twin" "$dump" --steps 10
