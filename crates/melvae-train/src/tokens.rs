//! Token datasets for priors and TTS: code sequences with optional labels,
//! text ids and conditioning vectors, stored as safetensors shards and
//! batched with padding masks.
//!
//! A shard holds, for `N` examples (any of the optional keys absent for all):
//!
//! | key | dtype, shape | meaning |
//! | --- | --- | --- |
//! | `codes` | u32 `[sum T_i, K]` | concatenated code frames (`K` codebooks) |
//! | `code_offsets` | u32 `[N + 1]` | example `i` is rows `off[i]..off[i+1]` |
//! | `labels` | u32 `[N]` | class label (optional) |
//! | `speakers` | u32 `[N]` | speaker id (optional) |
//! | `text` / `text_offsets` | u32 `[sum L_i]` / `[N + 1]` | text ids (optional) |
//! | `cond` | f32 `[N, D]` | conditioning vector (optional) |

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// One example.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenExample {
    /// Code frames, `[T][K]`.
    pub codes: Vec<Vec<u32>>,
    /// Class label.
    pub label: Option<u32>,
    /// Speaker id.
    pub speaker: Option<u32>,
    /// Text ids.
    pub text: Option<Vec<u32>>,
    /// Conditioning vector.
    pub cond: Option<Vec<f32>>,
}

/// Fails unless an optional field is present for all examples or none;
/// names the first example that differs.
fn all_or_none(
    examples: &[TokenExample],
    what: &str,
    has: impl Fn(&TokenExample) -> bool,
) -> Result<bool> {
    let first = examples.first().is_some_and(&has);
    if let Some(i) = examples.iter().position(|e| has(e) != first) {
        return Err(Error::invalid(
            format!("token example {i}"),
            format!("`{what}` must be given for all examples or none"),
        ));
    }
    Ok(first)
}

