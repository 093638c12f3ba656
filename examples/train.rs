//! Trains a model; the family comes from the config's sections (the mel
//! VAE: `convformer:` + `cfm:`; the waveform VAE: `wave_vae:`).
//!
//! ```text
//! cargo run --release --example train -- --config configs/settings/tiny.yaml [key=value ...] [--run-dir DIR]
//! cargo run --release --example train -- --resume runs/tiny [training.steps=800]
//! cargo run --release --example train -- --config configs/settings/tiny.yaml --resume   # the run in runs/tiny, config checked
//! cargo run --release --example train -- --config configs/settings/tiny.yaml --overwrite
//! ```
//!
//! An existing run directory is never reused silently: `--resume` continues
//! it (a config that differs in more than run length and logging is refused
//! unless `--force`), `--overwrite` starts over.
//!
//! Data-parallel (built with `--features mpi`; docs/distributed.md):
//! `mpirun -n 2 target/release/examples/train --config ...` trains one run
//! on 2 ranks, each with its half of every `data.batch_size` batch; rank 0
//! prints and writes. Without MPI, `training.local_ranks=N` runs N ranks as
//! threads of this process.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use melvae::train::dist::{from_env, Communicator};
use melvae::train::run::{check_start, open_run, read_run_config, Start};
use melvae::train::tasks::{check_config, open_data, train, train_on};
use melvae::train::{ResolvedConfig, RunDir};

#[derive(Parser)]
#[command(about = "Train a model (the family comes from the config)")]
struct Args {
    /// Experiment config (configs/settings/*.yaml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue a run: the given directory (its config.yaml is used), or
    /// with --config the config's run directory (the configs must agree).
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    resume: Option<PathBuf>,
    /// Start over in an existing run directory (deletes its checkpoints,
    /// samples, metrics and TensorBoard files).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// With --resume: accept a config that differs from the run's in more
    /// than run length and logging.
    #[arg(long, requires = "resume")]
    force: bool,
    /// Run directory (default: runs/<config name>).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Overrides, e.g. training.learning_rate=2e-4.
    overrides: Vec<String>,
}

/// Trains; `slot` receives the communicator once the config names the
/// device, so that `main` can stop every rank if this one fails.
fn run(args: &Args, slot: &mut Option<Box<dyn Communicator>>) -> melvae::train::Result<()> {
    let resume_dir = args.resume.as_ref().filter(|p| !p.as_os_str().is_empty());
    let (resolved, run_dir) = match (resume_dir, &args.config) {
        (Some(dir), None) => {
            let mut r = read_run_config(dir)?;
            for o in &args.overrides {
                r.override_key(o)?;
            }
            (r, dir.clone())
        }
        (dir, Some(cfg)) => {
            let name = cfg
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into());
            let dir = dir
                .cloned()
                .or_else(|| args.run_dir.clone())
                .unwrap_or_else(|| PathBuf::from("runs").join(name));
            (ResolvedConfig::load(cfg, &args.overrides)?, dir)
        }
        (None, None) => {
            return Err(melvae::train::Error::Invalid {
                what: "arguments".into(),
                reason: "give --config FILE or --resume RUN_DIR".into(),
            })
        }
    };
    let start = match (&args.resume, args.overwrite) {
        (Some(_), _) => Start::Resume { force: args.force },
        (None, true) => Start::Overwrite,
        (None, false) => Start::New,
    };
    check_config(&resolved)?;
    let training: melvae::train::TrainerConfig = resolved.get("training")?;
    let comm: &dyn Communicator = &**slot.insert(from_env(&training.device()?)?);
    let rank0 = comm.rank() == 0;
    if rank0 {
        check_start(&run_dir, &resolved, start)?;
    }
    let (data, description) = open_data(&resolved)?;
    // Rank 0 prepares the run directory; the others wait for it.
    let run = if rank0 {
        println!("{description}");
        if comm.world_size() > 1 {
            println!(
                "data-parallel: {} ranks ({}), each with 1/{} of every batch",
                comm.world_size(),
                comm.backend(),
                comm.world_size()
            );
        }
        let run = open_run(&run_dir, &resolved, start)?;
        comm.barrier()?;
        run
    } else {
        comm.barrier()?;
        RunDir::open(&run_dir)
    };
    let resume = matches!(start, Start::Resume { .. });
    let s = match comm.world_size() {
        // One process: `training.local_ranks` may still split it into
        // in-process ranks.
        1 => train(&resolved, data, &run, resume)?,
        _ => train_on(&resolved, data, &run, resume, comm)?,
    };
    if !rank0 {
        return Ok(());
    }
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
        println!(
            "best validation metric {v:.4} at {name}; its model file: {}",
            run.checkpoints()
                .join(&name)
                .join(melvae::train::run::CHECKPOINT_MODEL_FILE)
                .display()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    let args = Args::parse();
    let mut comm = None;
    let out = run(&args, &mut comm);
    if let (Err(e), Some(comm)) = (&out, &comm) {
        // A rank that fails stops the others (rather than leaving them
        // waiting in a collective).
        if comm.world_size() > 1 {
            comm.abort(&e.to_string());
        }
    }
    common::exit_with(out)
}
