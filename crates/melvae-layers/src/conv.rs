//! Convolutions: causal (streaming) and "same" 1-D convs with optional
//! weight norm, causal 2-D convs for mel feature maps, and a transposed-conv
//! upsampler that trains.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use crate::act::Activation;
use crate::error::ensure;
use crate::kernels::{Act, Gather};
use crate::streaming::Streaming;
use crate::{Error, Result};

/// Where a convolution's padding goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvPadding {
    /// All padding on the left (past): output frame `j` depends on inputs up
    /// to `j * stride + stride - 1` only. Streams.
    Causal,
    /// `(kernel - 1) * dilation` split evenly (extra on the right).
    Same,
    /// No padding.
    Valid,
}

/// A weight that is either stored as is, or as weight norm `g * v / ||v||`
/// (`g` per slice along `dim`, norm over all other dims; torch's
/// `weight_norm` with parameters `weight_g`, `weight_v`).
#[derive(Debug, Clone)]
pub(crate) enum Weight {
    Plain(Tensor),
    Norm { g: Tensor, v: Tensor, dim: usize },
}

impl Weight {
    /// `shape` of the weight; `norm_dim` the dim that keeps its own norm.
    ///
    /// Initialised as torch initialises a conv and its `weight_norm`: plain
    /// weights `weight` and normed ones' `weight_v` uniform in
    /// `±1/sqrt(fan_in)` (`kaiming_uniform_(a=sqrt(5))`, `fan_in` = dim 1
    /// times the kernel), and `weight_g` the root-mean-square norm of such
    /// a slice, `1/sqrt(3)` (torch sets it to each slice's own `||v||`,
    /// which scatters around that value for small `fan_in`). With a
    /// unit norm instead, the gain compounds through a deep conv stack: a
    /// 20-layer SEANet decoder started 12x louder than its target and took
    /// hundreds of steps to become quiet before it learned the waveform
    /// (docs/models/wave_vae.md, "Measured").
    pub(crate) fn new(shape: &[usize], norm_dim: Option<usize>, vb: &VarBuilder) -> Result<Self> {
        let fan_in: usize = shape.iter().skip(1).product();
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Ok(match norm_dim {
            None => Self::Plain(vb.get_with_hints(shape, "weight", init)?),
            Some(dim) => {
                let mut g_shape = vec![1; shape.len()];
                g_shape[dim] = shape[dim];
                Self::Norm {
                    g: vb.get_with_hints(
                        g_shape.as_slice(),
                        "weight_g",
                        Init::Const(3f64.sqrt().recip()),
                    )?,
                    v: vb.get_with_hints(shape, "weight_v", init)?,
                    dim,
                }
            }
        })
    }

    /// The effective weight (differentiable in `g` and `v`).
    pub(crate) fn dtype(&self) -> candle_core::DType {
        self.stored().dtype()
    }

    pub(crate) fn device(&self) -> candle_core::Device {
        self.stored().device().clone()
    }

    /// The stored tensor (`v` for weight norm).
    fn stored(&self) -> &Tensor {
        match self {
            Self::Plain(w) => w,
            Self::Norm { v, .. } => v,
        }
    }

    pub(crate) fn get(&self) -> Result<Tensor> {
        match self {
            Self::Plain(w) => Ok(w.clone()),
            Self::Norm { g, v, dim } => {
                // The norm in f32 for half-precision weights.
                let mut sq = crate::upcast(v)?.sqr()?;
                for d in (0..v.rank()).rev() {
                    if d != *dim {
                        sq = sq.sum_keepdim(d)?;
                    }
                }
                let norm = sq.sqrt()?.to_dtype(v.dtype())?;
                Ok(v.broadcast_mul(&g.broadcast_div(&norm)?)?)
            }
        }
    }
}

/// The bias of a conv with `fan_in` inputs per output (torch's default init,
/// uniform in `±1/sqrt(fan_in)`), or `None` when disabled.
fn conv_bias(enabled: bool, out: usize, fan_in: usize, vb: &VarBuilder) -> Result<Option<Tensor>> {
    if !enabled {
        return Ok(None);
    }
    let bound = 1.0 / (fan_in as f64).sqrt();
    Ok(Some(vb.get_with_hints(
        out,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?))
}

/// Streaming state of a causal conv along one time axis: the samples not yet
/// consumed, starting with the causal left padding (zeros).
#[derive(Debug, Clone)]
pub(crate) struct CausalBuffer {
    /// Left padding `(kernel - 1) * dilation + 1 - stride`.
    pub pad: usize,
    /// Receptive field `(kernel - 1) * dilation + 1`.
    pub span: usize,
    pub stride: usize,
    buf: Option<Tensor>,
}

impl CausalBuffer {
    pub(crate) fn new(kernel: usize, dilation: usize, stride: usize, what: &str) -> Result<Self> {
        let span = (kernel - 1) * dilation + 1;
        ensure(span >= stride, what, || {
            format!("causal conv needs (kernel - 1) * dilation + 1 = {span} >= stride = {stride}")
        })?;
        Ok(Self {
            pad: span - stride,
            span,
            stride,
            buf: None,
        })
    }

    /// Appends `x` along `dim`; returns the input window that yields every
    /// now-computable output, keeping the rest for later.
    pub(crate) fn push(&mut self, x: &Tensor, dim: usize) -> Result<Option<Tensor>> {
        let buf = match self.buf.take() {
            Some(b) => Tensor::cat(&[&b, x], dim)?,
            None => x.pad_with_zeros(dim, self.pad, 0)?,
        };
        let len = buf.dim(dim)?;
        let n = if len >= self.span {
            (len - self.span) / self.stride + 1
        } else {
            0
        };
        // Carried state holds no autograd graph (the weights may be `Var`s):
        // a stream of any length keeps a constant amount of memory.
        self.buf = Some(
            buf.narrow(dim, n * self.stride, len - n * self.stride)?
                .detach(),
        );
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(buf.narrow(
            dim,
            0,
            (n - 1) * self.stride + self.span,
        )?))
    }

    pub(crate) fn reset(&mut self) {
        self.buf = None;
    }

    pub(crate) fn elements(&self) -> usize {
        self.buf.as_ref().map_or(0, Tensor::elem_count)
    }
}

