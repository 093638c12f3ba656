//! The LSTM prior of one level of the hierarchical waveform VQ-VAE (the
//! seed's VQWave generators): a stacked LSTM over code embeddings predicting
//! the next code, conditioned (except at the coarsest level) on the next
//! coarser level's codes through a context model.
//!
//! Layouts: codes `[batch, len]` (u32 below `vocab_size`); context codes
//! `[batch, len / upsample]` (u32 below `context.vocab_size`), the coarser
//! level's codes of the same audio (its hop is `upsample` times this
//! level's). Logits `[batch, len, vocab_size]`: position `t` predicts code
//! `t` from codes `0..t` (the first input is a learned begin embedding) and
//! the context.
//!
//! Parameters: `embed` `[vocab_size + 1, embed_dim]` (the last row begins),
//! `lstm.*` (torch's `nn.LSTM` names), `head` (`hidden` to `vocab_size`);
//! with a context: `context.embed` `[context.vocab_size, context.embed_dim]`,
//! `context.input` (a conv to `context.channels`), `context.layers.{i}`
//! (dilated convs, "same" padding: the coarse codes are all known before
//! this level is sampled, so the context sees both sides), `context.out`
//! (1x1, to `embed_dim` when added, to `context.channels` when
//! concatenated), then repeated `upsample` times per coarse frame.
//! Sampling carries the LSTM state from step to step: constant work per
//! code, the prefix never re-run.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Embedding, Module, VarBuilder};
use melvae_dsp::SplitMix64;
use melvae_layers::Linear;
use melvae_layers::{Conv1d, Conv1dConfig, ConvPadding, LstmStack};
use serde::{Deserialize, Serialize};

use crate::error::ensure;
use crate::model_file::Family;
use crate::priors::gpt::SamplingOptions;
use crate::{Error, Result};

/// How the context enters the LSTM's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ContextCombine {
    /// Added to the code embedding (the context model ends at `embed_dim`).
    #[default]
    Add,
    /// Concatenated with it (the LSTM input is `embed_dim +
    /// context.channels`).
    Concat,
}

/// The context model's settings (`lstm_prior.context:`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextConfig {
    /// The coarser level's codebook size.
    pub vocab_size: usize,
    /// Its code embedding size.
    pub embed_dim: usize,
    /// Width of the dilated convs.
    pub channels: usize,
    /// Dilation of each conv layer.
    pub dilations: Vec<usize>,
    /// Kernel of the convs.
    #[serde(default = "three")]
    pub kernel_size: usize,
    /// This level's codes per coarse code (the ratio of the two hops).
    pub upsample: usize,
    /// `add` or `concat`.
    #[serde(default)]
    pub combine: ContextCombine,
}

fn three() -> usize {
    3
}

/// Configuration of [`LstmPrior`] (the `lstm_prior:` config section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LstmPriorConfig {
    /// This level's codebook size.
    pub vocab_size: usize,
    /// Code embedding size (the seed: 32).
    pub embed_dim: usize,
    /// LSTM units (the seed: 1024).
    pub hidden: usize,
    /// LSTM layers (the seed: 2).
    pub layers: usize,
    /// The coarser level's codes as context (none at the coarsest level).
    #[serde(default)]
    pub context: Option<ContextConfig>,
}

impl LstmPriorConfig {
    /// Checks every field; the error names the bad one.
    pub fn validate(&self) -> Result<()> {
        for (v, f) in [
            (self.vocab_size, "lstm_prior.vocab_size"),
            (self.embed_dim, "lstm_prior.embed_dim"),
            (self.hidden, "lstm_prior.hidden"),
            (self.layers, "lstm_prior.layers"),
        ] {
            ensure(v > 0, f, || "must be > 0".into())?;
        }
        if let Some(c) = &self.context {
            for (v, f) in [
                (c.vocab_size, "lstm_prior.context.vocab_size"),
                (c.embed_dim, "lstm_prior.context.embed_dim"),
                (c.channels, "lstm_prior.context.channels"),
                (c.kernel_size, "lstm_prior.context.kernel_size"),
                (c.upsample, "lstm_prior.context.upsample"),
            ] {
                ensure(v > 0, f, || "must be > 0".into())?;
            }
            ensure(
                c.dilations.iter().all(|&d| d > 0),
                "lstm_prior.context.dilations",
                || format!("must all be > 0, got {:?}", c.dilations),
            )?;
        }
        Ok(())
    }

