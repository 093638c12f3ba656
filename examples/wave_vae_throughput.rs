//! Measures the waveform VAE: training steps per second (the VAE loss on a
//! batch of crops, backward and an AdamW update, as `train` runs it without
//! the adversarial phase), offline encoding and decoding speed in multiples
//! of real time, and the process's peak resident memory.
//!
//! ```text
//! cargo run --release --example wave_vae_throughput -- [--setting wave_vae_tiny] [--steps 5] [--dump DIR]
//! ```
//!
//! `--setting` names a file in configs/settings/ whose `wave_vae`,
//! `wave_vae_loss` and `data` sections give the model, the loss and the
//! batch (`data.batch_size` crops of `data.crop_seconds`, cut to the hop).
//! `--dump DIR` also writes what `tools/bench/wave_vae_twin.py` needs to
//! rebuild the same model in PyTorch, check that it computes the same loss
//! and time the same step: `weights.safetensors` (every trainable tensor by
//! name), `batch.npy` (`[batch, channels, samples]`) and `meta.json` (the
//! configs, the evaluation-mode loss terms of the batch, the measured step
//! time). Runs on the CPU, or on the first CUDA device when built with
//! `--features cuda` and `--cuda` is given.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::Tensor;
use clap::Parser;
use melvae::dsp::SplitMix64;
use melvae::models::{WaveVae, WaveVaeObjective};
use melvae::train::optim::{collect_grads, AdamW, AdamWConfig};

#[derive(Parser)]
struct Args {
    /// Settings file under configs/settings/ (without .yaml).
    #[arg(long, default_value = "wave_vae_tiny")]
    setting: String,
    #[command(flatten)]
    bench: common::BenchArgs,
    /// Write the weights, the batch and the loss for the PyTorch twin here.
    #[arg(long)]
    dump: Option<PathBuf>,
}

/// The loss step the KL weight is taken at: past any warm-up.
const STEP: u64 = 1_000_000;
/// The learning rate of the timed updates.
const LR: f64 = 1e-4;

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let dev = args.bench.device()?;
    let setting = common::BenchSetting::load(&args.setting)?;
    let sections = melvae::train::tasks::wave_vae::wave_vae_config(&setting.resolved)?;
    let model = WaveVae::new(sections.model.clone(), setting.var_builder(&dev))?;
    let objective = WaveVaeObjective::new(sections.loss.clone(), model.config(), &dev)?;
    let (vars, n_params) = setting.vars();
    let data = setting.audio_data()?;
    let cfg = model.config();
    let (rate, channels, hop) = (cfg.sample_rate as f64, cfg.audio_channels, model.hop());
    let crop = common::BenchSetting::crop(&data, rate, hop);
    let threads = candle_core::utils::get_num_threads();
    println!(
        "{}: {:.3} M parameters, hop {hop}, batch {} x {channels} x {crop} samples ({:.2} s each), {threads} threads",
        setting.path.display(),
        n_params as f64 / 1e6,
        data.batch_size,
        crop as f64 / rate
    );

    let batch = common::test_audio(data.batch_size, channels, crop, 1, &dev)?;
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default())?;
    let mut rng = SplitMix64::new(0);
    let eval = model.loss(&batch, STEP, &objective, &mut rng, false)?;
    let eval_terms = eval
        .terms
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_scalar::<f32>()? as f64)))
        .collect::<anyhow::Result<BTreeMap<String, f64>>>()?;
    let eval_total = eval.total.to_scalar::<f32>()? as f64;
    // The weights before any update, for the twin (it reproduces this loss).
    let weights: HashMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect::<anyhow::Result<_>>()?;
    drop(eval);

    let per_step = common::mean_seconds(&dev, 1, args.bench.steps, || {
        let loss = model.loss(&batch, STEP, &objective, &mut rng, true)?;
        let store = loss.total.backward()?;
        opt.step(&collect_grads(&vars, &store), LR)?;
        Ok(())
    })?;
    let audio_per_step = data.batch_size as f64 * crop as f64 / rate;
    common::print_train_step(per_step, audio_per_step);

    let n = ((args.bench.seconds * rate) as usize).div_ceil(hop) * hop;
    let secs = n as f64 / rate;
    let long = common::test_audio(1, channels, n, 2, &dev)?;
    let (latent, _) = model.encode(&long)?;
    let enc = common::median_of_3(&dev, || {
        model.encode(&long)?;
        Ok(())
    })?;
    let dec = common::median_of_3(&dev, || {
        model.decode(&latent)?;
        Ok(())
    })?;
    common::print_speed("encode", secs, enc);
    common::print_speed("decode", secs, dec);
    common::finish_bench(
        args.dump.as_deref(),
        &weights,
        &batch,
        serde_json::json!({
            "setting": args.setting,
            "model": sections.model,
            "loss": sections.loss,
            "step": STEP,
            "kl_weight": objective.config().kl_schedule().weight(STEP),
            "eval_terms": eval_terms,
            "eval_total": eval_total,
            "melvae_step_ms": per_step * 1e3,
            "threads": threads,
            "learning_rate": LR,
            "n_params": n_params,
        }),
    )
}

fn main() -> ExitCode {
    common::tune_allocator();
    common::exit_with(run())
}
