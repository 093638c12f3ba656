//! Activations, including Snake with a trainable per-channel frequency.

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use crate::Result;

/// Which activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActivationKind {
    /// `max(x, 0)`.
    Relu,
    /// `x` for `x > 0`, `alpha * (exp(x) - 1)` otherwise (SEANet: alpha 1).
    Elu {
        /// Scale of the negative branch.
        alpha: f64,
    },
    /// `max(x, 0) + slope * min(x, 0)`.
    LeakyRelu {
        /// Slope of the negative branch.
        slope: f64,
    },
    /// Exact (erf) GELU, as torch's `nn.GELU()`.
    Gelu,
    /// `x * sigmoid(x)`.
    Silu,
    /// Hyperbolic tangent.
    Tanh,
    /// `x + sin^2(alpha x) / (alpha + 1e-9)`, `alpha` learned per channel
    /// (BigVGAN/DAC), init 1.
    Snake,
}

/// An activation over `[batch, channels, ...]` (Snake needs the channel axis
/// at 1; the others are elementwise on any layout).
#[derive(Debug, Clone)]
pub struct Activation {
    kind: ActivationKind,
    /// Snake's `alpha`, `[channels]`.
    alpha: Option<Tensor>,
}

impl Activation {
    /// `channels` sizes Snake's `alpha` (parameter `alpha`); unused otherwise.
    pub fn new(kind: ActivationKind, channels: usize, vb: VarBuilder) -> Result<Self> {
        let alpha = match kind {
            ActivationKind::Snake => {
                Some(vb.get_with_hints(channels, "alpha", Init::Const(1.0))?)
            }
            _ => None,
        };
        Ok(Self { kind, alpha })
    }

    /// Which activation this is.
    pub fn kind(&self) -> ActivationKind {
        self.kind
    }

    /// The fused kernel's activation, where there is one: a conv can then
    /// apply it as it reads its input (`forward_after` of the convs).
    pub(crate) fn fused(&self) -> Option<crate::kernels::Act> {
        use crate::kernels::Act;
        match self.kind {
            ActivationKind::Elu { alpha } => Some(Act::Elu(alpha)),
            ActivationKind::Gelu => Some(Act::Gelu),
            ActivationKind::Silu => Some(Act::Silu),
            _ => None,
        }
    }

    /// Applies the activation; output has the shape of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.kind {
            ActivationKind::Relu => x.relu()?,
            ActivationKind::Elu { alpha } => {
                crate::kernels::activation(x, crate::kernels::Act::Elu(alpha))?
            }
            ActivationKind::LeakyRelu { slope } => candle_nn::ops::leaky_relu(x, slope)?,
            ActivationKind::Gelu => gelu(x)?,
            ActivationKind::Silu => silu(x)?,
            ActivationKind::Tanh => x.tanh()?,
            ActivationKind::Snake => {
                let alpha = self
                    .alpha
                    .as_ref()
                    .ok_or_else(|| crate::Error::invalid("snake.alpha", "missing"))?;
                match crate::kernels::snake(x, alpha)? {
                    Some(y) => y,
                    None => snake_composed(x, alpha)?,
                }
            }
        })
    }
}

/// Snake from candle's ops (devices and dtypes without the fused kernel).
fn snake_composed(x: &Tensor, alpha: &Tensor) -> Result<Tensor> {
    let mut shape = vec![1; x.rank()];
    shape[1] = x.dim(1)?;
    let alpha = alpha.reshape(shape.as_slice())?;
    let s = x.broadcast_mul(&alpha)?.sin()?.sqr()?;
    Ok((x + s.broadcast_div(&(alpha + 1e-9)?)?)?)
}

/// Exact (erf) GELU of `x` (any shape), as torch's `nn.GELU()`: one fused
/// op with its own backward on the CPU in f32/f64, candle's `gelu_erf`
/// elsewhere.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(crate::kernels::activation(x, crate::kernels::Act::Gelu)?)
}

