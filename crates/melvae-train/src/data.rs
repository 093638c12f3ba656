//! Datasets: a folder of audio files with random fixed-length crops.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use melvae_dsp::{load_audio_with, Audio, ChannelMode, LoadOptions, SplitMix64, AUDIO_EXTENSIONS};
use serde::{Deserialize, Serialize};

use crate::config::{check, Validate};
use crate::{Error, Result};

/// The `data:` section for audio datasets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudioDataConfig {
    /// Folder searched recursively for audio files.
    pub dir: PathBuf,
    /// Rate everything is resampled to.
    pub sample_rate: u32,
    /// 1 (mixed to mono) or 2 (stereo; mono files duplicated).
    #[serde(default = "one")]
    pub channels: usize,
    /// Length of a training crop, seconds.
    pub crop_seconds: f64,
    /// Fraction of files held out for validation (by a stable hash of the
    /// path relative to `dir`, so adding files does not reshuffle the split).
    #[serde(default = "five_percent")]
    pub val_fraction: f64,
}

fn one() -> usize {
    1
}
fn five_percent() -> f64 {
    0.05
}

impl Validate for AudioDataConfig {
    fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        check(self.sample_rate > 0, "sample_rate", || "must be > 0".into())?;
        check(self.channels == 1 || self.channels == 2, "channels", || {
            format!("must be 1 or 2, got {}", self.channels)
        })?;
        check(
            self.crop_seconds > 0.0 && self.crop_seconds.is_finite(),
            "crop_seconds",
            || format!("must be > 0, got {}", self.crop_seconds),
        )?;
        check(
            (0.0..1.0).contains(&self.val_fraction),
            "val_fraction",
            || format!("must be in [0, 1), got {}", self.val_fraction),
        )
    }
}

impl AudioDataConfig {
    /// Samples per crop.
    pub fn crop_samples(&self) -> usize {
        (self.crop_seconds * self.sample_rate as f64).round() as usize
    }
}

/// Every file under `dir` (recursively) whose extension `load_audio`
/// handles, sorted by path.
pub fn discover_audio(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(d)? {
            let p = entry?.path();
            if p.is_dir() {
                walk(&p, out)?;
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| AUDIO_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, &mut out).map_err(|e| Error::file(dir, e))?;
    out.sort();
    Ok(out)
}

/// FNV-1a of the path relative to the dataset root: a split that does not
/// depend on the set of other files.
fn stable_fraction(rel: &Path) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in rel.to_string_lossy().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % 1_000_000) as f64 / 1_000_000.0
}

/// Files left out of a dataset and why, reported once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SkipReport {
    /// Files that failed to decode, with the error.
    pub unreadable: Vec<(PathBuf, String)>,
    /// Files shorter than one crop, with their length in seconds.
    pub too_short: Vec<(PathBuf, f64)>,
}

impl SkipReport {
    /// True when nothing was skipped.
    pub fn is_empty(&self) -> bool {
        self.unreadable.is_empty() && self.too_short.is_empty()
    }
}

impl std::fmt::Display for SkipReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "skipped {} unreadable and {} too-short files",
            self.unreadable.len(),
            self.too_short.len()
        )?;
        for (p, e) in &self.unreadable {
            writeln!(f, "  unreadable: {}: {e}", p.display())?;
        }
        for (p, s) in &self.too_short {
            writeln!(f, "  too short ({s:.2} s): {}", p.display())?;
        }
        Ok(())
    }
}

/// Decoded audio of one split, cropped at random.
#[derive(Debug, Clone)]
pub struct AudioSet {
    clips: Vec<(PathBuf, Audio)>,
    crop: usize,
    channels: usize,
}

/// A folder of audio: the training and validation sets and what was skipped.
#[derive(Debug, Clone)]
pub struct AudioFolder {
    /// Training clips.
    pub train: AudioSet,
    /// Validation clips.
    pub val: AudioSet,
    /// Files left out.
    pub skipped: SkipReport,
}

