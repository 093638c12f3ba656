//! Echolancer: a transformer text-to-speech model over spectrogram tokens
//! (the mel VQ-VAE's), with a character tokenizer, speaker and emotion
//! conditioning, ALiBi or rotary positions, and a stop gate.
//!
//! Layouts: text ids `[batch, text_len]` (u32, [`CharTokenizer`] ids below
//! `vocab_size`; 0 is padding) with a text mask `[batch, text_len]`
//! (non-zero = real); speakers `[batch]` (u32 below `n_speakers`); an
//! optional emotion `[batch, emotion_channels]` with a per-example
//! presence mask `[batch]`; spectrogram tokens `[batch, len]` (u32 below
//! `mel_vocab_size`, the VQ-VAE's raster order) with a token mask `[batch,
//! len]`.
//!
//! Text encoder (`encoder.*`): `text_emb` `[vocab_size, encoder_dim]`,
//! `encoder_layers` pre-norm transformer layers (`layers.{i}`: fused `qkv`
//! self-attention over the real text positions with ALiBi or rotary
//! positions, a feed-forward that zeroes padded positions), a final `norm`.
//! The condition — `speaker_emb` `[n_speakers, speaker_channels]` through
//! `speaker_proj`, plus `emotion_proj` (no bias, so an absent emotion adds
//! nothing) of the emotion vector — is added to every encoder output, so
//! every cross-attention read carries it.
//!
//! Decoder (`decoder.*`): `token_emb` `[mel_vocab_size + 1, decoder_dim]`
//! (the last row is the begin token), `decoder_layers` pre-norm layers
//! (`layers.{i}`: causal fused-`qkv` self-attention with ALiBi or rotary,
//! cross-attention to the encoder output with separate `q`/`kv`
//! projections under the text mask, feed-forward), a final `norm`, then
//! `token_head` (logits `[batch, len, mel_vocab_size]`) and `gate_head`
//! (stop logits `[batch, len]`: position `i`'s gate says token `i` is the
//! last). Teacher forcing feeds `[begin, tokens[..len - 1]]`.
//!
//! Generation keeps every decoder layer's KV cache (one position of work
//! per token) and stops an example when its gate's probability passes the
//! threshold (the token that fired is kept) or at the length limit.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Embedding, Module, VarBuilder};
use melvae_dsp::SplitMix64;
use melvae_layers::Linear;
use melvae_layers::{
    AttentionConfig, BlockConfig, DecoderLayer, EncoderLayer, FeedForwardConfig, FfnActivation,
    LayerNorm, Mode,
};
use serde::{Deserialize, Serialize};

use crate::error::ensure;
use crate::model_file::Family;
use crate::priors::gpt::SamplingOptions;
use crate::{Error, Result};

/// Padding id of [`CharTokenizer`].
pub const PAD_ID: u32 = 0;
/// Id of characters outside the vocabulary.
pub const UNK_ID: u32 = 1;
/// Ids below this are reserved (padding, unknown).
pub const FIRST_SYMBOL: u32 = 2;

/// A character tokenizer: id 0 pads, id 1 stands for characters outside
/// the vocabulary, the symbols follow from id 2 in the order given.
#[derive(Debug, Clone, PartialEq)]
pub struct CharTokenizer {
    symbols: Vec<char>,
    index: HashMap<char, u32>,
}

/// What [`CharTokenizer::encode`] could not map: each unknown character
/// and how often it occurred.
pub type UnknownChars = BTreeMap<char, usize>;

impl CharTokenizer {
    /// A tokenizer of `symbols` (each a single character, no repeats): an
    /// error names the offending entry.
    pub fn new(symbols: &[String]) -> Result<Self> {
        let mut chars = Vec::with_capacity(symbols.len());
        let mut index = HashMap::new();
        for (i, s) in symbols.iter().enumerate() {
            let mut it = s.chars();
            let (Some(c), None) = (it.next(), it.next()) else {
                return Err(Error::invalid(
                    format!("echolancer.symbols[{i}]"),
                    format!("{s:?} is not a single character"),
                ));
            };
            if index.insert(c, FIRST_SYMBOL + i as u32).is_some() {
                return Err(Error::invalid(
                    format!("echolancer.symbols[{i}]"),
                    format!("{c:?} is listed twice"),
                ));
            }
            chars.push(c);
        }
        Ok(Self {
            symbols: chars,
            index,
        })
    }

    /// The sorted set of characters of `texts`, as a tokenizer.
    pub fn from_corpus<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        let set: BTreeSet<char> = texts.into_iter().flat_map(str::chars).collect();
        let symbols: Vec<String> = set.into_iter().map(String::from).collect();
        // Unique single characters by construction.
        Self::new(&symbols).unwrap_or_else(|_| Self {
            symbols: Vec::new(),
            index: HashMap::new(),
        })
    }

    /// The symbols, in id order from [`FIRST_SYMBOL`].
    pub fn symbols(&self) -> Vec<String> {
        self.symbols.iter().map(|c| c.to_string()).collect()
    }

    /// Ids in use: the symbols plus padding and unknown.
    pub fn vocab_size(&self) -> usize {
        self.symbols.len() + FIRST_SYMBOL as usize
    }

    /// The ids of `text`, and the characters that mapped to [`UNK_ID`].
    pub fn encode(&self, text: &str) -> (Vec<u32>, UnknownChars) {
        let mut unknown = UnknownChars::new();
        let ids = text
            .chars()
            .map(|c| match self.index.get(&c) {
                Some(&id) => id,
                None => {
                    *unknown.entry(c).or_default() += 1;
                    UNK_ID
                }
            })
            .collect();
        (ids, unknown)
    }

    /// The text of `ids`: padding dropped, unknown as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .filter(|&&id| id != PAD_ID)
            .map(|&id| {
                id.checked_sub(FIRST_SYMBOL)
                    .and_then(|i| self.symbols.get(i as usize))
                    .copied()
                    .unwrap_or('\u{FFFD}')
            })
            .collect()
    }
}

