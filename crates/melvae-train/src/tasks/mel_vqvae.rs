//! Training the mel VQ-VAE on a folder of audio (mono): random crops, their
//! mels (the model's features), reconstruction + codebook + commitment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use melvae_dsp::{SpectrogramImage, SplitMix64, TensorMel};
use melvae_models::eval::MelToAudio;
use melvae_models::mel_vae::mel_to_array;
use melvae_models::{
    AdversarialWeights, DiscriminatorsConfig, MelVqVae, MelVqVaeConfig, PatchDiscriminator,
};
use serde::{Deserialize, Serialize};

use crate::data::{AudioDataConfig, AudioFolder, EpochCursor};
use crate::dist::{Communicator, Shard, SingleProcess};
use crate::trainer::{Losses, StepContext, TrainTask};
use crate::{Error, Result};

impl crate::Validate for MelVqVaeConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        MelVqVaeConfig::validate(self).map_err(|e| super::mel_vae::section_err(e, "mel_vqvae"))
    }
}

/// The `mel_vqvae:` section of a resolved config, validated with errors
/// naming file and key.
pub fn mel_vqvae_config(cfg: &crate::ResolvedConfig) -> Result<MelVqVaeConfig> {
    cfg.get("mel_vqvae")
}

/// The `mel_vqvae_loss:` section: the adversarial phase's terms (used with
/// `discriminators: {patch: ...}` and `training.gan`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MelVqVaeLossConfig {
    /// The generator's hinge (or least-squares) loss and feature matching.
    #[serde(default = "default_adversarial")]
    pub adversarial: AdversarialWeights,
}

/// SpecVQGAN's discriminator weight (0.8, there scaled adaptively; fixed
/// here) and no feature matching (the original has none).
fn default_adversarial() -> AdversarialWeights {
    AdversarialWeights {
        weight: 0.8,
        feature_matching: 0.0,
        ..AdversarialWeights::default()
    }
}

impl Default for MelVqVaeLossConfig {
    fn default() -> Self {
        Self {
            adversarial: default_adversarial(),
        }
    }
}

impl crate::Validate for MelVqVaeLossConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        let a = self.adversarial;
        for (v, key) in [
            (a.weight, "mel_vqvae_loss.adversarial.weight"),
            (
                a.feature_matching,
                "mel_vqvae_loss.adversarial.feature_matching",
            ),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err((key.into(), format!("must be a finite weight >= 0, got {v}")));
            }
        }
        Ok(())
    }
}

/// The mel VQ-VAE's sections: `mel_vqvae:`, `mel_vqvae_loss:` (defaults
/// when absent) and `discriminators:` (its `patch`).
pub type MelVqVaeSections = super::GeneratorSections<MelVqVaeConfig, MelVqVaeLossConfig>;

/// The mel VQ-VAE's sections of a resolved config, validated with errors
/// naming file and key.
pub fn mel_vqvae_sections(cfg: &crate::ResolvedConfig) -> Result<MelVqVaeSections> {
    super::generator_sections(cfg, "mel_vqvae", "mel_vqvae_loss")
}

/// The mel VQ-VAE as a [`TrainTask`]: random crops of an [`AudioFolder`]
/// at the features' rate (mono), their log-mels cut to a multiple of the
/// model's time factor, the model's loss (reconstruction + codebook +
/// commitment; the codebook's usage, perplexity and restarted codes logged beside it);
/// validation on fixed held-out crops (`recon`, which picks the best
/// checkpoint, `recon_clip_mean`: the same loss of each crop's mean
/// spectrum, a naive baseline; `perplexity`, `usage`); input and reconstructed mels (PNG)
/// and the reconstruction through Griffin-Lim or `training.sample_vocoder`
/// (WAV) as samples. With
/// [`MelVqVaeTask::with_adversarial`], a patch discriminator judges the
/// reconstructed mels in the GAN phase.
pub struct MelVqVaeTask {
    /// The parameters (`encoder.*`, `vq.*`, `decoder.*`).
    pub varmap: VarMap,
    /// The model.
    pub model: MelVqVae,
    mel: TensorMel,
    data: AudioFolder,
    data_cfg: AudioDataConfig,
    cursor: EpochCursor,
    seed: u64,
    shard: Shard,
    device: Device,
    dtype: DType,
    to_audio: MelToAudio,
    /// The patch discriminator and its parameters (`disc.*`), with the
    /// adversarial terms' weights.
    adversarial: Option<(VarMap, PatchDiscriminator, AdversarialWeights)>,
}

