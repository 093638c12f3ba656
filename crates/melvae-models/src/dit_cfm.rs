//! The DiT conditional flow-matching decoder of the mel VAE: predicts the
//! velocity that carries noise to a mel spectrogram, conditioned on the
//! latent and the flow time; sampled with Euler or midpoint steps and
//! classifier-free guidance.

use candle_core::{Device, Tensor, D};
use candle_nn::{Init, Module, VarBuilder};
use melvae_dsp::SplitMix64;
use melvae_layers::Linear;
use melvae_layers::{
    flops, modulate, time_dtype, AdaLnZero, AttentionConfig, BlockConfig, DitBlock,
    FeedForwardConfig, FfnActivation, LayerNorm, Mode, TimestepEmbedder,
};
use serde::{Deserialize, Serialize};

use crate::error::ensure;
use crate::{Error, Result};

/// The `cfm:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CfmConfig {
    /// Mel bands produced.
    pub mel_channels: usize,
    /// Width of the DiT.
    pub unet_dim: usize,
    /// DiT blocks.
    pub unet_depth: usize,
    /// Attention heads.
    pub unet_heads: usize,
    /// Dropout inside the blocks (training).
    pub unet_dropout_rate: f64,
    /// Flow-matching `sigma_min`.
    pub sigma: f64,
    /// Probability of dropping the condition in training (classifier-free
    /// guidance needs the unconditional model).
    #[serde(default = "default_cond_drop")]
    pub cond_drop_prob: f64,
    /// Log-mels are normalised as `(mel - mel_mean) / mel_std` for flow
    /// matching (defaults suit `vocos-24k` speech: silence is ln(1e-7) = -16).
    #[serde(default = "default_mel_mean")]
    pub mel_mean: f64,
    /// See `mel_mean`.
    #[serde(default = "default_mel_std")]
    pub mel_std: f64,
    /// How training draws the flow time `t` (0: noise, 1: data).
    #[serde(default)]
    pub time_sampling: TimeSampling,
    /// Weights the flow-matching loss of the lowest mel bands above the
    /// rest (`{bands: 30, weight: 3.0}`), so training spends more on the
    /// harmonic comb of low voices; `None` (the reference): every band
    /// alike. See [`LowBandWeight`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_band_weight: Option<LowBandWeight>,
    /// The temperature (scale of the initial noise) this model's
    /// reconstructions are sampled at unless a caller says otherwise
    /// (`SampleOptions::reconstruction`: `reconstruct`, `evaluate`, the
    /// quickstart, training samples). It belongs to the model because the
    /// best value depends on `mel_std`: 0.8 for the reference's 3, 0.1 for
    /// the quickstart's 1 (docs/models/mel_vae.md).
    #[serde(default = "default_reconstruction_temperature")]
    pub reconstruction_temperature: f64,
}

/// The distribution of the flow time `t` in training
/// ([`CfmConfig::time_sampling`]); YAML `{kind: uniform}` or
/// `{kind: logit_normal, mean: 0.0, std: 1.0}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum TimeSampling {
    /// `t ~ U[0, 1)` (the reference).
    #[default]
    Uniform,
    /// `t = sigmoid(mean + std * n)`, `n ~ N(0, 1)` (Esser et al. 2024):
    /// training concentrates on times near `sigmoid(mean)`; a positive
    /// `mean` leans towards the data end, where fine detail is decided.
    LogitNormal {
        /// Location of the underlying normal.
        mean: f64,
        /// Scale of the underlying normal (> 0).
        std: f64,
    },
}

/// A heavier flow-matching loss on the lowest mel bands
/// ([`CfmConfig::low_band_weight`]). Bands `0..bands` count `weight` times
/// as much as the others, and the weights are scaled to a mean of 1 over
/// all bands, so the loss stays on the unweighted loss's scale (and the KL
/// weight keeps its meaning). For the `vocos-24k` mel (100 bands up to 12
/// kHz), 30 bands are those below 1 kHz, where a 100 Hz voice's harmonics
/// are 2-4 bands apart.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LowBandWeight {
    /// How many of the lowest bands are weighted (1 to `mel_channels - 1`).
    pub bands: usize,
    /// Their weight relative to the other bands (finite, > 0).
    pub weight: f64,
}

