#!/usr/bin/env python3
"""PyTorch twin of melvae's waveform codecs' training steps (speed
comparison): the waveform VAE and a level of the hierarchical waveform
VQ-VAE.

Reads a dump directory written by the Rust side (`wave_vae_throughput
--setting S --dump DIR`):

    DIR/weights.safetensors  every tensor by its melvae name (f32; the
                             VQ-VAE's quantiser buffers included)
    DIR/batch.npy            audio [batch, channels, samples] (f32)
    DIR/meta.json            {"family", "setting", "model", "eval_terms",
                              "eval_total", "melvae_step_ms", "threads",
                              "learning_rate", "n_params", ...}:
                             wave_vae: model WaveVaeConfig, "loss":
                             WaveVaeLossConfig, "step", "kl_weight",
                             ["grad_clip"]; eval_terms {stft, [mel], [l1], kl}
                             vqvae: model VqVaeConfig {net: WaveVaeConfig,
                             codebook_size, commitment, ema_decay,
                             restart_threshold}; eval_terms {stft, codebook,
                             commitment}
                             (no "family": wave_vae)

builds the family's model with melvae's parameter names:

- wave_vae (crates/melvae-models/src/wave_vae.rs): SEANet encoder/decoder,
  causal or centred convs, ELU or Snake, weight norm on/off, bottleneck
  none/LSTM, mono/stereo; the loss of WaveVaeObjective (MR-STFT, stereo
  mid/side, DAC mel, L1) + kl_weight * KL (free bits);
- vqvae (crates/melvae-models/src/vqvae.rs): the same encoder with
  latent_dim outputs (the vectors to quantise), the VectorQuantizer of
  crates/melvae-layers/src/vq.rs (tools/bench/mel_tokens_twin.py's twin of
  it: nearest code, straight-through, codebook + commitment * commitment
  loss, EMA codebook when ema_decay is set, usage averages and dead-code
  restarts from the batch with melvae's SplitMix64 draws), the same
  decoder; the loss of crates/melvae-train/src/tasks/vqvae.rs: auraloss'
  MultiResolutionSTFTLoss defaults of the reconstruction + the
  quantiser's loss,

loads the weights strictly by name, checks the evaluation-mode loss terms
(VAE: the posterior mean, no noise; VQ-VAE: the quantiser not updated, no
restarts) against melvae's, then times the training step (VAE:
reparameterised sample, recon + kl_weight * kl; VQ-VAE: the quantiser in
training mode, usage updates and restarts included, as melvae's step; then
backward and AdamW) on the CPU with melvae's thread count: one warm-up
step, then the mean of --steps.

    /tmp/refvenv/bin/python tools/bench/wave_vae_twin.py /tmp/wave_twin_dump
    /tmp/refvenv/bin/python tools/bench/wave_vae_twin.py DIR --steps 10 --compile
    /tmp/refvenv/bin/python tools/bench/wave_vae_twin.py --selftest   # no dump needed

Exits 1 when a loss term differs from melvae's by more than --tol
(relative), 2 on a weight mismatch or an unknown family. Needs torch,
numpy, safetensors, librosa (mel filters). Nothing here is used by the
tests.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twin_common import load_weights, rel, time_steps


# ---------------------------------------------------------------- layers


class _WeightNormed(nn.Module):
    """A conv weight of `shape`, plain (`weight`) or weight-normed
    (`weight_g` [shape[0], 1, 1] and `weight_v`, the norm over the other
    axes), and a bias of `n_bias`; `fan` scales the random init."""

    def __init__(self, shape, n_bias, fan, weight_norm):
        super().__init__()
        self.weight_norm = weight_norm
        # melvae's (and torch's) init: uniform in +-1/sqrt(fan_in), a
        # weight-norm gain of 1/sqrt(3) (the norm such a slice has on
        # average), bias uniform in the same bound.
        bound = 1 / math.sqrt(fan)
        w = (torch.rand(*shape) * 2 - 1) * bound
        if weight_norm:
            self.weight_g = nn.Parameter(torch.full((shape[0], 1, 1), 1 / math.sqrt(3)))
            self.weight_v = nn.Parameter(w)
        else:
            self.weight = nn.Parameter(w)
        self.bias = nn.Parameter((torch.rand(n_bias) * 2 - 1) * bound)

    def effective_weight(self):
        if not self.weight_norm:
            return self.weight
        v = self.weight_v
        return v * (self.weight_g / v.pow(2).sum(dim=(1, 2), keepdim=True).sqrt())


class Conv1d(_WeightNormed):
    """melvae_layers::Conv1d: `weight` [out, in, k] or weight norm
    (`weight_g` [out, 1, 1], `weight_v`), `bias` [out]; causal padding
    `span - stride` on the left, or "same" `(span - 1) / 2` left and the
    rest right."""

    def __init__(self, cin, cout, k, stride=1, dilation=1, weight_norm=True, causal=True):
        super().__init__((cout, cin, k), cout, cin * k, weight_norm)
        self.k, self.stride, self.dilation, self.causal = k, stride, dilation, causal

    def forward(self, x):
        span = (self.k - 1) * self.dilation + 1
        if self.causal:
            left, right = span - self.stride, 0
        else:
            left = (span - 1) // 2
            right = span - 1 - left
        x = F.pad(x, (left, right))
        return F.conv1d(x, self.effective_weight(), self.bias, self.stride, 0, self.dilation)


class Upsample(_WeightNormed):
    """melvae_layers::Upsample: transposed conv, weight [in, out, k] (weight
    norm per input channel, `weight_g` [in, 1, 1]), bias [out]; the
    `k - stride` overlap trimmed on the right (causal) or split with the
    larger half on the left."""

    def __init__(self, cin, cout, k, stride, weight_norm=True, causal=True):
        super().__init__((cin, cout, k), cout, cout * k, weight_norm)
        self.k, self.stride, self.causal = k, stride, causal

    def forward(self, x):
        t = x.shape[-1]
        y = F.conv_transpose1d(x, self.effective_weight(), self.bias, self.stride)
        extra = self.k - self.stride
        left = 0 if self.causal else extra - extra // 2
        return y[..., left:left + t * self.stride]


class Activation(nn.Module):
    """ELU (alpha 1) or Snake `x + sin^2(alpha x) / (alpha + 1e-9)` with a
    per-channel `alpha`."""

    def __init__(self, kind, channels):
        super().__init__()
        self.kind = kind
        if kind == "snake":
            self.alpha = nn.Parameter(torch.ones(channels))
        elif kind != "elu":
            raise ValueError(f"unknown activation {kind!r}")

    def forward(self, x):
        if self.kind == "elu":
            return F.elu(x)
        a = self.alpha.view(1, -1, 1)
        return x + torch.sin(x * a).pow(2) / (a + 1e-9)


class ResidualUnit(nn.Module):
    """melvae_layers::ResidualUnit (SEANet, identity skip):
    `x + conv2(act2(conv1(act1(x))))`, conv1 dilated to channels / 2."""

    def __init__(self, channels, k, dilation, act, causal, weight_norm):
        super().__init__()
        hidden = channels // 2
        self.act1 = Activation(act, channels)
        self.conv1 = Conv1d(channels, hidden, k, 1, dilation, weight_norm, causal)
        self.act2 = Activation(act, hidden)
        self.conv2 = Conv1d(hidden, channels, 1, 1, 1, weight_norm, causal)

    def forward(self, x):
        return x + self.conv2(self.act2(self.conv1(self.act1(x))))


class SkipLstm(nn.Module):
    """`x + lstm(x)` over [batch, channels, time]; parameters `lstm.*` as
    torch's nn.LSTM (candle-nn uses the same gate order i, f, g, o)."""

    def __init__(self, width, layers):
        super().__init__()
        self.lstm = nn.LSTM(width, width, layers, batch_first=True)

    def forward(self, x):
        y, _ = self.lstm(x.transpose(1, 2))
        return x + y.transpose(1, 2)


