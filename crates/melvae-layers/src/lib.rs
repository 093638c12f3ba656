//! melvae-layers: the candle building blocks every melvae model is made of,
//! each proven by a finite-difference gradient check and, where causal, by
//! streaming equivalence.
//!
//! Layouts: sequences `[batch, time, dim]`; convolution signals
//! `[batch, channels, time]`; 2-D feature maps `[batch, channels, freq, time]`.
//! Parameters come from a `VarBuilder` with torch-like names, which are the
//! checkpoint format.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use melvae_layers::{Conv1d, Conv1dConfig, Streaming};
//!
//! let vm = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
//! // A causal conv, kernel 3, dilation 2: [batch, 4, time] -> [batch, 8, time].
//! let mut conv = Conv1d::new(Conv1dConfig { dilation: 2, ..Conv1dConfig::causal(4, 8, 3) }, vb)?;
//! let x = Tensor::randn(0f32, 1.0, (1, 4, 10), &Device::Cpu)?;
//! let offline = conv.forward(&x)?;
//! // Streamed in two chunks, the outputs concatenate to the offline result.
//! let a = conv.step(&x.narrow(2, 0, 3)?)?.unwrap();
//! let b = conv.step(&x.narrow(2, 3, 7)?)?.unwrap();
//! let streamed = Tensor::cat(&[a, b], 2)?;
//! let diff = (offline - streamed)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-5);
//! # Ok::<(), melvae_layers::Error>(())
//! ```

#![warn(missing_docs)]

pub mod act;
pub mod attention;
pub mod conv;
pub mod dropout;
mod error;
pub mod ffn;
pub mod flops;
pub mod init;
mod kernels;
pub mod linear;
pub mod lstm;
pub mod norm;
pub mod precision;
pub mod ranks;
pub mod residual;
pub mod runtime;
pub mod streaming;
pub mod testing;
pub mod transformer;
pub mod vq;

pub use act::{Activation, ActivationKind};
pub use attention::{
    alibi_slopes, apply_rotary, attend, attention_probs, lengths_to_mask, uses_flash,
    AttendOptions, AttentionConfig, MultiHeadAttention,
};
pub use conv::{
    CausalConv2d, Conv1d, Conv1dConfig, Conv2dConfig, ConvPadding, Upsample, UpsampleConfig,
};
pub use dropout::{DropoutRng, Mode};
pub use error::{Error, Result};
pub use ffn::{
    masked_fill_zero, sinusoidal_positions, time_dtype, timestep_embedding, FeedForward,
    FeedForwardConfig, FfnActivation, TimestepEmbedder,
};
pub use init::{named_tensors, named_vars, seeded_var_builder};
pub use linear::{linear, linear_no_bias, Linear};
pub use lstm::LstmStack;
pub use norm::{gate, modulate, AdaLnZero, GroupNorm, LayerNorm, RmsNorm};
pub use precision::{is_half, upcast};
pub use ranks::Ranks;
pub use residual::{ResidualStack, ResidualUnit, ResidualUnit2d, ResidualUnitConfig};
pub use runtime::{flush_subnormals, tune_cpu};
pub use streaming::Streaming;
pub use transformer::{BlockConfig, DecoderLayer, DitBlock, EncoderLayer};
pub use vq::{ResidualVq, RvqOutput, VectorQuantizer, VqConfig, VqOutput};
