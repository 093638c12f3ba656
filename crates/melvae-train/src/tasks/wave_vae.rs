//! Training the waveform VAE on a folder of audio (mono or stereo).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use melvae_dsp::SplitMix64;
use melvae_losses::{LossBalancer, NormAverage};
use melvae_models::{
    DiscOutput, Discriminators, DiscriminatorsConfig, WaveVae, WaveVaeConfig, WaveVaeLoss,
    WaveVaeLossConfig, WaveVaeObjective,
};

use crate::data::{AudioDataConfig, AudioFolder, AudioSet, EpochCursor};
use crate::dist::{Communicator, Shard, SingleProcess};
use crate::trainer::{Losses, StepContext, TrainTask};
use crate::{Error, Result};

impl crate::Validate for WaveVaeConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        WaveVaeConfig::validate(self).map_err(|e| super::mel_vae::section_err(e, "wave_vae"))
    }
}

impl crate::Validate for WaveVaeLossConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        WaveVaeLossConfig::validate(self)
            .map_err(|e| super::mel_vae::section_err(e, "wave_vae_loss"))
    }
}

impl crate::Validate for DiscriminatorsConfig {}

/// The waveform VAE's sections of a resolved config: `wave_vae:`,
/// `wave_vae_loss:` and `discriminators:`.
pub type WaveVaeSections = super::GeneratorSections<WaveVaeConfig, WaveVaeLossConfig>;

/// The waveform VAE's sections of a resolved config, validated with errors
/// naming file and key.
pub fn wave_vae_config(cfg: &crate::ResolvedConfig) -> Result<WaveVaeSections> {
    super::generator_sections(cfg, "wave_vae", "wave_vae_loss")
}

/// A training batch: audio `[batch, audio_channels, crop]` (the crop cut to
/// a multiple of the hop; a data-parallel rank's rows of the global batch)
/// and the seed of the global batch's noise.
#[derive(Debug, Clone)]
pub struct WaveBatch {
    /// The audio.
    pub audio: Tensor,
    /// Seed of the reparameterisation noise.
    pub seed: u64,
}

/// The waveform VAE as a [`TrainTask`]: random crops of an [`AudioFolder`]
/// at the model's rate and channel count, the [`WaveVae`] loss, validation
/// on fixed held-out crops, input and reconstruction WAVs and spectrogram
/// PNGs as samples.
pub struct WaveVaeTask {
    /// The parameters (`encoder.*`, `decoder.*`).
    pub varmap: VarMap,
    /// The model.
    pub model: WaveVae,
    /// The reconstruction and KL objective.
    pub objective: WaveVaeObjective,
    /// The data.
    pub data: AudioFolder,
    /// The discriminators and their parameters (`disc.*`), when the run
    /// trains adversarially.
    pub discriminators: Option<(VarMap, Discriminators)>,
    /// The generator pass and the discriminators' view of the real audio
    /// of a discriminator step, kept for the generator step of the same
    /// batch (step and seed), so neither is computed twice.
    pending: Option<(u64, u64, WaveVaeLoss, DiscOutput)>,
    /// EnCodec's balancer over the output losses, when configured.
    balancer: Option<LossBalancer>,
    data_cfg: AudioDataConfig,
    cursor: EpochCursor,
    seed: u64,
    shard: Shard,
    device: Device,
    dtype: DType,
}

impl WaveVaeTask {
    /// Builds the model (and the discriminators, if configured) on `device`
    /// in `dtype` (seeded initialisation) for `data`, whose rate and
    /// channels must be the model's.
    pub fn new(
        sections: WaveVaeSections,
        data: AudioFolder,
        data_cfg: AudioDataConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let WaveVaeSections {
            model: cfg,
            loss,
            discriminators,
        } = sections;
        data_cfg.require(cfg.sample_rate, cfg.audio_channels, "wave_vae model")?;
        if data_cfg.crop_samples() < cfg.hop() {
            return Err(Error::invalid(
                "data.crop_seconds",
                format!(
                    "crops of {} samples are shorter than one latent frame ({} samples)",
                    data_cfg.crop_samples(),
                    cfg.hop()
                ),
            ));
        }
        let varmap = VarMap::new();
        let model = WaveVae::new(
            cfg.clone(),
            melvae_layers::seeded_var_builder(&varmap, seed, dtype, device),
        )?;
        let discriminators =
            super::waveform::build_discriminators(discriminators, seed, dtype, device)?;
        let balancer = if loss.balancer.enabled {
            Some(LossBalancer::new(loss.balancer.into())?)
        } else {
            None
        };
        Ok(Self {
            balancer,
            objective: WaveVaeObjective::new(loss, &cfg, device)?,
            varmap,
            model,
            data,
            discriminators,
            pending: None,
            data_cfg,
            cursor: EpochCursor { epoch: 0, pos: 0 },
            seed,
            shard: Shard::WHOLE,
            device: device.clone(),
            dtype,
        })
    }

