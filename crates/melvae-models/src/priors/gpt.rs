//! A class-conditional GPT over token sequences (the mel VQ-VAE's tokens).
//!
//! Layouts: tokens `[batch, len]` (u32, each below `vocab_size`), classes
//! `[batch]` (u32, each below `num_classes`). The input sequence is the
//! class embedding at position 0 followed by the embeddings of tokens
//! `0..len - 1`, so the output at position `i` predicts token `i` (logits
//! `[batch, len, vocab_size]`): the class is the prompt. Positions are
//! learned (`pos_emb`, `max_len` rows) or rotary, by config. Blocks are
//! pre-norm causal decoder layers (`blocks.{i}`: `norm1`, `self_attn` with
//! a fused `qkv`, `norm2`, `ffn`), then `norm` and the `head` linear.
//! Sampling keeps a KV cache per layer and feeds one token at a time; its
//! logits equal the full forward pass's at every step (tested).

use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Module, VarBuilder};
use melvae_dsp::SplitMix64;
use melvae_layers::Linear;
use melvae_layers::{
    AttentionConfig, BlockConfig, DecoderLayer, FeedForwardConfig, LayerNorm, Mode,
};
use serde::{Deserialize, Serialize};

use crate::error::ensure;
use crate::model_file::Family;
use crate::{Error, Result};

/// The target the loss ignores at padded positions (never a token).
const PAD_TARGET: u32 = u32::MAX;

/// How positions are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GptPositions {
    /// A learned embedding per position (`pos_emb`, `max_len` rows).
    #[default]
    Learned,
    /// Rotary embeddings in every self-attention (base 10000).
    Rotary,
}

/// Configuration of [`Gpt`] (the `gpt:` config section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    /// Token vocabulary (the VQ-VAE's codebook size).
    pub vocab_size: usize,
    /// Classes (1 for an unconditional model: one start embedding; 0 for
    /// a decoder whose first position comes from elsewhere, as the
    /// GPT-VAE's latent: then only the `_prompted` methods apply).
    pub num_classes: usize,
    /// Longest token sequence (the learned positions' rows).
    pub max_len: usize,
    /// Model width.
    pub dim: usize,
    /// Attention heads (divide `dim`).
    pub heads: usize,
    /// Decoder blocks.
    pub layers: usize,
    /// Positions, `learned` or `rotary`.
    #[serde(default)]
    pub positions: GptPositions,
    /// Dropout on residual branches and attention weights, in training.
    #[serde(default)]
    pub dropout: f64,
}

impl GptConfig {
    /// Checks every field; the error names the bad one.
    pub fn validate(&self) -> Result<()> {
        for (v, f) in [
            (self.vocab_size, "gpt.vocab_size"),
            (self.max_len, "gpt.max_len"),
            (self.dim, "gpt.dim"),
            (self.heads, "gpt.heads"),
            (self.layers, "gpt.layers"),
        ] {
            ensure(v > 0, f, || "must be > 0".into())?;
        }
        ensure(self.dim % self.heads == 0, "gpt.heads", || {
            format!("must divide gpt.dim {}, got {}", self.dim, self.heads)
        })?;
        if self.positions == GptPositions::Rotary {
            ensure((self.dim / self.heads) % 2 == 0, "gpt.positions", || {
                format!(
                    "rotary needs an even head size, got {}",
                    self.dim / self.heads
                )
            })?;
        }
        ensure((0.0..1.0).contains(&self.dropout), "gpt.dropout", || {
            format!("must be in [0, 1), got {}", self.dropout)
        })
    }

    fn block(&self) -> BlockConfig {
        BlockConfig {
            attention: AttentionConfig {
                causal: true,
                rotary_base: (self.positions == GptPositions::Rotary).then_some(10000.0),
                dropout: self.dropout,
                ..AttentionConfig::new(self.dim, self.heads)
            },
            ffn: FeedForwardConfig {
                dropout: self.dropout,
                ..FeedForwardConfig::new(self.dim)
            },
            dropout: self.dropout,
            norm_eps: 1e-5,
        }
    }
}

/// How [`Gpt::sample`] draws each token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingOptions {
    /// Logits are divided by this (> 0; 1 leaves them as they are).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability
    /// reaches `p` (nucleus sampling; `None` or 1: all).
    pub top_p: Option<f64>,
    /// Seed of the draws.
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

