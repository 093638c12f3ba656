//! The LSTM prior of a hierarchical VQ-VAE level through the real trainer:
//! codes from frozen VQ-VAE model files, held-out cross-entropy falls,
//! resume is exact, and the training order is enforced by configuration
//! (missing or mismatched VQ-VAEs are named).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarMap;
use melvae_models::{ContextConfig, LstmPriorConfig, VqVae, VqVaeConfig, WaveVaeConfig};
use melvae_train::tasks::lstm_prior::{LstmPriorCodes, LstmPriorTask};
use melvae_train::*;

mod common;
use common::{eval_ctx, weights};

/// A seeded VQ-VAE level of `strides` with 16 codes, as a model file.
fn vqvae_file(dir: &Path, name: &str, strides: Vec<usize>) -> PathBuf {
    let cfg = VqVaeConfig {
        net: WaveVaeConfig {
            sample_rate: 22050,
            channels: 4,
            channel_mults: vec![2; strides.len()],
            strides,
            dilations: vec![1],
            latent_dim: 4,
            bottleneck: Default::default(),
            ..WaveVaeConfig::default()
        },
        codebook_size: 16,
        commitment: 0.25,
        ema_decay: None,
        restart_threshold: None,
    };
    let vm = VarMap::new();
    VqVae::new(
        cfg.clone(),
        melvae_layers::seeded_var_builder(&vm, 1, DType::F32, &Device::Cpu),
    )
    .unwrap();
    melvae_layers::testing::randomize(&vm, 0.5, 2).unwrap();
    let path = dir.join(name);
    melvae_models::model_file::save::<VqVae>(
        &path,
        &cfg,
        &melvae_layers::named_tensors(&vm),
        &Default::default(),
        Path::new("test"),
    )
    .unwrap();
    path
}

fn prior(upsample: usize) -> LstmPriorConfig {
    LstmPriorConfig {
        vocab_size: 16,
        embed_dim: 4,
        hidden: 8,
        layers: 1,
        context: Some(ContextConfig {
            vocab_size: 16,
            embed_dim: 4,
            channels: 4,
            dilations: vec![1, 2],
            kernel_size: 3,
            upsample,
            combine: Default::default(),
        }),
    }
}

fn data_cfg(dir: &Path) -> AudioDataConfig {
    common::mono_data(dir, 22050, 0.05)
}

fn task(dir: &Path, cfg: LstmPriorConfig, codes: LstmPriorCodes) -> Result<LstmPriorTask> {
    task_in(dir, cfg, codes, DType::F32)
}

fn task_in(
    dir: &Path,
    cfg: LstmPriorConfig,
    codes: LstmPriorCodes,
    dtype: DType,
) -> Result<LstmPriorTask> {
    let d = data_cfg(dir);
    let data = AudioFolder::load(&d)?;
    LstmPriorTask::new((cfg, codes), data, d, 3, &Device::Cpu, dtype)
}

/// Tones in `dir/audio`, and two VQ-VAE levels (8x, and 32x as the
/// context) as model files in `dir`.
fn tones_and_levels(dir: &Path) -> (PathBuf, LstmPriorCodes) {
    let audio = dir.join("audio");
    std::fs::create_dir(&audio).unwrap();
    common::tones(&audio, 22050, 4410, &[150.0, 220.0, 330.0], 3, 0.3);
    let codes = LstmPriorCodes {
        vqvae: vqvae_file(dir, "vq8.safetensors", vec![2, 4]),
        context_vqvae: Some(vqvae_file(dir, "vq32.safetensors", vec![2, 4, 4])),
    };
    (audio, codes)
}

/// `training.dtype: bf16` (CUDA in `train`; the CPU runs the same graph
/// here): the prior learns the frozen f32 levels' codes through f32 master
/// weights, and resume is exact.
#[test]
fn half_precision_trains_and_resumes_exactly() {
    let d = tempfile::tempdir().unwrap();
    let (audio, codes) = tones_and_levels(d.path());
    let bf16 = |c: &LstmPriorCodes| task_in(&audio, prior(4), c.clone(), DType::BF16).unwrap();
    let run = RunDir::create(d.path().join("a")).unwrap();
    let mut a = bf16(&codes);
    let before = a.validate(eval_ctx()).unwrap();
    Trainer::new(cfg(20), &run)
        .unwrap()
        .fit(&mut a, false)
        .unwrap();
    let after = a.validate(eval_ctx()).unwrap();
    assert!(
        after["ce"].is_finite() && after["ce"] < before["ce"],
        "{before:?} -> {after:?}"
    );
    assert!(a.vars().iter().all(|(_, v)| v.dtype() == DType::BF16));
    let b2 = common::interrupted(d.path().join("b"), cfg, 10, 20, || bf16(&codes));
    assert_eq!(weights(a.vars()), weights(b2.vars()));
}

fn cfg(steps: u64) -> TrainerConfig {
    TrainerConfig {
        log_every: 1,
        val_every: 10,
        seed: 5,
        ..TrainerConfig::new(steps, 1e-2)
    }
}

/// Two in-process ranks follow one process on the same global batch of 2
/// (each codes its own crops with the frozen levels).
#[test]
fn two_ranks_follow_one_rank() {
    let d = tempfile::tempdir().unwrap();
    let (audio, codes) = tones_and_levels(d.path());
    let make = || task(&audio, prior(4), codes.clone()).unwrap();
    common::two_ranks_against_one(d.path(), &cfg(8), None, make);
}

#[test]
fn trains_on_frozen_codes_and_resumes_exactly() {
    let d = tempfile::tempdir().unwrap();
    let (audio, codes) = tones_and_levels(d.path());
    let run = RunDir::create(d.path().join("a")).unwrap();
    let mut a = task(&audio, prior(4), codes.clone()).unwrap();
    let before = a.validate(eval_ctx()).unwrap();
    Trainer::new(cfg(20), &run)
        .unwrap()
        .fit(&mut a, false)
        .unwrap();
    let after = a.validate(eval_ctx()).unwrap();
    assert!(after["ce"] < before["ce"], "{before:?} -> {after:?}");
    assert!(after["unigram_perplexity"] > 1.0);

    let b2 = common::interrupted(d.path().join("b"), cfg, 10, 20, || {
        task(&audio, prior(4), codes.clone()).unwrap()
    });
    assert_eq!(weights(a.vars()), weights(b2.vars()));

    // The training order and the levels' fit, named.
    let err = |cfg: LstmPriorConfig, codes: LstmPriorCodes| {
        task(&audio, cfg, codes).err().unwrap().to_string()
    };
    let e = err(
        prior(4),
        LstmPriorCodes {
            context_vqvae: None,
            ..codes.clone()
        },
    );
    assert!(
        e.contains("lstm_prior_codes.context_vqvae") && e.contains("missing"),
        "{e}"
    );
    let e = err(
        prior(4),
        LstmPriorCodes {
            vqvae: d.path().join("runs/vqvae_8"),
            ..codes.clone()
        },
    );
    assert!(
        e.contains("lstm_prior_codes.vqvae") && e.contains("train that VQ-VAE level first"),
        "{e}"
    );
    let e = err(prior(2), codes.clone());
    assert!(
        e.contains("lstm_prior.context.upsample") && e.contains("4"),
        "{e}"
    );
    let e = err(
        LstmPriorConfig {
            vocab_size: 32,
            ..prior(4)
        },
        codes,
    );
    assert!(
        e.contains("lstm_prior.vocab_size") && e.contains("16 codes"),
        "{e}"
    );
}
