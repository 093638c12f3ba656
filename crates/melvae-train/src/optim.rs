//! Optimisation: AdamW with saveable state, global-norm clipping, gradient
//! accumulation, learning-rate schedules and an EMA of the weights.
//!
//! Gradients travel as [`Grads`]: one `Option<Tensor>` per variable, in the
//! optimiser's variable order (`None` where a variable got no gradient, e.g.
//! a frozen module or an EMA codebook).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Tensor, Var};
use melvae_layers::is_half;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Gradients aligned with a variable list.
pub type Grads = Vec<Option<Tensor>>;

/// The gradients of `vars` in `store`, in order.
pub fn collect_grads(vars: &[(String, Var)], store: &GradStore) -> Grads {
    // Detached: a gradient computed from variables records the ops that
    // made it, and an optimizer state built from it would keep the whole
    // backward graph of every step alive (memory growing by the size of the
    // activations per step).
    vars.iter()
        .map(|(_, v)| store.get(v).map(Tensor::detach))
        .collect()
}

/// The global L2 norm of `grads`.
pub fn grad_norm(grads: &Grads) -> Result<f64> {
    let mut total = 0.0;
    for g in grads.iter().flatten() {
        total += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Scales `grads` so their global norm is at most `max_norm` (torch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when above).
/// Returns the norm before clipping; a non-finite norm is returned as is
/// and nothing is scaled (the caller skips the step).
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    if norm.is_finite() && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// Sums gradients over micro-batches; [`GradAccumulator::finish`] returns
/// their mean.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sums: Option<Grads>,
    count: usize,
}

impl GradAccumulator {
    /// Adds one micro-batch's gradients.
    pub fn add(&mut self, grads: Grads) -> Result<()> {
        self.count += 1;
        self.sums = Some(match self.sums.take() {
            None => grads,
            Some(sums) => sums
                .into_iter()
                .zip(grads)
                .map(|(a, b)| -> Result<Option<Tensor>> {
                    Ok(match (a, b) {
                        (Some(a), Some(b)) => Some((a + b)?),
                        (a, b) => a.or(b),
                    })
                })
                .collect::<Result<_>>()?,
        });
        Ok(())
    }

    /// Micro-batches added so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The mean gradient over the micro-batches; resets the accumulator.
    pub fn finish(&mut self) -> Result<Grads> {
        let n = self.count.max(1) as f64;
        self.count = 0;
        let sums = self
            .sums
            .take()
            .ok_or_else(|| Error::invalid("gradient accumulation", "no micro-batch was added"))?;
        sums.into_iter()
            .map(|g| g.map(|g| (g / n).map_err(Error::from)).transpose())
            .collect()
    }
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// Exponential decay of the first moment.
    pub beta1: f64,
    /// Exponential decay of the second moment.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch's defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// An f32 copy of a half-precision variable (`None` for f32/f64 ones).
fn master_copy(var: &Var) -> Result<Option<Tensor>> {
    Ok(if is_half(var.dtype()) {
        Some(var.as_tensor().to_dtype(DType::F32)?)
    } else {
        None
    })
}

/// AdamW (Loshchilov & Hutter), exactly as `torch.optim.AdamW`:
/// `p <- p (1 - lr wd)`, `m <- b1 m + (1 - b1) g`, `v <- b2 v + (1 - b2) g^2`,
/// `p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.
/// Unlike candle-nn's AdamW, its moments and step can be saved and restored.
///
/// Mixed precision: for bf16/f16 variables the optimiser keeps f32 master
/// weights and f32 moments; `p` above is the master copy, and the variable
/// receives it rounded to its dtype after each update. Updates smaller than
/// the variable's spacing therefore accumulate instead of vanishing. The
/// optimiser owns those values: after changing such variables from outside
/// (loading weights), call [`AdamW::sync_master`].
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<(String, Var)>,
    master: Vec<Option<Tensor>>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// Whether CPU f32/f64 updates run as in-place passes (off: the
    /// composed ops everywhere, for the equality test).
    in_place: bool,
}

impl AdamW {
    /// An optimiser over named variables (e.g. `melvae_layers::testing::named_vars`).
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let master = vars
            .iter()
            .map(|(_, v)| master_copy(v))
            .collect::<Result<Vec<_>>>()?;
        let m = vars
            .iter()
            .zip(&master)
            .map(|((_, v), ms)| ms.as_ref().unwrap_or(v.as_tensor()).zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        // Separate buffers: the moments are updated in place.
        let v = m
            .iter()
            .map(Tensor::zeros_like)
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            vars,
            master,
            m,
            v,
            step: 0,
            cfg,
            in_place: true,
        })
    }

    /// Re-reads the f32 master weights of half-precision variables from the
    /// variables' current values (after weights were loaded into them).
    pub fn sync_master(&mut self) -> Result<()> {
        for (slot, (_, var)) in self.master.iter_mut().zip(&self.vars) {
            *slot = master_copy(var)?;
        }
        Ok(())
    }

    /// The f32 master copy of variable `i` (half-precision variables only).
    /// The optimiser updates it in place on the CPU: copy it (`Tensor::copy`)
    /// to keep a snapshot.
    pub fn master(&self, i: usize) -> Option<&Tensor> {
        self.master.get(i).and_then(Option::as_ref)
    }

    /// The variables, in gradient order.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Updates taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr`. Variables whose gradient is
    /// `None` are left alone (their moments too).
    pub fn step(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::invalid(
                "gradients",
                format!("{} for {} variables", grads.len(), self.vars.len()),
            ));
        }
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let var = &self.vars[i].1;
            // Detached (see collect_grads): the moments and master
            // weights must not record the ops that made them.
            let g = g.detach().to_dtype(self.m[i].dtype())?;
            let p = self.master[i].as_ref().unwrap_or(var.as_tensor());
            let update = AdamUpdate {
                lr,
                cfg: c,
                bc1,
                bc2,
            };
            if self.in_place && update.in_place(p, &mut self.m[i], &mut self.v[i], &g)? {
                if let Some(master) = &self.master[i] {
                    var.set(&master.to_dtype(var.dtype())?)?;
                }
                continue;
            }
            self.m[i] = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&self.m[i] / bc1)?;
            let v_hat = (&self.v[i] / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let p = self.master[i].as_ref().unwrap_or(var.as_tensor());
            let p = ((p.detach() * (1.0 - lr * c.weight_decay))? - (update * lr)?)?;
            match &mut self.master[i] {
                Some(master) => {
                    var.set(&p.to_dtype(var.dtype())?)?;
                    *master = p;
                }
                None => var.set(&p)?,
            }
        }
        Ok(())
    }

    /// Moments as named tensors (`m.<var>`, `v.<var>`) and the f32 master
    /// weights of half-precision variables (`master.<var>`), for a
    /// checkpoint: copies (later steps update the optimiser's own in place).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].copy()?);
            out.insert(format!("v.{name}"), self.v[i].copy()?);
            if let Some(master) = &self.master[i] {
                out.insert(format!("master.{name}"), master.copy()?);
            }
        }
        Ok(out)
    }

    /// Restores what [`AdamW::state_tensors`] saved and the step; a missing
    /// moment or a shape mismatch is an error naming it. Master weights
    /// missing from `tensors` (a checkpoint written in f32) are re-read from
    /// the variables, which must hold the checkpoint's weights by then.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let get = |key: &str| -> Result<Option<Tensor>> {
                let Some(t) = tensors.get(key) else {
                    return Ok(None);
                };
                if t.dims() != var.dims() {
                    return Err(Error::invalid(
                        "optimizer state",
                        format!(
                            "`{key}` has shape {:?}, the variable {:?}",
                            t.dims(),
                            var.dims()
                        ),
                    ));
                }
                Ok(Some(t.to_device(var.device())?))
            };
            for (which, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{which}.{name}");
                let t = get(&key)?.ok_or_else(|| {
                    Error::invalid("optimizer state", format!("`{key}` is missing"))
                })?;
                // Own copies: the optimiser updates them in place.
                *slot = t.to_dtype(slot.dtype())?.copy()?;
            }
            if is_half(var.dtype()) {
                self.master[i] = Some(match get(&format!("master.{name}"))? {
                    Some(t) => t.to_dtype(DType::F32)?.copy()?,
                    None => var.as_tensor().to_dtype(DType::F32)?,
                });
            }
        }
        self.step = step;
        Ok(())
    }
}

