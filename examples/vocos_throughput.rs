//! Measures the Vocos vocoder: training steps per second (the training
//! task's loss of a batch of crops, backward and an AdamW update, as
//! `train` runs it without the adversarial phase), offline synthesis speed in multiples of real
//! time, and the process's peak resident memory.
//!
//! ```text
//! cargo run --release --example vocos_throughput -- [--setting vocos_tiny] [--steps 5] [--dump DIR]
//! ```
//!
//! `--setting` names a file in configs/settings/ whose `vocos`,
//! `vocos_loss` and `data` sections give the model, the loss weights and
//! the batch (`data.batch_size` crops of `data.crop_seconds`, cut to the
//! hop). `--dump DIR` also writes what `tools/bench/vocos_twin.py` needs to
//! rebuild the same model with the `vocos` package, check that it computes
//! the same loss and time the same step: `weights.safetensors` (the
//! package's parameter names), `batch.npy` (`[batch, samples]`) and
//! `meta.json`. Runs on the CPU, or on the first CUDA device when built
//! with `--features cuda` and `--cuda` is given.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::{DType, Tensor};
use clap::Parser;
use melvae::dsp::TensorMel;
use melvae::train::optim::{collect_grads, AdamW, AdamWConfig};
use melvae::train::tasks::vocos::VocosTask;
use melvae::train::{AudioFolder, StepContext, TrainTask};

#[derive(Parser)]
struct Args {
    /// Settings file under configs/settings/ (without .yaml).
    #[arg(long, default_value = "vocos_tiny")]
    setting: String,
    #[command(flatten)]
    bench: common::BenchArgs,
    /// Write the weights, the batch and the loss for the PyTorch twin here.
    #[arg(long)]
    dump: Option<PathBuf>,
}

/// The learning rate of the timed updates.
const LR: f64 = 1e-4;

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let dev = args.bench.device()?;
    let setting = common::BenchSetting::load(&args.setting)?;
    let mut sections = melvae::train::tasks::vocos::vocos_config(&setting.resolved)?;
    // The generator's step: no discriminators.
    sections.discriminators = None;
    let data = setting.audio_data()?;
    // The task (seed 0) owns the model and its loss; the folder is only
    // there to build it (the timed batch is synthetic).
    let mut task = VocosTask::new(
        sections.clone(),
        AudioFolder::load(&data)?,
        data.clone(),
        0,
        &dev,
        DType::F32,
    )?;
    let cfg = task.model.config().clone();
    let mel = TensorMel::new(cfg.mel_config(), &dev)?;
    let vars = task.vars();
    let n_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let (rate, hop) = (cfg.sample_rate as f64, cfg.hop_length);
    let crop = common::BenchSetting::crop(&data, rate, hop);
    let threads = candle_core::utils::get_num_threads();
    println!(
        "{}: {:.3} M parameters, batch {} x {crop} samples ({:.2} s each), {threads} threads",
        setting.path.display(),
        n_params as f64 / 1e6,
        data.batch_size,
        crop as f64 / rate
    );

    let batch = common::test_audio(data.batch_size, 1, crop, 1, &dev)?;
    // The task's step: the log-mel of the crops in, its weighted loss terms
    // out.
    let ctx = StepContext {
        step: 0,
        train: true,
        adversarial: false,
    };
    let mut loss =
        |audio: &Tensor| -> anyhow::Result<Tensor> { Ok(task.losses(audio, ctx)?.total) };
    let eval_total = loss(&batch)?.to_scalar::<f32>()? as f64;
    // The weights before any update, for the twin (it reproduces this loss).
    let weights: HashMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect::<anyhow::Result<_>>()?;

    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default())?;
    let per_step = common::mean_seconds(&dev, 1, args.bench.steps, || {
        let store = loss(&batch)?.backward()?;
        opt.step(&collect_grads(&vars, &store), LR)?;
        Ok(())
    })?;
    let audio_per_step = data.batch_size as f64 * crop as f64 / rate;
    common::print_train_step(per_step, audio_per_step);

    let n = ((args.bench.seconds * rate) as usize).div_ceil(hop) * hop;
    let secs = n as f64 / rate;
    let long = common::test_audio(1, 1, n, 2, &dev)?.squeeze(1)?;
    let long_mel = mel.forward(&long)?;
    let dec = common::median_of_3(&dev, || {
        task.model.decode(&long_mel, None)?;
        Ok(())
    })?;
    common::print_speed("synthesise", secs, dec);
    common::finish_bench(
        args.dump.as_deref(),
        &weights,
        &batch.squeeze(1)?,
        serde_json::json!({
            "setting": args.setting,
            "model": cfg,
            "loss": sections.loss,
            "eval_total": eval_total,
            "melvae_step_ms": per_step * 1e3,
            "threads": threads,
            "learning_rate": LR,
            "n_params": n_params,
        }),
    )
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    common::exit_with(run())
}
