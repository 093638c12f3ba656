//! The mel VAE through the real trainer on tiny synthetic data.

use std::path::Path;

use candle_core::{DType, Device};
use melvae_dsp::{save_wav, Audio, WavFormat};
use melvae_models::{CfmConfig, ConvformerConfig, MelVaeConfig};
use melvae_train::tasks::mel_vae::MelVaeTask;
use melvae_train::*;

mod common;

fn folder(dir: &Path) {
    for i in 0..6 {
        let f = 150.0 + 60.0 * i as f32;
        let x: Vec<f32> = (0..14400)
            .map(|n| (2.0 * std::f32::consts::PI * f * n as f32 / 24000.0).sin() * 0.3)
            .collect();
        save_wav(
            dir.join(format!("tone{i}.wav")),
            &Audio::new(24000, vec![x]).unwrap(),
            WavFormat::Pcm16,
        )
        .unwrap();
    }
}

fn tiny() -> MelVaeConfig {
    MelVaeConfig {
        convformer: ConvformerConfig {
            compress_factor: 4,
            channels: 4,
            n_residual_blocks: 1,
            tf_dim: 16,
            tf_heads: 2,
            tf_layers: 1,
            drop_p: 0.0,
            latent_dim: 8,
            kl_loss_warmup_steps: 10,
            ..Default::default()
        },
        cfm: CfmConfig {
            unet_dim: 32,
            unet_depth: 1,
            unet_heads: 2,
            ..Default::default()
        },
    }
}

fn task(dir: &Path) -> MelVaeTask {
    let data_cfg = AudioDataConfig {
        dir: dir.to_path_buf(),
        sample_rate: 24000,
        channels: 1,
        crop_seconds: 0.2,
        batch_size: 4,
        val_fraction: 0.0,
        cache_dir: None,
        split_by: SplitBy::File,
        held_out: Vec::new(),
    };
    let data = AudioFolder::load(&data_cfg).unwrap();
    MelVaeTask::new(tiny(), data, data_cfg, 3, &Device::Cpu, DType::F32).unwrap()
}

fn cfg(steps: u64) -> TrainerConfig {
    TrainerConfig {
        log_every: 1,
        val_every: 10,
        sample_every: 20,
        seed: 5,
        grad_clip: Some(1.0),
        ..TrainerConfig::new(steps, 2e-3)
    }
}

#[test]
fn trains_writes_samples_and_resumes_exactly() {
    let d = tempfile::tempdir().unwrap();
    let audio = d.path().join("audio");
    std::fs::create_dir(&audio).unwrap();
    folder(&audio);

    let run = RunDir::create(d.path().join("a")).unwrap();
    let mut a = task(&audio);
    let before = a
        .validate(StepContext {
            step: 1000,
            train: false,
            adversarial: false,
        })
        .unwrap()["cfm"];
    Trainer::new(cfg(20), &run)
        .unwrap()
        .fit(&mut a, false)
        .unwrap();
    let after = a
        .validate(StepContext {
            step: 1000,
            train: false,
            adversarial: false,
        })
        .unwrap()["cfm"];
    assert!(
        after < before,
        "validation flow-matching loss {before} -> {after}"
    );
    let samples: Vec<String> = std::fs::read_dir(run.samples())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for want in [
        "step00000020_input.png",
        "step00000020_recon.png",
        "step00000020_recon.wav",
        "loss_curves.png",
    ] {
        assert!(samples.iter().any(|s| s == want), "{want} in {samples:?}");
    }

    let b2 = common::interrupted(d.path().join("b"), cfg, 10, 20, || task(&audio));
    let weights = |t: &MelVaeTask| -> Vec<Vec<f32>> {
        t.vars()
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    assert_eq!(
        weights(&a),
        weights(&b2),
        "resumed run equals the straight one"
    );
}

#[test]
fn refuses_data_at_another_rate() {
    let d = tempfile::tempdir().unwrap();
    folder(d.path());
    let data_cfg = AudioDataConfig {
        dir: d.path().to_path_buf(),
        sample_rate: 16000,
        channels: 1,
        crop_seconds: 0.2,
        batch_size: 4,
        val_fraction: 0.0,
        cache_dir: None,
        split_by: SplitBy::File,
        held_out: Vec::new(),
    };
    let data = AudioFolder::load(&data_cfg).unwrap();
    let e = MelVaeTask::new(tiny(), data, data_cfg, 0, &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("data.sample_rate") && e.contains("24000"), "{e}");
}

#[test]
fn bundled_experiments_parse_and_errors_name_the_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/settings");
    for name in ["setting1.yaml", "tiny.yaml"] {
        let r = ResolvedConfig::load(&root.join(name), &[]).unwrap();
        let _: TrainerConfig = r.get("training").unwrap();
        let _: AudioDataConfig = r.get("data").unwrap();
        let m = melvae_train::tasks::mel_vae::mel_vae_config(&r).unwrap();
        assert_eq!(m.convformer.mel_channels, 100);
    }
    let r = ResolvedConfig::load(
        &root.join("tiny.yaml"),
        &["convformer.compress_factor_C=6".into()],
    )
    .unwrap();
    let e = melvae_train::tasks::mel_vae::mel_vae_config(&r)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("convformer.compress_factor_C")
            && e.contains("compress_factor_C=6")
            && e.contains("power of two"),
        "{e}"
    );
    let r = ResolvedConfig::load(&root.join("tiny.yaml"), &["cfm.mel_channels=80".into()]).unwrap();
    let e = melvae_train::tasks::mel_vae::mel_vae_config(&r)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cfm.mel_channels") && e.contains("mel_channels=80"),
        "{e}"
    );
    let r = ResolvedConfig::load(&root.join("tiny.yaml"), &["cfm.unet_heads=5".into()]).unwrap();
    let e = melvae_train::tasks::mel_vae::mel_vae_config(&r)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cfm.unet_heads") && e.contains("unet_heads=5"),
        "{e}"
    );
}

/// Two in-process ranks with 2 rows each follow one rank with the whole
/// 4-row batch: the same data, noise and losses every step, the same
/// weights up to the summation order of the gradients.
#[test]
fn two_ranks_follow_one_rank_with_the_same_global_batch() {
    let d = tempfile::tempdir().unwrap();
    let audio = d.path().join("audio");
    std::fs::create_dir(&audio).unwrap();
    folder(&audio);
    common::two_ranks_against_one(d.path(), &cfg(12), None, || task(&audio));
}
