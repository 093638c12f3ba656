#!/usr/bin/env python3
"""PyTorch twin of melvae's token models' training steps (speed
comparison): the mel VQ-VAE, the class GPT, the GPT-VAE, Echolancer and the
LSTM priors of the hierarchical waveform VQ-VAE.

Reads what `cargo run --release --example mel_tokens_throughput --
--setting S --dump DIR` wrote:

    DIR/weights.safetensors  every variable by its melvae name (f32), untrained
    DIR/batch.npy            mel_vqvae: log-mels [batch, n_mels, frames];
                             gpt, gpt_vae, echolancer, lstm_prior: tokens
                             [batch, len] (as f32; echolancer: the target
                             tokens; lstm_prior: codes)
    DIR/meta.json            {"family", "setting", "config": {"model", ["loss"],
                              ["classes"], ["kl_weight"], ["text"],
                              ["speakers"], ["context"]}, "eval_terms",
                              "melvae_step_ms", "threads", "learning_rate",
                              "n_params"}
                             (echolancer: loss {gate_pos_weight}, text ids
                             [batch][text_len], speakers [batch];
                             eval_terms {ce, gate}; lstm_prior: context the
                             coarse context codes [batch][len / upsample]
                             or null, eval_terms {total})

builds the family's model as melvae does (`meta.family`):

- mel_vqvae (crates/melvae-models/src/mel_vqvae.rs): 2-D convs causal in
  time and "same" in frequency, SiLU residual units, strided downsampling,
  nearest upsampling, the VectorQuantizer of crates/melvae-layers/src/vq.rs
  (nearest code, straight-through, codebook + commitment loss, optional EMA
  codebook, dead-code restarts from the batch with melvae's SplitMix64
  draws), L1 or L2 reconstruction;
- gpt (crates/melvae-models/src/priors/gpt.rs): class embedding at
  position 0 and the tokens shifted by one, learned or rotary positions,
  pre-norm causal blocks (fused bias-free qkv, exact-erf GELU FFN,
  LayerNorm eps 1e-5), final norm, head, cross-entropy with label smoothing;
- gpt_vae (crates/melvae-models/src/priors/gpt_vae.rs): bidirectional
  encoder mean-pooled to mean/logvar, a class-free GPT decoder with the
  latent injected as prefix, added to every input, or both; CE +
  kl_weight * KL with free bits (melvae_losses::kl_loss);
- echolancer (crates/melvae-models/src/echolancer.rs): text encoder
  (`text_emb`, pre-norm bidirectional layers with fused-qkv self-attention
  under ALiBi (melvae's slopes times alibi_alpha, bias -slope |i - j|) or
  rotary positions, ReLU or exact-GELU FFN of ffn_mult * dim, final norm)
  plus speaker_proj(speaker_emb(speaker)) at every position; decoder
  (`token_emb` with the begin token as its last row, input [begin,
  tokens[:-1]], causal self-attention (ALiBi or rotary), cross-attention
  to the encoder output with separate q/kv projections and no positions,
  FFN, final norm, token_head and gate_head); cross-entropy + BCE with
  logits of the gate (target 1 at the last position, pos_weight
  gate_pos_weight). No emotion input (the benchmark passes none), no
  text or token masks (the benchmark has none);
- lstm_prior (crates/melvae-models/src/priors/lstm.rs): `embed` with the
  begin code as its last row, input [begin, codes[:-1]]; with a context,
  the context model (`context.embed`, `input` conv, residual dilated
  convs `h + conv(relu(h))`, `out` 1x1 conv of relu(h); "same" padding,
  no weight norm; each coarse frame repeated `upsample` times) added to
  or concatenated with the embedding; `lstm` as torch's nn.LSTM
  (batch_first), `head`; cross-entropy mean over all codes,

with melvae's parameter names, loads the weights strictly by name, checks
the evaluation-mode loss terms of the batch against melvae's (`eval_terms`:
this proves the twin is the same model), then times the training step
(train mode: dropout where the config has it (echolancer: encoder_dropout
/ decoder_dropout on the residual branches, the attention probabilities,
self and cross, and the FFN hidden, as melvae_layers applies it), the
quantiser's usage/EMA updates and restarts, the reparameterised sample
with meta's KL weight;
backward; torch.optim.AdamW with melvae's default betas (0.9, 0.999), eps
1e-8, weight decay 0.01 and meta's learning rate) on the CPU with melvae's
thread count: one warm-up step, then the mean of --steps.

    /tmp/refvenv/bin/python tools/bench/mel_tokens_twin.py DIR [--steps 10] [--tol 1e-4] [--compile]

Dropout masks and the GPT-VAE's noise come from torch's generator, not
melvae's (only the evaluation terms are compared). The benchmark's batches
have no padding, so sequence masks are not modelled.

Exits 1 when a loss term differs from melvae's by more than --tol
(relative), 2 on a weight mismatch (missing, unexpected or mis-shaped names
are listed). Needs torch, numpy, safetensors. Nothing here is used by the
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

from twin_common import load_weights, loadavg, rel, time_steps


# ---------------------------------------------------------------- melvae's RNG


class SplitMix64:
    """melvae_dsp::SplitMix64 (the quantiser's restart draws)."""

    MASK = (1 << 64) - 1

    def __init__(self, seed):
        self.state = seed & self.MASK

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & self.MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.MASK
        return z ^ (z >> 31)

    def below(self, n):
        return (self.next_u64() * n) >> 64


# ---------------------------------------------------------------- mel VQ-VAE


class CausalConv2d(nn.Module):
    """melvae_layers::CausalConv2d (no weight norm, as the mel VQ-VAE builds
    it): `weight` [out, in, kf, kt], `bias` [out] over [batch, ch, freq,
    time]; frequency padded "same" ((span - 1) / 2 before, the rest after),
    time padded causally (span - stride before)."""

    def __init__(self, cin, cout, kernel, stride=(1, 1)):
        super().__init__()
        kf, kt = kernel
        self.weight = nn.Parameter(torch.empty(cout, cin, kf, kt))
        self.bias = nn.Parameter(torch.empty(cout))
        self.stride = stride
        self.pad_f = ((kf - 1) // 2, kf - 1 - (kf - 1) // 2)
        self.pad_t = kt - stride[1]

    def forward(self, x):
        x = F.pad(x, (self.pad_t, 0, self.pad_f[0], self.pad_f[1]))
        return F.conv2d(x, self.weight, self.bias, self.stride)


class ResidualUnit2d(nn.Module):
    """`x + conv2(silu(conv1(silu(x))))`, conv1 3x3, conv2 1x1."""

    def __init__(self, ch):
        super().__init__()
        self.conv1 = CausalConv2d(ch, ch, (3, 3))
        self.conv2 = CausalConv2d(ch, ch, (1, 1))

    def forward(self, x):
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class EncoderLevel(nn.Module):
    def __init__(self, ch, n_res, down):
        super().__init__()
        self.res = nn.ModuleList(ResidualUnit2d(ch) for _ in range(n_res))
        if down is not None:
            cout, stride = down
            self.down = CausalConv2d(ch, cout, (3, 3), tuple(stride))
        else:
            self.down = None

    def forward(self, h):
        for u in self.res:
            h = u(h)
        if self.down is not None:
            h = self.down(F.silu(h))
        return h


def upsample_nearest(x, factor):
    b, c, f, t = x.shape
    ff, ft = factor
    return x[:, :, :, None, :, None].expand(b, c, f, ff, t, ft).reshape(b, c, f * ff, t * ft)


class DecoderLevel(nn.Module):
    def __init__(self, ch, n_res, up):
        super().__init__()
        self.res = nn.ModuleList(ResidualUnit2d(ch) for _ in range(n_res))
        if up is not None:
            cout, self.factor = up
            self.up = CausalConv2d(ch, cout, (3, 3))
        else:
            self.up = None

    def forward(self, h):
        for u in self.res:
            h = u(h)
        if self.up is not None:
            h = self.up(upsample_nearest(h, self.factor))
        return h


class Stack(nn.Module):
    """A named container (`encoder.*`, `decoder.*`)."""


class VectorQuantizer(nn.Module):
    """melvae_layers::VectorQuantizer: `codebook` [K, D] (a parameter,
    trained by the codebook loss unless EMA), `usage` [K] and, with EMA,
    `ema_sum` [K, D] (variables without gradient: buffers here). Also the
    waveform VQ-VAE's quantiser in tools/bench/wave_vae_twin.py."""

    def __init__(self, k, d, commitment, ema_decay, restart_threshold, usage_decay=0.99,
                 eps=1e-5, seed=0):
        super().__init__()
        self.k, self.d = k, d
        self.commitment, self.ema_decay = commitment, ema_decay
        self.threshold, self.usage_decay, self.eps = restart_threshold, usage_decay, eps
        self.codebook = nn.Parameter(torch.empty(k, d))
        self.register_buffer("usage", torch.empty(k))
        if ema_decay is not None:
            self.register_buffer("ema_sum", torch.empty(k, d))
        else:
            self.ema_sum = None
        self.rng = SplitMix64(seed)

    @torch.no_grad()
    def nearest(self, x):
        c = self.codebook
        # As melvae: argmin over x . (-2 c)^T + |c|^2.
        return (x @ (c * -2.0).t() + c.pow(2).sum(1)[None]).argmin(1)

    def forward(self, x, train):
        dims = x.shape
        flat = x.reshape(-1, self.d)
        codes = self.nearest(flat.detach())
        q = self.codebook.index_select(0, codes)
        if self.ema_sum is not None:
            codebook_loss = flat.new_zeros(())
        else:
            codebook_loss = (q - flat.detach()).pow(2).mean()
        commitment_loss = (flat - q.detach()).pow(2).mean()
        loss = codebook_loss + commitment_loss * self.commitment
        st = flat + (q - flat).detach()
        if train:
            self.update(flat.detach(), codes)
        return st.reshape(dims), codes, codebook_loss, commitment_loss, loss

    # Host-side bookkeeping with a data-dependent number of restarts: eager
    # even under torch.compile (tracing it would recompile every step).
    @torch.compiler.disable
    @torch.no_grad()
    def update(self, x, codes):
        k = self.k
        counts = torch.bincount(codes, minlength=k).to(self.usage.dtype)
        decay = self.ema_decay if self.ema_decay is not None else self.usage_decay
        usage = self.usage * decay + counts * (1.0 - decay)
        self.usage.copy_(usage)
        if self.ema_sum is not None:
            d = self.ema_decay
            batch_sum = torch.zeros_like(self.ema_sum).index_add_(0, codes, x)
            new_sum = self.ema_sum * d + batch_sum * (1.0 - d)
            self.ema_sum.copy_(new_sum)
            total = float(usage.double().sum())
            smoothed = (usage + self.eps) * (total / (total + k * self.eps))
            self.codebook.data.copy_(new_sum / smoothed[:, None])
        if self.threshold is None:
            return 0
        dead = (self.usage.double() < self.threshold).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        n = x.shape[0]
        rows = torch.tensor([self.rng.below(n) for _ in range(dead.numel())], dtype=torch.long)
        self.codebook.data[dead] = x[rows]
        self.usage[dead] = self.threshold
        if self.ema_sum is not None:
            self.ema_sum.copy_(self.codebook.data * self.usage[:, None])
        return dead.numel()


class MelVqVae(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, ds, n_res = cfg["channels"], cfg["downsample"], int(cfg.get("res_blocks", 1))
        last, cd = ch[-1], cfg["codebook_dim"]
        self.recon_loss = cfg.get("recon_loss", "l1")
        self.encoder = Stack()
        self.encoder.conv_in = CausalConv2d(1, ch[0], (3, 3))
        self.encoder.levels = nn.ModuleList(
            EncoderLevel(ch[l], n_res, (ch[l + 1], ds[l]) if l < len(ds) else None)
            for l in range(len(ch)))
        self.encoder.conv_out = CausalConv2d(last, cd, (1, 1))
        thr = cfg.get("restart_threshold", 1.0)
        self.vq = VectorQuantizer(cfg["codebook_size"], cd, float(cfg.get("commitment", 0.25)),
                                  cfg.get("ema_decay"), None if thr is None else float(thr))
        self.decoder = Stack()
        self.decoder.conv_in = CausalConv2d(cd, last, (1, 1))
        # Named by level (`decoder.levels.{l}`), run coarsest first.
        self.decoder.levels = nn.ModuleList(
            DecoderLevel(ch[l], n_res, (ch[l - 1], ds[l - 1]) if l > 0 else None)
            for l in range(len(ch)))
        self.decoder.conv_out = CausalConv2d(ch[0], 1, (3, 3))

    def encode_continuous(self, mel):
        e = self.encoder
        h = e.conv_in(mel[:, None])
        for level in e.levels:
            h = level(h)
        z = e.conv_out(F.silu(h))  # [B, D, cols (freq), rows (time)]
        return z.permute(0, 3, 2, 1)  # [B, rows, cols, D]

    def decode_vectors(self, q):
        d = self.decoder
        h = d.conv_in(q.permute(0, 3, 2, 1))
        for level in reversed(d.levels):
            h = level(h)
        return d.conv_out(F.silu(h))[:, 0]

    def terms(self, mel, train):
        z = self.encode_continuous(mel)
        st, _, cb_loss, commit_loss, vq_loss = self.vq(z, train)
        recon = self.decode_vectors(st)
        diff = recon - mel
        recon_loss = diff.abs().mean() if self.recon_loss == "l1" else diff.pow(2).mean()
        total = recon_loss + vq_loss
        return total, {"recon": recon_loss, "codebook": cb_loss, "commitment": commit_loss,
                       "total": total}


# ---------------------------------------------------------------- transformers


def rotary(x, base):
    """melvae_layers::apply_rotary (rotate-half, angle p * base^(-2i/d))."""
    t, d = x.shape[-2], x.shape[-1]
    half = d // 2
    inv = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)
    a = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    a = torch.cat([a, a], -1)
    cos, sin = a.cos().to(x.dtype), a.sin().to(x.dtype)
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def alibi_slopes(heads):
    """melvae_layers::alibi_slopes: `2^(-8 i / n)`, `i = 1..=n`, for a power
    of two `n`; otherwise the closest lower power of two's slopes, then
    every other slope of twice that."""
    def power_of_2(n):
        start = 2.0 ** (-(2.0 ** (-(math.log2(n) - 3.0))))
        return [start * start ** i for i in range(n)]
    if heads == 0:
        return []
    p = 1 << (heads.bit_length() - 1)
    if p == heads:
        return power_of_2(heads)
    return power_of_2(p) + power_of_2(2 * p)[::2][:heads - p]


class Attention(nn.Module):
    """melvae_layers::MultiHeadAttention: self-attention with a bias-free
    fused `qkv` (q, k, v blocks of `dim`, heads contiguous within each), or
    cross-attention (`context_dim`) with bias-free `q` [dim, dim] and `kv`
    [2 dim, context_dim]; `out`; scale 1/sqrt(head_dim); ALiBi (slopes of
    `alibi_slopes` times `alibi_alpha`, bias `-slope |i - j|` added to the
    scaled scores, in f32) or rotary positions; dropout on the attention
    probabilities."""

    def __init__(self, dim, heads, causal, dropout, rotary_base=None, alibi_alpha=None,
                 context_dim=None):
        super().__init__()
        self.heads, self.causal, self.dropout, self.rotary_base = heads, causal, dropout, rotary_base
        if context_dim is None:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        else:
            self.q = nn.Linear(dim, dim, bias=False)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.slopes = (None if alibi_alpha is None
                       else [s * float(alibi_alpha) for s in alibi_slopes(heads)])
        self._bias = {}  # (t, s, dtype) -> [heads, t, s] (not a buffer: loading is strict)

    def alibi_bias(self, t, s, dtype):
        key = (t, s, dtype)
        if key not in self._bias:
            # As melvae: -(slope * |i + offset - j|) in f64, then f32; causal
            # positions masked (-inf here, melvae's finite fill and zeroing
            # give the same probabilities).
            i = torch.arange(t, dtype=torch.float64)[:, None] + (s - t)
            j = torch.arange(s, dtype=torch.float64)[None]
            m = torch.tensor(self.slopes, dtype=torch.float64)[:, None, None]
            bias = (-(m * (i - j).abs())).to(torch.float32)
            if self.causal:
                bias = bias.masked_fill((j > i)[None], float("-inf"))
            self._bias[key] = bias.to(dtype)
        return self._bias[key]

    def forward(self, x, context=None):
        b, t, d = x.shape
        h = self.heads
        if context is None:
            q, k, v = self.qkv(x).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        else:
            s = context.shape[1]
            q = self.q(x).reshape(b, t, h, d // h).transpose(1, 2)
            k, v = self.kv(context).reshape(b, s, 2, h, d // h).permute(2, 0, 3, 1, 4)
        if self.rotary_base is not None:
            q, k = rotary(q, self.rotary_base), rotary(k, self.rotary_base)
        p = self.dropout if self.training else 0.0
        if self.slopes is not None:
            mask = self.alibi_bias(t, k.shape[2], q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """fc1 -> activation (exact (erf) GELU or ReLU) -> dropout -> fc2."""

    def __init__(self, dim, dropout, hidden=None, activation="gelu"):
        super().__init__()
        hidden = 4 * dim if hidden is None else hidden
        self.dropout = dropout
        self.act = {"gelu": F.gelu, "relu": F.relu}[activation]
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.dropout(self.act(self.fc1(x)), self.dropout, self.training))


class Block(nn.Module):
    """Pre-norm transformer block (melvae_layers DecoderLayer, attention
    named `self_attn`, or EncoderLayer, named `attn`): `x +
    drop(attn(norm1(x)))`, with `context_dim` then `x +
    drop(cross_attn(norm_cross(x), context))` (no positions, not causal),
    then `x + drop(ffn(norm2(x)))`."""

    def __init__(self, dim, heads, causal, dropout, attn_dropout, ffn_dropout, rotary_base, attn_name,
                 ffn_hidden=None, activation="gelu", alibi_alpha=None, context_dim=None):
        super().__init__()
        self.dropout, self.attn_name = dropout, attn_name
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        setattr(self, attn_name, Attention(dim, heads, causal, attn_dropout, rotary_base, alibi_alpha))
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-5)
            self.cross_attn = Attention(dim, heads, False, attn_dropout, context_dim=context_dim)
        else:
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.ffn = FeedForward(dim, ffn_dropout, ffn_hidden, activation)

    def forward(self, x, context=None):
        attn = getattr(self, self.attn_name)
        x = x + F.dropout(attn(self.norm1(x)), self.dropout, self.training)
        if self.cross_attn is not None:
            x = x + F.dropout(self.cross_attn(self.norm_cross(x), context), self.dropout, self.training)
        return x + F.dropout(self.ffn(self.norm2(x)), self.dropout, self.training)


class Gpt(nn.Module):
    """melvae_models::Gpt: `tok_emb`, `class_emb` (num_classes > 0),
    `pos_emb` (learned positions), `blocks.{i}`, `norm`, `head`."""

    def __init__(self, cfg):
        super().__init__()
        d, p = cfg["dim"], float(cfg.get("dropout", 0.0))
        positions = cfg.get("positions", "learned")
        self.tok_emb = nn.Embedding(cfg["vocab_size"], d)
        self.class_emb = nn.Embedding(cfg["num_classes"], d) if cfg["num_classes"] > 0 else None
        self.pos_emb = nn.Embedding(cfg["max_len"], d) if positions == "learned" else None
        rb = 10000.0 if positions == "rotary" else None
        self.blocks = nn.ModuleList(Block(d, cfg["heads"], True, p, p, p, rb, "self_attn")
                                    for _ in range(cfg["layers"]))
        self.norm = nn.LayerNorm(d, eps=1e-5)
        self.head = nn.Linear(d, cfg["vocab_size"])

    def forward_prompted(self, tokens, start, add=None):
        n = tokens.shape[1]
        x = torch.cat([start, self.tok_emb(tokens[:, :n - 1])], 1)
        if add is not None:
            x = x + add
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[:n][None]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))

    def terms(self, tokens, classes, label_smoothing):
        logits = self.forward_prompted(tokens, self.class_emb(classes)[:, None])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1),
                             label_smoothing=label_smoothing)
        return ce, {"total": ce}


