//! Resynthesise an audio file through its log-mel and Griffin-Lim, to hear
//! what a mel model's output sounds like without a neural vocoder.
//!
//! ```text
//! cargo run --release --example griffin_lim -- IN -o OUT.wav [--preset vocos-24k] [--iters 32]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

mod common;

use clap::{Parser, ValueEnum};
use melvae::dsp::{
    mel_to_audio, save_wav, Audio, GriffinLimConfig, MelConfig, MelExtractor, MelInversion,
    WavFormat,
};

#[derive(Clone, Copy, ValueEnum)]
enum Inversion {
    /// Non-negative least squares (best).
    Nnls,
    /// Clipped pseudo-inverse (fast).
    Pinv,
}

#[derive(Parser)]
#[command(about = "Audio -> log-mel -> Griffin-Lim -> WAV")]
struct Args {
    /// Input audio (WAV, FLAC, MP3, OGG/Vorbis, AAC/M4A).
    input: PathBuf,
    /// Output WAV (16-bit PCM at the preset's rate).
    #[arg(short, long)]
    output: PathBuf,
    /// Mel preset: vocos-24k or hifigan-22k.
    #[arg(long, default_value = "vocos-24k")]
    preset: String,
    /// Griffin-Lim iterations.
    #[arg(long, default_value_t = 32)]
    iters: usize,
    /// Mel inversion method.
    #[arg(long, value_enum, default_value = "nnls")]
    inversion: Inversion,
}

fn run(args: &Args) -> melvae::dsp::Result<()> {
    let cfg = MelConfig::preset(&args.preset)?;
    let audio = common::load_for_mel(&args.input, &cfg)?;
    let extractor = MelExtractor::new(cfg)?;
    let mel = extractor.extract(&audio.channels[0])?;
    let inversion = match args.inversion {
        Inversion::Nnls => MelInversion::default(),
        Inversion::Pinv => MelInversion::PseudoInverse,
    };
    let gl = GriffinLimConfig {
        n_iter: args.iters,
        ..Default::default()
    };
    let y = mel_to_audio(&extractor, &mel, Some(audio.n_samples()), inversion, &gl)?;
    save_wav(
        &args.output,
        &Audio::new(cfg.sample_rate, vec![y])?,
        WavFormat::Pcm16,
    )?;
    println!(
        "{}: {:.2} s -> {} mels x {} frames -> {}",
        args.input.display(),
        audio.duration_secs(),
        mel.nrows(),
        mel.ncols(),
        args.output.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    common::exit_with(run(&Args::parse()))
}
