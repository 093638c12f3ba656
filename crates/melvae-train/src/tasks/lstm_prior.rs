//! Training the LSTM prior of one level of the hierarchical waveform
//! VQ-VAE: audio crops encoded on the fly by the frozen VQ-VAEs the config
//! names (this level's, and the coarser level's for the context), the
//! prior's cross-entropy on the codes; validation reports the held-out
//! cross-entropy beside the unigram code distribution's.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use melvae_dsp::SplitMix64;
use melvae_models::{LstmPrior, LstmPriorConfig, VqVae};
use serde::{Deserialize, Serialize};

use crate::data::{AudioDataConfig, AudioFolder, EpochCursor};
use crate::dist::Shard;
use crate::trainer::{Losses, StepContext, TrainTask};
use crate::{Error, Result};

impl crate::Validate for LstmPriorConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        LstmPriorConfig::validate(self).map_err(|e| super::mel_vae::section_err(e, "lstm_prior"))
    }
}

/// The `lstm_prior_codes:` section: the frozen VQ-VAEs whose codes the
/// prior learns (the training order, in configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LstmPriorCodes {
    /// This level's VQ-VAE: a `vqvae` model file, or a run directory (its
    /// latest checkpoint).
    pub vqvae: PathBuf,
    /// The coarser level's VQ-VAE (the context), for every level but the
    /// coarsest.
    #[serde(default)]
    pub context_vqvae: Option<PathBuf>,
}

impl crate::Validate for LstmPriorCodes {}

/// The prior's sections of a resolved config.
pub fn lstm_prior_config(cfg: &crate::ResolvedConfig) -> Result<(LstmPriorConfig, LstmPriorCodes)> {
    Ok((cfg.get("lstm_prior")?, cfg.get("lstm_prior_codes")?))
}

/// Loads the VQ-VAE of `lstm_prior_codes.<key>` (a model file or a run's
/// latest checkpoint), on the CPU; an error names the key and the path.
fn load_vqvae(path: &std::path::Path, key: &str, device: &Device) -> Result<VqVae> {
    let named = |reason: String| Error::Config {
        origin: "the config".into(),
        key: format!("lstm_prior_codes.{key}"),
        reason,
    };
    if !path.exists() {
        return Err(named(format!(
            "{} does not exist: train that VQ-VAE level first",
            path.display()
        )));
    }
    super::load_model_at(path, super::load_vqvae, device).map_err(|e| named(e.to_string()))
}

/// The frozen VQ-VAEs of a prior, checked against it: `vocab_size` is this
/// level's codebook, the context's vocabulary the coarser one's, and
/// `context.upsample` the ratio of their hops; errors name the key.
pub fn frozen_vqvaes(
    cfg: &LstmPriorConfig,
    codes: &LstmPriorCodes,
    device: &Device,
) -> Result<(VqVae, Option<VqVae>)> {
    let bad = |key: &str, reason: String| Error::Config {
        origin: "the config".into(),
        key: key.into(),
        reason,
    };
    let fine = load_vqvae(&codes.vqvae, "vqvae", device)?;
    if fine.config().codebook_size != cfg.vocab_size {
        return Err(bad(
            "lstm_prior.vocab_size",
            format!(
                "is {}, the VQ-VAE {} has {} codes",
                cfg.vocab_size,
                codes.vqvae.display(),
                fine.config().codebook_size
            ),
        ));
    }
    let coarse = match (&cfg.context, &codes.context_vqvae) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(bad(
                "lstm_prior_codes.context_vqvae",
                "missing: a prior with a context needs the coarser level's VQ-VAE".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(bad(
                "lstm_prior_codes.context_vqvae",
                "given, but lstm_prior has no context section".into(),
            ))
        }
        (Some(c), Some(p)) => {
            let coarse = load_vqvae(p, "context_vqvae", device)?;
            if coarse.config().codebook_size != c.vocab_size {
                return Err(bad(
                    "lstm_prior.context.vocab_size",
                    format!(
                        "is {}, the VQ-VAE {} has {} codes",
                        c.vocab_size,
                        p.display(),
                        coarse.config().codebook_size
                    ),
                ));
            }
            let (hf, hc) = (fine.hop(), coarse.hop());
            if hc % hf != 0 || hc / hf != c.upsample {
                return Err(bad(
                    "lstm_prior.context.upsample",
                    format!(
                        "is {}, but the coarser VQ-VAE's hop {hc} over this level's {hf} is {}",
                        c.upsample,
                        hc as f64 / hf as f64
                    ),
                ));
            }
            Some(coarse)
        }
    };
    Ok((fine, coarse))
}