def widths(cfg):
    return [cfg["channels"]] + [cfg["channels"] * m for m in cfg["channel_mults"]]


def bottleneck_layers(cfg):
    b = cfg.get("bottleneck", {"kind": "none"})
    if isinstance(b, str):
        b = {"kind": b}
    if b["kind"] == "none":
        return 0
    if b["kind"] == "lstm":
        return int(b["layers"])
    raise ValueError(f"unknown bottleneck {b!r}")


def defaults(cfg):
    cfg = dict(cfg)
    cfg.setdefault("dilations", [1, 3, 9])
    cfg.setdefault("kernel_size", 7)
    cfg.setdefault("residual_kernel_size", 3)
    cfg.setdefault("activation", "elu")
    cfg.setdefault("causal", True)
    cfg.setdefault("weight_norm", True)
    cfg.setdefault("bottleneck", {"kind": "none"})
    return cfg


class DownStage(nn.Module):
    def __init__(self, cfg, win, wout, stride):
        super().__init__()
        a, c, wn = cfg["activation"], cfg["causal"], cfg["weight_norm"]
        self.units = nn.ModuleList(
            ResidualUnit(win, cfg["residual_kernel_size"], d, a, c, wn) for d in cfg["dilations"])
        self.act = Activation(a, win)
        self.down = Conv1d(win, wout, 2 * stride, stride, 1, wn, c)

    def forward(self, h):
        for u in self.units:
            h = u(h)
        return self.down(self.act(h))


