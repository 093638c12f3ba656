//! The waveform VQ-VAE of the hierarchical system (the seed's VQWave): the
//! waveform VAE's SEANet encoder and decoder with a [`VectorQuantizer`]
//! bottleneck, one model per compression level (512x, 128x, 32x, 8x: the
//! product of the strides).
//!
//! Audio `[batch, audio_channels, samples]` (samples a multiple of the hop)
//! to codes `[batch, samples / hop]` (u32 below `codebook_size`) and back to
//! audio `[batch, audio_channels, frames * hop]`. The encoder's last conv
//! gives one `net.latent_dim`-vector per frame (the code vector size: 32 in
//! the seed), quantised to its nearest code (straight-through, codebook and
//! commitment losses or EMA updates, restarts of dead codes from recent
//! encoder outputs). Parameters: `encoder.*` and `decoder.*` as the waveform
//! VAE's (`crate::wave_vae`), `vq.codebook` `[codebook_size, latent_dim]`
//! and the quantiser's buffers.
//!
//! In causal mode both halves stream: audio chunks become codes as their
//! frames are final ([`VqVae::encoder_stream`]), and codes become audio
//! ([`VqVae::decoder_stream`]), each equal to the offline pass.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use melvae_layers::{Ranks, Streaming, VectorQuantizer, VqConfig, VqOutput};
use serde::{Deserialize, Serialize};

use crate::error::ensure;
use crate::model_file::Family;
use crate::wave_vae::{WaveDecoder, WaveEncoder, WaveVaeConfig};
use crate::{Error, Result};

/// Configuration of [`VqVae`] (the `vqvae:` config section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqVaeConfig {
    /// The encoder and decoder (the waveform VAE's network; its
    /// `latent_dim` is the code vector size, its strides' product the
    /// compression).
    pub net: WaveVaeConfig,
    /// Number of codes.
    pub codebook_size: usize,
    /// Weight of the commitment loss.
    #[serde(default = "quarter")]
    pub commitment: f64,
    /// EMA codebook updates with this decay instead of the codebook loss.
    #[serde(default)]
    pub ema_decay: Option<f64>,
    /// Restart codes used less than this many times per batch on average
    /// (`null`: never).
    #[serde(default = "one")]
    pub restart_threshold: Option<f64>,
}

fn quarter() -> f64 {
    0.25
}

fn one() -> Option<f64> {
    Some(1.0)
}

impl VqVaeConfig {
    /// Checks every field; the error names it (`vqvae.net.<field>`,
    /// `vqvae.<field>`).
    pub fn validate(&self) -> Result<()> {
        let rename = |e: Error, from: &str, to: &str| match e {
            Error::Invalid { what, reason } => Error::invalid(what.replacen(from, to, 1), reason),
            e => e,
        };
        self.net
            .validate()
            .map_err(|e| rename(e, "wave_vae.", "vqvae.net."))?;
        ensure(
            self.commitment.is_finite() && self.commitment >= 0.0,
            "vqvae.commitment",
            || format!("must be a finite weight >= 0, got {}", self.commitment),
        )?;
        self.vq_config().validate().map_err(|e| match e {
            melvae_layers::Error::Invalid { what, reason } => {
                Error::invalid(what.replacen("vq.", "vqvae.", 1), reason)
            }
            e => e.into(),
        })
    }

    /// Samples per code: the product of the strides.
    pub fn hop(&self) -> usize {
        self.net.hop()
    }

    fn vq_config(&self) -> VqConfig {
        VqConfig {
            commitment: self.commitment,
            ema_decay: self.ema_decay,
            restart_threshold: self.restart_threshold,
            ..VqConfig::new(self.codebook_size, self.net.latent_dim)
        }
    }
}

/// What [`VqVae::forward`] returns.
#[derive(Debug)]
pub struct VqVaeOutput {
    /// The decoded audio `[batch, audio_channels, samples]`.
    pub recon: Tensor,
    /// The quantiser's output (codes `[batch, frames]`, losses, usage,
    /// perplexity).
    pub vq: VqOutput,
}

/// The waveform VQ-VAE; see the module docs.
#[derive(Debug)]
pub struct VqVae {
    cfg: VqVaeConfig,
    encoder: WaveEncoder,
    vq: VectorQuantizer,
    decoder: WaveDecoder,
}