    /// A batch of `indices` of `set`, cut to a multiple of the hop.
    fn crops(&self, set: &AudioSet, indices: &[usize], rng: &mut SplitMix64) -> Result<Tensor> {
        super::waveform::crops(
            set,
            indices,
            rng,
            self.model.hop(),
            &self.device,
            self.dtype,
        )
    }

    /// Fixed validation crops (see [`super::waveform::val_crops`]).
    fn val_audio(&self) -> Result<Tensor> {
        super::waveform::val_crops(&self.data, self.model.hop(), &self.device, self.dtype)
    }
}

impl WaveVaeTask {
    /// The VAE loss of a batch: its rows of the global batch's noise,
    /// drawn from the batch's seed.
    fn vae_loss(&self, batch: &WaveBatch, ctx: StepContext) -> Result<WaveVaeLoss> {
        let eps = if ctx.train {
            let (b, _, samples) = batch.audio.dims3()?;
            let global = b * self.shard.count;
            let rows = self.shard.rows(global, "data.batch_size")?;
            let rng = &mut SplitMix64::new(batch.seed);
            let all = self
                .model
                .posterior_noise(global, samples, rng, &self.device)?;
            Some(all.narrow(0, rows.start, rows.len())?)
        } else {
            None
        };
        Ok(self
            .model
            .loss_with(&batch.audio, ctx.step, &self.objective, eps.as_ref())?)
    }
}

impl WaveVaeTask {
    /// [`TrainTask::losses`] with the loss balancer: the output losses
    /// (`stft`, `mel`, `l1`, and `adv`, `fm` in the adversarial phase) are
    /// computed again on a detached copy of the reconstruction, their
    /// gradients balanced, and the KL added at its weight. The logged terms
    /// are the same as without it; `total` is the effective loss. The
    /// gradient norms are those of the global batch (summed over `comm`'s
    /// ranks).
    fn balanced_losses(
        &mut self,
        batch: &WaveBatch,
        ctx: StepContext,
        l: WaveVaeLoss,
        real: Option<DiscOutput>,
        comm: &dyn Communicator,
    ) -> Result<Losses> {
        let x = &l.reconstruction;
        let leaf = LossBalancer::leaf(x)?;
        let (_, mut terms) = self
            .objective
            .reconstruction(leaf.as_tensor(), &batch.audio)?;
        let cfg = self.objective.config();
        let mut weights = vec![
            ("stft", cfg.stft_weight),
            ("mel", cfg.mel_weight),
            ("l1", cfg.l1_weight),
        ];
        if let (Some((_, disc)), true) = (&self.discriminators, ctx.adversarial) {
            let w = cfg.adversarial;
            let (adv, fm) =
                super::waveform::generator_terms(disc, w, &batch.audio, leaf.as_tensor(), real)?;
            terms.insert("adv".into(), adv);
            terms.insert("fm".into(), fm);
            weights.extend([("adv", w.weight), ("fm", w.feature_matching)]);
        }
        let list: Vec<(&str, f64, &Tensor)> = weights
            .iter()
            .filter_map(|&(k, w)| terms.get(k).map(|t| (k, w, t)))
            .collect();
        let (Some(balancer), Some(kl)) = (self.balancer.as_mut(), l.terms.get("kl")) else {
            return Err(Error::invalid(
                "wave_vae_loss.balancer",
                "the balanced step needs the balancer and the KL term",
            ));
        };
        let mut ranks = crate::dist::ranks(comm, &self.device)?;
        let balanced = balancer.balance_across(x, &leaf, &list, &mut ranks)?;
        let total = (balanced.loss.to_dtype(kl.dtype())? + (kl * l.kl_weight)?)?;
        terms.insert("kl".into(), kl.clone());
        Ok(Losses { total, terms })
    }
}

impl TrainTask for WaveVaeTask {
    type Batch = WaveBatch;

    fn vars(&self) -> Vec<(String, Var)> {
        melvae_layers::named_vars(&self.varmap)
    }

