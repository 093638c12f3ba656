//! Multi-head attention: fused-QKV self-attention and cross-attention,
//! causal and key-padding masks, ALiBi, rotary embeddings, a KV cache for
//! incremental decoding, and one dispatch point ([`attend`]) between the
//! differentiable math path and flash attention.

use crate::Linear;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Module, VarBuilder};

use crate::error::ensure;
use crate::{Error, Mode, Result, Streaming};

/// ALiBi slopes for `heads` heads, as the ALiBi paper and x-transformers:
/// for a power of two `n`, `2^(-8 i / n)` for `i = 1..=n`; otherwise the
/// slopes of the closest lower power of two `p`, followed by every other
/// slope of `2p` until there are `heads`.
pub fn alibi_slopes(heads: usize) -> Vec<f64> {
    fn power_of_2(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
        (0..n).map(|i| start * start.powi(i as i32)).collect()
    }
    if heads == 0 {
        return Vec::new();
    }
    if heads.is_power_of_two() {
        return power_of_2(heads);
    }
    let p = 1usize << heads.ilog2();
    let mut s = power_of_2(p);
    s.extend(power_of_2(2 * p).into_iter().step_by(2).take(heads - p));
    s
}

/// What [`attend`] masks and biases. Masks say what they mean: nothing is
/// inferred from the query and key lengths.
#[derive(Debug, Clone, Default)]
pub struct AttendOptions<'a> {
    /// Query `i` sees keys `j <= i + (keys - queries)` (aligned at the end, as
    /// with a KV cache).
    pub causal: bool,
    /// With `causal`: query `i` sees at most the `window` most recent keys,
    /// itself included (`i + offset - window < j`), a bounded past as in
    /// streaming transformers. Must be `> 0`.
    pub window: Option<usize>,
    /// Per-head ALiBi slopes (already scaled): bias `-slope * |i + offset - j|`.
    pub alibi: Option<&'a [f64]>,
    /// `[batch, keys]`, non-zero for keys that may be attended.
    pub key_mask: Option<&'a Tensor>,
    /// `[batch, queries]`, zero for padded queries, whose output rows are
    /// zero (self-attention passes its padding mask here too).
    pub query_mask: Option<&'a Tensor>,
    /// Dropout on the attention weights (math path, training only).
    pub dropout: f64,
    /// Training (dropout masks from its generator) or evaluation.
    pub mode: Mode<'a>,
}

fn needs_grad(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// Scaled dot-product attention, `softmax(q k^T / sqrt(d) + bias) v`.
///
/// `q` `[batch, heads, queries, head_dim]`, `k`, `v`
/// `[batch, heads, keys, head_dim]` -> `[batch, heads, queries, head_dim]`.
///
/// Rows of padded queries (`query_mask`) are zero: a padded position
/// attends to nothing.
///
/// The single dispatch point ([`uses_flash`] says which path runs): with the
/// `flash-attn` feature, on a CUDA device, in f16/bf16, with no gradient
/// needed (no input tracks a variable) and no active dropout,
/// candle-flash-attn runs (`flash_attn_alibi` when ALiBi is on; a key mask
/// that keeps a non-empty prefix of each self-attention row runs the
/// variable-length kernels on the kept prefixes). Everything else takes the
/// math path, which is differentiable on any device and dtype.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttendOptions) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let s = k.dim(2)?;
    if k.dims() != [b, h, s, d] || v.dims() != [b, h, s, d] {
        return Err(Error::shape(
            "attention keys/values",
            format!("[{b}, {h}, keys, {d}] like the queries"),
            (k.dims(), v.dims()),
        ));
    }
    ensure(s >= t || !opts.causal, "attention", || {
        format!("causal attention needs keys ({s}) >= queries ({t})")
    })?;
    ensure(
        opts.window.is_none_or(|w| w > 0 && opts.causal),
        "attention window",
        || "must be > 0, and needs causal attention".into(),
    )?;
    let scale = 1.0 / (d as f64).sqrt();
    if let Some(lengths) = flash_plan(q, k, v, opts)? {
        return flash(q, k, v, scale, opts, lengths.as_deref());
    }
    let probs = attention_probs(q, k, scale, opts)?;
    let probs = opts.mode.dropout(&probs, opts.dropout)?;
    Ok(probs.matmul(&v.contiguous()?)?)
}

/// Whether [`attend`] takes the flash-attention path for these inputs (see
/// there). Reads a key mask back to the host to check its form.
pub fn uses_flash(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttendOptions) -> Result<bool> {
    Ok(flash_plan(q, k, v, opts)?.is_some())
}

/// `None` for the math path; `Some(prefix lengths)` for flash, the lengths
/// present when masks select the variable-length kernels. Masks are read
/// back to the host once, here.
#[allow(clippy::option_option)]
fn flash_plan(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttendOptions,
) -> Result<Option<Option<Vec<usize>>>> {
    let eligible = cfg!(feature = "flash-attn")
        && q.device().is_cuda()
        && crate::is_half(q.dtype())
        && !needs_grad(&[q, k, v]);
    if !eligible {
        return Ok(None);
    }
    mask_plan(opts)
}

