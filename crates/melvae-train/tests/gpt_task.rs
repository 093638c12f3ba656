//! Tokenizing a class folder with a mel VQ-VAE, then the class GPT through
//! the real trainer: the held-out cross-entropy falls, the unigram
//! baseline is reported, resume is exact, and data that does not fit the
//! model is named.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarMap;
use melvae_dsp::{save_wav, Audio, WavFormat};
use melvae_models::{
    GptConfig, GptPositions, GptVaeConfig, LatentInjection, MelVqVae, MelVqVaeConfig,
};
use melvae_train::tasks::gpt::{GptLossConfig, GptTask};
use melvae_train::tasks::gpt_vae::{GptVaeLossConfig, GptVaeTask};
use melvae_train::tokens::{tokenize_folder, TokenDataConfig, TokenSplit};
use melvae_train::*;

mod common;
use common::{eval_ctx, weights};

/// Two classes (low tones, high tones) of four 0.3 s clips, and a file
/// too short for a token row.
fn classes(dir: &Path) {
    for (class, base) in [("high", 1800.0), ("low", 150.0)] {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..4 {
            let f = base * (1.0 + 0.1 * i as f32);
            let x: Vec<f32> = (0..6615)
                .map(|n| (std::f32::consts::TAU * f * n as f32 / 22050.0).sin() * 0.4)
                .collect();
            save_wav(
                dir.join(class).join(format!("{i}.wav")),
                &Audio::new(22050, vec![x]).unwrap(),
                WavFormat::Pcm16,
            )
            .unwrap();
        }
    }
    save_wav(
        dir.join("low").join("short.wav"),
        &Audio::new(22050, vec![vec![0.1; 300]]).unwrap(),
        WavFormat::Pcm16,
    )
    .unwrap();
}

fn vqvae() -> MelVqVae {
    let cfg = MelVqVaeConfig {
        restart_threshold: None,
        ..MelVqVaeConfig::new("hifigan-22k", vec![2, 4], vec![[2, 2]], 16, 3)
    };
    let vm = VarMap::new();
    MelVqVae::new(
        cfg,
        melvae_layers::seeded_var_builder(&vm, 1, DType::F32, &Device::Cpu),
    )
    .unwrap()
}

fn gpt() -> (GptConfig, GptLossConfig) {
    (
        GptConfig {
            vocab_size: 16,
            num_classes: 2,
            max_len: 480,
            dim: 16,
            heads: 2,
            layers: 1,
            positions: GptPositions::Learned,
            dropout: 0.1,
        },
        GptLossConfig {
            label_smoothing: 0.05,
        },
    )
}

fn data_cfg(tokens: &Path) -> TokenDataConfig {
    TokenDataConfig {
        tokens: tokens.to_path_buf(),
        batch_size: 3,
        val_fraction: 0.3,
    }
}

