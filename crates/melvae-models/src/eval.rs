//! Codec evaluation: the metrics codec papers report, for a pair of clips,
//! a model over a folder, or two folders.
//!
//! - **mel distance**: DAC's multi-scale mel distance (its evaluation
//!   settings, [`MEL_DISTANCE_SCALES`]), lower is better;
//! - **STFT distance**: auraloss' multi-resolution STFT loss with its
//!   defaults (spectral convergence + log magnitude), lower is better;
//! - **SI-SDR** in dB, as descript-audiotools computes it (zero mean, the
//!   channels of a clip joined into one signal), higher is better;
//! - **PESQ** wideband (ITU-T P.862.2 MOS-LQO, 1.0 to 4.64) at 16 kHz
//!   through the pure-Rust `pesq` crate, higher is better; meaningful for
//!   speech only. The clips are resampled to 16 kHz and scored per channel
//!   (the mean is reported); a clip PESQ cannot score (e.g. no speech
//!   found) has no value and says why;
//! - **real-time factors** of encoding and decoding (compute seconds per
//!   second of audio, lower is faster) when a model is evaluated.
//!
//! Parity with the reference implementations is tested on fixtures written
//! by `tools/make_eval_fixtures.py`. Layouts: clips are planar
//! [`melvae_dsp::Audio`] (`channels[c][n]`); tensors fed to a [`Codec`]
//! are `[1, channels, samples]`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, D};
use melvae_dsp::{
    griffin_lim, mel_to_audio, resample, Audio, GriffinLimConfig, MelConfig, MelExtractor,
    MelInversion, ResampleQuality, Stft, StftConfig,
};
use melvae_losses::{MultiResolutionStftLoss, MultiScaleMelLoss, WaveformLoss};
use serde::{Deserialize, Serialize};

use crate::error::ensure;
use crate::{mel_to_array, Error, MelVae, MelVqVae, Result, SampleOptions, Vocos, WaveVae};

/// DAC's mel distance as its evaluation computes it: `(n_mels,
/// window_length)` per scale (hop a quarter window), magnitudes floored at
/// [`MEL_DISTANCE_CLAMP`], L1 of `log10` plus L1 of linear magnitudes,
/// summed over scales.
pub const MEL_DISTANCE_SCALES: [(usize, usize); 2] = [(150, 2048), (80, 512)];
/// Floor of the mel magnitudes before the log in the mel distance.
pub const MEL_DISTANCE_CLAMP: f64 = 1e-5;
/// Power of the magnitudes inside the log in the mel distance.
pub const MEL_DISTANCE_POW: f64 = 2.0;
/// Weight of the linear-magnitude L1 in the mel distance.
pub const MEL_DISTANCE_MAG_WEIGHT: f64 = 1.0;
/// Clips must be longer than this many samples (half the longest STFT
/// window of the metrics).
pub const MIN_SAMPLES: usize = 1024;
/// The rate wideband PESQ scores at.
pub const PESQ_RATE: u32 = 16_000;

/// The mel distance as a [`MultiScaleMelLoss`] (the metric [`Metrics`]
/// reports, and a training loss that optimises it directly): audio
/// `[batch, 1, samples]` at `sample_rate`.
pub fn mel_distance(sample_rate: u32, device: &Device) -> Result<MultiScaleMelLoss> {
    Ok(MultiScaleMelLoss::new(
        sample_rate,
        &MEL_DISTANCE_SCALES,
        MEL_DISTANCE_CLAMP,
        MEL_DISTANCE_POW,
        1.0,
        MEL_DISTANCE_MAG_WEIGHT,
        device,
    )?)
}

/// The metrics of one clip against its reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// DAC's multi-scale mel distance (lower is better).
    pub mel_distance: f64,
    /// auraloss' multi-resolution STFT distance (lower is better).
    pub stft_distance: f64,
    /// Scale-invariant SDR in dB (higher is better).
    pub si_sdr: f64,
    /// Wideband PESQ MOS-LQO, `None` when not computed or not computable.
    pub pesq_wb: Option<f64>,
    /// Why `pesq_wb` is missing, when it was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pesq_error: Option<String>,
}

/// Scale-invariant signal-to-distortion ratio of `estimate` against
/// `reference` in dB, as descript-audiotools' `SISDRLoss` (negated):
/// both signals made zero-mean, `e_true = a * r` with `a = (<e, r> + eps) /
/// (<r, r> + eps)`, `SI-SDR = -10 log10(|e_true|^2 / |e - e_true|^2 + eps)`
/// negated, `eps = 1e-8`, in f64. The slices must have equal lengths.
pub fn si_sdr(reference: &[f32], estimate: &[f32]) -> Result<f64> {
    ensure(reference.len() == estimate.len(), "si_sdr", || {
        format!(
            "reference has {} samples, estimate {}",
            reference.len(),
            estimate.len()
        )
    })?;
    ensure(!reference.is_empty(), "si_sdr", || "empty signals".into())?;
    const EPS: f64 = 1e-8;
    let n = reference.len() as f64;
    let mr = reference.iter().map(|&x| x as f64).sum::<f64>() / n;
    let me = estimate.iter().map(|&x| x as f64).sum::<f64>() / n;
    let (mut rr, mut re) = (0.0, 0.0);
    for (&r, &e) in reference.iter().zip(estimate) {
        let (r, e) = (r as f64 - mr, e as f64 - me);
        rr += r * r;
        re += r * e;
    }
    let a = (re + EPS) / (rr + EPS);
    let (mut signal, mut noise) = (0.0, 0.0);
    for (&r, &e) in reference.iter().zip(estimate) {
        let t = a * (r as f64 - mr);
        let res = e as f64 - me - t;
        signal += t * t;
        noise += res * res;
    }
    Ok(10.0 * (signal / noise + EPS).log10())
}