def gaussian_kl(mean, logvar):
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_loss(mean, logvar, loss_cfg):
    """melvae_losses::kl_loss with GptVaeLossConfig::free_bits (fb 1:
    threshold per latent vector, fb 2: per-dimension max, else none)."""
    kl = gaussian_kl(mean, logvar).reshape(-1, mean.shape[-1])
    fb, target = int(loss_cfg.get("fb", 0)), loss_cfg.get("target_kl")
    if fb == 1 and target is not None:
        per = kl.sum(1)
        return (per * (per > target).to(per.dtype)).mean()
    if fb == 2 and target is not None:
        return kl.mean(0).clamp_min(float(target)).sum()
    return kl.sum(1).mean()


class GptVae(nn.Module):
    """melvae_models::GptVae: `encoder.{tok_emb, pos_emb, layers.{i}, norm,
    to_latent}`, `latent_prefix` / `latent_add` / `start` per injection,
    `decoder` a Gpt without classes."""

    def __init__(self, cfg):
        super().__init__()
        d, l, p = cfg["dim"], cfg["latent_dim"], float(cfg.get("dropout", 0.0))
        inj = cfg.get("injection", "both")
        self.latent_dim = l
        self.encoder = Stack()
        self.encoder.tok_emb = nn.Embedding(cfg["vocab_size"], d)
        self.encoder.pos_emb = nn.Embedding(cfg["max_len"], d)
        # Encoder blocks: dropout on the residual branches only.
        self.encoder.layers = nn.ModuleList(Block(d, cfg["heads"], False, p, 0.0, 0.0, None, "attn")
                                            for _ in range(cfg["enc_layers"]))
        self.encoder.norm = nn.LayerNorm(d, eps=1e-5)
        self.encoder.to_latent = nn.Linear(d, 2 * l)
        self.latent_prefix = nn.Linear(l, d) if inj != "add" else None
        self.latent_add = nn.Linear(l, d) if inj != "prefix" else None
        self.start = nn.Parameter(torch.empty(1, 1, d)) if inj == "add" else None
        self.decoder = Gpt(dict(vocab_size=cfg["vocab_size"], num_classes=0, max_len=cfg["max_len"],
                                dim=d, heads=cfg["heads"], layers=cfg["dec_layers"],
                                positions="learned", dropout=p))

    def encode(self, tokens):
        e = self.encoder
        n = tokens.shape[1]
        x = e.tok_emb(tokens) + e.pos_emb.weight[:n][None]
        for layer in e.layers:
            x = layer(x)
        h = e.to_latent(e.norm(x).mean(1))
        return h[:, :self.latent_dim], h[:, self.latent_dim:]

    def terms(self, tokens, kl_weight, loss_cfg, generator=None):
        mean, logvar = self.encode(tokens)
        if kl_weight == 0.0:
            z = mean
        else:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
            z = mean + (logvar * 0.5).exp() * eps
        add = self.latent_add(z)[:, None] if self.latent_add is not None else None
        if self.latent_prefix is not None:
            start = self.latent_prefix(z)[:, None]
        else:
            start = self.start.expand(z.shape[0], 1, -1)
        logits = self.decoder.forward_prompted(tokens, start, add)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        kl = kl_loss(mean, logvar, loss_cfg)
        kl_raw = gaussian_kl(mean, logvar).mean(0).sum().detach()
        return ce + kl * kl_weight, {"ce": ce, "kl": kl, "kl_raw": kl_raw}


