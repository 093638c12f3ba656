//! The trainer on a toy task (linear regression on tiny data): exact resume,
//! non-finite guard, GAN alternation, init from another run, freezing,
//! early stopping, config errors.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Module, VarBuilder, VarMap};
use melvae_dsp::SplitMix64;
use melvae_layers::testing::{named_vars, noise};
use melvae_layers::Linear;
use melvae_train::*;

mod common;

struct Toy {
    vm: VarMap,
    lin: Linear,
    x: Tensor,
    y: Tensor,
    nan_at: HashSet<u64>,
    val_constant: bool,
    seen_ctx: Vec<StepContext>,
    disc: Option<Var>,
    disc_calls: Vec<u64>,
    /// The weights each validation saw, by step.
    val_seen: Vec<(u64, Vec<Vec<f32>>)>,
    /// This rank's rows of every batch (data-parallel).
    shard: dist::Shard,
    /// The step at which `losses` fails.
    fail_at: Option<u64>,
}

impl Toy {
    fn new(seed: u64) -> Self {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let lin = melvae_layers::linear(3, 2, vb.pp("lin")).unwrap();
        melvae_layers::testing::randomize(&vm, 0.5, seed).unwrap();
        let x = noise(&[64, 3], 1).unwrap().to_dtype(DType::F32).unwrap();
        let w = Tensor::new(&[[1.5f32, -2.0], [0.5, 1.0], [-1.0, 0.25]], &Device::Cpu).unwrap();
        let y = (x.matmul(&w).unwrap() + 0.3).unwrap();
        Self {
            vm,
            lin,
            x,
            y,
            nan_at: HashSet::new(),
            val_constant: false,
            seen_ctx: vec![],
            disc: None,
            disc_calls: vec![],
            val_seen: vec![],
            shard: dist::Shard::WHOLE,
            fail_at: None,
        }
    }

    fn weights(&self) -> Vec<Vec<f32>> {
        named_vars(&self.vm)
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    }
}

impl TrainTask for Toy {
    type Batch = (Tensor, Tensor);

    fn vars(&self) -> Vec<(String, Var)> {
        named_vars(&self.vm)
    }

    fn disc_vars(&self) -> Vec<(String, Var)> {
        self.disc
            .iter()
            .map(|d| ("disc.w".to_string(), d.clone()))
            .collect()
    }

    fn train_batch(&mut self, rng: &mut SplitMix64) -> Result<Self::Batch> {
        let idx: Vec<u32> = (0..8).map(|_| rng.below(64) as u32).collect();
        let rows = self.shard.rows(8, "batch")?;
        let idx = Tensor::new(&idx[rows], &Device::Cpu)?;
        Ok((self.x.index_select(&idx, 0)?, self.y.index_select(&idx, 0)?))
    }

    /// Takes part in a sum over the ranks before every loss, as a family
    /// with whole-batch statistics does: when one rank's step goes bad in
    /// a micro-batch, no rank may compute a later micro-batch's losses
    /// (the others would wait in the sum for it forever).
    fn losses_across(
        &mut self,
        batch: &Self::Batch,
        ctx: StepContext,
        comm: &dyn dist::Communicator,
    ) -> Result<Losses> {
        let n = dist::sum_values(comm, vec![1.0], &Device::Cpu)?;
        assert_eq!(n, [comm.world_size() as f32]);
        self.losses(batch, ctx)
    }

    fn losses(&mut self, (x, y): &Self::Batch, ctx: StepContext) -> Result<Losses> {
        self.seen_ctx.push(ctx);
        if self.fail_at == Some(ctx.step) {
            return Err(Error::Invalid {
                what: "toy".into(),
                reason: format!("made to fail at step {}", ctx.step),
            });
        }
        let mut mse = (self.lin.forward(x)? - y)?.sqr()?.mean_all()?;
        if self.nan_at.contains(&ctx.step) {
            mse = (mse * f64::NAN)?;
        }
        let mut total = mse.clone();
        let mut terms = BTreeMap::from([("mse".to_string(), mse)]);
        if let (Some(d), true) = (&self.disc, ctx.adversarial) {
            let adv = (self.lin.forward(x)?.mean_all()? * d.as_tensor().sum_all()?)?;
            total = (total + (&adv * 0.01)?)?;
            terms.insert("adv".into(), adv);
        }
        Ok(Losses { total, terms })
    }