impl LowBandWeight {
    /// The weight of each of `mel_channels` bands, low to high, with mean 1.
    /// Meant for a config that passed [`CfmConfig::validate`]: `bands` above
    /// `mel_channels` counts as all of them (every weight 1), and a `weight`
    /// that is not finite and > 0 gives weights that are not either.
    pub fn band_weights(&self, mel_channels: usize) -> Vec<f64> {
        let low = self.bands.min(mel_channels);
        let mean = (low as f64 * self.weight + (mel_channels - low) as f64) / mel_channels as f64;
        (0..mel_channels)
            .map(|i| if i < low { self.weight } else { 1.0 } / mean)
            .collect()
    }
}

impl TimeSampling {
    /// One flow time in [0, 1] from `rng` (uniform: one draw, as before
    /// this option existed; logit-normal: two, Box-Muller).
    pub fn draw(&self, rng: &mut melvae_dsp::SplitMix64) -> f64 {
        match *self {
            Self::Uniform => rng.next_f64(),
            Self::LogitNormal { mean, std } => {
                let (u1, u2) = (1.0 - rng.next_f64(), rng.next_f64());
                let n = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                1.0 / (1.0 + (-(mean + std * n)).exp())
            }
        }
    }
}

fn default_mel_mean() -> f64 {
    -5.0
}

fn default_mel_std() -> f64 {
    3.0
}

fn default_reconstruction_temperature() -> f64 {
    0.8
}

fn default_cond_drop() -> f64 {
    0.1
}

impl Default for CfmConfig {
    /// The reference configuration: 512 wide, 6 blocks, 8 heads, no
    /// dropout, sigma 1e-5, 100 mels, condition dropped 10% of the time.
    fn default() -> Self {
        Self {
            mel_channels: 100,
            unet_dim: 512,
            unet_depth: 6,
            unet_heads: 8,
            unet_dropout_rate: 0.0,
            sigma: 1e-5,
            cond_drop_prob: 0.1,
            mel_mean: -5.0,
            mel_std: 3.0,
            time_sampling: TimeSampling::Uniform,
            low_band_weight: None,
            reconstruction_temperature: 0.8,
        }
    }
}

impl CfmConfig {
    /// Checks every field; the error names it (`cfm.<field>`).
    pub fn validate(&self) -> Result<()> {
        ensure(self.mel_channels > 0, "cfm.mel_channels", || {
            "must be > 0".into()
        })?;
        ensure(self.unet_depth > 0, "cfm.unet_depth", || {
            "must be > 0".into()
        })?;
        ensure(
            self.unet_heads > 0
                && self.unet_dim % self.unet_heads == 0
                && (self.unet_dim / self.unet_heads) % 2 == 0,
            "cfm.unet_heads",
            || {
                format!(
                    "{} heads must divide unet_dim {} into an even head size",
                    self.unet_heads, self.unet_dim
                )
            },
        )?;
        ensure(
            (0.0..1.0).contains(&self.unet_dropout_rate),
            "cfm.unet_dropout_rate",
            || "must be in [0, 1)".into(),
        )?;
        ensure((0.0..1.0).contains(&self.sigma), "cfm.sigma", || {
            format!("must be in [0, 1), got {}", self.sigma)
        })?;
        ensure(
            (0.0..1.0).contains(&self.cond_drop_prob),
            "cfm.cond_drop_prob",
            || "must be in [0, 1)".into(),
        )?;
        ensure(self.mel_std > 0.0, "cfm.mel_std", || {
            format!("must be > 0, got {}", self.mel_std)
        })?;
        let t = self.reconstruction_temperature;
        ensure(
            t.is_finite() && t >= 0.0,
            "cfm.reconstruction_temperature",
            || format!("must be finite and >= 0, got {t}"),
        )?;
        if let TimeSampling::LogitNormal { mean, std } = self.time_sampling {
            ensure(
                mean.is_finite() && std.is_finite() && std > 0.0,
                "cfm.time_sampling",
                || format!("logit_normal needs a finite mean and std > 0, got {mean}, {std}"),
            )?;
        }
        if let Some(LowBandWeight { bands, weight }) = self.low_band_weight {
            ensure(
                bands > 0 && bands < self.mel_channels,
                "cfm.low_band_weight.bands",
                || {
                    format!(
                        "must be 1 to {} (mel_channels - 1), got {bands}",
                        self.mel_channels - 1
                    )
                },
            )?;
            ensure(
                weight.is_finite() && weight > 0.0,
                "cfm.low_band_weight.weight",
                || format!("must be finite and > 0, got {weight}"),
            )?;
        }
        Ok(())
    }
}

