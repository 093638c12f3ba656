//! The mel VQ-VAE (SpecVQGAN-like): a 2-D convolutional encoder over the
//! mel image, a [`VectorQuantizer`] bottleneck, and the mirrored decoder,
//! turning a mel spectrogram into a grid of discrete tokens and back.
//!
//! Layouts: mel `[batch, n_mels, frames]` (the features of
//! [`MelVqVaeConfig::mel`], `frames` a multiple of [`MelVqVae::time_factor`]);
//! the model sees it as an image `[batch, 1, n_mels, frames]`. Each level
//! after the first halves (or keeps, per `downsample`) frequency and time,
//! so the token grid is `rows = frames / time_factor` by `cols = n_mels /
//! freq_factor`; tokens `[batch, rows * cols]` (u32) are in raster order
//! with rows = time: all frequency positions of the first time step, then
//! the next (time-major, so an autoregressive prior generates forward in
//! time). Every conv is causal in time ("same" in frequency), so a token
//! row depends on the mel up to its own frames only.
//!
//! Encoder: `conv_in` (3x3, 1 -> `channels[0]`), per level `res_blocks`
//! 2-D residual units (`res.{i}`, kernel 3x3), then (except after the last
//! level) `down` (3x3, stride `downsample[l]`) to the next level's width;
//! `conv_out` (1x1) to the codebook dim. Decoder: `conv_in` (1x1) from the
//! codebook dim, then the levels in reverse: residual units, and (except
//! at the finest level) a nearest-neighbour upsampling by `downsample[l]`
//! followed by `up` (3x3) to the finer level's width; `conv_out` (3x3) to one
//! channel. Loss: L1 or L2 reconstruction + the quantizer's codebook and
//! commitment terms.
//!
//! Optional attention at the lowest resolution (`attention: true`;
//! `encoder.attn`, after the last level's residual units, and
//! `decoder.attn`, after its `conv_in`): an [`AxialAttention2d`] block,
//! attention across frequency within each time step, then causal attention
//! across time within each frequency position, so tokens stay causal in
//! time.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use melvae_dsp::MelConfig;
use melvae_layers::{
    Activation, ActivationKind, AttentionConfig, CausalConv2d, Conv2dConfig, LayerNorm, Mode,
    MultiHeadAttention, Ranks, ResidualUnit2d, VectorQuantizer, VqConfig, VqOutput,
};
use serde::{Deserialize, Serialize};

use crate::error::ensure;
use crate::model_file::Family;
use crate::{Error, Result};

/// The reconstruction loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReconLoss {
    /// Mean absolute error of the log-mels.
    #[default]
    L1,
    /// Mean squared error of the log-mels.
    L2,
}

impl ReconLoss {
    /// The loss of `pred` against `target` (same shape), a scalar.
    pub fn of(self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        let diff = (pred - target)?;
        Ok(match self {
            Self::L1 => diff.abs()?.mean_all()?,
            Self::L2 => diff.sqr()?.mean_all()?,
        })
    }
}

/// Configuration of [`MelVqVae`] (the `mel_vqvae:` config section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MelVqVaeConfig {
    /// The mel features: a preset name (`hifigan-22k`, `vocos-24k`).
    pub mel: String,
    /// Width of each level, finest first.
    pub channels: Vec<usize>,
    /// `[freq, time]` factor between level `l` and `l + 1` (one entry per
    /// level but the last); each 1 or 2.
    pub downsample: Vec<[usize; 2]>,
    /// Residual units per level (encoder and decoder each).
    pub res_blocks: usize,
    /// Number of codes.
    pub codebook_size: usize,
    /// Size of a code vector.
    pub codebook_dim: usize,
    /// Weight of the commitment loss (VQ-VAE: 0.25).
    #[serde(default = "default_commitment")]
    pub commitment: f64,
    /// EMA codebook updates with this decay instead of the codebook loss.
    #[serde(default)]
    pub ema_decay: Option<f64>,
    /// Restart codes used less than this many times per batch on average
    /// (`null`: never).
    #[serde(default = "default_restart")]
    pub restart_threshold: Option<f64>,
    /// Reconstruction loss, `l1` or `l2`.
    #[serde(default)]
    pub recon_loss: ReconLoss,
    /// Axial attention at the lowest resolution, in the encoder and the
    /// decoder (see the module docs).
    #[serde(default)]
    pub attention: bool,
    /// Heads of that attention; must divide the last level's width.
    #[serde(default = "default_heads")]
    pub attention_heads: usize,
}