impl SamplingOptions {
    /// Checks the fields; the error names the bad one.
    pub fn validate(&self) -> Result<()> {
        ensure(
            self.temperature > 0.0 && self.temperature.is_finite(),
            "temperature",
            || format!("must be > 0, got {}", self.temperature),
        )?;
        ensure(self.top_k != Some(0), "top_k", || "must be >= 1".into())?;
        if let Some(p) = self.top_p {
            ensure(p > 0.0 && p <= 1.0, "top_p", || {
                format!("must be in (0, 1], got {p}")
            })?;
        }
        Ok(())
    }

    /// Draws one index from `logits` (one row, host side, in f64); logits
    /// that are not all finite (a diverged model) are an error.
    pub(crate) fn draw(&self, logits: &[f32], rng: &mut SplitMix64) -> Result<u32> {
        if logits.is_empty() || logits.iter().any(|l| !l.is_finite()) {
            return Err(Error::invalid(
                "gpt logits",
                "not all finite (a diverged model?): nothing to sample from",
            ));
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if let Some(k) = self.top_k {
            order.truncate(k.max(1));
        }
        let max = logits[order[0]] as f64;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] as f64 - max) / self.temperature).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if let Some(top_p) = self.top_p {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&p| {
                    acc += p;
                    acc >= top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let u = rng.next_f64();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if u < acc {
                return Ok(order[i] as u32);
            }
        }
        // Rounding left `acc` a hair below `u`: the last kept token.
        Ok(order[probs.len() - 1] as u32)
    }
}

/// The class-conditional GPT; see the module docs.
#[derive(Debug, Clone)]
pub struct Gpt {
    cfg: GptConfig,
    tok_emb: Embedding,
    class_emb: Option<Embedding>,
    pos_emb: Option<Tensor>,
    blocks: Vec<DecoderLayer>,
    norm: LayerNorm,
    head: Linear,
}

/// GPT-2's init: embeddings and linear weights from `N(0, 0.02)`.
fn normal(vb: &VarBuilder, shape: (usize, usize), name: &str) -> Result<Tensor> {
    Ok(vb.get_with_hints(
        shape,
        name,
        candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        },
    )?)
}

