//! Datasets: a folder of audio files with random fixed-length crops.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use melvae_dsp::{Audio, ChannelMode, LoadOptions, SplitMix64};
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
    /// Clips per training batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Decode once into a memory-mapped cache here ([`prepare_cache`]).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Fraction of files held out for validation (by a stable hash of the
    /// path relative to `dir`, so adding files does not reshuffle the split).
    #[serde(default = "five_percent")]
    pub val_fraction: f64,
    /// What the held-out split keeps together: each file on its own, or
    /// every file under the same first folder below `dir` (one folder per
    /// speaker, as in VCTK or LibriTTS: a speaker-disjoint split).
    #[serde(default)]
    pub split_by: SplitBy,
    /// Groups held out by name, besides the `val_fraction` drawn by hash:
    /// relative file paths (`split_by: file`) or folder names
    /// (`split_by: directory`). A name that matches no file is an error.
    #[serde(default)]
    pub held_out: Vec<String>,
}

/// The unit of the train/held-out split ([`AudioDataConfig::split_by`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitBy {
    /// Each file is drawn on its own (the path relative to `dir`).
    #[default]
    File,
    /// All files under the same first folder below `dir` go to the same
    /// side; files directly in `dir` are their own group.
    Directory,
}

impl SplitBy {
    /// The group of the file at `rel` (relative to the dataset folder): the
    /// path itself (`File`) or its first folder (`Directory`).
    pub fn group(self, rel: &Path) -> String {
        let mut parts = rel.components();
        match (self, parts.next()) {
            (Self::Directory, Some(first)) if parts.next().is_some() => {
                first.as_os_str().to_string_lossy().into_owned()
            }
            _ => rel.to_string_lossy().into_owned(),
        }
    }
}

fn one() -> usize {
    1
}
fn default_batch() -> usize {
    8
}
fn five_percent() -> f64 {
    0.05
}

