//! The mel VAE: a causal Convformer encoder and a DiT flow-matching decoder.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use melvae_dsp::{resample, MelConfig, MelExtractor, MelStream, ResampleQuality, SplitMix64};
use melvae_layers::Streaming;
use melvae_layers::{time_dtype, DropoutRng, Mode};
use melvae_losses::{
    flow_matching_loss, flow_matching_target, kl_loss, weighted_flow_matching_loss, FreeBits,
    KlSchedule,
};
use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::convformer::{ConvformerConfig, ConvformerEncoder};
use crate::dit_cfm::{normal_noise, CfmConfig, DitDecoder, Solver};
use crate::error::ensure;
use crate::model_file::{self, Family};
use crate::{Error, Result};

/// The mel VAE's configuration: the `convformer:` and `cfm:` sections.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MelVaeConfig {
    /// Encoder (and the KL weight and warm-up).
    pub convformer: ConvformerConfig,
    /// Decoder.
    pub cfm: CfmConfig,
}

impl MelVaeConfig {
    /// Checks both sections and that they agree on the mel bands.
    pub fn validate(&self) -> Result<()> {
        self.convformer.validate()?;
        self.cfm.validate()?;
        ensure(
            self.cfm.mel_channels == self.convformer.mel_channels,
            "cfm.mel_channels",
            || {
                format!(
                    "must equal convformer.mel_channels = {}",
                    self.convformer.mel_channels
                )
            },
        )
    }

    /// Model FLOPs of one [`MelVae::loss`] forward on `[batch, mel, frames]`:
    /// one encoder and one decoder pass ([`melvae_layers::flops`]).
    pub fn forward_flops(&self, batch: usize, frames: usize) -> f64 {
        self.convformer.forward_flops(batch, frames)
            + self
                .cfm
                .forward_flops(self.convformer.latent_dim, batch, frames)
    }

    /// Model FLOPs of a training step (loss, backward) on `[batch, mel,
    /// frames]`: [`melvae_layers::flops::TRAIN_FACTOR`] times the forward.
    pub fn train_step_flops(&self, batch: usize, frames: usize) -> f64 {
        melvae_layers::flops::TRAIN_FACTOR * self.forward_flops(batch, frames)
    }

    /// The KL weight schedule: linear from 0 to `kl_loss_weight` over
    /// `kl_loss_warmup_steps`.
    pub fn kl_schedule(&self) -> KlSchedule {
        KlSchedule::Linear {
            start: 0.0,
            end: self.convformer.kl_loss_weight,
            warmup_steps: self.convformer.kl_loss_warmup_steps,
        }
    }
}

/// How [`MelVae::sample`] integrates the flow.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SampleOptions {
    /// ODE steps.
    pub num_steps: usize,
    /// Scale of the initial noise (0: deterministic).
    pub temperature: f64,
    /// Classifier-free guidance scale (1: conditional only).
    pub guidance_scale: f64,
    /// ODE solver.
    pub solver: Solver,
    /// Seed of the initial noise.
    pub seed: u64,
}

impl SampleOptions {
    /// The settings reconstructions of a model with `cfm` are sampled with
    /// by default (`reconstruct`, `evaluate`, the quickstart, training
    /// samples): 10 midpoint steps, the model's
    /// [`CfmConfig::reconstruction_temperature`], no guidance, seed 0.
    /// Tuned by held-out log-mel L1 and harmonic detail on the quickstart's
    /// voices (docs/models/mel_vae.md).
    pub fn reconstruction(cfm: &CfmConfig) -> Self {
        Self {
            temperature: cfm.reconstruction_temperature,
            ..Default::default()
        }
    }
}

impl Default for SampleOptions {
    /// 10 midpoint steps, temperature 1, no guidance, seed 0.
    fn default() -> Self {
        Self {
            num_steps: 10,
            temperature: 1.0,
            guidance_scale: 1.0,
            solver: Solver::Midpoint,
            seed: 0,
        }
    }
}

