//! Training Echolancer on token shards with text (`prepare_tts`'s output)
//! or the seed's `.pt` examples: teacher forcing, the seed's loss (token
//! cross-entropy + gate binary cross-entropy); validation reports the
//! held-out cross-entropy, perplexity and the unigram baseline's; samples
//! synthesise the configured test sentences for the test speakers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use melvae_dsp::SplitMix64;
use melvae_layers::{DropoutRng, Mode};
use melvae_models::{Echolancer, EcholancerConfig, EcholancerInputs};
use serde::{Deserialize, Serialize};

use crate::data::EpochCursor;
use crate::dist::Shard;
use crate::tokens::{TokenDataConfig, TokenDataset, TokenSplit};
use crate::trainer::{Losses, StepContext, TrainTask};
use crate::{Error, Result};

impl crate::Validate for EcholancerConfig {
    /// As [`EcholancerConfig::validate`], except that `vocab_size: 0`
    /// (take it from the data's `symbols.json`) passes here: the task
    /// fills it in before building the model.
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        let mut c = self.clone();
        if c.vocab_size == 0 {
            c.vocab_size = c.symbols.len() + melvae_models::echolancer::FIRST_SYMBOL as usize;
        }
        EcholancerConfig::validate(&c).map_err(|e| super::mel_vae::section_err(e, "echolancer"))
    }
}

/// The `echolancer_loss:` section.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EcholancerLossConfig {
    /// `pos_weight` of the gate's binary cross-entropy: the weight of the
    /// one positive (the last token) against the many negatives.
    #[serde(default = "default_pos_weight")]
    pub gate_pos_weight: f64,
}

fn default_pos_weight() -> f64 {
    5.0
}

impl Default for EcholancerLossConfig {
    fn default() -> Self {
        Self {
            gate_pos_weight: default_pos_weight(),
        }
    }
}

impl crate::Validate for EcholancerLossConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        let w = self.gate_pos_weight;
        if !(w.is_finite() && w > 0.0) {
            return Err((
                "echolancer_loss.gate_pos_weight".into(),
                format!("must be > 0, got {w}"),
            ));
        }
        Ok(())
    }
}

/// The `echolancer_test:` section: what the samples synthesise (the seed's
/// `--test_sentences` and `--test_speakers`), every `training.sample_every`
/// steps, decoded by `training.sample_vqvae`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EcholancerTestConfig {
    /// Sentences to synthesise.
    #[serde(default)]
    pub test_sentences: Vec<String>,
    /// Speaker ids to synthesise each sentence for (empty: speaker 0).
    #[serde(default)]
    pub test_speakers: Vec<u32>,
    /// Gate probability that ends a sentence.
    #[serde(default = "half")]
    pub gate_threshold: f64,
}

fn half() -> f64 {
    0.5
}

impl crate::Validate for EcholancerTestConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        let t = self.gate_threshold;
        if !(t > 0.0 && t <= 1.0) {
            return Err((
                "echolancer_test.gate_threshold".into(),
                format!("must be in (0, 1], got {t}"),
            ));
        }
        Ok(())
    }
}

/// Echolancer's sections of a resolved config.
#[derive(Debug, Clone, PartialEq)]
pub struct EcholancerSections {
    /// `echolancer:`.
    pub model: EcholancerConfig,
    /// `echolancer_loss:` (defaults when absent).
    pub loss: EcholancerLossConfig,
    /// `echolancer_test:` (no test sentences when absent).
    pub test: EcholancerTestConfig,
}

/// Echolancer's sections, validated with errors naming file and key.
pub fn echolancer_config(cfg: &crate::ResolvedConfig) -> Result<EcholancerSections> {
    let optional = |name: &str| cfg.value.get(name).is_some();
    Ok(EcholancerSections {
        model: cfg.get("echolancer")?,
        loss: if optional("echolancer_loss") {
            cfg.get("echolancer_loss")?
        } else {
            Default::default()
        },
        test: if optional("echolancer_test") {
            cfg.get("echolancer_test")?
        } else {
            Default::default()
        },
    })
}