impl Validate for AudioDataConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        check(self.sample_rate > 0, "sample_rate", || "must be > 0".into())?;
        check(self.batch_size > 0, "batch_size", || "must be > 0".into())?;
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
    /// Validates the fields (errors name `data.<field>`) and that `dir` is
    /// a directory.
    fn check(&self) -> Result<()> {
        self.validate().map_err(|(k, r)| Error::Config {
            origin: "data config".into(),
            key: format!("data.{k}"),
            reason: r,
        })?;
        if !self.dir.is_dir() {
            return Err(Error::file(&self.dir, "is not a directory"));
        }
        Ok(())
    }

    /// Checks that the data is what a model takes (`sample_rate` Hz with
    /// `channels` channels); the error names the `data.` key that differs
    /// and the `model`.
    pub fn require(&self, sample_rate: u32, channels: usize, model: &str) -> Result<()> {
        let differs = |key: &str, got: usize, want: usize| Error::Config {
            origin: "data config".into(),
            key: key.into(),
            reason: format!("is {got}, the {model} needs {want}"),
        };
        if self.sample_rate != sample_rate {
            return Err(differs(
                "data.sample_rate",
                self.sample_rate as usize,
                sample_rate as usize,
            ));
        }
        if self.channels != channels {
            return Err(differs("data.channels", self.channels, channels));
        }
        Ok(())
    }

    /// How files are decoded: mono or stereo at `sample_rate`.
    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            channels: if self.channels == 1 {
                ChannelMode::Mono
            } else {
                ChannelMode::Stereo
            },
            sample_rate: Some(self.sample_rate),
            ..Default::default()
        }
    }

    /// Decodes `path` as `load_options` says; also tells whether a mono
    /// file was duplicated to both channels of a stereo dataset.
    fn decode(&self, path: &Path) -> melvae_dsp::Result<(Audio, bool)> {
        let opts = self.load_options();
        let raw = melvae_dsp::load_audio(path)?;
        let upmixed = self.channels == 2 && raw.channels.len() == 1;
        let a = raw.with_channels(opts.channels)?;
        Ok((
            match opts.sample_rate {
                Some(rate) => a.resampled(rate, opts.quality)?,
                None => a,
            },
            upmixed,
        ))
    }

    /// Samples per crop.
    pub fn crop_samples(&self) -> usize {
        (self.crop_seconds * self.sample_rate as f64).round() as usize
    }

    /// The split group of the file at `rel` (relative to `dir`), as
    /// [`SplitBy::group`].
    pub fn split_group(&self, rel: &Path) -> String {
        self.split_by.group(rel)
    }

    /// The split group of a file found under `dir` (given with `dir`).
    pub fn group_of(&self, path: &Path) -> String {
        self.split_group(path.strip_prefix(&self.dir).unwrap_or(path))
    }

    /// Whether the file at `rel` (relative to `dir`) is held out for
    /// validation: its group is named in `held_out`, or a stable hash of the
    /// group falls below `val_fraction`, so the split does not depend on the
    /// other files.
    pub fn is_held_out(&self, rel: &Path) -> bool {
        let group = self.split_group(rel);
        self.held_out.contains(&group) || stable_fraction(&group) < self.val_fraction
    }

    /// Checks that every name in `held_out` is the group of one of `files`
    /// (found under `dir`); the error names the key and the first name that
    /// matches nothing.
    fn check_held_out(&self, files: &[PathBuf]) -> Result<()> {
        if self.held_out.is_empty() {
            return Ok(());
        }
        let groups: std::collections::HashSet<String> =
            files.iter().map(|p| self.group_of(p)).collect();
        match self.held_out.iter().find(|g| !groups.contains(*g)) {
            None => Ok(()),
            Some(g) => Err(Error::Config {
                origin: "data config".into(),
                key: "data.held_out".into(),
                reason: format!(
                    "names {g:?}, but no audio file under {} is in that group (split_by: {}); \
                     for another folder, name its groups or set data.held_out=[] and a \
                     data.val_fraction",
                    self.dir.display(),
                    match self.split_by {
                        SplitBy::File => "file: names are paths relative to data.dir",
                        SplitBy::Directory => "directory: names are first-level folders",
                    }
                ),
            }),
        }
    }

    /// The audio files under `dir` held out for validation, sorted (before
    /// decoding: a file training would skip as unreadable is listed too).
    pub fn held_out_files(&self) -> Result<Vec<PathBuf>> {
        let files = discover_audio(&self.dir)?;
        self.check_held_out(&files)?;
        Ok(files
            .into_iter()
            .filter(|p| self.is_held_out(p.strip_prefix(&self.dir).unwrap_or(p)))
            .collect())
    }
}

pub use melvae_dsp::discover_audio;

/// FNV-1a of a split group (a path relative to the dataset root, or a
/// folder name) as a fraction in [0, 1): a split that does not depend on
/// the set of other files.
fn stable_fraction(group: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in group.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % 1_000_000) as f64 / 1_000_000.0
}

/// Files left out of a dataset and why, and files used in a converted
/// form, reported once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SkipReport {
    /// Files that failed to decode, with the error.
    pub unreadable: Vec<(PathBuf, String)>,
    /// Files shorter than one crop, with their length in seconds.
    pub too_short: Vec<(PathBuf, f64)>,
    /// Mono files in a stereo dataset, used with the channel duplicated.
    pub upmixed: Vec<PathBuf>,
}

impl SkipReport {
    /// True when there is nothing to report.
    pub fn is_empty(&self) -> bool {
        self.unreadable.is_empty() && self.too_short.is_empty() && self.upmixed.is_empty()
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
        if !self.upmixed.is_empty() {
            writeln!(
                f,
                "{} mono files in a stereo dataset, used with the channel duplicated:",
                self.upmixed.len()
            )?;
            for p in &self.upmixed {
                writeln!(f, "  mono: {}", p.display())?;
            }
        }
        Ok(())
    }
}

/// Where a clip's samples live.
#[derive(Debug, Clone)]
enum Samples {
    /// Decoded in memory, planar f32.
    Memory(Audio),
    /// In a memory-mapped cache shard: `channels` planar blocks of `len`
    /// little-endian i16 samples starting at byte `offset`.
    Mapped {
        shard: std::sync::Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    },
}

impl Samples {
    fn len(&self) -> usize {
        match self {
            Samples::Memory(a) => a.n_samples(),
            Samples::Mapped { len, .. } => *len,
        }
    }

