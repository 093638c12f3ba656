//! Linear layers: candle-nn's parameters, names and initialisation, with the
//! bias added by the fused row affine on the CPU (its gradient one pass
//! over the rows instead of candle's strided broadcast sum).

use candle_core::Tensor;
use candle_nn::{Module, VarBuilder};

/// `y = x W^T + b`, `x` `[..., in]` to `[..., out]`. Parameters `weight`
/// `[out, in]` and `bias` `[out]`, as torch's `nn.Linear` and candle-nn's
/// `Linear`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer from its weight `[out, in]` and optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // One 2-D product over all leading axes (no weight broadcast).
        let y = match x.dims() {
            [lead @ .., k] if !lead.is_empty() => {
                let rows = lead.iter().product::<usize>();
                let y =
                    crate::kernels::linear(&x.contiguous()?.reshape((rows, *k))?, &self.weight)?;
                let mut shape = lead.to_vec();
                shape.push(y.dim(1)?);
                y.reshape(shape)?
            }
            _ => x.matmul(&self.weight.t()?)?,
        };
        crate::kernels::rows_affine(&y, None, self.bias.as_ref())
    }
}

/// A linear layer `in` to `out` with bias, created in `vb` as candle-nn's
/// `linear` (Kaiming-normal weight, bias uniform in `+-1/sqrt(in)`).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let weight = linear_no_bias(in_dim, out_dim, vb.clone())?.weight;
    let bound = 1. / (in_dim as f64).sqrt();
    let init = candle_nn::Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let bias = vb.get_with_hints(out_dim, "bias", init)?;
    Ok(Linear::new(weight, Some(bias)))
}

/// A linear layer without bias, created as candle-nn's `linear_no_bias`.
pub fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    let w = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    Ok(Linear::new(w, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff, named_vars, noise, randomize};
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// Same variables and the same output as candle-nn's layer, for 2-, 3-
    /// and 4-D inputs, contiguous or not; no bias works too.
    #[test]
    fn equals_candle_nn_linear() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        let ours = linear(3, 5, vb.pp("a")).unwrap();
        let bare = linear_no_bias(3, 5, vb.pp("b")).unwrap();
        randomize(&vm, 0.5, 1).unwrap();
        let names: Vec<String> = named_vars(&vm).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a.bias", "a.weight", "b.weight"]);
        let theirs = candle_nn::Linear::new(ours.weight().clone(), ours.bias().cloned());
        for shape in [vec![4, 3], vec![2, 4, 3], vec![2, 2, 4, 3]] {
            let x = noise(&shape, 2).unwrap();
            let d = max_abs_diff(&ours.forward(&x).unwrap(), &theirs.forward(&x).unwrap());
            assert!(d.unwrap() < 1e-12, "{shape:?}");
        }
        // A non-contiguous input: the same as its contiguous copy. (candle
        // 0.11's own Linear gets this wrong: its batched matmul of a
        // transposed [2, 4, 3] input against the broadcast weight differs
        // by 0.7 from the contiguous input's; docs/layers.md.)
        let xt = noise(&[2, 3, 4], 3).unwrap().transpose(1, 2).unwrap();
        let want = theirs.forward(&xt.contiguous().unwrap()).unwrap();
        let d = max_abs_diff(&ours.forward(&xt).unwrap(), &want).unwrap();
        assert!(d < 1e-12, "{d}");
        let plain = candle_nn::Linear::new(bare.weight().clone(), None);
        let x = noise(&[2, 4, 3], 4).unwrap();
        let d = max_abs_diff(&bare.forward(&x).unwrap(), &plain.forward(&x).unwrap());
        assert!(d.unwrap() < 1e-12);
    }
}
