//! Discriminators for adversarial training of waveform models, each usable
//! alone or combined by config.
//!
//! The multi-scale waveform discriminator (MelGAN's MSD), the multi-period
//! discriminator (HiFi-GAN's MPD), the multi-scale complex STFT
//! discriminator (EnCodec's MS-STFTD) and the multi-band multi-resolution
//! STFT discriminator (DAC's MRD). Every sub-discriminator
//! returns its logits and the feature maps of its hidden layers, as the
//! hinge / least-squares losses and feature matching of `melvae-losses`
//! expect. Input audio `[batch, channels, samples]`; stereo channels are
//! judged as separate signals (folded into the batch).
//!
//! For mel models, the patch discriminator (pix2pix's PatchGAN, as taming
//! transformers and SpecVQGAN use it) judges a log-mel image `[batch,
//! n_mels, frames]` patch by patch. Both kinds implement [`Discriminator`],
//! which is what adversarial training calls.

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;
use melvae_dsp::{PadMode, Padding, StftConfig, TensorStft, WindowKind};
use melvae_layers::{CausalConv2d, Conv1d, Conv1dConfig, Conv2dConfig, ConvPadding};
use serde::{Deserialize, Serialize};

use crate::error::ensure;
use crate::{Error, Result};

/// The outputs of a set of sub-discriminators on one batch.
#[derive(Debug, Clone)]
pub struct DiscOutput {
    /// Logits of each sub-discriminator (any shape with the batch first).
    pub logits: Vec<Tensor>,
    /// Hidden feature maps of each sub-discriminator, in layer order.
    pub features: Vec<Vec<Tensor>>,
}

impl DiscOutput {
    fn extend(&mut self, other: DiscOutput) {
        self.logits.extend(other.logits);
        self.features.extend(other.features);
    }
}

const SLOPE: f64 = 0.1;

fn leaky(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::leaky_relu(x, SLOPE)?)
}

/// `[batch, channels, samples]` to `[batch * channels, 1, samples]`.
fn fold_channels(audio: &Tensor) -> Result<Tensor> {
    match audio.dims() {
        [b, c, t] if *t > 0 => Ok(audio.reshape((b * c, 1, *t))?),
        d => Err(Error::Shape {
            what: "discriminator input".into(),
            expected: "[batch, channels, samples] with samples > 0".into(),
            got: format!("{d:?}"),
        }),
    }
}

/// Runs every sub-discriminator `f(d, x)` and gathers their outputs.
fn each<T>(
    discs: &[T],
    x: &Tensor,
    f: impl Fn(&T, &Tensor) -> Result<(Tensor, Vec<Tensor>)>,
) -> Result<DiscOutput> {
    let mut out = DiscOutput {
        logits: Vec::with_capacity(discs.len()),
        features: Vec::with_capacity(discs.len()),
    };
    for d in discs {
        let (l, feats) = f(d, x)?;
        out.logits.push(l);
        out.features.push(feats);
    }
    Ok(out)
}

/// The `msd:` settings: MelGAN's multi-scale discriminator.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsdConfig {
    /// Scales: the audio, then average-pooled by 2 for each further scale
    /// (MelGAN: 3).
    pub scales: usize,
    /// Width of the first conv (MelGAN: 16); quadrupled by each strided,
    /// grouped conv up to `max_channels`.
    pub channels: usize,
    /// Widest layer (MelGAN: 1024).
    pub max_channels: usize,
    /// Strided grouped convs (MelGAN: 4, stride 4, kernel 41).
    pub downsamples: usize,
}

impl Default for MsdConfig {
    /// MelGAN: 3 scales, 16 to 1024 channels, 4 strided convs.
    fn default() -> Self {
        Self {
            scales: 3,
            channels: 16,
            max_channels: 1024,
            downsamples: 4,
        }
    }
}

/// One MelGAN scale discriminator over `[batch, 1, samples]`.
#[derive(Debug, Clone)]
struct ScaleDisc {
    convs: Vec<Conv1d>,
    out: Conv1d,
}