impl AudioFolder {
    /// Discovers, decodes (resampling and converting channels) and splits
    /// `cfg.dir`. Unreadable and too-short files are skipped and listed in
    /// [`AudioFolder::skipped`]; a folder with no usable file is an error
    /// naming it.
    pub fn load(cfg: &AudioDataConfig) -> Result<Self> {
        cfg.validate().map_err(|(k, r)| Error::Config {
            origin: "data config".into(),
            key: format!("data.{k}"),
            reason: r,
        })?;
        if !cfg.dir.is_dir() {
            return Err(Error::file(&cfg.dir, "is not a directory"));
        }
        let files = discover_audio(&cfg.dir)?;
        let crop = cfg.crop_samples();
        let opts = LoadOptions {
            channels: if cfg.channels == 1 {
                ChannelMode::Mono
            } else {
                ChannelMode::Stereo
            },
            sample_rate: Some(cfg.sample_rate),
            ..Default::default()
        };
        let mut skipped = SkipReport::default();
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for path in files {
            match load_audio_with(&path, &opts) {
                Err(e) => skipped.unreadable.push((path, e.to_string())),
                Ok(a) if a.n_samples() < crop => skipped.too_short.push((path, a.duration_secs())),
                Ok(a) => {
                    let rel = path.strip_prefix(&cfg.dir).unwrap_or(&path).to_path_buf();
                    if stable_fraction(&rel) < cfg.val_fraction {
                        val.push((path, a));
                    } else {
                        train.push((path, a));
                    }
                }
            }
        }
        if train.is_empty() {
            return Err(Error::file(
                &cfg.dir,
                format!(
                    "has no usable training audio ({} found, {skipped})",
                    val.len()
                ),
            ));
        }
        let set = |clips| AudioSet {
            clips,
            crop,
            channels: cfg.channels,
        };
        Ok(Self {
            train: set(train),
            val: set(val),
            skipped,
        })
    }
}

impl AudioSet {
    /// Number of clips.
    pub fn len(&self) -> usize {
        self.clips.len()
    }

    /// True without clips.
    pub fn is_empty(&self) -> bool {
        self.clips.is_empty()
    }

    /// The clips' paths.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.clips.iter().map(|(p, _)| p.as_path())
    }

    /// The order of epoch `epoch`: a Fisher-Yates shuffle seeded by
    /// `(seed, epoch)`, so a resumed run needs only the epoch and position.
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let mut rng = SplitMix64::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut order: Vec<usize> = (0..self.clips.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        order
    }

    /// A crop of clip `index` starting at a uniformly random offset:
    /// `[channels, crop]`.
    pub fn crop(&self, index: usize, rng: &mut SplitMix64) -> Vec<Vec<f32>> {
        let a = &self.clips[index].1;
        let start = rng.below(a.n_samples() - self.crop + 1);
        a.channels
            .iter()
            .map(|c| c[start..start + self.crop].to_vec())
            .collect()
    }

    /// A batch `[batch, channels, crop]` of random crops of the clips
    /// `indices` (f32 on `device`).
    pub fn batch(
        &self,
        indices: &[usize],
        rng: &mut SplitMix64,
        device: &Device,
    ) -> Result<Tensor> {
        let mut data = Vec::with_capacity(indices.len() * self.channels * self.crop);
        for &i in indices {
            for ch in self.crop(i, rng) {
                data.extend(ch);
            }
        }
        Ok(Tensor::from_vec(
            data,
            (indices.len(), self.channels, self.crop),
            device,
        )?)
    }
}

/// Walks a set epoch by epoch in shuffled order, `batch_size` clips at a
/// time; its position is two integers, saved with the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochCursor {
    /// Current epoch.
    pub epoch: u64,
    /// Clips of this epoch already served.
    pub pos: usize,
}

