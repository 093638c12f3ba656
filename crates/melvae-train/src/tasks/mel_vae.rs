//! Training the mel VAE on a folder of audio.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use melvae_dsp::{
    mel_to_audio, save_wav, Audio, GriffinLimConfig, MelConfig, MelExtractor, MelInversion,
    SpectrogramImage, SplitMix64, WavFormat,
};
use melvae_models::{mel_to_array, MelVae, MelVaeConfig, SampleOptions};

use crate::data::{AudioDataConfig, AudioFolder, AudioSet, EpochCursor};
use crate::dist::Shard;
use crate::trainer::{Losses, StepContext, TrainTask};
use crate::{Error, Result};

/// A training batch: log-mels `[batch, 100, frames]` (frames a multiple of
/// C) and the seed of the loss's noise (drawn from the run RNG).
#[derive(Debug, Clone)]
pub struct MelBatch {
    /// Log-mels.
    pub mel: Tensor,
    /// Seed of the reparameterisation, condition-drop and flow noise.
    pub seed: u64,
}

/// The mel VAE as a [`TrainTask`]: random crops of an [`AudioFolder`]
/// (`vocos-24k` log-mels), the [`MelVae`] loss, validation on fixed crops of
/// the held-out clips, and reconstructions written as samples.
pub struct MelVaeTask {
    /// The parameters (checkpoint names `encoder.*`, `decoder.*`).
    pub varmap: VarMap,
    /// The model.
    pub model: MelVae,
    /// The data.
    pub data: AudioFolder,
    data_cfg: AudioDataConfig,
    extractor: MelExtractor,
    vocoder: Option<melvae_models::eval::MelToAudio>,
    cursor: EpochCursor,
    seed: u64,
    device: Device,
    shard: Shard,
}

impl MelVaeTask {
    /// Samples' audio through `vocoder` (a Vocos on the `vocos-24k`
    /// features) instead of Griffin-Lim.
    pub fn with_vocoder(mut self, vocoder: melvae_models::eval::MelToAudio) -> Self {
        self.vocoder = Some(vocoder);
        self
    }

    /// Builds the model on `device` in `dtype` (initialised reproducibly from
    /// `seed` by `melvae_layers::seeded_var_builder`) and takes `data` (which must be
    /// mono at the `vocos-24k` rate).
    pub fn new(
        cfg: MelVaeConfig,
        data: AudioFolder,
        data_cfg: AudioDataConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mel = MelConfig::vocos_24k();
        data_cfg.require(mel.sample_rate, 1, "mel VAE (vocos-24k, mono)")?;
        let varmap = VarMap::new();
        let model = MelVae::new(
            cfg,
            melvae_layers::seeded_var_builder(&varmap, seed, dtype, device),
        )?;
        let task = Self {
            varmap,
            model,
            data,
            data_cfg,
            extractor: MelExtractor::new(mel)?,
            vocoder: None,
            cursor: EpochCursor { epoch: 0, pos: 0 },
            seed,
            device: device.clone(),
            shard: Shard::WHOLE,
        };
        Ok(task)
    }

    /// Log-mels of crops `[n][samples]` as `[n, 100, frames]`, frames cut
    /// down to a multiple of C.
    fn mels(&self, crops: &[Vec<f32>]) -> Result<Tensor> {
        let c = self.model.compress();
        let mels = self.extractor.extract_batch(crops)?;
        let Some(first) = mels.first() else {
            return Err(Error::invalid("mel VAE batch", "no audio crops"));
        };
        let frames = first.ncols() / c * c;
        if frames == 0 {
            return Err(Error::invalid(
                "data.crop_seconds",
                format!(
                    "crops give {} mel frames, fewer than compress_factor_C = {c}",
                    first.ncols()
                ),
            ));
        }
        let m = mels[0].nrows();
        let mut data: Vec<f32> = Vec::with_capacity(crops.len() * m * frames);
        for mel in &mels {
            for row in mel.rows() {
                data.extend(row.iter().take(frames));
            }
        }
        Ok(
            Tensor::from_vec(data, (crops.len(), m, frames), &self.device)?
                .to_dtype(self.model_dtype())?,
        )
    }

