//! Codec metrics over a folder of reference audio: a trained model's
//! reconstructions, or a folder of audio made elsewhere (another codec,
//! a degraded copy), matched by file name.
//!
//! ```text
//! cargo run --release --example evaluate -- --reference DIR --model MODEL.safetensors [--baselines] [--json OUT.json]
//! cargo run --release --example evaluate -- --held-out configs/settings/wave_vae_tiny.yaml --model runs/wave_vae_tiny --baselines
//! cargo run --release --example evaluate -- --reference DIR --degraded DIR2 [--json OUT.json]
//! ```
//!
//! Metrics (see `melvae_models::eval`): DAC's multi-scale mel distance,
//! auraloss' multi-resolution STFT distance, SI-SDR (dB), wideband PESQ at
//! 16 kHz (speech; `--no-pesq` skips it), and with `--model` the real-time
//! factors of encoding and decoding (compute seconds per audio second).
//! The model's family comes from the file: the waveform VAE reconstructs at
//! its own rate and channel count; a vocoder (Vocos) resynthesises each
//! file from its mel (with `--baselines`, Griffin-Lim on the same mel is
//! scored too); the mel VAE samples its latents back to
//! mels (`--steps`, `--temperature`, `--guidance`) and to audio with the
//! Vocos model file given by `--vocoder`, or Griffin-Lim. `--held-out
//! CONFIG` evaluates the files a training config holds out for validation
//! (its `data.dir` and `data.val_fraction`).
//! `--baselines` also scores, on the same clips and at the model's rate,
//! the same architecture untrained (seeded random weights), the
//! clip-average spectrum with Griffin-Lim phases, and the audio resampled
//! down to as many samples per second as the model's latents hold numbers
//! and back up. Prints a markdown table (one row per file, then the mean;
//! with baselines, a summary of means) and writes the same as JSON with
//! `--json`.

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::Device;
use clap::Parser;
use melvae::models::eval::{
    audio_files, evaluate_codec, evaluate_folders, ClipMeanSpectrum, ClipReport, Codec,
    EvalOptions, EvalReport, MelCodec, MelToAudio, MelVaeCodec, MelVqVaeCodec, Resampled,
};
use melvae::models::{MelVae, WaveVae};

#[derive(Parser)]
#[command(about = "Codec metrics of a model or a folder against reference audio")]
struct Args {
    /// Folder of reference audio (searched recursively).
    #[arg(long, required_unless_present = "held_out")]
    reference: Option<PathBuf>,
    /// Evaluate the files this training config holds out for validation.
    #[arg(long, conflicts_with_all = ["reference", "degraded"])]
    held_out: Option<PathBuf>,
    /// With --model: also score the untrained model, the clip-average
    /// spectrum and the equal-bandwidth resampling on the same clips.
    #[arg(long, requires = "model")]
    baselines: bool,
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
    /// Mel VAE: a Vocos model file (from `convert` or training) to turn
    /// its mels into audio instead of Griffin-Lim.
    #[arg(long)]
    vocoder: Option<PathBuf>,
    /// Mel VAE: sampling steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Mel VAE: scale of the initial noise [default: the model's
    /// `cfm.reconstruction_temperature`].
    #[arg(long, value_parser = common::parse_temperature)]
    temperature: Option<f64>,
    /// Mel VAE: classifier-free guidance scale.
    #[arg(long, default_value_t = 1.0)]
    guidance: f64,
}

/// The reference folder and the files to evaluate in it.
fn references(args: &Args) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    let (dir, mut files) = match (&args.held_out, &args.reference) {
        (Some(cfg), _) => {
            let resolved = melvae::train::ResolvedConfig::load(cfg, &[])?;
            let data: melvae::train::AudioDataConfig = resolved.get("data")?;
            let files = data.held_out_files()?;
            anyhow::ensure!(
                !files.is_empty(),
                "{}: no file of {} is held out (data.val_fraction = {})",
                cfg.display(),
                data.dir.display(),
                data.val_fraction
            );
            (data.dir, files)
        }
        (None, Some(dir)) => (dir.clone(), audio_files(dir, None)?),
        (None, None) => anyhow::bail!("give --reference or --held-out"),
    };
    if let Some(m) = args.max_files {
        files.truncate(m);
    }
    Ok((dir, files))
}

