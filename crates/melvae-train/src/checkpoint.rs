//! Run directories, atomic checkpoints and the metrics log.
//!
//! ```text
//! runs/NAME/config.yaml                 fully resolved config
//! runs/NAME/checkpoints/step-00001000/  model.safetensors, optimizer.safetensors, state.json
//! runs/NAME/checkpoints/latest          name of the newest complete checkpoint
//! runs/NAME/metrics.jsonl               one JSON object per logged step
//! runs/NAME/samples/                    artefacts written by the task
//! ```
//!
//! A checkpoint is written into a temporary directory, each file fsynced,
//! the directory renamed into place, and only then `latest` replaced
//! (atomically): a process killed at any point leaves the previous
//! checkpoint complete and `latest` pointing at it.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Updates completed.
    pub step: u64,
    /// Optimiser steps taken (generator's, in GAN mode).
    pub optimizer_steps: u64,
    /// State of the run's random generator (`SplitMix64::state`).
    pub rng_state: u64,
    /// Best validation loss so far and the checkpoint that has it.
    pub best: Option<(f64, String)>,
    /// Validations without improvement (early stopping).
    pub stale_validations: u32,
    /// Task-specific state (e.g. data order position).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// The tensors and state of one checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// Model parameters by name.
    pub model: HashMap<String, Tensor>,
    /// Optimiser state by name (for GAN runs: both optimisers, prefixed).
    pub optimizer: HashMap<String, Tensor>,
    /// The rest.
    pub state: TrainState,
}

/// Failure injection for tests: where [`RunDir::save_checkpoint`] stops.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    /// Never fail.
    None,
    /// After the files are written, before the directory is renamed.
    BeforeRename,
    /// After the rename, before `latest` is updated.
    BeforeLatest,
}

/// A training run's directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::file(path, e)
}

fn fsync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The train state (`state.json`) of the checkpoint directory `dir`.
pub fn read_state(dir: &Path) -> Result<TrainState> {
    let sp = dir.join("state.json");
    let text = fs::read_to_string(&sp).map_err(|e| io(&sp, e))?;
    serde_json::from_str(&text).map_err(|e| io(&sp, format!("not a train state: {e}")))
}

/// `step-00001000`.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

impl RunDir {
    /// Opens (creating if needed) the run directory `root`.
    pub fn create(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for d in [root.join("checkpoints"), root.join("samples")] {
            fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
        }
        Ok(Self { root })
    }

    /// The run directory `root` as it is, creating nothing (for reading a
    /// finished run).
    pub fn open(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The run's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `checkpoints/`.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// `samples/`.
    pub fn samples(&self) -> PathBuf {
        self.root.join("samples")
    }

    /// `metrics.jsonl`.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// `config.yaml`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.yaml")
    }

    /// Writes the fully resolved config to `config.yaml` (atomically).
    pub fn write_config(&self, cfg: &crate::ResolvedConfig) -> Result<()> {
        cfg.save(&self.config_path())
    }

    /// Writes a checkpoint for `ckpt.state.step` and points `latest` at it.
    pub fn save_checkpoint(&self, ckpt: &Checkpoint) -> Result<PathBuf> {
        self.save_checkpoint_with(ckpt, FailPoint::None)
    }

