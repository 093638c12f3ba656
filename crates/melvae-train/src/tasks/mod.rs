//! [`TrainTask`](crate::TrainTask) implementations of melvae's model
//! families, and what is family-specific about a run's config: which
//! family it trains, which top-level sections it may have, and how its
//! weights become a model file.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use melvae_models::{
    model_file, Echolancer, Gpt, GptVae, LstmPrior, MelVae, MelVqVae, Vocos, VqVae, WaveVae,
};

use crate::data::EpochCursor;

use crate::config::ResolvedConfig;
use crate::{Error, Result};

pub mod echolancer;
pub mod gpt;
pub mod gpt_vae;
pub mod lstm_prior;
pub mod mel_vae;
pub mod mel_vqvae;
pub mod vocos;
pub mod vqvae;
pub mod wave_vae;
mod waveform;

/// Top-level config sections every run may have.
pub const COMMON_SECTIONS: &[&str] = &["training", "data"];

/// The model families `train` knows and the config sections that select
/// and configure each.
pub const FAMILIES: &[(&str, &[&str])] = &[
    ("mel_vae", &["convformer", "cfm"]),
    ("wave_vae", &["wave_vae", "wave_vae_loss"]),
    ("vocos", &["vocos", "vocos_loss"]),
    ("mel_vqvae", &["mel_vqvae", "mel_vqvae_loss"]),
    ("gpt", &["gpt", "gpt_loss"]),
    ("gpt_vae", &["gpt_vae", "gpt_vae_loss"]),
    (
        "echolancer",
        &["echolancer", "echolancer_loss", "echolancer_test"],
    ),
    ("vqvae", &["vqvae"]),
    ("lstm_prior", &["lstm_prior", "lstm_prior_codes"]),
];

/// Families trained on token shards (`data:` is a
/// [`crate::tokens::TokenDataConfig`]); the others read audio folders
/// (`data:` is a [`crate::AudioDataConfig`]).
pub const TOKEN_FAMILIES: &[&str] = &["gpt", "gpt_vae", "echolancer"];

/// A run's training data, as its family reads it.
#[derive(Clone)]
pub enum TrainData {
    /// An audio folder (mel and waveform models).
    Audio(crate::AudioFolder),
    /// Token shards (priors).
    Tokens(crate::tokens::TokenSplit),
}

/// Opens the data of `cfg`'s family (checked first, see [`check_config`]),
/// with a one-line description of what was found (and the files skipped).
pub fn open_data(cfg: &ResolvedConfig) -> Result<(TrainData, String)> {
    let family = family_of(cfg)?;
    if TOKEN_FAMILIES.contains(&family) {
        let d: crate::tokens::TokenDataConfig = cfg.get("data")?;
        let split = crate::tokens::TokenSplit::open(&d)?;
        let msg = format!(
            "{family} on {}: {} training and {} validation examples",
            d.tokens.display(),
            split.train.len(),
            split.val.len()
        );
        return Ok((TrainData::Tokens(split), msg));
    }
    let d: crate::AudioDataConfig = cfg.get("data")?;
    let data = crate::AudioFolder::open(&d)?;
    let mut msg = format!(
        "{family} on {}: {} training and {} validation clips",
        d.dir.display(),
        data.train.len(),
        data.val.len()
    );
    if !data.skipped.is_empty() {
        msg.push('\n');
        msg.push_str(data.skipped.to_string().trim_end());
    }
    Ok((TrainData::Audio(data), msg))
}

/// Sections several families may have, which select none: the
/// discriminators of adversarial training (waveform VAE, vocoder, mel
/// VQ-VAE).
pub const SHARED_SECTIONS: &[&str] = &["discriminators"];

/// The sections of a waveform generator's config (the waveform VAE, the
/// vocoder): its model, its loss, and the discriminators of its
/// adversarial phase.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorSections<M, L> {
    /// The model section.
    pub model: M,
    /// The loss section (its defaults when absent).
    pub loss: L,
    /// `discriminators:` (none when absent: no adversarial phase).
    pub discriminators: Option<melvae_models::DiscriminatorsConfig>,
}