    fn lstm_input(&self) -> usize {
        match &self.context {
            Some(c) if c.combine == ContextCombine::Concat => self.embed_dim + c.channels,
            _ => self.embed_dim,
        }
    }
}

/// `vb.pp("embed")`: an embedding of `rows` x `dim`, initialised from
/// `N(0, 1)` as torch's `nn.Embedding`.
fn embedding(vb: &VarBuilder, rows: usize, dim: usize) -> Result<Embedding> {
    let w = vb.pp("embed").get_with_hints(
        (rows, dim),
        "weight",
        candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        },
    )?;
    Ok(Embedding::new(w, dim))
}

/// The context model: coarse codes to per-fine-step features.
#[derive(Debug, Clone)]
struct ContextModel {
    cfg: ContextConfig,
    embed: Embedding,
    input: Conv1d,
    layers: Vec<Conv1d>,
    out: Conv1d,
}

impl ContextModel {
    fn new(cfg: ContextConfig, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let conv = |i, o, k, d| Conv1dConfig {
            dilation: d,
            padding: ConvPadding::Same,
            ..Conv1dConfig::causal(i, o, k)
        };
        let layers = cfg
            .dilations
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                Ok(Conv1d::new(
                    conv(cfg.channels, cfg.channels, cfg.kernel_size, d),
                    vb.pp("layers").pp(i),
                )?)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            embed: embedding(&vb, cfg.vocab_size, cfg.embed_dim)?,
            input: Conv1d::new(
                conv(cfg.embed_dim, cfg.channels, cfg.kernel_size, 1),
                vb.pp("input"),
            )?,
            layers,
            out: Conv1d::new(conv(cfg.channels, out_dim, 1, 1), vb.pp("out"))?,
            cfg,
        })
    }

    /// Coarse codes `[batch, n]` to features `[batch, n * upsample, out]`.
    fn forward(&self, codes: &Tensor) -> Result<Tensor> {
        let e = self.embed.forward(codes)?.transpose(1, 2)?.contiguous()?;
        let mut h = self.input.forward(&e)?;
        for l in &self.layers {
            // Residual dilated convs with ReLU (WaveNet-style context).
            h = (&h + l.forward(&h.relu()?)?)?;
        }
        let h = self.out.forward(&h.relu()?)?; // [b, out, n]
        let (b, c, n) = h.dims3()?;
        let r = self.cfg.upsample;
        Ok(h.unsqueeze(3)?
            .broadcast_as((b, c, n, r))?
            .reshape((b, c, n * r))?
            .transpose(1, 2)?
            .contiguous()?)
    }
}

/// The LSTM prior; see the module docs.
#[derive(Debug, Clone)]
pub struct LstmPrior {
    cfg: LstmPriorConfig,
    embed: Embedding,
    context: Option<ContextModel>,
    lstm: LstmStack,
    head: Linear,
}

impl LstmPrior {
    /// Builds the model; fails on an invalid config, naming the field.
    pub fn new(cfg: LstmPriorConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let context = match &cfg.context {
            Some(c) => {
                let out = match c.combine {
                    ContextCombine::Add => cfg.embed_dim,
                    ContextCombine::Concat => c.channels,
                };
                Some(ContextModel::new(c.clone(), out, vb.pp("context"))?)
            }
            None => None,
        };
        Ok(Self {
            embed: embedding(&vb, cfg.vocab_size + 1, cfg.embed_dim)?,
            context,
            lstm: LstmStack::new(cfg.lstm_input(), cfg.hidden, cfg.layers, vb.pp("lstm"))?,
            head: melvae_layers::linear(cfg.hidden, cfg.vocab_size, vb.pp("head"))?,
            cfg,
        })
    }