impl EpochCursor {
    /// The next `batch_size` clip indices (wrapping into the next epoch).
    pub fn next(&mut self, set: &AudioSet, seed: u64, batch_size: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(batch_size);
        let mut order = set.epoch_order(seed, self.epoch);
        while out.len() < batch_size {
            if self.pos >= order.len() {
                self.epoch += 1;
                self.pos = 0;
                order = set.epoch_order(seed, self.epoch);
            }
            out.push(order[self.pos]);
            self.pos += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use melvae_dsp::{save_wav, WavFormat};

    fn wav(dir: &Path, rel: &str, rate: u32, secs: f64, channels: usize) -> PathBuf {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let n = (rate as f64 * secs) as usize;
        let ch: Vec<Vec<f32>> = (0..channels)
            .map(|c| {
                (0..n)
                    .map(|i| ((i + c * 7) as f32 * 0.01).sin() * 0.5)
                    .collect()
            })
            .collect();
        save_wav(&p, &Audio::new(rate, ch).unwrap(), WavFormat::Pcm16).unwrap();
        p
    }

    fn cfg(dir: &Path) -> AudioDataConfig {
        AudioDataConfig {
            dir: dir.to_path_buf(),
            sample_rate: 16000,
            channels: 1,
            crop_seconds: 0.25,
            val_fraction: 0.3,
        }
    }

    fn folder() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for i in 0..12 {
            wav(
                d.path(),
                &format!("spk{}/utt{i}.wav", i % 3),
                if i % 2 == 0 { 16000 } else { 22050 },
                0.5 + i as f64 * 0.05,
                1 + i % 2,
            );
        }
        wav(d.path(), "short/tiny.wav", 16000, 0.1, 1);
        std::fs::write(d.path().join("spk0/broken.wav"), b"RIFF\0\0\0\0WAVEjunk").unwrap();
        std::fs::write(d.path().join("notes.txt"), "not audio").unwrap();
        d
    }

    #[test]
    fn loads_splits_and_reports() {
        let d = folder();
        let f = AudioFolder::load(&cfg(d.path())).unwrap();
        assert_eq!(f.train.len() + f.val.len(), 12);
        assert!(
            !f.val.is_empty() && f.train.len() >= 6,
            "{} / {}",
            f.train.len(),
            f.val.len()
        );
        assert_eq!(f.skipped.unreadable.len(), 1);
        assert!(f.skipped.unreadable[0].0.ends_with("spk0/broken.wav"));
        assert_eq!(f.skipped.too_short.len(), 1);
        let report = f.skipped.to_string();
        assert!(
            report.contains("1 unreadable and 1 too-short")
                && report.contains("broken.wav")
                && report.contains("tiny.wav"),
            "{report}"
        );
        // The split is a property of each file, stable across loads.
        let again = AudioFolder::load(&cfg(d.path())).unwrap();
        assert_eq!(
            f.val.paths().collect::<Vec<_>>(),
            again.val.paths().collect::<Vec<_>>()
        );
        assert!(f.train.paths().all(|p| !f.val.paths().any(|q| q == p)));
    }

    #[test]
    fn crops_are_resampled_shaped_and_deterministic() {
        let d = folder();
        let f = AudioFolder::load(&AudioDataConfig {
            channels: 2,
            ..cfg(d.path())
        })
        .unwrap();
        let dev = Device::Cpu;
        let mut cursor = EpochCursor { epoch: 0, pos: 0 };
        let idx = cursor.next(&f.train, 7, 4);
        let b1 = f.train.batch(&idx, &mut SplitMix64::new(3), &dev).unwrap();
        assert_eq!(b1.dims(), &[4, 2, 4000]);
        let b2 = f.train.batch(&idx, &mut SplitMix64::new(3), &dev).unwrap();
        assert_eq!(b1.to_vec3::<f32>().unwrap(), b2.to_vec3::<f32>().unwrap());
        let b3 = f.train.batch(&idx, &mut SplitMix64::new(4), &dev).unwrap();
        assert_ne!(b1.to_vec3::<f32>().unwrap(), b3.to_vec3::<f32>().unwrap());
    }

    #[test]
    fn epochs_shuffle_deterministically_and_cover_everything() {
        let d = folder();
        let f = AudioFolder::load(&cfg(d.path())).unwrap();
        let n = f.train.len();
        let o0 = f.train.epoch_order(1, 0);
        assert_eq!(o0, f.train.epoch_order(1, 0));
        assert_ne!(o0, f.train.epoch_order(1, 1));
        let mut sorted = o0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        // A cursor resumed from its saved position continues identically.
        let mut a = EpochCursor { epoch: 0, pos: 0 };
        let first: Vec<Vec<usize>> = (0..3).map(|_| a.next(&f.train, 1, 3)).collect();
        let saved = a;
        let more = a.next(&f.train, 1, 3);
        let mut b = saved;
        assert_eq!(b.next(&f.train, 1, 3), more);
        let seen: std::collections::HashSet<usize> = first.concat().into_iter().take(n).collect();
        assert_eq!(seen.len(), n.min(9));
    }

    #[test]
    fn bad_config_and_empty_folders_are_named() {
        let d = tempfile::tempdir().unwrap();
        let e = AudioFolder::load(&AudioDataConfig {
            crop_seconds: 0.0,
            ..cfg(d.path())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("data.crop_seconds"), "{e}");
        let e = AudioFolder::load(&AudioDataConfig {
            channels: 3,
            ..cfg(d.path())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("data.channels"), "{e}");
        let e = AudioFolder::load(&cfg(&d.path().join("missing")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing") && e.contains("not a directory"),
            "{e}"
        );
        std::fs::write(d.path().join("x.wav"), b"").unwrap();
        let e = AudioFolder::load(&cfg(d.path())).unwrap_err().to_string();
        assert!(
            e.contains("no usable training audio") && e.contains("x.wav"),
            "{e}"
        );
    }
}