    fn disc_losses(&mut self, (x, _): &Self::Batch, ctx: StepContext) -> Result<Option<Losses>> {
        let Some(d) = &self.disc else { return Ok(None) };
        self.disc_calls.push(ctx.step);
        let l = (d.as_tensor().sqr()?.sum_all()? + self.lin.forward(x)?.detach().mean_all()?)?;
        Ok(Some(Losses {
            total: l.clone(),
            terms: BTreeMap::from([("d".to_string(), l)]),
        }))
    }

    fn set_shard(&mut self, shard: dist::Shard) -> Result<()> {
        shard.rows(8, "batch")?;
        self.shard = shard;
        Ok(())
    }

    fn validate(&mut self, ctx: StepContext) -> Result<BTreeMap<String, f64>> {
        assert!(!ctx.train, "validation runs in evaluation mode");
        self.val_seen.push((ctx.step, self.weights()));
        let v = if self.val_constant {
            1.0
        } else {
            (self.lin.forward(&self.x)? - &self.y)?
                .sqr()?
                .mean_all()?
                .to_scalar::<f32>()? as f64
        };
        Ok(BTreeMap::from([("total".to_string(), v)]))
    }
}

fn cfg(steps: u64) -> TrainerConfig {
    TrainerConfig {
        schedule: optim::LrSchedule::WarmupCosine {
            warmup_steps: 5,
            total_steps: 40,
            min_lr: 1e-4,
        },
        grad_clip: Some(1.0),
        grad_accum: 2,
        ema_decay: Some(0.9),
        seed: 11,
        log_every: 1,
        val_every: 5,
        ckpt_every: 5,
        ..TrainerConfig::new(steps, 0.05)
    }
}

fn run_dir(p: &Path) -> RunDir {
    RunDir::create(p).unwrap()
}

