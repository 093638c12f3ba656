//! The waveform VAE: an Encodec-style (SEANet) convolutional encoder and
//! decoder on raw audio, mono or stereo, with a Gaussian bottleneck.
//!
//! Audio `[batch, audio_channels, samples]` (samples a multiple of the hop,
//! the product of `strides`) to latents `[batch, latent_dim, samples / hop]`
//! (posterior mean and log-variance) and back. In causal mode both halves
//! stream: chunks of audio become latents as they are final, and chunks of
//! latents become audio, each equal to the offline pass.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use melvae_dsp::SplitMix64;
use melvae_layers::{
    Activation, ActivationKind, Conv1d, Conv1dConfig, ConvPadding, LstmStack, ResidualUnit,
    ResidualUnitConfig, Streaming, Upsample, UpsampleConfig,
};
use melvae_losses::{
    kl_loss, l1_loss, FreeBits, KlSchedule, MultiResolutionStftLoss, MultiScaleMelLoss, StereoLoss,
    WaveformLoss,
};
use serde::{Deserialize, Serialize};

use crate::dit_cfm::normal_noise;
use crate::error::ensure;
use crate::model_file::Family;
use crate::{Error, Result};

/// The activation of the encoder and decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WaveActivation {
    /// ELU with alpha 1 (Encodec).
    Elu,
    /// Snake with a learned per-channel frequency (DAC, BigVGAN).
    Snake,
}

impl WaveActivation {
    fn kind(self) -> ActivationKind {
        match self {
            Self::Elu => ActivationKind::Elu { alpha: 1.0 },
            Self::Snake => ActivationKind::Snake,
        }
    }
}

/// An optional sequence model at the bottleneck (both halves), with a skip
/// connection: `x + f(x)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum WaveBottleneck {
    /// Nothing.
    #[default]
    None,
    /// A stacked LSTM as wide as the bottleneck (Encodec: 2 layers).
    Lstm {
        /// LSTM layers.
        layers: usize,
    },
}

/// The `wave_vae:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveVaeConfig {
    /// Sample rate the model is trained at (Hz).
    pub sample_rate: u32,
    /// Audio channels: 1 (mono) or 2 (stereo).
    pub audio_channels: usize,
    /// Width after the input conv.
    pub channels: usize,
    /// Width after stage `i` is `channels * channel_mults[i]`; one entry per
    /// stride.
    pub channel_mults: Vec<usize>,
    /// Downsampling factor of each stage (the hop is their product), e.g.
    /// `[2, 4, 5, 8]` at 24 kHz (75 Hz latents), `[2, 4, 4, 8, 8]` at 44.1 kHz.
    pub strides: Vec<usize>,
    /// Dilations of the residual units of each stage.
    #[serde(default = "default_dilations")]
    pub dilations: Vec<usize>,
    /// Kernel of the input and output convs.
    #[serde(default = "seven")]
    pub kernel_size: usize,
    /// Kernel of the residual units' dilated convs.
    #[serde(default = "three")]
    pub residual_kernel_size: usize,
    /// `elu` or `snake`.
    #[serde(default = "elu")]
    pub activation: WaveActivation,
    /// Causal convolutions (the model streams) or centred ones.
    #[serde(default = "yes")]
    pub causal: bool,
    /// Weight-norm parameterisation of every conv.
    #[serde(default = "yes")]
    pub weight_norm: bool,
    /// Sequence model at the bottleneck.
    #[serde(default)]
    pub bottleneck: WaveBottleneck,
    /// Latent channels.
    pub latent_dim: usize,
}

fn default_dilations() -> Vec<usize> {
    vec![1, 3, 9]
}
fn seven() -> usize {
    7
}
fn three() -> usize {
    3
}
fn elu() -> WaveActivation {
    WaveActivation::Elu
}
fn yes() -> bool {
    true
}

impl Default for WaveVaeConfig {
    /// 24 kHz mono speech: 32 channels doubling over strides [2, 4, 5, 8]
    /// (hop 320, 75 latent frames per second), ELU, causal, weight norm, a
    /// 2-layer LSTM, 64 latent channels.
    fn default() -> Self {
        Self {
            sample_rate: 24_000,
            audio_channels: 1,
            channels: 32,
            channel_mults: vec![2, 4, 8, 16],
            strides: vec![2, 4, 5, 8],
            dilations: default_dilations(),
            kernel_size: 7,
            residual_kernel_size: 3,
            activation: WaveActivation::Elu,
            causal: true,
            weight_norm: true,
            bottleneck: WaveBottleneck::Lstm { layers: 2 },
            latent_dim: 64,
        }
    }
}

impl WaveVaeConfig {
    /// Checks every field; the error names it (`wave_vae.<field>`).
    pub fn validate(&self) -> Result<()> {
        ensure(
            matches!(self.audio_channels, 1 | 2),
            "wave_vae.audio_channels",
            || format!("must be 1 or 2, got {}", self.audio_channels),
        )?;
        for (v, f) in [
            (self.sample_rate as usize, "wave_vae.sample_rate"),
            (self.channels, "wave_vae.channels"),
            (self.latent_dim, "wave_vae.latent_dim"),
            (self.kernel_size, "wave_vae.kernel_size"),
            (self.residual_kernel_size, "wave_vae.residual_kernel_size"),
        ] {
            ensure(v > 0, f, || "must be > 0".into())?;
        }
        ensure(!self.strides.is_empty(), "wave_vae.strides", || {
            "needs at least one stage".into()
        })?;
        ensure(
            self.strides.iter().all(|&s| s > 0),
            "wave_vae.strides",
            || format!("must all be > 0, got {:?}", self.strides),
        )?;
        ensure(
            self.channel_mults.len() == self.strides.len(),
            "wave_vae.channel_mults",
            || {
                format!(
                    "needs one entry per stride ({}), got {}",
                    self.strides.len(),
                    self.channel_mults.len()
                )
            },
        )?;
        ensure(
            self.channel_mults.iter().all(|&m| m > 0),
            "wave_vae.channel_mults",
            || format!("must all be > 0, got {:?}", self.channel_mults),
        )?;
        ensure(
            self.dilations.iter().all(|&d| d > 0),
            "wave_vae.dilations",
            || format!("must all be > 0, got {:?}", self.dilations),
        )?;
        // The residual units halve the width.
        ensure(
            self.widths().iter().all(|w| w % 2 == 0),
            "wave_vae.channels",
            || {
                format!(
                    "every stage width must be even (residual units halve it), got {:?}",
                    self.widths()
                )
            },
        )?;
        if let WaveBottleneck::Lstm { layers } = self.bottleneck {
            ensure(layers > 0, "wave_vae.bottleneck.layers", || {
                "must be > 0".into()
            })?;
        }
        Ok(())
    }