fn default_heads() -> usize {
    1
}

fn default_commitment() -> f64 {
    0.25
}

fn default_restart() -> Option<f64> {
    Some(1.0)
}

impl MelVqVaeConfig {
    /// A config with the defaults of the optional keys: `res_blocks` 1,
    /// commitment 0.25, gradient-trained codebook, restarts below 1.0, L1.
    pub fn new(
        mel: &str,
        channels: Vec<usize>,
        downsample: Vec<[usize; 2]>,
        codebook_size: usize,
        codebook_dim: usize,
    ) -> Self {
        Self {
            mel: mel.into(),
            channels,
            downsample,
            res_blocks: 1,
            codebook_size,
            codebook_dim,
            commitment: default_commitment(),
            ema_decay: None,
            restart_threshold: default_restart(),
            recon_loss: ReconLoss::L1,
            attention: false,
            attention_heads: default_heads(),
        }
    }

    /// Checks every field; the error names the bad one.
    pub fn validate(&self) -> Result<()> {
        self.mel_config()?;
        ensure(!self.channels.is_empty(), "mel_vqvae.channels", || {
            "needs at least one level".into()
        })?;
        ensure(
            self.channels.iter().all(|&c| c > 0),
            "mel_vqvae.channels",
            || format!("must all be > 0, got {:?}", self.channels),
        )?;
        ensure(
            self.downsample.len() + 1 == self.channels.len(),
            "mel_vqvae.downsample",
            || {
                format!(
                    "needs one [freq, time] factor per level but the last ({}), got {}",
                    self.channels.len() - 1,
                    self.downsample.len()
                )
            },
        )?;
        ensure(
            self.downsample.iter().flatten().all(|&f| f == 1 || f == 2),
            "mel_vqvae.downsample",
            || format!("factors must be 1 or 2, got {:?}", self.downsample),
        )?;
        for (v, f) in [
            (self.codebook_size, "mel_vqvae.codebook_size"),
            (self.codebook_dim, "mel_vqvae.codebook_dim"),
        ] {
            ensure(v > 0, f, || "must be > 0".into())?;
        }
        ensure(
            self.commitment.is_finite() && self.commitment >= 0.0,
            "mel_vqvae.commitment",
            || format!("must be a finite weight >= 0, got {}", self.commitment),
        )?;
        let last = *self.channels.last().unwrap_or(&1);
        ensure(
            !self.attention || (self.attention_heads > 0 && last % self.attention_heads == 0),
            "mel_vqvae.attention_heads",
            || {
                format!(
                    "{} heads must divide the last level's width {last}",
                    self.attention_heads
                )
            },
        )?;
        let n_mels = self.mel_config()?.n_mels;
        ensure(
            n_mels % self.freq_factor() == 0,
            "mel_vqvae.downsample",
            || {
                format!(
                    "the frequency factors multiply to {}, which does not divide the {n_mels} mels",
                    self.freq_factor()
                )
            },
        )?;
        self.vq_config().validate().map_err(|e| match e {
            melvae_layers::Error::Invalid { what, reason } => {
                Error::invalid(what.replace("vq.", "mel_vqvae."), reason)
            }
            e => e.into(),
        })
    }

    /// The mel features the model reads and writes.
    pub fn mel_config(&self) -> Result<MelConfig> {
        MelConfig::preset(&self.mel).map_err(|e| Error::invalid("mel_vqvae.mel", e.to_string()))
    }

    /// The product of the frequency factors.
    pub fn freq_factor(&self) -> usize {
        self.downsample.iter().map(|d| d[0]).product()
    }

