#!/usr/bin/env python3
"""PyTorch twin of melvae's mel VAE training step (speed comparison): the
causal Convformer encoder and the DiT flow-matching decoder.

Reads what `cargo run --release --example mel_vae_throughput -- --setting
S --dump DIR` wrote:

    DIR/weights.safetensors  every variable by its melvae name (f32), untrained
    DIR/batch.npy            log-mels [batch, n_mels, frames] (f32)
    DIR/eps.npy              reparameterisation noise [batch, frames / C, latent_dim]
    DIR/x0.npy               flow noise [batch, n_mels, frames]
    DIR/meta.json            {"family": "mel_vae", "setting", "model":
                              MelVaeConfig {convformer, cfm}, "t" (flow
                              times per example), "step", "kl_weight",
                              "eval_terms" {cfm, kl, total},
                              "melvae_step_ms", "threads",
                              "learning_rate", "n_params"}

builds the model with melvae's parameter names:

- encoder (crates/melvae-models/src/convformer.rs): `input` (3x3
  CausalConv2d, 1 -> channels) then SiLU; `context.{0,1,2}` residual units
  (time dilations 1, 2, 4); `stages.{i}` (log2 C of them): `down` (3x4
  kernel, stride 2 in frequency and time, no activation before it) then
  `blocks.{j}` residual units. Every conv is melvae_layers::CausalConv2d:
  `weight` [out, in, kf, kt] and `bias`, frequency padded "same" ((span -
  1) / 2 before, the rest after), time padded causally (span - stride
  before), no weight norm. A residual unit (ResidualUnit2d) is `x +
  conv2(silu(conv1(silu(x))))`, conv1 3x3 dilated in time, conv2 1x1.
  Then `collapse` (Linear of channels * frequency, the [B, C, F, T] map
  permuted to [B, T, C, F]), `tail.{k}` pre-norm causal DecoderLayers
  (no cross-attention: `norm1`, `self_attn` with biased fused `qkv` and
  `out`, rotary base 10000, causal with a window of tf_context positions;
  `norm2`, `ffn` fc1 -> exact GELU -> fc2 of 4 * tf_dim; LayerNorm eps
  1e-5; dropout drop_p on the attention probabilities, the FFN hidden and
  both residual branches), `tail_norm`, `out` (zero-initialised) to
  (mean, logvar);
- decoder (crates/melvae-models/src/dit_cfm.rs): the latent repeated C
  times along time and concatenated after the noisy mel, `in_proj`; flow
  time through melvae_layers::timestep_embedding (256 features, [cos,
  sin], max period 10000) and `time.mlp.{0,2}` (Linear, SiLU, Linear);
  `blocks.{i}` DiT blocks (adaLN-Zero `ada_ln.linear` from SiLU(c) giving
  shift/scale/gate for the attention and MLP branches, norms without
  affine parameters, eps 1e-6; `attn` non-causal rotary with biases,
  `mlp` fc1 -> exact GELU -> fc2 of 4 * unet_dim; dropout
  unet_dropout_rate); final norm modulated by `final_ada.linear`, `out`
  (zero-initialised) to the velocity;
- loss (MelVae::loss_with): x1 = (mel - mel_mean) / mel_std; (mean,
  logvar) = encoder(x1); z = mean + exp(logvar / 2) eps; x_t = (1 - (1 -
  sigma) t) x0 + t x1, u = x1 - (1 - sigma) x0; cfm = mean((v - u)^2)
  (each band's squared error weighted by cfm.low_band_weight if set);
  kl = mean over latent frames of the KL summed over latent dims (no free
  bits); total = cfm + kl_weight kl,

loads the weights strictly by name, checks the evaluation-mode loss terms
of the dumped batch and draws against melvae's (`eval_terms`), reports how
large the encoder's and the decoder's outputs are (both `out` layers start
at zero, so on an untrained dump the terms do not depend on the networks:
see below), then times the training step (train mode: dropout as the
config says, each example's condition dropped with probability
cond_drop_prob, fresh eps / x0 / t / drop draws from torch's generator
every step, meta's KL weight; backward; torch.optim.AdamW with melvae's
AdamWConfig::default() (betas (0.9, 0.999), eps 1e-8, weight decay 0.01)
and meta's learning rate, no gradient clipping, as the benchmark's step)
on the CPU with melvae's thread count: one warm-up step, then the mean of
--steps.

    /tmp/refvenv/bin/python tools/bench/mel_vae_twin.py DIR [--steps 5] [--tol 1e-4] [--f64] [--compile]

Untrained weights: melvae zero-initialises `encoder.out` (the posterior
starts at N(0, 1)), `decoder.out` and every adaLN linear, so at the dumped
initialisation mean = logvar = 0 (kl = 0) and v = 0 (cfm = mean(u^2),
a function of the batch and the noise alone). The parity check then proves
only the normalisation, the flow target and the loss reductions; the
script says so. Weights with non-zero output layers (a trained or
perturbed model dumped by the Rust side) make it a check of both
networks. The twin's MelVae.terms was checked that way outside the dump:
random non-zero weights (every layer) loaded by the `train` example
(`training.init_from`, learning rate 1e-30 so the one step leaves them
bit-identical), its validation terms (`val/cfm`, `val/kl`, `val/total`
of the first clips' mels with SplitMix64(0xE7A1) draws) against the
twin's on the same mels and draws: <= 1.6e-7 relative for the tiny and
setting1 architectures, C 4 / 8 / 16, a tail window shorter than the
sequence and none.

Exits 1 when a loss term differs from melvae's by more than --tol
(relative), 2 on a weight mismatch (missing, unused or mis-shaped names
are listed) or another family. Needs torch, numpy, safetensors. Nothing
here is used by the tests.
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

from twin_common import load_weights, loadavg, rel, time_steps


# ---------------------------------------------------------------- layers


class CausalConv2d(nn.Module):
    """melvae_layers::CausalConv2d without weight norm: `weight` [out, in,
    kf, kt], `bias` [out] over [batch, ch, freq, time]; frequency "same"
    ((span_f - 1) / 2 zeros before, the rest after), time causal (span_t -
    stride_t zeros before); strides and dilations per axis."""

    def __init__(self, cin, cout, kernel, stride=(1, 1), dilation=(1, 1)):
        super().__init__()
        kf, kt = kernel
        self.weight = nn.Parameter(torch.empty(cout, cin, kf, kt))
        self.bias = nn.Parameter(torch.empty(cout))
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        span_f = (kf - 1) * self.dilation[0] + 1
        span_t = (kt - 1) * self.dilation[1] + 1
        self.pad = (span_t - self.stride[1], 0, (span_f - 1) // 2, span_f - 1 - (span_f - 1) // 2)

    def forward(self, x):
        return F.conv2d(F.pad(x, self.pad), self.weight, self.bias, self.stride, 0, self.dilation)


class ResidualUnit2d(nn.Module):
    """melvae_layers::ResidualUnit2d with SiLU: `x + conv2(silu(conv1(
    silu(x))))`, conv1 `kernel` dilated `dilation` in time, conv2 1x1."""

    def __init__(self, ch, kernel, dilation):
        super().__init__()
        self.conv1 = CausalConv2d(ch, ch, kernel, dilation=(1, dilation))
        self.conv2 = CausalConv2d(ch, ch, (1, 1))

    def forward(self, x):
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


def rotary(x, base):
    """melvae_layers::apply_rotary (rotate-half, angle p * base^(-2i/d),
    angles in f64)."""
    t, d = x.shape[-2], x.shape[-1]
    half = d // 2
    inv = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)
    a = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    a = torch.cat([a, a], -1)
    cos, sin = a.cos().to(x.dtype), a.sin().to(x.dtype)
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """melvae_layers::MultiHeadAttention, self-attention: fused `qkv` [3
    dim, dim] (q, k, v blocks, heads contiguous within each) and `out`,
    with biases; rotary (base 10000) on q and k; causal with a window of
    `window` positions (itself included) if set; scale 1/sqrt(head_dim);
    dropout on the probabilities."""

    def __init__(self, dim, heads, causal, window, dropout, rotary_base=10000.0):
        super().__init__()
        self.heads, self.causal, self.window = heads, causal, window
        self.dropout, self.rotary_base = dropout, rotary_base
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self._mask = {}  # t -> bool [t, t] (not a buffer: loading is strict)

    def mask(self, t, device):
        if t not in self._mask:
            i = torch.arange(t, device=device)[:, None]
            j = torch.arange(t, device=device)[None]
            self._mask[t] = (j <= i) & (i - j < self.window)
        return self._mask[t]

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(x).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        if self.rotary_base is not None:
            q, k = rotary(q, self.rotary_base), rotary(k, self.rotary_base)
        p = self.dropout if self.training else 0.0
        if self.causal and self.window is not None and self.window < t:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(t, x.device), dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """`fc2(dropout(gelu_erf(fc1(x))))`, hidden 4 * dim, biases."""

    def __init__(self, dim, dropout):
        super().__init__()
        self.dropout = dropout
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.dropout(F.gelu(self.fc1(x)), self.dropout, self.training))


class TailLayer(nn.Module):
    """melvae_layers::DecoderLayer without cross-attention (the Convformer
    tail): `x + drop(self_attn(norm1(x)))`, then `x + drop(ffn(norm2(x)))`;
    LayerNorm eps 1e-5 with affine parameters."""

    def __init__(self, dim, heads, window, p):
        super().__init__()
        self.p = p
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.self_attn = Attention(dim, heads, True, window, p)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.ffn = FeedForward(dim, p)

    def forward(self, x):
        x = x + F.dropout(self.self_attn(self.norm1(x)), self.p, self.training)
        return x + F.dropout(self.ffn(self.norm2(x)), self.p, self.training)


class Stage(nn.Module):
    def __init__(self, ch, n_blocks):
        super().__init__()
        self.down = CausalConv2d(ch, ch, (3, 4), stride=(2, 2))
        self.blocks = nn.ModuleList(ResidualUnit2d(ch, (3, 3), 1) for _ in range(n_blocks))

    def forward(self, h):
        h = self.down(h)
        for u in self.blocks:
            h = u(h)
        return h


class ConvformerEncoder(nn.Module):
    """melvae_models::ConvformerEncoder: normalised log-mel [B, mel, T] to
    (mean, logvar), each [B, T / C, latent_dim]."""

    def __init__(self, cfg):
        super().__init__()
        ch, c = cfg["channels"], cfg["compress_factor_C"]
        stages = c.bit_length() - 1
        freq = cfg["mel_channels"]
        for _ in range(stages):
            freq = (freq + 1) // 2
        d, p = cfg["tf_dim"], float(cfg["drop_p"])
        self.latent = cfg["latent_dim"]
        self.input = CausalConv2d(1, ch, (3, 3))
        self.context = nn.ModuleList(ResidualUnit2d(ch, (3, 3), dil) for dil in (1, 2, 4))
        self.stages = nn.ModuleList(Stage(ch, cfg["n_residual_blocks"]) for _ in range(stages))
        self.collapse = nn.Linear(ch * freq, d)
        self.tail = nn.ModuleList(TailLayer(d, cfg["tf_heads"], cfg.get("tf_context"), p)
                                  for _ in range(cfg["tf_layers"]))
        self.tail_norm = nn.LayerNorm(d, eps=1e-5)
        self.out = nn.Linear(d, 2 * self.latent)

    def forward(self, mel):
        h = F.silu(self.input(mel[:, None]))
        for u in self.context:
            h = u(h)
        for s in self.stages:
            h = s(h)
        b, c, f, t = h.shape
        x = self.collapse(h.permute(0, 3, 1, 2).reshape(b, t, c * f))
        for layer in self.tail:
            x = layer(x)
        o = self.out(self.tail_norm(x))
        return o[..., :self.latent], o[..., self.latent:]


def timestep_embedding(t, dim, max_period=10000.0):
    """melvae_layers::timestep_embedding: [cos(t f), sin(t f)], f_i =
    exp(-ln(max_period) i / half) (in f64, then t's dtype)."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float64)
    freqs = torch.exp(-math.log(max_period) * i / half).to(t.dtype)
    args = t[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], -1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    """`mlp.0` (Linear freq_dim -> dim), SiLU, `mlp.2` (Linear dim -> dim)."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class AdaLnZero(nn.Module):
    """melvae_layers::AdaLnZero: `linear` (cond_dim -> chunks * dim) of
    SiLU(cond), split into `chunks` [B, 1, dim] vectors."""

    def __init__(self, cond_dim, dim, chunks):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(cond_dim, chunks * dim)

    def forward(self, c):
        return self.linear(F.silu(c))[:, None].chunk(self.chunks, -1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DitBlock(nn.Module):
    """melvae_layers::DitBlock: norms without affine parameters (eps 1e-6),
    `attn` (non-causal, rotary), `mlp`, `ada_ln` (6 vectors: shift, scale,
    gate of each branch); dropout on the gated branches."""

    def __init__(self, dim, heads, p):
        super().__init__()
        self.p, self.dim = p, dim
        self.attn = Attention(dim, heads, False, None, p)
        self.mlp = FeedForward(dim, p)
        self.ada_ln = AdaLnZero(dim, dim, 6)

    def norm(self, x):
        return F.layer_norm(x, (self.dim,), eps=1e-6)

    def forward(self, x, c):
        m = self.ada_ln(c)
        h = self.attn(modulate(self.norm(x), m[0], m[1]))
        x = x + F.dropout(h * m[2], self.p, self.training)
        h = self.mlp(modulate(self.norm(x), m[3], m[4]))
        return x + F.dropout(h * m[5], self.p, self.training)


class DitDecoder(nn.Module):
    """melvae_models::DitDecoder: velocity [B, mel, T] of x_t [B, mel, T]
    at flow times t [B] given the latent cond [B, T / C, latent]."""

    def __init__(self, cfg, latent_dim, compress):
        super().__init__()
        d, m = cfg["unet_dim"], cfg["mel_channels"]
        self.d, self.compress = d, compress
        p = float(cfg.get("unet_dropout_rate", 0.0))
        self.in_proj = nn.Linear(m + latent_dim, d)
        self.time = TimestepEmbedder(d)
        self.blocks = nn.ModuleList(DitBlock(d, cfg["unet_heads"], p) for _ in range(cfg["unet_depth"]))
        self.final_ada = AdaLnZero(d, d, 2)
        self.out = nn.Linear(d, m)

    def forward(self, x_t, t, cond):
        up = cond.repeat_interleave(self.compress, dim=1)  # frame k C + j <- latent k
        h = self.in_proj(torch.cat([x_t.transpose(1, 2), up.to(x_t.dtype)], -1))
        c = self.time(t)
        for blk in self.blocks:
            h = blk(h, c)
        m = self.final_ada(c)
        h = modulate(F.layer_norm(h, (self.d,), eps=1e-6), m[0], m[1])
        return self.out(h).transpose(1, 2)


class MelVae(nn.Module):
    """melvae_models::MelVae: `encoder.*`, `decoder.*`."""

    def __init__(self, cfg):
        super().__init__()
        conv, cfm = cfg["convformer"], cfg["cfm"]
        self.cfm = cfm
        self.compress = conv["compress_factor_C"]
        self.latent = conv["latent_dim"]
        self.encoder = ConvformerEncoder(conv)
        self.decoder = DitDecoder(cfm, conv["latent_dim"], self.compress)

    def normalize(self, mel):
        # As melvae's affine: mel * (1 / std) + (-mean / std).
        std, mean = float(self.cfm.get("mel_std", 3.0)), float(self.cfm.get("mel_mean", -5.0))
        return mel * (1.0 / std) + (-mean / std)

    def terms(self, mel, eps, keep, x0, t, kl_weight, probe=None):
        """MelVae::loss_with: (total, {cfm, kl, total}); `keep` [B] (1 keeps
        the condition) or None; `probe` (a dict) gets the encoder's and
        decoder's outputs."""
        x1 = self.normalize(mel)
        mean, logvar = self.encoder(x1)
        z = mean + (logvar * 0.5).exp() * eps
        cond = z if keep is None else z * keep[:, None, None]
        sigma = float(self.cfm["sigma"])
        tt = t.to(x1.dtype)[:, None, None]
        xt = x0 * (tt * -(1.0 - sigma) + 1.0) + x1 * tt
        u = x1 - x0 * (1.0 - sigma)
        v = self.decoder(xt, t, cond)
        sq = (v - u).pow(2)
        lbw = self.cfm.get("low_band_weight")
        if lbw:
            # CfmConfig::low_band_weight: the lowest `bands` weighted
            # `weight` times the rest, scaled to a mean weight of 1.
            m, low, w = sq.shape[1], int(lbw["bands"]), float(lbw["weight"])
            band = torch.ones(m, dtype=sq.dtype, device=sq.device)
            band[:low] = w
            sq = sq * (band / band.mean())[None, :, None]
        cfm = sq.mean()
        kl = (0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)).sum(-1).mean()
        total = cfm + kl * kl_weight
        if probe is not None:
            probe.update(mean=mean.detach(), logvar=logvar.detach(), v=v.detach())
        return total, {"cfm": cfm, "kl": kl, "total": total}


