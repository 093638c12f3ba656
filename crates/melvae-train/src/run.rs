//! Starting, resuming and exporting runs: what the `train` and `export`
//! programs do, as functions.
//!
//! A run directory is never clobbered by accident: a new run refuses a
//! directory that already holds one ([`Start::New`]); [`Start::Overwrite`]
//! deletes what a run writes (and nothing else); [`Start::Resume`] refuses a
//! config that differs from the run's `config.yaml` in anything but the keys
//! of [`RESUMABLE_KEYS`] (run length and logging), naming the differing
//! keys, unless forced.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_yaml::Value;

use crate::checkpoint::{RunDir, TrainState};
use crate::config::ResolvedConfig;
use crate::{Error, Result};

/// How [`open_run`] treats an existing run directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new run: the directory must not hold a run (nor other files).
    New,
    /// Start over: delete the run's files (config, checkpoints, samples,
    /// metrics, TensorBoard events) first.
    Overwrite,
    /// Continue the run from its latest checkpoint; `force` accepts a
    /// config that differs in more than [`RESUMABLE_KEYS`].
    Resume {
        /// Accept any config difference.
        force: bool,
    },
}

/// Config keys (dotted, and everything below them) a resumed run may change:
/// its length and how it logs, nothing that changes its trajectory.
pub const RESUMABLE_KEYS: &[&str] = &[
    "training.steps",
    "training.early_stopping_patience",
    "training.progress",
    "training.log_every",
    "training.ckpt_every",
    "training.keep_last",
    "training.sample_every",
    "training.sample_vocoder",
    "training.sample_vqvae",
    "training.tensorboard",
    // The global batch is the config's: the split over ranks changes only
    // float summation order.
    "training.local_ranks",
    // Only how samples are drawn (their own seed, not the run's stream).
    "cfm.reconstruction_temperature",
];

