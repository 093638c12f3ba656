#!/usr/bin/env python3
"""Writes the reference fixtures of melvae-losses' parity tests.

Run by hand, never by tests:

    /tmp/refvenv/bin/pip install auraloss==0.4.0 librosa==0.11.0 torch==2.11.0 scipy numpy
    /tmp/refvenv/bin/python tools/make_loss_fixtures.py

References: auraloss 0.4.0 (MultiResolutionSTFTLoss), DAC's
MelSpectrogramLoss (re-implemented below line for line from
descript-audiotools 0.7.2 / descript-audio-codec 1.0.0, whose packages need
heavy extra dependencies), torch for BCE / cross-entropy, numpy for the rest.
Outputs float32 .npy files under crates/melvae-losses/tests/fixtures/.
"""
import os

import auraloss
import librosa
import numpy as np
import scipy.signal
import torch

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "melvae-losses", "tests", "fixtures")
rng = np.random.default_rng(7)


def save(name, a):
    np.save(os.path.join(OUT, name + ".npy"), np.ascontiguousarray(np.asarray(a, dtype=np.float32)))


def t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def dac_mel_loss(x, y, sr, n_mels, windows, clamp_eps, mag_weight, log_weight, pow_):
    """dac.nn.loss.MelSpectrogramLoss.forward with audiotools' stft/mel."""
    loss = 0.0
    for n, w in zip(n_mels, windows):
        window = torch.from_numpy(scipy.signal.get_window("hann", w)).float()
        basis = torch.from_numpy(librosa.filters.mel(sr=sr, n_fft=w, n_mels=n, fmin=0.0, fmax=None)).float()

        def mel(s):
            st = torch.stft(s.reshape(-1, s.shape[-1]), n_fft=w, hop_length=w // 4, window=window,
                            return_complex=True, center=True)
            mag = torch.abs(st)
            return (mag.transpose(1, -1) @ basis.T).transpose(-1, 1)

        xm, ym = mel(x), mel(y)
        loss += log_weight * torch.nn.functional.l1_loss(
            xm.clamp(clamp_eps).pow(pow_).log10(), ym.clamp(clamp_eps).pow(pow_).log10())
        loss += mag_weight * torch.nn.functional.l1_loss(xm, ym)
    return float(loss)