#[test]
fn trains_and_writes_the_run() {
    let d = tempfile::tempdir().unwrap();
    let run = run_dir(d.path());
    let mut task = Toy::new(1);
    let before = task
        .validate(StepContext {
            step: 0,
            train: false,
            adversarial: false,
        })
        .unwrap()["total"];
    let s = Trainer::new(cfg(40), &run)
        .unwrap()
        .fit(&mut task, false)
        .unwrap();
    let after = task
        .validate(StepContext {
            step: 40,
            train: false,
            adversarial: false,
        })
        .unwrap()["total"];
    assert_eq!(s.steps, 40);
    assert!(after < before * 0.2, "validation {before} -> {after}");
    assert!(run.latest().unwrap().unwrap().ends_with("step-00000040"));
    let m = run.read_metrics().unwrap();
    assert!(m.iter().filter(|r| r.get("total").is_some()).count() == 40);
    assert!(m.iter().any(|r| r.get("val/total").is_some()));
    let plot = run.samples().join("loss_curves.png");
    assert_eq!(
        &std::fs::read(&plot).unwrap()[1..4],
        b"PNG",
        "loss curves drawn"
    );
    let best = s.best.unwrap();
    assert!(
        run.checkpoints().join(&best.1).exists(),
        "best checkpoint {best:?} kept"
    );

    // Validation saw the EMA weights; the checkpoint keeps the raw ones,
    // and training went on from them.
    let ck =
        RunDir::load_checkpoint(&run.checkpoints().join("step-00000040"), &Device::Cpu).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let names: Vec<String> = task.vars().into_iter().map(|(n, _)| n).collect();
    let (step, seen) = task.val_seen.iter().rev().nth(1).unwrap(); // before the last manual call
    assert_eq!(*step, 40);
    for (name, w) in names.iter().zip(seen) {
        assert_eq!(&flat(&ck.optimizer[&format!("ema.{name}")]), w, "{name}");
        assert_ne!(&flat(&ck.model[name]), w, "{name}");
    }
    assert_eq!(
        task.weights(),
        names.iter().map(|n| flat(&ck.model[n])).collect::<Vec<_>>()
    );

    // TensorBoard: the logged scalars, as metrics.jsonl has them.
    let events: Vec<_> = std::fs::read_dir(run.root())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .collect();
    assert_eq!(events.len(), 1);
    let ev = tensorboard::read_events(&events[0]).unwrap();
    assert_eq!(ev[0].file_version.as_deref(), Some("brain.Event:2"));
    let scalar = |tag: &str, step: i64| -> Option<f32> {
        ev.iter().filter(|e| e.step == step).find_map(|e| {
            e.values.iter().find_map(|v| match (&v.tag, &v.data) {
                (t, tensorboard::ValueData::Scalar(x)) if t == tag => Some(*x),
                _ => None,
            })
        })
    };
    // (serde_json parses floats to within an ulp, hence the tolerance.)
    let close = |tag: &str, step: i64, x: f64| {
        let got = scalar(tag, step).unwrap_or_else(|| panic!("no {tag} at {step}"));
        assert!(
            (got as f64 - x).abs() <= 1e-6 * x.abs().max(1e-12),
            "{tag} {step}: {got} vs {x}"
        );
    };
    for r in &m {
        let step = r["step"].as_i64().unwrap();
        if let Some(x) = r.get("total").and_then(|v| v.as_f64()) {
            close("train/total", step, x);
            close("lr", step, r["lr"].as_f64().unwrap());
        }
        if let Some(x) = r.get("val/total").and_then(|v| v.as_f64()) {
            close("val/total", step, x);
        }
    }
}

#[test]
fn the_best_metric_must_be_a_validation_metric() {
    let d = tempfile::tempdir().unwrap();
    let run = run_dir(d.path());
    let c = TrainerConfig {
        best_metric: Some("nope".into()),
        ..cfg(10)
    };
    let mut toy = Toy::new(1);
    let e = Trainer::new(c, &run)
        .unwrap()
        .fit(&mut toy, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("training.best_metric") && e.contains("`nope`") && e.contains("total"),
        "{e}"
    );
    assert!(toy.seen_ctx.is_empty(), "refused before any training step");
}

#[test]
fn resume_is_exact() {
    let d = tempfile::tempdir().unwrap();
    let straight = run_dir(&d.path().join("a"));
    let mut a = Toy::new(1);
    Trainer::new(cfg(40), &straight)
        .unwrap()
        .fit(&mut a, false)
        .unwrap();

    let split = run_dir(&d.path().join("b"));
    let mut b = Toy::new(1);
    Trainer::new(cfg(20), &split)
        .unwrap()
        .fit(&mut b, false)
        .unwrap();
    // A new process: a model with different initial weights, restored from the run.
    let mut b2 = Toy::new(99);
    Trainer::new(cfg(40), &split)
        .unwrap()
        .fit(&mut b2, true)
        .unwrap();
    assert_eq!(a.weights(), b2.weights());
    let losses = |run: &RunDir| -> Vec<(u64, f64)> {
        run.read_metrics()
            .unwrap()
            .iter()
            .filter_map(|r| Some((r["step"].as_u64()?, r.get("total")?.as_f64()?)))
            .collect()
    };
    assert_eq!(losses(&straight), losses(&split));
}

