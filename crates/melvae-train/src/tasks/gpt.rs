//! Training the class GPT on token shards (`tokenize`'s output): teacher
//! forcing with the class as the prompt, masked cross-entropy with label
//! smoothing; validation reports the held-out cross-entropy, perplexity and
//! the unigram baseline's.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use melvae_dsp::SplitMix64;
use melvae_layers::{DropoutRng, Mode};
use melvae_models::{Gpt, GptConfig};
use serde::{Deserialize, Serialize};

use crate::data::EpochCursor;
use crate::dist::Shard;
use crate::tokens::{TokenDataConfig, TokenDataset, TokenSplit};
use crate::trainer::{Losses, StepContext, TrainTask};
use crate::{Error, Result};

impl crate::Validate for GptConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        GptConfig::validate(self).map_err(|e| super::mel_vae::section_err(e, "gpt"))
    }
}

/// The `gpt_loss:` section.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GptLossConfig {
    /// Label smoothing of the cross-entropy (0 = none).
    #[serde(default)]
    pub label_smoothing: f64,
}

impl crate::Validate for GptLossConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err((
                "gpt_loss.label_smoothing".into(),
                format!("must be in [0, 1), got {}", self.label_smoothing),
            ));
        }
        Ok(())
    }
}

/// The GPT's sections of a resolved config: `gpt:` and `gpt_loss:`
/// (defaults when absent), validated with errors naming file and key.
pub fn gpt_config(cfg: &crate::ResolvedConfig) -> Result<(GptConfig, GptLossConfig)> {
    let loss = if cfg.value.get("gpt_loss").is_some() {
        cfg.get("gpt_loss")?
    } else {
        GptLossConfig::default()
    };
    Ok((cfg.get("gpt")?, loss))
}

/// Flattened token rows `[batch, frames * codebooks]` (padding as token
/// 0), their mask (1 = real) and the class labels `[batch]`.
#[derive(Debug, Clone)]
pub struct GptBatch {
    /// Tokens.
    pub tokens: Tensor,
    /// `[batch, frames * codebooks]` u8, 1 for real tokens.
    pub mask: Tensor,
    /// Classes.
    pub classes: Tensor,
    /// This batch's share of its global batch's loss: 1 for a whole batch;
    /// for a data-parallel rank's rows, their real tokens over the global
    /// batch's, times the number of ranks, so that the mean over the ranks
    /// of the weighted per-token means is the global batch's per-token mean.
    pub weight: f64,
}

impl GptBatch {
    /// Rows `shard.rows(..)` of this (global) batch of `batch` rows, with
    /// their [`GptBatch::weight`].
    pub(crate) fn shard(self, shard: Shard, batch: usize) -> Result<Self> {
        if shard == Shard::WHOLE {
            return Ok(self);
        }
        let rows = shard.rows(batch, "data.batch_size")?;
        let narrow = |t: &Tensor| t.narrow(0, rows.start, rows.len());
        Ok(Self {
            tokens: narrow(&self.tokens)?,
            classes: narrow(&self.classes)?,
            weight: token_share(&self.mask, rows.clone(), shard.count)?,
            mask: narrow(&self.mask)?,
        })
    }
}

/// The weight of a data-parallel rank's per-token mean loss over `rows` of
/// a batch whose real tokens `mask` marks (`[batch, len]`, non-zero =
/// real): the rows' share of the batch's real tokens, times the number of
/// ranks `count`, so that the mean over the ranks of the weighted
/// per-token means is the whole batch's per-token mean.
pub(crate) fn token_share(
    mask: &Tensor,
    rows: std::ops::Range<usize>,
    count: usize,
) -> Result<f64> {
    let real = |m: &Tensor| -> Result<f64> {
        Ok(m.ne(0u32)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?)
    };
    let total = real(mask)?;
    let mine = real(&mask.narrow(0, rows.start, rows.len())?)?;
    Ok(mine / total.max(1.0) * count as f64)
}