    fn channel(&self, c: usize, start: usize, n: usize) -> Vec<f32> {
        match self {
            Samples::Memory(a) => a.channels[c][start..start + n].to_vec(),
            Samples::Mapped { shard, offset, len } => {
                let base = offset + 2 * (c * len + start);
                shard[base..base + 2 * n]
                    .chunks_exact(2)
                    .map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0)
                    .collect()
            }
        }
    }
}

/// Audio of one split (decoded in memory or memory-mapped from a cache),
/// cropped at random.
#[derive(Debug, Clone)]
pub struct AudioSet {
    clips: Vec<(PathBuf, Samples)>,
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
    /// [`AudioFolder::load_cached`] when `cfg.cache_dir` is set, otherwise
    /// [`AudioFolder::load`].
    pub fn open(cfg: &AudioDataConfig) -> Result<Self> {
        match &cfg.cache_dir {
            Some(dir) => Ok(Self::load_cached(cfg, dir)?.0),
            None => Self::load(cfg),
        }
    }

    /// Discovers, decodes (resampling and converting channels) and splits
    /// `cfg.dir`. Unreadable and too-short files are skipped and listed in
    /// [`AudioFolder::skipped`]; a folder with no usable file is an error
    /// naming it.
    pub fn load(cfg: &AudioDataConfig) -> Result<Self> {
        cfg.check()?;
        let files = discover_audio(&cfg.dir)?;
        cfg.check_held_out(&files)?;
        let crop = cfg.crop_samples();
        let mut skipped = SkipReport::default();
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for path in files {
            match cfg.decode(&path) {
                Err(e) => skipped.unreadable.push((path, e.to_string())),
                Ok((a, _)) if a.n_samples() < crop => {
                    skipped.too_short.push((path, a.duration_secs()))
                }
                Ok((a, upmixed)) => {
                    if upmixed {
                        skipped.upmixed.push(path.clone());
                    }
                    let rel = path.strip_prefix(&cfg.dir).unwrap_or(&path).to_path_buf();
                    let side = if cfg.is_held_out(&rel) {
                        &mut val
                    } else {
                        &mut train
                    };
                    side.push((path, Samples::Memory(a)));
                }
            }
        }
        Self::assemble(cfg, train, val, skipped)
    }