#[test]
fn non_finite_losses_skip_the_update_and_stop_the_run() {
    let d = tempfile::tempdir().unwrap();
    let run = run_dir(d.path());
    let mut task = Toy::new(1);
    task.nan_at = [3u64, 7].into_iter().collect();
    let c = TrainerConfig {
        log_every: 1,
        ..TrainerConfig::new(10, 0.05)
    };
    let s = Trainer::new(c.clone(), &run)
        .unwrap()
        .fit(&mut task, false)
        .unwrap();
    assert_eq!(s.skipped, 2);
    let m = run.read_metrics().unwrap();
    let skipped: Vec<&serde_json::Value> =
        m.iter().filter(|r| r.get("skipped").is_some()).collect();
    assert_eq!(skipped.len(), 2);
    assert!(skipped[0]["skipped"]
        .as_str()
        .unwrap()
        .contains("loss `mse` = NaN"));
    // Always NaN: stops after max_bad_steps, leaving the earlier checkpoint intact.
    let mut bad = Toy::new(2);
    bad.nan_at = (0..100).collect();
    let c2 = TrainerConfig {
        max_bad_steps: 3,
        ..TrainerConfig::new(50, 0.05)
    };
    let before = bad.weights();
    let e = Trainer::new(c2, &run)
        .unwrap()
        .fit(&mut bad, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("3 consecutive non-finite steps") && e.contains("mse"),
        "{e}"
    );
    assert_eq!(bad.weights(), before, "no update was applied");
    assert!(run.latest().unwrap().unwrap().ends_with("step-00000010"));
    let ck = RunDir::load_checkpoint(&run.latest().unwrap().unwrap(), &Device::Cpu).unwrap();
    assert!(ck.model.values().all(|t| t
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite())));
}

#[test]
fn gan_mode_alternates_after_the_warm_up() {
    let d = tempfile::tempdir().unwrap();
    let run = run_dir(d.path());
    let mut task = Toy::new(1);
    let dvar = Var::new(&[0.5f32, -0.5], &Device::Cpu).unwrap();
    task.disc = Some(dvar.clone());
    let gan = GanConfig {
        disc_learning_rate: 0.1,
        disc_adamw: Default::default(),
        disc_every: 2,
        adversarial_start_step: 3,
        disc_grad_clip: Some(1.0),
    };
    let c = TrainerConfig {
        gan: Some(gan),
        ..TrainerConfig::new(10, 0.05)
    };
    Trainer::new(c, &run)
        .unwrap()
        .fit(&mut task, false)
        .unwrap();
    assert_eq!(task.disc_calls, vec![4, 6, 8]);
    let adv: Vec<bool> = task.seen_ctx.iter().map(|c| c.adversarial).collect();
    assert_eq!(adv, (0..10).map(|s| s >= 3).collect::<Vec<_>>());
    assert_ne!(
        dvar.as_tensor().to_vec1::<f32>().unwrap(),
        vec![0.5, -0.5],
        "the discriminator trained"
    );
    let ck = RunDir::load_checkpoint(&run.latest().unwrap().unwrap(), &Device::Cpu).unwrap();
    assert!(ck.model.contains_key("disc.w") && ck.optimizer.contains_key("disc.m.disc.w"));
}

#[test]
fn init_from_another_run_and_freeze() {
    let d = tempfile::tempdir().unwrap();
    let first = run_dir(&d.path().join("stage1"));
    let mut a = Toy::new(1);
    Trainer::new(TrainerConfig::new(20, 0.05), &first)
        .unwrap()
        .fit(&mut a, false)
        .unwrap();
    let trained_w = a.lin.weight().to_vec2::<f32>().unwrap();

    let second = run_dir(&d.path().join("stage2"));
    let mut b = Toy::new(5);
    let c = TrainerConfig {
        init_from: Some(InitFrom {
            checkpoint: d.path().join("stage1"),
            modules: vec!["lin.".into()],
        }),
        freeze: vec!["lin.weight".into()],
        ..TrainerConfig::new(10, 0.05)
    };
    let bias_before: Vec<f32> = a.lin.bias().unwrap().to_vec1().unwrap();
    Trainer::new(c, &second)
        .unwrap()
        .fit(&mut b, false)
        .unwrap();
    assert_eq!(
        b.lin.weight().to_vec2::<f32>().unwrap(),
        trained_w,
        "initialised, then frozen"
    );
    assert_ne!(
        b.lin.bias().unwrap().to_vec1::<f32>().unwrap(),
        bias_before,
        "the bias still trains"
    );

    let mut e = Toy::new(5);
    let bad = TrainerConfig {
        init_from: Some(InitFrom {
            checkpoint: d.path().join("stage1"),
            modules: vec!["encoder.".into()],
        }),
        ..TrainerConfig::new(1, 0.05)
    };
    let err = Trainer::new(bad, &run_dir(&d.path().join("x")))
        .unwrap()
        .fit(&mut e, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("init_from.modules") && err.contains("encoder."),
        "{err}"
    );
}