/// The sections `model` and `loss` (optional) and `discriminators:`
/// (optional) of `cfg`, validated with errors naming file and key.
fn generator_sections<M, L>(
    cfg: &ResolvedConfig,
    model: &str,
    loss: &str,
) -> Result<GeneratorSections<M, L>>
where
    M: serde::de::DeserializeOwned + crate::Validate,
    L: serde::de::DeserializeOwned + crate::Validate + Default,
{
    let optional = |name: &str| cfg.value.get(name).is_some();
    Ok(GeneratorSections {
        model: cfg.get(model)?,
        loss: if optional(loss) {
            cfg.get(loss)?
        } else {
            L::default()
        },
        discriminators: if optional("discriminators") {
            Some(cfg.get("discriminators")?)
        } else {
            None
        },
    })
}

/// The `save_model_file` of every task: the model file of family `F`
/// with config `cfg` and the variables of `varmap`.
pub(crate) fn write_model_file<F: model_file::Family>(
    path: &Path,
    cfg: &F::Config,
    varmap: &candle_nn::VarMap,
    metadata: &BTreeMap<String, String>,
) -> Result<bool> {
    model_file::save::<F>(
        path,
        cfg,
        &melvae_layers::named_tensors(varmap),
        metadata,
        Path::new("the training run"),
    )?;
    Ok(true)
}

