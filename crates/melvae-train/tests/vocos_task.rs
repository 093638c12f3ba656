//! The Vocos task through the real trainer: the mel loss falls, samples
//! and a `vocos` model file are written, resume is exact (plain and
//! adversarial), and mismatched data is named.

use std::path::Path;

use candle_core::{DType, Device};
use melvae_dsp::{save_wav, Audio, WavFormat};
use melvae_losses::WaveformLoss;
use melvae_models::{DiscriminatorsConfig, VocosConfig, VocosFeatures, VocosPadding};
use melvae_train::tasks::vocos::{VocosLossConfig, VocosSections, VocosTask};
use melvae_train::*;

mod common;
use common::{eval_ctx, weights};

/// Harmonic tones, 0.4 s at 16 kHz.
fn folder(dir: &Path) {
    common::tones(
        dir,
        16000,
        6400,
        &[120.0, 170.0, 220.0, 270.0, 320.0],
        3,
        0.2,
    );
}

fn tiny() -> VocosConfig {
    VocosConfig {
        sample_rate: 16000,
        n_fft: 256,
        hop_length: 64,
        n_mels: 20,
        padding: VocosPadding::Center,
        features: VocosFeatures::Vocos,
        dim: 8,
        intermediate_dim: 16,
        num_layers: 1,
        layer_scale_init_value: None,
        adanorm_num_embeddings: None,
        magnitude_prior: false,
    }
}

fn data_cfg(dir: &Path, rate: u32) -> AudioDataConfig {
    common::mono_data(dir, rate, 0.1)
}

fn task(dir: &Path, discriminators: Option<DiscriminatorsConfig>) -> VocosTask {
    task_of(dir, tiny(), VocosLossConfig::default(), discriminators)
}

fn task_of(
    dir: &Path,
    model: VocosConfig,
    loss: VocosLossConfig,
    discriminators: Option<DiscriminatorsConfig>,
) -> VocosTask {
    let d = data_cfg(dir, 16000);
    let data = AudioFolder::load(&d).unwrap();
    let sections = VocosSections {
        model,
        loss,
        discriminators,
    };
    VocosTask::new(sections, data, d, 3, &Device::Cpu, DType::F32).unwrap()
}

fn cfg(steps: u64, gan: bool) -> TrainerConfig {
    TrainerConfig {
        log_every: 1,
        val_every: 6,
        sample_every: 12,
        seed: 5,
        grad_clip: Some(1.0),
        gan: gan.then(common::test_gan),
        ..TrainerConfig::new(steps, 5e-3)
    }
}

fn mel(t: &mut VocosTask) -> f64 {
    t.validate(eval_ctx()).unwrap()["mel"]
}

#[test]
fn trains_writes_samples_and_resumes_exactly() {
    let d = tempfile::tempdir().unwrap();
    let audio = d.path().join("audio");
    std::fs::create_dir(&audio).unwrap();
    folder(&audio);
    let run = RunDir::create(d.path().join("a")).unwrap();
    let mut a = task(&audio, None);
    let before = mel(&mut a);
    Trainer::new(cfg(12, false), &run)
        .unwrap()
        .fit(&mut a, false)
        .unwrap();
    let after = mel(&mut a);
    assert!(after < before, "mel {before} -> {after}");
    let out = melvae_dsp::load_audio(run.samples().join("step00000012_recon.wav")).unwrap();
    assert_eq!((out.sample_rate, out.n_samples()), (16000, 1600));
    let state: TrainState = serde_json::from_str(
        &std::fs::read_to_string(run.latest().unwrap().unwrap().join("state.json")).unwrap(),
    )
    .unwrap();
    let best = run.checkpoints().join(state.best.unwrap().1);
    let m = melvae_models::Vocos::load(&best.join("export.safetensors"), &Device::Cpu, DType::F32)
        .unwrap();
    assert_eq!(m.config(), &tiny());

    // 6 steps, then a resumed process to 12: the same weights.
    let b2 = common::interrupted(
        d.path().join("b"),
        |n| cfg(n, false),
        6,
        12,
        || task(&audio, None),
    );
    assert_eq!(weights(a.vars()), weights(b2.vars()));
}