    /// The two sets, or an error naming the folder when training is empty.
    fn assemble(
        cfg: &AudioDataConfig,
        train: Vec<(PathBuf, Samples)>,
        val: Vec<(PathBuf, Samples)>,
        skipped: SkipReport,
    ) -> Result<Self> {
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
            crop: cfg.crop_samples(),
            channels: cfg.channels,
        };
        Ok(Self {
            train: set(train),
            val: set(val),
            skipped,
        })
    }

    /// Like [`AudioFolder::load`], reading from the memory-mapped cache that
    /// [`prepare_cache`] maintains in `cache_dir` (updating it first): crops
    /// are read without decoding.
    pub fn load_cached(cfg: &AudioDataConfig, cache_dir: &Path) -> Result<(Self, PrepareReport)> {
        // A mistyped held-out name is named before the folder is decoded.
        if !cfg.held_out.is_empty() {
            let files = discover_audio(&cfg.dir)?;
            cfg.check_held_out(&files)?;
        }
        let report = prepare_cache(cfg, cache_dir)?;
        let index = CacheIndex::read(cache_dir)?
            .ok_or_else(|| Error::file(cache_dir, "has no cache index"))?;
        let mut shards: Vec<std::sync::Arc<memmap2::Mmap>> = Vec::new();
        for name in &index.shards {
            let p = cache_dir.join(name);
            let f = std::fs::File::open(&p).map_err(|e| Error::file(&p, e))?;
            // Safety: shards are written once (temp + rename) and never modified.
            let m = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::file(&p, e))?;
            shards.push(std::sync::Arc::new(m));
        }
        let crop = cfg.crop_samples();
        let mut skipped = SkipReport::default();
        skipped.unreadable = index
            .skipped
            .iter()
            .map(|e| (cfg.dir.join(&e.rel), e.reason.clone()))
            .collect();
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for e in &index.entries {
            let path = cfg.dir.join(&e.rel);
            if e.upmixed && e.len >= crop {
                skipped.upmixed.push(path.clone());
            }
            if e.len < crop {
                skipped
                    .too_short
                    .push((path, e.len as f64 / cfg.sample_rate as f64));
                continue;
            }
            let shard = shards.get(e.shard).ok_or_else(|| {
                Error::file(
                    cache_dir,
                    format!("entry {} names missing shard {}", e.rel, e.shard),
                )
            })?;
            if e.offset + 2 * e.len * cfg.channels > shard.len() {
                return Err(Error::file(
                    cache_dir.join(&index.shards[e.shard]),
                    format!("is truncated: entry {} runs past its end", e.rel),
                ));
            }
            let side = if cfg.is_held_out(Path::new(&e.rel)) {
                &mut val
            } else {
                &mut train
            };
            side.push((
                path,
                Samples::Mapped {
                    shard: shard.clone(),
                    offset: e.offset,
                    len: e.len,
                },
            ));
        }
        Ok((Self::assemble(cfg, train, val, skipped)?, report))
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
        epoch_order(self.clips.len(), seed, epoch)
    }

    /// A crop of clip `index` starting at a uniformly random offset:
    /// `[channels, crop]`.
    pub fn crop(&self, index: usize, rng: &mut SplitMix64) -> Vec<Vec<f32>> {
        let s = &self.clips[index].1;
        let start = rng.below(s.len() - self.crop + 1);
        (0..self.channels)
            .map(|c| s.channel(c, start, self.crop))
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
        self.next_of(set.len(), seed, batch_size)
    }

    /// [`EpochCursor::next`] for any dataset of `n` examples (`n > 0`).
    pub fn next_of(&mut self, n: usize, seed: u64, batch_size: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(batch_size);
        let mut order = epoch_order(n, seed, self.epoch);
        while out.len() < batch_size {
            if self.pos >= order.len() {
                self.epoch += 1;
                self.pos = 0;
                order = epoch_order(n, seed, self.epoch);
            }
            out.push(order[self.pos]);
            self.pos += 1;
        }
        out
    }
}

/// One cached file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CacheEntry {
    rel: String,
    size: u64,
    mtime_ns: u128,
    shard: usize,
    offset: usize,
    len: usize,
    /// A mono file stored with its channel duplicated (stereo caches).
    #[serde(default)]
    upmixed: bool,
}

/// A file that could not be decoded (kept so a re-run does not retry it
/// until it changes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CacheSkip {
    rel: String,
    size: u64,
    mtime_ns: u128,
    reason: String,
}

/// `index.json` of a cache directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CacheIndex {
    version: u32,
    sample_rate: u32,
    channels: usize,
    shards: Vec<String>,
    entries: Vec<CacheEntry>,
    skipped: Vec<CacheSkip>,
}