/// The feed-forward nonlinearity (`activation:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EcholancerActivation {
    /// `max(x, 0)` (the seed's default).
    #[default]
    Relu,
    /// Exact GELU.
    Gelu,
}

/// Configuration of [`Echolancer`] (the `echolancer:` config section), the
/// seed's `model.yaml` keys where they apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EcholancerConfig {
    /// Text ids (the tokenizer's symbols plus padding and unknown).
    pub vocab_size: usize,
    /// The tokenizer's symbols (single characters, id 2 onwards); empty
    /// for data that is already ids (the seed's `.pt` files).
    #[serde(default)]
    pub symbols: Vec<String>,
    /// Spectrogram-token vocabulary: the mel VQ-VAE's `codebook_size`.
    pub mel_vocab_size: usize,
    /// Speakers (1: single speaker).
    #[serde(default = "one")]
    pub n_speakers: usize,
    /// Size of the speaker embedding.
    #[serde(default = "default_speaker_channels")]
    pub speaker_channels: usize,
    /// Size of the emotion vector (0: no emotion input).
    #[serde(default)]
    pub emotion_channels: usize,
    /// Text encoder width.
    pub encoder_dim: usize,
    /// Text encoder heads.
    pub encoder_heads: usize,
    /// Text encoder layers.
    pub encoder_layers: usize,
    /// Decoder width.
    pub decoder_dim: usize,
    /// Decoder heads.
    pub decoder_heads: usize,
    /// Decoder layers.
    pub decoder_layers: usize,
    /// Feed-forward hidden size as a multiple of the width.
    #[serde(default = "four")]
    pub ffn_mult: usize,
    /// ALiBi biases in self-attention (else rotary positions).
    #[serde(default = "yes")]
    pub use_alibi: bool,
    /// Scale of the ALiBi slopes.
    #[serde(default = "one_f")]
    pub alibi_alpha: f64,
    /// Feed-forward nonlinearity, `relu` or `gelu`.
    #[serde(default)]
    pub activation: EcholancerActivation,
    /// Dropout in the encoder (residual branches, attention, feed-forward).
    #[serde(default)]
    pub encoder_dropout: f64,
    /// Dropout in the decoder.
    #[serde(default)]
    pub decoder_dropout: f64,
    /// Longest token sequence generation produces.
    pub max_len: usize,
    /// Sinusoidal absolute positions added to the text and token
    /// embeddings (melvae's addition, off in the seed): ALiBi and rotary
    /// positions are relative and act only inside self-attention, so
    /// cross-attention has no position to align text and speech by; with
    /// absolute positions on both sides it can, which lets a small model
    /// learn when to stop from the text's length.
    #[serde(default)]
    pub sinusoidal_positions: bool,
}

fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn yes() -> bool {
    true
}
fn one_f() -> f64 {
    1.0
}
fn default_speaker_channels() -> usize {
    32
}

impl EcholancerConfig {
    /// Checks every field; the error names the bad one.
    pub fn validate(&self) -> Result<()> {
        for (v, f) in [
            (self.vocab_size, "echolancer.vocab_size"),
            (self.mel_vocab_size, "echolancer.mel_vocab_size"),
            (self.n_speakers, "echolancer.n_speakers"),
            (self.speaker_channels, "echolancer.speaker_channels"),
            (self.encoder_layers, "echolancer.encoder_layers"),
            (self.decoder_layers, "echolancer.decoder_layers"),
            (self.ffn_mult, "echolancer.ffn_mult"),
            (self.max_len, "echolancer.max_len"),
        ] {
            ensure(v > 0, f, || "must be > 0".into())?;
        }
        for (dim, heads, what) in [
            (self.encoder_dim, self.encoder_heads, "encoder"),
            (self.decoder_dim, self.decoder_heads, "decoder"),
        ] {
            ensure(
                heads > 0 && dim > 0 && dim % heads == 0,
                &format!("echolancer.{what}_heads"),
                || format!("{heads} heads must divide echolancer.{what}_dim {dim}"),
            )?;
            ensure(
                self.use_alibi || (dim / heads) % 2 == 0,
                &format!("echolancer.{what}_heads"),
                || "rotary positions (use_alibi: false) need an even head size".into(),
            )?;
        }
        ensure(
            self.alibi_alpha.is_finite() && self.alibi_alpha > 0.0,
            "echolancer.alibi_alpha",
            || format!("must be > 0, got {}", self.alibi_alpha),
        )?;
        for (p, f) in [
            (self.encoder_dropout, "echolancer.encoder_dropout"),
            (self.decoder_dropout, "echolancer.decoder_dropout"),
        ] {
            ensure((0.0..1.0).contains(&p), f, || {
                format!("must be in [0, 1), got {p}")
            })?;
        }
        if !self.symbols.is_empty() {
            let t = CharTokenizer::new(&self.symbols)?;
            ensure(
                t.vocab_size() == self.vocab_size,
                "echolancer.vocab_size",
                || {
                    format!(
                        "is {}, but {} symbols plus padding and unknown make {}",
                        self.vocab_size,
                        self.symbols.len(),
                        t.vocab_size()
                    )
                },
            )?;
        }
        Ok(())
    }

    /// The tokenizer of `symbols`.
    pub fn tokenizer(&self) -> Result<CharTokenizer> {
        CharTokenizer::new(&self.symbols)
    }

    fn block(&self, dim: usize, heads: usize, dropout: f64, causal: bool) -> BlockConfig {
        BlockConfig {
            attention: AttentionConfig {
                causal,
                alibi_alpha: self.use_alibi.then_some(self.alibi_alpha),
                rotary_base: (!self.use_alibi).then_some(10000.0),
                dropout,
                ..AttentionConfig::new(dim, heads)
            },
            ffn: FeedForwardConfig {
                hidden: self.ffn_mult * dim,
                activation: match self.activation {
                    EcholancerActivation::Relu => FfnActivation::Relu,
                    EcholancerActivation::Gelu => FfnActivation::Gelu,
                },
                dropout,
                ..FeedForwardConfig::new(dim)
            },
            dropout,
            norm_eps: 1e-5,
        }
    }
}

