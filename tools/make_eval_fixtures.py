#!/usr/bin/env python3
"""Writes the reference fixtures of melvae-models' codec-evaluation tests.

Run by hand, never by tests:

    /tmp/refvenv/bin/pip install numpy==2.4.6 scipy==1.17.1 soundfile==0.14.0 torch==2.15.0 \
        auraloss==0.4.0 librosa==0.11.0 pesq==0.0.4
    /tmp/refvenv/bin/python tools/make_eval_fixtures.py

Outputs, under crates/melvae-models/tests/fixtures/eval/: three reference /
degraded pairs (ref_<i>.wav, deg_<i>.wav; 16 kHz mono 16-bit PCM, 2.5 s cut
from three different speakers of assets/speech/) and expected.json.

The numbers are computed on the WAV files as read back (float = int16 / 32768,
held as float32 tensors like AudioSignal holds them), the reference being the
target and the degraded signal the estimate:

- mel_distance: DAC's MelSpectrogramLoss (descript-audio-codec 1.0.0,
  dac/nn/loss.py, over descript-audiotools 0.7.2 to 0.7.4, whose stft and
  mel_spectrogram did not change between them) built the way DAC's
  scripts/evaluate.py builds it: `losses.MelSpectrogramLoss()` with no
  arguments. That class is bound through argbind, and evaluate.py loads no
  config unless one passes --args.load, so the class defaults apply:
  n_mels [150, 80], windows [2048, 512] (hop = window // 4), clamp_eps 1e-5,
  mag_weight 1, log_weight 1, pow 2, mel_fmin 0, mel_fmax None (= sr / 2),
  match_stride False, window "hann". The computation is dac_mel_loss of
  tools/make_loss_fixtures.py (re-implemented there line for line from those
  sources). evaluate.py itself resamples to 22.05 and 44.1 kHz first; here the
  sample rate is 16000. The training config (conf/base.yml: 7 scales) is
  printed for information only.
- stft_distance: auraloss 0.4.0 `auraloss.freq.MultiResolutionSTFTLoss()`,
  defaults, called as (input=degraded, target=reference) on [1, 1, T].
- si_sdr: audiotools' SISDRLoss (audiotools/metrics/distance.py, identical in
  DAC's dac/nn/loss.py) with scaling=True, zero_mean=True, clip_min=None,
  eps=1e-8, re-implemented line for line below in float32 torch as the class
  computes it; reported in dB as +SDR (the loss negated).
- pesq_wb / pesq_nb: `pesq.pesq(16000, ref, deg, 'wb' | 'nb')` of the pesq
  0.0.4 package (ludlows' wrapper of ITU-T P.862 / P.862.2) on the int16
  arrays as read from the WAV files. Note that the wrapper divides both
  signals by their joint peak |value| before handing float32 to the C code.
"""
import json
import os
import sys

import auraloss
import numpy as np
import pesq
import scipy.signal
import soundfile as sf
import torch

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_loss_fixtures import dac_mel_loss  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "crates", "melvae-models", "tests", "fixtures", "eval")
SR = 16000
SECONDS = 2.5
# (clip, offset in seconds at 16 kHz): three different speakers.
CLIPS = [("v0_s0.flac", 0.25), ("v3_s1.flac", 0.75), ("v6_s2.flac", 1.25)]

# DAC scripts/evaluate.py: losses.MelSpectrogramLoss() -> class defaults.
MEL_EVAL = dict(n_mels=[150, 80], windows=[2048, 512], clamp_eps=1e-5, mag_weight=1.0, log_weight=1.0, pow_=2.0)
# DAC conf/base.yml (training), for information only.
MEL_TRAIN = dict(n_mels=[5, 10, 20, 40, 80, 160, 320], windows=[32, 64, 128, 256, 512, 1024, 2048],
                 clamp_eps=1e-5, mag_weight=0.0, log_weight=1.0, pow_=1.0)

rng = np.random.default_rng(20240601)


def to_int16(x):
    return np.clip(np.round(np.asarray(x) * 32768.0), -32768, 32767).astype(np.int16)


