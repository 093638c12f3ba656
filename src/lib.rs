//! melvae: neural audio codecs and the generative models on their codes, in
//! Rust on candle.
//!
//! This crate re-exports the workspace's member crates; see each for details.

pub use melvae_dsp as dsp;