/// A seed for a training pass's random draws (noise, dropout): the run's
/// `seed`, the `step` and the data position, so micro-batches of one step
/// differ and a resumed run draws the same.
pub(crate) fn step_seed(seed: u64, step: u64, cursor: &EpochCursor) -> u64 {
    seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (cursor.pos as u64).wrapping_mul(0xA24B_AED4_963E_E407)
        ^ cursor.epoch.wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// The sampling options of a token model's training samples at `step`:
/// temperature 1, a seed from the run's `seed` and the step.
pub(crate) fn sample_options(seed: u64, step: u64) -> melvae_models::SamplingOptions {
    melvae_models::SamplingOptions {
        seed: seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        ..Default::default()
    }
}

/// A quantising task's checkpoint state: the data position and the
/// quantiser's restart sampler (so resume is exact with restarts on).
pub(crate) fn quantizer_state(
    cursor: &EpochCursor,
    vq: &melvae_layers::VectorQuantizer,
) -> serde_json::Value {
    let mut s = cursor_state(cursor);
    s["vq_rng"] = vq.rng_state().to_string().into();
    s
}

/// Restores [`quantizer_state`].
pub(crate) fn load_quantizer_state(
    cursor: &mut EpochCursor,
    vq: &mut melvae_layers::VectorQuantizer,
    state: &serde_json::Value,
) -> Result<()> {
    load_cursor(cursor, state);
    if let Some(r) = state.get("vq_rng").and_then(|v| v.as_str()) {
        let r = r
            .parse::<u64>()
            .map_err(|e| Error::invalid("checkpoint state vq_rng", format!("not a u64: {e}")))?;
        vq.set_rng_state(r);
    }
    Ok(())
}

/// The logged terms of a training step's quantiser: `codebook` and
/// `commitment` (its losses), the batch's code `perplexity` and `usage`,
/// and the number of codes `restarted`.
pub(crate) fn quantizer_terms(
    vq: melvae_layers::VqOutput,
) -> Result<BTreeMap<String, candle_core::Tensor>> {
    let device = vq.codebook_loss.device().clone();
    let value = |v: f64| candle_core::Tensor::new(v as f32, &device);
    Ok(BTreeMap::from([
        ("perplexity".to_string(), value(vq.perplexity)?),
        ("usage".to_string(), value(vq.usage)?),
        ("restarted".to_string(), value(vq.restarted as f64)?),
        ("codebook".to_string(), vq.codebook_loss),
        ("commitment".to_string(), vq.commitment_loss),
    ]))
}

/// A task's data position as checkpoint state.
pub(crate) fn cursor_state(cursor: &EpochCursor) -> serde_json::Value {
    serde_json::json!({"epoch": cursor.epoch, "pos": cursor.pos})
}

/// Restores [`cursor_state`]; an absent state leaves `cursor` as it is.
pub(crate) fn load_cursor(cursor: &mut EpochCursor, state: &serde_json::Value) {
    if let (Some(e), Some(p)) = (
        state.get("epoch").and_then(|v| v.as_u64()),
        state.get("pos").and_then(|v| v.as_u64()),
    ) {
        *cursor = EpochCursor {
            epoch: e,
            pos: p as usize,
        };
    }
}

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
        COMMON_SECTIONS.contains(&s)
            || SHARED_SECTIONS.contains(&s)
            || FAMILIES.iter().any(|(_, secs)| secs.contains(&s))
    };
    if let Some(bad) = sections.iter().find(|s| !known(s)) {
        let all: Vec<&str> = COMMON_SECTIONS
            .iter()
            .chain(SHARED_SECTIONS)
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
        "wave_vae" => {
            let c = wave_vae::wave_vae_config(cfg)?.model;
            model_file::save::<WaveVae>(out, &c, tensors, metadata, origin)?;
        }
        "vocos" => {
            let c = vocos::vocos_config(cfg)?.model;
            model_file::save::<Vocos>(out, &c, tensors, metadata, origin)?;
        }
        "mel_vqvae" => {
            let c = mel_vqvae::mel_vqvae_config(cfg)?;
            model_file::save::<MelVqVae>(out, &c, tensors, metadata, origin)?;
        }
        "gpt" => {
            let c = gpt::gpt_config(cfg)?.0;
            model_file::save::<Gpt>(out, &c, tensors, metadata, origin)?;
        }
        "gpt_vae" => {
            let c = gpt_vae::gpt_vae_config(cfg)?.0;
            model_file::save::<GptVae>(out, &c, tensors, metadata, origin)?;
        }
        "vqvae" => {
            let c = vqvae::vqvae_config(cfg)?;
            model_file::save::<VqVae>(out, &c, tensors, metadata, origin)?;
        }
        "lstm_prior" => {
            let c = lstm_prior::lstm_prior_config(cfg)?.0;
            model_file::save::<LstmPrior>(out, &c, tensors, metadata, origin)?;
        }
        "echolancer" => {
            let (c, speakers) = echolancer::model_config(cfg, origin)?;
            let mut metadata = metadata.clone();
            if !speakers.is_empty() {
                metadata.insert(
                    "speaker_names".into(),
                    serde_json::to_string(&speakers).unwrap_or_default(),
                );
            }
            model_file::save::<Echolancer>(out, &c, tensors, &metadata, origin)?;
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
    load_from_run::<MelVae>(run_or_checkpoint, which, device, mel_vae::mel_vae_config)
}

/// A trained waveform VAE from a run or checkpoint directory, as
/// [`load_mel_vae`].
pub fn load_wave_vae(
    run_or_checkpoint: &Path,
    which: &crate::run::Which,
    device: &Device,
) -> Result<WaveVae> {
    load_from_run::<WaveVae>(run_or_checkpoint, which, device, |c| {
        Ok(wave_vae::wave_vae_config(c)?.model)
    })
}

/// A trained Vocos from a run or checkpoint directory, as [`load_mel_vae`].
pub fn load_vocos(
    run_or_checkpoint: &Path,
    which: &crate::run::Which,
    device: &Device,
) -> Result<Vocos> {
    load_from_run::<Vocos>(run_or_checkpoint, which, device, |c| {
        Ok(vocos::vocos_config(c)?.model)
    })
}

/// A model of family `F` from a model file, or from a run or checkpoint
/// directory through `from_run` (its latest checkpoint: what `tokenize`,
/// `prepare_tts` and the programs read), in f32 on `device`. A directory
/// that does not hold such a run is an error naming it.
pub fn load_model_at<F: model_file::Family>(
    path: &Path,
    from_run: impl FnOnce(&Path, &crate::run::Which, &Device) -> Result<F>,
    device: &Device,
) -> Result<F> {
    if path.is_dir() {
        from_run(path, &crate::run::Which::Latest, device)
            .map_err(|e| Error::file(path, format!("cannot load a {} from it ({e})", F::NAME)))
    } else {
        Ok(model_file::load::<F>(path, device, DType::F32)?.0)
    }
}

/// A trained waveform VQ-VAE level from a run or checkpoint directory, as
/// [`load_mel_vae`].
pub fn load_vqvae(
    run_or_checkpoint: &Path,
    which: &crate::run::Which,
    device: &Device,
) -> Result<VqVae> {
    load_from_run::<VqVae>(run_or_checkpoint, which, device, vqvae::vqvae_config)
}

/// A trained mel VQ-VAE from a run or checkpoint directory, as
/// [`load_mel_vae`].
pub fn load_mel_vqvae(
    run_or_checkpoint: &Path,
    which: &crate::run::Which,
    device: &Device,
) -> Result<MelVqVae> {
    load_from_run::<MelVqVae>(
        run_or_checkpoint,
        which,
        device,
        mel_vqvae::mel_vqvae_config,
    )
}

/// A model of family `F` from a run: its config (read by `config` from the
/// run's `config.yaml`) and the checkpoint's EMA weights when kept, as
/// plain f32 tensors. Reads only.
fn load_from_run<F: model_file::Family>(
    run_or_checkpoint: &Path,
    which: &crate::run::Which,
    device: &Device,
    config: impl FnOnce(&ResolvedConfig) -> Result<F::Config>,
) -> Result<F> {
    let loc = crate::run::locate(run_or_checkpoint, which)?;
    let cfg = config(&crate::run::read_run_config(&loc.root)?)?;
    let (tensors, _) = crate::run::checkpoint_weights(&loc.checkpoint, crate::run::Weights::Auto)?;
    Ok(model_file::from_tensors::<F>(
        cfg,
        &tensors,
        &loc.checkpoint,
        device,
        DType::F32,
    )?)
}

/// The model family of a model file (its metadata) or of a run or
/// checkpoint directory (its config's sections).
pub fn family_at(path: &Path) -> Result<String> {
    if path.is_file() {
        return Ok(model_file::read_info(path)?.family);
    }
    let loc = crate::run::locate(path, &crate::run::Which::Latest)?;
    Ok(family_of(&crate::run::read_run_config(&loc.root)?)?.to_string())
}

/// Checks a whole training config before anything is written: the family
/// ([`family_of`]), its sections, the trainer's and the data's, and that
/// they agree (adversarial training needs both `discriminators:` and
/// `training.gan`; `training.sample_vocoder` and `training.sample_vqvae`
/// load and fit the model).
/// Errors name the file and key. Returns the family.
pub fn check_config(cfg: &ResolvedConfig) -> Result<&'static str> {
    Ok(check(cfg)?.0)
}

