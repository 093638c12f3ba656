//! Log-mel spectrogram of an audio file, as `.npy` and optionally PNG.
//!
//! ```text
//! cargo run --release --example mel -- IN [--preset vocos-24k] -o OUT.npy [--png OUT.png]
//! ```
//!
//! The audio is mixed to mono and resampled to the preset's rate. The `.npy`
//! holds float32 `[n_mels, frames]`.

use std::path::PathBuf;
use std::process::ExitCode;

mod common;

use clap::Parser;
use melvae::dsp::{write_npy, MelConfig, MelExtractor, SpectrogramImage};

#[derive(Parser)]
#[command(about = "Write the log-mel spectrogram of an audio file as .npy (and PNG)")]
struct Args {
    /// Input audio (WAV, FLAC, MP3, OGG/Vorbis, AAC/M4A).
    input: PathBuf,
    /// Mel preset: vocos-24k or hifigan-22k.
    #[arg(long, default_value = "vocos-24k")]
    preset: String,
    /// Output .npy file, float32 [n_mels, frames].
    #[arg(short, long)]
    output: PathBuf,
    /// Also write a picture of the spectrogram here.
    #[arg(long)]
    png: Option<PathBuf>,
}

fn run(args: &Args) -> melvae::dsp::Result<()> {
    let cfg = MelConfig::preset(&args.preset)?;
    let audio = common::load_for_mel(&args.input, &cfg)?;
    let mel = MelExtractor::new(cfg)?.extract(&audio.channels[0])?;
    write_npy(&args.output, &mel)?;
    if let Some(png) = &args.png {
        SpectrogramImage::for_mel(&cfg).save_png(png, &mel)?;
    }
    println!(
        "{}: {:.2} s -> {} [{} mels x {} frames]",
        args.input.display(),
        audio.duration_secs(),
        args.output.display(),
        mel.nrows(),
        mel.ncols()
    );
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    common::exit_with(run(&Args::parse()))
}