/// Convolution as a gather (im2col through `index_select`) and one batched
/// matmul per group with contiguous operands.
///
/// candle 0.11.1's own convolutions are not used in training paths: on CPU,
/// the conv1d input gradient (computed by `conv_transpose1d`'s col2im path)
/// is wrong for batch > 1, and conv2d's backward fails for strides that do
/// not divide the input (see docs/layers.md). Every op here has a correct
/// backward, and per-axis strides and dilations come for free.
///
/// `x` `[batch, in, positions]` (spatial dims flattened, unpadded: padding
/// taps are [`PAD`] in `gather`, whose `idx` `[outputs * taps]` holds the
/// position read by tap `k` of output `p` at `p * taps + k`); `weight`
/// `[out, in / groups, taps]`. Returns
/// `[batch, out, outputs]`. With `act` the conv reads `act(x)` (a
/// pre-activation conv). On the CPU in f32/f64 one fused op with its own
/// backward computes it (`kernels::gather_conv`), never storing `act(x)`;
/// elsewhere candle ops ([`gather_conv_composed`]).
pub(crate) fn gather_conv(
    x: &Tensor,
    gather: &Gather,
    weight: &Tensor,
    bias: Option<&Tensor>,
    groups: usize,
    act: Option<Act>,
) -> Result<Tensor> {
    if crate::kernels::use_kernel("conv", x) && x.dtype() == weight.dtype() {
        return Ok(crate::kernels::gather_conv(
            x, gather, weight, bias, groups, act,
        )?);
    }
    let y = match act {
        Some(a) => {
            let x = crate::kernels::activation(x, a)?;
            gather_conv_composed(&x, gather, weight, groups)?
        }
        None => gather_conv_composed(x, gather, weight, groups)?,
    };
    Ok(match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1))?)?,
        None => y,
    })
}

/// [`gather_conv`] from candle ops (any device and dtype): `index_select`,
/// permutes and a batched matmul.
pub(crate) fn gather_conv_composed(
    x: &Tensor,
    gather: &Gather,
    weight: &Tensor,
    groups: usize,
) -> Result<Tensor> {
    let (b, _, len) = x.dims3()?;
    let (c_out, cg, k) = weight.dims3()?;
    if (len, k) != (gather.len, gather.k) {
        return Err(Error::shape(
            "gather_conv input and weight",
            format!("{} positions and {} taps", gather.len, gather.k),
            [len, k],
        ));
    }
    let (idx, outputs, g) = (&gather.idx, gather.outputs, groups);
    // A padding tap reads one zero appended to the input.
    let (x, idx) = if idx.contains(&PAD) {
        let idx: Vec<u32> = idx
            .iter()
            .map(|&i| if i == PAD { len as u32 } else { i })
            .collect();
        (x.pad_with_zeros(2, 0, 1)?, idx)
    } else {
        (x.clone(), idx.clone())
    };
    let idx = Tensor::from_vec(idx, (outputs * k,), x.device())?;
    let cols = x
        .contiguous()?
        .index_select(&idx, 2)? // [B, in, P * K]
        .reshape((b, g, cg, outputs, k))?
        .permute((1, 0, 3, 2, 4))? // [G, B, P, in/G, K]
        .contiguous()?
        .reshape((g, b * outputs, cg * k))?;
    let w = weight
        .reshape((g, c_out / g, cg * k))?
        .transpose(1, 2)?
        .contiguous()?; // [G, in/G * K, out/G]
    let y = cols.matmul(&w)?; // [G, B * P, out/G]
    Ok(y.reshape((g, b, outputs, c_out / g))?
        .permute((1, 0, 3, 2))?
        .contiguous()?
        .reshape((b, c_out, outputs))?)
}

/// A conv that can apply an activation as it reads its input.
pub(crate) trait PreActivated {
    /// The offline conv of `act(x)` (of `x` without `act`).
    fn forward_act(&self, x: &Tensor, act: Option<Act>) -> Result<Tensor>;

    /// The conv of `act.forward(x)`, in one fused op where `act` has a
    /// kernel (ELU, GELU, SiLU on the CPU): `act(x)` is never stored.
    fn forward_after(&self, act: &Activation, x: &Tensor) -> Result<Tensor> {
        match act.fused() {
            Some(a) => self.forward_act(x, Some(a)),
            None => self.forward_act(&act.forward(x)?, None),
        }
    }
}

/// The [`Gather`]s a layer has used, by input size and padding: a layer
/// sees few sizes, so its indices are built once (the oldest is dropped
/// past [`GatherCache::KEEP`] sizes; one of more than
/// [`GatherCache::MAX_TAPS`] taps, a long clip's, is built and dropped
/// each time rather than kept). Clones share the cache.
#[derive(Debug, Clone, Default)]
pub(crate) struct GatherCache(Arc<Mutex<Vec<GatherEntry>>>);