/// Wideband PESQ (P.862.2 MOS-LQO) of `estimate` against `reference`,
/// both mono at 16 kHz in [-1, 1] (converted to 16-bit PCM as a WAV file
/// stores them). `Err` carries the reason PESQ gives (e.g. no utterance
/// found in silence); a panic inside the scorer is caught and reported.
pub fn pesq_wb(reference: &[f32], estimate: &[f32]) -> std::result::Result<f64, String> {
    let pcm = |x: &[f32]| -> Vec<i16> {
        x.iter()
            .map(|&v| (v as f64 * 32768.0).round().clamp(-32768.0, 32767.0) as i16)
            .collect()
    };
    let (r, e) = (pcm(reference), pcm(estimate));
    // P.862 normalises each signal's power: undefined for digital silence
    // (the reference C code produces NaN there).
    for (what, x) in [("reference", &r), ("estimate", &e)] {
        if x.iter().all(|&v| v == 0) {
            return Err(format!("the {what} is silent at 16-bit resolution"));
        }
    }
    match std::panic::catch_unwind(|| pesq::pesq_wb(&r, &e)) {
        Ok(Ok(v)) if v.is_finite() => Ok(v as f64),
        Ok(Ok(v)) => Err(format!("PESQ returned {v}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the PESQ scorer failed on this pair".into()),
    }
}

/// The spectral metrics at one sample rate (they hold DFT bases and
/// filterbanks for it), plus SI-SDR and optionally PESQ.
#[derive(Debug, Clone)]
pub struct Metrics {
    sample_rate: u32,
    mel: MultiScaleMelLoss,
    stft: MultiResolutionStftLoss,
    pesq: bool,
    device: Device,
}

impl Metrics {
    /// Metrics of clips at `sample_rate`, computed on `device`; `pesq`
    /// turns wideband PESQ on.
    pub fn new(sample_rate: u32, pesq: bool, device: &Device) -> Result<Self> {
        Ok(Self {
            sample_rate,
            mel: mel_distance(sample_rate, device)?,
            stft: MultiResolutionStftLoss::auraloss_default(device)?,
            pesq,
            device: device.clone(),
        })
    }

    /// The rate the clips must have.
    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    /// Scores `estimate` against `reference`: same rate (this one), same
    /// channel count and length, else an error naming what differs.
    pub fn score(&self, reference: &Audio, estimate: &Audio) -> Result<Scores> {
        for (what, a) in [("reference", reference), ("estimate", estimate)] {
            ensure(a.sample_rate == self.sample_rate, what, || {
                format!(
                    "is at {} Hz, the metrics at {} Hz",
                    a.sample_rate, self.sample_rate
                )
            })?;
        }
        ensure(
            reference.n_channels() == estimate.n_channels()
                && reference.n_samples() == estimate.n_samples(),
            "estimate",
            || {
                format!(
                    "has {} channels x {} samples, the reference {} x {}",
                    estimate.n_channels(),
                    estimate.n_samples(),
                    reference.n_channels(),
                    reference.n_samples()
                )
            },
        )?;
        // The longest STFT (2048) pads each side by 1024 samples by
        // reflection, which needs more samples than that.
        ensure(reference.n_samples() > MIN_SAMPLES, "reference", || {
            format!(
                "has {} samples; the metrics need more than {MIN_SAMPLES} (their longest STFT window is 2048)",
                reference.n_samples()
            )
        })?;
        let (r, e) = (self.tensor(reference)?, self.tensor(estimate)?);
        let mel_distance = self.mel.loss(&e, &r)?.to_scalar::<f32>()? as f64;
        let stft_distance = self.stft.loss(&e, &r)?.to_scalar::<f32>()? as f64;
        let joined = |a: &Audio| a.channels.concat();
        let si_sdr = si_sdr(&joined(reference), &joined(estimate))?;
        let (pesq_wb, pesq_error) = if self.pesq {
            match self.pesq_of(reference, estimate) {
                Ok(v) => (Some(v), None),
                Err(e) => (None, Some(e)),
            }
        } else {
            (None, None)
        };
        Ok(Scores {
            mel_distance,
            stft_distance,
            si_sdr,
            pesq_wb,
            pesq_error,
        })
    }

    /// Mean wideband PESQ over the channels, at 16 kHz.
    fn pesq_of(&self, reference: &Audio, estimate: &Audio) -> std::result::Result<f64, String> {
        let at16 = |a: &Audio| {
            a.clone()
                .resampled(PESQ_RATE, ResampleQuality::Sinc)
                .map_err(|e| e.to_string())
        };
        let (r, e) = (at16(reference)?, at16(estimate)?);
        let mut sum = 0.0;
        for (rc, ec) in r.channels.iter().zip(&e.channels) {
            sum += pesq_wb(rc, ec)?;
        }
        Ok(sum / r.n_channels() as f64)
    }

    /// `[1, channels, samples]` on the metrics' device.
    fn tensor(&self, a: &Audio) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            a.channels.concat(),
            (1, a.n_channels(), a.n_samples()),
            &self.device,
        )?)
    }
}

/// A model that turns audio into latents and back, for evaluation.
pub trait Codec {
    /// The rate it works at.
    fn sample_rate(&self) -> u32;
    /// Its channel count.
    fn audio_channels(&self) -> usize;
    /// Audio `[1, audio_channels, samples]` (f32, on the model's device) to
    /// latents (any layout [`Codec::decode`] takes).
    fn encode(&self, audio: &Tensor) -> Result<Tensor>;
    /// Latents to audio `[1, audio_channels, samples]`, cut to `samples`.
    fn decode(&self, latents: &Tensor, samples: usize) -> Result<Tensor>;
    /// The device it runs on.
    fn device(&self) -> Device;
    /// Numbers per second of audio in its latents (for comparing codecs
    /// and choosing an equal-bandwidth baseline).
    fn latent_rate(&self) -> f64;
    /// The axes of the latent channels and of time in what
    /// [`Codec::encode`] returns (for [`crate::latent`] edits).
    fn latent_axes(&self) -> (usize, usize) {
        (1, 2)
    }
}

