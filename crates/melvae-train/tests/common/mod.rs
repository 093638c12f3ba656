//! Set-up shared by the task tests (not a test).
#![allow(dead_code)]

use std::path::Path;

use melvae_dsp::{save_wav, Audio, WavFormat};
use melvae_train::{
    AudioDataConfig, GanConfig, RunDir, SplitBy, StepContext, TrainTask, Trainer, TrainerConfig,
};

/// Writes `tone{i}.wav` (mono 16-bit, `samples` at `rate`) for each of
/// `freqs`: `harmonics` harmonics of amplitude `amp / h`.
pub fn tones(dir: &Path, rate: u32, samples: usize, freqs: &[f32], harmonics: usize, amp: f32) {
    for (i, &f) in freqs.iter().enumerate() {
        let x: Vec<f32> = (0..samples)
            .map(|n| {
                let t = n as f32 / rate as f32;
                (1..=harmonics)
                    .map(|h| (std::f32::consts::TAU * f * h as f32 * t).sin() * amp / h as f32)
                    .sum()
            })
            .collect();
        save_wav(
            dir.join(format!("tone{i}.wav")),
            &Audio::new(rate, vec![x]).unwrap(),
            WavFormat::Pcm16,
        )
        .unwrap();
    }
}

/// An interrupted run: a fresh `make()` trained in a new run at `dir` to
/// `half` steps (`cfg(half)`), then another resumed there to `full`
/// (`cfg(full)`); returns the resumed task, to compare with one trained
/// to `full` without a break.
pub fn interrupted<T: TrainTask>(
    dir: impl AsRef<Path>,
    cfg: impl Fn(u64) -> TrainerConfig,
    half: u64,
    full: u64,
    mut make: impl FnMut() -> T,
) -> T {
    let run = RunDir::create(dir.as_ref()).unwrap();
    Trainer::new(cfg(half), &run)
        .unwrap()
        .fit(&mut make(), false)
        .unwrap();
    let mut resumed = make();
    Trainer::new(cfg(full), &run)
        .unwrap()
        .fit(&mut resumed, true)
        .unwrap();
    resumed
}

/// Every variable's values, in order (to compare runs exactly).
pub fn weights(vars: Vec<(String, candle_core::Var)>) -> Vec<Vec<f32>> {
    vars.iter()
        .map(|(_, v)| {
            // (Half-precision values widen to f32 exactly.)
            let t = v.as_tensor().to_dtype(candle_core::DType::F32).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        })
        .collect()
}

/// The context of a validation pass.
pub fn eval_ctx() -> StepContext {
    StepContext {
        step: 0,
        train: false,
        adversarial: false,
    }
}

/// The GAN mode of the task tests: discriminator lr 1e-3 every step, the
/// adversarial phase from step 3.
pub fn test_gan() -> GanConfig {
    GanConfig {
        disc_learning_rate: 1e-3,
        disc_adamw: Default::default(),
        disc_every: 1,
        adversarial_start_step: 2,
        disc_grad_clip: None,
    }
}

/// Checks the metrics of a [`test_gan`] run: steps 1-2 log no adversarial
/// terms, step 3 logs `adv`, `fm` and the discriminator's `disc/d`.
pub fn assert_adversarial_from_step_3(run: &RunDir) {
    let logged = run.read_metrics().unwrap();
    let has = |step: u64, key: &str| {
        logged
            .iter()
            .any(|r| r["step"].as_u64() == Some(step) && r.get(key).is_some())
    };
    assert!(!has(2, "adv") && has(3, "adv") && has(3, "fm") && has(3, "disc/d"));
}

/// Mono audio of `dir` at `rate`, crops of `crop` seconds, batches of 2,
/// nothing held out (the training clips are the validation set).
pub fn mono_data(dir: &Path, rate: u32, crop: f64) -> AudioDataConfig {
    AudioDataConfig {
        dir: dir.to_path_buf(),
        sample_rate: rate,
        channels: 1,
        crop_seconds: crop,
        batch_size: 2,
        val_fraction: 0.0,
        cache_dir: None,
        split_by: SplitBy::File,
        held_out: Vec::new(),
    }
}

/// What one rank of [`data_parallel`] ended with: its summary and final
/// weights (the generator's, then the discriminator's), or its error
/// message.
pub type RankOutcome = Result<(melvae_train::TrainSummary, Vec<Vec<f32>>), String>;