    /// Samples per latent frame: the product of the strides.
    pub fn hop(&self) -> usize {
        self.strides.iter().product()
    }

    /// Latent frames per second.
    pub fn frame_rate(&self) -> f64 {
        self.sample_rate as f64 / self.hop() as f64
    }

    /// Widths: before stage 0 (`channels`) and after each stage.
    pub fn widths(&self) -> Vec<usize> {
        std::iter::once(self.channels)
            .chain(self.channel_mults.iter().map(|m| self.channels * m))
            .collect()
    }

    fn padding(&self) -> ConvPadding {
        if self.causal {
            ConvPadding::Causal
        } else {
            ConvPadding::Same
        }
    }

    fn conv(&self, i: usize, o: usize, k: usize, stride: usize) -> Conv1dConfig {
        Conv1dConfig {
            stride,
            weight_norm: self.weight_norm,
            padding: self.padding(),
            ..Conv1dConfig::causal(i, o, k)
        }
    }

    fn unit(&self, width: usize, dilation: usize) -> ResidualUnitConfig {
        ResidualUnitConfig {
            kernel_size: self.residual_kernel_size,
            activation: self.activation.kind(),
            causal: self.causal,
            weight_norm: self.weight_norm,
            ..ResidualUnitConfig::seanet(width, dilation)
        }
    }
}

/// `x + lstm(x)` over `[batch, channels, time]`; parameters `lstm.*`.
#[derive(Debug, Clone)]
struct SkipLstm {
    lstm: LstmStack,
}