/// What a run writes into its directory (removed by [`Start::Overwrite`]).
fn run_entries(root: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for entry in fs::read_dir(root).map_err(|e| Error::file(root, e))? {
        let entry = entry.map_err(|e| Error::file(root, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = matches!(
            name.as_str(),
            "config.yaml" | "checkpoints" | "samples" | "metrics.jsonl" | "eval"
        ) || name.starts_with("events.out.tfevents.")
            || name.starts_with(".config.yaml.tmp-")
            || name.starts_with(".metrics.jsonl.tmp-");
        if ours {
            v.push(entry.path());
        }
    }
    Ok(v)
}

/// A run directory has both the config and the checkpoints folder a run
/// writes; a project folder with a `config.yaml` of its own is not one.
fn is_run(root: &Path) -> bool {
    root.join("config.yaml").is_file() && root.join("checkpoints").is_dir()
}

/// The dotted leaf keys where `a` and `b` differ (present in one only, or
/// with different values), sorted.
pub fn config_diff(a: &Value, b: &Value) -> Vec<String> {
    fn walk(a: Option<&Value>, b: Option<&Value>, prefix: &str, out: &mut Vec<String>) {
        match (a, b) {
            (Some(Value::Mapping(x)), Some(Value::Mapping(y))) => {
                let mut keys: Vec<String> = x
                    .keys()
                    .chain(y.keys())
                    .filter_map(|k| k.as_str().map(str::to_string))
                    .collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(x.get(k.as_str()), y.get(k.as_str()), &path, out);
                }
            }
            (x, y) if x == y => {}
            _ => out.push(prefix.to_string()),
        }
    }
    let mut out = Vec::new();
    walk(Some(a), Some(b), "", &mut out);
    out
}

fn resumable(key: &str) -> bool {
    RESUMABLE_KEYS
        .iter()
        .any(|k| key == *k || key.starts_with(&format!("{k}.")))
}

/// Checks, without touching anything, that `root` may be opened for
/// training with `resolved` as `start` says (see [`Start`]): the refusals
/// of [`open_run`], for a program to report before it does slow work.
pub fn check_start(root: &Path, resolved: &ResolvedConfig, start: Start) -> Result<()> {
    let exists = root.exists();
    match start {
        Start::New if exists && is_run(root) => Err(Error::file(
            root,
            "holds a run already: pass --resume to continue it or --overwrite to start over",
        )),
        Start::New | Start::Overwrite if exists && !is_run(root) => {
            let empty = fs::read_dir(root)
                .map_err(|e| Error::file(root, e))?
                .next()
                .is_none();
            if empty {
                Ok(())
            } else {
                Err(Error::file(
                    root,
                    "exists, is not empty and is not a run directory: choose another run directory",
                ))
            }
        }
        Start::Resume { force } => {
            let stored = read_run_config(root)?;
            let diff: Vec<String> = config_diff(&stored.value, &resolved.value)
                .into_iter()
                .filter(|k| !resumable(k))
                .collect();
            if diff.is_empty() || force {
                Ok(())
            } else {
                Err(Error::file(
                    root.join("config.yaml"),
                    format!(
                        "the run was trained with a different config: {} differ (a resumed run \
                         may change only its length and logging: {}); pass --force to resume \
                         anyway, or --overwrite to start over",
                        diff.join(", "),
                        RESUMABLE_KEYS.join(", ")
                    ),
                ))
            }
        }
        _ => Ok(()),
    }
}

/// Opens the run directory `root` for training with `resolved`, as `start`
/// says (see [`Start`]; refusals as [`check_start`]), and writes the config
/// into it. [`Start::Overwrite`] deletes the run's files first. On resume,
/// a `resolved` that differs from the stored `config.yaml` only in
/// [`RESUMABLE_KEYS`] replaces it.
pub fn open_run(root: &Path, resolved: &ResolvedConfig, start: Start) -> Result<RunDir> {
    check_start(root, resolved, start)?;
    if start == Start::Overwrite && is_run(root) {
        for p in run_entries(root)? {
            let r = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.map_err(|e| Error::file(&p, e))?;
        }
    }
    let run = RunDir::create(root)?;
    run.write_config(resolved)?;
    Ok(run)
}

/// The `config.yaml` of the run at `root`.
pub fn read_run_config(root: &Path) -> Result<ResolvedConfig> {
    let p = root.join("config.yaml");
    let text = fs::read_to_string(&p)
        .map_err(|e| Error::file(&p, format!("{e} (is {} a run directory?)", root.display())))?;
    ResolvedConfig::from_yaml(&text, &p.display().to_string())
}

/// Which checkpoint of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Which {
    /// The newest (what `checkpoints/latest` names).
    Latest,
    /// The one with the best validation metric.
    Best,
    /// A checkpoint directory.
    Path(PathBuf),
}

/// Which weights of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// The EMA of the weights when the run kept one, else the raw weights.
    Auto,
    /// The raw (optimised) weights.
    Raw,
}

/// A run's checkpoint resolved from a user's path: a run directory (with
/// [`Which`]) or a checkpoint directory.
#[derive(Debug, Clone)]
pub struct Located {
    /// The run's root.
    pub root: PathBuf,
    /// The checkpoint directory.
    pub checkpoint: PathBuf,
}

/// The run directory holding the checkpoint directory `ckpt`
/// (`RUN/checkpoints/step-N`).
fn run_of_checkpoint(ckpt: &Path) -> Result<PathBuf> {
    let parent = ckpt
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "checkpoints"));
    parent
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            Error::file(
                ckpt,
                "is not a checkpoint inside a run's checkpoints/ folder",
            )
        })
}

