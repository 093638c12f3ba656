//! Normalisations built from differentiable ops (candle's fused `layer_norm`
//! / `rms_norm` return no gradient), and adaLN-Zero modulation.

use crate::Linear;
use candle_core::{Tensor, D};
use candle_nn::{Init, Module, VarBuilder};

use crate::error::ensure;
use crate::{Error, Result};

/// Normalises the last axis; statistics in f32 for half inputs
/// ([`crate::upcast`]), the result in `x`'s dtype.
fn normalize_last(x: &Tensor, eps: f64, center: bool) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = crate::upcast(x)?;
    let xc = if center {
        x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?
    } else {
        x.clone()
    };
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?)
}

/// Layer normalisation over the last dimension, `[..., dim] -> [..., dim]`,
/// with optional affine `weight`/`bias` (parameter names as torch).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    /// `affine`: learn `weight` (init 1) and `bias` (init 0) of size `dim`.
    pub fn new(dim: usize, eps: f64, affine: bool, vb: VarBuilder) -> Result<Self> {
        let (weight, bias) = if affine {
            (
                Some(vb.get_with_hints(dim, "weight", Init::Const(1.0))?),
                Some(vb.get_with_hints(dim, "bias", Init::Const(0.0))?),
            )
        } else {
            (None, None)
        };
        Ok(Self { weight, bias, eps })
    }

    /// Normalises `x` (`[..., dim]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = normalize_last(x, self.eps, true)?;
        Ok(crate::kernels::rows_affine(
            &y,
            self.weight.as_ref(),
            self.bias.as_ref(),
        )?)
    }
}

/// RMS normalisation over the last dimension with a learned scale `weight`
/// (init 1): `x / sqrt(mean(x^2) + eps) * weight`, `[..., dim]`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// RMS norm over `dim` features with a learned scale.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            eps,
        })
    }

    /// Normalises `x` (`[..., dim]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::kernels::rows_affine(
            &normalize_last(x, self.eps, false)?,
            Some(&self.weight),
            None,
        )?)
    }
}

/// Group normalisation of `[batch, channels, ...]` over groups of
/// `channels / groups` channels and all trailing positions, with per-channel
/// affine `weight`/`bias`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    groups: usize,
    channels: usize,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl GroupNorm {
    /// `groups` groups over `channels` channels; `groups` must divide `channels`.
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        ensure(
            groups > 0 && channels % groups == 0,
            "group_norm.groups",
            || format!("{groups} groups must divide {channels} channels"),
        )?;
        Ok(Self {
            groups,
            channels,
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    /// Normalises `x` (`[batch, channels, ...]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        if dims.len() < 2 || dims[1] != self.channels {
            return Err(Error::shape(
                "group_norm input",
                format!("[batch, {}, ...]", self.channels),
                dims,
            ));
        }
        let y = normalize_last(&x.reshape((dims[0], self.groups, ()))?, self.eps, true)?
            .reshape(dims.as_slice())?;
        let mut affine_shape = vec![1; dims.len()];
        affine_shape[1] = self.channels;
        Ok(
            y.broadcast_mul(&self.weight.reshape(affine_shape.as_slice())?)?
                .broadcast_add(&self.bias.reshape(affine_shape.as_slice())?)?,
        )
    }
}

/// `x * (1 + scale) + shift`, with `x` `[batch, time, dim]` and `shift`,
/// `scale` `[batch, 1, dim]` (as returned by [`AdaLnZero::forward`]).
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    Ok(crate::kernels::rows_affine(
        x,
        Some(&(scale + 1.0)?),
        Some(shift),
    )?)
}

/// `x * gate`, with `x` `[batch, time, dim]` and `gate` `[batch, 1, dim]`
/// (adaLN-Zero's residual gate).
pub fn gate(x: &Tensor, gate: &Tensor) -> Result<Tensor> {
    Ok(crate::kernels::rows_affine(x, Some(gate), None)?)
}

/// adaLN-Zero (DiT): `SiLU -> Linear(cond_dim, n * dim)` producing `n`
/// modulation vectors (shift, scale, gate, ...) from a conditioning vector.
/// The linear layer starts at zero, so gated residual branches start shut
/// and every block starts as the identity.
#[derive(Debug, Clone)]
pub struct AdaLnZero {
    linear: Linear,
    chunks: usize,
}