class Echolancer(nn.Module):
    """melvae_models::Echolancer: `encoder.{text_emb, layers.{i}, norm,
    speaker_emb, speaker_proj, [emotion_proj]}`, `decoder.{token_emb,
    layers.{i}, norm, token_head, gate_head}`. Encoder layers bidirectional,
    decoder layers causal with cross-attention to the encoder output (the
    speaker condition added to every position); ALiBi (`use_alibi`, slopes
    times `alibi_alpha`) or rotary (base 10000) self-attention; FFN of
    `ffn_mult * dim`, ReLU or exact GELU; dropout `encoder_dropout` /
    `decoder_dropout` on the residual branches, the attention
    probabilities (self and cross) and the FFN hidden."""

    def __init__(self, cfg):
        super().__init__()
        ed, dd = cfg["encoder_dim"], cfg["decoder_dim"]
        self.mel_vocab = cfg["mel_vocab_size"]
        use_alibi = bool(cfg.get("use_alibi", True))
        alpha = float(cfg.get("alibi_alpha", 1.0)) if use_alibi else None
        rb = None if use_alibi else 10000.0
        mult, act = int(cfg.get("ffn_mult", 4)), cfg.get("activation", "relu")
        pe, pd = float(cfg.get("encoder_dropout", 0.0)), float(cfg.get("decoder_dropout", 0.0))
        sc, ec = int(cfg.get("speaker_channels", 32)), int(cfg.get("emotion_channels", 0))
        e = self.encoder = Stack()
        e.text_emb = nn.Embedding(cfg["vocab_size"], ed)
        e.layers = nn.ModuleList(
            Block(ed, cfg["encoder_heads"], False, pe, pe, pe, rb, "attn", mult * ed, act, alpha)
            for _ in range(cfg["encoder_layers"]))
        e.norm = nn.LayerNorm(ed, eps=1e-5)
        e.speaker_emb = nn.Embedding(int(cfg.get("n_speakers", 1)), sc)
        e.speaker_proj = nn.Linear(sc, ed)
        # Loaded, unused: the benchmark passes no emotion.
        e.emotion_proj = nn.Linear(ec, ed, bias=False) if ec > 0 else None
        d = self.decoder = Stack()
        d.token_emb = nn.Embedding(self.mel_vocab + 1, dd)
        d.layers = nn.ModuleList(
            Block(dd, cfg["decoder_heads"], True, pd, pd, pd, rb, "self_attn", mult * dd, act, alpha,
                  context_dim=ed)
            for _ in range(cfg["decoder_layers"]))
        d.norm = nn.LayerNorm(dd, eps=1e-5)
        d.token_head = nn.Linear(dd, self.mel_vocab)
        d.gate_head = nn.Linear(dd, 1)
        self.sinusoidal = bool(cfg.get("sinusoidal_positions", False))

    def positions(self, x):
        """`x` [b, n, dim] plus melvae_layers::sinusoidal_positions (sin at
        even, cos at odd channels, 10000^(2i/dim)) when configured."""
        if not self.sinusoidal:
            return x
        n, dim = x.shape[1], x.shape[2]
        p = torch.arange(n, dtype=torch.float64)[:, None]
        j = torch.arange(dim)
        a = p / torch.pow(10000.0, (j - j % 2).double() / dim)
        pe = torch.where(j % 2 == 0, torch.sin(a), torch.cos(a)).to(x.dtype)
        return x + pe[None]

    def encode(self, text, speakers):
        e = self.encoder
        x = self.positions(e.text_emb(text))
        for layer in e.layers:
            x = layer(x)
        cond = e.speaker_proj(e.speaker_emb(speakers))
        return e.norm(x) + cond[:, None]

    def terms(self, text, speakers, tokens, gate_pos_weight):
        enc = self.encode(text, speakers)
        d = self.decoder
        b, n = tokens.shape
        begin = torch.full((b, 1), self.mel_vocab, dtype=tokens.dtype)
        x = self.positions(d.token_emb(torch.cat([begin, tokens[:, :n - 1]], 1)))
        for layer in d.layers:
            x = layer(x, enc)
        h = d.norm(x)
        logits, gate = d.token_head(h), d.gate_head(h).squeeze(-1)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        # No padding: the gate's target is 1 at each row's last position.
        target = torch.zeros_like(gate)
        target[:, -1] = 1.0
        pw = None if gate_pos_weight is None else torch.tensor(float(gate_pos_weight), dtype=gate.dtype)
        g = F.binary_cross_entropy_with_logits(gate, target, pos_weight=pw)
        return ce + g, {"ce": ce, "gate": g}


