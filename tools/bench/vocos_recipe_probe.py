#!/usr/bin/env python3
"""Search for a tiny Vocos recipe that beats Griffin-Lim, on the `vocos` package.

Trains the package's model (vocos.models.VocosBackbone + vocos.heads.ISTFTHead
on vocos.feature_extractors.MelSpectrogramFeatures: 24 kHz, n_fft 1024, hop
256, 100 mels = melvae's `vocos-24k` features) on random crops of
assets/speech, then scores held-out analysis-resynthesis (whole file -> mel
-> vocoder -> audio) with melvae's mel distance ported to torch (below), and
Griffin-Lim on the same mels as the baseline.

Split: melvae's own (crates/melvae-train/src/data.rs `stable_fraction`):
FNV-1a 64 of the path relative to data.dir, `(h % 1e6) / 1e6 < val_fraction`
(0.1), which holds out 7 of the 48 files.

Batches: like melvae's `EpochCursor` (clips in shuffled epoch order, a
uniformly random crop offset per clip), not bit-identical to its RNG.

Metric (crates/melvae-models/src/eval.rs MEL_DISTANCE_*, and
crates/melvae-losses/src/spectral.rs MultiScaleMelLoss): per scale
(n_mels, window) in [(150, 2048), (80, 512)]: STFT n_fft = window,
hop = window / 4, periodic Hann, centred reflect padding, magnitude (power
1); Slaney-scale Slaney-normalised mel filters (librosa defaults, fmin 0,
fmax Nyquist); L = mean|2 log10(max(X, 1e-5)) - 2 log10(max(Y, 1e-5))|
+ 1.0 * mean|X - Y| (X, Y the mel magnitudes, unclamped in the linear term);
summed over scales. SI-SDR as melvae's `si_sdr` (zero-mean, f64).

Griffin-Lim baseline (as melvae's `MelToAudio::GriffinLim`): exp of the
log-mel, NNLS mel inversion with librosa.util.nnls on the features' own
(torchaudio HTK, unnormalised) filterbank -- librosa's `mel_to_stft`
-- then librosa.griffinlim(32 iterations, momentum 0.99, random init,
seed 0, n_fft 1024, hop 256, centred). Cached in --cache.

    # melvae's vocos_tiny recipe (calibration: ~0.8; Griffin-Lim 0.484)
    /tmp/refvenv/bin/python tools/bench/vocos_recipe_probe.py --steps 3000 --threads 1 --tag baseline
    # the best recipe found (0.383 after 9000 steps, 0.41-0.42 after 3000)
    /tmp/refvenv/bin/python tools/bench/vocos_recipe_probe.py --threads 1 --steps 9000 \
        --dim 128 --inter 384 --lr 4e-3 --prior pinv --mel 0 --metric-loss 45 --tag best

--prior pinv: log|S| = log(max(pinv(F) exp(mel), 1e-5)) + the head's magnitude output (F the
features' 100 x 513 filterbank, pinv in f64; the head's magnitude rows scaled by 0.01 and their
bias zeroed at init, so training starts at the prior). --metric-loss W: W x the evaluation's own
two-scale mel distance as the loss. With another process busy on the 2 cores, --threads 1 ran
about 3x faster per step than 2 threads (28 against 86 ms, median, tiny model).

Every run appends one JSON line to --results. Needs torch, torchaudio,
numpy, soundfile, librosa and the `vocos` package.
"""
import argparse
import json
import math
import os
import sys
import time

import librosa
import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from vocos.feature_extractors import MelSpectrogramFeatures
from vocos.heads import ISTFTHead
from vocos.models import VocosBackbone

SR, N_FFT, HOP, N_MELS = 24000, 1024, 256, 100
METRIC_SCALES = [(150, 2048), (80, 512)]
DAC_SCALES = [(5, 32), (10, 64), (20, 128), (40, 256), (80, 512), (160, 1024), (320, 2048)]


