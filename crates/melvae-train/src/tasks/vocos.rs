//! Training the Vocos vocoder on a folder of audio (mono): the mel of each
//! crop is the input, the crop the target.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use melvae_dsp::{SplitMix64, TensorMel};
use melvae_losses::{MultiScaleMelLoss, WaveformLoss};
use melvae_models::{AdversarialWeights, DiscOutput, Discriminators, Vocos, VocosConfig};
use serde::{Deserialize, Serialize};

use crate::data::{AudioDataConfig, AudioFolder, AudioSet, EpochCursor};
use crate::dist::Shard;
use crate::trainer::{Losses, StepContext, TrainTask};
use crate::{Error, Result};

impl crate::Validate for VocosConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        VocosConfig::validate(self).map_err(|e| super::mel_vae::section_err(e, "vocos"))
    }
}

/// The `vocos_loss:` section.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VocosLossConfig {
    /// Weight of the L1 between the log-mels of the output and of the
    /// target (Vocos: 45).
    pub mel_weight: f64,
    /// Weight of DAC's multi-scale mel loss (seven windows from 32 to 2048
    /// samples, `MultiScaleMelLoss::dac`, the waveform VAE's `mel` term)
    /// of the output against the target audio; 0 (the package's recipe):
    /// off.
    #[serde(default)]
    pub multiscale_mel_weight: f64,
    /// Weight of the evaluation's own mel distance
    /// ([`melvae_models::eval::mel_distance`]: two scales, log and linear
    /// terms, the `mel_distance` that `evaluate` reports) of the output
    /// against the target audio; 0: off.
    #[serde(default)]
    pub mel_distance_weight: f64,
    /// Adversarial terms (with `discriminators:` and `training.gan`).
    #[serde(default)]
    pub adversarial: AdversarialWeights,
}

impl Default for VocosLossConfig {
    fn default() -> Self {
        Self {
            mel_weight: 45.0,
            multiscale_mel_weight: 0.0,
            mel_distance_weight: 0.0,
            adversarial: AdversarialWeights::default(),
        }
    }
}

