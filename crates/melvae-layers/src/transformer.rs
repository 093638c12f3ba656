//! Transformer blocks: pre-norm encoder layer, causal decoder layer with
//! optional cross-attention, and the DiT block (adaLN-Zero).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::attention::{AttentionConfig, MultiHeadAttention};
use crate::ffn::{FeedForward, FeedForwardConfig};
use crate::norm::{gate, modulate, AdaLnZero, LayerNorm};
use crate::{Mode, Result};

/// Configuration shared by the blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockConfig {
    /// Self-attention.
    pub attention: AttentionConfig,
    /// Feed-forward.
    pub ffn: FeedForwardConfig,
    /// Dropout on each residual branch, in training.
    pub dropout: f64,
    /// Epsilon of the layer norms.
    pub norm_eps: f64,
}

impl BlockConfig {
    /// `dim`, `heads`, GELU feed-forward of `4 * dim`, no dropout.
    pub fn new(dim: usize, heads: usize) -> Self {
        Self {
            attention: AttentionConfig::new(dim, heads),
            ffn: FeedForwardConfig::new(dim),
            dropout: 0.0,
            norm_eps: 1e-5,
        }
    }
}

/// Pre-norm encoder layer over `[batch, time, dim]`:
/// `x += attn(norm1(x)); x += ffn(norm2(x))`. Parameters `norm1`, `attn`,
/// `norm2`, `ffn`.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    norm1: LayerNorm,
    attn: MultiHeadAttention,
    norm2: LayerNorm,
    ffn: FeedForward,
    dropout: f64,
}

impl EncoderLayer {
    /// Builds the layer.
    pub fn new(cfg: BlockConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.attention.dim;
        Ok(Self {
            norm1: LayerNorm::new(d, cfg.norm_eps, true, vb.pp("norm1"))?,
            attn: MultiHeadAttention::new(cfg.attention, vb.pp("attn"))?,
            norm2: LayerNorm::new(d, cfg.norm_eps, true, vb.pp("norm2"))?,
            ffn: FeedForward::new(cfg.ffn, vb.pp("ffn"))?,
            dropout: cfg.dropout,
        })
    }

    /// `mask` `[batch, time]` (non-zero = valid) masks keys and zeroes the
    /// feed-forward at padded positions.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>, mode: Mode) -> Result<Tensor> {
        let h = self.attn.forward(&self.norm1.forward(x)?, mask, mode)?;
        let x = (x + mode.dropout(&h, self.dropout)?)?;
        let h = self.ffn.forward(&self.norm2.forward(&x)?, mask, mode)?;
        Ok((&x + mode.dropout(&h, self.dropout)?)?)
    }
}

/// Pre-norm decoder layer over `[batch, time, dim]`: causal self-attention
/// (the config's attention, forced causal), optional cross-attention to a
/// context of `context_dim`, feed-forward. Parameters `norm1`, `self_attn`,
/// `norm_cross`, `cross_attn`, `norm2`, `ffn`.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    norm1: LayerNorm,
    self_attn: MultiHeadAttention,
    cross: Option<(LayerNorm, MultiHeadAttention)>,
    norm2: LayerNorm,
    ffn: FeedForward,
    dropout: f64,
}

impl DecoderLayer {
    /// Builds the layer; `context_dim` adds cross-attention to a context of that size.
    pub fn new(cfg: BlockConfig, context_dim: Option<usize>, vb: VarBuilder) -> Result<Self> {
        let d = cfg.attention.dim;
        let self_cfg = AttentionConfig {
            causal: true,
            context_dim: None,
            ..cfg.attention
        };
        let cross = match context_dim {
            Some(c) => {
                let cc = AttentionConfig {
                    causal: false,
                    window: None,
                    context_dim: Some(c),
                    alibi_alpha: None,
                    rotary_base: None,
                    ..cfg.attention
                };
                Some((
                    LayerNorm::new(d, cfg.norm_eps, true, vb.pp("norm_cross"))?,
                    MultiHeadAttention::new(cc, vb.pp("cross_attn"))?,
                ))
            }
            None => None,
        };
        Ok(Self {
            norm1: LayerNorm::new(d, cfg.norm_eps, true, vb.pp("norm1"))?,
            self_attn: MultiHeadAttention::new(self_cfg, vb.pp("self_attn"))?,
            cross,
            norm2: LayerNorm::new(d, cfg.norm_eps, true, vb.pp("norm2"))?,
            ffn: FeedForward::new(cfg.ffn, vb.pp("ffn"))?,
            dropout: cfg.dropout,
        })
    }