    /// Loads an `lstm_prior` model file.
    pub fn load(path: &std::path::Path, device: &Device, dtype: DType) -> Result<Self> {
        Ok(crate::model_file::load::<Self>(path, device, dtype)?.0)
    }

    /// The configuration.
    pub fn config(&self) -> &LstmPriorConfig {
        &self.cfg
    }

    fn check_codes(&self, t: &Tensor, what: &str, limit: usize) -> Result<(usize, usize)> {
        let bad = |got: String| Error::Shape {
            what: format!("lstm_prior {what}"),
            expected: format!("[batch, len] with codes below {limit}"),
            got,
        };
        let (b, n) = t.dims2().map_err(|_| bad(format!("{:?}", t.dims())))?;
        if n == 0 {
            return Err(bad(format!("{:?}", t.dims())));
        }
        let max = t.to_dtype(DType::U32)?.max_all()?.to_scalar::<u32>()? as usize;
        if max >= limit {
            return Err(bad(format!("a code {max}")));
        }
        Ok((b, n))
    }

    /// The context features `[batch, len, ...]` for `len` codes of this
    /// level from the coarse codes (`None` at the coarsest level).
    fn context_features(
        &self,
        context: Option<&Tensor>,
        batch: usize,
        len: usize,
    ) -> Result<Option<Tensor>> {
        match (&self.context, context) {
            (None, None) => Ok(None),
            (Some(m), Some(c)) => {
                let (b, n) = self.check_codes(c, "context", m.cfg.vocab_size)?;
                let r = m.cfg.upsample;
                if b != batch || n * r < len {
                    return Err(Error::Shape {
                        what: "lstm_prior context".into(),
                        expected: format!(
                            "[{batch}, >= {}] (one coarse code per {r} codes)",
                            len.div_ceil(r)
                        ),
                        got: format!("{:?}", c.dims()),
                    });
                }
                Ok(Some(
                    m.forward(&c.to_dtype(DType::U32)?)?.narrow(1, 0, len)?,
                ))
            }
            (Some(_), None) => Err(Error::invalid(
                "lstm_prior context",
                "this prior is conditioned on the coarser level's codes: pass them",
            )),
            (None, Some(_)) => Err(Error::invalid(
                "lstm_prior context",
                "this prior (the coarsest level) takes no context",
            )),
        }
    }

    fn combine(&self, x: Tensor, ctx: Option<&Tensor>) -> Result<Tensor> {
        Ok(match (ctx, self.cfg.context.as_ref().map(|c| c.combine)) {
            (Some(c), Some(ContextCombine::Concat)) => Tensor::cat(&[&x, c], D::Minus1)?,
            (Some(c), _) => (x + c)?,
            (None, _) => x,
        })
    }

    /// Teacher forcing: logits `[batch, len, vocab_size]` for `codes`
    /// `[batch, len]` with the coarse `context` codes (see the module docs).
    pub fn forward(&self, codes: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let (b, n) = self.check_codes(codes, "codes", self.cfg.vocab_size)?;
        let codes = codes.to_dtype(DType::U32)?;
        let begin = Tensor::full(self.cfg.vocab_size as u32, (b, 1), codes.device())?;
        let input = Tensor::cat(&[&begin, &codes.narrow(1, 0, n - 1)?], 1)?;
        let ctx = self.context_features(context, b, n)?;
        let x = self.combine(self.embed.forward(&input)?, ctx.as_ref())?;
        let (h, _) = self.lstm.forward(&x, None)?;
        Ok(self.head.forward(&h)?)
    }

    /// Sparse categorical cross-entropy of [`LstmPrior::forward`]'s logits
    /// against `codes` (nats per code).
    pub fn loss(&self, codes: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let logits = self.forward(codes, context)?;
        Ok(melvae_losses::cross_entropy(
            &logits,
            &codes.to_dtype(DType::U32)?,
            None,
            0.0,
        )?)
    }

