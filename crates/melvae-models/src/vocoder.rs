//! Vocos (Siuzdak, 2023): a mel-to-waveform vocoder that predicts STFT
//! magnitudes and phases frame by frame and inverts them with an ISTFT.
//!
//! Parameter names are the `vocos` package's `state_dict` names, so its
//! published checkpoints load ([`Vocos::from_pretrained`] reads the
//! package's `config.yaml` and `pytorch_model.bin` or a safetensors file):
//!
//! - `backbone.embed` (Conv1d, kernel 7, "same") from mels to `dim`;
//! - `backbone.norm`: LayerNorm (eps 1e-6), or AdaLayerNorm
//!   (`scale.weight`, `shift.weight`, `[num_embeddings, dim]`, a row chosen
//!   by a condition id) when `adanorm_num_embeddings` is set;
//! - `backbone.convnext.{i}`: depthwise conv (`dwconv`, kernel 7), norm,
//!   `pwconv1` (Linear to `intermediate_dim`), exact GELU, `pwconv2`, layer
//!   scale `gamma`, residual;
//! - `backbone.final_layer_norm`;
//! - `head.out`: Linear to `n_fft + 2`: log-magnitudes (`exp`, clipped at
//!   100) and phases of `n_fft / 2 + 1` bins, `S = mag (cos p + i sin p)`,
//!   inverted by [`melvae_dsp::TensorIstft`] (Hann, centred or "same"
//!   padding as the config says).
//!
//! A new (untrained) model starts as the package's does: the backbone's
//! convs and linears from `N(0, 0.02)` with zero biases (its
//! `_init_weights`), the head's linear from torch's default (uniform in
//! `±1/sqrt(dim)`), layer scale `gamma` at `layer_scale_init_value`.
//!
//! Layouts: mel `[batch, n_mels, frames]` (natural-log magnitudes, the
//! features [`VocosConfig::mel_config`] describes), audio `[batch,
//! samples]` with `samples = (frames - 1) * hop` ("center") or
//! `frames * hop` ("same"). The package's buffers (`head.istft.window`, the
//! feature extractor's window and filterbank) are recomputed, not loaded.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, VarBuilder};
use melvae_dsp::{MelConfig, PadMode, Padding, StftConfig, TensorIstft, WindowKind};
use melvae_layers::Linear;
use melvae_layers::{Conv1d, Conv1dConfig, ConvPadding, LayerNorm};
use serde::{Deserialize, Serialize};

use crate::error::ensure;
use crate::model_file::Family;
use crate::{Error, Result};

/// How frames are aligned with samples (the package's `padding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VocosPadding {
    /// Frame `t` centred on sample `t * hop` (reflect padding of `n_fft /
    /// 2`); `frames = samples / hop + 1`.
    Center,
    /// Reflect padding of `(n_fft - hop) / 2` without centring; `frames =
    /// samples / hop`.
    Same,
}

/// The mel features a Vocos was trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VocosFeatures {
    /// The `vocos` package's `MelSpectrogramFeatures`: magnitude mels, HTK
    /// scale, no normalisation, 0 to `sample_rate / 2`, `ln(max(x, 1e-7))`
    /// (melvae's `vocos-24k` preset at 24 kHz / 100 mels).
    Vocos,
    /// melvae's `hifigan-22k` preset (HiFi-GAN's mel: Slaney, 0 to 8 kHz,
    /// `ln(max(x, 1e-5))`).
    Hifigan22k,
}

/// A Vocos generator (section `vocos:`; a model file's config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VocosConfig {
    /// Samples per second.
    pub sample_rate: u32,
    /// FFT size of the features and of the ISTFT head.
    pub n_fft: usize,
    /// Hop of the features and of the ISTFT head.
    pub hop_length: usize,
    /// Mel bands of the input.
    pub n_mels: usize,
    /// Frame alignment.
    pub padding: VocosPadding,
    /// Which mel features the input is.
    pub features: VocosFeatures,
    /// Backbone width.
    pub dim: usize,
    /// ConvNeXt hidden width.
    pub intermediate_dim: usize,
    /// ConvNeXt blocks.
    pub num_layers: usize,
    /// Initial layer scale `gamma` (the package's default `1 /
    /// num_layers` when absent); 0 means no layer scale.
    #[serde(default)]
    pub layer_scale_init_value: Option<f64>,
    /// AdaLayerNorm with this many condition embeddings (none: LayerNorm).
    #[serde(default)]
    pub adanorm_num_embeddings: Option<usize>,
    /// melvae's extension, not in the `vocos` package (off for its
    /// checkpoints): the head's log-magnitudes are a correction added to
    /// `ln(max(pinv(F) exp(mel), 1e-5))`, the linear spectrum the mel
    /// implies through the pseudo-inverse of the features' filterbank `F`
    /// ([`melvae_dsp::mel_pseudo_inverse`]). Small models learn the fine
    /// structure instead of the whole envelope (docs/models/vocoder.md).
    #[serde(default)]
    pub magnitude_prior: bool,
}