impl Codec for WaveVae {
    fn sample_rate(&self) -> u32 {
        self.config().sample_rate
    }
    fn audio_channels(&self) -> usize {
        self.config().audio_channels
    }
    /// The posterior mean `[1, latent_dim, frames]` of the audio
    /// zero-padded to the hop.
    fn encode(&self, audio: &Tensor) -> Result<Tensor> {
        let (padded, _) = self.pad_to_hop(audio)?;
        Ok(WaveVae::encode(self, &padded.to_dtype(self.dtype())?)?.0)
    }
    fn decode(&self, latents: &Tensor, samples: usize) -> Result<Tensor> {
        let y = WaveVae::decode(self, latents)?;
        Ok(y.narrow(D::Minus1, 0, samples)?
            .to_dtype(candle_core::DType::F32)?)
    }
    fn device(&self) -> Device {
        WaveVae::device(self)
    }
    fn latent_rate(&self) -> f64 {
        self.config().frame_rate() * self.config().latent_dim as f64
    }
}

impl Codec for crate::VqVae {
    fn sample_rate(&self) -> u32 {
        self.config().net.sample_rate
    }
    fn audio_channels(&self) -> usize {
        self.config().net.audio_channels
    }
    /// The codes `[1, 1, frames]` (u32) of the audio zero-padded to the
    /// hop.
    fn encode(&self, audio: &Tensor) -> Result<Tensor> {
        let t = audio.dim(D::Minus1)?;
        let hop = self.hop();
        let padded = audio.pad_with_zeros(D::Minus1, 0, t.div_ceil(hop).max(1) * hop - t)?;
        Ok(crate::VqVae::encode(self, &padded.to_dtype(candle_core::DType::F32)?)?.unsqueeze(1)?)
    }
    fn decode(&self, latents: &Tensor, samples: usize) -> Result<Tensor> {
        let y = crate::VqVae::decode(self, &latents.squeeze(1)?)?;
        Ok(y.narrow(D::Minus1, 0, samples)?
            .to_dtype(candle_core::DType::F32)?)
    }
    fn device(&self) -> Device {
        self.quantizer().codebook().device().clone()
    }
    /// Codes per second.
    fn latent_rate(&self) -> f64 {
        self.sample_rate() as f64 / self.hop() as f64
    }
}

/// How a mel becomes audio.
#[derive(Debug, Clone)]
pub enum MelToAudio {
    /// Griffin-Lim phase reconstruction (always available, metallic).
    GriffinLim(GriffinLimConfig),
    /// A neural vocoder whose features are the mel model's.
    Vocos(Box<Vocos>),
}

impl MelToAudio {
    /// `vocoder` for a mel model with features `mel`, or Griffin-Lim
    /// without one; a vocoder trained on other features is refused naming
    /// what differs.
    pub fn new(vocoder: Option<Vocos>, mel: &MelConfig) -> Result<Self> {
        Ok(match vocoder {
            None => Self::GriffinLim(GriffinLimConfig::default()),
            Some(v) => {
                let theirs = v.config().mel_config();
                ensure(theirs == *mel, "vocoder", || {
                    format!(
                        "expects {} Hz / {} mels / hop {} ({:?} features, {:?} padding); the model makes {} Hz / {} mels / hop {}",
                        theirs.sample_rate,
                        theirs.n_mels,
                        theirs.stft.hop_length,
                        v.config().features,
                        v.config().padding,
                        mel.sample_rate,
                        mel.n_mels,
                        mel.stft.hop_length
                    )
                })?;
                ensure(
                    v.config().adanorm_num_embeddings.is_none(),
                    "vocoder",
                    || {
                        "has AdaLayerNorm and needs a condition id per decode; a mel model's audio uses a vocoder without one".into()
                    },
                )?;
                Self::Vocos(Box::new(v))
            }
        })
    }

    /// Audio `[samples]` (cut or zero-padded to `samples`) of the log-mel
    /// `mel` (`[1, n_mels, frames]`, features `cfg`).
    pub fn audio(&self, mel: &Tensor, cfg: &MelConfig, samples: usize) -> Result<Vec<f32>> {
        let mut wav = match self {
            Self::GriffinLim(gl) => mel_to_audio(
                &MelExtractor::new(*cfg)?,
                &mel_to_array(mel)?,
                Some(samples),
                MelInversion::default(),
                gl,
            )?,
            Self::Vocos(v) => v
                .decode(&mel.to_dtype(candle_core::DType::F32)?, None)?
                .flatten_all()?
                .to_device(&Device::Cpu)?
                .to_vec1::<f32>()?,
        };
        wav.resize(samples, 0.0);
        Ok(wav)
    }

    /// A short name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::GriffinLim(_) => "Griffin-Lim",
            Self::Vocos(_) => "Vocos",
        }
    }
}

/// The mel VAE as a [`Codec`]: audio to the `vocos-24k` log-mel and its
/// latent (posterior mean, `[1, frames / C, latent]`), latents back to a
/// log-mel with the given sampling options and to audio with a vocoder or
/// Griffin-Lim. Mono, 24 kHz.
pub struct MelVaeCodec {
    /// The model.
    pub model: MelVae,
    /// How latents are sampled back to mels.
    pub sampling: SampleOptions,
    /// How mels become audio.
    pub vocoder: MelToAudio,
    /// The device the model runs on.
    pub device: Device,
}