#[test]
fn ema_starts_from_the_init_from_weights() {
    let d = tempfile::tempdir().unwrap();
    let mut a = Toy::new(1);
    Trainer::new(
        TrainerConfig::new(20, 0.05),
        &run_dir(&d.path().join("stage1")),
    )
    .unwrap()
    .fit(&mut a, false)
    .unwrap();
    let trained = a.lin.weight().flatten_all().unwrap();
    let second = run_dir(&d.path().join("stage2"));
    let c = TrainerConfig {
        init_from: Some(InitFrom {
            checkpoint: d.path().join("stage1"),
            modules: vec!["lin.".into()],
        }),
        ema_decay: Some(0.5),
        ..TrainerConfig::new(1, 1e-9)
    };
    Trainer::new(c, &second)
        .unwrap()
        .fit(&mut Toy::new(5), false)
        .unwrap();
    let ck = RunDir::load_checkpoint(&second.latest().unwrap().unwrap(), &Device::Cpu).unwrap();
    let ema = ck.optimizer["ema.lin.weight"].flatten_all().unwrap();
    // Had the average started from Toy::new(5)'s random weights, half of
    // them would still be in it after one update at decay 0.5.
    let diff = melvae_layers::testing::max_abs_diff(&ema, &trained).unwrap();
    assert!(diff < 1e-6, "EMA is {diff} away from the loaded weights");
}

#[test]
fn early_stopping() {
    let d = tempfile::tempdir().unwrap();
    let run = run_dir(d.path());
    let mut task = Toy::new(1);
    task.val_constant = true;
    let c = TrainerConfig {
        val_every: 2,
        early_stopping_patience: Some(2),
        ..TrainerConfig::new(100, 0.05)
    };
    let s = Trainer::new(c, &run)
        .unwrap()
        .fit(&mut task, false)
        .unwrap();
    assert!(s.early_stopped);
    assert_eq!(s.steps, 6);
}

#[test]
fn config_errors_name_the_key() {
    let r = ResolvedConfig::from_yaml("training:\n  steps: 10\n  learning_rate: -1\n", "exp.yaml")
        .unwrap();
    let e = r.get::<TrainerConfig>("training").unwrap_err().to_string();
    assert!(
        e.contains("exp.yaml") && e.contains("training.learning_rate") && e.contains("must be > 0"),
        "{e}"
    );
    let r = ResolvedConfig::from_yaml(
        "training:\n  steps: 10\n  learning_rate: 1.0\n  schedule:\n    kind: linear\n",
        "exp.yaml",
    )
    .unwrap();
    let e = r.get::<TrainerConfig>("training").unwrap_err().to_string();
    assert!(
        e.contains("training.schedule") && e.contains("unknown variant `linear`"),
        "{e}"
    );
    for (schedule, key) in [
        (
            "{kind: warmup_stable_decay, warmup_steps: 5, decay_steps: 0, total_steps: 10, min_lr: 0.0}",
            "training.schedule.decay_steps",
        ),
        (
            "{kind: warmup_cosine, warmup_steps: 5, total_steps: 10, min_lr: -1.0}",
            "training.schedule.min_lr",
        ),
        (
            "{kind: exponential, warmup_steps: 5, gamma: 1.5}",
            "training.schedule.gamma",
        ),
    ] {
        let r = ResolvedConfig::from_yaml(
            &format!("training:\n  steps: 10\n  learning_rate: 1.0\n  schedule: {schedule}\n"),
            "exp.yaml",
        )
        .unwrap();
        let e = r.get::<TrainerConfig>("training").unwrap_err().to_string();
        assert!(e.contains("exp.yaml") && e.contains(key), "{schedule}: {e}");
    }
    let r = ResolvedConfig::from_yaml(
        "training:\n  steps: 10\n  learning_rate: 1.0\n  dtype: f8\n",
        "exp.yaml",
    )
    .unwrap();
    let e = r.get::<TrainerConfig>("training").unwrap_err().to_string();
    assert!(e.contains("training.dtype") && e.contains("f8"), "{e}");
    let ok = ResolvedConfig::from_yaml(
        "training:\n  steps: 10\n  learning_rate: 1.0e-3\n  gan:\n    disc_learning_rate: 2.0e-4\n",
        "exp.yaml",
    )
    .unwrap();
    let t = ok.get::<TrainerConfig>("training").unwrap();
    assert_eq!(t.gan.unwrap().disc_every, 1);
    assert!(parse_device("cuda:x")
        .unwrap_err()
        .to_string()
        .contains("cuda:x"));
    assert!(matches!(parse_device("cpu").unwrap(), Device::Cpu));
}