impl CacheIndex {
    fn read(dir: &Path) -> Result<Option<Self>> {
        let p = dir.join("index.json");
        match std::fs::read_to_string(&p) {
            Ok(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|e| Error::file(&p, format!("not a cache index: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::file(&p, e)),
        }
    }
}

/// What [`prepare_cache`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrepareReport {
    /// Files decoded and added now.
    pub added: usize,
    /// Files already cached and unchanged.
    pub reused: usize,
    /// Unreadable files (newly found or remembered).
    pub unreadable: usize,
}

fn stat(path: &Path) -> Result<(u64, u128)> {
    let m = std::fs::metadata(path).map_err(|e| Error::file(path, e))?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok((m.len(), mtime))
}

/// Decodes the audio of `cfg.dir` into a memory-mapped cache in `cache_dir`
/// once: 16-bit samples at `cfg.sample_rate` with `cfg.channels`, planar per
/// file, in immutable shard files listed in `index.json`. Re-running adds
/// only new or changed files (by path, size and mtime) in one new shard and
/// forgets deleted ones; unreadable files are remembered (and reported)
/// until they change. The shard is in place before the index is replaced
/// (atomically), so an interrupted run leaves the previous cache valid.
pub fn prepare_cache(cfg: &AudioDataConfig, cache_dir: &Path) -> Result<PrepareReport> {
    cfg.check()?;
    std::fs::create_dir_all(cache_dir).map_err(|e| Error::file(cache_dir, e))?;
    let old = CacheIndex::read(cache_dir)?;
    if let Some(o) = &old {
        if o.sample_rate != cfg.sample_rate || o.channels != cfg.channels {
            return Err(Error::file(
                cache_dir,
                format!(
                    "holds {} Hz x {} ch audio; the config asks for {} Hz x {} ch (use another cache dir)",
                    o.sample_rate, o.channels, cfg.sample_rate, cfg.channels
                ),
            ));
        }
    }
    let mut index = old.clone().unwrap_or(CacheIndex {
        version: 1,
        sample_rate: cfg.sample_rate,
        channels: cfg.channels,
        shards: Vec::new(),
        entries: Vec::new(),
        skipped: Vec::new(),
    });
    let mut report = PrepareReport::default();
    let (mut entries, mut skipped) = (Vec::new(), Vec::new());
    let shard_id = index.shards.len();
    let mut bytes: Vec<u8> = Vec::new();
    for path in discover_audio(&cfg.dir)? {
        let rel = path
            .strip_prefix(&cfg.dir)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        let (size, mtime_ns) = stat(&path)?;
        let same = |r: &str, s: u64, m: u128| r == rel && s == size && m == mtime_ns;
        if let Some(e) = index
            .entries
            .iter()
            .find(|e| same(&e.rel, e.size, e.mtime_ns))
        {
            entries.push(e.clone());
            report.reused += 1;
            continue;
        }
        if let Some(k) = index
            .skipped
            .iter()
            .find(|k| same(&k.rel, k.size, k.mtime_ns))
        {
            skipped.push(k.clone());
            report.unreadable += 1;
            continue;
        }
        match cfg.decode(&path) {
            Err(e) => {
                skipped.push(CacheSkip {
                    rel,
                    size,
                    mtime_ns,
                    reason: e.to_string(),
                });
                report.unreadable += 1;
            }
            Ok((a, upmixed)) => {
                let offset = bytes.len();
                for ch in &a.channels {
                    for &v in ch {
                        let q = (v as f64 * 32768.0).round().clamp(-32768.0, 32767.0) as i16;
                        bytes.extend_from_slice(&q.to_le_bytes());
                    }
                }
                entries.push(CacheEntry {
                    rel,
                    size,
                    mtime_ns,
                    shard: shard_id,
                    offset,
                    len: a.n_samples(),
                    upmixed,
                });
                report.added += 1;
            }
        }
    }
    if report.added > 0 {
        let name = format!("shard-{shard_id:05}.bin");
        melvae_dsp::atomic_write(&cache_dir.join(&name), |w| {
            std::io::Write::write_all(w, &bytes)
        })?;
        index.shards.push(name);
    }
    index.entries = entries;
    index.skipped = skipped;
    if old.as_ref() != Some(&index) {
        let text = serde_json::to_string_pretty(&index)
            .map_err(|e| Error::invalid("cache index", e.to_string()))?;
        melvae_dsp::atomic_write(&cache_dir.join("index.json"), |w| {
            std::io::Write::write_all(w, text.as_bytes())
        })?;
    }
    Ok(report)
}

/// The order of epoch `epoch` over `n` examples: a Fisher-Yates shuffle
/// seeded by `(seed, epoch)`, so a resumed run needs only the epoch and
/// position.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
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
            batch_size: 4,
            cache_dir: None,
            val_fraction: 0.3,
            split_by: SplitBy::File,
            held_out: Vec::new(),
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
        // held_out_files lists the same files without decoding (plus any
        // unreadable or too-short file the hash puts on that side).
        let listed = cfg(d.path()).held_out_files().unwrap();
        let val: Vec<&Path> = f.val.paths().collect();
        assert!(val.iter().all(|p| listed.iter().any(|q| q == p)));
        assert!(listed.iter().all(|p| val.contains(&p.as_path())
            || p.ends_with("broken.wav")
            || p.ends_with("tiny.wav")));
    }