    /// The product of the time factors.
    pub fn time_factor(&self) -> usize {
        self.downsample.iter().map(|d| d[1]).product()
    }

    fn vq_config(&self) -> VqConfig {
        VqConfig {
            commitment: self.commitment,
            ema_decay: self.ema_decay,
            restart_threshold: self.restart_threshold,
            ..VqConfig::new(self.codebook_size, self.codebook_dim)
        }
    }
}

const ACT: ActivationKind = ActivationKind::Silu;

fn conv(cin: usize, cout: usize, k: usize, vb: VarBuilder) -> Result<CausalConv2d> {
    Ok(CausalConv2d::new(Conv2dConfig::new(cin, cout, (k, k)), vb)?)
}

/// The residual units of one level.
fn res_units(ch: usize, n: usize, vb: &VarBuilder) -> Result<Vec<ResidualUnit2d>> {
    (0..n)
        .map(|i| {
            Ok(ResidualUnit2d::new(
                ch,
                (3, 3),
                1,
                ACT,
                false,
                vb.pp("res").pp(i),
            )?)
        })
        .collect()
}

fn run_units(units: &[ResidualUnit2d], mut x: Tensor) -> Result<Tensor> {
    for u in units {
        x = u.forward(&x)?;
    }
    Ok(x)
}

/// Nearest-neighbour upsampling of `[batch, ch, freq, time]` by `[ff, ft]`
/// (broadcast and reshape, so it differentiates as the sum of the copies).
fn upsample_nearest(x: &Tensor, [ff, ft]: [usize; 2]) -> Result<Tensor> {
    let (b, c, f, t) = x.dims4()?;
    let x = x
        .reshape((b, c, f, 1, t, 1))?
        .broadcast_as((b, c, f, ff, t, ft))?
        .contiguous()?;
    Ok(x.reshape((b, c, f * ff, t * ft))?)
}

/// Axial self-attention over a feature map `[batch, ch, freq, time]`:
/// pre-norm attention across frequency within each time step (`freq`,
/// `norm_freq`), then pre-norm causal attention across time within each
/// frequency position (`time`, `norm_time`), each added to its input.
/// A time step's output depends on the input up to that step only. Cost
/// `O(F T (F + T))` rather than the `O((F T)^2)` of full attention.
#[derive(Debug, Clone)]
pub struct AxialAttention2d {
    norm_freq: LayerNorm,
    freq: MultiHeadAttention,
    norm_time: LayerNorm,
    time: MultiHeadAttention,
}

impl AxialAttention2d {
    /// `ch` channels, `heads` heads (dividing `ch`), no bias terms.
    pub fn new(ch: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = AttentionConfig::new(ch, heads);
        Ok(Self {
            norm_freq: LayerNorm::new(ch, 1e-5, true, vb.pp("norm_freq"))?,
            freq: MultiHeadAttention::new(cfg, vb.pp("freq"))?,
            norm_time: LayerNorm::new(ch, 1e-5, true, vb.pp("norm_time"))?,
            time: MultiHeadAttention::new(
                AttentionConfig {
                    causal: true,
                    ..cfg
                },
                vb.pp("time"),
            )?,
        })
    }