impl VocosConfig {
    /// The published `charactr/vocos-mel-24khz` configuration.
    pub fn mel_24khz() -> Self {
        Self {
            sample_rate: 24000,
            n_fft: 1024,
            hop_length: 256,
            n_mels: 100,
            padding: VocosPadding::Center,
            features: VocosFeatures::Vocos,
            dim: 512,
            intermediate_dim: 1536,
            num_layers: 8,
            layer_scale_init_value: None,
            adanorm_num_embeddings: None,
            magnitude_prior: false,
        }
    }

    /// Checks the values; errors name `vocos.<field>`.
    pub fn validate(&self) -> Result<()> {
        for (v, f) in [
            (self.sample_rate as usize, "vocos.sample_rate"),
            (self.n_fft, "vocos.n_fft"),
            (self.hop_length, "vocos.hop_length"),
            (self.n_mels, "vocos.n_mels"),
            (self.dim, "vocos.dim"),
            (self.intermediate_dim, "vocos.intermediate_dim"),
        ] {
            ensure(v > 0, f, || "must be > 0".into())?;
        }
        ensure(self.hop_length <= self.n_fft, "vocos.hop_length", || {
            format!("{} exceeds n_fft {}", self.hop_length, self.n_fft)
        })?;
        if self.padding == VocosPadding::Same {
            ensure(
                (self.n_fft - self.hop_length) % 2 == 0,
                "vocos.padding",
                || "\"same\" needs n_fft - hop_length even".into(),
            )?;
        }
        if let Some(n) = self.adanorm_num_embeddings {
            ensure(n > 0, "vocos.adanorm_num_embeddings", || {
                "must be > 0".into()
            })?;
        }
        if let Some(v) = self.layer_scale_init_value {
            ensure(
                v.is_finite() && v >= 0.0,
                "vocos.layer_scale_init_value",
                || format!("must be >= 0, got {v}"),
            )?;
        }
        Ok(())
    }

    fn stft_padding(&self) -> Padding {
        match self.padding {
            VocosPadding::Center => Padding::Center(PadMode::Reflect),
            VocosPadding::Same => {
                Padding::Both((self.n_fft - self.hop_length) / 2, PadMode::Reflect)
            }
        }
    }

    /// The STFT of the features and of the head.
    pub fn stft_config(&self) -> StftConfig {
        StftConfig {
            n_fft: self.n_fft,
            hop_length: self.hop_length,
            win_length: self.n_fft,
            window: WindowKind::Hann,
            periodic: true,
            padding: self.stft_padding(),
        }
    }

    /// The mel features the vocoder expects (melvae-dsp's extractor makes
    /// them from audio).
    pub fn mel_config(&self) -> MelConfig {
        match self.features {
            // The package's features are melvae's vocos-24k preset at
            // this model's rate, sizes and padding.
            VocosFeatures::Vocos => MelConfig {
                sample_rate: self.sample_rate,
                stft: self.stft_config(),
                n_mels: self.n_mels,
                ..MelConfig::vocos_24k()
            },
            VocosFeatures::Hifigan22k => MelConfig {
                sample_rate: self.sample_rate,
                stft: self.stft_config(),
                n_mels: self.n_mels,
                ..MelConfig::hifigan_22k()
            },
        }
    }