class UpStage(nn.Module):
    def __init__(self, cfg, win, wout, stride):
        super().__init__()
        a, c, wn = cfg["activation"], cfg["causal"], cfg["weight_norm"]
        self.act = Activation(a, win)
        self.up = Upsample(win, wout, 2 * stride, stride, wn, c)
        self.units = nn.ModuleList(
            ResidualUnit(wout, cfg["residual_kernel_size"], d, a, c, wn) for d in cfg["dilations"])

    def forward(self, h):
        h = self.up(self.act(h))
        for u in self.units:
            h = u(h)
        return h


class WaveEncoder(nn.Module):
    """`outputs` channels out of the last conv (WaveEncoder::with_outputs):
    2 * latent_dim (mean, logvar) for the VAE, latent_dim for the VQ-VAE."""

    def __init__(self, cfg, outputs=None):
        super().__init__()
        w, k, a, c, wn = widths(cfg), cfg["kernel_size"], cfg["activation"], cfg["causal"], cfg["weight_norm"]
        self.latent = cfg["latent_dim"]
        outputs = 2 * self.latent if outputs is None else outputs
        self.input = Conv1d(cfg["audio_channels"], w[0], k, 1, 1, wn, c)
        self.stages = nn.ModuleList(
            DownStage(cfg, w[i], w[i + 1], s) for i, s in enumerate(cfg["strides"]))
        layers = bottleneck_layers(cfg)
        if layers:
            self.bottleneck = SkipLstm(w[-1], layers)
        else:
            self.bottleneck = None
        self.act_out = Activation(a, w[-1])
        self.out = Conv1d(w[-1], outputs, k, 1, 1, wn, c)

    def features(self, x):
        """The last conv's output [batch, outputs, frames]."""
        h = self.input(x)
        for s in self.stages:
            h = s(h)
        if self.bottleneck is not None:
            h = self.bottleneck(h)
        return self.out(self.act_out(h))

    def forward(self, x):
        h = self.features(x)
        return h[:, :self.latent], h[:, self.latent:]


class WaveDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w, k, a, c, wn = widths(cfg), cfg["kernel_size"], cfg["activation"], cfg["causal"], cfg["weight_norm"]
        n = len(cfg["strides"])
        self.input = Conv1d(cfg["latent_dim"], w[n], k, 1, 1, wn, c)
        layers = bottleneck_layers(cfg)
        if layers:
            self.bottleneck = SkipLstm(w[n], layers)
        else:
            self.bottleneck = None
        # Stage i undoes encoder stage n - 1 - i.
        self.stages = nn.ModuleList(
            UpStage(cfg, w[n - i], w[n - 1 - i], cfg["strides"][n - 1 - i]) for i in range(n))
        self.act_out = Activation(a, w[0])
        self.out = Conv1d(w[0], cfg["audio_channels"], k, 1, 1, wn, c)

    def forward(self, z):
        h = self.input(z)
        if self.bottleneck is not None:
            h = self.bottleneck(h)
        for s in self.stages:
            h = s(h)
        return self.out(self.act_out(h))