    fn disc_vars(&self) -> Vec<(String, Var)> {
        self.discriminators
            .as_ref()
            .map_or_else(Vec::new, |(m, _)| melvae_layers::named_vars(m))
    }

    /// The discriminators on real audio and on the reconstruction the
    /// generator step makes from the same seed (detached).
    fn disc_losses(&mut self, batch: &WaveBatch, ctx: StepContext) -> Result<Option<Losses>> {
        let Some((_, disc)) = &self.discriminators else {
            return Ok(None);
        };
        let l = self.vae_loss(batch, ctx)?;
        let w = self.objective.config().adversarial;
        let (d, real) =
            super::waveform::discriminator_step(disc, w, &batch.audio, &l.reconstruction)?;
        self.pending = Some((ctx.step, batch.seed, l, real));
        Ok(Some(Losses {
            total: d.clone(),
            terms: BTreeMap::from([("d".to_string(), d)]),
        }))
    }

    fn train_batch(&mut self, rng: &mut SplitMix64) -> Result<WaveBatch> {
        let batch = self.data_cfg.batch_size;
        let rows = self.shard.rows(batch, "data.batch_size")?;
        let idx = self.cursor.next(&self.data.train, self.seed, batch);
        // Every row is cropped (the same draws on every rank); this rank
        // keeps its own.
        let audio = self.crops(&self.data.train, &idx, rng)?;
        Ok(WaveBatch {
            audio: audio.narrow(0, rows.start, rows.len())?,
            seed: rng.next_u64(),
        })
    }

    /// Data-parallel: the losses are means over the rank's rows, averaged
    /// over the ranks as in PyTorch's DDP. Equal to one process's on the
    /// global batch except for the terms normalised by the whole batch:
    /// the STFT loss's spectral convergence (`||Y - X|| / ||Y||` over the
    /// batch) and the KL's `per_dim` free bits (a mean over the batch,
    /// then a floor) are taken over each rank's rows. The loss balancer's
    /// gradient norms are the global batch's (`losses_across`).
    fn set_shard(&mut self, shard: Shard) -> Result<()> {
        self.shard = shard.for_batch(self.data_cfg.batch_size)?;
        Ok(())
    }

    /// The VAE loss; in the adversarial phase plus the generator's GAN
    /// loss (`adv`) and feature matching (`fm`), weighted as
    /// `wave_vae_loss.adversarial` says.
    fn losses(&mut self, batch: &WaveBatch, ctx: StepContext) -> Result<Losses> {
        self.losses_across(batch, ctx, &SingleProcess)
    }

    /// [`TrainTask::losses`]; the loss balancer's gradient norms are summed
    /// over `comm`'s ranks.
    fn losses_across(
        &mut self,
        batch: &WaveBatch,
        ctx: StepContext,
        comm: &dyn Communicator,
    ) -> Result<Losses> {
        let (l, real) = match self.pending.take() {
            Some((step, seed, l, real)) if step == ctx.step && seed == batch.seed => {
                (l, Some(real))
            }
            _ => (self.vae_loss(batch, ctx)?, None),
        };
        if self.balancer.is_some() && ctx.train {
            return self.balanced_losses(batch, ctx, l, real, comm);
        }
        let (mut total, mut terms) = (l.total, l.terms);
        if let (Some((_, disc)), true) = (&self.discriminators, ctx.adversarial) {
            let w = self.objective.config().adversarial;
            let (adv, fm) =
                super::waveform::generator_terms(disc, w, &batch.audio, &l.reconstruction, real)?;
            total = (total + (&adv * w.weight)? + (&fm * w.feature_matching)?)?;
            terms.insert("adv".into(), adv);
            terms.insert("fm".into(), fm);
        }
        Ok(Losses { total, terms })
    }

    /// In evaluation mode (the posterior mean is decoded): `stft`, `mel`,
    /// `l1`, `kl`, `total` (as trained) and `loss`, the reconstruction plus
    /// the KL at its final weight, which picks the best checkpoint.
    fn validate(&mut self, ctx: StepContext) -> Result<BTreeMap<String, f64>> {
        let audio = self.val_audio()?;
        let l = self.model.loss(
            &audio,
            ctx.step,
            &self.objective,
            &mut SplitMix64::new(0),
            false,
        )?;
        let scalar =
            |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        let mut out = BTreeMap::new();
        for (k, v) in &l.terms {
            out.insert(k.clone(), scalar(v)?);
        }
        let total = scalar(&l.total)?;
        let kl = out.get("kl").copied().unwrap_or(0.0);
        out.insert(
            "loss".into(),
            total + (self.objective.config().kl_weight - l.kl_weight) * kl,
        );
        out.insert("total".into(), total);
        Ok(out)
    }

