//! The mel VQ-VAE task through the real trainer: the reconstruction loss
//! falls, samples and a `mel_vqvae` model file are written, resume is exact
//! (codebook restarts included), and mismatched data is named.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use melvae_models::{MelVqVae, MelVqVaeConfig};
use melvae_train::tasks::mel_vqvae::MelVqVaeTask;
use melvae_train::*;

mod common;
use common::{eval_ctx, weights};

/// Harmonic tones, 0.5 s at 22.05 kHz.
fn folder(dir: &Path) {
    common::tones(
        dir,
        22050,
        11025,
        &[150.0, 220.0, 290.0, 360.0, 430.0],
        3,
        0.2,
    );
}

fn tiny() -> MelVqVaeConfig {
    // Restarts on (the default): their sampler's state must survive a
    // resume.
    MelVqVaeConfig::new("hifigan-22k", vec![2, 4], vec![[2, 2]], 16, 3)
}

fn data_cfg(dir: &Path, rate: u32, crop: f64) -> AudioDataConfig {
    common::mono_data(dir, rate, crop)
}

fn task(dir: &Path) -> MelVqVaeTask {
    let d = data_cfg(dir, 22050, 0.2);
    let data = AudioFolder::load(&d).unwrap();
    MelVqVaeTask::new(tiny(), data, d, 3, &Device::Cpu, DType::F32).unwrap()
}

fn cfg(steps: u64) -> TrainerConfig {
    TrainerConfig {
        log_every: 1,
        val_every: 6,
        sample_every: 12,
        seed: 5,
        grad_clip: Some(1.0),
        ..TrainerConfig::new(steps, 1e-2)
    }
}

fn recon(t: &mut MelVqVaeTask) -> f64 {
    t.validate(eval_ctx()).unwrap()["recon"]
}

#[test]
fn trains_writes_samples_and_resumes_exactly() {
    let d = tempfile::tempdir().unwrap();
    let audio = d.path().join("audio");
    std::fs::create_dir(&audio).unwrap();
    folder(&audio);
    let run = RunDir::create(d.path().join("a")).unwrap();
    let mut a = task(&audio);
    let before = recon(&mut a);
    Trainer::new(cfg(12), &run)
        .unwrap()
        .fit(&mut a, false)
        .unwrap();
    let after = recon(&mut a);
    assert!(after < before, "recon {before} -> {after}");
    let logged = run.read_metrics().unwrap();
    assert!(logged
        .iter()
        .any(|r| r.get("perplexity").is_some() && r.get("usage").is_some()));
    // 0.2 s crops cut to the hop: 4352 samples, 17 frames of the
    // hifigan-22k mel (its padding is (n_fft - hop) / 2 a side), 16 after
    // the cut to the time factor: 16 x 256 samples back.
    let wav = melvae_dsp::load_audio(run.samples().join("step00000012_recon.wav")).unwrap();
    assert_eq!((wav.sample_rate, wav.n_samples()), (22050, 16 * 256));
    assert!(run.samples().join("step00000012_input.png").is_file());
    let state: TrainState = serde_json::from_str(
        &std::fs::read_to_string(run.latest().unwrap().unwrap().join("state.json")).unwrap(),
    )
    .unwrap();
    let best = run.checkpoints().join(state.best.unwrap().1);
    let m = MelVqVae::load(&best.join("export.safetensors"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(m.config(), &tiny());
    let mel = Tensor::zeros((1, 80, 16), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.encode(&mel).unwrap().dims(), &[1, 8 * 40]);

    // 6 steps, then a resumed process to 12: the same weights and buffers.
    let b2 = common::interrupted(d.path().join("b"), cfg, 6, 12, || task(&audio));
    assert_eq!(weights(a.vars()), weights(b2.vars()));
    assert_eq!(
        a.model.quantizer().rng_state(),
        b2.model.quantizer().rng_state()
    );
}

#[test]
fn data_must_match_the_model() {
    let d = tempfile::tempdir().unwrap();
    folder(d.path());
    let new = |dc: AudioDataConfig| {
        let data = AudioFolder::load(&dc).unwrap();
        MelVqVaeTask::new(tiny(), data, dc, 0, &Device::Cpu, DType::F32)
    };
    let e = new(data_cfg(d.path(), 24000, 0.2))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("data.sample_rate") && e.contains("22050"), "{e}");
    let e = new(data_cfg(d.path(), 22050, 0.005))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("data.crop_seconds") && e.contains("token row"),
        "{e}"
    );
}