/// The model of `path` as a codec, its untrained twin (seeded random
/// weights of the same config) with `--baselines`.
fn codecs(args: &Args, path: &Path) -> anyhow::Result<Vec<(String, Box<dyn Codec>)>> {
    let name = path.display().to_string();
    let untrained = "untrained (same config, random weights)".to_string();
    let seeded = |vm: &candle_nn::VarMap| {
        melvae::layers::seeded_var_builder(vm, 0, candle_core::DType::F32, &Device::Cpu)
    };
    let mut out: Vec<(String, Box<dyn Codec>)> = Vec::new();
    let family = melvae::train::tasks::family_at(path)?;
    if family == "vocos" {
        anyhow::ensure!(
            args.vocoder.is_none(),
            "--vocoder is for mel models; {} is a vocoder",
            path.display()
        );
        let vocos = common::load_vocos(path)?;
        let mel = vocos.config().mel_config();
        if args.baselines {
            let vm = candle_nn::VarMap::new();
            let fresh = melvae::models::Vocos::new(vocos.config().clone(), seeded(&vm))?;
            out.push((name, Box::new(MelCodec::vocos(vocos)?)));
            out.push((untrained, Box::new(MelCodec::vocos(fresh)?)));
            out.push((
                "the same mel through Griffin-Lim (32 iterations)".into(),
                Box::new(MelCodec {
                    mel,
                    vocoder: MelToAudio::new(None, &mel)?,
                }),
            ));
        } else {
            out.push((name, Box::new(MelCodec::vocos(vocos)?)));
        }
    } else if family == "mel_vqvae" {
        let vq = common::load_mel_vqvae(path)?;
        let mel = *vq.mel_config();
        let vocoder = match &args.vocoder {
            Some(p) => Some(melvae::models::Vocos::load(
                p,
                &Device::Cpu,
                candle_core::DType::F32,
            )?),
            None => None,
        };
        let vocoder = MelToAudio::new(vocoder, &mel)?;
        let codec = |model| -> Box<dyn Codec> {
            Box::new(MelVqVaeCodec {
                model,
                vocoder: vocoder.clone(),
                device: Device::Cpu,
            })
        };
        if args.baselines {
            let vm = candle_nn::VarMap::new();
            let fresh = melvae::models::MelVqVae::new(vq.config().clone(), seeded(&vm))?;
            out.push((name, codec(vq)));
            out.push((untrained, codec(fresh)));
        } else {
            out.push((name, codec(vq)));
        }
    } else if family == "vqvae" {
        anyhow::ensure!(
            args.vocoder.is_none(),
            "--vocoder is for mel models; {} is a waveform VQ-VAE",
            path.display()
        );
        let vq = common::load_vqvae(path)?;
        if args.baselines {
            let vm = candle_nn::VarMap::new();
            let fresh = melvae::models::VqVae::new(vq.config().clone(), seeded(&vm))?;
            out.push((name, Box::new(vq)));
            out.push((untrained, Box::new(fresh)));
        } else {
            out.push((name, Box::new(vq)));
        }
    } else if family == "wave_vae" {
        anyhow::ensure!(
            args.vocoder.is_none(),
            "--vocoder is for mel models; {} is a waveform VAE",
            path.display()
        );
        let vae = common::load_wave_vae(path)?;
        if args.baselines {
            let vm = candle_nn::VarMap::new();
            let fresh = WaveVae::new(vae.config().clone(), seeded(&vm))?;
            out.push((name, Box::new(vae)));
            out.push((untrained, Box::new(fresh)));
        } else {
            out.push((name, Box::new(vae)));
        }
    } else {
        let vae = common::load_mel_vae(path)?;
        let sampling = common::mel_sampling(
            &vae.config().cfm,
            args.steps,
            args.guidance,
            args.temperature,
        );
        let vocoder = common::mel_vocoder(args.vocoder.as_deref())?;
        let gl = |model: MelVae| -> Box<dyn Codec> {
            Box::new(MelVaeCodec {
                model,
                sampling,
                vocoder: vocoder.clone(),
                device: Device::Cpu,
            })
        };
        if args.baselines {
            let vm = candle_nn::VarMap::new();
            let fresh = MelVae::new(vae.config().clone(), seeded(&vm))?;
            out.push((name, gl(vae)));
            out.push((untrained, gl(fresh)));
        } else {
            out.push((name, gl(vae)));
        }
    }
    if args.baselines {
        let (rate, channels, latent_rate) = {
            let c = &out[0].1;
            (c.sample_rate(), c.audio_channels(), c.latent_rate())
        };
        out.push((
            "clip-average spectrum, Griffin-Lim phases".into(),
            Box::new(ClipMeanSpectrum {
                sample_rate: rate,
                audio_channels: channels,
                griffin_lim: Default::default(),
            }),
        ));
        let per_channel = (latent_rate / channels as f64).round().max(1.0) as u32;
        out.push((
            format!("resampled to {per_channel} Hz and back (equal bandwidth)"),
            Box::new(Resampled {
                sample_rate: rate,
                audio_channels: channels,
                rate: per_channel,
            }),
        ));
    }
    Ok(out)
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
    let reports: Vec<EvalReport> = match (&args.model, &args.degraded) {
        (Some(model), _) => {
            let (dir, files) = references(args)?;
            let mut reports = Vec::new();
            for (name, codec) in codecs(args, model)? {
                if args.baselines {
                    eprintln!("evaluating {name}");
                }
                reports.push(evaluate_codec(
                    codec.as_ref(),
                    name,
                    &dir,
                    &files,
                    opts,
                    &mut progress,
                )?);
            }
            reports
        }
        (None, Some(dir)) => {
            let (reference, _) = references(args)?;
            vec![evaluate_folders(&reference, dir, opts, &mut progress)?]
        }
        (None, None) => anyhow::bail!("give --model or --degraded"),
    };
    for report in &reports {
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
        println!();
    }
    if reports.len() > 1 {
        println!("| estimate | latent numbers/s | mel distance | STFT distance | SI-SDR (dB) | PESQ wb |");
        println!("|---|---:|---:|---:|---:|---:|");
        for r in &reports {
            let m = &r.mean;
            println!(
                "| {} | {:.0} | {:.3} | {:.3} | {:.2} | {} |",
                r.estimate,
                r.latent_rate.unwrap_or(f64::NAN),
                m.mel_distance,
                m.stft_distance,
                m.si_sdr,
                m.pesq_wb.map_or("-".into(), |v| format!("{v:.3}"))
            );
        }
    }
    if let Some(p) = &args.json {
        let value = if reports.len() == 1 {
            serde_json::to_value(&reports[0])?
        } else {
            serde_json::json!({ "reports": reports })
        };
        let text = serde_json::to_string_pretty(&value)? + "\n";
        melvae::dsp::atomic_write(p, |w| std::io::Write::write_all(w, text.as_bytes()))?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    common::exit_with(run(&Args::parse()))
}
