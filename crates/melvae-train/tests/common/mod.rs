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