/// Sinusoidal features of the flow time fed to the timestep embedder.
const TIME_FREQ_DIM: usize = 256;

impl CfmConfig {
    /// A DiT block of the decoder: non-causal, rotary, GELU feed-forward
    /// of `4 * unet_dim`, conditioned on a `unet_dim` vector.
    pub fn block_config(&self) -> BlockConfig {
        let d = self.unet_dim;
        BlockConfig {
            attention: AttentionConfig {
                bias: true,
                rotary_base: Some(10000.0),
                dropout: self.unet_dropout_rate,
                ..AttentionConfig::new(d, self.unet_heads)
            },
            ffn: FeedForwardConfig {
                dim: d,
                hidden: 4 * d,
                activation: FfnActivation::Gelu,
                dropout: self.unet_dropout_rate,
                bias: true,
            },
            dropout: self.unet_dropout_rate,
            norm_eps: 1e-6,
        }
    }

    /// Model FLOPs of [`DitDecoder::forward`] on `[batch, mel, frames]`
    /// with latents of `latent_dim` (the convention of
    /// [`melvae_layers::flops`]).
    pub fn forward_flops(&self, latent_dim: usize, batch: usize, frames: usize) -> f64 {
        let (d, rows) = (self.unet_dim, batch * frames);
        flops::linear(rows, self.mel_channels + latent_dim, d)
            + flops::linear(batch, TIME_FREQ_DIM, d)
            + flops::linear(batch, d, d)
            + self.unet_depth as f64 * flops::dit_block(&self.block_config(), d, batch, frames)
            + flops::linear(batch, d, 2 * d)
            + flops::linear(rows, d, self.mel_channels)
    }
}

/// ODE solver for sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Solver {
    /// `x += dt v(x, t)`: first order.
    Euler,
    /// `x += dt v(x + dt/2 v(x, t), t + dt/2)`: second order.
    Midpoint,
}

/// Integrates `dx/dt = v(x, t)` from `t = 0` to 1 in `steps` equal steps.
pub fn integrate(
    x0: Tensor,
    steps: usize,
    solver: Solver,
    mut v: impl FnMut(&Tensor, f64) -> Result<Tensor>,
) -> Result<Tensor> {
    ensure(steps > 0, "num_steps", || "must be > 0".into())?;
    let dt = 1.0 / steps as f64;
    let mut x = x0;
    for i in 0..steps {
        let t = i as f64 * dt;
        x = match solver {
            Solver::Euler => (&x + (v(&x, t)? * dt)?)?,
            Solver::Midpoint => {
                let mid = (&x + (v(&x, t)? * (dt / 2.0))?)?;
                (&x + (v(&mid, t + dt / 2.0)? * dt)?)?
            }
        };
    }
    Ok(x)
}

