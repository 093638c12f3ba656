//! Adversarial losses and feature matching.
//!
//! Every function takes one output (or feature list) per discriminator and
//! **sums** over discriminators, as DAC and HiFi-GAN do.

use candle_core::Tensor;
use melvae_layers::upcast;

use crate::{Error, Result};

/// GAN objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GanLoss {
    /// Discriminator `mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))`,
    /// generator `-mean(D(fake))`.
    Hinge,
    /// Least squares: discriminator `mean((D(real) - 1)^2) + mean(D(fake)^2)`,
    /// generator `mean((D(fake) - 1)^2)`.
    LeastSquares,
}

fn sum(terms: Vec<Tensor>, what: &str) -> Result<Tensor> {
    if terms.is_empty() {
        return Err(Error::invalid(what, "no discriminator outputs"));
    }
    Ok(Tensor::stack(&terms, 0)?.sum_all()?)
}

/// Discriminator loss over discriminator outputs on real and fake inputs
/// (one tensor of logits per discriminator, any shape); the fake outputs
/// should come from detached generator outputs.
pub fn discriminator_loss(kind: GanLoss, real: &[Tensor], fake: &[Tensor]) -> Result<Tensor> {
    if real.len() != fake.len() {
        return Err(Error::invalid(
            "discriminator outputs",
            format!("{} real vs {} fake", real.len(), fake.len()),
        ));
    }
    let terms = real
        .iter()
        .zip(fake)
        .map(|(r, f)| -> Result<Tensor> {
            let (r, f) = (&upcast(r)?, &upcast(f)?);
            Ok(match kind {
                GanLoss::Hinge => {
                    ((1.0 - r)?.relu()?.mean_all()? + (f + 1.0)?.relu()?.mean_all()?)?
                }
                GanLoss::LeastSquares => ((r - 1.0)?.sqr()?.mean_all()? + f.sqr()?.mean_all()?)?,
            })
        })
        .collect::<Result<_>>()?;
    sum(terms, "discriminator outputs")
}

/// Generator (adversarial) loss over discriminator outputs on fake inputs.
pub fn generator_loss(kind: GanLoss, fake: &[Tensor]) -> Result<Tensor> {
    let terms = fake
        .iter()
        .map(|f| -> Result<Tensor> {
            let f = &upcast(f)?;
            Ok(match kind {
                GanLoss::Hinge => f.mean_all()?.neg()?,
                GanLoss::LeastSquares => (f - 1.0)?.sqr()?.mean_all()?,
            })
        })
        .collect::<Result<_>>()?;
    sum(terms, "discriminator outputs")
}

/// Feature-matching normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureMatching {
    /// `mean |f_fake - sg(f_real)|` per layer (MelGAN, HiFi-GAN, DAC).
    Absolute,
    /// The same divided by `max(mean |sg(f_real)|, 1e-8)` (Encodec), so each
    /// layer counts equally whatever its scale; the floor keeps all-zero
    /// features finite.
    Relative,
}

/// Feature matching: for every discriminator and every intermediate layer,
/// the L1 distance between the features of the fake and (detached) real
/// inputs, summed. `real[k][l]` and `fake[k][l]` are layer `l` of
/// discriminator `k`.
pub fn feature_matching_loss(
    kind: FeatureMatching,
    real: &[Vec<Tensor>],
    fake: &[Vec<Tensor>],
) -> Result<Tensor> {
    if real.len() != fake.len() {
        return Err(Error::invalid(
            "feature maps",
            format!("{} real vs {} fake discriminators", real.len(), fake.len()),
        ));
    }
    let mut terms = Vec::new();
    for (k, (rs, fs)) in real.iter().zip(fake).enumerate() {
        if rs.len() != fs.len() {
            return Err(Error::invalid(
                "feature maps",
                format!(
                    "discriminator {k}: {} real vs {} fake layers",
                    rs.len(),
                    fs.len()
                ),
            ));
        }
        for (r, f) in rs.iter().zip(fs) {
            if r.dims() != f.dims() {
                return Err(Error::shape(
                    format!("feature map of discriminator {k}"),
                    format!("{:?}", r.dims()),
                    f.dims(),
                ));
            }
            let (r, f) = (upcast(&r.detach())?, upcast(f)?);
            let l1 = (&f - &r)?.abs()?.mean_all()?;
            terms.push(match kind {
                FeatureMatching::Absolute => l1,
                FeatureMatching::Relative => (l1 / r.abs()?.mean_all()?.maximum(1e-8)?)?,
            });
        }
    }
    sum(terms, "feature maps")
}
