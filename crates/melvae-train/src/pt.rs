//! The Echolancer seed's data format: one `torch.save`d dict per example
//! (`.pt`, PyTorch's zip format) holding `text` (token ids, 1-D), `mel`
//! (spectrogram token ids, any shape, read flat), `speaker` (a Python int
//! or a one-element tensor; 0 when absent) and optionally `emotion` (a
//! float vector).
//!
//! candle's pickle reader ([`candle_core::pickle`]) parses the pickle, but
//! its tensor loader skips plain Python values and int32/int16/int8
//! storages, so the tensors are read here from the pickle's storage
//! references: any integer or float storage, contiguous, little-endian.
//! Errors name the file and the key.

use std::io::Read;
use std::path::Path;

use candle_core::pickle::{Object, Stack};

use crate::tokens::TokenExample;
use crate::{Error, Result};

/// A `.pt` file's zip archive, its pickle's top-level dict and the
/// archive's record prefix (`full` of `full/data.pkl`).
struct PtFile {
    zip: zip::ZipArchive<std::io::BufReader<std::fs::File>>,
    prefix: String,
    dict: Vec<(String, Object)>,
}

/// A tensor's values, as its storage holds them.
enum Numbers {
    Ints(Vec<i64>),
    Floats(Vec<f64>),
}

fn open(path: &Path) -> Result<PtFile> {
    let bad = |why: String| Error::file(path, why);
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| bad(format!("not a PyTorch zip file ({e})")))?;
    let name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| bad("holds no data.pkl (not a torch.save file)".into()))?;
    let mut bytes = Vec::new();
    zip.by_name(&name)
        .map_err(|e| bad(e.to_string()))?
        .read_to_end(&mut bytes)
        .map_err(|e| bad(format!("{name}: {e}")))?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut std::io::Cursor::new(bytes))
        .map_err(|e| bad(format!("unreadable pickle: {e}")))?;
    let obj = stack
        .finalize()
        .map_err(|e| bad(format!("unreadable pickle: {e}")))?;
    let Object::Dict(kv) = obj else {
        return Err(bad(
            "holds no dict (the seed saves one dict per example)".into()
        ));
    };
    let dict = kv
        .into_iter()
        .filter_map(|(k, v)| match k {
            Object::Unicode(k) => Some((k, v)),
            _ => None,
        })
        .collect();
    let prefix: String = name
        .trim_end_matches("data.pkl")
        .trim_end_matches('/')
        .into();
    // Storages are little-endian unless the archive says otherwise.
    if let Ok(mut f) = zip.by_name(&format!("{prefix}/byteorder")) {
        let mut order = String::new();
        if f.read_to_string(&mut order).is_ok() && order.trim() == "big" {
            return Err(bad("holds big-endian storages (not supported)".into()));
        }
    }
    Ok(PtFile { zip, prefix, dict })
}

fn usize_of(o: &Object) -> Option<usize> {
    match o {
        Object::Int(i) => usize::try_from(*i).ok(),
        Object::Long(i) => usize::try_from(*i).ok(),
        _ => None,
    }
}

fn usizes(o: &Object) -> Option<Vec<usize>> {
    match o {
        Object::Tuple(v) | Object::List(v) => v.iter().map(usize_of).collect(),
        _ => None,
    }
}