    fn model_dtype(&self) -> DType {
        self.varmap
            .all_vars()
            .first()
            .map_or(DType::F32, |v| v.dtype())
    }

    /// Fixed validation crops: each held-out clip from its start (or the
    /// first training clips when nothing is held out), at most 8.
    fn val_mels(&self) -> Result<Tensor> {
        let set: &AudioSet = if self.data.val.is_empty() {
            &self.data.train
        } else {
            &self.data.val
        };
        let n = set.len().min(8);
        let crops: Vec<Vec<f32>> = (0..n)
            .map(|i| set.crop(i, &mut SplitMix64::new(i as u64)).remove(0))
            .collect();
        self.mels(&crops)
    }
}

/// Maps a model config error (`<section>.<field>: reason`) to the field
/// relative to its section, for [`crate::Validate`].
pub(crate) fn section_err(e: melvae_models::Error, section: &str) -> (String, String) {
    match e {
        melvae_models::Error::Invalid { what, reason } => {
            let field = what
                .strip_prefix(&format!("{section}."))
                .unwrap_or(&what)
                .to_string();
            (field, reason)
        }
        other => (String::new(), other.to_string()),
    }
}

impl crate::Validate for melvae_models::ConvformerConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        melvae_models::ConvformerConfig::validate(self).map_err(|e| section_err(e, "convformer"))
    }
}

impl crate::Validate for melvae_models::CfmConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        melvae_models::CfmConfig::validate(self).map_err(|e| section_err(e, "cfm"))
    }
}

/// The mel VAE config of a resolved config (`convformer:` and `cfm:`).
pub fn mel_vae_config(cfg: &crate::ResolvedConfig) -> Result<MelVaeConfig> {
    let c = MelVaeConfig {
        convformer: cfg.get("convformer")?,
        cfm: cfg.get("cfm")?,
    };
    c.validate().map_err(|e| {
        let (key, reason) = match e {
            melvae_models::Error::Invalid { what, reason } => (what, reason),
            other => ("cfm".into(), other.to_string()),
        };
        Error::Config {
            origin: cfg.origin_of(&key),
            key,
            reason,
        }
    })?;
    Ok(c)
}

impl TrainTask for MelVaeTask {
    type Batch = MelBatch;

    fn vars(&self) -> Vec<(String, Var)> {
        melvae_layers::named_vars(&self.varmap)
    }

    fn train_batch(&mut self, rng: &mut SplitMix64) -> Result<MelBatch> {
        let batch = self.data_cfg.batch_size;
        let rows = self.shard.rows(batch, "data.batch_size")?;
        let idx = self.cursor.next(&self.data.train, self.seed, batch);
        // Every row's crop is drawn (the same order on every rank); this
        // rank keeps its own.
        let crops: Vec<Vec<f32>> = idx
            .iter()
            .map(|&i| self.data.train.crop(i, rng).remove(0))
            .enumerate()
            .filter(|(r, _)| rows.contains(r))
            .map(|(_, c)| c)
            .collect();
        Ok(MelBatch {
            mel: self.mels(&crops)?,
            seed: rng.next_u64(),
        })
    }

    fn set_shard(&mut self, shard: Shard) -> Result<()> {
        self.shard = shard.for_batch(self.data_cfg.batch_size)?;
        Ok(())
    }

    fn losses(&mut self, batch: &MelBatch, ctx: StepContext) -> Result<Losses> {
        let rng = &mut SplitMix64::new(batch.seed);
        // The whole batch's noise, this rank's rows of it (all of it in one
        // process).
        let (_, m, frames) = batch.mel.dims3()?;
        let global = (self.data_cfg.batch_size, m, frames);
        let all = self.model.loss_draws_for(
            global,
            batch.mel.device(),
            batch.mel.dtype(),
            rng,
            ctx.train,
        )?;
        let mut draws = all.rows(self.shard.rows(global.0, "data.batch_size")?)?;
        draws.dropout_seed = self.shard.seed(draws.dropout_seed);
        let l = self
            .model
            .loss_with(&batch.mel, ctx.step, &draws, ctx.train)?;
        Ok(Losses {
            total: l.total,
            terms: BTreeMap::from([("cfm".to_string(), l.cfm), ("kl".to_string(), l.kl)]),
        })
    }