    fn tail(
        &self,
        x: Tensor,
        context: Option<(&Tensor, Option<&Tensor>)>,
        mask: Option<&Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        let x = match (&self.cross, context) {
            (Some((norm, attn)), Some((ctx, ctx_mask))) => {
                let h = attn.forward_cross(&norm.forward(&x)?, ctx, ctx_mask, mode)?;
                (&x + mode.dropout(&h, self.dropout)?)?
            }
            (None, None) => x,
            (Some(_), None) => {
                return Err(crate::Error::invalid(
                    "decoder context",
                    "this layer has cross-attention: pass a context",
                ))
            }
            (None, Some(_)) => {
                return Err(crate::Error::invalid(
                    "decoder context",
                    "this layer has no cross-attention",
                ))
            }
        };
        self.ffn_branch(x, mask, mode)
    }

    /// `x += ffn(norm2(x))`.
    fn ffn_branch(&self, x: Tensor, mask: Option<&Tensor>, mode: Mode) -> Result<Tensor> {
        let h = self.ffn.forward(&self.norm2.forward(&x)?, mask, mode)?;
        Ok((&x + mode.dropout(&h, self.dropout)?)?)
    }

    /// Whole sequence: `x` `[batch, time, dim]`, `mask` `[batch, time]`,
    /// `context` `([batch, ctx_time, context_dim], ctx mask [batch, ctx_time])`.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        context: Option<(&Tensor, Option<&Tensor>)>,
        mode: Mode,
    ) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.norm1.forward(x)?, mask, mode)?;
        let x = (x + mode.dropout(&h, self.dropout)?)?;
        self.tail(x, context, mask, mode)
    }

    /// Incremental decoding with the self-attention KV cache: the next
    /// positions `x_new` `[batch, t, dim]` (inference).
    pub fn forward_cached(
        &mut self,
        x_new: &Tensor,
        context: Option<(&Tensor, Option<&Tensor>)>,
    ) -> Result<Tensor> {
        let h = self.self_attn.forward_cached(&self.norm1.forward(x_new)?)?;
        let x = (x_new + h)?;
        match (&mut self.cross, context) {
            // The context's keys and values are projected once per cache.
            (Some((norm, attn)), Some((ctx, ctx_mask))) => {
                let h = attn.forward_cross_cached(&norm.forward(&x)?, ctx, ctx_mask)?;
                let x = (&x + h)?;
                self.ffn_branch(x, None, Mode::Eval)
            }
            _ => self.tail(x, context, None, Mode::Eval),
        }
    }

    /// Forgets the KV caches (self-attention, and the cross-attention's
    /// projected context).
    pub fn clear_cache(&mut self) {
        self.self_attn.clear_cache();
        if let Some((_, a)) = &mut self.cross {
            a.clear_cache();
        }
    }

    /// Numbers held in the KV cache.
    pub fn cache_elements(&self) -> usize {
        crate::Streaming::state_elements(&self.self_attn)
    }
}

/// DiT block over `[batch, time, dim]` conditioned on `c` `[batch, cond_dim]`:
/// adaLN-Zero produces shift/scale/gate for the attention and MLP branches;
/// norms have no affine parameters. Starts as the identity. Parameters
/// `attn`, `mlp`, `ada_ln`.
#[derive(Debug, Clone)]
pub struct DitBlock {
    norm1: LayerNorm,
    attn: MultiHeadAttention,
    norm2: LayerNorm,
    mlp: FeedForward,
    ada: AdaLnZero,
    dropout: f64,
}

impl DitBlock {
    /// A DiT block conditioned on a `cond_dim` vector.
    pub fn new(cfg: BlockConfig, cond_dim: usize, vb: VarBuilder) -> Result<Self> {
        let d = cfg.attention.dim;
        Ok(Self {
            norm1: LayerNorm::new(d, 1e-6, false, vb.pp("norm1"))?,
            attn: MultiHeadAttention::new(cfg.attention, vb.pp("attn"))?,
            norm2: LayerNorm::new(d, 1e-6, false, vb.pp("norm2"))?,
            mlp: FeedForward::new(cfg.ffn, vb.pp("mlp"))?,
            ada: AdaLnZero::new(cond_dim, d, 6, vb.pp("ada_ln"))?,
            dropout: cfg.dropout,
        })
    }

