//! Trains a mel VAE.
//!
//! ```text
//! cargo run --release --example train -- --config configs/settings/tiny.yaml [key=value ...] [--run-dir DIR]
//! cargo run --release --example train -- --resume runs/tiny [key=value ...]
//! ```

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use melvae::train::tasks::mel_vae::{mel_vae_config, MelVaeTask};
use melvae::train::{AudioDataConfig, AudioFolder, ResolvedConfig, RunDir, Trainer, TrainerConfig};

#[derive(Parser)]
#[command(about = "Train a mel VAE (causal Convformer + DiT flow matching)")]
struct Args {
    /// Experiment config (configs/settings/*.yaml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Resume the run in this directory (its config.yaml is used).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Run directory (default: runs/<config name>).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Overrides, e.g. training.learning_rate=2e-4.
    overrides: Vec<String>,
}

fn run(args: &Args) -> melvae::train::Result<()> {
    let (resolved, run_dir, resume) = match (&args.resume, &args.config) {
        (Some(dir), _) => {
            let p = dir.join("config.yaml");
            let text = std::fs::read_to_string(&p).map_err(|e| melvae::train::Error::File {
                path: p.clone(),
                reason: e.to_string(),
            })?;
            let mut r = ResolvedConfig::from_yaml(&text, &p.display().to_string())?;
            for o in &args.overrides {
                r.override_key(o)?;
            }
            (r, dir.clone(), true)
        }
        (None, Some(cfg)) => {
            let name = cfg
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into());
            let dir = args
                .run_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs").join(name));
            (ResolvedConfig::load(cfg, &args.overrides)?, dir, false)
        }
        (None, None) => {
            return Err(melvae::train::Error::Invalid {
                what: "arguments".into(),
                reason: "give --config FILE or --resume RUN_DIR".into(),
            })
        }
    };
    let training: TrainerConfig = resolved.get("training")?;
    let data_cfg: AudioDataConfig = resolved.get("data")?;
    let model_cfg = mel_vae_config(&resolved)?;
    let run = RunDir::create(&run_dir)?;
    run.write_config(&resolved)?;
    let data = AudioFolder::open(&data_cfg)?;
    println!(
        "{}: {} training and {} validation clips",
        data_cfg.dir.display(),
        data.train.len(),
        data.val.len()
    );
    if !data.skipped.is_empty() {
        print!("{}", data.skipped);
    }
    let mut task = MelVaeTask::new(
        model_cfg,
        data,
        data_cfg,
        training.seed,
        &training.device()?,
        training.dtype()?,
    )?;
    let s = Trainer::new(training, &run)?.fit(&mut task, resume)?;
    println!(
        "{}: {} steps ({} skipped){}",
        run.root().display(),
        s.steps,
        s.skipped,
        if s.early_stopped {
            ", stopped early"
        } else {
            ""
        }
    );
    if let Some((v, name)) = s.best {
        println!("best validation loss {v:.4} at {name}");
    }
    Ok(())
}

fn main() -> ExitCode {
    common::tune_allocator();
    common::exit_with(run(&Args::parse()))
}
