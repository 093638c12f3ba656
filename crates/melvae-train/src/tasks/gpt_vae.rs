//! Training the GPT-VAE on token shards, in the seed's two stages: stage 1
//! a plain autoencoder (`beta: 0`), stage 2 a VAE whose encoder starts
//! from stage 1's (`training.init_from: {checkpoint: STAGE1_RUN, modules:
//! [encoder.]}`) with KL annealing and free bits.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use melvae_dsp::SplitMix64;
use melvae_layers::{DropoutRng, Mode};
use melvae_losses::{FreeBits, KlSchedule};
use melvae_models::priors::gpt_vae::active_units;
use melvae_models::{GptVae, GptVaeConfig};
use serde::{Deserialize, Serialize};

use crate::data::EpochCursor;
use crate::dist::Shard;
use crate::tokens::{TokenDataConfig, TokenSplit};
use crate::trainer::{Losses, StepContext, TrainTask};
use crate::Result;

impl crate::Validate for GptVaeConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        GptVaeConfig::validate(self).map_err(|e| super::mel_vae::section_err(e, "gpt_vae"))
    }
}

/// The `gpt_vae_loss:` section, with the seed's argument names: the KL
/// weight at step `s` is `beta * (kl_start + (1 - kl_start) * min(1, s /
/// warm_up))` (`warm_up` in steps, not epochs), and `fb` / `target_kl`
/// choose the free bits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptVaeLossConfig {
    /// 0: a plain autoencoder (stage 1; the latent is the posterior mean);
    /// 1: a VAE.
    pub beta: f64,
    /// The KL weight's fraction of `beta` at step 0.
    pub kl_start: f64,
    /// Steps of the linear anneal from `kl_start` to 1.
    pub warm_up: u64,
    /// Free bits: 0 none, 1 per latent vector, 2 per dimension.
    pub fb: u8,
    /// The free-bits target in nats (required when `fb` is 1 or 2).
    #[serde(default)]
    pub target_kl: Option<f64>,
}

impl Default for GptVaeLossConfig {
    /// The seed's defaults: a VAE (`beta` 1), `kl_start` 1, no free bits.
    fn default() -> Self {
        Self {
            beta: 1.0,
            kl_start: 1.0,
            warm_up: 0,
            fb: 0,
            target_kl: None,
        }
    }
}

impl GptVaeLossConfig {
    /// The free bits of `fb` and `target_kl`.
    pub fn free_bits(&self) -> FreeBits {
        match (self.fb, self.target_kl) {
            (1, Some(target)) => FreeBits::Threshold { target },
            (2, Some(target)) => FreeBits::PerDimMax { target },
            _ => FreeBits::None,
        }
    }

    /// The KL weight's schedule.
    pub fn schedule(&self) -> KlSchedule {
        KlSchedule::Linear {
            start: self.beta * self.kl_start,
            end: self.beta,
            warmup_steps: self.warm_up,
        }
    }
}

impl crate::Validate for GptVaeLossConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        let bad = |k: &str, r: String| Err((format!("gpt_vae_loss.{k}"), r));
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad("beta", format!("must be >= 0, got {}", self.beta));
        }
        if !(0.0..=1.0).contains(&self.kl_start) {
            return bad(
                "kl_start",
                format!("must be in [0, 1], got {}", self.kl_start),
            );
        }
        if self.fb > 2 {
            return bad("fb", format!("must be 0, 1 or 2, got {}", self.fb));
        }
        match self.target_kl {
            None if self.fb > 0 => bad("target_kl", format!("fb {} needs a target_kl", self.fb)),
            Some(t) if !(t.is_finite() && t >= 0.0) => {
                bad("target_kl", format!("must be >= 0, got {t}"))
            }
            _ => Ok(()),
        }
    }
}

/// The GPT-VAE's sections: `gpt_vae:` and `gpt_vae_loss:` (the seed's
/// defaults when absent), validated with errors naming file and key.
pub fn gpt_vae_config(cfg: &crate::ResolvedConfig) -> Result<(GptVaeConfig, GptVaeLossConfig)> {
    let loss = if cfg.value.get("gpt_vae_loss").is_some() {
        cfg.get("gpt_vae_loss")?
    } else {
        GptVaeLossConfig::default()
    };
    Ok((cfg.get("gpt_vae")?, loss))
}

/// The GPT-VAE as a [`TrainTask`]: token sequences (labels unused), the
/// loss of [`GptVae::loss`] with the scheduled KL weight (its noise drawn
/// from the run's seed and the step, so a resumed run draws the same);
/// validation on the held-out examples: `ce` (nats per token decoding from
/// the posterior mean: picks the best checkpoint), `kl` (no free bits),
/// `active_units` (dimensions with mean KL above 0.01).
pub struct GptVaeTask {
    /// The parameters (`encoder.*`, `latent_*`, `decoder.*`).
    pub varmap: VarMap,
    /// The model.
    pub model: GptVae,
    loss: GptVaeLossConfig,
    data: TokenSplit,
    batch_size: usize,
    cursor: EpochCursor,
    seed: u64,
    shard: Shard,
    device: Device,
    decoder: Option<super::TokenDecoder>,
}