impl ScaleDisc {
    fn new(cfg: &MsdConfig, vb: VarBuilder) -> Result<Self> {
        let conv = |i, o, k, s, g| Conv1dConfig {
            stride: s,
            groups: g,
            weight_norm: true,
            padding: ConvPadding::Same,
            ..Conv1dConfig::causal(i, o, k)
        };
        let mut convs = vec![Conv1d::new(
            conv(1, cfg.channels, 15, 1, 1),
            vb.pp("convs").pp(0),
        )?];
        let mut w = cfg.channels;
        for i in 0..cfg.downsamples {
            let o = (w * 4).min(cfg.max_channels);
            // MelGAN's groups: in / 4 (so each group maps 4 -> 16 channels).
            let g = (w / 4).max(1);
            ensure(w % g == 0 && o % g == 0, "msd.channels", || {
                format!("widths {w} -> {o} do not split into {g} groups")
            })?;
            convs.push(Conv1d::new(conv(w, o, 41, 4, g), vb.pp("convs").pp(i + 1))?);
            w = o;
        }
        convs.push(Conv1d::new(
            conv(w, w, 5, 1, 1),
            vb.pp("convs").pp(cfg.downsamples + 1),
        )?);
        Ok(Self {
            convs,
            out: Conv1d::new(conv(w, 1, 3, 1, 1), vb.pp("out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let mut feats = Vec::with_capacity(self.convs.len());
        let mut h = x.clone();
        for c in &self.convs {
            h = leaky(&c.forward(&h)?)?;
            feats.push(h.clone());
        }
        let logits = self.out.forward(&h)?;
        Ok((logits.flatten_from(1)?, feats))
    }
}

/// Average pooling with kernel 4, stride 2 and 2 zeros of padding on each
/// side (torch's `AvgPool1d(4, 2, padding=2)`, counting the padding):
/// `[b, 1, t]` to `[b, 1, t / 2 + 1]` for even `t`. Differentiable.
fn avg_pool_4_2(x: &Tensor) -> Result<Tensor> {
    let t = x.dim(D::Minus1)?;
    let right = 2 + (t % 2);
    let xp = x.pad_with_zeros(D::Minus1, 2, right)?;
    let n = xp.dim(D::Minus1)? / 2;
    let (b, c) = (x.dim(0)?, x.dim(1)?);
    // Sums of pairs, then of neighbouring pairs.
    let pairs = xp.reshape((b, c, n, 2))?.sum(D::Minus1)?;
    let y = (pairs.narrow(D::Minus1, 0, n - 1)? + pairs.narrow(D::Minus1, 1, n - 1)?)?;
    let out = t / 2 + 1;
    Ok((y.narrow(D::Minus1, 0, out)? * 0.25)?)
}

/// MelGAN's multi-scale discriminator. Parameters `scales.{k}.convs.{i}`,
/// `scales.{k}.out`.
#[derive(Debug, Clone)]
pub struct MultiScaleDiscriminator {
    scales: Vec<ScaleDisc>,
}

impl MultiScaleDiscriminator {
    /// Builds `cfg.scales` scale discriminators; errors name the field.
    pub fn new(cfg: &MsdConfig, vb: VarBuilder) -> Result<Self> {
        ensure(cfg.scales > 0, "msd.scales", || "must be > 0".into())?;
        ensure(
            cfg.channels >= 4 && cfg.max_channels >= cfg.channels,
            "msd.channels",
            || {
                format!(
                    "needs 4 <= channels <= max_channels, got {} and {}",
                    cfg.channels, cfg.max_channels
                )
            },
        )?;
        let scales = (0..cfg.scales)
            .map(|k| ScaleDisc::new(cfg, vb.pp("scales").pp(k)))
            .collect::<Result<_>>()?;
        Ok(Self { scales })
    }

    /// Logits and feature maps of every scale for `audio` `[batch,
    /// channels, samples]`.
    pub fn forward(&self, audio: &Tensor) -> Result<DiscOutput> {
        let mut x = fold_channels(audio)?;
        let mut out = DiscOutput {
            logits: Vec::new(),
            features: Vec::new(),
        };
        for (k, s) in self.scales.iter().enumerate() {
            if k > 0 {
                x = avg_pool_4_2(&x)?;
            }
            let (l, f) = s.forward(&x)?;
            out.logits.push(l);
            out.features.push(f);
        }
        Ok(out)
    }
}

/// The `mpd:` settings: HiFi-GAN's multi-period discriminator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MpdConfig {
    /// Periods (HiFi-GAN: 2, 3, 5, 7, 11).
    pub periods: Vec<usize>,
    /// Width of the first conv (HiFi-GAN: 32), quadrupled per layer up to
    /// `max_channels`.
    pub channels: usize,
    /// Widest layer (HiFi-GAN: 1024).
    pub max_channels: usize,
    /// Strided convs (HiFi-GAN: 4, kernel 5, stride 3 along time).
    pub layers: usize,
}

impl Default for MpdConfig {
    /// HiFi-GAN: periods 2/3/5/7/11, 32 to 1024 channels, 4 strided layers.
    fn default() -> Self {
        Self {
            periods: vec![2, 3, 5, 7, 11],
            channels: 32,
            max_channels: 1024,
            layers: 4,
        }
    }
}

/// One period discriminator: audio folded to `[batch, 1, samples / p, p]`,
/// 2-D convs with kernel `(5, 1)` along time.
#[derive(Debug, Clone)]
struct PeriodDisc {
    period: usize,
    convs: Vec<CausalConv2d>,
    out: CausalConv2d,
}

impl PeriodDisc {
    fn new(period: usize, cfg: &MpdConfig, vb: VarBuilder) -> Result<Self> {
        // Axis 2 (time / period) is the conv's "same"-padded axis; axis 3
        // (the phase within a period) gets kernel 1.
        let conv = |i, o, k, s| Conv2dConfig {
            stride: (s, 1),
            weight_norm: true,
            ..Conv2dConfig::new(i, o, (k, 1))
        };
        let mut convs = Vec::with_capacity(cfg.layers + 1);
        let mut w = 1;
        for i in 0..cfg.layers {
            let o = if i == 0 {
                cfg.channels
            } else {
                (w * 4).min(cfg.max_channels)
            };
            convs.push(CausalConv2d::new(conv(w, o, 5, 3), vb.pp("convs").pp(i))?);
            w = o;
        }
        convs.push(CausalConv2d::new(
            conv(w, w, 5, 1),
            vb.pp("convs").pp(cfg.layers),
        )?);
        Ok(Self {
            period,
            convs,
            out: CausalConv2d::new(conv(w, 1, 3, 1), vb.pp("out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let (b, _, t) = x.dims3()?;
        let p = self.period;
        let padded = t.div_ceil(p) * p;
        let h = x
            .pad_with_zeros(D::Minus1, 0, padded - t)?
            .reshape((b, 1, padded / p, p))?;
        let mut feats = Vec::with_capacity(self.convs.len());
        let mut h = h;
        for c in &self.convs {
            h = leaky(&c.forward(&h)?)?;
            feats.push(h.clone());
        }
        Ok((self.out.forward(&h)?.flatten_from(1)?, feats))
    }
}

/// HiFi-GAN's multi-period discriminator. Parameters
/// `periods.{k}.convs.{i}`, `periods.{k}.out`.
#[derive(Debug, Clone)]
pub struct MultiPeriodDiscriminator {
    discs: Vec<PeriodDisc>,
}

impl MultiPeriodDiscriminator {
    /// Builds one discriminator per period; errors name the field.
    pub fn new(cfg: &MpdConfig, vb: VarBuilder) -> Result<Self> {
        ensure(
            !cfg.periods.is_empty() && cfg.periods.iter().all(|&p| p > 0),
            "mpd.periods",
            || format!("needs periods > 0, got {:?}", cfg.periods),
        )?;
        ensure(cfg.layers > 0, "mpd.layers", || "must be > 0".into())?;
        ensure(
            cfg.channels > 0 && cfg.max_channels >= cfg.channels,
            "mpd.channels",
            || {
                format!(
                    "needs 0 < channels <= max_channels, got {} and {}",
                    cfg.channels, cfg.max_channels
                )
            },
        )?;
        let discs = cfg
            .periods
            .iter()
            .enumerate()
            .map(|(k, &p)| PeriodDisc::new(p, cfg, vb.pp("periods").pp(k)))
            .collect::<Result<_>>()?;
        Ok(Self { discs })
    }

    /// Logits and feature maps of every period for `audio` `[batch,
    /// channels, samples]`.
    pub fn forward(&self, audio: &Tensor) -> Result<DiscOutput> {
        each(&self.discs, &fold_channels(audio)?, PeriodDisc::forward)
    }
}

/// A 2-D conv over a spectrogram `[batch, channels, freq, time]`:
/// `kernel`, `stride` and `dilation` as `(freq, time)`, "same" padded in
/// frequency and causal (left-padded) in time, weight norm.
fn spec_conv(
    i: usize,
    o: usize,
    kernel: (usize, usize),
    stride: (usize, usize),
    dilation: (usize, usize),
    vb: VarBuilder,
) -> Result<CausalConv2d> {
    Ok(CausalConv2d::new(
        Conv2dConfig {
            stride,
            dilation,
            weight_norm: true,
            ..Conv2dConfig::new(i, o, kernel)
        },
        vb,
    )?)
}

/// The complex STFT of `x` `[b, 1, samples]` (Hann window of `n_fft`, hop
/// `n_fft / 4`, centred with reflection, scaled by `1 / sqrt(sum w^2)` as
/// torchaudio's `normalized=True`) as `[b, 2, bins, frames]` (real, imag).
fn complex_spec(stft: &TensorStft, x: &Tensor) -> Result<Tensor> {
    let n = stft.config().n_fft as f64;
    // sum of a periodic Hann window squared = 3 n / 8.
    let scale = 1.0 / (3.0 * n / 8.0).sqrt();
    let (re, im) = stft.forward(&x.squeeze(1)?)?;
    Ok((Tensor::stack(&[re, im], 1)? * scale)?)
}

fn spec_stft(n_fft: usize, vb: &VarBuilder) -> Result<TensorStft> {
    let cfg = StftConfig {
        n_fft,
        hop_length: (n_fft / 4).max(1),
        win_length: n_fft,
        window: WindowKind::Hann,
        periodic: true,
        padding: Padding::Center(PadMode::Reflect),
    };
    Ok(TensorStft::new(cfg, vb.device())?)
}

/// The `ms_stft:` settings: EnCodec's multi-scale complex STFT
/// discriminator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsStftConfig {
    /// FFT sizes, one sub-discriminator each (EnCodec: 1024, 2048, 512,
    /// 256, 128; hop a quarter, window the FFT size).
    pub n_ffts: Vec<usize>,
    /// Width of every conv (EnCodec: 32).
    pub channels: usize,
}

impl Default for MsStftConfig {
    /// EnCodec: FFT sizes 1024, 2048, 512, 256, 128, 32 channels.
    fn default() -> Self {
        Self {
            n_ffts: vec![1024, 2048, 512, 256, 128],
            channels: 32,
        }
    }
}

/// One EnCodec STFT discriminator: real and imaginary parts as 2 input
/// channels; a (9 freq x 3 time) conv, three with stride 2 in frequency and
/// time dilations 1, 2, 4, a 3 x 3 conv, and a 3 x 3 conv to 1 channel.
#[derive(Debug, Clone)]
struct StftDisc {
    stft: TensorStft,
    convs: Vec<CausalConv2d>,
    out: CausalConv2d,
}

impl StftDisc {
    fn new(n_fft: usize, ch: usize, vb: VarBuilder) -> Result<Self> {
        let stft = spec_stft(n_fft, &vb)?;
        let vc = vb.pp("convs");
        let mut convs = vec![spec_conv(2, ch, (9, 3), (1, 1), (1, 1), vc.pp(0))?];
        for (i, d) in [1, 2, 4].into_iter().enumerate() {
            convs.push(spec_conv(ch, ch, (9, 3), (2, 1), (1, d), vc.pp(i + 1))?);
        }
        convs.push(spec_conv(ch, ch, (3, 3), (1, 1), (1, 1), vc.pp(4))?);
        Ok(Self {
            stft,
            convs,
            out: spec_conv(ch, 1, (3, 3), (1, 1), (1, 1), vb.pp("out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = complex_spec(&self.stft, x)?;
        let mut feats = Vec::with_capacity(self.convs.len());
        for c in &self.convs {
            h = leaky(&c.forward(&h)?)?;
            feats.push(h.clone());
        }
        Ok((self.out.forward(&h)?.flatten_from(1)?, feats))
    }
}

/// EnCodec's multi-scale STFT discriminator. Parameters
/// `scales.{k}.convs.{i}`, `scales.{k}.out`.
#[derive(Debug, Clone)]
pub struct MultiScaleStftDiscriminator {
    discs: Vec<StftDisc>,
}

fn check_ffts(n_ffts: &[usize], what: &str) -> Result<()> {
    ensure(
        !n_ffts.is_empty() && n_ffts.iter().all(|&n| n >= 8),
        what,
        || format!("needs FFT sizes >= 8, got {n_ffts:?}"),
    )
}

impl MultiScaleStftDiscriminator {
    /// One discriminator per FFT size; errors name the field. Audio must be
    /// longer than half the largest FFT.
    pub fn new(cfg: &MsStftConfig, vb: VarBuilder) -> Result<Self> {
        check_ffts(&cfg.n_ffts, "ms_stft.n_ffts")?;
        ensure(cfg.channels > 0, "ms_stft.channels", || {
            "must be > 0".into()
        })?;
        let discs = cfg
            .n_ffts
            .iter()
            .enumerate()
            .map(|(k, &n)| StftDisc::new(n, cfg.channels, vb.pp("scales").pp(k)))
            .collect::<Result<_>>()?;
        Ok(Self { discs })
    }

    /// Logits and feature maps of every scale for `audio` `[batch,
    /// channels, samples]`.
    pub fn forward(&self, audio: &Tensor) -> Result<DiscOutput> {
        each(&self.discs, &fold_channels(audio)?, StftDisc::forward)
    }
}

/// The `mrd:` settings: DAC's multi-band multi-resolution STFT
/// discriminator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MrdConfig {
    /// FFT sizes (DAC: 2048, 1024, 512; hop a quarter).
    pub n_ffts: Vec<usize>,
    /// Band edges as fractions of the bins, increasing from 0 to 1 (DAC:
    /// 0, 0.1, 0.25, 0.5, 0.75, 1).
    pub bands: Vec<f64>,
    /// Width of every conv (DAC: 32).
    pub channels: usize,
}

impl Default for MrdConfig {
    /// DAC: FFT sizes 2048, 1024, 512; 5 bands; 32 channels.
    fn default() -> Self {
        Self {
            n_ffts: vec![2048, 1024, 512],
            bands: vec![0.0, 0.1, 0.25, 0.5, 0.75, 1.0],
            channels: 32,
        }
    }
}

/// One DAC resolution: the complex STFT split into frequency bands, each
/// band through its own conv stack, the results joined along frequency
/// before the output conv.
#[derive(Debug, Clone)]
struct BandDisc {
    stft: TensorStft,
    /// Bin ranges `[start, end)`.
    bands: Vec<(usize, usize)>,
    /// Per band: a (9, 3) conv, three with stride 2 in frequency, a 3 x 3.
    stacks: Vec<Vec<CausalConv2d>>,
    out: CausalConv2d,
}

impl BandDisc {
    fn new(n_fft: usize, cfg: &MrdConfig, vb: VarBuilder) -> Result<Self> {
        let stft = spec_stft(n_fft, &vb)?;
        let bins = stft.config().n_bins();
        let edges: Vec<usize> = cfg
            .bands
            .iter()
            .map(|f| (f * bins as f64).floor() as usize)
            .collect();
        let bands: Vec<(usize, usize)> = edges.windows(2).map(|w| (w[0], w[1])).collect();
        ensure(bands.iter().all(|(a, b)| b > a), "mrd.bands", || {
            format!(
                "band edges {:?} leave an empty band for FFT size {n_fft}",
                cfg.bands
            )
        })?;
        let ch = cfg.channels;
        let stacks = (0..bands.len())
            .map(|k| -> Result<Vec<CausalConv2d>> {
                let vs = vb.pp("bands").pp(k);
                let mut c = vec![spec_conv(2, ch, (9, 3), (1, 1), (1, 1), vs.pp(0))?];
                for i in 0..3 {
                    c.push(spec_conv(ch, ch, (9, 3), (2, 1), (1, 1), vs.pp(i + 1))?);
                }
                c.push(spec_conv(ch, ch, (3, 3), (1, 1), (1, 1), vs.pp(4))?);
                Ok(c)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            stft,
            bands,
            stacks,
            out: spec_conv(ch, 1, (3, 3), (1, 1), (1, 1), vb.pp("out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let spec = complex_spec(&self.stft, x)?;
        let mut feats = Vec::new();
        let mut outs = Vec::with_capacity(self.bands.len());
        for (&(a, b), stack) in self.bands.iter().zip(&self.stacks) {
            let mut h = spec.narrow(2, a, b - a)?;
            for c in stack {
                h = leaky(&c.forward(&h)?)?;
                feats.push(h.clone());
            }
            outs.push(h);
        }
        let h = Tensor::cat(&outs, 2)?;
        Ok((self.out.forward(&h)?.flatten_from(1)?, feats))
    }
}

/// DAC's multi-band multi-resolution STFT discriminator. Parameters
/// `resolutions.{k}.bands.{b}.{i}`, `resolutions.{k}.out`.
#[derive(Debug, Clone)]
pub struct MultiBandDiscriminator {
    discs: Vec<BandDisc>,
}

impl MultiBandDiscriminator {
    /// One discriminator per FFT size; errors name the field.
    pub fn new(cfg: &MrdConfig, vb: VarBuilder) -> Result<Self> {
        check_ffts(&cfg.n_ffts, "mrd.n_ffts")?;
        ensure(cfg.channels > 0, "mrd.channels", || "must be > 0".into())?;
        ensure(
            cfg.bands.len() >= 2
                && cfg.bands.first() == Some(&0.0)
                && cfg.bands.last() == Some(&1.0)
                && cfg.bands.windows(2).all(|w| w[1] > w[0]),
            "mrd.bands",
            || format!("needs increasing edges from 0 to 1, got {:?}", cfg.bands),
        )?;
        let discs = cfg
            .n_ffts
            .iter()
            .enumerate()
            .map(|(k, &n)| BandDisc::new(n, cfg, vb.pp("resolutions").pp(k)))
            .collect::<Result<_>>()?;
        Ok(Self { discs })
    }

    /// Logits and feature maps of every resolution for `audio` `[batch,
    /// channels, samples]`.
    pub fn forward(&self, audio: &Tensor) -> Result<DiscOutput> {
        each(&self.discs, &fold_channels(audio)?, BandDisc::forward)
    }
}

/// The `discriminators:` section: which discriminators, each optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DiscriminatorsConfig {
    /// Multi-scale waveform discriminator.
    #[serde(default)]
    pub msd: Option<MsdConfig>,
    /// Multi-period discriminator.
    #[serde(default)]
    pub mpd: Option<MpdConfig>,
    /// Multi-scale complex STFT discriminator.
    #[serde(default)]
    pub ms_stft: Option<MsStftConfig>,
    /// Multi-band multi-resolution STFT discriminator.
    #[serde(default)]
    pub mrd: Option<MrdConfig>,
    /// Patch discriminator over mel images (mel models only, alone).
    #[serde(default)]
    pub patch: Option<PatchConfig>,
}

impl DiscriminatorsConfig {
    /// The waveform discriminators configured (their keys).
    pub fn waveform_keys(&self) -> Vec<&'static str> {
        [
            (self.msd.is_some(), "msd"),
            (self.mpd.is_some(), "mpd"),
            (self.ms_stft.is_some(), "ms_stft"),
            (self.mrd.is_some(), "mrd"),
        ]
        .into_iter()
        .filter_map(|(on, k)| on.then_some(k))
        .collect()
    }
}

/// What adversarial training needs of a discriminator: logits and hidden
/// feature maps of a batch (audio `[batch, channels, samples]` for the
/// waveform discriminators, a log-mel `[batch, n_mels, frames]` for the
/// patch discriminator).
pub trait Discriminator {
    /// Logits and feature maps of every sub-discriminator for `x`.
    fn judge(&self, x: &Tensor) -> Result<DiscOutput>;
}

impl Discriminator for Discriminators {
    fn judge(&self, x: &Tensor) -> Result<DiscOutput> {
        self.forward(x)
    }
}

/// The `patch:` settings: a PatchGAN over mel images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchConfig {
    /// Width of the first conv (doubled per strided layer, up to 8x).
    pub channels: usize,
    /// Strided (2x2) layers; each patch logit sees about `2^(layers + 1)`
    /// bins and frames.
    pub layers: usize,
}

impl Default for PatchConfig {
    /// taming transformers' `NLayerDiscriminator` widths (64, 3 layers).
    fn default() -> Self {
        Self {
            channels: 64,
            layers: 3,
        }
    }
}

/// A PatchGAN over log-mel images (pix2pix; taming transformers'
/// `NLayerDiscriminator` as SpecVQGAN uses it), without normalisation
/// layers: `convs.0` (3x3, 1 -> `channels`, stride 2), `convs.{i}` for
/// `i < layers` (3x3, stride 2, width doubling up to 8 `channels`), one
/// more 3x3 conv at stride 1, then `out` (3x3, one logit per patch), all
/// weight-normed, leaky ReLU 0.1 between. BatchNorm (the original's) is
/// left out: its batch statistics would make one clip's logits depend on
/// the rest of the batch and add running buffers to the checkpoint.
#[derive(Debug, Clone)]
pub struct PatchDiscriminator {
    convs: Vec<CausalConv2d>,
    out: CausalConv2d,
}

impl PatchDiscriminator {
    /// Builds it; errors name the field.
    pub fn new(cfg: &PatchConfig, vb: VarBuilder) -> Result<Self> {
        ensure(cfg.channels > 0, "discriminators.patch.channels", || {
            "must be > 0".into()
        })?;
        ensure(
            (1..=6).contains(&cfg.layers),
            "discriminators.patch.layers",
            || format!("must be 1..=6, got {}", cfg.layers),
        )?;
        let vc = vb.pp("convs");
        let width = |i: usize| cfg.channels << i.min(3);
        let mut convs = vec![spec_conv(1, width(0), (3, 3), (2, 2), (1, 1), vc.pp(0))?];
        for i in 1..cfg.layers {
            convs.push(spec_conv(
                width(i - 1),
                width(i),
                (3, 3),
                (2, 2),
                (1, 1),
                vc.pp(i),
            )?);
        }
        let last = width(cfg.layers);
        convs.push(spec_conv(
            width(cfg.layers - 1),
            last,
            (3, 3),
            (1, 1),
            (1, 1),
            vc.pp(cfg.layers),
        )?);
        Ok(Self {
            convs,
            out: spec_conv(last, 1, (3, 3), (1, 1), (1, 1), vb.pp("out"))?,
        })
    }

    /// Patch logits `[batch, patches]` and the hidden feature maps of
    /// `mel` `[batch, n_mels, frames]`.
    pub fn forward(&self, mel: &Tensor) -> Result<DiscOutput> {
        let mut h = match mel.dims() {
            [_, m, t] if *m > 0 && *t > 0 => mel.unsqueeze(1)?,
            d => {
                return Err(Error::Shape {
                    what: "patch discriminator input".into(),
                    expected: "a log-mel [batch, n_mels, frames]".into(),
                    got: format!("{d:?}"),
                })
            }
        };
        let mut feats = Vec::with_capacity(self.convs.len());
        for c in &self.convs {
            h = leaky(&c.forward(&h)?)?;
            feats.push(h.clone());
        }
        Ok(DiscOutput {
            logits: vec![self.out.forward(&h)?.flatten_from(1)?],
            features: vec![feats],
        })
    }
}

impl Discriminator for PatchDiscriminator {
    fn judge(&self, x: &Tensor) -> Result<DiscOutput> {
        self.forward(x)
    }
}

/// The configured discriminators together. Parameters `msd.*`, `mpd.*`,
/// `ms_stft.*`, `mrd.*`.
#[derive(Debug, Clone)]
pub struct Discriminators {
    msd: Option<MultiScaleDiscriminator>,
    mpd: Option<MultiPeriodDiscriminator>,
    ms_stft: Option<MultiScaleStftDiscriminator>,
    mrd: Option<MultiBandDiscriminator>,
}

impl Discriminators {
    /// Builds the configured waveform discriminators; at least one is
    /// needed, and a `patch` (mel images) is refused.
    pub fn new(cfg: &DiscriminatorsConfig, vb: VarBuilder) -> Result<Self> {
        ensure(cfg.patch.is_none(), "discriminators.patch", || {
            "judges mel images (mel VQ-VAE); a waveform model takes msd, mpd, ms_stft or mrd".into()
        })?;
        ensure(
            cfg.msd.is_some() || cfg.mpd.is_some() || cfg.ms_stft.is_some() || cfg.mrd.is_some(),
            "discriminators",
            || "configure at least one (msd, mpd, ms_stft, mrd)".into(),
        )?;
        Ok(Self {
            msd: cfg
                .msd
                .as_ref()
                .map(|c| MultiScaleDiscriminator::new(c, vb.pp("msd")))
                .transpose()?,
            mpd: cfg
                .mpd
                .as_ref()
                .map(|c| MultiPeriodDiscriminator::new(c, vb.pp("mpd")))
                .transpose()?,
            ms_stft: cfg
                .ms_stft
                .as_ref()
                .map(|c| MultiScaleStftDiscriminator::new(c, vb.pp("ms_stft")))
                .transpose()?,
            mrd: cfg
                .mrd
                .as_ref()
                .map(|c| MultiBandDiscriminator::new(c, vb.pp("mrd")))
                .transpose()?,
        })
    }

    /// Logits and feature maps of every sub-discriminator (MSD scales, MPD
    /// periods, MS-STFT scales, MRD resolutions, in that order) for `audio`
    /// `[batch, channels, samples]`.
    pub fn forward(&self, audio: &Tensor) -> Result<DiscOutput> {
        let mut out = DiscOutput {
            logits: Vec::new(),
            features: Vec::new(),
        };
        if let Some(m) = &self.msd {
            out.extend(m.forward(audio)?);
        }
        if let Some(m) = &self.mpd {
            out.extend(m.forward(audio)?);
        }
        if let Some(m) = &self.ms_stft {
            out.extend(m.forward(audio)?);
        }
        if let Some(m) = &self.mrd {
            out.extend(m.forward(audio)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;
    use melvae_layers::testing::{check_module, max_abs_diff, noise};

    fn tiny() -> DiscriminatorsConfig {
        DiscriminatorsConfig {
            msd: Some(MsdConfig {
                scales: 2,
                channels: 4,
                max_channels: 16,
                downsamples: 2,
            }),
            mpd: Some(MpdConfig {
                periods: vec![2, 3],
                channels: 2,
                max_channels: 8,
                layers: 2,
            }),
            ms_stft: Some(MsStftConfig {
                n_ffts: vec![32, 16],
                channels: 2,
            }),
            mrd: Some(MrdConfig {
                n_ffts: vec![32],
                bands: vec![0.0, 0.5, 1.0],
                channels: 2,
            }),
            patch: None,
        }
    }

    #[test]
    fn avg_pool_matches_torch() {
        // torch.nn.AvgPool1d(4, 2, padding=2) on 1..=6 (count_include_pad):
        // [0.75, 2.5, 4.5, 2.75].
        let x = Tensor::new(&[[[1f32, 2., 3., 4., 5., 6.]]], &Device::Cpu).unwrap();
        let y = avg_pool_4_2(&x).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.75, 2.5, 4.5, 2.75]
        );
        // Odd length 5: floor((5 + 4 - 4) / 2) + 1 = 3 outputs.
        let y = avg_pool_4_2(&x.narrow(2, 0, 5).unwrap()).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.75, 2.5, 3.0]
        );
    }

    #[test]
    fn shapes_and_feature_map_counts() {
        let vm = VarMap::new();
        let d = Discriminators::new(
            &tiny(),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        // Stereo: channels folded into the batch (2 x 2 = 4 signals).
        let x = noise(&[2, 2, 600], 1)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let out = d.forward(&x).unwrap();
        assert_eq!(out.logits.len(), 2 + 2 + 2 + 1);
        // MSD: input conv, 2 strided, 1 wide = 4 feature maps per scale;
        // MPD: 2 strided + 1 = 3 per period; MS-STFT: 5 convs per scale;
        // MRD: 5 convs per band, 2 bands.
        let counts: Vec<usize> = out.features.iter().map(Vec::len).collect();
        assert_eq!(counts, [4, 4, 3, 3, 5, 5, 10]);
        for l in &out.logits {
            assert_eq!(l.dim(0).unwrap(), 4);
            assert_eq!(l.rank(), 2);
        }
        // Scale 0 sees 600 samples / 16; scale 1 the pooled 301 -> 19.
        assert_eq!(out.logits[0].dims(), &[4, 38]);
        assert_eq!(out.logits[1].dims(), &[4, 19]);
        // Period 2: 300 rows -> 100 -> 34, times 2 phases.
        assert_eq!(out.logits[2].dims(), &[4, 34 * 2]);
        // MS-STFT n_fft 32: 17 bins -> 9 -> 5 -> 3, 76 frames; n_fft 16:
        // 9 bins -> 2, 151 frames.
        assert_eq!(out.logits[4].dims(), &[4, 3 * 76]);
        assert_eq!(out.logits[5].dims(), &[4, 2 * 151]);
        // MRD: bands of 8 and 9 bins -> 1 and 2, joined: 3 x 76.
        assert_eq!(out.logits[6].dims(), &[4, 3 * 76]);
        // The reference sizes build (one scale, period and resolution of
        // each, to keep the test fast).
        let full = DiscriminatorsConfig {
            msd: Some(MsdConfig {
                scales: 1,
                ..MsdConfig::default()
            }),
            mpd: Some(MpdConfig {
                periods: vec![11],
                ..MpdConfig::default()
            }),
            ms_stft: Some(MsStftConfig {
                n_ffts: vec![128],
                ..MsStftConfig::default()
            }),
            mrd: Some(MrdConfig {
                n_ffts: vec![512],
                ..MrdConfig::default()
            }),
            patch: None,
        };
        let vm = VarMap::new();
        let d = Discriminators::new(
            &full,
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let out = d
            .forward(
                &noise(&[1, 1, 1024], 2)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(out.logits.len(), 4);
    }

    #[test]
    fn gradients_reach_the_audio_and_every_weight() {
        let cfg = DiscriminatorsConfig {
            msd: Some(MsdConfig {
                scales: 2,
                channels: 4,
                max_channels: 8,
                downsamples: 1,
            }),
            mpd: Some(MpdConfig {
                periods: vec![2],
                channels: 2,
                max_channels: 4,
                layers: 1,
            }),
            ms_stft: Some(MsStftConfig {
                n_ffts: vec![16],
                channels: 2,
            }),
            mrd: Some(MrdConfig {
                n_ffts: vec![16],
                bands: vec![0.0, 0.5, 1.0],
                channels: 2,
            }),
            patch: None,
        };
        let vm = VarMap::new();
        let d = Discriminators::new(&cfg, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu))
            .unwrap();
        let x = Var::from_tensor(&noise(&[1, 1, 24], 3).unwrap()).unwrap();
        check_module(&vm, 0.3, 4, &[("audio", &x)], || {
            let out = d
                .forward(x.as_tensor())
                .map_err(|e| melvae_layers::Error::Invalid {
                    what: "disc".into(),
                    reason: e.to_string(),
                })?;
            let mut all: Vec<Tensor> = out
                .logits
                .iter()
                .map(|l| l.flatten_all())
                .collect::<candle_core::Result<_>>()?;
            for f in out.features.iter().flatten() {
                all.push(f.flatten_all()?);
            }
            Ok(Tensor::cat(&all, 0)?)
        })
        .unwrap();
    }

    #[test]
    fn bad_configs_and_inputs_are_named() {
        let vb = |vm: &VarMap| VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
        let vm = VarMap::new();
        let e = Discriminators::new(&DiscriminatorsConfig::default(), vb(&vm))
            .unwrap_err()
            .to_string();
        assert!(e.contains("discriminators"), "{e}");
        let bad = DiscriminatorsConfig {
            mpd: Some(MpdConfig {
                periods: vec![2, 0],
                ..MpdConfig::default()
            }),
            ..Default::default()
        };
        let e = Discriminators::new(&bad, vb(&vm)).unwrap_err().to_string();
        assert!(e.contains("mpd.periods"), "{e}");
        let bad = DiscriminatorsConfig {
            msd: Some(MsdConfig {
                channels: 2,
                ..MsdConfig::default()
            }),
            ..Default::default()
        };
        let e = Discriminators::new(&bad, vb(&vm)).unwrap_err().to_string();
        assert!(e.contains("msd.channels"), "{e}");
        let bad = DiscriminatorsConfig {
            mrd: Some(MrdConfig {
                bands: vec![0.0, 0.6, 0.5, 1.0],
                ..MrdConfig::default()
            }),
            ..Default::default()
        };
        let e = Discriminators::new(&bad, vb(&vm)).unwrap_err().to_string();
        assert!(e.contains("mrd.bands"), "{e}");
        let bad = DiscriminatorsConfig {
            ms_stft: Some(MsStftConfig {
                n_ffts: vec![4],
                channels: 2,
            }),
            ..Default::default()
        };
        let e = Discriminators::new(&bad, vb(&vm)).unwrap_err().to_string();
        assert!(e.contains("ms_stft.n_ffts"), "{e}");
        let d = Discriminators::new(&tiny(), vb(&VarMap::new())).unwrap();
        let e = d
            .forward(&Tensor::zeros((2, 100), DType::F32, &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("[batch, channels, samples]"), "{e}");
        let _ = max_abs_diff;
        // The patch discriminator judges mels: not with the waveform ones,
        // and its own settings and input are named.
        let patch = DiscriminatorsConfig {
            patch: Some(PatchConfig::default()),
            ..tiny()
        };
        let e = Discriminators::new(&patch, vb(&vm))
            .unwrap_err()
            .to_string();
        assert!(e.contains("discriminators.patch"), "{e}");
        assert_eq!(patch.waveform_keys(), ["msd", "mpd", "ms_stft", "mrd"]);
        for (cfg, key) in [
            (
                PatchConfig {
                    channels: 0,
                    layers: 2,
                },
                "discriminators.patch.channels",
            ),
            (
                PatchConfig {
                    channels: 4,
                    layers: 0,
                },
                "discriminators.patch.layers",
            ),
        ] {
            let e = PatchDiscriminator::new(&cfg, vb(&vm))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e}");
        }
        let p = PatchDiscriminator::new(&PatchConfig::default(), vb(&VarMap::new())).unwrap();
        let e = p
            .judge(&Tensor::zeros((2, 1, 80, 8), DType::F32, &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("patch discriminator input"), "{e}");
    }

    /// One logit per patch: 80 mels x 84 frames, 3 strided layers: 10 x 10
    /// patches; feature maps of every conv but the last.
    #[test]
    fn patch_discriminator_shapes_and_gradients() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let d = PatchDiscriminator::new(&PatchConfig::default(), vb).unwrap();
        let mel = noise(&[2, 80, 84], 1)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let out = d.judge(&mel).unwrap();
        assert_eq!(out.logits.len(), 1);
        assert_eq!(out.logits[0].dims(), &[2, 10 * 10]);
        let widths: Vec<usize> = out.features[0].iter().map(|f| f.dim(1).unwrap()).collect();
        assert_eq!(widths, [64, 128, 256, 512]);

        let vm = VarMap::new();
        let cfg = PatchConfig {
            channels: 2,
            layers: 2,
        };
        let d =
            PatchDiscriminator::new(&cfg, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu))
                .unwrap();
        let x = Var::from_tensor(&noise(&[1, 6, 5], 3).unwrap()).unwrap();
        check_module(&vm, 0.3, 4, &[("mel", &x)], || {
            let out = d
                .judge(x.as_tensor())
                .map_err(|e| melvae_layers::Error::Invalid {
                    what: "patch".into(),
                    reason: e.to_string(),
                })?;
            let mut all = vec![out.logits[0].flatten_all()?];
            for f in &out.features[0] {
                all.push(f.flatten_all()?);
            }
            Ok(Tensor::cat(&all, 0)?)
        })
        .unwrap();
    }
}