    /// In evaluation mode (no dropout, no condition drop), with fixed
    /// noise: `cfm`, `kl`, `total` (as trained: the KL at its scheduled
    /// weight) and `loss`, the flow loss plus the KL at its final weight,
    /// which is free of the warm-up and picks the best checkpoint.
    fn validate(&mut self, ctx: StepContext) -> Result<BTreeMap<String, f64>> {
        let mel = self.val_mels()?;
        let l = self
            .model
            .loss(&mel, ctx.step, &mut SplitMix64::new(0xE7A1), false)?;
        let scalar =
            |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        let (cfm, kl) = (scalar(&l.cfm)?, scalar(&l.kl)?);
        Ok(BTreeMap::from([
            ("total".to_string(), scalar(&l.total)?),
            ("cfm".to_string(), cfm),
            ("kl".to_string(), kl),
            (
                "loss".to_string(),
                cfm + self.model.config().convformer.kl_loss_weight * kl,
            ),
        ]))
    }

    fn best_metric(&self) -> &str {
        "loss"
    }

    fn save_model_file(&self, path: &Path, metadata: &BTreeMap<String, String>) -> Result<bool> {
        super::write_model_file::<MelVae>(path, self.model.config(), &self.varmap, metadata)
    }

    fn samples(&mut self, ctx: StepContext, dir: &Path) -> Result<Vec<PathBuf>> {
        let mel = self.val_mels()?.narrow(0, 0, 1)?;
        let (latent, _) = self.model.encode(&mel)?;
        let recon = self.model.sample(
            &latent,
            &SampleOptions::reconstruction(&self.model.config().cfm),
        )?;
        let input = mel_to_array(&mel)?;
        let output = mel_to_array(&recon)?;
        let img = SpectrogramImage::for_mel(self.extractor.config());
        let path = |what: &str| dir.join(format!("step{:08}_{what}", ctx.step));
        let written = [path("input.png"), path("recon.png"), path("recon.wav")];
        img.save_png(&written[0], &input)?;
        img.save_png(&written[1], &output)?;
        let wav = match &self.vocoder {
            Some(v) => {
                let cfg = self.extractor.config();
                let samples = cfg.stft.n_samples(output.dim().1);
                v.audio(&recon, cfg, samples)?
            }
            None => {
                let gl = GriffinLimConfig {
                    n_iter: 16,
                    ..Default::default()
                };
                mel_to_audio(
                    &self.extractor,
                    &output,
                    None,
                    MelInversion::PseudoInverse,
                    &gl,
                )?
            }
        };
        save_wav(
            &written[2],
            &Audio::new(24000, vec![wav])?,
            WavFormat::Pcm16,
        )?;
        Ok(written.to_vec())
    }

    fn state(&self) -> serde_json::Value {
        super::cursor_state(&self.cursor)
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        super::load_cursor(&mut self.cursor, state);
        Ok(())
    }
}

/// A trained mel VAE, rebuilt from a run directory (its `config.yaml` and
/// latest checkpoint) or from a checkpoint directory, with the EMA weights
/// when the run kept an EMA, as plain f32 tensors; reads only. A thin
/// wrapper of [`super::load_mel_vae`]; for models that leave the run, export
/// a model file and use `MelVae::load` (melvae-models alone).
pub fn load_trained(run_or_checkpoint: &Path, device: &Device) -> Result<(MelVae, MelVaeConfig)> {
    let model = super::load_mel_vae(run_or_checkpoint, &crate::run::Which::Latest, device)?;
    let cfg = model.config().clone();
    Ok((model, cfg))
}