pub(crate) fn gpt_batch(set: &TokenDataset, idx: &[usize], device: &Device) -> Result<GptBatch> {
    let b = set.batch(idx, 0, device)?;
    let (n, t, k) = b.codes.dims3()?;
    let tokens = b.codes.reshape((n, t * k))?;
    let mask = b
        .mask
        .unsqueeze(2)?
        .broadcast_as((n, t, k))?
        .reshape((n, t * k))?;
    let classes = match b.labels {
        Some(l) => l,
        None => Tensor::zeros(n, DType::U32, device)?,
    };
    Ok(GptBatch {
        tokens,
        mask,
        classes,
        weight: 1.0,
    })
}

/// Checks that the token data fits a token model (`section.vocab_size`,
/// `section.max_len`, and `section.num_classes` when given): an error
/// names the key, the shards and the first example that does not fit.
pub(crate) fn check_fit(
    data: &TokenSplit,
    data_cfg: &TokenDataConfig,
    section: &str,
    vocab_size: usize,
    max_len: usize,
    num_classes: Option<usize>,
) -> Result<()> {
    let train = data
        .train
        .examples
        .iter()
        .enumerate()
        .map(|(i, e)| ("training", i, e));
    let val = data
        .val
        .examples
        .iter()
        .enumerate()
        .map(|(i, e)| ("held-out", i, e));
    for (set, i, e) in train.chain(val) {
        let len: usize = e.codes.iter().map(Vec::len).sum();
        let max = e.codes.iter().flatten().copied().max().unwrap_or(0) as usize;
        let bad = |key: &str, reason: String| Error::Config {
            origin: format!(
                "the config, for {set} example {i} of {}",
                data_cfg.tokens.display()
            ),
            key: format!("{section}.{key}"),
            reason,
        };
        if max >= vocab_size {
            return Err(bad(
                "vocab_size",
                format!("is {vocab_size}, the tokens reach {max}"),
            ));
        }
        if num_classes == Some(0) {
            return Err(Error::Config {
                origin: "the config".into(),
                key: format!("{section}.num_classes"),
                reason: "must be > 0 for a class GPT (1: unconditional)".into(),
            });
        }
        if let Some(n) = num_classes {
            let label = e.label.unwrap_or(0) as usize;
            if label >= n {
                return Err(bad("num_classes", format!("is {n}, a label is {label}")));
            }
        }
        if len > max_len {
            return Err(bad(
                "max_len",
                format!("is {max_len}, a sequence has {len} tokens"),
            ));
        }
    }
    Ok(())
}

/// The class GPT as a [`TrainTask`]: batches of token sequences (one
/// shard example each, its `rows x cols` grid flattened in raster order)
/// with their class labels (class 0 when the shards have none);
/// validation on the held-out examples (on the training examples when
/// none are held out, as for audio families): `ce` (nats per token, which
/// picks the best checkpoint), `perplexity` and `unigram_perplexity` (the
/// training tokens' frequencies, add-one smoothed: the baseline to beat).
pub struct GptTask {
    /// The parameters.
    pub varmap: VarMap,
    /// The model.
    pub model: Gpt,
    loss: GptLossConfig,
    data: TokenSplit,
    batch_size: usize,
    /// `-ln p(token)` of the training tokens' add-one-smoothed frequencies.
    unigram_nll: Vec<f64>,
    cursor: EpochCursor,
    seed: u64,
    device: Device,
    decoder: Option<super::TokenDecoder>,
    shard: Shard,
}

/// Token rows of the first example of `set` (or of `other` when `set` is
/// empty) and their width, for samples of a realistic length.
pub(crate) fn sample_shape(set: &TokenDataset, other: &TokenDataset) -> (usize, usize) {
    let e = set.examples.first().or(other.examples.first());
    e.map_or((0, 0), |e| {
        (e.codes.len(), e.codes.first().map_or(0, Vec::len))
    })
}

/// The tokens of `tokens` `[batch, len]` where `mask` (same shape) is
/// set, and their summed `-ln p` under `unigram_nll` (see [`unigram_nll`]).
pub(crate) fn real_tokens_nll(
    tokens: &Tensor,
    mask: &Tensor,
    unigram_nll: &[f64],
) -> Result<(usize, f64)> {
    let tokens: Vec<u32> = tokens.flatten_all()?.to_vec1()?;
    let mask: Vec<u8> = mask.flatten_all()?.to_dtype(DType::U8)?.to_vec1()?;
    let real: Vec<u32> = tokens
        .into_iter()
        .zip(mask)
        .filter_map(|(t, m)| (m != 0).then_some(t))
        .collect();
    let nll = real
        .iter()
        .map(|&t| unigram_nll.get(t as usize).copied().unwrap_or(0.0))
        .sum();
    Ok((real.len(), nll))
}