    /// Coarse frames on each side of a coarse frame that its context
    /// features read (the "same"-padded convs' reach; 0 without a context).
    pub fn context_radius(&self) -> usize {
        self.context.as_ref().map_or(0, |m| {
            let reach = |d: usize| ((m.cfg.kernel_size - 1) * d).div_ceil(2);
            reach(1) + m.cfg.dilations.iter().map(|&d| reach(d)).sum::<usize>()
        })
    }

    /// The context features `[batch, count * upsample, ...]` of coarse
    /// frames `first..first + count` of a coarse sequence of `total` frames,
    /// from `known` `[batch, n]`: the coarse codes of `n` frames from
    /// `offset`, which must cover `first - context_radius()` (or 0) to
    /// `min(total, first + count + context_radius())`. The same rows as the
    /// whole sequence's features, up to rounding (the convs read no
    /// further; bit-equal on the CPU where the products' blocking agrees,
    /// as for the bundled configs), so a finer level can be sampled while
    /// the coarser one still is.
    pub fn context_block(
        &self,
        known: &Tensor,
        offset: usize,
        total: usize,
        first: usize,
        count: usize,
    ) -> Result<Tensor> {
        let m = self
            .context
            .as_ref()
            .ok_or_else(|| Error::invalid("lstm_prior context", "this prior takes no context"))?;
        let (_, n) = self.check_codes(known, "context", m.cfg.vocab_size)?;
        let r = self.context_radius();
        let (start, end) = (first.saturating_sub(r), (first + count + r).min(total));
        if count == 0 || first + count > total || offset > start || offset + n < end {
            return Err(Error::Shape {
                what: "lstm_prior context block".into(),
                expected: format!(
                    "coarse frames {first}..{} of {total}, codes of frames {start}..{end}",
                    first + count
                ),
                got: format!("codes of frames {offset}..{}", offset + n),
            });
        }
        let window = known.narrow(1, start - offset, end - start)?;
        let f = m.forward(&window.to_dtype(DType::U32)?)?;
        let u = m.cfg.upsample;
        Ok(f.narrow(1, (first - start) * u, count * u)?)
    }

    /// A stepwise sampler for `batch` examples (see
    /// [`LstmPrior::sample_step`]).
    pub(crate) fn sampler(&self, batch: usize, opts: &SamplingOptions) -> Result<PriorSampler> {
        opts.validate()?;
        ensure(batch > 0, "lstm_prior sample batch", || {
            "must be > 0".into()
        })?;
        Ok(PriorSampler {
            state: self.lstm.zero_state(batch)?,
            rng: SplitMix64::new(opts.seed),
            next: vec![self.cfg.vocab_size as u32; batch],
            opts: *opts,
        })
    }

    /// Draws the next code of every example: `ctx` is this step's context
    /// features `[batch, 1, ...]` (a row of [`LstmPrior::context_block`]
    /// or of the whole sequence's). Returns the step's logits `[batch,
    /// vocab_size]`; the codes drawn are `s.next`. The carried state holds
    /// no autograd graph (a prior built from trainable weights would
    /// otherwise grow one per code).
    pub(crate) fn sample_step(&self, s: &mut PriorSampler, ctx: Option<&Tensor>) -> Result<Tensor> {
        let ids = Tensor::new(s.next.as_slice(), self.embed.embeddings().device())?;
        let x = self.combine(self.embed.forward(&ids)?.unsqueeze(1)?, ctx)?;
        let (h, state) = self.lstm.step(&x.squeeze(1)?, &s.state)?;
        s.state = state
            .into_iter()
            .map(|s| candle_nn::rnn::LSTMState::new(s.h.detach(), s.c.detach()))
            .collect();
        let logits = self.head.forward(&h)?.detach();
        let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        for (next, r) in s.next.iter_mut().zip(&rows) {
            *next = s.opts.draw(r, &mut s.rng)?;
        }
        Ok(logits)
    }

