//! Vector quantisation: nearest-code search through a matmul, straight-through
//! gradients, codebook and commitment losses, EMA codebook updates, dead-code
//! restart, usage metrics; and residual VQ with quantizer dropout.

use candle_core::{DType, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};
use melvae_dsp::SplitMix64;

use crate::error::ensure;
use crate::ranks::Ranks;
use crate::{Error, Result};

/// Configuration of a [`VectorQuantizer`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VqConfig {
    /// Number of codes.
    pub codebook_size: usize,
    /// Vector size.
    pub dim: usize,
    /// Weight of the commitment loss in [`VqOutput::loss`] (VQ-VAE: 0.25).
    pub commitment: f64,
    /// EMA codebook updates with this decay (e.g. 0.99) instead of the
    /// gradient of the codebook loss.
    pub ema_decay: Option<f64>,
    /// Decay of the per-code usage average that drives restarts.
    pub usage_decay: f64,
    /// Restart codes whose usage average falls below this many assignments
    /// per batch (Jukebox: 1.0); `None` disables restarts.
    pub restart_threshold: Option<f64>,
    /// Laplace smoothing of the EMA cluster sizes.
    pub eps: f64,
    /// Seed of the restart sampler.
    pub seed: u64,
}

impl VqConfig {
    /// Gradient-trained codebook, commitment 0.25, restarts below 1.0.
    pub fn new(codebook_size: usize, dim: usize) -> Self {
        Self {
            codebook_size,
            dim,
            commitment: 0.25,
            ema_decay: None,
            usage_decay: 0.99,
            restart_threshold: Some(1.0),
            eps: 1e-5,
            seed: 0,
        }
    }

    /// Checks the fields; the error names the bad one.
    pub fn validate(&self) -> Result<()> {
        ensure(self.codebook_size > 0, "vq.codebook_size", || {
            "must be > 0".into()
        })?;
        ensure(self.dim > 0, "vq.dim", || "must be > 0".into())?;
        if let Some(d) = self.ema_decay {
            ensure((0.0..1.0).contains(&d), "vq.ema_decay", || {
                format!("must be in [0, 1), got {d}")
            })?;
        }
        ensure(
            (0.0..1.0).contains(&self.usage_decay),
            "vq.usage_decay",
            || format!("must be in [0, 1), got {}", self.usage_decay),
        )
    }
}

/// What [`VectorQuantizer::forward`] returns.
#[derive(Debug, Clone)]
pub struct VqOutput {
    /// Straight-through quantised input, same shape as the input: the
    /// forward value is the code vector, the gradient passes to the input.
    pub quantized: Tensor,
    /// Code indices, the input's shape without its last dim (u32).
    pub codes: Tensor,
    /// `mean((q - sg[x])^2)`: trains the codebook (zero in EMA mode, which
    /// updates the codebook itself).
    pub codebook_loss: Tensor,
    /// `mean((x - sg[q])^2)`: keeps the encoder near its codes.
    pub commitment_loss: Tensor,
    /// `codebook_loss + commitment * commitment_loss`.
    pub loss: Tensor,
    /// Fraction of codes used in this batch.
    pub usage: f64,
    /// `exp(entropy)` of the batch's code histogram.
    pub perplexity: f64,
    /// Codes restarted by this call.
    pub restarted: usize,
}

/// A codebook of `codebook_size` vectors of size `dim`. Parameters and
/// buffers: `codebook` `[K, dim]`, `usage` `[K]` (EMA of assignments),
/// `ema_sum` `[K, dim]` (EMA mode).
#[derive(Debug)]
pub struct VectorQuantizer {
    cfg: VqConfig,
    codebook: Var,
    usage: Var,
    ema_sum: Option<Var>,
    rng: SplitMix64,
}

/// A `Var` sharing storage with a tensor that a `VarMap`-backed
/// `VarBuilder` returned (writes reach the map, and so the checkpoint).
fn as_var(t: Tensor) -> Result<Var> {
    Ok(Var::from_tensor(&t)?)
}