# ---------------------------------------------------------------- data
def stable_fraction(rel):
    h = 0xCBF29CE484222325
    for b in rel.encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return (h % 1_000_000) / 1_000_000.0


def load_split(d, val_fraction):
    files = sorted(f for f in os.listdir(d) if f.lower().endswith((".flac", ".wav", ".mp3", ".ogg")))
    train, val = [], []
    for f in files:
        x, sr = sf.read(os.path.join(d, f), dtype="float32", always_2d=True)
        assert sr == SR, f"{f} is at {sr} Hz"
        x = x.mean(1)
        (val if stable_fraction(f) < val_fraction else train).append((f, x))
    return train, val


class Batches:
    def __init__(self, clips, batch, crop, seed):
        self.clips, self.batch, self.crop = clips, batch, crop
        self.rng = np.random.default_rng(seed)
        self.order, self.pos = self.rng.permutation(len(clips)), 0

    def next(self):
        out = []
        for _ in range(self.batch):
            if self.pos == len(self.order):
                self.order, self.pos = self.rng.permutation(len(self.clips)), 0
            x = self.clips[self.order[self.pos]][1]
            self.pos += 1
            o = self.rng.integers(0, len(x) - self.crop + 1)
            out.append(x[o:o + self.crop])
        return torch.from_numpy(np.stack(out))


# ---------------------------------------------------------------- losses / metric
class MultiScaleMel(torch.nn.Module):
    """melvae's MultiScaleMelLoss: log term `pow * log10(max(m, clamp))`, linear term on raw m."""

    def __init__(self, scales, clamp=1e-5, pow=1.0, log_weight=1.0, mag_weight=0.0):
        super().__init__()
        self.scales, self.clamp, self.pow, self.lw, self.mw = scales, clamp, pow, log_weight, mag_weight
        for i, (m, w) in enumerate(scales):
            fb = librosa.filters.mel(sr=SR, n_fft=w, n_mels=m, fmin=0.0, fmax=None, htk=False, norm="slaney")
            self.register_buffer(f"fb{i}", torch.from_numpy(fb).float())
            self.register_buffer(f"win{i}", torch.hann_window(w, periodic=True))

    def mel(self, x, i):
        m, w = self.scales[i]
        s = torch.stft(x, w, w // 4, w, getattr(self, f"win{i}"), center=True, pad_mode="reflect",
                       return_complex=True).abs()
        return getattr(self, f"fb{i}") @ s

    def forward(self, pred, target):
        total = 0.0
        for i in range(len(self.scales)):
            xm, ym = self.mel(pred, i), self.mel(target, i)
            lx = xm.clamp(min=self.clamp).log10() * self.pow
            ly = ym.clamp(min=self.clamp).log10() * self.pow
            l = self.lw * (lx - ly).abs().mean()
            if self.mw:
                l = l + self.mw * (xm - ym).abs().mean()
            total = total + l
        return total