/// The mode of a task's loss pass: training with `dropout`'s masks, or
/// evaluation.
pub(crate) fn mode_of(ctx: StepContext, dropout: &DropoutRng) -> Mode<'_> {
    if ctx.train {
        Mode::Train(dropout)
    } else {
        Mode::Eval
    }
}

/// `-ln p(token)` for each of `vocab` tokens under the add-one-smoothed
/// token frequencies of `set`: the unigram baseline of the token models.
pub(crate) fn unigram_nll(set: &TokenDataset, vocab: usize) -> Vec<f64> {
    let mut counts = vec![1.0f64; vocab];
    for t in set.examples.iter().flat_map(|e| e.codes.iter().flatten()) {
        if let Some(c) = counts.get_mut(*t as usize) {
            *c += 1.0;
        }
    }
    let total: f64 = counts.iter().sum();
    counts.iter().map(|c| -(c / total).ln()).collect()
}

/// Checks that `decoder`'s VQ-VAE decodes rows as wide as the data's.
pub(crate) fn check_decoder(
    decoder: &Option<super::TokenDecoder>,
    data: &TokenSplit,
) -> Result<()> {
    if let Some(d) = decoder {
        let (_, cols) = sample_shape(&data.val, &data.train);
        if cols != d.cols() {
            return Err(Error::invalid(
                "training.sample_vqvae",
                format!(
                    "its token rows hold {} codes, the training data's {cols}",
                    d.cols()
                ),
            ));
        }
    }
    Ok(())
}

impl GptTask {
    /// Writes samples (one generated sound per class, at most 8 classes,
    /// as mel PNGs and WAVs) through `decoder`; none without one.
    pub fn with_samples(mut self, decoder: Option<super::TokenDecoder>) -> Result<Self> {
        check_decoder(&decoder, &self.data)?;
        self.decoder = decoder;
        Ok(self)
    }

    /// Builds the model on `device` in `dtype`; the data must fit it (every
    /// token below `vocab_size`, every label below `num_classes`, no
    /// sequence longer than `max_len`), else an error naming the key.
    pub fn new(
        (cfg, loss): (GptConfig, GptLossConfig),
        data: TokenSplit,
        data_cfg: &TokenDataConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        check_fit(
            &data,
            data_cfg,
            "gpt",
            cfg.vocab_size,
            cfg.max_len,
            Some(cfg.num_classes),
        )?;
        let varmap = VarMap::new();
        let model = Gpt::new(
            cfg,
            melvae_layers::seeded_var_builder(&varmap, seed, dtype, device),
        )?;
        Ok(Self {
            unigram_nll: unigram_nll(&data.train, model.config().vocab_size),
            varmap,
            model,
            loss,
            data,
            batch_size: data_cfg.batch_size,
            cursor: EpochCursor { epoch: 0, pos: 0 },
            shard: Shard::WHOLE,
            seed,
            device: device.clone(),
            decoder: None,
        })
    }

    /// Cross-entropy (nats per token) of the model on `set`, and of the
    /// add-one-smoothed unigram distribution of the training tokens.
    fn held_out_ce(&self, set: &TokenDataset) -> Result<(f64, f64)> {
        let (mut model_sum, mut uni_sum, mut n) = (0.0, 0.0, 0usize);
        for chunk in (0..set.len())
            .collect::<Vec<_>>()
            .chunks(self.batch_size.max(1))
        {
            let b = gpt_batch(set, chunk, &self.device)?;
            let ce = self
                .model
                .loss(&b.tokens, &b.classes, Some(&b.mask), 0.0, Mode::Eval)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            let (real, uni) = real_tokens_nll(&b.tokens, &b.mask, &self.unigram_nll)?;
            model_sum += ce * real as f64;
            uni_sum += uni;
            n += real;
        }
        let n = n.max(1) as f64;
        Ok((model_sum / n, uni_sum / n))
    }
}