/// A [`GatherCache`] entry: the key (input size and padding) and its gather.
type GatherEntry = ([usize; 3], Arc<Gather>);

impl GatherCache {
    const KEEP: usize = 8;
    /// 4 MiB of indices.
    const MAX_TAPS: usize = 1 << 20;

    /// The gather of `key` over an input of `len` positions, from `build`
    /// (`(idx, outputs, taps)`) the first time. Fails, before building,
    /// on an input too long for `u32` positions.
    pub(crate) fn get(
        &self,
        key: [usize; 3],
        len: usize,
        build: impl FnOnce() -> (Vec<u32>, usize, usize),
    ) -> Result<Arc<Gather>> {
        if len >= PAD as usize {
            return Err(Error::shape(
                "conv input",
                format!("fewer than {PAD} positions (frequency x time)"),
                [len],
            ));
        }
        // A panic elsewhere leaves the entries valid: ignore the poison.
        let mut cache = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, g)) = cache.iter().find(|(k, _)| *k == key) {
            return Ok(g.clone());
        }
        let (idx, outputs, k) = build();
        let g = Arc::new(Gather::new(idx, outputs, k, len)?);
        if g.idx.len() > Self::MAX_TAPS {
            return Ok(g);
        }
        if cache.len() >= Self::KEEP {
            cache.remove(0);
        }
        cache.push((key, g.clone()));
        Ok(g)
    }
}

/// The gather index of a tap that falls on zero padding: it reads 0, so
/// no padded copy of the input (nor of its gradient) is ever made.
pub(crate) const PAD: u32 = u32::MAX;

/// Outputs of a conv with receptive field `span` over `padded` samples.
fn conv_outputs(padded: usize, span: usize, stride: usize) -> usize {
    if padded >= span {
        (padded - span) / stride + 1
    } else {
        0
    }
}

/// Gather indices of a 1-D conv over `len` samples with `left` and `right`
/// zeros padded around them: output `p`, tap `k` reads padded position
/// `p * stride + k * dilation`, i.e. sample `p * stride + k * dilation -
/// left`, or [`PAD`] where that is padding. Returns `(idx, outputs)`.
pub(crate) fn conv1d_indices(
    len: usize,
    (left, right): (usize, usize),
    kernel: usize,
    stride: usize,
    dilation: usize,
) -> (Vec<u32>, usize) {
    let span = (kernel - 1) * dilation + 1;
    let outputs = conv_outputs(left + len + right, span, stride);
    let idx = (0..outputs)
        .flat_map(|p| {
            (0..kernel).map(
                move |k| match (p * stride + k * dilation).checked_sub(left) {
                    Some(i) if i < len => i as u32,
                    _ => PAD,
                },
            )
        })
        .collect();
    (idx, outputs)
}

/// Configuration of [`Conv1d`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv1dConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel taps.
    pub kernel_size: usize,
    /// Step between output frames, in input frames.
    pub stride: usize,
    /// Spacing between kernel taps.
    pub dilation: usize,
    /// Channel groups; must divide both channel counts.
    pub groups: usize,
    /// Learn bias terms.
    pub bias: bool,
    /// Weight norm over each output channel (`weight_g` `[out, 1, 1]`).
    pub weight_norm: bool,
    /// Where the padding goes.
    pub padding: ConvPadding,
}

impl Conv1dConfig {
    /// A causal conv with stride 1, dilation 1, one group and a bias.
    pub fn causal(in_channels: usize, out_channels: usize, kernel_size: usize) -> Self {
        Self {
            in_channels,
            out_channels,
            kernel_size,
            stride: 1,
            dilation: 1,
            groups: 1,
            bias: true,
            weight_norm: false,
            padding: ConvPadding::Causal,
        }
    }

    /// Checks the fields; the error names the bad one.
    pub fn validate(&self) -> Result<()> {
        for (v, name) in [
            (self.in_channels, "conv.in_channels"),
            (self.out_channels, "conv.out_channels"),
            (self.kernel_size, "conv.kernel_size"),
            (self.stride, "conv.stride"),
            (self.dilation, "conv.dilation"),
            (self.groups, "conv.groups"),
        ] {
            ensure(v > 0, name, || "must be > 0".into())?;
        }
        ensure(
            self.in_channels % self.groups == 0 && self.out_channels % self.groups == 0,
            "conv.groups",
            || {
                format!(
                    "{} groups must divide {} in and {} out channels",
                    self.groups, self.in_channels, self.out_channels
                )
            },
        )
    }
}

/// 1-D convolution over `[batch, in_channels, time]` to
/// `[batch, out_channels, frames]`. Parameters: `weight`
/// `[out, in / groups, kernel]` (or `weight_g`, `weight_v`), `bias` `[out]`.
///
/// Output frames: causal `floor(time / stride)`; same `ceil(time / stride)`;
/// valid `floor((time - span) / stride) + 1` with span
/// `(kernel - 1) * dilation + 1`.
#[derive(Debug, Clone)]
pub struct Conv1d {
    cfg: Conv1dConfig,
    weight: Weight,
    bias: Option<Tensor>,
    stream: Option<CausalBuffer>,
    gathers: GatherCache,
}