    /// Samples `len` codes per example (`batch` examples; the context's
    /// batch when there is one) one at a time, the LSTM state carried from
    /// step to step; `on_step` sees each step's logits `[batch,
    /// vocab_size]` and the codes drawn. `[batch, len]` (u32).
    pub fn sample_with(
        &self,
        batch: usize,
        len: usize,
        context: Option<&Tensor>,
        opts: &SamplingOptions,
        device: &Device,
        mut on_step: impl FnMut(usize, &Tensor, &[u32]) -> Result<()>,
    ) -> Result<Tensor> {
        ensure(len > 0, "lstm_prior sample length", || "must be > 0".into())?;
        let mut s = self.sampler(batch, opts)?;
        let ctx = self.context_features(context, batch, len)?;
        let mut out: Vec<Vec<u32>> = vec![Vec::with_capacity(len); batch];
        for t in 0..len {
            let row = ctx.as_ref().map(|c| c.narrow(1, t, 1)).transpose()?;
            let logits = self.sample_step(&mut s, row.as_ref())?;
            for (o, &c) in out.iter_mut().zip(&s.next) {
                o.push(c);
            }
            on_step(t, &logits, &s.next)?;
        }
        let flat: Vec<u32> = out.into_iter().flatten().collect();
        Ok(Tensor::from_vec(flat, (batch, len), device)?)
    }

    /// [`LstmPrior::sample_with`] without the callback.
    pub fn sample(
        &self,
        batch: usize,
        len: usize,
        context: Option<&Tensor>,
        opts: &SamplingOptions,
        device: &Device,
    ) -> Result<Tensor> {
        self.sample_with(batch, len, context, opts, device, |_, _, _| Ok(()))
    }
}

/// The state [`LstmPrior::sample_step`] carries: the LSTM state, the
/// draws' generator and the codes just drawn.
#[derive(Debug)]
pub(crate) struct PriorSampler {
    state: Vec<candle_nn::rnn::LSTMState>,
    rng: SplitMix64,
    /// The codes drawn at the last step, one per example (the begin code
    /// before the first).
    pub(crate) next: Vec<u32>,
    opts: SamplingOptions,
}

impl Family for LstmPrior {
    const NAME: &'static str = "lstm_prior";
    type Config = LstmPriorConfig;