/// One AdamW update of one variable as three in-place passes on the CPU
/// (f32/f64, contiguous): `m` and `v` from the gradient, then the
/// parameter, in the same arithmetic as the composed ops of
/// [`AdamW::step`] (which other devices and dtypes run), without
/// allocating a tensor per term.
#[derive(Debug, Clone, Copy)]
struct AdamUpdate {
    lr: f64,
    cfg: AdamWConfig,
    bc1: f64,
    bc2: f64,
}

/// The passes of [`AdamUpdate`].
#[derive(Debug, Clone, Copy)]
enum AdamPass {
    /// `m <- b1 m + (1 - b1) g`.
    First(f64),
    /// `v <- b2 v + (1 - b2) g^2`.
    Second(f64),
    /// `p <- p (1 - lr wd) - lr (m / bc1) / (sqrt(v / bc2) + eps)`.
    Param(AdamUpdate),
}

impl AdamUpdate {
    /// Updates `p`, `m` and `v` in place and returns true, or returns false
    /// (nothing changed) where the in-place passes do not apply.
    fn in_place(&self, p: &Tensor, m: &mut Tensor, v: &mut Tensor, g: &Tensor) -> Result<bool> {
        let ok = |t: &Tensor| {
            t.device().is_cpu()
                && t.dtype() == p.dtype()
                && matches!(t.dtype(), DType::F32 | DType::F64)
                && t.is_contiguous()
                && t.dims() == p.dims()
        };
        if ![p, &*m, &*v, g].into_iter().all(ok) {
            return Ok(false);
        }
        m.inplace_op2(g, &AdamPass::First(self.cfg.beta1))?;
        v.inplace_op2(g, &AdamPass::Second(self.cfg.beta2))?;
        p.inplace_op3(m, v, &AdamPass::Param(*self))?;
        Ok(true)
    }
}

