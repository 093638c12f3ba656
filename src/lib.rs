//! melvae: neural audio codecs and the generative models on their codes, in
//! Rust on candle.
//!
//! This crate re-exports the workspace's member crates; see each for details.
//!
//! ```
//! use melvae::dsp::{Stft, StftConfig};
//!
//! let x: Vec<f32> = (0..4096).map(|i| (i as f32 * 0.01).sin()).collect();
//! let stft = Stft::new(StftConfig::new(512))?;
//! let spec = stft.stft(&x)?; // [257 bins, frames], complex
//! let y = stft.istft(&spec, Some(x.len()))?;
//! assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-5));
//! # Ok::<(), melvae::dsp::Error>(())
//! ```

pub use melvae_dsp as dsp;
pub use melvae_layers as layers;
pub use melvae_losses as losses;
pub use melvae_models as models;
pub use melvae_train as train;