fn task(tokens: &Path) -> GptTask {
    let d = data_cfg(tokens);
    GptTask::new(
        gpt(),
        TokenSplit::open(&d).unwrap(),
        &d,
        3,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

fn cfg(steps: u64) -> TrainerConfig {
    TrainerConfig {
        log_every: 1,
        val_every: 10,
        seed: 5,
        ..TrainerConfig::new(steps, 1e-2)
    }
}

#[test]
fn tokenizes_trains_and_resumes_exactly() {
    let d = tempfile::tempdir().unwrap();
    let audio = d.path().join("audio");
    classes(&audio);
    let tokens = d.path().join("tokens");
    let s = tokenize_folder(&vqvae(), &audio, &tokens).unwrap();
    assert_eq!(s.classes, ["high", "low"]);
    assert_eq!(s.counts, [4, 4]);
    assert_eq!(s.skipped.len(), 1, "{:?}", s.skipped);
    assert!(s.skipped[0].0.ends_with("short.wav"));
    let split = TokenSplit::open(&data_cfg(&tokens)).unwrap();
    assert_eq!(split.class_names, ["high", "low"]);
    assert_eq!(split.train.len() + split.val.len(), 8);
    // 0.3 s: 25 frames, 24 after the cut to the time factor: 12 rows of 40.
    assert_eq!(split.train.examples[0].codes.len(), 12);
    assert_eq!(split.train.examples[0].codes[0].len(), 40);

    let run = RunDir::create(d.path().join("a")).unwrap();
    let mut a = task(&tokens);
    let ctx = eval_ctx();
    let before = a.validate(ctx).unwrap();
    Trainer::new(cfg(20), &run)
        .unwrap()
        .fit(&mut a, false)
        .unwrap();
    let after = a.validate(ctx).unwrap();
    assert!(after["ce"] < before["ce"], "{before:?} -> {after:?}");
    assert!(after["unigram_perplexity"] > 1.0);
    assert!((after["perplexity"] - after["ce"].exp()).abs() < 1e-9);

    let split_run = RunDir::create(d.path().join("b")).unwrap();
    let mut b = task(&tokens);
    Trainer::new(cfg(10), &split_run)
        .unwrap()
        .fit(&mut b, false)
        .unwrap();
    let mut b2 = task(&tokens);
    Trainer::new(cfg(20), &split_run)
        .unwrap()
        .fit(&mut b2, true)
        .unwrap();
    assert_eq!(weights(a.vars()), weights(b2.vars()));
}

#[test]
fn data_must_fit_the_model() {
    let d = tempfile::tempdir().unwrap();
    let audio = d.path().join("audio");
    classes(&audio);
    let tokens = d.path().join("tokens");
    tokenize_folder(&vqvae(), &audio, &tokens).unwrap();
    let dc = data_cfg(&tokens);
    // The largest token in the data, as a vocabulary size: one too small.
    let split = TokenSplit::open(&dc).unwrap();
    let top = split
        .train
        .examples
        .iter()
        .chain(&split.val.examples)
        .flat_map(|e| e.codes.iter().flatten())
        .max()
        .copied()
        .unwrap() as usize;
    for (cfg, key) in [
        (
            GptConfig {
                vocab_size: top,
                ..gpt().0
            },
            "gpt.vocab_size",
        ),
        (
            GptConfig {
                num_classes: 1,
                ..gpt().0
            },
            "gpt.num_classes",
        ),
        (
            GptConfig {
                max_len: 100,
                ..gpt().0
            },
            "gpt.max_len",
        ),
    ] {
        let e = GptTask::new(
            (cfg, GptLossConfig::default()),
            TokenSplit::open(&dc).unwrap(),
            &dc,
            0,
            &Device::Cpu,
            DType::F32,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains(key), "{key}: {e}");
    }
    let e = tokenize_folder(&vqvae(), &audio.join("low"), &d.path().join("x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("class sub-folders"), "{e}");
}

fn gpt_vae_task(tokens: &Path, loss: GptVaeLossConfig) -> GptVaeTask {
    let d = data_cfg(tokens);
    let cfg = GptVaeConfig {
        vocab_size: 16,
        max_len: 480,
        dim: 16,
        heads: 2,
        enc_layers: 1,
        dec_layers: 1,
        latent_dim: 4,
        injection: LatentInjection::Both,
        // Dropout on: resume must still be exact.
        dropout: 0.1,
    };
    GptVaeTask::new(
        (cfg, loss),
        TokenSplit::open(&d).unwrap(),
        &d,
        3,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

/// Stage 1 (an autoencoder) trains; stage 2 starts from its encoder (and
/// not its decoder), anneals the KL with free bits, and resumes exactly.
#[test]
fn gpt_vae_two_stages() {
    let d = tempfile::tempdir().unwrap();
    let audio = d.path().join("audio");
    classes(&audio);
    let tokens = d.path().join("tokens");
    tokenize_folder(&vqvae(), &audio, &tokens).unwrap();
    let stage1 = GptVaeLossConfig {
        beta: 0.0,
        ..Default::default()
    };
    let run1 = RunDir::create(d.path().join("s1")).unwrap();
    let mut a = gpt_vae_task(&tokens, stage1);
    let ctx = eval_ctx();
    let before = a.validate(ctx).unwrap()["ce"];
    Trainer::new(cfg(10), &run1)
        .unwrap()
        .fit(&mut a, false)
        .unwrap();
    let after = a.validate(ctx).unwrap();
    assert!(after["ce"] < before, "{before} -> {after:?}");
    assert!(after.contains_key("active_units") && after.contains_key("kl"));

    let stage2 = GptVaeLossConfig {
        beta: 1.0,
        kl_start: 0.0,
        warm_up: 4,
        fb: 2,
        target_kl: Some(0.1),
    };
    let part = |t: &GptVaeTask, prefix: &str| -> Vec<Vec<f32>> {
        weights(
            t.vars()
                .into_iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .collect(),
        )
    };
    let with_init = |steps: u64| TrainerConfig {
        init_from: Some(InitFrom {
            checkpoint: d.path().join("s1"),
            modules: vec!["encoder.".into()],
        }),
        freeze: vec!["encoder.".into()],
        ..cfg(steps)
    };
    let run2 = RunDir::create(d.path().join("s2")).unwrap();
    let mut b = gpt_vae_task(&tokens, stage2);
    Trainer::new(with_init(6), &run2)
        .unwrap()
        .fit(&mut b, false)
        .unwrap();
    assert_eq!(part(&b, "encoder."), part(&a, "encoder."));
    assert_ne!(part(&b, "decoder."), part(&a, "decoder."));
    let logged = run2.read_metrics().unwrap();
    let w: Vec<f64> = logged
        .iter()
        .filter_map(|r| r["kl_weight"].as_f64())
        .collect();
    assert_eq!(w.first().copied(), Some(0.0));
    assert_eq!(w.last().copied(), Some(1.0), "{w:?}");

    // Resume of stage 2: 3 steps, then a new process to 6.
    let run3 = RunDir::create(d.path().join("s3")).unwrap();
    let mut c = gpt_vae_task(&tokens, stage2);
    Trainer::new(with_init(3), &run3)
        .unwrap()
        .fit(&mut c, false)
        .unwrap();
    let mut c2 = gpt_vae_task(&tokens, stage2);
    Trainer::new(with_init(6), &run3)
        .unwrap()
        .fit(&mut c2, true)
        .unwrap();
    assert_eq!(weights(b.vars()), weights(c2.vars()));
}