/// `cfg` with the data's tokenizer: `symbols` (from `symbols.json` beside
/// the shards `tokens`) when the config lists none, and `vocab_size: 0`
/// replaced by their count plus padding and unknown.
pub fn with_data_symbols(
    mut cfg: EcholancerConfig,
    symbols: &[String],
    tokens: &Path,
) -> Result<EcholancerConfig> {
    if cfg.symbols.is_empty() {
        cfg.symbols = symbols.to_vec();
    }
    if cfg.vocab_size == 0 {
        if cfg.symbols.is_empty() {
            return Err(Error::invalid(
                "echolancer.vocab_size",
                format!(
                    "is 0 (from the data's symbols) but {} has no {}",
                    tokens.display(),
                    crate::tokens::SYMBOLS_FILE
                ),
            ));
        }
        cfg.vocab_size = cfg.symbols.len() + melvae_models::echolancer::FIRST_SYMBOL as usize;
    }
    Ok(cfg)
}

/// The model config and speaker names of a checkpoint of a run with the
/// resolved config `cfg`: the tokenizer and speakers the run trained with
/// (kept in the checkpoint's task state), or, for a config that lists its
/// symbols, the config's. What `export` writes into model files.
pub fn model_config(
    cfg: &crate::ResolvedConfig,
    checkpoint: &Path,
) -> Result<(EcholancerConfig, Vec<String>)> {
    let data: TokenDataConfig = cfg.get("data")?;
    let state = crate::checkpoint::read_state(checkpoint)
        .ok()
        .and_then(|s| s.extra.get("task").cloned())
        .unwrap_or(serde_json::Value::Null);
    let list = |key: &str| -> Vec<String> {
        state
            .get(key)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default()
    };
    let model = with_data_symbols(
        echolancer_config(cfg)?.model,
        &list("symbols"),
        &data.tokens,
    )?;
    Ok((model, list("speaker_names")))
}

/// A batch: the model inputs, the flattened target tokens `[batch, len]`
/// and their mask.
#[derive(Debug, Clone)]
pub struct EcholancerBatch {
    /// Text, speakers, emotion.
    pub inputs: EcholancerInputs,
    /// Target tokens `[batch, len]` (u32).
    pub tokens: Tensor,
    /// `[batch, len]` u8, 1 for real tokens.
    pub mask: Tensor,
    /// This batch's share of its global batch's loss (1 for a whole
    /// batch; see [`super::gpt::GptBatch::weight`]).
    pub weight: f64,
}

impl EcholancerBatch {
    /// Rows `shard.rows(..)` of this (global) batch of `batch` rows, with
    /// their weight: both loss terms are means over real token positions.
    fn shard(self, shard: Shard, batch: usize) -> Result<Self> {
        if shard == Shard::WHOLE {
            return Ok(self);
        }
        let rows = shard.rows(batch, "data.batch_size")?;
        let narrow = |t: &Tensor| t.narrow(0, rows.start, rows.len());
        let i = &self.inputs;
        Ok(Self {
            inputs: EcholancerInputs {
                text: narrow(&i.text)?,
                text_mask: i.text_mask.as_ref().map(narrow).transpose()?,
                speakers: narrow(&i.speakers)?,
                emotion: match &i.emotion {
                    Some((e, present)) => Some((narrow(e)?, narrow(present)?)),
                    None => None,
                },
            },
            tokens: narrow(&self.tokens)?,
            weight: super::gpt::token_share(&self.mask, rows.clone(), shard.count)?,
            mask: narrow(&self.mask)?,
        })
    }
}

fn batch_of(set: &TokenDataset, idx: &[usize], device: &Device) -> Result<EcholancerBatch> {
    let b = set.batch(idx, 0, device)?;
    let (n, t, k) = b.codes.dims3()?;
    let mask = b
        .mask
        .unsqueeze(2)?
        .broadcast_as((n, t, k))?
        .reshape((n, t * k))?;
    let (text, text_mask) = b.text.ok_or_else(|| {
        Error::invalid(
            "echolancer data",
            "the examples have no text (token shards from prepare_tts, or .pt files)",
        )
    })?;
    Ok(EcholancerBatch {
        inputs: EcholancerInputs {
            text,
            text_mask: Some(text_mask),
            speakers: match b.speakers {
                Some(s) => s,
                None => Tensor::zeros(n, DType::U32, device)?,
            },
            emotion: b.cond,
        },
        tokens: b.codes.reshape((n, t * k))?,
        mask,
        weight: 1.0,
    })
}