class LogStft(torch.nn.Module):
    """L1 of natural-log STFT magnitudes (floored at 1e-5) at several resolutions, averaged."""

    def __init__(self, ffts=(512, 1024, 2048)):
        super().__init__()
        self.ffts = ffts
        for n in ffts:
            self.register_buffer(f"win{n}", torch.hann_window(n, periodic=True))

    def forward(self, pred, target):
        tot = 0.0
        for n in self.ffts:
            w = getattr(self, f"win{n}")
            a = torch.stft(pred, n, n // 4, n, w, center=True, pad_mode="reflect", return_complex=True).abs()
            b = torch.stft(target, n, n // 4, n, w, center=True, pad_mode="reflect", return_complex=True).abs()
            tot = tot + (a.clamp(min=1e-5).log() - b.clamp(min=1e-5).log()).abs().mean()
        return tot / len(self.ffts)


class MrStft(torch.nn.Module):
    """auraloss' MultiResolutionSTFTLoss defaults as melvae's `auraloss_default` (the STFT distance)."""

    RES = [(1024, 120, 600), (2048, 240, 1200), (512, 50, 240)]

    def forward(self, pred, target):
        tot = 0.0
        for n, hop, win in self.RES:
            w = torch.hann_window(win, periodic=True, dtype=pred.dtype)
            a = torch.stft(pred, n, hop, win, w, center=True, pad_mode="reflect", return_complex=True)
            b = torch.stft(target, n, hop, win, w, center=True, pad_mode="reflect", return_complex=True)
            xm, ym = a.abs().square().clamp(min=1e-8).sqrt(), b.abs().square().clamp(min=1e-8).sqrt()
            sc = (ym - xm).square().sum().sqrt() / ym.square().sum().sqrt()
            tot = tot + sc + (xm.log() - ym.log()).abs().mean()
        return tot / len(self.RES)


def si_sdr(ref, est, eps=1e-8):
    r = ref.astype(np.float64) - ref.mean()
    e = est.astype(np.float64) - est.mean()
    a = (np.dot(e, r) + eps) / (np.dot(r, r) + eps)
    t = a * r
    return 10 * math.log10((t * t).sum() / ((e - t) ** 2).sum() + eps)


# ---------------------------------------------------------------- model
class Vocoder(torch.nn.Module):
    """The package's backbone + ISTFT head; optional mel pseudo-inverse magnitude prior."""

    def __init__(self, dim, inter, layers, prior="none", feats=None, phase="direct"):
        super().__init__()
        self.backbone = VocosBackbone(N_MELS, dim, inter, layers)
        self.head = ISTFTHead(dim, N_FFT, HOP, "center")
        self.prior, self.phase = prior, phase
        # "cumsum": the head predicts each frame's phase advance, added to a bin-centre sinusoid's
        # (2 pi k hop / n_fft), and the phase is its running sum over frames
        k = torch.arange(N_FFT // 2 + 1, dtype=torch.float32)
        self.register_buffer("advance", (2 * math.pi * k * HOP / N_FFT)[None, :, None])
        if prior != "none":
            fb = feats.mel_spec.mel_scale.fb.T.double()  # [n_mels, n_freqs]
            self.register_buffer("pinv", torch.linalg.pinv(fb).float())  # [n_freqs, n_mels]
            self.register_buffer("fbT", fb.float())
            with torch.no_grad():  # start at the prior magnitude: zero the magnitude half of the head
                self.head.out.weight[: N_FFT // 2 + 1].mul_(0.01)
                self.head.out.bias[: N_FFT // 2 + 1].zero_()

    def prior_mag(self, mel):
        m = mel.exp()
        if self.prior == "pinv":
            return (self.pinv @ m).clamp(min=1e-5)
        # "nnls": a few projected-gradient steps of min ||fb s - m||, s >= 0, from the clipped pinv
        s = (self.pinv @ m).clamp(min=0)
        L = float(torch.linalg.matrix_norm(self.fbT, ord=2) ** 2)
        for _ in range(int(self.prior[4:] or 20)):
            s = (s - (self.fbT.T @ (self.fbT @ s - m)) / L).clamp(min=0)
        return s.clamp(min=1e-5)

    def forward(self, mel):
        h = self.backbone(mel)
        x = self.head.out(h).transpose(1, 2)
        lm, p = x.chunk(2, dim=1)
        if self.prior != "none":
            with torch.no_grad():
                lm0 = self.prior_mag(mel).log()
            lm = lm + lm0
        mag = torch.exp(lm).clip(max=1e2)
        if self.phase == "cumsum":
            p = torch.cumsum(p + self.advance, dim=2)
        S = mag * (torch.cos(p) + 1j * torch.sin(p))
        return self.head.istft(S)


# ---------------------------------------------------------------- evaluation
def griffin_lim_baseline(val, feats, cache):
    if cache and os.path.exists(cache):
        with open(cache) as f:
            d = json.load(f)
        if d.get("files") == [f for f, _ in val] and "stft_distance" in d:
            return d
    fb = feats.mel_spec.mel_scale.fb.T.numpy().astype(np.float64)  # [n_mels, n_freqs]
    metric = MultiScaleMel(METRIC_SCALES, 1e-5, 2.0, 1.0, 1.0).double()
    md, sd, st = [], [], []
    for f, x in val:
        with torch.no_grad():
            mel = feats(torch.from_numpy(x)[None]).double()[0].numpy()
        S = librosa.util.nnls(fb, np.exp(mel))
        y = librosa.griffinlim(S, n_iter=32, hop_length=HOP, win_length=N_FFT, n_fft=N_FFT, window="hann",
                               center=True, length=len(x), momentum=0.99, init="random", random_state=0)
        with torch.no_grad():
            md.append(float(metric(torch.from_numpy(y.astype(np.float64))[None],
                                   torch.from_numpy(x.astype(np.float64))[None])))
        sd.append(si_sdr(x, y))
        with torch.no_grad():
            st.append(float(MrStft()(torch.from_numpy(y.astype(np.float64))[None],
                                     torch.from_numpy(x.astype(np.float64))[None])))
    d = {"files": [f for f, _ in val], "mel_distance": md, "si_sdr": sd, "stft_distance": st,
         "mean_stft_distance": float(np.mean(st)),
         "mean_mel_distance": float(np.mean(md)), "mean_si_sdr": float(np.mean(sd)),
         "how": "librosa.util.nnls on the torchaudio HTK filterbank + librosa.griffinlim 32 it, momentum 0.99, seed 0"}
    if cache:
        os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
        with open(cache, "w") as f:
            json.dump(d, f)
    return d


def evaluate(model, val, feats, metric, stft_dist=None):
    model.eval()
    md, sd, st = [], [], []
    with torch.no_grad():
        for _, x in val:
            xt = torch.from_numpy(x)[None]
            y = model(feats(xt))
            n = len(x)
            y = F.pad(y, (0, max(0, n - y.shape[1])))[:, :n]
            md.append(float(metric(y.double(), xt.double())))
            sd.append(si_sdr(x, y[0].numpy()))
            if stft_dist is not None:
                st.append(float(stft_dist(y.double(), xt.double())))
    model.train()
    if stft_dist is not None:
        return float(np.mean(md)), float(np.mean(sd)), md, float(np.mean(st))
    return float(np.mean(md)), float(np.mean(sd)), md


# ---------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "assets", "speech"))
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--inter", type=int, default=192)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=10240)
    p.add_argument("--steps", type=int, default=3000, help="schedule length in steps (without --minutes)")
    p.add_argument("--minutes", type=float, default=0.0,
                   help="train for this wall time; the schedule runs on elapsed/budget instead of steps")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--betas", type=float, nargs=2, default=(0.8, 0.9))
    p.add_argument("--wd", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=0.0, help="grad-norm clip (0: none)")
    p.add_argument("--mel", type=float, default=45.0, help="weight of L1 of the features' log-mel")
    p.add_argument("--msmel", type=float, default=0.0, help="weight of DAC's 7-scale mel loss")
    p.add_argument("--metric-loss", type=float, default=0.0, help="weight of the evaluation metric itself")
    p.add_argument("--metric-scales", default="150:2048,80:512",
                   help="n_mels:window scales of --metric-loss (default: the evaluation's)")
    p.add_argument("--logstft", type=float, default=0.0, help="weight of the log-magnitude STFT loss")
    p.add_argument("--wav", type=float, default=0.0, help="weight of waveform L1")
    p.add_argument("--prior", default="none", help="none | pinv | nnlsK (K projected-gradient steps)")
    p.add_argument("--phase", default="direct", help="direct (the package's head) | cumsum (phase advances)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=float, default=0.0, help="also evaluate every this many minutes")
    p.add_argument("--tag", default="")
    p.add_argument("--results", default="/tmp/vocos_probe/results.jsonl")
    p.add_argument("--cache", default="/tmp/vocos_probe/gl_baseline.json")
    p.add_argument("--save", default="", help="save the final weights (state_dict) here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, val = load_split(args.data, args.val_fraction)
    feats = MelSpectrogramFeatures(SR, N_FFT, HOP, N_MELS, "center")
    metric = MultiScaleMel(METRIC_SCALES, 1e-5, 2.0, 1.0, 1.0).double()
    print(f"{len(train)} train / {len(val)} held-out files: {[f for f, _ in val]}", flush=True)
    gl = griffin_lim_baseline(val, feats, args.cache)
    print(f"Griffin-Lim (32 it) held-out mel distance {gl['mean_mel_distance']:.3f}, "
          f"SI-SDR {gl['mean_si_sdr']:.2f} dB, STFT distance {gl['mean_stft_distance']:.3f}", flush=True)

    model = Vocoder(args.dim, args.inter, args.layers, args.prior, feats, args.phase)
    nparam = sum(v.numel() for v in model.parameters())
    msmel = MultiScaleMel(DAC_SCALES) if args.msmel else None
    mscales = [tuple(int(v) for v in sc.split(":")) for sc in args.metric_scales.split(",")]
    mloss = MultiScaleMel(mscales, 1e-5, 2.0, 1.0, 1.0) if args.metric_loss else None
    logstft = LogStft() if args.logstft else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas), eps=1e-8,
                            weight_decay=args.wd)
    crop = args.crop // HOP * HOP
    batches = Batches(train, args.batch, crop, args.seed)
    budget = args.minutes * 60.0

    def lr_at(step, frac):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))

    curve = []
    t_train, step, next_eval, t0 = 0.0, 0, args.eval_every * 60, time.perf_counter()
    last_log = 0.0
    while True:
        frac = t_train / budget if budget else step / args.steps
        if frac >= 1.0:
            break
        ts = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, frac)
        x = batches.next()
        with torch.no_grad():
            target = feats(x)
        y = model(target)
        loss = args.mel * (feats(y) - target).abs().mean()
        if msmel is not None:
            loss = loss + args.msmel * msmel(y, x)
        if mloss is not None:
            loss = loss + args.metric_loss * mloss(y, x)
        if logstft is not None:
            loss = loss + args.logstft * logstft(y, x)
        if args.wav:
            loss = loss + args.wav * (y - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        t_train += time.perf_counter() - ts
        if t_train - last_log > 60:
            last_log = t_train
            print(f"step {step} ({t_train / 60:.1f} min, {1e3 * t_train / step:.1f} ms/step) loss {float(loss.detach()):.4f}",
                  flush=True)
        if args.eval_every and t_train >= next_eval:
            next_eval += args.eval_every * 60
            md, sd, _ = evaluate(model, val, feats, metric)
            curve.append((step, round(t_train / 60, 2), round(md, 4)))
            print(f"  eval step {step}: mel distance {md:.3f}, SI-SDR {sd:.2f}", flush=True)
    md, sd, per, stftd = evaluate(model, val, feats, metric, MrStft())
    wall = time.perf_counter() - t0
    rec = {"tag": args.tag, "config": {k: v for k, v in vars(args).items()
                                       if k not in ("data", "results", "cache", "save", "tag")},
           "params": nparam, "steps": step, "train_min": round(t_train / 60, 2), "wall_min": round(wall / 60, 2),
           "ms_per_step": round(1e3 * t_train / step, 1), "mel_distance": round(md, 4), "si_sdr": round(sd, 2), "stft_distance": round(stftd, 4),
           "per_file": [round(v, 3) for v in per], "curve": curve,
           "gl_mel_distance": round(gl["mean_mel_distance"], 4), "gl_si_sdr": round(gl["mean_si_sdr"], 2),
           "gl_stft_distance": round(gl["mean_stft_distance"], 4)}
    print(json.dumps(rec), flush=True)
    if args.results:
        os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(rec) + "\n")
    if args.save:
        torch.save(model.state_dict(), args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
