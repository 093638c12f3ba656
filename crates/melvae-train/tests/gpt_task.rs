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

    let b2 = common::interrupted(d.path().join("b"), cfg, 10, 20, || task(&tokens));
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
    assert!(e.contains("has no sub-folders"), "{e}");
}

fn gpt_vae_task(tokens: &Path, loss: GptVaeLossConfig) -> GptVaeTask {
    // Dropout on: resume must still be exact.
    gpt_vae_task_with(&data_cfg(tokens), loss, 0.1)
}

fn gpt_vae_task_with(d: &TokenDataConfig, loss: GptVaeLossConfig, dropout: f64) -> GptVaeTask {
    let cfg = GptVaeConfig {
        vocab_size: 16,
        max_len: 480,
        dim: 16,
        heads: 2,
        enc_layers: 1,
        dec_layers: 1,
        latent_dim: 4,
        injection: LatentInjection::Both,
        dropout,
    };
    GptVaeTask::new(
        (cfg, loss),
        TokenSplit::open(d).unwrap(),
        d,
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
    let c2 = common::interrupted(d.path().join("s3"), with_init, 3, 6, || {
        gpt_vae_task(&tokens, stage2)
    });
    assert_eq!(weights(b.vars()), weights(c2.vars()));
}

/// The token models' samples go through `training.sample_vqvae`: one sound
/// per class from the GPT, input/reconstruction/prior from the GPT-VAE, as
/// mel PNGs and WAVs of the data's length; a VQ-VAE that does not fit the
/// data or the family is refused naming the key.
#[test]
fn token_samples_decode_through_the_vqvae() {
    let d = tempfile::tempdir().unwrap();
    let audio = d.path().join("audio");
    classes(&audio);
    let tokens = d.path().join("tokens");
    tokenize_folder(&vqvae(), &audio, &tokens).unwrap();
    let decoder = || {
        let vq = vqvae();
        let to_audio = melvae_models::eval::MelToAudio::new(None, vq.mel_config()).unwrap();
        Some(tasks::TokenDecoder {
            vqvae: vq,
            to_audio,
        })
    };
    let ctx = StepContext {
        step: 7,
        ..eval_ctx()
    };
    // 12 token rows of 2 frames: the audio of 24 frames.
    let samples = vqvae().mel_config().stft.n_samples(24);
    let check = |written: Vec<std::path::PathBuf>, stems: &[&str]| {
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let want: Vec<String> = stems
            .iter()
            .flat_map(|s| ["png", "wav"].map(|e| format!("step00000007_{s}.{e}")))
            .collect();
        assert_eq!(names, want);
        for p in written.iter().filter(|p| p.extension().unwrap() == "wav") {
            let a = melvae_dsp::load_audio(p).unwrap();
            assert_eq!((a.sample_rate, a.channels[0].len()), (22050, samples));
        }
    };
    let out = d.path().join("gpt");
    std::fs::create_dir(&out).unwrap();
    let mut g = task(&tokens).with_samples(decoder()).unwrap();
    check(g.samples(ctx, &out).unwrap(), &["class_high", "class_low"]);
    // Without a decoder there are no samples.
    assert!(task(&tokens).samples(ctx, &out).unwrap().is_empty());
    let out = d.path().join("gpt_vae");
    std::fs::create_dir(&out).unwrap();
    let mut v = gpt_vae_task(&tokens, GptVaeLossConfig::default())
        .with_samples(decoder())
        .unwrap();
    check(v.samples(ctx, &out).unwrap(), &["input", "recon", "prior"]);

    // A VQ-VAE whose rows are not the data's.
    let narrow = MelVqVae::new(
        MelVqVaeConfig {
            restart_threshold: None,
            ..MelVqVaeConfig::new("hifigan-22k", vec![2, 4, 4], vec![[2, 2], [2, 1]], 16, 3)
        },
        melvae_layers::seeded_var_builder(&VarMap::new(), 1, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let to_audio = melvae_models::eval::MelToAudio::new(None, narrow.mel_config()).unwrap();
    let e = task(&tokens)
        .with_samples(Some(tasks::TokenDecoder {
            vqvae: narrow,
            to_audio,
        }))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("training.sample_vqvae") && e.contains("20 codes"),
        "{e}"
    );

    // Through the config: the codebook must be the vocabulary, the family
    // a token model, and a vocoder needs the VQ-VAE first.
    let vq = vqvae();
    let file = d.path().join("vq.safetensors");
    let vm = VarMap::new();
    let vq_cfg = vq.config().clone();
    MelVqVae::new(
        vq_cfg.clone(),
        melvae_layers::seeded_var_builder(&vm, 1, DType::F32, &Device::Cpu),
    )
    .unwrap();
    melvae_models::model_file::save::<MelVqVae>(
        &file,
        &vq_cfg,
        &melvae_layers::named_tensors(&vm),
        &Default::default(),
        Path::new("test"),
    )
    .unwrap();
    let settings = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/settings");
    let check_with = |setting: &str, overrides: &[String]| {
        tasks::check_config(&ResolvedConfig::load(&settings.join(setting), overrides).unwrap())
    };
    let vq_key = format!("training.sample_vqvae={}", file.display());
    let e = check_with("gpt_tiny.yaml", std::slice::from_ref(&vq_key))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("training.sample_vqvae") && e.contains("16 codes") && e.contains("128"),
        "{e}"
    );
    assert_eq!(
        check_with(
            "gpt_tiny.yaml",
            &[vq_key.clone(), "gpt.vocab_size=16".into()]
        )
        .unwrap(),
        "gpt"
    );
    let e = check_with("mel_vqvae_tiny.yaml", &[vq_key])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("training.sample_vqvae") && e.contains("mel_vqvae"),
        "{e}"
    );
    let no_vq = [
        "training.sample_vqvae=null".to_string(),
        "training.sample_vocoder=v.safetensors".into(),
    ];
    let e = check_with("gpt_tiny.yaml", &no_vq).unwrap_err().to_string();
    assert!(
        e.contains("training.sample_vocoder") && e.contains("sample_vqvae"),
        "{e}"
    );
    let e = check_with(
        "gpt_vae_tiny_stage1.yaml",
        &[format!("training.sample_vqvae={}", d.path().display())],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("training.sample_vqvae") && e.contains("cannot load a mel_vqvae"),
        "{e}"
    );
}