impl VectorQuantizer {
    /// Builds the codebook and its buffers; fails on an invalid config.
    pub fn new(cfg: VqConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (k, d) = (cfg.codebook_size, cfg.dim);
        let bound = 1.0 / k as f64;
        let codebook = as_var(vb.get_with_hints(
            (k, d),
            "codebook",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?)?;
        let usage = as_var(vb.get_with_hints(
            k,
            "usage",
            Init::Const(cfg.restart_threshold.unwrap_or(1.0)),
        )?)?;
        let ema_sum = match cfg.ema_decay {
            Some(_) => Some(as_var(vb.get_with_hints(
                (k, d),
                "ema_sum",
                Init::Const(0.0),
            )?)?),
            None => None,
        };
        if let Some(s) = &ema_sum {
            // Start the EMA at the initial codebook with unit cluster sizes.
            s.set(
                &codebook
                    .as_tensor()
                    .broadcast_mul(&usage.as_tensor().unsqueeze(1)?)?,
            )?;
        }
        Ok(Self {
            rng: SplitMix64::new(cfg.seed),
            cfg,
            codebook,
            usage,
            ema_sum,
        })
    }

    /// The state of the dead-code restart sampler (a checkpoint keeps it
    /// for exact resume).
    pub fn rng_state(&self) -> u64 {
        self.rng.state
    }

    /// Restores [`VectorQuantizer::rng_state`].
    pub fn set_rng_state(&mut self, state: u64) {
        self.rng.state = state;
    }

    /// The configuration.
    pub fn config(&self) -> &VqConfig {
        &self.cfg
    }

    /// The codebook `[K, dim]`.
    pub fn codebook(&self) -> &Tensor {
        self.codebook.as_tensor()
    }

    /// Nearest code of every row of `x` (`[n, dim]`): `argmin ||x - c||^2`,
    /// computed as `argmin (||c||^2 - 2 x . c)` (`||x||^2` is the same for
    /// every code) with the cross term through a matmul, 8192 rows at a time
    /// so the distance block stays small. `[n]` u32.
    pub fn nearest(&self, x: &Tensor) -> Result<Tensor> {
        const CHUNK: usize = 8192;
        let c = self.codebook.as_tensor().to_dtype(x.dtype())?;
        let c_neg2_t = (&c * -2.0)?.t()?.contiguous()?; // [dim, K]
        let c_sq = c.sqr()?.sum(1)?.unsqueeze(0)?; // [1, K]
        let n = x.dim(0)?;
        let mut parts = Vec::with_capacity(n.div_ceil(CHUNK));
        for start in (0..n).step_by(CHUNK) {
            let rows = x.narrow(0, start, CHUNK.min(n - start))?;
            parts.push(rows.matmul(&c_neg2_t)?.broadcast_add(&c_sq)?.argmin(1)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Quantises `x` (`[..., dim]`). In training (`train`), updates usage
    /// averages, the EMA codebook, and restarts dead codes from `x`'s rows.
    pub fn forward(&mut self, x: &Tensor, train: bool) -> Result<VqOutput> {
        if train {
            self.forward_across(x, &mut Ranks::single())
        } else {
            self.quantize(x, None)
        }
    }

    /// The training [`VectorQuantizer::forward`] of one data-parallel rank
    /// holding an equal shard of the batch (`x`'s leading dimension): the
    /// code counts and EMA sums are summed over `ranks` before the updates,
    /// and a restarted code takes a row of the whole batch, drawn as one
    /// process draws it, so every rank updates its codebook as one process
    /// does on the whole batch, as exactly as the transport behind
    /// `ranks` carries the sums (the trainer's moves `f32`: counts are
    /// exact below 2^24 per code, EMA sums and restarted rows of an `f64`
    /// model are rounded to `f32`). `usage` and `perplexity` are the whole
    /// batch's.
    pub fn forward_across(&mut self, x: &Tensor, ranks: &mut Ranks) -> Result<VqOutput> {
        self.quantize(x, Some(ranks))
    }

    /// [`VectorQuantizer::forward`]; updates when `ranks` are given.
    fn quantize(&mut self, x: &Tensor, ranks: Option<&mut Ranks>) -> Result<VqOutput> {
        let dims = x.dims().to_vec();
        if dims.last() != Some(&self.cfg.dim) {
            return Err(Error::shape(
                "vq input",
                format!("[..., {}]", self.cfg.dim),
                dims,
            ));
        }
        let n = x.elem_count() / self.cfg.dim;
        let flat = x.reshape((n, self.cfg.dim))?;
        let codes = self.nearest(&flat.detach())?;
        let q = self
            .codebook
            .as_tensor()
            .to_dtype(x.dtype())?
            .index_select(&codes, 0)?;
        let codebook_loss = if self.ema_sum.is_some() {
            Tensor::zeros((), x.dtype(), x.device())?
        } else {
            (&q - flat.detach())?.sqr()?.mean_all()?
        };
        let commitment_loss = (&flat - q.detach())?.sqr()?.mean_all()?;
        let loss = (&codebook_loss + (&commitment_loss * self.cfg.commitment)?)?;
        let st = (&flat + (&q - &flat)?.detach())?;

        let code_vec: Vec<u32> = codes.to_vec1()?;
        let k = self.cfg.codebook_size;
        let mut counts = vec![0f64; k];
        for &c in &code_vec {
            counts[c as usize] += 1.0;
        }
        let x = flat.detach();
        // The batch's statistics: this shard's, summed over the ranks.
        let mut stats = None;
        if let Some(ranks) = ranks {
            let batch_sum = match &self.ema_sum {
                Some(_) => Some(
                    Tensor::zeros((k, self.cfg.dim), self.codebook.dtype(), x.device())?
                        .index_add(&codes, &x.to_dtype(self.codebook.dtype())?, 0)?,
                ),
                None => None,
            };
            let batch_sum = if ranks.count() > 1 {
                let mut values = counts.clone();
                if let Some(b) = &batch_sum {
                    values.extend(b.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
                }
                let total = ranks.sum(&values)?;
                counts.copy_from_slice(&total[..k]);
                match batch_sum {
                    Some(b) => Some(
                        Tensor::from_slice(&total[k..], (k, self.cfg.dim), x.device())?
                            .to_dtype(b.dtype())?,
                    ),
                    None => None,
                }
            } else {
                batch_sum
            };
            stats = Some((ranks, batch_sum));
        }
        let n_all: f64 = counts.iter().sum();
        let used = counts.iter().filter(|&&c| c > 0.0).count();
        let entropy: f64 = counts
            .iter()
            .filter(|&&c| c > 0.0)
            .map(|&c| -(c / n_all) * (c / n_all).ln())
            .sum();
        let restarted = match stats {
            Some((ranks, batch_sum)) => self.update(&x, &counts, batch_sum, ranks)?,
            None => 0,
        };

        let mut code_shape = dims.clone();
        code_shape.pop();
        Ok(VqOutput {
            quantized: st.reshape(dims.as_slice())?,
            codes: codes.reshape(code_shape.as_slice())?,
            codebook_loss,
            commitment_loss,
            loss,
            usage: used as f64 / self.cfg.codebook_size as f64,
            perplexity: entropy.exp(),
            restarted,
        })
    }

    /// EMA and usage updates from the whole batch's code `counts` and
    /// (EMA mode) `batch_sum` `[K, dim]`, then restarts from rows of the
    /// whole batch (this rank's are `x`); returns the number restarted.
    fn update(
        &mut self,
        x: &Tensor,
        counts: &[f64],
        batch_sum: Option<Tensor>,
        ranks: &mut Ranks,
    ) -> Result<usize> {
        let dev = x.device();
        let k = self.cfg.codebook_size;
        let cb_dtype = self.codebook.dtype();
        let counts_t = Tensor::from_slice(counts, k, dev)?.to_dtype(cb_dtype)?;
        let decay = self.cfg.ema_decay.unwrap_or(self.cfg.usage_decay);
        let usage = ((self.usage.as_tensor() * decay)? + (&counts_t * (1.0 - decay))?)?;
        self.usage.set(&usage)?;
        if let (Some(sum), Some(d), Some(batch_sum)) =
            (&self.ema_sum, self.cfg.ema_decay, batch_sum)
        {
            let new_sum = ((sum.as_tensor() * d)? + (batch_sum * (1.0 - d))?)?;
            sum.set(&new_sum)?;
            // Laplace-smoothed cluster sizes keep empty clusters finite.
            let total = usage.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let eps = self.cfg.eps;
            let smoothed = ((&usage + eps)? * (total / (total + k as f64 * eps)))?;
            self.codebook
                .set(&new_sum.broadcast_div(&smoothed.unsqueeze(1)?)?)?;
        }
        let Some(threshold) = self.cfg.restart_threshold else {
            return Ok(0);
        };
        let usage_v: Vec<f64> = self.usage.as_tensor().to_dtype(DType::F64)?.to_vec1()?;
        let dead: Vec<usize> = (0..k).filter(|&i| usage_v[i] < threshold).collect();
        if dead.is_empty() {
            return Ok(0);
        }
        // Jukebox: re-seed each dead code with a random vector of this batch
        // and give it one unit of usage, so it survives while it is used.
        let n = x.dim(0)?;
        let rows: Vec<u32> = dead
            .iter()
            .map(|_| self.rng.below(n * ranks.count()) as u32)
            .collect();
        let fresh = if ranks.count() == 1 {
            x.to_dtype(cb_dtype)?
                .index_select(&Tensor::from_slice(&rows, rows.len(), dev)?, 0)?
        } else {
            // Row `g` of the whole batch is row `g % n` of rank `g / n`:
            // each rank gives its own, zeros elsewhere, and the sum gathers.
            let d = self.cfg.dim;
            let mut values = vec![0f64; rows.len() * d];
            for (j, &g) in rows.iter().enumerate() {
                let g = g as usize;
                if g / n == ranks.index() {
                    let row = x.get(g % n)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                    values[j * d..(j + 1) * d].copy_from_slice(&row);
                }
            }
            let total = ranks.sum(&values)?;
            Tensor::from_vec(total, (rows.len(), d), dev)?.to_dtype(cb_dtype)?
        };
        let mut cb = self
            .codebook
            .as_tensor()
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?;
        let mut us = usage_v;
        let fresh: Vec<Vec<f64>> = fresh.to_dtype(DType::F64)?.to_vec2()?;
        for (j, &i) in dead.iter().enumerate() {
            cb[i] = fresh[j].clone();
            us[i] = threshold;
        }
        let cb = Tensor::new(cb, dev)?.to_dtype(cb_dtype)?;
        self.codebook.set(&cb)?;
        self.usage
            .set(&Tensor::new(us.as_slice(), dev)?.to_dtype(cb_dtype)?)?;
        if let Some(sum) = &self.ema_sum {
            sum.set(&cb.broadcast_mul(&self.usage.as_tensor().unsqueeze(1)?)?)?;
        }
        Ok(dead.len())
    }

    /// Code vectors of `codes` (any shape of u32): `[..., dim]`.
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        let mut shape = codes.dims().to_vec();
        let flat = codes.flatten_all()?;
        let max = flat.max(0)?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize;
        ensure(max < self.cfg.codebook_size, "vq codes", || {
            format!("code {max} out of range 0..{}", self.cfg.codebook_size)
        })?;
        shape.push(self.cfg.dim);
        Ok(self
            .codebook
            .as_tensor()
            .index_select(&flat, 0)?
            .reshape(shape.as_slice())?)
    }
}

/// What [`ResidualVq::forward`] returns.
#[derive(Debug, Clone)]
pub struct RvqOutput {
    /// Sum of the stages' straight-through outputs, `[..., dim]`.
    pub quantized: Tensor,
    /// Codes `[..., n_q]` (u32).
    pub codes: Tensor,
    /// Sum of the stages' losses.
    pub loss: Tensor,
    /// Stages used (fewer than all under quantizer dropout).
    pub n_q: usize,
    /// Per stage: RMS of `x - sum of the stages so far`.
    pub residual_rms: Vec<f64>,
}

/// Residual VQ: stage `i` quantises what stages `0..i` left. Parameters
/// `layers.{i}.*`.
#[derive(Debug)]
pub struct ResidualVq {
    layers: Vec<VectorQuantizer>,
    /// Quantizer dropout: in training, use a random number of stages
    /// `1..=N` per batch (SoundStream/Encodec), so any prefix decodes.
    pub quantizer_dropout: bool,
    rng: SplitMix64,
}

impl ResidualVq {
    /// `n_q` stages of `cfg` (stage `i` seeded `cfg.seed + i`).
    pub fn new(cfg: VqConfig, n_q: usize, quantizer_dropout: bool, vb: VarBuilder) -> Result<Self> {
        ensure(n_q > 0, "rvq.n_q", || "must be > 0".into())?;
        let vb = vb.pp("layers");
        let layers = (0..n_q)
            .map(|i| {
                VectorQuantizer::new(
                    VqConfig {
                        seed: cfg.seed + i as u64,
                        ..cfg
                    },
                    vb.pp(i),
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            quantizer_dropout,
            rng: SplitMix64::new(cfg.seed ^ 0xA5A5),
        })
    }

    /// Number of stages.
    pub fn n_q(&self) -> usize {
        self.layers.len()
    }

    /// Quantises `x` (`[..., dim]`) with `n_q` stages (all if `None`; a
    /// random count under quantizer dropout in training).
    pub fn forward(&mut self, x: &Tensor, n_q: Option<usize>, train: bool) -> Result<RvqOutput> {
        let all = self.layers.len();
        let n = match n_q {
            Some(n) => {
                ensure((1..=all).contains(&n), "rvq n_q", || {
                    format!("must be in 1..={all}, got {n}")
                })?;
                n
            }
            None if train && self.quantizer_dropout => 1 + self.rng.below(all),
            None => all,
        };
        let mut residual = x.clone();
        let mut quantized = x.zeros_like()?;
        let mut loss = Tensor::zeros((), x.dtype(), x.device())?;
        let mut codes = Vec::with_capacity(n);
        let mut residual_rms = Vec::with_capacity(n);
        for layer in &mut self.layers[..n] {
            let out = layer.forward(&residual, train)?;
            residual = (&residual - out.quantized.detach())?;
            quantized = (&quantized + &out.quantized)?;
            loss = (&loss + &out.loss)?;
            codes.push(out.codes);
            residual_rms.push(
                residual
                    .sqr()?
                    .mean_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?
                    .sqrt(),
            );
        }
        Ok(RvqOutput {
            quantized,
            codes: Tensor::stack(&codes, D::Minus1)?,
            loss,
            n_q: n,
            residual_rms,
        })
    }

    /// Sum of the code vectors of `codes` (`[..., n_q]`, any `n_q <= N`).
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        let n = *codes.dims().last().unwrap_or(&0);
        ensure(n >= 1 && n <= self.layers.len(), "rvq codes", || {
            format!("last dim must be 1..={}, got {n}", self.layers.len())
        })?;
        let mut sum: Option<Tensor> = None;
        for (i, layer) in self.layers[..n].iter().enumerate() {
            let q = layer.decode(&codes.narrow(D::Minus1, i, 1)?.squeeze(D::Minus1)?)?;
            sum = Some(match sum {
                Some(s) => (s + q)?,
                None => q,
            });
        }
        sum.ok_or_else(|| Error::invalid("rvq codes", "empty"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradients, max_abs_diff, named_vars, noise, randomize, GradCheck};
    use candle_core::Device;
    use candle_nn::VarMap;

    fn vq(cfg: VqConfig, dtype: DType) -> (VarMap, VectorQuantizer) {
        let vm = VarMap::new();
        let q =
            VectorQuantizer::new(cfg, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
        (vm, q)
    }

    /// [`vq`] with seeded initial weights (every call gets the same).
    fn seeded_vq(cfg: VqConfig) -> (VarMap, VectorQuantizer) {
        let vm = VarMap::new();
        let vb = crate::seeded_var_builder(&vm, 9, DType::F64, &Device::Cpu);
        let q = VectorQuantizer::new(cfg, vb).unwrap();
        (vm, q)
    }

    /// Two ranks as threads: each sums with the other through a shared
    /// slot pair.
    fn two_ranks_sums() -> Vec<impl FnMut(&[f64]) -> Result<Vec<f64>> + Send> {
        use std::sync::{Arc, Barrier, Mutex};
        let slots = Arc::new((Mutex::new(vec![Vec::new(), Vec::new()]), Barrier::new(2)));
        (0..2)
            .map(|r| {
                let slots = slots.clone();
                move |v: &[f64]| {
                    let (m, barrier) = &*slots;
                    m.lock().unwrap()[r] = v.to_vec();
                    barrier.wait();
                    let sum = {
                        let both = m.lock().unwrap();
                        both[0].iter().zip(&both[1]).map(|(a, b)| a + b).collect()
                    };
                    barrier.wait();
                    Ok(sum)
                }
            })
            .collect()
    }

    /// Two ranks with half a batch each update their codebooks as one
    /// process does on the whole batch: EMA sums and counts, usage,
    /// perplexity, and restarts that take rows held by either rank.
    #[test]
    fn ranks_share_the_batch_statistics() {
        for ema in [Some(0.8), None] {
            let cfg = VqConfig {
                ema_decay: ema,
                // Most codes fall below: restarts every step.
                restart_threshold: Some(2.0),
                seed: 4,
                ..VqConfig::new(16, 3)
            };
            let state = |q: &VectorQuantizer| -> Vec<Vec<f64>> {
                let mut v = vec![
                    q.codebook().flatten_all().unwrap().to_vec1().unwrap(),
                    q.usage.as_tensor().to_vec1().unwrap(),
                ];
                if let Some(e) = &q.ema_sum {
                    v.push(e.as_tensor().flatten_all().unwrap().to_vec1().unwrap());
                }
                v
            };
            let batches: Vec<Tensor> = (0..3).map(|i| noise(&[4, 5, 3], 10 + i).unwrap()).collect();
            let (_vm, mut one) = seeded_vq(cfg);
            let mut expected = Vec::new();
            let mut from_rank1 = false;
            for x in &batches {
                let out = one.forward(x, true).unwrap();
                expected.push((out.usage, out.perplexity, out.restarted, state(&one)));
                // A restarted code is a copy of an input row; rank 1 holds
                // rows 10..20 of the 20.
                let rows: Vec<Vec<f64>> = x.reshape((20, 3)).unwrap().to_vec2().unwrap();
                let codes: Vec<Vec<f64>> = one.codebook().to_vec2().unwrap();
                from_rank1 |= codes.iter().any(|c| rows[10..].contains(c));
            }
            assert!(expected.iter().all(|e| e.2 > 0), "restarts happened");
            assert!(from_rank1, "a code restarted from rank 1's rows");
            let sums = two_ranks_sums();
            let results: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = sums
                    .into_iter()
                    .enumerate()
                    .map(|(r, sum)| {
                        let (cfg, batches) = (cfg, &batches);
                        s.spawn(move || {
                            let (_vm, mut q) = seeded_vq(cfg);
                            let mut ranks = Ranks::new(r, 2, sum).unwrap();
                            let mut got = Vec::new();
                            for x in batches {
                                let half = x.narrow(0, 2 * r, 2).unwrap();
                                let out = q.forward_across(&half, &mut ranks).unwrap();
                                got.push((out.usage, out.perplexity, out.restarted, state(&q)));
                            }
                            got
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for got in &results {
                for (step, (g, e)) in got.iter().zip(&expected).enumerate() {
                    assert_eq!((g.0, g.2), (e.0, e.2), "ema {ema:?} step {step}");
                    assert!((g.1 - e.1).abs() < 1e-12, "perplexity, step {step}");
                    for (a, b) in g.3.iter().zip(&e.3) {
                        let d = a
                            .iter()
                            .zip(b)
                            .map(|(p, q)| (p - q).abs())
                            .fold(0.0, f64::max);
                        assert!(d < 1e-12, "ema {ema:?} step {step}: {d}");
                    }
                }
            }
        }
    }

    #[test]
    fn nearest_code_and_metrics() {
        let (_, q) = vq(
            VqConfig {
                restart_threshold: None,
                ..VqConfig::new(3, 2)
            },
            DType::F64,
        );
        q.codebook
            .set(&Tensor::new(&[[0.0f64, 0.0], [1.0, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap())
            .unwrap();
        let x = Tensor::new(
            &[[[0.9f64, 0.1], [0.1, 0.2], [0.2, 0.8], [0.7, -0.2]]],
            &Device::Cpu,
        )
        .unwrap();
        let mut q = q;
        let out = q.forward(&x, false).unwrap();
        assert_eq!(out.codes.to_vec2::<u32>().unwrap(), vec![vec![1, 0, 2, 1]]);
        assert_eq!(out.usage, 1.0);
        let p = [0.5f64, 0.25, 0.25];
        let want = (-p.iter().map(|p| p * p.ln()).sum::<f64>()).exp();
        assert!((out.perplexity - want).abs() < 1e-12);
        assert_eq!(
            q.decode(&out.codes).unwrap().to_vec3::<f64>().unwrap(),
            vec![vec![
                vec![1.0, 0.0],
                vec![0.0, 0.0],
                vec![0.0, 1.0],
                vec![1.0, 0.0]
            ]]
        );
        let e = q
            .decode(&Tensor::new(&[5u32], &Device::Cpu).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("code 5"), "{e}");
    }

    #[test]
    fn chunked_search_equals_brute_force() {
        let (vm, q) = vq(VqConfig::new(7, 3), DType::F32);
        randomize(&vm, 1.0, 8).unwrap();
        let n = 2 * 8192 + 5;
        let x = noise(&[n, 3], 6).unwrap().to_dtype(DType::F32).unwrap();
        let got = q.nearest(&x).unwrap().to_vec1::<u32>().unwrap();
        let c = q.codebook().to_vec2::<f32>().unwrap();
        let rows = x.to_vec2::<f32>().unwrap();
        let mut mismatches = 0;
        for (r, &g) in rows.iter().zip(&got) {
            let d = |k: usize| {
                c[k].iter()
                    .zip(r)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
            };
            let best = (0..7).min_by(|&a, &b| d(a).total_cmp(&d(b))).unwrap();
            // Ties within float rounding may pick either code.
            if best != g as usize && (d(best) - d(g as usize)).abs() > 1e-5 {
                mismatches += 1;
            }
        }
        assert_eq!(mismatches, 0);
    }

    #[test]
    fn straight_through_gradient_reaches_the_encoder() {
        // encoder: a linear map; loss: sum(quantized * w). With the
        // straight-through estimator d(quantized)/dx = I, so the encoder's
        // gradient equals that of sum(x * w).
        let (_, mut q) = vq(
            VqConfig {
                restart_threshold: None,
                ..VqConfig::new(4, 3)
            },
            DType::F64,
        );
        let w_enc = Var::from_tensor(&noise(&[3, 3], 1).unwrap()).unwrap();
        let inp = noise(&[5, 3], 2).unwrap();
        let w = noise(&[5, 3], 3).unwrap();
        let x = inp.matmul(w_enc.as_tensor()).unwrap();
        let out = q.forward(&x, false).unwrap();
        let g = out
            .quantized
            .mul(&w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_st = g.get(&w_enc).expect("gradient reaches the encoder");
        let g_ref = inp.t().unwrap().matmul(&w).unwrap();
        assert!(max_abs_diff(g_st, &g_ref).unwrap() < 1e-12);
    }

    #[test]
    fn losses_have_gradients() {
        // Each loss is checked against the variables its gradient is defined
        // for: the stop-gradients make the codebook loss train only the
        // codebook and the commitment loss only the input. (The straight-
        // through path has its own exact test above.) Assignments stay fixed
        // under the finite-difference steps.
        let (vm, q) = vq(
            VqConfig {
                restart_threshold: None,
                ..VqConfig::new(5, 3)
            },
            DType::F64,
        );
        randomize(&vm, 1.0, 2).unwrap();
        let x = Var::from_tensor(&noise(&[2, 4, 3], 3).unwrap()).unwrap();
        let q = std::cell::RefCell::new(q);
        let run = |pick: fn(&VqOutput) -> Tensor| {
            let out = q
                .borrow_mut()
                .forward(x.as_tensor(), false)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            pick(&out).unsqueeze(0)
        };
        let codebook = vec![("codebook".to_string(), q.borrow().codebook.clone())];
        check_gradients(&codebook, GradCheck::default(), || {
            run(|o| o.codebook_loss.clone())
        })
        .unwrap();
        let input = vec![("input".to_string(), x.clone())];
        check_gradients(&input, GradCheck::default(), || {
            run(|o| o.commitment_loss.clone())
        })
        .unwrap();
        assert!(named_vars(&vm).iter().any(|(n, _)| n == "codebook"));
    }

    #[test]
    fn dead_code_is_revived_by_a_restart() {
        let (_, mut q) = vq(
            VqConfig {
                usage_decay: 0.5,
                ..VqConfig::new(4, 2)
            },
            DType::F64,
        );
        // Code 3 sits far from all data: it is never chosen and its usage decays.
        q.codebook
            .set(
                &Tensor::new(
                    &[[0.0f64, 0.0], [1.0, 0.0], [0.0, 1.0], [50.0, 50.0]],
                    &Device::Cpu,
                )
                .unwrap(),
            )
            .unwrap();
        let x = (noise(&[64, 2], 4).unwrap() * 0.5).unwrap().abs().unwrap();
        let mut restarted = 0;
        for _ in 0..3 {
            restarted += q.forward(&x, true).unwrap().restarted;
        }
        assert!(restarted >= 1);
        let cb = q.codebook().to_vec2::<f64>().unwrap();
        let rows = x.to_vec2::<f64>().unwrap();
        assert!(
            rows.contains(&cb[3]),
            "code 3 was re-seeded from the batch: {:?}",
            cb[3]
        );
        let out = q.forward(&x, false).unwrap();
        assert!(
            out.codes.to_vec1::<u32>().unwrap().contains(&3),
            "the revived code is used"
        );
    }

    #[test]
    fn ema_moves_codes_to_their_cluster_means() {
        let (_, mut q) = vq(
            VqConfig {
                ema_decay: Some(0.5),
                restart_threshold: None,
                ..VqConfig::new(2, 1)
            },
            DType::F64,
        );
        q.codebook
            .set(&Tensor::new(&[[-0.1f64], [0.1]], &Device::Cpu).unwrap())
            .unwrap();
        q.ema_sum
            .as_ref()
            .unwrap()
            .set(&Tensor::new(&[[-0.1f64], [0.1]], &Device::Cpu).unwrap())
            .unwrap();
        let x = Tensor::new(&[[-2.0f64], [-1.0], [1.0], [3.0]], &Device::Cpu).unwrap();
        for _ in 0..40 {
            let out = q.forward(&x, true).unwrap();
            assert_eq!(out.codebook_loss.to_scalar::<f64>().unwrap(), 0.0);
        }
        let cb = q.codebook().to_vec2::<f64>().unwrap();
        assert!(
            (cb[0][0] + 1.5).abs() < 1e-3 && (cb[1][0] - 2.0).abs() < 1e-3,
            "{cb:?}"
        );
    }

    #[test]
    fn residual_vq_error_shrinks_with_each_stage() {
        let vm = VarMap::new();
        let cfg = VqConfig {
            ema_decay: Some(0.8),
            ..VqConfig::new(16, 4)
        };
        let mut rvq = ResidualVq::new(
            cfg,
            4,
            true,
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let x = noise(&[256, 4], 5).unwrap().to_dtype(DType::F32).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..30 {
            seen.insert(rvq.forward(&x, None, true).unwrap().n_q);
        }
        assert!(
            seen.len() > 1,
            "quantizer dropout varies the stage count: {seen:?}"
        );
        let out = rvq.forward(&x, None, false).unwrap();
        assert_eq!(out.n_q, 4);
        let x_rms = x
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt() as f64;
        let mut prev = x_rms;
        for r in &out.residual_rms {
            assert!(
                *r < prev,
                "residual RMS must shrink: {x_rms} then {:?}",
                out.residual_rms
            );
            prev = *r;
        }
        assert_eq!(out.codes.dims(), &[256, 4]);
        let dec = rvq.decode(&out.codes).unwrap();
        assert!(max_abs_diff(&dec, &out.quantized).unwrap() < 1e-5);
        let two = rvq.decode(&out.codes.narrow(1, 0, 2).unwrap()).unwrap();
        assert_eq!(two.dims(), &[256, 4]);
        let e = rvq.forward(&x, Some(5), false).unwrap_err();
        assert!(e.to_string().contains("rvq n_q"), "{e}");
    }
}
