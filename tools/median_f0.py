#!/usr/bin/env python3
"""Median pitch of a quickstart clip's input and reconstruction.

    python3 tools/median_f0.py runs/quickstart/eval hr-zac_s0 en-us-alicia_s4

For each clip it reads `CLIP_input_griffin_lim.wav` (the input's own log-mel
through Griffin-Lim) and `CLIP_recon_griffin_lim.wav` (the reconstruction
through the same), so both went through the same mel and phase
reconstruction. Pitch is the autocorrelation peak between 70 and 400 Hz of
40 ms frames (refined by a parabola through it and its neighbours), after a
3-sample mean and decimation to a third of the rate. Frames whose RMS is
under 5% of the clip's peak amplitude, or whose autocorrelation peak is
under 0.3 of the frame's energy, count as unvoiced. Prints voiced frames,
the 10th percentile, the median and the 90th percentile in Hz. Standard
library only (it is slow: a few seconds a clip).
"""
import statistics
import struct
import sys
import wave


def read(path):
    with wave.open(path) as w:
        n, rate, width = w.getnframes(), w.getframerate(), w.getsampwidth()
        raw = w.readframes(n) if w.getnchannels() == 1 else None
    if raw is None:
        sys.exit(f"{path}: expected mono")
    if width == 2:
        return list(struct.unpack(f"<{n}h", raw)), rate
    if width == 4:
        return list(struct.unpack(f"<{n}f", raw)), rate
    sys.exit(f"{path}: expected 16-bit or float WAV, got {width} bytes a sample")


def pitch(path):
    x, rate = read(path)
    x = [sum(x[i : i + 3]) / 3 for i in range(0, len(x) - 3, 3)]
    rate //= 3
    peak = max(abs(v) for v in x) or 1.0
    win, lo, hi = int(0.04 * rate), rate // 400, rate // 70
    f0s = []
    for s in range(0, len(x) - win - hi, win):
        seg = x[s : s + win + hi]
        energy = sum(v * v for v in seg[:win])
        if energy / win < (0.05 * peak) ** 2:
            continue
        ac = [sum(seg[i] * seg[i + k] for i in range(win)) for k in range(lo - 1, hi + 1)]
        j = max(range(1, len(ac) - 1), key=ac.__getitem__)
        if ac[j] > 0.3 * energy:
            # A parabola through the peak and its neighbours: sub-sample lag.
            a, b, c = ac[j - 1], ac[j], ac[j + 1]
            shift = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c < 0 else 0.0
            f0s.append(rate / (lo - 1 + j + shift))
    if len(f0s) < 3:
        return f"{len(f0s)} voiced frames"
    q = statistics.quantiles(f0s, n=10)
    return f"{len(f0s)} voiced frames, {q[0]:.0f} / {statistics.median(f0s):.0f} / {q[-1]:.0f} Hz"


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    d = sys.argv[1]
    for clip in sys.argv[2:]:
        print(f"{clip}: input {pitch(f'{d}/{clip}_input_griffin_lim.wav')}; "
              f"reconstruction {pitch(f'{d}/{clip}_recon_griffin_lim.wav')}")


if __name__ == "__main__":
    main()