/// [`check_config`], also returning how the samples are decoded.
fn check(cfg: &ResolvedConfig) -> Result<(&'static str, SampleDecoding)> {
    let family = family_of(cfg)?;
    let training: crate::TrainerConfig = cfg.get("training")?;
    if TOKEN_FAMILIES.contains(&family) {
        let _: crate::tokens::TokenDataConfig = cfg.get("data")?;
    } else {
        let _: crate::AudioDataConfig = cfg.get("data")?;
    }
    // A family without an adversarial phase refuses its keys by name.
    let no_adversarial = |model: &str| -> Result<bool> {
        let key = if cfg.value.get("discriminators").is_some() {
            Some("discriminators")
        } else {
            training.gan.is_some().then_some("training.gan")
        };
        match key {
            Some(key) => Err(Error::Config {
                origin: cfg.origin_of(key),
                key: key.into(),
                reason: format!("the {model} has no adversarial phase"),
            }),
            None => Ok(false),
        }
    };
    let adversarial = match family {
        "wave_vae" => wave_vae::wave_vae_config(cfg)?.discriminators.is_some(),
        "vocos" => vocos::vocos_config(cfg)?.discriminators.is_some(),
        "mel_vqvae" => mel_vqvae::mel_vqvae_sections(cfg)?.discriminators.is_some(),
        "gpt" => {
            gpt::gpt_config(cfg)?;
            no_adversarial("GPT")?
        }
        "gpt_vae" => {
            gpt_vae::gpt_vae_config(cfg)?;
            no_adversarial("GPT-VAE")?
        }
        "echolancer" => {
            echolancer::echolancer_config(cfg)?;
            no_adversarial("Echolancer")?
        }
        "vqvae" => {
            vqvae::vqvae_config(cfg)?;
            no_adversarial("waveform VQ-VAE")?
        }
        "lstm_prior" => {
            // The training order: the VQ-VAEs the prior learns must exist
            // and fit it, before anything is written.
            let (prior, codes) = lstm_prior::lstm_prior_config(cfg)?;
            lstm_prior::frozen_vqvaes(&prior, &codes, &Device::Cpu)?;
            no_adversarial("LSTM prior")?
        }
        _ => {
            mel_vae::mel_vae_config(cfg)?;
            no_adversarial("mel VAE")?
        }
    };
    check_discriminator_kinds(cfg, family)?;
    let gan = training.gan.is_some();
    if adversarial != gan {
        let key = if gan {
            "training.gan"
        } else {
            "discriminators"
        };
        return Err(Error::Config {
            origin: cfg.origin_of(key),
            key: key.into(),
            reason: "adversarial training needs both a discriminators: section and \
                     training.gan (the discriminators' optimiser and schedule)"
                .into(),
        });
    }
    // Last: it loads model files.
    let decoding = sample_decoding(cfg, &training, family)?;
    Ok((family, decoding))
}

