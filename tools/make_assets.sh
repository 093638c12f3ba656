#!/usr/bin/env bash
# Regenerates the bundled speech corpus in assets/speech/ (run by hand).
# Synthetic speech from espeak-ng: 8 voice variants x 6 sentences, 24 kHz
# mono FLAC. It is what the quickstart trains and evaluates on.
# Needs espeak-ng and ffmpeg (Debian: apt-get install espeak-ng ffmpeg).
set -euo pipefail
cd "$(dirname "$0")/.."
out=assets/speech
rm -rf "$out"
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
voices=(en-us+m1 en-us+f2 en-gb+m3 en-gb+f4 en-us+m7 en-gb-x-rp+f1 en-029+m2 en-gb-scotland+f5)
speeds=(150 160 145 155 165 150 140 158)
sentences=(
  "The quiet river carried seven paper boats past the old mill."
  "Bright orange lanterns swung gently above the crowded market square."
  "Please measure the flour twice before you pour it into the bowl."
  "A sudden gust of wind scattered the letters across the wooden floor."
  "Every morning the baker sings while the bread rises in the oven."
  "Could you read the last line of the poem once more, slowly?"
)
for v in "${!voices[@]}"; do
  for s in "${!sentences[@]}"; do
    name=$(printf "v%d_s%d" "$v" "$s")
    espeak-ng -v "${voices[$v]}" -s "${speeds[$v]}" -w "$tmp/$name.wav" "${sentences[$s]}"
    ffmpeg -y -loglevel error -i "$tmp/$name.wav" -ar 24000 -ac 1 -sample_fmt s16 \
      -map_metadata -1 -fflags +bitexact "$out/$name.flac"
  done
done
echo "wrote $(ls "$out" | wc -l) clips, $(du -sh "$out" | cut -f1)"
