//! melvae-losses: the losses melvae's codecs and generative models train
//! with, each documented with its exact formula and pinned to a reference
//! (auraloss, DAC, PyTorch, numpy) by fixtures.
//!
//! All losses are differentiable candle ops returning a scalar tensor, and
//! stay finite on silence, clipping and all-zero batches (clamps documented
//! per loss). Waveforms are `[batch, samples]` or `[batch, channels,
//! samples]` (channels folded into the batch, as auraloss does).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use melvae_losses::{kl_loss, FreeBits, KlSchedule, MultiResolutionStftLoss, WaveformLoss};
//!
//! let dev = Device::Cpu;
//! let target = Tensor::randn(0f32, 0.3, (2, 1, 4800), &dev)?; // [batch, channels, samples]
//! let pred = (&target * 0.9)?;
//! let mrstft = MultiResolutionStftLoss::auraloss_default(&dev)?;
//! let spectral = mrstft.loss(&pred, &target)?; // scalar
//!
//! // A VAE's KL term with free bits, weighted by a linear warm-up.
//! let (mean, logvar) = (Tensor::zeros((2, 10, 64), candle_core::DType::F32, &dev)?, Tensor::zeros((2, 10, 64), candle_core::DType::F32, &dev)?);
//! let kl = kl_loss(&mean, &logvar, FreeBits::PerDimMax { target: 0.1 })?;
//! let w = KlSchedule::Linear { start: 0.0, end: 1e-3, warmup_steps: 1000 }.weight(250);
//! let total = (spectral + (kl * w)?)?;
//! assert!(total.to_scalar::<f32>()?.is_finite());
//! # Ok::<(), melvae_losses::Error>(())
//! ```

#![warn(missing_docs)]

pub mod balancer;
mod error;
pub mod flow;
pub mod gan;
pub mod kl;
pub mod spectral;
pub mod token;

pub use balancer::{Balanced, BalancerConfig, LossBalancer, NormAverage};
pub use error::{Error, Result};
pub use flow::{flow_matching_loss, flow_matching_target, weighted_flow_matching_loss};
pub use gan::{
    discriminator_loss, feature_matching_loss, generator_loss, FeatureMatching, GanLoss,
};
pub use kl::{gaussian_kl, kl_loss, FreeBits, KlSchedule};
pub use spectral::{
    l1_loss, L1Loss, MultiResolutionStftLoss, MultiScaleMelLoss, StereoLoss, StftLossTerms,
    WaveformLoss,
};
pub use token::{cross_entropy, masked_bce_with_logits, masked_mae, masked_mean};