/// A batch: this level's codes and the coarser level's.
#[derive(Debug, Clone)]
pub struct CodeBatch {
    /// `[batch, frames]` u32.
    pub codes: Tensor,
    /// `[batch, frames / upsample]` u32, below the coarsest level.
    pub context: Option<Tensor>,
}

/// The LSTM prior as a [`TrainTask`]; see the module docs.
pub struct LstmPriorTask {
    /// The prior's parameters.
    pub varmap: VarMap,
    /// The prior.
    pub model: LstmPrior,
    fine: VqVae,
    coarse: Option<VqVae>,
    data: AudioFolder,
    data_cfg: AudioDataConfig,
    unigram_nll: Vec<f64>,
    cursor: EpochCursor,
    seed: u64,
    shard: Shard,
    device: Device,
}

impl LstmPriorTask {
    /// Builds the prior on `device` in `dtype` with the frozen VQ-VAEs of
    /// `codes` (see [`frozen_vqvaes`]); the data must be at their rate, and
    /// crops at least one coarse code long.
    pub fn new(
        (cfg, codes): (LstmPriorConfig, LstmPriorCodes),
        data: AudioFolder,
        data_cfg: AudioDataConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let (fine, coarse) = frozen_vqvaes(&cfg, &codes, device)?;
        let net = &fine.config().net;
        data_cfg.require(net.sample_rate, net.audio_channels, "the prior's VQ-VAE")?;
        let hop = coarse.as_ref().map_or(fine.hop(), VqVae::hop);
        if data_cfg.crop_samples() < hop {
            return Err(Error::invalid(
                "data.crop_seconds",
                format!(
                    "crops of {} samples are shorter than one code of the coarsest VQ-VAE used ({hop})",
                    data_cfg.crop_samples()
                ),
            ));
        }
        let varmap = VarMap::new();
        let model = LstmPrior::new(
            cfg,
            melvae_layers::seeded_var_builder(&varmap, seed, dtype, device),
        )?;
        let mut task = Self {
            varmap,
            model,
            fine,
            coarse,
            data,
            data_cfg,
            unigram_nll: Vec::new(),
            cursor: EpochCursor { epoch: 0, pos: 0 },
            seed,
            shard: Shard::WHOLE,
            device: device.clone(),
        };
        task.unigram_nll = task.unigram()?;
        Ok(task)
    }

    /// The hop crops are cut to: the coarsest VQ-VAE's.
    fn hop(&self) -> usize {
        self.coarse.as_ref().map_or(self.fine.hop(), VqVae::hop)
    }

    /// Codes of audio `[batch, 1, samples]` (a multiple of [`Self::hop`]).
    fn codes(&self, audio: &Tensor) -> Result<CodeBatch> {
        let audio = audio.to_dtype(DType::F32)?;
        Ok(CodeBatch {
            codes: self.fine.encode(&audio)?,
            context: self.coarse.as_ref().map(|c| c.encode(&audio)).transpose()?,
        })
    }

    fn val_batch(&self) -> Result<CodeBatch> {
        self.codes(&super::waveform::val_crops(
            &self.data,
            self.hop(),
            &self.device,
            DType::F32,
        )?)
    }