impl Codec for MelVaeCodec {
    fn sample_rate(&self) -> u32 {
        MelConfig::vocos_24k().sample_rate
    }
    fn audio_channels(&self) -> usize {
        1
    }
    fn encode(&self, audio: &Tensor) -> Result<Tensor> {
        let samples = audio
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        let mel = self
            .model
            .audio_to_mel(&samples, self.sample_rate(), &self.device)?;
        Ok(self.model.encode(&mel)?.0)
    }
    fn decode(&self, latents: &Tensor, samples: usize) -> Result<Tensor> {
        let cfg = MelConfig::vocos_24k();
        // The sampled mel covers the silence padding too: cut it to the clip.
        let frames = cfg.stft.n_frames(samples)?;
        let mel = self.model.sample(latents, &self.sampling)?;
        let mel = mel.narrow(2, 0, frames.min(mel.dim(2)?))?.contiguous()?;
        let wav = self.vocoder.audio(&mel, &cfg, samples)?;
        Ok(Tensor::from_vec(wav, (1, 1, samples), &self.device)?)
    }
    fn device(&self) -> Device {
        self.device.clone()
    }
    /// `[1, frames / C, latent_dim]`: channels last.
    fn latent_axes(&self) -> (usize, usize) {
        (2, 1)
    }
    fn latent_rate(&self) -> f64 {
        let mel = MelConfig::vocos_24k();
        mel.sample_rate as f64 / mel.stft.hop_length as f64 / self.model.compress() as f64
            * self.model.latent_dim() as f64
    }
}

/// The mel VQ-VAE as a [`Codec`]: audio (mono, at its features' rate) to
/// tokens `[1, rows * cols]` (the audio zero-padded to a whole token row,
/// so nothing is dropped), and tokens back to the mel and through the
/// vocoder (or Griffin-Lim) to audio. `latent_rate` counts tokens per
/// second (each one of `codebook_size` values, not a real number).
pub struct MelVqVaeCodec {
    /// The model.
    pub model: MelVqVae,
    /// How mels become audio.
    pub vocoder: MelToAudio,
    /// The device the model runs on.
    pub device: Device,
}

impl Codec for MelVqVaeCodec {
    fn sample_rate(&self) -> u32 {
        self.model.mel_config().sample_rate
    }
    fn audio_channels(&self) -> usize {
        1
    }
    fn encode(&self, audio: &Tensor) -> Result<Tensor> {
        let mut samples = audio
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        let stft = self.model.mel_config().stft;
        let f = self.model.time_factor();
        let frames = stft.n_frames(samples.len())?.div_ceil(f) * f;
        let want = stft.n_samples(frames).max(samples.len());
        samples.resize(want, 0.0);
        self.model.encode_audio(&samples, &self.device)
    }
    fn decode(&self, latents: &Tensor, samples: usize) -> Result<Tensor> {
        let cfg = *self.model.mel_config();
        let mel = self.model.decode(latents)?;
        let frames = cfg.stft.n_frames(samples)?.min(mel.dim(2)?);
        let mel = mel.narrow(2, 0, frames)?.contiguous()?;
        let wav = self.vocoder.audio(&mel, &cfg, samples)?;
        Ok(Tensor::from_vec(wav, (1, 1, samples), &self.device)?)
    }
    fn device(&self) -> Device {
        self.device.clone()
    }
    fn latent_rate(&self) -> f64 {
        let mel = self.model.mel_config();
        mel.sample_rate as f64 / mel.stft.hop_length as f64 / self.model.time_factor() as f64
            * self.model.cols() as f64
    }
}

/// A vocoder as a [`Codec`] (analysis-synthesis): audio to its mel (the
/// features the vocoder was trained on, `[1, n_mels, frames]`) and back to
/// audio through the vocoder, or through Griffin-Lim (`vocoder` is then
/// [`MelToAudio::GriffinLim`]: the baseline a neural vocoder must beat).
/// Mono, at the features' rate.
pub struct MelCodec {
    /// The mel features.
    pub mel: MelConfig,
    /// How mels become audio.
    pub vocoder: MelToAudio,
}

impl MelCodec {
    /// The Vocos `v` on its own features.
    pub fn vocos(v: Vocos) -> Result<Self> {
        let mel = v.config().mel_config();
        Ok(Self {
            vocoder: MelToAudio::new(Some(v), &mel)?,
            mel,
        })
    }
}