/// The contiguous elements of `s` (f32 or f64) as `T`'s slice.
macro_rules! elems {
    ($s:expr, $l:expr, $v:ident) => {{
        let (a, b) = $l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("adamw: not contiguous".into()))?;
        match $s {
            CpuStorage::$v(d) => &d[a..b],
            _ => candle_core::bail!("adamw: mixed dtypes"),
        }
    }};
}

impl AdamPass {
    fn run<T: AdamElem>(&self, dst: &mut [T], a: &[T], b: Option<&[T]>) -> candle_core::Result<()> {
        let c = T::of;
        match *self {
            AdamPass::First(b1) => {
                let (b1, a1) = (c(b1), c(1.0 - b1));
                for (m, &g) in dst.iter_mut().zip(a) {
                    *m = *m * b1 + g * a1;
                }
            }
            AdamPass::Second(b2) => {
                let (b2, a2) = (c(b2), c(1.0 - b2));
                for (v, &g) in dst.iter_mut().zip(a) {
                    *v = *v * b2 + g * g * a2;
                }
            }
            AdamPass::Param(u) => {
                let Some(v) = b else {
                    candle_core::bail!("adamw: the parameter pass needs m and v");
                };
                let (i1, i2, eps) = (c(1.0 / u.bc1), c(1.0 / u.bc2), c(u.cfg.eps));
                let (decay, lr) = (c(1.0 - u.lr * u.cfg.weight_decay), c(u.lr));
                for ((p, &m), &v) in dst.iter_mut().zip(a).zip(v) {
                    let step = (m * i1) / ((v * i2).sqrt() + eps);
                    *p = *p * decay - step * lr;
                }
            }
        }
        Ok(())
    }

    fn cpu(
        &self,
        dst: &mut CpuStorage,
        dst_l: &candle_core::Layout,
        a: (&CpuStorage, &candle_core::Layout),
        b: Option<(&CpuStorage, &candle_core::Layout)>,
    ) -> candle_core::Result<()> {
        let (o, e) = dst_l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("adamw: not contiguous".into()))?;
        match dst {
            CpuStorage::F32(d) => {
                let bs = match b {
                    Some((s, l)) => Some(elems!(s, l, F32)),
                    None => None,
                };
                self.run(&mut d[o..e], elems!(a.0, a.1, F32), bs)
            }
            CpuStorage::F64(d) => {
                let bs = match b {
                    Some((s, l)) => Some(elems!(s, l, F64)),
                    None => None,
                };
                self.run(&mut d[o..e], elems!(a.0, a.1, F64), bs)
            }
            _ => candle_core::bail!("adamw: f32 or f64 only"),
        }
    }
}

impl candle_core::InplaceOp2 for AdamPass {
    fn name(&self) -> &'static str {
        "melvae-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &candle_core::Layout,
        s: &CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        self.cpu(dst, dst_l, (s, l), None)
    }
}

impl candle_core::InplaceOp3 for AdamPass {
    fn name(&self) -> &'static str {
        "melvae-adamw-param"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &candle_core::Layout,
        s2: &CpuStorage,
        l2: &candle_core::Layout,
        s3: &CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        self.cpu(dst, dst_l, (s2, l2), Some((s3, l3)))
    }
}

/// The element types of the in-place AdamW passes: constants cast from
/// f64 as candle's affine casts them.
trait AdamElem:
    Copy
    + std::ops::Mul<Output = Self>
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Div<Output = Self>
{
    fn of(v: f64) -> Self;
    fn sqrt(self) -> Self;
}