impl SkipLstm {
    fn new(width: usize, layers: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            lstm: LstmStack::new(width, width, layers, vb.pp("lstm"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (y, _) = self.lstm.forward(&x.transpose(1, 2)?.contiguous()?, None)?;
        Ok((x + y.transpose(1, 2)?)?)
    }

    fn step(&mut self, x: &Tensor) -> Result<Tensor> {
        let y = Streaming::step(&mut self.lstm, &x.transpose(1, 2)?.contiguous()?)?
            .ok_or_else(|| Error::invalid("wave_vae stream", "the LSTM emitted nothing"))?;
        Ok((x + y.transpose(1, 2)?)?)
    }
}

/// One encoder stage: residual units, activation, strided conv.
#[derive(Debug, Clone)]
struct DownStage {
    units: Vec<ResidualUnit>,
    act: Activation,
    down: Conv1d,
}

/// One decoder stage: activation, upsampler, residual units.
#[derive(Debug, Clone)]
struct UpStage {
    act: Activation,
    up: Upsample,
    units: Vec<ResidualUnit>,
}

/// Passes `x` through one streaming layer; `None` ends the chain.
fn step_opt(m: &mut impl Streaming, x: Option<Tensor>) -> melvae_layers::Result<Option<Tensor>> {
    match x {
        Some(x) => m.step(&x),
        None => Ok(None),
    }
}

/// The SEANet encoder: audio `[batch, audio_channels, samples]` to
/// `(mean, logvar)`, each `[batch, latent_dim, samples / hop]`.
///
/// Parameters: `input`, `stages.{i}.units.{j}`, `stages.{i}.act`,
/// `stages.{i}.down`, `bottleneck.lstm`, `act_out`, `out`.
#[derive(Debug, Clone)]
pub struct WaveEncoder {
    cfg: WaveVaeConfig,
    input: Conv1d,
    stages: Vec<DownStage>,
    bottleneck: Option<SkipLstm>,
    act_out: Activation,
    out: Conv1d,
}

impl WaveEncoder {
    /// Builds the encoder (`2 * latent_dim` outputs: mean and log-variance);
    /// fails on an invalid config, naming the field.
    pub fn new(cfg: WaveVaeConfig, vb: VarBuilder) -> Result<Self> {
        let outputs = 2 * cfg.latent_dim;
        Self::with_outputs(cfg, outputs, vb)
    }

    /// The encoder with `outputs` channels out of its last conv (the
    /// VQ-VAE's: `latent_dim`, the vectors to quantise).
    pub fn with_outputs(cfg: WaveVaeConfig, outputs: usize, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let w = cfg.widths();
        let input = Conv1d::new(
            cfg.conv(cfg.audio_channels, w[0], cfg.kernel_size, 1),
            vb.pp("input"),
        )?;
        let stages = cfg
            .strides
            .iter()
            .enumerate()
            .map(|(i, &s)| -> Result<DownStage> {
                let vs = vb.pp("stages").pp(i);
                Ok(DownStage {
                    units: cfg
                        .dilations
                        .iter()
                        .enumerate()
                        .map(|(j, &d)| ResidualUnit::new(cfg.unit(w[i], d), vs.pp("units").pp(j)))
                        .collect::<melvae_layers::Result<_>>()?,
                    act: Activation::new(cfg.activation.kind(), w[i], vs.pp("act"))?,
                    down: Conv1d::new(cfg.conv(w[i], w[i + 1], 2 * s, s), vs.pp("down"))?,
                })
            })
            .collect::<Result<_>>()?;
        let last = w[w.len() - 1];
        let bottleneck = match cfg.bottleneck {
            WaveBottleneck::None => None,
            WaveBottleneck::Lstm { layers } => {
                Some(SkipLstm::new(last, layers, vb.pp("bottleneck"))?)
            }
        };
        Ok(Self {
            act_out: Activation::new(cfg.activation.kind(), last, vb.pp("act_out"))?,
            out: Conv1d::new(cfg.conv(last, outputs, cfg.kernel_size, 1), vb.pp("out"))?,
            input,
            stages,
            bottleneck,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &WaveVaeConfig {
        &self.cfg
    }

    fn check(&self, audio: &Tensor, offline: bool) -> Result<()> {
        let (c, hop) = (self.cfg.audio_channels, self.cfg.hop());
        match audio.dims() {
            [_, ch, t] if *ch == c && (!offline || (*t > 0 && t % hop == 0)) => Ok(()),
            d => {
                Err(Error::Shape {
                    what: "wave_vae encoder input".into(),
                    expected: if offline {
                        format!("[batch, {c}, samples] with samples a positive multiple of the hop {hop}")
                    } else {
                        format!("[batch, {c}, samples]")
                    },
                    got: format!("{d:?}"),
                })
            }
        }
    }

    fn split(&self, h: &Tensor) -> Result<(Tensor, Tensor)> {
        let l = self.cfg.latent_dim;
        Ok((
            h.narrow(1, 0, l)?.contiguous()?,
            h.narrow(1, l, l)?.contiguous()?,
        ))
    }

    /// `audio` `[batch, audio_channels, samples]` (samples a multiple of the
    /// hop) to `(mean, logvar)`, each `[batch, latent_dim, samples / hop]`.
    pub fn forward(&self, audio: &Tensor) -> Result<(Tensor, Tensor)> {
        self.split(&self.features(audio)?)
    }

    /// The last conv's output `[batch, outputs, samples / hop]` (see
    /// [`WaveEncoder::with_outputs`]) of `audio` as in
    /// [`WaveEncoder::forward`].
    pub fn features(&self, audio: &Tensor) -> Result<Tensor> {
        self.check(audio, true)?;
        let mut h = self.input.forward(audio)?;
        for s in &self.stages {
            for u in &s.units {
                h = u.forward(&h)?;
            }
            h = s.down.forward(&s.act.forward(&h)?)?;
        }
        if let Some(b) = &self.bottleneck {
            h = b.forward(&h)?;
        }
        Ok(self.out.forward(&self.act_out.forward(&h)?)?)
    }
}

impl Streaming for WaveEncoder {
    /// Audio chunks `[batch, audio_channels, t]` (any `t >= 1`) to the latent
    /// frames that became final, as [`WaveEncoder::features`] (mean and
    /// log-variance stacked on the channel axis, `[batch, 2 * latent_dim,
    /// n]`, for the VAE; causal models only).
    fn step(&mut self, chunk: &Tensor) -> melvae_layers::Result<Option<Tensor>> {
        let err = |e: Error| melvae_layers::Error::Invalid {
            what: "wave_vae encoder stream".into(),
            reason: e.to_string(),
        };
        self.check(chunk, false).map_err(err)?;
        let mut h = self.input.step(chunk)?;
        for s in &mut self.stages {
            for u in &mut s.units {
                h = step_opt(u, h)?;
            }
            let a = h.map(|x| s.act.forward(&x)).transpose()?;
            h = step_opt(&mut s.down, a)?;
        }
        let Some(mut h) = h else { return Ok(None) };
        if let Some(b) = &mut self.bottleneck {
            h = b.step(&h).map_err(err)?;
        }
        let a = self.act_out.forward(&h)?;
        self.out.step(&a)
    }

    fn reset(&mut self) {
        self.input.reset();
        for s in &mut self.stages {
            s.units.iter_mut().for_each(Streaming::reset);
            s.down.reset();
        }
        if let Some(b) = &mut self.bottleneck {
            b.lstm.reset();
        }
        self.out.reset();
    }

    fn state_elements(&self) -> usize {
        self.input.state_elements()
            + self
                .stages
                .iter()
                .map(|s| {
                    s.units.iter().map(Streaming::state_elements).sum::<usize>()
                        + s.down.state_elements()
                })
                .sum::<usize>()
            + self
                .bottleneck
                .as_ref()
                .map_or(0, |b| b.lstm.state_elements())
            + self.out.state_elements()
    }
}

/// The mirrored decoder: latents `[batch, latent_dim, frames]` to audio
/// `[batch, audio_channels, frames * hop]`.
///
/// Parameters: `input`, `bottleneck.lstm`, `stages.{i}.act`,
/// `stages.{i}.up`, `stages.{i}.units.{j}`, `act_out`, `out` (stage 0 is the
/// coarsest).
#[derive(Debug, Clone)]
pub struct WaveDecoder {
    cfg: WaveVaeConfig,
    input: Conv1d,
    bottleneck: Option<SkipLstm>,
    stages: Vec<UpStage>,
    act_out: Activation,
    out: Conv1d,
}

impl WaveDecoder {
    /// Builds the decoder; fails on an invalid config, naming the field.
    pub fn new(cfg: WaveVaeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let w = cfg.widths();
        let n = cfg.strides.len();
        let input = Conv1d::new(
            cfg.conv(cfg.latent_dim, w[n], cfg.kernel_size, 1),
            vb.pp("input"),
        )?;
        let bottleneck = match cfg.bottleneck {
            WaveBottleneck::None => None,
            WaveBottleneck::Lstm { layers } => {
                Some(SkipLstm::new(w[n], layers, vb.pp("bottleneck"))?)
            }
        };
        let stages = (0..n)
            .map(|i| -> Result<UpStage> {
                // Stage i undoes encoder stage n - 1 - i.
                let k = n - 1 - i;
                let (win, wout, s) = (w[k + 1], w[k], cfg.strides[k]);
                let vs = vb.pp("stages").pp(i);
                Ok(UpStage {
                    act: Activation::new(cfg.activation.kind(), win, vs.pp("act"))?,
                    up: Upsample::new(
                        UpsampleConfig {
                            in_channels: win,
                            out_channels: wout,
                            kernel_size: 2 * s,
                            stride: s,
                            bias: true,
                            weight_norm: cfg.weight_norm,
                            causal: cfg.causal,
                        },
                        vs.pp("up"),
                    )?,
                    units: cfg
                        .dilations
                        .iter()
                        .enumerate()
                        .map(|(j, &d)| ResidualUnit::new(cfg.unit(wout, d), vs.pp("units").pp(j)))
                        .collect::<melvae_layers::Result<_>>()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            act_out: Activation::new(cfg.activation.kind(), w[0], vb.pp("act_out"))?,
            out: Conv1d::new(
                cfg.conv(w[0], cfg.audio_channels, cfg.kernel_size, 1),
                vb.pp("out"),
            )?,
            input,
            bottleneck,
            stages,
            cfg,
        })
    }

    fn check(&self, z: &Tensor) -> Result<()> {
        match z.dims() {
            [_, l, t] if *l == self.cfg.latent_dim && *t > 0 => Ok(()),
            d => Err(Error::Shape {
                what: "wave_vae decoder input".into(),
                expected: format!("[batch, {}, frames]", self.cfg.latent_dim),
                got: format!("{d:?}"),
            }),
        }
    }

    /// Latents `[batch, latent_dim, frames]` to audio
    /// `[batch, audio_channels, frames * hop]`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        self.check(z)?;
        let mut h = self.input.forward(z)?;
        if let Some(b) = &self.bottleneck {
            h = b.forward(&h)?;
        }
        for s in &self.stages {
            h = s.up.forward(&s.act.forward(&h)?)?;
            for u in &s.units {
                h = u.forward(&h)?;
            }
        }
        Ok(self.out.forward(&self.act_out.forward(&h)?)?)
    }
}

impl Streaming for WaveDecoder {
    /// Latent chunks `[batch, latent_dim, t]` to audio `[batch,
    /// audio_channels, t * hop]` (causal models only).
    fn step(&mut self, chunk: &Tensor) -> melvae_layers::Result<Option<Tensor>> {
        let err = |e: Error| melvae_layers::Error::Invalid {
            what: "wave_vae decoder stream".into(),
            reason: e.to_string(),
        };
        self.check(chunk).map_err(err)?;
        let mut h = self.input.step(chunk)?;
        if let (Some(b), Some(x)) = (&mut self.bottleneck, &h) {
            h = Some(b.step(x).map_err(err)?);
        }
        for s in &mut self.stages {
            let a = h.map(|x| s.act.forward(&x)).transpose()?;
            h = step_opt(&mut s.up, a)?;
            for u in &mut s.units {
                h = step_opt(u, h)?;
            }
        }
        let a = h.map(|x| self.act_out.forward(&x)).transpose()?;
        step_opt(&mut self.out, a)
    }

    fn reset(&mut self) {
        self.input.reset();
        if let Some(b) = &mut self.bottleneck {
            b.lstm.reset();
        }
        for s in &mut self.stages {
            s.up.reset();
            s.units.iter_mut().for_each(Streaming::reset);
        }
        self.out.reset();
    }

    fn state_elements(&self) -> usize {
        self.input.state_elements()
            + self
                .bottleneck
                .as_ref()
                .map_or(0, |b| b.lstm.state_elements())
            + self
                .stages
                .iter()
                .map(|s| {
                    s.up.state_elements()
                        + s.units.iter().map(Streaming::state_elements).sum::<usize>()
                })
                .sum::<usize>()
            + self.out.state_elements()
    }
}

/// The waveform VAE. Parameters `encoder.*` and `decoder.*`.
#[derive(Debug, Clone)]
pub struct WaveVae {
    cfg: WaveVaeConfig,
    /// The encoder.
    pub encoder: WaveEncoder,
    /// The decoder.
    pub decoder: WaveDecoder,
}

impl WaveVae {
    /// Builds both halves; fails on an invalid config, naming the field.
    pub fn new(cfg: WaveVaeConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            encoder: WaveEncoder::new(cfg.clone(), vb.pp("encoder"))?,
            decoder: WaveDecoder::new(cfg.clone(), vb.pp("decoder"))?,
            cfg,
        })
    }

    /// Loads a waveform VAE model file (see [`crate::model_file`]).
    pub fn load(
        path: &std::path::Path,
        device: &candle_core::Device,
        dtype: candle_core::DType,
    ) -> Result<Self> {
        Ok(crate::model_file::load::<Self>(path, device, dtype)?.0)
    }

    /// The configuration.
    pub fn config(&self) -> &WaveVaeConfig {
        &self.cfg
    }

    /// Samples per latent frame.
    pub fn hop(&self) -> usize {
        self.cfg.hop()
    }

    /// Audio `[batch, audio_channels, samples]` (a multiple of the hop) to
    /// `(mean, logvar)`, each `[batch, latent_dim, samples / hop]`.
    pub fn encode(&self, audio: &Tensor) -> Result<(Tensor, Tensor)> {
        self.encoder.forward(audio)
    }

    /// Latents `[batch, latent_dim, frames]` to audio
    /// `[batch, audio_channels, frames * hop]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decoder.forward(z)
    }

    /// Pads audio `[batch, channels, samples]` with zeros at the end to a
    /// multiple of the hop; returns it and the original length.
    pub fn pad_to_hop(&self, audio: &Tensor) -> Result<(Tensor, usize)> {
        let t = audio.dim(D::Minus1)?;
        let padded = t.div_ceil(self.hop()).max(1) * self.hop();
        Ok((audio.pad_with_zeros(D::Minus1, 0, padded - t)?, t))
    }
}

/// Free bits of the KL term (see `melvae_losses::FreeBits`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum FreeBitsConfig {
    /// No free bits.
    #[default]
    None,
    /// Latent vectors (one per frame) whose KL is below `target` nats do
    /// not pull.
    Threshold {
        /// Nats per latent vector.
        target: f64,
    },
    /// Each latent channel is free up to `target` nats.
    PerDim {
        /// Nats per latent channel.
        target: f64,
    },
}

impl From<FreeBitsConfig> for FreeBits {
    fn from(c: FreeBitsConfig) -> Self {
        match c {
            FreeBitsConfig::None => FreeBits::None,
            FreeBitsConfig::Threshold { target } => FreeBits::Threshold { target },
            FreeBitsConfig::PerDim { target } => FreeBits::PerDimMax { target },
        }
    }
}

/// Weights of the stereo (dual-channel) spectral loss: the multi-resolution
/// STFT loss on mid, side, left and right.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StereoWeights {
    /// Mid `(L + R) / 2`.
    pub mid: f64,
    /// Side `(L - R) / 2`.
    pub side: f64,
    /// Left.
    pub left: f64,
    /// Right.
    pub right: f64,
}

/// The `wave_vae_loss:` section: the weights of the reconstruction terms
/// and of the KL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveVaeLossConfig {
    /// Multi-resolution STFT loss (auraloss defaults); for stereo, over
    /// mid/side/left/right with `stereo` weights.
    pub stft_weight: f64,
    /// DAC's multi-scale mel loss (7 scales, summed).
    pub mel_weight: f64,
    /// Waveform L1.
    pub l1_weight: f64,
    /// Stereo weights of the STFT term (stereo models only).
    pub stereo: StereoWeights,
    /// Final KL weight.
    pub kl_weight: f64,
    /// Steps of the linear KL warm-up from 0.
    pub kl_warmup_steps: u64,
    /// Free bits of the KL.
    #[serde(default)]
    pub free_bits: FreeBitsConfig,
    /// Adversarial terms (used when the run has `discriminators:` and
    /// `training.gan`).
    #[serde(default)]
    pub adversarial: AdversarialWeights,
    /// EnCodec's loss balancer (off by default): the weights of `stft`,
    /// `mel`, `l1` and the adversarial terms become shares of the gradient
    /// reaching the decoder output; the KL keeps its weight.
    #[serde(default)]
    pub balancer: BalancerSection,
}