    /// `[batch, ch, freq, time]` -> the same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, f, t) = x.dims4()?;
        // Across frequency: sequences of F for each (batch, time).
        let seq = x.permute((0, 3, 2, 1))?.reshape((b * t, f, c))?;
        let seq = (&seq
            + self
                .freq
                .forward(&self.norm_freq.forward(&seq)?, None, Mode::Eval)?)?;
        // Across time: sequences of T for each (batch, freq).
        let seq = seq
            .reshape((b, t, f, c))?
            .permute((0, 2, 1, 3))?
            .reshape((b * f, t, c))?;
        let seq = (&seq
            + self
                .time
                .forward(&self.norm_time.forward(&seq)?, None, Mode::Eval)?)?;
        Ok(seq
            .reshape((b, f, t, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()?)
    }
}

#[derive(Debug, Clone)]
struct EncoderLevel {
    units: Vec<ResidualUnit2d>,
    down: Option<(Activation, CausalConv2d)>,
}

#[derive(Debug, Clone)]
struct DecoderLevel {
    units: Vec<ResidualUnit2d>,
    /// Factor and conv to the finer level.
    up: Option<([usize; 2], CausalConv2d)>,
}

/// The mel VQ-VAE; see the module docs.
#[derive(Debug)]
pub struct MelVqVae {
    cfg: MelVqVaeConfig,
    mel: MelConfig,
    enc_in: CausalConv2d,
    enc: Vec<EncoderLevel>,
    enc_attn: Option<AxialAttention2d>,
    enc_act: Activation,
    enc_out: CausalConv2d,
    vq: VectorQuantizer,
    dec_in: CausalConv2d,
    dec_attn: Option<AxialAttention2d>,
    dec: Vec<DecoderLevel>,
    dec_act: Activation,
    dec_out: CausalConv2d,
}

/// What [`MelVqVae::forward`] returns.
#[derive(Debug)]
pub struct MelVqVaeOutput {
    /// The decoded mel `[batch, n_mels, frames]`.
    pub recon: Tensor,
    /// The quantizer's output (tokens `[batch, rows, cols]`, losses, usage).
    pub vq: VqOutput,
    /// The reconstruction loss (scalar).
    pub recon_loss: Tensor,
    /// `recon_loss + vq.loss`.
    pub loss: Tensor,
}

impl MelVqVae {
    /// Builds the model; fails on an invalid config, naming the field.
    pub fn new(cfg: MelVqVaeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let ch = &cfg.channels;
        let last = *ch.last().unwrap_or(&1);
        let e = vb.pp("encoder");
        let enc = (0..ch.len())
            .map(|l| {
                let vl = e.pp("levels").pp(l);
                Ok(EncoderLevel {
                    units: res_units(ch[l], cfg.res_blocks, &vl)?,
                    down: match cfg.downsample.get(l) {
                        Some(&[sf, st]) => Some((
                            Activation::new(ACT, ch[l], vl.pp("down_act"))?,
                            CausalConv2d::new(
                                Conv2dConfig {
                                    stride: (sf, st),
                                    ..Conv2dConfig::new(ch[l], ch[l + 1], (3, 3))
                                },
                                vl.pp("down"),
                            )?,
                        )),
                        None => None,
                    },
                })
            })
            .collect::<Result<_>>()?;
        let d = vb.pp("decoder");
        let dec = (0..ch.len())
            .rev()
            .map(|l| {
                let vl = d.pp("levels").pp(l);
                Ok(DecoderLevel {
                    units: res_units(ch[l], cfg.res_blocks, &vl)?,
                    up: match l.checked_sub(1) {
                        Some(p) => Some((cfg.downsample[p], conv(ch[l], ch[p], 3, vl.pp("up"))?)),
                        None => None,
                    },
                })
            })
            .collect::<Result<_>>()?;
        let attn = |vb: VarBuilder| -> Result<Option<AxialAttention2d>> {
            cfg.attention
                .then(|| AxialAttention2d::new(last, cfg.attention_heads, vb.pp("attn")))
                .transpose()
        };
        Ok(Self {
            mel: cfg.mel_config()?,
            enc_in: conv(1, ch[0], 3, e.pp("conv_in"))?,
            enc,
            enc_attn: attn(e.clone())?,
            dec_attn: attn(d.clone())?,
            enc_act: Activation::new(ACT, last, e.pp("act_out"))?,
            enc_out: conv(last, cfg.codebook_dim, 1, e.pp("conv_out"))?,
            vq: VectorQuantizer::new(cfg.vq_config(), vb.pp("vq"))?,
            dec_in: conv(cfg.codebook_dim, last, 1, d.pp("conv_in"))?,
            dec,
            dec_act: Activation::new(ACT, ch[0], d.pp("act_out"))?,
            dec_out: conv(ch[0], 1, 3, d.pp("conv_out"))?,
            cfg,
        })
    }