/// Mel models are judged by the patch discriminator alone, waveform
/// models by the waveform discriminators: an error names the key that
/// does not fit the family.
fn check_discriminator_kinds(cfg: &ResolvedConfig, family: &str) -> Result<()> {
    if cfg.value.get("discriminators").is_none() {
        return Ok(());
    }
    let d: melvae_models::DiscriminatorsConfig = cfg.get("discriminators")?;
    let named = |key: String, reason: String| Error::Config {
        origin: cfg.origin_of(&key),
        key,
        reason,
    };
    if family == "mel_vqvae" {
        if let Some(k) = d.waveform_keys().first() {
            return Err(named(
                format!("discriminators.{k}"),
                "judges waveforms; the mel VQ-VAE is judged by discriminators.patch".into(),
            ));
        }
        if d.patch.is_none() {
            return Err(named(
                "discriminators.patch".into(),
                "the mel VQ-VAE's adversarial phase needs a patch discriminator".into(),
            ));
        }
    } else if d.patch.is_some() {
        return Err(named(
            "discriminators.patch".into(),
            format!("judges mel images (mel VQ-VAE), not a {family} model's audio"),
        ));
    }
    Ok(())
}

/// How a run's samples become audio: `training.sample_vocoder` (mel and
/// token models) and, for token models, the mel VQ-VAE of
/// `training.sample_vqvae` that decodes their tokens.
#[derive(Default)]
pub(crate) struct SampleDecoding {
    /// The vocoder, checked against the family's mel features.
    pub vocoder: Option<melvae_models::eval::MelToAudio>,
    /// Token models: the VQ-VAE and how its mels become audio.
    pub tokens: Option<TokenDecoder>,
}