/// The flash plan of [`flash_plan`] for eligible inputs, from the options
/// alone: flash runs without masks, or with a query mask and a key mask that
/// keep the same non-empty prefix of every row (padded self-attention, the
/// variable-length kernels). Everything else (a key mask alone, as in padded
/// cross-attention; other mask forms; a window; active dropout) takes the
/// math path.
#[allow(clippy::option_option)]
fn mask_plan(opts: &AttendOptions) -> Result<Option<Option<Vec<usize>>>> {
    if opts.window.is_some() || (opts.mode.is_train() && opts.dropout > 0.0) {
        return Ok(None);
    }
    Ok(match (opts.key_mask, opts.query_mask) {
        (None, None) => Some(None),
        (Some(km), Some(qm)) if km.dims() == qm.dims() => {
            match (prefix_lengths(km)?, prefix_lengths(qm)?) {
                (Some(k), Some(q)) if k == q => Some(Some(k)),
                _ => None,
            }
        }
        _ => None,
    })
}

/// For a key mask `[batch, keys]` that keeps a non-empty prefix of each row
/// (ones, then zeros), the prefix lengths; `None` for any other mask.
fn prefix_lengths(key_mask: &Tensor) -> Result<Option<Vec<usize>>> {
    let rows = key_mask.ne(0.0)?.to_dtype(DType::U8)?.to_vec2::<u8>()?;
    Ok(rows
        .iter()
        .map(|row| {
            let n = row.iter().take_while(|&&m| m != 0).count();
            (n > 0 && row[n..].iter().all(|&m| m == 0)).then_some(n)
        })
        .collect())
}

#[cfg(feature = "flash-attn")]
fn flash(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    opts: &AttendOptions,
    lengths: Option<&[usize]>,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let dev = q.device();
    // candle-flash-attn takes [batch, seq, heads, head_dim].
    let q = q.transpose(1, 2)?.contiguous()?;
    let k = k.transpose(1, 2)?.contiguous()?;
    let v = v.transpose(1, 2)?.contiguous()?;
    let slopes = match opts.alibi {
        Some(slopes) => {
            let slopes: Vec<f32> = slopes.iter().map(|&s| s as f32).collect();
            Some(Tensor::from_vec(slopes, h, dev)?)
        }
        None => None,
    };
    let scale = scale as f32;
    let Some(lengths) = lengths else {
        let out = match &slopes {
            Some(s) => candle_flash_attn::flash_attn_alibi(&q, &k, &v, s, scale, opts.causal)?,
            None => candle_flash_attn::flash_attn(&q, &k, &v, scale, opts.causal)?,
        };
        return Ok(out.transpose(1, 2)?.contiguous()?);
    };
    // Self-attention over the kept prefix of each row, packed without padding
    // ([total, heads, head_dim]); padded rows are zero, as on the math path.
    let (keep, scatter, cumulative) = varlen_layout(lengths, t);
    let total = keep.len();
    let keep = Tensor::from_vec(keep, total, dev)?;
    let pack =
        |x: &Tensor| -> Result<Tensor> { Ok(x.reshape((b * t, h, d))?.index_select(&keep, 0)?) };
    let (qp, kp, vp) = (pack(&q)?, pack(&k)?, pack(&v)?);
    let cu = Tensor::from_vec(cumulative, b + 1, dev)?;
    let max_len = lengths.iter().copied().max().unwrap_or(0);
    let out = match &slopes {
        Some(s) => candle_flash_attn::flash_attn_varlen_alibi(
            &qp,
            &kp,
            &vp,
            s,
            &cu,
            &cu,
            max_len,
            max_len,
            scale,
            opts.causal,
        )?,
        None => candle_flash_attn::flash_attn_varlen(
            &qp,
            &kp,
            &vp,
            &cu,
            &cu,
            max_len,
            max_len,
            scale,
            opts.causal,
        )?,
    };
    let zero = Tensor::zeros((1, h, d), out.dtype(), dev)?;
    let scatter = Tensor::from_vec(scatter, b * t, dev)?;
    let out = Tensor::cat(&[&out, &zero], 0)?.index_select(&scatter, 0)?;
    Ok(out.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?)
}

/// Packing of rows with kept prefixes `lengths` out of `t` positions each:
/// the kept flat rows (`b * t + i`), for every flat row its packed index (the
/// zero row `total` when padded), and the cumulative lengths.
#[cfg_attr(not(feature = "flash-attn"), allow(dead_code))]
fn varlen_layout(lengths: &[usize], t: usize) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let total: usize = lengths.iter().sum();
    let mut keep = Vec::with_capacity(total);
    let mut scatter = Vec::with_capacity(lengths.len() * t);
    let mut cumulative = vec![0u32];
    for (b, &n) in lengths.iter().enumerate() {
        for i in 0..t {
            if i < n {
                scatter.push(keep.len() as u32);
                keep.push((b * t + i) as u32);
            } else {
                scatter.push(total as u32);
            }
        }
        cumulative.push(keep.len() as u32);
    }
    (keep, scatter, cumulative)
}

#[cfg(not(feature = "flash-attn"))]
fn flash(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: f64,
    _: &AttendOptions,
    _: Option<&[usize]>,
) -> Result<Tensor> {
    Err(Error::invalid(
        "attention",
        "flash attention needs the flash-attn feature",
    ))
}

/// The dtype's most negative finite value: a mask fill that stays finite, so
/// fully masked rows give zeros instead of NaN.
fn neg_fill(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.38e38,
        DType::F32 => f32::MIN as f64,
        _ => f64::MIN / 4.0,
    }
}

