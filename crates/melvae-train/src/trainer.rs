//! The training loop every model family shares.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use melvae_dsp::SplitMix64;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{checkpoint_name, Checkpoint, RunDir, TrainState};
use crate::config::{check, Validate};
use crate::dist::{
    all_reduce, broadcast, sum_values, Communicator, ReduceOp, Shard, SingleProcess,
};
use crate::optim::{
    clip_grad_norm, collect_grads, AdamW, AdamWConfig, Ema, GradAccumulator, Grads, LrSchedule,
};
use crate::{Error, Result};

/// What a task's loss function is told about the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepContext {
    /// Updates completed before this one.
    pub step: u64,
    /// Training (dropout etc. on) or evaluation.
    pub train: bool,
    /// GAN mode: adversarial terms are switched on (after the warm-up).
    pub adversarial: bool,
}

/// Losses of one batch: `total` is differentiated, `terms` are logged.
#[derive(Debug, Clone)]
pub struct Losses {
    /// The scalar to minimise.
    pub total: Tensor,
    /// Named scalar components, for logging and the non-finite report.
    pub terms: BTreeMap<String, Tensor>,
}

/// A model family plugged into the [`Trainer`].
pub trait TrainTask {
    /// A training batch.
    type Batch;
    /// The (generator's) trainable variables with their checkpoint names.
    fn vars(&self) -> Vec<(String, Var)>;
    /// The discriminator's variables (GAN mode); none by default.
    fn disc_vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    /// The next training batch; all randomness (crops, order) from `rng`, so
    /// that a resumed run sees the same data.
    fn train_batch(&mut self, rng: &mut SplitMix64) -> Result<Self::Batch>;
    /// Generator losses on `batch`.
    fn losses(&mut self, batch: &Self::Batch, ctx: StepContext) -> Result<Losses>;
    /// The training step's [`TrainTask::losses`] on one rank of `comm`
    /// (data-parallel, [`TrainTask::set_shard`]), for a family whose losses
    /// need statistics of the whole global batch (the wave VAE's loss
    /// balancer): they are summed over the ranks with `comm`, which every
    /// rank calls alike. The default is `losses`.
    fn losses_across(
        &mut self,
        batch: &Self::Batch,
        ctx: StepContext,
        _comm: &dyn Communicator,
    ) -> Result<Losses> {
        self.losses(batch, ctx)
    }
    /// Discriminator losses on `batch` (GAN mode).
    fn disc_losses(&mut self, _batch: &Self::Batch, _ctx: StepContext) -> Result<Option<Losses>> {
        Ok(None)
    }
    /// Validation metrics (means over the validation set), computed in
    /// evaluation mode (`ctx.train` is false: no dropout), with the EMA
    /// weights when the run keeps an EMA.
    fn validate(&mut self, ctx: StepContext) -> Result<BTreeMap<String, f64>>;
    /// The validation metric (lower is better) that picks the best
    /// checkpoint and drives early stopping unless `training.best_metric`
    /// names another; it should be free of schedule weights.
    fn best_metric(&self) -> &str {
        "total"
    }
    /// Writes sample artefacts (WAV, PNG) into `dir` and returns their
    /// paths (logged to TensorBoard too). EMA weights, evaluation mode.
    fn samples(&mut self, _ctx: StepContext, _dir: &Path) -> Result<Vec<PathBuf>> {
        Ok(Vec::new())
    }
    /// Writes a model file (see `melvae_models::model_file`) of the current
    /// weights at `path` with `metadata`; `Ok(false)` when the family has
    /// no model file. Called with the EMA weights swapped in.
    fn save_model_file(&self, _path: &Path, _metadata: &BTreeMap<String, String>) -> Result<bool> {
        Ok(false)
    }
    /// Task state a resumed run needs (beyond variables and the RNG).
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Restores [`TrainTask::state`].
    fn load_state(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
    /// Data-parallel training ([`crate::dist`]): from now on, build only
    /// `shard`'s rows of every global batch while drawing the whole batch's
    /// randomness (crops and order from the trainer's `rng`, per-row noise
    /// as the whole batch would draw it), so that the ranks together compute
    /// the single-process batch. Dropout masks come from per-rank streams
    /// ([`Shard::seed`]). The default accepts only the whole batch (every
    /// bundled family shards; a task of your own opts in here).
    fn set_shard(&mut self, shard: Shard) -> Result<()> {
        match shard.count {
            1 => Ok(()),
            n => Err(Error::invalid(
                "data-parallel training",
                format!(
                    "this task does not shard its batches (TrainTask::set_shard); run it on one rank, not {n}"
                ),
            )),
        }
    }
}

/// GAN-mode settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GanConfig {
    /// Discriminator learning rate (same schedule as the generator's).
    pub disc_learning_rate: f64,
    /// Discriminator optimiser.
    #[serde(default)]
    pub disc_adamw: AdamWConfig,
    /// Update the discriminator every this many steps.
    #[serde(default = "one")]
    pub disc_every: u64,
    /// Steps before the adversarial terms and discriminator updates start.
    #[serde(default)]
    pub adversarial_start_step: u64,
    /// Global-norm clipping of the discriminator's gradients.
    #[serde(default)]
    pub disc_grad_clip: Option<f64>,
}

fn one() -> u64 {
    1
}