/// Two in-process ranks with 2 of 4 token sequences each follow one rank
/// (dropout off): sequences of different lengths pad to the batch's
/// longest, and each rank's per-token loss is weighted by its share of the
/// batch's real tokens.
/// Tokens of the class corpus plus shorter clips (fewer token rows) in
/// `dir`, batches of 4 (two ranks of two).
fn unequal_lengths(dir: &Path) -> TokenDataConfig {
    let audio = dir.join("audio");
    classes(&audio);
    for (i, n) in [3300usize, 4400, 5500].into_iter().enumerate() {
        let x: Vec<f32> = (0..n)
            .map(|k| (std::f32::consts::TAU * 900.0 * k as f32 / 22050.0).sin() * 0.4)
            .collect();
        save_wav(
            audio.join("high").join(format!("short{i}.wav")),
            &Audio::new(22050, vec![x]).unwrap(),
            WavFormat::Pcm16,
        )
        .unwrap();
    }
    let tokens = dir.join("tokens");
    tokenize_folder(&vqvae(), &audio, &tokens).unwrap();
    let dc = TokenDataConfig {
        batch_size: 4,
        ..data_cfg(&tokens)
    };
    let lengths: Vec<usize> = TokenSplit::open(&dc)
        .unwrap()
        .train
        .examples
        .iter()
        .map(|e| e.codes.len())
        .collect();
    assert!(lengths.iter().min() < lengths.iter().max(), "{lengths:?}");
    dc
}

/// The GPT-VAE on two ranks follows one process: the whole batch's latent
/// noise split by rows, the cross-entropy weighted by token shares, and
/// the KL per sequence with per-sequence free bits, through the KL warm-up.
#[test]
fn gpt_vae_two_ranks_follow_one_rank() {
    let d = tempfile::tempdir().unwrap();
    let dc = unequal_lengths(d.path());
    let loss = GptVaeLossConfig {
        beta: 1.0,
        kl_start: 0.0,
        warm_up: 4,
        fb: 1,
        target_kl: Some(0.05),
    };
    // No dropout: it draws other masks on rank 1 (docs/distributed.md).
    let make = || gpt_vae_task_with(&dc, loss, 0.0);
    common::two_ranks_against_one(d.path(), &cfg(8), None, make);
}

#[test]
fn two_ranks_follow_one_rank_with_unequal_lengths() {
    let d = tempfile::tempdir().unwrap();
    let dc = unequal_lengths(d.path());
    let make = || {
        let (mut g, l) = gpt();
        g.dropout = 0.0;
        GptTask::new(
            (g, l),
            TokenSplit::open(&dc).unwrap(),
            &dc,
            3,
            &Device::Cpu,
            DType::F32,
        )
        .unwrap()
    };
    common::two_ranks_against_one(d.path(), &cfg(8), None, make);
}
