//! Measures the mel VAE: training steps per second (forward, backward and
//! an AdamW update on random log-mels), encoding and 10-step sampling speed
//! in multiples of real time, and the process's peak resident memory.
//!
//! ```text
//! cargo run --release --example mel_vae_throughput -- [--setting tiny|setting1] [--steps 5] [--dump DIR]
//! ```
//!
//! `--dump DIR` perturbs the weights (so both networks shape the loss) and
//! writes what `tools/bench/mel_vae_twin.py` needs to rebuild the same
//! model in PyTorch, check that it computes the same loss
//! and time the same step: `weights.safetensors` (every variable by name),
//! `batch.npy` (the log-mels `[batch, mel, frames]`), `eps.npy` and
//! `x0.npy` (the loss's reparameterisation and flow noise, `melvae::models::LossDraws`),
//! and `meta.json` (the config, the flow times, the evaluation-mode loss
//! terms at step `STEP`, the measured step time).
//!
//! `--setting` names a file in configs/settings/. Like the other model
//! examples it calls `melvae::layers::tune_cpu` first. Audio seconds assume the
//! `vocos-24k` mel (24 kHz, hop 256). Runs on the CPU, or on the first CUDA
//! device when built with `--features cuda` and `--cuda` is given.

mod common;

use std::process::ExitCode;
use std::time::Instant;

use candle_core::DType;
use clap::Parser;
use common::{MelVaeBench, MEL_FRAME_RATE};
use melvae::models::SampleOptions;

#[derive(Parser)]
struct Args {
    /// Settings file under configs/settings/ (without .yaml).
    #[arg(long, default_value = "tiny")]
    setting: String,
    #[command(flatten)]
    bench: common::BenchArgs,
    /// Write the weights, the batch, the loss's draws and its value for the
    /// PyTorch twin here.
    #[arg(long)]
    dump: Option<std::path::PathBuf>,
}

/// The step the KL weight of the dumped loss is taken at: past any warm-up.
const STEP: u64 = 1_000_000;

/// Writes the twin's inputs (before any training step changes the weights).
/// The weights are perturbed first (uniform noise of 0.05 added to each,
/// seeded): at initialisation the encoder's and decoder's output layers are
/// zero, and the loss would not depend on either network.
fn dump(
    bench: &MelVaeBench,
    dir: &std::path::Path,
    setting: &str,
) -> anyhow::Result<serde_json::Value> {
    for (i, (_, v)) in bench.vars.iter().enumerate() {
        let noise = melvae::layers::testing::noise(v.dims(), 100 + i as u64)?
            .to_dtype(v.dtype())?
            .to_device(v.device())?;
        v.set(&(v.as_tensor() + (noise * 0.05)?)?)?;
    }
    let mel = bench.random_mel(bench.batch, bench.frames, 1)?;
    let mut rng = melvae::dsp::SplitMix64::new(0);
    let draws = bench.model.loss_draws(&mel, &mut rng, false)?;
    let l = bench.model.loss_with(&mel, STEP, &draws, false)?;
    let scalar = |t: &candle_core::Tensor| -> anyhow::Result<f64> {
        Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    };
    let weights: std::collections::HashMap<String, candle_core::Tensor> = bench
        .vars
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect::<anyhow::Result<_>>()?;
    common::dump_for_twin(dir, &weights, &mel, serde_json::json!({}))?;
    for (name, t) in [("eps", &draws.eps), ("x0", &draws.x0)] {
        let t = t.to_dtype(DType::F32)?;
        let a =
            ndarray::ArrayD::from_shape_vec(t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?)?;
        melvae::dsp::write_npy(dir.join(format!("{name}.npy")), &a)?;
    }
    let t: Vec<f32> = draws.t.to_dtype(DType::F32)?.to_vec1()?;
    Ok(serde_json::json!({
        "family": "mel_vae",
        "setting": setting,
        "model": bench.model.config(),
        "t": t,
        "step": STEP,
        "kl_weight": l.kl_weight,
        "eval_terms": {"cfm": scalar(&l.cfm)?, "kl": scalar(&l.kl)?, "total": scalar(&l.total)?},
        "n_params": bench.n_params(),
    }))
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let dev = args.bench.device()?;
    let bench = MelVaeBench::new(&args.setting, DType::F32, &dev)?;
    let (model, batch, crop_frames) = (&bench.model, bench.batch, bench.frames);
    let c = model.compress();
    println!(
        "{}: {:.2} M parameters, C = {c}, batch {batch} x {crop_frames} frames ({:.2} s each), {} threads",
        bench.path.display(),
        bench.n_params() as f64 / 1e6,
        crop_frames as f64 / MEL_FRAME_RATE,
        candle_core::utils::get_num_threads()
    );

    let dumped = args
        .dump
        .as_deref()
        .map(|d| dump(&bench, d, &args.setting))
        .transpose()?;
    let per_step = bench.time_train_steps(args.bench.steps)?;
    let audio_per_step = batch as f64 * crop_frames as f64 / MEL_FRAME_RATE;
    common::print_train_step(per_step, audio_per_step);

    // Encoding and sampling of one long clip.
    let frames = ((args.bench.seconds * MEL_FRAME_RATE) as usize).div_ceil(c) * c;
    let secs = frames as f64 / MEL_FRAME_RATE;
    let long = bench.random_mel(1, frames, 2)?;
    let (latent, _) = model.encode(&long)?;
    let enc = common::median_of_3(&dev, || {
        model.encode(&long)?;
        Ok(())
    })?;
    common::print_speed("encode", secs, enc);
    for (name, guidance) in [("no guidance", 1.0), ("CFG 2 (two passes)", 2.0)] {
        let opts = SampleOptions {
            num_steps: 10,
            guidance_scale: guidance,
            ..Default::default()
        };
        let t = Instant::now();
        let out = model.sample(&latent, &opts)?;
        dev.synchronize()?;
        let s = t.elapsed().as_secs_f64();
        drop(out);
        println!(
            "sample {secs:.2} s, 10 midpoint steps, {name}: {:.1} ms, {:.1}x real time",
            s * 1e3,
            secs / s
        );
    }
    if let Some(mib) = common::proc_status_mib("VmHWM") {
        println!("peak resident memory: {mib:.0} MiB");
    }
    if let (Some(dir), Some(mut meta)) = (&args.dump, dumped) {
        meta["melvae_step_ms"] = serde_json::json!(per_step * 1e3);
        meta["threads"] = serde_json::json!(candle_core::utils::get_num_threads());
        meta["learning_rate"] = serde_json::json!(1e-4);
        std::fs::write(
            dir.join("meta.json"),
            serde_json::to_string_pretty(&meta)? + "\n",
        )?;
        println!("wrote {}", dir.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    common::exit_with(run())
}