/// Trains one `make(rank)` per rank of a [`melvae_train::dist::LocalComm`] of
/// `ranks` threads to `cfg.steps` (resuming if `resume`), rank `r` in the
/// run directory `dir/rank{r}`; returns each rank's outcome, in rank order.
pub fn data_parallel<T: TrainTask>(
    ranks: usize,
    cfg: &TrainerConfig,
    resume: bool,
    dir: &Path,
    make: impl Fn(usize) -> T + Sync,
) -> Vec<RankOutcome> {
    let comms = melvae_train::dist::LocalComm::group(ranks);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, comm)| {
                let make = &make;
                let cfg = cfg.clone();
                let run = RunDir::create(dir.join(format!("rank{r}"))).unwrap();
                s.spawn(move || {
                    let mut task = make(r);
                    let summary = Trainer::new(cfg, &run)
                        .map_err(|e| e.to_string())?
                        .with_comm(&comm)
                        .fit(&mut task, resume)
                        .map_err(|e| e.to_string())?;
                    let mut w = weights(task.vars());
                    w.extend(weights(task.disc_vars()));
                    Ok((summary, w))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The `(step, key)` values of a run's `metrics.jsonl`, in order.
pub fn logged(run: &Path, key: &str) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_u64()?, v[key].as_f64()?))
        })
        .collect()
}

/// The largest absolute difference between two weight sets of one model.
pub fn max_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// Trains `make()` with `cfg` in one process (run directory `dir/one`)
/// and as 2 in-process ranks ([`data_parallel`], `dir/two`), and asserts
/// that the ranks followed the process over all `cfg.steps` steps
/// ([`assert_two_ranks_follow`]), or, with `first`, over its first steps
/// ([`assert_two_ranks_start_like_one`]).
pub fn two_ranks_against_one<T: TrainTask>(
    dir: &Path,
    cfg: &TrainerConfig,
    first: Option<usize>,
    make: impl Fn() -> T + Sync,
) {
    let one = RunDir::create(dir.join("one")).unwrap();
    let mut single = make();
    Trainer::new(cfg.clone(), &one)
        .unwrap()
        .fit(&mut single, false)
        .unwrap();
    let mut w1 = weights(single.vars());
    w1.extend(weights(single.disc_vars()));
    let two = dir.join("two");
    let ranks = data_parallel(2, cfg, false, &two, |_| make());
    let steps = cfg.steps as usize;
    match first {
        None => assert_two_ranks_follow(one.root(), &two, &w1, &ranks, steps),
        Some(n) => assert_two_ranks_start_like_one(one.root(), &two, &ranks, steps, n),
    }
}

/// Asserts that the 2-rank run of [`data_parallel`] in `two` (its rank 0
/// writes `two/rank0`) followed the 1-rank run in `one` for `steps` steps:
/// identical replicas, the same logged total loss every step within 1e-5
/// relative, and final weights within 1e-5 of `single` (the 1-rank
/// weights, generator then discriminator). Float summation order (halves
/// summed, then added) makes them differ by rounding: about 1e-7 relative
/// per step, measured 1.4e-6 in the weights after 12 steps.
pub fn assert_two_ranks_follow(
    one: &Path,
    two: &Path,
    single: &[Vec<f32>],
    ranks: &[RankOutcome],
    steps: usize,
) {
    assert_two_ranks_start_like_one(one, two, ranks, steps, steps);
    let diff = max_difference(single, &ranks[0].as_ref().unwrap().1);
    assert!(
        diff < 1e-5,
        "1 rank vs 2 ranks: max weight difference {diff}"
    );
}

/// Asserts that the 2-rank run of [`data_parallel`] in `two` (`steps`
/// steps) kept identical replicas, and that its first `first` logged total
/// losses are the 1-rank run's in `one` within 1e-5 relative. For models
/// with a quantiser, whose nearest-code choice turns a rounding-level
/// difference into another code: after a few steps the 1-rank and 2-rank
/// runs part, each still deterministic. Identical replicas show that the
/// ranks shared their codebook statistics (had each updated its codebook
/// from its own rows, the trainer's replica check would have stopped the
/// run).
pub fn assert_two_ranks_start_like_one(
    one: &Path,
    two: &Path,
    ranks: &[RankOutcome],
    steps: usize,
    first: usize,
) {
    let w0 = &ranks[0].as_ref().unwrap().1;
    assert_eq!(
        w0,
        &ranks[1].as_ref().unwrap().1,
        "the replicas stay identical"
    );
    let (l1, l2) = (logged(one, "total"), logged(&two.join("rank0"), "total"));
    assert_eq!((l1.len(), l2.len()), (steps, steps));
    for ((s, a), (_, b)) in l1.iter().zip(&l2).take(first) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1e-3),
            "step {s}: loss {a} vs {b}"
        );
    }
}

/// Task tests' discriminators: a two-period MPD of two to four channels.
pub fn tiny_mpd() -> melvae_models::DiscriminatorsConfig {
    melvae_models::DiscriminatorsConfig {
        mpd: Some(melvae_models::MpdConfig {
            periods: vec![2, 3],
            channels: 2,
            max_channels: 4,
            layers: 1,
        }),
        ..Default::default()
    }
}
