//! YAML configuration: defaults per model family, experiment settings on
//! top, command-line overrides on top of that, deserialised into typed
//! structs with errors that name the file, the key path and what was
//! expected.
//!
//! Layout (as the Python systems melvae replaces):
//!
//! ```text
//! configs/defaults/<family>.yaml   reference values; each file holds its own
//!                                  top-level sections (`training:`, `convformer:`, ...)
//! configs/settings/<name>.yaml     an experiment: `defaults: [train, convformer]`
//!                                  names the defaults it builds on (files in
//!                                  ../defaults/), the rest overrides them
//! key=value on the command line    dotted paths: `training.learning_rate=1e-4`
//! ```
//!
//! Maps merge recursively; any other value (including lists) replaces the
//! earlier one. Override values are parsed as YAML (`1e-4`, `true`, `[1, 2]`,
//! `null`, strings).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

use crate::{Error, Result};

/// A merged configuration and where each key came from.
#[derive(Debug, Clone)]
pub struct ResolvedConfig {
    /// The merged YAML tree.
    pub value: Value,
    /// For every dotted key path (maps and leaves), the file or
    /// command-line argument that set it last.
    pub origins: BTreeMap<String, String>,
    /// The files read, in merge order.
    pub files: Vec<PathBuf>,
}

fn read_yaml(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    let v: Value = serde_yaml::from_str(&text)
        .map_err(|e| Error::file(path, format!("not valid YAML: {e}")))?;
    match v {
        Value::Null => Ok(Value::Mapping(Mapping::new())),
        Value::Mapping(_) => Ok(v),
        _ => Err(Error::file(path, "the top level must be a map of sections")),
    }
}

