//! The causal Convformer encoder of the mel VAE: log-mel `[batch, mel, frames]`
//! to the mean and log-variance of a Gaussian latent
//! `[batch, frames / C, latent_dim]`, causal in time and streaming.

use candle_core::{Tensor, D};
use candle_nn::{Module, VarBuilder};
use melvae_layers::Linear;
use melvae_layers::{
    flops, ActivationKind, AttentionConfig, BlockConfig, CausalConv2d, Conv2dConfig, DecoderLayer,
    FeedForwardConfig, FfnActivation, LayerNorm, Mode, ResidualUnit2d, Streaming,
};
use serde::{Deserialize, Serialize};

use crate::error::ensure;
use crate::{Error, Result};

/// The `convformer:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvformerConfig {
    /// Mel bands of the input (`vocos-24k`: 100).
    pub mel_channels: usize,
    /// Time compression C: a power of two, 4 to 32.
    #[serde(rename = "compress_factor_C")]
    pub compress_factor: usize,
    /// Channels of the 2-D conv stack.
    pub channels: usize,
    /// Residual blocks per downsampling stage.
    pub n_residual_blocks: usize,
    /// Width of the transformer tail.
    pub tf_dim: usize,
    /// Attention heads of the tail.
    pub tf_heads: usize,
    /// Layers of the tail.
    pub tf_layers: usize,
    /// Past positions of the tail's causal attention, itself included
    /// (latent frames, `frames / C`): each latent frame attends to at most
    /// this many, in training, offline and streaming alike, so a stream
    /// costs constant memory and time per chunk. The reference value (and
    /// `configs/defaults/convformer.yaml`) is 256, 21.8 s of audio at C = 8
    /// (`vocos-24k`); `None`, also what a config without the key means,
    /// attends to the whole past (as models trained before the key existed;
    /// their streams grow without bound).
    #[serde(default)]
    pub tf_context: Option<usize>,
    /// Dropout of the tail (training).
    pub drop_p: f64,
    /// Latent size.
    pub latent_dim: usize,
    /// Final weight of the KL term of the VAE loss.
    #[serde(default = "default_kl_weight")]
    pub kl_loss_weight: f64,
    /// Steps of the linear KL warm-up from 0.
    #[serde(default = "default_kl_warmup")]
    pub kl_loss_warmup_steps: u64,
}

fn default_kl_weight() -> f64 {
    1e-3
}

fn default_kl_warmup() -> u64 {
    1000
}

impl Default for ConvformerConfig {
    /// The reference configuration: C 8, 32 channels, 3 residual blocks,
    /// tail 512 wide with 8 heads and 4 layers, dropout 0.1, latent 64.
    fn default() -> Self {
        Self {
            mel_channels: 100,
            compress_factor: 8,
            channels: 32,
            n_residual_blocks: 3,
            tf_dim: 512,
            tf_heads: 8,
            tf_layers: 4,
            tf_context: Some(256),
            drop_p: 0.1,
            latent_dim: 64,
            kl_loss_weight: 1e-3,
            kl_loss_warmup_steps: 1000,
        }
    }
}

impl ConvformerConfig {
    /// Checks every field; the error names it (`convformer.<field>`).
    pub fn validate(&self) -> Result<()> {
        let c = self.compress_factor;
        ensure(
            c.is_power_of_two() && (4..=32).contains(&c),
            "convformer.compress_factor_C",
            || format!("must be a power of two in 4..=32 (4, 8, 16 or 32), got {c}"),
        )?;
        for (v, f) in [
            (self.mel_channels, "convformer.mel_channels"),
            (self.channels, "convformer.channels"),
            (self.tf_dim, "convformer.tf_dim"),
            (self.tf_layers, "convformer.tf_layers"),
            (self.latent_dim, "convformer.latent_dim"),
        ] {
            ensure(v > 0, f, || "must be > 0".into())?;
        }
        ensure(
            self.tf_heads > 0 && self.tf_dim % self.tf_heads == 0,
            "convformer.tf_heads",
            || format!("{} heads must divide tf_dim {}", self.tf_heads, self.tf_dim),
        )?;
        ensure(
            (self.tf_dim / self.tf_heads.max(1)) % 2 == 0,
            "convformer.tf_heads",
            || "the head size tf_dim / tf_heads must be even (rotary positions)".into(),
        )?;
        ensure(self.tf_context != Some(0), "convformer.tf_context", || {
            "must be > 0 (or null for an unbounded past)".into()
        })?;
        ensure(
            (0.0..1.0).contains(&self.drop_p),
            "convformer.drop_p",
            || format!("must be in [0, 1), got {}", self.drop_p),
        )
    }