#[test]
fn adversarial_phase_trains_and_resumes_exactly() {
    let d = tempfile::tempdir().unwrap();
    let audio = d.path().join("audio");
    std::fs::create_dir(&audio).unwrap();
    folder(&audio);
    let disc = common::tiny_mpd();
    let run = RunDir::create(d.path().join("a")).unwrap();
    let mut a = task(&audio, Some(disc.clone()));
    let before = weights(a.disc_vars());
    Trainer::new(cfg(6, true), &run)
        .unwrap()
        .fit(&mut a, false)
        .unwrap();
    // Steps 1-2 are before the adversarial start, 3-6 after.
    common::assert_adversarial_from_step_3(&run);
    assert_ne!(weights(a.disc_vars()), before);
    let split = RunDir::create(d.path().join("b")).unwrap();
    let mut b = task(&audio, Some(disc.clone()));
    Trainer::new(cfg(3, true), &split)
        .unwrap()
        .fit(&mut b, false)
        .unwrap();
    let mut b2 = task(&audio, Some(disc));
    Trainer::new(cfg(6, true), &split)
        .unwrap()
        .fit(&mut b2, true)
        .unwrap();
    assert_eq!(weights(a.vars()), weights(b2.vars()));
    assert_eq!(weights(a.disc_vars()), weights(b2.disc_vars()));
}

#[test]
fn data_must_match_the_model() {
    let d = tempfile::tempdir().unwrap();
    folder(d.path());
    let dc = data_cfg(d.path(), 22050);
    let data = AudioFolder::load(&dc).unwrap();
    let sections = VocosSections {
        model: tiny(),
        loss: VocosLossConfig::default(),
        discriminators: None,
    };
    let e = VocosTask::new(sections, data, dc, 0, &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("data.sample_rate") && e.contains("16000"), "{e}");
}

#[test]
fn the_bundled_vocos_configs_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/settings");
    for name in ["vocos_tiny.yaml", "vocos_mel_24khz.yaml"] {
        let r = ResolvedConfig::load(&dir.join(name), &[]).unwrap();
        assert_eq!(tasks::check_config(&r).unwrap(), "vocos", "{name}");
        let s = tasks::vocos::vocos_config(&r).unwrap();
        let published = name.contains("24khz");
        // The published recipe's loss and head; the tiny one's (see the file).
        assert_eq!(s.loss.mel_weight, if published { 45.0 } else { 0.0 });
        assert_eq!(
            s.loss.mel_distance_weight,
            if published { 0.0 } else { 45.0 }
        );
        assert_eq!(s.model.magnitude_prior, !published, "{name}");
        assert_eq!(s.discriminators.is_some(), published, "{name}");
    }
    // Bad weights are refused naming the key; so is no reconstruction term
    // at all (the tiny recipe's only one switched off).
    for (set, names) in [
        ("vocos_loss.mel_weight=-1", &["vocos_loss.mel_weight"][..]),
        (
            "vocos_loss.multiscale_mel_weight=-1",
            &["vocos_loss.multiscale_mel_weight"],
        ),
        (
            "vocos_loss.mel_distance_weight=nan",
            &["vocos_loss.mel_distance_weight"],
        ),
        (
            "vocos_loss.mel_distance_weight=0",
            &["vocos_loss.mel_weight", "mel_distance_weight"],
        ),
    ] {
        let r = ResolvedConfig::load(&dir.join("vocos_tiny.yaml"), &[set.into()]).unwrap();
        let e = tasks::check_config(&r).unwrap_err().to_string();
        assert!(names.iter().all(|n| e.contains(n)), "{set}: {e}");
    }
}

