//! [`TrainTask`](crate::TrainTask) implementations of melvae's model
//! families, and what is family-specific about a run's config: which
//! family it trains, which top-level sections it may have, and how its
//! weights become a model file.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use melvae_models::{model_file, MelVae};

use crate::config::ResolvedConfig;
use crate::{Error, Result};

pub mod mel_vae;
pub mod wave_vae;

/// Top-level config sections every run may have.
pub const COMMON_SECTIONS: &[&str] = &["training", "data"];

/// The model families `train` knows and the config sections that select
/// and configure each.
pub const FAMILIES: &[(&str, &[&str])] = &[("mel_vae", &["convformer", "cfm"])];

/// The model family a resolved config trains, after checking that every
/// top-level section is known (an unknown one is an error naming it and
/// where it was set).
pub fn family_of(cfg: &ResolvedConfig) -> Result<&'static str> {
    let sections: Vec<String> = cfg
        .value
        .as_mapping()
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let known = |s: &str| {
        COMMON_SECTIONS.contains(&s) || FAMILIES.iter().any(|(_, secs)| secs.contains(&s))
    };
    if let Some(bad) = sections.iter().find(|s| !known(s)) {
        let all: Vec<&str> = COMMON_SECTIONS
            .iter()
            .copied()
            .chain(FAMILIES.iter().flat_map(|(_, s)| s.iter().copied()))
            .collect();
        return Err(Error::Config {
            origin: cfg.origin_of(bad),
            key: bad.clone(),
            reason: format!("unknown section (known: {})", all.join(", ")),
        });
    }
    let found: Vec<&'static str> = FAMILIES
        .iter()
        .filter(|(_, secs)| secs.iter().any(|s| sections.iter().any(|x| x == s)))
        .map(|(name, _)| *name)
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(Error::Config {
            origin: cfg.origin_of(""),
            key: "(top level)".into(),
            reason: format!(
                "no model section: expected the sections of one family ({})",
                FAMILIES
                    .iter()
                    .map(|(n, s)| format!("{n}: {}", s.join(" + ")))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }),
        many => Err(Error::Config {
            origin: cfg.origin_of(""),
            key: "(top level)".into(),
            reason: format!("sections of several families: {}", many.join(", ")),
        }),
    }
}

/// Writes a model file at `out` for the family of `cfg` from `tensors`
/// (the model's own are selected; `origin` names their source in errors),
/// with `metadata`. Returns the family.
pub fn save_model_file(
    cfg: &ResolvedConfig,
    tensors: &HashMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
    out: &Path,
    origin: &Path,
) -> Result<&'static str> {
    let family = family_of(cfg)?;
    match family {
        "mel_vae" => {
            let c = mel_vae::mel_vae_config(cfg)?;
            model_file::save::<MelVae>(out, &c, tensors, metadata, origin)?;
        }
        other => {
            return Err(Error::invalid(
                "model family",
                format!("`{other}` cannot be exported"),
            ))
        }
    }
    Ok(family)
}

/// A trained mel VAE from a run directory (or a checkpoint directory in
/// one): the run's config and the checkpoint's EMA weights when it kept an
/// EMA (else the raw weights), as plain f32 tensors on `device`. Reads only.
pub fn load_mel_vae(
    run_or_checkpoint: &Path,
    which: &crate::run::Which,
    device: &Device,
) -> Result<MelVae> {
    let loc = crate::run::locate(run_or_checkpoint, which)?;
    let cfg = mel_vae::mel_vae_config(&crate::run::read_run_config(&loc.root)?)?;
    let (tensors, _) = crate::run::checkpoint_weights(&loc.checkpoint, crate::run::Weights::Auto)?;
    Ok(model_file::from_tensors::<MelVae>(
        cfg,
        &tensors,
        &loc.checkpoint,
        device,
        DType::F32,
    )?)
}
