//! A loss balancer as in EnCodec (Défossez et al., 2022, section 3.4):
//! each loss's weight says what share of the gradient reaching the model's
//! output it gets, whatever its scale.
//!
//! For losses `L_i` of an output `x` with weights `w_i`, the gradients
//! `g_i = dL_i/dx` are measured (L2 norm per batch item, averaged over the
//! batch, or over the whole tensor), their norms tracked by an exponential
//! moving average with bias correction (`avg_i = total_i / fix_i`,
//! `total_i <- decay * total_i + |g_i|`, `fix_i <- decay * fix_i + 1`),
//! and the gradient sent back through the model is
//! `sum_i (w_i / sum_j w_j) * total_norm / (eps + avg_i) * g_i`.
//!
//! In candle, gradients are taken with respect to a detached copy of the
//! output ([`LossBalancer::leaf`]) on which the losses are computed; the
//! returned [`Balanced::loss`] has the value of the effective weighted loss
//! and, through the original output, the balanced gradient, so one
//! ordinary `backward` trains the model with it. The averages are the
//! balancer's only state: [`LossBalancer::state`] and
//! [`LossBalancer::load_state`] carry them across a resume.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};
use melvae_layers::Ranks;

use crate::{Error, Result};

/// Settings of a [`LossBalancer`] (EnCodec's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalancerConfig {
    /// The norm the balanced gradient is scaled to (before the weights'
    /// shares).
    pub total_norm: f64,
    /// Decay of the moving average of gradient norms.
    pub ema_decay: f64,
    /// Norms per batch item (then averaged) rather than of the whole batch.
    pub per_batch_item: bool,
    /// Added to the averaged norm before dividing.
    pub epsilon: f64,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        Self {
            total_norm: 1.0,
            ema_decay: 0.999,
            per_batch_item: true,
            epsilon: 1e-12,
        }
    }
}

impl BalancerConfig {
    /// Checks the ranges; errors name `balancer.<field>`.
    pub fn validate(&self) -> Result<()> {
        if !(self.total_norm.is_finite() && self.total_norm > 0.0) {
            return Err(Error::invalid(
                "balancer.total_norm",
                format!("must be > 0, got {}", self.total_norm),
            ));
        }
        if !(0.0..=1.0).contains(&self.ema_decay) {
            return Err(Error::invalid(
                "balancer.ema_decay",
                format!("must be in [0, 1], got {}", self.ema_decay),
            ));
        }
        if !(self.epsilon.is_finite() && self.epsilon >= 0.0) {
            return Err(Error::invalid(
                "balancer.epsilon",
                format!("must be >= 0, got {}", self.epsilon),
            ));
        }
        Ok(())
    }
}

/// The result of [`LossBalancer::balance`].
#[derive(Debug, Clone)]
pub struct Balanced {
    /// A scalar whose value is `sum_i scale_i * L_i` and whose gradient
    /// through the model output is the balanced gradient.
    pub loss: Tensor,
    /// The factor each loss's gradient was multiplied by.
    pub scales: BTreeMap<String, f64>,
    /// Each loss's gradient norm this step (before averaging).
    pub norms: BTreeMap<String, f64>,
}

/// The moving averages of one loss's gradient norm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormAverage {
    /// Decayed sum of norms.
    pub total: f64,
    /// Decayed count (the bias correction).
    pub fix: f64,
}

/// EnCodec's loss balancer; see the module docs.
#[derive(Debug, Clone)]
pub struct LossBalancer {
    cfg: BalancerConfig,
    averages: BTreeMap<String, NormAverage>,
}