impl Gpt {
    /// Builds the model; fails on an invalid config, naming the field.
    pub fn new(cfg: GptConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.dim;
        let tok = normal(&vb.pp("tok_emb"), (cfg.vocab_size, d), "weight")?;
        let class = match cfg.num_classes {
            0 => None,
            n => Some(Embedding::new(
                normal(&vb.pp("class_emb"), (n, d), "weight")?,
                d,
            )),
        };
        let pos_emb = match cfg.positions {
            GptPositions::Learned => Some(normal(&vb.pp("pos_emb"), (cfg.max_len, d), "weight")?),
            GptPositions::Rotary => None,
        };
        let blocks = (0..cfg.layers)
            .map(|i| Ok(DecoderLayer::new(cfg.block(), None, vb.pp("blocks").pp(i))?))
            .collect::<Result<_>>()?;
        let head_w = normal(&vb.pp("head"), (cfg.vocab_size, d), "weight")?;
        let head_b =
            vb.pp("head")
                .get_with_hints(cfg.vocab_size, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self {
            tok_emb: Embedding::new(tok, d),
            class_emb: class,
            pos_emb,
            blocks,
            norm: LayerNorm::new(d, 1e-5, true, vb.pp("norm"))?,
            head: Linear::new(head_w, Some(head_b)),
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// Loads a `gpt` model file.
    pub fn load(path: &std::path::Path, device: &Device, dtype: DType) -> Result<Self> {
        Ok(crate::model_file::load::<Self>(path, device, dtype)?.0)
    }

    /// The class embeddings `[batch, 1, dim]` of `classes` (checked).
    fn class_start(&self, classes: &Tensor, batch: usize) -> Result<Tensor> {
        let classes = self.check_classes(classes, batch)?;
        match &self.class_emb {
            Some(e) => Ok(e.forward(&classes)?.unsqueeze(1)?),
            None => Err(Error::invalid(
                "gpt classes",
                "this decoder has no class embedding (gpt.num_classes 0): it takes a prompt",
            )),
        }
    }

    fn check_classes(&self, classes: &Tensor, batch: usize) -> Result<Tensor> {
        let bad = |got: String| Error::Shape {
            what: "gpt classes".into(),
            expected: format!("[{batch}] with ids below {}", self.cfg.num_classes),
            got,
        };
        if classes.dims() != [batch] {
            return Err(bad(format!("{:?}", classes.dims())));
        }
        let classes = classes.to_dtype(DType::U32)?;
        let max = classes.max_all()?.to_scalar::<u32>()? as usize;
        if max >= self.cfg.num_classes {
            return Err(bad(format!("class {max}")));
        }
        Ok(classes)
    }

    /// Embeddings of positions `offset..offset + n` added to `x` `[batch,
    /// n, dim]` (learned positions; rotary ones act in the attention).
    fn add_positions(&self, x: Tensor, offset: usize) -> Result<Tensor> {
        match &self.pos_emb {
            Some(p) => {
                let n = x.dim(1)?;
                if offset + n > self.cfg.max_len {
                    return Err(Error::invalid(
                        "gpt sequence",
                        format!(
                            "{} positions exceed gpt.max_len {}",
                            offset + n,
                            self.cfg.max_len
                        ),
                    ));
                }
                Ok(x.broadcast_add(&p.narrow(0, offset, n)?.unsqueeze(0)?)?)
            }
            None => Ok(x),
        }
    }

    /// Logits `[batch, len, vocab_size]` predicting each of `tokens`
    /// `[batch, len]` from the class (`classes` `[batch]`) and the tokens
    /// before it (teacher forcing).
    pub fn forward(&self, tokens: &Tensor, classes: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, _) = tokens.dims2().map_err(|_| Error::Shape {
            what: "gpt tokens".into(),
            expected: "[batch, len]".into(),
            got: format!("{:?}", tokens.dims()),
        })?;
        let start = self.class_start(classes, b)?;
        self.forward_prompted(tokens, &start, None, mode)
    }

    /// [`Gpt::forward`] with the first position's embedding given:
    /// `start` `[batch, 1, dim]`, and optionally `add` `[batch, 1, dim]`
    /// added to every position's input (the GPT-VAE's latent).
    pub fn forward_prompted(
        &self,
        tokens: &Tensor,
        start: &Tensor,
        add: Option<&Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, n) = tokens.dims2().map_err(|_| Error::Shape {
            what: "gpt tokens".into(),
            expected: "[batch, len]".into(),
            got: format!("{:?}", tokens.dims()),
        })?;
        ensure(n > 0, "gpt tokens", || "need at least one token".into())?;
        let tokens = tokens.to_dtype(DType::U32)?;
        let max = tokens.max_all()?.to_scalar::<u32>()? as usize;
        if max >= self.cfg.vocab_size {
            return Err(Error::Shape {
                what: "gpt tokens".into(),
                expected: format!("ids below gpt.vocab_size {}", self.cfg.vocab_size),
                got: format!("token {max}"),
            });
        }
        if start.dims() != [b, 1, self.cfg.dim] {
            return Err(Error::Shape {
                what: "gpt prompt".into(),
                expected: format!("[{b}, 1, {}]", self.cfg.dim),
                got: format!("{:?}", start.dims()),
            });
        }
        let x = if n > 1 {
            let prev = self.tok_emb.forward(&tokens.narrow(1, 0, n - 1)?)?;
            Tensor::cat(&[start, &prev], 1)?
        } else {
            start.clone()
        };
        let x = match add {
            Some(a) => x.broadcast_add(a)?,
            None => x,
        };
        let mut x = self.add_positions(x, 0)?;
        for block in &self.blocks {
            x = block.forward(&x, None, None, mode)?;
        }
        Ok(self.head.forward(&self.norm.forward(&x)?)?)
    }

    /// The training loss: cross-entropy of [`Gpt::forward`]'s logits
    /// against `tokens`, over the positions where `mask` (`[batch, len]`,
    /// any dtype, non-zero = real; `None`: all) is set, through
    /// `ignore_index` on the padding, with `label_smoothing` as
    /// `torch.nn.CrossEntropyLoss`. Padding positions may hold any valid
    /// token (0, say).
    pub fn loss(
        &self,
        tokens: &Tensor,
        classes: &Tensor,
        mask: Option<&Tensor>,
        label_smoothing: f64,
        mode: Mode,
    ) -> Result<Tensor> {
        let logits = self.forward(tokens, classes, mode)?;
        masked_cross_entropy(&logits, tokens, mask, label_smoothing)
    }
}

/// Cross-entropy of `logits` `[batch, len, vocab]` against `tokens`
/// `[batch, len]` over the positions where `mask` is set (see
/// [`Gpt::loss`]).
pub(crate) fn masked_cross_entropy(
    logits: &Tensor,
    tokens: &Tensor,
    mask: Option<&Tensor>,
    label_smoothing: f64,
) -> Result<Tensor> {
    let tokens = tokens.to_dtype(DType::U32)?;
    let targets = match mask {
        Some(m) => {
            if m.dims() != tokens.dims() {
                return Err(Error::Shape {
                    what: "gpt mask".into(),
                    expected: format!("{:?} (as the tokens)", tokens.dims()),
                    got: format!("{:?}", m.dims()),
                });
            }
            let ignore = Tensor::full(PAD_TARGET, tokens.shape(), tokens.device())?;
            m.ne(0u32)?.where_cond(&tokens, &ignore)?
        }
        None => tokens,
    };
    Ok(melvae_losses::cross_entropy(
        logits,
        &targets,
        Some(PAD_TARGET),
        label_smoothing,
    )?)
}

impl Gpt {
    /// Forgets every block's KV cache.
    pub fn clear_cache(&mut self) {
        self.blocks.iter_mut().for_each(DecoderLayer::clear_cache);
    }

