#!/usr/bin/env python3
"""Times librosa 0.11's vocos-24k log-mel on 10 s of audio, single-threaded.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        /tmp/refvenv/bin/python tools/bench_librosa.py [--seconds 10] [--reps 50]

Prints the median time and the multiple of real time, for comparison with
`cargo run --release --example dsp_throughput` (same signal length and
parameters: n_fft 1024, hop 256, periodic Hann, centred reflect padding,
100 HTK mels, magnitude, log(max(x, 1e-7))).
"""
import argparse
import os
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import librosa  # noqa: E402
import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    sr = 24000
    x = (np.random.default_rng(0).random(int(sr * args.seconds)) - 0.5).astype(np.float32)
    basis = librosa.filters.mel(sr=sr, n_fft=1024, n_mels=100, htk=True, norm=None)

    def run():
        m = librosa.feature.melspectrogram(y=x, sr=sr, n_fft=1024, hop_length=256, n_mels=100, htk=True,
                                           norm=None, power=1.0, center=True, pad_mode="reflect")
        return np.log(np.maximum(m, 1e-7))

    def run_prebuilt_basis():
        s = np.abs(librosa.stft(x, n_fft=1024, hop_length=256, center=True, pad_mode="reflect"))
        return np.log(np.maximum(basis @ s, 1e-7))

    for name, f in [("librosa.feature.melspectrogram + log", run), ("librosa.stft + cached basis + log", run_prebuilt_basis)]:
        f()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        print(f"| {name}, 1 thread | {t * 1e3:.3f} ms | {args.seconds / t:.0f}x |")


if __name__ == "__main__":
    main()