/// One batch of Echolancer inputs (see the module docs for layouts).
#[derive(Debug, Clone)]
pub struct EcholancerInputs {
    /// Text ids `[batch, text_len]`.
    pub text: Tensor,
    /// `[batch, text_len]`, non-zero for real characters (`None`: all).
    pub text_mask: Option<Tensor>,
    /// Speaker ids `[batch]`.
    pub speakers: Tensor,
    /// Emotion vectors `[batch, emotion_channels]` and which examples have
    /// one (`[batch]`, non-zero = present), when the model takes emotion.
    pub emotion: Option<(Tensor, Tensor)>,
}

/// What [`Echolancer::forward`] returns.
#[derive(Debug, Clone)]
pub struct EcholancerOutput {
    /// Token logits `[batch, len, mel_vocab_size]`.
    pub logits: Tensor,
    /// Stop-gate logits `[batch, len]`.
    pub gate: Tensor,
}

/// The seed's `EcholancerLoss` terms.
#[derive(Debug, Clone)]
pub struct EcholancerLoss {
    /// `ce + gate`.
    pub total: Tensor,
    /// Token cross-entropy over the real positions (nats per token).
    pub ce: Tensor,
    /// Gate binary cross-entropy over the real positions.
    pub gate: Tensor,
}

/// A generated batch.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Each example's tokens, up to and including the one whose gate fired.
    pub tokens: Vec<Vec<u32>>,
    /// Each example's gate probabilities, one per token.
    pub gates: Vec<Vec<f32>>,
    /// Whether each example stopped by its gate (else at the length limit).
    pub stopped: Vec<bool>,
}

/// One step of [`Echolancer::generate_with`], as its callback sees it.
#[derive(Debug)]
pub struct GenerationStep<'a> {
    /// The step (0 for the first token).
    pub step: usize,
    /// This step's token logits `[batch, mel_vocab_size]`.
    pub logits: &'a Tensor,
    /// This step's gate logits `[batch]`.
    pub gate: &'a Tensor,
    /// Everything generated so far, this step included.
    pub generated: &'a Generated,
}

/// The Echolancer model; see the module docs.
#[derive(Debug, Clone)]
pub struct Echolancer {
    cfg: EcholancerConfig,
    text_emb: Embedding,
    enc_layers: Vec<EncoderLayer>,
    enc_norm: LayerNorm,
    speaker_emb: Embedding,
    speaker_proj: Linear,
    emotion_proj: Option<Linear>,
    token_emb: Embedding,
    dec_layers: Vec<DecoderLayer>,
    dec_norm: LayerNorm,
    token_head: Linear,
    gate_head: Linear,
}

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