impl GptVaeTask {
    /// Writes samples (the first held-out example: its tokens, their
    /// reconstruction from the posterior mean, and a draw from the prior,
    /// as mel PNGs and WAVs) through `decoder`; none without one.
    pub fn with_samples(mut self, decoder: Option<super::TokenDecoder>) -> Result<Self> {
        super::gpt::check_decoder(&decoder, &self.data)?;
        self.decoder = decoder;
        Ok(self)
    }

    /// Builds the model on `device` in `dtype`; the data must fit it
    /// (tokens below `vocab_size`, sequences within `max_len`), else an
    /// error naming the key.
    pub fn new(
        (cfg, loss): (GptVaeConfig, GptVaeLossConfig),
        data: TokenSplit,
        data_cfg: &TokenDataConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        super::gpt::check_fit(
            &data,
            data_cfg,
            "gpt_vae",
            cfg.vocab_size,
            cfg.max_len,
            None,
        )?;
        let varmap = VarMap::new();
        let model = GptVae::new(
            cfg,
            melvae_layers::seeded_var_builder(&varmap, seed, dtype, device),
        )?;
        Ok(Self {
            varmap,
            model,
            loss,
            data,
            batch_size: data_cfg.batch_size,
            cursor: EpochCursor { epoch: 0, pos: 0 },
            seed,
            shard: Shard::WHOLE,
            device: device.clone(),
            decoder: None,
        })
    }
}

impl TrainTask for GptVaeTask {
    type Batch = super::gpt::GptBatch;

    fn vars(&self) -> Vec<(String, Var)> {
        melvae_layers::named_vars(&self.varmap)
    }

    fn train_batch(&mut self, _rng: &mut SplitMix64) -> Result<super::gpt::GptBatch> {
        let idx = self
            .cursor
            .next_of(self.data.train.len(), self.seed, self.batch_size);
        // The whole batch (padded as one process pads it), then this rank's
        // rows, their cross-entropy weighted by their share of the tokens.
        super::gpt::gpt_batch(&self.data.train, &idx, &self.device)?
            .shard(self.shard, self.batch_size)
    }

    /// Data-parallel: each rank keeps its rows of the whole batch and of
    /// the whole batch's latent noise; its per-token cross-entropy is
    /// weighted as the GPT's ([`super::gpt::GptBatch::weight`]) and the KL
    /// is a mean over its rows, so the ranks together compute one
    /// process's loss, except `fb: 2` free bits (a floor on a mean
    /// over the batch), taken over each rank's rows. Dropout masks come
    /// from per-rank streams.
    fn set_shard(&mut self, shard: Shard) -> Result<()> {
        self.shard = shard.for_batch(self.batch_size)?;
        Ok(())
    }

    fn losses(&mut self, batch: &super::gpt::GptBatch, ctx: StepContext) -> Result<Losses> {
        // Noise and dropout seeded by the step and the data position
        // (distinct per micro-batch, restored on resume); dropout also by
        // the rank.
        let step_seed = super::step_seed(self.seed, ctx.step, &self.cursor);
        let dropout = DropoutRng::new(self.shard.seed(step_seed));
        let mode = super::gpt::mode_of(ctx, &dropout);
        let w = self.loss.schedule().weight(ctx.step);
        let eps = if w == 0.0 {
            None
        } else {
            let global = batch.tokens.dim(0)? * self.shard.count;
            let rows = self.shard.rows(global, "data.batch_size")?;
            let rng = &mut SplitMix64::new(step_seed ^ 0x5eed);
            let all = self.model.latent_noise(global, rng, &self.device)?;
            Some(all.narrow(0, rows.start, rows.len())?)
        };
        let l = self.model.loss_with(
            &batch.tokens,
            Some(&batch.mask),
            w,
            self.loss.free_bits(),
            eps.as_ref(),
            mode,
        )?;
        // (1 for a whole batch: the loss is left as it was.)
        let (total, ce) = if batch.weight == 1.0 {
            (l.total, l.ce)
        } else {
            let ce = (l.ce * batch.weight)?;
            ((&ce + (&l.kl * w)?)?, ce)
        };
        let active = active_units(&l.kl_per_dim, 0.01)? as f32;
        Ok(Losses {
            total,
            terms: BTreeMap::from([
                ("ce".to_string(), ce),
                ("kl".to_string(), l.kl),
                (
                    "kl_weight".to_string(),
                    Tensor::new(w as f32, &self.device)?,
                ),
                (
                    "active_units".to_string(),
                    Tensor::new(active, &self.device)?,
                ),
            ]),
        })
    }