impl Codec for MelCodec {
    fn sample_rate(&self) -> u32 {
        self.mel.sample_rate
    }
    fn audio_channels(&self) -> usize {
        1
    }
    fn encode(&self, audio: &Tensor) -> Result<Tensor> {
        let x = audio
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        let mel = MelExtractor::new(self.mel)?.extract(&x)?;
        let (m, t) = mel.dim();
        Ok(Tensor::from_vec(
            mel.iter().copied().collect::<Vec<_>>(),
            (1, m, t),
            &Device::Cpu,
        )?)
    }
    fn decode(&self, latents: &Tensor, samples: usize) -> Result<Tensor> {
        let wav = self.vocoder.audio(latents, &self.mel, samples)?;
        Ok(Tensor::from_vec(wav, (1, 1, samples), &Device::Cpu)?)
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn latent_rate(&self) -> f64 {
        self.mel.sample_rate as f64 / self.mel.stft.hop_length as f64 * self.mel.n_mels as f64
    }
}

/// Naive baseline: each channel's clip-average magnitude spectrum (STFT
/// 1024 / hop 256) at every frame, phases by Griffin-Lim. What a model
/// that learned only the average spectrum (no time structure) produces;
/// it knows each clip's spectrum, so it is not free of information.
#[derive(Debug, Clone)]
pub struct ClipMeanSpectrum {
    /// The rate it works at.
    pub sample_rate: u32,
    /// Its channel count.
    pub audio_channels: usize,
    /// The Griffin-Lim settings.
    pub griffin_lim: GriffinLimConfig,
}

impl ClipMeanSpectrum {
    fn stft() -> Result<Stft> {
        Ok(Stft::new(StftConfig::new(1024))?)
    }
}

impl Codec for ClipMeanSpectrum {
    fn sample_rate(&self) -> u32 {
        self.sample_rate
    }
    fn audio_channels(&self) -> usize {
        self.audio_channels
    }
    /// The mean magnitude `[1, channels, bins]`.
    fn encode(&self, audio: &Tensor) -> Result<Tensor> {
        let stft = Self::stft()?;
        let x = audio
            .squeeze(0)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?;
        let mut means = Vec::new();
        for ch in &x {
            let mag = stft.spectrogram(ch, 1.0)?;
            means.extend(mag.mean_axis(ndarray::Axis(1)).into_iter().flatten());
        }
        let bins = stft.config().n_bins();
        Ok(Tensor::from_vec(means, (1, x.len(), bins), &Device::Cpu)?)
    }
    fn decode(&self, latents: &Tensor, samples: usize) -> Result<Tensor> {
        let stft = Self::stft()?;
        let frames = stft.config().n_frames(samples)?;
        let means = latents.squeeze(0)?.to_vec2::<f32>()?;
        let mut out = Vec::new();
        for m in &means {
            let mag = ndarray::Array2::from_shape_fn((m.len(), frames), |(b, _)| m[b]);
            out.extend(griffin_lim(&stft, &mag, Some(samples), &self.griffin_lim)?);
        }
        Ok(Tensor::from_vec(
            out,
            (1, means.len(), samples),
            &Device::Cpu,
        )?)
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn latent_rate(&self) -> f64 {
        0.0
    }
}

/// Equal-bandwidth baseline: the audio resampled down to `rate` Hz (sinc,
/// band-limited to `rate / 2`) and back up. At `rate` = a model's
/// [`Codec::latent_rate`] per channel it keeps as many numbers per second as
/// the model's latents (unquantised, like a VAE's).
#[derive(Debug, Clone)]
pub struct Resampled {
    /// The rate it works at.
    pub sample_rate: u32,
    /// Its channel count.
    pub audio_channels: usize,
    /// The rate in between.
    pub rate: u32,
}

impl Codec for Resampled {
    fn sample_rate(&self) -> u32 {
        self.sample_rate
    }
    fn audio_channels(&self) -> usize {
        self.audio_channels
    }
    /// The audio at `rate`, `[1, channels, samples']`.
    fn encode(&self, audio: &Tensor) -> Result<Tensor> {
        let x = audio
            .squeeze(0)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?;
        let y = resample(&x, self.sample_rate, self.rate, ResampleQuality::Sinc)?;
        let n = y[0].len();
        Ok(Tensor::from_vec(y.concat(), (1, x.len(), n), &Device::Cpu)?)
    }
    fn decode(&self, latents: &Tensor, samples: usize) -> Result<Tensor> {
        let x = latents.squeeze(0)?.to_vec2::<f32>()?;
        let mut y = resample(&x, self.rate, self.sample_rate, ResampleQuality::Sinc)?;
        for c in &mut y {
            c.resize(samples, 0.0);
        }
        Ok(Tensor::from_vec(
            y.concat(),
            (1, x.len(), samples),
            &Device::Cpu,
        )?)
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn latent_rate(&self) -> f64 {
        self.rate as f64 * self.audio_channels as f64
    }
}

/// One evaluated clip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipReport {
    /// The reference file, relative to the reference folder.
    pub file: PathBuf,
    /// Its duration in seconds (at the evaluation rate).
    pub seconds: f64,
    /// The metrics.
    #[serde(flatten)]
    pub scores: Scores,
    /// Compute seconds per audio second of encoding (model evaluations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encode_rtf: Option<f64>,
    /// Compute seconds per audio second of decoding (model evaluations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_rtf: Option<f64>,
}

/// The means over the clips (PESQ over the clips it scored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeanScores {
    /// Number of clips.
    pub clips: usize,
    /// Mean mel distance.
    pub mel_distance: f64,
    /// Mean STFT distance.
    pub stft_distance: f64,
    /// Mean SI-SDR in dB.
    pub si_sdr: f64,
    /// Mean PESQ over the clips that have one.
    pub pesq_wb: Option<f64>,
    /// Number of clips with a PESQ value.
    pub pesq_clips: usize,
    /// Total encode compute seconds over total audio seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encode_rtf: Option<f64>,
    /// Total decode compute seconds over total audio seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_rtf: Option<f64>,
}

/// An evaluation: what was compared, every clip and the means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The reference folder.
    pub reference: PathBuf,
    /// What was evaluated (a model file or a folder).
    pub estimate: String,
    /// The rate the metrics were computed at.
    pub sample_rate: u32,
    /// Numbers per second in the codec's latents (model evaluations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latent_rate: Option<f64>,
    /// One entry per clip, in path order.
    pub clips: Vec<ClipReport>,
    /// The means.
    pub mean: MeanScores,
}

