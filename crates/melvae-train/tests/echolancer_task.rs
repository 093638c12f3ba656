//! Echolancer through the real trainer: TTS data from audio + transcripts
//! (`prepare_tts_folder`) and random (`write_dummy_tts`), training lowers
//! the held-out cross-entropy, resume is exact, the model file carries its
//! tokenizer, test sentences are synthesised, bad data is named.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarMap;
use melvae_dsp::{save_wav, Audio, WavFormat};
use melvae_models::echolancer::EcholancerActivation;
use melvae_models::{Echolancer, EcholancerConfig, MelVqVae, MelVqVaeConfig};
use melvae_train::tasks::echolancer::{
    EcholancerLossConfig, EcholancerSections, EcholancerTask, EcholancerTestConfig,
};
use melvae_train::tokens::{TokenDataConfig, TokenSplit};
use melvae_train::tts::{prepare_tts_folder, write_dummy_tts, DummyTts};
use melvae_train::*;

mod common;
use common::{eval_ctx, weights};

fn model(mel_vocab_size: usize, n_speakers: usize) -> EcholancerConfig {
    EcholancerConfig {
        vocab_size: 0,
        symbols: Vec::new(),
        mel_vocab_size,
        n_speakers,
        speaker_channels: 4,
        emotion_channels: 0,
        encoder_dim: 16,
        encoder_heads: 2,
        encoder_layers: 1,
        decoder_dim: 16,
        decoder_heads: 2,
        decoder_layers: 1,
        ffn_mult: 2,
        use_alibi: true,
        alibi_alpha: 1.0,
        activation: EcholancerActivation::Relu,
        encoder_dropout: 0.1,
        decoder_dropout: 0.1,
        max_len: 64,
        sinusoidal_positions: false,
    }
}

fn sections(m: EcholancerConfig, test: EcholancerTestConfig) -> EcholancerSections {
    EcholancerSections {
        model: m,
        loss: EcholancerLossConfig::default(),
        test,
    }
}

fn data_cfg(tokens: &Path) -> TokenDataConfig {
    TokenDataConfig {
        tokens: tokens.to_path_buf(),
        batch_size: 4,
        val_fraction: 0.2,
    }
}

fn task(tokens: &Path, s: EcholancerSections) -> Result<EcholancerTask> {
    let d = data_cfg(tokens);
    EcholancerTask::new(s, TokenSplit::open(&d)?, &d, 3, &Device::Cpu, DType::F32)
}

fn cfg(steps: u64) -> TrainerConfig {
    TrainerConfig {
        log_every: 1,
        val_every: 10,
        seed: 5,
        ..TrainerConfig::new(steps, 5e-3)
    }
}

fn dummy(dir: &Path) {
    write_dummy_tts(
        dir,
        &DummyTts {
            examples: 24,
            speakers: 2,
            mel_vocab_size: 12,
            cols: 2,
            emotion_channels: 0,
            seed: 1,
        },
    )
    .unwrap();
}

/// Two in-process ranks follow one process on the same global batch of 4:
/// texts and token sequences of unequal lengths, speakers and emotion
/// vectors split by rows, both loss terms weighted by token shares.
#[test]
fn two_ranks_follow_one_rank() {
    let d = tempfile::tempdir().unwrap();
    let tokens = d.path().join("tokens");
    write_dummy_tts(
        &tokens,
        &DummyTts {
            examples: 16,
            speakers: 3,
            mel_vocab_size: 12,
            cols: 2,
            emotion_channels: 3,
            seed: 7,
        },
    )
    .unwrap();
    // No dropout: it draws other masks on rank 1 (docs/distributed.md).
    let m = EcholancerConfig {
        emotion_channels: 3,
        encoder_dropout: 0.0,
        decoder_dropout: 0.0,
        ..model(12, 3)
    };
    let make = || {
        task(
            &tokens,
            sections(m.clone(), EcholancerTestConfig::default()),
        )
        .unwrap()
    };
    common::two_ranks_against_one(d.path(), &cfg(8), None, make);
}

