#!/usr/bin/env bash
# The whole hierarchical waveform VQ-VAE pipeline at tiny size, on the
# bundled TTS corpus (docs/models/vqwave.md): four VQ-VAE levels (512x,
# 128x, 32x, 8x), then their four LSTM priors (each on the codes of its
# level and the coarser one), then generation through the hierarchy.
# Writes runs/vqwave_tiny/{vqvae,prior}_<hop> and runs/vqwave_tiny/generated.wav.
#
#   bash tools/vqwave_tiny.sh            # trains what is missing, then generates
#   bash tools/vqwave_tiny.sh --overwrite  # trains every level and prior again
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
cargo build --release --example train --example generate
out=runs/vqwave_tiny
mkdir -p "$out"
train() {  # train SETTING RUN_DIR
  if [ -d "$2/checkpoints" ] && [ "$mode" != "--overwrite" ]; then
    echo "== $2 exists (pass --overwrite to train it again)"
    return
  fi
  echo "== train $1 -> $2"
  target/release/examples/train --config "configs/settings/$1.yaml" --run-dir "$2" --overwrite training.progress=false
}
for hop in 512 128 32 8; do train "vqvae_${hop}_tiny" "$out/vqvae_$hop"; done
for hop in 512 128 32 8; do train "prior_${hop}_tiny" "$out/prior_$hop"; done
target/release/examples/generate --vqwave "$out" --generators all --length 44100 --seed 0 --output "$out/generated.wav"