/// Writes `examples` as one shard at `path`, atomically.
pub fn write_token_shard(path: &Path, examples: &[TokenExample]) -> Result<()> {
    if examples.is_empty() {
        return Err(Error::invalid("token shard", "no examples"));
    }
    let k = examples[0].codes.first().map_or(0, Vec::len);
    for (i, e) in examples.iter().enumerate() {
        if e.codes.is_empty() || e.codes.iter().any(|f| f.len() != k || k == 0) {
            return Err(Error::invalid(
                format!("token example {i}"),
                format!("codes must be a non-empty [T][{k}] array"),
            ));
        }
    }
    let dev = Device::Cpu;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    let mut offsets = vec![0u32];
    let mut flat = Vec::new();
    for e in examples {
        flat.extend(e.codes.iter().flatten().copied());
        offsets.push((flat.len() / k) as u32);
    }
    map.insert(
        "codes".into(),
        Tensor::from_vec(flat, (offsets[offsets.len() - 1] as usize, k), &dev)?,
    );
    map.insert(
        "code_offsets".into(),
        Tensor::new(offsets.as_slice(), &dev)?,
    );
    if all_or_none(examples, "label", |e| e.label.is_some())? {
        let v: Vec<u32> = examples.iter().filter_map(|e| e.label).collect();
        map.insert("labels".into(), Tensor::new(v.as_slice(), &dev)?);
    }
    if all_or_none(examples, "speaker", |e| e.speaker.is_some())? {
        let v: Vec<u32> = examples.iter().filter_map(|e| e.speaker).collect();
        map.insert("speakers".into(), Tensor::new(v.as_slice(), &dev)?);
    }
    if all_or_none(examples, "text", |e| e.text.is_some())? {
        let mut offs = vec![0u32];
        let mut t = Vec::new();
        for e in examples {
            t.extend(e.text.iter().flatten().copied());
            offs.push(t.len() as u32);
        }
        map.insert("text".into(), Tensor::new(t.as_slice(), &dev)?);
        map.insert("text_offsets".into(), Tensor::new(offs.as_slice(), &dev)?);
    }
    if all_or_none(examples, "cond", |e| e.cond.is_some())? {
        let d = examples[0].cond.as_ref().map_or(0, Vec::len);
        if let Some(i) = examples
            .iter()
            .position(|e| e.cond.as_ref().map_or(0, Vec::len) != d)
        {
            return Err(Error::invalid(
                format!("token example {i}"),
                format!("`cond` must have {d} values like example 0"),
            ));
        }
        let v: Vec<f32> = examples
            .iter()
            .flat_map(|e| e.cond.iter().flatten().copied())
            .collect();
        map.insert(
            "cond".into(),
            Tensor::from_vec(v, (examples.len(), d), &dev)?,
        );
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::file(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::file(path, e))
}

/// Examples loaded from one or more shards.
#[derive(Debug, Clone, Default)]
pub struct TokenDataset {
    /// The examples, in shard order.
    pub examples: Vec<TokenExample>,
}

fn u32s(
    map: &HashMap<String, Tensor>,
    key: &str,
    path: &Path,
    required: bool,
) -> Result<Option<Vec<u32>>> {
    match map.get(key) {
        None if required => Err(Error::file(path, format!("has no `{key}` tensor"))),
        None => Ok(None),
        Some(t) if t.dtype() != DType::U32 => Err(Error::file(
            path,
            format!("`{key}` is {:?}, expected u32", t.dtype()),
        )),
        Some(t) => Ok(Some(t.flatten_all()?.to_vec1()?)),
    }
}

fn check_offsets(off: &[u32], n: usize, total: usize, key: &str, path: &Path) -> Result<()> {
    let ok = off.len() == n + 1
        && off[0] == 0
        && off.windows(2).all(|w| w[0] <= w[1])
        && off[n] as usize == total;
    if !ok {
        return Err(Error::file(
            path,
            format!("`{key}` must rise from 0 to {total} in {} entries", n + 1),
        ));
    }
    Ok(())
}

impl TokenDataset {
    /// Loads shards (`.safetensors` files, or directories of them, in
    /// sorted order), or examples in the Echolancer seed's `.pt` format
    /// (files, or directories of them: see [`crate::pt`]); errors name the
    /// file and the bad key. One dataset is either shards or `.pt` files.
    pub fn load(paths: &[PathBuf]) -> Result<Self> {
        let is = |f: &Path, ext: &str| f.extension().is_some_and(|x| x == ext);
        let mut files = Vec::new();
        for p in paths {
            if p.is_dir() {
                let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                    .map_err(|e| Error::file(p, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| is(f, "safetensors") || is(f, "pt"))
                    .collect();
                v.sort();
                files.extend(v);
            } else {
                files.push(p.clone());
            }
        }
        let pt = files.iter().filter(|f| is(f, "pt")).count();
        if pt > 0 {
            if pt < files.len() {
                return Err(Error::invalid(
                    "token dataset",
                    format!("{paths:?} mixes .pt examples and token shards; use one kind"),
                ));
            }
            let examples = files
                .iter()
                .map(|f| crate::pt::read_pt_example(f))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Self { examples });
        }
        let mut examples = Vec::new();
        // What the first shard has, which every other must have too: the
        // codebook count and which optional keys are present.
        let mut first: Option<(usize, [bool; 4])> = None;
        for path in &files {
            let map = candle_core::safetensors::load(path, &Device::Cpu)
                .map_err(|e| Error::file(path, e))?;
            let codes_t = map
                .get("codes")
                .ok_or_else(|| Error::file(path, "has no `codes` tensor"))?;
            let (rows, k) = codes_t.dims2().map_err(|_| {
                Error::file(
                    path,
                    format!(
                        "`codes` must be [frames, codebooks], got {:?}",
                        codes_t.dims()
                    ),
                )
            })?;
            let codes = u32s(&map, "codes", path, true)?.unwrap_or_default();
            let off = u32s(&map, "code_offsets", path, true)?.unwrap_or_default();
            let n = off.len().saturating_sub(1);
            check_offsets(&off, n, rows, "code_offsets", path)?;
            let per = |key: &str| -> Result<Option<Vec<u32>>> {
                let v = u32s(&map, key, path, false)?;
                if v.as_ref().is_some_and(|v| v.len() != n) {
                    return Err(Error::file(path, format!("`{key}` must have {n} entries")));
                }
                Ok(v)
            };
            let (labels, speakers) = (per("labels")?, per("speakers")?);
            let text = match (
                u32s(&map, "text", path, false)?,
                u32s(&map, "text_offsets", path, false)?,
            ) {
                (Some(t), Some(o)) => {
                    check_offsets(&o, n, t.len(), "text_offsets", path)?;
                    Some((t, o))
                }
                (None, None) => None,
                _ => return Err(Error::file(path, "`text` and `text_offsets` come together")),
            };
            let cond = match map.get("cond") {
                Some(c) => {
                    let (cn, _) = c
                        .dims2()
                        .map_err(|_| Error::file(path, "`cond` must be [examples, dim]"))?;
                    if cn != n {
                        return Err(Error::file(path, format!("`cond` must have {n} rows")));
                    }
                    Some(c.to_dtype(DType::F32)?.to_vec2::<f32>()?)
                }
                None => None,
            };
            let has = [
                labels.is_some(),
                speakers.is_some(),
                text.is_some(),
                cond.is_some(),
            ];
            match first {
                None => first = Some((k, has)),
                Some((k0, has0)) if k0 != k || has0 != has => {
                    return Err(Error::file(
                        path,
                        format!(
                            "differs from the first shard: {k} codebooks and keys \
                             labels/speakers/text/cond {has:?}, the first has {k0} and {has0:?}"
                        ),
                    ))
                }
                Some(_) => {}
            }
            for i in 0..n {
                let (a, b) = (off[i] as usize, off[i + 1] as usize);
                examples.push(TokenExample {
                    codes: (a..b).map(|r| codes[r * k..(r + 1) * k].to_vec()).collect(),
                    label: labels.as_ref().map(|v| v[i]),
                    speaker: speakers.as_ref().map(|v| v[i]),
                    text: text
                        .as_ref()
                        .map(|(t, o)| t[o[i] as usize..o[i + 1] as usize].to_vec()),
                    cond: cond.as_ref().map(|c| c[i].clone()),
                });
            }
        }
        if examples.is_empty() {
            return Err(Error::invalid(
                "token dataset",
                format!("no examples in {paths:?}"),
            ));
        }
        Ok(Self { examples })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// True without examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Pads the examples `indices` into a batch on `device`.
    pub fn batch(&self, indices: &[usize], pad_id: u32, device: &Device) -> Result<TokenBatch> {
        let ex: Vec<&TokenExample> = indices
            .iter()
            .map(|&i| {
                self.examples.get(i).ok_or_else(|| {
                    Error::invalid("token batch", format!("index {i} out of 0..{}", self.len()))
                })
            })
            .collect::<Result<_>>()?;
        let b = ex.len();
        let k = ex.first().and_then(|e| e.codes.first()).map_or(0, Vec::len);
        let t_max = ex.iter().map(|e| e.codes.len()).max().unwrap_or(0);
        let mut codes = vec![pad_id; b * t_max * k];
        let mut mask = vec![0u8; b * t_max];
        for (i, e) in ex.iter().enumerate() {
            for (t, frame) in e.codes.iter().enumerate() {
                codes[(i * t_max + t) * k..(i * t_max + t + 1) * k].copy_from_slice(frame);
                mask[i * t_max + t] = 1;
            }
        }
        let opt_ids = |get: &dyn Fn(&TokenExample) -> Option<u32>| -> Result<Option<Tensor>> {
            let v: Option<Vec<u32>> = ex.iter().map(|e| get(e)).collect();
            v.map(|v| Tensor::new(v.as_slice(), device).map_err(Error::from))
                .transpose()
        };
        let text = if ex.iter().all(|e| e.text.is_some()) && b > 0 {
            let l_max = ex
                .iter()
                .map(|e| e.text.as_ref().map_or(0, Vec::len))
                .max()
                .unwrap_or(0);
            let mut ids = vec![pad_id; b * l_max];
            let mut tm = vec![0u8; b * l_max];
            for (i, e) in ex.iter().enumerate() {
                for (j, &id) in e.text.iter().flatten().enumerate() {
                    ids[i * l_max + j] = id;
                    tm[i * l_max + j] = 1;
                }
            }
            Some((
                Tensor::from_vec(ids, (b, l_max), device)?,
                Tensor::from_vec(tm, (b, l_max), device)?,
            ))
        } else {
            None
        };
        // Conditioning vectors: zeros (and a 0 in the presence mask) for
        // the examples without one.
        let cond = match ex.iter().find_map(|e| e.cond.as_ref().map(Vec::len)) {
            Some(d) => {
                let mut v = vec![0f32; b * d];
                let mut present = vec![0u8; b];
                for (i, e) in ex.iter().enumerate() {
                    if let Some(c) = &e.cond {
                        if c.len() != d {
                            return Err(Error::invalid(
                                format!("token example {}", indices[i]),
                                format!(
                                    "conditioning vector of {} values, others have {d}",
                                    c.len()
                                ),
                            ));
                        }
                        v[i * d..(i + 1) * d].copy_from_slice(c);
                        present[i] = 1;
                    }
                }
                Some((
                    Tensor::from_vec(v, (b, d), device)?,
                    Tensor::from_vec(present, b, device)?,
                ))
            }
            None => None,
        };
        Ok(TokenBatch {
            codes: Tensor::from_vec(codes, (b, t_max, k), device)?,
            mask: Tensor::from_vec(mask, (b, t_max), device)?,
            lengths: ex.iter().map(|e| e.codes.len()).collect(),
            labels: opt_ids(&|e| e.label)?,
            speakers: opt_ids(&|e| e.speaker)?,
            text,
            cond,
        })
    }
}

/// A padded batch.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// Codes `[batch, max_frames, codebooks]` (u32), padded with `pad_id`.
    pub codes: Tensor,
    /// `[batch, max_frames]` u8, 1 for real frames.
    pub mask: Tensor,
    /// Frames per example.
    pub lengths: Vec<usize>,
    /// Class labels `[batch]`.
    pub labels: Option<Tensor>,
    /// Speaker ids `[batch]`.
    pub speakers: Option<Tensor>,
    /// Text ids `[batch, max_len]` and their mask.
    pub text: Option<(Tensor, Tensor)>,
    /// Conditioning `[batch, dim]` (f32; zeros where absent) and which
    /// examples have one (`[batch]` u8), when any has.
    pub cond: Option<(Tensor, Tensor)>,
}

/// The `data:` section of a token model's config.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenDataConfig {
    /// A token shard, or a folder of shards (as `tokenize` writes).
    pub tokens: PathBuf,
    /// Examples per batch.
    pub batch_size: usize,
    /// Fraction of examples held out for validation (each example by a
    /// stable hash of its index in the shards).
    pub val_fraction: f64,
}