/// `multiscale_mel_weight` (DAC's multi-scale mel loss) and
/// `mel_distance_weight` (the evaluation's mel distance) add their terms to
/// the total, each logged by name.
#[test]
fn the_extra_mel_terms_join_the_loss() {
    let d = tempfile::tempdir().unwrap();
    folder(d.path());
    let new = |loss: VocosLossConfig| task_of(d.path(), tiny(), loss, None);
    let mut plain = new(VocosLossConfig::default());
    let batch = plain
        .train_batch(&mut melvae_dsp::SplitMix64::new(1))
        .unwrap();
    let scalar = |t: &candle_core::Tensor| t.to_scalar::<f32>().unwrap();
    let p = plain.losses(&batch, eval_ctx()).unwrap();
    let with = |loss| new(loss).losses(&batch, eval_ctx()).unwrap();
    let ms = with(VocosLossConfig {
        multiscale_mel_weight: 2.0,
        ..Default::default()
    });
    let md = with(VocosLossConfig {
        mel_distance_weight: 3.0,
        ..Default::default()
    });
    for (l, term, w) in [(&ms, "multiscale_mel", 2.0), (&md, "mel_distance", 3.0)] {
        assert!(!p.terms.contains_key(term));
        let v = scalar(&l.terms[term]);
        assert!(v > 0.0, "{term}");
        let want = scalar(&p.total) + w * v;
        let got = scalar(&l.total);
        assert!((got - want).abs() < 1e-4 * want, "{term}: {got} vs {want}");
    }
    // The mel distance term is the metric `evaluate` reports.
    let metric = melvae_models::eval::mel_distance(16000, &Device::Cpu)
        .unwrap()
        .loss(
            &plain
                .model
                .decode(&plain_mel(&plain, &batch), None)
                .unwrap()
                .unsqueeze(1)
                .unwrap(),
            &batch,
        )
        .unwrap();
    assert!((scalar(&metric) - scalar(&md.terms["mel_distance"])).abs() < 1e-6);
}

/// The log-mel a task feeds its vocoder for `batch`.
fn plain_mel(t: &VocosTask, batch: &candle_core::Tensor) -> candle_core::Tensor {
    let m = t.model.config().mel_config();
    melvae_dsp::TensorMel::new(m, &Device::Cpu)
        .unwrap()
        .forward(&batch.squeeze(1).unwrap())
        .unwrap()
}

/// With the magnitude prior, training starts at it (the head's magnitude
/// rows scaled by 0.01, their biases zero; the phase rows untouched) and
/// learns from there.
#[test]
fn the_magnitude_prior_starts_training_at_the_prior() {
    let d = tempfile::tempdir().unwrap();
    folder(d.path());
    let new = |prior: bool| {
        let model = VocosConfig {
            magnitude_prior: prior,
            ..tiny()
        };
        let loss = VocosLossConfig {
            mel_weight: 0.0,
            mel_distance_weight: 45.0,
            ..Default::default()
        };
        task_of(d.path(), model, loss, None)
    };
    let (plain, mut prior) = (new(false), new(true));
    let get = |t: &VocosTask, name: &str| {
        let v: std::collections::HashMap<_, _> = t.vars().into_iter().collect();
        v[name].as_tensor().clone()
    };
    let bins = 129;
    for name in ["head.out.weight", "head.out.bias"] {
        let (a, b) = (get(&plain, name), get(&prior, name));
        let scale = if name.ends_with("weight") { 0.01 } else { 0.0 };
        let want = (a.narrow(0, 0, bins).unwrap() * scale).unwrap();
        let d = (b.narrow(0, 0, bins).unwrap() - want)
            .unwrap()
            .abs()
            .unwrap();
        assert!(
            d.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-7,
            "{name}"
        );
        let rest = |t: &candle_core::Tensor| {
            t.narrow(0, bins, bins)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(rest(&a), rest(&b), "{name}: phase rows");
    }
    let before = mel(&mut prior);
    let run = RunDir::create(d.path().join("run")).unwrap();
    Trainer::new(cfg(6, false), &run)
        .unwrap()
        .fit(&mut prior, false)
        .unwrap();
    let after = mel(&mut prior);
    assert!(after < before, "mel {before} -> {after}");
}

/// The converted 24 kHz (`vocos-24k`) or 22.05 kHz fixture vocoder as a
/// model file in `dir`.
fn fixture_vocoder(dir: &Path, preset: &str) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../melvae-models/tests/fixtures/vocos")
        .join(preset);
    let cfg_path = src.join("config.yaml");
    let cfg = VocosConfig::from_vocos_yaml(&std::fs::read_to_string(&cfg_path).unwrap(), &cfg_path)
        .unwrap();
    let tensors = melvae_models::vocoder::read_state_dict(&src.join("model.safetensors")).unwrap();
    let out = dir.join(format!("{preset}.safetensors"));
    melvae_models::model_file::save::<melvae_models::Vocos>(
        &out,
        &cfg,
        &tensors,
        &Default::default(),
        &src,
    )
    .unwrap();
    out
}