    fn validate(&mut self, _ctx: StepContext) -> Result<BTreeMap<String, f64>> {
        let set = if self.data.val.is_empty() {
            &self.data.train
        } else {
            &self.data.val
        };
        let (mut ce, mut kl, mut n, mut tokens) = (0.0, 0.0, 0.0, 0.0);
        let mut per_dim: Option<Tensor> = None;
        let mut rng = SplitMix64::new(0);
        for chunk in (0..set.len())
            .collect::<Vec<_>>()
            .chunks(self.batch_size.max(1))
        {
            let b = super::gpt::gpt_batch(set, chunk, &self.device)?;
            // kl_weight 0: decode from the posterior mean.
            let l = self.model.loss(
                &b.tokens,
                Some(&b.mask),
                0.0,
                FreeBits::None,
                &mut rng,
                Mode::Eval,
            )?;
            let w = chunk.len() as f64;
            let real = b.mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            ce += l.ce.to_dtype(DType::F64)?.to_scalar::<f64>()? * real;
            tokens += real;
            kl += l.kl.to_dtype(DType::F64)?.to_scalar::<f64>()? * w;
            let d = (l.kl_per_dim * w)?;
            per_dim = Some(match per_dim {
                Some(p) => (p + d)?,
                None => d,
            });
            n += w;
        }
        let n = f64::max(n, 1.0);
        let active = match per_dim {
            Some(p) => active_units(&(p / n)?, 0.01)?,
            None => 0,
        };
        Ok(BTreeMap::from([
            ("ce".to_string(), ce / f64::max(tokens, 1.0)),
            ("kl".to_string(), kl / n),
            ("active_units".to_string(), active as f64),
        ]))
    }

    fn best_metric(&self) -> &str {
        "ce"
    }

    /// The first held-out example (`input`: its tokens through the
    /// VQ-VAE), its reconstruction (`recon`: decoded from its posterior
    /// mean) and a sound from the prior (`prior`: `z ~ N(0, I)`), sampled
    /// at temperature 1 with a seed from the run's and the step; written
    /// as `step{N}_{what}.png/.wav` through the `training.sample_vqvae`
    /// (nothing without one).
    fn samples(
        &mut self,
        ctx: StepContext,
        dir: &std::path::Path,
    ) -> Result<Vec<std::path::PathBuf>> {
        let Some(decoder) = &self.decoder else {
            return Ok(Vec::new());
        };
        let set = if self.data.val.is_empty() {
            &self.data.train
        } else {
            &self.data.val
        };
        let b = super::gpt::gpt_batch(set, &[0], &self.device)?;
        let len = b.tokens.dim(1)?;
        let opts = super::sample_options(self.seed, ctx.step);
        let (mean, _) = self.model.encode(&b.tokens, Some(&b.mask), Mode::Eval)?;
        let recon = self.model.generate(&mean, len, &opts)?;
        let mut rng = SplitMix64::new(opts.seed);
        let z = melvae_models::normal_noise(mean.dims(), &mut rng, &self.device)?
            .to_dtype(mean.dtype())?;
        let prior = self.model.generate(&z, len, &opts)?;
        let stem = |what: &str| format!("step{:08}_{what}", ctx.step);
        let mut written = Vec::new();
        for (what, tokens) in [("input", &b.tokens), ("recon", &recon), ("prior", &prior)] {
            written.extend(decoder.write(tokens, dir, &stem(what))?);
        }
        Ok(written)
    }

    fn save_model_file(
        &self,
        path: &std::path::Path,
        metadata: &BTreeMap<String, String>,
    ) -> Result<bool> {
        super::write_model_file::<GptVae>(path, self.model.config(), &self.varmap, metadata)
    }

    fn state(&self) -> serde_json::Value {
        super::cursor_state(&self.cursor)
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        super::load_cursor(&mut self.cursor, state);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Validate;

    #[test]
    fn loss_config_maps_the_seed_arguments_and_names_bad_keys() {
        let stage2 = GptVaeLossConfig {
            beta: 1.0,
            kl_start: 0.0,
            warm_up: 10,
            fb: 2,
            target_kl: Some(8.0),
        };
        assert_eq!(stage2.free_bits(), FreeBits::PerDimMax { target: 8.0 });
        let s = stage2.schedule();
        assert_eq!(
            (s.weight(0), s.weight(5), s.weight(10), s.weight(99)),
            (0.0, 0.5, 1.0, 1.0)
        );
        let ae = GptVaeLossConfig {
            beta: 0.0,
            ..Default::default()
        };
        assert_eq!(
            (ae.schedule().weight(0), ae.free_bits()),
            (0.0, FreeBits::None)
        );
        let fb1 = GptVaeLossConfig {
            fb: 1,
            target_kl: Some(3.0),
            ..Default::default()
        };
        assert_eq!(fb1.free_bits(), FreeBits::Threshold { target: 3.0 });
        for (bad, key) in [
            (
                GptVaeLossConfig {
                    fb: 2,
                    target_kl: None,
                    ..stage2
                },
                "gpt_vae_loss.target_kl",
            ),
            (GptVaeLossConfig { fb: 3, ..stage2 }, "gpt_vae_loss.fb"),
            (
                GptVaeLossConfig {
                    kl_start: 1.5,
                    ..stage2
                },
                "gpt_vae_loss.kl_start",
            ),
            (
                GptVaeLossConfig {
                    beta: -1.0,
                    ..stage2
                },
                "gpt_vae_loss.beta",
            ),
        ] {
            assert_eq!(bad.validate().unwrap_err().0, key);
        }
    }
}