/// Initialise named sub-modules from another run's checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitFrom {
    /// A checkpoint directory (`.../checkpoints/step-...`) or a run
    /// directory (its `latest` is used).
    pub checkpoint: PathBuf,
    /// Variable-name prefixes to copy (e.g. `encoder.`); every variable with
    /// such a prefix must exist in the checkpoint with the same shape.
    pub modules: Vec<String>,
}

/// The `training:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerConfig {
    /// Total updates.
    pub steps: u64,
    /// Base learning rate.
    pub learning_rate: f64,
    /// Learning-rate schedule.
    #[serde(default = "constant")]
    pub schedule: LrSchedule,
    /// Optimiser.
    #[serde(default)]
    pub adamw: AdamWConfig,
    /// Global-norm gradient clipping.
    #[serde(default)]
    pub grad_clip: Option<f64>,
    /// Micro-batches per update.
    #[serde(default = "one_usize")]
    pub grad_accum: usize,
    /// EMA of the weights with this decay: validation, samples, the best
    /// checkpoint's model file and exports use the EMA weights.
    #[serde(default)]
    pub ema_decay: Option<f64>,
    /// The validation metric that picks the best checkpoint and drives
    /// early stopping (default: the task's, e.g. the mel VAE's `loss`).
    #[serde(default)]
    pub best_metric: Option<String>,
    /// Write TensorBoard event files into the run directory.
    #[serde(default = "yes")]
    pub tensorboard: bool,
    /// Seed of the run's generator (data order, crops, restarts).
    #[serde(default)]
    pub seed: u64,
    /// Log training losses every this many steps.
    #[serde(default = "ten")]
    pub log_every: u64,
    /// Validate every this many steps (0: never).
    #[serde(default)]
    pub val_every: u64,
    /// Checkpoint every this many steps (0: only at the end).
    #[serde(default)]
    pub ckpt_every: u64,
    /// Checkpoints kept besides the best.
    #[serde(default = "three")]
    pub keep_last: usize,
    /// Stop after this many validations without improvement.
    #[serde(default)]
    pub early_stopping_patience: Option<u32>,
    /// Stop after this many consecutive non-finite steps.
    #[serde(default = "ten_u32")]
    pub max_bad_steps: u32,
    /// Write samples every this many steps (0: never).
    #[serde(default)]
    pub sample_every: u64,
    /// A Vocos model file to turn a mel model's samples into audio (its
    /// features must be the model's; for token models, the
    /// `sample_vqvae`'s); Griffin-Lim without one. Mel and token models
    /// only.
    #[serde(default)]
    pub sample_vocoder: Option<std::path::PathBuf>,
    /// Token models (GPT, GPT-VAE, Echolancer): the mel VQ-VAE (a model
    /// file, or a run directory for its latest checkpoint, as `tokenize`
    /// reads it) whose decoder turns sampled tokens into mels and audio
    /// for the samples; no samples without one.
    #[serde(default)]
    pub sample_vqvae: Option<std::path::PathBuf>,
    /// GAN mode.
    #[serde(default)]
    pub gan: Option<GanConfig>,
    /// Initialise modules from another run.
    #[serde(default)]
    pub init_from: Option<InitFrom>,
    /// Variable-name prefixes kept frozen (not optimised).
    #[serde(default)]
    pub freeze: Vec<String>,
    /// `cpu` or `cuda:N`.
    #[serde(default = "cpu")]
    pub device: String,
    /// `f32`, `bf16` or `f16` (half precision on CUDA only).
    #[serde(default = "f32")]
    pub dtype: String,
    /// Report progress: a progress bar on a terminal, otherwise one line
    /// per log interval on stdout; and a parameter count at the start.
    #[serde(default = "yes")]
    pub progress: bool,
    /// Data-parallel ranks as threads of this process (CPU): each trains a
    /// replica on its share of every batch with `cores / local_ranks`
    /// compute threads, and the ranks average their gradients
    /// ([`crate::dist::LocalComm`]; the same global batch and, up to float
    /// summation order, the same training as 1). Small models train faster
    /// this way than with every op split across the cores
    /// (docs/distributed.md). 1: one replica using every core.
    #[serde(default = "one_usize")]
    pub local_ranks: usize,
}

fn constant() -> LrSchedule {
    LrSchedule::Constant
}
fn one_usize() -> usize {
    1
}
fn ten() -> u64 {
    10
}
fn three() -> usize {
    3
}
fn ten_u32() -> u32 {
    10
}
fn cpu() -> String {
    "cpu".into()
}
fn f32() -> String {
    "f32".into()
}
fn yes() -> bool {
    true
}

impl TrainerConfig {
    /// Minimal config: `steps` at `learning_rate`, everything else default.
    pub fn new(steps: u64, learning_rate: f64) -> Self {
        Self {
            steps,
            learning_rate,
            schedule: LrSchedule::Constant,
            adamw: AdamWConfig::default(),
            grad_clip: None,
            grad_accum: 1,
            ema_decay: None,
            best_metric: None,
            tensorboard: true,
            seed: 0,
            log_every: 10,
            val_every: 0,
            ckpt_every: 0,
            keep_last: 3,
            early_stopping_patience: None,
            max_bad_steps: 10,
            sample_every: 0,
            sample_vocoder: None,
            sample_vqvae: None,
            gan: None,
            init_from: None,
            freeze: Vec::new(),
            device: "cpu".into(),
            dtype: "f32".into(),
            progress: false,
            local_ranks: 1,
        }
    }

