//! Measures the mel VAE: training steps per second (forward, backward and
//! an AdamW update on random log-mels), encoding and 10-step sampling speed
//! in multiples of real time, and the process's peak resident memory.
//!
//! ```text
//! cargo run --release --example mel_vae_throughput -- [--setting tiny|setting1] [--steps 5]
//! ```
//!
//! `--setting` names a file in configs/settings/. Like the other model
//! examples it calls `common::tune_allocator` first. Audio seconds assume the
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
    Ok(())
}

fn main() -> ExitCode {
    common::tune_allocator();
    common::exit_with(run())
}