impl MelVqVaeTask {
    /// Samples' audio through `vocoder` (a Vocos on the model's features,
    /// see [`MelToAudio::new`]) instead of Griffin-Lim.
    pub fn with_vocoder(mut self, vocoder: MelToAudio) -> Self {
        self.to_audio = vocoder;
        self
    }

    /// Adversarial training (with `training.gan`): `disc.patch` judges
    /// the reconstructed log-mels against the inputs; the generator adds
    /// `loss.adversarial.weight` x its GAN loss and
    /// `loss.adversarial.feature_matching` x the feature matching once the
    /// adversarial phase starts. Waveform discriminators are refused,
    /// naming them.
    pub fn with_adversarial(
        mut self,
        loss: MelVqVaeLossConfig,
        discriminators: DiscriminatorsConfig,
    ) -> Result<Self> {
        if let Some(k) = discriminators.waveform_keys().first() {
            return Err(Error::invalid(
                format!("discriminators.{k}"),
                "judges waveforms; the mel VQ-VAE is judged by discriminators.patch",
            ));
        }
        let Some(patch) = discriminators.patch else {
            return Err(Error::invalid(
                "discriminators.patch",
                "the mel VQ-VAE's adversarial phase needs a patch discriminator",
            ));
        };
        let dmap = VarMap::new();
        let vb =
            melvae_layers::seeded_var_builder(&dmap, self.seed ^ 0xD15C, self.dtype, &self.device);
        let disc = PatchDiscriminator::new(&patch, vb.pp("disc").pp("patch"))?;
        self.adversarial = Some((dmap, disc, loss.adversarial));
        Ok(self)
    }

    /// Builds the model on `device` in `dtype` for mono `data` at the
    /// features' rate; crops must give at least one token row.
    pub fn new(
        cfg: MelVqVaeConfig,
        data: AudioFolder,
        data_cfg: AudioDataConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mel_cfg = cfg.mel_config()?;
        data_cfg.require(mel_cfg.sample_rate, 1, "mel_vqvae model")?;
        let frames = data_cfg.crop_samples() / mel_cfg.stft.hop_length + 1;
        if frames < cfg.time_factor() {
            return Err(Error::invalid(
                "data.crop_seconds",
                format!(
                    "crops of {frames} mel frames are shorter than one token row ({} frames)",
                    cfg.time_factor()
                ),
            ));
        }
        let varmap = VarMap::new();
        let model = MelVqVae::new(
            cfg,
            melvae_layers::seeded_var_builder(&varmap, seed, dtype, device),
        )?;
        Ok(Self {
            to_audio: MelToAudio::new(None, &mel_cfg)?,
            mel: TensorMel::new(mel_cfg, device)?,
            varmap,
            model,
            data,
            data_cfg,
            cursor: EpochCursor { epoch: 0, pos: 0 },
            seed,
            shard: Shard::WHOLE,
            device: device.clone(),
            dtype,
            adversarial: None,
        })
    }

    /// Log-mels `[batch, n_mels, frames]` of audio `[batch, 1, samples]`,
    /// cut to a multiple of the time factor.
    fn mels(&self, audio: &Tensor) -> Result<Tensor> {
        let mel = self.mel.forward(&audio.squeeze(1)?)?;
        let f = self.model.time_factor();
        let frames = mel.dim(2)? / f * f;
        Ok(mel.narrow(2, 0, frames)?.contiguous()?)
    }

    fn val_mels(&self) -> Result<Tensor> {
        let hop = self.model.mel_config().stft.hop_length;
        self.mels(&super::waveform::val_crops(
            &self.data,
            hop,
            &self.device,
            self.dtype,
        )?)
    }
}

impl TrainTask for MelVqVaeTask {
    type Batch = Tensor;

    /// Every variable, the quantiser's buffers (`vq.usage`, `vq.ema_sum`)
    /// included so that checkpoints keep them: they get no gradient, and
    /// the optimiser leaves such variables alone.
    fn vars(&self) -> Vec<(String, Var)> {
        melvae_layers::named_vars(&self.varmap)
    }

    fn disc_vars(&self) -> Vec<(String, Var)> {
        self.adversarial
            .as_ref()
            .map_or_else(Vec::new, |(m, _, _)| melvae_layers::named_vars(m))
    }

    /// The patch discriminator's loss on the input mels and their
    /// reconstruction (the quantiser in evaluation mode: no codebook
    /// updates from the discriminator's turn).
    fn disc_losses(&mut self, batch: &Tensor, _ctx: StepContext) -> Result<Option<Losses>> {
        let Some((_, disc, w)) = &self.adversarial else {
            return Ok(None);
        };
        let fake = self.model.forward(batch, false)?.recon;
        let (d, _) = super::waveform::discriminator_step(disc, *w, batch, &fake)?;
        Ok(Some(Losses {
            total: d.clone(),
            terms: BTreeMap::from([("d".to_string(), d)]),
        }))
    }

