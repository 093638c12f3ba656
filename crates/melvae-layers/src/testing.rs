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

pub use crate::init::named_vars;

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

/// `y` followed by the gradients of `sum(y * probe)` with respect to each
/// of `vars`: what a fused op and its composed twin are compared on.
pub fn value_and_grads(
    y: Tensor,
    probe: &Tensor,
    vars: &[&candle_core::Var],
) -> candle_core::Result<Vec<Tensor>> {
    let g = (&y * probe)?.sum_all()?.backward()?;
    let mut out = vec![y];
    for v in vars {
        out.push(
            g.get(v.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("a variable got no gradient".into()))?
                .clone(),
        );
    }
    Ok(out)
}

/// The largest of [`max_abs_diff`] over pairs of tensors.
pub fn max_abs_diff_all(a: &[Tensor], b: &[Tensor]) -> candle_core::Result<f64> {
    if a.len() != b.len() {
        candle_core::bail!("{} tensors against {}", a.len(), b.len());
    }
    // NaN wins (f64::max would drop it and let a NaN-producing kernel pass).
    a.iter().zip(b).try_fold(0.0f64, |m, (x, y)| {
        let d = max_abs_diff(x, y)?;
        Ok(if d.is_nan() || d > m { d } else { m })
    })
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

/// Environment variable that selects the device of the device-generic
/// tests: unset or `cpu` for the CPU, `cuda:N` (or `cuda`, meaning
/// `cuda:0`) for CUDA device `N` (needs the `cuda` feature).
pub const TEST_DEVICE_VAR: &str = "MELVAE_TEST_DEVICE";

/// The device named by [`TEST_DEVICE_VAR`]; an unknown name or a CUDA
/// device this build cannot open is an error naming the variable.
pub fn test_device() -> crate::Result<Device> {
    let spec = std::env::var(TEST_DEVICE_VAR).unwrap_or_default();
    parse_device(&spec).map_err(|e| crate::Error::invalid(TEST_DEVICE_VAR, e))
}

/// Parses a device name: empty or `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device, String> {
    let spec = spec.trim();
    let ordinal = match spec {
        "" | "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => spec
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| format!("`{spec}` is not a device; expected cpu, cuda or cuda:N"))?,
    };
    Device::new_cuda(ordinal).map_err(|e| format!("cannot open `{spec}`: {e}"))
}

/// Allowed relative L2 errors `||actual - reference|| / ||reference||` of a
/// device-generic comparison against the f64 CPU reference (docs/gpu.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceTolerance {
    /// On the forward output.
    pub output: f64,
    /// On each gradient (parameters and differentiable inputs).
    pub grad: f64,
}

impl DeviceTolerance {
    /// Defaults for one layer or loss in `dtype`: f32 1e-5 / 1e-4,
    /// bf16 2e-2 / 1e-1, f16 4e-3 / 2e-2. bf16 keeps 8 significant bits
    /// (4e-3 relative rounding per op), and candle's backward sums bias
    /// gradients over batch and time in the parameter's dtype.
    pub fn for_dtype(dtype: DType) -> Self {
        let (output, grad) = match dtype {
            DType::F64 => (1e-12, 1e-12),
            DType::F32 => (1e-5, 1e-4),
            DType::BF16 => (2e-2, 1e-1),
            DType::F16 => (4e-3, 2e-2),
            _ => (0.0, 0.0),
        };
        Self { output, grad }
    }

    /// Both bounds multiplied by `factor` (deep stacks accumulate rounding).
    pub fn scaled(self, factor: f64) -> Self {
        Self {
            output: self.output * factor,
            grad: self.grad * factor,
        }
    }
}

/// `||actual - reference||_2 / ||reference||_2`, computed in f64 on the CPU
/// (absolute when the reference is all zeros).
pub fn rel_l2(actual: &Tensor, reference: &Tensor) -> candle_core::Result<f64> {
    if actual.dims() != reference.dims() {
        candle_core::bail!(
            "shapes differ: {:?} vs {:?}",
            actual.dims(),
            reference.dims()
        );
    }
    let a = actual.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let r = reference.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let err = (a - &r)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = r.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if norm > 0.0 { err / norm } else { err })
}

