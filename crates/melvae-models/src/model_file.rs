//! Model files: what leaves a training run.
//!
//! A model file is one safetensors file whose metadata says what it holds,
//! so that `melvae-models` alone can load it:
//!
//! | metadata key | value |
//! | --- | --- |
//! | `format` | [`FORMAT`] |
//! | `family` | the model family, [`Family::NAME`] (e.g. `mel_vae`) |
//! | `config` | the family's config as JSON |
//! | `melvae_version` | the version of melvae that wrote it |
//! | anything else | provenance written by the exporter (`weights`: `ema` or `raw`, `step`, `source`) |
//!
//! The tensors are exactly the model's parameters under their checkpoint
//! names. [`load`] memory-maps the file and builds the model from plain
//! tensors (not `Var`s): inference tracks no gradients, and on CUDA in
//! half precision attention can take the flash path. Loading never writes
//! to disk and works on read-only files. A missing tensor, a tensor of the
//! wrong shape and a tensor the model does not use are errors that name the
//! file and the tensor.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Error, Result};

/// The `format` metadata value of model files written by this version.
pub const FORMAT: &str = "melvae-model/1";

/// A model family that lives in model files: its name and its config.
pub trait Family: Sized {
    /// The `family` metadata value, e.g. `mel_vae`.
    const NAME: &'static str;
    /// The family's configuration, stored as JSON in the file.
    type Config: Serialize + DeserializeOwned + Clone;
    /// Builds the model from `cfg`, every parameter from `vb`.
    fn build(cfg: Self::Config, vb: VarBuilder) -> Result<Self>;
}