impl VqVae {
    /// Builds the model; fails on an invalid config, naming the field.
    pub fn new(cfg: VqVaeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.net.latent_dim;
        Ok(Self {
            encoder: WaveEncoder::with_outputs(cfg.net.clone(), d, vb.pp("encoder"))?,
            vq: VectorQuantizer::new(cfg.vq_config(), vb.pp("vq"))?,
            decoder: WaveDecoder::new(cfg.net.clone(), vb.pp("decoder"))?,
            cfg,
        })
    }

    /// Loads a `vqvae` model file.
    pub fn load(
        path: &std::path::Path,
        device: &candle_core::Device,
        dtype: DType,
    ) -> Result<Self> {
        Ok(crate::model_file::load::<Self>(path, device, dtype)?.0)
    }

    /// The configuration.
    pub fn config(&self) -> &VqVaeConfig {
        &self.cfg
    }

    /// Samples per code.
    pub fn hop(&self) -> usize {
        self.cfg.hop()
    }

    /// The quantiser (codebook, usage, restart sampler state).
    pub fn quantizer(&self) -> &VectorQuantizer {
        &self.vq
    }

    /// The quantiser, to restore its sampler state on resume.
    pub fn quantizer_mut(&mut self) -> &mut VectorQuantizer {
        &mut self.vq
    }

    /// The encoder's vectors `[batch, frames, latent_dim]` of `audio`.
    fn vectors(&self, audio: &Tensor) -> Result<Tensor> {
        let z = self.encoder.features(audio)?;
        Ok(z.transpose(1, 2)?.contiguous()?)
    }

    /// Codes `[batch, samples / hop]` (u32) of `audio` `[batch,
    /// audio_channels, samples]` (samples a positive multiple of the hop).
    pub fn encode(&self, audio: &Tensor) -> Result<Tensor> {
        let z = self.vectors(audio)?;
        let (b, n, d) = z.dims3()?;
        Ok(self.vq.nearest(&z.reshape((b * n, d))?)?.reshape((b, n))?)
    }

    /// Audio `[batch, audio_channels, frames * hop]` of codes `[batch,
    /// frames]` (any integer dtype, each below `codebook_size`).
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        let k = self.cfg.codebook_size;
        let bad = |got: String| Error::Shape {
            what: "vqvae codes".into(),
            expected: format!("[batch, frames] with codes below {k}"),
            got,
        };
        let (_, n) = codes
            .dims2()
            .map_err(|_| bad(format!("{:?}", codes.dims())))?;
        if n == 0 {
            return Err(bad(format!("{:?}", codes.dims())));
        }
        let codes = codes.to_dtype(DType::U32)?;
        let max = codes.max_all()?.to_scalar::<u32>()? as usize;
        if max >= k {
            return Err(bad(format!("a code {max}")));
        }
        let q = self.vq.decode(&codes)?; // [b, n, d]
        self.decoder.forward(&q.transpose(1, 2)?.contiguous()?)
    }

    /// The training pass: encode, quantise (straight-through; with `train`,
    /// EMA updates and restarts), decode. The reconstruction loss is the
    /// caller's (the task's multi-scale STFT loss).
    pub fn forward(&mut self, audio: &Tensor, train: bool) -> Result<VqVaeOutput> {
        let z = self.vectors(audio)?;
        let vq = self.vq.forward(&z, train)?;
        self.decode_output(vq)
    }

    /// The training [`VqVae::forward`] of one data-parallel rank holding an
    /// equal shard of the batch: the codebook updates are the whole
    /// batch's ([`VectorQuantizer::forward_across`]).
    pub fn forward_across(&mut self, audio: &Tensor, ranks: &mut Ranks) -> Result<VqVaeOutput> {
        let z = self.vectors(audio)?;
        let vq = self.vq.forward_across(&z, ranks)?;
        self.decode_output(vq)
    }

    fn decode_output(&self, vq: VqOutput) -> Result<VqVaeOutput> {
        let recon = self
            .decoder
            .forward(&vq.quantized.transpose(1, 2)?.contiguous()?)?;
        Ok(VqVaeOutput { recon, vq })
    }

    /// A streaming encoder (causal models): audio chunks in, the codes of
    /// the frames that became final out.
    pub fn encoder_stream(&self) -> Result<VqEncoderStream<'_>> {
        ensure(self.cfg.net.causal, "vqvae.net.causal", || {
            "streaming needs a causal model".into()
        })?;
        Ok(VqEncoderStream {
            encoder: self.encoder.clone(),
            vq: &self.vq,
        })
    }

    /// A streaming decoder (causal models): codes in, the audio that became
    /// final out.
    pub fn decoder_stream(&self) -> Result<VqDecoderStream<'_>> {
        ensure(self.cfg.net.causal, "vqvae.net.causal", || {
            "streaming needs a causal model".into()
        })?;
        Ok(VqDecoderStream {
            decoder: self.decoder.clone(),
            vq: &self.vq,
            codebook_size: self.cfg.codebook_size,
        })
    }
}