/// The `wave_vae_loss.balancer:` section ([`melvae_losses::LossBalancer`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalancerSection {
    /// Balance the output losses' gradients.
    pub enabled: bool,
    /// Norm of the balanced gradient (EnCodec: 1).
    pub total_norm: f64,
    /// Decay of the moving average of gradient norms (EnCodec: 0.999).
    pub ema_decay: f64,
    /// Norms per batch item, averaged (EnCodec: true).
    pub per_batch_item: bool,
    /// Added to the averaged norm (EnCodec: 1e-12).
    pub epsilon: f64,
}

impl Default for BalancerSection {
    fn default() -> Self {
        let d = melvae_losses::BalancerConfig::default();
        Self {
            enabled: false,
            total_norm: d.total_norm,
            ema_decay: d.ema_decay,
            per_batch_item: d.per_batch_item,
            epsilon: d.epsilon,
        }
    }
}

impl From<BalancerSection> for melvae_losses::BalancerConfig {
    fn from(s: BalancerSection) -> Self {
        Self {
            total_norm: s.total_norm,
            ema_decay: s.ema_decay,
            per_batch_item: s.per_batch_item,
            epsilon: s.epsilon,
        }
    }
}

/// The generator's adversarial terms and the GAN loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdversarialWeights {
    /// `hinge` or `least_squares`.
    #[serde(default = "hinge")]
    pub loss: GanLossKind,
    /// Weight of the generator's adversarial loss.
    #[serde(default = "one")]
    pub weight: f64,
    /// Weight of feature matching (L1 between the discriminators' feature
    /// maps of real and reconstructed audio; HiFi-GAN: 2).
    #[serde(default = "two")]
    pub feature_matching: f64,
}