    fn best_metric(&self) -> &str {
        "loss"
    }

    fn samples(&mut self, ctx: StepContext, dir: &Path) -> Result<Vec<PathBuf>> {
        let audio = self.val_audio()?.narrow(0, 0, 1)?;
        let (recon, _) = self.model.reconstruct(&audio)?;
        super::waveform::write_pair(
            dir,
            ctx.step,
            self.model.config().sample_rate,
            &audio,
            &recon,
        )
    }

    fn save_model_file(&self, path: &Path, metadata: &BTreeMap<String, String>) -> Result<bool> {
        super::write_model_file::<WaveVae>(path, self.model.config(), &self.varmap, metadata)
    }

    /// The data cursor, and the balancer's gradient-norm averages
    /// (`balancer: {name: [total, fix]}`) when it is on.
    fn state(&self) -> serde_json::Value {
        let mut state = super::cursor_state(&self.cursor);
        if let Some(b) = &self.balancer {
            let averages: serde_json::Map<String, serde_json::Value> = b
                .state()
                .iter()
                .map(|(k, a)| (k.clone(), serde_json::json!([a.total, a.fix])))
                .collect();
            state["balancer"] = serde_json::Value::Object(averages);
        }
        state
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        super::load_cursor(&mut self.cursor, state);
        if let (Some(b), Some(saved)) = (
            &mut self.balancer,
            state.get("balancer").and_then(|v| v.as_object()),
        ) {
            let mut averages = BTreeMap::new();
            for (k, v) in saved {
                let pair = v
                    .as_array()
                    .and_then(|a| Some((a.first()?.as_f64()?, a.get(1)?.as_f64()?)));
                let Some((total, fix)) = pair else {
                    return Err(Error::invalid(
                        format!("checkpoint task state balancer.{k}"),
                        format!("expected [total, fix], got {v}"),
                    ));
                };
                averages.insert(k.clone(), NormAverage { total, fix });
            }
            b.load_state(averages);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ResolvedConfig;

    #[test]
    fn bundled_defaults_parse_and_errors_name_the_file() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/defaults");
        for (file, channels, hop) in [("wave_vae.yaml", 1, 320), ("wave_vae_music.yaml", 2, 2048)] {
            let p = dir.join(file);
            let text = std::fs::read_to_string(&p).unwrap();
            let r = ResolvedConfig::from_yaml(&text, &p.display().to_string()).unwrap();
            let w = wave_vae_config(&r).unwrap();
            assert_eq!(
                (w.model.audio_channels, w.model.hop()),
                (channels, hop),
                "{file}"
            );
            assert_eq!(w.loss, WaveVaeLossConfig::default());
            assert_eq!(w.discriminators, None);
        }
        let r = ResolvedConfig::from_yaml(
            "wave_vae: {sample_rate: 24000, audio_channels: 3, channels: 4, channel_mults: [2], strides: [2], latent_dim: 2}\n",
            "exp.yaml",
        )
        .unwrap();
        let e = wave_vae_config(&r).unwrap_err().to_string();
        assert!(
            e.contains("exp.yaml") && e.contains("wave_vae.audio_channels"),
            "{e}"
        );
        let r = ResolvedConfig::from_yaml(
            "wave_vae: {sample_rate: 24000, audio_channels: 1, channels: 4, channel_mults: [2], strides: [2], latent_dim: 2, bottleneck: {kind: gru}}\n",
            "exp.yaml",
        )
        .unwrap();
        let e = wave_vae_config(&r).unwrap_err().to_string();
        assert!(
            e.contains("wave_vae.bottleneck") && e.contains("gru"),
            "{e}"
        );
        let r = ResolvedConfig::from_yaml(
            "wave_vae: {sample_rate: 24000, audio_channels: 1, channels: 4, channel_mults: [2], strides: [2], latent_dim: 2}\nwave_vae_loss: {stft_weight: 1, mel_weight: -2, l1_weight: 0, stereo: {mid: 1, side: 1, left: 0, right: 0}, kl_weight: 0, kl_warmup_steps: 0}\n",
            "exp.yaml",
        )
        .unwrap();
        let e = wave_vae_config(&r).unwrap_err().to_string();
        assert!(e.contains("wave_vae_loss.mel_weight"), "{e}");
    }
}