    /// Loads a `mel_vqvae` model file.
    pub fn load(
        path: &std::path::Path,
        device: &candle_core::Device,
        dtype: DType,
    ) -> Result<Self> {
        Ok(crate::model_file::load::<Self>(path, device, dtype)?.0)
    }

    /// The configuration.
    pub fn config(&self) -> &MelVqVaeConfig {
        &self.cfg
    }

    /// The mel features the model reads and writes.
    pub fn mel_config(&self) -> &MelConfig {
        &self.mel
    }

    /// The quantiser (codebook, usage, restart sampler state).
    pub fn quantizer(&self) -> &VectorQuantizer {
        &self.vq
    }

    /// The quantiser, to restore its sampler state on resume.
    pub fn quantizer_mut(&mut self) -> &mut VectorQuantizer {
        &mut self.vq
    }

    /// Mel frames per token row.
    pub fn time_factor(&self) -> usize {
        self.cfg.time_factor()
    }

    /// Tokens per row (frequency positions).
    pub fn cols(&self) -> usize {
        self.mel.n_mels / self.cfg.freq_factor()
    }

    fn check_mel(&self, mel: &Tensor) -> Result<(usize, usize)> {
        let f = self.time_factor();
        match mel.dims() {
            &[b, m, t] if m == self.mel.n_mels && t > 0 && t % f == 0 => Ok((b, t)),
            d => Err(Error::Shape {
                what: "mel_vqvae mel".into(),
                expected: format!(
                    "[batch, {}, frames] with frames a positive multiple of {f}",
                    self.mel.n_mels
                ),
                got: format!("{d:?}"),
            }),
        }
    }

    /// The encoder's continuous output `[batch, rows, cols, codebook_dim]`
    /// for `mel` `[batch, n_mels, frames]`.
    pub fn encode_continuous(&self, mel: &Tensor) -> Result<Tensor> {
        self.check_mel(mel)?;
        let mut h = self.enc_in.forward(&mel.unsqueeze(1)?)?;
        for level in &self.enc {
            h = run_units(&level.units, h)?;
            if let Some((act, down)) = &level.down {
                h = down.forward(&act.forward(&h)?)?;
            }
        }
        if let Some(a) = &self.enc_attn {
            h = a.forward(&h)?;
        }
        let z = self.enc_out.forward(&self.enc_act.forward(&h)?)?;
        // [B, D, cols(freq), rows(time)] -> [B, rows, cols, D]
        Ok(z.permute((0, 3, 2, 1))?.contiguous()?)
    }

    /// Tokens `[batch, rows * cols]` (u32, time-major raster order) of
    /// `mel` `[batch, n_mels, frames]`.
    pub fn encode(&self, mel: &Tensor) -> Result<Tensor> {
        let z = self.encode_continuous(mel)?;
        let (b, r, c, d) = z.dims4()?;
        let codes = self.vq.nearest(&z.reshape((b * r * c, d))?)?;
        Ok(codes.reshape((b, r * c))?)
    }

    /// Tokens `[1, rows * cols]` of mono audio at the features' rate: its
    /// mel (host extraction), cut to a multiple of the time factor, encoded.
    /// Audio shorter than one token row is an error saying so.
    pub fn encode_audio(&self, audio: &[f32], device: &candle_core::Device) -> Result<Tensor> {
        let mel = melvae_dsp::MelExtractor::new(self.mel)?.extract(audio)?;
        let (m, frames) = mel.dim();
        let f = self.time_factor();
        let keep = frames / f * f;
        if keep == 0 {
            return Err(Error::Shape {
                what: "mel_vqvae audio".into(),
                expected: format!("at least {f} mel frames (one token row)"),
                got: format!("{frames} frames from {} samples", audio.len()),
            });
        }
        let data: Vec<f32> = mel
            .rows()
            .into_iter()
            .flat_map(|r| r.iter().take(keep).copied().collect::<Vec<_>>())
            .collect();
        let mel = Tensor::from_vec(data, (1, m, keep), device)?;
        self.encode(&mel.to_dtype(self.vq.codebook().dtype())?)
    }

