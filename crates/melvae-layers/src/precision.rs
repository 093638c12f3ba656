//! Mixed precision: what runs in f32 when a model runs in f16/bf16.
//!
//! Elementwise ops and matmuls run in the model's dtype (cuBLAS accumulates
//! half-precision matmuls in f32). Reductions do not: a bf16 sum keeps 8
//! significant bits, so a mean over 1024 values of about 2 stops growing
//! near 512. melvae therefore computes norm statistics, weight norms,
//! attention softmax, timestep embeddings and every loss in f32 for half
//! inputs ([`upcast`]); norms and attention cast their result back, losses
//! return f32 scalars.

use candle_core::{DType, Tensor};

/// Whether `dtype` is a 16-bit float (f16 or bf16).
pub fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
}

/// `x` in f32 if it is f16 or bf16, otherwise unchanged (no copy). The cast
/// is differentiable: gradients flow back in `x`'s dtype.
pub fn upcast(x: &Tensor) -> candle_core::Result<Tensor> {
    if is_half(x.dtype()) {
        x.to_dtype(DType::F32)
    } else {
        Ok(x.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn upcast_only_touches_half_precision() {
        let x = Tensor::ones(4, DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(upcast(&x).unwrap().dtype(), DType::F32);
        let x = Tensor::ones(4, DType::F64, &Device::Cpu).unwrap();
        assert_eq!(upcast(&x).unwrap().dtype(), DType::F64);
        // Why it exists: a bf16 mean of 1024 twos is far from 2.
        let twos = Tensor::full(2f32, 1024, &Device::Cpu).unwrap();
        let m = |t: Tensor| {
            t.mean_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert_eq!(
            m(upcast(&twos.to_dtype(DType::BF16).unwrap()).unwrap()),
            2.0
        );
    }
}