    /// Logits `[batch, vocab_size]` of the next position after feeding `x`
    /// (`[batch, 1, dim]` embeddings at position `pos`) through the KV
    /// caches.
    fn step_cached(&mut self, x: Tensor, pos: usize) -> Result<Tensor> {
        let mut x = self.add_positions(x, pos)?;
        for block in &mut self.blocks {
            x = block.forward_cached(&x, None)?;
        }
        Ok(self.head.forward(&self.norm.forward(&x)?)?.squeeze(1)?)
    }

    /// Generates `len` tokens per class of `classes` (`[batch]`), one at a
    /// time with the KV cache: `[batch, len]` (u32). With `on_logits`, each
    /// step's logits `[batch, vocab_size]` (before temperature and
    /// filtering) are handed over too.
    pub fn sample_with(
        &mut self,
        classes: &Tensor,
        len: usize,
        opts: &SamplingOptions,
        mut on_logits: impl FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        let b = classes.dim(0).unwrap_or(0);
        let start = self.class_start(classes, b)?;
        self.sample_prompted(&start, None, len, opts, &mut on_logits)
    }

    /// [`Gpt::sample_with`] from a given first-position embedding `start`
    /// `[batch, 1, dim]` and optional `add` `[batch, 1, dim]` added to every
    /// position (the GPT-VAE's latent).
    pub fn sample_prompted(
        &mut self,
        start: &Tensor,
        add: Option<&Tensor>,
        len: usize,
        opts: &SamplingOptions,
        mut on_logits: impl FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        opts.validate()?;
        let b = start.dim(0).unwrap_or(0);
        if start.dims() != [b, 1, self.cfg.dim] {
            return Err(Error::Shape {
                what: "gpt prompt".into(),
                expected: format!("[batch, 1, {}]", self.cfg.dim),
                got: format!("{:?}", start.dims()),
            });
        }
        ensure(len > 0, "gpt sample length", || "must be > 0".into())?;
        if self.pos_emb.is_some() && len > self.cfg.max_len {
            return Err(Error::invalid(
                "gpt sample length",
                format!("{len} exceeds gpt.max_len {}", self.cfg.max_len),
            ));
        }
        self.clear_cache();
        let mut rng = SplitMix64::new(opts.seed);
        let mut out: Vec<Vec<u32>> = vec![Vec::with_capacity(len); b];
        let with_add = |x: Tensor| -> Result<Tensor> {
            Ok(match add {
                Some(a) => x.broadcast_add(a)?,
                None => x,
            })
        };
        let mut x = with_add(start.clone())?;
        for pos in 0..len {
            let logits = self.step_cached(x, pos)?.detach();
            on_logits(pos, &logits);
            let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
            let next: Vec<u32> = rows
                .iter()
                .map(|r| opts.draw(r, &mut rng))
                .collect::<Result<_>>()?;
            for (o, &t) in out.iter_mut().zip(&next) {
                o.push(t);
            }
            let ids = Tensor::new(next.as_slice(), start.device())?;
            x = with_add(self.tok_emb.forward(&ids)?.unsqueeze(1)?)?;
        }
        self.clear_cache();
        let flat: Vec<u32> = out.into_iter().flatten().collect();
        Ok(Tensor::from_vec(flat, (b, len), start.device())?)
    }