#[test]
fn trains_resumes_and_writes_a_model_file_with_its_tokenizer() {
    let d = tempfile::tempdir().unwrap();
    let tokens = d.path().join("tokens");
    dummy(&tokens);
    let e = write_dummy_tts(
        &tokens,
        &DummyTts {
            examples: 1,
            speakers: 1,
            mel_vocab_size: 2,
            cols: 1,
            emotion_channels: 0,
            seed: 0,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not empty"), "{e}");

    let run = RunDir::create(d.path().join("a")).unwrap();
    let s = sections(model(12, 2), EcholancerTestConfig::default());
    let mut a = task(&tokens, s.clone()).unwrap();
    // 26 letters and space, plus padding and unknown.
    assert_eq!(a.model.config().vocab_size, 29);
    let before = a.validate(eval_ctx()).unwrap();
    Trainer::new(cfg(20), &run)
        .unwrap()
        .fit(&mut a, false)
        .unwrap();
    let after = a.validate(eval_ctx()).unwrap();
    assert!(after["ce"] < before["ce"], "{before:?} -> {after:?}");
    assert!(after["unigram_perplexity"] > 1.0 && after.contains_key("gate"));

    let state: TrainState = serde_json::from_str(
        &std::fs::read_to_string(run.latest().unwrap().unwrap().join("state.json")).unwrap(),
    )
    .unwrap();
    let best = run.checkpoints().join(state.best.unwrap().1);
    let m = Echolancer::load(&best.join("export.safetensors"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(m.config().symbols.len(), 27);
    assert_eq!(m.config().tokenizer().unwrap().encode("hello").1.len(), 0);

    let split = RunDir::create(d.path().join("b")).unwrap();
    let mut b = task(&tokens, s.clone()).unwrap();
    Trainer::new(cfg(10), &split)
        .unwrap()
        .fit(&mut b, false)
        .unwrap();
    let mut b2 = task(&tokens, s.clone()).unwrap();
    Trainer::new(cfg(20), &split)
        .unwrap()
        .fit(&mut b2, true)
        .unwrap();
    assert_eq!(weights(a.vars()), weights(b2.vars()));

    // The run keeps its tokenizer: export writes it (and the speaker
    // names) from the checkpoint, and resuming on data whose symbols.json
    // was rewritten is refused.
    let out = d.path().join("exported.safetensors");
    let yaml = d.path().join("echolancer.yaml");
    std::fs::write(
        &yaml,
        format!(
            "data: {}\necholancer: {}\ntraining: {{steps: 20, learning_rate: 5.0e-3}}\n",
            serde_json::to_string(&data_cfg(&tokens)).unwrap(),
            serde_json::to_string(&model(12, 2)).unwrap()
        ),
    )
    .unwrap();
    split
        .write_config(&ResolvedConfig::load(&yaml, &[]).unwrap())
        .unwrap();
    run::export(split.root(), &run::Which::Latest, run::Weights::Auto, &out).unwrap();
    let info = melvae_models::model_file::read_info(&out).unwrap();
    assert!(info.metadata["speaker_names"].contains("speaker1"));
    let m = Echolancer::load(&out, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(m.config().symbols.len(), 27);
    let mut symbols: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(tokens.join("symbols.json")).unwrap())
            .unwrap();
    symbols.swap(0, 1);
    std::fs::write(
        tokens.join("symbols.json"),
        serde_json::to_string(&symbols).unwrap(),
    )
    .unwrap();
    let mut c = task(&tokens, s).unwrap();
    let e = Trainer::new(cfg(30), &split)
        .unwrap()
        .fit(&mut c, true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("echolancer tokenizer") && e.contains("symbols.json"),
        "{e}"
    );
}

fn vqvae() -> MelVqVae {
    let cfg = MelVqVaeConfig {
        restart_threshold: None,
        ..MelVqVaeConfig::new("hifigan-22k", vec![2, 4], vec![[2, 2]], 12, 3)
    };
    MelVqVae::new(
        cfg,
        melvae_layers::seeded_var_builder(&VarMap::new(), 1, DType::F32, &Device::Cpu),
    )
    .unwrap()
}

/// Two speakers of three 0.2 s tones with transcripts, one file without a
/// transcript.
fn tts_folder(dir: &Path) {
    for (s, base) in [("alice", 220.0), ("bob", 440.0)] {
        let folder = dir.join(s);
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..3 {
            let f = base * (1.0 + 0.2 * i as f32);
            let x: Vec<f32> = (0..4410)
                .map(|n| (std::f32::consts::TAU * f * n as f32 / 22050.0).sin() * 0.4)
                .collect();
            save_wav(
                folder.join(format!("{i}.wav")),
                &Audio::new(22050, vec![x]).unwrap(),
                WavFormat::Pcm16,
            )
            .unwrap();
            if !(s == "bob" && i == 2) {
                std::fs::write(folder.join(format!("{i}.txt")), format!(" {s} says {i}\n"))
                    .unwrap();
            }
        }
    }
}

#[test]
fn prepare_tts_and_test_sentences() {
    let d = tempfile::tempdir().unwrap();
    let audio = d.path().join("audio");
    tts_folder(&audio);
    let out = d.path().join("tokens");
    let s = prepare_tts_folder(&vqvae(), &audio, &out, None, false).unwrap();
    assert_eq!(s.speakers, ["alice", "bob"]);
    assert_eq!(s.counts, [3, 2]);
    assert_eq!(s.skipped.len(), 1);
    assert!(s.skipped[0].1.contains("no transcript"), "{:?}", s.skipped);
    assert_eq!(s.symbols.concat(), " 012abceilosy");
    let split = TokenSplit::open(&TokenDataConfig {
        val_fraction: 0.0,
        ..data_cfg(&out)
    })
    .unwrap();
    assert_eq!(split.speaker_names, ["alice", "bob"]);
    let tok = melvae_models::CharTokenizer::new(&split.symbols).unwrap();
    let texts: Vec<String> = split
        .train
        .examples
        .iter()
        .map(|e| tok.decode(e.text.as_ref().unwrap()))
        .collect();
    assert_eq!(texts[0], "alice says 0");
    assert_eq!(split.train.examples[4].speaker, Some(1));
    // 0.2 s: 17 frames, 16 after the cut: 8 rows of 40 codes.
    assert_eq!(split.train.examples[0].codes.len(), 8);
    // A given vocabulary: other characters are counted as unknown.
    let s2 = prepare_tts_folder(
        &vqvae(),
        &audio,
        &d.path().join("t2"),
        Some(&["a".to_string(), " ".into()]),
        false,
    )
    .unwrap();
    assert!(s2.unknown[&'s'] >= 5, "{:?}", s2.unknown);
    // The folder holds TTS data now: refused without --overwrite, replaced
    // with it; a folder holding anything else is never written into.
    let again = |overwrite| prepare_tts_folder(&vqvae(), &audio, &out, None, overwrite);
    let e = again(false).unwrap_err().to_string();
    assert!(e.contains("not empty") && e.contains("--overwrite"), "{e}");
    assert_eq!(again(true).unwrap().counts, [3, 2]);
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let e = again(true).unwrap_err().to_string();
    assert!(e.contains("notes.txt"), "{e}");
    std::fs::remove_file(out.join("notes.txt")).unwrap();

    // 8 rows of 40 codes per clip: 320 tokens.
    let long = |v, s| EcholancerConfig {
        max_len: 400,
        ..model(v, s)
    };
    // Test sentences through the decoder: one WAV and PNG per sentence and
    // speaker.
    // A threshold of 1 never stops: every sample runs to max_len (10 rows).
    let test = EcholancerTestConfig {
        test_sentences: vec!["bob says 1".into()],
        test_speakers: vec![0, 1],
        gate_threshold: 1.0,
    };
    let decoder = || {
        let vq = vqvae();
        let to_audio = melvae_models::eval::MelToAudio::new(None, vq.mel_config()).unwrap();
        Some(tasks::TokenDecoder {
            vqvae: vq,
            to_audio,
        })
    };
    let mut t = task(&out, sections(long(12, 2), test.clone()))
        .unwrap()
        .with_samples(decoder())
        .unwrap();
    let dir = d.path().join("samples");
    std::fs::create_dir(&dir).unwrap();
    let written = t
        .samples(
            StepContext {
                step: 4,
                ..eval_ctx()
            },
            &dir,
        )
        .unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "step00000004_s0_0.png",
            "step00000004_s0_0.wav",
            "step00000004_s1_0.png",
            "step00000004_s1_0.wav"
        ]
    );
    let wav = melvae_dsp::load_audio(dir.join("step00000004_s1_0.wav")).unwrap();
    assert_eq!(wav.n_samples(), vqvae().mel_config().stft.n_samples(20));

    // Bad settings and data are named.
    let bad = EcholancerTestConfig {
        test_speakers: vec![2],
        ..test
    };
    let e = task(&out, sections(long(12, 2), bad))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("echolancer_test.test_speakers"), "{e}");
    let e = task(&out, sections(long(12, 1), Default::default()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("echolancer.n_speakers"), "{e}");
    let e = task(&out, sections(long(8, 2), Default::default()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("echolancer.mel_vocab_size"), "{e}");
    let e = task(
        &out,
        sections(
            EcholancerConfig {
                max_len: 100,
                ..model(12, 2)
            },
            Default::default(),
        ),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("echolancer.max_len"), "{e}");
}