impl AdamElem for f32 {
    fn of(v: f64) -> Self {
        v as f32
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl AdamElem for f64 {
    fn of(v: f64) -> Self {
        v
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// Learning rate as a function of the step (0-based), relative to a base rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// The base rate.
    Constant,
    /// Linear warm-up over `warmup_steps` (`(s + 1) / warmup`), then a cosine
    /// decay to `min_lr` at `total_steps`.
    WarmupCosine {
        /// Warm-up length.
        warmup_steps: u64,
        /// Step at which the rate reaches `min_lr`.
        total_steps: u64,
        /// Final rate.
        min_lr: f64,
    },
    /// Linear warm-up, the base rate held, then a linear decay to `min_lr`
    /// over the last `decay_steps` before `total_steps` (from the warm-up's
    /// end where that is later; "warmup-stable-decay"): a short run spends
    /// more of its steps at the full rate than under a cosine.
    WarmupStableDecay {
        /// Warm-up length.
        warmup_steps: u64,
        /// Length of the final decay.
        decay_steps: u64,
        /// Step at which the rate reaches `min_lr`.
        total_steps: u64,
        /// Final rate.
        min_lr: f64,
    },
    /// Linear warm-up, then `base * gamma^(s - warmup)`.
    Exponential {
        /// Warm-up length.
        warmup_steps: u64,
        /// Decay per step.
        gamma: f64,
    },
    /// Noam / inverse square root: `base * min((s + 1) / w, sqrt(w / (s + 1)))`,
    /// peaking at `base` after `w = warmup_steps`.
    InverseSqrt {
        /// Warm-up length.
        warmup_steps: u64,
    },
}

impl LrSchedule {
    /// `Err((field, reason))` for a value no run can use, the field under
    /// `schedule.`: a negative or non-finite `min_lr`, a `decay_steps` of 0,
    /// a `gamma` outside (0, 1].
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        let bad = |f: &str, why: String| Err((format!("schedule.{f}"), why));
        match *self {
            LrSchedule::WarmupCosine { min_lr, .. }
            | LrSchedule::WarmupStableDecay { min_lr, .. }
                if !(min_lr >= 0.0 && min_lr.is_finite()) =>
            {
                bad("min_lr", format!("must be >= 0, got {min_lr}"))
            }
            LrSchedule::WarmupStableDecay { decay_steps: 0, .. } => {
                bad("decay_steps", "must be > 0".into())
            }
            LrSchedule::Exponential { gamma, .. } if !(gamma > 0.0 && gamma <= 1.0) => {
                bad("gamma", format!("must be in (0, 1], got {gamma}"))
            }
            _ => Ok(()),
        }
    }

    /// The rate at `step` for a base rate `base`.
    pub fn lr(&self, base: f64, step: u64) -> f64 {
        let s = step as f64;
        let warm = |w: u64| {
            if w == 0 {
                1.0
            } else {
                ((s + 1.0) / w as f64).min(1.0)
            }
        };
        // How far `step` is from `from` to `to`, in [0, 1].
        let progress = |from: u64, to: u64| {
            ((s - from as f64) / to.saturating_sub(from).max(1) as f64).min(1.0)
        };
        match *self {
            LrSchedule::Constant => base,
            LrSchedule::WarmupCosine {
                warmup_steps,
                total_steps,
                min_lr,
            } => {
                if step < warmup_steps {
                    base * warm(warmup_steps)
                } else {
                    let p = progress(warmup_steps, total_steps);
                    min_lr + 0.5 * (base - min_lr) * (1.0 + (std::f64::consts::PI * p).cos())
                }
            }
            LrSchedule::WarmupStableDecay {
                warmup_steps,
                decay_steps,
                total_steps,
                min_lr,
            } => {
                let decay_from = total_steps.saturating_sub(decay_steps).max(warmup_steps);
                if step < warmup_steps {
                    base * warm(warmup_steps)
                } else if step < decay_from {
                    base
                } else {
                    base + (min_lr - base) * progress(decay_from, total_steps)
                }
            }
            LrSchedule::Exponential {
                warmup_steps,
                gamma,
            } => {
                if step < warmup_steps {
                    base * warm(warmup_steps)
                } else {
                    base * gamma.powf(s - warmup_steps as f64)
                }
            }
            LrSchedule::InverseSqrt { warmup_steps } => {
                let w = warmup_steps.max(1) as f64;
                base * ((s + 1.0) / w).min((w / (s + 1.0)).sqrt())
            }
        }
    }
}

/// An exponential moving average of variables:
/// `shadow <- decay * shadow + (1 - decay) * var` after each update. Shadows
/// of bf16/f16 variables are kept in f32: at decay 0.999 each update moves
/// a shadow by far less than a bf16 spacing.
#[derive(Debug, Clone)]
pub struct Ema {
    /// Decay per update.
    pub decay: f64,
    shadow: Vec<Tensor>,
}

impl Ema {
    /// Starts the average at the current values of `vars`.
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        let shadow = vars
            .iter()
            .map(|(_, v)| melvae_layers::upcast(&v.as_tensor().detach().copy()?))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { decay, shadow })
    }