impl Conv1d {
    /// Builds the conv; fails on an invalid config, naming the field.
    pub fn new(cfg: Conv1dConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let shape = [
            cfg.out_channels,
            cfg.in_channels / cfg.groups,
            cfg.kernel_size,
        ];
        let weight = Weight::new(&shape, cfg.weight_norm.then_some(0), &vb)?;
        let bias = conv_bias(
            cfg.bias,
            cfg.out_channels,
            cfg.in_channels / cfg.groups * cfg.kernel_size,
            &vb,
        )?;
        let stream = match cfg.padding {
            ConvPadding::Causal => Some(CausalBuffer::new(
                cfg.kernel_size,
                cfg.dilation,
                cfg.stride,
                "conv.stride",
            )?),
            _ => None,
        };
        Ok(Self {
            cfg,
            weight,
            bias,
            stream,
            gathers: GatherCache::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Conv1dConfig {
        &self.cfg
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> candle_core::DType {
        self.weight.dtype()
    }

    /// The device of the weights.
    pub fn device(&self) -> candle_core::Device {
        self.weight.device()
    }

    /// The convolution of `act(x)` (`x` without `act`) with `pad` (left,
    /// right) zeros around it.
    fn conv(&self, x: &Tensor, pad: (usize, usize), act: Option<Act>) -> Result<Tensor> {
        let (len, k) = (x.dim(2)?, self.cfg.kernel_size);
        let gather = self.gathers.get([len, pad.0, pad.1], len, || {
            let (idx, n) = conv1d_indices(len, pad, k, self.cfg.stride, self.cfg.dilation);
            (idx, n, k)
        })?;
        gather_conv(
            x,
            &gather,
            &self.weight.get()?,
            self.bias.as_ref(),
            self.cfg.groups,
            act,
        )
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        match x.dims() {
            [_, c, _] if *c == self.cfg.in_channels => Ok(()),
            d => Err(Error::shape(
                "conv1d input",
                format!("[batch, {}, time]", self.cfg.in_channels),
                d,
            )),
        }
    }

    /// Offline forward of `x` (`[batch, in_channels, time]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, None)
    }
}

impl PreActivated for Conv1d {
    fn forward_act(&self, x: &Tensor, act: Option<Act>) -> Result<Tensor> {
        self.check_input(x)?;
        let span = (self.cfg.kernel_size - 1) * self.cfg.dilation + 1;
        let (left, right) = match self.cfg.padding {
            ConvPadding::Causal => (span - self.cfg.stride, 0),
            ConvPadding::Same => ((span - 1) / 2, span - 1 - (span - 1) / 2),
            ConvPadding::Valid => (0, 0),
        };
        let t = x.dim(2)?;
        if t + left + right < span {
            return Err(Error::shape(
                "conv1d input",
                format!("at least {} frames", span - left - right),
                x.dims(),
            ));
        }
        self.conv(x, (left, right), act)
    }
}

impl Streaming for Conv1d {
    /// Chunks `[batch, in_channels, t]`; causal convs only.
    fn step(&mut self, chunk: &Tensor) -> Result<Option<Tensor>> {
        self.check_input(chunk)?;
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| Error::invalid("conv.padding", "only causal convs stream"))?;
        match stream.push(chunk, 2)? {
            Some(window) => Ok(Some(self.conv(&window, (0, 0), None)?)),
            None => Ok(None),
        }
    }

    fn reset(&mut self) {
        if let Some(s) = &mut self.stream {
            s.reset();
        }
    }

    fn state_elements(&self) -> usize {
        self.stream.as_ref().map_or(0, CausalBuffer::elements)
    }
}

/// Configuration of [`CausalConv2d`]: 2-D conv over `[batch, channels,
/// freq, time]`, "same" padded in frequency and causal in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// `(freq, time)`.
    pub kernel: (usize, usize),
    /// `(freq, time)`.
    pub stride: (usize, usize),
    /// `(freq, time)`.
    pub dilation: (usize, usize),
    /// Learn bias terms.
    pub bias: bool,
    /// Weight-norm parameterisation (`weight_g`, `weight_v`).
    pub weight_norm: bool,
}

impl Conv2dConfig {
    /// Stride 1, dilation 1, bias, no weight norm.
    pub fn new(in_channels: usize, out_channels: usize, kernel: (usize, usize)) -> Self {
        Self {
            in_channels,
            out_channels,
            kernel,
            stride: (1, 1),
            dilation: (1, 1),
            bias: true,
            weight_norm: false,
        }
    }
}

/// 2-D convolution causal in time, `[batch, in, freq, time]` to
/// `[batch, out, ceil(freq / stride_f), floor(time / stride_t)]`.
/// Parameters: `weight` `[out, in, kf, kt]` (or `weight_g`/`weight_v`), `bias`.
///
/// Strides and dilations are per axis.
#[derive(Debug, Clone)]
pub struct CausalConv2d {
    cfg: Conv2dConfig,
    weight: Weight,
    bias: Option<Tensor>,
    stream: CausalBuffer,
    gathers: GatherCache,
}

impl CausalConv2d {
    /// Builds the conv; fails on an invalid config, naming the field.
    pub fn new(cfg: Conv2dConfig, vb: VarBuilder) -> Result<Self> {
        let (kf, kt) = cfg.kernel;
        for (v, name) in [
            (cfg.in_channels, "conv2d.in_channels"),
            (cfg.out_channels, "conv2d.out_channels"),
            (kf.min(kt), "conv2d.kernel"),
            (cfg.stride.0.min(cfg.stride.1), "conv2d.stride"),
            (cfg.dilation.0.min(cfg.dilation.1), "conv2d.dilation"),
        ] {
            ensure(v > 0, name, || "must be > 0".into())?;
        }
        let shape = [cfg.out_channels, cfg.in_channels, kf, kt];
        let weight = Weight::new(&shape, cfg.weight_norm.then_some(0), &vb)?;
        let bias = conv_bias(cfg.bias, cfg.out_channels, cfg.in_channels * kf * kt, &vb)?;
        let stream = CausalBuffer::new(kt, cfg.dilation.1, cfg.stride.1, "conv2d.stride")?;
        Ok(Self {
            cfg,
            weight,
            bias,
            stream,
            gathers: GatherCache::default(),
        })
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        match x.dims() {
            [_, c, _, _] if *c == self.cfg.in_channels => Ok(()),
            d => Err(Error::shape(
                "conv2d input",
                format!("[batch, {}, freq, time]", self.cfg.in_channels),
                d,
            )),
        }
    }