    /// The mel `[batch, n_mels, rows * time_factor]` of code vectors `q`
    /// `[batch, rows, cols, codebook_dim]`.
    fn decode_vectors(&self, q: &Tensor) -> Result<Tensor> {
        let mut h = self
            .dec_in
            .forward(&q.permute((0, 3, 2, 1))?.contiguous()?)?;
        if let Some(a) = &self.dec_attn {
            h = a.forward(&h)?;
        }
        for level in &self.dec {
            h = run_units(&level.units, h)?;
            if let Some((factor, up)) = &level.up {
                h = up.forward(&upsample_nearest(&h, *factor)?)?;
            }
        }
        Ok(self
            .dec_out
            .forward(&self.dec_act.forward(&h)?)?
            .squeeze(1)?)
    }

    /// The mel `[batch, n_mels, rows * time_factor]` of tokens `[batch,
    /// rows * cols]` (any integer dtype; each below `codebook_size`).
    pub fn decode(&self, tokens: &Tensor) -> Result<Tensor> {
        let cols = self.cols();
        let bad = |why: String| Error::Shape {
            what: "mel_vqvae tokens".into(),
            expected: format!(
                "[batch, rows * {cols}] with codes below {}",
                self.cfg.codebook_size
            ),
            got: why,
        };
        let (b, n) = tokens
            .dims2()
            .map_err(|_| bad(format!("{:?}", tokens.dims())))?;
        if n == 0 || n % cols != 0 {
            return Err(bad(format!("{:?}", tokens.dims())));
        }
        let tokens = tokens.to_dtype(DType::U32)?;
        let max = tokens.max_all()?.to_scalar::<u32>()? as usize;
        if max >= self.cfg.codebook_size {
            return Err(bad(format!("a code {max}")));
        }
        let q = self.vq.decode(&tokens.flatten_all()?)?;
        self.decode_vectors(&q.reshape((b, n / cols, cols, self.cfg.codebook_dim))?)
    }

    /// The training pass: encode, quantise (straight-through; with
    /// `train`, EMA updates and restarts of the codebook), decode, and the
    /// losses against `mel`.
    pub fn forward(&mut self, mel: &Tensor, train: bool) -> Result<MelVqVaeOutput> {
        let z = self.encode_continuous(mel)?;
        let vq = self.vq.forward(&z, train)?;
        self.output(mel, vq)
    }

    /// The training [`MelVqVae::forward`] of one data-parallel rank
    /// holding an equal shard of the batch: the codebook updates are the
    /// whole batch's ([`VectorQuantizer::forward_across`]).
    pub fn forward_across(&mut self, mel: &Tensor, ranks: &mut Ranks) -> Result<MelVqVaeOutput> {
        let z = self.encode_continuous(mel)?;
        let vq = self.vq.forward_across(&z, ranks)?;
        self.output(mel, vq)
    }

    /// Decodes `vq` and scores it against `mel`.
    fn output(&self, mel: &Tensor, vq: VqOutput) -> Result<MelVqVaeOutput> {
        let recon = self.decode_vectors(&vq.quantized)?;
        let recon_loss = self.cfg.recon_loss.of(&recon, mel)?;
        let loss = (&recon_loss + &vq.loss)?;
        Ok(MelVqVaeOutput {
            recon,
            vq,
            recon_loss,
            loss,
        })
    }
}

impl Family for MelVqVae {
    const NAME: &'static str = "mel_vqvae";
    type Config = MelVqVaeConfig;