impl TrainTask for GptTask {
    type Batch = GptBatch;

    fn vars(&self) -> Vec<(String, Var)> {
        melvae_layers::named_vars(&self.varmap)
    }

    fn train_batch(&mut self, _rng: &mut SplitMix64) -> Result<GptBatch> {
        let idx = self
            .cursor
            .next_of(self.data.train.len(), self.seed, self.batch_size);
        // The whole batch (padded as one process pads it), then this rank's
        // rows: a causal model's loss at a real token does not depend on
        // the padding after it.
        gpt_batch(&self.data.train, &idx, &self.device)?.shard(self.shard, self.batch_size)
    }

    fn set_shard(&mut self, shard: Shard) -> Result<()> {
        self.shard = shard.for_batch(self.batch_size)?;
        Ok(())
    }

    fn losses(&mut self, batch: &GptBatch, ctx: StepContext) -> Result<Losses> {
        // Dropout masks seeded by the step and the data position (distinct
        // per micro-batch, restored on resume), and by the rank.
        let seed = self
            .shard
            .seed(super::step_seed(self.seed, ctx.step, &self.cursor));
        let rng = DropoutRng::new(seed);
        let mode = mode_of(ctx, &rng);
        let ce = self.model.loss(
            &batch.tokens,
            &batch.classes,
            Some(&batch.mask),
            self.loss.label_smoothing,
            mode,
        )?;
        // (1 for a whole batch: the loss is left as it was.)
        let ce = if batch.weight == 1.0 {
            ce
        } else {
            (ce * batch.weight)?
        };
        Ok(Losses {
            total: ce.clone(),
            terms: BTreeMap::from([("ce".to_string(), ce)]),
        })
    }

    fn validate(&mut self, _ctx: StepContext) -> Result<BTreeMap<String, f64>> {
        let set = if self.data.val.is_empty() {
            &self.data.train
        } else {
            &self.data.val
        };
        let (ce, uni) = self.held_out_ce(set)?;
        Ok(BTreeMap::from([
            ("ce".to_string(), ce),
            ("perplexity".to_string(), ce.exp()),
            ("unigram_perplexity".to_string(), uni.exp()),
        ]))
    }

    fn best_metric(&self) -> &str {
        "ce"
    }

    /// One sound per class (the first 8), as long as the first held-out
    /// example, sampled at temperature 1 with a seed from the run's and
    /// the step; written as `step{N}_class_{name}.png/.wav` through the
    /// `training.sample_vqvae` (nothing without one).
    fn samples(
        &mut self,
        ctx: StepContext,
        dir: &std::path::Path,
    ) -> Result<Vec<std::path::PathBuf>> {
        let Some(decoder) = &self.decoder else {
            return Ok(Vec::new());
        };
        let (rows, cols) = sample_shape(&self.data.val, &self.data.train);
        let len = (rows * cols).min(self.model.config().max_len) / cols.max(1) * cols;
        let opts = super::sample_options(self.seed, ctx.step);
        let mut written = Vec::new();
        for c in 0..self.model.config().num_classes.min(8) {
            let class = Tensor::new(&[c as u32], &self.device)?;
            let tokens = self.model.sample(&class, len, &opts)?;
            let name = self
                .data
                .class_names
                .get(c)
                .cloned()
                .unwrap_or_else(|| c.to_string());
            let stem = format!("step{:08}_class_{name}", ctx.step);
            written.extend(decoder.write(&tokens, dir, &stem)?);
        }
        Ok(written)
    }

    fn save_model_file(
        &self,
        path: &std::path::Path,
        metadata: &BTreeMap<String, String>,
    ) -> Result<bool> {
        let mut metadata = metadata.clone();
        if !self.data.class_names.is_empty() {
            metadata.insert(
                "class_names".into(),
                serde_json::to_string(&self.data.class_names).unwrap_or_default(),
            );
        }
        super::write_model_file::<Gpt>(path, self.model.config(), &self.varmap, &metadata)
    }

    fn state(&self) -> serde_json::Value {
        super::cursor_state(&self.cursor)
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        super::load_cursor(&mut self.cursor, state);
        Ok(())
    }
}