impl crate::Validate for TokenDataConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        if self.batch_size == 0 {
            return Err(("data.batch_size".into(), "must be > 0".into()));
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err((
                "data.val_fraction".into(),
                format!("must be in [0, 1), got {}", self.val_fraction),
            ));
        }
        Ok(())
    }
}

/// A token dataset split into training and held-out examples.
#[derive(Debug, Clone)]
pub struct TokenSplit {
    /// Training examples.
    pub train: TokenDataset,
    /// Held-out examples.
    pub val: TokenDataset,
    /// Class names by label (`classes.json` beside the shards, if any).
    pub class_names: Vec<String>,
    /// The text symbols of the examples' text ids, from id 2
    /// (`symbols.json` beside the shards, as `prepare_tts` writes; empty if
    /// none).
    pub symbols: Vec<String>,
    /// Speaker names by id (`speakers.json` beside the shards, if any).
    pub speaker_names: Vec<String>,
}

impl TokenSplit {
    /// Loads `cfg.tokens` and holds out `val_fraction` of the examples
    /// (example `i` when `SplitMix64(i)`'s first draw is below it: stable
    /// for a given shard order). An empty training set is an error naming
    /// `data.tokens`.
    pub fn open(cfg: &TokenDataConfig) -> Result<Self> {
        let all = TokenDataset::load(std::slice::from_ref(&cfg.tokens))?;
        let (mut train, mut val) = (TokenDataset::default(), TokenDataset::default());
        for (i, e) in all.examples.into_iter().enumerate() {
            if melvae_dsp::SplitMix64::new(i as u64).next_f64() < cfg.val_fraction {
                val.examples.push(e);
            } else {
                train.examples.push(e);
            }
        }
        if train.is_empty() {
            return Err(Error::file(&cfg.tokens, "holds no training examples"));
        }
        Ok(Self {
            train,
            val,
            class_names: side_list(&cfg.tokens, CLASSES_FILE)?,
            symbols: side_list(&cfg.tokens, SYMBOLS_FILE)?,
            speaker_names: side_list(&cfg.tokens, SPEAKERS_FILE)?,
        })
    }
}

