//! The waveform VAE through the real trainer on tiny synthetic data, mono
//! and stereo: it learns, writes samples, resumes exactly.

use std::path::Path;

use candle_core::{DType, Device};
use melvae_dsp::{save_wav, Audio, WavFormat};
use melvae_models::{
    BalancerSection, DiscriminatorsConfig, MsdConfig, WaveBottleneck, WaveVaeConfig,
    WaveVaeLossConfig,
};
use melvae_train::tasks::wave_vae::{WaveVaeSections, WaveVaeTask};
use melvae_train::*;

mod common;

/// Tone pairs, 0.4 s at 24 kHz; stereo files pan the two tones.
fn folder(dir: &Path, channels: usize) {
    for i in 0..5 {
        let f = 150.0 + 60.0 * i as f32;
        let tone = |f: f32| -> Vec<f32> {
            (0..9600)
                .map(|n| (2.0 * std::f32::consts::PI * f * n as f32 / 24000.0).sin() * 0.3)
                .collect()
        };
        let ch = if channels == 1 {
            vec![tone(f)]
        } else {
            vec![tone(f), tone(1.5 * f)]
        };
        save_wav(
            dir.join(format!("tone{i}.wav")),
            &Audio::new(24000, ch).unwrap(),
            WavFormat::Pcm16,
        )
        .unwrap();
    }
}

fn tiny(channels: usize) -> WaveVaeConfig {
    WaveVaeConfig {
        sample_rate: 24000,
        audio_channels: channels,
        channels: 4,
        channel_mults: vec![2, 4],
        strides: vec![4, 5],
        dilations: vec![1, 3],
        bottleneck: WaveBottleneck::Lstm { layers: 1 },
        latent_dim: 4,
        ..Default::default()
    }
}

fn task(dir: &Path, channels: usize, discriminators: Option<DiscriminatorsConfig>) -> WaveVaeTask {
    task_with(dir, channels, discriminators, false)
}

/// [`task`], with EnCodec's loss balancer when `balancer`.
fn task_with(
    dir: &Path,
    channels: usize,
    discriminators: Option<DiscriminatorsConfig>,
    balancer: bool,
) -> WaveVaeTask {
    task_weighted(dir, channels, discriminators, balancer, 1.0)
}

/// [`task_with`], the STFT loss at `stft_weight`.
fn task_weighted(
    dir: &Path,
    channels: usize,
    discriminators: Option<DiscriminatorsConfig>,
    balancer: bool,
    stft_weight: f64,
) -> WaveVaeTask {
    let data_cfg = AudioDataConfig {
        dir: dir.to_path_buf(),
        sample_rate: 24000,
        channels,
        crop_seconds: 0.1,
        batch_size: 2,
        val_fraction: 0.0,
        cache_dir: None,
        split_by: SplitBy::File,
        held_out: Vec::new(),
    };
    let data = AudioFolder::load(&data_cfg).unwrap();
    // The multi-scale mel loss (7 scales) costs most of a step on tiny
    // crops: off here; it is tested in melvae-models.
    let loss = WaveVaeLossConfig {
        stft_weight,
        mel_weight: 0.0,
        kl_warmup_steps: 5,
        balancer: BalancerSection {
            enabled: balancer,
            ..Default::default()
        },
        ..Default::default()
    };
    let sections = WaveVaeSections {
        model: tiny(channels),
        loss,
        discriminators,
    };
    WaveVaeTask::new(sections, data, data_cfg, 3, &Device::Cpu, DType::F32).unwrap()
}

fn cfg(steps: u64) -> TrainerConfig {
    TrainerConfig {
        log_every: 1,
        val_every: 6,
        sample_every: 12,
        seed: 5,
        grad_clip: Some(1.0),
        ema_decay: Some(0.5),
        ..TrainerConfig::new(steps, 5e-3)
    }
}

fn eval(t: &mut WaveVaeTask) -> std::collections::BTreeMap<String, f64> {
    t.validate(StepContext {
        step: 1000,
        train: false,
        adversarial: false,
    })
    .unwrap()
}