/// Loads and checks `training.sample_vocoder` and `training.sample_vqvae`
/// for `family`: errors name the key (a family that cannot use it, a file
/// that is not the right model, features or a codebook that do not fit).
fn sample_decoding(
    cfg: &ResolvedConfig,
    training: &crate::TrainerConfig,
    family: &str,
) -> Result<SampleDecoding> {
    let named = |key: &str, reason: String| Error::Config {
        origin: cfg.origin_of(key),
        key: key.into(),
        reason,
    };
    const VOCODER: &str = "training.sample_vocoder";
    const VQVAE: &str = "training.sample_vqvae";
    let token_family = TOKEN_FAMILIES.contains(&family);
    let vqvae = match &training.sample_vqvae {
        None => None,
        Some(_) if !token_family => {
            return Err(named(
                VQVAE,
                format!("only token models (gpt, gpt_vae, echolancer) decode their samples through a mel VQ-VAE; this config trains a {family} model"),
            ))
        }
        Some(path) => {
            // A run's latest checkpoint, as `tokenize` reads it: the
            // codebook that made the tokens.
            let vq = load_model_at(path, load_mel_vqvae, &Device::Cpu)
                .map_err(|e| named(VQVAE, e.to_string()))?;
            let vocab = match family {
                "gpt" => gpt::gpt_config(cfg)?.0.vocab_size,
                "gpt_vae" => gpt_vae::gpt_vae_config(cfg)?.0.vocab_size,
                _ => echolancer::echolancer_config(cfg)?.model.mel_vocab_size,
            };
            if vq.config().codebook_size != vocab {
                return Err(named(
                    VQVAE,
                    format!(
                        "{}: its codebook has {} codes, the {family}'s vocab_size is {vocab}",
                        path.display(),
                        vq.config().codebook_size
                    ),
                ));
            }
            Some(vq)
        }
    };
    let features = match (family, &vqvae) {
        ("mel_vae", _) => Some(melvae_dsp::MelConfig::vocos_24k()),
        ("mel_vqvae", _) => Some(mel_vqvae::mel_vqvae_config(cfg)?.mel_config()?),
        (_, Some(vq)) => Some(*vq.mel_config()),
        _ => None,
    };
    let vocoder = match (&training.sample_vocoder, features) {
        (None, _) => None,
        (Some(_), None) => {
            let reason = if token_family {
                "a token model's samples need training.sample_vqvae to become mels first".into()
            } else {
                format!("only mel and token models vocode their samples; this config trains a {family} model")
            };
            return Err(named(VOCODER, reason));
        }
        (Some(path), Some(mel)) => {
            let v = Vocos::load(path, &Device::Cpu, DType::F32)
                .map_err(|e| named(VOCODER, e.to_string()))?;
            Some(
                melvae_models::eval::MelToAudio::new(Some(v), &mel)
                    .map_err(|e| named(VOCODER, e.to_string()))?,
            )
        }
    };
    Ok(match vqvae {
        Some(vqvae) => {
            let to_audio = match vocoder {
                Some(v) => v,
                None => melvae_models::eval::MelToAudio::new(None, vqvae.mel_config())?,
            };
            SampleDecoding {
                vocoder: None,
                tokens: Some(TokenDecoder { vqvae, to_audio }),
            }
        }
        None => SampleDecoding {
            vocoder,
            tokens: None,
        },
    })
}

/// A token model's samples as mels and audio: the mel VQ-VAE's decoder,
/// then a vocoder or Griffin-Lim (on the CPU).
pub struct TokenDecoder {
    /// The VQ-VAE (its codebook is the token model's vocabulary).
    pub vqvae: MelVqVae,
    /// How its mels become audio.
    pub to_audio: melvae_models::eval::MelToAudio,
}

impl TokenDecoder {
    /// Token rows the VQ-VAE decodes (`cols` tokens each).
    pub fn cols(&self) -> usize {
        self.vqvae.cols()
    }

    /// Decodes `tokens` (`[1, rows * cols]`, any device) and writes
    /// `dir/{stem}.png` (the mel) and `dir/{stem}.wav`; returns both paths.
    pub fn write(
        &self,
        tokens: &Tensor,
        dir: &Path,
        stem: &str,
    ) -> Result<Vec<std::path::PathBuf>> {
        let mel = self.vqvae.decode(&tokens.to_device(&Device::Cpu)?)?;
        write_mel_sample(&mel, self.vqvae.mel_config(), &self.to_audio, dir, stem)
    }
}