/// Streaming encoding (see [`VqVae::encoder_stream`]): its own encoder
/// state, the model's codebook.
#[derive(Debug, Clone)]
pub struct VqEncoderStream<'a> {
    encoder: WaveEncoder,
    vq: &'a VectorQuantizer,
}

impl VqEncoderStream<'_> {
    /// Feeds audio `[batch, audio_channels, t]` (any `t >= 1`); returns the
    /// codes `[batch, n]` of the frames that became final, if any.
    pub fn push(&mut self, chunk: &Tensor) -> Result<Option<Tensor>> {
        let Some(z) = self.encoder.step(chunk)? else {
            return Ok(None);
        };
        let z = z.transpose(1, 2)?.contiguous()?;
        let (b, n, d) = z.dims3()?;
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(
            self.vq.nearest(&z.reshape((b * n, d))?)?.reshape((b, n))?,
        ))
    }

    /// Numbers carried between chunks.
    pub fn state_elements(&self) -> usize {
        self.encoder.state_elements()
    }
}

/// Streaming decoding (see [`VqVae::decoder_stream`]): its own decoder
/// state, the model's codebook.
#[derive(Debug, Clone)]
pub struct VqDecoderStream<'a> {
    decoder: WaveDecoder,
    vq: &'a VectorQuantizer,
    codebook_size: usize,
}

impl VqDecoderStream<'_> {
    /// Feeds codes `[batch, n]`; returns the audio `[batch, audio_channels,
    /// t]` that became final, if any.
    pub fn push(&mut self, codes: &Tensor) -> Result<Option<Tensor>> {
        let codes = codes.to_dtype(DType::U32)?;
        if codes.elem_count() > 0 {
            let max = codes.max_all()?.to_scalar::<u32>()? as usize;
            if max >= self.codebook_size {
                return Err(Error::Shape {
                    what: "vqvae codes".into(),
                    expected: format!("codes below {}", self.codebook_size),
                    got: format!("a code {max}"),
                });
            }
        }
        // Detached: the stream's state never holds the codebook's graph.
        let q = self
            .vq
            .decode(&codes)?
            .detach()
            .transpose(1, 2)?
            .contiguous()?;
        Ok(self.decoder.step(&q)?.map(|a| a.detach()))
    }

    /// Numbers carried between chunks.
    pub fn state_elements(&self) -> usize {
        self.decoder.state_elements()
    }
}

impl Family for VqVae {
    const NAME: &'static str = "vqvae";
    type Config = VqVaeConfig;