def load_reference(name, offset):
    x, sr = sf.read(os.path.join(ROOT, "assets", "speech", name), always_2d=True)
    x = x[:, 0]
    g = np.gcd(SR, sr)
    x = scipy.signal.resample_poly(x, SR // g, sr // g)
    start = int(round(offset * SR))
    n = int(round(SECONDS * SR))
    assert start + n <= len(x), name
    return to_int16(x[start:start + n])


def degrade(i, ref):
    x = ref.astype(np.float64) / 32768.0
    if i == 0:  # additive white noise at 15 dB SNR
        noise = rng.standard_normal(len(x))
        noise *= np.sqrt(np.mean(x ** 2) / np.mean(noise ** 2) / 10 ** (15.0 / 10))
        y = x + noise
    elif i == 1:  # 4th-order Butterworth low-pass at 3 kHz, then gain 0.7
        sos = scipy.signal.butter(4, 3000.0, btype="low", fs=SR, output="sos")
        y = 0.7 * scipy.signal.sosfilt(sos, x)
    else:  # 40-sample delay, short decaying echo, 6-bit quantisation
        h = np.zeros(40 + 3 * 240 + 1)
        h[40] = 1.0
        h[40 + 240] = 0.4
        h[40 + 480] = 0.16
        h[40 + 720] = 0.064
        y = scipy.signal.lfilter(h, [1.0], x)
        step = 2.0 / 2 ** 6
        y = np.clip(np.round(y / step) * step, -1.0, 1.0 - step)
    return to_int16(y)


def read_int16(path):
    a, sr = sf.read(path, dtype="int16")
    assert sr == SR and a.ndim == 1
    return a


def tensor(a):
    """int16 -> [1, 1, T] float32, as AudioSignal / the Rust side hold it."""
    return torch.from_numpy(a.astype(np.float32) / 32768.0)[None, None, :]


def si_sdr(references, estimates, scaling=True, zero_mean=True, eps=1e-8):
    """audiotools.metrics.distance.SISDRLoss.forward (clip_min None), negated."""
    nb = references.shape[0]
    references = references.reshape(nb, 1, -1).permute(0, 2, 1)
    estimates = estimates.reshape(nb, 1, -1).permute(0, 2, 1)
    if zero_mean:
        mean_reference = references.mean(dim=1, keepdim=True)
        mean_estimate = estimates.mean(dim=1, keepdim=True)
    else:
        mean_reference = 0
        mean_estimate = 0
    _references = references - mean_reference
    _estimates = estimates - mean_estimate
    references_projection = (_references ** 2).sum(dim=-2) + eps
    references_on_estimates = (_estimates * _references).sum(dim=-2) + eps
    scale = (references_on_estimates / references_projection).unsqueeze(1) if scaling else 1
    e_true = scale * _references
    e_res = _estimates - e_true
    signal = (e_true ** 2).sum(dim=1)
    noise = (e_res ** 2).sum(dim=1)
    sdr = -10 * torch.log10(signal / noise + eps)
    return -float(sdr.mean())


def main():
    os.makedirs(OUT, exist_ok=True)
    for i, (name, offset) in enumerate(CLIPS):
        ref = load_reference(name, offset)
        deg = degrade(i, ref)
        sf.write(os.path.join(OUT, f"ref_{i}.wav"), ref, SR, subtype="PCM_16")
        sf.write(os.path.join(OUT, f"deg_{i}.wav"), deg, SR, subtype="PCM_16")

    mrstft = auraloss.freq.MultiResolutionSTFTLoss()
    pairs = []
    for i in range(len(CLIPS)):
        ref = read_int16(os.path.join(OUT, f"ref_{i}.wav"))
        deg = read_int16(os.path.join(OUT, f"deg_{i}.wav"))
        y, x = tensor(ref), tensor(deg)  # y: reference (target), x: degraded (estimate)
        with torch.no_grad():
            row = {
                "reference": f"ref_{i}.wav",
                "degraded": f"deg_{i}.wav",
                "mel_distance": dac_mel_loss(x, y, SR, **MEL_EVAL),
                "stft_distance": float(mrstft(x, y)),
                "si_sdr": si_sdr(y, x),
                "pesq_wb": float(pesq.pesq(SR, ref, deg, "wb")),
                "pesq_nb": float(pesq.pesq(SR, ref, deg, "nb")),
            }
            info_train = dac_mel_loss(x, y, SR, **MEL_TRAIN)
        r64, d64 = ref / 32768.0, deg / 32768.0
        r64, d64 = r64 - r64.mean(), d64 - d64.mean()
        a = (r64 @ d64) / (r64 @ r64)
        sdr64 = 10 * np.log10(np.sum((a * r64) ** 2) / np.sum((d64 - a * r64) ** 2))
        print(f"pair {i}: {row}")
        print(f"  info: mel distance with DAC training config (conf/base.yml) = {info_train!r}; "
              f"float64 SI-SDR without eps = {sdr64!r}")
        pairs.append(row)

    expected = {
        "sample_rate": SR,
        "settings": {
            "mel_distance": {
                "reference": "descript-audio-codec 1.0.0 scripts/evaluate.py: dac.nn.loss.MelSpectrogramLoss() "
                             "class defaults, over descript-audiotools AudioSignal.mel_spectrogram",
                "n_mels": MEL_EVAL["n_mels"],
                "window_lengths": MEL_EVAL["windows"],
                "hop_lengths": [w // 4 for w in MEL_EVAL["windows"]],
                "window": "scipy.signal.get_window('hann', w) (periodic)",
                "stft": "torch.stft n_fft=w, center=True, pad_mode=reflect, magnitude |X|",
                "mel_filters": "librosa.filters.mel(sr, n_fft=w, n_mels, fmin=0, fmax=None) (slaney, norm=slaney)",
                "mel_fmin": 0.0,
                "mel_fmax": None,
                "match_stride": False,
                "clamp_eps": MEL_EVAL["clamp_eps"],
                "pow": MEL_EVAL["pow_"],
                "log_weight": MEL_EVAL["log_weight"],
                "mag_weight": MEL_EVAL["mag_weight"],
                "formula": "sum over scales of log_weight * mean|log10(clamp(Mx,eps)^pow) - log10(clamp(My,eps)^pow)|"
                           " + mag_weight * mean|Mx - My|",
            },
            "stft_distance": {
                "reference": "auraloss 0.4.0 auraloss.freq.MultiResolutionSTFTLoss() defaults, (input=degraded, "
                             "target=reference)",
                "fft_sizes": [1024, 2048, 512],
                "hop_sizes": [120, 240, 50],
                "win_lengths": [600, 1200, 240],
                "window": "torch.hann_window(win_length) (periodic), zero-padded to fft_size, centred",
                "stft": "torch.stft center=True, pad_mode=reflect; mag = sqrt(clamp(re^2+im^2, 1e-8))",
                "w_sc": 1.0, "w_log_mag": 1.0, "w_lin_mag": 0.0, "w_phs": 0.0,
                "formula": "mean over resolutions of ||Y-X||_F/||Y||_F + mean|ln X - ln Y|",
            },
            "si_sdr": {
                "reference": "descript-audiotools SISDRLoss (= dac.nn.loss.SISDRLoss), negated to dB",
                "scaling": True, "zero_mean": True, "eps": 1e-8, "clip_min": None,
                "formula": "a = (<e,r> + eps) / (<r,r> + eps); 10*log10(|a r|^2 / |e - a r|^2 + eps) "
                           "on zero-mean r (reference), e (degraded)",
            },
            "pesq": "pesq 0.0.4 pesq.pesq(16000, ref_int16, deg_int16, mode) for mode 'wb' and 'nb'",
            "samples": "float = int16 / 32768 (float32)",
        },
        "pairs": pairs,
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2)
        f.write("\n")

    # Degenerate case, documentation only: an all-zero degraded signal.
    ref = read_int16(os.path.join(OUT, "ref_0.wav"))
    zeros = np.zeros_like(ref)
    for mode in ("wb", "nb"):
        try:
            print(f"pesq {mode} of ref_0 vs all zeros:", pesq.pesq(SR, ref, zeros, mode))
        except Exception as e:  # noqa: BLE001
            print(f"pesq {mode} of ref_0 vs all zeros raised {type(e).__name__}: {e}")
        print(f"  with on_error=RETURN_VALUES:",
              pesq.pesq(SR, ref, zeros, mode, on_error=pesq.PesqError.RETURN_VALUES))


if __name__ == "__main__":
    main()