/// The JSON list `file` beside the shards `tokens` (a shard or a folder of
/// them; empty when there is none), as [`CLASSES_FILE`], [`SYMBOLS_FILE`]
/// and [`SPEAKERS_FILE`]. An unreadable list is an error naming it.
pub fn side_list(tokens: &Path, file: &str) -> Result<Vec<String>> {
    let path = if tokens.is_dir() {
        tokens.join(file)
    } else {
        tokens.with_file_name(file)
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| Error::file(&path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::file(&path, e)),
    }
}

/// The class names `tokenize` writes beside its shard (a JSON list, index =
/// label).
pub const CLASSES_FILE: &str = "classes.json";

/// The text symbols `prepare_tts` writes beside its shard (a JSON list of
/// single characters; text id = index + 2).
pub const SYMBOLS_FILE: &str = "symbols.json";

/// The speaker names `prepare_tts` writes beside its shard (a JSON list,
/// index = speaker id).
pub const SPEAKERS_FILE: &str = "speakers.json";

/// What [`tokenize_folder`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizeSummary {
    /// Class names (sub-folders), index = label.
    pub classes: Vec<String>,
    /// Examples written per class.
    pub counts: Vec<usize>,
    /// Files skipped, with the reason (unreadable, too short).
    pub skipped: Vec<(PathBuf, String)>,
    /// The shard written.
    pub shard: PathBuf,
}