#[test]
fn trains_writes_samples_and_resumes_exactly() {
    for channels in [1, 2] {
        let d = tempfile::tempdir().unwrap();
        let audio = d.path().join("audio");
        std::fs::create_dir(&audio).unwrap();
        folder(&audio, channels);

        let run = RunDir::create(d.path().join("a")).unwrap();
        let mut a = task(&audio, channels, None);
        let before = eval(&mut a);
        Trainer::new(cfg(12), &run)
            .unwrap()
            .fit(&mut a, false)
            .unwrap();
        let after = eval(&mut a);
        for k in ["stft", "l1"] {
            assert!(
                after[k] < before[k],
                "{channels} ch {k}: {before:?} -> {after:?}"
            );
        }
        let samples: Vec<String> = std::fs::read_dir(run.samples())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        for want in ["input.wav", "recon.wav", "input.png", "recon.png"] {
            let name = format!("step00000012_{want}");
            assert!(samples.contains(&name), "{name} in {samples:?}");
        }
        let recon = melvae_dsp::load_audio(run.samples().join("step00000012_recon.wav")).unwrap();
        assert_eq!(recon.channels.len(), channels);
        // The best checkpoint carries a wave_vae model file.
        let state: TrainState = serde_json::from_str(
            &std::fs::read_to_string(run.latest().unwrap().unwrap().join("state.json")).unwrap(),
        )
        .unwrap();
        let best = run.checkpoints().join(state.best.unwrap().1);
        let m = melvae_models::WaveVae::load(
            &best.join("export.safetensors"),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        assert_eq!(m.config(), &tiny(channels));

        if channels == 2 {
            continue;
        }
        // 6 steps, then a resumed process to 12: the same weights.
        let b2 = common::interrupted(d.path().join("b"), cfg, 6, 12, || {
            task(&audio, channels, None)
        });
        let weights = |t: &WaveVaeTask| -> Vec<Vec<f32>> {
            t.vars()
                .iter()
                .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                .collect()
        };
        assert_eq!(
            weights(&a),
            weights(&b2),
            "{channels} ch: resumed == straight"
        );
    }
}

#[test]
fn data_must_match_the_model() {
    let d = tempfile::tempdir().unwrap();
    folder(d.path(), 1);
    let data_cfg = AudioDataConfig {
        dir: d.path().to_path_buf(),
        sample_rate: 24000,
        channels: 1,
        crop_seconds: 0.1,
        batch_size: 2,
        val_fraction: 0.0,
        cache_dir: None,
        split_by: SplitBy::File,
        held_out: Vec::new(),
    };
    let data = AudioFolder::load(&data_cfg).unwrap();
    let sections = WaveVaeSections {
        model: tiny(2),
        loss: WaveVaeLossConfig::default(),
        discriminators: None,
    };
    let e = WaveVaeTask::new(sections, data, data_cfg, 0, &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("data.channels") && e.contains("is 1"), "{e}");
}

#[test]
fn the_tiny_experiment_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/settings");
    let r = ResolvedConfig::load(&root.join("wave_vae_tiny.yaml"), &[]).unwrap();
    assert_eq!(melvae_train::tasks::family_of(&r).unwrap(), "wave_vae");
    let w = melvae_train::tasks::wave_vae::wave_vae_config(&r).unwrap();
    let data: AudioDataConfig = r.get("data").unwrap();
    assert_eq!(
        (w.model.sample_rate, w.model.audio_channels),
        (data.sample_rate, data.channels)
    );
    assert_eq!(w.loss.kl_warmup_steps, 200);
    assert_eq!(w.discriminators, None);
    // The adversarial tiny run and the seed's 44.1 kHz stereo setup.
    for (name, channels) in [("wave_vae_tiny_gan.yaml", 1), ("wave_vae_music.yaml", 2)] {
        let r = ResolvedConfig::load(&root.join(name), &[]).unwrap();
        let w = melvae_train::tasks::wave_vae::wave_vae_config(&r).unwrap();
        let t: TrainerConfig = r.get("training").unwrap();
        let data: AudioDataConfig = r.get("data").unwrap();
        assert!(w.discriminators.is_some() && t.gan.is_some(), "{name}");
        assert_eq!(
            (w.model.audio_channels, data.channels),
            (channels, channels),
            "{name}"
        );
        assert_eq!(w.model.sample_rate, data.sample_rate, "{name}");
    }
}