impl Echolancer {
    /// Builds the model; fails on an invalid config, naming the field.
    pub fn new(cfg: EcholancerConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (ed, dd) = (cfg.encoder_dim, cfg.decoder_dim);
        let e = vb.pp("encoder");
        let enc_block = cfg.block(ed, cfg.encoder_heads, cfg.encoder_dropout, false);
        let enc_layers = (0..cfg.encoder_layers)
            .map(|i| Ok(EncoderLayer::new(enc_block, e.pp("layers").pp(i))?))
            .collect::<Result<_>>()?;
        let d = vb.pp("decoder");
        let dec_block = cfg.block(dd, cfg.decoder_heads, cfg.decoder_dropout, true);
        let dec_layers = (0..cfg.decoder_layers)
            .map(|i| {
                Ok(DecoderLayer::new(
                    dec_block,
                    Some(ed),
                    d.pp("layers").pp(i),
                )?)
            })
            .collect::<Result<_>>()?;
        let emotion_proj = match cfg.emotion_channels {
            0 => None,
            n => Some(melvae_layers::linear_no_bias(n, ed, e.pp("emotion_proj"))?),
        };
        Ok(Self {
            text_emb: Embedding::new(
                normal(&e.pp("text_emb"), (cfg.vocab_size, ed), "weight")?,
                ed,
            ),
            enc_layers,
            enc_norm: LayerNorm::new(ed, 1e-5, true, e.pp("norm"))?,
            speaker_emb: Embedding::new(
                normal(
                    &e.pp("speaker_emb"),
                    (cfg.n_speakers, cfg.speaker_channels),
                    "weight",
                )?,
                cfg.speaker_channels,
            ),
            speaker_proj: melvae_layers::linear(cfg.speaker_channels, ed, e.pp("speaker_proj"))?,
            emotion_proj,
            token_emb: Embedding::new(
                normal(&d.pp("token_emb"), (cfg.mel_vocab_size + 1, dd), "weight")?,
                dd,
            ),
            dec_layers,
            dec_norm: LayerNorm::new(dd, 1e-5, true, d.pp("norm"))?,
            token_head: melvae_layers::linear(dd, cfg.mel_vocab_size, d.pp("token_head"))?,
            gate_head: melvae_layers::linear(dd, 1, d.pp("gate_head"))?,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EcholancerConfig {
        &self.cfg
    }

    /// Loads an `echolancer` model file.
    pub fn load(path: &std::path::Path, device: &Device, dtype: DType) -> Result<Self> {
        Ok(crate::model_file::load::<Self>(path, device, dtype)?.0)
    }

    /// `x` `[batch, len, dim]` plus the sinusoidal embeddings of positions
    /// `offset..offset + len` when `sinusoidal_positions` is on.
    fn with_positions(&self, x: Tensor, offset: usize) -> Result<Tensor> {
        if !self.cfg.sinusoidal_positions {
            return Ok(x);
        }
        let (_, n, d) = x.dims3()?;
        let p =
            melvae_layers::sinusoidal_positions(n, d, offset, x.device())?.to_dtype(x.dtype())?;
        Ok(x.broadcast_add(&p.unsqueeze(0)?)?)
    }

    /// The id of the begin token (one past the spectrogram tokens).
    pub fn begin_id(&self) -> u32 {
        self.cfg.mel_vocab_size as u32
    }

    fn check_ids(
        &self,
        t: &Tensor,
        what: &str,
        batch: Option<usize>,
        limit: usize,
    ) -> Result<(usize, usize)> {
        let bad = |got: String| Error::Shape {
            what: format!("echolancer {what}"),
            expected: format!(
                "[{}, len] with ids below {limit}",
                batch.map_or("batch".into(), |b| b.to_string())
            ),
            got,
        };
        let (b, n) = t.dims2().map_err(|_| bad(format!("{:?}", t.dims())))?;
        if batch.is_some_and(|x| x != b) || n == 0 {
            return Err(bad(format!("{:?}", t.dims())));
        }
        let max = t.to_dtype(DType::U32)?.max_all()?.to_scalar::<u32>()? as usize;
        if max >= limit {
            return Err(bad(format!("an id {max}")));
        }
        Ok((b, n))
    }

    /// The encoder output `[batch, text_len, encoder_dim]` with the
    /// condition (speaker, emotion) added to every position.
    pub fn encode(&self, inputs: &EcholancerInputs, mode: Mode) -> Result<Tensor> {
        let (b, n) = self.check_ids(&inputs.text, "text", None, self.cfg.vocab_size)?;
        if let Some(m) = &inputs.text_mask {
            if m.dims() != [b, n] {
                return Err(Error::Shape {
                    what: "echolancer text mask".into(),
                    expected: format!("[{b}, {n}] (as the text)"),
                    got: format!("{:?}", m.dims()),
                });
            }
        }
        let text = inputs.text.to_dtype(DType::U32)?;
        let mut x = self.with_positions(self.text_emb.forward(&text)?, 0)?;
        for layer in &self.enc_layers {
            x = layer.forward(&x, inputs.text_mask.as_ref(), mode)?;
        }
        let x = self.enc_norm.forward(&x)?;
        let cond = self.condition(inputs, b)?;
        Ok(x.broadcast_add(&cond.unsqueeze(1)?)?)
    }

    /// The condition `[batch, encoder_dim]`: the projected speaker
    /// embedding plus the projected emotion of the examples that have one.
    fn condition(&self, inputs: &EcholancerInputs, b: usize) -> Result<Tensor> {
        let s = &inputs.speakers;
        let bad = |got: String| Error::Shape {
            what: "echolancer speakers".into(),
            expected: format!("[{b}] with ids below {}", self.cfg.n_speakers),
            got,
        };
        if s.dims() != [b] {
            return Err(bad(format!("{:?}", s.dims())));
        }
        let s = s.to_dtype(DType::U32)?;
        let max = s.max_all()?.to_scalar::<u32>()? as usize;
        if max >= self.cfg.n_speakers {
            return Err(bad(format!("speaker {max}")));
        }
        let mut cond = self.speaker_proj.forward(&self.speaker_emb.forward(&s)?)?;
        match (&self.emotion_proj, &inputs.emotion) {
            (Some(p), Some((e, present))) => {
                let want = [b, self.cfg.emotion_channels];
                if e.dims() != want || present.dims() != [b] {
                    return Err(Error::Shape {
                        what: "echolancer emotion".into(),
                        expected: format!("{want:?} and a presence mask [{b}]"),
                        got: format!("{:?} and {:?}", e.dims(), present.dims()),
                    });
                }
                let keep = present.ne(0u32)?.to_dtype(e.dtype())?.unsqueeze(1)?;
                cond = (cond + p.forward(&e.broadcast_mul(&keep)?)?)?;
            }
            (None, Some(_)) => {
                return Err(Error::invalid(
                    "echolancer emotion",
                    "this model takes no emotion (echolancer.emotion_channels 0)",
                ))
            }
            _ => {}
        }
        Ok(cond)
    }

    fn heads(&self, h: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.dec_norm.forward(h)?;
        Ok((
            self.token_head.forward(&h)?,
            self.gate_head.forward(&h)?.squeeze(D::Minus1)?,
        ))
    }

    /// Teacher forcing: logits and gate logits for each of `tokens`
    /// `[batch, len]` from the encoder output `enc` (of [`Echolancer::encode`])
    /// and the tokens before it; `token_mask` `[batch, len]` marks the real
    /// tokens (padding is zeroed in the feed-forward and never attended; it
    /// must still hold valid ids, 0 say).
    pub fn decode(
        &self,
        enc: &Tensor,
        text_mask: Option<&Tensor>,
        tokens: &Tensor,
        token_mask: Option<&Tensor>,
        mode: Mode,
    ) -> Result<EcholancerOutput> {
        let (b, n) =
            self.check_ids(tokens, "tokens", Some(enc.dim(0)?), self.cfg.mel_vocab_size)?;
        let tokens = tokens.to_dtype(DType::U32)?;
        let begin = Tensor::full(self.begin_id(), (b, 1), tokens.device())?;
        let input = Tensor::cat(&[&begin, &tokens.narrow(1, 0, n - 1)?], 1)?;
        let mut x = self.with_positions(self.token_emb.forward(&input)?, 0)?;
        for layer in &self.dec_layers {
            x = layer.forward(&x, token_mask, Some((enc, text_mask)), mode)?;
        }
        let (logits, gate) = self.heads(&x)?;
        Ok(EcholancerOutput { logits, gate })
    }

    /// Encode and decode in one call.
    pub fn forward(
        &self,
        inputs: &EcholancerInputs,
        tokens: &Tensor,
        token_mask: Option<&Tensor>,
        mode: Mode,
    ) -> Result<EcholancerOutput> {
        let enc = self.encode(inputs, mode)?;
        self.decode(&enc, inputs.text_mask.as_ref(), tokens, token_mask, mode)
    }

    /// The seed's `EcholancerLoss`: cross-entropy of the token logits and
    /// binary cross-entropy of the gate (target 1 at each sequence's last
    /// real token; `gate_pos_weight` weighs those positives), both over the
    /// real positions of `token_mask` (`None`: all). Continuous targets
    /// (the seed's masked MAE) do not exist for token targets.
    pub fn loss(
        &self,
        inputs: &EcholancerInputs,
        tokens: &Tensor,
        token_mask: Option<&Tensor>,
        gate_pos_weight: Option<f64>,
        mode: Mode,
    ) -> Result<EcholancerLoss> {
        let out = self.forward(inputs, tokens, token_mask, mode)?;
        let (b, n) = tokens.dims2()?;
        let real = match token_mask {
            Some(m) => m.ne(0u32)?.to_dtype(DType::F32)?,
            None => Tensor::ones((b, n), DType::F32, tokens.device())?,
        };
        // Last real position of each row: real[i] and not real[i + 1].
        let next = Tensor::cat(
            &[
                &real.narrow(1, 1, n - 1)?,
                &Tensor::zeros((b, 1), DType::F32, real.device())?,
            ],
            1,
        )?;
        let gate_target = (&real * (1.0 - &next)?)?;
        let targets = real.ne(0f32)?.where_cond(
            &tokens.to_dtype(DType::U32)?,
            &Tensor::full(u32::MAX, (b, n), tokens.device())?,
        )?;
        let ce = melvae_losses::cross_entropy(&out.logits, &targets, Some(u32::MAX), 0.0)?;
        let gate = melvae_losses::masked_bce_with_logits(
            &out.gate,
            &gate_target.to_dtype(out.gate.dtype())?,
            Some(&real),
            gate_pos_weight,
        )?
        .to_dtype(ce.dtype())?;
        Ok(EcholancerLoss {
            total: (&ce + &gate)?,
            ce,
            gate,
        })
    }

    /// Forgets every decoder layer's KV cache.
    pub fn clear_cache(&mut self) {
        self.dec_layers
            .iter_mut()
            .for_each(DecoderLayer::clear_cache);
    }

    /// Generates tokens for each example of `inputs` with the KV cache:
    /// stops an example when its gate probability reaches `gate_threshold`
    /// (keeping that token; 1 never stops) or after `max_len` tokens (at most
    /// `echolancer.max_len`). `on_step` sees every step (its logits, the
    /// gate and what has been generated so far, this step's tokens
    /// included: streaming reads the new tokens from it); an error it
    /// returns ends generation.
    pub fn generate_with(
        &mut self,
        inputs: &EcholancerInputs,
        max_len: usize,
        gate_threshold: f64,
        opts: &SamplingOptions,
        mut on_step: impl FnMut(&GenerationStep) -> Result<()>,
    ) -> Result<Generated> {
        opts.validate()?;
        ensure(
            max_len > 0 && max_len <= self.cfg.max_len,
            "echolancer generation length",
            || format!("must be in 1..={}, got {max_len}", self.cfg.max_len),
        )?;
        ensure(
            gate_threshold > 0.0 && gate_threshold <= 1.0,
            "gate_threshold",
            || format!("must be in (0, 1], got {gate_threshold}"),
        )?;
        let stop_logit = (gate_threshold / (1.0 - gate_threshold)).ln();
        let enc = self.encode(inputs, Mode::Eval)?;
        let b = enc.dim(0)?;
        let ctx_mask = inputs.text_mask.clone();
        self.clear_cache();
        let mut rng = SplitMix64::new(opts.seed);
        let mut out = Generated {
            tokens: vec![Vec::new(); b],
            gates: vec![Vec::new(); b],
            stopped: vec![false; b],
        };
        let device = enc.device().clone();
        let mut next = vec![self.begin_id(); b];
        for step in 0..max_len {
            let ids = Tensor::new(next.as_slice(), &device)?.unsqueeze(1)?;
            let mut x = self.with_positions(self.token_emb.forward(&ids)?, step)?;
            for layer in &mut self.dec_layers {
                x = layer.forward_cached(&x, Some((&enc, ctx_mask.as_ref())))?;
            }
            let (logits, gate) = self.heads(&x)?;
            let (logits, gate_t) = (logits.squeeze(1)?.detach(), gate.squeeze(1)?.detach());
            let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
            let gate: Vec<f64> = gate_t.to_dtype(DType::F64)?.to_vec1()?;
            for i in 0..b {
                let t = opts.draw(&rows[i], &mut rng)?;
                next[i] = t;
                if out.stopped[i] {
                    continue;
                }
                out.tokens[i].push(t);
                out.gates[i].push((1.0 / (1.0 + (-gate[i]).exp())) as f32);
                // On the logit scale: a threshold of 1 never fires, even
                // where the probability rounds to 1.
                out.stopped[i] = gate[i] >= stop_logit;
            }
            on_step(&GenerationStep {
                step,
                logits: &logits,
                gate: &gate_t,
                generated: &out,
            })?;
            if out.stopped.iter().all(|&s| s) {
                break;
            }
        }
        self.clear_cache();
        Ok(out)
    }

    /// [`Echolancer::generate_with`] without the per-step callback.
    pub fn generate(
        &mut self,
        inputs: &EcholancerInputs,
        max_len: usize,
        gate_threshold: f64,
        opts: &SamplingOptions,
    ) -> Result<Generated> {
        self.generate_with(inputs, max_len, gate_threshold, opts, |_| Ok(()))
    }
}

impl Family for Echolancer {
    const NAME: &'static str = "echolancer";
    type Config = EcholancerConfig;

    fn build(cfg: EcholancerConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(cfg, vb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;
    use melvae_layers::testing::{check_module, max_abs_diff, randomize};

    fn tiny(use_alibi: bool) -> EcholancerConfig {
        EcholancerConfig {
            vocab_size: 9,
            symbols: Vec::new(),
            mel_vocab_size: 7,
            n_speakers: 3,
            speaker_channels: 4,
            emotion_channels: 5,
            encoder_dim: 8,
            encoder_heads: 2,
            encoder_layers: 1,
            decoder_dim: 8,
            decoder_heads: 2,
            decoder_layers: 2,
            ffn_mult: 2,
            use_alibi,
            alibi_alpha: 2.0,
            activation: EcholancerActivation::Gelu,
            encoder_dropout: 0.0,
            decoder_dropout: 0.0,
            max_len: 12,
            sinusoidal_positions: false,
        }
    }

    fn build(cfg: EcholancerConfig, dtype: DType, seed: u64) -> (VarMap, Echolancer) {
        let vm = VarMap::new();
        let m = Echolancer::new(cfg, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
        randomize(&vm, 0.5, seed).unwrap();
        (vm, m)
    }

    fn dev() -> Device {
        Device::Cpu
    }

    /// Two examples: texts of 4 and 3 characters (the second padded),
    /// speakers 0 and 2, an emotion for the first only.
    fn inputs(dtype: DType) -> EcholancerInputs {
        EcholancerInputs {
            text: Tensor::new(&[[2u32, 5, 3, 8], [4, 4, 7, 0]], &dev()).unwrap(),
            text_mask: Some(Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 1, 0]], &dev()).unwrap()),
            speakers: Tensor::new(&[0u32, 2], &dev()).unwrap(),
            emotion: Some((
                Tensor::new(
                    &[[0.5f32, -1.0, 0.3, 0.0, 2.0], [9.0, 9.0, 9.0, 9.0, 9.0]],
                    &dev(),
                )
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
                Tensor::new(&[1u32, 0], &dev()).unwrap(),
            )),
        }
    }

    #[test]
    fn tokenizer_round_trip_and_unknown_report() {
        let t = CharTokenizer::from_corpus(["hello world", "held"]);
        assert_eq!(t.symbols().concat(), " dehlorw");
        assert_eq!(t.vocab_size(), 10);
        let (ids, unknown) = t.encode("hello world");
        assert!(unknown.is_empty());
        assert!(ids.iter().all(|&i| i >= FIRST_SYMBOL));
        assert_eq!(t.decode(&ids), "hello world");
        let (ids, unknown) = t.encode("héllo!!");
        assert_eq!(ids[1], UNK_ID);
        assert_eq!(unknown, BTreeMap::from([('é', 1), ('!', 2)]));
        assert_eq!(t.decode(&[0, ids[0], 0]), "h");
        // From a config: the same ids; bad symbol lists are named.
        let again = CharTokenizer::new(&t.symbols()).unwrap();
        assert_eq!(again.encode("world").0, t.encode("world").0);
        for (symbols, what) in [
            (vec!["a".to_string(), "bc".into()], "symbols[1]"),
            (vec!["a".into(), "a".into()], "listed twice"),
        ] {
            let e = CharTokenizer::new(&symbols).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
        let e = EcholancerConfig {
            symbols: t.symbols(),
            ..tiny(true)
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("echolancer.vocab_size") && e.contains("10"),
            "{e}"
        );
    }

    /// A padded text position (any id there) changes nothing, and a padded
    /// target position (any token there) adds no loss.
    #[test]
    fn padding_changes_nothing() {
        let (_, m) = build(tiny(true), DType::F32, 1);
        let a = inputs(DType::F32);
        let mut b = a.clone();
        b.text = Tensor::new(&[[2u32, 5, 3, 8], [4, 4, 7, 6]], &dev()).unwrap();
        let tokens = Tensor::new(&[[1u32, 2, 3, 4, 5], [6, 5, 4, 0, 0]], &dev()).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &dev()).unwrap();
        let la = m
            .loss(&a, &tokens, Some(&mask), Some(3.0), Mode::Eval)
            .unwrap();
        let lb = m
            .loss(&b, &tokens, Some(&mask), Some(3.0), Mode::Eval)
            .unwrap();
        let d = max_abs_diff(&la.total, &lb.total).unwrap();
        assert!(d < 1e-6, "padded text id: {d}");
        let other = Tensor::new(&[[1u32, 2, 3, 4, 5], [6, 5, 4, 6, 1]], &dev()).unwrap();
        let lc = m
            .loss(&a, &other, Some(&mask), Some(3.0), Mode::Eval)
            .unwrap();
        let d = max_abs_diff(&la.total, &lc.total).unwrap();
        assert!(d < 1e-6, "padded tokens: {d}");
        // The real positions' outputs do not see the padding either.
        let oa = m.forward(&a, &tokens, Some(&mask), Mode::Eval).unwrap();
        let ob = m.forward(&b, &other, Some(&mask), Mode::Eval).unwrap();
        let real = |t: &Tensor| t.get(1).unwrap().narrow(0, 0, 3).unwrap();
        assert!(max_abs_diff(&real(&oa.logits), &real(&ob.logits)).unwrap() < 1e-5);
        assert!(max_abs_diff(&real(&oa.gate), &real(&ob.gate)).unwrap() < 1e-5);
    }

    /// The gate's target is 1 at each row's last real token: a gate that
    /// says "stop" only there costs less than one that never does.
    #[test]
    fn gate_targets_the_last_real_token() {
        let (vm, m) = build(tiny(true), DType::F32, 2);
        let tokens = Tensor::new(&[[1u32, 2, 3], [4, 5, 0]], &dev()).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1], [1, 1, 0]], &dev()).unwrap();
        let base = m
            .loss(&inputs(DType::F32), &tokens, Some(&mask), None, Mode::Eval)
            .unwrap();
        // Gate bias -20: every gate ~0, so the loss is ~20 at the 2 last
        // tokens of 5 real positions: 8.
        vm.data()
            .lock()
            .unwrap()
            .get("decoder.gate_head.bias")
            .unwrap()
            .set(&Tensor::new(&[-20f32], &dev()).unwrap())
            .unwrap();
        vm.data()
            .lock()
            .unwrap()
            .get("decoder.gate_head.weight")
            .unwrap()
            .set(&Tensor::zeros((1, 8), DType::F32, &dev()).unwrap())
            .unwrap();
        let m2 =
            Echolancer::new(tiny(true), VarBuilder::from_varmap(&vm, DType::F32, &dev())).unwrap();
        let l = m2
            .loss(&inputs(DType::F32), &tokens, Some(&mask), None, Mode::Eval)
            .unwrap();
        let g = l.gate.to_scalar::<f32>().unwrap();
        assert!((g - 8.0).abs() < 1e-3, "{g}");
        // pos_weight 3 triples the positives' share: 24.
        let l = m2
            .loss(
                &inputs(DType::F32),
                &tokens,
                Some(&mask),
                Some(3.0),
                Mode::Eval,
            )
            .unwrap();
        assert!((l.gate.to_scalar::<f32>().unwrap() - 24.0).abs() < 1e-3);
        assert!(base.ce.to_scalar::<f32>().unwrap() > 0.0);
    }

