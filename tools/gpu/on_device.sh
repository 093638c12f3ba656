#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with gpu-bundle/ (from
# tools/gpu/bundle.sh) carried: unpacks the binaries, points the loader at
# the CUDA 13 libraries of the machine's PyTorch, runs the device-generic
# tests on cuda:0 and writes everything under $OUT (or ./gpu-results).
set -uo pipefail
out="${OUT:-$PWD/gpu-results}"
mkdir -p "$out"
bin="$(mktemp -d)"
for f in gpu-bundle/*.xz; do
  xz -dc "$f" > "$bin/$(basename "$f" .xz)" && chmod +x "$bin/$(basename "$f" .xz)"
done
# Directories holding the CUDA 13 user-space libraries (PyTorch cu130 wheels).
libs="$(python3 - <<'PY'
import glob, os, site
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
        print(f"missing {w}", file=__import__("sys").stderr)
print(":".join(dirs))
PY
)"
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
{ nvidia-smi || true; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; cat gpu-bundle/commit.txt gpu-bundle/features.txt; } > "$out/machine.txt" 2>&1
rc=0
for t in "$bin"/device*; do
  MELVAE_TEST_DEVICE=cuda:0 "$t" --nocapture --test-threads 1 > "$out/$(basename "$t").txt" 2>&1 || rc=1
done
tail -n 40 "$out"/device*.txt
exit $rc