# ---------------------------------------------------------------- main


TERMS = ["cfm", "kl", "total"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="dump directory (weights.safetensors, batch.npy, eps.npy, x0.npy, meta.json)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (after one warm-up)")
    p.add_argument("--tol", type=float, default=1e-4, help="relative tolerance of each loss term")
    p.add_argument("--f64", action="store_true", help="also evaluate the terms in f64")
    p.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    p.add_argument("--no-time", action="store_true", help="parity check only")
    args = p.parse_args()

    d = args.dir
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    if meta.get("family") != "mel_vae":
        print(f"family {meta.get('family')!r}: not the mel VAE (see the other *_twin.py)", file=sys.stderr)
        return 2
    torch.set_num_threads(int(meta.get("threads", torch.get_num_threads())))
    torch.manual_seed(0)
    cfg = meta["model"]
    model = MelVae(cfg)
    n = load_weights(model, os.path.join(d, "weights.safetensors"))
    if "n_params" in meta and int(meta["n_params"]) != n:
        print(f"parameter count: twin {n} vs melvae {meta['n_params']}", file=sys.stderr)
        sys.exit(2)

    def arr(name):
        return torch.from_numpy(np.load(os.path.join(d, f"{name}.npy")).astype(np.float32))

    mel, eps, x0 = arr("batch"), arr("eps"), arr("x0")
    t = torch.tensor(meta["t"], dtype=torch.float32)
    kl_weight = float(meta["kl_weight"])
    conv, cfm = cfg["convformer"], cfg["cfm"]
    print(f"setting {meta.get('setting')} (mel_vae): {n} parameters, batch {list(mel.shape)}, "
          f"C {conv['compress_factor_C']}, latent {conv['latent_dim']}, encoder {conv['channels']} ch x "
          f"{conv['n_residual_blocks']} blocks + {conv['tf_layers']} x {conv['tf_dim']} tail "
          f"(drop {conv['drop_p']}), DiT {cfm['unet_depth']} x {cfm['unet_dim']} "
          f"(drop {cfm.get('unet_dropout_rate', 0.0)}), cond drop {cfm.get('cond_drop_prob', 0.1)}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}")

    # Parity: the evaluation-mode loss terms of the dumped batch and draws.
    ok = True
    dtypes = [torch.float32] + ([torch.float64] if args.f64 else [])
    results, probe = {}, {}
    for dt in dtypes:
        m = model if dt == torch.float32 else MelVae(cfg).to(dt)
        if dt != torch.float32:
            m.load_state_dict(model.state_dict())
        m.eval()
        with torch.no_grad():
            _, terms = m.terms(mel.to(dt), eps.to(dt), None, x0.to(dt), t.to(dt), kl_weight,
                               probe if dt == torch.float32 else None)
        results[dt] = {k: float(v) for k, v in terms.items()}
    ref, t32, t64 = meta["eval_terms"], results[torch.float32], results.get(torch.float64)
    w = 6
    print(f"{'term':>{w}} {'melvae':>14} {'torch f32':>14} {'rel diff':>10}"
          + (f" {'torch f64':>14} {'mv-f64':>10} {'t32-f64':>10}" if t64 else ""))
    for k in TERMS:
        if k not in ref:
            continue
        r = rel(t32[k], ref[k])
        bad = not (r <= args.tol)
        ok &= not bad
        line = f"{k:>{w}} {ref[k]:14.8g} {t32[k]:14.8g} {r:10.2e}"
        if t64:
            line += f" {t64[k]:14.8g} {rel(ref[k], t64[k]):10.2e} {rel(t32[k], t64[k]):10.2e}"
        print(line + ("  <-- FAIL" if bad else ""))
    for k in ref:
        if k not in TERMS:
            print(f"{k:>{w}}: melvae has it, the twin does not")
            ok = False
    print(f"parity (tol {args.tol:g} relative): {'OK' if ok else 'FAILED'}")

    # What the check exercised: zero outputs mean the terms did not depend on
    # that network (melvae zero-initialises both output layers).
    mx = {k: float(v.abs().max()) for k, v in probe.items()}
    print(f"network outputs: encoder max|mean| {mx['mean']:.3g}, max|logvar| {mx['logvar']:.3g}; "
          f"decoder max|v| {mx['v']:.3g}")
    if mx["mean"] == 0.0 and mx["logvar"] == 0.0:
        print("  encoder output exactly zero (zero-initialised encoder.out): z = eps, kl = 0; "
              "the terms do not exercise the encoder")
    if mx["v"] == 0.0:
        print("  decoder output exactly zero (zero-initialised decoder.out): cfm = mean(u^2) depends "
              "on the batch and the noise alone; the terms do not exercise the decoder")
    if args.no_time:
        return 0 if ok else 1

    # Timing: forward (train) + backward + AdamW, fresh draws every step.
    model.train()
    lr = float(meta["learning_rate"])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    drop = float(cfm.get("cond_drop_prob", 0.1))
    gen = torch.Generator().manual_seed(1)

    def train_loss(mel, eps, keep, x0, t):
        return model.terms(mel, eps, keep, x0, t, kl_weight)[0]

    def step(fn=train_loss):
        b = mel.shape[0]
        eps_s = torch.randn(eps.shape, generator=gen)
        keep = (torch.rand(b, generator=gen) >= drop).to(mel.dtype)
        x0_s = torch.randn(x0.shape, generator=gen)
        t_s = torch.rand(b, generator=gen)
        opt.zero_grad(set_to_none=True)
        total = fn(mel, eps_s, keep, x0_s, t_s)
        total.backward()
        opt.step()
        return total.detach()

    print(f"load average before timing: {loadavg()}")
    mean_ms, min_ms = time_steps(step, args.steps)
    mv = meta.get("melvae_step_ms")
    print(f"train step (eager): mean {mean_ms:.1f} ms, min {min_ms:.1f} ms over {args.steps} steps "
          f"(lr {lr:g}, kl_weight {kl_weight:g})")
    if mv:
        print(f"melvae {mv:.1f} ms/step; melvae / torch eager = {mv / mean_ms:.2f}")
    if args.compile:
        try:
            compiled = torch.compile(train_loss)
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


if __name__ == "__main__":
    sys.exit(main())