    /// Of `act(x)` (`x` without `act`): valid in time after `time_pad`
    /// leading zeros; "same" in frequency.
    fn conv(&self, x: &Tensor, time_pad: usize, act: Option<Act>) -> Result<Tensor> {
        let (kf, kt) = self.cfg.kernel;
        let (sf, st) = self.cfg.stride;
        let (df, dt) = self.cfg.dilation;
        let span_f = (kf - 1) * df + 1;
        let (b, c, f, t) = x.dims4()?;
        let gather = self.gathers.get([f, t, time_pad], f * t, || {
            let freq_pad = ((span_f - 1) / 2, span_f - 1 - (span_f - 1) / 2);
            let (fi, fo) = conv1d_indices(f, freq_pad, kf, sf, df);
            let (ti, to) = conv1d_indices(t, (time_pad, 0), kt, st, dt);
            // Output (of, ot), tap (i, j) reads row fi[of * kf + i], column
            // ti[ot * kt + j].
            let mut idx = Vec::with_capacity(fo * to * kf * kt);
            for of in 0..fo {
                for ot in 0..to {
                    for i in 0..kf {
                        for j in 0..kt {
                            let (r, c) = (fi[of * kf + i], ti[ot * kt + j]);
                            idx.push(if r == PAD || c == PAD {
                                PAD
                            } else {
                                r * t as u32 + c
                            });
                        }
                    }
                }
            }
            (idx, fo * to, kf * kt)
        })?;
        let fo = conv_outputs(f + span_f - 1, span_f, sf);
        let to = conv_outputs(t + time_pad, (kt - 1) * dt + 1, st);
        let w = self
            .weight
            .get()?
            .reshape((self.cfg.out_channels, c, kf * kt))?;
        let y = gather_conv(
            &x.reshape((b, c, f * t))?,
            &gather,
            &w,
            self.bias.as_ref(),
            1,
            act,
        )?;
        Ok(y.reshape((b, self.cfg.out_channels, fo, to))?)
    }

    /// Offline forward of `x` (`[batch, in, freq, time]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, None)
    }
}

impl PreActivated for CausalConv2d {
    fn forward_act(&self, x: &Tensor, act: Option<Act>) -> Result<Tensor> {
        self.check_input(x)?;
        if x.dim(3)? < self.cfg.stride.1 {
            return Err(Error::shape(
                "conv2d input",
                format!("at least {} frames", self.cfg.stride.1),
                x.dims(),
            ));
        }
        self.conv(x, self.stream.pad, act)
    }
}

impl Streaming for CausalConv2d {
    /// Chunks `[batch, in, freq, t]`.
    fn step(&mut self, chunk: &Tensor) -> Result<Option<Tensor>> {
        self.check_input(chunk)?;
        match self.stream.push(chunk, 3)? {
            Some(window) => Ok(Some(self.conv(&window, 0, None)?)),
            None => Ok(None),
        }
    }

    fn reset(&mut self) {
        self.stream.reset();
    }

    fn state_elements(&self) -> usize {
        self.stream.elements()
    }
}

/// Configuration of [`Upsample`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpsampleConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel size, `>= stride`.
    pub kernel_size: usize,
    /// Upsampling factor.
    pub stride: usize,
    /// Learn bias terms.
    pub bias: bool,
    /// Weight norm over each input channel (torch's default dim 0 for
    /// `ConvTranspose1d`).
    pub weight_norm: bool,
    /// Trim the `kernel - stride` overlap from the right (causal, streams)
    /// or split it between both ends.
    pub causal: bool,
}

/// Transposed 1-D convolution with stride `s` that trains (candle's
/// `conv_transpose1d` has no backward): the same weights `[in, out, kernel]`
/// and the same result, computed as `s` polyphase convolutions interleaved in
/// time. `[batch, in, time]` to `[batch, out, time * stride]` (after trimming
/// the overlap); [`Upsample::forward_full`] gives the untrimmed
/// `(time - 1) * stride + kernel` samples.
#[derive(Debug, Clone)]
pub struct Upsample {
    cfg: UpsampleConfig,
    weight: Weight,
    bias: Option<Tensor>,
    gathers: GatherCache,
    /// Streaming: the overlap tail `[batch, out, kernel - stride]` (no bias).
    tail: Option<Tensor>,
}

impl Upsample {
    /// Builds the upsampler; fails on an invalid config, naming the field.
    pub fn new(cfg: UpsampleConfig, vb: VarBuilder) -> Result<Self> {
        for (v, name) in [
            (cfg.in_channels, "upsample.in_channels"),
            (cfg.out_channels, "upsample.out_channels"),
            (cfg.stride, "upsample.stride"),
        ] {
            ensure(v > 0, name, || "must be > 0".into())?;
        }
        ensure(
            cfg.kernel_size >= cfg.stride,
            "upsample.kernel_size",
            || format!("must be >= stride {}, got {}", cfg.stride, cfg.kernel_size),
        )?;
        let weight = Weight::new(
            &[cfg.in_channels, cfg.out_channels, cfg.kernel_size],
            cfg.weight_norm.then_some(0),
            &vb,
        )?;
        let bias = conv_bias(
            cfg.bias,
            cfg.out_channels,
            cfg.out_channels * cfg.kernel_size,
            &vb,
        )?;
        Ok(Self {
            cfg,
            weight,
            bias,
            tail: None,
            gathers: GatherCache::default(),
        })
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        match x.dims() {
            [_, c, t] if *c == self.cfg.in_channels && *t > 0 => Ok(()),
            d => Err(Error::shape(
                "upsample input",
                format!("[batch, {}, time >= 1]", self.cfg.in_channels),
                d,
            )),
        }
    }