/// Finds the checkpoint `which` of the run at `path` (a run directory, or a
/// checkpoint directory inside one, which then must be asked for as
/// [`Which::Latest`], meaning itself). Reads only.
pub fn locate(path: &Path, which: &Which) -> Result<Located> {
    if path.join("state.json").exists() {
        if *which != Which::Latest {
            return Err(Error::file(
                path,
                "is a checkpoint directory: give the run directory to choose a checkpoint",
            ));
        }
        return Ok(Located {
            root: run_of_checkpoint(path)?,
            checkpoint: path.to_path_buf(),
        });
    }
    if !path.join("config.yaml").exists() {
        return Err(Error::file(
            path,
            "is not a run directory (no config.yaml) nor a checkpoint (no state.json)",
        ));
    }
    let run = RunDir::open(path);
    let latest = run
        .latest()?
        .ok_or_else(|| Error::file(path, "has no checkpoint (train first)"))?;
    let checkpoint = match which {
        Which::Latest => latest,
        Which::Path(p) => {
            if !p.join("state.json").exists() {
                return Err(Error::file(p, "is not a checkpoint (no state.json)"));
            }
            let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            };
            if !same(&run_of_checkpoint(p)?, path) {
                return Err(Error::file(
                    p,
                    format!("is not a checkpoint of the run {}", path.display()),
                ));
            }
            p.clone()
        }
        Which::Best => {
            let sp = latest.join("state.json");
            let text = fs::read_to_string(&sp).map_err(|e| Error::file(&sp, e))?;
            let state: TrainState = serde_json::from_str(&text)
                .map_err(|e| Error::file(&sp, format!("not a train state: {e}")))?;
            let (_, name) = state.best.ok_or_else(|| {
                Error::file(path, "has no best checkpoint (the run never validated)")
            })?;
            let d = run.checkpoints().join(name);
            if !d.join("state.json").exists() {
                return Err(Error::file(&d, "the best checkpoint was deleted"));
            }
            d
        }
    };
    Ok(Located {
        root: path.to_path_buf(),
        checkpoint,
    })
}

/// The model weights of a checkpoint directory on the CPU: the EMA
/// (`ema.<name>` in `optimizer.safetensors`) for every variable that has
/// one when `weights` is [`Weights::Auto`], the raw weights otherwise.
/// Returns the tensors and whether any EMA weight was used.
pub fn checkpoint_weights(
    checkpoint: &Path,
    weights: Weights,
) -> Result<(HashMap<String, Tensor>, bool)> {
    let ck = RunDir::load_checkpoint(checkpoint, &Device::Cpu)?;
    let mut used_ema = false;
    let mut model = ck.model;
    if weights == Weights::Auto {
        for (name, t) in model.iter_mut() {
            if let Some(e) = ck.optimizer.get(&format!("ema.{name}")) {
                *t = e.to_dtype(DType::F32)?;
                used_ema = true;
            }
        }
    }
    Ok((model, used_ema))
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The model family.
    pub family: String,
    /// The checkpoint exported.
    pub checkpoint: PathBuf,
    /// `ema` or `raw`.
    pub weights: String,
}

/// Writes a model file (see `melvae_models::model_file`) at `out` from the
/// checkpoint `which` of the run at `run` (or a checkpoint directory), with
/// EMA weights when the run kept an EMA unless `weights` is
/// [`Weights::Raw`]. The family and its config come from the run's
/// `config.yaml`.
pub fn export(run: &Path, which: &Which, weights: Weights, out: &Path) -> Result<Exported> {
    let loc = locate(run, which)?;
    let resolved = read_run_config(&loc.root)?;
    let (tensors, used_ema) = checkpoint_weights(&loc.checkpoint, weights)?;
    let step = checkpoint_step(&loc.checkpoint);
    let kind = if used_ema { "ema" } else { "raw" };
    let meta = BTreeMap::from([
        ("weights".to_string(), kind.to_string()),
        ("step".to_string(), step.to_string()),
        ("source".to_string(), loc.checkpoint.display().to_string()),
    ]);
    let family = crate::tasks::save_model_file(&resolved, &tensors, &meta, out, &loc.checkpoint)?;
    Ok(Exported {
        family: family.to_string(),
        checkpoint: loc.checkpoint,
        weights: kind.into(),
    })
}

