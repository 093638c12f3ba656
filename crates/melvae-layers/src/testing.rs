//! Test utilities shared by every melvae crate: a finite-difference gradient
//! checker and helpers to build randomised parameters.
//!
//! candle's fused ops (layer_norm, rms_norm, softmax_last_dim, rotary) return
//! no gradient and raise no error; a module built on one trains silently
//! wrong. [`check_gradients`] compares candle's backward pass with central
//! differences for every input and parameter, and reports a parameter that
//! receives no gradient at all.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use melvae_dsp::SplitMix64;

use crate::Streaming;

/// Every variable of `varmap`, sorted by name.
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Sets every variable of `varmap` to uniform noise in `[-scale, scale]`, so
/// that gradient checks do not sit on zero-initialised parameters.
pub fn randomize(varmap: &VarMap, scale: f64, seed: u64) -> candle_core::Result<()> {
    let mut rng = SplitMix64::new(seed);
    for (_, var) in named_vars(varmap) {
        let n = var.elem_count();
        let data: Vec<f64> = (0..n)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) * scale)
            .collect();
        let t = Tensor::from_vec(data, var.shape(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// A tensor of uniform noise in `[-1, 1]` (f64, CPU), for test inputs.
pub fn noise(shape: &[usize], seed: u64) -> candle_core::Result<Tensor> {
    let mut rng = SplitMix64::new(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// Runs `x` through `module` in random chunks of 1 to `max_chunk` frames along
/// `dim` (seeded) and concatenates the outputs along the same axis, for
/// comparison with the offline forward.
pub fn stream_in_chunks(
    module: &mut impl Streaming,
    x: &Tensor,
    dim: usize,
    max_chunk: usize,
    seed: u64,
) -> crate::Result<Tensor> {
    stream_in_chunks_to(module, x, dim, dim, max_chunk, seed)
}

/// [`stream_in_chunks`] for modules whose output time axis (`out_dim`)
/// differs from the input's (`in_dim`), e.g. an encoder from
/// `[batch, mel, frames]` to `[batch, latent_frames, dim]`.
pub fn stream_in_chunks_to(
    module: &mut impl Streaming,
    x: &Tensor,
    in_dim: usize,
    out_dim: usize,
    max_chunk: usize,
    seed: u64,
) -> crate::Result<Tensor> {
    module.reset();
    let mut rng = SplitMix64::new(seed);
    let len = x.dim(in_dim)?;
    let mut outs = Vec::new();
    let mut pos = 0;
    while pos < len {
        let n = (1 + rng.below(max_chunk)).min(len - pos);
        if let Some(y) = module.step(&x.narrow(in_dim, pos, n)?)? {
            outs.push(y);
        }
        pos += n;
    }
    Ok(Tensor::cat(&outs, out_dim)?)
}

/// Largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    if a.dims() != b.dims() {
        candle_core::bail!("shapes differ: {:?} vs {:?}", a.dims(), b.dims());
    }
    (a - b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()
}

/// Randomises every variable of `varmap` (uniform in `±scale`, seeded) and
/// checks the gradients of `f` with respect to all of them and each named
/// input, with the default [`GradCheck`]: the one-call check every
/// trainable module's test makes.
pub fn check_module(
    varmap: &VarMap,
    scale: f64,
    seed: u64,
    inputs: &[(&str, &Var)],
    f: impl Fn() -> crate::Result<Tensor>,
) -> Result<(), String> {
    randomize(varmap, scale, seed).map_err(|e| e.to_string())?;
    let mut vars = named_vars(varmap);
    vars.extend(inputs.iter().map(|(n, v)| (n.to_string(), (*v).clone())));
    check_gradients(&vars, GradCheck::default(), || {
        f().map_err(|e| candle_core::Error::Msg(e.to_string()))
    })
}

/// Settings of [`check_gradients`].
#[derive(Debug, Clone, Copy)]
pub struct GradCheck {
    /// Step of the central differences (Richardson-extrapolated from `h` and `h/2`).
    pub h: f64,
    /// Allowed `|fd - autograd| / (1 + |fd|)`.
    pub tol: f64,
    /// Elements checked per variable (evenly spread; all if fewer).
    pub per_var: usize,
}

impl Default for GradCheck {
    fn default() -> Self {
        Self {
            h: 1e-4,
            tol: 1e-6,
            per_var: 12,
        }
    }
}

/// Checks candle's gradients of `sum(f() * w)` (`w` fixed noise) against
/// finite differences for every `(name, var)`; all must be f64.
///
/// Returns a description of the first mismatch, or of a variable that
/// receives no gradient.
pub fn check_gradients(
    vars: &[(String, Var)],
    cfg: GradCheck,
    f: impl Fn() -> candle_core::Result<Tensor>,
) -> Result<(), String> {
    let err = |e: candle_core::Error| e.to_string();
    let out = f().map_err(err)?;
    if out.dtype() != DType::F64 {
        return Err(format!(
            "gradient checks run in f64, the output is {:?}",
            out.dtype()
        ));
    }
    let w = noise(out.dims(), 0x5eed)
        .map_err(err)?
        .to_device(out.device())
        .map_err(err)?;
    let loss =
        |out: Tensor| -> candle_core::Result<f64> { out.mul(&w)?.sum_all()?.to_scalar::<f64>() };
    let grads = out
        .mul(&w)
        .and_then(|l| l.sum_all())
        .and_then(|l| l.backward())
        .map_err(err)?;
    for (name, var) in vars {
        let g = grads
            .get(var)
            .ok_or_else(|| format!("{name}: no gradient reached it"))?
            .flatten_all()
            .and_then(|g| g.to_vec1::<f64>())
            .map_err(err)?;
        let x0: Vec<f64> = var
            .flatten_all()
            .and_then(|t| t.to_vec1::<f64>())
            .map_err(err)?;
        let n = x0.len();
        let picks: Vec<usize> = if n <= cfg.per_var {
            (0..n).collect()
        } else {
            (0..cfg.per_var)
                .map(|i| i * n / cfg.per_var + (i * 7919) % (n / cfg.per_var).max(1))
                .collect()
        };
        for &i in &picks {
            let eval = |d: f64| -> candle_core::Result<f64> {
                let mut x = x0.clone();
                x[i] += d;
                var.set(&Tensor::from_vec(x, var.shape(), var.device())?)?;
                let v = loss(f()?);
                var.set(&Tensor::from_vec(x0.clone(), var.shape(), var.device())?)?;
                v
            };
            let central =
                |h: f64| -> candle_core::Result<f64> { Ok((eval(h)? - eval(-h)?) / (2.0 * h)) };
            let fd =
                (4.0 * central(cfg.h / 2.0).map_err(err)? - central(cfg.h).map_err(err)?) / 3.0;
            if (fd - g[i]).abs() > cfg.tol * (1.0 + fd.abs()) {
                return Err(format!(
                    "{name}[{i}]: autograd {} vs finite differences {fd}",
                    g[i]
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catches_a_fused_op_without_gradient() {
        // candle_nn::ops::softmax_last_dim is fused and returns no gradient.
        let x = Var::from_tensor(&noise(&[2, 8], 1).unwrap()).unwrap();
        let vars = vec![("x".to_string(), x.clone())];
        let r = check_gradients(&vars, GradCheck::default(), || {
            candle_nn::ops::softmax_last_dim(x.as_tensor())
        });
        assert!(r.unwrap_err().contains("x: no gradient"));
        // The composed softmax has one.
        check_gradients(&vars, GradCheck::default(), || {
            candle_nn::ops::softmax(x.as_tensor(), 1)
        })
        .unwrap();
    }

    #[test]
    fn passes_a_correct_gradient_and_catches_a_wrong_one() {
        let x = Var::from_tensor(&noise(&[3, 4], 4).unwrap()).unwrap();
        let vars = vec![("x".to_string(), x.clone())];
        check_gradients(&vars, GradCheck::default(), || x.as_tensor().sqr()?.sin()).unwrap();
        // detach() cuts the graph: autograd sees 0 where the function varies.
        let r = check_gradients(&vars, GradCheck::default(), || {
            x.as_tensor().sqr()? + x.as_tensor().detach().sin()?
        });
        assert!(r.unwrap_err().contains("x["));
    }
}
