//! Reproducible parameter initialisation.
//!
//! candle's CPU random generator cannot be seeded, so models built through a
//! plain `VarMap` start from different weights in every process. A
//! [`seeded_var_builder`] creates each variable from a generator seeded by
//! `(seed, variable name)`, with exactly the distribution its layer asked for
//! (`Init::Const`, `Uniform`, `Randn`, `Kaiming` with candle-nn's fan and gain
//! formulas), and stores it in an ordinary `VarMap` (saved, loaded and
//! optimised as usual).

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use melvae_dsp::SplitMix64;

struct Seeded {
    map: VarMap,
    seed: u64,
}

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Values of `init` for `shape`, drawn from `rng`.
fn draw(init: Init, shape: &Shape, rng: &mut SplitMix64) -> Vec<f64> {
    let n = shape.elem_count();
    let uniform = |rng: &mut SplitMix64, lo: f64, up: f64| -> Vec<f64> {
        (0..n).map(|_| lo + (up - lo) * rng.next_f64()).collect()
    };
    match init {
        Init::Const(c) => vec![c; n],
        Init::Uniform { lo, up } => uniform(rng, lo, up),
        Init::Randn { mean, stdev } => (0..n).map(|_| mean + stdev * rng.normal()).collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = match fan {
                FanInOut::FanIn => FanInOut::FanIn.for_shape(shape),
                FanInOut::FanOut => FanInOut::FanOut.for_shape(shape),
            };
            let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(rng, -bound, bound)
                }
                NormalOrUniform::Normal => (0..n).map(|_| std * rng.normal()).collect(),
            }
        }
    }
}

impl SimpleBackend for Seeded {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.map.data().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", v.shape())
            }
            return Ok(v.as_tensor().clone());
        }
        let mut rng = SplitMix64::new(self.seed ^ name_hash(name));
        let values = draw(h, &s, &mut rng);
        let var = Var::from_tensor(&Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let data = self.map.data().lock().unwrap_or_else(|e| e.into_inner());
        match data.get(name) {
            Some(v) => v.as_tensor().to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("cannot find tensor {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name)
    }
}

/// A `VarBuilder` that creates missing variables in `map` reproducibly from
/// `seed` (see the module docs); existing variables are returned as they are.
pub fn seeded_var_builder(
    map: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(Seeded {
            map: map.clone(),
            seed,
        }),
        dtype,
        device.clone(),
    )
}

/// The variables of `varmap` with their names, sorted by name (a stable
/// order for optimisers, checkpoints and gradient checks).
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// The current values of the variables of `varmap` by name (as a model
/// file or checkpoint stores them).
pub fn named_tensors(varmap: &VarMap) -> std::collections::HashMap<String, Tensor> {
    named_vars(varmap)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AttentionConfig, MultiHeadAttention};

    fn build(seed: u64) -> VarMap {
        let vm = VarMap::new();
        let cfg = AttentionConfig {
            bias: true,
            ..AttentionConfig::new(8, 2)
        };
        MultiHeadAttention::new(cfg, seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu))
            .unwrap();
        let _ = crate::LayerNorm::new(
            8,
            1e-5,
            true,
            seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu).pp("norm"),
        )
        .unwrap();
        vm
    }

    fn values(vm: &VarMap) -> Vec<(String, Vec<f32>)> {
        crate::testing::named_vars(vm)
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    }

    #[test]
    fn same_seed_same_weights_with_the_requested_distributions() {
        let (a, b, c) = (values(&build(1)), values(&build(1)), values(&build(2)));
        assert_eq!(a, b);
        assert_ne!(a, c);
        for (name, v) in &a {
            match name.as_str() {
                "norm.weight" => assert!(v.iter().all(|&x| x == 1.0)),
                "norm.bias" => assert!(v.iter().all(|&x| x == 0.0)),
                "qkv.weight" => {
                    // candle-nn's linear: Kaiming normal, fan-in 8, ReLU gain: std sqrt(2 / 8) = 0.5.
                    let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
                    assert!((std - 0.5).abs() < 0.1, "std {std}");
                }
                "qkv.bias" => {
                    // Uniform within 1 / sqrt(fan-in).
                    let bound = 1.0 / 8f32.sqrt();
                    assert!(
                        v.iter().all(|x| x.abs() <= bound)
                            && v.iter().any(|x| x.abs() > 0.7 * bound)
                    );
                }
                _ => {}
            }
        }
    }
}
