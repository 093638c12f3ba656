#!/usr/bin/env bash
# Regenerates the bundled sample clips in data/samples/ (run by hand).
# Needs espeak-ng and ffmpeg (Debian: apt-get install espeak-ng ffmpeg).
set -euo pipefail
cd "$(dirname "$0")/.."
out=data/samples
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
say() { # name voice text
  espeak-ng -v "$2" -s 150 -w "$tmp/$1.wav" "$3"
  ffmpeg -y -loglevel error -i "$tmp/$1.wav" -ar 24000 -ac 1 -sample_fmt s16 \
    -map_metadata -1 -fflags +bitexact "$out/$1.flac"
}
say speech_en en-us "melvae turns speech into mel spectrograms, and mel spectrograms back into speech."
