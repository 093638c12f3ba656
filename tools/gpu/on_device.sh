#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with gpu-bundle/ (from
# tools/gpu/bundle.sh) carried: unpacks the binaries, points the loader at
# the CUDA 13 libraries of the machine's PyTorch, then
#   tests   the device-generic tests on cuda:0 (device.txt)
#   bench   examples/gpu_bench.rs and tools/bench/torch_bench.py on the same
#           shapes, joined by tools/bench/report.py (benchmarks.md)
# (both when no argument is given). Writes at most 7 files under $OUT (or
# ./gpu-results): machine.txt, device.txt, gpu_bench.txt, candle.json,
# torch_bench.txt, torch.json, benchmarks.md.
set -uo pipefail
what="${1:-all}"
case "$what" in tests|bench|all) ;; *) echo "usage: on_device.sh [tests|bench|all]" >&2; exit 2 ;; esac
out="${OUT:-$PWD/gpu-results}"
mkdir -p "$out"
bin="$(mktemp -d)"
for f in gpu-bundle/*.xz; do
  xz -dc "$f" > "$bin/$(basename "$f" .xz)" && chmod +x "$bin/$(basename "$f" .xz)"
done
# Directories holding the CUDA 13 user-space libraries (PyTorch cu130 wheels).
libs="$(python3 - <<'PY'
import glob, os, site, sys
want = ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13", "libcudart.so.13"]
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = []
for w in want:
    for r in roots:
        hits = glob.glob(os.path.join(r, "nvidia", "**", w), recursive=True)
        if hits:
            d = os.path.dirname(hits[0])
            if d not in dirs:
                dirs.append(d)
            break
    else:
        print(f"missing {w}", file=sys.stderr)
print(":".join(dirs))
PY
)"
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
{ nvidia-smi || true; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; cat gpu-bundle/commit.txt gpu-bundle/features.txt; } > "$out/machine.txt" 2>&1
rc=0
if [ "$what" != bench ]; then
  MELVAE_TEST_DEVICE=cuda:0 "$bin/device" --nocapture --test-threads 1 > "$out/device.txt" 2>&1 || rc=1
  tail -n 30 "$out/device.txt"
fi
if [ "$what" != tests ]; then
  "$bin/gpu_bench" --device cuda:0 --dtype bf16 --json "$out/candle.json" > "$out/gpu_bench.txt" 2>&1 || rc=1
  PYTHONUNBUFFERED=1 python3 tools/bench/torch_bench.py --device cuda --dtype bf16 \
    --json "$out/torch.json" > "$out/torch_bench.txt" 2>&1 || rc=1
  cat "$out/gpu_bench.txt" "$out/torch_bench.txt"
  python3 tools/bench/report.py "$out/candle.json" "$out/torch.json" > "$out/benchmarks.md" || rc=1
  cat "$out/benchmarks.md"
fi
exit $rc