fn checkpoint_step(dir: &Path) -> u64 {
    dir.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The name of the model file the trainer writes into each best checkpoint.
pub const CHECKPOINT_MODEL_FILE: &str = "export.safetensors";

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> ResolvedConfig {
        ResolvedConfig::from_yaml(text, "test").unwrap()
    }

    #[test]
    fn diff_names_leaf_keys() {
        let a = cfg("training: {steps: 10, learning_rate: 0.1}\ndata: {dir: a}\n");
        let b = cfg("training: {steps: 20, learning_rate: 0.2, seed: 3}\ndata: {dir: a}\n");
        assert_eq!(
            config_diff(&a.value, &b.value),
            ["training.learning_rate", "training.seed", "training.steps"]
        );
        assert!(config_diff(&a.value, &a.value).is_empty());
    }

    #[test]
    fn checkpoints_are_located_within_their_run() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str| {
            let root = dir.path().join(name);
            open_run(&root, &cfg("training: {steps: 2}\n"), Start::New).unwrap();
            let ck = root.join("checkpoints/step-00000002");
            std::fs::create_dir_all(&ck).unwrap();
            let state = serde_json::to_string(&TrainState {
                step: 2,
                ..Default::default()
            })
            .unwrap();
            std::fs::write(ck.join("state.json"), state).unwrap();
            std::fs::write(root.join("checkpoints/latest"), "step-00000002").unwrap();
            (root, ck)
        };
        let (a, ck_a) = make("a");
        let (_, ck_b) = make("b");
        assert_eq!(locate(&a, &Which::Latest).unwrap().checkpoint, ck_a);
        let l = locate(&ck_a, &Which::Latest).unwrap();
        assert_eq!((l.root, l.checkpoint), (a.clone(), ck_a.clone()));
        let e = locate(&a, &Which::Best).unwrap_err().to_string();
        assert!(e.contains("no best checkpoint"), "{e}");
        let e = locate(&ck_a, &Which::Best).unwrap_err().to_string();
        assert!(e.contains("give the run directory"), "{e}");
        let e = locate(&a, &Which::Path(ck_b.clone()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a checkpoint of the run"), "{e}");
        assert_eq!(
            locate(&a, &Which::Path(ck_a.clone())).unwrap().checkpoint,
            ck_a
        );
    }

    #[test]
    fn runs_are_not_clobbered() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("run");
        let c = cfg("training: {steps: 10, learning_rate: 0.1}\n");
        open_run(&root, &c, Start::New).unwrap();
        std::fs::write(root.join("metrics.jsonl"), "{\"step\": 1}\n").unwrap();
        std::fs::write(root.join("notes.txt"), "mine").unwrap();
        let e = open_run(&root, &c, Start::New).unwrap_err().to_string();
        assert!(e.contains("--resume") && e.contains("--overwrite"), "{e}");

        // Resume: run length may change, anything else is named and refused.
        let longer = cfg("training: {steps: 30, learning_rate: 0.1}\n");
        open_run(&root, &longer, Start::Resume { force: false }).unwrap();
        assert!(read_run_config(&root).unwrap().to_yaml().contains("30"));
        let other = cfg("training: {steps: 30, learning_rate: 0.5}\n");
        let e = open_run(&root, &other, Start::Resume { force: false })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("training.learning_rate") && !e.contains("training.steps differ"),
            "{e}"
        );
        open_run(&root, &other, Start::Resume { force: true }).unwrap();

        // Overwrite deletes the run's files only.
        open_run(&root, &c, Start::Overwrite).unwrap();
        assert!(!root.join("metrics.jsonl").exists());
        assert!(root.join("notes.txt").exists());

        // A directory that is not a run is never deleted into.
        let other_dir = dir.path().join("stuff");
        std::fs::create_dir_all(&other_dir).unwrap();
        std::fs::write(other_dir.join("a.wav"), "x").unwrap();
        for start in [Start::New, Start::Overwrite] {
            let e = open_run(&other_dir, &c, start).unwrap_err().to_string();
            assert!(e.contains("not a run directory"), "{e}");
        }
        assert!(other_dir.join("a.wav").exists());
        // Nor a project folder that happens to have a config.yaml.
        let project = dir.path().join("project");
        std::fs::create_dir_all(project.join("samples")).unwrap();
        std::fs::write(project.join("config.yaml"), "mine: 1\n").unwrap();
        let e = open_run(&project, &c, Start::Overwrite)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a run directory"), "{e}");
        assert!(project.join("config.yaml").exists() && project.join("samples").exists());

        // Resuming what is not a run names it.
        let e = open_run(&dir.path().join("nope"), &c, Start::Resume { force: false })
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope") && e.contains("config.yaml"), "{e}");
    }
}
