//! Optimal-transport conditional flow matching (Lipman et al. 2023).

use candle_core::Tensor;

use melvae_layers::upcast;

use crate::error::same_shape;
use crate::token::masked_mean;
use crate::{Error, Result};

/// The interpolant and regression target of OT-CFM:
/// `x_t = (1 - (1 - sigma_min) t) x0 + t x1` and
/// `u = x1 - (1 - sigma_min) x0`, with `x0` noise and `x1` data of one
/// shape `[batch, ...]` and `t` `[batch]` in [0, 1].
pub fn flow_matching_target(
    x0: &Tensor,
    x1: &Tensor,
    t: &Tensor,
    sigma_min: f64,
) -> Result<(Tensor, Tensor)> {
    same_shape("flow matching x0", x0, x1)?;
    let b = x1.dim(0)?;
    if t.dims() != [b] {
        return Err(Error::shape("flow matching t", format!("[{b}]"), t.dims()));
    }
    let mut shape = vec![1; x1.rank()];
    shape[0] = b;
    let t = t.to_dtype(x1.dtype())?.reshape(shape.as_slice())?;
    let a = ((&t * -(1.0 - sigma_min))? + 1.0)?;
    let xt = (x0.broadcast_mul(&a)? + x1.broadcast_mul(&t)?)?;
    let u = (x1 - (x0 * (1.0 - sigma_min))?)?;
    Ok((xt, u))
}

/// The flow-matching loss: `mean((v_pred - u)^2)` over the positions where
/// `mask` is non-zero (see [`crate::masked_mae`] for mask shapes), 0 if
/// everything is masked.
pub fn flow_matching_loss(
    v_pred: &Tensor,
    target: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    same_shape("flow matching prediction", v_pred, target)?;
    masked_mean(&(v_pred - target)?.sqr()?, mask)
}

/// The flow-matching loss with a weight per position: `mean(w (v_pred -
/// u)^2)` over every element, `weights` broadcast to the prediction's shape
/// (e.g. `[1, mel, 1]` for per-band weights of `[batch, mel, frames]`).
/// With weights of mean 1 along their axis it is on the scale of
/// [`flow_matching_loss`]. Half-precision inputs are reduced in f32, as
/// there, so the loss is f32 for them.
pub fn weighted_flow_matching_loss(
    v_pred: &Tensor,
    target: &Tensor,
    weights: &Tensor,
) -> Result<Tensor> {
    same_shape("flow matching prediction", v_pred, target)?;
    let sq = upcast(&(v_pred - target)?.sqr()?)?;
    let w = weights
        .to_dtype(sq.dtype())?
        .broadcast_as(sq.shape())
        .map_err(|_| {
            Error::shape(
                "flow matching weights",
                format!("broadcastable to {:?}", sq.dims()),
                weights.dims(),
            )
        })?;
    Ok((sq * w)?.mean_all()?)
}