    /// Every generation step's logits and gate equal the teacher-forced
    /// pass on the generated prefix (ALiBi and rotary).
    #[test]
    fn cached_generation_equals_full_decoding() {
        for (alibi, sinusoidal_positions) in [(true, false), (false, false), (true, true)] {
            let cfg = EcholancerConfig {
                sinusoidal_positions,
                ..tiny(alibi)
            };
            let (_, mut m) = build(cfg, DType::F32, 3);
            let x = inputs(DType::F32);
            let mut steps = Vec::new();
            let opts = SamplingOptions {
                temperature: 0.9,
                seed: 4,
                ..Default::default()
            };
            let g = m
                .generate_with(&x, 10, 1.0, &opts, |st| {
                    // The callback sees this step's tokens already.
                    assert!(st.generated.tokens.iter().all(|t| t.len() == st.step + 1));
                    steps.push((st.logits.clone(), st.gate.clone()));
                    Ok(())
                })
                .unwrap();
            assert_eq!(steps.len(), 10);
            for (i, row) in g.tokens.iter().enumerate() {
                assert_eq!(row.len(), 10);
                let sub = EcholancerInputs {
                    text: x.text.narrow(0, i, 1).unwrap(),
                    text_mask: x.text_mask.as_ref().map(|t| t.narrow(0, i, 1).unwrap()),
                    speakers: x.speakers.narrow(0, i, 1).unwrap(),
                    emotion: x
                        .emotion
                        .as_ref()
                        .map(|(e, p)| (e.narrow(0, i, 1).unwrap(), p.narrow(0, i, 1).unwrap())),
                };
                let tokens = Tensor::new(row.as_slice(), &dev())
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let full = m.forward(&sub, &tokens, None, Mode::Eval).unwrap();
                for (pos, (l, gate)) in steps.iter().enumerate() {
                    let want = full.logits.get(0).unwrap().get(pos).unwrap();
                    let d = max_abs_diff(&want, &l.get(i).unwrap()).unwrap();
                    assert!(d < 1e-5, "alibi {alibi} example {i} step {pos}: {d}");
                    let dg = max_abs_diff(
                        &full.gate.get(0).unwrap().get(pos).unwrap(),
                        &gate.get(i).unwrap(),
                    )
                    .unwrap();
                    assert!(dg < 1e-5, "gate, step {pos}: {dg}");
                }
            }
        }
    }