impl AdaLnZero {
    /// `chunks` modulation vectors of size `dim` from a `cond_dim` condition.
    /// Parameters: `linear.weight` `[chunks * dim, cond_dim]`, `linear.bias`.
    pub fn new(cond_dim: usize, dim: usize, chunks: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("linear");
        let w = vb.get_with_hints((chunks * dim, cond_dim), "weight", Init::Const(0.0))?;
        let b = vb.get_with_hints(chunks * dim, "bias", Init::Const(0.0))?;
        Ok(Self {
            linear: Linear::new(w, Some(b)),
            chunks,
        })
    }

    /// `cond` `[batch, cond_dim]` to `chunks` tensors of `[batch, 1, dim]`.
    pub fn forward(&self, cond: &Tensor) -> Result<Vec<Tensor>> {
        let m = self
            .linear
            .forward(&crate::act::silu(cond)?)?
            .unsqueeze(1)?;
        Ok(m.chunk(self.chunks, D::Minus1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_module, noise};
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    fn setup() -> (VarMap, VarBuilder<'static>) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        (vm, vb)
    }

    fn check(vm: &VarMap, x: &Var, f: impl Fn(&Tensor) -> Result<Tensor>) {
        check_module(vm, 0.8, 11, &[("input", x)], || f(x.as_tensor())).unwrap();
    }

    #[test]
    fn layer_norm_matches_formula_and_trains() {
        let (vm, vb) = setup();
        let ln = LayerNorm::new(6, 1e-5, true, vb).unwrap();
        let x = noise(&[2, 3, 6], 1).unwrap();
        let y = ln.forward(&x).unwrap();
        // With unit weight and zero bias: zero mean, unit variance per row.
        let m = y
            .mean_keepdim(D::Minus1)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let v = y
            .sqr()
            .unwrap()
            .mean_keepdim(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(
            m < 1e-12 && v.iter().all(|v| (v - 1.0).abs() < 1e-3),
            "{m} {v:?}"
        );
        // Same value as candle's fused layer_norm (which has f32 kernels only).
        let (x32, y32) = (
            x.to_dtype(DType::F32).unwrap(),
            y.to_dtype(DType::F32).unwrap(),
        );
        let ones = Tensor::ones(6, DType::F32, &Device::Cpu).unwrap();
        let fused =
            candle_nn::ops::layer_norm(&x32, &ones, &ones.zeros_like().unwrap(), 1e-5).unwrap();
        let diff = (y32 - fused).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        check(&vm, &Var::from_tensor(&x).unwrap(), |x| ln.forward(x));
    }

    #[test]
    fn rms_norm_trains() {
        let (vm, vb) = setup();
        let n = RmsNorm::new(5, 1e-6, vb).unwrap();
        check(
            &vm,
            &Var::from_tensor(&noise(&[3, 5], 2).unwrap()).unwrap(),
            |x| n.forward(x),
        );
    }

    #[test]
    fn group_norm_trains_and_checks_shape() {
        let (vm, vb) = setup();
        let n = GroupNorm::new(2, 4, 1e-5, vb).unwrap();
        check(
            &vm,
            &Var::from_tensor(&noise(&[2, 4, 5], 3).unwrap()).unwrap(),
            |x| n.forward(x),
        );
        let e = n
            .forward(&noise(&[2, 3, 5], 3).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("group_norm input") && e.contains("[2, 3, 5]"),
            "{e}"
        );
        let (_, vb) = setup();
        let e = GroupNorm::new(3, 4, 1e-5, vb).unwrap_err().to_string();
        assert!(e.contains("group_norm.groups"), "{e}");
    }

    #[test]
    fn adaln_zero_starts_as_identity_and_trains() {
        let (vm, vb) = setup();
        let ada = AdaLnZero::new(3, 4, 3, vb).unwrap();
        let cond = noise(&[2, 3], 4).unwrap();
        let m = ada.forward(&cond).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].dims(), &[2, 1, 4]);
        let x = noise(&[2, 5, 4], 5).unwrap();
        let y = modulate(&x, &m[0], &m[1]).unwrap();
        assert_eq!(y.to_vec3::<f64>().unwrap(), x.to_vec3::<f64>().unwrap());
        let c = Var::from_tensor(&cond).unwrap();
        check(&vm, &c, |c| {
            let m = ada.forward(c)?;
            Ok(modulate(&x, &m[0], &m[1])?.broadcast_mul(&m[2])?)
        });
    }
}