impl EvalReport {
    /// Collects `clips` with their means.
    pub fn new(
        reference: &Path,
        estimate: String,
        sample_rate: u32,
        clips: Vec<ClipReport>,
    ) -> Self {
        let n = clips.len().max(1) as f64;
        let mean = |f: &dyn Fn(&ClipReport) -> f64| clips.iter().map(f).sum::<f64>() / n;
        let pesq: Vec<f64> = clips.iter().filter_map(|c| c.scores.pesq_wb).collect();
        let secs: f64 = clips.iter().map(|c| c.seconds).sum();
        let rtf = |f: &dyn Fn(&ClipReport) -> Option<f64>| -> Option<f64> {
            let total: Option<f64> = clips.iter().map(|c| f(c).map(|r| r * c.seconds)).sum();
            total.filter(|_| secs > 0.0).map(|t| t / secs)
        };
        let mean = MeanScores {
            clips: clips.len(),
            mel_distance: mean(&|c| c.scores.mel_distance),
            stft_distance: mean(&|c| c.scores.stft_distance),
            si_sdr: mean(&|c| c.scores.si_sdr),
            pesq_wb: (!pesq.is_empty()).then(|| pesq.iter().sum::<f64>() / pesq.len() as f64),
            pesq_clips: pesq.len(),
            encode_rtf: rtf(&|c| c.encode_rtf),
            decode_rtf: rtf(&|c| c.decode_rtf),
        };
        Self {
            reference: reference.to_path_buf(),
            estimate,
            sample_rate,
            latent_rate: None,
            clips,
            mean,
        }
    }

    /// A markdown table: one row per clip and a last row of means.
    pub fn to_markdown(&self) -> String {
        let timed = self.mean.encode_rtf.is_some();
        let mut s = String::from(
            "| file | seconds | mel distance | STFT distance | SI-SDR (dB) | PESQ wb |",
        );
        s += if timed {
            " encode RTF | decode RTF |\n"
        } else {
            "\n"
        };
        s += "|---|---:|---:|---:|---:|---:|";
        s += if timed { "---:|---:|\n" } else { "\n" };
        let opt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
        for c in &self.clips {
            s += &format!(
                "| {} | {:.2} | {:.3} | {:.3} | {:.2} | {} |",
                c.file.display(),
                c.seconds,
                c.scores.mel_distance,
                c.scores.stft_distance,
                c.scores.si_sdr,
                opt(c.scores.pesq_wb, 3)
            );
            if timed {
                s += &format!(" {} | {} |", opt(c.encode_rtf, 4), opt(c.decode_rtf, 4));
            }
            s += "\n";
        }
        let m = &self.mean;
        s += &format!(
            "| **mean of {}** | | {:.3} | {:.3} | {:.2} | {} |",
            m.clips,
            m.mel_distance,
            m.stft_distance,
            m.si_sdr,
            match m.pesq_wb {
                Some(v) if m.pesq_clips < m.clips => format!("{v:.3} ({} clips)", m.pesq_clips),
                v => opt(v, 3),
            }
        );
        if timed {
            s += &format!(" {} | {} |", opt(m.encode_rtf, 4), opt(m.decode_rtf, 4));
        }
        s + "\n"
    }
}

/// Options of [`evaluate_codec`] and [`evaluate_folders`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalOptions {
    /// Compute wideband PESQ.
    pub pesq: bool,
    /// Evaluate at most this many files (in path order).
    pub max_files: Option<usize>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            pesq: true,
            max_files: None,
        }
    }
}

/// The audio files under `dir` (recursively, sorted), at most `max` of
/// them; an error naming the folder when there are none.
pub fn audio_files(dir: &Path, max: Option<usize>) -> Result<Vec<PathBuf>> {
    let mut files = melvae_dsp::discover_audio(dir)?;
    if files.is_empty() {
        return Err(Error::invalid(
            dir.display().to_string(),
            "no audio files (wav, flac, mp3, ogg, m4a, ...) in this folder",
        ));
    }
    if let Some(m) = max {
        files.truncate(m);
    }
    Ok(files)
}

/// Loads `path` at `rate` Hz with `channels` channels (mono is duplicated
/// for two channels; two channels are averaged for one).
fn load_as(path: &Path, rate: u32, channels: usize) -> Result<Audio> {
    let mode = match channels {
        1 => melvae_dsp::ChannelMode::Mono,
        2 => melvae_dsp::ChannelMode::Stereo,
        _ => melvae_dsp::ChannelMode::Keep,
    };
    Ok(melvae_dsp::load_audio_with(
        path,
        &melvae_dsp::LoadOptions {
            channels: mode,
            sample_rate: Some(rate),
            quality: ResampleQuality::Sinc,
        },
    )?)
}

/// Evaluates `codec` on `files` (reported relative to `reference_dir`,
/// e.g. from [`audio_files`]; `opts.max_files` is not applied here): each
/// file is resampled to the codec's rate and channel count, encoded and
/// decoded (both timed), and scored against itself at that rate. `on_clip`
/// sees each clip's report as it is done (for progress).
pub fn evaluate_codec(
    codec: &dyn Codec,
    name: String,
    reference_dir: &Path,
    files: &[PathBuf],
    opts: EvalOptions,
    on_clip: &mut dyn FnMut(&ClipReport),
) -> Result<EvalReport> {
    let rate = codec.sample_rate();
    let metrics = Metrics::new(rate, opts.pesq, &Device::Cpu)?;
    let mut clips = Vec::new();
    for path in files {
        let path = path.as_path();
        let clip =
            evaluate_clip(codec, &metrics, path, reference_dir).map_err(|e| naming(e, path))?;
        on_clip(&clip);
        clips.push(clip);
    }
    let mut report = EvalReport::new(reference_dir, name, rate, clips);
    report.latent_rate = Some(codec.latent_rate());
    Ok(report)
}

/// `e`, naming `path` unless it comes from reading the file (which names
/// it already).
fn naming(e: Error, path: &Path) -> Error {
    match e {
        Error::Dsp(melvae_dsp::Error::Audio { .. } | melvae_dsp::Error::Io { .. }) => e,
        e => Error::invalid(path.display().to_string(), e.to_string()),
    }
}