    /// Folds the current values of `vars` into the average.
    pub fn update(&mut self, vars: &[(String, Var)]) -> Result<()> {
        for (s, (_, v)) in self.shadow.iter_mut().zip(vars) {
            let v = v.as_tensor().detach().to_dtype(s.dtype())?;
            *s = ((&*s * self.decay)? + (v * (1.0 - self.decay))?)?;
        }
        Ok(())
    }

    /// The averages as named tensors (`ema.<var>`).
    pub fn state_tensors(&self, vars: &[(String, Var)]) -> HashMap<String, Tensor> {
        vars.iter()
            .zip(&self.shadow)
            .map(|((n, _), s)| (format!("ema.{n}"), s.clone()))
            .collect()
    }

    /// Restores averages saved by [`Ema::state_tensors`].
    pub fn load_state(
        &mut self,
        vars: &[(String, Var)],
        tensors: &HashMap<String, Tensor>,
    ) -> Result<()> {
        for ((n, v), s) in vars.iter().zip(self.shadow.iter_mut()) {
            let key = format!("ema.{n}");
            let t = tensors
                .get(&key)
                .ok_or_else(|| Error::invalid("EMA state", format!("`{key}` is missing")))?;
            // In the shadow's own dtype (f32 for half variables): a detour
            // through the variable's dtype would round the saved average.
            *s = t.to_device(v.device())?.to_dtype(s.dtype())?;
        }
        Ok(())
    }