#[test]
fn mel_vae_samples_take_a_vocoder() {
    let d = tempfile::tempdir().unwrap();
    let v24 = fixture_vocoder(d.path(), "vocos-24k");
    let v22 = fixture_vocoder(d.path(), "vocos-22k");
    let settings = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/settings");
    let with = |file: &str, v: &Path| {
        ResolvedConfig::load(
            &settings.join(file),
            &[format!("training.sample_vocoder={}", v.display())],
        )
        .unwrap()
    };
    assert_eq!(
        tasks::check_config(&with("tiny.yaml", &v24)).unwrap(),
        "mel_vae"
    );
    let e = tasks::check_config(&with("tiny.yaml", &v22))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("training.sample_vocoder") && e.contains("22050 Hz"),
        "{e}"
    );
    let e = tasks::check_config(&with("wave_vae_tiny.yaml", &v24))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("training.sample_vocoder") && e.contains("wave_vae"),
        "{e}"
    );

    // The samples' audio goes through the vocoder.
    let audio = d.path().join("audio");
    std::fs::create_dir(&audio).unwrap();
    for i in 0..3 {
        let x: Vec<f32> = (0..24000)
            .map(|n| ((n * (i + 2)) as f32 * 0.03).sin() * 0.3)
            .collect();
        save_wav(
            audio.join(format!("t{i}.wav")),
            &Audio::new(24000, vec![x]).unwrap(),
            WavFormat::Pcm16,
        )
        .unwrap();
    }
    let r = with("tiny.yaml", &v24);
    let dc = AudioDataConfig {
        dir: audio,
        val_fraction: 0.0,
        held_out: Vec::new(),
        ..r.get("data").unwrap()
    };
    let data = AudioFolder::load(&dc).unwrap();
    let cfg = tasks::mel_vae::mel_vae_config(&r).unwrap();
    let vocoder = melvae_models::eval::MelToAudio::new(
        Some(melvae_models::Vocos::load(&v24, &Device::Cpu, DType::F32).unwrap()),
        &melvae_dsp::MelConfig::vocos_24k(),
    )
    .unwrap();
    assert_eq!(vocoder.name(), "Vocos");
    let mut task = tasks::mel_vae::MelVaeTask::new(cfg, data, dc, 0, &Device::Cpu, DType::F32)
        .unwrap()
        .with_vocoder(vocoder);
    let ctx = StepContext {
        step: 7,
        train: false,
        adversarial: false,
    };
    let written = task.samples(ctx, d.path()).unwrap();
    let wav = written
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "wav"))
        .unwrap();
    let y = melvae_dsp::load_audio(wav).unwrap();
    assert_eq!(y.sample_rate, 24000);
    assert!(y.n_samples() > 0);
}

/// GAN mode data-parallel: two in-process ranks follow one rank with the
/// same global batch, generator and discriminator alike.
#[test]
fn two_ranks_follow_one_rank_in_the_adversarial_phase() {
    let d = tempfile::tempdir().unwrap();
    let audio = d.path().join("audio");
    std::fs::create_dir(&audio).unwrap();
    folder(&audio);
    let disc = common::tiny_mpd();
    common::two_ranks_against_one(d.path(), &cfg(6, true), None, || {
        task(&audio, Some(disc.clone()))
    });
}