    /// The configured device. `cuda` (no index) is GPU 0 in one process and
    /// the local rank's GPU under an MPI launcher (one rank per GPU:
    /// [`crate::dist::local_rank`]); `cuda:N` is GPU N on every rank.
    pub fn device(&self) -> Result<Device> {
        match (self.device.as_str(), crate::dist::local_rank()) {
            ("cuda", Some(r)) => parse_device(&format!("cuda:{r}")),
            (d, _) => parse_device(d),
        }
    }

    /// The configured dtype.
    pub fn dtype(&self) -> Result<DType> {
        parse_dtype(&self.dtype)
    }
}

/// `cpu` or `cuda:N` (`cuda` = `cuda:0`); CUDA needs the `cuda` feature.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let n = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| {
                        Error::invalid("device", format!("`{s}`: expected cpu, cuda or cuda:N"))
                    })?,
                None => {
                    return Err(Error::invalid(
                        "device",
                        format!("`{s}`: expected cpu, cuda or cuda:N"),
                    ))
                }
            };
            Device::new_cuda(n).map_err(|e| Error::invalid("device", format!("`{s}`: {e}")))
        }
    }
}

/// `f32`, `bf16`, `f16` or `f64`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f64" => Ok(DType::F64),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(Error::invalid(
            "dtype",
            format!("`{other}`: expected f32, bf16, f16 or f64"),
        )),
    }
}

impl Validate for TrainerConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        check(self.steps > 0, "steps", || "must be > 0".into())?;
        check(
            self.learning_rate > 0.0 && self.learning_rate.is_finite(),
            "learning_rate",
            || format!("must be > 0, got {}", self.learning_rate),
        )?;
        self.schedule.validate()?;
        check(self.grad_accum > 0, "grad_accum", || "must be > 0".into())?;
        check(self.local_ranks > 0, "local_ranks", || "must be > 0".into())?;
        check(self.grad_clip.is_none_or(|c| c > 0.0), "grad_clip", || {
            "must be > 0".into()
        })?;
        check(
            self.ema_decay.is_none_or(|d| (0.0..1.0).contains(&d)),
            "ema_decay",
            || "must be in [0, 1)".into(),
        )?;
        check(self.log_every > 0, "log_every", || "must be > 0".into())?;
        check(self.max_bad_steps > 0, "max_bad_steps", || {
            "must be > 0".into()
        })?;
        check(parse_dtype(&self.dtype).is_ok(), "dtype", || {
            format!("`{}`: expected f32, bf16, f16 or f64", self.dtype)
        })?;
        check(
            self.device == "cpu" || self.device.starts_with("cuda"),
            "device",
            || format!("`{}`: expected cpu or cuda:N", self.device),
        )?;
        check(
            self.device.starts_with("cuda") || matches!(self.dtype.as_str(), "f32" | "f64"),
            "dtype",
            || {
                format!("`{}` needs a CUDA device (candle has no half-precision matmul on CPU); use f32 on {}", self.dtype, self.device)
            },
        )?;
        if let Some(g) = &self.gan {
            check(g.disc_learning_rate > 0.0, "gan.disc_learning_rate", || {
                "must be > 0".into()
            })?;
            check(g.disc_every > 0, "gan.disc_every", || "must be > 0".into())?;
        }
        Ok(())
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Updates completed.
    pub steps: u64,
    /// Steps skipped for non-finite losses or gradients.
    pub skipped: u64,
    /// Stopped early for lack of validation improvement.
    pub early_stopped: bool,
    /// Best validation total and its checkpoint.
    pub best: Option<(f64, String)>,
}

/// Runs a [`TrainTask`] in a [`RunDir`], alone or as one rank of a
/// data-parallel group ([`Trainer::with_comm`]).
pub struct Trainer<'a> {
    cfg: TrainerConfig,
    run: &'a RunDir,
    comm: &'a dyn Communicator,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn not_finite_report(losses: &Losses) -> Result<Option<String>> {
    let total = scalar(&losses.total)?;
    let mut bad: Vec<String> = Vec::new();
    for (k, v) in &losses.terms {
        let x = scalar(v)?;
        if !x.is_finite() {
            bad.push(format!("loss `{k}` = {x}"));
        }
    }
    if !total.is_finite() && bad.is_empty() {
        bad.push(format!("total loss = {total}"));
    }
    Ok((!bad.is_empty()).then(|| bad.join(", ")))
}

/// The ranks (in order) on which `mine` is true; every rank learns the same
/// list.
fn ranks_where(comm: &dyn Communicator, mine: bool, device: &Device) -> Result<Vec<usize>> {
    let mut flags = vec![0f32; comm.world_size()];
    flags[comm.rank()] = f32::from(u8::from(mine));
    let flags = sum_values(comm, flags, device)?;
    Ok((0..flags.len()).filter(|&r| flags[r] > 0.0).collect())
}