    /// Copies the averages into `vars` (for evaluation or export).
    pub fn copy_to(&self, vars: &[(String, Var)]) -> Result<()> {
        for (s, (_, v)) in self.shadow.iter().zip(vars) {
            v.set(&s.to_dtype(v.dtype())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The optimizer and EMA state holds plain values, not the graph that
    /// made them: a state that records ops keeps every step's backward
    /// graph alive (the waveform VAE grew by 26 MB a step).
    #[test]
    fn optimizer_and_ema_state_do_not_record_ops() {
        let dev = Device::Cpu;
        let w = Var::new(&[[0.5f32, -0.25], [1.0, 2.0]], &dev).unwrap();
        let vars = vec![("w".to_string(), w.clone())];
        let x = Tensor::new(&[[1.0f32], [2.0]], &dev).unwrap();
        let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
        let mut ema = Ema::new(&vars, 0.9).unwrap();
        for _ in 0..3 {
            let loss = w
                .as_tensor()
                .matmul(&x)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let mut grads = collect_grads(&vars, &loss.backward().unwrap());
            assert!(grads.iter().flatten().all(|g| !g.track_op()));
            clip_grad_norm(&mut grads, 0.1).unwrap();
            opt.step(&grads, 1e-2).unwrap();
            ema.update(&vars).unwrap();
        }
        for (k, t) in opt
            .state_tensors()
            .unwrap()
            .iter()
            .chain(&ema.state_tensors(&vars))
        {
            assert!(!t.track_op(), "{k} records the ops that made it");
        }
    }

    fn var(v: &[f64]) -> (String, Var) {
        (
            "p".into(),
            Var::from_slice(v, v.len(), &Device::Cpu).unwrap(),
        )
    }

    fn vals(v: &Var) -> Vec<f64> {
        v.as_tensor().to_vec1().unwrap()
    }

    /// AdamW for one scalar, written out independently of the tensor code.
    fn reference(p0: f64, grads: &[f64], lr: f64, c: AdamWConfig) -> Vec<f64> {
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        let mut out = Vec::new();
        for (t, &g) in grads.iter().enumerate() {
            let t = (t + 1) as i32;
            p *= 1.0 - lr * c.weight_decay;
            m = c.beta1 * m + (1.0 - c.beta1) * g;
            v = c.beta2 * v + (1.0 - c.beta2) * g * g;
            let mh = m / (1.0 - c.beta1.powi(t));
            let vh = v / (1.0 - c.beta2.powi(t));
            p -= lr * mh / (vh.sqrt() + c.eps);
            out.push(p);
        }
        out
    }

    #[test]
    fn adamw_matches_the_hand_computed_reference() {
        let c = AdamWConfig::default();
        // Step 1 by hand: p = 1 * (1 - 0.1 * 0.01) = 0.999; m_hat = g = 0.5,
        // v_hat = 0.25, update 0.1 * 0.5 / (0.5 + 1e-8) = 0.09999999800.
        let (name, p) = var(&[1.0, -2.0]);
        let mut opt = AdamW::new(vec![(name, p.clone())], c).unwrap();
        opt.step(
            &vec![Some(Tensor::new(&[0.5f64, 0.5], &Device::Cpu).unwrap())],
            0.1,
        )
        .unwrap();
        assert!(
            (vals(&p)[0] - (0.999 - 0.099_999_998)).abs() < 1e-12,
            "{:?}",
            vals(&p)
        );
        let grads = [0.5, -1.5, 0.25, 3.0];
        let want = reference(-2.0, &grads, 0.1, c);
        let (name, p) = var(&[-2.0]);
        let mut opt = AdamW::new(vec![(name, p.clone())], c).unwrap();
        for (g, w) in grads.iter().zip(&want) {
            opt.step(&vec![Some(Tensor::new(&[*g], &Device::Cpu).unwrap())], 0.1)
                .unwrap();
            assert!((vals(&p)[0] - w).abs() < 1e-12, "{} vs {w}", vals(&p)[0]);
        }
        assert_eq!(opt.step_count(), 4);
    }

    /// The in-place passes equal the composed ops (f32 and f64, and
    /// through f32 master weights for bf16), bit for bit over a few steps.
    #[test]
    fn in_place_updates_equal_the_composed_ops() {
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            let init = Tensor::new(&[0.3f64, -0.7, 1.5, 2.0], &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let run = |in_place: bool| {
                let p = Var::from_tensor(&init).unwrap();
                let cfg = AdamWConfig::default();
                let mut opt = AdamW::new(vec![("p".into(), p.clone())], cfg).unwrap();
                opt.in_place = in_place;
                for (k, lr) in [0.1, 0.05, 0.2].into_iter().enumerate() {
                    let g = Tensor::new(&[0.5f64, -1.0, 0.25, k as f64], &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    opt.step(&vec![Some(g)], lr).unwrap();
                }
                let state = opt.state_tensors().unwrap();
                let mut out = vec![p.as_tensor().to_dtype(DType::F64).unwrap()];
                for k in ["m.p", "v.p"] {
                    out.push(state[k].to_dtype(DType::F64).unwrap());
                }
                out.into_iter()
                    .map(|t| t.to_vec1::<f64>().unwrap())
                    .collect::<Vec<_>>()
            };
            assert_eq!(run(true), run(false), "{dtype:?}");
        }
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let c = AdamWConfig::default();
        let g = |x: f64| vec![Some(Tensor::new(&[x, -x], &Device::Cpu).unwrap())];
        let (n, a) = var(&[0.3, 0.7]);
        let mut oa = AdamW::new(vec![(n.clone(), a.clone())], c).unwrap();
        oa.step(&g(1.0), 0.01).unwrap();
        oa.step(&g(-2.0), 0.01).unwrap();
        let b = Var::from_tensor(&a.as_tensor().copy().unwrap()).unwrap();
        let mut ob = AdamW::new(vec![(n.clone(), b.clone())], c).unwrap();
        ob.load_state(&oa.state_tensors().unwrap(), oa.step_count())
            .unwrap();
        for x in [0.5, 3.0] {
            oa.step(&g(x), 0.01).unwrap();
            ob.step(&g(x), 0.01).unwrap();
        }
        assert_eq!(vals(&a), vals(&b));
        let mut bad = oa.state_tensors().unwrap();
        bad.remove("v.p");
        let e = ob.load_state(&bad, 1).unwrap_err().to_string();
        assert!(e.contains("`v.p` is missing"), "{e}");
    }

    /// Values exactly representable in bf16.
    fn bf16_exact(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    #[test]
    fn half_precision_variables_train_through_f32_master_weights() {
        let init = bf16_exact(&[1.0, -0.5, 3.0]);
        let full = Var::from_tensor(&init).unwrap();
        let half = Var::from_tensor(&init.to_dtype(DType::BF16).unwrap()).unwrap();
        let c = AdamWConfig::default();
        let mut of = AdamW::new(vec![("p".into(), full.clone())], c).unwrap();
        let mut oh = AdamW::new(vec![("p".into(), half.clone())], c).unwrap();
        // Each step moves a weight by about lr = 1e-3, under the bf16 spacing
        // near 1 (2^-7): rounded in place, the weights would never move.
        for i in 0..20 {
            let g = bf16_exact(&[0.5 + i as f64, -2.0, 0.25]);
            of.step(&vec![Some(g.clone())], 1e-3).unwrap();
            oh.step(&vec![Some(g.to_dtype(DType::BF16).unwrap())], 1e-3)
                .unwrap();
        }
        let f32_weights = full.as_tensor();
        assert_eq!(oh.master(0).unwrap().dtype(), DType::F32);
        assert_eq!(
            oh.master(0).unwrap().to_vec1::<f32>().unwrap(),
            f32_weights.to_vec1::<f32>().unwrap(),
            "the master weights follow the f32 run exactly"
        );
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            f32_of(half.as_tensor()),
            f32_of(&f32_weights.to_dtype(DType::BF16).unwrap()),
            "the variable is the master rounded"
        );
        assert_ne!(
            half.as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            init.to_vec1::<f32>().unwrap(),
            "small updates accumulated"
        );

        // A checkpoint carries the master weights: a restored optimiser
        // continues exactly, not from the rounded variable.
        let state = oh.state_tensors().unwrap();
        assert!(state.contains_key("master.p"));
        let restored = Var::from_tensor(half.as_tensor()).unwrap();
        let mut or = AdamW::new(vec![("p".into(), restored.clone())], c).unwrap();
        or.load_state(&state, oh.step_count()).unwrap();
        let g = bf16_exact(&[1.0, 1.0, -1.0]).to_dtype(DType::BF16).unwrap();
        oh.step(&vec![Some(g.clone())], 1e-3).unwrap();
        or.step(&vec![Some(g)], 1e-3).unwrap();
        assert_eq!(
            or.master(0).unwrap().to_vec1::<f32>().unwrap(),
            oh.master(0).unwrap().to_vec1::<f32>().unwrap()
        );
        // A state without master weights (written in f32) starts them from
        // the variable; f32 variables have none.
        let mut no_master = state.clone();
        no_master.remove("master.p");
        or.load_state(&no_master, 1).unwrap();
        assert_eq!(
            or.master(0).unwrap().to_vec1::<f32>().unwrap(),
            restored
                .as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        assert!(of.master(0).is_none() && !of.state_tensors().unwrap().contains_key("master.p"));

        // sync_master re-reads weights loaded from outside.
        restored
            .set(
                &Tensor::new(&[2.0f32, 2.0, 2.0], &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
            )
            .unwrap();
        or.sync_master().unwrap();
        assert_eq!(or.master(0).unwrap().to_vec1::<f32>().unwrap(), [2.0; 3]);
    }

    #[test]
    fn ema_of_half_precision_variables_averages_in_f32() {
        let a = Var::from_tensor(
            &Tensor::new(&[1.0f32], &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        )
        .unwrap();
        let vars = vec![("a".to_string(), a.clone())];
        let mut ema = Ema::new(&vars, 0.999).unwrap();
        a.set(
            &Tensor::new(&[2.0f32], &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        )
        .unwrap();
        ema.update(&vars).unwrap();
        // 1.001 lies between bf16 neighbours (1.0, 1.0078): in bf16 the
        // average would not have moved.
        let s = ema.state_tensors(&vars)["ema.a"].clone();
        assert_eq!(s.dtype(), DType::F32);
        assert!((s.to_vec1::<f32>().unwrap()[0] - 1.001).abs() < 1e-6);
        // A restored average is the saved one, not its bf16 rounding.
        let mut restored = Ema::new(&vars, 0.999).unwrap();
        restored
            .load_state(&vars, &ema.state_tensors(&vars))
            .unwrap();
        let r = restored.state_tensors(&vars)["ema.a"]
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(r, s.to_vec1::<f32>().unwrap());
        ema.copy_to(&vars).unwrap();
        assert_eq!(a.dtype(), DType::BF16);
        assert_eq!(
            a.as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [1.0]
        );
    }

    #[test]
    fn none_gradients_leave_variables_alone() {
        let (n, a) = var(&[1.0]);
        let mut o = AdamW::new(vec![(n, a.clone())], AdamWConfig::default()).unwrap();
        o.step(&vec![None], 0.1).unwrap();
        assert_eq!(vals(&a), vec![1.0]);
        let e = o.step(&vec![], 0.1).unwrap_err().to_string();
        assert!(e.contains("0 for 1 variables"), "{e}");
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g: Grads = vec![
            Some(Tensor::new(&[3.0f64], &Device::Cpu).unwrap()),
            None,
            Some(Tensor::new(&[4.0f64], &Device::Cpu).unwrap()),
        ];
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert_eq!(norm, 5.0);
        let after: Vec<f64> = g
            .iter()
            .flatten()
            .map(|t| t.to_vec1::<f64>().unwrap()[0])
            .collect();
        assert!(
            (after[0] - 0.6).abs() < 1e-6 && (after[1] - 0.8).abs() < 1e-6,
            "{after:?}"
        );
        let before = grad_norm(&g).unwrap();
        assert_eq!(clip_grad_norm(&mut g, 10.0).unwrap(), before);
        let mut inf: Grads = vec![Some(Tensor::new(&[f64::INFINITY], &Device::Cpu).unwrap())];
        assert!(clip_grad_norm(&mut inf, 1.0).unwrap().is_infinite());
    }

    #[test]
    fn accumulation_averages() {
        let mut acc = GradAccumulator::default();
        acc.add(vec![
            Some(Tensor::new(&[1.0f64, 2.0], &Device::Cpu).unwrap()),
            None,
        ])
        .unwrap();
        acc.add(vec![
            Some(Tensor::new(&[3.0f64, 6.0], &Device::Cpu).unwrap()),
            Some(Tensor::new(&[4.0f64], &Device::Cpu).unwrap()),
        ])
        .unwrap();
        assert_eq!(acc.count(), 2);
        let g = acc.finish().unwrap();
        assert_eq!(
            g[0].as_ref().unwrap().to_vec1::<f64>().unwrap(),
            vec![2.0, 4.0]
        );
        assert_eq!(g[1].as_ref().unwrap().to_vec1::<f64>().unwrap(), vec![2.0]);
        assert!(acc.finish().is_err());
    }

    #[test]
    fn schedules() {
        let wc = LrSchedule::WarmupCosine {
            warmup_steps: 10,
            total_steps: 110,
            min_lr: 0.0,
        };
        assert!((wc.lr(1.0, 0) - 0.1).abs() < 1e-12);
        assert!((wc.lr(1.0, 9) - 1.0).abs() < 1e-12);
        assert!((wc.lr(1.0, 10) - 1.0).abs() < 1e-12);
        assert!((wc.lr(1.0, 60) - 0.5).abs() < 1e-12);
        assert!(wc.lr(1.0, 110).abs() < 1e-12 && wc.lr(1.0, 500).abs() < 1e-12);
        let wsd = LrSchedule::WarmupStableDecay {
            warmup_steps: 10,
            decay_steps: 40,
            total_steps: 110,
            min_lr: 0.1,
        };
        assert!((wsd.lr(1.0, 0) - 0.1).abs() < 1e-12);
        assert_eq!(wsd.lr(1.0, 10), 1.0);
        assert_eq!(wsd.lr(1.0, 70), 1.0);
        assert!((wsd.lr(1.0, 90) - 0.55).abs() < 1e-12);
        assert!((wsd.lr(1.0, 110) - 0.1).abs() < 1e-12 && (wsd.lr(1.0, 500) - 0.1).abs() < 1e-12);
        // A decay longer than the run after its warm-up starts at the warm-up's end.
        let long = LrSchedule::WarmupStableDecay {
            warmup_steps: 10,
            decay_steps: 500,
            total_steps: 110,
            min_lr: 0.0,
        };
        assert_eq!(long.lr(1.0, 10), 1.0);
        assert!((long.lr(1.0, 60) - 0.5).abs() < 1e-12);
        let ex = LrSchedule::Exponential {
            warmup_steps: 0,
            gamma: 0.5,
        };
        assert_eq!(ex.lr(1.0, 3), 0.125);
        let noam = LrSchedule::InverseSqrt { warmup_steps: 100 };
        assert!((noam.lr(1.0, 99) - 1.0).abs() < 1e-12);
        assert!((noam.lr(1.0, 399) - 0.5).abs() < 1e-12);
        assert!((noam.lr(1.0, 49) - 0.5).abs() < 1e-12);
        assert_eq!(LrSchedule::Constant.lr(3e-4, 1000), 3e-4);
        let parsed: LrSchedule = serde_yaml::from_str(
            "kind: warmup_cosine\nwarmup_steps: 5\ntotal_steps: 50\nmin_lr: 1.0e-6\n",
        )
        .unwrap();
        assert_eq!(
            parsed,
            LrSchedule::WarmupCosine {
                warmup_steps: 5,
                total_steps: 50,
                min_lr: 1e-6
            }
        );
    }

    #[test]
    fn ema_tracks_and_restores() {
        let (n, a) = var(&[0.0]);
        let vars = vec![(n, a.clone())];
        let mut ema = Ema::new(&vars, 0.5).unwrap();
        a.set(&Tensor::new(&[4.0f64], &Device::Cpu).unwrap())
            .unwrap();
        ema.update(&vars).unwrap();
        a.set(&Tensor::new(&[8.0f64], &Device::Cpu).unwrap())
            .unwrap();
        ema.update(&vars).unwrap();
        let state = ema.state_tensors(&vars);
        assert_eq!(state["ema.p"].to_vec1::<f64>().unwrap(), vec![5.0]);
        let mut other = Ema::new(&vars, 0.5).unwrap();
        other.load_state(&vars, &state).unwrap();
        other.copy_to(&vars).unwrap();
        assert_eq!(vals(&a), vec![5.0]);
    }
}