/// The class sub-folders of `dir` (hidden ones skipped), sorted by name
/// (labels follow this order); none is an error naming `dir`.
pub(crate) fn class_folders(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut classes: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::file(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(Error::file(
            dir,
            "has no sub-folders (one folder of audio per class, or per speaker)",
        ));
    }
    Ok(classes)
}

/// Decoding to mono at `rate`.
pub(crate) fn mono_at(rate: u32) -> melvae_dsp::LoadOptions {
    melvae_dsp::LoadOptions {
        channels: melvae_dsp::ChannelMode::Mono,
        sample_rate: Some(rate),
        quality: Default::default(),
    }
}

/// The log-mels (`[n_mels, frames]`, features `cfg`) of every audio file
/// in the sub-folders of `dir` named as `names`, labelled by their index in
/// `names` (what [`melvae_models::eval::ClassCentroids::fit`] takes). A
/// class without a sub-folder, or a file that cannot be read, is an error
/// naming it.
pub fn class_mels(
    dir: &Path,
    names: &[String],
    cfg: &melvae_dsp::MelConfig,
) -> Result<Vec<(usize, ndarray::Array2<f32>)>> {
    let extractor = melvae_dsp::MelExtractor::new(*cfg)?;
    let opts = mono_at(cfg.sample_rate);
    let mut out = Vec::new();
    for (label, name) in names.iter().enumerate() {
        let folder = dir.join(name);
        if !folder.is_dir() {
            return Err(Error::file(
                &folder,
                format!("no sub-folder for class `{name}`"),
            ));
        }
        for file in melvae_dsp::discover_audio(&folder)? {
            let audio = melvae_dsp::load_audio_with(&file, &opts)?;
            let mel = extractor
                .extract(&audio.mono())
                .map_err(|e| Error::file(&file, e))?;
            out.push((label, mel));
        }
    }
    Ok(out)
}

