//! Turns an audio folder with one sub-folder per class into token shards
//! with a trained mel VQ-VAE: `OUT/tokens.safetensors` (one example per
//! file: its token grid and class label) and `OUT/classes.json` (the class
//! names, index = label), the data of a class GPT (`data.tokens: OUT`).
//!
//! ```text
//! cargo run --release --example tokenize -- --model vq.safetensors assets/classes -o tokens/classes
//! ```
//!
//! The model is a `mel_vqvae` model file, or a run or checkpoint directory
//! (its latest checkpoint). Files that cannot be read or are shorter than
//! one token row are skipped and listed.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Tokenize a folder of class sub-folders with a mel VQ-VAE")]
struct Args {
    /// A mel_vqvae model file, or a run or checkpoint directory (its latest
    /// checkpoint).
    #[arg(long)]
    model: PathBuf,
    /// The folder: one sub-folder of audio per class.
    dir: PathBuf,
    /// Output folder (tokens.safetensors, classes.json).
    #[arg(short, long)]
    out: PathBuf,
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let model = common::load_mel_vqvae(&args.model)?;
    let s = melvae::train::tokens::tokenize_folder(&model, &args.dir, &args.out)?;
    for (name, n) in s.classes.iter().zip(&s.counts) {
        println!("{name}: {n} clips");
    }
    for (f, why) in &s.skipped {
        println!("skipped {}: {why}", f.display());
    }
    println!(
        "wrote {} ({} examples, rows of {} tokens)",
        s.shard.display(),
        s.counts.iter().sum::<usize>(),
        model.cols()
    );
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    common::exit_with(run())
}