/// Attention weights `[batch, heads, queries, keys]` of the math path.
/// Masked positions are exactly 0; a query with no visible key (including a
/// padded query in self-attention, see [`attend`]) gets all zeros.
pub fn attention_probs(q: &Tensor, k: &Tensor, scale: f64, opts: &AttendOptions) -> Result<Tensor> {
    let (b, h, t, _) = q.dims4()?;
    let s = k.dim(2)?;
    let dev = q.device();
    // Scores, masking and softmax in f32 for half inputs; probabilities are
    // returned in the inputs' dtype.
    let dtype = q.dtype();
    let raw = crate::upcast(&q.contiguous()?.matmul(&k.contiguous()?.t()?)?)?;
    if opts.alibi.is_none() && !opts.causal && opts.key_mask.is_none() && opts.query_mask.is_none()
    {
        // Scale and softmax in one pass (the fused op on the CPU).
        return Ok(crate::kernels::scaled_softmax(&raw, scale)?.to_dtype(dtype)?);
    }
    let mut scores = (raw * scale)?;
    let offset = s as isize - t as isize;
    if let Some(slopes) = opts.alibi {
        ensure(slopes.len() == h, "alibi slopes", || {
            format!("{} slopes for {h} heads", slopes.len())
        })?;
        let mut bias = Vec::with_capacity(h * t * s);
        for &m in slopes {
            for i in 0..t as isize {
                for j in 0..s as isize {
                    bias.push(-(m * (i + offset - j).abs() as f64) as f32);
                }
            }
        }
        let bias = Tensor::from_vec(bias, (1, h, t, s), dev)?.to_dtype(scores.dtype())?;
        scores = scores.broadcast_add(&bias)?;
    }
    let mut keep: Option<Tensor> = None;
    let and = |keep: Option<Tensor>, m: Tensor| -> Result<Option<Tensor>> {
        Ok(Some(match keep {
            Some(c) => c.broadcast_mul(&m)?,
            None => m,
        }))
    };
    if opts.causal {
        let window = opts.window.map_or(isize::MAX, |w| w as isize);
        let m: Vec<u8> = (0..t as isize)
            .flat_map(|i| {
                (0..s as isize).map(move |j| (j <= i + offset && i + offset - j < window) as u8)
            })
            .collect();
        keep = Some(Tensor::from_vec(m, (1, 1, t, s), dev)?);
    }
    if let Some(km) = opts.key_mask {
        if km.dims() != [b, s] {
            return Err(Error::shape(
                "attention key_mask",
                format!("[{b}, {s}]"),
                km.dims(),
            ));
        }
        keep = and(
            keep,
            km.ne(0.0)?.to_dtype(DType::U8)?.reshape((b, 1, 1, s))?,
        )?;
    }
    if let Some(qm) = opts.query_mask {
        if qm.dims() != [b, t] {
            return Err(Error::shape(
                "attention query_mask",
                format!("[{b}, {t}]"),
                qm.dims(),
            ));
        }
        keep = and(
            keep,
            qm.ne(0.0)?.to_dtype(DType::U8)?.reshape((b, 1, t, 1))?,
        )?;
    }
    let probs = match keep {
        None => crate::kernels::scaled_softmax(&scores, 1.0)?,
        Some(keep) => {
            let keep = keep.broadcast_as(scores.shape())?;
            let fill = Tensor::full(neg_fill(scores.dtype()), scores.shape(), dev)?
                .to_dtype(scores.dtype())?;
            let p = crate::kernels::scaled_softmax(&keep.where_cond(&scores, &fill)?, 1.0)?;
            p.mul(&keep.to_dtype(p.dtype())?)?
        }
    };
    Ok(probs.to_dtype(dtype)?)
}