#[test]
fn bundled_default_config_parses() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/defaults/train.yaml");
    let text = std::fs::read_to_string(&p).unwrap();
    let r = ResolvedConfig::from_yaml(&text, &p.display().to_string()).unwrap();
    let t: TrainerConfig = r.get("training").unwrap();
    assert_eq!(t.steps, 100000);
    assert!(matches!(
        t.schedule,
        optim::LrSchedule::WarmupCosine {
            warmup_steps: 1000,
            ..
        }
    ));
    let mut r = r;
    r.override_key("training.dtype=bf16").unwrap();
    let e = r.get::<TrainerConfig>("training").unwrap_err().to_string();
    assert!(
        e.contains("training.dtype") && e.contains("needs a CUDA device"),
        "{e}"
    );
}

/// Data-parallel training with in-process ranks: 2 ranks with 4 rows each
/// follow the 1-rank run with the whole 8-row batch (GAN mode, gradient
/// accumulation, EMA, clipping and validation included), rank 1 writes
/// nothing, and resuming a 2-rank run is exact.
#[test]
fn two_ranks_follow_one_rank_with_the_same_global_batch() {
    let d = tempfile::tempdir().unwrap();
    let make = || {
        let mut t = Toy::new(3);
        t.disc = Some(Var::new(&[0.5f32, -0.5], &Device::Cpu).unwrap());
        t
    };
    let c = TrainerConfig {
        gan: Some(GanConfig {
            disc_learning_rate: 0.01,
            disc_adamw: optim::AdamWConfig::default(),
            disc_every: 2,
            adversarial_start_step: 4,
            disc_grad_clip: None,
        }),
        ..cfg(20)
    };
    let one = run_dir(&d.path().join("one"));
    let mut single = make();
    let summary = Trainer::new(c.clone(), &one)
        .unwrap()
        .fit(&mut single, false)
        .unwrap();
    let two_dir = d.path().join("two");
    let two = common::data_parallel(2, &c, false, &two_dir, |_| make());
    let mut w_single = single.weights();
    w_single.extend(common::weights(single.disc_vars()));
    common::assert_two_ranks_follow(one.root(), &two_dir, &w_single, &two, 20);
    let (s0, w0) = two[0].clone().unwrap();
    assert_eq!(
        s0.best.map(|b| b.1),
        summary.best.map(|b| b.1),
        "the same best checkpoint"
    );
    let rank1 = d.path().join("two/rank1");
    assert!(
        !rank1.join("metrics.jsonl").exists(),
        "rank 1 writes no metrics"
    );
    assert_eq!(
        std::fs::read_dir(rank1.join("checkpoints"))
            .unwrap()
            .count(),
        0
    );

    // Resume: 2 ranks to 10 steps, then to 20, equal the straight 2-rank run.
    let dir = d.path().join("resumed");
    common::data_parallel(2, &cfg_steps(&c, 10), false, &dir, |_| make())
        .into_iter()
        .for_each(|r| drop(r.unwrap()));
    // Both ranks resume from rank 0's run directory's checkpoint.
    let shared = dir.join("rank0");
    std::fs::remove_dir_all(dir.join("rank1")).unwrap();
    let again = resume_shared(&c, &shared, make);
    assert_eq!(again[0], w0, "a resumed 2-rank run equals the straight one");
    assert_eq!(again[1], w0);
}

