//! The GPT-VAE: a whole token sequence to one global Gaussian latent and
//! back (Optimus-style, the seed's MelSpec_GPT_VQVAE second prior).
//!
//! Layouts: tokens `[batch, len]` (u32), an optional mask `[batch, len]`
//! (non-zero = real token), latents `[batch, latent_dim]`.
//!
//! - Encoder (`encoder.*`): token embedding and learned positions,
//!   `enc_layers` bidirectional pre-norm transformer layers
//!   (`encoder.layers.{i}`), a final LayerNorm, the mean over the real
//!   positions, and `encoder.to_latent` (Linear to `2 * latent_dim`: mean,
//!   then log-variance).
//! - Decoder (`decoder.*`): a [`Gpt`] without class embedding whose first
//!   position is `latent_prefix(z)` and, with `injection: both`, whose
//!   every input position also gets `latent_add(z)` added.
//!
//! Why both: the prefix alone is one position the causal decoder can learn
//! to ignore as its context grows, which is how text VAEs collapse; adding
//! the latent to every position's input keeps it one step away from every
//! prediction (Optimus injects it as memory at every layer for the same
//! reason). `prefix` and `add` alone are there to compare.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Module, VarBuilder};
use melvae_dsp::SplitMix64;
use melvae_layers::Linear;
use melvae_layers::{BlockConfig, EncoderLayer, LayerNorm, Mode};
use melvae_losses::{kl_loss, FreeBits};
use serde::{Deserialize, Serialize};

use super::gpt::{masked_cross_entropy, Gpt, GptConfig, GptPositions, SamplingOptions};
use crate::error::ensure;
use crate::model_file::Family;
use crate::{Error, Result};

/// Where the latent enters the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LatentInjection {
    /// As the first position only.
    Prefix,
    /// Added to every position's input only (the first position is then a
    /// learned start embedding plus the latent).
    Add,
    /// Both (the default; see the module docs).
    #[default]
    Both,
}

/// Configuration of [`GptVae`] (the `gpt_vae:` config section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptVaeConfig {
    /// Token vocabulary (the VQ-VAE's codebook size).
    pub vocab_size: usize,
    /// Longest token sequence.
    pub max_len: usize,
    /// Width of encoder and decoder.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// Encoder layers.
    pub enc_layers: usize,
    /// Decoder layers.
    pub dec_layers: usize,
    /// Size of the global latent (1024 in the reference config).
    pub latent_dim: usize,
    /// Where the latent enters the decoder.
    #[serde(default)]
    pub injection: LatentInjection,
    /// Dropout in training.
    #[serde(default)]
    pub dropout: f64,
}

impl GptVaeConfig {
    /// Checks every field; the error names the bad one.
    pub fn validate(&self) -> Result<()> {
        for (v, f) in [
            (self.enc_layers, "gpt_vae.enc_layers"),
            (self.latent_dim, "gpt_vae.latent_dim"),
        ] {
            ensure(v > 0, f, || "must be > 0".into())?;
        }
        let rename = |t: String| {
            t.replace("gpt.layers", "gpt_vae.dec_layers")
                .replace("gpt.", "gpt_vae.")
        };
        self.decoder().validate().map_err(|e| match e {
            Error::Invalid { what, reason } => Error::invalid(rename(what), rename(reason)),
            e => e,
        })
    }

    fn decoder(&self) -> GptConfig {
        GptConfig {
            vocab_size: self.vocab_size,
            num_classes: 0,
            max_len: self.max_len,
            dim: self.dim,
            heads: self.heads,
            layers: self.dec_layers,
            positions: GptPositions::Learned,
            dropout: self.dropout,
        }
    }
}

/// The GPT-VAE; see the module docs.
#[derive(Debug, Clone)]
pub struct GptVae {
    cfg: GptVaeConfig,
    enc_tok: Embedding,
    enc_pos: Tensor,
    enc_layers: Vec<EncoderLayer>,
    enc_norm: LayerNorm,
    to_latent: Linear,
    latent_prefix: Option<Linear>,
    latent_add: Option<Linear>,
    start: Option<Tensor>,
    decoder: Gpt,
}