/// Rotary position embedding (GPT-NeoX half rotation) from differentiable
/// ops (candle's fused rope ops have no backward): for position `p` and
/// frequency `f_i = base^(-2i/d)`, `x * cos(p f) + rotate_half(x) * sin(p f)`.
/// `x` `[batch, heads, time, head_dim]`, positions `offset..offset + time`.
pub fn apply_rotary(x: &Tensor, offset: usize, base: f64) -> Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    ensure(d % 2 == 0, "rotary head_dim", || {
        format!("must be even, got {d}")
    })?;
    let half = d / 2;
    let (mut cos, mut sin) = (Vec::with_capacity(t * d), Vec::with_capacity(t * d));
    for p in offset..offset + t {
        for _ in 0..2 {
            for i in 0..half {
                let a = p as f64 * base.powf(-2.0 * i as f64 / d as f64);
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    let dev = x.device();
    let cos = Tensor::from_vec(cos, (1, 1, t, d), dev)?.to_dtype(x.dtype())?;
    let sin = Tensor::from_vec(sin, (1, 1, t, d), dev)?.to_dtype(x.dtype())?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// Configuration of [`MultiHeadAttention`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionConfig {
    /// Model dimension (queries and output).
    pub dim: usize,
    /// Number of heads; must divide `dim`.
    pub heads: usize,
    /// Cross-attention to a context of this dimension (separate `q` and `kv`
    /// projections); `None` for self-attention (fused `qkv`).
    pub context_dim: Option<usize>,
    /// Learn bias terms.
    pub bias: bool,
    /// Mask future positions (self-attention).
    pub causal: bool,
    /// With `causal`: each position attends to at most this many positions
    /// (itself and the `window - 1` before it), in training, offline and in
    /// the KV cache alike, so streaming holds a bounded state.
    pub window: Option<usize>,
    /// ALiBi scaled by this `alibi_alpha`, if set.
    pub alibi_alpha: Option<f64>,
    /// Rotary embeddings with this base (10000 is usual), if set.
    pub rotary_base: Option<f64>,
    /// Dropout on attention weights during training.
    pub dropout: f64,
}

impl AttentionConfig {
    /// Self-attention without bias terms, masks, positions or dropout.
    pub fn new(dim: usize, heads: usize) -> Self {
        Self {
            dim,
            heads,
            context_dim: None,
            bias: false,
            causal: false,
            window: None,
            alibi_alpha: None,
            rotary_base: None,
            dropout: 0.0,
        }
    }

    /// Checks the fields; the error names the bad one.
    pub fn validate(&self) -> Result<()> {
        ensure(
            self.heads > 0 && self.dim % self.heads == 0,
            "attention.heads",
            || format!("{} heads must divide dim {}", self.heads, self.dim),
        )?;
        ensure(
            (0.0..1.0).contains(&self.dropout),
            "attention.dropout",
            || format!("must be in [0, 1), got {}", self.dropout),
        )?;
        if self.rotary_base.is_some() {
            ensure(
                (self.dim / self.heads) % 2 == 0,
                "attention.rotary_base",
                || "rotary needs an even head dim".into(),
            )?;
        }
        ensure(
            self.window.is_none_or(|w| w > 0 && self.causal),
            "attention.window",
            || "must be > 0, and needs causal self-attention".into(),
        )?;
        ensure(
            !(self.causal && self.context_dim.is_some()),
            "attention.causal",
            || "cross-attention is not causal; mask the context with key_mask".into(),
        )
    }
}

/// Multi-head attention over `[batch, time, dim]`.
///
/// Parameters: self-attention `qkv.weight` `[3 dim, dim]`; cross-attention
/// `q.weight` `[dim, dim]` and `kv.weight` `[2 dim, context_dim]`; both
/// `out.weight` `[dim, dim]`; `*.bias` when `bias`.
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    cfg: AttentionConfig,
    qkv: Option<Linear>,
    q: Option<Linear>,
    kv: Option<Linear>,
    out: Linear,
    slopes: Option<Vec<f64>>,
    /// Keys and values seen so far by [`MultiHeadAttention::forward_cached`],
    /// `[batch, heads, past, head_dim]` (at most `window - 1` positions with
    /// a window), detached from any autograd graph.
    cache: Option<(Tensor, Tensor)>,
    /// Positions seen by the cache (the next position's index).
    pos: usize,
}

fn linear(i: usize, o: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    Ok(if bias {
        crate::linear(i, o, vb)?
    } else {
        crate::linear_no_bias(i, o, vb)?
    })
}

impl MultiHeadAttention {
    /// Builds the projections; fails on an invalid config, naming the field.
    pub fn new(cfg: AttentionConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.dim;
        let (qkv, q, kv) = match cfg.context_dim {
            None => (Some(linear(d, 3 * d, cfg.bias, vb.pp("qkv"))?), None, None),
            Some(c) => (
                None,
                Some(linear(d, d, cfg.bias, vb.pp("q"))?),
                Some(linear(c, 2 * d, cfg.bias, vb.pp("kv"))?),
            ),
        };
        let slopes = cfg
            .alibi_alpha
            .map(|a| alibi_slopes(cfg.heads).into_iter().map(|s| s * a).collect());
        Ok(Self {
            cfg,
            qkv,
            q,
            kv,
            out: linear(d, d, cfg.bias, vb.pp("out"))?,
            slopes,
            cache: None,
            pos: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AttentionConfig {
        &self.cfg
    }

    /// `[batch, time, n * dim]` to `n` tensors `[batch, heads, time, head_dim]`.
    fn split_heads(&self, x: &Tensor, n: usize) -> Result<Vec<Tensor>> {
        let (b, t, _) = x.dims3()?;
        let (h, hd) = (self.cfg.heads, self.cfg.dim / self.cfg.heads);
        let x = x
            .reshape((b, t, n, h, hd))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        (0..n).map(|i| Ok(x.get(i)?)).collect()
    }

    fn merge(&self, y: &Tensor) -> Result<Tensor> {
        let (b, _, t, _) = y.dims4()?;
        Ok(self
            .out
            .forward(&y.transpose(1, 2)?.reshape((b, t, self.cfg.dim))?)?)
    }

    fn check(&self, x: &Tensor, what: &str, dim: usize) -> Result<()> {
        match x.dims() {
            [_, _, d] if *d == dim => Ok(()),
            got => Err(Error::shape(what, format!("[batch, time, {dim}]"), got)),
        }
    }

    fn opts<'a>(
        &'a self,
        key_mask: Option<&'a Tensor>,
        query_mask: Option<&'a Tensor>,
        causal: bool,
        mode: Mode<'a>,
    ) -> AttendOptions<'a> {
        AttendOptions {
            causal,
            window: if causal { self.cfg.window } else { None },
            alibi: self.slopes.as_deref(),
            key_mask,
            query_mask,
            dropout: self.cfg.dropout,
            mode,
        }
    }

    fn rotate(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        match self.cfg.rotary_base {
            Some(base) => apply_rotary(x, offset, base),
            None => Ok(x.clone()),
        }
    }

    /// Self-attention of `x` (`[batch, time, dim]`) with an optional padding
    /// `mask` (`[batch, time]`, non-zero = valid): padded positions are not
    /// attended to, and their own output rows are zero. Causal (and
    /// windowed) if configured.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>, mode: Mode) -> Result<Tensor> {
        let qkv = self.qkv.as_ref().ok_or_else(|| {
            Error::invalid(
                "attention",
                "cross-attention needs a context: use forward_cross",
            )
        })?;
        self.check(x, "attention input", self.cfg.dim)?;
        let p = self.split_heads(&qkv.forward(x)?, 3)?;
        let (q, k) = (self.rotate(&p[0], 0)?, self.rotate(&p[1], 0)?);
        self.merge(&attend(
            &q,
            &k,
            &p[2],
            &self.opts(mask, mask, self.cfg.causal, mode),
        )?)
    }

    /// Cross-attention's checked inputs: the queries of `x` split into
    /// heads, and the context's key/value projection.
    fn cross_query(&self, x: &Tensor, context: &Tensor) -> Result<(Tensor, &Linear)> {
        let (q, kv) = match (&self.q, &self.kv, self.cfg.context_dim) {
            (Some(q), Some(kv), Some(c)) => {
                self.check(context, "attention context", c)?;
                (q, kv)
            }
            _ => {
                return Err(Error::invalid(
                    "attention",
                    "self-attention has no context: use forward or forward_cached",
                ))
            }
        };
        self.check(x, "attention input", self.cfg.dim)?;
        Ok((self.split_heads(&q.forward(x)?, 1)?.remove(0), kv))
    }

    /// Cross-attention from `x` (`[batch, time, dim]`) to `context`
    /// (`[batch, ctx_time, context_dim]`), with an optional `context_mask`
    /// (`[batch, ctx_time]`, non-zero = valid) that masks keys only: every
    /// query row attends to the valid context, whatever the two lengths.
    pub fn forward_cross(
        &self,
        x: &Tensor,
        context: &Tensor,
        context_mask: Option<&Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (q, kv) = self.cross_query(x, context)?;
        let kv = self.split_heads(&kv.forward(context)?, 2)?;
        self.merge(&attend(
            &q,
            &kv[0],
            &kv[1],
            &self.opts(context_mask, None, false, mode),
        )?)
    }

    /// [`MultiHeadAttention::forward_cross`] for incremental decoding: the
    /// context's keys and values are projected on the first call after
    /// [`MultiHeadAttention::clear_cache`] and kept (detached), so each
    /// new position costs its query and the attention, not a projection of
    /// the whole context. The context must stay the same until the cache
    /// is cleared (inference: no dropout).
    pub fn forward_cross_cached(
        &mut self,
        x: &Tensor,
        context: &Tensor,
        context_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (q, kv) = self.cross_query(x, context)?;
        let (k, v) = match &self.cache {
            Some(kv) => kv.clone(),
            None => {
                let mut p = self.split_heads(&kv.forward(context)?.detach(), 2)?;
                let v = p.remove(1);
                let k = p.remove(0);
                self.cache = Some((k.clone(), v.clone()));
                (k, v)
            }
        };
        self.merge(&attend(
            &q,
            &k,
            &v,
            &self.opts(context_mask, None, false, Mode::Eval),
        )?)
    }

    /// Incremental causal self-attention: `x_new` (`[batch, t, dim]`) are the
    /// next `t` positions; they attend to the cached positions (the last
    /// `window - 1` with a window) and causally to each other. Equals the
    /// matching rows of [`MultiHeadAttention::forward`] on the whole
    /// sequence (inference: no dropout, no padding). The cache is detached:
    /// it never holds an autograd graph, and with a window its size is
    /// bounded, so a stream of any length costs constant memory and time
    /// per position.
    pub fn forward_cached(&mut self, x_new: &Tensor) -> Result<Tensor> {
        let qkv = self
            .qkv
            .as_ref()
            .ok_or_else(|| Error::invalid("attention", "the KV cache is for self-attention"))?;
        self.check(x_new, "attention input", self.cfg.dim)?;
        let t = x_new.dim(1)?;
        let p = self.split_heads(&qkv.forward(x_new)?, 3)?;
        let (q, k_new) = (self.rotate(&p[0], self.pos)?, self.rotate(&p[1], self.pos)?);
        let (k, v) = match self.cache.take() {
            Some((k, v)) => (
                Tensor::cat(&[&k, &k_new], 2)?,
                Tensor::cat(&[&v, &p[2]], 2)?,
            ),
            None => (k_new, p[2].clone()),
        };
        let y = attend(
            &q,
            &k,
            &v,
            &self.opts(None, None, self.cfg.causal, Mode::Eval),
        )?;
        let len = k.dim(2)?;
        let keep = self.cfg.window.map_or(len, |w| len.min(w - 1));
        self.cache = (keep > 0)
            .then(|| -> Result<(Tensor, Tensor)> {
                let cut = |x: &Tensor| -> Result<Tensor> {
                    Ok(x.narrow(2, len - keep, keep)?.contiguous()?.detach())
                };
                Ok((cut(&k)?, cut(&v)?))
            })
            .transpose()?;
        self.pos += t;
        self.merge(&y)
    }

    /// Number of cached positions.
    pub fn cache_len(&self) -> usize {
        self.cache
            .as_ref()
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    /// Positions seen since the cache was last cleared.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Forgets the KV cache.
    pub fn clear_cache(&mut self) {
        self.cache = None;
        self.pos = 0;
    }
}

impl Streaming for MultiHeadAttention {
    /// Causal self-attention with its KV cache: chunks `[batch, t, dim]` give
    /// `[batch, t, dim]`.
    fn step(&mut self, chunk: &Tensor) -> Result<Option<Tensor>> {
        ensure(self.cfg.causal, "attention.causal", || {
            "only causal attention streams".into()
        })?;
        self.forward_cached(chunk).map(Some)
    }

    fn reset(&mut self) {
        self.clear_cache();
    }

    fn state_elements(&self) -> usize {
        self.cache
            .as_ref()
            .map_or(0, |(k, v)| k.elem_count() + v.elem_count())
    }
}

/// A `[batch, keys]` u8 key mask on `device` with the first `lengths[b]`
/// keys of item `b` valid (1) and the rest padding (0).
pub fn lengths_to_mask(lengths: &[usize], keys: usize, device: &Device) -> Result<Tensor> {
    let m: Vec<u8> = lengths
        .iter()
        .flat_map(|&l| (0..keys).map(move |j| (j < l) as u8))
        .collect();
    Ok(Tensor::from_vec(m, (lengths.len(), keys), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        check_gradients, max_abs_diff, named_vars, noise, randomize, stream_in_chunks, GradCheck,
    };
    use candle_core::Var;
    use candle_nn::VarMap;

    #[test]
    fn alibi_slopes_match_the_published_formula() {
        let s8 = alibi_slopes(8);
        for (i, s) in s8.iter().enumerate() {
            assert!((s - 2f64.powi(-(i as i32 + 1))).abs() < 1e-15, "{s8:?}");
        }
        // 12 heads: the 8 slopes of 8, then slopes 1, 3, 5, 7 of 16 (2^-0.5, 2^-1.5, ...).
        let s12 = alibi_slopes(12);
        assert_eq!(s12.len(), 12);
        assert_eq!(&s12[..8], &s8[..]);
        for (i, s) in s12[8..].iter().enumerate() {
            assert!((s - 2f64.powf(-0.5 - i as f64)).abs() < 1e-15, "{s12:?}");
        }
        assert_eq!(
            alibi_slopes(6)[4..],
            alibi_slopes(8)
                .iter()
                .step_by(2)
                .take(2)
                .copied()
                .collect::<Vec<_>>()[..]
        );
    }

    fn qkv(b: usize, h: usize, t: usize, s: usize, d: usize) -> (Tensor, Tensor, Tensor) {
        (
            noise(&[b, h, t, d], 1).unwrap(),
            noise(&[b, h, s, d], 2).unwrap(),
            noise(&[b, h, s, d], 3).unwrap(),
        )
    }

    #[test]
    fn flash_packing_of_padded_rows() {
        let mask =
            Tensor::new(&[[1u8, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], &Device::Cpu).unwrap();
        let lengths = prefix_lengths(&mask).unwrap().unwrap();
        assert_eq!(lengths, [2, 4, 1]);
        let (keep, scatter, cumulative) = varlen_layout(&lengths, 4);
        assert_eq!(keep, [0, 1, 4, 5, 6, 7, 8]);
        assert_eq!(cumulative, [0, 2, 6, 7]);
        // Padded rows point at the appended zero row (index 7).
        assert_eq!(scatter, [0, 1, 7, 7, 2, 3, 4, 5, 6, 7, 7, 7]);
        // Holes and empty rows are not prefixes: the math path handles them.
        for bad in [[[1u8, 0, 1, 0]], [[0u8, 0, 0, 0]], [[0u8, 1, 1, 1]]] {
            let m = Tensor::new(&bad, &Device::Cpu).unwrap();
            assert_eq!(prefix_lengths(&m).unwrap(), None, "{bad:?}");
        }
        // On the CPU, and for tensors that track gradients, it is never flash.
        let (q, k, v) = qkv(1, 2, 4, 4, 8);
        assert!(!uses_flash(&q, &k, &v, &AttendOptions::default()).unwrap());
    }

    #[test]
    fn masked_positions_get_zero_weight() {
        let (q, k, v) = qkv(2, 2, 5, 5, 4);
        let mask = lengths_to_mask(&[3, 5], 5, &Device::Cpu).unwrap();
        let slopes = alibi_slopes(2);
        let opts = AttendOptions {
            causal: true,
            alibi: Some(&slopes),
            key_mask: Some(&mask),
            query_mask: Some(&mask),
            ..Default::default()
        };
        let p = attention_probs(&q, &k, 0.5, &opts).unwrap();
        let p: Vec<Vec<Vec<Vec<f64>>>> = (0..2)
            .map(|b| p.get(b).unwrap().to_vec3::<f64>().unwrap())
            .collect();
        for (b, pb) in p.iter().enumerate() {
            for ph in pb {
                for (i, row) in ph.iter().enumerate() {
                    // A padded query (i >= length) attends to nothing.
                    let len = [3, 5][b];
                    for (j, &w) in row.iter().enumerate() {
                        let visible = j <= i && j < len && i < len;
                        if visible {
                            assert!(w > 0.0);
                        } else {
                            assert_eq!(w, 0.0, "b {b} i {i} j {j}");
                        }
                    }
                    let total = if i < len { 1.0 } else { 0.0 };
                    assert!((row.iter().sum::<f64>() - total).abs() < 1e-12);
                }
            }
        }
        // Values at masked keys cannot leak into the output.
        let out = attend(&q, &k, &v, &opts).unwrap();
        let junk = (noise(&[1, 2, 2, 4], 9).unwrap() * 100.0).unwrap();
        let v2 = v.slice_assign(&[0..1, 0..2, 3..5, 0..4], &junk).unwrap();
        let out2 = attend(&q, &k, &v2, &opts).unwrap();
        assert!(max_abs_diff(&out, &out2).unwrap() < 1e-12);
        // A query that sees nothing gets zeros, not NaN.
        let none = lengths_to_mask(&[0, 0], 5, &Device::Cpu).unwrap();
        let o = attend(
            &q,
            &k,
            &v,
            &AttendOptions {
                key_mask: Some(&none),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            o.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            0.0
        );
    }

    #[test]
    fn cross_attention_masks_keys_only_whatever_the_lengths() {
        // Equal and unequal query/context lengths: with a padded context,
        // every query row attends to the valid keys (none is zeroed), and
        // extra padding changes nothing.
        for t in [4, 6] {
            let (q, k, v) = qkv(2, 2, t, 4, 4);
            let mask = lengths_to_mask(&[2, 4], 4, &Device::Cpu).unwrap();
            let opts = AttendOptions {
                key_mask: Some(&mask),
                ..Default::default()
            };
            let out = attend(&q, &k, &v, &opts).unwrap();
            let rows = out.abs().unwrap().sum(3).unwrap().to_vec3::<f64>().unwrap();
            assert!(rows.iter().flatten().flatten().all(|&r| r > 0.0), "t {t}");
            let pad = |x: &Tensor| {
                let z = Tensor::zeros((2, 2, 3, 4), DType::F64, &Device::Cpu).unwrap();
                Tensor::cat(&[x, &(z + 7.0).unwrap()], 2).unwrap()
            };
            let mask7 = lengths_to_mask(&[2, 4], 7, &Device::Cpu).unwrap();
            let out7 = attend(
                &q,
                &pad(&k),
                &pad(&v),
                &AttendOptions {
                    key_mask: Some(&mask7),
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(max_abs_diff(&out, &out7).unwrap() < 1e-12, "t {t}");
            // Not a flash case: only matching query and key prefixes are.
            assert_eq!(mask_plan(&opts).unwrap(), None);
        }
    }

    #[test]
    fn flash_plans_follow_the_masks() {
        let m = lengths_to_mask(&[2, 4], 4, &Device::Cpu).unwrap();
        let m2 = lengths_to_mask(&[3, 4], 4, &Device::Cpu).unwrap();
        let plan = |key_mask, query_mask, window| {
            mask_plan(&AttendOptions {
                causal: true,
                key_mask,
                query_mask,
                window,
                ..Default::default()
            })
            .unwrap()
        };
        assert_eq!(plan(None, None, None), Some(None));
        assert_eq!(plan(Some(&m), Some(&m), None), Some(Some(vec![2, 4])));
        assert_eq!(plan(Some(&m), Some(&m2), None), None);
        assert_eq!(plan(Some(&m), None, None), None);
        assert_eq!(plan(None, Some(&m), None), None);
        assert_eq!(plan(None, None, Some(3)), None);
        let r = crate::DropoutRng::new(1);
        let train = AttendOptions {
            dropout: 0.1,
            mode: Mode::Train(&r),
            ..Default::default()
        };
        assert_eq!(mask_plan(&train).unwrap(), None);
    }

    #[test]
    fn windowed_attention_sees_a_bounded_past() {
        let (q, k, _) = qkv(1, 1, 7, 7, 4);
        let opts = AttendOptions {
            causal: true,
            window: Some(3),
            ..Default::default()
        };
        let p = attention_probs(&q, &k, 0.5, &opts).unwrap();
        let p = p.get(0).unwrap().get(0).unwrap().to_vec2::<f64>().unwrap();
        for (i, row) in p.iter().enumerate() {
            for (j, &w) in row.iter().enumerate() {
                assert_eq!(w > 0.0, j <= i && i - j < 3, "i {i} j {j}");
            }
        }
        let e = attend(
            &q,
            &k,
            &k,
            &AttendOptions {
                window: Some(2),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("attention window"), "{e}");
    }

    #[test]
    fn windowed_kv_cache_is_bounded_and_equals_offline() {
        for (alibi, rotary) in [(None, Some(10000.0)), (Some(1.0), None)] {
            let cfg = AttentionConfig {
                causal: true,
                window: Some(4),
                alibi_alpha: alibi,
                rotary_base: rotary,
                ..AttentionConfig::new(8, 2)
            };
            let (vm, mut m) = mha(cfg, DType::F32);
            randomize(&vm, 0.5, 4).unwrap();
            // Longer than the window, from variables: the cache stays small
            // and holds no graph.
            let x = noise(&[2, 23, 8], 5).unwrap().to_dtype(DType::F32).unwrap();
            let full = m.forward(&x, None, Mode::Eval).unwrap();
            for seed in 0..3 {
                m.reset();
                let streamed = stream_in_chunks(&mut m, &x, 1, 6, seed).unwrap();
                assert!(max_abs_diff(&full, &streamed).unwrap() < 1e-5, "{seed}");
                assert_eq!(m.cache_len(), 3);
                assert_eq!(m.position(), 23);
                let (k, v) = m.cache.as_ref().unwrap();
                assert!(!k.track_op() && !v.track_op());
            }
        }
    }

    fn mha(cfg: AttentionConfig, dtype: DType) -> (VarMap, MultiHeadAttention) {
        let vm = VarMap::new();
        let m = MultiHeadAttention::new(cfg, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu))
            .unwrap();
        (vm, m)
    }

    #[test]
    fn kv_cached_decoding_equals_full_causal_attention() {
        for (alibi, rotary) in [
            (None, None),
            (Some(1.0), None),
            (None, Some(10000.0)),
            (Some(0.5), Some(100.0)),
        ] {
            let cfg = AttentionConfig {
                causal: true,
                bias: true,
                alibi_alpha: alibi,
                rotary_base: rotary,
                ..AttentionConfig::new(8, 2)
            };
            let (vm, mut m) = mha(cfg, DType::F32);
            randomize(&vm, 0.5, 4).unwrap();
            let x = noise(&[2, 13, 8], 5).unwrap().to_dtype(DType::F32).unwrap();
            let full = m.forward(&x, None, Mode::Eval).unwrap();
            // Token by token, and in random chunks.
            m.clear_cache();
            let steps: Vec<Tensor> = (0..13)
                .map(|i| m.forward_cached(&x.narrow(1, i, 1).unwrap()).unwrap())
                .collect();
            assert_eq!(m.cache_len(), 13);
            assert!(
                max_abs_diff(&full, &Tensor::cat(&steps, 1).unwrap()).unwrap() < 1e-5,
                "{alibi:?} {rotary:?}"
            );
            let streamed = stream_in_chunks(&mut m, &x, 1, 5, 7).unwrap();
            assert!(
                max_abs_diff(&full, &streamed).unwrap() < 1e-5,
                "{alibi:?} {rotary:?}"
            );
        }
    }

    #[test]
    fn gradients_self_and_cross() {
        let cfg = AttentionConfig {
            causal: true,
            bias: true,
            alibi_alpha: Some(0.7),
            rotary_base: Some(50.0),
            ..AttentionConfig::new(8, 2)
        };
        let (vm, m) = mha(cfg, DType::F64);
        randomize(&vm, 0.5, 1).unwrap();
        let x = Var::from_tensor(&noise(&[2, 5, 8], 2).unwrap()).unwrap();
        let mask = lengths_to_mask(&[4, 5], 5, &Device::Cpu).unwrap();
        let mut vars = named_vars(&vm);
        vars.push(("input".into(), x.clone()));
        check_gradients(&vars, GradCheck::default(), || {
            m.forward(x.as_tensor(), Some(&mask), Mode::Eval)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        })
        .unwrap();

        let cfg = AttentionConfig {
            context_dim: Some(6),
            bias: true,
            ..AttentionConfig::new(8, 4)
        };
        let (vm, m) = mha(cfg, DType::F64);
        randomize(&vm, 0.5, 3).unwrap();
        let ctx = Var::from_tensor(&noise(&[2, 7, 6], 4).unwrap()).unwrap();
        let cmask = lengths_to_mask(&[7, 3], 7, &Device::Cpu).unwrap();
        let mut vars = named_vars(&vm);
        vars.push(("input".into(), x.clone()));
        vars.push(("context".into(), ctx.clone()));
        check_gradients(&vars, GradCheck::default(), || {
            m.forward_cross(x.as_tensor(), ctx.as_tensor(), Some(&cmask), Mode::Eval)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        })
        .unwrap();
    }

    #[test]
    fn rotary_is_relative() {
        // q . k after rotation depends only on the position difference.
        let q = noise(&[1, 1, 1, 6], 1).unwrap();
        let k = noise(&[1, 1, 1, 6], 2).unwrap();
        let dot = |pq, pk| -> f64 {
            let a = apply_rotary(&q, pq, 10000.0).unwrap();
            let b = apply_rotary(&k, pk, 10000.0).unwrap();
            a.mul(&b)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!((dot(5, 2) - dot(13, 10)).abs() < 1e-12);
        assert!(
            (dot(0, 0)
                - q.mul(&k)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap())
            .abs()
                < 1e-12
        );
    }

    #[test]
    fn bad_configs_and_shapes_are_named() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let e = MultiHeadAttention::new(AttentionConfig::new(10, 4), vb.clone()).unwrap_err();
        assert!(e.to_string().contains("attention.heads"), "{e}");
        let e = MultiHeadAttention::new(
            AttentionConfig {
                rotary_base: Some(1e4),
                ..AttentionConfig::new(6, 2)
            },
            vb.clone(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("rotary"), "{e}");
        let (_, m) = mha(AttentionConfig::new(8, 2), DType::F32);
        let e = m
            .forward(
                &Tensor::zeros((2, 3, 6), DType::F32, &Device::Cpu).unwrap(),
                None,
                Mode::Eval,
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("[batch, time, 8]") && e.to_string().contains("[2, 3, 6]"),
            "{e}"
        );
        let bad = Tensor::zeros((2, 4), DType::U8, &Device::Cpu).unwrap();
        let e = m
            .forward(
                &Tensor::zeros((2, 3, 8), DType::F32, &Device::Cpu).unwrap(),
                Some(&bad),
                Mode::Eval,
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("key_mask") && e.to_string().contains("[2, 3]"),
            "{e}"
        );
        let (_, mut m) = mha(AttentionConfig::new(8, 2), DType::F32);
        let e = m
            .step(&Tensor::zeros((1, 3, 8), DType::F32, &Device::Cpu).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("only causal"), "{e}");
    }
}