    /// Parses the `vocos` package's `config.yaml` (`feature_extractor`,
    /// `backbone`, `head`, each `class_path` and `init_args`); `origin`
    /// names the file in errors. Only `MelSpectrogramFeatures` with
    /// `VocosBackbone` and `ISTFTHead` is a mel vocoder.
    pub fn from_vocos_yaml(text: &str, origin: &Path) -> Result<Self> {
        let err = |reason: String| Error::ModelFile {
            path: origin.to_path_buf(),
            reason,
        };
        let doc: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| err(format!("is not YAML: {e}")))?;
        let section = |name: &str, class: &str| -> Result<serde_yaml::Value> {
            let s = doc
                .get(name)
                .ok_or_else(|| err(format!("has no `{name}` section")))?;
            let path = s.get("class_path").and_then(|v| v.as_str()).unwrap_or("");
            if !path.ends_with(class) {
                return Err(err(format!(
                    "`{name}.class_path` is `{path}`; melvae reads `{class}` (a mel vocoder)"
                )));
            }
            Ok(s.get("init_args")
                .cloned()
                .unwrap_or(serde_yaml::Value::Null))
        };
        let (fe, bb, head) = (
            section("feature_extractor", "MelSpectrogramFeatures")?,
            section("backbone", "VocosBackbone")?,
            section("head", "ISTFTHead")?,
        );
        let int =
            |s: &serde_yaml::Value, sec: &str, key: &str, default: Option<u64>| match s.get(key) {
                Some(v) => v.as_u64().ok_or_else(|| {
                    err(format!(
                        "`{sec}.init_args.{key}` must be a whole number, got {v:?}"
                    ))
                }),
                None => default.ok_or_else(|| err(format!("has no `{sec}.init_args.{key}`"))),
            };
        let padding_of = |s: &serde_yaml::Value, sec: &str| -> Result<VocosPadding> {
            match s
                .get("padding")
                .and_then(|v| v.as_str())
                .unwrap_or("center")
            {
                "center" => Ok(VocosPadding::Center),
                "same" => Ok(VocosPadding::Same),
                p => Err(err(format!(
                    "`{sec}.init_args.padding` is `{p}`; expected center or same"
                ))),
            }
        };
        let cfg = Self {
            sample_rate: int(&fe, "feature_extractor", "sample_rate", Some(24000))? as u32,
            n_fft: int(&fe, "feature_extractor", "n_fft", Some(1024))? as usize,
            hop_length: int(&fe, "feature_extractor", "hop_length", Some(256))? as usize,
            n_mels: int(&fe, "feature_extractor", "n_mels", Some(100))? as usize,
            padding: padding_of(&fe, "feature_extractor")?,
            features: VocosFeatures::Vocos,
            dim: int(&bb, "backbone", "dim", None)? as usize,
            intermediate_dim: int(&bb, "backbone", "intermediate_dim", None)? as usize,
            num_layers: int(&bb, "backbone", "num_layers", None)? as usize,
            layer_scale_init_value: bb.get("layer_scale_init_value").and_then(|v| v.as_f64()),
            adanorm_num_embeddings: match bb.get("adanorm_num_embeddings") {
                Some(v) if !v.is_null() => {
                    Some(int(&bb, "backbone", "adanorm_num_embeddings", None)? as usize)
                }
                _ => None,
            },
            magnitude_prior: false,
        };
        let checks = [
            (
                "backbone.init_args.input_channels",
                int(&bb, "backbone", "input_channels", None)?,
                cfg.n_mels as u64,
            ),
            (
                "head.init_args.dim",
                int(&head, "head", "dim", None)?,
                cfg.dim as u64,
            ),
            (
                "head.init_args.n_fft",
                int(&head, "head", "n_fft", None)?,
                cfg.n_fft as u64,
            ),
            (
                "head.init_args.hop_length",
                int(&head, "head", "hop_length", None)?,
                cfg.hop_length as u64,
            ),
        ];
        for (key, got, want) in checks {
            if got != want {
                return Err(err(format!(
                    "`{key}` is {got}, but the features give {want}"
                )));
            }
        }
        if padding_of(&head, "head")? != cfg.padding {
            return Err(err(
                "`head.init_args.padding` differs from `feature_extractor.init_args.padding`"
                    .into(),
            ));
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Creates `prefix.weight` of `shape` from `N(0, 0.02)` and `prefix.bias`
/// (`shape[0]`) at zero, the `vocos` package's `_init_weights` for the
/// backbone's convs and linears; a no-op for a builder that loads weights
/// (the layer built next asks for the same names and gets these).
fn package_init(vb: &VarBuilder, shape: &[usize]) -> Result<()> {
    vb.get_with_hints(
        shape,
        "weight",
        candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        },
    )?;
    vb.get_with_hints(shape[0], "bias", candle_nn::Init::Const(0.0))?;
    Ok(())
}

/// `pinv(F)` `[n_fft / 2 + 1, n_mels]` of the features' filterbank, for
/// [`VocosConfig::magnitude_prior`].
fn magnitude_prior(cfg: &VocosConfig, device: &Device, dtype: DType) -> Result<Tensor> {
    let pinv = melvae_dsp::mel_pseudo_inverse(&cfg.mel_config().filterbank()?)?;
    let (bins, mels) = pinv.dim();
    let data: Vec<f64> = pinv.iter().copied().collect();
    Ok(Tensor::from_vec(data, (bins, mels), device)?.to_dtype(dtype)?)
}

/// LayerNorm, or AdaLayerNorm (a row of `scale` and `shift` per condition).
#[derive(Debug, Clone)]
enum Norm {
    Plain(LayerNorm),
    Ada {
        scale: Tensor,
        shift: Tensor,
        norm: LayerNorm,
    },
}

const EPS: f64 = 1e-6;

impl Norm {
    fn new(cfg: &VocosConfig, vb: VarBuilder) -> Result<Self> {
        Ok(match cfg.adanorm_num_embeddings {
            None => Self::Plain(LayerNorm::new(cfg.dim, EPS, true, vb)?),
            Some(n) => Self::Ada {
                scale: vb.pp("scale").get_with_hints(
                    (n, cfg.dim),
                    "weight",
                    candle_nn::Init::Const(1.0),
                )?,
                shift: vb.pp("shift").get_with_hints(
                    (n, cfg.dim),
                    "weight",
                    candle_nn::Init::Const(0.0),
                )?,
                norm: LayerNorm::new(cfg.dim, EPS, false, vb)?,
            },
        })
    }