    /// `x` `[batch, time, dim]`, `c` `[batch, cond_dim]`, `mask` `[batch, time]`.
    pub fn forward(
        &self,
        x: &Tensor,
        c: &Tensor,
        mask: Option<&Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        let m = self.ada.forward(c)?;
        let h = self.attn.forward(
            &modulate(&self.norm1.forward(x)?, &m[0], &m[1])?,
            mask,
            mode,
        )?;
        let x = (x + mode.dropout(&gate(&h, &m[2])?, self.dropout)?)?;
        let h = self.mlp.forward(
            &modulate(&self.norm2.forward(&x)?, &m[3], &m[4])?,
            mask,
            mode,
        )?;
        Ok((&x + mode.dropout(&gate(&h, &m[5])?, self.dropout)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::lengths_to_mask;
    use crate::ffn::FfnActivation;
    use crate::testing::{check_module, max_abs_diff, noise};
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    fn cfg() -> BlockConfig {
        let mut c = BlockConfig::new(8, 2);
        c.attention.bias = true;
        c.attention.alibi_alpha = Some(1.0);
        c.ffn.hidden = 12;
        c.ffn.activation = FfnActivation::SwiGlu;
        c
    }

    fn check(vm: &VarMap, inputs: &[(&str, &Var)], f: impl Fn() -> Result<Tensor>) {
        check_module(vm, 0.4, 5, inputs, f).unwrap();
    }

    #[test]
    fn encoder_layer_gradients_and_padding() {
        let vm = VarMap::new();
        let l = EncoderLayer::new(
            cfg(),
            VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
        )
        .unwrap();
        let x = Var::from_tensor(&noise(&[2, 5, 8], 1).unwrap()).unwrap();
        let mask = lengths_to_mask(&[3, 5], 5, &Device::Cpu).unwrap();
        check(&vm, &[("input", &x)], || {
            l.forward(x.as_tensor(), Some(&mask), Mode::Eval)
        });
        // Valid positions do not see what sits in padded positions.
        let y1 = l.forward(x.as_tensor(), Some(&mask), Mode::Eval).unwrap();
        let junk = noise(&[1, 2, 8], 7).unwrap();
        let x2 = x
            .as_tensor()
            .slice_assign(&[0..1, 3..5, 0..8], &junk)
            .unwrap();
        let y2 = l.forward(&x2, Some(&mask), Mode::Eval).unwrap();
        let valid = |y: &Tensor| y.narrow(0, 0, 1).unwrap().narrow(1, 0, 3).unwrap();
        assert!(max_abs_diff(&valid(&y1), &valid(&y2)).unwrap() < 1e-12);
    }

    #[test]
    fn decoder_layer_gradients_and_cache() {
        let vm = VarMap::new();
        let mut l = DecoderLayer::new(
            cfg(),
            Some(6),
            VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
        )
        .unwrap();
        let x = Var::from_tensor(&noise(&[2, 5, 8], 1).unwrap()).unwrap();
        let ctx = Var::from_tensor(&noise(&[2, 4, 6], 2).unwrap()).unwrap();
        let cmask = lengths_to_mask(&[4, 2], 4, &Device::Cpu).unwrap();
        check(&vm, &[("input", &x), ("context", &ctx)], || {
            l.forward(
                x.as_tensor(),
                None,
                Some((ctx.as_tensor(), Some(&cmask))),
                Mode::Eval,
            )
        });
        let full = l
            .forward(
                x.as_tensor(),
                None,
                Some((ctx.as_tensor(), Some(&cmask))),
                Mode::Eval,
            )
            .unwrap();
        l.clear_cache();
        let steps: Vec<Tensor> = (0..5)
            .map(|i| {
                l.forward_cached(
                    &x.as_tensor().narrow(1, i, 1).unwrap(),
                    Some((ctx.as_tensor(), Some(&cmask))),
                )
                .unwrap()
            })
            .collect();
        assert!(max_abs_diff(&full, &Tensor::cat(&steps, 1).unwrap()).unwrap() < 1e-10);
        let e = l
            .forward(x.as_tensor(), None, None, Mode::Eval)
            .unwrap_err()
            .to_string();
        assert!(e.contains("decoder context"), "{e}");
        // A windowed self-attention with cross-attention builds (the
        // window is the self-attention's; cross-attention has none).
        let mut windowed = cfg();
        windowed.attention.window = Some(2);
        windowed.attention.causal = true;
        DecoderLayer::new(
            windowed,
            Some(6),
            VarBuilder::from_varmap(&VarMap::new(), DType::F64, &Device::Cpu),
        )
        .unwrap();
    }

    #[test]
    fn dit_block_starts_as_identity_and_trains() {
        let vm = VarMap::new();
        let b = DitBlock::new(
            cfg(),
            3,
            VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
        )
        .unwrap();
        let x = Var::from_tensor(&noise(&[2, 4, 8], 1).unwrap()).unwrap();
        let c = Var::from_tensor(&noise(&[2, 3], 2).unwrap()).unwrap();
        let y = b
            .forward(x.as_tensor(), c.as_tensor(), None, Mode::Eval)
            .unwrap();
        assert_eq!(max_abs_diff(&y, x.as_tensor()).unwrap(), 0.0);
        check(&vm, &[("input", &x), ("cond", &c)], || {
            b.forward(x.as_tensor(), c.as_tensor(), None, Mode::Eval)
        });
    }
}
