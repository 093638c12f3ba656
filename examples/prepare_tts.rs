//! Turns a folder of audio + transcript pairs into Echolancer's training
//! data with a trained mel VQ-VAE: `OUT/tokens.safetensors` (one example
//! per clip: its token grid, text ids and speaker), `OUT/symbols.json`
//! (the character vocabulary) and `OUT/speakers.json` (speaker names by
//! id). An `echolancer` config names `OUT` as `data.tokens`.
//!
//! ```text
//! cargo run --release --example prepare_tts -- --model runs/mel_vqvae_tts_tiny assets/tts -o runs/tokens_tts
//! cargo run --release --example prepare_tts -- --create-dummy 64 -o runs/tokens_dummy
//! ```
//!
//! The folder holds one sub-folder per speaker (sorted names give the
//! ids), each audio file with its transcript in a `.txt` of the same stem.
//! The vocabulary is the transcripts' character set, or `--symbols FILE`
//! (a `symbols.json`, to tokenize more data for an existing model; other
//! characters are reported). Clips without a transcript, unreadable or
//! shorter than one token row are skipped and listed.
//!
//! The output folder must be new or empty (`--overwrite` replaces the TTS
//! data of an earlier run of this program there, and nothing else).
//!
//! `--create-dummy N` writes `N` random examples instead (the seed's
//! `--create_dummy`: letters for text, random tokens; for trying the
//! pipeline, not for learning), into a folder without a shard.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use melvae::train::tts::{prepare_tts_folder, write_dummy_tts, DummyTts};

#[derive(Parser)]
#[command(about = "Audio + transcripts -> Echolancer token shards with a mel VQ-VAE")]
struct Args {
    /// A mel_vqvae model file, or a run or checkpoint directory (its latest
    /// checkpoint).
    #[arg(long, required_unless_present = "create_dummy")]
    model: Option<PathBuf>,
    /// The folder: one sub-folder per speaker of audio files with `.txt`
    /// transcripts.
    #[arg(required_unless_present = "create_dummy")]
    dir: Option<PathBuf>,
    /// A symbols.json to tokenize the text with (default: the transcripts'
    /// characters).
    #[arg(long)]
    symbols: Option<PathBuf>,
    /// Replace the TTS data already in the output folder (a folder with
    /// anything else in it is still refused).
    #[arg(long)]
    overwrite: bool,
    /// Write this many random examples instead.
    #[arg(long, conflicts_with_all = ["model", "dir", "symbols"])]
    create_dummy: Option<usize>,
    /// With --create-dummy: speakers, token vocabulary, tokens per row,
    /// emotion size, seed.
    #[arg(long, default_value_t = 2)]
    speakers: usize,
    #[arg(long, default_value_t = 64)]
    mel_vocab_size: usize,
    #[arg(long, default_value_t = 5)]
    cols: usize,
    #[arg(long, default_value_t = 0)]
    emotion_channels: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder.
    #[arg(short, long)]
    out: PathBuf,
}

fn run() -> anyhow::Result<()> {
    let a = Args::parse();
    if let Some(n) = a.create_dummy {
        let shard = write_dummy_tts(
            &a.out,
            &DummyTts {
                examples: n,
                speakers: a.speakers,
                mel_vocab_size: a.mel_vocab_size,
                cols: a.cols,
                emotion_channels: a.emotion_channels,
                seed: a.seed,
            },
        )?;
        println!("wrote {} ({n} random examples)", shard.display());
        return Ok(());
    }
    let (Some(model), Some(dir)) = (&a.model, &a.dir) else {
        anyhow::bail!("give --model and the folder, or --create-dummy N");
    };
    let vq = common::load_mel_vqvae(model)?;
    let symbols: Option<Vec<String>> = match &a.symbols {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("--symbols {}", p.display()))?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("--symbols {}: not a JSON list", p.display()))?,
            )
        }
        None => None,
    };
    let s = prepare_tts_folder(&vq, dir, &a.out, symbols.as_deref(), a.overwrite)?;
    for (name, n) in s.speakers.iter().zip(&s.counts) {
        println!("{name}: {n} clips");
    }
    for (f, why) in &s.skipped {
        println!("skipped {}: {why}", f.display());
    }
    if !s.unknown.is_empty() {
        let list: Vec<String> = s
            .unknown
            .iter()
            .map(|(c, n)| format!("{c:?} x{n}"))
            .collect();
        println!(
            "characters outside the vocabulary (unknown id): {}",
            list.join(", ")
        );
    }
    println!(
        "wrote {} ({} examples, rows of {} tokens, {} symbols: {:?})",
        s.shard.display(),
        s.counts.iter().sum::<usize>(),
        vq.cols(),
        s.symbols.len(),
        s.symbols.concat()
    );
    Ok(())
}

fn main() -> ExitCode {
    common::exit_with(run())
}