#[test]
fn adversarial_phase_trains_the_discriminators_and_resumes_exactly() {
    adversarial_run(false);
}

/// The same with the loss balancer: its gradient-norm averages travel in
/// the checkpoint, so the resumed run is still exact.
#[test]
fn loss_balancer_trains_and_resumes_exactly() {
    adversarial_run(true);
}

/// MSD and MPD, tiny.
fn tiny_discriminators() -> DiscriminatorsConfig {
    DiscriminatorsConfig {
        msd: Some(MsdConfig {
            scales: 2,
            channels: 4,
            max_channels: 8,
            downsamples: 1,
        }),
        ..common::tiny_mpd()
    }
}

/// [`cfg`] in GAN mode ([`common::test_gan`]).
fn gan(steps: u64) -> TrainerConfig {
    TrainerConfig {
        gan: Some(common::test_gan()),
        ..cfg(steps)
    }
}

/// Two in-process ranks follow one process on the same global batch of
/// 2, through the adversarial phase, with the loss balancer (its gradient
/// norms are the global batch's). The STFT loss is off: its spectral
/// convergence is normalised over each rank's rows, so with it the ranks
/// differ from one process by more than rounding (`set_shard`'s docs).
#[test]
fn two_ranks_follow_one_rank_with_the_balancer_in_the_adversarial_phase() {
    let d = tempfile::tempdir().unwrap();
    let audio = d.path().join("audio");
    std::fs::create_dir(&audio).unwrap();
    folder(&audio, 1);
    common::two_ranks_against_one(d.path(), &gan(6), None, || {
        task_weighted(&audio, 1, Some(tiny_discriminators()), true, 0.0)
    });
    common::assert_adversarial_from_step_3(&RunDir::open(d.path().join("one")));
}

fn adversarial_run(balancer: bool) {
    let d = tempfile::tempdir().unwrap();
    let audio = d.path().join("audio");
    std::fs::create_dir(&audio).unwrap();
    folder(&audio, 1);
    let disc = tiny_discriminators();
    let run = RunDir::create(d.path().join("a")).unwrap();
    let mut a = task_with(&audio, 1, Some(disc.clone()), balancer);
    let before: Vec<Vec<f32>> = a
        .disc_vars()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    assert!(!before.is_empty() && a.disc_vars()[0].0.starts_with("disc."));
    Trainer::new(gan(6), &run)
        .unwrap()
        .fit(&mut a, false)
        .unwrap();
    // Steps 1-2 are before the adversarial start, 3-6 after.
    common::assert_adversarial_from_step_3(&run);
    let disc_weights = |t: &WaveVaeTask| -> Vec<Vec<f32>> {
        t.disc_vars()
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    assert_ne!(disc_weights(&a), before, "the discriminators trained");
    let state = a.state();
    assert_eq!(state.get("balancer").is_some(), balancer, "{state}");
    if balancer {
        // Every balanced term has an average; adv and fm since step 3.
        let b = state["balancer"].as_object().unwrap();
        assert!(
            ["stft", "l1", "adv", "fm"]
                .iter()
                .all(|k| b.contains_key(*k)),
            "{state}"
        );
    }

    // 3 steps, then a resumed process to 6: generator and discriminators equal.
    let split = RunDir::create(d.path().join("b")).unwrap();
    let mut b = task_with(&audio, 1, Some(disc.clone()), balancer);
    Trainer::new(gan(3), &split)
        .unwrap()
        .fit(&mut b, false)
        .unwrap();
    let mut b2 = task_with(&audio, 1, Some(disc), balancer);
    Trainer::new(gan(6), &split)
        .unwrap()
        .fit(&mut b2, true)
        .unwrap();
    assert_eq!(disc_weights(&a), disc_weights(&b2));
    let gen = |t: &WaveVaeTask| -> Vec<Vec<f32>> {
        t.vars()
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    assert_eq!(gen(&a), gen(&b2));
}
