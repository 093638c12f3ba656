//! Model FLOPs: the numerator of model FLOPs utilisation (MFU).
//!
//! Convention (the usual one for MFU): 2 FLOPs per multiply-add of every
//! matrix product and convolution of the forward pass, from the shapes
//! alone. Element-wise ops, norms, softmax, biases and rotary embeddings are
//! not counted. Attention counts its score and weighted-sum products densely:
//! a causal mask does not halve them (the math path computes every score).
//! A training step is [`TRAIN_FACTOR`] times the forward: the backward
//! computes two products (input and weight gradients) per forward product.

use crate::attention::AttentionConfig;
use crate::ffn::{FeedForwardConfig, FfnActivation};
use crate::transformer::BlockConfig;

/// Training-step FLOPs per forward FLOP (forward 1 + backward 2).
pub const TRAIN_FACTOR: f64 = 3.0;

/// `rows` vectors through an `inputs -> outputs` linear layer.
pub fn linear(rows: usize, inputs: usize, outputs: usize) -> f64 {
    2.0 * rows as f64 * inputs as f64 * outputs as f64
}

/// A 2-D convolution producing `out_hw` `(freq, time)` positions per
/// example: `in_ch * kernel` multiply-adds per output value.
pub fn conv2d(
    batch: usize,
    in_ch: usize,
    out_ch: usize,
    kernel: (usize, usize),
    out_hw: (usize, usize),
) -> f64 {
    linear(
        batch * out_hw.0 * out_hw.1,
        in_ch * kernel.0 * kernel.1,
        out_ch,
    )
}

/// Core attention (`q k^T` and `p v`) of `queries` over `keys` at total
/// width `dim = heads * head_dim`, dense.
pub fn attention(batch: usize, queries: usize, keys: usize, dim: usize) -> f64 {
    4.0 * batch as f64 * queries as f64 * keys as f64 * dim as f64
}

/// [`crate::MultiHeadAttention::forward`] over `[batch, time, dim]`:
/// fused QKV and output projections plus the core attention.
pub fn self_attention(cfg: &AttentionConfig, batch: usize, time: usize) -> f64 {
    let rows = batch * time;
    linear(rows, cfg.dim, 3 * cfg.dim)
        + attention(batch, time, time, cfg.dim)
        + linear(rows, cfg.dim, cfg.dim)
}

/// [`crate::FeedForward`] over `rows` vectors (SwiGLU has three matrices).
pub fn feed_forward(cfg: &FeedForwardConfig, rows: usize) -> f64 {
    let up = match cfg.activation {
        FfnActivation::SwiGlu => 2,
        _ => 1,
    };
    up as f64 * linear(rows, cfg.dim, cfg.hidden) + linear(rows, cfg.hidden, cfg.dim)
}

/// An [`crate::EncoderLayer`] (or a [`crate::DecoderLayer`] without
/// cross-attention) over `[batch, time, dim]`.
pub fn block(cfg: &BlockConfig, batch: usize, time: usize) -> f64 {
    self_attention(&cfg.attention, batch, time) + feed_forward(&cfg.ffn, batch * time)
}

/// A [`crate::DitBlock`] over `[batch, time, dim]` conditioned on
/// `[batch, cond_dim]`: the block plus its adaLN-Zero projection.
pub fn dit_block(cfg: &BlockConfig, cond_dim: usize, batch: usize, time: usize) -> f64 {
    block(cfg, batch, time) + linear(batch, cond_dim, 6 * cfg.attention.dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::named_vars;
    use crate::{DitBlock, EncoderLayer};
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    /// FLOPs of the weight matrices of `vm`: 2 per element per row they
    /// are applied to, rows chosen by `rows_of(name)`.
    fn from_weights(vm: &VarMap, rows_of: impl Fn(&str) -> usize) -> f64 {
        named_vars(vm)
            .iter()
            .filter(|(_, v)| v.rank() >= 2)
            .map(|(n, v)| 2.0 * v.elem_count() as f64 * rows_of(n) as f64)
            .sum()
    }

    #[test]
    fn block_counts_match_the_parameters() {
        let (b, t) = (3, 7);
        for act in [FfnActivation::Gelu, FfnActivation::SwiGlu] {
            let mut cfg = BlockConfig::new(16, 4);
            cfg.ffn.hidden = 40;
            cfg.ffn.activation = act;
            let vm = VarMap::new();
            EncoderLayer::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
            let expect = from_weights(&vm, |_| b * t) + attention(b, t, t, 16);
            assert_eq!(block(&cfg, b, t), expect, "{act:?}");

            let vm = VarMap::new();
            DitBlock::new(
                cfg,
                24,
                VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
            )
            .unwrap();
            let rows = |n: &str| if n.starts_with("ada_ln") { b } else { b * t };
            let expect = from_weights(&vm, rows) + attention(b, t, t, 16);
            assert_eq!(dit_block(&cfg, 24, b, t), expect, "{act:?}");
        }
    }

    #[test]
    fn conv_and_attention_by_hand() {
        // 2 x (4 x 5) output positions, 3 inputs x 3 x 2 taps, 6 outputs.
        assert_eq!(conv2d(2, 3, 6, (3, 2), (4, 5)), 2.0 * 40.0 * 18.0 * 6.0);
        // q k^T: 2 * 5 * 9 * 8 * 2 FLOPs, p v the same.
        assert_eq!(attention(2, 5, 9, 8), 2.0 * (2.0 * 5.0 * 9.0 * 8.0 * 2.0));
    }
}