    /// [`Gpt::sample_with`] without the logits.
    pub fn sample(
        &mut self,
        classes: &Tensor,
        len: usize,
        opts: &SamplingOptions,
    ) -> Result<Tensor> {
        self.sample_with(classes, len, opts, |_, _| {})
    }
}

impl Family for Gpt {
    const NAME: &'static str = "gpt";
    type Config = GptConfig;

    fn build(cfg: GptConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(cfg, vb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;
    use melvae_layers::testing::{check_module, max_abs_diff};

    fn tiny(positions: GptPositions) -> GptConfig {
        GptConfig {
            vocab_size: 7,
            num_classes: 3,
            max_len: 12,
            dim: 8,
            heads: 2,
            layers: 2,
            positions,
            dropout: 0.0,
        }
    }

    fn build(cfg: GptConfig, dtype: DType) -> (VarMap, Gpt) {
        let vm = VarMap::new();
        let m = Gpt::new(cfg, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
        (vm, m)
    }

    /// Every step of KV-cached sampling sees the logits the full forward
    /// pass gives for the sampled prefix.
    #[test]
    fn cached_sampling_equals_uncached_logits() {
        for positions in [GptPositions::Learned, GptPositions::Rotary] {
            let (vm, mut m) = build(tiny(positions), DType::F32);
            melvae_layers::testing::randomize(&vm, 0.5, 3).unwrap();
            let classes = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
            let mut steps = Vec::new();
            let opts = SamplingOptions {
                top_k: Some(5),
                top_p: Some(0.9),
                temperature: 0.8,
                seed: 1,
            };
            let tokens = m
                .sample_with(&classes, 10, &opts, |_, l| steps.push(l.clone()))
                .unwrap();
            assert_eq!(tokens.dims(), &[2, 10]);
            let full = m.forward(&tokens, &classes, Mode::Eval).unwrap();
            for (pos, l) in steps.iter().enumerate() {
                let d =
                    max_abs_diff(&full.narrow(1, pos, 1).unwrap().squeeze(1).unwrap(), l).unwrap();
                assert!(d < 1e-5, "{positions:?} step {pos}: {d}");
            }
            // Same seed, same tokens; another seed, others.
            let again = m.sample(&classes, 10, &opts).unwrap();
            assert_eq!(
                again.to_vec2::<u32>().unwrap(),
                tokens.to_vec2::<u32>().unwrap()
            );
        }
    }

    #[test]
    fn the_class_changes_the_output() {
        let (vm, m) = build(tiny(GptPositions::Learned), DType::F32);
        melvae_layers::testing::randomize(&vm, 0.5, 4).unwrap();
        let tokens = Tensor::new(&[[1u32, 2, 3, 4], [1, 2, 3, 4]], &Device::Cpu).unwrap();
        let classes = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        let l = m.forward(&tokens, &classes, Mode::Eval).unwrap();
        let d = max_abs_diff(&l.get(0).unwrap(), &l.get(1).unwrap()).unwrap();
        assert!(d > 1e-3, "{d}");
    }

    #[test]
    fn top_k_and_top_p_restrict_the_draws() {
        let logits = [0.0f32, 5.0, 4.0, -1.0, 4.5];
        let mut rng = SplitMix64::new(0);
        let k1 = SamplingOptions {
            top_k: Some(1),
            ..Default::default()
        };
        assert!((0..50).all(|_| k1.draw(&logits, &mut rng).unwrap() == 1));
        let k2 = SamplingOptions {
            top_k: Some(2),
            ..Default::default()
        };
        assert!((0..200).all(|_| matches!(k2.draw(&logits, &mut rng).unwrap(), 1 | 4)));
        // p(1) ~ 0.50, p(4) ~ 0.30, p(2) ~ 0.18: top_p 0.6 keeps 1 and 4.
        let p = SamplingOptions {
            top_p: Some(0.6),
            ..Default::default()
        };
        let draws: Vec<u32> = (0..300)
            .map(|_| p.draw(&logits, &mut rng).unwrap())
            .collect();
        assert!(draws.iter().all(|&t| t == 1 || t == 4));
        assert!(draws.contains(&4) && draws.contains(&1));
        // A low temperature makes it (nearly) greedy.
        let cold = SamplingOptions {
            temperature: 0.01,
            ..Default::default()
        };
        assert!((0..50).all(|_| cold.draw(&logits, &mut rng).unwrap() == 1));
        // Even colder: no overflow (f64), still greedy; non-finite logits
        // are refused.
        let frozen = SamplingOptions {
            temperature: 1e-30,
            ..Default::default()
        };
        assert_eq!(frozen.draw(&logits, &mut rng).unwrap(), 1);
        let e = p.draw(&[0.0, f32::NAN], &mut rng).unwrap_err().to_string();
        assert!(e.contains("gpt logits"), "{e}");
    }

    /// Draws at temperature `t` follow `softmax(logits / t)`: frequencies
    /// of 40 000 seeded draws within 0.01 of the probabilities, for a
    /// sharpening and a flattening temperature.
    #[test]
    fn temperature_scales_the_logits() {
        let logits = [1.0f32, 0.0, -1.0, 0.5];
        let mut rng = SplitMix64::new(7);
        for t in [0.5f64, 2.0] {
            let opts = SamplingOptions {
                temperature: t,
                ..Default::default()
            };
            let e: Vec<f64> = logits.iter().map(|&l| (l as f64 / t).exp()).collect();
            let z: f64 = e.iter().sum();
            let mut counts = [0usize; 4];
            let n = 40_000;
            for _ in 0..n {
                counts[opts.draw(&logits, &mut rng).unwrap() as usize] += 1;
            }
            for (c, e) in counts.iter().zip(&e) {
                let (got, want) = (*c as f64 / n as f64, e / z);
                assert!((got - want).abs() < 0.01, "t {t}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (vm, m) = build(tiny(GptPositions::Rotary), DType::F64);
        let tokens = Tensor::new(&[[1u32, 6, 3], [0, 2, 5]], &Device::Cpu).unwrap();
        let classes = Tensor::new(&[2u32, 1], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1], [1, 1, 0]], &Device::Cpu).unwrap();
        check_module(&vm, 0.3, 5, &[], || {
            m.loss(&tokens, &classes, Some(&mask), 0.1, Mode::Eval)
                .map_err(|e| melvae_layers::Error::Invalid {
                    what: "gpt".into(),
                    reason: e.to_string(),
                })
        })
        .unwrap();
    }

    #[test]
    fn bad_input_names_the_culprit() {
        let (_, mut m) = build(tiny(GptPositions::Learned), DType::F32);
        let c = Tensor::new(&[0u32], &Device::Cpu).unwrap();
        let e = m
            .forward(
                &Tensor::new(&[[7u32]], &Device::Cpu).unwrap(),
                &c,
                Mode::Eval,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpt tokens") && e.contains("token 7"), "{e}");
        let e = m
            .forward(
                &Tensor::new(&[[1u32]], &Device::Cpu).unwrap(),
                &Tensor::new(&[3u32], &Device::Cpu).unwrap(),
                Mode::Eval,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpt classes") && e.contains("class 3"), "{e}");
        let e = m
            .sample(&c, 13, &SamplingOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpt.max_len"), "{e}");
        let bad = SamplingOptions {
            top_p: Some(1.5),
            ..Default::default()
        };
        let e = m.sample(&c, 2, &bad).unwrap_err().to_string();
        assert!(e.contains("top_p"), "{e}");
        let e = GptConfig {
            heads: 3,
            ..tiny(GptPositions::Learned)
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("gpt.heads"), "{e}");
    }
}
