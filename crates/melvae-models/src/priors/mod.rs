//! Autoregressive priors over discrete tokens.
//!
//! - [`gpt`]: a decoder-only transformer with a class embedding as its
//!   first position, KV-cached sampling (temperature, top-k, top-p).

pub mod gpt;