/// One run of [`compare_on_device`]: the output and each variable's gradient.
type RunResult = (Tensor, Vec<(String, Option<Tensor>)>);

/// What [`compare_on_device`] measured: the output's and each gradient's
/// relative L2 error, by name.
#[derive(Debug, Clone)]
pub struct DeviceReport {
    /// `(name, relative L2 error)`, the output first.
    pub errors: Vec<(String, f64)>,
}

impl DeviceReport {
    /// The largest gradient error and its name (`None` without gradients).
    pub fn worst_grad(&self) -> Option<(&str, f64)> {
        self.errors
            .iter()
            .skip(1)
            .map(|(n, e)| (n.as_str(), *e))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }
}

/// Device-generic numerics check: builds the module twice with the same
/// randomised parameters (uniform in `±scale`, seeded), once in f64 on the
/// CPU (the reference) and once in `dtype` on `device` (parameters and
/// inputs rounded to `dtype` in both, so that only the computation differs), runs `forward` on
/// the same inputs and compares the outputs and the gradients of
/// `sum(output * w)` (`w` fixed noise) for every parameter and every
/// floating-point input, within `tol` (relative L2).
///
/// `inputs` are given in f64 on the CPU: floating-point ones are cast to
/// `dtype` and become variables; integer ones (token ids, `u8` masks) are
/// moved unchanged. The output must be in `dtype` (or f32 for half
/// precision, as losses are). A module without parameters (a loss) is built from a
/// `VarBuilder` it ignores. The error names the case, device, dtype and the
/// first quantity out of tolerance.
#[allow(clippy::too_many_arguments)]
pub fn compare_on_device<M>(
    label: &str,
    device: &Device,
    dtype: DType,
    tol: DeviceTolerance,
    scale: f64,
    seed: u64,
    inputs: &[Tensor],
    build: impl Fn(candle_nn::VarBuilder) -> crate::Result<M>,
    forward: impl Fn(&M, &[Tensor]) -> crate::Result<Tensor>,
) -> Result<DeviceReport, String> {
    let ctx = |what: &str, e: String| format!("{label} ({device:?}, {dtype:?}): {what}: {e}");
    let run = |dev: &Device, dt: DType| -> Result<RunResult, String> {
        let varmap = VarMap::new();
        let module = build(candle_nn::VarBuilder::from_varmap(&varmap, dt, dev))
            .map_err(|e| ctx("build", e.to_string()))?;
        randomize(&varmap, scale, seed).map_err(|e| ctx("randomize", e.to_string()))?;
        let mut vars = named_vars(&varmap);
        // Both runs start from values representable in `dtype`, so that
        // the comparison measures computation, not input rounding.
        for (_, v) in &vars {
            let rounded = v
                .to_dtype(dtype)
                .and_then(|r| r.to_dtype(dt))
                .and_then(|r| r.copy())
                .map_err(|e| ctx("round", e.to_string()))?;
            v.set(&rounded).map_err(|e| ctx("round", e.to_string()))?;
        }
        let mut args = Vec::with_capacity(inputs.len());
        for (i, x) in inputs.iter().enumerate() {
            let moved = if x.dtype().is_float() {
                let v = Var::from_tensor(
                    &x.to_dtype(dtype)
                        .and_then(|t| t.to_dtype(dt))
                        .and_then(|t| t.to_device(dev))
                        .map_err(|e| ctx("input", e.to_string()))?,
                )
                .map_err(|e| ctx("input", e.to_string()))?;
                vars.push((format!("input {i}"), v.clone()));
                v.as_tensor().clone()
            } else {
                x.to_device(dev).map_err(|e| ctx("input", e.to_string()))?
            };
            args.push(moved);
        }
        let out = forward(&module, &args).map_err(|e| ctx("forward", e.to_string()))?;
        let grads = (|| -> candle_core::Result<_> {
            let w = noise(out.dims(), 0x5eed)?
                .to_dtype(out.dtype())?
                .to_device(dev)?;
            out.mul(&w)?.sum_all()?.backward()
        })()
        .map_err(|e| ctx("backward", e.to_string()))?;
        let grads = vars
            .into_iter()
            .map(|(n, v)| {
                let g = grads.get(v.as_tensor()).cloned();
                (n, g)
            })
            .collect();
        Ok((out, grads))
    };
    let (ref_out, ref_grads) = run(&Device::Cpu, DType::F64)?;
    let (out, grads) = run(device, dtype)?;
    // Losses of half-precision inputs are f32 (crate::precision).
    let half = crate::is_half(dtype);
    if out.dtype() != dtype && !(half && out.dtype() == DType::F32) {
        return Err(ctx(
            "output",
            format!("dtype {:?}, expected {dtype:?}", out.dtype()),
        ));
    }
    let mut errors = Vec::new();
    let e = rel_l2(&out, &ref_out).map_err(|e| ctx("output", e.to_string()))?;
    errors.push(("output".to_string(), e));
    if e.is_nan() || e > tol.output {
        return Err(ctx(
            "output",
            format!("relative L2 error {e:.3e} > {:.1e}", tol.output),
        ));
    }
    for ((name, g_ref), (_, g)) in ref_grads.iter().zip(&grads) {
        let Some(g_ref) = g_ref else { continue };
        let g = g.as_ref().ok_or_else(|| {
            ctx(
                name,
                "no gradient on the device (the reference has one)".into(),
            )
        })?;
        let e = rel_l2(g, g_ref).map_err(|e| ctx(name, e.to_string()))?;
        errors.push((format!("grad {name}"), e));
        if e.is_nan() || e > tol.grad {
            return Err(ctx(
                name,
                format!("gradient relative L2 error {e:.3e} > {:.1e}", tol.grad),
            ));
        }
    }
    Ok(DeviceReport { errors })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_bad_ones_are_named() {
        assert!(parse_device("").unwrap().is_cpu());
        assert!(parse_device("cpu").unwrap().is_cpu());
        let e = parse_device("gpu0").unwrap_err();
        assert!(e.contains("`gpu0` is not a device"), "{e}");
        let e = parse_device("cuda:x").unwrap_err();
        assert!(e.contains("`cuda:x`"), "{e}");
        #[cfg(not(feature = "cuda"))]
        assert!(parse_device("cuda:0")
            .unwrap_err()
            .contains("cannot open `cuda:0`"));
    }

    #[test]
    fn compare_on_device_passes_equal_numerics_and_catches_a_wrong_kernel() {
        let x = noise(&[4, 8], 3).unwrap();
        let build =
            |vb: candle_nn::VarBuilder| -> crate::Result<Tensor> { Ok(vb.get((8, 8), "w")?) };
        let tol = DeviceTolerance::for_dtype(DType::F32);
        let r = compare_on_device(
            "matmul",
            &Device::Cpu,
            DType::F32,
            tol,
            0.5,
            1,
            std::slice::from_ref(&x),
            build,
            |w, x| Ok(x[0].matmul(w)?.tanh()?),
        )
        .unwrap();
        assert_eq!(r.errors.len(), 3, "{r:?}"); // output, grad w, grad input 0
        assert!(r.worst_grad().unwrap().1 < 1e-6);
        // A "kernel" that is wrong only in low precision is caught, by name.
        let e = compare_on_device(
            "bad",
            &Device::Cpu,
            DType::F32,
            tol,
            0.5,
            1,
            &[x],
            build,
            |w, x| {
                let y = x[0].matmul(w)?;
                Ok(if y.dtype() == DType::F32 {
                    (y * 1.001)?
                } else {
                    y
                })
            },
        )
        .unwrap_err();
        assert!(
            e.contains("bad (Cpu, F32): output: relative L2 error"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod grad_tests {
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