def main():
    os.makedirs(OUT, exist_ok=True)
    n = 4800
    tt = np.arange(n) / 24000.0
    target = np.stack([
        0.5 * np.sin(2 * np.pi * (200 + 3000 * tt) * tt) + 0.05 * rng.standard_normal(n),
        0.3 * np.sin(2 * np.pi * 440 * tt) * np.exp(-3 * tt) + 0.02 * rng.standard_normal(n),
    ])[:, None, :]
    pred = 0.8 * target + 0.03 * rng.standard_normal(target.shape)
    save("wave_target", target)
    save("wave_pred", pred)
    x, y = t(pred), t(target)

    for name, kwargs in [("mrstft_default", {}), ("mrstft_lin", {"w_lin_mag": 1.0})]:
        f = auraloss.freq.MultiResolutionSTFTLoss(output="full", **kwargs)
        total, sc, logm, linm, _ = f(x, y)
        mean = lambda v: float(sum(float(e) for e in v) / len(v))
        save(name, [float(total), mean(sc), mean(logm)])

    save("mel_dac_24k", [dac_mel_loss(x, y, 24000, [5, 10, 20, 40, 80, 160, 320],
                                      [32, 64, 128, 256, 512, 1024, 2048], 1e-5, 0.0, 1.0, 1.0)])
    save("mel_default_44k", [dac_mel_loss(x, y, 44100, [150, 80], [2048, 512], 1e-5, 1.0, 1.0, 2.0)])

    # Stereo: mid/side at half scale and left/right, each through auraloss' MR-STFT.
    st_t = np.concatenate([target, 0.7 * target[:, :, ::-1]], axis=1)
    st_p = np.concatenate([pred, 0.6 * pred[:, :, ::-1]], axis=1)
    save("stereo_target", st_t)
    save("stereo_pred", st_p)
    mr = auraloss.freq.MultiResolutionSTFTLoss()
    sp, stg = t(st_p), t(st_t)
    mid = lambda s: ((s[:, 0] + s[:, 1]) / 2)[:, None]
    side = lambda s: ((s[:, 0] - s[:, 1]) / 2)[:, None]
    ch = lambda s, c: s[:, c][:, None]
    w = {"mid": 1.0, "side": 0.5, "left": 0.25, "right": 0.25}
    stereo = (w["mid"] * mr(mid(sp), mid(stg)) + w["side"] * mr(side(sp), side(stg))
              + w["left"] * mr(ch(sp, 0), ch(stg, 0)) + w["right"] * mr(ch(sp, 1), ch(stg, 1)))
    save("stereo_loss", [float(stereo)])
    save("l1", [float(np.abs(pred - target).mean())])

    # KL with free bits, latent [4, 3, 5].
    mu = rng.standard_normal((4, 3, 5)) * 1.5
    lv = rng.standard_normal((4, 3, 5)) * 0.8
    save("kl_mean", mu)
    save("kl_logvar", lv)
    kl = 0.5 * (mu ** 2 + np.exp(lv) - 1 - lv)
    per = kl.reshape(-1, 5).sum(1)
    save("kl_values", [per.mean(), (per * (per > 4.0)).mean(), np.maximum(kl.reshape(-1, 5).mean(0), 0.8).sum()])

    # GAN: two discriminators with different output shapes.
    r = [rng.standard_normal((2, 1, 7)), rng.standard_normal((2, 9))]
    f = [rng.standard_normal((2, 1, 7)) * 0.5 - 0.3, rng.standard_normal((2, 9)) * 2.0]
    for i in range(2):
        save(f"gan_real{i}", r[i])
        save(f"gan_fake{i}", f[i])
    hinge_d = sum(np.maximum(1 - a, 0).mean() + np.maximum(1 + b, 0).mean() for a, b in zip(r, f))
    hinge_g = sum(-b.mean() for b in f)
    ls_d = sum(((a - 1) ** 2).mean() + (b ** 2).mean() for a, b in zip(r, f))
    ls_g = sum(((b - 1) ** 2).mean() for b in f)
    fr = [[rng.standard_normal((2, 3, 6)), rng.standard_normal((2, 4))], [rng.standard_normal((2, 5)) * 3.0]]
    ff = [[a + 0.3 * rng.standard_normal(a.shape) for a in d] for d in fr]
    for k, (dr, df) in enumerate(zip(fr, ff)):
        for l, (a, b) in enumerate(zip(dr, df)):
            save(f"fm_real{k}_{l}", a)
            save(f"fm_fake{k}_{l}", b)
    fm_abs = sum(np.abs(b - a).mean() for dr, df in zip(fr, ff) for a, b in zip(dr, df))
    fm_rel = sum(np.abs(b - a).mean() / np.abs(a).mean() for dr, df in zip(fr, ff) for a, b in zip(dr, df))
    save("gan_values", [hinge_d, hinge_g, ls_d, ls_g, fm_abs, fm_rel])

    # Flow matching on a mel-like [2, 3, 4] with a time mask [2, 1, 4].
    x0 = rng.standard_normal((2, 3, 4))
    x1 = rng.standard_normal((2, 3, 4))
    tt2 = np.array([0.25, 0.9])
    sig = 1e-4
    xt = (1 - (1 - sig) * tt2[:, None, None]) * x0 + tt2[:, None, None] * x1
    u = x1 - (1 - sig) * x0
    v = u + 0.1 * rng.standard_normal(u.shape)
    mask = np.array([[[1, 1, 1, 0]], [[1, 1, 0, 0]]], dtype=np.float64)
    fl = ((v - u) ** 2 * mask).sum() / (mask.sum() * 3)
    for name, a in [("flow_x0", x0), ("flow_x1", x1), ("flow_t", tt2), ("flow_xt", xt), ("flow_u", u), ("flow_v", v),
                    ("flow_mask", mask)]:
        save(name, a)
    save("flow_loss", [fl])

    # Token losses: [2, 5] positions, mask [2, 5].
    pm = rng.standard_normal((2, 5, 3))
    tm = rng.standard_normal((2, 5, 3))
    m = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=np.float64)
    mae = (np.abs(pm - tm) * m[:, :, None]).sum() / (m.sum() * 3)
    logits = rng.standard_normal((2, 5)) * 4
    gate = (rng.random((2, 5)) > 0.6).astype(np.float64)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(gate), reduction="none", pos_weight=torch.tensor(5.0)).numpy()
    bce = (bce * m).sum() / m.sum()
    cl = rng.standard_normal((2, 5, 7)) * 2
    ct = rng.integers(0, 7, (2, 5))
    ct[0, 3:] = 99  # ignored positions
    ce = torch.nn.functional.cross_entropy(torch.from_numpy(cl).reshape(-1, 7), torch.from_numpy(ct).reshape(-1),
                                           ignore_index=99, label_smoothing=0.1)
    for name, a in [("tok_pred", pm), ("tok_target", tm), ("tok_mask", m), ("tok_logits", logits), ("tok_gate", gate),
                    ("tok_cls_logits", cl), ("tok_cls_targets", ct)]:
        save(name, a)
    save("tok_values", [mae, bce, float(ce)])


if __name__ == "__main__":
    main()