/// One file through `codec`, scored and timed.
fn evaluate_clip(
    codec: &dyn Codec,
    metrics: &Metrics,
    path: &Path,
    reference_dir: &Path,
) -> Result<ClipReport> {
    let rate = codec.sample_rate();
    let dev = codec.device();
    let audio = load_as(path, rate, codec.audio_channels())?;
    let n = audio.n_samples();
    let x = Tensor::from_vec(audio.channels.concat(), (1, audio.n_channels(), n), &dev)?;
    let t0 = Instant::now();
    let latents = codec.encode(&x)?;
    dev.synchronize()?;
    let t1 = Instant::now();
    let y = codec.decode(&latents, n)?;
    dev.synchronize()?;
    let t2 = Instant::now();
    let estimate = Audio::new(
        rate,
        y.squeeze(0)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?,
    )?;
    let scores = metrics.score(&audio, &estimate)?;
    let seconds = n as f64 / rate as f64;
    Ok(ClipReport {
        file: relative(path, reference_dir),
        seconds,
        scores,
        encode_rtf: Some((t1 - t0).as_secs_f64() / seconds),
        decode_rtf: Some((t2 - t1).as_secs_f64() / seconds),
    })
}

/// Scores the files of `estimate_dir` against those of `reference_dir`,
/// matched by relative path without the extension (`a/b.wav` matches
/// `a/b.flac`). Each pair is compared at the reference's rate (the estimate
/// is resampled to it) and must have the same channel count; lengths may
/// differ by up to 1% (codec padding) and the common start is compared.
/// Every reference without a counterpart is named in one error.
pub fn evaluate_folders(
    reference_dir: &Path,
    estimate_dir: &Path,
    opts: EvalOptions,
    on_clip: &mut dyn FnMut(&ClipReport),
) -> Result<EvalReport> {
    let refs = audio_files(reference_dir, opts.max_files)?;
    let ests = melvae_dsp::discover_audio(estimate_dir)?;
    let key = |p: &Path, root: &Path| relative(p, root).with_extension("");
    let mut pairs = Vec::new();
    let mut missing = Vec::new();
    for r in &refs {
        let k = key(r, reference_dir);
        match ests.iter().find(|e| key(e, estimate_dir) == k) {
            Some(e) => pairs.push((r.clone(), e.clone())),
            None => missing.push(relative(r, reference_dir).display().to_string()),
        }
    }
    if !missing.is_empty() {
        return Err(Error::invalid(
            estimate_dir.display().to_string(),
            format!(
                "no file matching {} of {}",
                missing.join(", "),
                reference_dir.display()
            ),
        ));
    }
    let mut metrics: Option<Metrics> = None;
    let mut clips = Vec::new();
    let mut rate0 = None;
    for (r, e) in pairs {
        let reference = melvae_dsp::load_audio(&r)?;
        let rate = reference.sample_rate;
        ensure(rate0.is_none_or(|r0| r0 == rate), "reference rate", || {
            format!(
                "{} is at {rate} Hz, the first reference at {} Hz: the folder must have one rate",
                r.display(),
                rate0.unwrap_or(0)
            )
        })?;
        rate0 = Some(rate);
        let m = match &metrics {
            Some(m) => m,
            None => metrics.insert(Metrics::new(rate, opts.pesq, &Device::Cpu)?),
        };
        let mut estimate = load_as(&e, rate, reference.n_channels())?;
        let (nr, ne) = (reference.n_samples(), estimate.n_samples());
        ensure(
            nr.abs_diff(ne) * 100 <= nr.max(ne),
            "estimate length",
            || {
                format!(
                "{} has {ne} samples at {rate} Hz, its reference {} has {nr}: more than 1% apart",
                e.display(),
                r.display()
            )
            },
        )?;
        let n = nr.min(ne);
        let cut = |a: Audio| {
            Audio::new(
                rate,
                a.channels
                    .into_iter()
                    .map(|mut c| {
                        c.truncate(n);
                        c
                    })
                    .collect(),
            )
        };
        let reference = cut(reference)?;
        estimate = cut(estimate)?;
        let scores = m
            .score(&reference, &estimate)
            .map_err(|err| naming(err, &e))?;
        let clip = ClipReport {
            file: relative(&r, reference_dir),
            seconds: n as f64 / rate as f64,
            scores,
            encode_rtf: None,
            decode_rtf: None,
        };
        on_clip(&clip);
        clips.push(clip);
    }
    Ok(EvalReport::new(
        reference_dir,
        estimate_dir.display().to_string(),
        rate0.unwrap_or(0),
        clips,
    ))
}

/// `path` relative to `root` (or as given when it is not under it).
fn relative(path: &Path, root: &Path) -> PathBuf {
    path.strip_prefix(root).unwrap_or(path).to_path_buf()
}

/// The nearest-class-centroid check of generated sounds: each class is
/// the mean over its clips of their average log-mel spectrum (`[n_mels]`,
/// the mean over frames), and a mel is assigned the class whose centroid
/// is nearest in Euclidean distance. Crude on purpose (it sees the
/// spectral balance, not the time structure) and documented in
/// docs/models/mel_tokens.md; its accuracy on real clips is the reference
/// for its accuracy on generated ones.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassCentroids {
    /// Class names, index = label.
    pub names: Vec<String>,
    /// One `[n_mels]` centroid per class.
    pub centroids: Vec<Vec<f32>>,
}

/// The average log-mel spectrum `[n_mels]` of `mel` `[n_mels, frames]`.
fn mean_spectrum(mel: &ndarray::Array2<f32>) -> Vec<f32> {
    let frames = mel.ncols().max(1) as f32;
    mel.rows().into_iter().map(|r| r.sum() / frames).collect()
}

