//! Encodes and decodes an audio file with a trained model; the family (mel
//! VAE or waveform VAE) comes from the model file or the run.
//!
//! ```text
//! cargo run --release --example reconstruct -- --model MODEL.safetensors IN_AUDIO -o OUT.wav [--steps N] [--guidance G] [--temperature T] [--latents OUT.npy] [--png OUT.png]
//! cargo run --release --example reconstruct -- --model runs/tiny IN_AUDIO -o OUT.wav
//! ```
//!
//! The mel VAE is vocoded with Griffin-Lim (`--steps`, `--guidance` and
//! `--temperature` set its sampling); the waveform VAE decodes audio
//! directly at its own rate and channel count (mono or stereo) from the
//! posterior mean. The PNG shows the input log-mel above the
//! reconstruction's; `--latents` writes the latents (`[frames / C,
//! latent_dim]` for the mel VAE, `[latent_dim, frames]` for the waveform
//! VAE).

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::Device;
use clap::Parser;
use melvae::dsp::{
    mel_to_audio, save_wav, write_npy, Audio, GriffinLimConfig, MelConfig, MelExtractor,
    MelInversion, SpectrogramImage, WavFormat,
};
use melvae::models::{mel_to_array, MelVae, SampleOptions};

#[derive(Parser)]
#[command(about = "Reconstruct audio through a trained mel VAE")]
struct Args {
    /// A model file (from `export`, or `export.safetensors` in a best
    /// checkpoint), or a run directory (its latest checkpoint, EMA weights
    /// if kept) or checkpoint directory.
    #[arg(long, alias = "run")]
    model: PathBuf,
    /// Input audio.
    input: PathBuf,
    /// Output WAV.
    #[arg(short, long)]
    output: PathBuf,
    /// Sampling steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 1.0)]
    guidance: f64,
    /// Scale of the initial noise (1 samples freely; lower stays closer to the input).
    #[arg(long, default_value_t = 0.5)]
    temperature: f64,
    /// Write the latents `[frames / C, latent_dim]` here.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Write a PNG of input and reconstructed mels here.
    #[arg(long)]
    png: Option<PathBuf>,
}

/// The waveform VAE: encode and decode the file at the model's rate and
/// channel count; the PNG stacks the log-mels of the first channel.
fn run_wave(args: &Args) -> anyhow::Result<()> {
    let model = common::load_wave_vae(&args.model)?;
    let cfg = model.config().clone();
    let audio = melvae::dsp::load_audio_with(
        &args.input,
        &melvae::dsp::LoadOptions {
            channels: if cfg.audio_channels == 1 {
                melvae::dsp::ChannelMode::Mono
            } else {
                melvae::dsp::ChannelMode::Stereo
            },
            sample_rate: Some(cfg.sample_rate),
            ..Default::default()
        },
    )?;
    let n = audio.n_samples();
    let flat: Vec<f32> = audio.channels.iter().flatten().copied().collect();
    let x = candle_core::Tensor::from_vec(flat, (audio.channels.len(), n), &Device::Cpu)?;
    let (y, latent) = model.reconstruct(&x)?;
    let y = y.squeeze(0)?.to_vec2::<f32>()?;
    save_wav(
        &args.output,
        &Audio::new(cfg.sample_rate, y.clone())?,
        WavFormat::Pcm16,
    )?;
    if let Some(p) = &args.latents {
        let latent = latent.squeeze(0)?;
        let (d, k) = latent.dims2()?;
        let v = latent.flatten_all()?.to_vec1::<f32>()?;
        write_npy(p, &ndarray::Array2::from_shape_vec((d, k), v)?)?;
    }
    let ex = MelExtractor::new(MelConfig {
        sample_rate: cfg.sample_rate,
        ..MelConfig::vocos_24k()
    })?;
    let (mi, mr) = (ex.extract(&audio.channels[0])?, ex.extract(&y[0])?);
    if let Some(p) = &args.png {
        SpectrogramImage::for_mel(ex.config()).save_png_stack(p, &[&mi, &mr])?;
    }
    let l1 = (&mi - &mr).mapv(f32::abs).mean().unwrap_or(f32::NAN);
    println!(
        "{}: waveform VAE, {} latent frames, log-mel L1 {l1:.3} -> {}",
        args.input.display(),
        latent.dim(2)?,
        args.output.display()
    );
    Ok(())
}

fn run(args: &Args) -> anyhow::Result<()> {
    if melvae::train::tasks::family_at(&args.model)? == "wave_vae" {
        return run_wave(args);
    }
    let dev = Device::Cpu;
    let model = common::load_mel_vae(&args.model)?;
    let audio = common::load_for_mel(&args.input, &MelConfig::vocos_24k())?;
    let opts = SampleOptions {
        num_steps: args.steps,
        guidance_scale: args.guidance,
        temperature: args.temperature,
        ..Default::default()
    };
    let r = model.reconstruct(&audio.channels[0], 24000, &opts, &dev)?;
    let (mi, mr) = (mel_to_array(&r.input)?, mel_to_array(&r.output)?);
    let ex = MelExtractor::new(MelConfig::vocos_24k())?;
    let wav = mel_to_audio(
        &ex,
        &mr,
        Some(audio.n_samples()),
        MelInversion::default(),
        &GriffinLimConfig::default(),
    )?;
    save_wav(
        &args.output,
        &Audio::new(24000, vec![wav])?,
        WavFormat::Pcm16,
    )?;
    if let Some(p) = &args.latents {
        let (_, k, d) = r.latent.dims3()?;
        let latent = r.latent.flatten_all()?.to_vec1::<f32>()?;
        write_npy(p, &ndarray::Array2::from_shape_vec((k, d), latent)?)?;
    }
    if let Some(p) = &args.png {
        SpectrogramImage::for_mel(ex.config()).save_png_stack(p, &[&mi, &mr])?;
    }
    let l1 = MelVae::mel_l1(&r.output, &r.input)?;
    println!(
        "{}: {} latent frames, log-mel L1 {l1:.3} -> {}",
        args.input.display(),
        r.latent.dim(1)?,
        args.output.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    common::tune_allocator();
    common::exit_with(run(&Args::parse()))
}
