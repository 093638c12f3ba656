//! KL divergence of diagonal Gaussians to N(0, I), weight schedules, and
//! free bits.

use candle_core::{Tensor, D};
use melvae_layers::upcast;

use crate::error::same_shape;
use crate::{Error, Result};

/// Elementwise `KL(N(mean, exp(logvar)) || N(0, 1)) = 0.5 (mean^2 + exp(logvar) - 1 - logvar)`,
/// same shape as the inputs (`[..., latent_dim]`).
pub fn gaussian_kl(mean: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    same_shape("gaussian kl", mean, logvar)?;
    let (mean, logvar) = (&upcast(mean)?, &upcast(logvar)?);
    Ok((((mean.sqr()? + logvar.exp()?)? - 1.0)? - logvar)?.affine(0.5, 0.0)?)
}

/// Free bits, in the three modes of the GPT-VAE (Optimus) code.
///
/// With `KL_{n,d}` the elementwise KL of latent vector `n` (all leading
/// dims of `[..., latent_dim]` flattened) in dimension `d`, and
/// `KL_n = sum_d KL_{n,d}`:
/// - `None` (fb=0): `mean_n KL_n`.
/// - `Threshold` (fb=1): `mean_n 1[KL_n > target] KL_n`: vectors whose KL is
///   under the target stop pulling (their gradient is zero).
/// - `PerDimMax` (fb=2): `sum_d max(target, mean_n KL_{n,d})`: each latent
///   dimension is free up to `target` nats (Kingma et al. 2016); below it
///   the term is the constant `target` and has no gradient.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FreeBits {
    /// No free bits.
    None,
    /// Per latent vector.
    Threshold {
        /// Target KL in nats.
        target: f64,
    },
    /// Per latent dimension.
    PerDimMax {
        /// Target KL in nats.
        target: f64,
    },
}

/// The KL term of a VAE (before its weight), reduced as [`FreeBits`] says.
/// `mean`, `logvar`: `[..., latent_dim]`. Returns a scalar.
pub fn kl_loss(mean: &Tensor, logvar: &Tensor, free_bits: FreeBits) -> Result<Tensor> {
    let kl = gaussian_kl(mean, logvar)?;
    let d = kl.dim(D::Minus1)?;
    let kl = kl.reshape(((), d))?; // [N, D]
    Ok(match free_bits {
        FreeBits::None => kl.sum(1)?.mean_all()?,
        FreeBits::Threshold { target } => {
            let per = kl.sum(1)?;
            let keep = per.gt(target)?.to_dtype(per.dtype())?;
            (per * keep)?.mean_all()?
        }
        FreeBits::PerDimMax { target } => kl.mean(0)?.maximum(target)?.sum_all()?,
    })
}

/// The KL weight as a function of the training step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KlSchedule {
    /// Always `weight`.
    Constant {
        /// The weight.
        weight: f64,
    },
    /// `start + (end - start) * min(1, step / warmup_steps)` (`end` at once
    /// when `warmup_steps` is 0). The mel VAE: start 0, end
    /// `kl_loss_weight`; GPT-VAE: start `beta * kl_start`, end `beta`.
    Linear {
        /// Weight at step 0.
        start: f64,
        /// Weight after the warm-up.
        end: f64,
        /// Length of the ramp.
        warmup_steps: u64,
    },
    /// Cyclical annealing (Fu et al. 2019): every `cycle_steps`, ramp
    /// linearly from `start` to `end` over the first `ramp_fraction` of the
    /// cycle, then hold `end`.
    Cyclical {
        /// Weight at the start of each cycle.
        start: f64,
        /// Weight after the ramp.
        end: f64,
        /// Cycle length in steps.
        cycle_steps: u64,
        /// Fraction of the cycle spent ramping, in (0, 1].
        ramp_fraction: f64,
    },
}

impl KlSchedule {
    /// Checks the parameters; the error names the bad one.
    pub fn validate(&self) -> Result<()> {
        if let KlSchedule::Cyclical {
            cycle_steps,
            ramp_fraction,
            ..
        } = *self
        {
            if cycle_steps == 0 {
                return Err(Error::invalid("kl_schedule.cycle_steps", "must be > 0"));
            }
            if !(ramp_fraction > 0.0 && ramp_fraction <= 1.0) {
                return Err(Error::invalid(
                    "kl_schedule.ramp_fraction",
                    format!("must be in (0, 1], got {ramp_fraction}"),
                ));
            }
        }
        Ok(())
    }

    /// The weight at `step` (0-based).
    pub fn weight(&self, step: u64) -> f64 {
        let ramp = |start: f64, end: f64, pos: f64, len: f64| {
            if len <= 0.0 {
                end
            } else {
                start + (end - start) * (pos / len).min(1.0)
            }
        };
        match *self {
            KlSchedule::Constant { weight } => weight,
            KlSchedule::Linear {
                start,
                end,
                warmup_steps,
            } => ramp(start, end, step as f64, warmup_steps as f64),
            KlSchedule::Cyclical {
                start,
                end,
                cycle_steps,
                ramp_fraction,
            } => {
                let c = cycle_steps.max(1);
                ramp(start, end, (step % c) as f64, c as f64 * ramp_fraction)
            }
        }
    }
}