    /// `-ln p(code)` of the add-one-smoothed code frequencies of the
    /// training crops' codes (fixed crops, one per training clip).
    fn unigram(&self) -> Result<Vec<f64>> {
        let mut counts = vec![1.0f64; self.model.config().vocab_size];
        for i in 0..self.data.train.len() {
            let audio = super::waveform::crops(
                &self.data.train,
                &[i],
                &mut SplitMix64::new(i as u64),
                self.hop(),
                &self.device,
                DType::F32,
            )?;
            for c in self.fine.encode(&audio)?.flatten_all()?.to_vec1::<u32>()? {
                if let Some(n) = counts.get_mut(c as usize) {
                    *n += 1.0;
                }
            }
        }
        let total: f64 = counts.iter().sum();
        Ok(counts.iter().map(|c| -(c / total).ln()).collect())
    }
}

impl TrainTask for LstmPriorTask {
    type Batch = CodeBatch;

    fn vars(&self) -> Vec<(String, Var)> {
        melvae_layers::named_vars(&self.varmap)
    }

    fn train_batch(&mut self, rng: &mut SplitMix64) -> Result<CodeBatch> {
        let batch = self.data_cfg.batch_size;
        let rows = self.shard.rows(batch, "data.batch_size")?;
        let idx = self.cursor.next(&self.data.train, self.seed, batch);
        // Every row is cropped and coded as one process codes the batch
        // (a nearest code can flip on the rounding of another batch
        // size); this rank keeps its rows.
        let audio = super::waveform::crops(
            &self.data.train,
            &idx,
            rng,
            self.hop(),
            &self.device,
            DType::F32,
        )?;
        let all = self.codes(&audio)?;
        if self.shard == Shard::WHOLE {
            return Ok(all);
        }
        let narrow = |t: &Tensor| t.narrow(0, rows.start, rows.len());
        Ok(CodeBatch {
            codes: narrow(&all.codes)?,
            context: all.context.as_ref().map(narrow).transpose()?,
        })
    }

    /// Data-parallel: every crop has as many codes, so the mean
    /// cross-entropy of a rank's rows, averaged over the ranks, is the
    /// whole batch's. Each rank codes the whole batch with the frozen
    /// levels and keeps its rows, so the codes are one process's.
    fn set_shard(&mut self, shard: Shard) -> Result<()> {
        self.shard = shard.for_batch(self.data_cfg.batch_size)?;
        Ok(())
    }

    fn losses(&mut self, batch: &CodeBatch, _ctx: StepContext) -> Result<Losses> {
        let ce = self.model.loss(&batch.codes, batch.context.as_ref())?;
        Ok(Losses {
            total: ce.clone(),
            terms: BTreeMap::from([("ce".to_string(), ce)]),
        })
    }

    /// `ce` (nats per held-out code; picks the best checkpoint),
    /// `perplexity` and `unigram_perplexity` (the baseline).
    fn validate(&mut self, _ctx: StepContext) -> Result<BTreeMap<String, f64>> {
        let b = self.val_batch()?;
        let ce = self
            .model
            .loss(&b.codes, b.context.as_ref())?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let mask = b.codes.ones_like()?;
        let (n, uni) = super::gpt::real_tokens_nll(&b.codes, &mask, &self.unigram_nll)?;
        let uni = uni / n.max(1) as f64;
        Ok(BTreeMap::from([
            ("ce".to_string(), ce),
            ("perplexity".to_string(), ce.exp()),
            ("unigram_perplexity".to_string(), uni.exp()),
        ]))
    }

    fn best_metric(&self) -> &str {
        "ce"
    }

    fn save_model_file(
        &self,
        path: &std::path::Path,
        metadata: &BTreeMap<String, String>,
    ) -> Result<bool> {
        super::write_model_file::<LstmPrior>(path, self.model.config(), &self.varmap, metadata)
    }

    fn state(&self) -> serde_json::Value {
        super::cursor_state(&self.cursor)
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        super::load_cursor(&mut self.cursor, state);
        Ok(())
    }
}
