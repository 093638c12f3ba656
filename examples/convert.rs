//! Converts a checkpoint of the `vocos` package (its `config.yaml` and
//! `pytorch_model.bin` or safetensors weights, as published on the Hugging
//! Face hub, e.g. `charactr/vocos-mel-24khz`) into a melvae model file that
//! `melvae-models` alone loads (`Vocos::load`).
//!
//! ```text
//! cargo run --release --example convert -- path/to/vocos-mel-24khz -o vocos-24k.safetensors
//! cargo run --release --example convert -- --config config.yaml --weights pytorch_model.bin -o vocos.safetensors
//! ```
//!
//! A directory is searched for `config.yaml` and `pytorch_model.bin` (or
//! `model.safetensors`). The weights are checked by building the model
//! (missing or mis-shaped parameters are named) and decoding a short
//! silent mel before the file is written (atomically).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use melvae::models::{model_file, vocoder::read_state_dict, Vocos};

#[derive(Parser)]
#[command(about = "Convert a vocos package checkpoint into a melvae model file")]
struct Args {
    /// A directory holding config.yaml and pytorch_model.bin (or
    /// model.safetensors).
    #[arg(required_unless_present_all = ["config", "weights"], conflicts_with_all = ["config", "weights"])]
    source: Option<PathBuf>,
    /// The package's config.yaml.
    #[arg(long, requires = "weights")]
    config: Option<PathBuf>,
    /// The weights: pytorch_model.bin or a safetensors state_dict.
    #[arg(long, requires = "config")]
    weights: Option<PathBuf>,
    /// The model file to write.
    #[arg(short, long)]
    output: PathBuf,
}

/// `config.yaml` and the weights file in `dir`.
fn find(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let config = dir.join("config.yaml");
    anyhow::ensure!(
        config.is_file(),
        "{}: no config.yaml in this directory",
        dir.display()
    );
    let weights = ["pytorch_model.bin", "model.safetensors"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no pytorch_model.bin or model.safetensors in this directory",
                dir.display()
            )
        })?;
    Ok((config, weights))
}

fn run(args: &Args) -> anyhow::Result<()> {
    let (config, weights) = match (&args.source, &args.config, &args.weights) {
        (Some(dir), _, _) => find(dir)?,
        (None, Some(c), Some(w)) => (c.clone(), w.clone()),
        _ => anyhow::bail!("give a directory, or --config and --weights"),
    };
    let vocos = Vocos::from_pretrained(&config, &weights, &Device::Cpu, DType::F32)?;
    let cfg = vocos.config().clone();
    // One decode as a smoke check of the weights (finite output).
    let mel = Tensor::full(-5f32, (1, cfg.n_mels, 8), &Device::Cpu)?;
    let cond = cfg.adanorm_num_embeddings.map(|_| 0);
    let y = vocos.decode(&mel, cond)?;
    let peak = y.abs()?.max_all()?.to_scalar::<f32>()?;
    anyhow::ensure!(
        peak.is_finite(),
        "{}: decoding a test mel gave non-finite audio",
        weights.display()
    );
    let tensors = read_state_dict(&weights)?;
    let metadata = BTreeMap::from([
        ("source".to_string(), weights.display().to_string()),
        ("source_format".to_string(), "vocos".to_string()),
    ]);
    model_file::save::<Vocos>(&args.output, &cfg, &tensors, &metadata, &weights)?;
    println!(
        "{}: Vocos, {} Hz, {} mels, n_fft {}, hop {}, padding {:?}, dim {} x {} layers{}",
        args.output.display(),
        cfg.sample_rate,
        cfg.n_mels,
        cfg.n_fft,
        cfg.hop_length,
        cfg.padding,
        cfg.dim,
        cfg.num_layers,
        cfg.adanorm_num_embeddings
            .map_or(String::new(), |n| format!(
                ", AdaLayerNorm over {n} conditions"
            ))
    );
    Ok(())
}

fn main() -> ExitCode {
    common::exit_with(run(&Args::parse()))
}