/// The mean over the ranks of each rank's `grads` of `vars`: a variable
/// with a gradient on some rank gets the mean with zeros for the others; one
/// with none anywhere stays `None` (as in one process).
fn average_grads(
    comm: &dyn Communicator,
    grads: Grads,
    vars: &[(String, Var)],
    device: &Device,
) -> Result<Grads> {
    if comm.world_size() == 1 {
        return Ok(grads);
    }
    let present = grads
        .iter()
        .map(|g| f32::from(u8::from(g.is_some())))
        .collect();
    let anywhere = sum_values(comm, present, device)?;
    let mut send = Vec::new();
    let mut slots = Vec::new();
    for (i, (g, (_, v))) in grads.iter().zip(vars).enumerate() {
        if anywhere[i] > 0.0 {
            send.push(match g {
                Some(g) => g.clone(),
                None => v.as_tensor().zeros_like()?,
            });
            slots.push(i);
        }
    }
    let mean = all_reduce(
        comm,
        &send,
        ReduceOp::Mean,
        crate::dist::DEFAULT_BUCKET_BYTES,
    )?;
    let mut out: Grads = vec![None; grads.len()];
    for (i, g) in slots.into_iter().zip(mean) {
        out[i] = Some(g);
    }
    Ok(out)
}

/// Fails when any rank's weights differ from rank 0's: the ranks apply the
/// same averaged gradients, so replicas stay equal unless a rank computed
/// something else (a non-deterministic kernel, a rank-dependent branch).
fn check_replicas(
    comm: &dyn Communicator,
    gen: &[(String, Var)],
    disc: &[(String, Var)],
    step: u64,
    device: &Device,
) -> Result<()> {
    // Compared in f32, the precision collectives move (rank 0's f64 weights
    // would otherwise differ from their own round trip).
    let mine: Vec<Tensor> = gen
        .iter()
        .chain(disc)
        .map(|(_, v)| v.as_tensor().to_dtype(DType::F32))
        .collect::<candle_core::Result<_>>()?;
    let theirs = broadcast(comm, &mine, 0, crate::dist::DEFAULT_BUCKET_BYTES)?;
    let mut differ = Vec::new();
    for (((name, _), a), b) in gen.iter().chain(disc).zip(&mine).zip(&theirs) {
        let d = scalar(&(a - b)?.abs()?.max_all()?.to_dtype(DType::F64)?)?;
        if d != 0.0 {
            differ.push(format!("`{name}` (max difference {d:e})"));
        }
    }
    let ranks = ranks_where(comm, !differ.is_empty(), device)?;
    if ranks.is_empty() {
        return Ok(());
    }
    Err(Error::invalid(
        "data-parallel training",
        format!(
            "at step {step} the weights of rank(s) {ranks:?} differ from rank 0's{}",
            if differ.is_empty() {
                String::new()
            } else {
                format!(": {}", differ.join(", "))
            }
        ),
    ))
}

fn frozen(name: &str, freeze: &[String]) -> bool {
    freeze.iter().any(|p| name.starts_with(p.as_str()))
}