    /// `x`: `[batch, frames, dim]`.
    fn forward(&self, x: &Tensor, cond: Option<usize>) -> Result<Tensor> {
        Ok(match self {
            Self::Plain(n) => n.forward(x)?,
            Self::Ada { scale, shift, norm } => {
                let id = cond.ok_or_else(|| {
                    Error::invalid("vocos condition", "AdaLayerNorm needs a condition id")
                })?;
                let y = norm.forward(x)?;
                y.broadcast_mul(&scale.get(id)?)?
                    .broadcast_add(&shift.get(id)?)?
            }
        })
    }
}

#[derive(Debug, Clone)]
struct ConvNeXtBlock {
    dwconv: Conv1d,
    norm: Norm,
    pwconv1: Linear,
    pwconv2: Linear,
    gamma: Option<Tensor>,
}

impl ConvNeXtBlock {
    fn new(cfg: &VocosConfig, vb: VarBuilder) -> Result<Self> {
        let dw = Conv1dConfig {
            groups: cfg.dim,
            padding: ConvPadding::Same,
            ..Conv1dConfig::causal(cfg.dim, cfg.dim, 7)
        };
        let scale = cfg
            .layer_scale_init_value
            .unwrap_or(1.0 / cfg.num_layers.max(1) as f64);
        package_init(&vb.pp("dwconv"), &[cfg.dim, 1, 7])?;
        package_init(&vb.pp("pwconv1"), &[cfg.intermediate_dim, cfg.dim])?;
        package_init(&vb.pp("pwconv2"), &[cfg.dim, cfg.intermediate_dim])?;
        Ok(Self {
            dwconv: Conv1d::new(dw, vb.pp("dwconv"))?,
            norm: Norm::new(cfg, vb.pp("norm"))?,
            pwconv1: melvae_layers::linear(cfg.dim, cfg.intermediate_dim, vb.pp("pwconv1"))?,
            pwconv2: melvae_layers::linear(cfg.intermediate_dim, cfg.dim, vb.pp("pwconv2"))?,
            gamma: if scale > 0.0 {
                Some(vb.get_with_hints(cfg.dim, "gamma", candle_nn::Init::Const(scale))?)
            } else {
                None
            },
        })
    }