impl LossBalancer {
    /// A balancer with no history.
    pub fn new(cfg: BalancerConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            averages: BTreeMap::new(),
        })
    }

    /// The detached copy of `output` the balanced losses must be computed
    /// on (the gradients are taken with respect to it).
    pub fn leaf(output: &Tensor) -> Result<Var> {
        Ok(Var::from_tensor(&output.detach())?)
    }

    /// Balances `losses` (name, weight >= 0, scalar computed from `leaf`)
    /// for `output` (`[batch, ...]`, the tensor `leaf` copies). Losses with
    /// weight 0 are left out. When any gradient norm is not finite the
    /// averages are left as they were and the returned loss is NaN, so the
    /// trainer skips the step without a poisoned history.
    pub fn balance(
        &mut self,
        output: &Tensor,
        leaf: &Var,
        losses: &[(&str, f64, &Tensor)],
    ) -> Result<Balanced> {
        self.balance_across(output, leaf, losses, &mut Ranks::single())
    }

    /// [`LossBalancer::balance`] on one of data-parallel `ranks`, each
    /// holding an equal shard of the batch and losses that are means over
    /// its shard (one sum over the ranks per call, of one value per active
    /// loss). The gradient norms are those of the whole batch's
    /// mean loss (per batch item: the sum of the ranks' norms over
    /// `ranks^2`; whole tensor: the root of the sum of their squares over
    /// `ranks^2`), so every rank keeps the averages one process would,
    /// and a non-finite norm on any rank skips the step on all. Each rank's
    /// loss carries `ranks` times its rows' share of the balanced gradient,
    /// so the mean of the ranks' parameter gradients is the one-process
    /// gradient. The norms are as exact as the transport behind `ranks`
    /// (the trainer's moves `f32`).
    pub fn balance_across(
        &mut self,
        output: &Tensor,
        leaf: &Var,
        losses: &[(&str, f64, &Tensor)],
        ranks: &mut Ranks,
    ) -> Result<Balanced> {
        if output.dims() != leaf.dims() {
            return Err(Error::shape(
                "balancer leaf",
                format!("{:?} like the output", output.dims()),
                leaf.dims(),
            ));
        }
        let active: Vec<_> = losses.iter().filter(|(_, w, _)| *w > 0.0).collect();
        let weight_sum: f64 = active.iter().map(|(_, w, _)| w).sum();
        if active.is_empty() || !weight_sum.is_finite() {
            return Err(Error::invalid(
                "balancer weights",
                "need at least one loss with a finite weight > 0",
            ));
        }
        let mut grads = Vec::with_capacity(active.len());
        let mut norms = BTreeMap::new();
        for (name, _, loss) in &active {
            let store = loss.backward()?;
            let g = match store.get(leaf.as_tensor()) {
                Some(g) => g.detach(),
                // A loss that does not depend on the output pushes nothing.
                None => leaf.as_tensor().zeros_like()?,
            };
            let norm = self.norm(&g)?;
            norms.insert(name.to_string(), norm);
            grads.push(g);
        }
        if ranks.count() > 1 {
            // Per rank, the shard-mean loss's gradient is `ranks` times the
            // batch-mean loss's on the same rows.
            let n2 = (ranks.count() * ranks.count()) as f64;
            let per_item = self.cfg.per_batch_item && output.rank() > 1;
            let parts: Vec<f64> = norms
                .values()
                .map(|&v| if per_item { v } else { v * v } / n2)
                .collect();
            let total = ranks.sum(&parts)?;
            for (v, t) in norms.values_mut().zip(total) {
                *v = if per_item { t } else { t.sqrt() };
            }
        }
        if norms.values().any(|n| !n.is_finite()) {
            let nan = (output.sum_all()? * f64::NAN)?;
            return Ok(Balanced {
                loss: nan,
                scales: BTreeMap::new(),
                norms,
            });
        }
        let decay = self.cfg.ema_decay;
        let mut scales = BTreeMap::new();
        let mut out_grad = output.zeros_like()?.to_dtype(DType::F64)?;
        let mut effective = 0.0;
        for ((name, w, loss), g) in active.iter().zip(&grads) {
            let a = self
                .averages
                .entry(name.to_string())
                .or_insert(NormAverage {
                    total: 0.0,
                    fix: 0.0,
                });
            let norm = norms.get(*name).copied().unwrap_or(0.0);
            a.total = a.total * decay + norm;
            a.fix = a.fix * decay + 1.0;
            let avg = a.total / a.fix;
            let scale = w / weight_sum * self.cfg.total_norm / (self.cfg.epsilon + avg);
            out_grad = (out_grad + (g.to_dtype(DType::F64)? * scale)?)?;
            effective += scale * loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            scales.insert(name.to_string(), scale);
        }
        // value: `effective`; gradient w.r.t. `output`: `out_grad`.
        let dot = (output * out_grad.to_dtype(output.dtype())?)?.sum_all()?;
        let loss = ((&dot - dot.detach())? + effective)?;
        Ok(Balanced {
            loss,
            scales,
            norms,
        })
    }

    /// The L2 norm of `g`, per batch item and averaged, or of the whole
    /// tensor.
    fn norm(&self, g: &Tensor) -> Result<f64> {
        let g = g.to_dtype(DType::F64)?;
        Ok(if self.cfg.per_batch_item && g.rank() > 1 {
            g.flatten_from(1)?
                .sqr()?
                .sum(1)?
                .sqrt()?
                .mean_all()?
                .to_scalar::<f64>()?
        } else {
            g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?
        })
    }

    /// The moving averages by loss name, for a checkpoint.
    pub fn state(&self) -> &BTreeMap<String, NormAverage> {
        &self.averages
    }

    /// Restores averages saved from [`LossBalancer::state`].
    pub fn load_state(&mut self, averages: BTreeMap<String, NormAverage>) {
        self.averages = averages;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `output = w * x` for a parameter `w [2, 3]`; two losses of very
    /// different scales.
    fn setup() -> (Var, Tensor) {
        let dev = Device::Cpu;
        let w = Var::new(&[[0.5f64, -1.0, 2.0], [1.5, 0.25, -0.5]], &dev).unwrap();
        let x = Tensor::new(&[[1.0f64, 2.0, -1.0], [0.5, -2.0, 3.0]], &dev).unwrap();
        (w, x)
    }

    fn losses(leaf: &Tensor) -> (Tensor, Tensor) {
        let big = (leaf.sqr().unwrap().sum_all().unwrap() * 1000.0).unwrap();
        let small = (leaf.abs().unwrap().mean_all().unwrap() * 0.001).unwrap();
        (big, small)
    }

    #[test]
    fn balanced_gradient_gives_each_loss_its_share() {
        let (w, x) = setup();
        let output = (w.as_tensor() * &x).unwrap();
        let mut b = LossBalancer::new(BalancerConfig::default()).unwrap();
        let leaf = LossBalancer::leaf(&output).unwrap();
        let (big, small) = losses(leaf.as_tensor());
        let r = b
            .balance(
                &output,
                &leaf,
                &[("big", 3.0, &big), ("small", 1.0, &small)],
            )
            .unwrap();
        // First step: the average is this step's norm, so each scaled
        // gradient has norm (share * total_norm) per batch item.
        for (name, share) in [("big", 0.75), ("small", 0.25)] {
            let got = r.scales[name] * r.norms[name];
            assert!((got - share).abs() < 1e-9, "{name}: {got}");
        }
        // The value is the effective loss.
        let (bv, sv) = (
            big.to_scalar::<f64>().unwrap(),
            small.to_scalar::<f64>().unwrap(),
        );
        let value = r.loss.to_scalar::<f64>().unwrap();
        assert!((value - (r.scales["big"] * bv + r.scales["small"] * sv)).abs() < 1e-9);
        // The parameter gradient is the scaled sum of the two losses'
        // parameter gradients.
        let g = r.loss.backward().unwrap();
        let gw = g.get(w.as_tensor()).unwrap();
        let direct = |l: &Tensor| l.backward().unwrap().get(w.as_tensor()).unwrap().clone();
        let out2 = (w.as_tensor() * &x).unwrap();
        let (big2, small2) = losses(&out2);
        let want = ((direct(&big2) * r.scales["big"]).unwrap()
            + (direct(&small2) * r.scales["small"]).unwrap())
        .unwrap();
        let diff = (gw - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-12, "{diff}");
    }

    #[test]
    fn averages_follow_the_ema_and_resume_exactly() {
        let (w, x) = setup();
        let cfg = BalancerConfig {
            ema_decay: 0.5,
            ..Default::default()
        };
        let mut a = LossBalancer::new(cfg).unwrap();
        let run = |b: &mut LossBalancer, k: f64| {
            let output = ((w.as_tensor() * &x).unwrap() * k).unwrap();
            let leaf = LossBalancer::leaf(&output).unwrap();
            let (big, small) = losses(leaf.as_tensor());
            b.balance(
                &output,
                &leaf,
                &[("big", 1.0, &big), ("small", 1.0, &small)],
            )
            .unwrap()
        };
        let r1 = run(&mut a, 1.0);
        let mut resumed = LossBalancer::new(cfg).unwrap();
        resumed.load_state(a.state().clone());
        let r2 = run(&mut a, 2.0);
        let r2b = run(&mut resumed, 2.0);
        assert_eq!(r2.scales, r2b.scales);
        // avg = (0.5 n1 + n2) / 1.5 for the second step.
        let n1 = r1.norms["big"];
        let n2 = r2.norms["big"];
        let avg = (0.5 * n1 + n2) / 1.5;
        assert!((r2.scales["big"] - 0.5 / avg).abs() < 1e-9 * r2.scales["big"]);
    }

    /// Two ranks, one row of the batch each, with row-mean losses: the
    /// mean of their parameter gradients, their norms and their averages
    /// are one process's on the whole batch; per batch item and over the
    /// whole tensor, over two steps (the second uses the history).
    #[test]
    fn ranks_together_balance_the_whole_batch() {
        let mean_losses = |leaf: &Tensor| {
            let big = (leaf.sqr().unwrap().mean_all().unwrap() * 1000.0).unwrap();
            let small = (leaf.abs().unwrap().mean_all().unwrap() * 0.001).unwrap();
            (big, small)
        };
        // The balanced parameter gradient and norms of `rows` of the batch
        // (`k` scales the output) on `ranks`.
        let step =
            |b: &mut LossBalancer, rows: std::ops::Range<usize>, k: f64, ranks: &mut Ranks| {
                let (w, x) = setup();
                let n = rows.len();
                let output = ((w.as_tensor().narrow(0, rows.start, n).unwrap()
                    * x.narrow(0, rows.start, n).unwrap())
                .unwrap()
                    * k)
                    .unwrap();
                let leaf = LossBalancer::leaf(&output).unwrap();
                let (big, small) = mean_losses(leaf.as_tensor());
                let r = b.balance_across(
                    &output,
                    &leaf,
                    &[("big", 3.0, &big), ("small", 1.0, &small)],
                    ranks,
                )?;
                let g = r.loss.backward().unwrap();
                Ok::<_, Error>((g.get(w.as_tensor()).unwrap().clone(), r.norms))
            };
        for per_batch_item in [true, false] {
            let cfg = BalancerConfig {
                per_batch_item,
                ema_decay: 0.5,
                ..Default::default()
            };
            let mut one = LossBalancer::new(cfg).unwrap();
            let mut ranks = [one.clone(), one.clone()];
            for k in [1.0, 3.0] {
                let (g1, n1) = step(&mut one, 0..2, k, &mut Ranks::single()).unwrap();
                // Each rank's parts, then the real steps with their sum.
                let mut parts = Vec::new();
                for (r, b) in ranks.iter().enumerate() {
                    let mut probe = b.clone();
                    let mut record = Ranks::new(r, 2, |v| {
                        parts.push(v.to_vec());
                        Ok(v.to_vec())
                    })
                    .unwrap();
                    step(&mut probe, r..r + 1, k, &mut record).unwrap();
                }
                let total: Vec<f64> = parts[0].iter().zip(&parts[1]).map(|(a, b)| a + b).collect();
                let mut grads = Vec::new();
                for (r, b) in ranks.iter_mut().enumerate() {
                    let mut sum = Ranks::new(r, 2, |_| Ok(total.clone())).unwrap();
                    let (g, n) = step(b, r..r + 1, k, &mut sum).unwrap();
                    for (name, v) in &n1 {
                        assert!(
                            (n[name] - v).abs() < 1e-12 * v,
                            "{name}: {} vs {v}",
                            n[name]
                        );
                    }
                    grads.push(g);
                }
                let mean = ((&grads[0] + &grads[1]).unwrap() / 2.0).unwrap();
                let diff = (mean - &g1)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                let scale = g1
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(
                    diff < 1e-12 * scale,
                    "per item {per_batch_item}, k {k}: {diff}"
                );
            }
            for b in &ranks {
                for (name, a) in one.state() {
                    let got = b.state()[name];
                    assert!((got.total - a.total).abs() < 1e-12 * a.total, "{name}");
                    assert_eq!(got.fix, a.fix);
                }
            }
        }
    }

    #[test]
    fn non_finite_norms_leave_the_history_alone() {
        let (w, x) = setup();
        let mut b = LossBalancer::new(BalancerConfig::default()).unwrap();
        let output = (w.as_tensor() * &x).unwrap();
        let leaf = LossBalancer::leaf(&output).unwrap();
        let bad = (leaf.as_tensor().sum_all().unwrap() * f64::INFINITY).unwrap();
        let r = b.balance(&output, &leaf, &[("bad", 1.0, &bad)]).unwrap();
        assert!(r.loss.to_scalar::<f64>().unwrap().is_nan());
        assert!(b.state().is_empty());
        let e = b
            .balance(&output, &leaf, &[("bad", 0.0, &bad)])
            .unwrap_err();
        assert!(e.to_string().contains("balancer weights"), "{e}");
        let e = LossBalancer::new(BalancerConfig {
            ema_decay: 1.5,
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("balancer.ema_decay"), "{e}");
    }
}
