//! Codec metrics over a folder of reference audio: a trained model's
//! reconstructions, or a folder of audio made elsewhere (another codec,
//! a degraded copy), matched by file name.
//!
//! ```text
//! cargo run --release --example evaluate -- --reference DIR --model MODEL.safetensors [--json OUT.json]
//! cargo run --release --example evaluate -- --reference DIR --degraded DIR2 [--json OUT.json]
//! ```
//!
//! Metrics (see `melvae_models::eval`): DAC's multi-scale mel distance,
//! auraloss' multi-resolution STFT distance, SI-SDR (dB), wideband PESQ at
//! 16 kHz (speech; `--no-pesq` skips it), and with `--model` the real-time
//! factors of encoding and decoding (compute seconds per audio second).
//! The model's family comes from the file: the waveform VAE reconstructs at
//! its own rate and channel count; the mel VAE samples its latents back to
//! mels (`--steps`, `--temperature`, `--guidance`) and to audio with
//! Griffin-Lim. Prints a markdown table (one row per file, then the mean)
//! and writes the same as JSON with `--json`.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::Device;
use clap::Parser;
use melvae::models::eval::{
    evaluate_codec, evaluate_folders, ClipReport, EvalOptions, EvalReport, MelVaeGriffinLim,
};
use melvae::models::SampleOptions;

#[derive(Parser)]
#[command(about = "Codec metrics of a model or a folder against reference audio")]
struct Args {
    /// Folder of reference audio (searched recursively).
    #[arg(long)]
    reference: PathBuf,
    /// A model file, or a run or checkpoint directory, to evaluate.
    #[arg(
        long,
        conflicts_with = "degraded",
        required_unless_present = "degraded"
    )]
    model: Option<PathBuf>,
    /// A folder of audio to score against the references instead, matched
    /// by relative path without the extension.
    #[arg(long)]
    degraded: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Evaluate at most this many reference files (in path order).
    #[arg(long)]
    max_files: Option<usize>,
    /// Skip PESQ (it is meant for speech, and the slowest metric).
    #[arg(long)]
    no_pesq: bool,
    /// Mel VAE: sampling steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Mel VAE: scale of the initial noise.
    #[arg(long, default_value_t = 0.5)]
    temperature: f64,
    /// Mel VAE: classifier-free guidance scale.
    #[arg(long, default_value_t = 1.0)]
    guidance: f64,
}

fn run(args: &Args) -> anyhow::Result<()> {
    let opts = EvalOptions {
        pesq: !args.no_pesq,
        max_files: args.max_files,
    };
    let mut progress = |c: &ClipReport| {
        eprintln!(
            "{}: mel {:.3}, SI-SDR {:.2} dB",
            c.file.display(),
            c.scores.mel_distance,
            c.scores.si_sdr
        )
    };
    let report: EvalReport = match (&args.model, &args.degraded) {
        (Some(model), _) => {
            let name = model.display().to_string();
            if melvae::train::tasks::family_at(model)? == "wave_vae" {
                let vae = common::load_wave_vae(model)?;
                evaluate_codec(&vae, name, &args.reference, opts, &mut progress)?
            } else {
                let vae = common::load_mel_vae(model)?;
                let codec = MelVaeGriffinLim {
                    model: &vae,
                    sampling: SampleOptions {
                        num_steps: args.steps,
                        temperature: args.temperature,
                        guidance_scale: args.guidance,
                        ..Default::default()
                    },
                    griffin_lim: Default::default(),
                    device: Device::Cpu,
                };
                evaluate_codec(&codec, name, &args.reference, opts, &mut progress)?
            }
        }
        (None, Some(dir)) => evaluate_folders(&args.reference, dir, opts, &mut progress)?,
        (None, None) => anyhow::bail!("give --model or --degraded"),
    };
    println!(
        "{} against {} at {} Hz\n",
        report.estimate,
        report.reference.display(),
        report.sample_rate
    );
    print!("{}", report.to_markdown());
    for c in &report.clips {
        if let Some(e) = &c.scores.pesq_error {
            println!("PESQ skipped {}: {e}", c.file.display());
        }
    }
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&report)? + "\n";
        melvae::dsp::atomic_write(p, |w| std::io::Write::write_all(w, text.as_bytes()))?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    common::tune_allocator();
    common::exit_with(run(&Args::parse()))
}