/// What a model file's metadata says.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFileInfo {
    /// The file.
    pub path: PathBuf,
    /// The model family.
    pub family: String,
    /// The family's config (JSON).
    pub config: serde_json::Value,
    /// The melvae version that wrote the file.
    pub melvae_version: String,
    /// Every metadata entry, including the ones above.
    pub metadata: BTreeMap<String, String>,
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::ModelFile {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Reads the header of a model file (not its tensors).
pub fn read_info(path: &Path) -> Result<ModelFileInfo> {
    let mut f = std::fs::File::open(path).map_err(|e| file_err(path, e))?;
    let size = f.metadata().map_err(|e| file_err(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| file_err(path, "is not a safetensors file (shorter than its header)"))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || n + 8 > size {
        return Err(file_err(
            path,
            format!("is not a safetensors file (header of {n} bytes in a file of {size})"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| file_err(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| file_err(path, format!("is not a safetensors file: {e}")))?;
    let metadata: BTreeMap<String, String> = match header.get("__metadata__") {
        Some(serde_json::Value::Object(m)) => m
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect(),
        _ => BTreeMap::new(),
    };
    let get = |key: &str| -> Result<String> {
        metadata.get(key).cloned().ok_or_else(|| {
            file_err(
                path,
                format!(
                    "has no `{key}` in its metadata: not a melvae model file (a training \
                     checkpoint? export one with the export program)"
                ),
            )
        })
    };
    let format = get("format")?;
    if format != FORMAT {
        return Err(file_err(
            path,
            format!("has format `{format}`; this melvae reads `{FORMAT}`"),
        ));
    }
    let config = serde_json::from_str(&get("config")?)
        .map_err(|e| file_err(path, format!("metadata `config` is not JSON: {e}")))?;
    Ok(ModelFileInfo {
        path: path.to_path_buf(),
        family: get("family")?,
        config,
        melvae_version: get("melvae_version")?,
        metadata,
    })
}

/// Checks that `dtype` can run on `device`: f32 and f64 anywhere, bf16 and
/// f16 on CUDA only (candle has no half-precision matmul on the CPU).
pub fn check_dtype(device: &Device, dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F64 => Ok(()),
        DType::BF16 | DType::F16 if device.is_cuda() => Ok(()),
        DType::BF16 | DType::F16 => Err(Error::invalid(
            "dtype",
            format!("{dtype:?} needs a CUDA device (candle has no half-precision matmul on the CPU); use f32"),
        )),
        other => Err(Error::invalid(
            "dtype",
            format!("{other:?}: expected f32, f64, bf16 or f16"),
        )),
    }
}

/// Where a model's tensors come from while it is built.
enum Tensors {
    Mapped(MmapedSafetensors),
    Owned(HashMap<String, Tensor>),
}

/// A `VarBuilder` backend that serves plain tensors, checks shapes and
/// records which names the model asked for, and the first failure.
struct Source {
    tensors: Tensors,
    origin: PathBuf,
    used: Mutex<BTreeSet<String>>,
    failure: Mutex<Option<String>>,
}

impl Source {
    fn names(&self) -> Vec<String> {
        match &self.tensors {
            Tensors::Mapped(m) => m.tensors().into_iter().map(|(n, _)| n).collect(),
            Tensors::Owned(m) => m.keys().cloned().collect(),
        }
    }

    fn fail(&self, reason: String) -> candle_core::Error {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert_with(|| reason.clone());
        }
        candle_core::Error::Msg(format!("{}: {reason}", self.origin.display()))
    }

    fn fetch(&self, name: &str, dev: &Device) -> candle_core::Result<Option<Tensor>> {
        Ok(match &self.tensors {
            Tensors::Mapped(m) => match m.get(name) {
                Ok(_) => Some(m.load(name, dev)?),
                Err(_) => None,
            },
            Tensors::Owned(m) => match m.get(name) {
                Some(t) => Some(t.to_device(dev)?.detach()),
                None => None,
            },
        })
    }
}

struct Backend(Arc<Source>);

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(self.0.fail(format!(
                "tensor `{name}` has shape {:?}, the model expects {:?}",
                t.dims(),
                s.dims()
            )));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(t) = self.0.fetch(name, dev)? else {
            return Err(self.0.fail(format!("has no tensor `{name}`")));
        };
        if let Ok(mut u) = self.0.used.lock() {
            u.insert(name.to_string());
        }
        t.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match &self.0.tensors {
            Tensors::Mapped(m) => m.get(name).is_ok(),
            Tensors::Owned(m) => m.contains_key(name),
        }
    }
}

/// Builds `F` from `tensors`, requiring that it uses every one of them
/// unless `allow_unused`; returns the model and the names it used.
fn build<F: Family>(
    cfg: F::Config,
    tensors: Tensors,
    origin: &Path,
    device: &Device,
    dtype: DType,
    allow_unused: bool,
) -> Result<(F, BTreeSet<String>)> {
    check_dtype(device, dtype)?;
    let source = Arc::new(Source {
        tensors,
        origin: origin.to_path_buf(),
        used: Mutex::new(BTreeSet::new()),
        failure: Mutex::new(None),
    });
    let vb = VarBuilder::from_backend(Box::new(Backend(source.clone())), dtype, device.clone());
    let built = F::build(cfg, vb);
    let failure = source.failure.lock().ok().and_then(|f| f.clone());
    let model = match (built, failure) {
        (Ok(m), _) => m,
        (Err(_), Some(reason)) => return Err(file_err(origin, reason)),
        // Anything else (an invalid config, say) is still this file's.
        (Err(e), None) => return Err(file_err(origin, e)),
    };
    let used = source.used.lock().map(|u| u.clone()).unwrap_or_default();
    if !allow_unused {
        let unused: Vec<String> = source
            .names()
            .into_iter()
            .filter(|n| !used.contains(n))
            .collect();
        if !unused.is_empty() {
            let shown: Vec<&str> = unused.iter().take(5).map(String::as_str).collect();
            return Err(file_err(
                origin,
                format!(
                    "holds {} tensor(s) the {} model does not use ({}{}): a different \
                     config or family?",
                    unused.len(),
                    F::NAME,
                    shown.join(", "),
                    if unused.len() > 5 { ", ..." } else { "" }
                ),
            ));
        }
    }
    Ok((model, used))
}

/// Loads a model file as `F` on `device` in `dtype`, with the config it
/// holds. The file is memory-mapped (it must not be modified while the
/// model lives); the model holds plain tensors.
pub fn load<F: Family>(path: &Path, device: &Device, dtype: DType) -> Result<(F, F::Config)> {
    let info = read_info(path)?;
    if info.family != F::NAME {
        return Err(file_err(
            path,
            format!("holds a `{}` model, not a `{}` model", info.family, F::NAME),
        ));
    }
    let cfg: F::Config = serde_json::from_value(info.config.clone())
        .map_err(|e| file_err(path, format!("metadata `config`: {e}")))?;
    // SAFETY: the mapping is read-only; the documented contract is that the
    // file is not modified while the model lives (as candle's own loaders).
    let mapped = unsafe { MmapedSafetensors::new(path) }.map_err(|e| file_err(path, e))?;
    let (model, _) = build::<F>(
        cfg.clone(),
        Tensors::Mapped(mapped),
        path,
        device,
        dtype,
        false,
    )?;
    Ok((model, cfg))
}

/// Builds `F` from named tensors (e.g. a training checkpoint's) as plain
/// tensors on `device` in `dtype`; `origin` names the source in errors.
/// Tensors the model does not use (a discriminator's, say) are ignored.
pub fn from_tensors<F: Family>(
    cfg: F::Config,
    tensors: &HashMap<String, Tensor>,
    origin: &Path,
    device: &Device,
    dtype: DType,
) -> Result<F> {
    Ok(build::<F>(
        cfg,
        Tensors::Owned(tensors.clone()),
        origin,
        device,
        dtype,
        true,
    )?
    .0)
}

/// Writes a model file of `F` with `cfg` and the model's parameters taken
/// from `tensors` (extra tensors, such as a discriminator's, are left out;
/// missing ones are an error naming them), plus `extra` metadata. Tensors
/// keep their dtype. The write is atomic (temporary file, fsync, rename).
/// `origin` names where the tensors came from, in errors.
pub fn save<F: Family>(
    path: &Path,
    cfg: &F::Config,
    tensors: &HashMap<String, Tensor>,
    extra: &BTreeMap<String, String>,
    origin: &Path,
) -> Result<()> {
    // Building the model checks every tensor it needs and tells which
    // tensors are its own.
    let (_, used) = build::<F>(
        cfg.clone(),
        Tensors::Owned(tensors.clone()),
        origin,
        &Device::Cpu,
        DType::F32,
        true,
    )?;
    let mut metadata: HashMap<String, String> =
        extra.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let config =
        serde_json::to_string(cfg).map_err(|e| Error::invalid("model config", e.to_string()))?;
    metadata.insert("format".into(), FORMAT.into());
    metadata.insert("family".into(), F::NAME.into());
    metadata.insert("config".into(), config);
    metadata.insert("melvae_version".into(), env!("CARGO_PKG_VERSION").into());
    let mut data: Vec<(String, Tensor)> = Vec::with_capacity(used.len());
    for name in used {
        let t = tensors
            .get(&name)
            .ok_or_else(|| file_err(origin, format!("has no tensor `{name}`")))?;
        data.push((name, t.to_device(&Device::Cpu)?.contiguous()?));
    }
    let bytes = safetensors::serialize(data.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
        .map_err(|e| file_err(path, e))?;
    melvae_dsp::atomic_write(path, |w| std::io::Write::write_all(w, &bytes))?;
    Ok(())
}
