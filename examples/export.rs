//! Turns a training run into a model file that `melvae-models` alone loads
//! (`MelVae::load`): safetensors with the family, its config and the melvae
//! version in the metadata.
//!
//! ```text
//! cargo run --release --example export -- --run runs/tiny -o tiny.safetensors [--checkpoint latest|best|DIR] [--raw]
//! ```
//!
//! EMA weights when the run kept an EMA, unless `--raw`.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use melvae::models::model_file;
use melvae::train::run::{export, Weights, Which};

#[derive(Parser)]
#[command(about = "Export a training run's weights as a model file")]
struct Args {
    /// Run directory (or a checkpoint directory inside one).
    #[arg(long)]
    run: PathBuf,
    /// `latest`, `best` or a checkpoint directory.
    #[arg(long, default_value = "latest")]
    checkpoint: String,
    /// The raw weights even when the run kept an EMA.
    #[arg(long)]
    raw: bool,
    /// The model file to write.
    #[arg(short, long)]
    output: PathBuf,
}

fn run(args: &Args) -> anyhow::Result<()> {
    let which = match args.checkpoint.as_str() {
        "latest" => Which::Latest,
        "best" => Which::Best,
        dir => Which::Path(PathBuf::from(dir)),
    };
    let weights = if args.raw {
        Weights::Raw
    } else {
        Weights::Auto
    };
    let e = export(&args.run, &which, weights, &args.output)?;
    let info = model_file::read_info(&args.output)?;
    println!(
        "{}: {} model, {} weights of {} (melvae {})",
        args.output.display(),
        e.family,
        e.weights,
        e.checkpoint.display(),
        info.melvae_version
    );
    Ok(())
}

fn main() -> ExitCode {
    common::exit_with(run(&Args::parse()))
}