    fn build(cfg: VqVaeConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(cfg, vb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;
    use melvae_layers::testing::{
        check_gradients, max_abs_diff, named_vars, noise, randomize, GradCheck,
    };

    /// 8x compression (strides 2, 4), 16 codes of 4 dims.
    fn tiny(causal: bool) -> VqVaeConfig {
        VqVaeConfig {
            net: WaveVaeConfig {
                sample_rate: 22050,
                audio_channels: 1,
                channels: 4,
                channel_mults: vec![2, 2],
                strides: vec![2, 4],
                dilations: vec![1, 3],
                causal,
                latent_dim: 4,
                bottleneck: Default::default(),
                ..WaveVaeConfig::default()
            },
            codebook_size: 16,
            commitment: 0.25,
            ema_decay: None,
            restart_threshold: None,
        }
    }

    fn build(cfg: VqVaeConfig, dtype: DType, seed: u64) -> (VarMap, VqVae) {
        let vm = VarMap::new();
        let m = VqVae::new(cfg, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
        randomize(&vm, 0.5, seed).unwrap();
        (vm, m)
    }

    #[test]
    fn shapes_at_each_rate() {
        for strides in [vec![2, 4], vec![2, 4, 4], vec![2, 4, 4, 4]] {
            let hop: usize = strides.iter().product();
            let mut cfg = tiny(true);
            cfg.net.channel_mults = vec![2; strides.len()];
            cfg.net.strides = strides;
            let (_, m) = build(cfg, DType::F32, 1);
            let audio = noise(&[2, 1, hop * 5], 1)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let codes = m.encode(&audio).unwrap();
            assert_eq!((codes.dims(), codes.dtype()), (&[2, 5][..], DType::U32));
            let out = m.decode(&codes).unwrap();
            assert_eq!(out.dims(), audio.dims());
        }
    }

    /// Streaming in chunks of any size gives the offline codes and audio.
    #[test]
    fn streaming_equals_offline() {
        let (_, m) = build(tiny(true), DType::F32, 2);
        let audio = noise(&[1, 1, 8 * 12], 3)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let codes = m.encode(&audio).unwrap();
        let mut enc = m.encoder_stream().unwrap();
        let mut got = Vec::new();
        let mut at = 0;
        for size in [5, 1, 17, 30, 43] {
            if let Some(c) = enc.push(&audio.narrow(2, at, size).unwrap()).unwrap() {
                got.extend(c.flatten_all().unwrap().to_vec1::<u32>().unwrap());
            }
            at += size;
        }
        assert_eq!(got, codes.flatten_all().unwrap().to_vec1::<u32>().unwrap());
        let offline = m.decode(&codes).unwrap();
        let mut dec = m.decoder_stream().unwrap();
        let mut parts = Vec::new();
        for (a, n) in [(0, 1), (1, 4), (5, 7)] {
            if let Some(x) = dec.push(&codes.narrow(1, a, n).unwrap()).unwrap() {
                // Trainable weights, but the streamed audio holds no graph.
                assert!(!x.track_op());
                parts.push(x);
            }
        }
        let streamed = Tensor::cat(&parts, 2).unwrap();
        let n = streamed.dim(2).unwrap();
        let d = max_abs_diff(&streamed, &offline.narrow(2, 0, n).unwrap()).unwrap();
        assert!(d < 1e-5, "{d}");
        assert!(n >= 8 * 10, "{n} samples final of 96");
        assert!(VqVae::new(
            tiny(false),
            VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu)
        )
        .unwrap()
        .encoder_stream()
        .is_err());
    }

    /// f64 finite differences of what each part truly differentiates: the
    /// decoder on a loss of the reconstruction, the encoder (and the audio)
    /// on its continuous output, the codebook on the codebook loss.
    #[test]
    fn gradients_match_finite_differences() {
        let (vm, m) = build(tiny(true), DType::F64, 4);
        let m = std::cell::RefCell::new(m);
        let part = |prefix: &str| -> Vec<(String, Var)> {
            named_vars(&vm)
                .into_iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .collect()
        };
        let audio = noise(&[1, 1, 32], 5).unwrap();
        let err = |e: Error| candle_core::Error::Msg(e.to_string());
        check_gradients(&part("decoder."), GradCheck::default(), || {
            let r = m.borrow_mut().forward(&audio, false).map_err(err)?.recon;
            (&r * &r.sin()?)?.sum_all()
        })
        .unwrap_or_else(|e| panic!("decoder: {e}"));
        let a = Var::from_tensor(&audio).unwrap();
        let mut enc = part("encoder.");
        enc.push(("audio".into(), a.clone()));
        check_gradients(&enc, GradCheck::default(), || {
            let z = m.borrow().vectors(a.as_tensor()).map_err(err)?;
            (&z * &z.cos()?)?.sum_all()
        })
        .unwrap_or_else(|e| panic!("encoder: {e}"));
        check_gradients(&part("vq.codebook"), GradCheck::default(), || {
            m.borrow_mut()
                .forward(a.as_tensor(), false)
                .map(|o| o.vq.codebook_loss)
                .map_err(err)
        })
        .unwrap_or_else(|e| panic!("codebook: {e}"));
    }

    fn level(strides: Vec<usize>, upsample: Option<usize>, seed: u64) -> (VqVae, crate::LstmPrior) {
        let mut cfg = tiny(true);
        cfg.net.channel_mults = vec![2; strides.len()];
        cfg.net.strides = strides;
        let (_, vq) = build(cfg, DType::F32, seed);
        let prior_cfg = crate::LstmPriorConfig {
            vocab_size: 16,
            embed_dim: 4,
            hidden: 6,
            layers: 1,
            context: upsample.map(|upsample| crate::ContextConfig {
                vocab_size: 16,
                embed_dim: 4,
                channels: 4,
                dilations: vec![1],
                kernel_size: 3,
                upsample,
                combine: Default::default(),
            }),
        };
        let vm = VarMap::new();
        let prior = crate::LstmPrior::new(
            prior_cfg,
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        randomize(&vm, 0.5, seed).unwrap();
        (vq, prior)
    }

    /// Coarse to fine: each level samples its hop ratio times the codes of
    /// the level above, and the finest level used decodes; the order and
    /// the priors' contexts are checked.
    #[test]
    fn hierarchical_generation_respects_the_length_ratios() {
        let h = Hierarchy::new(vec![
            level(vec![2, 4, 4, 4], None, 1),
            level(vec![2, 4, 4], Some(4), 2),
            level(vec![2, 4], Some(4), 3),
        ])
        .unwrap();
        assert_eq!(h.hops(), [128, 32, 8]);
        let opts = crate::SamplingOptions::default();
        let s = h.generate(300, 3, &opts, &Device::Cpu).unwrap();
        let lens: Vec<usize> = s.codes.iter().map(|c| c.dim(1).unwrap()).collect();
        assert_eq!(lens, [3, 12, 48]);
        assert_eq!(s.audio.dims(), &[1, 1, 384]);
        // Stopping at the coarsest level decodes there.
        let s = h.generate(300, 1, &opts, &Device::Cpu).unwrap();
        assert_eq!((s.codes.len(), s.audio.dim(2).unwrap()), (1, 384));
        // Same seed, same codes.
        let again = h.generate(300, 1, &opts, &Device::Cpu).unwrap();
        assert_eq!(
            again.codes[0].to_vec2::<u32>().unwrap(),
            s.codes[0].to_vec2::<u32>().unwrap()
        );
        let e = h
            .generate(300, 4, &opts, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vqwave generators"), "{e}");
        let e = Hierarchy::new(vec![level(vec![2, 4], Some(4), 1)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("level 0") && e.contains("no context"), "{e}");
        let e = Hierarchy::new(vec![
            level(vec![2, 4, 4], None, 1),
            level(vec![2, 4], Some(2), 2),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("level 1") && e.contains("hop ratio 32 / 8"),
            "{e}"
        );
    }

    /// The level and its prior run in half precision (as `training.dtype:
    /// bf16` trains them on CUDA; the CPU runs the same graph): loss and
    /// gradients stay in the variables' dtype, finite, and the losses are
    /// the f32 model's within bf16 rounding.
    #[test]
    fn half_precision_losses_and_gradients() {
        let audio = noise(&[2, 1, 8 * 12], 9).unwrap();
        let loss = |dtype: DType| {
            let (vm, mut m) = build(tiny(true), dtype, 10);
            let x = audio.to_dtype(dtype).unwrap();
            let out = m.forward(&x, true).unwrap();
            let l = ((&out.recon - &x)
                .unwrap()
                .abs()
                .unwrap()
                .mean_all()
                .unwrap()
                + &out.vq.loss)
                .unwrap();
            let grads = l.backward().unwrap();
            for (name, v) in named_vars(&vm) {
                if let Some(g) = grads.get(v.as_tensor()) {
                    assert_eq!(g.dtype(), dtype, "{name}");
                    let g = g.to_dtype(DType::F32).unwrap();
                    let s = g
                        .sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(s.is_finite(), "{name}");
                }
            }
            l.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
        };
        let (full, half) = (loss(DType::F32), loss(DType::BF16));
        assert!((full - half).abs() < 0.03 * full.abs(), "{full} vs {half}");
        let (_, prior) = level(vec![2, 4], Some(4), 11);
        let codes = Tensor::new(&[[1u32, 2, 3, 4, 5, 6, 0, 1]], &Device::Cpu).unwrap();
        let ctx = Tensor::new(&[[0u32, 4]], &Device::Cpu).unwrap();
        let vm = VarMap::new();
        let half_prior = crate::LstmPrior::new(
            prior.config().clone(),
            VarBuilder::from_varmap(&vm, DType::BF16, &Device::Cpu),
        )
        .unwrap();
        randomize(&vm, 0.5, 11).unwrap();
        let full = prior.loss(&codes, Some(&ctx)).unwrap();
        let half = half_prior.loss(&codes, Some(&ctx)).unwrap();
        // The cross-entropy is reduced in f32; the gradients reach the
        // bf16 weights in bf16.
        let grads = half.backward().unwrap();
        for (name, v) in named_vars(&vm) {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(g.dtype(), DType::BF16, "{name}");
        }
        let (f, h) = (
            full.to_scalar::<f32>().unwrap(),
            half.to_dtype(DType::F32)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        );
        assert!((f - h).abs() < 0.03 * f, "{f} vs {h}");
    }

    /// Streaming generation samples the levels together and gives the
    /// offline codes and audio, whatever the chunk, with audio arriving
    /// piece by piece.
    #[test]
    fn streamed_generation_equals_offline() {
        let h = Hierarchy::new(vec![
            level(vec![2, 4, 4, 4], None, 4),
            level(vec![2, 4, 4], Some(4), 5),
            level(vec![2, 4], Some(4), 6),
        ])
        .unwrap();
        let opts = crate::SamplingOptions {
            temperature: 0.8,
            seed: 11,
            ..Default::default()
        };
        for upto in [1, 3] {
            let offline = h.generate(2000, upto, &opts, &Device::Cpu).unwrap();
            for chunk in [1, 7, 1000] {
                let mut pieces = 0;
                let s = h
                    .generate_stream(2000, upto, chunk, &opts, &Device::Cpu, |a| {
                        assert!(!a.track_op());
                        pieces += 1;
                        Ok(())
                    })
                    .unwrap();
                for (a, b) in s.codes.iter().zip(&offline.codes) {
                    assert_eq!(a.to_vec2::<u32>().unwrap(), b.to_vec2::<u32>().unwrap());
                }
                assert_eq!(s.codes.len(), upto);
                assert_eq!(
                    s.audio.dims(),
                    offline.audio.dims(),
                    "upto {upto} chunk {chunk}"
                );
                let d = max_abs_diff(&s.audio, &offline.audio).unwrap();
                assert!(d < 1e-5, "upto {upto} chunk {chunk}: {d}");
                let codes = offline.codes[upto - 1].dim(1).unwrap();
                assert_eq!(pieces, codes.div_ceil(chunk), "upto {upto} chunk {chunk}");
            }
        }
        let e = h
            .generate_stream(100, 3, 0, &opts, &Device::Cpu, |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("vqwave stream chunk"), "{e}");
    }

    /// A context block equals the same rows of the whole sequence's
    /// features, at the start, inside and at the end; too few known codes
    /// are refused.
    #[test]
    fn context_blocks_equal_the_whole_sequence() {
        let (_, prior) = level(vec![2, 4], Some(4), 7);
        let mut cfg = prior.config().clone();
        if let Some(c) = cfg.context.as_mut() {
            c.dilations = vec![1, 2, 4];
        }
        let vm = VarMap::new();
        let prior =
            crate::LstmPrior::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
                .unwrap();
        randomize(&vm, 0.5, 8).unwrap();
        assert_eq!(prior.context_radius(), 1 + 1 + 2 + 4);
        let coarse: Vec<u32> = (0..30).map(|i| (i * 7 % 16) as u32).collect();
        let all = Tensor::new(coarse.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let whole = prior.context_block(&all, 0, 30, 0, 30).unwrap();
        for (first, count) in [(0usize, 3usize), (12, 5), (27, 3), (29, 1)] {
            let need = (first + count + 8).min(30);
            let start = first.saturating_sub(8);
            let window = all.narrow(1, start, need - start).unwrap();
            let b = prior
                .context_block(&window, start, 30, first, count)
                .unwrap();
            let d = max_abs_diff(&b, &whole.narrow(1, first * 4, count * 4).unwrap()).unwrap();
            assert!(d < 1e-6, "{first}+{count}: {d}");
        }
        let e = prior
            .context_block(&all.narrow(1, 0, 20).unwrap(), 0, 30, 12, 5)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("context block") && e.contains("frames 0..20"),
            "{e}"
        );
        let e = prior
            .context_block(&all.narrow(1, 6, 20).unwrap(), 6, 30, 12, 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("frames 4..25"), "{e}");
    }

    #[test]
    fn bad_configs_and_inputs_are_named() {
        let mut cfg = tiny(true);
        cfg.net.strides = vec![];
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("vqvae.net.strides"), "{e}");
        let cfg = VqVaeConfig {
            codebook_size: 0,
            ..tiny(true)
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("vqvae.codebook_size"), "{e}");
        let (_, m) = build(tiny(true), DType::F32, 6);
        let e = m
            .decode(&Tensor::new(&[[3u32, 16]], &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("vqvae codes") && e.contains("a code 16"), "{e}");
        let e = m
            .encode(&Tensor::zeros((1, 1, 12), DType::F32, &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("multiple of the hop 8"), "{e}");
    }
}

/// A hierarchy of VQ-VAE levels and their priors, coarsest first (the
/// seed's generators 512 -> 128 -> 32 -> 8): the coarsest prior samples
/// unconditionally, each finer one conditioned on the codes just sampled
/// above it, and the finest level reached decodes its codes to audio.
#[derive(Debug)]
pub struct Hierarchy {
    levels: Vec<(VqVae, crate::LstmPrior)>,
}

/// What [`Hierarchy::generate`] returns.
#[derive(Debug)]
pub struct HierarchySample {
    /// Each level's codes `[1, frames]`, coarsest first.
    pub codes: Vec<Tensor>,
    /// The audio `[1, audio_channels, samples]` decoded by the finest level
    /// used.
    pub audio: Tensor,
}

impl Hierarchy {
    /// Levels coarsest first: hops must fall level by level, the coarsest
    /// prior take no context, and every other prior's context be the level
    /// above (its vocabulary and hop ratio); errors name the level.
    pub fn new(levels: Vec<(VqVae, crate::LstmPrior)>) -> Result<Self> {
        ensure(!levels.is_empty(), "vqwave hierarchy", || {
            "needs at least one level".into()
        })?;
        for (i, (vq, prior)) in levels.iter().enumerate() {
            let name = format!("vqwave level {i} ({}x)", vq.hop());
            let pc = prior.config();
            ensure(pc.vocab_size == vq.config().codebook_size, &name, || {
                format!(
                    "the prior's vocab_size {} is not the VQ-VAE's codebook_size {}",
                    pc.vocab_size,
                    vq.config().codebook_size
                )
            })?;
            match (i.checked_sub(1).map(|j| &levels[j].0), &pc.context) {
                (None, None) => {}
                (None, Some(_)) => {
                    return Err(Error::invalid(
                        name,
                        "the coarsest prior must take no context",
                    ))
                }
                (Some(_), None) => {
                    return Err(Error::invalid(
                        name,
                        "a finer level's prior needs the coarser level's codes as context",
                    ))
                }
                (Some(above), Some(c)) => {
                    let ratio = above.hop() / vq.hop().max(1);
                    ensure(
                        above.hop() > vq.hop()
                            && above.hop() % vq.hop() == 0
                            && ratio == c.upsample,
                        &name,
                        || {
                            format!(
                                "its prior's context.upsample {} is not the hop ratio {} / {}",
                                c.upsample,
                                above.hop(),
                                vq.hop()
                            )
                        },
                    )?;
                    ensure(c.vocab_size == above.config().codebook_size, &name, || {
                        format!(
                            "its prior's context.vocab_size {} is not the coarser codebook_size {}",
                            c.vocab_size,
                            above.config().codebook_size
                        )
                    })?;
                }
            }
        }
        Ok(Self { levels })
    }

    /// The audio's sample rate (the finest level's).
    pub fn sample_rate(&self) -> u32 {
        self.levels
            .last()
            .map_or(0, |(v, _)| v.config().net.sample_rate)
    }

    /// The levels' hops, coarsest first.
    pub fn hops(&self) -> Vec<usize> {
        self.levels.iter().map(|(v, _)| v.hop()).collect()
    }

    /// Each level's code count for about `samples` of audio through the
    /// first `upto` levels: the coarsest rounds up to its hop, each finer
    /// level has its hop ratio times the codes above.
    fn lengths(&self, samples: usize, upto: usize) -> Result<Vec<usize>> {
        ensure(
            upto >= 1 && upto <= self.levels.len(),
            "vqwave generators",
            || format!("must be 1..={}, got {upto}", self.levels.len()),
        )?;
        ensure(samples > 0, "vqwave length", || "must be > 0".into())?;
        let mut lens = vec![samples.div_ceil(self.levels[0].0.hop())];
        for w in self.levels[..upto].windows(2) {
            let above = lens[lens.len() - 1];
            lens.push(above * (w[0].0.hop() / w[1].0.hop()));
        }
        Ok(lens)
    }

    /// Each level's draws are seeded from `opts.seed` and the level.
    fn level_options(opts: &crate::SamplingOptions, level: usize) -> crate::SamplingOptions {
        crate::SamplingOptions {
            seed: opts.seed ^ (level as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ..*opts
        }
    }

    /// Samples about `samples` of audio (rounded up to the coarsest hop)
    /// through the first `upto` levels (1: the coarsest only), each level's
    /// draws seeded from `opts.seed` and the level; the finest level used
    /// decodes.
    pub fn generate(
        &self,
        samples: usize,
        upto: usize,
        opts: &crate::SamplingOptions,
        device: &candle_core::Device,
    ) -> Result<HierarchySample> {
        let lens = self.lengths(samples, upto)?;
        let mut codes: Vec<Tensor> = Vec::with_capacity(upto);
        for (i, ((_, prior), &len)) in self.levels.iter().zip(&lens).enumerate() {
            let level_opts = Self::level_options(opts, i);
            codes.push(prior.sample(1, len, codes.last(), &level_opts, device)?);
        }
        let last = codes
            .last()
            .ok_or_else(|| Error::invalid("vqwave", "no level sampled"))?;
        let audio = self.levels[upto - 1].0.decode(last)?;
        Ok(HierarchySample { codes, audio })
    }

    /// [`Hierarchy::generate`], streamed: all levels are sampled together,
    /// each coarser level only as far ahead as the finer one's context
    /// needs ([`crate::LstmPrior::context_radius`]), and every `chunk`
    /// codes of the finest level used go through its VQ-VAE's streaming
    /// decoder (a causal model) to `on_audio` (`[1, audio_channels, t]`,
    /// the samples that became final, in order). Codes and audio equal
    /// [`Hierarchy::generate`]'s with the same options, as long as the
    /// context features agree to the last bit (see
    /// [`crate::LstmPrior::context_block`]: they do for the bundled
    /// configs; a wider context model may round differently and, where a
    /// draw sits on a boundary, diverge); the returned sample holds them
    /// all.
    pub fn generate_stream(
        &self,
        samples: usize,
        upto: usize,
        chunk: usize,
        opts: &crate::SamplingOptions,
        device: &candle_core::Device,
        mut on_audio: impl FnMut(&Tensor) -> Result<()>,
    ) -> Result<HierarchySample> {
        ensure(chunk > 0, "vqwave stream chunk", || "must be > 0".into())?;
        let lens = self.lengths(samples, upto)?;
        let mut levels = self.levels[..upto]
            .iter()
            .enumerate()
            .map(|(i, (_, prior))| {
                Ok(StreamLevel {
                    prior,
                    sampler: prior.sampler(1, &Self::level_options(opts, i))?,
                    codes: Vec::with_capacity(lens[i]),
                    block: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let finest = upto - 1;
        let mut decoder = self.levels[finest].0.decoder_stream()?;
        let mut parts = Vec::new();
        while levels[finest].codes.len() < lens[finest] {
            let done = levels[finest].codes.len();
            let to = (done + chunk).min(lens[finest]);
            advance(&mut levels, &lens, finest, to, device)?;
            let new = Tensor::new(&levels[finest].codes[done..to], device)?.unsqueeze(0)?;
            if let Some(audio) = decoder.push(&new)? {
                on_audio(&audio)?;
                parts.push(audio);
            }
        }
        let codes = levels
            .iter()
            .zip(&lens)
            .map(|(l, &n)| Ok(Tensor::from_slice(&l.codes, (1, n), device)?))
            .collect::<Result<Vec<_>>>()?;
        let audio = Tensor::cat(&parts, 2)?;
        Ok(HierarchySample { codes, audio })
    }
}

/// One level's sampling state in [`Hierarchy::generate_stream`].
struct StreamLevel<'a> {
    prior: &'a crate::LstmPrior,
    sampler: crate::priors::lstm::PriorSampler,
    codes: Vec<u32>,
    /// Context features of this level's codes `from..from + rows`: `(from,
    /// [1, rows, ...])`.
    block: Option<(usize, Tensor)>,
}

/// Coarse frames whose context features are computed at once.
const CONTEXT_BLOCK: usize = 8;

/// Samples level `i` up to `target` codes, the coarser levels only as far
/// as its context needs.
fn advance(
    levels: &mut [StreamLevel],
    lens: &[usize],
    i: usize,
    target: usize,
    device: &candle_core::Device,
) -> Result<()> {
    while levels[i].codes.len() < target {
        let t = levels[i].codes.len();
        let row = if i == 0 {
            None
        } else {
            let stale = match &levels[i].block {
                Some((from, b)) => t >= from + b.dim(1)?,
                None => true,
            };
            if stale {
                let prior = levels[i].prior;
                let up = prior.config().context.as_ref().map_or(1, |c| c.upsample);
                let (first, total) = (t / up, lens[i - 1]);
                let count = CONTEXT_BLOCK.min(total - first);
                let r = prior.context_radius();
                let need = (first + count + r).min(total);
                advance(levels, lens, i - 1, need, device)?;
                // Only the window the block reads (constant work per block).
                let start = first.saturating_sub(r);
                let window = &levels[i - 1].codes[start..need];
                let known = Tensor::new(window, device)?.unsqueeze(0)?;
                let b = prior.context_block(&known, start, total, first, count)?;
                levels[i].block = Some((first * up, b));
            }
            levels[i]
                .block
                .as_ref()
                .map(|(from, b)| b.narrow(1, t - from, 1))
                .transpose()?
        };
        let l = &mut levels[i];
        l.prior.sample_step(&mut l.sampler, row.as_ref())?;
        l.codes.push(l.sampler.next[0]);
    }
    Ok(())
}
