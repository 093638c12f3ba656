#!/usr/bin/env bash
# How SI-SDR scores changes that keep a clip's magnitudes (and its sound) but
# not its phase: the bundled corpus's held-out clips, (a) delayed by 0.5 to
# 5 ms and (b) through two all-pass filters (sox `allpass`: every frequency's
# magnitude unchanged, its phase turned), each scored against the original
# with `evaluate --degraded`. A mel vocoder, like Griffin-Lim, recovers
# magnitudes, not the original's phase, so this is the range in which its
# SI-SDR moves (docs/models/vocoder.md, "SI-SDR").
#
#   bash tools/sisdr_phase_check.sh runs/sisdr_phase_check
#
# Needs sox (Debian: apt-get install sox) and the release `evaluate` example.
set -euo pipefail
out=${1:?usage: sisdr_phase_check.sh OUT_DIR}
if [ -e "$out" ] && [ -n "$(ls -A "$out")" ]; then
  echo "$out exists and is not empty; give a new folder" >&2
  exit 1
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
held_out=$(sed -n 's/^ *held_out: *\[\(.*\)\]/\1/p' "$repo/configs/defaults/bundled_speech.yaml" | tr -d ' ' | tr ',' ' ')
[ -n "$held_out" ] || { echo "no held_out list in configs/defaults/bundled_speech.yaml" >&2; exit 1; }
mkdir -p "$out/reference"
for voice in $held_out; do
  cp "$repo/assets/speech/$voice"/*.flac "$out/reference/"
done
variant() { # name, sox effects...
  local name=$1
  shift
  mkdir -p "$out/$name"
  for f in "$out/reference"/*.flac; do
    # -G: sox lowers the gain where the all-pass would clip; trim keeps the length.
    sox -G "$f" -b 16 "$out/$name/$(basename "$f" .flac).wav" "$@" trim 0 "$(soxi -s "$f")s" 2>/dev/null
  done
}
for ms in 0.5 1 2.5 5; do
  variant "delay_${ms}ms" delay "$(awk "BEGIN { print $ms / 1000 }")"
done
variant allpass allpass 500 1q allpass 1500 1q
cd "$repo"
echo "| variant | mel distance | STFT distance | SI-SDR (dB) | PESQ wb |"
for name in delay_0.5ms delay_1ms delay_2.5ms delay_5ms allpass; do
  cargo run --release --example evaluate -q -- --reference "$out/reference" --degraded "$out/$name" \
    --json "$out/$name.json" 2>/dev/null | grep -F '**mean of' | sed "s/\*\*mean of [0-9]*\*\* | */$name /"
done