    #[doc(hidden)]
    pub fn save_checkpoint_with(&self, ckpt: &Checkpoint, fail: FailPoint) -> Result<PathBuf> {
        let name = checkpoint_name(ckpt.state.step);
        let dir = self.checkpoints();
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        let write_tensors = |file: &str, map: &HashMap<String, Tensor>| -> Result<()> {
            let p = tmp.join(file);
            candle_core::safetensors::save(map, &p)?;
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| io(&p, e))
        };
        write_tensors("model.safetensors", &ckpt.model)?;
        write_tensors("optimizer.safetensors", &ckpt.optimizer)?;
        let state = serde_json::to_string_pretty(&ckpt.state)
            .map_err(|e| Error::invalid("train state", e.to_string()))?;
        melvae_dsp::atomic_write(&tmp.join("state.json"), |w| w.write_all(state.as_bytes()))?;
        fsync_dir(&tmp);
        if fail == FailPoint::BeforeRename {
            return Err(Error::invalid(
                "checkpoint",
                "injected failure before rename",
            ));
        }
        let final_dir = dir.join(&name);
        if final_dir.exists() {
            fs::remove_dir_all(&final_dir).map_err(|e| io(&final_dir, e))?;
        }
        fs::rename(&tmp, &final_dir).map_err(|e| io(&final_dir, e))?;
        fsync_dir(&dir);
        if fail == FailPoint::BeforeLatest {
            return Err(Error::invalid(
                "checkpoint",
                "injected failure before latest",
            ));
        }
        melvae_dsp::atomic_write(&dir.join("latest"), |w| w.write_all(name.as_bytes()))?;
        Ok(final_dir)
    }

    /// The newest complete checkpoint (what `latest` names), if any.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        let p = self.checkpoints().join("latest");
        match fs::read_to_string(&p) {
            Ok(name) => {
                let d = self.checkpoints().join(name.trim());
                if !d.join("state.json").exists() {
                    return Err(io(
                        &p,
                        format!("names {} which is not a complete checkpoint", d.display()),
                    ));
                }
                Ok(Some(d))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p, e)),
        }
    }

    /// Loads a checkpoint directory onto `device`.
    pub fn load_checkpoint(dir: &Path, device: &Device) -> Result<Checkpoint> {
        let load = |f: &str| -> Result<HashMap<String, Tensor>> {
            let p = dir.join(f);
            candle_core::safetensors::load(&p, device).map_err(|e| io(&p, e))
        };
        Ok(Checkpoint {
            model: load("model.safetensors")?,
            optimizer: load("optimizer.safetensors")?,
            state: read_state(dir)?,
        })
    }

    /// Deletes checkpoints except the newest `keep_last` and `keep` (the
    /// best one), and leftovers of interrupted saves.
    pub fn prune(&self, keep_last: usize, keep: Option<&str>) -> Result<()> {
        let dir = self.checkpoints();
        let mut steps: Vec<String> = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
            let name = entry
                .map_err(|e| io(&dir, e))?
                .file_name()
                .to_string_lossy()
                .into_owned();
            if name.starts_with(".step-") && name.contains(".tmp-") {
                let _ = fs::remove_dir_all(dir.join(&name));
            } else if name.starts_with("step-") {
                steps.push(name);
            }
        }
        steps.sort();
        let latest = self
            .latest()?
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        let cut = steps.len().saturating_sub(keep_last);
        for name in &steps[..cut] {
            if Some(name.as_str()) != keep && Some(name) != latest.as_ref() {
                fs::remove_dir_all(dir.join(name)).map_err(|e| io(&dir.join(name), e))?;
            }
        }
        Ok(())
    }

    /// Appends one JSON object as a line of `metrics.jsonl` (flushed).
    pub fn log_metrics(&self, record: &serde_json::Value) -> Result<()> {
        let p = self.metrics_path();
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| io(&p, e))?;
        writeln!(f, "{record}").map_err(|e| io(&p, e))?;
        f.flush().map_err(|e| io(&p, e))
    }

    /// Drops metric lines with `"step"` above `step` (logged after the
    /// checkpoint a run resumes from), atomically.
    pub fn truncate_metrics_after(&self, step: u64) -> Result<()> {
        let p = self.metrics_path();
        let text = match fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(&p, e)),
        };
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= step)
            })
            .collect();
        melvae_dsp::atomic_write(&p, |w| {
            for l in &kept {
                writeln!(w, "{l}")?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Draws the logged `keys` (e.g. `total`, `val/total`) against the step
    /// into `samples/loss_curves.png` (log y axis); keys never logged are
    /// left out. Returns the image path, or `None` when nothing is logged yet.
    pub fn plot_losses(&self, keys: &[&str]) -> Result<Option<PathBuf>> {
        if !self.metrics_path().exists() {
            return Ok(None);
        }
        let records = self.read_metrics()?;
        let series: Vec<melvae_dsp::Series> = keys
            .iter()
            .map(|k| melvae_dsp::Series {
                name: k.to_string(),
                points: records
                    .iter()
                    .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(*k)?.as_f64()?)))
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        if series.is_empty() {
            return Ok(None);
        }
        let p = self.samples().join("loss_curves.png");
        match melvae_dsp::line_plot_png(&p, &series, true) {
            Ok(()) => Ok(Some(p)),
            // Only non-positive or non-finite values: nothing to draw on a log axis.
            Err(melvae_dsp::Error::Invalid { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every record of `metrics.jsonl`.
    pub fn read_metrics(&self) -> Result<Vec<serde_json::Value>> {
        let p = self.metrics_path();
        let text = fs::read_to_string(&p).map_err(|e| io(&p, e))?;
        text.lines()
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| io(&p, format!("line {}: {e}", i + 1)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ckpt(step: u64, value: f32) -> Checkpoint {
        let t = Tensor::new(&[value, value + 1.0], &Device::Cpu).unwrap();
        Checkpoint {
            model: HashMap::from([("w".to_string(), t.clone())]),
            optimizer: HashMap::from([("m.w".to_string(), t)]),
            state: TrainState {
                step,
                rng_state: 42 + step,
                ..Default::default()
            },
        }
    }

    fn w(c: &Checkpoint) -> Vec<f32> {
        c.model["w"].to_vec1().unwrap()
    }

    #[test]
    fn save_load_latest_and_prune() {
        let d = tempfile::tempdir().unwrap();
        let run = RunDir::create(d.path().join("run")).unwrap();
        assert!(run.latest().unwrap().is_none());
        for s in [10, 20, 30, 40] {
            run.save_checkpoint(&ckpt(s, s as f32)).unwrap();
        }
        let latest = run.latest().unwrap().unwrap();
        assert!(latest.ends_with("step-00000040"));
        let c = RunDir::load_checkpoint(&latest, &Device::Cpu).unwrap();
        assert_eq!(
            (w(&c), c.state.step, c.state.rng_state),
            (vec![40.0, 41.0], 40, 82)
        );
        run.prune(2, Some("step-00000010")).unwrap();
        let mut names: Vec<String> = fs::read_dir(run.checkpoints())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec!["latest", "step-00000010", "step-00000030", "step-00000040"]
        );
    }

    #[test]
    fn a_failed_save_leaves_the_previous_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        let run = RunDir::create(d.path()).unwrap();
        run.save_checkpoint(&ckpt(100, 1.0)).unwrap();
        for fail in [FailPoint::BeforeRename, FailPoint::BeforeLatest] {
            assert!(run.save_checkpoint_with(&ckpt(200, 2.0), fail).is_err());
            let latest = run.latest().unwrap().unwrap();
            assert!(
                latest.ends_with("step-00000100"),
                "{fail:?}: {}",
                latest.display()
            );
            let c = RunDir::load_checkpoint(&latest, &Device::Cpu).unwrap();
            assert_eq!(w(&c), vec![1.0, 2.0]);
        }
        // The leftover temp dir is cleaned by the next prune; a new save works.
        run.prune(10, None).unwrap();
        assert!(!fs::read_dir(run.checkpoints()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp-")));
        run.save_checkpoint(&ckpt(300, 3.0)).unwrap();
        assert!(run.latest().unwrap().unwrap().ends_with("step-00000300"));
    }

    #[test]
    fn corrupt_state_and_dangling_latest_are_named() {
        let d = tempfile::tempdir().unwrap();
        let run = RunDir::create(d.path()).unwrap();
        let p = run.save_checkpoint(&ckpt(5, 0.0)).unwrap();
        fs::write(p.join("state.json"), "{ not json").unwrap();
        let e = RunDir::load_checkpoint(&p, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("state.json") && e.contains("not a train state"),
            "{e}"
        );
        fs::write(run.checkpoints().join("latest"), "step-99999999").unwrap();
        let e = run.latest().unwrap_err().to_string();
        assert!(
            e.contains("latest") && e.contains("not a complete checkpoint"),
            "{e}"
        );
        fs::write(p.join("model.safetensors"), b"garbage").unwrap();
        fs::write(run.checkpoints().join("latest"), "step-00000005").unwrap();
        fs::write(
            p.join("state.json"),
            serde_json::to_string(&TrainState::default()).unwrap(),
        )
        .unwrap();
        let e = RunDir::load_checkpoint(&p, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.safetensors"), "{e}");
    }

    #[test]
    fn resolved_config_is_written_into_the_run() {
        let d = tempfile::tempdir().unwrap();
        let run = RunDir::create(d.path()).unwrap();
        let cfg = crate::ResolvedConfig::from_yaml("training:\n  steps: 5\n", "exp.yaml").unwrap();
        run.write_config(&cfg).unwrap();
        let back = crate::ResolvedConfig::from_yaml(
            &fs::read_to_string(run.config_path()).unwrap(),
            "run",
        )
        .unwrap();
        assert_eq!(back.value, cfg.value);
    }

    #[test]
    fn metrics_log_and_truncate() {
        let d = tempfile::tempdir().unwrap();
        let run = RunDir::create(d.path()).unwrap();
        for s in 1..=5u64 {
            run.log_metrics(&serde_json::json!({"step": s, "loss": 1.0 / s as f64}))
                .unwrap();
        }
        run.truncate_metrics_after(3).unwrap();
        let m = run.read_metrics().unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[2]["step"], 3);
    }
}