    /// The weight `[in, out, kernel]` (effective, after weight norm).
    pub fn weight(&self) -> Result<Tensor> {
        self.weight.get()
    }

    /// Untrimmed transposed convolution without bias.
    fn transpose_conv(&self, x: &Tensor) -> Result<Tensor> {
        let (s, k, c_in, c_out) = (
            self.cfg.stride,
            self.cfg.kernel_size,
            self.cfg.in_channels,
            self.cfg.out_channels,
        );
        let m = k.div_ceil(s);
        let t = x.dim(2)?;
        // Polyphase kernels: phase r, tap m is w[.., r + m * s], time-reversed
        // for cross-correlation; laid out [out * s + r, in, m].
        let w = self
            .weight
            .get()?
            .pad_with_zeros(2, 0, m * s - k)?
            .reshape((c_in, c_out, m, s))?
            .permute((1, 3, 0, 2))?
            .contiguous()?;
        let rev: Vec<u32> = (0..m as u32).rev().collect();
        let w = w
            .index_select(&Tensor::from_vec(rev, m, x.device())?, 3)?
            .reshape((c_out * s, c_in, m))?;
        let gather = self.gathers.get([t, 0, 0], t, || {
            let (idx, n) = conv1d_indices(t, (m - 1, m - 1), m, 1, 1);
            (idx, n, m)
        })?;
        let z = gather_conv(x, &gather, &w, None, 1, None)?; // [B, out * s, t + m - 1]
        let (b, _, q) = z.dims3()?;
        let y = z
            .reshape((b, c_out, s, q))?
            .transpose(2, 3)?
            .reshape((b, c_out, q * s))?;
        Ok(y.narrow(2, 0, (t - 1) * s + k)?)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1))?)?,
            None => y,
        })
    }

    /// The full transposed convolution of `x` (`[batch, in, time]`):
    /// `[batch, out, (time - 1) * stride + kernel]`, equal to
    /// `x.conv_transpose1d(weight, 0, 0, stride, 1, 1)` plus bias.
    pub fn forward_full(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        self.add_bias(self.transpose_conv(x)?)
    }

    /// `[batch, in, time]` to `[batch, out, time * stride]`: the full output
    /// with the `kernel - stride` overlap trimmed (right if causal, else split
    /// with the larger half on the left).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_full(x)?;
        let extra = self.cfg.kernel_size - self.cfg.stride;
        let left = if self.cfg.causal {
            0
        } else {
            extra - extra / 2
        };
        Ok(y.narrow(2, left, x.dim(2)? * self.cfg.stride)?)
    }
}

impl Streaming for Upsample {
    /// Chunks `[batch, in, t]` give `[batch, out, t * stride]` (causal only).
    fn step(&mut self, chunk: &Tensor) -> Result<Option<Tensor>> {
        self.check_input(chunk)?;
        ensure(self.cfg.causal, "upsample.causal", || {
            "only causal upsamplers stream".into()
        })?;
        let y = self.transpose_conv(chunk)?;
        let extra = self.cfg.kernel_size - self.cfg.stride;
        let y = match self.tail.take() {
            Some(tail) => {
                let head = (y.narrow(2, 0, extra)? + tail)?;
                Tensor::cat(&[&head, &y.narrow(2, extra, y.dim(2)? - extra)?], 2)?
            }
            None => y,
        };
        let n = chunk.dim(2)? * self.cfg.stride;
        if extra > 0 {
            self.tail = Some(y.narrow(2, n, extra)?.detach());
        }
        Ok(Some(self.add_bias(y.narrow(2, 0, n)?)?))
    }

    fn reset(&mut self) {
        self.tail = None;
    }