fn cfg_steps(c: &TrainerConfig, steps: u64) -> TrainerConfig {
    TrainerConfig { steps, ..c.clone() }
}

/// Both ranks of a new group resume the run at `run` (one shared run
/// directory, as on a shared file system) to `c.steps`.
fn resume_shared(
    c: &TrainerConfig,
    run: &Path,
    make: impl Fn() -> Toy + Sync,
) -> Vec<Vec<Vec<f32>>> {
    let comms = dist::LocalComm::group(2);
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let make = &make;
                let c = c.clone();
                s.spawn(move || {
                    let r = RunDir::open(run);
                    let mut t = make();
                    Trainer::new(c, &r)
                        .unwrap()
                        .with_comm(&comm)
                        .fit(&mut t, true)
                        .unwrap();
                    let mut w = t.weights();
                    w.extend(common::weights(t.disc_vars()));
                    w
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A non-finite loss on one rank skips the step on every rank (the record
/// names the rank); an error on one rank stops every rank with that rank's
/// message; a batch that does not split evenly is refused, naming it.
#[test]
fn data_parallel_failures_stop_every_rank() {
    let d = tempfile::tempdir().unwrap();
    let c = cfg(8);
    let nan_on_rank1 = |rank| {
        let mut t = Toy::new(3);
        if rank == 1 {
            t.nan_at.insert(3);
        }
        t
    };
    let out = common::data_parallel(2, &c, false, &d.path().join("nan"), nan_on_rank1);
    let (s0, w0) = out[0].clone().unwrap();
    let (s1, w1) = out[1].clone().unwrap();
    assert_eq!((s0.skipped, s1.skipped), (1, 1));
    assert_eq!(w0, w1);
    let metrics = std::fs::read_to_string(d.path().join("nan/rank0/metrics.jsonl")).unwrap();
    assert!(metrics.contains("rank(s) [1]"), "{metrics}");
    // The skipped step drew all its micro-batches on every rank
    // (grad_accum 2): the run still follows one process skipping step 3.
    let one = run_dir(&d.path().join("nan_one"));
    let mut single = Toy::new(3);
    single.nan_at.insert(3);
    Trainer::new(c.clone(), &one)
        .unwrap()
        .fit(&mut single, false)
        .unwrap();
    common::assert_two_ranks_follow(
        one.root(),
        &d.path().join("nan"),
        &single.weights(),
        &out,
        7,
    );

    // An error: rank 1 fails at step 4; both stop, and rank 0's error names
    // rank 1 and its cause.
    let fail_on_rank1 = |rank| {
        let mut t = Toy::new(3);
        if rank == 1 {
            t.fail_at = Some(4);
        }
        t
    };
    let out = common::data_parallel(2, &c, false, &d.path().join("fail"), fail_on_rank1);
    let errors: Vec<String> = out.into_iter().map(|r| r.unwrap_err()).collect();
    assert!(
        errors[0].contains("rank 1 failed") && errors[0].contains("made to fail at step 4"),
        "{errors:?}"
    );
    assert!(errors[1].contains("made to fail at step 4"), "{errors:?}");

    // 8 rows over 3 ranks.
    let out = common::data_parallel(3, &c, false, &d.path().join("uneven"), |_| Toy::new(3));
    for r in out {
        let e = r.unwrap_err();
        assert!(e.contains("batch") && e.contains("3 ranks"), "{e}");
    }
}