    /// `x`: `[batch, dim, frames]`.
    fn forward(&self, x: &Tensor, cond: Option<usize>) -> Result<Tensor> {
        let h = self.dwconv.forward(x)?.transpose(1, 2)?;
        let h = self.norm.forward(&h, cond)?;
        let h = self
            .pwconv2
            .forward(&melvae_layers::act::gelu(&self.pwconv1.forward(&h)?)?)?;
        let h = match &self.gamma {
            Some(g) => h.broadcast_mul(g)?,
            None => h,
        };
        Ok((x + h.transpose(1, 2)?)?)
    }
}

/// The Vocos generator; see the module docs.
#[derive(Debug, Clone)]
pub struct Vocos {
    cfg: VocosConfig,
    embed: Conv1d,
    norm: Norm,
    blocks: Vec<ConvNeXtBlock>,
    final_norm: LayerNorm,
    out: Linear,
    /// `pinv(F)` `[n_fft / 2 + 1, n_mels]` with `magnitude_prior`.
    prior: Option<Tensor>,
    istft: TensorIstft,
}

impl Vocos {
    /// Builds the generator, every parameter from `vb` (names as the
    /// package's `state_dict`).
    pub fn new(cfg: VocosConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let bb = vb.pp("backbone");
        package_init(&bb.pp("embed"), &[cfg.dim, cfg.n_mels, 7])?;
        // torch's default for the head's Linear (candle-nn's is Kaiming
        // normal, sqrt(6) times wider).
        let bound = 1.0 / (cfg.dim as f64).sqrt();
        vb.pp("head").pp("out").get_with_hints(
            (cfg.n_fft + 2, cfg.dim),
            "weight",
            candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let embed = Conv1d::new(
            Conv1dConfig {
                padding: ConvPadding::Same,
                ..Conv1dConfig::causal(cfg.n_mels, cfg.dim, 7)
            },
            bb.pp("embed"),
        )?;
        let blocks = (0..cfg.num_layers)
            .map(|i| ConvNeXtBlock::new(&cfg, bb.pp("convnext").pp(i)))
            .collect::<Result<_>>()?;
        Ok(Self {
            embed,
            norm: Norm::new(&cfg, bb.pp("norm"))?,
            blocks,
            final_norm: LayerNorm::new(cfg.dim, EPS, true, bb.pp("final_layer_norm"))?,
            out: melvae_layers::linear(cfg.dim, cfg.n_fft + 2, vb.pp("head").pp("out"))?,
            prior: cfg
                .magnitude_prior
                .then(|| magnitude_prior(&cfg, vb.device(), vb.dtype()))
                .transpose()?,
            istft: TensorIstft::new(cfg.stft_config(), vb.device())?,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VocosConfig {
        &self.cfg
    }

    /// Loads a melvae model file of a Vocos (see [`crate::model_file`]).
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Ok(crate::model_file::load::<Self>(path, device, dtype)?.0)
    }

    /// Loads a checkpoint of the `vocos` package: its `config.yaml` and its
    /// weights (`pytorch_model.bin`, a PyTorch pickle of the `state_dict`,
    /// or a safetensors file with the same names). Missing or mis-shaped
    /// parameters are errors naming them; the package's buffers are
    /// ignored.
    pub fn from_pretrained(
        config_yaml: &Path,
        weights: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let text = std::fs::read_to_string(config_yaml).map_err(|e| Error::ModelFile {
            path: config_yaml.to_path_buf(),
            reason: e.to_string(),
        })?;
        let cfg = VocosConfig::from_vocos_yaml(&text, config_yaml)?;
        let tensors = read_state_dict(weights)?;
        crate::model_file::from_tensors::<Self>(cfg, &tensors, weights, device, dtype)
    }

    /// The backbone's features `[batch, frames, dim]` of `mel` (`[batch,
    /// n_mels, frames]`); `cond` picks the AdaLayerNorm row (required with
    /// `adanorm_num_embeddings`, refused without).
    pub fn backbone(&self, mel: &Tensor, cond: Option<usize>) -> Result<Tensor> {
        self.check_cond(cond)?;
        let (_, m, _) = mel.dims3().map_err(|_| Error::Shape {
            what: "vocos mel".into(),
            expected: "[batch, n_mels, frames]".into(),
            got: format!("{:?}", mel.dims()),
        })?;
        if m != self.cfg.n_mels {
            return Err(Error::Shape {
                what: "vocos mel".into(),
                expected: format!("[batch, {}, frames]", self.cfg.n_mels),
                got: format!("{:?}", mel.dims()),
            });
        }
        let x = self.embed.forward(mel)?;
        let mut x = self
            .norm
            .forward(&x.transpose(1, 2)?, cond)?
            .transpose(1, 2)?;
        for b in &self.blocks {
            x = b.forward(&x, cond)?;
        }
        Ok(self.final_norm.forward(&x.transpose(1, 2)?)?)
    }

    /// The condition id `cond` against the model: required (and in range)
    /// with AdaLayerNorm, refused without.
    fn check_cond(&self, cond: Option<usize>) -> Result<()> {
        match (self.cfg.adanorm_num_embeddings, cond) {
            (Some(n), Some(c)) => ensure(c < n, "vocos condition", || {
                format!("id {c} is out of range: the model has {n} (0 to {})", n - 1)
            })?,
            (Some(n), None) => ensure(false, "vocos condition", || {
                format!("this model has AdaLayerNorm: give a condition id below {n}")
            })?,
            (None, Some(_)) => ensure(false, "vocos condition", || {
                "this model takes no condition id (no AdaLayerNorm)".into()
            })?,
            (None, None) => {}
        }
        Ok(())
    }

    /// Decodes `mel` (`[batch, n_mels, frames]`) to audio `[batch,
    /// samples]` (see the module docs for the length).
    pub fn decode(&self, mel: &Tensor, cond: Option<usize>) -> Result<Tensor> {
        self.istft_of(&self.spectrum_frames(mel, cond)?)
    }
}

impl Vocos {
    /// Frames of context each output frame of the backbone sees on each
    /// side: 3 for the input conv and 3 per ConvNeXt block (kernel 7).
    pub fn context_frames(&self) -> usize {
        3 * (self.cfg.num_layers + 1)
    }

    /// [`Vocos::decode`] of a long mel in chunks of `chunk` frames: the
    /// backbone and head run on each chunk with
    /// [`Vocos::context_frames`] of context on both sides (so its central
    /// frames equal the offline ones), and one ISTFT joins the spectra.
    /// Equals the offline output (up to float rounding) with the
    /// backbone's memory bounded by the chunk.
    pub fn decode_chunked(
        &self,
        mel: &Tensor,
        cond: Option<usize>,
        chunk: usize,
    ) -> Result<Tensor> {
        ensure(chunk > 0, "vocos chunk", || "must be > 0 frames".into())?;
        let frames = mel.dim(2)?;
        let ctx = self.context_frames();
        let mut parts = Vec::new();
        let mut start = 0;
        while start < frames {
            let len = chunk.min(frames - start);
            let (a, b) = (start.saturating_sub(ctx), (start + len + ctx).min(frames));
            let h = self.spectrum_frames(&mel.narrow(2, a, b - a)?, cond)?;
            parts.push(h.narrow(2, start - a, len)?);
            start += len;
        }
        let h = Tensor::cat(&parts, 2)?;
        self.istft_of(&h)
    }

    /// The head's output `[batch, n_fft + 2, frames]` (log-magnitudes, then
    /// phases), the magnitude prior added when the model has one.
    fn spectrum_frames(&self, mel: &Tensor, cond: Option<usize>) -> Result<Tensor> {
        let h = self
            .out
            .forward(&self.backbone(mel, cond)?)?
            .transpose(1, 2)?;
        let Some(pinv) = &self.prior else {
            return Ok(h);
        };
        let bins = self.cfg.n_fft / 2 + 1;
        let prior = pinv.broadcast_matmul(&mel.exp()?)?.maximum(1e-5)?.log()?;
        let mag = (h.narrow(1, 0, bins)? + prior)?;
        Ok(Tensor::cat(&[mag, h.narrow(1, bins, bins)?], 1)?)
    }

    /// Real and imaginary parts `[batch, n_bins, frames]` of the head's
    /// output (magnitude `exp`, clipped at 100).
    fn spectrum(&self, h: &Tensor) -> Result<(Tensor, Tensor)> {
        let bins = self.cfg.n_fft / 2 + 1;
        let mag = h.narrow(1, 0, bins)?.exp()?.minimum(100.0)?;
        let phase = h.narrow(1, bins, bins)?;
        Ok(((&mag * phase.cos()?)?, (&mag * phase.sin()?)?))
    }

    /// Audio `[batch, samples]` of the head's output.
    fn istft_of(&self, h: &Tensor) -> Result<Tensor> {
        let (re, im) = self.spectrum(h)?;
        Ok(self.istft.forward(&re, &im)?)
    }

    /// A stream of this vocoder (see [`VocosStream`]) for condition `cond`
    /// (checked here, as [`Vocos::decode`] checks it).
    pub fn stream(&self, cond: Option<usize>) -> Result<VocosStream> {
        self.check_cond(cond)?;
        Ok(VocosStream {
            istft: self.istft.stream()?,
            vocos: self.clone(),
            cond,
            mel: None,
            mel_start: 0,
            received: 0,
            next: 0,
        })
    }

    /// Mel frames a stream needs after a frame before the audio of that
    /// frame's hop is final: [`Vocos::context_frames`] for the backbone
    /// plus the ISTFT's `ceil(padding / hop)` (a sample is final once no
    /// later frame's window starts before it); 29 at the published 24 kHz
    /// size (309 ms), plus the time to compute a push.
    pub fn lookahead_frames(&self) -> usize {
        let (n, hop) = (self.cfg.n_fft, self.cfg.hop_length);
        self.context_frames() + self.istft.config().padding.amount(n).div_ceil(hop)
    }
}

/// Streaming synthesis: [`VocosStream::push`] mel frames (`[batch, n_mels,
/// frames]`, any number per call) and get the audio (`[batch, samples]`)
/// that no later frame can change; [`VocosStream::finish`] gives the rest.
/// The pieces joined equal [`Vocos::decode`] of the whole mel (up to float
/// rounding): each frame's spectrum is computed once
/// [`Vocos::context_frames`] frames after it have arrived, from a window
/// holding that much context on each side, and the ISTFT streams
/// ([`melvae_dsp::IstftStream`]). Latency: [`Vocos::lookahead_frames`]
/// plus the chunking; state: the last `2 * context_frames` mel frames and
/// one ISTFT overlap. Compute: each push reruns the backbone over its
/// window (`2 * context_frames` + the pushed frames), so one-frame pushes
/// cost about `2 * context_frames + 1` times the offline pass per frame;
/// push a few frames at a time where latency allows. A push that fails
/// (wrong shape) leaves the stream as it was.
#[derive(Debug, Clone)]
pub struct VocosStream {
    vocos: Vocos,
    cond: Option<usize>,
    istft: melvae_dsp::IstftStream,
    /// Mel frames from `mel_start` to `received`.
    mel: Option<Tensor>,
    mel_start: usize,
    received: usize,
    /// The next frame whose spectrum is due.
    next: usize,
}

impl VocosStream {
    /// Feeds mel frames; returns the audio that became final, if any.
    pub fn push(&mut self, mel: &Tensor) -> Result<Option<Tensor>> {
        let (_, m, frames) = mel.dims3().map_err(|_| Error::Shape {
            what: "vocos stream mel".into(),
            expected: "[batch, n_mels, frames]".into(),
            got: format!("{:?}", mel.dims()),
        })?;
        if frames == 0 {
            return Ok(None);
        }
        let n_mels = self.vocos.cfg.n_mels;
        let batch = self.mel.as_ref().map(|b| b.dim(0)).transpose()?;
        if m != n_mels || batch.is_some_and(|b| b != mel.dim(0).unwrap_or(0)) {
            return Err(Error::Shape {
                what: "vocos stream mel".into(),
                expected: match batch {
                    Some(b) => format!("[{b}, {n_mels}, frames] (as so far)"),
                    None => format!("[batch, {n_mels}, frames]"),
                },
                got: format!("{:?}", mel.dims()),
            });
        }
        let buf = match self.mel.take() {
            Some(b) => Tensor::cat(&[&b, &mel.detach()], 2)?,
            None => mel.detach(),
        };
        self.mel = Some(buf);
        self.received += frames;
        self.advance(self.received.saturating_sub(self.vocos.context_frames()))
    }

    /// The audio still held (the last frames, which had no right context
    /// to wait for); the stream then starts afresh.
    pub fn finish(&mut self) -> Result<Option<Tensor>> {
        let last = self.advance(self.received)?;
        let rest = self.istft.finish()?;
        self.reset();
        Ok(match (last, rest) {
            (Some(a), Some(b)) => Some(Tensor::cat(&[a, b], 1)?),
            (a, b) => a.or(b),
        })
    }

    /// Forgets every frame.
    pub fn reset(&mut self) {
        self.istft.reset();
        self.mel = None;
        self.mel_start = 0;
        self.received = 0;
        self.next = 0;
    }

    /// Numbers held between pushes (mel frames and the ISTFT overlap).
    pub fn state_elements(&self) -> usize {
        self.mel.as_ref().map_or(0, |m| m.elem_count()) + self.istft.state_elements()
    }

    /// Computes the spectra of frames `next..until` and streams them
    /// through the ISTFT; drops the mel frames no later spectrum needs.
    fn advance(&mut self, until: usize) -> Result<Option<Tensor>> {
        let Some(buf) = &self.mel else {
            return Ok(None);
        };
        if until <= self.next {
            return Ok(None);
        }
        let h = self.vocos.spectrum_frames(buf, self.cond)?;
        let h = h.narrow(2, self.next - self.mel_start, until - self.next)?;
        let (re, im) = self.vocos.spectrum(&h)?;
        let audio = self.istft.push(&re, &im)?;
        self.next = until;
        let keep_from = self.next.saturating_sub(self.vocos.context_frames());
        let drop = keep_from - self.mel_start;
        if drop > 0 {
            let len = buf.dim(2)? - drop;
            self.mel = Some(buf.narrow(2, drop, len)?);
            self.mel_start = keep_from;
        }
        Ok(audio)
    }
}

impl Family for Vocos {
    const NAME: &'static str = "vocos";
    type Config = VocosConfig;

    fn build(cfg: VocosConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(cfg, vb)
    }
}

/// The named tensors of a `state_dict` file: safetensors, or a PyTorch
/// pickle (`torch.save(state_dict)`, as `pytorch_model.bin`).
pub fn read_state_dict(path: &Path) -> Result<std::collections::HashMap<String, Tensor>> {
    let err = |reason: String| Error::ModelFile {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    if safetensors::SafeTensors::read_metadata(&bytes).is_ok() {
        return candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| err(format!("unreadable safetensors: {e}")));
    }
    let tensors = candle_core::pickle::read_all(path)
        .map_err(|e| err(format!("neither safetensors nor a PyTorch state_dict: {e}")))?;
    Ok(tensors.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use candle_nn::VarMap;
    use melvae_layers::testing::{check_module, noise};

    fn tiny(padding: VocosPadding, adanorm: Option<usize>) -> VocosConfig {
        VocosConfig {
            sample_rate: 8000,
            n_fft: 16,
            hop_length: 4,
            n_mels: 3,
            padding,
            features: VocosFeatures::Vocos,
            dim: 4,
            intermediate_dim: 6,
            num_layers: 1,
            layer_scale_init_value: None,
            adanorm_num_embeddings: adanorm,
            magnitude_prior: false,
        }
    }

    /// The configurations the tests below run through: both paddings, with
    /// and without AdaLayerNorm and the magnitude prior.
    fn variants() -> [VocosConfig; 3] {
        [
            tiny(VocosPadding::Center, None),
            tiny(VocosPadding::Same, Some(2)),
            VocosConfig {
                magnitude_prior: true,
                ..tiny(VocosPadding::Center, None)
            },
        ]
    }

    /// f64 finite differences through the whole generator, the ISTFT head
    /// included (the magnitude clip is far above these small outputs).
    #[test]
    fn gradients_match_finite_differences() {
        for cfg in variants() {
            let vm = VarMap::new();
            let (padding, prior) = (cfg.padding, cfg.magnitude_prior);
            let cond = cfg.adanorm_num_embeddings.map(|_| 1);
            let v =
                Vocos::new(cfg, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu)).unwrap();
            let mel = Var::from_tensor(&noise(&[1, 3, 5], 3).unwrap()).unwrap();
            check_module(&vm, 0.3, 5, &[("mel", &mel)], || {
                v.decode(mel.as_tensor(), cond)
                    .map_err(|e| melvae_layers::Error::Invalid {
                        what: "vocos".into(),
                        reason: e.to_string(),
                    })
            })
            .unwrap_or_else(|e| panic!("{padding:?} prior {prior}: {e}"));
        }
    }

    /// With the head's output at zero, the log-magnitudes are the prior
    /// `ln(max(pinv(F) exp(mel), 1e-5))` and the phases zero.
    #[test]
    fn magnitude_prior_is_the_pseudo_inverse() {
        let cfg = variants()[2].clone();
        let vm = VarMap::new();
        let v = Vocos::new(
            cfg.clone(),
            VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
        )
        .unwrap();
        for name in ["head.out.weight", "head.out.bias"] {
            let var = vm.data().lock().unwrap()[name].clone();
            var.set(&var.zeros_like().unwrap()).unwrap();
        }
        let mel = noise(&[2, 3, 5], 7).unwrap();
        let h = v.spectrum_frames(&mel, None).unwrap();
        let pinv = melvae_dsp::mel_pseudo_inverse(&cfg.mel_config().filterbank().unwrap()).unwrap();
        let m = mel.to_vec3::<f64>().unwrap();
        let h = h.to_vec3::<f64>().unwrap();
        let bins = cfg.n_fft / 2 + 1;
        for (b, mb) in m.iter().enumerate() {
            for t in 0..5 {
                for k in 0..bins {
                    let lin: f64 = (0..3).map(|j| pinv[[k, j]] * mb[j][t].exp()).sum();
                    let want = lin.max(1e-5).ln();
                    assert!((h[b][k][t] - want).abs() < 1e-9, "{b} {k} {t}");
                    assert_eq!(h[b][bins + k][t], 0.0);
                }
            }
        }
    }

    /// A 2-block tiny model with random weights of scale 1 (f32).
    fn two_blocks(cfg: VocosConfig) -> Vocos {
        let vm = VarMap::new();
        let cfg = VocosConfig {
            num_layers: 2,
            ..cfg
        };
        let v = Vocos::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        melvae_layers::testing::randomize(&vm, 1.0, 9).unwrap();
        v
    }

    #[test]
    fn chunked_equals_offline() {
        for cfg in variants() {
            let (padding, cond) = (cfg.padding, cfg.adanorm_num_embeddings.map(|_| 1));
            let v = two_blocks(cfg);
            let mel = noise(&[2, 3, 41], 4).unwrap().to_dtype(DType::F32).unwrap();
            let offline = v.decode(&mel, cond).unwrap();
            for chunk in [1, 5, 16, 41, 100] {
                let chunked = v.decode_chunked(&mel, cond, chunk).unwrap();
                let d = melvae_layers::testing::max_abs_diff(&offline, &chunked).unwrap();
                assert!(d < 1e-5, "{padding:?} chunk {chunk}: {d}");
            }
            // One frame less of context differs by about 3e-3 on these
            // weights (checked when this test was written), so the context
            // is exactly what equality needs.
            assert_eq!(v.context_frames(), 9);
        }
        let vm = VarMap::new();
        let v = Vocos::new(
            tiny(VocosPadding::Center, None),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let mel = Tensor::zeros((1, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let e = v.decode_chunked(&mel, None, 0).unwrap_err().to_string();
        assert!(e.contains("vocos chunk"), "{e}");
    }

    /// Streaming synthesis equals offline decoding for any push sizes, its
    /// state stays bounded, and it restarts cleanly after `finish`.
    #[test]
    fn stream_equals_offline() {
        for cfg in variants() {
            let (padding, cond) = (cfg.padding, cfg.adanorm_num_embeddings.map(|_| 1));
            let v = two_blocks(cfg);
            let mel = noise(&[2, 3, 61], 5).unwrap().to_dtype(DType::F32).unwrap();
            let offline = v.decode(&mel, cond).unwrap();
            let mut stream = v.stream(cond).unwrap();
            // Latency: with one frame per push, the audio of frame `k`'s
            // hop is out once frame `k + lookahead_frames` is in.
            let look = v.lookahead_frames();
            assert_eq!(look, 9 + 2);
            let mut out = 0;
            for f in 1..=61 {
                if let Some(a) = stream.push(&mel.narrow(2, f - 1, 1).unwrap()).unwrap() {
                    out += a.dim(1).unwrap();
                }
                assert!(
                    out + 4 * look >= 4 * f,
                    "{padding:?}: {out} samples after {f} frames"
                );
                if f > look {
                    assert!(
                        out + 4 * (look - 1) < 4 * f,
                        "{padding:?}: less lookahead than stated"
                    );
                }
            }
            stream.reset();
            // A bad push is refused, naming it, and leaves the stream as it was.
            let mut parts: Vec<Tensor> = stream
                .push(&mel.narrow(2, 0, 20).unwrap())
                .unwrap()
                .into_iter()
                .collect();
            let bad = Tensor::zeros((2, 4, 3), DType::F32, &Device::Cpu).unwrap();
            let e = stream.push(&bad).unwrap_err().to_string();
            assert!(e.contains("vocos stream mel"), "{e}");
            parts.extend(stream.push(&mel.narrow(2, 20, 41).unwrap()).unwrap());
            parts.extend(stream.finish().unwrap());
            let d =
                melvae_layers::testing::max_abs_diff(&offline, &Tensor::cat(&parts, 1).unwrap())
                    .unwrap();
            assert!(d < 1e-5, "{padding:?} after a refused push: {d}");
            for sizes in [vec![1], vec![3, 1, 7], vec![61], vec![20, 0, 41]] {
                let (mut parts, mut at, mut i, mut state) = (Vec::new(), 0, 0, Vec::new());
                while at < 61 {
                    let n = sizes[i % sizes.len()].min(61 - at);
                    parts.extend(stream.push(&mel.narrow(2, at, n).unwrap()).unwrap());
                    state.push(stream.state_elements());
                    at += n;
                    i += 1;
                }
                parts.extend(stream.finish().unwrap());
                let streamed = Tensor::cat(&parts, 1).unwrap();
                assert_eq!(streamed.dims(), offline.dims(), "{padding:?} {sizes:?}");
                let d = melvae_layers::testing::max_abs_diff(&offline, &streamed).unwrap();
                assert!(d < 1e-5, "{padding:?} {sizes:?}: {d}");
                // Bounded: the mel window (context, a push's frames) and
                // one ISTFT overlap, batch 2.
                let bound = 2 * (3 * (2 * v.context_frames() + 41) + (16 - 4));
                assert!(state.iter().all(|&s| s <= bound), "{state:?} > {bound}");
                assert_eq!(stream.state_elements(), 0);
            }
        }
    }

    #[test]
    fn lengths_follow_the_padding() {
        for (padding, samples) in [(VocosPadding::Center, 4 * 4), (VocosPadding::Same, 5 * 4)] {
            let vm = VarMap::new();
            let v = Vocos::new(
                tiny(padding, None),
                VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
            )
            .unwrap();
            let mel = Tensor::zeros((2, 3, 5), DType::F32, &Device::Cpu).unwrap();
            assert_eq!(v.decode(&mel, None).unwrap().dims(), &[2, samples]);
        }
        let e = tiny(VocosPadding::Same, Some(0))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("vocos.adanorm_num_embeddings"), "{e}");
    }
}
