#!/usr/bin/env python3
"""Writes the reference fixtures of melvae-dsp's parity tests.

Run by hand, never by tests:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install librosa==0.11.0 torch==2.11.0 torchaudio==2.11.0 numpy scipy
    /tmp/refvenv/bin/python tools/make_dsp_fixtures.py   # needs ffmpeg on PATH

Outputs under crates/melvae-dsp/tests/fixtures/:
  signal_{chirp,noise,speech}_{24k,22k}.npy   float32 input signals (0.5 s)
  fb_*.npy                                    mel filterbanks [n_mels, n_bins]
  stft_*.npy                                  STFT magnitudes [bins, frames]
  logmel_{vocos24k,hifigan22k}_*.npy          log-mels [n_mels, frames]
  audio/tone.{flac,mp3,ogg,aac,m4a}           a 440/660 Hz stereo tone, encoded by ffmpeg
"""
import os
import subprocess
import tempfile

import librosa
import numpy as np
import torch
import torchaudio

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "melvae-dsp", "tests", "fixtures")


def save(name, a):
    np.save(os.path.join(OUT, name + ".npy"), np.ascontiguousarray(a, dtype=np.float32))


def signals(sr, n):
    t = np.arange(n) / sr
    chirp = 0.5 * np.sin(2 * np.pi * (50 * t + (sr / 2 * 0.9 - 50) / (2 * t[-1]) * t**2))
    rng = np.random.default_rng(1234)
    noise = 0.3 * rng.standard_normal(n)
    # "Speech-like": a glottal pulse train with a gliding f0 through three
    # formant resonators, with a syllabic amplitude envelope and a silent gap.
    f0 = 120 + 40 * np.sin(2 * np.pi * 2.5 * t)
    phase = np.cumsum(f0 / sr)
    pulses = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
    x = pulses
    for fc, bw in [(700, 80), (1200, 90), (2600, 120)]:
        r = np.exp(-np.pi * bw / sr)
        a1, a2 = -2 * r * np.cos(2 * np.pi * fc / sr), r * r
        y = np.zeros(n)
        for i in range(n):
            y[i] = x[i] - a1 * (y[i - 1] if i >= 1 else 0) - a2 * (y[i - 2] if i >= 2 else 0)
        x = y / np.max(np.abs(y))
    env = np.clip(np.sin(2 * np.pi * 3 * t), 0, None) ** 0.5
    speech = 0.6 * x * env
    speech[int(0.2 * n):int(0.25 * n)] = 0.0
    return {"chirp": chirp, "noise": noise, "speech": speech}


def vocos_logmel(y):
    """Vocos' MelSpectrogramFeatures with padding="center"."""
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=24000, n_fft=1024, hop_length=256, n_mels=100, center=True, power=1
    )
    with torch.no_grad():
        m = mel(torch.from_numpy(y.astype(np.float32)))
    return torch.log(torch.clip(m, min=1e-7)).numpy()


def hifigan_logmel(y):
    """HiFi-GAN meldataset.mel_spectrogram (config v1), float32 as in training."""
    basis = torch.from_numpy(librosa.filters.mel(sr=22050, n_fft=1024, n_mels=80, fmin=0, fmax=8000)).float()
    x = torch.from_numpy(y.astype(np.float32))[None, None]
    x = torch.nn.functional.pad(x, (384, 384), mode="reflect")[0]
    spec = torch.stft(x, 1024, hop_length=256, win_length=1024, window=torch.hann_window(1024),
                      center=False, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
    spec = torch.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
    return torch.log(torch.clamp(basis @ spec, min=1e-5))[0].numpy()


def main():
    os.makedirs(os.path.join(OUT, "audio"), exist_ok=True)
    n24, n22 = 12000, 11025
    s24, s22 = signals(24000, n24), signals(22050, n22)
    for k in s24:
        s24[k] = s24[k].astype(np.float32)
        s22[k] = s22[k].astype(np.float32)
        save(f"signal_{k}_24k", s24[k])
        save(f"signal_{k}_22k", s22[k])
        save(f"logmel_vocos24k_{k}", vocos_logmel(s24[k]))
        save(f"logmel_hifigan22k_{k}", hifigan_logmel(s22[k]))
        # The same vocos mel through librosa (which Vocos' torchaudio matches).
        m = librosa.feature.melspectrogram(y=s24[k], sr=24000, n_fft=1024, hop_length=256, n_mels=100,
                                           htk=True, norm=None, power=1.0, center=True, pad_mode="reflect")
        save(f"logmel_vocos24k_librosa_{k}", np.log(np.maximum(m, 1e-7)))

    # Filterbanks.
    save("fb_htk_24k_1024_100", librosa.filters.mel(sr=24000, n_fft=1024, n_mels=100, htk=True, norm=None))
    save("fb_slaney_22k_1024_80_8k", librosa.filters.mel(sr=22050, n_fft=1024, n_mels=80, fmax=8000))
    save("fb_slaney_nonorm_16k_512_40_50_7000",
         librosa.filters.mel(sr=16000, n_fft=512, n_mels=40, fmin=50, fmax=7000, htk=False, norm=None))
    save("fb_htk_slaneynorm_8k_256_20",
         librosa.filters.mel(sr=8000, n_fft=256, n_mels=20, htk=True, norm="slaney"))
    save("fb_torchaudio_htk_24k_1024_100",
         torchaudio.functional.melscale_fbanks(513, 0.0, 12000.0, 100, 24000, norm=None, mel_scale="htk").T.numpy())

    # STFT magnitudes.
    x = s24["chirp"]
    save("stft_librosa_512_128_hann", np.abs(librosa.stft(x, n_fft=512, hop_length=128, pad_mode="reflect")))
    save("stft_librosa_400_100_300_hamming_constant",
         np.abs(librosa.stft(x, n_fft=400, hop_length=100, win_length=300, window="hamming", pad_mode="constant")))
    save("stft_torch_1024_256_nocenter",
         torch.stft(torch.from_numpy(x), 1024, 256, window=torch.hann_window(1024), center=False,
                    return_complex=True).abs().numpy())

    # Encoded audio: 0.25 s stereo tone at 44.1 kHz (440 Hz left, 660 Hz right).
    sr = 44100
    t = np.arange(int(0.25 * sr)) / sr
    st = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 660 * t)], axis=1)
    with tempfile.TemporaryDirectory() as d:
        raw = os.path.join(d, "tone.f32")
        st.astype("<f4").tofile(raw)
        for ext, args in [("flac", []), ("mp3", ["-c:a", "libmp3lame", "-b:a", "64k"]),
                          ("ogg", ["-c:a", "libvorbis", "-q:a", "2"]), ("aac", ["-c:a", "aac", "-b:a", "64k"]),
                          ("m4a", ["-c:a", "aac", "-b:a", "64k"])]:
            subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-f", "f32le", "-ar", str(sr), "-ac", "2",
                            "-i", raw, *args, "-map_metadata", "-1", "-fflags", "+bitexact",
                            os.path.join(OUT, "audio", "tone." + ext)], check=True)


if __name__ == "__main__":
    main()