    #[test]
    fn the_gate_stops_generation() {
        let (vm, mut m) = build(tiny(true), DType::F32, 5);
        let opts = SamplingOptions::default();
        let g = m.generate(&inputs(DType::F32), 12, 1.0, &opts).unwrap();
        assert_eq!(g.stopped, [false, false]);
        assert!(g.tokens.iter().all(|t| t.len() == 12));
        // A gate that always fires stops every example after one token.
        let set = |name: &str, t: Tensor| {
            vm.data()
                .lock()
                .unwrap()
                .get(name)
                .unwrap()
                .set(&t)
                .unwrap();
        };
        set(
            "decoder.gate_head.weight",
            Tensor::zeros((1, 8), DType::F32, &dev()).unwrap(),
        );
        set(
            "decoder.gate_head.bias",
            Tensor::new(&[10f32], &dev()).unwrap(),
        );
        let mut m =
            Echolancer::new(tiny(true), VarBuilder::from_varmap(&vm, DType::F32, &dev())).unwrap();
        let g = m.generate(&inputs(DType::F32), 12, 0.5, &opts).unwrap();
        assert_eq!(g.stopped, [true, true]);
        assert!(g.tokens.iter().all(|t| t.len() == 1), "{:?}", g.tokens);
        assert!(g.gates[0][0] > 0.99);
        let e = m
            .generate(&inputs(DType::F32), 13, 0.5, &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("generation length"), "{e}");
    }