class WaveVae(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = defaults(cfg)
        self.encoder = WaveEncoder(self.cfg)
        self.decoder = WaveDecoder(self.cfg)

    def pass_(self, audio, train, generator=None):
        mean, logvar = self.encoder(audio)
        if train:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
            z = mean + (logvar * 0.5).exp() * eps
        else:
            z = mean
        return self.decoder(z), mean, logvar


def vector_quantizer_class():
    """tools/bench/mel_tokens_twin.py's VectorQuantizer, the twin of
    melvae_layers::VectorQuantizer: `codebook` (a parameter), buffers
    `usage` and (EMA) `ema_sum`; nearest code as melvae computes it,
    straight-through, codebook + commitment losses; in training the usage
    and EMA updates and dead-code restarts from the batch's vectors with
    melvae's SplitMix64 draws."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from mel_tokens_twin import VectorQuantizer

    return VectorQuantizer


class VqVae(nn.Module):
    """melvae_models::VqVae: the waveform VAE's encoder with `latent_dim`
    outputs (WaveEncoder::with_outputs; the vectors to quantise, no
    mean/logvar split), `vq.codebook` [codebook_size, latent_dim] and the
    quantiser's buffers (`vq.usage`, with EMA `vq.ema_sum`), the waveform
    VAE's decoder; `net` is a WaveVaeConfig."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = dict(cfg, net=defaults(cfg["net"]))
        net, k = self.cfg["net"], int(self.cfg["codebook_size"])
        d = net["latent_dim"]
        self.encoder = WaveEncoder(net, d)
        thr = self.cfg.get("restart_threshold", 1.0)
        self.vq = vector_quantizer_class()(
            k, d, float(self.cfg.get("commitment", 0.25)), self.cfg.get("ema_decay"),
            None if thr is None else float(thr))
        self.decoder = WaveDecoder(net)
        # melvae's init (a dump overwrites it): codebook uniform in +-1/K,
        # usage at the restart threshold (1 without), ema_sum = codebook *
        # usage.
        with torch.no_grad():
            self.vq.codebook.uniform_(-1.0 / k, 1.0 / k)
            self.vq.usage.fill_(1.0 if thr is None else float(thr))
            if self.vq.ema_sum is not None:
                self.vq.ema_sum.copy_(self.vq.codebook * self.vq.usage[:, None])

    def pass_(self, audio, train):
        """VqVae::forward: (recon, codebook loss, commitment loss, vq loss);
        with `train` the quantiser's usage/EMA updates and restarts."""
        z = self.encoder.features(audio).transpose(1, 2)  # [b, frames, latent]
        st, _, cb_loss, commit_loss, vq_loss = self.vq(z, train)
        return self.decoder(st.transpose(1, 2)), cb_loss, commit_loss, vq_loss


# ---------------------------------------------------------------- losses


class MrStft:
    """auraloss MultiResolutionSTFTLoss defaults, as
    melvae_losses::MultiResolutionStftLoss::auraloss_default: mean over
    resolutions of ||Y - X||_F / ||Y||_F + mean|ln X - ln Y|, magnitudes
    sqrt(max(|STFT|^2, 1e-8)), periodic Hann of win centred in n_fft,
    reflect padding."""

    def __init__(self, dtype, resolutions=((1024, 120, 600), (2048, 240, 1200), (512, 50, 240)),
                 w_sc=1.0, w_log_mag=1.0, w_lin_mag=0.0, eps=1e-8):
        self.res = [(n, h, w, torch.hann_window(w, periodic=True, dtype=dtype)) for n, h, w in resolutions]
        self.w_sc, self.w_log_mag, self.w_lin_mag, self.eps = w_sc, w_log_mag, w_lin_mag, eps

    def mag(self, x, n, h, w, win):
        s = torch.stft(x, n, h, w, win, center=True, pad_mode="reflect", return_complex=True)
        s = torch.view_as_real(s)
        return (s[..., 0].pow(2) + s[..., 1].pow(2)).clamp_min(self.eps).sqrt()

    def __call__(self, pred, target):
        x, y = pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1])
        total = 0.0
        for n, h, w, win in self.res:
            xm, ym = self.mag(x, n, h, w, win), self.mag(y, n, h, w, win)
            diff = ym - xm
            sc = diff.pow(2).sum().clamp_min(1e-20).sqrt() / ym.pow(2).sum().sqrt()
            lg = (xm.log() - ym.log()).abs().mean()
            l = self.w_sc * sc + self.w_log_mag * lg
            if self.w_lin_mag:
                l = l + self.w_lin_mag * diff.abs().mean()
            total = total + l
        return total / len(self.res)