/// Checks that the data fits the model: text ids, tokens, speakers,
/// emotion size and sequence length; an error names the key and the
/// first example that does not fit.
fn check_fit(data: &TokenSplit, data_cfg: &TokenDataConfig, cfg: &EcholancerConfig) -> Result<()> {
    let sets = [("training", &data.train), ("held-out", &data.val)];
    for (set, d) in sets {
        for (i, e) in d.examples.iter().enumerate() {
            let bad = |key: &str, reason: String| Error::Config {
                origin: format!(
                    "the config, for {set} example {i} of {}",
                    data_cfg.tokens.display()
                ),
                key: format!("echolancer.{key}"),
                reason,
            };
            let Some(text) = &e.text else {
                return Err(bad(
                    "vocab_size",
                    "the example has no text (token shards from prepare_tts, or .pt files)".into(),
                ));
            };
            if let Some(&m) = text.iter().max().filter(|&&m| m as usize >= cfg.vocab_size) {
                return Err(bad(
                    "vocab_size",
                    format!("is {}, a text id is {m}", cfg.vocab_size),
                ));
            }
            let tokens: Vec<u32> = e.codes.iter().flatten().copied().collect();
            if let Some(&m) = tokens
                .iter()
                .max()
                .filter(|&&m| m as usize >= cfg.mel_vocab_size)
            {
                return Err(bad(
                    "mel_vocab_size",
                    format!("is {}, a token is {m}", cfg.mel_vocab_size),
                ));
            }
            if tokens.len() > cfg.max_len {
                return Err(bad(
                    "max_len",
                    format!("is {}, a sequence has {} tokens", cfg.max_len, tokens.len()),
                ));
            }
            let s = e.speaker.unwrap_or(0) as usize;
            if s >= cfg.n_speakers {
                return Err(bad(
                    "n_speakers",
                    format!("is {}, a speaker is {s}", cfg.n_speakers),
                ));
            }
            if let Some(c) = &e.cond {
                if c.len() != cfg.emotion_channels {
                    return Err(bad(
                        "emotion_channels",
                        format!(
                            "is {}, an emotion vector has {}",
                            cfg.emotion_channels,
                            c.len()
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Echolancer as a [`TrainTask`]; see the module docs.
pub struct EcholancerTask {
    /// The parameters (`encoder.*`, `decoder.*`).
    pub varmap: VarMap,
    /// The model.
    pub model: Echolancer,
    loss: EcholancerLossConfig,
    test: EcholancerTestConfig,
    data: TokenSplit,
    batch_size: usize,
    unigram_nll: Vec<f64>,
    cursor: EpochCursor,
    seed: u64,
    shard: Shard,
    device: Device,
    decoder: Option<super::TokenDecoder>,
}

impl EcholancerTask {
    /// Builds the model on `device` in `dtype`. With `echolancer.symbols`
    /// empty the data's `symbols.json` supplies the tokenizer (and
    /// `vocab_size: 0` its size); the data must fit the model (see the
    /// module docs), else an error naming the key.
    pub fn new(
        sections: EcholancerSections,
        data: TokenSplit,
        data_cfg: &TokenDataConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let cfg = with_data_symbols(sections.model, &data.symbols, &data_cfg.tokens)?;
        if !sections.test.test_sentences.is_empty() && cfg.symbols.is_empty() {
            return Err(Error::invalid(
                "echolancer_test.test_sentences",
                "need a tokenizer: echolancer.symbols, or symbols.json beside the data",
            ));
        }
        if let Some(&s) = sections
            .test
            .test_speakers
            .iter()
            .find(|&&s| s as usize >= cfg.n_speakers)
        {
            return Err(Error::invalid(
                "echolancer_test.test_speakers",
                format!(
                    "speaker {s} is not below echolancer.n_speakers {}",
                    cfg.n_speakers
                ),
            ));
        }
        check_fit(&data, data_cfg, &cfg)?;
        let varmap = VarMap::new();
        let model = Echolancer::new(
            cfg,
            melvae_layers::seeded_var_builder(&varmap, seed, dtype, device),
        )?;
        let unigram_nll = super::gpt::unigram_nll(&data.train, model.config().mel_vocab_size);
        Ok(Self {
            varmap,
            model,
            loss: sections.loss,
            test: sections.test,
            data,
            batch_size: data_cfg.batch_size,
            unigram_nll,
            cursor: EpochCursor { epoch: 0, pos: 0 },
            seed,
            shard: Shard::WHOLE,
            device: device.clone(),
            decoder: None,
        })
    }

    /// Writes the test sentences' synthesis through `decoder` (its rows
    /// must be as wide as the data's, unless the data is flat: the seed's
    /// `.pt` tokens); none without one.
    pub fn with_samples(mut self, decoder: Option<super::TokenDecoder>) -> Result<Self> {
        let (_, cols) = super::gpt::sample_shape(&self.data.val, &self.data.train);
        if cols > 1 {
            super::gpt::check_decoder(&decoder, &self.data)?;
        }
        self.decoder = decoder;
        Ok(self)
    }

    /// Cross-entropy of the model and of the unigram distribution (nats per
    /// token), and the gate loss, on `set`.
    fn held_out(&self, set: &TokenDataset) -> Result<(f64, f64, f64)> {
        let (mut ce, mut uni, mut gate, mut n, mut batches) = (0.0, 0.0, 0.0, 0usize, 0usize);
        for chunk in (0..set.len())
            .collect::<Vec<_>>()
            .chunks(self.batch_size.max(1))
        {
            let b = batch_of(set, chunk, &self.device)?;
            let l = self.model.loss(
                &b.inputs,
                &b.tokens,
                Some(&b.mask),
                Some(self.loss.gate_pos_weight),
                Mode::Eval,
            )?;
            let (real, u) = super::gpt::real_tokens_nll(&b.tokens, &b.mask, &self.unigram_nll)?;
            ce += l.ce.to_dtype(DType::F64)?.to_scalar::<f64>()? * real as f64;
            uni += u;
            gate += l.gate.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            n += real;
            batches += 1;
        }
        let n = n.max(1) as f64;
        Ok((ce / n, uni / n, gate / batches.max(1) as f64))
    }
}

impl TrainTask for EcholancerTask {
    type Batch = EcholancerBatch;

    fn vars(&self) -> Vec<(String, Var)> {
        melvae_layers::named_vars(&self.varmap)
    }

    fn train_batch(&mut self, _rng: &mut SplitMix64) -> Result<EcholancerBatch> {
        let idx = self
            .cursor
            .next_of(self.data.train.len(), self.seed, self.batch_size);
        // The whole batch (padded as one process pads it), then this rank's
        // rows.
        batch_of(&self.data.train, &idx, &self.device)?.shard(self.shard, self.batch_size)
    }

    /// Data-parallel: each rank keeps its rows of the whole padded batch;
    /// its cross-entropy and gate loss (both means over real token
    /// positions) are weighted by its share of the batch's real tokens, so
    /// the ranks together compute one process's loss. Dropout masks come
    /// from per-rank streams.
    fn set_shard(&mut self, shard: Shard) -> Result<()> {
        self.shard = shard.for_batch(self.batch_size)?;
        Ok(())
    }

    fn losses(&mut self, batch: &EcholancerBatch, ctx: StepContext) -> Result<Losses> {
        let seed = super::step_seed(self.seed, ctx.step, &self.cursor);
        let rng = DropoutRng::new(self.shard.seed(seed));
        let mode = super::gpt::mode_of(ctx, &rng);
        let l = self.model.loss(
            &batch.inputs,
            &batch.tokens,
            Some(&batch.mask),
            Some(self.loss.gate_pos_weight),
            mode,
        )?;
        // (1 for a whole batch: the loss is left as it was.)
        let (total, ce, gate) = if batch.weight == 1.0 {
            (l.total, l.ce, l.gate)
        } else {
            let w = batch.weight;
            ((l.total * w)?, (l.ce * w)?, (l.gate * w)?)
        };
        Ok(Losses {
            total,
            terms: BTreeMap::from([("ce".to_string(), ce), ("gate".to_string(), gate)]),
        })
    }

    /// `ce` (nats per held-out token: picks the best checkpoint),
    /// `perplexity`, `unigram_perplexity` (the baseline) and `gate`.
    fn validate(&mut self, _ctx: StepContext) -> Result<BTreeMap<String, f64>> {
        let set = if self.data.val.is_empty() {
            &self.data.train
        } else {
            &self.data.val
        };
        let (ce, uni, gate) = self.held_out(set)?;
        Ok(BTreeMap::from([
            ("ce".to_string(), ce),
            ("perplexity".to_string(), ce.exp()),
            ("unigram_perplexity".to_string(), uni.exp()),
            ("gate".to_string(), gate),
        ]))
    }

    fn best_metric(&self) -> &str {
        "ce"
    }

    /// Each test sentence for each test speaker (`echolancer_test`),
    /// generated with the KV cache until the gate fires (or `max_len`),
    /// cut to whole token rows, decoded by `training.sample_vqvae`:
    /// `step{N}_s{speaker}_{i}.png/.wav`. Nothing without a decoder.
    fn samples(&mut self, ctx: StepContext, dir: &Path) -> Result<Vec<PathBuf>> {
        let Some(decoder) = &self.decoder else {
            return Ok(Vec::new());
        };
        let tokenizer = self.model.config().tokenizer()?;
        let speakers = if self.test.test_speakers.is_empty() {
            vec![0]
        } else {
            self.test.test_speakers.clone()
        };
        let opts = super::sample_options(self.seed, ctx.step);
        let max_len = self.model.config().max_len;
        let cols = decoder.cols().max(1);
        let mut written = Vec::new();
        for (i, sentence) in self.test.test_sentences.iter().enumerate() {
            let (ids, _) = tokenizer.encode(sentence);
            if ids.is_empty() {
                continue;
            }
            for &s in &speakers {
                let inputs = EcholancerInputs {
                    text: Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?,
                    text_mask: None,
                    speakers: Tensor::new(&[s], &self.device)?,
                    emotion: None,
                };
                let g = self
                    .model
                    .generate(&inputs, max_len, self.test.gate_threshold, &opts)?;
                let mut tokens = g.tokens.into_iter().next().unwrap_or_default();
                tokens.truncate(tokens.len() / cols * cols);
                if tokens.is_empty() {
                    continue;
                }
                let t = Tensor::new(tokens.as_slice(), &self.device)?.unsqueeze(0)?;
                let stem = format!("step{:08}_s{s}_{i}", ctx.step);
                written.extend(decoder.write(&t, dir, &stem)?);
            }
        }
        Ok(written)
    }

    fn save_model_file(&self, path: &Path, metadata: &BTreeMap<String, String>) -> Result<bool> {
        let mut metadata = metadata.clone();
        if !self.data.speaker_names.is_empty() {
            metadata.insert(
                "speaker_names".into(),
                serde_json::to_string(&self.data.speaker_names).unwrap_or_default(),
            );
        }
        super::write_model_file::<Echolancer>(path, self.model.config(), &self.varmap, &metadata)
    }

    /// The data position, and the tokenizer and speaker names the run
    /// trains with (so that resume can check the data and `export` can
    /// write them).
    fn state(&self) -> serde_json::Value {
        let mut s = super::cursor_state(&self.cursor);
        s["symbols"] = self.model.config().symbols.clone().into();
        s["speaker_names"] = self.data.speaker_names.clone().into();
        s
    }

    /// Restores the data position; data whose tokenizer differs from the
    /// run's (a `symbols.json` rewritten since) is an error naming it.
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        if let Some(saved) = state.get("symbols") {
            let saved: Vec<String> = serde_json::from_value(saved.clone()).unwrap_or_default();
            if saved != self.model.config().symbols {
                return Err(Error::invalid(
                    "echolancer tokenizer",
                    format!(
                        "the run trained with the symbols {:?}, the data now has {:?} \
                         (was {} rewritten? resume with the data the run started on)",
                        saved.concat(),
                        self.model.config().symbols.concat(),
                        crate::tokens::SYMBOLS_FILE
                    ),
                ));
            }
        }
        super::load_cursor(&mut self.cursor, state);
        Ok(())
    }
}