fn key_str(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// Merges `src` into `dst`, recording `origin` for every path it sets.
fn merge(
    dst: &mut Value,
    src: Value,
    prefix: &str,
    origin: &str,
    origins: &mut BTreeMap<String, String>,
) {
    match (dst, src) {
        (Value::Mapping(d), Value::Mapping(s)) => {
            for (k, v) in s {
                let path = if prefix.is_empty() {
                    key_str(&k)
                } else {
                    format!("{prefix}.{}", key_str(&k))
                };
                match d.get_mut(&k) {
                    Some(existing) if existing.is_mapping() && v.is_mapping() => {
                        origins.insert(path.clone(), origin.to_string());
                        merge(existing, v, &path, origin, origins);
                    }
                    _ => {
                        record(&v, &path, origin, origins);
                        d.insert(k, v);
                    }
                }
            }
        }
        (d, s) => *d = s,
    }
}

fn record(v: &Value, path: &str, origin: &str, origins: &mut BTreeMap<String, String>) {
    origins.insert(path.to_string(), origin.to_string());
    if let Value::Mapping(m) = v {
        for (k, child) in m {
            record(child, &format!("{path}.{}", key_str(k)), origin, origins);
        }
    }
}

impl ResolvedConfig {
    /// Loads `settings` (an experiment file), the defaults it names (from
    /// `<settings dir>/../defaults/<name>.yaml`), and applies `overrides`
    /// (`dotted.key=value`).
    pub fn load(settings: &Path, overrides: &[String]) -> Result<Self> {
        let mut exp = read_yaml(settings)?;
        let names: Vec<String> = match exp.as_mapping_mut().and_then(|m| m.remove("defaults")) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Sequence(seq)) => seq
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(Error::Config {
                        origin: settings.display().to_string(),
                        key: "defaults".into(),
                        reason: format!(
                            "expected a list of default names, found {}",
                            serde_yaml::to_string(&other).unwrap_or_default().trim()
                        ),
                    }),
                })
                .collect::<Result<_>>()?,
            Some(Value::String(s)) => vec![s],
            Some(_) => {
                return Err(Error::Config {
                    origin: settings.display().to_string(),
                    key: "defaults".into(),
                    reason: "expected a list of default names".into(),
                })
            }
        };
        let dir = settings.parent().unwrap_or(Path::new("."));
        let defaults_dir = dir.join("..").join("defaults");
        let mut resolved = Self {
            value: Value::Mapping(Mapping::new()),
            origins: BTreeMap::new(),
            files: Vec::new(),
        };
        for name in names {
            let path = defaults_dir.join(format!("{name}.yaml"));
            if !path.exists() {
                return Err(Error::Config {
                    origin: settings.display().to_string(),
                    key: "defaults".into(),
                    reason: format!("default `{name}` not found (looked for {})", path.display()),
                });
            }
            resolved.apply(read_yaml(&path)?, &path.display().to_string());
            resolved.files.push(path);
        }
        resolved.apply(exp, &settings.display().to_string());
        resolved.files.push(settings.to_path_buf());
        for o in overrides {
            resolved.override_key(o)?;
        }
        Ok(resolved)
    }

    /// A config from one YAML string (for tests and programs that build
    /// configs in code); `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self> {
        let v: Value = serde_yaml::from_str(text)
            .map_err(|e| Error::invalid(origin, format!("not valid YAML: {e}")))?;
        let mut r = Self {
            value: Value::Mapping(Mapping::new()),
            origins: BTreeMap::new(),
            files: Vec::new(),
        };
        r.apply(v, origin);
        Ok(r)
    }

    fn apply(&mut self, v: Value, origin: &str) {
        merge(&mut self.value, v, "", origin, &mut self.origins);
    }

    /// Applies one `dotted.key=value` override.
    pub fn override_key(&mut self, arg: &str) -> Result<()> {
        let (key, raw) = arg.split_once('=').ok_or_else(|| {
            Error::invalid(format!("override `{arg}`"), "expected dotted.key=value")
        })?;
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(Error::invalid(
                format!("override `{arg}`"),
                "the key is empty or has an empty part",
            ));
        }
        let value: Value = serde_yaml::from_str(raw).map_err(|e| {
            Error::invalid(
                format!("override `{arg}`"),
                format!("value is not YAML: {e}"),
            )
        })?;
        let mut tree = value;
        for part in key.rsplit('.') {
            let mut m = Mapping::new();
            m.insert(Value::String(part.to_string()), tree);
            tree = Value::Mapping(m);
        }
        self.apply(tree, &format!("command-line override `{arg}`"));
        Ok(())
    }

    /// Where `key` (or its nearest ancestor) was set.
    pub fn origin_of(&self, key: &str) -> String {
        let mut k = key.to_string();
        loop {
            if let Some(o) = self.origins.get(&k) {
                return o.clone();
            }
            match k.rfind('.') {
                Some(i) => k.truncate(i),
                None => {
                    let files: Vec<String> =
                        self.files.iter().map(|f| f.display().to_string()).collect();
                    return if files.is_empty() {
                        "config".into()
                    } else {
                        format!("config ({})", files.join(" + "))
                    };
                }
            }
        }
    }

    /// Deserialises the section `section` (or the whole tree for `""`)
    /// into `T`; unknown keys (with `deny_unknown_fields`), wrong types and
    /// missing keys are errors naming the origin, the key path and the
    /// expectation. Then runs `T::validate`.
    pub fn get<T: DeserializeOwned + Validate>(&self, section: &str) -> Result<T> {
        let v = if section.is_empty() {
            self.value.clone()
        } else {
            self.value
                .get(section)
                .cloned()
                .ok_or_else(|| Error::Config {
                    origin: self.origin_of(section),
                    key: section.into(),
                    reason: "section missing".into(),
                })?
        };
        let t: T = serde_path_to_error::deserialize(v).map_err(|e| {
            let inner = e.path().to_string();
            let key = match (section.is_empty(), inner.as_str()) {
                (true, p) => p.to_string(),
                (false, ".") | (false, "") => section.to_string(),
                (false, p) => format!("{section}.{p}"),
            };
            Error::Config {
                origin: self.origin_of(&key),
                key,
                reason: e.into_inner().to_string(),
            }
        })?;
        t.validate().map_err(|(field, reason)| {
            let key = if section.is_empty() {
                field.to_string()
            } else {
                format!("{section}.{field}")
            };
            Error::Config {
                origin: self.origin_of(&key),
                key,
                reason,
            }
        })?;
        Ok(t)
    }

    /// The merged YAML text, as written to a run's `config.yaml`.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(&self.value).unwrap_or_default()
    }

    /// Writes the merged config to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = self.to_yaml();
        melvae_dsp::atomic_write(path, |w| std::io::Write::write_all(w, text.as_bytes()))?;
        Ok(())
    }
}

/// Semantic checks after deserialisation; the error names the field
/// (relative to the section) and the reason.
pub trait Validate {
    /// `Err((field, reason))` for the first invalid field.
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        Ok(())
    }
}