impl PtFile {
    fn get(&self, key: &str) -> Option<&Object> {
        self.dict.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The values of the tensor `obj` (a `torch._utils._rebuild_tensor_v2`
    /// reduction), or `Ok(None)` when `obj` is not a tensor.
    fn tensor(&mut self, obj: &Object) -> std::result::Result<Option<Numbers>, String> {
        let Object::Reduce { callable, args } = obj else {
            return Ok(None);
        };
        match callable.as_ref() {
            Object::Class {
                module_name,
                class_name,
            } if module_name == "torch._utils" && class_name == "_rebuild_tensor_v2" => {}
            _ => return Ok(None),
        }
        let Object::Tuple(args) = args.as_ref() else {
            return Err("malformed tensor record".into());
        };
        let (Some(Object::PersistentLoad(storage)), Some(offset), Some(shape), Some(stride)) = (
            args.first(),
            args.get(1).and_then(usize_of),
            args.get(2).and_then(usizes),
            args.get(3).and_then(usizes),
        ) else {
            return Err("malformed tensor record".into());
        };
        let Object::Tuple(st) = storage.as_ref() else {
            return Err("malformed storage record".into());
        };
        let (Some(Object::Class { class_name, .. }), Some(Object::Unicode(key))) =
            (st.get(1), st.get(2))
        else {
            return Err("malformed storage record".into());
        };
        if shape.len() != stride.len() {
            return Err(format!(
                "shape {shape:?} and stride {stride:?} differ in rank"
            ));
        }
        let malformed = || "malformed tensor record (sizes overflow)".to_string();
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(malformed)?;
        // Contiguous (row-major) layouts only, as torch.save writes fresh
        // tensors.
        let mut expect = 1usize;
        for (d, s) in shape.iter().zip(&stride).rev() {
            if *d > 1 && *s != expect {
                return Err(format!("a non-contiguous tensor (stride {stride:?})"));
            }
            expect = expect.checked_mul(*d).ok_or_else(malformed)?;
        }
        let size = match class_name.as_str() {
            "LongStorage" | "DoubleStorage" => 8,
            "IntStorage" | "FloatStorage" => 4,
            "ShortStorage" | "HalfStorage" | "BFloat16Storage" => 2,
            "CharStorage" | "ByteStorage" | "BoolStorage" => 1,
            other => return Err(format!("unsupported storage {other}")),
        };
        let entry = format!("{}/data/{key}", self.prefix);
        let mut bytes = Vec::new();
        self.zip
            .by_name(&entry)
            .map_err(|e| format!("{entry}: {e}"))?
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{entry}: {e}"))?;
        let (a, b) = offset
            .checked_mul(size)
            .zip(offset.checked_add(numel).and_then(|e| e.checked_mul(size)))
            .ok_or_else(malformed)?;
        let raw = bytes
            .get(a..b)
            .ok_or_else(|| format!("{entry} holds {} bytes, the tensor needs {b}", bytes.len()))?;
        let chunks = raw.chunks_exact(size);
        let le = |c: &[u8]| {
            let mut a = [0u8; 8];
            a[..c.len()].copy_from_slice(c);
            a
        };
        Ok(Some(match class_name.as_str() {
            "LongStorage" => Numbers::Ints(chunks.map(|c| i64::from_le_bytes(le(c))).collect()),
            "IntStorage" => Numbers::Ints(
                chunks
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                    .collect(),
            ),
            "ShortStorage" => Numbers::Ints(
                chunks
                    .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
                    .collect(),
            ),
            "CharStorage" => Numbers::Ints(chunks.map(|c| c[0] as i8 as i64).collect()),
            "ByteStorage" | "BoolStorage" => Numbers::Ints(chunks.map(|c| c[0] as i64).collect()),
            "DoubleStorage" => Numbers::Floats(chunks.map(|c| f64::from_le_bytes(le(c))).collect()),
            "FloatStorage" => Numbers::Floats(
                chunks
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                    .collect(),
            ),
            "HalfStorage" => Numbers::Floats(
                chunks
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                    .collect(),
            ),
            _ => Numbers::Floats(
                chunks
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                    .collect(),
            ),
        }))
    }
}

/// Reads one example of the seed's format (see the module docs): `text`
/// and `mel` as ids (integers in 0..2^32), the speaker, the emotion. The
/// tokens become one code per frame (`codes` `[len][1]`).
pub fn read_pt_example(path: &Path) -> Result<TokenExample> {
    let mut f = open(path)?;
    let key_err = |key: &str, why: String| Error::file(path, format!("`{key}`: {why}"));
    let mut numbers = |key: &str| -> Result<Option<Numbers>> {
        match f.get(key).cloned() {
            None => Ok(None),
            Some(obj) => match f.tensor(&obj).map_err(|e| key_err(key, e))? {
                Some(n) => Ok(Some(n)),
                None => Err(key_err(key, "is not a tensor".into())),
            },
        }
    };
    let ids = |key: &str, n: Option<Numbers>| -> Result<Vec<u32>> {
        let v = match n {
            Some(Numbers::Ints(v)) => v,
            Some(Numbers::Floats(_)) => {
                return Err(key_err(key, "holds floats, not token ids".into()))
            }
            None => {
                return Err(key_err(
                    key,
                    "missing (the seed's format needs `text` and `mel`)".into(),
                ))
            }
        };
        let out: Vec<u32> = v
            .into_iter()
            .map(|x| {
                u32::try_from(x).map_err(|_| key_err(key, format!("id {x} is not in 0..2^32")))
            })
            .collect::<Result<_>>()?;
        if out.is_empty() {
            return Err(key_err(key, "is empty".into()));
        }
        Ok(out)
    };
    let text = ids("text", numbers("text")?)?;
    let mel = ids("mel", numbers("mel")?)?;
    let emotion = match numbers("emotion")? {
        None => None,
        Some(Numbers::Floats(v)) => Some(v.into_iter().map(|x| x as f32).collect()),
        Some(Numbers::Ints(v)) => Some(v.into_iter().map(|x| x as f32).collect()),
    };
    let speaker = match f.get("speaker").cloned() {
        None => 0,
        Some(Object::Int(i)) => {
            u32::try_from(i).map_err(|_| key_err("speaker", format!("{i} is negative")))?
        }
        Some(Object::Long(i)) => {
            u32::try_from(i).map_err(|_| key_err("speaker", format!("{i} is not in 0..2^32")))?
        }
        Some(obj) => match f.tensor(&obj).map_err(|e| key_err("speaker", e))? {
            Some(Numbers::Ints(v)) if v.len() == 1 => u32::try_from(v[0])
                .map_err(|_| key_err("speaker", format!("{} is negative", v[0])))?,
            _ => {
                return Err(key_err(
                    "speaker",
                    "must be an int or a one-element integer tensor".into(),
                ))
            }
        },
    };
    Ok(TokenExample {
        codes: mel.into_iter().map(|t| vec![t]).collect(),
        label: None,
        speaker: Some(speaker),
        text: Some(text),
        cond: emotion,
    })
}
