//! Streams a long synthetic signal (an hour by default) through the mel
//! VAE's streaming encoder (mel frontend + causal encoder) in fixed chunks
//! and reports, per minute of audio, the resident memory and the compute
//! time per chunk: both must stay flat for a stream to run for hours.
//!
//! ```text
//! cargo run --release --example stream_bench -- [--minutes 60] [--chunk-ms 500] [--setting tiny] [--weights file|vars] [--model MODEL]
//! ```
//!
//! The model is the `--setting`'s (default: the quickstart's tiny mel VAE)
//! with seeded random weights, loaded from a model file (`--weights file`,
//! plain tensors, as a downstream program would) or kept as training
//! variables (`--weights vars`, as inside a training run); or a trained
//! `--model`. Prints a table and a summary: memory growth after the first
//! minute and the ratio of the last minute's mean chunk time to the second
//! minute's.

mod common;

use std::process::ExitCode;
use std::time::Instant;

use anyhow::ensure;
use candle_core::{DType, Device};
use clap::{Parser, ValueEnum};
use melvae::models::{model_file, MelVae};

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum WeightsKind {
    File,
    Vars,
}

#[derive(Parser)]
struct Args {
    /// Minutes of audio to stream (>= 2).
    #[arg(long, default_value_t = 60)]
    minutes: usize,
    /// Chunk size in milliseconds (> 0).
    #[arg(long, default_value_t = 500.0)]
    chunk_ms: f64,
    /// Settings file under configs/settings/ (without .yaml).
    #[arg(long, default_value = "tiny")]
    setting: String,
    /// Where the random weights live: a model file or training variables.
    #[arg(long, value_enum, default_value = "file")]
    weights: WeightsKind,
    /// A trained model (file or run directory) instead of random weights.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
}

/// Deterministic speech-like test signal: a gliding harmonic tone with
/// noise, in [-0.5, 0.5].
fn signal(start: usize, n: usize) -> Vec<f32> {
    let noise = common::noise(n, start as u64 + 1);
    (start..start + n)
        .zip(noise)
        .map(|(i, e)| {
            let t = i as f32 / 24_000.0;
            let f0 = 120.0 + 40.0 * (0.3 * t).sin();
            let phase = 2.0 * std::f32::consts::PI * f0 * t;
            0.2 * phase.sin() + 0.1 * (2.0 * phase).sin() + 0.05 * e
        })
        .collect()
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.minutes >= 2,
        "--minutes must be >= 2, got {}",
        args.minutes
    );
    ensure!(
        args.chunk_ms > 0.0 && args.chunk_ms.is_finite(),
        "--chunk-ms must be > 0, got {}",
        args.chunk_ms
    );
    let dev = Device::Cpu;
    let tmp = std::env::temp_dir().join(format!(
        "melvae-stream-bench-{}.safetensors",
        std::process::id()
    ));
    let model: MelVae = match (&args.model, args.weights) {
        (Some(p), _) => common::load_mel_vae(p)?,
        (None, kind) => {
            let bench = common::MelVaeBench::new(&args.setting, DType::F32, &dev)?;
            match kind {
                WeightsKind::Vars => bench.model,
                WeightsKind::File => {
                    let tensors = bench
                        .vars
                        .iter()
                        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                        .collect();
                    model_file::save::<MelVae>(
                        &tmp,
                        bench.model.config(),
                        &tensors,
                        &Default::default(),
                        &bench.path,
                    )?;
                    let m = MelVae::load(&tmp, &dev, DType::F32);
                    let _ = std::fs::remove_file(&tmp);
                    m?
                }
            }
        }
    };
    let mut stream = model.encoder_stream()?;
    let rate = 24_000usize;
    let chunk = ((args.chunk_ms / 1000.0 * rate as f64).round() as usize).max(1);
    let per_minute = 60 * rate;
    let total = args.minutes * per_minute;
    println!(
        "streaming {} min in {:.0} ms chunks; tail window {}",
        args.minutes,
        args.chunk_ms,
        match model.config().convformer.tf_context {
            Some(w) => format!("{w} latent frames"),
            None => "unbounded (the state grows)".into(),
        }
    );
    println!("| minute | RSS MiB | state (numbers) | mean ms / chunk | max ms / chunk | latents |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let (mut pos, mut latents) = (0usize, 0usize);
    let (mut rss, mut means) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for minute in 0..args.minutes {
        let mut times = Vec::new();
        let end = ((minute + 1) * per_minute).min(total);
        while pos < end {
            let n = chunk.min(end - pos);
            let x = signal(pos, n);
            let t = Instant::now();
            if let Some(l) = stream.push(&x, &dev)? {
                latents += l.mean.dim(1)?;
            }
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            pos += n;
        }
        let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
        let max = times.iter().copied().fold(0.0, f64::max);
        let r = common::proc_status_mib("VmRSS").unwrap_or(f64::NAN);
        println!(
            "| {} | {r:.1} | {} | {mean:.2} | {max:.2} | {latents} |",
            minute + 1,
            stream.state_elements()
        );
        rss.push(r);
        means.push(mean);
    }
    if let Some(l) = stream.finish(&dev)? {
        latents += l.mean.dim(1)?;
    }
    let wall = started.elapsed().as_secs_f64();
    let growth = rss.iter().skip(1).copied().fold(f64::MIN, f64::max) - rss[0];
    let ratio = means[means.len() - 1] / means[1];
    println!(
        "\n{} min of audio in {wall:.1} s ({:.0}x real time), {latents} latent frames; \
         memory growth after the first minute {growth:.1} MiB; last minute's chunk time / \
         second minute's {ratio:.2}",
        args.minutes,
        total as f64 / rate as f64 / wall
    );
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    common::exit_with(run())
}