    /// Downsampling stages, `log2(C)`.
    pub fn stages(&self) -> usize {
        self.compress_factor.trailing_zeros() as usize
    }

    /// Frequency bins left after the stages (each halves, rounding up).
    pub fn collapsed_freq(&self) -> usize {
        (0..self.stages()).fold(self.mel_channels, |f, _| f.div_ceil(2))
    }

    /// The transformer tail's layer: causal pre-norm, rotary, GELU
    /// feed-forward of `4 * tf_dim`.
    pub fn block_config(&self) -> BlockConfig {
        BlockConfig {
            attention: AttentionConfig {
                causal: true,
                window: self.tf_context,
                bias: true,
                rotary_base: Some(10000.0),
                dropout: self.drop_p,
                ..AttentionConfig::new(self.tf_dim, self.tf_heads)
            },
            ffn: FeedForwardConfig {
                hidden: 4 * self.tf_dim,
                activation: FfnActivation::Gelu,
                dropout: self.drop_p,
                bias: true,
                dim: self.tf_dim,
            },
            dropout: self.drop_p,
            norm_eps: 1e-5,
        }
    }

    /// Model FLOPs of [`ConvformerEncoder::forward`] on `[batch, mel,
    /// frames]` (the convention of [`melvae_layers::flops`]).
    pub fn forward_flops(&self, batch: usize, frames: usize) -> f64 {
        let ch = self.channels;
        let unit = |hw| {
            flops::conv2d(batch, ch, ch, UNIT_KERNEL, hw) + flops::conv2d(batch, ch, ch, (1, 1), hw)
        };
        let mut hw = (self.mel_channels, frames);
        let mut total = flops::conv2d(batch, 1, ch, UNIT_KERNEL, hw)
            + CONTEXT_DILATIONS.len() as f64 * unit(hw);
        for _ in 0..self.stages() {
            hw = (hw.0.div_ceil(2), hw.1 / 2);
            total += flops::conv2d(batch, ch, ch, DOWN_KERNEL, hw)
                + self.n_residual_blocks as f64 * unit(hw);
        }
        let rows = batch * hw.1;
        total
            + flops::linear(rows, ch * hw.0, self.tf_dim)
            + self.tf_layers as f64 * flops::block(&self.block_config(), batch, hw.1)
            + flops::linear(rows, self.tf_dim, 2 * self.latent_dim)
    }
}

/// One downsampling stage: a causal conv with stride 2 in time and
/// frequency, then residual blocks.
#[derive(Debug, Clone)]
struct Stage {
    down: CausalConv2d,
    blocks: Vec<ResidualUnit2d>,
}

/// The causal Convformer encoder.
///
/// Parameters: `input`, `context.{0,1,2}`, `stages.{i}.down`,
/// `stages.{i}.blocks.{j}`, `collapse`, `tail.{k}`, `tail_norm`, `out`
/// (zero-initialised).
#[derive(Debug, Clone)]
pub struct ConvformerEncoder {
    cfg: ConvformerConfig,
    input: CausalConv2d,
    context: Vec<ResidualUnit2d>,
    stages: Vec<Stage>,
    collapse: Linear,
    tail: Vec<DecoderLayer>,
    tail_norm: LayerNorm,
    out: Linear,
}