/// What [`GptVae::loss`] returns.
#[derive(Debug, Clone)]
pub struct GptVaeLoss {
    /// `ce + kl_weight * kl` (scalar).
    pub total: Tensor,
    /// Token cross-entropy (nats per real token).
    pub ce: Tensor,
    /// The KL term after free bits (before its weight).
    pub kl: Tensor,
    /// Mean KL per latent dimension `[latent_dim]` (no free bits): for
    /// active units and posterior collapse.
    pub kl_per_dim: Tensor,
}

fn linear(i: usize, o: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(melvae_layers::linear(i, o, vb)?)
}

impl GptVae {
    /// Builds the model; fails on an invalid config, naming the field.
    pub fn new(cfg: GptVaeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (d, l) = (cfg.dim, cfg.latent_dim);
        let e = vb.pp("encoder");
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let block = BlockConfig {
            dropout: cfg.dropout,
            ..BlockConfig::new(d, cfg.heads)
        };
        let enc_layers = (0..cfg.enc_layers)
            .map(|i| Ok(EncoderLayer::new(block, e.pp("layers").pp(i))?))
            .collect::<Result<_>>()?;
        let needs_add = cfg.injection != LatentInjection::Prefix;
        Ok(Self {
            enc_tok: Embedding::new(
                e.pp("tok_emb")
                    .get_with_hints((cfg.vocab_size, d), "weight", init)?,
                d,
            ),
            enc_pos: e
                .pp("pos_emb")
                .get_with_hints((cfg.max_len, d), "weight", init)?,
            enc_layers,
            enc_norm: LayerNorm::new(d, 1e-5, true, e.pp("norm"))?,
            to_latent: linear(d, 2 * l, e.pp("to_latent"))?,
            latent_prefix: if cfg.injection == LatentInjection::Add {
                None
            } else {
                Some(linear(l, d, vb.pp("latent_prefix"))?)
            },
            latent_add: if needs_add {
                Some(linear(l, d, vb.pp("latent_add"))?)
            } else {
                None
            },
            start: if cfg.injection == LatentInjection::Add {
                Some(vb.get_with_hints((1, 1, d), "start", init)?)
            } else {
                None
            },
            decoder: Gpt::new(cfg.decoder(), vb.pp("decoder"))?,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &GptVaeConfig {
        &self.cfg
    }

    /// Loads a `gpt_vae` model file.
    pub fn load(path: &std::path::Path, device: &Device, dtype: DType) -> Result<Self> {
        Ok(crate::model_file::load::<Self>(path, device, dtype)?.0)
    }

    /// The posterior `(mean, logvar)`, each `[batch, latent_dim]`, of
    /// `tokens` `[batch, len]` (real where `mask` is non-zero).
    pub fn encode(
        &self,
        tokens: &Tensor,
        mask: Option<&Tensor>,
        mode: Mode,
    ) -> Result<(Tensor, Tensor)> {
        let (_, n) = tokens.dims2().map_err(|_| Error::Shape {
            what: "gpt_vae tokens".into(),
            expected: "[batch, len]".into(),
            got: format!("{:?}", tokens.dims()),
        })?;
        ensure(n > 0 && n <= self.cfg.max_len, "gpt_vae tokens", || {
            format!(
                "need 1 to gpt_vae.max_len {} tokens, got {n}",
                self.cfg.max_len
            )
        })?;
        let tokens = tokens.to_dtype(DType::U32)?;
        let max = tokens.max_all()?.to_scalar::<u32>()? as usize;
        if max >= self.cfg.vocab_size {
            return Err(Error::Shape {
                what: "gpt_vae tokens".into(),
                expected: format!("ids below gpt_vae.vocab_size {}", self.cfg.vocab_size),
                got: format!("token {max}"),
            });
        }
        let mut x = self
            .enc_tok
            .forward(&tokens)?
            .broadcast_add(&self.enc_pos.narrow(0, 0, n)?.unsqueeze(0)?)?;
        let key_mask = match mask {
            Some(m) => Some(m.ne(0u32)?.to_dtype(DType::U8)?),
            None => None,
        };
        for layer in &self.enc_layers {
            x = layer.forward(&x, key_mask.as_ref(), mode)?;
        }
        let x = self.enc_norm.forward(&x)?;
        // Mean over the real positions.
        let pooled = match &key_mask {
            Some(m) => {
                let w = m.to_dtype(x.dtype())?.unsqueeze(2)?;
                let count = w.sum(1)?.maximum(1.0)?;
                x.broadcast_mul(&w)?.sum(1)?.broadcast_div(&count)?
            }
            None => x.mean(1)?,
        };
        let h = self.to_latent.forward(&pooled)?;
        let l = self.cfg.latent_dim;
        Ok((h.narrow(1, 0, l)?, h.narrow(1, l, l)?))
    }

    /// The decoder's first-position and per-position inputs for latents
    /// `z` `[batch, latent_dim]`.
    fn prompt(&self, z: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let add = match &self.latent_add {
            Some(a) => Some(a.forward(z)?.unsqueeze(1)?),
            None => None,
        };
        let start = match (&self.latent_prefix, &self.start) {
            (Some(p), _) => p.forward(z)?.unsqueeze(1)?,
            (None, Some(s)) => s.broadcast_as((z.dim(0)?, 1, self.cfg.dim))?.contiguous()?,
            (None, None) => {
                return Err(Error::invalid(
                    "gpt_vae",
                    "neither a latent prefix nor a start embedding",
                ))
            }
        };
        Ok((start, add))
    }

    /// Logits `[batch, len, vocab_size]` of `tokens` given latents `z`
    /// `[batch, latent_dim]` (teacher forcing).
    pub fn decode_logits(&self, tokens: &Tensor, z: &Tensor, mode: Mode) -> Result<Tensor> {
        self.check_latent(z)?;
        let (start, add) = self.prompt(z)?;
        self.decoder
            .forward_prompted(tokens, &start, add.as_ref(), mode)
    }

    fn check_latent(&self, z: &Tensor) -> Result<()> {
        match z.dims() {
            [_, l] if *l == self.cfg.latent_dim => Ok(()),
            d => Err(Error::Shape {
                what: "gpt_vae latent".into(),
                expected: format!("[batch, {}]", self.cfg.latent_dim),
                got: format!("{d:?}"),
            }),
        }
    }

    /// The training loss of `tokens`: encode, draw `z = mean + exp(logvar /
    /// 2) * eps` (`eps` from `rng`; the mean itself when `kl_weight` is 0,
    /// the plain autoencoder of stage 1), cross-entropy of the decoder's
    /// logits over the real tokens, plus `kl_weight` times the KL with
    /// `free_bits` (the seed's `fb` 0/1/2 with `target_kl`).
    pub fn loss(
        &self,
        tokens: &Tensor,
        mask: Option<&Tensor>,
        kl_weight: f64,
        free_bits: FreeBits,
        rng: &mut SplitMix64,
        mode: Mode,
    ) -> Result<GptVaeLoss> {
        let eps = if kl_weight == 0.0 {
            None
        } else {
            Some(self.latent_noise(tokens.dim(0)?, rng, tokens.device())?)
        };
        self.loss_with(tokens, mask, kl_weight, free_bits, eps.as_ref(), mode)
    }

    /// The noise [`GptVae::loss`] draws from `rng` for `batch` sequences:
    /// `[batch, latent_dim]` standard normal, f32 (a data-parallel rank
    /// draws the whole batch's and keeps its rows).
    pub fn latent_noise(
        &self,
        batch: usize,
        rng: &mut SplitMix64,
        device: &Device,
    ) -> Result<Tensor> {
        crate::dit_cfm::normal_noise(&[batch, self.cfg.latent_dim], rng, device)
    }

    /// [`GptVae::loss`] with the noise given (`[batch, latent_dim]`), or
    /// the posterior mean decoded when `eps` is `None`.
    pub fn loss_with(
        &self,
        tokens: &Tensor,
        mask: Option<&Tensor>,
        kl_weight: f64,
        free_bits: FreeBits,
        eps: Option<&Tensor>,
        mode: Mode,
    ) -> Result<GptVaeLoss> {
        let (mean, logvar) = self.encode(tokens, mask, mode)?;
        let z = match eps {
            None => mean.clone(),
            Some(eps) => {
                if eps.dims() != mean.dims() {
                    return Err(Error::Shape {
                        what: "gpt_vae latent noise".into(),
                        expected: format!("{:?}", mean.dims()),
                        got: format!("{:?}", eps.dims()),
                    });
                }
                (&mean + (logvar.affine(0.5, 0.0)?.exp()? * eps.to_dtype(mean.dtype())?)?)?
            }
        };
        let logits = self.decode_logits(tokens, &z, mode)?;
        let ce = masked_cross_entropy(&logits, tokens, mask, 0.0)?;
        let kl = kl_loss(&mean, &logvar, free_bits)?.to_dtype(ce.dtype())?;
        let kl_per_dim = melvae_losses::gaussian_kl(&mean, &logvar)?
            .mean(0)?
            .detach();
        Ok(GptVaeLoss {
            total: (&ce + (&kl * kl_weight)?)?,
            ce,
            kl,
            kl_per_dim,
        })
    }

    /// Generates `len` tokens for each latent of `z` `[batch, latent_dim]`
    /// with the decoder's KV cache: `[batch, len]` (u32).
    pub fn generate(&mut self, z: &Tensor, len: usize, opts: &SamplingOptions) -> Result<Tensor> {
        self.check_latent(z)?;
        let (start, add) = self.prompt(z)?;
        self.decoder
            .sample_prompted(&start, add.as_ref(), len, opts, |_, _| {})
    }
}

/// Latent dimensions whose mean KL exceeds `threshold` nats (0.01 is the
/// usual "active unit" cut): `kl_per_dim` as [`GptVaeLoss::kl_per_dim`].
pub fn active_units(kl_per_dim: &Tensor, threshold: f64) -> Result<usize> {
    let v: Vec<f32> = kl_per_dim.to_dtype(DType::F32)?.to_vec1()?;
    Ok(v.iter().filter(|&&k| f64::from(k) > threshold).count())
}

impl Family for GptVae {
    const NAME: &'static str = "gpt_vae";
    type Config = GptVaeConfig;

    fn build(cfg: GptVaeConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(cfg, vb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;
    use melvae_layers::testing::{check_gradients, max_abs_diff, named_vars, randomize, GradCheck};

    fn tiny(injection: LatentInjection) -> GptVaeConfig {
        GptVaeConfig {
            vocab_size: 7,
            max_len: 8,
            dim: 8,
            heads: 2,
            enc_layers: 1,
            dec_layers: 1,
            latent_dim: 3,
            injection,
            dropout: 0.0,
        }
    }

    fn build(cfg: GptVaeConfig, dtype: DType) -> (VarMap, GptVae) {
        let vm = VarMap::new();
        let m = GptVae::new(cfg, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
        (vm, m)
    }

    /// The KL terms for fb 0/1/2 against values computed by hand from the
    /// posterior: KL_d = (mu^2 + e^lv - 1 - lv) / 2.
    #[test]
    fn kl_terms_match_hand_computed_values() {
        let dev = Device::Cpu;
        let mean = Tensor::new(&[[1.0f64, 0.0, 0.5], [0.0, 0.0, 0.0]], &dev).unwrap();
        let logvar = Tensor::new(&[[0.0f64, 0.0, 0.0], [0.0, 1.0, 0.0]], &dev).unwrap();
        // Row 0: 0.5, 0, 0.125 (sum 0.625); row 1: 0, (e - 2) / 2, 0.
        let e = std::f64::consts::E;
        let r1 = (e - 2.0) / 2.0;
        let per_dim = [0.25, r1 / 2.0, 0.0625];
        let cases = [
            (FreeBits::None, (0.625 + r1) / 2.0),
            // fb=1: a row counts only above the target (r1 = 0.359).
            (FreeBits::Threshold { target: 0.3 }, (0.625 + r1) / 2.0),
            (FreeBits::Threshold { target: 0.5 }, 0.625 / 2.0),
            (FreeBits::Threshold { target: 0.7 }, 0.0),
            (
                FreeBits::PerDimMax { target: 0.1 },
                per_dim.iter().map(|&k: &f64| k.max(0.1)).sum::<f64>(),
            ),
            (
                FreeBits::PerDimMax { target: 0.0 },
                per_dim.iter().sum::<f64>(),
            ),
        ];
        for (fb, want) in cases {
            let got = kl_loss(&mean, &logvar, fb)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!((got - want).abs() < 1e-12, "{fb:?}: {got} vs {want}");
        }
    }

    /// Teacher-forced logits of a latent equal the KV-cached generation's
    /// steps, for every injection.
    #[test]
    fn generation_follows_the_latent() {
        for inj in [
            LatentInjection::Prefix,
            LatentInjection::Add,
            LatentInjection::Both,
        ] {
            let (vm, mut m) = build(tiny(inj), DType::F32);
            randomize(&vm, 0.5, 2).unwrap();
            let z = Tensor::new(&[[0.5f32, -1.0, 2.0], [0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
            let opts = SamplingOptions::default();
            let tokens = m.generate(&z, 6, &opts).unwrap();
            assert_eq!(tokens.dims(), &[2, 6]);
            let full = m.decode_logits(&tokens, &z, Mode::Eval).unwrap();
            let (start, add) = m.prompt(&z).unwrap();
            let mut steps = Vec::new();
            m.decoder
                .sample_prompted(&start, add.as_ref(), 6, &opts, |_, l| steps.push(l.clone()))
                .unwrap();
            for (i, l) in steps.iter().enumerate() {
                let d =
                    max_abs_diff(&full.narrow(1, i, 1).unwrap().squeeze(1).unwrap(), l).unwrap();
                assert!(d < 1e-5, "{inj:?} step {i}: {d}");
            }
            // Another latent, other logits.
            let z2 = (z.clone() + 1.0).unwrap();
            let other = m.decode_logits(&tokens, &z2, Mode::Eval).unwrap();
            assert!(max_abs_diff(&full, &other).unwrap() > 1e-4, "{inj:?}");
        }
    }

    /// Finite differences of the whole loss (encoder, sampled latent,
    /// decoder, KL with free bits) at a fixed noise draw, with padding.
    #[test]
    fn gradients_match_finite_differences() {
        let (vm, m) = build(tiny(LatentInjection::Both), DType::F64);
        randomize(&vm, 0.3, 4).unwrap();
        let tokens = Tensor::new(&[[1u32, 6, 3, 2], [0, 2, 5, 0]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u8, 1, 1, 1], [1, 1, 1, 0]], &Device::Cpu).unwrap();
        let vars = named_vars(&vm);
        check_gradients(&vars, GradCheck::default(), || {
            let mut rng = SplitMix64::new(9);
            m.loss(
                &tokens,
                Some(&mask),
                0.7,
                FreeBits::PerDimMax { target: 0.05 },
                &mut rng,
                Mode::Eval,
            )
            .map(|l| l.total)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
        })
        .unwrap();
    }

    /// Padding does not change the latent: a sequence alone equals the same
    /// sequence padded in a batch.
    #[test]
    fn padding_is_ignored_by_the_encoder() {
        let (vm, m) = build(tiny(LatentInjection::Both), DType::F32);
        randomize(&vm, 0.5, 5).unwrap();
        let alone = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
        let padded = Tensor::new(&[[1u32, 2, 3, 0, 0]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u8, 1, 1, 0, 0]], &Device::Cpu).unwrap();
        let (a, _) = m.encode(&alone, None, Mode::Eval).unwrap();
        let (p, _) = m.encode(&padded, Some(&mask), Mode::Eval).unwrap();
        assert!(max_abs_diff(&a, &p).unwrap() < 1e-5);
    }

    #[test]
    fn bad_input_names_the_culprit() {
        let (_, mut m) = build(tiny(LatentInjection::Both), DType::F32);
        let e = m
            .generate(
                &Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap(),
                2,
                &SamplingOptions::default(),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpt_vae latent"), "{e}");
        let e = m
            .encode(
                &Tensor::zeros((1, 9), DType::U32, &Device::Cpu).unwrap(),
                None,
                Mode::Eval,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpt_vae.max_len"), "{e}");
        let e = GptVaeConfig {
            heads: 3,
            ..tiny(LatentInjection::Both)
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("gpt_vae.heads"), "{e}");
    }
}