/// The loss of one batch and its terms (scalars).
#[derive(Debug, Clone)]
pub struct MelVaeLoss {
    /// `cfm + kl_weight(step) * kl`.
    pub total: Tensor,
    /// Flow-matching MSE on normalised mels.
    pub cfm: Tensor,
    /// KL per latent frame (summed over latent dims).
    pub kl: Tensor,
    /// The KL weight used.
    pub kl_weight: f64,
}

/// The random values of one [`MelVae::loss`] (see
/// [`MelVae::loss_draws`]).
#[derive(Debug, Clone)]
pub struct LossDraws {
    /// Seeds the dropout masks (training only).
    pub dropout_seed: u64,
    /// Reparameterisation noise `[batch, frames / C, latent_dim]`.
    pub eps: Tensor,
    /// 1 where the example keeps its condition, 0 where it is dropped
    /// `[batch, 1, 1]`.
    pub keep: Tensor,
    /// Flow noise `[batch, mel, frames]`.
    pub x0: Tensor,
    /// Flow times `[batch]` in `[0, 1)`.
    pub t: Tensor,
}

impl LossDraws {
    /// The values of the batch rows `rows` (the dropout seed unchanged).
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Result<Self> {
        let narrow = |t: &Tensor| t.narrow(0, rows.start, rows.len());
        Ok(Self {
            dropout_seed: self.dropout_seed,
            eps: narrow(&self.eps)?,
            keep: narrow(&self.keep)?,
            x0: narrow(&self.x0)?,
            t: narrow(&self.t)?,
        })
    }
}

/// A clip and its reconstruction, from [`MelVae::reconstruct`].
#[derive(Debug, Clone)]
pub struct Reconstruction {
    /// The clip's log-mel `[1, mel, frames]`.
    pub input: Tensor,
    /// The decoded log-mel `[1, mel, frames]`.
    pub output: Tensor,
    /// The latent (posterior mean) `[1, ceil(frames / C), latent]`.
    pub latent: Tensor,
}

/// `mel` normalised for the flow and the encoder: `(mel - mel_mean) / mel_std`.
fn normalize(cfm: &CfmConfig, mel: &Tensor) -> Result<Tensor> {
    Ok(mel.affine(1.0 / cfm.mel_std, -cfm.mel_mean / cfm.mel_std)?)
}

/// `mel` `[n_mels, frames]` with `n` frames of silence (`ln(1e-7)`, the
/// `vocos-24k` floor) appended: how clips are padded to a multiple of C,
/// offline and streaming alike.
fn pad_with_silence(mel: Array2<f32>, n: usize) -> Result<Array2<f32>> {
    if n == 0 {
        return Ok(mel);
    }
    let pad = Array2::from_elem((mel.nrows(), n), (1e-7f32).ln());
    ndarray::concatenate(ndarray::Axis(1), &[mel.view(), pad.view()])
        .map_err(|e| Error::invalid("mel padding", e.to_string()))
}

/// One log-mel `[1, mel, frames]` (any float dtype, any device) as a host
/// array `[mel, frames]`, for images and vocoding.
pub fn mel_to_array(mel: &Tensor) -> Result<Array2<f32>> {
    let (b, m, f) = mel.dims3()?;
    if b != 1 {
        return Err(Error::Shape {
            what: "mel to array".into(),
            expected: "[1, mel, frames]".into(),
            got: format!("{:?}", mel.dims()),
        });
    }
    let v: Vec<f32> = mel.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Array2::from_shape_vec((m, f), v).map_err(|e| Error::invalid("mel to array", e.to_string()))
}

/// The mel VAE. Parameters `encoder.*` and `decoder.*`.
#[derive(Debug, Clone)]
pub struct MelVae {
    cfg: MelVaeConfig,
    /// The causal Convformer encoder.
    pub encoder: ConvformerEncoder,
    /// The DiT flow-matching decoder.
    pub decoder: DitDecoder,
    /// `cfm.low_band_weight`'s per-band weights `[1, mel, 1]` in the
    /// model's dtype, built once.
    band_weights: Option<Tensor>,
}