/// The GAN loss of the discriminators and the generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GanLossKind {
    /// Hinge (MelGAN, EnCodec).
    Hinge,
    /// Least squares (HiFi-GAN).
    LeastSquares,
}

impl From<GanLossKind> for melvae_losses::GanLoss {
    fn from(k: GanLossKind) -> Self {
        match k {
            GanLossKind::Hinge => Self::Hinge,
            GanLossKind::LeastSquares => Self::LeastSquares,
        }
    }
}

fn hinge() -> GanLossKind {
    GanLossKind::Hinge
}
fn one() -> f64 {
    1.0
}
fn two() -> f64 {
    2.0
}

impl Default for AdversarialWeights {
    /// Hinge loss, adversarial weight 1, feature matching 2.
    fn default() -> Self {
        Self {
            loss: GanLossKind::Hinge,
            weight: 1.0,
            feature_matching: 2.0,
        }
    }
}

impl Default for WaveVaeLossConfig {
    /// STFT 1, mel 1, L1 0.1; stereo mid 1, side 0.5, left 0.5, right 0.5;
    /// KL 1e-4 after a 5000-step warm-up, no free bits.
    fn default() -> Self {
        Self {
            stft_weight: 1.0,
            mel_weight: 1.0,
            l1_weight: 0.1,
            stereo: StereoWeights {
                mid: 1.0,
                side: 0.5,
                left: 0.5,
                right: 0.5,
            },
            kl_weight: 1e-4,
            kl_warmup_steps: 5000,
            free_bits: FreeBitsConfig::None,
            adversarial: AdversarialWeights::default(),
            balancer: BalancerSection::default(),
        }
    }
}

impl WaveVaeLossConfig {
    /// Checks every weight (finite, `>= 0`, not all reconstruction weights
    /// zero); the error names it (`wave_vae_loss.<field>`).
    pub fn validate(&self) -> Result<()> {
        let s = &self.stereo;
        for (v, f) in [
            (self.stft_weight, "wave_vae_loss.stft_weight"),
            (self.mel_weight, "wave_vae_loss.mel_weight"),
            (self.l1_weight, "wave_vae_loss.l1_weight"),
            (self.kl_weight, "wave_vae_loss.kl_weight"),
            (s.mid, "wave_vae_loss.stereo.mid"),
            (s.side, "wave_vae_loss.stereo.side"),
            (s.left, "wave_vae_loss.stereo.left"),
            (s.right, "wave_vae_loss.stereo.right"),
            (self.adversarial.weight, "wave_vae_loss.adversarial.weight"),
            (
                self.adversarial.feature_matching,
                "wave_vae_loss.adversarial.feature_matching",
            ),
        ] {
            ensure(v.is_finite() && v >= 0.0, f, || {
                format!("must be a finite weight >= 0, got {v}")
            })?;
        }
        ensure(
            self.stft_weight + self.mel_weight + self.l1_weight > 0.0,
            "wave_vae_loss.stft_weight",
            || "at least one reconstruction weight (stft, mel, l1) must be > 0".into(),
        )?;
        melvae_losses::BalancerConfig::from(self.balancer)
            .validate()
            .map_err(|e| match e {
                melvae_losses::Error::Invalid { what, reason } => {
                    Error::invalid(format!("wave_vae_loss.{what}"), reason)
                }
                e => e.into(),
            })?;
        if let FreeBitsConfig::Threshold { target } | FreeBitsConfig::PerDim { target } =
            self.free_bits
        {
            ensure(
                target.is_finite() && target >= 0.0,
                "wave_vae_loss.free_bits.target",
                || format!("must be >= 0, got {target}"),
            )?;
        }
        Ok(())
    }

    /// The KL weight schedule: linear from 0 to `kl_weight`.
    pub fn kl_schedule(&self) -> KlSchedule {
        KlSchedule::Linear {
            start: 0.0,
            end: self.kl_weight,
            warmup_steps: self.kl_warmup_steps,
        }
    }
}

/// The reconstruction and KL objective of a [`WaveVae`], built once on a
/// device (the spectral losses hold their DFT bases and filterbanks).
#[derive(Debug, Clone)]
pub struct WaveVaeObjective {
    cfg: WaveVaeLossConfig,
    stft: MultiResolutionStftLoss,
    mel: MultiScaleMelLoss,
    stereo: bool,
}

/// The loss of one batch: the total to minimise and every term (scalars),
/// plus the reconstruction (for the discriminators).
#[derive(Debug, Clone)]
pub struct WaveVaeLoss {
    /// Weighted sum of the terms (KL at the step's weight).
    pub total: Tensor,
    /// `stft`, `mel`, `l1`, `kl` (unweighted).
    pub terms: BTreeMap<String, Tensor>,
    /// The decoded audio `[batch, audio_channels, samples]`.
    pub reconstruction: Tensor,
    /// The KL weight used.
    pub kl_weight: f64,
}

impl WaveVaeObjective {
    /// The objective for `model` (its sample rate and channel count).
    pub fn new(cfg: WaveVaeLossConfig, model: &WaveVaeConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            stft: MultiResolutionStftLoss::auraloss_default(device)?,
            mel: MultiScaleMelLoss::dac(model.sample_rate, device)?,
            stereo: model.audio_channels == 2,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &WaveVaeLossConfig {
        &self.cfg
    }

    /// Reconstruction terms of `pred` against `target` (both `[batch,
    /// audio_channels, samples]`): `stft`, `mel`, `l1` (unweighted; a term
    /// whose weight is 0 is not computed) and their weighted sum.
    pub fn reconstruction(
        &self,
        pred: &Tensor,
        target: &Tensor,
    ) -> Result<(Tensor, BTreeMap<String, Tensor>)> {
        let c = &self.cfg;
        let mut terms = BTreeMap::new();
        let mut total: Option<Tensor> = None;
        let mut add = |name: &str, weight: f64, f: &dyn Fn() -> Result<Tensor>| -> Result<()> {
            if weight > 0.0 {
                let l = f()?;
                let w = (&l * weight)?;
                total = Some(match total.take() {
                    Some(t) => (t + w)?,
                    None => w,
                });
                terms.insert(name.to_string(), l);
            }
            Ok(())
        };
        add("stft", c.stft_weight, &|| {
            Ok(if self.stereo {
                let w = c.stereo;
                StereoLoss {
                    inner: self.stft.clone(),
                    w_mid: w.mid,
                    w_side: w.side,
                    w_left: w.left,
                    w_right: w.right,
                }
                .loss(pred, target)?
            } else {
                self.stft.loss(pred, target)?
            })
        })?;
        add("mel", c.mel_weight, &|| Ok(self.mel.loss(pred, target)?))?;
        add("l1", c.l1_weight, &|| Ok(l1_loss(pred, target)?))?;
        let total = total
            .ok_or_else(|| Error::invalid("wave_vae_loss", "every reconstruction weight is 0"))?;
        Ok((total, terms))
    }
}

impl WaveVae {
    /// The VAE loss of `audio` (`[batch, audio_channels, samples]`, samples
    /// a multiple of the hop) at `step`: the reconstruction from a
    /// reparameterised sample of the posterior, plus the KL (over latent
    /// channels, per latent frame) at the scheduled weight. The noise comes
    /// from `rng` ([`WaveVae::posterior_noise`]); `train` selects the sample
    /// (evaluation decodes the posterior mean, deterministic).
    pub fn loss(
        &self,
        audio: &Tensor,
        step: u64,
        objective: &WaveVaeObjective,
        rng: &mut SplitMix64,
        train: bool,
    ) -> Result<WaveVaeLoss> {
        let eps = self.train_noise(audio, rng, train)?;
        self.loss_with(audio, step, objective, eps.as_ref())
    }

