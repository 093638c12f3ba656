//! Autoregressive priors over discrete tokens.
//!
//! - [`gpt`]: a decoder-only transformer with a class embedding as its
//!   first position, KV-cached sampling (temperature, top-k, top-p).
//! - [`gpt_vae`]: a bidirectional encoder to one global Gaussian latent
//!   and a GPT decoder conditioned on it (prefix and/or added).
//! - [`lstm`]: the hierarchical waveform VQ-VAE's per-level LSTM prior,
//!   conditioned on the coarser level's codes through a context model.

pub mod gpt;
pub mod gpt_vae;
pub mod lstm;
