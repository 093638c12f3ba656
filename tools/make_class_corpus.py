#!/usr/bin/env python3
"""Writes the bundled labelled corpus of sound classes, assets/classes/.

One folder per class, 16 clips of 1.0 s each, 22.05 kHz mono 16-bit FLAC
(the hifigan-22k features of the spectrogram-token models), every clip
drawn from a seeded generator so the corpus is reproducible:

- tone:   a steady harmonic tone (random pitch 110-440 Hz, 1-4 harmonics)
- chirp:  a sine sweeping up or down (random range within 200-4000 Hz)
- noise:  bursts of band-passed noise (random band, 2-4 bursts)
- clicks: a train of short clicks (random rate 4-16 per second)
- chord:  three to four simultaneous tones of a major or minor chord
- speech: a 1 s excerpt of the bundled speech (assets/speech), resampled

Training configs hold clips out by `data.val_fraction` (a stable hash of
the path, as for any folder).

    /tmp/refvenv/bin/python tools/make_class_corpus.py

Needs numpy, soundfile and scipy (for the speech resampling).
"""
import glob
import os

import numpy as np
import soundfile as sf
from scipy.signal import butter, resample_poly, sosfilt

SR = 22050
N = SR  # 1.0 s
CLIPS = 16
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "assets", "classes")


def fade(x, ms=10):
    n = int(SR * ms / 1000)
    w = np.ones_like(x)
    w[:n] = np.linspace(0, 1, n)
    w[-n:] = np.linspace(1, 0, n)
    return x * w


def norm(x, peak):
    return x / (np.abs(x).max() + 1e-9) * peak


def tone(rng, t):
    f = rng.uniform(110, 440)
    x = sum(np.sin(2 * np.pi * f * h * t + rng.uniform(0, 6.3)) / h for h in range(1, rng.integers(2, 6)))
    return x


def chirp(rng, t):
    a, b = sorted(rng.uniform(200, 4000, 2))
    if rng.random() < 0.5:
        a, b = b, a
    f = a + (b - a) * t / t[-1]
    return np.sin(2 * np.pi * np.cumsum(f) / SR)


def noise(rng, t):
    x = np.zeros_like(t)
    for _ in range(rng.integers(2, 5)):
        lo = rng.uniform(300, 3000)
        sos = butter(4, [lo, min(lo * rng.uniform(1.5, 3), SR / 2 - 100)], btype="band", fs=SR, output="sos")
        start, length = rng.integers(0, N - 4000), rng.integers(2000, 8000)
        burst = sosfilt(sos, rng.standard_normal(N))
        env = np.zeros(N)
        env[start:start + length] = np.hanning(min(length, N - start))
        x += burst * env
    return x


def clicks(rng, t):
    x = np.zeros_like(t)
    rate = rng.uniform(4, 16)
    for c in np.arange(rng.uniform(0, 1 / rate), 1.0, 1 / rate):
        i = int(c * SR)
        n = min(120, N - i)
        x[i:i + n] += np.exp(-np.arange(n) / 15) * rng.choice([-1, 1])
    return x


def chord(rng, t):
    root = rng.uniform(130, 330)
    steps = [0, 4, 7] if rng.random() < 0.5 else [0, 3, 7]
    if rng.random() < 0.5:
        steps.append(12)
    return sum(np.sin(2 * np.pi * root * 2 ** (s / 12) * t) for s in steps)


def speech_clips(rng):
    files = sorted(glob.glob(os.path.join(ROOT, "assets", "speech", "*.flac")))
    out = []
    for i in range(CLIPS):
        x, sr = sf.read(files[(i * 7) % len(files)], dtype="float64")
        x = resample_poly(x, SR, sr)
        o = rng.integers(0, max(1, len(x) - N))
        out.append(np.pad(x[o:o + N], (0, max(0, N - len(x[o:o + N])))))
    return out


def main():
    rng = np.random.default_rng(20261130)
    t = np.arange(N) / SR
    synth = {"tone": tone, "chirp": chirp, "noise": noise, "clicks": clicks, "chord": chord}
    for name, f in synth.items():
        os.makedirs(os.path.join(OUT, name), exist_ok=True)
        for i in range(CLIPS):
            x = fade(norm(f(rng, t), rng.uniform(0.3, 0.8)))
            sf.write(os.path.join(OUT, name, f"{name}_{i:02d}.flac"), x, SR, subtype="PCM_16")
    os.makedirs(os.path.join(OUT, "speech"), exist_ok=True)
    for i, x in enumerate(speech_clips(rng)):
        sf.write(os.path.join(OUT, "speech", f"speech_{i:02d}.flac"), fade(norm(x, 0.7)), SR, subtype="PCM_16")


if __name__ == "__main__":
    main()
