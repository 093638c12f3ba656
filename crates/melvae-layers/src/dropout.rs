//! Training mode and reproducible dropout.
//!
//! candle's `ops::dropout` draws from the device's own generator, which
//! cannot be seeded on the CPU: two runs with the same seed would differ at
//! the first dropped unit. Every forward pass of melvae instead takes a
//! [`Mode`]: [`Mode::Eval`], or [`Mode::Train`] with a [`DropoutRng`]
//! seeded by the caller (the trainer derives it from the run's generator),
//! from which every dropout mask of that pass is drawn on the host in a
//! fixed order. The same seed gives the same masks on every device and in
//! every process.

use std::cell::Cell;

use candle_core::{DType, Tensor};
use melvae_dsp::SplitMix64;

use crate::error::ensure;
use crate::Result;

/// The generator dropout masks are drawn from during one training pass.
///
/// Masks are drawn in the order the layers apply dropout, which is fixed by
/// the model's code, so a pass is reproducible from the seed alone.
#[derive(Debug)]
pub struct DropoutRng {
    rng: Cell<SplitMix64>,
}

impl DropoutRng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Cell::new(SplitMix64::new(seed)),
        }
    }

    /// Inverted dropout of `x` (any shape, dtype and device): each element
    /// is zeroed with probability `p` and the rest scaled by `1 / (1 - p)`.
    /// `p` must be in `[0, 1)`; `p = 0` returns `x`.
    pub fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        ensure((0.0..1.0).contains(&p), "dropout probability", || {
            format!("must be in [0, 1), got {p}")
        })?;
        if p == 0.0 {
            return Ok(x.clone());
        }
        let mut rng = self.rng.get();
        let n = x.elem_count();
        let scale = (1.0 / (1.0 - p)) as f32;
        // 16 random bits per element, four elements per draw: masks cost a
        // quarter of a generator call each, with probabilities exact to 2^-16.
        let threshold = (p * 65536.0).round() as u64;
        let mut mask = Vec::with_capacity(n);
        while mask.len() < n {
            let mut bits = rng.next_u64();
            for _ in 0..4.min(n - mask.len()) {
                mask.push(if (bits & 0xFFFF) < threshold {
                    0.0
                } else {
                    scale
                });
                bits >>= 16;
            }
        }
        self.rng.set(rng);
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
        let mask = if x.dtype() == DType::F32 {
            mask
        } else {
            mask.to_dtype(x.dtype())?
        };
        Ok(x.mul(&mask)?)
    }
}

/// Whether a forward pass trains (dropout on, masks from a [`DropoutRng`])
/// or evaluates (dropout off).
#[derive(Debug, Clone, Copy, Default)]
pub enum Mode<'a> {
    /// Inference and validation: no dropout.
    #[default]
    Eval,
    /// Training: dropout masks drawn from this generator.
    Train(&'a DropoutRng),
}

impl Mode<'_> {
    /// True in training mode.
    pub fn is_train(&self) -> bool {
        matches!(self, Mode::Train(_))
    }

    /// Dropout with probability `p` in training mode; `x` unchanged in
    /// evaluation mode or for `p = 0`.
    pub fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        match self {
            Mode::Train(rng) if p > 0.0 => rng.dropout(x, p),
            _ => Ok(x.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ones(n: usize) -> Tensor {
        Tensor::ones(n, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn same_seed_same_mask_and_the_right_rate() {
        let x = ones(40_000);
        let a = DropoutRng::new(3).dropout(&x, 0.25).unwrap();
        let b = DropoutRng::new(3).dropout(&x, 0.25).unwrap();
        let c = DropoutRng::new(4).dropout(&x, 0.25).unwrap();
        let v = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        assert_eq!(v(&a), v(&b));
        assert_ne!(v(&a), v(&c));
        let kept = v(&a).iter().filter(|&&y| y != 0.0).count() as f64 / 40_000.0;
        assert!((kept - 0.75).abs() < 0.01, "{kept}");
        // Kept elements are scaled so the expectation is unchanged.
        assert!(v(&a)
            .iter()
            .all(|&y| y == 0.0 || (y - 4.0 / 3.0).abs() < 1e-6));
        // Successive masks of one generator differ.
        let r = DropoutRng::new(3);
        let (m1, m2) = (r.dropout(&x, 0.5).unwrap(), r.dropout(&x, 0.5).unwrap());
        assert_ne!(v(&m1), v(&m2));
    }

    #[test]
    fn eval_and_zero_probability_are_the_identity() {
        let x = ones(10);
        let r = DropoutRng::new(1);
        for y in [
            Mode::Eval.dropout(&x, 0.5).unwrap(),
            Mode::Train(&r).dropout(&x, 0.0).unwrap(),
        ] {
            assert_eq!(y.to_vec1::<f32>().unwrap(), vec![1.0; 10]);
        }
        let e = r.dropout(&x, 1.0).unwrap_err().to_string();
        assert!(e.contains("dropout probability"), "{e}");
    }
}