impl crate::Validate for VocosLossConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        let a = self.adversarial;
        for (v, key) in [
            (self.mel_weight, "vocos_loss.mel_weight"),
            (
                self.multiscale_mel_weight,
                "vocos_loss.multiscale_mel_weight",
            ),
            (self.mel_distance_weight, "vocos_loss.mel_distance_weight"),
            (a.weight, "vocos_loss.adversarial.weight"),
            (
                a.feature_matching,
                "vocos_loss.adversarial.feature_matching",
            ),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err((key.into(), format!("must be a finite weight >= 0, got {v}")));
            }
        }
        if self.mel_weight + self.multiscale_mel_weight + self.mel_distance_weight == 0.0 {
            return Err((
                "vocos_loss.mel_weight".into(),
                "is 0, and so are multiscale_mel_weight and mel_distance_weight: \
                 no reconstruction loss"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// The vocoder's sections of a resolved config: `vocos:`, `vocos_loss:`
/// and `discriminators:`.
pub type VocosSections = super::GeneratorSections<VocosConfig, VocosLossConfig>;

/// The vocoder's sections of a resolved config, validated with errors
/// naming file and key.
pub fn vocos_config(cfg: &crate::ResolvedConfig) -> Result<VocosSections> {
    super::generator_sections(cfg, "vocos", "vocos_loss")
}

/// With the magnitude prior, training starts near it: the head's
/// log-magnitude rows (the first `bins` of `head.out`) are scaled by 0.01
/// and their biases zeroed, so the first outputs are the prior's spectrum
/// (the phase rows keep the package's initialisation).
fn start_at_prior(varmap: &VarMap, bins: usize) -> Result<()> {
    let vars: BTreeMap<String, Var> = melvae_layers::named_vars(varmap).into_iter().collect();
    for (name, scale) in [("head.out.weight", 0.01), ("head.out.bias", 0.0)] {
        let var = vars
            .get(name)
            .ok_or_else(|| Error::invalid("vocos.magnitude_prior", format!("no `{name}`")))?;
        let t = var.as_tensor();
        let rest = t.dim(0)? - bins;
        let mag = (t.narrow(0, 0, bins)? * scale)?;
        var.set(&Tensor::cat(&[mag, t.narrow(0, bins, rest)?], 0)?)?;
    }
    Ok(())
}

/// The Vocos vocoder as a [`TrainTask`]: random crops of an
/// [`AudioFolder`] at the model's rate (mono), their mels (the model's
/// features) as input, `mel_weight *` L1 of the output's log-mel against
/// the input's, plus the adversarial terms in GAN mode; validation on
/// fixed held-out crops (`mel`, which picks the best checkpoint); input and
/// output WAVs and spectrograms as samples.
pub struct VocosTask {
    /// The parameters (`backbone.*`, `head.*`).
    pub varmap: VarMap,
    /// The generator.
    pub model: Vocos,
    /// The discriminators and their parameters (`disc.*`), when the run
    /// trains adversarially.
    pub discriminators: Option<(VarMap, Discriminators)>,
    loss: VocosLossConfig,
    mel: TensorMel,
    /// DAC's multi-scale mel loss, when `multiscale_mel_weight > 0`.
    multiscale_mel: Option<MultiScaleMelLoss>,
    /// The evaluation's mel distance, when `mel_distance_weight > 0`.
    mel_distance: Option<MultiScaleMelLoss>,
    data: AudioFolder,
    data_cfg: AudioDataConfig,
    /// The generator output and the real audio's discriminator view of a
    /// discriminator step, for the generator step of the same step.
    pending: Option<(u64, candle_core::TensorId, (Tensor, Tensor), DiscOutput)>,
    cursor: EpochCursor,
    seed: u64,
    shard: Shard,
    device: Device,
    dtype: DType,
}

impl VocosTask {
    /// Builds the vocoder (and the discriminators, if configured) on
    /// `device` in `dtype` for mono `data` at the model's rate.
    pub fn new(
        sections: VocosSections,
        data: AudioFolder,
        data_cfg: AudioDataConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let cfg = sections.model;
        data_cfg.require(cfg.sample_rate, 1, "vocos model")?;
        if data_cfg.crop_samples() < cfg.n_fft {
            return Err(Error::invalid(
                "data.crop_seconds",
                format!(
                    "crops of {} samples are shorter than one FFT window ({} samples)",
                    data_cfg.crop_samples(),
                    cfg.n_fft
                ),
            ));
        }
        let varmap = VarMap::new();
        let model = Vocos::new(
            cfg.clone(),
            melvae_layers::seeded_var_builder(&varmap, seed, dtype, device),
        )?;
        if cfg.magnitude_prior {
            start_at_prior(&varmap, cfg.n_fft / 2 + 1)?;
        }
        let discriminators =
            super::waveform::build_discriminators(sections.discriminators, seed, dtype, device)?;
        Ok(Self {
            mel: TensorMel::new(cfg.mel_config(), device)?,
            multiscale_mel: (sections.loss.multiscale_mel_weight > 0.0)
                .then(|| MultiScaleMelLoss::dac(cfg.sample_rate, device))
                .transpose()?,
            mel_distance: (sections.loss.mel_distance_weight > 0.0)
                .then(|| melvae_models::eval::mel_distance(cfg.sample_rate, device))
                .transpose()?,
            varmap,
            model,
            discriminators,
            loss: sections.loss,
            data,
            data_cfg,
            pending: None,
            cursor: EpochCursor { epoch: 0, pos: 0 },
            seed,
            shard: Shard::WHOLE,
            device: device.clone(),
            dtype,
        })
    }

    fn crops(&self, set: &AudioSet, indices: &[usize], rng: &mut SplitMix64) -> Result<Tensor> {
        let hop = self.model.config().hop_length;
        super::waveform::crops(set, indices, rng, hop, &self.device, self.dtype)
    }

    /// The log-mel of audio `[batch, 1, samples]`: `[batch, n_mels, frames]`.
    fn log_mel(&self, audio: &Tensor) -> Result<Tensor> {
        Ok(self.mel.forward(&audio.squeeze(1)?)?)
    }

    /// The log-mel of `audio` (the input and the target) and the
    /// vocoder's output `[batch, 1, samples]` for it.
    fn generate(&self, audio: &Tensor) -> Result<(Tensor, Tensor)> {
        let mel = self.log_mel(audio)?.detach();
        let fake = self.model.decode(&mel, None)?.unsqueeze(1)?;
        Ok((mel, fake))
    }

    /// The mel loss of `fake` against the target log-mel `mel`
    /// (unweighted).
    fn mel_loss(&self, mel: &Tensor, fake: &Tensor) -> Result<Tensor> {
        Ok((self.log_mel(fake)? - mel)?.abs()?.mean_all()?)
    }
}

impl TrainTask for VocosTask {
    type Batch = Tensor;

    fn vars(&self) -> Vec<(String, Var)> {
        melvae_layers::named_vars(&self.varmap)
    }

    fn disc_vars(&self) -> Vec<(String, Var)> {
        self.discriminators
            .as_ref()
            .map_or_else(Vec::new, |(m, _)| melvae_layers::named_vars(m))
    }

    fn train_batch(&mut self, rng: &mut SplitMix64) -> Result<Tensor> {
        let batch = self.data_cfg.batch_size;
        let rows = self.shard.rows(batch, "data.batch_size")?;
        let idx = self.cursor.next(&self.data.train, self.seed, batch);
        // Every row is cropped (the same draws on every rank); this rank
        // keeps its own. Nothing else in a step is random.
        let crops = self.crops(&self.data.train, &idx, rng)?;
        Ok(crops.narrow(0, rows.start, rows.len())?)
    }

    fn set_shard(&mut self, shard: Shard) -> Result<()> {
        self.shard = shard.for_batch(self.data_cfg.batch_size)?;
        Ok(())
    }

    fn disc_losses(&mut self, batch: &Tensor, ctx: StepContext) -> Result<Option<Losses>> {
        let Some((_, disc)) = &self.discriminators else {
            return Ok(None);
        };
        let generated = self.generate(batch)?;
        let (d, real) =
            super::waveform::discriminator_step(disc, self.loss.adversarial, batch, &generated.1)?;
        self.pending = Some((ctx.step, batch.id(), generated, real));
        Ok(Some(Losses {
            total: d.clone(),
            terms: BTreeMap::from([("d".to_string(), d)]),
        }))
    }

    /// `mel_weight * mel` (+ `multiscale_mel_weight * multiscale_mel` +
    /// `mel_distance_weight * mel_distance`),
    /// plus `adversarial.weight * adv +
    /// adversarial.feature_matching * fm` in the adversarial phase.
    fn losses(&mut self, batch: &Tensor, ctx: StepContext) -> Result<Losses> {
        let ((target, fake), real) = match self.pending.take() {
            Some((step, id, generated, real)) if step == ctx.step && id == batch.id() => {
                (generated, Some(real))
            }
            _ => (self.generate(batch)?, None),
        };
        let mel = self.mel_loss(&target, &fake)?;
        let mut total = (&mel * self.loss.mel_weight)?;
        let mut terms = BTreeMap::from([("mel".to_string(), mel)]);
        if let Some(ms) = &self.multiscale_mel {
            let l = ms.loss(&fake, batch)?;
            total = (total + (&l * self.loss.multiscale_mel_weight)?)?;
            terms.insert("multiscale_mel".into(), l);
        }
        if let Some(md) = &self.mel_distance {
            let l = md.loss(&fake, batch)?;
            total = (total + (&l * self.loss.mel_distance_weight)?)?;
            terms.insert("mel_distance".into(), l);
        }
        if let (Some((_, disc)), true) = (&self.discriminators, ctx.adversarial) {
            let w = self.loss.adversarial;
            let (adv, fm) = super::waveform::generator_terms(disc, w, batch, &fake, real)?;
            total = (total + (&adv * w.weight)? + (&fm * w.feature_matching)?)?;
            terms.insert("adv".into(), adv);
            terms.insert("fm".into(), fm);
        }
        Ok(Losses { total, terms })
    }

    /// `mel` (the unweighted mel loss) on fixed held-out crops.
    fn validate(&mut self, _ctx: StepContext) -> Result<BTreeMap<String, f64>> {
        let hop = self.model.config().hop_length;
        let audio = super::waveform::val_crops(&self.data, hop, &self.device, self.dtype)?;
        let (target, fake) = self.generate(&audio)?;
        let mel = self
            .mel_loss(&target, &fake)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        Ok(BTreeMap::from([("mel".to_string(), mel)]))
    }

    fn best_metric(&self) -> &str {
        "mel"
    }

    fn samples(&mut self, ctx: StepContext, dir: &Path) -> Result<Vec<PathBuf>> {
        let hop = self.model.config().hop_length;
        let audio = super::waveform::val_crops(&self.data, hop, &self.device, self.dtype)?
            .narrow(0, 0, 1)?;
        let fake = self.generate(&audio)?.1.detach();
        super::waveform::write_pair(
            dir,
            ctx.step,
            self.model.config().sample_rate,
            &audio,
            &fake,
        )
    }

    fn save_model_file(&self, path: &Path, metadata: &BTreeMap<String, String>) -> Result<bool> {
        super::write_model_file::<Vocos>(path, self.model.config(), &self.varmap, metadata)
    }

    fn state(&self) -> serde_json::Value {
        super::cursor_state(&self.cursor)
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        super::load_cursor(&mut self.cursor, state);
        Ok(())
    }
}