/// SiLU `x * sigmoid(x)` of `x` (any shape): one fused op with its own
/// backward on the CPU in f32/f64, candle's `silu` elsewhere.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(crate::kernels::activation(x, crate::kernels::Act::Silu)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradients, named_vars, noise, randomize, GradCheck};
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    #[test]
    fn every_activation_has_gradients() {
        for kind in [
            ActivationKind::Relu,
            ActivationKind::Elu { alpha: 1.0 },
            ActivationKind::LeakyRelu { slope: 0.2 },
            ActivationKind::Gelu,
            ActivationKind::Silu,
            ActivationKind::Tanh,
            ActivationKind::Snake,
        ] {
            let vm = VarMap::new();
            let a = Activation::new(
                kind,
                3,
                VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
            )
            .unwrap();
            randomize(&vm, 1.0, 1).unwrap();
            let x = Var::from_tensor(&noise(&[2, 3, 7], 2).unwrap()).unwrap();
            let mut vars = named_vars(&vm);
            vars.push(("input".into(), x.clone()));
            check_gradients(&vars, GradCheck::default(), || {
                a.forward(x.as_tensor())
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            })
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        }
    }

    /// The fused Snake equals the composed one in value and in both
    /// gradients (f64, batch 2, a non-contiguous input, alphas other than
    /// 1), and passes a finite-difference check.
    #[test]
    fn fused_snake_equals_the_composed_one() {
        // (Rows of 5 time steps: many rows per parallel chunk.)
        let xt = Var::from_tensor(&(noise(&[2, 5, 3], 1).unwrap() * 2.0).unwrap()).unwrap();
        let x = || xt.as_tensor().transpose(1, 2).unwrap();
        assert!(!x().is_contiguous());
        let alpha =
            Var::from_tensor(&(noise(&[3], 2).unwrap().abs().unwrap() + 0.3).unwrap()).unwrap();
        let probe = noise(&[2, 3, 5], 3).unwrap();
        let run = |fused: bool| {
            let y = if fused {
                crate::kernels::snake(&x(), alpha.as_tensor())
                    .unwrap()
                    .unwrap()
            } else {
                snake_composed(&x(), alpha.as_tensor()).unwrap()
            };
            crate::testing::value_and_grads(y, &probe, &[&xt, &alpha]).unwrap()
        };
        let d = crate::testing::max_abs_diff_all(&run(true), &run(false)).unwrap();
        assert!(d < 1e-12, "{d}");
        // Long rows: one row per parallel chunk, d alpha summed across them.
        let long = Var::from_tensor(&noise(&[4, 3, 9000], 4).unwrap()).unwrap();
        let lp = noise(&[4, 3, 9000], 5).unwrap();
        let run_long = |fused: bool| {
            let y = if fused {
                crate::kernels::snake(long.as_tensor(), alpha.as_tensor())
                    .unwrap()
                    .unwrap()
            } else {
                snake_composed(long.as_tensor(), alpha.as_tensor()).unwrap()
            };
            crate::testing::value_and_grads(y, &lp, &[&long, &alpha]).unwrap()
        };
        let d = crate::testing::max_abs_diff_all(&run_long(true), &run_long(false)).unwrap();
        assert!(d < 1e-9, "long rows: {d}");
        let vars = vec![
            ("x".to_string(), xt.clone()),
            ("alpha".to_string(), alpha.clone()),
        ];
        check_gradients(&vars, GradCheck::default(), || {
            crate::kernels::snake(&x(), alpha.as_tensor()).map(|y| y.unwrap())
        })
        .unwrap();
    }

    #[test]
    fn snake_formula() {
        let vm = VarMap::new();
        let a = Activation::new(
            ActivationKind::Snake,
            2,
            VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
        )
        .unwrap();
        let x = Tensor::new(&[[[0.5f64], [-1.0]]], &Device::Cpu).unwrap();
        let y = a
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!((y[0] - (0.5 + 0.5f64.sin().powi(2) / (1.0 + 1e-9))).abs() < 1e-12);
        assert!((y[1] - (-1.0 + 1f64.sin().powi(2) / (1.0 + 1e-9))).abs() < 1e-12);
    }
}
