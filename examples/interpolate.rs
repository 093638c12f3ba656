//! Walks a GPT-VAE's latent space between two sounds: both are encoded
//! (audio -> mel VQ-VAE tokens -> the GPT-VAE's posterior mean), the latent
//! is interpolated in `--steps` steps, linearly and spherically, and each
//! point is decoded (GPT-VAE tokens -> mel -> a vocoder or Griffin-Lim).
//! Writes `OUT/<linear|spherical>_<i>_<alpha>.wav` and one PNG strip of the
//! mels (`OUT/strip.png`: the inputs, then every step of each walk).
//!
//! ```text
//! cargo run --release --example interpolate -- --model runs/gpt_vae_tiny_stage2 --vqvae runs/mel_vqvae_tiny \
//!     a.wav b.wav --steps 5 -o interp/ [--temperature 1.0] [--top-k 20] [--seed 0] [--vocoder V]
//! ```
//!
//! The token length of every step is the shorter input's (whole token
//! rows); the endpoints are the inputs' own latents (alpha 0 and 1).

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use melvae::dsp::{
    load_audio_with, save_wav, Audio, ChannelMode, LoadOptions, SpectrogramImage, WavFormat,
};
use melvae::layers::Mode;
use melvae::models::latent::{interpolate, slerp};
use melvae::models::mel_vae::mel_to_array;
use melvae::models::{GptVae, MelVqVae};

#[derive(Parser)]
#[command(about = "Interpolate between two sounds in a GPT-VAE's latent space")]
struct Args {
    /// A `gpt_vae` model file, or a run directory (its best checkpoint).
    #[arg(long)]
    model: PathBuf,
    /// The `mel_vqvae` model file (or run directory) whose tokens it learned.
    #[arg(long)]
    vqvae: PathBuf,
    /// The first sound.
    a: PathBuf,
    /// The second sound.
    b: PathBuf,
    /// Points of each walk, ends included (>= 2).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[command(flatten)]
    sampling: common::TokenSampling,
    /// Output folder.
    #[arg(short, long)]
    out: PathBuf,
}

/// Tokens `[1, rows * cols]` of the sound at `path`.
fn tokens_of(vq: &MelVqVae, path: &Path) -> anyhow::Result<Tensor> {
    let opts = LoadOptions {
        channels: ChannelMode::Mono,
        sample_rate: Some(vq.mel_config().sample_rate),
        quality: Default::default(),
    };
    let audio = load_audio_with(path, &opts)?;
    vq.encode_audio(&audio.mono(), &Device::Cpu)
        .with_context(|| format!("{}", path.display()))
}

fn run() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(a.steps >= 2, "--steps must be at least 2, got {}", a.steps);
    let dev = Device::Cpu;
    let mut vae = GptVae::load(&common::best_model_file(&a.model)?, &dev, DType::F32)?;
    let vq = common::load_mel_vqvae(&a.vqvae)?;
    anyhow::ensure!(
        vq.config().codebook_size == vae.config().vocab_size,
        "{}: the GPT-VAE's vocab_size {} is not the VQ-VAE's codebook_size {}",
        a.model.display(),
        vae.config().vocab_size,
        vq.config().codebook_size
    );
    let (ta, tb) = (tokens_of(&vq, &a.a)?, tokens_of(&vq, &a.b)?);
    let cols = vq.cols();
    let len = ta
        .dim(1)?
        .min(tb.dim(1)?)
        .min(vae.config().max_len / cols * cols);
    let (za, _) = vae.encode(
        &ta.narrow(1, 0, ta.dim(1)?.min(vae.config().max_len))?,
        None,
        Mode::Eval,
    )?;
    let (zb, _) = vae.encode(
        &tb.narrow(1, 0, tb.dim(1)?.min(vae.config().max_len))?,
        None,
        Mode::Eval,
    )?;
    let mel_cfg = *vq.mel_config();
    let to_audio = a.sampling.mel_to_audio(&mel_cfg)?;
    let opts = a.sampling.options();
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let mut mels = vec![
        mel_to_array(&vq.decode(&ta.narrow(1, 0, len)?)?)?,
        mel_to_array(&vq.decode(&tb.narrow(1, 0, len)?)?)?,
    ];
    for walk in ["linear", "spherical"] {
        for i in 0..a.steps {
            let alpha = i as f64 / (a.steps - 1) as f64;
            let z = match walk {
                "linear" => interpolate(&za, &zb, alpha, 0)?,
                _ => slerp(&za, &zb, alpha)?,
            };
            let tokens = vae.generate(&z, len, &opts)?;
            let mel = vq.decode(&tokens)?;
            let samples = mel_cfg.stft.n_samples(mel.dim(2)?);
            let wav = to_audio.audio(&mel, &mel_cfg, samples)?;
            save_wav(
                a.out.join(format!("{walk}_{i}_{alpha:.2}.wav")),
                &Audio::new(mel_cfg.sample_rate, vec![wav])?,
                WavFormat::Pcm16,
            )?;
            mels.push(mel_to_array(&mel)?);
        }
    }
    let refs: Vec<_> = mels.iter().collect();
    SpectrogramImage::for_mel(&mel_cfg).save_png_stack(a.out.join("strip.png"), &refs)?;
    println!(
        "wrote 2 x {} steps of {len} tokens and strip.png (rows: a, b, linear 0..1, spherical 0..1) to {}",
        a.steps,
        a.out.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    common::exit_with(run())
}