/// A tiny patch discriminator.
fn patch_discriminator() -> melvae_models::DiscriminatorsConfig {
    melvae_models::DiscriminatorsConfig {
        patch: Some(melvae_models::PatchConfig {
            channels: 2,
            layers: 2,
        }),
        ..Default::default()
    }
}

/// Two in-process ranks start like one process on the same global batch
/// of 2 and keep identical replicas through the adversarial phase: the
/// codebook's counts and restarts are the global batch's (16 codes,
/// restart threshold 1). Only the first 3 steps' losses are compared: a
/// nearest-code choice can flip on rounding and part the runs
/// (`assert_two_ranks_start_like_one`).
#[test]
fn two_ranks_start_like_one_rank_with_codebook_restarts() {
    use melvae_train::tasks::mel_vqvae::MelVqVaeLossConfig;
    let d = tempfile::tempdir().unwrap();
    let audio = d.path().join("audio");
    std::fs::create_dir(&audio).unwrap();
    folder(&audio);
    let disc = patch_discriminator();
    let make = || {
        task(&audio)
            .with_adversarial(MelVqVaeLossConfig::default(), disc.clone())
            .unwrap()
    };
    let gan = TrainerConfig {
        gan: Some(common::test_gan()),
        ..cfg(6)
    };
    common::two_ranks_against_one(d.path(), &gan, Some(3), make);
    let restarted = common::logged(&d.path().join("two/rank0"), "restarted");
    assert!(restarted.iter().any(|&(_, n)| n > 0.0), "{restarted:?}");
}

/// The adversarial phase: a patch discriminator trains from the start
/// step, the generator logs `adv` and `fm`, resume is exact for both
/// players; waveform discriminators and a missing patch are named.
#[test]
fn adversarial_phase_trains_and_resumes_exactly() {
    use melvae_models::{DiscriminatorsConfig, MsdConfig};
    use melvae_train::tasks::mel_vqvae::MelVqVaeLossConfig;
    let d = tempfile::tempdir().unwrap();
    let audio = d.path().join("audio");
    std::fs::create_dir(&audio).unwrap();
    folder(&audio);
    let disc = patch_discriminator();
    let loss = MelVqVaeLossConfig {
        adversarial: melvae_models::AdversarialWeights {
            feature_matching: 1.0,
            ..MelVqVaeLossConfig::default().adversarial
        },
    };
    let gan_task = || task(&audio).with_adversarial(loss, disc.clone()).unwrap();
    let gan = |steps| TrainerConfig {
        gan: Some(common::test_gan()),
        ..cfg(steps)
    };
    let disc_weights = |t: &MelVqVaeTask| weights(t.disc_vars());
    let run = RunDir::create(d.path().join("a")).unwrap();
    let mut a = gan_task();
    let before = disc_weights(&a);
    assert!(a.disc_vars()[0].0.starts_with("disc.patch."));
    Trainer::new(gan(6), &run)
        .unwrap()
        .fit(&mut a, false)
        .unwrap();
    // Steps 1-2 are before the adversarial start, 3-6 after.
    common::assert_adversarial_from_step_3(&run);
    assert_ne!(disc_weights(&a), before, "the discriminator trained");

    let b2 = common::interrupted(d.path().join("b"), gan, 3, 6, gan_task);
    assert_eq!(disc_weights(&a), disc_weights(&b2));
    assert_eq!(weights(a.vars()), weights(b2.vars()));

    let e = task(&audio)
        .with_adversarial(
            loss,
            DiscriminatorsConfig {
                msd: Some(MsdConfig::default()),
                ..disc.clone()
            },
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("discriminators.msd"), "{e}");
    let e = task(&audio)
        .with_adversarial(loss, DiscriminatorsConfig::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("discriminators.patch"), "{e}");

    // Through the config: the bundled GAN setting parses; a patch on a
    // waveform model and a waveform discriminator on the mel VQ-VAE are
    // named.
    let settings = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/settings");
    let check = |name: &str, o: &[&str]| {
        let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
        tasks::check_config(&ResolvedConfig::load(&settings.join(name), &o).unwrap())
    };
    assert_eq!(check("mel_vqvae_tiny_gan.yaml", &[]).unwrap(), "mel_vqvae");
    let e = check(
        "mel_vqvae_tiny_gan.yaml",
        &["discriminators.mpd={periods: [2]}"],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("discriminators.mpd"), "{e}");
    let e = check(
        "wave_vae_tiny_gan.yaml",
        &["discriminators.patch={channels: 4, layers: 2}"],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("discriminators.patch") && e.contains("wave_vae"),
        "{e}"
    );
}