/// Writes the log-mel `mel` (`[1, n_mels, frames]`, features `cfg`) as
/// `dir/{stem}.png` and its audio through `to_audio` as `dir/{stem}.wav`
/// (16-bit); returns both paths.
pub(crate) fn write_mel_sample(
    mel: &Tensor,
    cfg: &melvae_dsp::MelConfig,
    to_audio: &melvae_models::eval::MelToAudio,
    dir: &Path,
    stem: &str,
) -> Result<Vec<std::path::PathBuf>> {
    let (png, wav) = (
        dir.join(format!("{stem}.png")),
        dir.join(format!("{stem}.wav")),
    );
    let mel = mel.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    melvae_dsp::SpectrogramImage::for_mel(cfg)
        .save_png(&png, &melvae_models::mel_vae::mel_to_array(&mel)?)?;
    let samples = cfg.stft.n_samples(mel.dim(2)?);
    let audio = to_audio.audio(&mel, cfg, samples)?;
    melvae_dsp::save_wav(
        &wav,
        &melvae_dsp::Audio::new(cfg.sample_rate, vec![audio])?,
        melvae_dsp::WavFormat::Pcm16,
    )?;
    Ok(vec![png, wav])
}

/// Trains the family of `cfg` (see [`family_of`]) on `data` (from
/// [`open_data`]) in `run`,
/// resuming from its latest checkpoint if `resume`: builds the task from
/// the config's sections and runs the [`crate::Trainer`].
pub fn train(
    cfg: &ResolvedConfig,
    data: TrainData,
    run: &crate::RunDir,
    resume: bool,
) -> Result<crate::TrainSummary> {
    let training: crate::TrainerConfig = cfg.get("training")?;
    match training.local_ranks {
        1 => train_on(cfg, data, run, resume, &crate::dist::SingleProcess),
        n => train_local_ranks(cfg, data, run, resume, n),
    }
}

/// [`train`] with `training.local_ranks = n > 1`: rank `r` of an in-process
/// group ([`crate::dist::LocalComm`]) per thread, each building its own
/// replica from `data` and computing with `cores / n` threads (its own
/// rayon pool). Returns rank 0's summary, or the first rank's error (a
/// failing or panicking rank stops the others).
fn train_local_ranks(
    cfg: &ResolvedConfig,
    data: TrainData,
    run: &crate::RunDir,
    resume: bool,
    n: usize,
) -> Result<crate::TrainSummary> {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let threads = (cores / n).max(1);
    let comms = crate::dist::LocalComm::group(n);
    let results: Vec<Result<crate::TrainSummary>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let data = data.clone();
                s.spawn(move || {
                    use crate::dist::Communicator;
                    let rank = comm.rank();
                    let work = std::panic::AssertUnwindSafe(|| -> Result<_> {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .thread_name(move |i| format!("melvae-rank{rank}-{i}"))
                            .build()
                            .map_err(|e| Error::invalid("training.local_ranks", e.to_string()))?;
                        pool.install(|| train_on(cfg, data, run, resume, &comm))
                    });
                    let out = std::panic::catch_unwind(work).unwrap_or_else(|payload| {
                        let why = payload
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| payload.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        Err(Error::invalid(
                            "training",
                            format!("rank {rank} panicked: {why}"),
                        ))
                    });
                    // Any failure, also before the trainer started (a task
                    // that cannot be built), releases the other ranks.
                    if let Err(e) = &out {
                        comm.abort(&e.to_string());
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::invalid("training", "a rank panicked")))
            })
            .collect()
    });
    results
        .into_iter()
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .next()
        .ok_or_else(|| Error::invalid("training.local_ranks", "no rank ran"))
}