    fn build(cfg: LstmPriorConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(cfg, vb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;
    use melvae_layers::testing::{check_module, max_abs_diff, randomize};

    fn tiny(combine: Option<ContextCombine>) -> LstmPriorConfig {
        LstmPriorConfig {
            vocab_size: 7,
            embed_dim: 4,
            hidden: 6,
            layers: 2,
            context: combine.map(|combine| ContextConfig {
                vocab_size: 5,
                embed_dim: 3,
                channels: 4,
                dilations: vec![1, 2],
                kernel_size: 3,
                upsample: 4,
                combine,
            }),
        }
    }

    fn build(cfg: LstmPriorConfig, dtype: DType, seed: u64) -> (VarMap, LstmPrior) {
        let vm = VarMap::new();
        let m = LstmPrior::new(cfg, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
        randomize(&vm, 0.5, seed).unwrap();
        (vm, m)
    }

    fn dev() -> Device {
        Device::Cpu
    }

    /// Every sampling step's logits equal teacher forcing's on the sampled
    /// prefix (no context, added and concatenated context); a fixed seed
    /// reproduces the codes.
    #[test]
    fn stepwise_sampling_equals_teacher_forcing() {
        for combine in [
            None,
            Some(ContextCombine::Add),
            Some(ContextCombine::Concat),
        ] {
            let (_, m) = build(tiny(combine), DType::F32, 1);
            let ctx = combine.map(|_| Tensor::new(&[[1u32, 4, 0], [2, 2, 3]], &dev()).unwrap());
            let mut steps = Vec::new();
            let opts = SamplingOptions {
                temperature: 0.9,
                seed: 3,
                ..Default::default()
            };
            let codes = m
                .sample_with(2, 12, ctx.as_ref(), &opts, &dev(), |_, l, _| {
                    steps.push(l.clone());
                    Ok(())
                })
                .unwrap();
            assert_eq!(codes.dims(), &[2, 12]);
            let full = m.forward(&codes, ctx.as_ref()).unwrap();
            for (t, l) in steps.iter().enumerate() {
                let d =
                    max_abs_diff(&full.narrow(1, t, 1).unwrap().squeeze(1).unwrap(), l).unwrap();
                assert!(d < 1e-5, "{combine:?} step {t}: {d}");
            }
            let again = m.sample(2, 12, ctx.as_ref(), &opts, &dev()).unwrap();
            assert_eq!(
                again.to_vec2::<u32>().unwrap(),
                codes.to_vec2::<u32>().unwrap()
            );
        }
    }

    /// Greedy (top-k 1) takes the argmax at every step.
    #[test]
    fn greedy_is_argmax() {
        let (_, m) = build(tiny(None), DType::F32, 2);
        let opts = SamplingOptions {
            top_k: Some(1),
            ..Default::default()
        };
        let mut ok = true;
        m.sample_with(1, 10, None, &opts, &dev(), |_, l, drawn| {
            let v: Vec<f32> = l.squeeze(0)?.to_vec1()?;
            let arg = v
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32)
                .unwrap_or(0);
            ok &= drawn[0] == arg;
            Ok(())
        })
        .unwrap();
        assert!(ok);
    }

    #[test]
    fn the_context_changes_the_output() {
        let (_, m) = build(tiny(Some(ContextCombine::Add)), DType::F32, 3);
        let codes = Tensor::new(&[[1u32, 2, 3, 4, 5, 6, 0, 1]], &dev()).unwrap();
        let a = m
            .forward(&codes, Some(&Tensor::new(&[[0u32, 1]], &dev()).unwrap()))
            .unwrap();
        let b = m
            .forward(&codes, Some(&Tensor::new(&[[3u32, 1]], &dev()).unwrap()))
            .unwrap();
        // The first coarse code covers codes 0..4 only.
        let d = max_abs_diff(&a.narrow(1, 0, 4).unwrap(), &b.narrow(1, 0, 4).unwrap()).unwrap();
        assert!(d > 1e-4, "{d}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        for combine in [
            None,
            Some(ContextCombine::Add),
            Some(ContextCombine::Concat),
        ] {
            let vm = VarMap::new();
            let m = LstmPrior::new(
                tiny(combine),
                VarBuilder::from_varmap(&vm, DType::F64, &dev()),
            )
            .unwrap();
            let codes = Tensor::new(&[[1u32, 2, 3, 4, 5, 6, 0, 1]], &dev()).unwrap();
            let ctx = combine.map(|_| Tensor::new(&[[0u32, 4]], &dev()).unwrap());
            check_module(&vm, 0.5, 5, &[], || {
                m.loss(&codes, ctx.as_ref())
                    .map_err(|e| melvae_layers::Error::Invalid {
                        what: "lstm_prior".into(),
                        reason: e.to_string(),
                    })
            })
            .unwrap_or_else(|e| panic!("{combine:?}: {e}"));
        }
    }

    #[test]
    fn bad_inputs_name_the_culprit() {
        let (_, m) = build(tiny(Some(ContextCombine::Add)), DType::F32, 6);
        let codes = Tensor::new(&[[1u32, 2, 3, 4, 5]], &dev()).unwrap();
        let e = m.forward(&codes, None).unwrap_err().to_string();
        assert!(e.contains("lstm_prior context"), "{e}");
        let short = Tensor::new(&[[1u32]], &dev()).unwrap();
        let e = m.forward(&codes, Some(&short)).unwrap_err().to_string();
        assert!(
            e.contains("lstm_prior context") && e.contains(">= 2"),
            "{e}"
        );
        let e = m
            .forward(&Tensor::new(&[[1u32, 7]], &dev()).unwrap(), Some(&short))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lstm_prior codes") && e.contains("a code 7"),
            "{e}"
        );
        let (_, top) = build(tiny(None), DType::F32, 7);
        let e = top.forward(&codes, Some(&short)).unwrap_err().to_string();
        assert!(e.contains("takes no context"), "{e}");
        let mut cfg = tiny(Some(ContextCombine::Add));
        if let Some(c) = cfg.context.as_mut() {
            c.upsample = 0;
        }
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("lstm_prior.context.upsample"), "{e}");
    }
}
