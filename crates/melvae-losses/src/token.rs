//! Masked regression and classification losses for the token models.

use candle_core::{DType, Tensor, D};
use melvae_layers::upcast;

use crate::error::same_shape;
use crate::{Error, Result};

/// Mean of `values` over the positions where `mask` is non-zero.
///
/// `mask` has either the leading dims of `values` (`[batch, time]` for
/// `[batch, time, dim]`) or the same rank with size-1 dims that broadcast
/// (`[batch, 1, time]` for a mel `[batch, n_mels, time]`). An all-zero mask
/// gives 0, not NaN.
pub fn masked_mean(values: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let values = &upcast(values)?;
    let Some(mask) = mask else {
        return Ok(values.mean_all()?);
    };
    let (vd, md) = (values.dims(), mask.dims());
    let mask = if md.len() < vd.len() && vd[..md.len()] == *md {
        let mut s = md.to_vec();
        s.resize(vd.len(), 1);
        mask.reshape(s.as_slice())?
    } else {
        mask.clone()
    };
    let m = mask
        .ne(0.0)?
        .to_dtype(values.dtype())?
        .broadcast_as(values.shape())
        .map_err(|_| {
            Error::shape(
                "loss mask",
                format!("leading dims of {vd:?} or broadcastable to it"),
                md,
            )
        })?;
    let total = (values * &m)?.sum_all()?;
    Ok((total / m.sum_all()?.maximum(1.0)?)?)
}

/// Masked mean absolute error `sum(mask |pred - target|) / sum(mask)`.
pub fn masked_mae(pred: &Tensor, target: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    same_shape("masked mae", pred, target)?;
    masked_mean(&(pred - target)?.abs()?, mask)
}

/// Masked binary cross-entropy with logits (the stop gate), as
/// `torch.nn.BCEWithLogitsLoss(pos_weight)`:
/// `l = (1 - y) x + (1 + (w - 1) y) (log(1 + exp(-|x|)) + max(-x, 0))`,
/// averaged over unmasked positions. Stable for any logit.
pub fn masked_bce_with_logits(
    logits: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
    pos_weight: Option<f64>,
) -> Result<Tensor> {
    same_shape("bce logits", logits, targets)?;
    let logits = &upcast(logits)?;
    let y = targets.to_dtype(logits.dtype())?;
    let softplus_neg = ((logits.abs()?.neg()?.exp()? + 1.0)?.log()? + logits.neg()?.relu()?)?;
    let coef = match pos_weight {
        Some(w) => ((&y * (w - 1.0))? + 1.0)?,
        None => y.ones_like()?,
    };
    let l = (((1.0 - &y)? * logits)? + (coef * softplus_neg)?)?;
    masked_mean(&l, mask)
}

/// Cross-entropy of `logits` `[..., classes]` against integer `targets`
/// `[...]` (u32), as `torch.nn.CrossEntropyLoss(ignore_index, label_smoothing)`:
/// per position `(1 - e) (-log p_y) + e mean_c(-log p_c)`, averaged over
/// positions whose target is not `ignore_index` (0 if none remain).
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: Option<u32>,
    label_smoothing: f64,
) -> Result<Tensor> {
    let c = logits.dim(D::Minus1)?;
    let lead = &logits.dims()[..logits.rank() - 1];
    if targets.dims() != lead {
        return Err(Error::shape(
            "cross-entropy targets",
            format!("{lead:?}"),
            targets.dims(),
        ));
    }
    if !(0.0..=1.0).contains(&label_smoothing) {
        return Err(Error::invalid(
            "label_smoothing",
            format!("must be in [0, 1], got {label_smoothing}"),
        ));
    }
    let targets = targets.to_dtype(DType::U32)?.flatten_all()?;
    let logp = candle_nn::ops::log_softmax(&upcast(&logits.reshape(((), c))?)?, D::Minus1)?;
    let valid = match ignore_index {
        Some(ig) => targets.ne(ig)?,
        None => targets.ones_like()?.to_dtype(DType::U8)?,
    };
    let t_vec: Vec<u32> = targets.to_vec1()?;
    if let Some((i, &bad)) = t_vec
        .iter()
        .enumerate()
        .find(|(_, &t)| Some(t) != ignore_index && t as usize >= c)
    {
        return Err(Error::invalid(
            "cross-entropy targets",
            format!("target {bad} at position {i} is not a class in 0..{c}"),
        ));
    }
    let safe = valid.where_cond(&targets, &targets.zeros_like()?)?;
    let nll = logp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let smooth = logp.mean(1)?.neg()?;
    let per = ((nll * (1.0 - label_smoothing))? + (smooth * label_smoothing)?)?;
    masked_mean(&per, Some(&valid))
}