impl MelVae {
    /// Builds both halves; fails on an invalid config, naming the field.
    pub fn new(cfg: MelVaeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let encoder = ConvformerEncoder::new(cfg.convformer.clone(), vb.pp("encoder"))?;
        let decoder = DitDecoder::new(
            cfg.cfm.clone(),
            cfg.convformer.latent_dim,
            cfg.convformer.compress_factor,
            vb.pp("decoder"),
        )?;
        let band_weights = match cfg.cfm.low_band_weight {
            Some(lbw) => {
                let m = cfg.cfm.mel_channels;
                let w = Tensor::from_vec(lbw.band_weights(m), (1, m, 1), vb.device())?;
                Some(w.to_dtype(vb.dtype())?)
            }
            None => None,
        };
        Ok(Self {
            cfg,
            encoder,
            decoder,
            band_weights,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MelVaeConfig {
        &self.cfg
    }

    /// Time compression C.
    pub fn compress(&self) -> usize {
        self.cfg.convformer.compress_factor
    }

    fn normalize(&self, mel: &Tensor) -> Result<Tensor> {
        normalize(&self.cfg.cfm, mel)
    }

    /// The `vocos-24k` preset, checked against the encoder's mel bands
    /// (`verb` says what the audio is for, in the error).
    fn vocos_preset(&self, verb: &str) -> Result<MelConfig> {
        let mc = MelConfig::vocos_24k();
        ensure(
            mc.n_mels == self.cfg.convformer.mel_channels,
            "convformer.mel_channels",
            || {
                format!(
                    "must be {} to {verb} audio with the vocos-24k preset",
                    mc.n_mels
                )
            },
        )?;
        Ok(mc)
    }

    /// Log-mel `[batch, mel, frames]` (frames a multiple of C) to the
    /// latent Gaussian `(mean, logvar)`, each `[batch, frames / C, latent]`.
    pub fn encode(&self, mel: &Tensor) -> Result<(Tensor, Tensor)> {
        self.encoder.forward(&self.normalize(mel)?, Mode::Eval)
    }

    /// Decodes latents `[batch, k, latent]` to log-mels `[batch, mel, k C]`.
    pub fn sample(&self, latent: &Tensor, opts: &SampleOptions) -> Result<Tensor> {
        let x = self.decoder.sample(
            latent,
            opts.num_steps,
            opts.temperature,
            opts.guidance_scale,
            opts.solver,
            opts.seed,
        )?;
        Ok(x.affine(self.cfg.cfm.mel_std, self.cfg.cfm.mel_mean)?)
    }

    /// Audio (mono samples at `sample_rate`) to `(reconstructed log-mel
    /// [1, mel, frames], latent [1, ceil(frames / C), latent])`; see
    /// [`MelVae::reconstruct`], which also returns the input log-mel.
    pub fn encode_and_sample(
        &self,
        audio: &[f32],
        sample_rate: u32,
        opts: &SampleOptions,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let r = self.reconstruct(audio, sample_rate, opts, device)?;
        Ok((r.output, r.latent))
    }

    /// Encodes and decodes a clip: the audio is resampled to the
    /// `vocos-24k` rate, its log-mel padded with silence frames to a
    /// multiple of C and encoded (the latent is the posterior mean), the
    /// latent decoded, and both log-mels cut back to the clip's own frames.
    pub fn reconstruct(
        &self,
        audio: &[f32],
        sample_rate: u32,
        opts: &SampleOptions,
        device: &Device,
    ) -> Result<Reconstruction> {
        let (padded, frames) = self.padded_mel(audio, sample_rate, device)?;
        let (latent, _) = self.encode(&padded)?;
        let output = self.sample(&latent, opts)?.narrow(2, 0, frames)?;
        Ok(Reconstruction {
            input: padded.narrow(2, 0, frames)?.contiguous()?,
            output: output.contiguous()?,
            latent: latent.detach(),
        })
    }

    /// The `vocos-24k` log-mel of `audio` as `[1, mel, frames]`, padded
    /// with silence (`ln(1e-7)`) to a multiple of C frames.
    pub fn audio_to_mel(&self, audio: &[f32], sample_rate: u32, device: &Device) -> Result<Tensor> {
        Ok(self.padded_mel(audio, sample_rate, device)?.0)
    }

    /// [`MelVae::audio_to_mel`] and the clip's own frame count.
    fn padded_mel(
        &self,
        audio: &[f32],
        sample_rate: u32,
        device: &Device,
    ) -> Result<(Tensor, usize)> {
        let mc = self.vocos_preset("encode")?;
        let audio = if sample_rate == mc.sample_rate {
            audio.to_vec()
        } else {
            resample(
                &[audio.to_vec()],
                sample_rate,
                mc.sample_rate,
                ResampleQuality::Sinc,
            )?
            .remove(0)
        };
        let mel = MelExtractor::new(mc)?.extract(&audio)?;
        let (m, t) = mel.dim();
        let padded = t.div_ceil(self.compress()) * self.compress();
        let mel = pad_with_silence(mel, padded - t)?;
        let data: Vec<f32> = mel.iter().copied().collect();
        Ok((Tensor::from_vec(data, (1, m, padded), device)?, t))
    }

    /// The loss of `mel` (`[batch, mel, frames]`, frames a multiple of C)
    /// at `step`. All randomness comes from `rng`: the reparameterisation
    /// noise, the flow noise and times and, in training (`train`), the
    /// dropout masks and the per-example condition drop (probability
    /// `cfm.cond_drop_prob`, for classifier-free guidance). In evaluation
    /// (`train` false) dropout is off and every condition kept. Equal to
    /// [`MelVae::loss_with`] on [`MelVae::loss_draws`] from the same `rng`.
    pub fn loss(
        &self,
        mel: &Tensor,
        step: u64,
        rng: &mut SplitMix64,
        train: bool,
    ) -> Result<MelVaeLoss> {
        let draws = self.loss_draws(mel, rng, train)?;
        self.loss_with(mel, step, &draws, train)
    }

    /// The random values one [`MelVae::loss`] of `mel` draws from `rng`,
    /// in its order.
    pub fn loss_draws(&self, mel: &Tensor, rng: &mut SplitMix64, train: bool) -> Result<LossDraws> {
        self.loss_draws_for(mel.dims3()?, mel.device(), mel.dtype(), rng, train)
    }

    /// [`MelVae::loss_draws`] for a batch of log-mels of dims
    /// `(batch, mel, frames)` on `dev` in `dt`, without the batch itself
    /// (a data-parallel rank draws the whole batch's values and keeps its
    /// rows with [`LossDraws::rows`]).
    pub fn loss_draws_for(
        &self,
        (b, m, frames): (usize, usize, usize),
        dev: &Device,
        dt: DType,
        rng: &mut SplitMix64,
        train: bool,
    ) -> Result<LossDraws> {
        let dropout_seed = rng.next_u64();
        let latent = (b, frames / self.compress(), self.latent_dim());
        let eps = normal_noise(&[latent.0, latent.1, latent.2], rng, dev)?.to_dtype(dt)?;
        let keep: Vec<f32> = (0..b)
            .map(|_| (!train || rng.next_f64() >= self.cfg.cfm.cond_drop_prob) as u8 as f32)
            .collect();
        let keep = Tensor::from_vec(keep, (b, 1, 1), dev)?.to_dtype(dt)?;
        let x0 = normal_noise(&[b, m, frames], rng, dev)?.to_dtype(dt)?;
        let sampling = self.cfg.cfm.time_sampling;
        let t: Vec<f32> = (0..b).map(|_| sampling.draw(rng) as f32).collect();
        let t = Tensor::from_vec(t, b, dev)?.to_dtype(time_dtype(dt))?;
        Ok(LossDraws {
            dropout_seed,
            eps,
            keep,
            x0,
            t,
        })
    }

    /// [`MelVae::loss`] with its random values given: deterministic (a
    /// PyTorch twin reproduces it from the same draws).
    pub fn loss_with(
        &self,
        mel: &Tensor,
        step: u64,
        draws: &LossDraws,
        train: bool,
    ) -> Result<MelVaeLoss> {
        let dropout = DropoutRng::new(draws.dropout_seed);
        let mode = if train {
            Mode::Train(&dropout)
        } else {
            Mode::Eval
        };
        let x1 = self.normalize(mel)?;
        let (mean, logvar) = self.encoder.forward(&x1, mode)?;
        ensure(
            mean.dims() == draws.eps.dims(),
            "mel_vae loss draws",
            || {
                format!(
                    "eps {:?} does not match the latent {:?}",
                    draws.eps.dims(),
                    mean.dims()
                )
            },
        )?;
        let z = (&mean + ((&logvar * 0.5)?.exp()? * &draws.eps)?)?;
        let cond = z.broadcast_mul(&draws.keep)?;
        let (xt, u) = flow_matching_target(&draws.x0, &x1, &draws.t, self.cfg.cfm.sigma)?;
        let v = self.decoder.forward(&xt, &draws.t, &cond, mode)?;
        let cfm = match &self.band_weights {
            Some(w) => weighted_flow_matching_loss(&v, &u, w)?,
            None => flow_matching_loss(&v, &u, None)?,
        };
        let kl = kl_loss(&mean, &logvar, FreeBits::None)?;
        let kl_weight = self.cfg.kl_schedule().weight(step);
        let total = (&cfm + (&kl * kl_weight)?)?;
        Ok(MelVaeLoss {
            total,
            cfm,
            kl,
            kl_weight,
        })
    }

    /// Mean absolute error between two log-mels of one shape.
    pub fn mel_l1(a: &Tensor, b: &Tensor) -> Result<f64> {
        Ok((a - b)?
            .abs()?
            .mean_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?)
    }

    /// Loads a mel VAE model file (see [`crate::model_file`]) on `device`
    /// in `dtype` (f32 anywhere; bf16/f16 on CUDA), as plain tensors.
    pub fn load(path: &std::path::Path, device: &Device, dtype: DType) -> Result<Self> {
        Ok(model_file::load::<Self>(path, device, dtype)?.0)
    }

    /// A stream that turns `vocos-24k` audio (mono, 24 kHz), fed in
    /// chunks of any size, into latents as they become final; see
    /// [`EncoderStream`].
    pub fn encoder_stream(&self) -> Result<EncoderStream> {
        let mc = self.vocos_preset("stream")?;
        let mut encoder = self.encoder.clone();
        encoder.reset();
        Ok(EncoderStream {
            mel: MelStream::new(mc)?,
            encoder,
            cfm: self.cfg.cfm.clone(),
            latent_dim: self.latent_dim(),
            compress: self.compress(),
            frames: 0,
        })
    }

    /// Latent dimension.
    pub fn latent_dim(&self) -> usize {
        self.cfg.convformer.latent_dim
    }

    /// Reduces a stacked `(mean ‖ logvar)` streaming output of the encoder
    /// (`[batch, n, 2 * latent]`) to the mean.
    pub fn stream_mean(&self, stacked: &Tensor) -> Result<Tensor> {
        Ok(stacked.narrow(D::Minus1, 0, self.latent_dim())?)
    }
}

/// Audio to latents as it arrives: the `vocos-24k` mel frontend
/// ([`MelStream`]) and the causal encoder, both streaming, with state that
/// stays bounded however long the stream (the encoder's tail attends to
/// `convformer.tf_context` latent frames). The latents of all
/// [`EncoderStream::push`] calls and [`EncoderStream::finish`] equal
/// [`MelVae::encode`] of [`MelVae::audio_to_mel`] on the whole signal (to
/// float rounding): the end is padded with silence frames to a multiple of
/// C, as offline.
#[derive(Debug)]
pub struct EncoderStream {
    mel: MelStream,
    encoder: ConvformerEncoder,
    /// Its `mel_mean` / `mel_std` normalise the frames.
    cfm: CfmConfig,
    latent_dim: usize,
    compress: usize,
    /// Mel frames fed to the encoder.
    frames: usize,
}

/// Latents from an [`EncoderStream`]: posterior means and log-variances,
/// each `[1, n, latent]`.
#[derive(Debug, Clone)]
pub struct StreamedLatents {
    /// Posterior means.
    pub mean: Tensor,
    /// Posterior log-variances.
    pub logvar: Tensor,
}

impl EncoderStream {
    /// Samples between the first sample a latent covers and the moment it
    /// is final: `C - 1` hops plus the STFT's half window (2304 samples,
    /// 96 ms, at C = 8).
    pub fn latency_samples(&self) -> usize {
        (self.compress - 1) * self.mel.config().stft.hop_length + self.mel.latency_samples()
    }

    /// Audio samples per latent frame (`C * hop`).
    pub fn samples_per_latent(&self) -> usize {
        self.compress * self.mel.config().stft.hop_length
    }

    fn encode_frames(
        &mut self,
        mel: ndarray::Array2<f32>,
        device: &Device,
    ) -> Result<Option<StreamedLatents>> {
        let (m, n) = mel.dim();
        if n == 0 {
            return Ok(None);
        }
        self.frames += n;
        let data: Vec<f32> = mel.iter().copied().collect();
        let x = normalize(&self.cfm, &Tensor::from_vec(data, (1, m, n), device)?)?;
        let dtype = self.encoder_dtype();
        let x = x.to_dtype(dtype)?;
        Ok(match self.encoder.step(&x)? {
            Some(y) => {
                let l = self.latent_dim;
                Some(StreamedLatents {
                    mean: y.narrow(D::Minus1, 0, l)?.detach(),
                    logvar: y.narrow(D::Minus1, l, l)?.detach(),
                })
            }
            None => None,
        })
    }

    fn encoder_dtype(&self) -> DType {
        self.encoder.dtype()
    }

    /// Feeds the next mono 24 kHz samples; returns the latents that became
    /// final (`None` when none did), on `device`.
    pub fn push(&mut self, audio: &[f32], device: &Device) -> Result<Option<StreamedLatents>> {
        let mel = self.mel.push(audio)?;
        self.encode_frames(mel, device)
    }

    /// Ends the stream: the remaining latents (the last mel frames, padded
    /// with silence to a multiple of C), then resets for a new stream.
    pub fn finish(&mut self, device: &Device) -> Result<Option<StreamedLatents>> {
        let out = self.finish_inner(device);
        self.reset();
        out
    }

    fn finish_inner(&mut self, device: &Device) -> Result<Option<StreamedLatents>> {
        let mel = self.mel.finish()?;
        let total = self.frames + mel.ncols();
        let padded = total.div_ceil(self.compress) * self.compress;
        let mel = pad_with_silence(mel, padded - total)?;
        self.encode_frames(mel, device)
    }

    /// Numbers held as stream state (mel frontend samples, encoder buffers
    /// and KV caches): bounded, whatever the stream's length.
    pub fn state_elements(&self) -> usize {
        self.mel.buffered_samples() + self.encoder.state_elements()
    }

    /// Forgets the stream, as if nothing had been pushed.
    pub fn reset(&mut self) {
        self.mel.reset();
        self.encoder.reset();
        self.frames = 0;
    }
}

impl Family for MelVae {
    const NAME: &'static str = "mel_vae";
    type Config = MelVaeConfig;

    fn build(cfg: MelVaeConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(cfg, vb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;
    use candle_nn::{Optimizer, VarMap};
    use melvae_layers::testing::{max_abs_diff, noise, randomize};

    fn tiny() -> MelVaeConfig {
        MelVaeConfig {
            convformer: ConvformerConfig {
                mel_channels: 12,
                compress_factor: 4,
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
            },
            cfm: CfmConfig {
                mel_channels: 12,
                unet_dim: 16,
                unet_depth: 1,
                unet_heads: 2,
                unet_dropout_rate: 0.0,
                sigma: 1e-4,
                cond_drop_prob: 0.2,
                mel_mean: -5.0,
                mel_std: 3.0,
                time_sampling: Default::default(),
                low_band_weight: None,
                reconstruction_temperature: 0.8,
            },
        }
    }

    fn mels(seed: u64) -> Tensor {
        ((noise(&[2, 12, 16], seed).unwrap() * 2.0).unwrap() - 5.0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    #[test]
    fn low_band_weight_weighs_the_flow_loss_by_band() {
        let mut cfg = tiny();
        let vm = VarMap::new();
        let vb = || VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let plain = MelVae::new(cfg.clone(), vb()).unwrap();
        let lbw = crate::LowBandWeight {
            bands: 4,
            weight: 3.0,
        };
        cfg.cfm.low_band_weight = Some(lbw);
        // The same weights (the VarMap hands back its variables).
        let weighted = MelVae::new(cfg.clone(), vb()).unwrap();
        let mel = mels(1);
        let draws = plain
            .loss_draws(&mel, &mut SplitMix64::new(3), false)
            .unwrap();
        let (a, b) = (
            plain.loss_with(&mel, 0, &draws, false).unwrap(),
            weighted.loss_with(&mel, 0, &draws, false).unwrap(),
        );
        // Untrained, the decoder's output layer is zero: v = 0, so the loss
        // is the target's (weighted) mean square, band by band.
        let x1 = plain.normalize(&mel).unwrap();
        let (_, u) = flow_matching_target(&draws.x0, &x1, &draws.t, cfg.cfm.sigma).unwrap();
        let band_ms: Vec<f32> = u
            .sqr()
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
            .mean(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let w = lbw.band_weights(12);
        let want_plain = band_ms.iter().sum::<f32>() / 12.0;
        let want_weighted = band_ms
            .iter()
            .zip(&w)
            .map(|(m, w)| m * *w as f32)
            .sum::<f32>()
            / 12.0;
        let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap();
        assert!((scalar(&a.cfm) - want_plain).abs() < 1e-5 * want_plain);
        assert!((scalar(&b.cfm) - want_weighted).abs() < 1e-5 * want_weighted);
        assert!((want_plain - want_weighted).abs() > 1e-3 * want_plain);
        assert_eq!(scalar(&a.kl), scalar(&b.kl));
    }

    #[test]
    fn model_flops_match_the_parameters() {
        // 13 mel bands and C = 8: three stages, bands 13 -> 7 -> 4 -> 2.
        let mut cfg = tiny();
        cfg.convformer.mel_channels = 13;
        cfg.cfm.mel_channels = 13;
        cfg.convformer.compress_factor = 8;
        cfg.convformer.n_residual_blocks = 2;
        let vm = VarMap::new();
        MelVae::new(
            cfg.clone(),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let (b, t) = (3, 32);
        let bands = [13, 7, 4, 2];
        // Rows (output positions) each weight matrix or kernel is applied to.
        let rows = |name: &str| -> usize {
            let part: Vec<&str> = name.split('.').collect();
            match (part[0], part[1]) {
                ("encoder", "input" | "context") => b * bands[0] * t,
                ("encoder", "stages") => {
                    let s: usize = part[2].parse().unwrap();
                    b * bands[s + 1] * (t >> (s + 1))
                }
                ("encoder", _) => b * t / 8,
                ("decoder", "time" | "final_ada") => b,
                ("decoder", "blocks") if part[3] == "ada_ln" => b,
                _ => b * t,
            }
        };
        let weights: f64 = melvae_layers::testing::named_vars(&vm)
            .iter()
            .filter(|(_, v)| v.rank() >= 2)
            .map(|(n, v)| 2.0 * v.elem_count() as f64 * rows(n) as f64)
            .sum();
        let attention = melvae_layers::flops::attention(b, t / 8, t / 8, 8)
            + melvae_layers::flops::attention(b, t, t, 16);
        assert_eq!(cfg.forward_flops(b, t), weights + attention);
        assert_eq!(cfg.train_step_flops(b, t), 3.0 * (weights + attention));
    }

    #[test]
    fn shapes_and_determinism() {
        let vm = VarMap::new();
        let vae = MelVae::new(
            tiny(),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let (m, v) = vae.encode(&mels(1)).unwrap();
        assert_eq!((m.dims(), v.dims()), (&[2, 4, 4][..], &[2, 4, 4][..]));
        assert_eq!(
            vae.sample(
                &m,
                &SampleOptions {
                    num_steps: 3,
                    guidance_scale: 2.0,
                    ..Default::default()
                }
            )
            .unwrap()
            .dims(),
            &[2, 12, 16]
        );
        let l1 = vae
            .loss(&mels(1), 5, &mut SplitMix64::new(3), true)
            .unwrap();
        let l2 = vae
            .loss(&mels(1), 5, &mut SplitMix64::new(3), true)
            .unwrap();
        assert_eq!(
            l1.total.to_scalar::<f32>().unwrap(),
            l2.total.to_scalar::<f32>().unwrap(),
            "seeded"
        );
        assert!(
            (l1.kl_weight - 5e-4).abs() < 1e-12,
            "linear warm-up: step 5 of 10"
        );
        let e = MelVae::new(
            MelVaeConfig {
                cfm: CfmConfig {
                    mel_channels: 10,
                    ..tiny().cfm
                },
                ..tiny()
            },
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap_err();
        assert!(e.to_string().contains("cfm.mel_channels"), "{e}");
    }

    #[test]
    fn encode_and_sample_from_audio() {
        let cfg = MelVaeConfig {
            convformer: ConvformerConfig {
                mel_channels: 100,
                ..tiny().convformer
            },
            cfm: CfmConfig {
                mel_channels: 100,
                ..tiny().cfm
            },
        };
        let vm = VarMap::new();
        let vae = MelVae::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let audio: Vec<f32> = (0..16000).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
        let (recon, latent) = vae
            .encode_and_sample(
                &audio,
                16000,
                &SampleOptions {
                    num_steps: 2,
                    ..Default::default()
                },
                &Device::Cpu,
            )
            .unwrap();
        // 1 s at 24 kHz: 94 frames, padded to 96 = 24 latent frames x 4;
        // the output is cut back to the clip's 94.
        assert_eq!(recon.dims(), &[1, 100, 94]);
        assert_eq!(latent.dims(), &[1, 24, 4]);
        let a = mel_to_array(&recon).unwrap();
        assert_eq!(a.dim(), (100, 94));
        let v = recon.i((0, 3, 5)).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(a[[3, 5]], v);
        let e = mel_to_array(&Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("mel to array") && e.contains("[2, 3, 4]"), "{e}");
    }

    #[test]
    fn a_few_steps_lower_the_loss_and_checkpoints_round_trip() {
        let vm = VarMap::new();
        let vae = MelVae::new(
            tiny(),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        randomize(&vm, 0.2, 1).unwrap();
        let data = mels(7);
        let mut opt = candle_nn::AdamW::new(
            vm.all_vars(),
            candle_nn::ParamsAdamW {
                lr: 3e-3,
                ..Default::default()
            },
        )
        .unwrap();
        // Average over several noise draws so the comparison is about the model, not the draw.
        let eval = |vae: &MelVae| -> f32 {
            (0..8)
                .map(|s| {
                    vae.loss(&data, 1000, &mut SplitMix64::new(100 + s), false)
                        .unwrap()
                        .cfm
                        .to_scalar::<f32>()
                        .unwrap()
                })
                .sum::<f32>()
                / 8.0
        };
        let before = eval(&vae);
        let mut rng = SplitMix64::new(5);
        for step in 0..60 {
            let l = vae.loss(&data, step, &mut rng, true).unwrap();
            opt.backward_step(&l.total).unwrap();
        }
        let after = eval(&vae);
        assert!(
            after < before * 0.8,
            "flow-matching loss {before} -> {after}"
        );

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        vm.save(&p).unwrap();
        let mut vm2 = VarMap::new();
        let vae2 = MelVae::new(
            tiny(),
            VarBuilder::from_varmap(&vm2, DType::F32, &Device::Cpu),
        )
        .unwrap();
        vm2.load(&p).unwrap();
        let (a, _) = vae.encode(&data).unwrap();
        let (b, _) = vae2.encode(&data).unwrap();
        assert_eq!(max_abs_diff(&a, &b).unwrap(), 0.0);
        let sa = vae
            .sample(
                &a,
                &SampleOptions {
                    num_steps: 2,
                    guidance_scale: 1.5,
                    seed: 3,
                    ..Default::default()
                },
            )
            .unwrap();
        let sb = vae2
            .sample(
                &b,
                &SampleOptions {
                    num_steps: 2,
                    guidance_scale: 1.5,
                    seed: 3,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(max_abs_diff(&sa, &sb).unwrap(), 0.0);
    }
}