    /// The speaker and the emotion each change the output; an example
    /// without emotion ignores its vector.
    #[test]
    fn speaker_and_emotion_change_the_output() {
        let (_, m) = build(tiny(true), DType::F32, 6);
        let tokens = Tensor::new(&[[1u32, 2, 3], [1, 2, 3]], &dev()).unwrap();
        let x = inputs(DType::F32);
        let base = m.forward(&x, &tokens, None, Mode::Eval).unwrap().logits;
        let mut s = x.clone();
        s.speakers = Tensor::new(&[1u32, 2], &dev()).unwrap();
        let d = max_abs_diff(
            &base.get(0).unwrap(),
            &m.forward(&s, &tokens, None, Mode::Eval)
                .unwrap()
                .logits
                .get(0)
                .unwrap(),
        )
        .unwrap();
        assert!(d > 1e-3, "speaker: {d}");
        let mut e = x.clone();
        let (vecs, present) = x.emotion.clone().unwrap();
        e.emotion = Some(((vecs.clone() * 2.0).unwrap(), present.clone()));
        let out = m.forward(&e, &tokens, None, Mode::Eval).unwrap().logits;
        let d = max_abs_diff(&base.get(0).unwrap(), &out.get(0).unwrap()).unwrap();
        assert!(d > 1e-3, "emotion: {d}");
        // Example 1 has no emotion: its (changed) vector is ignored.
        let d = max_abs_diff(&base.get(1).unwrap(), &out.get(1).unwrap()).unwrap();
        assert!(d < 1e-6, "absent emotion: {d}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        for alibi in [true, false] {
            let vm = VarMap::new();
            let cfg = EcholancerConfig {
                decoder_layers: 1,
                ..tiny(alibi)
            };
            let m = Echolancer::new(cfg, VarBuilder::from_varmap(&vm, DType::F64, &dev())).unwrap();
            let x = inputs(DType::F64);
            let tokens = Tensor::new(&[[1u32, 2, 3], [4, 5, 0]], &dev()).unwrap();
            let mask = Tensor::new(&[[1u32, 1, 1], [1, 1, 0]], &dev()).unwrap();
            check_module(&vm, 0.5, 7, &[], || {
                m.loss(&x, &tokens, Some(&mask), Some(2.0), Mode::Eval)
                    .map(|l| l.total)
                    .map_err(|e| melvae_layers::Error::Invalid {
                        what: "echolancer".into(),
                        reason: e.to_string(),
                    })
            })
            .unwrap_or_else(|e| panic!("alibi {alibi}: {e}"));
        }
    }