    /// [`WaveVae::loss`] with the reparameterisation noise given
    /// (`[batch, latent_dim, samples / hop]`), or the posterior mean
    /// decoded when `eps` is `None`.
    pub fn loss_with(
        &self,
        audio: &Tensor,
        step: u64,
        objective: &WaveVaeObjective,
        eps: Option<&Tensor>,
    ) -> Result<WaveVaeLoss> {
        let (reconstruction, mean, logvar) = self.pass_with(audio, eps)?;
        let (recon, mut terms) = objective.reconstruction(&reconstruction, audio)?;
        // [batch, latent, frames] -> [batch, frames, latent] for the KL.
        let kl = kl_loss(
            &mean.transpose(1, 2)?,
            &logvar.transpose(1, 2)?,
            objective.cfg.free_bits.into(),
        )?;
        let kl_weight = objective.cfg.kl_schedule().weight(step);
        let total = (recon + (&kl * kl_weight)?)?;
        terms.insert("kl".into(), kl);
        Ok(WaveVaeLoss {
            total,
            terms,
            reconstruction,
            kl_weight,
        })
    }

    /// The reparameterisation noise for `batch` crops of `samples` samples
    /// (a multiple of the hop), `[batch, latent_dim, samples / hop]`
    /// standard normal from `rng`, in the model's dtype. A data-parallel
    /// rank draws the whole batch's and keeps its rows.
    pub fn posterior_noise(
        &self,
        batch: usize,
        samples: usize,
        rng: &mut SplitMix64,
        device: &Device,
    ) -> Result<Tensor> {
        let dims = [batch, self.cfg.latent_dim, samples / self.hop()];
        Ok(normal_noise(&dims, rng, device)?.to_dtype(self.dtype())?)
    }

    /// [`WaveVae::posterior_noise`] for `audio` when `train`, else `None`.
    fn train_noise(
        &self,
        audio: &Tensor,
        rng: &mut SplitMix64,
        train: bool,
    ) -> Result<Option<Tensor>> {
        if !train {
            return Ok(None);
        }
        let (b, _, samples) = audio.dims3()?;
        Ok(Some(self.posterior_noise(
            b,
            samples,
            rng,
            audio.device(),
        )?))
    }

    /// The training pass: encode `audio`, sample the posterior (noise from
    /// `rng`; the mean when not `train`) and decode. Returns the
    /// reconstruction, the mean and the log-variance. [`WaveVae::loss`]
    /// uses it; a discriminator step replays it from the same seed.
    pub fn pass(
        &self,
        audio: &Tensor,
        rng: &mut SplitMix64,
        train: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let eps = self.train_noise(audio, rng, train)?;
        self.pass_with(audio, eps.as_ref())
    }

    /// [`WaveVae::pass`] with the noise given (`None`: the posterior mean);
    /// `eps` must have the latent's dims `[batch, latent_dim, frames]`.
    pub fn pass_with(
        &self,
        audio: &Tensor,
        eps: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (mean, logvar) = self.encode(audio)?;
        let z = match eps {
            Some(eps) => {
                ensure(
                    eps.dims() == mean.dims(),
                    "wave VAE posterior noise",
                    || {
                        format!(
                            "shape {:?}, expected the latent's {:?}",
                            eps.dims(),
                            mean.dims()
                        )
                    },
                )?;
                (&mean + ((&logvar * 0.5)?.exp()? * eps.to_dtype(mean.dtype())?)?)?
            }
            None => mean.clone(),
        };
        Ok((self.decode(&z)?, mean, logvar))
    }

    /// Encodes and decodes a clip `[audio_channels, samples]` of any
    /// length (zero-padded to the hop and cut back): the reconstruction
    /// from the posterior mean, `[1, audio_channels, samples]`, and the
    /// latent `[1, latent_dim, frames]`.
    pub fn reconstruct(&self, audio: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = match audio.rank() {
            2 => audio.unsqueeze(0)?,
            _ => audio.clone(),
        };
        let (padded, t) = self.pad_to_hop(&x)?;
        let (mean, _) = self.encode(&padded.to_dtype(self.dtype())?)?;
        let y = self.decode(&mean)?.narrow(D::Minus1, 0, t)?;
        Ok((y.detach(), mean.detach()))
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.encoder.out.dtype()
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.encoder.out.device()
    }
}

impl WaveVae {
    /// A stream that turns audio at the model's rate and channel count, fed
    /// in chunks of any size, into latents as they become final (causal
    /// models only); see [`WaveEncoderStream`].
    pub fn encoder_stream(&self) -> Result<WaveEncoderStream> {
        ensure(self.cfg.causal, "wave_vae.causal", || {
            "only a causal model streams".into()
        })?;
        let mut encoder = self.encoder.clone();
        encoder.reset();
        Ok(WaveEncoderStream {
            encoder,
            samples: 0,
        })
    }
}

/// Audio to latents as it arrives, through a causal [`WaveEncoder`]. The
/// latents of all [`WaveEncoderStream::push`] calls and
/// [`WaveEncoderStream::finish`] equal [`WaveVae::encode`] of the whole
/// signal zero-padded to the hop ([`WaveVae::pad_to_hop`]).
#[derive(Debug)]
pub struct WaveEncoderStream {
    encoder: WaveEncoder,
    samples: usize,
}

impl WaveEncoderStream {
    /// Samples between the first sample a latent frame covers and the
    /// moment it is final: one hop (the causal convs look no further).
    pub fn latency_samples(&self) -> usize {
        self.encoder.cfg.hop()
    }