impl ClassCentroids {
    /// Centroids of `clips` (`(label, mel [n_mels, frames])`) for the
    /// classes `names`; a label out of range, mels of different sizes or a
    /// class without clips are errors naming them.
    pub fn fit(names: Vec<String>, clips: &[(usize, ndarray::Array2<f32>)]) -> Result<Self> {
        let n_mels = clips.first().map_or(0, |(_, m)| m.nrows());
        let mut sums = vec![vec![0f32; n_mels]; names.len()];
        let mut counts = vec![0usize; names.len()];
        for (label, mel) in clips {
            let (Some(sum), Some(count)) = (sums.get_mut(*label), counts.get_mut(*label)) else {
                return Err(Error::invalid(
                    "class label",
                    format!("{label} is not below the {} classes", names.len()),
                ));
            };
            if mel.nrows() != n_mels {
                return Err(Error::Shape {
                    what: "class centroid mel".into(),
                    expected: format!("[{n_mels}, frames]"),
                    got: format!("{:?}", mel.dim()),
                });
            }
            for (s, v) in sum.iter_mut().zip(mean_spectrum(mel)) {
                *s += v;
            }
            *count += 1;
        }
        if let Some(i) = counts.iter().position(|&c| c == 0) {
            return Err(Error::invalid(
                format!("class {}", names[i]),
                "has no clip to make its centroid from",
            ));
        }
        let centroids = sums
            .into_iter()
            .zip(&counts)
            .map(|(s, &c)| s.into_iter().map(|v| v / c as f32).collect())
            .collect();
        Ok(Self { names, centroids })
    }

    /// The class (index) whose centroid is nearest to `mel` `[n_mels,
    /// frames]`.
    pub fn classify(&self, mel: &ndarray::Array2<f32>) -> usize {
        let m = mean_spectrum(mel);
        let dist = |c: &[f32]| -> f32 { c.iter().zip(&m).map(|(a, b)| (a - b) * (a - b)).sum() };
        (0..self.centroids.len())
            .min_by(|&a, &b| dist(&self.centroids[a]).total_cmp(&dist(&self.centroids[b])))
            .unwrap_or(0)
    }
}

/// Mel bins below this frequency carry the resolved harmonics of speech in
/// the 100-band `vocos-24k` log-mel (bands narrower than half of a 100-250
/// Hz pitch); [`harmonic_detail`] looks there.
pub const HARMONIC_MAX_HZ: f64 = 1000.0;

/// How much of the input's harmonic fine structure a reconstructed log-mel
/// keeps, as a Pearson correlation in [-1, 1].
///
/// Each log-mel's *detail* is every bin minus the mean of its bins within
/// two bands (the spectral envelope removed, the ripple of harmonics kept).
/// The correlation of the two details runs over the bands whose centre lies
/// below `max_hz` (see [`HARMONIC_MAX_HZ`]) and the input's sounding frames
/// (whose mean log-mel there is within 4 nats of the loudest frame's). 1: the
/// same harmonics at the same places; about 0: none (a smooth envelope, noise,
/// or the clip's mean spectrum, since the pitch moves).
///
/// `input` and `output` are log-mels `[mel, frames]` of `cfg` with equal
/// shapes. `None` when fewer than 5 bands lie below `max_hz`, a value there
/// is not finite, no frame sounds, or a detail is constant.
pub fn harmonic_detail(
    input: &ndarray::Array2<f32>,
    output: &ndarray::Array2<f32>,
    cfg: &MelConfig,
    max_hz: f64,
) -> Result<Option<f64>> {
    if input.dim() != output.dim() || input.nrows() != cfg.n_mels {
        return Err(Error::Shape {
            what: "harmonic detail: input and output log-mels".into(),
            expected: format!("equal [{} mel, frames]", cfg.n_mels),
            got: format!("{:?} and {:?}", input.shape(), output.shape()),
        });
    }
    let bands = cfg
        .band_centres_hz()
        .iter()
        .take_while(|&&hz| hz < max_hz)
        .count();
    let finite = |x: &ndarray::Array2<f32>| {
        x.rows()
            .into_iter()
            .take(bands)
            .flatten()
            .all(|v| v.is_finite())
    };
    if bands < 5 || input.ncols() == 0 || !finite(input) || !finite(output) {
        return Ok(None);
    }
    let detail = |x: &ndarray::Array2<f32>, f: usize, t: usize| {
        let (a, b) = (f.saturating_sub(2), (f + 2).min(bands - 1));
        let env = (a..=b).map(|g| x[[g, t]] as f64).sum::<f64>() / (b - a + 1) as f64;
        x[[f, t]] as f64 - env
    };
    let level: Vec<f64> = (0..input.ncols())
        .map(|t| (0..bands).map(|f| input[[f, t]] as f64).sum::<f64>() / bands as f64)
        .collect();
    let loudest = level.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (mut pairs, mut n) = ([0.0f64; 5], 0usize);
    for (t, &l) in level.iter().enumerate() {
        if l < loudest - 4.0 {
            continue;
        }
        for f in 0..bands {
            let (x, y) = (detail(input, f, t), detail(output, f, t));
            for (acc, v) in pairs.iter_mut().zip([x, y, x * x, y * y, x * y]) {
                *acc += v;
            }
            n += 1;
        }
    }
    let n = n as f64;
    let [sx, sy, sxx, syy, sxy] = pairs;
    let (vx, vy) = (sxx - sx * sx / n, syy - sy * sy / n);
    // A detail constant up to rounding has no correlation to speak of.
    if n == 0.0 || vx <= 1e-12 * sxx || vy <= 1e-12 * syy {
        return Ok(None);
    }
    Ok(Some((sxy - sx * sy / n) / (vx * vy).sqrt()))
}