    /// `alibi_alpha` reaches the model's attention: the same weights under
    /// another alpha give other outputs.
    #[test]
    fn alibi_alpha_reaches_the_model() {
        let (vm, m) = build(tiny(true), DType::F32, 9);
        let other = Echolancer::new(
            EcholancerConfig {
                alibi_alpha: 0.25,
                ..tiny(true)
            },
            VarBuilder::from_varmap(&vm, DType::F32, &dev()),
        )
        .unwrap();
        let tokens = Tensor::new(&[[1u32, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]], &dev()).unwrap();
        let x = inputs(DType::F32);
        let a = m.forward(&x, &tokens, None, Mode::Eval).unwrap().logits;
        let b = other.forward(&x, &tokens, None, Mode::Eval).unwrap().logits;
        let d = max_abs_diff(&a, &b).unwrap();
        assert!(d > 1e-4, "{d}");
    }

    /// ALiBi with `alibi_alpha`: with zero queries and keys, identity
    /// values and output, one head (slope 2^-8) and alpha 100, each row of
    /// the self-attention output is `softmax_j<=i(-alpha slope (i - j))`.
    #[test]
    fn alibi_bias_matches_hand_computed_weights() {
        let vm = VarMap::new();
        let cfg = AttentionConfig {
            causal: true,
            alibi_alpha: Some(100.0),
            ..AttentionConfig::new(4, 1)
        };
        let attn = melvae_layers::MultiHeadAttention::new(
            cfg,
            VarBuilder::from_varmap(&vm, DType::F64, &dev()),
        )
        .unwrap();
        let mut qkv = vec![0f64; 12 * 4];
        for i in 0..4 {
            qkv[(8 + i) * 4 + i] = 1.0;
        }
        let eye = Tensor::eye(4, DType::F64, &dev()).unwrap();
        {
            let data = vm.data().lock().unwrap();
            data["qkv.weight"]
                .set(&Tensor::from_vec(qkv, (12, 4), &dev()).unwrap())
                .unwrap();
            data["out.weight"].set(&eye).unwrap();
        }
        let y = attn
            .forward(&eye.unsqueeze(0).unwrap(), None, Mode::Eval)
            .unwrap();
        let y: Vec<Vec<f64>> = y.squeeze(0).unwrap().to_vec2().unwrap();
        let slope = 100.0 * 2f64.powi(-8);
        for (i, row) in y.iter().enumerate() {
            let w: Vec<f64> = (0..=i).map(|j| (-slope * (i - j) as f64).exp()).collect();
            let z: f64 = w.iter().sum();
            for (j, &got) in row.iter().enumerate() {
                let want = if j <= i { w[j] / z } else { 0.0 };
                assert!(
                    (got - want).abs() < 1e-12,
                    "row {i} col {j}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn bad_inputs_name_the_culprit() {
        let (_, m) = build(tiny(true), DType::F32, 8);
        let tokens = Tensor::new(&[[1u32, 2], [3, 4]], &dev()).unwrap();
        let mut x = inputs(DType::F32);
        x.speakers = Tensor::new(&[0u32, 3], &dev()).unwrap();
        let e = m
            .forward(&x, &tokens, None, Mode::Eval)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("echolancer speakers") && e.contains("speaker 3"),
            "{e}"
        );
        let mut x = inputs(DType::F32);
        x.text = Tensor::new(&[[2u32, 9, 3, 8], [4, 4, 7, 0]], &dev()).unwrap();
        let e = m
            .forward(&x, &tokens, None, Mode::Eval)
            .unwrap_err()
            .to_string();
        assert!(e.contains("echolancer text") && e.contains("id 9"), "{e}");
        let bad = Tensor::new(&[[1u32, 7], [3, 4]], &dev()).unwrap();
        let e = m
            .forward(&inputs(DType::F32), &bad, None, Mode::Eval)
            .unwrap_err()
            .to_string();
        assert!(e.contains("echolancer tokens") && e.contains("id 7"), "{e}");
        let mut x = inputs(DType::F32);
        x.emotion = Some((
            Tensor::zeros((2, 4), DType::F32, &dev()).unwrap(),
            Tensor::ones(2, DType::U32, &dev()).unwrap(),
        ));
        let e = m
            .forward(&x, &tokens, None, Mode::Eval)
            .unwrap_err()
            .to_string();
        assert!(e.contains("echolancer emotion"), "{e}");
        for (cfg, key) in [
            (
                EcholancerConfig {
                    decoder_heads: 3,
                    ..tiny(true)
                },
                "echolancer.decoder_heads",
            ),
            (
                EcholancerConfig {
                    alibi_alpha: 0.0,
                    ..tiny(true)
                },
                "echolancer.alibi_alpha",
            ),
            (
                EcholancerConfig {
                    mel_vocab_size: 0,
                    ..tiny(true)
                },
                "echolancer.mel_vocab_size",
            ),
            (
                EcholancerConfig {
                    encoder_dim: 6,
                    encoder_heads: 2,
                    ..tiny(false)
                },
                "echolancer.encoder_heads",
            ),
        ] {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }
}