    fn train_batch(&mut self, rng: &mut SplitMix64) -> Result<Tensor> {
        let batch = self.data_cfg.batch_size;
        let rows = self.shard.rows(batch, "data.batch_size")?;
        let idx = self.cursor.next(&self.data.train, self.seed, batch);
        let hop = self.model.mel_config().stft.hop_length;
        // Every row is cropped (the same draws on every rank); this rank
        // keeps its own.
        let audio =
            super::waveform::crops(&self.data.train, &idx, rng, hop, &self.device, self.dtype)?;
        self.mels(&audio.narrow(0, rows.start, rows.len())?)
    }

    /// Data-parallel: every loss is a mean over the rank's rows, and the
    /// codebook's statistics are the global batch's (`losses_across`), so
    /// the ranks together train as one process on the global batch.
    fn set_shard(&mut self, shard: Shard) -> Result<()> {
        self.shard = shard.for_batch(self.data_cfg.batch_size)?;
        Ok(())
    }

    /// Reconstruction + codebook + commitment, plus the adversarial terms
    /// (`adv`, `fm`) in the adversarial phase.
    fn losses(&mut self, batch: &Tensor, ctx: StepContext) -> Result<Losses> {
        self.losses_across(batch, ctx, &SingleProcess)
    }

    /// [`TrainTask::losses`]; the quantiser's code counts, EMA sums and
    /// restarts are shared over `comm`'s ranks.
    fn losses_across(
        &mut self,
        batch: &Tensor,
        ctx: StepContext,
        comm: &dyn Communicator,
    ) -> Result<Losses> {
        let mut ranks = crate::dist::ranks(comm, &self.device)?;
        let out = self.model.forward_across(batch, &mut ranks)?;
        let mut total = out.loss;
        let mut terms = super::quantizer_terms(out.vq)?;
        terms.insert("recon".to_string(), out.recon_loss);
        if let (Some((_, disc, w)), true) = (&self.adversarial, ctx.adversarial) {
            let (adv, fm) = super::waveform::generator_terms(disc, *w, batch, &out.recon, None)?;
            total = (total + (&adv * w.weight)? + (&fm * w.feature_matching)?)?;
            terms.insert("adv".into(), adv);
            terms.insert("fm".into(), fm);
        }
        Ok(Losses { total, terms })
    }

    fn validate(&mut self, _ctx: StepContext) -> Result<BTreeMap<String, f64>> {
        let mel = self.val_mels()?;
        let out = self.model.forward(&mel, false)?;
        let recon = out.recon_loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        // An honest naive baseline beside it: each crop's mean spectrum
        // (every frame replaced by the crop's average log-mel), scored
        // with the same loss.
        let mean = mel.mean_keepdim(2)?.broadcast_as(mel.shape())?;
        let base = self.model.config().recon_loss.of(&mean, &mel)?;
        Ok(BTreeMap::from([
            ("recon".to_string(), recon),
            (
                "recon_clip_mean".to_string(),
                base.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            ),
            ("perplexity".to_string(), out.vq.perplexity),
            ("usage".to_string(), out.vq.usage),
        ]))
    }

    fn best_metric(&self) -> &str {
        "recon"
    }

    fn samples(&mut self, ctx: StepContext, dir: &Path) -> Result<Vec<PathBuf>> {
        let mel = self.val_mels()?.narrow(0, 0, 1)?;
        let recon = self.model.decode(&self.model.encode(&mel)?)?;
        let cfg = *self.model.mel_config();
        let stem = |what: &str| format!("step{:08}_{what}", ctx.step);
        let img = SpectrogramImage::for_mel(&cfg);
        let input = dir.join(stem("input.png"));
        img.save_png(&input, &mel_to_array(&mel)?)?;
        let mut written = vec![input];
        written.extend(super::write_mel_sample(
            &recon,
            &cfg,
            &self.to_audio,
            dir,
            &stem("recon"),
        )?);
        Ok(written)
    }

    fn save_model_file(&self, path: &Path, metadata: &BTreeMap<String, String>) -> Result<bool> {
        super::write_model_file::<MelVqVae>(path, self.model.config(), &self.varmap, metadata)
    }

    fn state(&self) -> serde_json::Value {
        super::quantizer_state(&self.cursor, self.model.quantizer())
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        super::load_quantizer_state(&mut self.cursor, self.model.quantizer_mut(), state)
    }
}