/// The token rows (`rows` of `cols` codes) of the audio file `file`
/// decoded with `opts` (mono at the model's rate) and encoded by `model`;
/// the reason as text when it cannot be read or is too short.
pub(crate) fn encode_file(
    model: &melvae_models::MelVqVae,
    file: &Path,
    opts: &melvae_dsp::LoadOptions,
) -> std::result::Result<Vec<Vec<u32>>, String> {
    let audio = melvae_dsp::load_audio_with(file, opts).map_err(|e| e.to_string())?;
    let tokens = model
        .encode_audio(&audio.mono(), &Device::Cpu)
        .map_err(|e| e.to_string())?;
    let flat: Vec<u32> = tokens
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .map_err(|e| e.to_string())?;
    Ok(flat.chunks(model.cols()).map(<[u32]>::to_vec).collect())
}

/// Writes `examples` as `out/tokens.safetensors` (creating `out`); returns
/// the shard's path.
pub(crate) fn write_shard_dir(out: &Path, examples: &[TokenExample]) -> Result<PathBuf> {
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, e))?;
    let shard = out.join("tokens.safetensors");
    write_token_shard(&shard, examples)?;
    Ok(shard)
}

/// The last path components of `folders`.
pub(crate) fn folder_names(folders: &[PathBuf]) -> Vec<String> {
    folders
        .iter()
        .map(|c| {
            c.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        })
        .collect()
}

/// Writes `list` as a pretty JSON list at `path`, atomically (the side
/// files [`CLASSES_FILE`], [`SYMBOLS_FILE`], [`SPEAKERS_FILE`]).
pub(crate) fn write_json_list(path: &Path, list: &[String]) -> Result<()> {
    let json = serde_json::to_string_pretty(list).map_err(|e| Error::file(path, e))?;
    melvae_dsp::atomic_write(path, |w| std::io::Write::write_all(w, json.as_bytes()))
        .map_err(|e| Error::file(path, e))
}