    fn state_elements(&self) -> usize {
        self.tail.as_ref().map_or(0, Tensor::elem_count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_module, max_abs_diff, noise, stream_in_chunks};
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    fn vb(vm: &VarMap, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_varmap(vm, dtype, &Device::Cpu)
    }

    fn grad_check(vm: &VarMap, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) {
        let x = Var::from_tensor(x).unwrap();
        check_module(vm, 0.5, 3, &[("input", &x)], || f(x.as_tensor())).unwrap();
    }

    fn conv1d(cfg: Conv1dConfig, dtype: DType) -> (VarMap, Conv1d) {
        let vm = VarMap::new();
        let c = Conv1d::new(cfg, vb(&vm, dtype)).unwrap();
        (vm, c)
    }

    #[test]
    fn conv1d_gradients() {
        let cases = [
            Conv1dConfig {
                dilation: 2,
                groups: 2,
                ..Conv1dConfig::causal(4, 6, 3)
            },
            Conv1dConfig {
                stride: 2,
                weight_norm: true,
                ..Conv1dConfig::causal(3, 2, 4)
            },
            Conv1dConfig {
                padding: ConvPadding::Same,
                weight_norm: true,
                bias: false,
                ..Conv1dConfig::causal(2, 3, 5)
            },
        ];
        for cfg in cases {
            let (vm, c) = conv1d(cfg, DType::F64);
            grad_check(&vm, &noise(&[2, cfg.in_channels, 11], 1).unwrap(), |x| {
                c.forward(x)
            });
        }
    }

    #[test]
    fn conv1d_frame_counts_and_causality() {
        let (_, same) = conv1d(
            Conv1dConfig {
                padding: ConvPadding::Same,
                stride: 2,
                ..Conv1dConfig::causal(1, 1, 5)
            },
            DType::F32,
        );
        let x = noise(&[1, 1, 11], 2).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(same.forward(&x).unwrap().dims(), &[1, 1, 6]);
        let (_, causal) = conv1d(
            Conv1dConfig {
                stride: 2,
                dilation: 2,
                ..Conv1dConfig::causal(1, 1, 3)
            },
            DType::F32,
        );
        let y = causal.forward(&x).unwrap();
        assert_eq!(y.dims(), &[1, 1, 5]);
        // Frame j depends on inputs up to 2j + 1 only.
        let mut x2 = x.to_vec3::<f32>().unwrap();
        x2[0][0][7] += 1.0;
        let y2 = causal
            .forward(&Tensor::new(x2, &Device::Cpu).unwrap())
            .unwrap();
        let (a, b) = (y.to_vec3::<f32>().unwrap(), y2.to_vec3::<f32>().unwrap());
        assert_eq!(a[0][0][..3], b[0][0][..3]);
        assert_ne!(a[0][0][3], b[0][0][3]);
    }

    #[test]
    fn conv1d_streams() {
        for (cfg, seed) in [
            (
                Conv1dConfig {
                    dilation: 3,
                    ..Conv1dConfig::causal(3, 4, 5)
                },
                1,
            ),
            (
                Conv1dConfig {
                    stride: 4,
                    ..Conv1dConfig::causal(2, 3, 8)
                },
                2,
            ),
            (
                Conv1dConfig {
                    stride: 2,
                    dilation: 2,
                    weight_norm: true,
                    ..Conv1dConfig::causal(2, 2, 3)
                },
                3,
            ),
            (Conv1dConfig::causal(2, 2, 1), 4),
        ] {
            let (_, mut c) = conv1d(cfg, DType::F32);
            let x = noise(&[2, cfg.in_channels, 67], seed)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let offline = c.forward(&x).unwrap();
            for chunk_seed in 0..3 {
                let streamed = stream_in_chunks(&mut c, &x, 2, 9, chunk_seed).unwrap();
                assert!(max_abs_diff(&offline, &streamed).unwrap() < 1e-5, "{cfg:?}");
            }
        }
    }

    #[test]
    fn conv1d_bad_config_and_input() {
        let vm = VarMap::new();
        let e = Conv1d::new(
            Conv1dConfig {
                stride: 4,
                ..Conv1dConfig::causal(1, 1, 2)
            },
            vb(&vm, DType::F32),
        )
        .unwrap_err();
        assert!(e.to_string().contains("conv.stride"), "{e}");
        let e = Conv1d::new(
            Conv1dConfig {
                groups: 2,
                ..Conv1dConfig::causal(3, 4, 2)
            },
            vb(&vm, DType::F32),
        )
        .unwrap_err();
        assert!(e.to_string().contains("conv.groups"), "{e}");
        let (_, c) = conv1d(Conv1dConfig::causal(3, 4, 2), DType::F32);
        let e = c
            .forward(&Tensor::zeros((1, 2, 5), DType::F32, &Device::Cpu).unwrap())
            .unwrap_err();
        assert!(
            e.to_string().contains("[batch, 3, time]") && e.to_string().contains("[1, 2, 5]"),
            "{e}"
        );
        let (_, mut same) = conv1d(
            Conv1dConfig {
                padding: ConvPadding::Same,
                ..Conv1dConfig::causal(3, 4, 2)
            },
            DType::F32,
        );
        let e = same
            .step(&Tensor::zeros((1, 3, 5), DType::F32, &Device::Cpu).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("only causal"), "{e}");
    }

    #[test]
    fn conv2d_gradients_and_streaming() {
        let cases = [
            Conv2dConfig::new(2, 3, (3, 3)),
            Conv2dConfig {
                stride: (2, 1),
                dilation: (1, 2),
                weight_norm: true,
                ..Conv2dConfig::new(2, 2, (3, 2))
            },
            Conv2dConfig {
                stride: (1, 2),
                ..Conv2dConfig::new(1, 2, (3, 4))
            },
        ];
        for (i, cfg) in cases.into_iter().enumerate() {
            let vm = VarMap::new();
            let c = CausalConv2d::new(cfg, vb(&vm, DType::F64)).unwrap();
            grad_check(&vm, &noise(&[2, cfg.in_channels, 5, 7], 5).unwrap(), |x| {
                c.forward(x)
            });
            let vm = VarMap::new();
            let mut c = CausalConv2d::new(cfg, vb(&vm, DType::F32)).unwrap();
            let x = noise(&[2, cfg.in_channels, 6, 41], 6)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let offline = c.forward(&x).unwrap();
            assert_eq!(offline.dim(2).unwrap(), 6usize.div_ceil(cfg.stride.0));
            assert_eq!(offline.dim(3).unwrap(), 41 / cfg.stride.1);
            let streamed = stream_in_chunks(&mut c, &x, 3, 7, i as u64).unwrap();
            assert!(max_abs_diff(&offline, &streamed).unwrap() < 1e-5, "{cfg:?}");
        }
    }

    /// A size seen before reuses its gather; past `KEEP` sizes the oldest
    /// is rebuilt; a gather over `MAX_TAPS` is never kept.
    #[test]
    fn gather_cache_reuses_and_bounds() {
        let cache = GatherCache::default();
        let small = |n: usize| move || (vec![0; n], n, 1);
        let a = cache.get([1, 0, 0], 1, small(3)).unwrap();
        assert!(Arc::ptr_eq(&a, &cache.get([1, 0, 0], 1, small(3)).unwrap()));
        assert!(!Arc::ptr_eq(
            &a,
            &cache.get([2, 0, 0], 1, small(3)).unwrap()
        ));
        for n in 3..3 + GatherCache::KEEP {
            cache.get([n, 0, 0], 1, small(1)).unwrap();
        }
        assert!(!Arc::ptr_eq(
            &a,
            &cache.get([1, 0, 0], 1, small(3)).unwrap()
        ));
        let n = GatherCache::MAX_TAPS + 1;
        let big = cache.get([0, 0, 1], 1, small(n)).unwrap();
        assert!(!Arc::ptr_eq(
            &big,
            &cache.get([0, 0, 1], 1, small(n)).unwrap()
        ));
        // Bad indices are refused, naming the op; an input too long for
        // u32 positions is refused before anything is built.
        let e = cache.get([0, 1, 0], 1, || (vec![5], 1, 1)).unwrap_err();
        assert!(e.to_string().contains("gather_conv"), "{e}");
        let e = cache
            .get([0, 2, 0], u32::MAX as usize, || unreachable!("not built"))
            .unwrap_err();
        assert!(e.to_string().contains("conv input"), "{e}");
    }

    #[test]
    fn conv2d_unequal_dilation_equals_explicit_kernel() {
        // Dilation (1, 2) through the zero-stuffed kernel equals a conv with
        // the stuffed kernel written out by hand.
        let vm = VarMap::new();
        let cfg = Conv2dConfig {
            dilation: (1, 2),
            bias: false,
            ..Conv2dConfig::new(1, 1, (1, 2))
        };
        let c = CausalConv2d::new(cfg, vb(&vm, DType::F32)).unwrap();
        let w = c
            .weight
            .get()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let x: Vec<f32> = (0..6).map(|i| i as f32 + 1.0).collect();
        let y = c
            .forward(&Tensor::from_vec(x.clone(), (1, 1, 1, 6), &Device::Cpu).unwrap())
            .unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for t in 0..6 {
            let past = if t >= 2 { x[t - 2] } else { 0.0 };
            assert!((y[t] - (w[0] * past + w[1] * x[t])).abs() < 1e-5, "t={t}");
        }
    }

    fn upsample(cfg: UpsampleConfig, dtype: DType) -> (VarMap, Upsample) {
        let vm = VarMap::new();
        let u = Upsample::new(cfg, vb(&vm, dtype)).unwrap();
        (vm, u)
    }

    fn up_cfg(k: usize, s: usize) -> UpsampleConfig {
        UpsampleConfig {
            in_channels: 3,
            out_channels: 2,
            kernel_size: k,
            stride: s,
            bias: true,
            weight_norm: false,
            causal: true,
        }
    }

    #[test]
    fn upsample_equals_conv_transpose1d() {
        for (k, s) in [(4, 2), (5, 2), (8, 4), (3, 3), (7, 3), (16, 8)] {
            let (_, u) = upsample(
                UpsampleConfig {
                    bias: false,
                    ..up_cfg(k, s)
                },
                DType::F32,
            );
            let x = noise(&[2, 3, 9], 7).unwrap().to_dtype(DType::F32).unwrap();
            let ours = u.forward_full(&x).unwrap();
            // Reference per batch item: candle 0.11.1's batched CPU
            // conv_transpose1d is wrong for batch > 1 (docs/layers.md).
            let w = u.weight().unwrap();
            let items: Vec<Tensor> = (0..2)
                .map(|i| {
                    x.narrow(0, i, 1)
                        .unwrap()
                        .conv_transpose1d(&w, 0, 0, s, 1, 1)
                        .unwrap()
                })
                .collect();
            let reference = Tensor::cat(&items, 0).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            assert!(
                max_abs_diff(&ours, &reference).unwrap() < 1e-5,
                "k={k} s={s}"
            );
        }
    }

    #[test]
    fn upsample_gradients() {
        for cfg in [
            up_cfg(4, 2),
            UpsampleConfig {
                weight_norm: true,
                causal: false,
                ..up_cfg(5, 3)
            },
        ] {
            let (vm, u) = upsample(cfg, DType::F64);
            grad_check(&vm, &noise(&[2, 3, 5], 8).unwrap(), |x| u.forward(x));
        }
    }

    #[test]
    fn upsample_streams_and_trims() {
        for (k, s) in [(4, 2), (7, 3), (2, 2)] {
            let (_, mut u) = upsample(up_cfg(k, s), DType::F32);
            let x = noise(&[2, 3, 29], 9).unwrap().to_dtype(DType::F32).unwrap();
            let offline = u.forward(&x).unwrap();
            assert_eq!(offline.dim(2).unwrap(), 29 * s);
            let streamed = stream_in_chunks(&mut u, &x, 2, 6, k as u64).unwrap();
            assert!(
                max_abs_diff(&offline, &streamed).unwrap() < 1e-5,
                "k={k} s={s}"
            );
        }
        let vm = VarMap::new();
        let e = Upsample::new(up_cfg(1, 2), vb(&vm, DType::F32)).unwrap_err();
        assert!(e.to_string().contains("upsample.kernel_size"), "{e}");
    }
}