/// Standard normal noise of `shape` from `rng` (host-side, so sampling and
/// training noise are reproducible from a seed).
pub fn normal_noise(shape: &[usize], rng: &mut SplitMix64, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// The DiT decoder.
///
/// Parameters: `in_proj` (mel + latent -> unet_dim), `time`
/// (`mlp.0`, `mlp.2`), `blocks.{i}`, `final_ada`, `out` (zero-initialised).
#[derive(Debug, Clone)]
pub struct DitDecoder {
    cfg: CfmConfig,
    latent_dim: usize,
    compress: usize,
    in_proj: Linear,
    time: TimestepEmbedder,
    blocks: Vec<DitBlock>,
    final_norm: LayerNorm,
    final_ada: AdaLnZero,
    out: Linear,
}

impl DitDecoder {
    /// A decoder for latents of `latent_dim` at `1 / compress` of the mel
    /// frame rate.
    pub fn new(cfg: CfmConfig, latent_dim: usize, compress: usize, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.unet_dim;
        let block = cfg.block_config();
        let blocks = (0..cfg.unet_depth)
            .map(|i| DitBlock::new(block, d, vb.pp("blocks").pp(i)))
            .collect::<melvae_layers::Result<_>>()?;
        let out_w =
            vb.pp("out")
                .get_with_hints((cfg.mel_channels, d), "weight", Init::Const(0.0))?;
        let out_b = vb
            .pp("out")
            .get_with_hints(cfg.mel_channels, "bias", Init::Const(0.0))?;
        Ok(Self {
            in_proj: melvae_layers::linear(cfg.mel_channels + latent_dim, d, vb.pp("in_proj"))?,
            time: TimestepEmbedder::new(d, TIME_FREQ_DIM, vb.pp("time"))?,
            blocks,
            final_norm: LayerNorm::new(d, 1e-6, false, vb.pp("final_norm"))?,
            final_ada: AdaLnZero::new(d, d, 2, vb.pp("final_ada"))?,
            out: Linear::new(out_w, Some(out_b)),
            latent_dim,
            compress,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CfmConfig {
        &self.cfg
    }

    /// The velocity at `x_t` (`[batch, mel, frames]`) and flow time `t`
    /// (`[batch]`), given the latent `cond` (`[batch, frames / C, latent]`;
    /// zeros mean "unconditional"). Returns `[batch, mel, frames]`.
    pub fn forward(&self, x_t: &Tensor, t: &Tensor, cond: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, m, frames) = x_t.dims3()?;
        if m != self.cfg.mel_channels {
            return Err(Error::Shape {
                what: "decoder input".into(),
                expected: format!("[batch, {}, frames]", self.cfg.mel_channels),
                got: format!("{:?}", x_t.dims()),
            });
        }
        let want = [b, frames / self.compress, self.latent_dim];
        if frames % self.compress != 0 || cond.dims() != want {
            return Err(Error::Shape {
                what: "decoder condition".into(),
                expected: format!("{want:?} (frames a multiple of {})", self.compress),
                got: format!("{:?}", cond.dims()),
            });
        }
        // Latent frame k conditions mel frames kC .. (k+1)C.
        let up = cond
            .unsqueeze(2)?
            .repeat((1, 1, self.compress, 1))?
            .reshape((b, frames, self.latent_dim))?;
        let h = Tensor::cat(
            &[&x_t.transpose(1, 2)?, &up.to_dtype(x_t.dtype())?],
            D::Minus1,
        )?;
        let mut h = self.in_proj.forward(&h)?;
        let c = self.time.forward(t)?;
        for blk in &self.blocks {
            h = blk.forward(&h, &c, None, mode)?;
        }
        let m = self.final_ada.forward(&c)?;
        let h = modulate(&self.final_norm.forward(&h)?, &m[0], &m[1])?;
        Ok(self.out.forward(&h)?.transpose(1, 2)?.contiguous()?)
    }

    /// Velocity with classifier-free guidance:
    /// `v_u + g (v_c - v_u)` (one batched forward); `g = 1` is purely
    /// conditional.
    pub fn guided(
        &self,
        x: &Tensor,
        t: &Tensor,
        cond: &Tensor,
        guidance_scale: f64,
    ) -> Result<Tensor> {
        if guidance_scale == 1.0 {
            return self.forward(x, t, cond, Mode::Eval);
        }
        let b = x.dim(0)?;
        let v = self.forward(
            &Tensor::cat(&[x, x], 0)?,
            &Tensor::cat(&[t, t], 0)?,
            &Tensor::cat(&[cond, &cond.zeros_like()?], 0)?,
            Mode::Eval,
        )?;
        let (vc, vu) = (v.narrow(0, 0, b)?, v.narrow(0, b, b)?);
        Ok((&vu + ((vc - &vu)? * guidance_scale)?)?)
    }

    /// Samples mels `[batch, mel, frames]` for latents `cond`: noise scaled
    /// by `temperature` (from `seed`) integrated to `t = 1` in `num_steps`.
    ///
    /// Inference only: each velocity is detached from the autograd graph,
    /// so memory stays that of one decoder evaluation instead of growing
    /// with the steps (the result is not differentiable).
    pub fn sample(
        &self,
        cond: &Tensor,
        num_steps: usize,
        temperature: f64,
        guidance_scale: f64,
        solver: Solver,
        seed: u64,
    ) -> Result<Tensor> {
        let (b, k, _) = cond.dims3()?;
        let frames = k * self.compress;
        let mut rng = SplitMix64::new(seed);
        let x0 = (normal_noise(&[b, self.cfg.mel_channels, frames], &mut rng, cond.device())?
            .to_dtype(cond.dtype())?
            * temperature)?;
        let cond = cond.detach();
        integrate(x0, num_steps, solver, |x, t| {
            let tt = Tensor::full(t, b, cond.device())?.to_dtype(time_dtype(cond.dtype()))?;
            Ok(self.guided(x, &tt, &cond, guidance_scale)?.detach())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};
    use candle_nn::VarMap;
    use melvae_layers::testing::{check_module, max_abs_diff, noise, randomize};

    fn tiny() -> CfmConfig {
        CfmConfig {
            mel_channels: 6,
            unet_dim: 8,
            unet_depth: 1,
            unet_heads: 2,
            unet_dropout_rate: 0.0,
            sigma: 1e-5,
            cond_drop_prob: 0.1,
            mel_mean: -5.0,
            mel_std: 3.0,
            time_sampling: TimeSampling::Uniform,
            low_band_weight: None,
            reconstruction_temperature: 0.8,
        }
    }

    #[test]
    fn low_band_weights_keep_the_mean_and_bad_ones_are_named() {
        let w = LowBandWeight {
            bands: 3,
            weight: 3.0,
        }
        .band_weights(10);
        // 3 bands at 3x the other 7: mean weight 1.6 before scaling.
        let (low, high) = (3.0 / 1.6, 1.0 / 1.6);
        for (i, &x) in w.iter().enumerate() {
            let want = if i < 3 { low } else { high };
            assert!((x - want).abs() < 1e-12, "band {i}: {x} vs {want}");
        }
        assert!((w.iter().sum::<f64>() / 10.0 - 1.0).abs() < 1e-12);
        let yaml = |lbw: &str| {
            serde_yaml::from_str::<CfmConfig>(&format!(
                "{{mel_channels: 6, unet_dim: 8, unet_depth: 1, unet_heads: 2, \
                 unet_dropout_rate: 0.0, sigma: 1.0e-5, low_band_weight: {lbw}}}"
            ))
        };
        let c = yaml("{bands: 2, weight: 4.0}").unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.low_band_weight,
            Some(LowBandWeight {
                bands: 2,
                weight: 4.0
            })
        );
        for (lbw, key) in [
            ("{bands: 0, weight: 3.0}", "cfm.low_band_weight.bands"),
            ("{bands: 6, weight: 3.0}", "cfm.low_band_weight.bands"),
            ("{bands: 2, weight: 0.0}", "cfm.low_band_weight.weight"),
            ("{bands: 2, weight: .nan}", "cfm.low_band_weight.weight"),
        ] {
            let e = yaml(lbw).unwrap().validate().unwrap_err().to_string();
            assert!(e.contains(key), "{lbw}: {e}");
        }
        let e = yaml("{bands: 2, weigth: 3.0}").unwrap_err().to_string();
        assert!(e.contains("weigth"), "{e}");
        // Unset, it is not written: configs and model files from before
        // the key read and write as they did.
        let c = yaml("null").unwrap();
        assert_eq!(c.low_band_weight, None);
        assert!(!serde_yaml::to_string(&c).unwrap().contains("low_band"));
    }

    #[test]
    fn time_sampling_draws_and_names_bad_parameters() {
        let draws = |ts: TimeSampling| {
            let mut rng = melvae_dsp::SplitMix64::new(5);
            (0..4000).map(|_| ts.draw(&mut rng)).collect::<Vec<f64>>()
        };
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let middle = |v: &[f64]| v.iter().filter(|t| (0.25..0.75).contains(*t)).count();
        // Uniform is the rng's own draw: existing runs keep their numbers.
        let mut rng = melvae_dsp::SplitMix64::new(5);
        let u = draws(TimeSampling::Uniform);
        assert_eq!(u[..3], [rng.next_f64(), rng.next_f64(), rng.next_f64()]);
        let ln = draws(TimeSampling::LogitNormal {
            mean: 0.0,
            std: 1.0,
        });
        assert!(ln.iter().all(|t| (0.0..=1.0).contains(t)));
        assert!((mean(&ln) - 0.5).abs() < 0.02, "{}", mean(&ln));
        assert!(
            middle(&ln) > middle(&u) + 500,
            "{} vs {}",
            middle(&ln),
            middle(&u)
        );
        let shifted = draws(TimeSampling::LogitNormal {
            mean: 1.0,
            std: 1.0,
        });
        assert!(mean(&shifted) > 0.65, "{}", mean(&shifted));
        // YAML forms, and a bad scale named.
        let c: CfmConfig = serde_yaml::from_str(
            "{mel_channels: 6, unet_dim: 8, unet_depth: 1, unet_heads: 2, unet_dropout_rate: 0.0, \
             sigma: 1.0e-5, time_sampling: {kind: logit_normal, mean: 0.5, std: 0.0}}",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("cfm.time_sampling"), "{e}");
        let c: CfmConfig = serde_yaml::from_str(
            "{mel_channels: 6, unet_dim: 8, unet_depth: 1, unet_heads: 2, unet_dropout_rate: 0.0, \
             sigma: 1.0e-5}",
        )
        .unwrap();
        assert_eq!(c.time_sampling, TimeSampling::Uniform);
        // A config from before the key samples reconstructions as before.
        assert_eq!(c.reconstruction_temperature, 0.8);
        for bad in [-0.1, f64::NAN] {
            let e = CfmConfig {
                reconstruction_temperature: bad,
                ..tiny()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(e.contains("cfm.reconstruction_temperature"), "{e}");
        }
    }

    fn build(dtype: DType) -> (VarMap, DitDecoder) {
        let vm = VarMap::new();
        let d = DitDecoder::new(
            tiny(),
            3,
            4,
            VarBuilder::from_varmap(&vm, dtype, &Device::Cpu),
        )
        .unwrap();
        randomize(&vm, 0.4, 3).unwrap();
        (vm, d)
    }

    #[test]
    fn solvers_converge_with_their_order() {
        // dx/dt = -x: x(1) = x0 / e.
        let x0 = Tensor::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
        let exact = (&x0 * (-1f64).exp()).unwrap();
        let err = |solver, steps| {
            let x = integrate(x0.clone(), steps, solver, |x, _| Ok(x.neg()?)).unwrap();
            max_abs_diff(&x, &exact).unwrap()
        };
        let (e10, e20) = (err(Solver::Euler, 10), err(Solver::Euler, 20));
        let (m10, m20) = (err(Solver::Midpoint, 10), err(Solver::Midpoint, 20));
        assert!(
            (e10 / e20 - 2.0).abs() < 0.2,
            "Euler is first order: {e10} {e20}"
        );
        assert!(
            (m10 / m20 - 4.0).abs() < 0.4,
            "midpoint is second order: {m10} {m20}"
        );
        assert!(m10 < e10 / 10.0);
        // Time enters as it should: dx/dt = t gives x(1) = x0 + 1/2.
        let x = integrate(x0.clone(), 8, Solver::Midpoint, |x, t| {
            Ok((x.zeros_like()? + t)?)
        })
        .unwrap();
        assert!(max_abs_diff(&x, &(&x0 + 0.5).unwrap()).unwrap() < 1e-12);
    }

    #[test]
    fn shapes_guidance_and_temperature() {
        let (_, d) = build(DType::F32);
        let cond = noise(&[2, 3, 3], 1).unwrap().to_dtype(DType::F32).unwrap();
        let x = noise(&[2, 6, 12], 2).unwrap().to_dtype(DType::F32).unwrap();
        let t = Tensor::new(&[0.3f32, 0.7], &Device::Cpu).unwrap();
        assert_eq!(
            d.forward(&x, &t, &cond, Mode::Eval).unwrap().dims(),
            &[2, 6, 12]
        );
        let vc = d.forward(&x, &t, &cond, Mode::Eval).unwrap();
        let vu = d
            .forward(&x, &t, &cond.zeros_like().unwrap(), Mode::Eval)
            .unwrap();
        assert!(
            max_abs_diff(&vc, &vu).unwrap() > 1e-4,
            "the condition matters"
        );
        assert!(max_abs_diff(&d.guided(&x, &t, &cond, 1.0).unwrap(), &vc).unwrap() < 1e-6);
        assert!(max_abs_diff(&d.guided(&x, &t, &cond, 0.0).unwrap(), &vu).unwrap() < 1e-5);
        let g3 = (&vu + ((&vc - &vu).unwrap() * 3.0).unwrap()).unwrap();
        assert!(max_abs_diff(&d.guided(&x, &t, &cond, 3.0).unwrap(), &g3).unwrap() < 1e-5);
        let s = d.sample(&cond, 4, 1.0, 2.0, Solver::Midpoint, 9).unwrap();
        assert_eq!(s.dims(), &[2, 6, 12]);
        assert!(d.forward(&x, &t, &cond, Mode::Eval).unwrap().track_op());
        assert!(
            !s.track_op(),
            "sampling must not keep every step's autograd graph alive"
        );
        assert_eq!(
            s.to_vec3::<f32>().unwrap(),
            d.sample(&cond, 4, 1.0, 2.0, Solver::Midpoint, 9)
                .unwrap()
                .to_vec3::<f32>()
                .unwrap(),
            "seeded"
        );
        // Temperature 0: no noise, so the seed does not matter.
        let a = d.sample(&cond, 3, 0.0, 1.0, Solver::Euler, 1).unwrap();
        let b = d.sample(&cond, 3, 0.0, 1.0, Solver::Euler, 2).unwrap();
        assert_eq!(a.to_vec3::<f32>().unwrap(), b.to_vec3::<f32>().unwrap());
    }

    #[test]
    fn gradients() {
        let vm = VarMap::new();
        let d = DitDecoder::new(
            tiny(),
            3,
            2,
            VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
        )
        .unwrap();
        let x = Var::from_tensor(&noise(&[2, 6, 4], 1).unwrap()).unwrap();
        let c = Var::from_tensor(&noise(&[2, 2, 3], 2).unwrap()).unwrap();
        let t = Tensor::new(&[0.2f64, 0.6], &Device::Cpu).unwrap();
        check_module(&vm, 0.4, 4, &[("x_t", &x), ("cond", &c)], || {
            d.forward(x.as_tensor(), &t, c.as_tensor(), Mode::Eval)
                .map_err(|e| melvae_layers::Error::Invalid {
                    what: "fwd".into(),
                    reason: e.to_string(),
                })
        })
        .unwrap();
    }

    #[test]
    fn bad_inputs_and_config_are_named() {
        let (_, d) = build(DType::F32);
        let t = Tensor::new(&[0.3f32, 0.7], &Device::Cpu).unwrap();
        let x = Tensor::zeros((2, 6, 12), DType::F32, &Device::Cpu).unwrap();
        let e = d
            .forward(
                &x,
                &t,
                &Tensor::zeros((2, 2, 3), DType::F32, &Device::Cpu).unwrap(),
                Mode::Eval,
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("decoder condition") && e.contains("[2, 3, 3]"),
            "{e}"
        );
        let e = d
            .forward(
                &Tensor::zeros((2, 5, 12), DType::F32, &Device::Cpu).unwrap(),
                &t,
                &x,
                Mode::Eval,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("[batch, 6, frames]"), "{e}");
        for (cfg, f) in [
            (
                CfmConfig {
                    unet_heads: 3,
                    ..tiny()
                },
                "cfm.unet_heads",
            ),
            (
                CfmConfig {
                    sigma: 1.0,
                    ..tiny()
                },
                "cfm.sigma",
            ),
            (
                CfmConfig {
                    cond_drop_prob: -0.1,
                    ..tiny()
                },
                "cfm.cond_drop_prob",
            ),
        ] {
            assert!(cfg.validate().unwrap_err().to_string().contains(f));
        }
        CfmConfig::default().validate().unwrap();
        let e = integrate(x.clone(), 0, Solver::Euler, |x, _| Ok(x.clone()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_steps"), "{e}");
    }
}