# ---------------------------------------------------------------- LSTM prior


class SameConv1d(nn.Module):
    """melvae_layers::Conv1d with ConvPadding::Same and no weight norm (as
    Conv1dConfig::causal builds it, padding overridden): `weight` [out, in,
    k], `bias` [out]; `(span - 1) / 2` zeros on the left, the rest on the
    right."""

    def __init__(self, cin, cout, k, dilation=1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, k))
        self.bias = nn.Parameter(torch.empty(cout))
        span = (k - 1) * dilation + 1
        self.pad = ((span - 1) // 2, span - 1 - (span - 1) // 2)
        self.dilation = dilation

    def forward(self, x):
        return F.conv1d(F.pad(x, self.pad), self.weight, self.bias, dilation=self.dilation)


class PriorContext(nn.Module):
    """The LSTM prior's context model: `embed` (coarse codes), `input`
    (conv to `channels`), `layers.{i}` (`h + conv(relu(h))`, dilated),
    `out` (1x1 of relu(h), to `out_dim`), each coarse frame's features
    repeated `upsample` times: [batch, n * upsample, out_dim]."""

    def __init__(self, cfg, out_dim):
        super().__init__()
        k, c = int(cfg.get("kernel_size", 3)), cfg["channels"]
        self.upsample = cfg["upsample"]
        self.embed = nn.Embedding(cfg["vocab_size"], cfg["embed_dim"])
        self.input = SameConv1d(cfg["embed_dim"], c, k)
        self.layers = nn.ModuleList(SameConv1d(c, c, k, d) for d in cfg["dilations"])
        self.out = SameConv1d(c, out_dim, 1)

    def forward(self, codes):
        h = self.input(self.embed(codes).transpose(1, 2))
        for layer in self.layers:
            h = h + layer(F.relu(h))
        h = self.out(F.relu(h))  # [b, out, n]
        return h.repeat_interleave(self.upsample, dim=2).transpose(1, 2)


class LstmPrior(nn.Module):
    """melvae_models::LstmPrior: `embed` [vocab_size + 1, embed_dim] (the
    last row begins), optional `context.*` (added to the code embedding, or
    concatenated), `lstm` (torch's nn.LSTM, batch_first; candle-nn's cell
    has the same gate order i, f, g, o and both biases), `head`. Teacher
    forcing: input [begin, codes[:-1]], logits for every position;
    cross-entropy mean over all codes."""

    def __init__(self, cfg):
        super().__init__()
        v, e, hidden = cfg["vocab_size"], cfg["embed_dim"], cfg["hidden"]
        ctx = cfg.get("context")
        self.vocab = v
        self.concat = ctx is not None and ctx.get("combine", "add") == "concat"
        self.embed = nn.Embedding(v + 1, e)
        if ctx is not None:
            self.context = PriorContext(ctx, ctx["channels"] if self.concat else e)
        else:
            self.context = None
        lstm_in = e + ctx["channels"] if self.concat else e
        self.lstm = nn.LSTM(lstm_in, hidden, cfg["layers"], batch_first=True)
        self.head = nn.Linear(hidden, v)

    def terms(self, codes, context):
        b, n = codes.shape
        begin = torch.full((b, 1), self.vocab, dtype=codes.dtype)
        x = self.embed(torch.cat([begin, codes[:, :n - 1]], 1))
        if self.context is not None:
            c = self.context(context)[:, :n]
            x = torch.cat([x, c], -1) if self.concat else x + c
        h, _ = self.lstm(x)
        logits = self.head(h)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
        return ce, {"total": ce}


# ---------------------------------------------------------------- families


class Family:
    """The model, its batch, and closures for the evaluation terms and the
    training loss."""

    def __init__(self, meta, batch):
        self.name = meta.get("family")
        if self.name not in ("mel_vqvae", "gpt", "gpt_vae", "echolancer", "lstm_prior"):
            raise SystemExit(f"family {self.name!r}: not a token model "
                             "(mel_vqvae, gpt, gpt_vae, echolancer, lstm_prior; see the other *_twin.py)")
        cfg = meta["config"]
        m = cfg["model"]
        self.gen = torch.Generator().manual_seed(1)
        if self.name == "mel_vqvae":
            self.model = MelVqVae(m)
            self.x = torch.from_numpy(batch.astype(np.float32))
            self.describe = (f"batch {list(self.x.shape)} (mels), channels {m['channels']}, "
                             f"codebook {m['codebook_size']} x {m['codebook_dim']}, "
                             f"EMA {m.get('ema_decay')}, restart {m.get('restart_threshold', 1.0)}")
        elif self.name == "gpt":
            self.model = Gpt(m)
            self.x = torch.from_numpy(batch).round().long()
            self.classes = torch.tensor(cfg["classes"], dtype=torch.long)
            self.ls = float(cfg.get("loss", {}).get("label_smoothing", 0.0))
            self.describe = (f"batch {list(self.x.shape)} (tokens), dim {m['dim']}, "
                             f"{m['layers']} layers, {m['heads']} heads, positions "
                             f"{m.get('positions', 'learned')}, dropout {m.get('dropout', 0.0)}")
        elif self.name == "gpt_vae":
            self.model = GptVae(m)
            self.x = torch.from_numpy(batch).round().long()
            self.loss_cfg = cfg["loss"]
            self.kl_weight = float(cfg["kl_weight"])
            self.describe = (f"batch {list(self.x.shape)} (tokens), dim {m['dim']}, "
                             f"{m['enc_layers']}+{m['dec_layers']} layers, latent {m['latent_dim']}, "
                             f"injection {m.get('injection', 'both')}, dropout {m.get('dropout', 0.0)}, "
                             f"KL weight {self.kl_weight}")
        elif self.name == "echolancer":
            self.model = Echolancer(m)
            self.x = torch.from_numpy(batch).round().long()
            self.text = torch.tensor(cfg["text"], dtype=torch.long)
            self.speakers = torch.tensor(cfg["speakers"], dtype=torch.long)
            self.gate_pos_weight = cfg.get("loss", {}).get("gate_pos_weight")
            self.describe = (f"batch {list(self.text.shape)} (text) -> {list(self.x.shape)} (tokens), "
                             f"dims {m['encoder_dim']}/{m['decoder_dim']}, "
                             f"{m['encoder_layers']}+{m['decoder_layers']} layers, "
                             f"{'ALiBi (alpha ' + str(m.get('alibi_alpha', 1.0)) + ')' if m.get('use_alibi', True) else 'rotary'}, "
                             f"{m.get('activation', 'relu')}, dropout {m.get('encoder_dropout', 0.0)}/"
                             f"{m.get('decoder_dropout', 0.0)}, gate pos_weight {self.gate_pos_weight}")
        elif self.name == "lstm_prior":
            self.model = LstmPrior(m)
            self.x = torch.from_numpy(batch).round().long()
            ctx = cfg.get("context")
            self.context = None if ctx is None else torch.tensor(ctx, dtype=torch.long)
            c = m.get("context")
            self.describe = (f"batch {list(self.x.shape)} (codes), vocab {m['vocab_size']}, embed "
                             f"{m['embed_dim']}, LSTM {m['layers']} x {m['hidden']}, context "
                             + ("none" if c is None else
                                f"{list(self.context.shape)} codes (vocab {c['vocab_size']}, "
                                f"{c['channels']} channels, dilations {c['dilations']}, upsample "
                                f"{c['upsample']}, {c.get('combine', 'add')})"))
        else:
            raise AssertionError(self.name)

    def eval_terms(self):
        """As mel_tokens_throughput computes them: eval mode (no dropout; the
        quantiser not updated; the GPT-VAE decoding the posterior mean)."""
        self.model.eval()
        with torch.no_grad():
            if self.name == "mel_vqvae":
                _, terms = self.model.terms(self.x, False)
            elif self.name == "gpt":
                _, terms = self.model.terms(self.x, self.classes, self.ls)
            elif self.name == "echolancer":
                _, terms = self.model.terms(self.text, self.speakers, self.x, self.gate_pos_weight)
            elif self.name == "lstm_prior":
                _, terms = self.model.terms(self.x, self.context)
            else:
                _, terms = self.model.terms(self.x, 0.0, self.loss_cfg)
        return {k: float(v) for k, v in terms.items()}

    def train_loss(self, x):
        if self.name == "mel_vqvae":
            return self.model.terms(x, True)[0]
        if self.name == "gpt":
            return self.model.terms(x, self.classes, self.ls)[0]
        if self.name == "echolancer":
            return self.model.terms(self.text, self.speakers, x, self.gate_pos_weight)[0]
        if self.name == "lstm_prior":
            return self.model.terms(x, self.context)[0]
        return self.model.terms(x, self.kl_weight, self.loss_cfg, self.gen)[0]


# ---------------------------------------------------------------- main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="dump directory (weights.safetensors, batch.npy, meta.json)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps (after one warm-up)")
    p.add_argument("--tol", type=float, default=1e-4, help="relative tolerance of each loss term")
    p.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    p.add_argument("--no-time", action="store_true", help="parity check only")
    args = p.parse_args()

    with open(os.path.join(args.dir, "meta.json")) as f:
        meta = json.load(f)
    torch.set_num_threads(int(meta.get("threads", torch.get_num_threads())))
    torch.manual_seed(0)
    fam = Family(meta, np.load(os.path.join(args.dir, "batch.npy")))
    n = load_weights(fam.model, os.path.join(args.dir, "weights.safetensors"))
    if "n_params" in meta and int(meta["n_params"]) != n:
        print(f"variable count: twin {n} vs melvae {meta['n_params']}", file=sys.stderr)
        sys.exit(2)
    print(f"{meta['family']} (setting {meta.get('setting')}): {n} variables, {fam.describe}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}")

    # Parity: the evaluation-mode loss terms on the batch.
    ours, ref = fam.eval_terms(), meta["eval_terms"]
    ok = True
    print(f"{'term':>10} {'melvae':>16} {'torch':>16} {'rel diff':>10}")
    for k in ref:
        if k not in ours:
            print(f"{k:>10}: melvae has it, the twin does not")
            ok = False
            continue
        r = rel(ours[k], ref[k])
        bad = not (r <= args.tol)
        ok &= not bad
        print(f"{k:>10} {ref[k]:16.9g} {ours[k]:16.9g} {r:10.2e}" + ("  <-- FAIL" if bad else ""))
    print(f"parity (tol {args.tol:g} relative): {'OK' if ok else 'FAILED'}")
    if args.no_time:
        return 0 if ok else 1

    # Timing: forward (train) + backward + AdamW.
    model = fam.model
    model.train()
    lr = float(meta["learning_rate"])
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=lr,
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def step(fn=fam.train_loss):
        opt.zero_grad(set_to_none=True)
        total = fn(fam.x)
        total.backward()
        opt.step()
        return total.detach()

    mv = meta.get("melvae_step_ms")

    def report(what, ms, min_ms):
        line = f"PyTorch step{what}: {ms:.1f} ms (min {min_ms:.1f} ms over {args.steps} steps"
        if mv:
            line += f"; melvae {mv:.1f} ms, ratio {mv / ms:.2f}"
        print(line + ")")

    print(f"load average before timing: {loadavg()}")
    mean_ms, min_ms = time_steps(step, args.steps)
    report("", mean_ms, min_ms)
    if args.compile:
        try:
            compiled = torch.compile(fam.train_loss)
            t0 = time.perf_counter()
            step(compiled)
            print(f"torch.compile: first step (compilation) {time.perf_counter() - t0:.1f} s")
            print(f"load average before timing: {loadavg()}")
            cmean, cmin = time_steps(lambda: step(compiled), args.steps)
            report(" (compiled)", cmean, cmin)
        except Exception as e:  # no compiler, unsupported op, ...
            msg = str(e).strip().splitlines()
            print(f"torch.compile skipped: {type(e).__name__}: {msg[0] if msg else ''}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