/// `Err((field, reason))` unless `ok`.
pub fn check(
    ok: bool,
    field: &str,
    reason: impl FnOnce() -> String,
) -> std::result::Result<(), (String, String)> {
    if ok {
        Ok(())
    } else {
        Err((field.to_string(), reason()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Training {
        learning_rate: f64,
        steps: u64,
        #[serde(default)]
        betas: Option<(f64, f64)>,
        schedule: Schedule,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Schedule {
        kind: String,
        warmup: u64,
    }

    impl Validate for Training {
        fn validate(&self) -> std::result::Result<(), (String, String)> {
            check(self.learning_rate > 0.0, "learning_rate", || {
                format!("must be > 0, got {}", self.learning_rate)
            })
        }
    }

    fn write(dir: &Path, rel: &str, text: &str) -> PathBuf {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "defaults/train.yaml", "training:\n  learning_rate: 1.0e-3\n  steps: 100\n  schedule:\n    kind: cosine\n    warmup: 10\n");
        write(d.path(), "defaults/model.yaml", "model:\n  dim: 64\n");
        let s = write(
            d.path(),
            "settings/exp.yaml",
            "defaults: [train, model]\ntraining:\n  steps: 500\n  schedule:\n    warmup: 50\n",
        );
        (d, s)
    }

    #[test]
    fn merge_and_override_order() {
        let (_d, s) = setup();
        let r = ResolvedConfig::load(
            &s,
            &["training.learning_rate=2e-4".into(), "model.dim=32".into()],
        )
        .unwrap();
        let t: Training = r.get("training").unwrap();
        assert_eq!(
            t,
            Training {
                learning_rate: 2e-4,
                steps: 500,
                betas: None,
                schedule: Schedule {
                    kind: "cosine".into(),
                    warmup: 50
                }
            }
        );
        assert!(r.origin_of("training.steps").ends_with("exp.yaml"));
        assert!(r
            .origin_of("training.schedule.kind")
            .ends_with("train.yaml"));
        assert!(r.origin_of("model.dim").contains("model.dim=32"));
        assert!(r.to_yaml().contains("dim: 32"));
        let r = ResolvedConfig::load(&s, &["training.betas=[0.8, 0.99]".into()]).unwrap();
        assert_eq!(
            r.get::<Training>("training").unwrap().betas,
            Some((0.8, 0.99))
        );
    }

    #[test]
    fn errors_name_file_key_and_expectation() {
        let (d, s) = setup();
        let cases: Vec<(Vec<String>, &str, &str, &str)> = vec![
            (
                vec!["training.learning_rate=fast".into()],
                "training.learning_rate",
                "learning_rate=fast",
                "expected f64",
            ),
            (
                vec!["training.lerning_rate=1".into()],
                "training.lerning_rate",
                "lerning_rate",
                "unknown field `lerning_rate`, expected one of",
            ),
            (
                vec!["training.schedule.warmup=-3".into()],
                "training.schedule.warmup",
                "warmup=-3",
                "u64",
            ),
            (
                vec!["training.learning_rate=0".into()],
                "training.learning_rate",
                "learning_rate=0",
                "must be > 0",
            ),
        ];
        for (ov, key, origin, reason) in cases {
            let r = ResolvedConfig::load(&s, &ov).unwrap();
            let e = r.get::<Training>("training").unwrap_err().to_string();
            assert!(
                e.contains(&format!("key `{key}`")) && e.contains(origin) && e.contains(reason),
                "{ov:?}: {e}"
            );
        }
        // A wrong type in a file names that file.
        let bad = write(
            d.path(),
            "settings/bad.yaml",
            "defaults: [train]\ntraining:\n  steps: many\n",
        );
        let e = ResolvedConfig::load(&bad, &[])
            .unwrap()
            .get::<Training>("training")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad.yaml") && e.contains("training.steps") && e.contains("u64"),
            "{e}"
        );
        // A missing field names the section and the files.
        let missing = write(
            d.path(),
            "settings/missing.yaml",
            "training:\n  learning_rate: 1.0\n",
        );
        let e = ResolvedConfig::load(&missing, &[])
            .unwrap()
            .get::<Training>("training")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing field `steps`") && e.contains("missing.yaml"),
            "{e}"
        );
        let e = ResolvedConfig::load(&s, &[])
            .unwrap()
            .get::<Training>("nope")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("key `nope`") && e.contains("section missing"),
            "{e}"
        );
        let nodef = write(d.path(), "settings/nodef.yaml", "defaults: [trian]\n");
        let e = ResolvedConfig::load(&nodef, &[]).unwrap_err().to_string();
        assert!(
            e.contains("nodef.yaml") && e.contains("default `trian` not found"),
            "{e}"
        );
        let broken = write(d.path(), "settings/broken.yaml", "training: [unclosed\n");
        let e = ResolvedConfig::load(&broken, &[]).unwrap_err().to_string();
        assert!(
            e.contains("broken.yaml") && e.contains("not valid YAML"),
            "{e}"
        );
        let e = ResolvedConfig::load(&d.path().join("settings/absent.yaml"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.yaml"), "{e}");
        for bad in ["training.steps", "=3", "a..b=1"] {
            let e = ResolvedConfig::load(&s, &[bad.to_string()])
                .unwrap_err()
                .to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn resolved_config_round_trips() {
        let (d, s) = setup();
        let r = ResolvedConfig::load(&s, &["model.dim=8".into()]).unwrap();
        let out = d.path().join("run/config.yaml");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        r.save(&out).unwrap();
        let again =
            ResolvedConfig::from_yaml(&std::fs::read_to_string(&out).unwrap(), "saved").unwrap();
        assert_eq!(again.value, r.value);
    }
}
