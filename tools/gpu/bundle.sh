#!/usr/bin/env bash
# Build what runs on the GPU test machine (no Rust toolchain there) and pack
# it into gpu-bundle/ (git-ignored, xz-compressed, well under the 64 MiB that
# travels with the working tree). docs/gpu.md; the issue note lists the runs.
#
#   tools/gpu/bundle.sh            # after tools/cuda/setup.sh
#   # then, on the GPU machine, from the repository root (gpu-bundle carried):
#   bash tools/gpu/on_device.sh    # writes its results under $OUT
#
# The binaries are built with `--features cuda` (MELVAE_GPU_FEATURES to
# change it). Not with flash-attn: the compile-check archive aborts when
# called, and building the real kernels on the GPU machine is not scripted yet.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
prefix="${MELVAE_CUDA_PREFIX:-$HOME/.cache/melvae-cuda}"
[ -f "$prefix/env.sh" ] || { echo "bundle.sh: run tools/cuda/setup.sh first (no $prefix/env.sh)" >&2; exit 2; }
# shellcheck source=/dev/null
source "$prefix/env.sh"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target/gpu}"
out="$repo/gpu-bundle"
rm -rf "$out"
mkdir -p "$out"
features="${MELVAE_GPU_FEATURES:-cuda}"
cargo test --release --features "$features" --test device --no-run --message-format=json \
  | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])' > "$out/executables.txt"
while read -r exe; do
  name="$(basename "$exe" | sed -E 's/-[0-9a-f]{16}$//')"
  xz -T0 -6 -c "$exe" > "$out/$name.xz"
done < "$out/executables.txt"
echo "$features" > "$out/features.txt"
git -C "$repo" rev-parse HEAD > "$out/commit.txt"
du -sh "$out"/*