/// [`train`] as rank `comm.rank()` of a data-parallel group (see
/// [`crate::Trainer::with_comm`]); every rank calls it with the same
/// config, data and run directory.
pub fn train_on(
    cfg: &ResolvedConfig,
    data: TrainData,
    run: &crate::RunDir,
    resume: bool,
    comm: &dyn crate::dist::Communicator,
) -> Result<crate::TrainSummary> {
    let training: crate::TrainerConfig = cfg.get("training")?;
    if training.local_ranks > 1 && comm.backend() != "local" {
        return Err(Error::invalid(
            "training.local_ranks",
            format!(
                "{} runs ranks as threads of one process; with {} {} ranks set it to 1 and launch more ranks",
                training.local_ranks,
                comm.world_size(),
                comm.backend()
            ),
        ));
    }
    let (seed, device, dtype) = (training.seed, training.device()?, training.dtype()?);
    let (family, decoding) = check(cfg)?;
    let trainer = crate::Trainer::new(training, run)?.with_comm(comm);
    let data = match data {
        TrainData::Tokens(split) => {
            let data_cfg: crate::tokens::TokenDataConfig = cfg.get("data")?;
            return match family {
                "gpt" => {
                    let sections = gpt::gpt_config(cfg)?;
                    let mut task =
                        gpt::GptTask::new(sections, split, &data_cfg, seed, &device, dtype)?
                            .with_samples(decoding.tokens)?;
                    trainer.fit(&mut task, resume)
                }
                "gpt_vae" => {
                    let sections = gpt_vae::gpt_vae_config(cfg)?;
                    let mut task =
                        gpt_vae::GptVaeTask::new(sections, split, &data_cfg, seed, &device, dtype)?
                            .with_samples(decoding.tokens)?;
                    trainer.fit(&mut task, resume)
                }
                "echolancer" => {
                    let sections = echolancer::echolancer_config(cfg)?;
                    let mut task = echolancer::EcholancerTask::new(
                        sections, split, &data_cfg, seed, &device, dtype,
                    )?
                    .with_samples(decoding.tokens)?;
                    trainer.fit(&mut task, resume)
                }
                other => Err(Error::invalid(
                    "training data",
                    format!("token shards cannot train a {other} model"),
                )),
            };
        }
        TrainData::Audio(a) => a,
    };
    if TOKEN_FAMILIES.contains(&family) {
        return Err(Error::invalid(
            "training data",
            format!("a {family} model trains on token shards, not an audio folder"),
        ));
    }
    let data_cfg: crate::AudioDataConfig = cfg.get("data")?;
    match family {
        "wave_vae" => {
            let sections = wave_vae::wave_vae_config(cfg)?;
            let mut task =
                wave_vae::WaveVaeTask::new(sections, data, data_cfg, seed, &device, dtype)?;
            trainer.fit(&mut task, resume)
        }
        "vocos" => {
            let sections = vocos::vocos_config(cfg)?;
            let mut task = vocos::VocosTask::new(sections, data, data_cfg, seed, &device, dtype)?;
            trainer.fit(&mut task, resume)
        }
        "vqvae" => {
            let c = vqvae::vqvae_config(cfg)?;
            let mut task = vqvae::VqVaeTask::new(c, data, data_cfg, seed, &device, dtype)?;
            trainer.fit(&mut task, resume)
        }
        "lstm_prior" => {
            let sections = lstm_prior::lstm_prior_config(cfg)?;
            let mut task =
                lstm_prior::LstmPriorTask::new(sections, data, data_cfg, seed, &device, dtype)?;
            trainer.fit(&mut task, resume)
        }
        "mel_vqvae" => {
            let sections = mel_vqvae::mel_vqvae_sections(cfg)?;
            let mut task =
                mel_vqvae::MelVqVaeTask::new(sections.model, data, data_cfg, seed, &device, dtype)?;
            if let Some(d) = sections.discriminators {
                task = task.with_adversarial(sections.loss, d)?;
            }
            if let Some(v) = decoding.vocoder {
                task = task.with_vocoder(v);
            }
            trainer.fit(&mut task, resume)
        }
        _ => {
            let mut task = mel_vae::MelVaeTask::new(
                mel_vae::mel_vae_config(cfg)?,
                data,
                data_cfg,
                seed,
                &device,
                dtype,
            )?;
            if let Some(v) = decoding.vocoder {
                task = task.with_vocoder(v);
            }
            trainer.fit(&mut task, resume)
        }
    }
}