class StereoStft:
    """melvae_losses::StereoLoss over the MR-STFT: mid (L+R)/2, side (L-R)/2,
    left, right, each weighted."""

    def __init__(self, inner, w):
        self.inner = inner
        self.w = (w["mid"], w["side"], w["left"], w["right"])

    def __call__(self, pred, target):
        def sig(s):
            l, r = s[:, 0], s[:, 1]
            return ((l + r) * 0.5, (l - r) * 0.5, l, r)

        total = pred.new_zeros(())
        for w, p, t in zip(self.w, sig(pred), sig(target)):
            if w != 0.0:
                total = total + w * self.inner(p, t)
        return total


class DacMel:
    """melvae_losses::MultiScaleMelLoss::dac = DAC's MelSpectrogramLoss:
    windows 32..2048 with 5..320 Slaney mels (Slaney norm), n_fft = window,
    hop = window / 4, periodic Hann, centred reflect STFT, magnitude,
    mean|log10(max(X, 1e-5)) - log10(max(Y, 1e-5))|, summed over scales."""

    def __init__(self, sr, dtype, clamp_eps=1e-5):
        import librosa

        self.scales = []
        for n_mels, w in zip([5, 10, 20, 40, 80, 160, 320], [32, 64, 128, 256, 512, 1024, 2048]):
            basis = librosa.filters.mel(sr=sr, n_fft=w, n_mels=n_mels, fmin=0.0, fmax=None,
                                        htk=False, norm="slaney")
            self.scales.append((w, torch.hann_window(w, periodic=True, dtype=dtype),
                                torch.from_numpy(basis).to(dtype)))
        self.clamp_eps = clamp_eps

    def __call__(self, pred, target):
        x, y = pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1])
        total = 0.0
        for w, win, basis in self.scales:
            def mel(s):
                st = torch.stft(s, w, max(w // 4, 1), w, win, center=True, pad_mode="reflect",
                                return_complex=True)
                return basis @ st.abs()  # [mels, freq] @ [b, freq, frames]

            lx = mel(x).clamp_min(self.clamp_eps).log10()
            ly = mel(y).clamp_min(self.clamp_eps).log10()
            total = total + (lx - ly).abs().mean()
        return total


def kl_loss(mean, logvar, free_bits):
    """melvae_losses::kl_loss over [batch, latent, frames] (latent vectors
    are the frames)."""
    mean, logvar = mean.transpose(1, 2), logvar.transpose(1, 2)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    kl = kl.reshape(-1, kl.shape[-1])
    mode = (free_bits or {"mode": "none"}).get("mode", "none")
    if mode == "none":
        return kl.sum(1).mean()
    target = float(free_bits["target"])
    if mode == "threshold":
        per = kl.sum(1)
        return (per * (per > target).to(per.dtype)).mean()
    if mode == "per_dim":
        return kl.mean(0).clamp_min(target).sum()
    raise ValueError(f"unknown free_bits mode {mode!r}")


class Objective:
    def __init__(self, loss_cfg, model_cfg, dtype):
        self.cfg = loss_cfg
        stft = MrStft(dtype)
        self.stft = StereoStft(stft, loss_cfg["stereo"]) if model_cfg["audio_channels"] == 2 else stft
        self.mel = DacMel(model_cfg["sample_rate"], dtype) if loss_cfg["mel_weight"] > 0 else None

    def terms(self, recon, audio, mean, logvar):
        c = self.cfg
        terms, total = {}, 0.0
        if c["stft_weight"] > 0:
            terms["stft"] = self.stft(recon, audio)
            total = total + c["stft_weight"] * terms["stft"]
        if c["mel_weight"] > 0:
            terms["mel"] = self.mel(recon, audio)
            total = total + c["mel_weight"] * terms["mel"]
        if c["l1_weight"] > 0:
            terms["l1"] = (recon - audio).abs().mean()
            total = total + c["l1_weight"] * terms["l1"]
        terms["kl"] = kl_loss(mean, logvar, c.get("free_bits"))
        return total, terms


# ---------------------------------------------------------------- families


def wave_vae_loss(model, objective, kl_weight, gen):
    """The VAE's training loss of a batch: reparameterised sample, recon +
    kl_weight * kl."""
    def loss_fn(x):
        recon, mean, logvar = model.pass_(x, True, gen)
        recon_total, terms = objective.terms(recon, x, mean, logvar)
        return recon_total + kl_weight * terms["kl"]

    return loss_fn


def vqvae_loss(model, stft):
    """The VQ-VAE's training loss of a batch (crates/melvae-train/src/tasks/
    vqvae.rs): MR-STFT of the reconstruction + the quantiser's loss, the
    quantiser in training mode (usage updates, EMA, restarts)."""
    def loss_fn(x):
        recon, _, _, vq_loss = model.pass_(x, True)
        return stft(recon, x) + vq_loss

    return loss_fn


class WaveVaeTwin:
    """family wave_vae: meta {model: WaveVaeConfig, loss, kl_weight}."""

    terms = ["stft", "mel", "l1", "kl", "total"]

    def __init__(self, meta):
        self.cfg, self.loss_cfg = defaults(meta["model"]), meta["loss"]
        self.kl_weight = float(meta["kl_weight"])

    def build(self):
        return WaveVae(self.cfg)

    def describe(self):
        return f"hop {int(np.prod(self.cfg['strides']))}"

    def eval_terms(self, model, x):
        """WaveVae::loss with train=false (the posterior mean decoded)."""
        obj = Objective(self.loss_cfg, self.cfg, x.dtype)
        recon, mean, logvar = model.pass_(x, False)
        total, terms = obj.terms(recon, x, mean, logvar)
        return terms, total + self.kl_weight * terms["kl"]

    def train_loss(self, model, gen):
        return wave_vae_loss(model, Objective(self.loss_cfg, self.cfg, torch.float32), self.kl_weight, gen)


class VqVaeTwin:
    """family vqvae: meta {model: VqVaeConfig}; the loss is auraloss'
    MR-STFT + the quantiser's (codebook + commitment * commitment loss)."""

    terms = ["stft", "codebook", "commitment", "total"]

    def __init__(self, meta):
        self.cfg = meta["model"]

    def build(self):
        return VqVae(self.cfg)

    def describe(self):
        c, net = self.cfg, self.cfg["net"]
        return (f"hop {int(np.prod(net['strides']))}, codebook {c['codebook_size']} x {net['latent_dim']}, "
                f"commitment {c.get('commitment', 0.25)}, EMA {c.get('ema_decay')}, "
                f"restart {c.get('restart_threshold', 1.0)}")

    def eval_terms(self, model, x):
        """VqVae::forward with train=false (no usage updates, no restarts)."""
        recon, cb_loss, commit_loss, vq_loss = model.pass_(x, False)
        stft = MrStft(x.dtype)(recon, x)
        return {"stft": stft, "codebook": cb_loss, "commitment": commit_loss}, stft + vq_loss

    def train_loss(self, model, gen):
        return vqvae_loss(model, MrStft(torch.float32))


FAMILIES = {"wave_vae": WaveVaeTwin, "vqvae": VqVaeTwin}


# ---------------------------------------------------------------- timing


def make_step(model, loss_fn, audio, opt, grad_clip):
    """One training step on `audio`: `fn` (default `loss_fn`; a compiled
    one for --compile), backward, optional global-norm clipping, AdamW."""
    def step(fn=loss_fn):
        opt.zero_grad(set_to_none=True)
        total = fn(audio)
        total.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        return total.detach()

    return step


# ---------------------------------------------------------------- main


def run_dump(args):
    d = args.dir
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    family = meta.get("family", "wave_vae")
    if family not in FAMILIES:
        print(f"family {family!r}: not a waveform codec ({', '.join(FAMILIES)}; "
              "see the other *_twin.py)", file=sys.stderr)
        return 2
    torch.set_num_threads(int(meta.get("threads", torch.get_num_threads())))
    torch.manual_seed(0)
    twin = FAMILIES[family](meta)
    model = twin.build()
    n = load_weights(model, os.path.join(d, "weights.safetensors"))
    if "n_params" in meta and int(meta["n_params"]) != n:
        print(f"parameter count: twin {n} vs melvae {meta['n_params']}", file=sys.stderr)
        sys.exit(2)
    audio = torch.from_numpy(np.load(os.path.join(d, "batch.npy")).astype(np.float32))
    print(f"setting {meta.get('setting')} ({family}): {n} parameters, batch {list(audio.shape)}, "
          f"{twin.describe()}, threads {torch.get_num_threads()}, torch {torch.__version__}")

    # Parity: the evaluation-mode loss terms.
    ok = True
    dtypes = [torch.float32] + ([torch.float64] if args.f64 else [])
    results = {}
    for dt in dtypes:
        m = model if dt == torch.float32 else twin.build().to(dt)
        if dt != torch.float32:
            m.load_state_dict(model.state_dict())
        with torch.no_grad():
            terms, total = twin.eval_terms(m, audio.to(dt))
        results[dt] = ({k: float(v) for k, v in terms.items()}, float(total))
    ref_terms = dict(meta["eval_terms"])
    ref_terms["total"] = meta["eval_total"]
    t32, tot32 = results[torch.float32]
    t32 = dict(t32, total=tot32)
    t64 = None
    if torch.float64 in results:
        t64 = dict(results[torch.float64][0], total=results[torch.float64][1])
    w = max(6, max(len(k) for k in twin.terms))
    print(f"{'term':>{w}} {'melvae':>14} {'torch f32':>14} {'rel diff':>10}"
          + (f" {'torch f64':>14} {'mv-f64':>10} {'t32-f64':>10}" if t64 else ""))
    for k in twin.terms:
        if k not in ref_terms:
            continue
        if k not in t32:
            print(f"{k:>{w}}: melvae has it, the twin does not")
            ok = False
            continue
        r = rel(t32[k], ref_terms[k])
        bad = not (r <= args.tol)
        ok &= not bad
        line = f"{k:>{w}} {ref_terms[k]:14.8g} {t32[k]:14.8g} {r:10.2e}"
        if t64:
            line += f" {t64[k]:14.8g} {rel(ref_terms[k], t64[k]):10.2e} {rel(t32[k], t64[k]):10.2e}"
        print(line + ("  <-- FAIL" if bad else ""))
    for k in ref_terms:
        if k not in twin.terms:
            print(f"{k:>{w}}: melvae has it, the twin does not")
            ok = False
    for k in t32:
        if k not in ref_terms:
            print(f"{k:>{w}}: the twin has it, melvae does not")
            ok = False
    print(f"parity (tol {args.tol:g} relative): {'OK' if ok else 'FAILED'}")

    if args.no_time:
        return 0 if ok else 1

    # Timing: the training step.
    lr = float(meta["learning_rate"])
    grad_clip = args.grad_clip if args.grad_clip is not None else meta.get("grad_clip")
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    loss_fn = twin.train_loss(model, gen)
    step = make_step(model, loss_fn, audio, opt, grad_clip)
    mean_ms, min_ms = time_steps(step, args.steps)
    mv = meta.get("melvae_step_ms")
    print(f"train step (eager): mean {mean_ms:.1f} ms, min {min_ms:.1f} ms over {args.steps} steps "
          f"(lr {lr:g}, grad_clip {grad_clip})")
    if mv:
        print(f"melvae {mv:.1f} ms/step; melvae / torch eager = {mv / mean_ms:.2f}")
    if args.compile:
        try:
            compiled = torch.compile(loss_fn)
            t0 = time.perf_counter()
            step(compiled)
            print(f"torch.compile: first step (compilation) {time.perf_counter() - t0:.1f} s")
            cmean, cmin = time_steps(lambda: step(compiled), args.steps)
            print(f"train step (compiled): mean {cmean:.1f} ms, min {cmin:.1f} ms")
            if mv:
                print(f"melvae / torch compiled = {mv / cmean:.2f}")
        except Exception as e:  # no compiler, unsupported op, ...
            msg = str(e).strip().splitlines()
            print(f"torch.compile skipped: {type(e).__name__}: {msg[0] if msg else ''}")
    return 0 if ok else 1


def selftest():
    """Random weights, every option: shapes, causality, a training step."""
    torch.manual_seed(0)
    base = dict(sample_rate=24000, audio_channels=1, channels=4, channel_mults=[2, 4],
                strides=[2, 3], dilations=[1, 3], kernel_size=5, residual_kernel_size=3,
                activation="elu", causal=True, weight_norm=True, bottleneck={"kind": "none"},
                latent_dim=3)
    loss = dict(stft_weight=1.0, mel_weight=1.0, l1_weight=0.1,
                stereo=dict(mid=1.0, side=0.5, left=0.5, right=0.5), kl_weight=1e-4,
                kl_warmup_steps=10, free_bits={"mode": "none"})
    variants = [{}, {"audio_channels": 2, "bottleneck": {"kind": "lstm", "layers": 2}},
                {"activation": "snake", "causal": False}, {"weight_norm": False},
                {"causal": False, "audio_channels": 2, "activation": "snake", "weight_norm": False}]
    for v in variants:
        cfg = dict(base, **v)
        m = WaveVae(cfg)
        c = cfg["audio_channels"]
        x = 0.3 * torch.randn(2, c, 2400)
        recon, mean, logvar = m.pass_(x, False)
        assert recon.shape == x.shape and mean.shape == (2, 3, 400), (recon.shape, mean.shape)
        if cfg["causal"]:
            y = x.clone()
            y[..., 1200:] = torch.randn(2, c, 1200)
            with torch.no_grad():
                a, b = m.encoder(x)[0], m.encoder(y)[0]
                assert torch.allclose(a[..., :200], b[..., :200], atol=1e-6)
                assert not torch.allclose(a, b)
                ra, rb = m.decoder(a), m.decoder(b)
                assert torch.allclose(ra[..., :1200], rb[..., :1200], atol=1e-6)
        obj = Objective(dict(loss, free_bits={"mode": "per_dim", "target": 0.01}), cfg, torch.float32)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)
        step = make_step(m, wave_vae_loss(m, obj, 1e-5, torch.Generator().manual_seed(0)), x, opt, 1.0)
        l0 = float(step())
        for _ in range(3):
            l1 = float(step())
        assert math.isfinite(l1)
        print(f"ok {v}: {sum(p.numel() for p in m.parameters())} params, loss {l0:.4f} -> {l1:.4f}")
    # The VQ-VAE: gradient or EMA codebook, restarts on or off.
    for label, v in [("gradient codebook, restarts", {}), ("EMA codebook, restarts", {"ema_decay": 0.99}),
                     ("no restarts, centred", {"restart_threshold": None, "net": dict(base, causal=False)})]:
        cfg = dict(dict(net=base, codebook_size=16, commitment=0.25, ema_decay=None,
                        restart_threshold=1.0), **v)
        m = VqVae(cfg)
        x = 0.3 * torch.randn(2, 1, 2400)
        with torch.no_grad():
            usage0, cb0 = m.vq.usage.clone(), m.vq.codebook.clone()
            recon, cb_loss, commit_loss, vq_loss = m.pass_(x, False)
            assert recon.shape == x.shape, recon.shape
            assert torch.equal(m.vq.usage, usage0) and torch.equal(m.vq.codebook, cb0)
            z = m.encoder.features(x).transpose(1, 2).reshape(-1, 3)
            assert z.shape == (800, 3), z.shape
            if cfg["ema_decay"] is None:
                assert torch.allclose(cb_loss, commit_loss)
            else:
                assert float(cb_loss) == 0.0
            m.pass_(x, True)
            restarted = (m.vq.codebook != cb0).any(1)
            if cfg["restart_threshold"] is None and cfg["ema_decay"] is None:
                assert not restarted.any()
            elif cfg["ema_decay"] is None:
                # Restarted rows are batch vectors, their usage the threshold.
                assert restarted.any()
                for i in restarted.nonzero().flatten():
                    assert (m.vq.codebook[i] == z).all(1).any()
                    assert float(m.vq.usage[i]) == 1.0
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)
        step = make_step(m, vqvae_loss(m, MrStft(torch.float32)), x, opt, None)
        l0 = float(step())
        for _ in range(3):
            l1 = float(step())
        assert math.isfinite(l1)
        n = sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())
        print(f"ok vqvae ({label}): {n} variables, loss {l0:.4f} -> {l1:.4f}")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", help="dump directory (weights.safetensors, batch.npy, meta.json)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (after one warm-up)")
    p.add_argument("--tol", type=float, default=1e-3, help="relative tolerance of the parity check")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--f64", action="store_true", help="also evaluate the terms in f64")
    p.add_argument("--grad-clip", type=float, default=None,
                   help="global-norm clipping in the step (default: meta['grad_clip'] if present, else none)")
    p.add_argument("--no-time", action="store_true", help="parity check only")
    p.add_argument("--selftest", action="store_true",
                   help="random-weight shape/causality/quantiser checks, no dump")
    args = p.parse_args()
    if args.selftest:
        return selftest()
    if not args.dir:
        p.error("a dump directory is required (or --selftest)")
    return run_dump(args)


if __name__ == "__main__":
    sys.exit(main())