/// Copies tensors of `ckpt` into `vars` for every name starting with one of
/// `modules`; every such variable must be in the checkpoint, with its shape.
pub fn init_modules(
    vars: &[(String, Var)],
    ckpt: &HashMap<String, Tensor>,
    modules: &[String],
    origin: &Path,
) -> Result<usize> {
    let mut n = 0;
    for (name, var) in vars
        .iter()
        .filter(|(n, _)| modules.iter().any(|m| n.starts_with(m.as_str())))
    {
        let t = ckpt.get(name).ok_or_else(|| {
            Error::file(origin, format!("has no tensor `{name}` to initialise from"))
        })?;
        if t.dims() != var.dims() {
            return Err(Error::file(
                origin,
                format!(
                    "`{name}` has shape {:?}, the model {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
        n += 1;
    }
    if n == 0 {
        return Err(Error::invalid(
            "init_from.modules",
            format!("{modules:?} match no variable of the model"),
        ));
    }
    Ok(n)
}

impl<'a> Trainer<'a> {
    /// A trainer for `cfg` writing into `run`.
    pub fn new(cfg: TrainerConfig, run: &'a RunDir) -> Result<Self> {
        cfg.validate().map_err(|(k, r)| Error::Config {
            origin: "training config".into(),
            key: format!("training.{k}"),
            reason: r,
        })?;
        Ok(Self {
            cfg,
            run,
            comm: &SingleProcess,
        })
    }

    /// Trains as rank `comm.rank()` of `comm.world_size()` (data-parallel):
    /// every rank builds its shard of each global batch
    /// ([`TrainTask::set_shard`]; `data.batch_size` stays the global
    /// batch), gradients and logged losses are averaged over the ranks in
    /// bucketed all-reduces, a step is skipped on every rank when a loss is
    /// non-finite on any, and rank 0 alone validates, writes samples,
    /// metrics, TensorBoard files and checkpoints and tracks the best
    /// checkpoint (its early-stopping decision is broadcast so every rank
    /// stops at the same step; only rank 0's [`TrainSummary`] names the
    /// best checkpoint). Every rank resumes from the run's latest
    /// checkpoint. A rank that fails calls [`Communicator::abort`], stopping
    /// all. Collectives move `f32`: gradients of `f64` models are averaged
    /// in `f32` precision.
    pub fn with_comm(mut self, comm: &'a dyn Communicator) -> Self {
        self.comm = comm;
        self
    }

    /// Trains `task` to `cfg.steps`, resuming from the run's latest
    /// checkpoint if `resume` and one exists.
    pub fn fit<T: TrainTask>(&self, task: &mut T, resume: bool) -> Result<TrainSummary> {
        let out = self.fit_rank(task, resume);
        if let Err(e) = &out {
            if self.comm.world_size() > 1 {
                self.comm.abort(&e.to_string());
            }
        }
        out
    }

    fn fit_rank<T: TrainTask>(&self, task: &mut T, resume: bool) -> Result<TrainSummary> {
        let cfg = &self.cfg;
        let comm = self.comm;
        let shard = Shard::of(comm);
        task.set_shard(shard)?;
        // Rank 0 alone validates and writes.
        let writer = shard.index == 0;
        let all_vars = task.vars();
        let device = all_vars
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(Device::Cpu);
        let vars: Vec<(String, Var)> = all_vars
            .iter()
            .filter(|(n, _)| !frozen(n, &cfg.freeze))
            .cloned()
            .collect();
        let disc_vars = task.disc_vars();
        let mut opt = AdamW::new(vars.clone(), cfg.adamw)?;
        let mut dopt = match &cfg.gan {
            Some(g) => Some(AdamW::new(disc_vars.clone(), g.disc_adamw)?),
            None => None,
        };
        let mut ema = cfg.ema_decay.map(|d| Ema::new(&vars, d)).transpose()?;
        let mut state = TrainState {
            rng_state: cfg.seed,
            ..Default::default()
        };

        let latest = if resume { self.run.latest()? } else { None };
        if let Some(dir) = &latest {
            let ck = RunDir::load_checkpoint(dir, &device)?;
            for (name, var) in all_vars.iter().chain(&disc_vars) {
                let t = ck.model.get(name).ok_or_else(|| {
                    Error::file(dir, format!("model.safetensors has no `{name}`"))
                })?;
                if t.dims() != var.dims() {
                    return Err(Error::file(
                        dir,
                        format!(
                            "`{name}` has shape {:?}, the model {:?}",
                            t.dims(),
                            var.dims()
                        ),
                    ));
                }
                var.set(&t.to_dtype(var.dtype())?)?;
            }
            let strip = |prefix: &str| -> HashMap<String, Tensor> {
                ck.optimizer
                    .iter()
                    .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
                    .collect()
            };
            opt.load_state(&strip("gen."), ck.state.optimizer_steps)?;
            if let Some(d) = &mut dopt {
                let steps = d.step_count();
                d.load_state(
                    &strip("disc."),
                    ck.state
                        .extra
                        .get("disc_steps")
                        .and_then(|v| v.as_u64())
                        .unwrap_or(steps),
                )?;
            }
            if let Some(e) = &mut ema {
                e.load_state(&vars, &strip(""))?;
            }
            task.load_state(
                ck.state
                    .extra
                    .get("task")
                    .unwrap_or(&serde_json::Value::Null),
            )?;
            state = ck.state;
            if writer {
                self.run.truncate_metrics_after(state.step)?;
            }
        } else if let Some(init) = &cfg.init_from {
            let dir = if init.checkpoint.join("state.json").exists() {
                init.checkpoint.clone()
            } else {
                RunDir::create(&init.checkpoint)?.latest()?.ok_or_else(|| {
                    Error::file(&init.checkpoint, "has no checkpoint to initialise from")
                })?
            };
            let ck = RunDir::load_checkpoint(&dir, &device)?;
            init_modules(&all_vars, &ck.model, &init.modules, &dir)?;
            // Master weights and EMA start from the loaded values.
            opt.sync_master()?;
            ema = cfg.ema_decay.map(|d| Ema::new(&vars, d)).transpose()?;
        }

        let mut rng = SplitMix64::new(state.rng_state);
        let mut consecutive_bad = 0u32;
        let mut skipped = 0u64;
        let mut early_stopped = false;
        let started = Instant::now();
        let start_step = state.step;
        let best_key = cfg
            .best_metric
            .clone()
            .unwrap_or_else(|| task.best_metric().to_string());
        let mut tb = if cfg.tensorboard && writer {
            let mut w = crate::tensorboard::EventWriter::create(self.run.root())?;
            // The checkpoint's own step was logged by the process that
            // wrote it: purge only what came after.
            w.add_session_start(state.step + 1)?;
            Some(w)
        } else {
            None
        };
        if writer && cfg.best_metric.is_some() && cfg.val_every > 0 && state.step < cfg.steps {
            // A metric the task does not report fails now, not after
            // `val_every` steps of training.
            let ctx = StepContext {
                step: state.step,
                train: false,
                adversarial: false,
            };
            best_of(&task.validate(ctx)?, &best_key)?;
        }
        let progress = cfg.progress && writer;
        let bar = (progress && std::io::stderr().is_terminal())
            .then(|| progress_bar(cfg.steps, state.step));
        // One line per logged step wherever no bar is drawn (output to a
        // file or pipe, or ranks under mpirun, whose stdout may be a
        // terminal while stderr is not).
        let lines = progress && bar.is_none();
        if progress {
            println!(
                "{}",
                parameter_summary(&all_vars, vars.len(), &disc_vars, state.step)
            );
        }

        while state.step < cfg.steps {
            let step = state.step;
            let lr = cfg.schedule.lr(cfg.learning_rate, step);
            let adversarial = cfg.gan.is_some_and(|g| step >= g.adversarial_start_step);
            let ctx = StepContext {
                step,
                train: true,
                adversarial,
            };
            let mut acc = GradAccumulator::default();
            let mut dacc = GradAccumulator::default();
            let mut logged: BTreeMap<String, f64> = BTreeMap::new();
            let mut bad: Option<String> = None;
            let disc_turn = cfg
                .gan
                .is_some_and(|g| adversarial && step % g.disc_every == 0);
            // Another rank's loss went bad in an earlier micro-batch.
            let mut elsewhere = false;
            for micro in 0..cfg.grad_accum {
                let batch = task.train_batch(&mut rng)?;
                if shard.count > 1 && micro > 0 && !elsewhere {
                    // The ranks agree before every later micro-batch, so a
                    // step that went bad anywhere computes no more losses
                    // anywhere, as in one process: a family whose losses
                    // update state (codebooks, the loss balancer) or call
                    // collectives (`losses_across`) stays in step.
                    elsewhere = !ranks_where(comm, bad.is_some(), &device)?.is_empty();
                }
                if bad.is_some() || elsewhere {
                    // A skipped step still draws all its micro-batches, so
                    // the data order does not depend on where a loss went
                    // bad (ranks that skip together stay aligned).
                    continue;
                }
                if disc_turn {
                    if let Some(dl) = task.disc_losses(&batch, ctx)? {
                        if let Some(r) = not_finite_report(&dl)? {
                            bad = Some(format!("discriminator {r}"));
                        } else {
                            for (k, v) in &dl.terms {
                                *logged.entry(format!("disc/{k}")).or_default() +=
                                    scalar(v)? / cfg.grad_accum as f64;
                            }
                            dacc.add(collect_grads(&disc_vars, &dl.total.backward()?))?;
                        }
                    }
                }
                let l = task.losses_across(&batch, ctx, comm)?;
                if let Some(r) = not_finite_report(&l)? {
                    bad = Some(r);
                    continue;
                }
                for (k, v) in &l.terms {
                    *logged.entry(k.clone()).or_default() += scalar(v)? / cfg.grad_accum as f64;
                }
                *logged.entry("total".into()).or_default() +=
                    scalar(&l.total)? / cfg.grad_accum as f64;
                acc.add(collect_grads(&vars, &l.total.backward()?))?;
            }
            if shard.count > 1 {
                // Every rank skips the step when any rank's loss is
                // non-finite; otherwise the logged losses become the global
                // batch's (the mean of equal shards' means).
                let bad_ranks = ranks_where(comm, bad.is_some(), &device)?;
                if !bad_ranks.is_empty() {
                    let why = bad.take().unwrap_or_else(|| "non-finite loss".into());
                    bad = Some(format!("rank(s) {bad_ranks:?}: {why}"));
                } else {
                    let means =
                        sum_values(comm, logged.values().map(|&v| v as f32).collect(), &device)?;
                    for (v, m) in logged.values_mut().zip(means) {
                        *v = f64::from(m) / shard.count as f64;
                    }
                }
            }
            let mut grad_norm = f64::NAN;
            if bad.is_none() {
                let mut grads: Grads = average_grads(comm, acc.finish()?, &vars, &device)?;
                grad_norm = match cfg.grad_clip {
                    Some(c) => clip_grad_norm(&mut grads, c)?,
                    None => crate::optim::grad_norm(&grads)?,
                };
                if !grad_norm.is_finite() {
                    bad = Some(format!("gradient norm = {grad_norm}"));
                } else {
                    if let (Some(d), Some(g)) = (&mut dopt, &cfg.gan) {
                        if dacc.count() > 0 {
                            let mut dg = average_grads(comm, dacc.finish()?, &disc_vars, &device)?;
                            let dn = match g.disc_grad_clip {
                                Some(c) => clip_grad_norm(&mut dg, c)?,
                                None => crate::optim::grad_norm(&dg)?,
                            };
                            if dn.is_finite() {
                                d.step(&dg, cfg.schedule.lr(g.disc_learning_rate, step))?;
                                logged.insert("disc/grad_norm".into(), dn);
                            } else {
                                bad = Some(format!("discriminator gradient norm = {dn}"));
                            }
                        }
                    }
                    if bad.is_none() {
                        opt.step(&grads, lr)?;
                        if let Some(e) = &mut ema {
                            e.update(&vars)?;
                        }
                    }
                }
            }
            state.step += 1;
            match &bad {
                Some(report) => {
                    consecutive_bad += 1;
                    skipped += 1;
                    if writer {
                        self.run.log_metrics(
                            &serde_json::json!({"step": state.step, "skipped": report}),
                        )?;
                    }
                    if consecutive_bad >= cfg.max_bad_steps {
                        return Err(Error::invalid(
                            "training",
                            format!("stopped after {consecutive_bad} consecutive non-finite steps (step {}): {report}", state.step),
                        ));
                    }
                }
                None => {
                    consecutive_bad = 0;
                    state.optimizer_steps = opt.step_count();
                }
            }
            state.rng_state = rng.state;
            if writer
                && bad.is_none()
                && (state.step % cfg.log_every == 0 || state.step == cfg.steps)
            {
                let mut rec = serde_json::json!({"step": state.step, "lr": lr, "grad_norm": grad_norm,
                    "elapsed_s": started.elapsed().as_secs_f64()});
                for (k, v) in &logged {
                    rec[k] = serde_json::json!(v);
                }
                self.run.log_metrics(&rec)?;
                if let Some(w) = &mut tb {
                    w.add_scalar("lr", lr, state.step)?;
                    w.add_scalar("grad_norm", grad_norm, state.step)?;
                    for (k, v) in &logged {
                        w.add_scalar(&format!("train/{k}"), *v, state.step)?;
                    }
                    w.flush()?;
                }
                if lines {
                    let done = (state.step - start_step) as f64;
                    let rate = done / started.elapsed().as_secs_f64().max(1e-9);
                    let eta = (cfg.steps - state.step) as f64 / rate.max(1e-9);
                    let terms: Vec<String> =
                        logged.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
                    println!(
                        "step {}/{}  {}  lr {lr:.2e}  {rate:.2} steps/s  ETA {}",
                        state.step,
                        cfg.steps,
                        terms.join("  "),
                        format_duration(eta)
                    );
                }
            }
            if let Some(b) = &bar {
                b.set_position(state.step);
                let done = (state.step - start_step) as f64;
                b.set_message(format!(
                    "loss {:.4} {:.1} steps/s",
                    logged.get("total").copied().unwrap_or(f64::NAN),
                    done / started.elapsed().as_secs_f64().max(1e-9)
                ));
            }
            let sample_now = cfg.sample_every > 0 && state.step % cfg.sample_every == 0;
            let val_now = cfg.val_every > 0 && state.step % cfg.val_every == 0;
            let eval_ctx = StepContext {
                step: state.step,
                train: false,
                adversarial,
            };
            // Samples and validation see the EMA weights (swapped in and
            // back; exact resume is unaffected).
            let (written, metrics) = if writer && (sample_now || val_now) {
                let raw = swap_in(ema.as_ref(), &vars)?;
                let out = (|| -> Result<_> {
                    let written = match sample_now {
                        true => task.samples(eval_ctx, &self.run.samples())?,
                        false => Vec::new(),
                    };
                    let metrics = val_now.then(|| task.validate(eval_ctx)).transpose()?;
                    Ok((written, metrics))
                })();
                swap_out(&vars, raw)?;
                out?
            } else {
                (Vec::new(), None)
            };
            if let Some(w) = &mut tb {
                log_samples(w, &written, state.step)?;
            }
            let mut save_now = cfg.ckpt_every > 0 && state.step % cfg.ckpt_every == 0;
            let mut new_best = false;
            if let Some(metrics) = metrics {
                let mut rec = serde_json::json!({"step": state.step});
                for (k, v) in &metrics {
                    rec[format!("val/{k}")] = serde_json::json!(v);
                }
                self.run.log_metrics(&rec)?;
                if let Some(w) = &mut tb {
                    for (k, v) in &metrics {
                        w.add_scalar(&format!("val/{k}"), *v, state.step)?;
                    }
                    w.flush()?;
                }
                let v = best_of(&metrics, &best_key)?;
                if v.is_finite() && state.best.as_ref().is_none_or(|(b, _)| v < *b) {
                    state.best = Some((v, checkpoint_name(state.step)));
                    state.stale_validations = 0;
                    save_now = true;
                    new_best = true;
                } else {
                    state.stale_validations += 1;
                }
                self.run
                    .plot_losses(&["total", &format!("val/{best_key}")])?;
                if cfg
                    .early_stopping_patience
                    .is_some_and(|p| state.stale_validations >= p)
                {
                    early_stopped = true;
                }
            }
            if val_now && shard.count > 1 {
                // Rank 0 decides; every rank stops together.
                let flag = f32::from(u8::from(early_stopped));
                let t = Tensor::new(&[flag], &device)?;
                early_stopped = comm.broadcast_flat(&t, 0)?.to_vec1::<f32>()?[0] > 0.0;
            }
            if shard.count > 1
                && ((cfg.ckpt_every > 0 && state.step % cfg.ckpt_every == 0)
                    || state.step == cfg.steps
                    || early_stopped)
            {
                check_replicas(comm, &all_vars, &disc_vars, state.step, &device)?;
            }
            if writer && (save_now || state.step == cfg.steps || early_stopped) {
                let dir = self.save(
                    task,
                    &all_vars,
                    &disc_vars,
                    &opt,
                    dopt.as_ref(),
                    ema.as_ref(),
                    &vars,
                    &state,
                )?;
                if new_best {
                    // The model file that leaves the run, beside the best
                    // checkpoint, with the weights validation saw.
                    let meta = BTreeMap::from([
                        (
                            "weights".to_string(),
                            if ema.is_some() { "ema" } else { "raw" }.to_string(),
                        ),
                        ("step".to_string(), state.step.to_string()),
                        ("source".to_string(), dir.display().to_string()),
                    ]);
                    let raw = swap_in(ema.as_ref(), &vars)?;
                    let out =
                        task.save_model_file(&dir.join(crate::run::CHECKPOINT_MODEL_FILE), &meta);
                    swap_out(&vars, raw)?;
                    out?;
                }
            }
            if early_stopped {
                break;
            }
        }
        if let Some(b) = bar {
            b.finish();
        }
        if writer {
            self.run
                .plot_losses(&["total", &format!("val/{best_key}")])?;
        }
        if let Some(w) = &mut tb {
            w.flush()?;
        }
        Ok(TrainSummary {
            steps: state.step,
            skipped,
            early_stopped,
            best: state.best,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn save<T: TrainTask>(
        &self,
        task: &T,
        all_vars: &[(String, Var)],
        disc_vars: &[(String, Var)],
        opt: &AdamW,
        dopt: Option<&AdamW>,
        ema: Option<&Ema>,
        vars: &[(String, Var)],
        state: &TrainState,
    ) -> Result<PathBuf> {
        let mut model = HashMap::new();
        for (name, var) in all_vars.iter().chain(disc_vars) {
            let t = var.as_tensor().copy()?;
            let finite = scalar(&t.to_dtype(DType::F64)?.abs()?.sum_all()?)?.is_finite();
            if !finite {
                return Err(Error::invalid(
                    "checkpoint",
                    format!("`{name}` is not finite; refusing to write a poisoned checkpoint"),
                ));
            }
            model.insert(name.clone(), t);
        }
        let mut optimizer: HashMap<String, Tensor> = opt
            .state_tensors()?
            .into_iter()
            .map(|(k, v)| (format!("gen.{k}"), v))
            .collect();
        if let Some(d) = dopt {
            optimizer.extend(
                d.state_tensors()?
                    .into_iter()
                    .map(|(k, v)| (format!("disc.{k}"), v)),
            );
        }
        if let Some(e) = ema {
            optimizer.extend(e.state_tensors(vars));
        }
        let mut state = state.clone();
        state.extra =
            serde_json::json!({"task": task.state(), "disc_steps": dopt.map(|d| d.step_count())});
        let dir = self.run.save_checkpoint(&Checkpoint {
            model,
            optimizer,
            state: state.clone(),
        })?;
        self.run.prune(
            self.cfg.keep_last,
            state.best.as_ref().map(|(_, n)| n.as_str()),
        )?;
        Ok(dir)
    }
}

/// The best-checkpoint metric `key` of validation `metrics`, or an error
/// naming `training.best_metric` and the metrics there are.
fn best_of(metrics: &BTreeMap<String, f64>, key: &str) -> Result<f64> {
    metrics.get(key).copied().ok_or_else(|| Error::Config {
        origin: "training config".into(),
        key: "training.best_metric".into(),
        reason: format!(
            "`{key}` is not a validation metric of this task (it has: {})",
            metrics.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    })
}

/// Copies of the variables' values, and the EMA's values put in their
/// place (`None` without an EMA).
fn swap_in(ema: Option<&Ema>, vars: &[(String, Var)]) -> Result<Option<Vec<Tensor>>> {
    let Some(e) = ema else {
        return Ok(None);
    };
    let raw = vars
        .iter()
        .map(|(_, v)| v.as_tensor().copy())
        .collect::<candle_core::Result<Vec<_>>>()?;
    e.copy_to(vars)?;
    Ok(Some(raw))
}

/// Puts back what [`swap_in`] saved.
fn swap_out(vars: &[(String, Var)], raw: Option<Vec<Tensor>>) -> Result<()> {
    for ((_, v), t) in vars.iter().zip(raw.into_iter().flatten()) {
        v.set(&t)?;
    }
    Ok(())
}

/// Logs sample PNGs and WAVs to TensorBoard, tagged `samples/<name>` (the
/// file name without its `stepNNNNNNNN_` prefix).
fn log_samples(
    w: &mut crate::tensorboard::EventWriter,
    files: &[PathBuf],
    step: u64,
) -> Result<()> {
    for path in files {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tag = format!(
            "samples/{}",
            name.split_once('_').map_or(name.as_str(), |(_, rest)| rest)
        );
        let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("png") if bytes.len() > 25 && &bytes[12..16] == b"IHDR" => {
                let be = |i: usize| {
                    u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]])
                };
                let channels = match bytes[25] {
                    0 => 1,
                    4 => 2,
                    6 => 4,
                    _ => 3,
                };
                w.add_image_png(&tag, &bytes, be(16), be(20), channels, step)?;
            }
            Some("wav") => {
                // A sample that does not decode (say, non-finite samples
                // from a diverging model) is left out of TensorBoard; it
                // must not stop training.
                if let Ok(audio) = melvae_dsp::load_audio(path) {
                    w.add_audio_wav(
                        &tag,
                        &bytes,
                        audio.sample_rate as f32,
                        audio.channels.len() as i64,
                        audio.n_samples() as i64,
                        step,
                    )?;
                }
            }
            _ => {}
        }
    }
    w.flush()
}

/// `1.12 M parameters (1.12 M trainable)`, and the discriminator's.
fn parameter_summary(
    all: &[(String, Var)],
    trainable: usize,
    disc: &[(String, Var)],
    step: u64,
) -> String {
    let count = |v: &[(String, Var)]| v.iter().map(|(_, v)| v.elem_count()).sum::<usize>();
    let m = |n: usize| format!("{:.2} M", n as f64 / 1e6);
    let mut s = format!(
        "model: {} parameters in {} tensors ({} trainable)",
        m(count(all)),
        all.len(),
        if trainable == all.len() {
            "all".to_string()
        } else {
            format!("{trainable} tensors")
        }
    );
    if !disc.is_empty() {
        s.push_str(&format!("; discriminator: {} parameters", m(count(disc))));
    }
    if step > 0 {
        s.push_str(&format!("; resuming at step {step}"));
    }
    s
}

/// `1h02m03s`, `4m05s`, `6s`.
fn format_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, min, sec) => format!("{min}m{sec:02}s"),
        (h, min, sec) => format!("{h}h{min:02}m{sec:02}s"),
    }
}

fn progress_bar(total: u64, pos: u64) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(total);
    b.set_position(pos);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    ) {
        b.set_style(style);
    }
    b
}