    /// Feeds `[audio_channels, t]` samples; returns the latent frames that
    /// became final, `(mean, logvar)` each `[1, latent_dim, n]`.
    pub fn push(&mut self, audio: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        self.samples += audio.dim(D::Minus1)?;
        let y = self.encoder.step(&audio.unsqueeze(0)?)?;
        y.map(|y| self.encoder.split(&y.detach())).transpose()
    }

    /// Ends the stream: zero samples up to a multiple of the hop, the
    /// remaining latents, then a reset.
    pub fn finish(&mut self) -> Result<Option<(Tensor, Tensor)>> {
        let hop = self.encoder.cfg.hop();
        let pad = self.samples.div_ceil(hop).max(1) * hop - self.samples;
        let out = if pad > 0 {
            let c = self.encoder.cfg.audio_channels;
            let dev = self.encoder.out.device();
            let zeros = Tensor::zeros((c, pad), self.encoder.out.dtype(), &dev)?;
            self.push(&zeros)
        } else {
            Ok(None)
        };
        Streaming::reset(&mut self.encoder);
        self.samples = 0;
        out
    }
}

impl Family for WaveVae {
    const NAME: &'static str = "wave_vae";
    type Config = WaveVaeConfig;

    fn build(cfg: WaveVaeConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(cfg, vb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;
    use melvae_layers::testing::{check_module, max_abs_diff, noise, randomize, stream_in_chunks};

    fn tiny(audio_channels: usize, bottleneck: WaveBottleneck) -> WaveVaeConfig {
        WaveVaeConfig {
            sample_rate: 8000,
            audio_channels,
            channels: 4,
            channel_mults: vec![2, 4],
            strides: vec![2, 3],
            dilations: vec![1, 3],
            kernel_size: 5,
            residual_kernel_size: 3,
            activation: WaveActivation::Elu,
            causal: true,
            weight_norm: true,
            bottleneck,
            latent_dim: 3,
        }
    }

    fn build(cfg: WaveVaeConfig, dtype: DType) -> (VarMap, WaveVae) {
        let vm = VarMap::new();
        let m = WaveVae::new(cfg, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
        randomize(&vm, 0.3, 5).unwrap();
        (vm, m)
    }

    fn audio(c: usize, t: usize, seed: u64) -> Tensor {
        noise(&[2, c, t], seed)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    #[test]
    fn shapes_mono_and_stereo() {
        for (c, b) in [
            (1, WaveBottleneck::None),
            (2, WaveBottleneck::Lstm { layers: 2 }),
        ] {
            let (_, m) = build(tiny(c, b), DType::F32);
            let x = audio(c, 60, 1);
            let (mean, logvar) = m.encode(&x).unwrap();
            assert_eq!(mean.dims(), &[2, 3, 10]);
            assert_eq!(logvar.dims(), &[2, 3, 10]);
            assert_eq!(m.decode(&mean).unwrap().dims(), &[2, c, 60]);
            let (p, t) = m.pad_to_hop(&audio(c, 61, 2)).unwrap();
            assert_eq!((p.dim(2).unwrap(), t), (66, 61));
        }
        // Snake and centred convs build and keep the shapes.
        let cfg = WaveVaeConfig {
            activation: WaveActivation::Snake,
            causal: false,
            ..tiny(1, WaveBottleneck::None)
        };
        let (_, m) = build(cfg, DType::F32);
        let (mean, _) = m.encode(&audio(1, 36, 3)).unwrap();
        assert_eq!(m.decode(&mean).unwrap().dims(), &[2, 1, 36]);
    }

    #[test]
    fn causal_encoder_and_decoder_stream_like_offline() {
        for b in [WaveBottleneck::None, WaveBottleneck::Lstm { layers: 1 }] {
            let (_, mut m) = build(tiny(2, b), DType::F32);
            let x = audio(2, 120, 4);
            let (mean, logvar) = m.encode(&x).unwrap();
            let offline = Tensor::cat(&[&mean, &logvar], 1).unwrap();
            let z = (mean * 3.0).unwrap();
            let y = m.decode(&z).unwrap();
            for seed in 0..3 {
                let s = stream_in_chunks(&mut m.encoder, &x, 2, 17, seed).unwrap();
                assert!(max_abs_diff(&s, &offline).unwrap() < 1e-5, "{b:?} {seed}");
                let s = stream_in_chunks(&mut m.decoder, &z, 2, 4, seed).unwrap();
                assert!(max_abs_diff(&s, &y).unwrap() < 1e-5, "{b:?} {seed}");
            }
            assert!(m.encoder.state_elements() > 0);
            m.encoder.reset();
            assert_eq!(m.encoder.state_elements(), 0);
        }
    }

    #[test]
    fn encoder_stream_equals_offline_on_padded_audio() {
        let (_, m) = build(tiny(2, WaveBottleneck::Lstm { layers: 1 }), DType::F32);
        let x = audio(2, 100, 11)
            .narrow(0, 0, 1)
            .unwrap()
            .squeeze(0)
            .unwrap(); // [2, 100]
        let (p, _) = m.pad_to_hop(&x.unsqueeze(0).unwrap()).unwrap();
        let (mean, _) = m.encode(&p).unwrap();
        let mut s = m.encoder_stream().unwrap();
        assert_eq!(s.latency_samples(), 6);
        for _ in 0..2 {
            let mut got = Vec::new();
            for (a, n) in [(0, 7), (7, 50), (57, 43)] {
                if let Some((l, _)) = s.push(&x.narrow(1, a, n).unwrap()).unwrap() {
                    got.push(l);
                }
            }
            got.extend(s.finish().unwrap().map(|(l, _)| l));
            let got = Tensor::cat(&got, 2).unwrap();
            assert_eq!(got.dims(), mean.dims());
            assert!(max_abs_diff(&got, &mean).unwrap() < 1e-5);
        }
        let centred = WaveVaeConfig {
            causal: false,
            ..tiny(1, WaveBottleneck::None)
        };
        let (_, m) = build(centred, DType::F32);
        let e = m.encoder_stream().unwrap_err().to_string();
        assert!(e.contains("wave_vae.causal"), "{e}");
    }

    #[test]
    fn causal_in_time() {
        let (_, m) = build(tiny(1, WaveBottleneck::Lstm { layers: 1 }), DType::F32);
        let x = audio(1, 60, 5);
        let (a, _) = m.encode(&x).unwrap();
        let junk = (audio(1, 24, 9).narrow(0, 0, 2).unwrap() * 5.0).unwrap();
        let y = x.slice_assign(&[0..2, 0..1, 36..60], &junk).unwrap();
        let (b, _) = m.encode(&y).unwrap();
        // Latent frames 0..6 cover samples < 36.
        let first = |t: &Tensor| t.narrow(2, 0, 6).unwrap();
        assert!(max_abs_diff(&first(&a), &first(&b)).unwrap() < 1e-6);
        assert!(max_abs_diff(&a, &b).unwrap() > 1e-4);
    }

    #[test]
    fn gradients() {
        // The smallest model with every kind of block (Snake, weight-norm
        // convs, strided down, upsampler, LSTM with skip), stereo.
        {
            let cfg = WaveVaeConfig {
                activation: WaveActivation::Snake,
                channels: 2,
                channel_mults: vec![1, 2],
                strides: vec![2, 2],
                dilations: vec![2],
                kernel_size: 3,
                latent_dim: 2,
                ..tiny(2, WaveBottleneck::Lstm { layers: 1 })
            };
            let vm = VarMap::new();
            let m =
                WaveVae::new(cfg, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu)).unwrap();
            let x = Var::from_tensor(&noise(&[1, 2, 8], 6).unwrap()).unwrap();
            check_module(&vm, 0.3, 7, &[("audio", &x)], || {
                let e = |e: Error| melvae_layers::Error::Invalid {
                    what: "fwd".into(),
                    reason: e.to_string(),
                };
                let (mean, logvar) = m.encode(x.as_tensor()).map_err(e)?;
                let y = m.decode(&mean).map_err(e)?;
                Ok(Tensor::cat(&[y.flatten_all()?, logvar.flatten_all()?], 0)?)
            })
            .unwrap();
        }
    }

    #[test]
    fn loss_terms_train_and_evaluate() {
        use candle_nn::Optimizer;
        for c in [1, 2] {
            let cfg = WaveVaeConfig {
                sample_rate: 24_000,
                ..tiny(c, WaveBottleneck::None)
            };
            let (vm, m) = build(cfg.clone(), DType::F32);
            let obj =
                WaveVaeObjective::new(WaveVaeLossConfig::default(), &cfg, &Device::Cpu).unwrap();
            // A two-tone signal, 0.1 s.
            let x: Vec<f32> = (0..2 * c * 2400)
                .map(|i| {
                    let t = (i % 2400) as f32 / 24_000.0;
                    0.3 * (2.0 * std::f32::consts::PI * 220.0 * t).sin()
                        + 0.1
                            * (2.0
                                * std::f32::consts::PI
                                * (1000.0 + 300.0 * (i / 2400) as f32)
                                * t)
                                .sin()
                })
                .collect();
            let x = Tensor::from_vec(x, (2, c, 2400), &Device::Cpu).unwrap();
            let l = m.loss(&x, 10, &obj, &mut SplitMix64::new(1), true).unwrap();
            let keys: Vec<&str> = l.terms.keys().map(String::as_str).collect();
            assert_eq!(keys, ["kl", "l1", "mel", "stft"]);
            assert_eq!(l.reconstruction.dims(), x.dims());
            assert!((l.kl_weight - 1e-4 * 10.0 / 5000.0).abs() < 1e-12);
            // Evaluation decodes the mean: no noise, the same twice.
            let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap();
            let e1 = m
                .loss(&x, 10, &obj, &mut SplitMix64::new(1), false)
                .unwrap();
            let e2 = m
                .loss(&x, 10, &obj, &mut SplitMix64::new(2), false)
                .unwrap();
            assert_eq!(scalar(&e1.total), scalar(&e2.total));
            if c == 2 {
                continue;
            }
            // A few AdamW steps lower the loss.
            let mut opt = candle_nn::AdamW::new_lr(vm.all_vars(), 1e-2).unwrap();
            let first = scalar(&e1.total);
            for s in 0..8 {
                let l = m.loss(&x, s, &obj, &mut SplitMix64::new(s), true).unwrap();
                opt.backward_step(&l.total).unwrap();
            }
            let last = scalar(
                &m.loss(&x, 8, &obj, &mut SplitMix64::new(0), false)
                    .unwrap()
                    .total,
            );
            assert!(last < 0.95 * first, "{first} -> {last}");
        }
        let bad = WaveVaeLossConfig {
            mel_weight: -1.0,
            ..Default::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("wave_vae_loss.mel_weight"), "{e}");
        let none = WaveVaeLossConfig {
            stft_weight: 0.0,
            mel_weight: 0.0,
            l1_weight: 0.0,
            ..Default::default()
        };
        assert!(none
            .validate()
            .unwrap_err()
            .to_string()
            .contains("at least one"));
    }

    #[test]
    fn model_file_round_trip() {
        let cfg = tiny(2, WaveBottleneck::Lstm { layers: 1 });
        let (vm, m) = build(cfg.clone(), DType::F32);
        let tensors = melvae_layers::named_tensors(&vm);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        crate::model_file::save::<WaveVae>(&p, &cfg, &tensors, &Default::default(), &p).unwrap();
        let loaded = WaveVae::load(&p, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(loaded.config(), &cfg);
        let x = audio(2, 30, 8);
        let (a, _) = m.encode(&x).unwrap();
        let (b, _) = loaded.encode(&x).unwrap();
        assert_eq!(max_abs_diff(&a, &b).unwrap(), 0.0);
        assert!(!b.track_op());
        // A mel VAE file is not a waveform VAE.
        let e = crate::MelVae::load(&p, &Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`wave_vae` model, not a `mel_vae`"), "{e}");
    }

    #[test]
    fn bad_configs_and_inputs_are_named() {
        for (cfg, field) in [
            (
                WaveVaeConfig {
                    audio_channels: 3,
                    ..tiny(1, WaveBottleneck::None)
                },
                "audio_channels",
            ),
            (
                WaveVaeConfig {
                    channel_mults: vec![2],
                    ..tiny(1, WaveBottleneck::None)
                },
                "channel_mults",
            ),
            (
                WaveVaeConfig {
                    strides: vec![2, 0],
                    ..tiny(1, WaveBottleneck::None)
                },
                "strides",
            ),
            (
                WaveVaeConfig {
                    channels: 3,
                    channel_mults: vec![1, 1],
                    ..tiny(1, WaveBottleneck::None)
                },
                "channels",
            ),
            (
                tiny(1, WaveBottleneck::Lstm { layers: 0 }),
                "bottleneck.layers",
            ),
        ] {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("wave_vae.{field}")), "{e}");
        }
        WaveVaeConfig::default().validate().unwrap();
        assert_eq!(WaveVaeConfig::default().hop(), 320);
        let (_, m) = build(tiny(2, WaveBottleneck::None), DType::F32);
        let e = m.encode(&audio(2, 61, 1)).unwrap_err().to_string();
        assert!(
            e.contains("multiple of the hop 6") && e.contains("61"),
            "{e}"
        );
        let e = m.encode(&audio(1, 60, 1)).unwrap_err().to_string();
        assert!(e.contains("[batch, 2, samples]"), "{e}");
        let e = m
            .decode(&Tensor::zeros((1, 4, 5), DType::F32, &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("[batch, 3, frames]"), "{e}");
    }
}