    fn build(cfg: MelVqVaeConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(cfg, vb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;
    use melvae_layers::testing::{check_gradients, named_vars, noise, randomize, GradCheck};

    fn tiny() -> MelVqVaeConfig {
        MelVqVaeConfig {
            restart_threshold: None,
            ..MelVqVaeConfig::new("hifigan-22k", vec![2, 3], vec![[2, 2]], 8, 2)
        }
    }

    fn with_attention() -> MelVqVaeConfig {
        MelVqVaeConfig {
            attention: true,
            ..tiny()
        }
    }

    fn build(cfg: MelVqVaeConfig, dtype: DType) -> (VarMap, MelVqVae) {
        let vm = VarMap::new();
        let m = MelVqVae::new(cfg, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
        (vm, m)
    }

    #[test]
    fn shapes_and_round_trip() {
        let (_, mut m) = build(tiny(), DType::F32);
        let mel = noise(&[2, 80, 12], 1)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let tokens = m.encode(&mel).unwrap();
        assert_eq!(tokens.dims(), &[2, 6 * 40]);
        assert_eq!(tokens.dtype(), DType::U32);
        let recon = m.decode(&tokens).unwrap();
        assert_eq!(recon.dims(), mel.dims());
        // decode(encode(x)) is the forward pass's reconstruction.
        let out = m.forward(&mel, false).unwrap();
        let d = melvae_layers::testing::max_abs_diff(&recon, &out.recon).unwrap();
        assert!(d < 1e-5, "{d}");
        assert_eq!(out.vq.codes.dims(), &[2, 6, 40]);
        let flat = out.vq.codes.reshape((2, 240)).unwrap();
        assert_eq!(
            flat.to_vec2::<u32>().unwrap(),
            tokens.to_vec2::<u32>().unwrap()
        );
    }

    /// Tokens of a time step depend on the mel up to that step's frames,
    /// with and without the axial attention.
    #[test]
    fn tokens_are_causal_in_time() {
        for cfg in [tiny(), with_attention()] {
            tokens_are_causal(cfg);
        }
    }

    fn tokens_are_causal(cfg: MelVqVaeConfig) {
        let (vm, m) = build(cfg, DType::F32);
        // Attention starts as a small perturbation; make it count.
        randomize(&vm, 0.5, 9).unwrap();
        let mel = noise(&[1, 80, 12], 2)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let z = m.encode_continuous(&mel).unwrap();
        let changed = mel
            .slice_assign(
                &[0..1, 0..80, 8..12],
                &Tensor::zeros((1, 80, 4), DType::F32, &Device::Cpu).unwrap(),
            )
            .unwrap();
        let z2 = m.encode_continuous(&changed).unwrap();
        let d = melvae_layers::testing::max_abs_diff(
            &z.narrow(1, 0, 4).unwrap(),
            &z2.narrow(1, 0, 4).unwrap(),
        )
        .unwrap();
        assert!(d < 1e-6, "{d}");
        let d = melvae_layers::testing::max_abs_diff(
            &z.narrow(1, 4, 2).unwrap(),
            &z2.narrow(1, 4, 2).unwrap(),
        )
        .unwrap();
        assert!(d > 1e-4, "{d}");
    }

    /// Decoding a prefix of token rows gives the leading frames of the
    /// whole decode (the decoder is causal in time, with and without the
    /// attention): what streaming synthesis relies on.
    #[test]
    fn decoding_is_causal_in_time() {
        for cfg in [tiny(), with_attention()] {
            let (vm, m) = build(cfg, DType::F32);
            randomize(&vm, 0.5, 11).unwrap();
            let mel = noise(&[1, 80, 12], 4)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let tokens = m.encode(&mel).unwrap();
            let full = m.decode(&tokens).unwrap();
            let cols = m.cols();
            for rows in [1, 3, 5] {
                let part = m
                    .decode(&tokens.narrow(1, 0, rows * cols).unwrap())
                    .unwrap();
                let f = rows * m.time_factor();
                let d = melvae_layers::testing::max_abs_diff(&part, &full.narrow(2, 0, f).unwrap())
                    .unwrap();
                assert!(d < 1e-5, "{rows} rows: {d}");
            }
        }
    }

    /// f64 finite differences. The straight-through estimator and the
    /// stop-gradients are not derivatives of the loss's value (the
    /// quantiser is tested on its own in melvae-layers), so each part is
    /// checked on what it truly differentiates: the decoder's parameters
    /// on the reconstruction loss (L1 and L2), the encoder's and the
    /// input on its continuous output, the codebook on the codebook loss.
    #[test]
    fn gradients_match_finite_differences() {
        let part = |vm: &VarMap, prefix: &str| -> Vec<(String, Var)> {
            let vars: Vec<_> = named_vars(vm)
                .into_iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .collect();
            assert!(!vars.is_empty(), "no variable named {prefix}*");
            vars
        };
        let err = |e: Error| candle_core::Error::Msg(e.to_string());
        for (recon_loss, attention) in [
            (ReconLoss::L2, false),
            (ReconLoss::L1, false),
            (ReconLoss::L2, true),
        ] {
            let (vm, m) = build(
                MelVqVaeConfig {
                    recon_loss,
                    attention,
                    ..tiny()
                },
                DType::F64,
            );
            let m = std::cell::RefCell::new(m);
            randomize(&vm, 0.3, 5).unwrap();
            let mel = noise(&[1, 80, 4], 3).unwrap();
            check_gradients(&part(&vm, "decoder."), GradCheck::default(), || {
                m.borrow_mut()
                    .forward(&mel, false)
                    .map(|o| o.recon_loss)
                    .map_err(err)
            })
            .unwrap_or_else(|e| panic!("decoder, {recon_loss:?}, attention {attention}: {e}"));
            if attention {
                assert!(named_vars(&vm)
                    .iter()
                    .any(|(n, _)| n.starts_with("decoder.attn.time.")));
            }
            if recon_loss == ReconLoss::L1 {
                continue;
            }
            let mel = Var::from_tensor(&mel).unwrap();
            let mut enc = part(&vm, "encoder.");
            enc.push(("mel".into(), mel.clone()));
            check_gradients(&enc, GradCheck::default(), || {
                let z = m.borrow().encode_continuous(mel.as_tensor()).map_err(err)?;
                (&z * &z.sin()?)?.sum_all()
            })
            .unwrap_or_else(|e| panic!("encoder, attention {attention}: {e}"));
            check_gradients(&part(&vm, "vq.codebook"), GradCheck::default(), || {
                m.borrow_mut()
                    .forward(mel.as_tensor(), false)
                    .map(|o| o.vq.codebook_loss)
                    .map_err(err)
            })
            .unwrap_or_else(|e| panic!("codebook: {e}"));
        }
    }

    #[test]
    fn bad_config_and_input_name_the_culprit() {
        for (cfg, key) in [
            (
                MelVqVaeConfig {
                    downsample: vec![],
                    ..tiny()
                },
                "mel_vqvae.downsample",
            ),
            (
                MelVqVaeConfig {
                    downsample: vec![[3, 2]],
                    ..tiny()
                },
                "mel_vqvae.downsample",
            ),
            (
                MelVqVaeConfig {
                    mel: "nope".into(),
                    ..tiny()
                },
                "mel_vqvae.mel",
            ),
            (
                MelVqVaeConfig {
                    codebook_size: 0,
                    ..tiny()
                },
                "mel_vqvae.codebook_size",
            ),
            (
                MelVqVaeConfig {
                    channels: vec![2, 2, 2, 2, 2, 2, 2],
                    downsample: vec![[2, 1]; 6],
                    ..tiny()
                },
                "does not divide the 80 mels",
            ),
            (
                MelVqVaeConfig {
                    attention_heads: 2,
                    ..with_attention()
                },
                "mel_vqvae.attention_heads",
            ),
        ] {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        let (_, m) = build(tiny(), DType::F32);
        let e = m
            .encode(&Tensor::zeros((1, 80, 5), DType::F32, &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mel_vqvae mel") && e.contains("multiple of 2"),
            "{e}"
        );
        let e = m
            .decode(&Tensor::full(8u32, (1, 40), &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mel_vqvae tokens") && e.contains("a code 8"),
            "{e}"
        );
        let e = m
            .decode(&Tensor::zeros((1, 39), DType::U32, &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("rows * 40"), "{e}");
    }
}