    #[test]
    fn directory_split_keeps_speakers_together_and_names_groups() {
        let d = folder();
        let by_dir = |held_out: &[&str], val_fraction| AudioDataConfig {
            split_by: SplitBy::Directory,
            held_out: held_out.iter().map(|s| s.to_string()).collect(),
            val_fraction,
            ..cfg(d.path())
        };
        let speaker = |p: &Path| {
            p.strip_prefix(d.path())
                .unwrap()
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_owned()
        };
        // Named groups only: exactly spk1's decodable files are held out.
        let c = by_dir(&["spk1"], 0.0);
        assert_eq!(c.split_group(Path::new("spk1/utt4.wav")), "spk1");
        assert_eq!(c.split_group(Path::new("loose.wav")), "loose.wav");
        let f = AudioFolder::load(&c).unwrap();
        assert_eq!(f.val.len(), 4);
        assert!(f.val.paths().all(|p| speaker(p) == "spk1"));
        assert!(f.train.paths().all(|p| speaker(p) != "spk1"));
        assert_eq!(c.held_out_files().unwrap().len(), 4);
        // The memory-mapped cache splits the same way.
        let cache = tempfile::tempdir().unwrap();
        let (mapped, _) = AudioFolder::load_cached(&c, cache.path()).unwrap();
        assert_eq!(
            mapped.val.paths().collect::<Vec<_>>(),
            f.val.paths().collect::<Vec<_>>()
        );
        let e = AudioFolder::load_cached(&by_dir(&["spk7"], 0.0), cache.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.held_out") && e.contains("\"spk7\""), "{e}");
        // Drawn by hash, a speaker's files all land on the same side.
        let mut split_somewhere = false;
        for frac in [0.2, 0.4, 0.6, 0.8] {
            let f = AudioFolder::load(&by_dir(&[], frac)).unwrap();
            let val: std::collections::HashSet<_> = f.val.paths().map(speaker).collect();
            assert!(
                f.train.paths().all(|p| !val.contains(&speaker(p))),
                "{frac}"
            );
            split_somewhere |= !val.is_empty();
        }
        assert!(split_somewhere);
        // split_by: file names files; the hash split is unchanged by the
        // new fields (the same files as before them).
        let c = AudioDataConfig {
            held_out: vec!["spk2/utt5.wav".into()],
            val_fraction: 0.0,
            ..cfg(d.path())
        };
        let f = AudioFolder::load(&c).unwrap();
        assert_eq!(
            f.val.paths().collect::<Vec<_>>(),
            [d.path().join("spk2/utt5.wav")]
        );
    }

    #[test]
    fn a_held_out_name_matching_no_file_is_named() {
        let d = folder();
        for (split_by, good, name) in [
            (SplitBy::Directory, "spk0", "spk9"),
            (SplitBy::File, "spk0/utt0.wav", "spk1"),
        ] {
            let c = AudioDataConfig {
                split_by,
                held_out: vec![good.into(), name.into()],
                ..cfg(d.path())
            };
            for e in [
                AudioFolder::load(&c).unwrap_err().to_string(),
                c.held_out_files().unwrap_err().to_string(),
            ] {
                assert!(e.contains("data.held_out"), "{e}");
                assert!(e.contains(&format!("{name:?}")), "{e}");
                assert!(!e.contains(&format!("{good:?}")), "{e}");
            }
        }
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

    #[test]
    fn mono_files_in_a_stereo_dataset_are_duplicated_and_reported_once() {
        let d = folder();
        let c = AudioDataConfig {
            channels: 2,
            ..cfg(d.path())
        };
        let cache = tempfile::tempdir().unwrap();
        let mem = AudioFolder::load(&c).unwrap();
        let (mapped, _) = AudioFolder::load_cached(&c, cache.path()).unwrap();
        let (again, _) = AudioFolder::load_cached(&c, cache.path()).unwrap();
        for f in [&mem, &mapped, &again] {
            // utt0, 2, 4, ... are mono (tiny.wav is too short and not counted).
            assert_eq!(f.skipped.upmixed.len(), 6, "{}", f.skipped);
            let report = f.skipped.to_string();
            assert!(
                report.contains("6 mono files") && report.contains("utt0.wav"),
                "{report}"
            );
            let (set, i) = [&f.train, &f.val]
                .into_iter()
                .find_map(|set| {
                    let i = set.paths().position(|p| p.ends_with("spk0/utt0.wav"))?;
                    Some((set, i))
                })
                .unwrap();
            let crop = set.crop(i, &mut SplitMix64::new(1));
            assert_eq!(crop[0], crop[1], "the channel is duplicated");
        }
        // A mono dataset reports nothing of the kind.
        assert!(AudioFolder::load(&cfg(d.path()))
            .unwrap()
            .skipped
            .upmixed
            .is_empty());
    }

    #[test]
    fn non_finite_audio_is_a_bad_file_in_both_paths() {
        let d = folder();
        let p = d.path().join("spk1/nan.wav");
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 16000,
            bits_per_sample: 32,
            sample_format: hound::SampleFormat::Float,
        };
        let mut w = hound::WavWriter::create(&p, spec).unwrap();
        for i in 0..16000 {
            w.write_sample(if i == 9000 { f32::NAN } else { 0.25f32 })
                .unwrap();
        }
        w.finalize().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let mem = AudioFolder::load(&cfg(d.path())).unwrap();
        let (mapped, _) = AudioFolder::load_cached(&cfg(d.path()), cache.path()).unwrap();
        for f in [&mem, &mapped] {
            assert_eq!(f.train.len() + f.val.len(), 12, "the NaN file is not used");
            let report = f.skipped.to_string();
            assert!(
                report.contains("nan.wav") && report.contains("non-finite"),
                "{report}"
            );
        }
    }

    #[test]
    fn cache_round_trip_reuse_and_invalidation() {
        let d = folder();
        let cache = tempfile::tempdir().unwrap();
        let c = AudioDataConfig {
            channels: 2,
            ..cfg(d.path())
        };
        let mem = AudioFolder::load(&c).unwrap();
        let (mapped, r1) = AudioFolder::load_cached(&c, cache.path()).unwrap();
        assert_eq!((r1.added, r1.reused, r1.unreadable), (13, 0, 1));
        assert_eq!(mapped.train.len(), mem.train.len());
        assert_eq!(mapped.skipped.unreadable.len(), 1);
        assert_eq!(mapped.skipped.too_short.len(), 1);
        // Same crops as the decoded data, within 16-bit rounding.
        for i in 0..mem.train.len() {
            let a = mem.train.crop(i, &mut SplitMix64::new(i as u64));
            let b = mapped.train.crop(i, &mut SplitMix64::new(i as u64));
            for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
                assert!((x - y).abs() <= 0.5 / 32768.0 + 1e-7, "{x} vs {y}");
            }
        }
        // A second run reuses everything and does not rewrite the index.
        let index_before = std::fs::read(cache.path().join("index.json")).unwrap();
        let r2 = prepare_cache(&c, cache.path()).unwrap();
        assert_eq!((r2.added, r2.reused, r2.unreadable), (0, 13, 1));
        assert_eq!(
            std::fs::read(cache.path().join("index.json")).unwrap(),
            index_before
        );
        // A new file lands in a new shard; a deleted one disappears.
        wav(d.path(), "spk9/new.wav", 16000, 0.6, 1);
        std::fs::remove_file(d.path().join("spk0/utt0.wav")).unwrap();
        let r3 = prepare_cache(&c, cache.path()).unwrap();
        assert_eq!((r3.added, r3.reused), (1, 12));
        assert!(cache.path().join("shard-00001.bin").exists());
        // Another rate or channel count is refused, naming the cache.
        let e = prepare_cache(
            &AudioDataConfig {
                sample_rate: 8000,
                ..c.clone()
            },
            cache.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("holds 16000 Hz x 2 ch") && e.contains("8000 Hz"),
            "{e}"
        );
        // A truncated shard is detected when mapping.
        let shard = cache.path().join("shard-00000.bin");
        let len = std::fs::metadata(&shard).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&shard)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let e = AudioFolder::load_cached(&c, cache.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("shard-00000.bin") && e.contains("truncated"),
            "{e}"
        );
    }
}