/// Tokenizes a folder with one sub-folder per class (the sub-folder's name
/// is the class; labels follow the sorted names) with a trained mel
/// VQ-VAE: every audio file (searched recursively in its class folder) is
/// decoded to mono at the model's rate and encoded to a token grid, stored
/// as one example of `rows` frames of `cols` codes with its label, in
/// `out/tokens.safetensors`, with `out/classes.json`. Unreadable or too
/// short files are skipped and reported; a folder without class
/// sub-folders or without any usable file is an error naming it.
pub fn tokenize_folder(
    model: &melvae_models::MelVqVae,
    dir: &Path,
    out: &Path,
) -> Result<TokenizeSummary> {
    let classes = class_folders(dir)?;
    let opts = mono_at(model.mel_config().sample_rate);
    let (mut examples, mut counts, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for (label, class) in classes.iter().enumerate() {
        let mut n = 0;
        for file in melvae_dsp::discover_audio(class)? {
            match encode_file(model, &file, &opts) {
                Ok(codes) => {
                    examples.push(TokenExample {
                        codes,
                        label: Some(label as u32),
                        speaker: None,
                        text: None,
                        cond: None,
                    });
                    n += 1;
                }
                Err(e) => skipped.push((file, e)),
            }
        }
        counts.push(n);
    }
    if examples.is_empty() {
        return Err(Error::file(dir, "no audio file could be tokenized"));
    }
    let shard = write_shard_dir(out, &examples)?;
    let names = folder_names(&classes);
    write_json_list(&out.join(CLASSES_FILE), &names)?;
    Ok(TokenizeSummary {
        classes: names,
        counts,
        skipped,
        shard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(t: usize, label: u32) -> TokenExample {
        TokenExample {
            codes: (0..t)
                .map(|i| vec![i as u32 + label, 100 + i as u32])
                .collect(),
            label: Some(label),
            speaker: Some(label % 2),
            text: Some((0..label as usize + 1).map(|i| i as u32 + 1).collect()),
            cond: Some(vec![label as f32, -(label as f32)]),
        }
    }

    #[test]
    fn shards_round_trip_and_batch_with_masks() {
        let d = tempfile::tempdir().unwrap();
        let a: Vec<TokenExample> = (0..3).map(|i| ex(2 + i, i as u32)).collect();
        let b: Vec<TokenExample> = (3..5).map(|i| ex(1 + i, i as u32)).collect();
        write_token_shard(&d.path().join("shard-0.safetensors"), &a).unwrap();
        write_token_shard(&d.path().join("shard-1.safetensors"), &b).unwrap();
        let ds = TokenDataset::load(&[d.path().to_path_buf()]).unwrap();
        assert_eq!(ds.examples, [a, b].concat());
        let batch = ds.batch(&[0, 4], 9999, &Device::Cpu).unwrap();
        assert_eq!(batch.codes.dims(), &[2, 5, 2]);
        assert_eq!(batch.lengths, vec![2, 5]);
        assert_eq!(
            batch.mask.to_vec2::<u8>().unwrap(),
            vec![vec![1, 1, 0, 0, 0], vec![1; 5]]
        );
        assert_eq!(
            batch.codes.to_vec3::<u32>().unwrap()[0][2],
            vec![9999, 9999]
        );
        assert_eq!(batch.labels.unwrap().to_vec1::<u32>().unwrap(), vec![0, 4]);
        let (text, tmask) = batch.text.unwrap();
        assert_eq!(
            text.to_vec2::<u32>().unwrap(),
            vec![vec![1, 9999, 9999, 9999, 9999], vec![1, 2, 3, 4, 5]]
        );
        assert_eq!(tmask.to_vec2::<u8>().unwrap()[0], vec![1, 0, 0, 0, 0]);
        let (cond, present) = batch.cond.unwrap();
        assert_eq!(
            cond.to_vec2::<f32>().unwrap(),
            vec![vec![0.0, -0.0], vec![4.0, -4.0]]
        );
        assert_eq!(present.to_vec1::<u8>().unwrap(), vec![1, 1]);
    }

    #[test]
    fn bad_examples_and_shards_are_named() {
        let d = tempfile::tempdir().unwrap();
        let mut v = vec![ex(2, 0), ex(3, 1)];
        v[1].label = None;
        let e = write_token_shard(&d.path().join("x.safetensors"), &v)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("token example 1") && e.contains("`label`"),
            "{e}"
        );
        let mut v = vec![ex(2, 0), ex(3, 1)];
        v[1].codes[1] = vec![1];
        let e = write_token_shard(&d.path().join("x.safetensors"), &v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("token example 1") && e.contains("[T][2]"), "{e}");
        // A shard with inconsistent offsets.
        let p = d.path().join("bad.safetensors");
        let mut m = HashMap::new();
        m.insert(
            "codes".to_string(),
            Tensor::zeros((4, 1), DType::U32, &Device::Cpu).unwrap(),
        );
        m.insert(
            "code_offsets".to_string(),
            Tensor::new(&[0u32, 3, 9], &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&m, &p).unwrap();
        let e = TokenDataset::load(std::slice::from_ref(&p))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad.safetensors") && e.contains("code_offsets"),
            "{e}"
        );
        m.remove("code_offsets");
        candle_core::safetensors::save(&m, &p).unwrap();
        let e = TokenDataset::load(std::slice::from_ref(&p))
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no `code_offsets`"), "{e}");
        std::fs::write(&p, b"not safetensors").unwrap();
        let e = TokenDataset::load(&[p]).unwrap_err().to_string();
        assert!(e.contains("bad.safetensors"), "{e}");
        let e = TokenDataset::load(&[d.path().join("empty_dir_does_not_exist")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty_dir_does_not_exist"), "{e}");
    }

    #[test]
    fn shards_must_agree_with_each_other() {
        let d = tempfile::tempdir().unwrap();
        write_token_shard(&d.path().join("a.safetensors"), &[ex(2, 1)]).unwrap();
        let mut one = ex(2, 1);
        one.codes = vec![vec![1], vec![2]];
        write_token_shard(&d.path().join("b.safetensors"), &[one]).unwrap();
        let e = TokenDataset::load(&[d.path().to_path_buf()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("b.safetensors") && e.contains("1 codebooks"),
            "{e}"
        );
        let mut unlabelled = ex(2, 1);
        unlabelled.label = None;
        write_token_shard(&d.path().join("b.safetensors"), &[unlabelled]).unwrap();
        let e = TokenDataset::load(&[d.path().to_path_buf()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.safetensors") && e.contains("differs"), "{e}");
    }
}
