#!/usr/bin/env bash
# Build what runs on the GPU test machine (no Rust toolchain there) and pack
# it into gpu-bundle/ (git-ignored, xz-compressed, well under the 64 MiB that
# travels with the working tree): the device-generic tests and the gpu_bench
# example. docs/gpu.md; the issue note lists the runs.
#
#   tools/cuda/setup.sh && tools/cuda/flash_kernels.sh
#   tools/gpu/bundle.sh               # --features cuda,flash-attn (the default)
#   MELVAE_GPU_FEATURES=cuda tools/gpu/bundle.sh   # without flash attention
#   # then, on the GPU machine, from the repository root (gpu-bundle carried):
#   bash tools/gpu/on_device.sh       # tests and benchmarks; results under $OUT
#
# With flash-attn the real kernels of tools/cuda/flash_kernels.sh are linked
# (PREFIX/env-flash.sh) into a target directory of their own, target/gpu-flash;
# without, target/gpu.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
prefix="${MELVAE_CUDA_PREFIX:-$HOME/.cache/melvae-cuda}"
features="${MELVAE_GPU_FEATURES:-cuda,flash-attn}"
case ",$features," in
  *,flash-attn,*) env="$prefix/env-flash.sh"; target="$repo/target/gpu-flash"
                  hint="run tools/cuda/setup.sh and tools/cuda/flash_kernels.sh first" ;;
  *) env="$prefix/env.sh"; target="$repo/target/gpu"; hint="run tools/cuda/setup.sh first" ;;
esac
[ -f "$env" ] || { echo "bundle.sh: $hint (no $env)" >&2; exit 2; }
# shellcheck source=/dev/null
source "$env"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$target}"
out="$repo/gpu-bundle"
rm -rf "$out"
mkdir -p "$out"
cargo build --release --features "$features" --test device --example gpu_bench --message-format=json \
  | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])' > "$out/executables.txt"
[ "$(wc -l < "$out/executables.txt")" = 2 ] \
  || { echo "bundle.sh: expected two executables, got:" >&2; cat "$out/executables.txt" >&2; exit 1; }
# The binaries must hold the real kernels, not the compile-check stub.
if [ -n "${MELVAE_FLASH_LIB:-}" ]; then
  cmp -s "$MELVAE_FLASH_LIB" "$CANDLE_FLASH_ATTN_BUILD_DIR/libflashattention.a" || {
    echo "bundle.sh: cargo linked $CANDLE_FLASH_ATTN_BUILD_DIR/libflashattention.a, not $MELVAE_FLASH_LIB;" >&2
    echo "  re-run tools/cuda/flash_kernels.sh (it installs the nvcc wrapper that copies it), then" >&2
    echo "  rm -rf $CARGO_TARGET_DIR/release/build/candle-flash-attn-* and bundle again" >&2
    exit 1
  }
fi
while read -r exe; do
  name="$(basename "$exe" | sed -E 's/-[0-9a-f]{16}$//')"
  xz -T0 -6 -c "$exe" > "$out/$name.xz"
done < "$out/executables.txt"
echo "$features" > "$out/features.txt"
{ git -C "$repo" rev-parse HEAD; git -C "$repo" status --porcelain | sed 's/^/dirty: /'; } > "$out/commit.txt"
du -sh "$out"/*