const ACT: ActivationKind = ActivationKind::Silu;
/// `(freq, time)` kernel of the input conv and of the first conv of each
/// residual unit (the second is 1 x 1).
const UNIT_KERNEL: (usize, usize) = (3, 3);
/// Time dilations of the residual units before the first stage.
const CONTEXT_DILATIONS: [usize; 3] = [1, 2, 4];
/// `(freq, time)` kernel of the stride-2 downsampling convs.
const DOWN_KERNEL: (usize, usize) = (3, 4);

impl ConvformerEncoder {
    /// Builds the encoder; fails on an invalid config, naming the field.
    pub fn new(cfg: ConvformerConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let ch = cfg.channels;
        let input = CausalConv2d::new(Conv2dConfig::new(1, ch, (3, 3)), vb.pp("input"))?;
        let context = CONTEXT_DILATIONS
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                ResidualUnit2d::new(ch, UNIT_KERNEL, d, ACT, false, vb.pp("context").pp(i))
            })
            .collect::<melvae_layers::Result<_>>()?;
        let stages = (0..cfg.stages())
            .map(|i| -> Result<Stage> {
                let vs = vb.pp("stages").pp(i);
                let down = CausalConv2d::new(
                    Conv2dConfig {
                        stride: (2, 2),
                        ..Conv2dConfig::new(ch, ch, DOWN_KERNEL)
                    },
                    vs.pp("down"),
                )?;
                let blocks = (0..cfg.n_residual_blocks)
                    .map(|j| {
                        ResidualUnit2d::new(ch, UNIT_KERNEL, 1, ACT, false, vs.pp("blocks").pp(j))
                    })
                    .collect::<melvae_layers::Result<_>>()?;
                Ok(Stage { down, blocks })
            })
            .collect::<Result<_>>()?;
        let collapse =
            melvae_layers::linear(ch * cfg.collapsed_freq(), cfg.tf_dim, vb.pp("collapse"))?;
        let block = cfg.block_config();
        let tail = (0..cfg.tf_layers)
            .map(|k| DecoderLayer::new(block, None, vb.pp("tail").pp(k)))
            .collect::<melvae_layers::Result<_>>()?;
        // A final norm on the pre-norm residual stream, and a zero-initialised
        // head: the posterior starts at N(0, 1) whatever the stack's scale.
        let tail_norm = LayerNorm::new(cfg.tf_dim, 1e-5, true, vb.pp("tail_norm"))?;
        let vo = vb.pp("out");
        let out = Linear::new(
            vo.get_with_hints(
                (2 * cfg.latent_dim, cfg.tf_dim),
                "weight",
                candle_nn::Init::Const(0.0),
            )?,
            Some(vo.get_with_hints(2 * cfg.latent_dim, "bias", candle_nn::Init::Const(0.0))?),
        );
        Ok(Self {
            cfg,
            input,
            context,
            stages,
            collapse,
            tail,
            tail_norm,
            out,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ConvformerConfig {
        &self.cfg
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> candle_core::DType {
        self.collapse.weight().dtype()
    }

    fn check(&self, mel: &Tensor) -> Result<()> {
        match mel.dims() {
            [_, m, _] if *m == self.cfg.mel_channels => Ok(()),
            d => Err(Error::Shape {
                what: "convformer input".into(),
                expected: format!("[batch, {}, frames]", self.cfg.mel_channels),
                got: format!("{d:?}"),
            }),
        }
    }

    /// `[B, ch, F', t] -> [B, t, tf_dim]`: frequency folded into channels.
    fn collapse(&self, h: &Tensor) -> Result<Tensor> {
        let (b, c, f, t) = h.dims4()?;
        let h = h.permute((0, 3, 1, 2))?.reshape((b, t, c * f))?;
        Ok(self.collapse.forward(&h)?)
    }

    fn head(&self, h: &Tensor) -> Result<(Tensor, Tensor)> {
        let o = self.out.forward(&self.tail_norm.forward(h)?)?;
        let l = self.cfg.latent_dim;
        Ok((
            o.narrow(D::Minus1, 0, l)?.contiguous()?,
            o.narrow(D::Minus1, l, l)?.contiguous()?,
        ))
    }

    /// `mel` `[batch, mel_channels, frames]` (frames a multiple of C) to
    /// `(mean, logvar)`, each `[batch, frames / C, latent_dim]`. Latent `t`
    /// depends only on frames `< (t + 1) C` (and, through the tail's
    /// window, on frames `>= (t + 1 - tf_context) C` minus the conv stack's
    /// receptive field). `mode` switches dropout on in training.
    pub fn forward(&self, mel: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        self.check(mel)?;
        let t = mel.dim(2)?;
        let c = self.cfg.compress_factor;
        if t == 0 || t % c != 0 {
            return Err(Error::Shape {
                what: "convformer input".into(),
                expected: format!("a multiple of compress_factor_C = {c} frames"),
                got: format!("{t} frames"),
            });
        }
        let mut h = melvae_layers::act::silu(&self.input.forward(&mel.unsqueeze(1)?)?)?;
        for u in &self.context {
            h = u.forward(&h)?;
        }
        for s in &self.stages {
            h = s.down.forward(&h)?;
            for u in &s.blocks {
                h = u.forward(&h)?;
            }
        }
        let mut x = self.collapse(&h)?;
        for l in &self.tail {
            x = l.forward(&x, None, None, mode)?;
        }
        self.head(&x)
    }
}

impl Streaming for ConvformerEncoder {
    /// Mel frames `[batch, mel_channels, t]` (any `t >= 1`) to the latent
    /// frames that became final, `mean` and `logvar` concatenated on the
    /// last axis: `[batch, n, 2 * latent_dim]`.
    fn step(&mut self, chunk: &Tensor) -> melvae_layers::Result<Option<Tensor>> {
        let none = |e: Error| melvae_layers::Error::Invalid {
            what: "convformer stream".into(),
            reason: e.to_string(),
        };
        self.check(chunk).map_err(none)?;
        let Some(mut h) = self.input.step(&chunk.unsqueeze(1)?)? else {
            return Ok(None);
        };
        h = melvae_layers::act::silu(&h)?;
        for u in &mut self.context {
            match u.step(&h)? {
                Some(y) => h = y,
                None => return Ok(None),
            }
        }
        for s in &mut self.stages {
            match s.down.step(&h)? {
                Some(y) => h = y,
                None => return Ok(None),
            }
            for u in &mut s.blocks {
                match u.step(&h)? {
                    Some(y) => h = y,
                    None => return Ok(None),
                }
            }
        }
        let mut x = self.collapse(&h).map_err(none)?;
        for l in &mut self.tail {
            x = l.forward_cached(&x, None)?;
        }
        let (m, v) = self.head(&x).map_err(none)?;
        Ok(Some(Tensor::cat(&[m, v], D::Minus1)?))
    }

    fn reset(&mut self) {
        self.input.reset();
        for u in &mut self.context {
            u.reset();
        }
        for s in &mut self.stages {
            s.down.reset();
            for u in &mut s.blocks {
                u.reset();
            }
        }
        for l in &mut self.tail {
            l.clear_cache();
        }
    }

    fn state_elements(&self) -> usize {
        self.input.state_elements()
            + self
                .context
                .iter()
                .map(Streaming::state_elements)
                .sum::<usize>()
            + self
                .stages
                .iter()
                .map(|s| {
                    s.down.state_elements()
                        + s.blocks
                            .iter()
                            .map(Streaming::state_elements)
                            .sum::<usize>()
                })
                .sum::<usize>()
            + self
                .tail
                .iter()
                .map(DecoderLayer::cache_elements)
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;
    use melvae_layers::testing::{
        check_module, max_abs_diff, noise, randomize, stream_in_chunks_to,
    };

    fn tiny(c: usize) -> ConvformerConfig {
        ConvformerConfig {
            mel_channels: 12,
            compress_factor: c,
            channels: 3,
            n_residual_blocks: 1,
            tf_dim: 8,
            tf_heads: 2,
            tf_layers: 1,
            tf_context: Some(256),
            drop_p: 0.0,
            latent_dim: 4,
            kl_loss_weight: 1e-3,
            kl_loss_warmup_steps: 10,
        }
    }

    fn build(cfg: ConvformerConfig, dtype: DType) -> (VarMap, ConvformerEncoder) {
        let vm = VarMap::new();
        let e =
            ConvformerEncoder::new(cfg, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
        randomize(&vm, 0.3, 7).unwrap();
        (vm, e)
    }

    fn mel(t: usize, seed: u64) -> Tensor {
        noise(&[2, 12, t], seed)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    #[test]
    fn shapes_for_every_c() {
        for c in [4, 8, 16, 32] {
            let (_, e) = build(tiny(c), DType::F32);
            let (m, v) = e.forward(&mel(2 * c, 1), Mode::Eval).unwrap();
            assert_eq!(m.dims(), &[2, 2, 4], "C={c}");
            assert_eq!(v.dims(), &[2, 2, 4]);
        }
    }

    #[test]
    fn causal_in_time() {
        let (_, e) = build(tiny(8), DType::F32);
        let x = mel(40, 2);
        let (m, _) = e.forward(&x, Mode::Eval).unwrap();
        // Change frames from 24 on: latents 0..3 (frames < 24) must not move.
        let junk = (noise(&[2, 12, 16], 9)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            * 5.0)
            .unwrap();
        let y = x.slice_assign(&[0..2, 0..12, 24..40], &junk).unwrap();
        let (m2, _) = e.forward(&y, Mode::Eval).unwrap();
        let first = |t: &Tensor| t.narrow(1, 0, 3).unwrap();
        assert!(max_abs_diff(&first(&m), &first(&m2)).unwrap() < 1e-6);
        assert!(
            max_abs_diff(&m.narrow(1, 3, 1).unwrap(), &m2.narrow(1, 3, 1).unwrap()).unwrap() > 1e-4,
            "latent 3 sees frame 24"
        );
    }

    #[test]
    fn streaming_equals_offline() {
        for c in [4, 8] {
            let (_, mut e) = build(tiny(c), DType::F32);
            let x = mel(8 * c, 3);
            let (m, v) = e.forward(&x, Mode::Eval).unwrap();
            let offline = Tensor::cat(&[m, v], D::Minus1).unwrap();
            for seed in 0..3 {
                let streamed = stream_in_chunks_to(&mut e, &x, 2, 1, 7, seed).unwrap();
                assert!(
                    max_abs_diff(&offline, &streamed).unwrap() < 1e-5,
                    "C={c} seed {seed}"
                );
            }
        }
    }

    #[test]
    fn streams_longer_than_the_window_hold_no_graph_and_reset() {
        // A tail window of 3 latent frames, inputs of 8: chunked == offline.
        let cfg = ConvformerConfig {
            tf_context: Some(3),
            ..tiny(4)
        };
        let (_, mut e) = build(cfg, DType::F32);
        let x = mel(32, 3);
        let (m, v) = e.forward(&x, Mode::Eval).unwrap();
        let offline = Tensor::cat(&[m, v], D::Minus1).unwrap();
        let streamed = stream_in_chunks_to(&mut e, &x, 2, 1, 5, 1).unwrap();
        assert!(max_abs_diff(&offline, &streamed).unwrap() < 1e-5);
        // The window matters: without it, the last latents differ.
        let (_, unbounded) = build(tiny(4), DType::F32);
        let (m2, _) = unbounded.forward(&x, Mode::Eval).unwrap();
        let last = |t: &Tensor| t.narrow(1, 7, 1).unwrap();
        let (m, _) = e.forward(&x, Mode::Eval).unwrap();
        assert!(max_abs_diff(&last(&m), &last(&m2)).unwrap() > 1e-6);
        // Outputs of a stream from variables are tracked, the carried state
        // is not: after a step, nothing the encoder holds tracks an op.
        let y = e.step(&x.narrow(2, 0, 8).unwrap()).unwrap().unwrap();
        assert!(y.track_op());
        // Reset forgets everything: a new stream equals a fresh offline run,
        // and each item of a batch of streams equals its own offline run.
        e.reset();
        let other = mel(16, 9);
        let s = stream_in_chunks_to(&mut e, &other, 2, 1, 3, 2).unwrap();
        for b in 0..2 {
            let (m1, v1) = e
                .forward(&other.narrow(0, b, 1).unwrap(), Mode::Eval)
                .unwrap();
            let alone = Tensor::cat(&[m1, v1], D::Minus1).unwrap();
            assert!(max_abs_diff(&alone, &s.narrow(0, b, 1).unwrap()).unwrap() < 1e-5);
        }
    }

    #[test]
    fn a_long_stream_holds_a_constant_state() {
        // 300 latent frames through a tail window of 5: after the warm-up
        // (the window and the conv stack's receptive field) the state is
        // the same size at every chunk.
        let cfg = ConvformerConfig {
            tf_context: Some(5),
            ..tiny(4)
        };
        let (_, mut e) = build(cfg, DType::F32);
        let x = mel(1200, 4).narrow(0, 0, 1).unwrap();
        let mut sizes = Vec::new();
        for i in 0..(1200 / 12) {
            e.step(&x.narrow(2, 12 * i, 12).unwrap()).unwrap();
            sizes.push(e.state_elements());
        }
        let settled = &sizes[10..];
        assert!(settled.iter().all(|&n| n == settled[0]), "{sizes:?}");
        assert!(settled[0] > 0);
        e.reset();
        assert_eq!(e.state_elements(), 0);
        // Without a window the KV cache, and so the state, keeps growing.
        let (_, mut unbounded) = build(
            ConvformerConfig {
                tf_context: None,
                ..tiny(4)
            },
            DType::F32,
        );
        let mut grown = Vec::new();
        for i in 0..20 {
            unbounded.step(&x.narrow(2, 12 * i, 12).unwrap()).unwrap();
            grown.push(unbounded.state_elements());
        }
        assert!(grown.windows(2).skip(10).all(|w| w[1] > w[0]), "{grown:?}");
    }

    #[test]
    fn gradients() {
        let vm = VarMap::new();
        let e = ConvformerEncoder::new(
            tiny(4),
            VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
        )
        .unwrap();
        let x = Var::from_tensor(&noise(&[2, 12, 8], 4).unwrap()).unwrap();
        check_module(&vm, 0.3, 5, &[("mel", &x)], || {
            let (m, v) = e.forward(x.as_tensor(), Mode::Eval).map_err(|e| {
                melvae_layers::Error::Invalid {
                    what: "fwd".into(),
                    reason: e.to_string(),
                }
            })?;
            Ok(Tensor::cat(&[m, v], D::Minus1)?)
        })
        .unwrap();
    }

    #[test]
    fn config_errors_name_the_field() {
        for (cfg, field) in [
            (
                ConvformerConfig {
                    compress_factor: 6,
                    ..tiny(8)
                },
                "compress_factor_C",
            ),
            (
                ConvformerConfig {
                    compress_factor: 64,
                    ..tiny(8)
                },
                "compress_factor_C",
            ),
            (
                ConvformerConfig {
                    tf_heads: 3,
                    ..tiny(8)
                },
                "tf_heads",
            ),
            (
                ConvformerConfig {
                    drop_p: 1.0,
                    ..tiny(8)
                },
                "drop_p",
            ),
            (
                ConvformerConfig {
                    latent_dim: 0,
                    ..tiny(8)
                },
                "latent_dim",
            ),
            (
                ConvformerConfig {
                    tf_context: Some(0),
                    ..tiny(8)
                },
                "tf_context",
            ),
        ] {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("convformer.{field}")), "{e}");
        }
        ConvformerConfig::default().validate().unwrap();
        let (_, e) = build(tiny(8), DType::F32);
        let err = e.forward(&mel(20, 1), Mode::Eval).unwrap_err().to_string();
        assert!(
            err.contains("multiple of compress_factor_C = 8") && err.contains("20 frames"),
            "{err}"
        );
        let err = e
            .forward(
                &noise(&[2, 10, 16], 1)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
                Mode::Eval,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("[batch, 12, frames]"), "{err}");
    }
}
