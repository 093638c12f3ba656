//! The example programs end to end: good input writes its outputs, bad
//! input exits 1 with a one-line error naming the file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `cargo test` builds the examples next to the test binaries' `deps/`.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(path.exists(), "{} not built", path.display());
    path
}

fn run(name: &str, args: &[&str]) -> Output {
    Command::new(example(name)).args(args).output().unwrap()
}

/// `encode --model MODEL - -o OUT` with `pcm` on stdin.
fn encode_stdin(model: &str, out: &str, pcm: &[u8]) -> Output {
    let mut child = Command::new(example("encode"))
        .args(["--model", model, "-", "-o", out])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), pcm).unwrap();
    child.wait_with_output().unwrap()
}

fn sample() -> String {
    format!("{}/data/samples/speech_en.flac", env!("CARGO_MANIFEST_DIR"))
}

fn assert_one_line_error(out: &Output, culprit: &str) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: ") && err.contains(culprit), "{err}");
}

#[test]
fn mel_writes_npy_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let npy = dir.path().join("m.npy");
    let png = dir.path().join("m.png");
    let out = run(
        "mel",
        &[
            &sample(),
            "-o",
            npy.to_str().unwrap(),
            "--png",
            png.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mel = melvae::dsp::read_npy(&npy).unwrap();
    assert_eq!(mel.shape()[0], 100);
    assert!(mel.shape()[1] > 500 && mel.iter().all(|v| v.is_finite()));
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");

    let out = run(
        "mel",
        &[
            &sample(),
            "--preset",
            "hifigan-22k",
            "-o",
            npy.to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    assert_eq!(melvae::dsp::read_npy(&npy).unwrap().shape()[0], 80);
}

#[test]
fn mel_bad_inputs_name_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let npy = dir.path().join("m.npy");
    let bogus = dir.path().join("bogus.mp3");
    std::fs::write(&bogus, "not audio at all ".repeat(100)).unwrap();
    assert_one_line_error(
        &run(
            "mel",
            &[bogus.to_str().unwrap(), "-o", npy.to_str().unwrap()],
        ),
        "bogus.mp3",
    );
    let missing = dir.path().join("missing.wav");
    assert_one_line_error(
        &run(
            "mel",
            &[missing.to_str().unwrap(), "-o", npy.to_str().unwrap()],
        ),
        "missing.wav",
    );
    let out = run(
        "mel",
        &[
            &sample(),
            "--preset",
            "vocos-44k",
            "-o",
            npy.to_str().unwrap(),
        ],
    );
    assert_one_line_error(&out, "vocos-44k");
    let unwritable = dir.path().join("no_dir").join("m.npy");
    assert_one_line_error(
        &run("mel", &[&sample(), "-o", unwritable.to_str().unwrap()]),
        "m.npy",
    );
    assert!(!npy.exists());
}

#[test]
fn griffin_lim_resynthesises_and_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    // A short clip keeps the test fast.
    let clip = dir.path().join("clip.wav");
    let audio = melvae::dsp::load_audio(sample()).unwrap();
    let short =
        melvae::dsp::Audio::new(audio.sample_rate, vec![audio.channels[0][..12000].to_vec()])
            .unwrap();
    melvae::dsp::save_wav(&clip, &short, melvae::dsp::WavFormat::Pcm16).unwrap();
    let wav = dir.path().join("gl.wav");
    let out = run(
        "griffin_lim",
        &[
            clip.to_str().unwrap(),
            "-o",
            wav.to_str().unwrap(),
            "--iters",
            "8",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let y = melvae::dsp::load_audio(&wav).unwrap();
    assert_eq!((y.sample_rate, y.n_samples()), (24000, 12000));

    let empty = dir.path().join("empty.flac");
    std::fs::write(&empty, b"").unwrap();
    assert_one_line_error(
        &run(
            "griffin_lim",
            &[empty.to_str().unwrap(), "-o", wav.to_str().unwrap()],
        ),
        "empty.flac",
    );
}

#[test]
fn mel_vae_throughput_rejects_bad_arguments() {
    assert_one_line_error(
        &run("mel_vae_throughput", &["--setting", "no_such_setting"]),
        "no_such_setting.yaml",
    );
    assert_one_line_error(&run("mel_vae_throughput", &["--seconds", "0"]), "--seconds");
}

/// A settings file for a very small mel VAE with dropout on, over a folder
/// of tones, built on copies of the bundled defaults.
fn tiny_experiment(dir: &Path) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let defaults = dir.join("configs/defaults");
    std::fs::create_dir_all(&defaults).unwrap();
    for f in ["train", "data", "convformer", "cfm"] {
        std::fs::copy(
            repo.join(format!("configs/defaults/{f}.yaml")),
            defaults.join(format!("{f}.yaml")),
        )
        .unwrap();
    }
    let audio = dir.join("audio");
    std::fs::create_dir_all(&audio).unwrap();
    for i in 0..5 {
        let f = 150.0 + 70.0 * i as f32;
        let x: Vec<f32> = (0..12000)
            .map(|n| (2.0 * std::f32::consts::PI * f * n as f32 / 24000.0).sin() * 0.3)
            .collect();
        melvae::dsp::save_wav(
            audio.join(format!("tone{i}.wav")),
            &melvae::dsp::Audio::new(24000, vec![x]).unwrap(),
            melvae::dsp::WavFormat::Pcm16,
        )
        .unwrap();
    }
    let settings = dir.join("configs/settings");
    std::fs::create_dir_all(&settings).unwrap();
    let path = settings.join("det.yaml");
    std::fs::write(
        &path,
        format!(
            "defaults: [train, data, convformer, cfm]
data: {{dir: {}, crop_seconds: 0.3, batch_size: 2, val_fraction: 0.2}}
convformer: {{compress_factor_C: 4, channels: 2, n_residual_blocks: 1, tf_dim: 16, tf_heads: 2,
  tf_layers: 1, drop_p: 0.1, latent_dim: 4, kl_loss_warmup_steps: 5}}
cfm: {{unet_dim: 16, unet_depth: 1, unet_heads: 2, unet_dropout_rate: 0.1}}
training: {{steps: 12, learning_rate: 1.0e-3, log_every: 1, val_every: 6, ckpt_every: 6,
  sample_every: 0, ema_decay: 0.9, seed: 3,
  schedule: {{kind: warmup_cosine, warmup_steps: 2, total_steps: 12, min_lr: 1.0e-5}}}}
",
            audio.display()
        ),
    )
    .unwrap();
    path
}

fn train(args: &[&str]) -> Output {
    let out = run("train", args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Per-step training losses of a run (without timings).
fn losses(run_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("elapsed_s");
            v.to_string()
        })
        .collect()
}

#[test]
fn training_with_dropout_is_reproducible_and_resumes_exactly_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let exp = tiny_experiment(dir.path());
    let exp = exp.to_str().unwrap();
    let run_dir = |n: &str| dir.path().join(n);
    let arg = |n: &str| run_dir(n).to_str().unwrap().to_string();
    // Two fresh runs with the same seed, in separate processes.
    train(&["--config", exp, "--run-dir", &arg("a")]);
    train(&["--config", exp, "--run-dir", &arg("b")]);
    let weights = |n: &str, step: &str| {
        std::fs::read(run_dir(n).join(format!("checkpoints/step-{step}/model.safetensors")))
            .unwrap()
    };
    assert_eq!(weights("a", "00000012"), weights("b", "00000012"));
    assert_eq!(losses(&run_dir("a")), losses(&run_dir("b")));
    // 6 steps, then a resume in a new process to 12, equal 12 straight.
    train(&["--config", exp, "--run-dir", &arg("c"), "training.steps=6"]);
    train(&["--resume", &arg("c"), "training.steps=12"]);
    assert_eq!(weights("a", "00000012"), weights("c", "00000012"));
    assert_eq!(losses(&run_dir("a")), losses(&run_dir("c")));
    // A different seed differs (the comparison can fail).
    train(&["--config", exp, "--run-dir", &arg("d"), "training.seed=4"]);
    assert_ne!(weights("a", "00000012"), weights("d", "00000012"));

    // TensorBoard events sit beside metrics.jsonl, and the best checkpoint
    // carries a model file with the EMA weights.
    assert!(std::fs::read_dir(run_dir("a")).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("events.out.tfevents.")));
    let best = melvae::train::run::locate(&run_dir("a"), &melvae::train::run::Which::Best).unwrap();
    let info =
        melvae::models::model_file::read_info(&best.checkpoint.join("export.safetensors")).unwrap();
    assert_eq!(
        (info.family.as_str(), info.metadata["weights"].as_str()),
        ("mel_vae", "ema")
    );

    // Export, then reconstruct from the model file.
    let model = dir.path().join("model.safetensors");
    let out = run(
        "export",
        &["--run", &arg("a"), "-o", model.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wav = dir.path().join("recon.wav");
    let tone = dir.path().join("audio/tone1.wav");
    let out = run(
        "reconstruct",
        &[
            "--model",
            model.to_str().unwrap(),
            tone.to_str().unwrap(),
            "-o",
            wav.to_str().unwrap(),
            "--steps",
            "2",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(melvae::dsp::load_audio(&wav).unwrap().n_samples(), 12000);

    // Streaming encode of a file and of raw PCM on stdin: the offline
    // latents (reconstruct --latents).
    let offline = dir.path().join("offline.npy");
    let m = model.to_str().unwrap();
    let t = tone.to_str().unwrap();
    let w = wav.to_str().unwrap();
    let ok = |out: Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    ok(run(
        "reconstruct",
        &[
            "--model",
            m,
            t,
            "-o",
            w,
            "--steps",
            "1",
            "--latents",
            offline.to_str().unwrap(),
        ],
    ));
    let want = melvae::dsp::read_npy(&offline).unwrap();
    let streamed = dir.path().join("streamed.npy");
    let s = streamed.to_str().unwrap();
    let out = ok(run(
        "encode",
        &["--model", m, t, "-o", s, "--chunk-ms", "37"],
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("real-time factor") && stdout.contains("latency"),
        "{stdout}"
    );
    let close = |p: &Path| {
        let got = melvae::dsp::read_npy(p).unwrap();
        assert_eq!(got.shape(), want.shape());
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "{d}");
    };
    close(&streamed);
    let pcm: Vec<u8> = melvae::dsp::load_audio(&tone).unwrap().channels[0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::remove_file(&streamed).unwrap();
    ok(encode_stdin(m, s, &pcm));
    close(&streamed);
    // Bad input names the culprit.
    assert_one_line_error(
        &run("encode", &["--model", m, "nope.wav", "-o", s]),
        "nope.wav",
    );
    assert_one_line_error(
        &run("encode", &["--model", m, t, "-o", s, "--chunk-ms", "0"]),
        "--chunk-ms",
    );
    assert_one_line_error(
        &run("encode", &["--model", "missing.safetensors", t, "-o", s]),
        "missing.safetensors",
    );
}

#[test]
fn train_and_export_refuse_what_would_lose_data() {
    let dir = tempfile::tempdir().unwrap();
    let exp = tiny_experiment(dir.path());
    let exp = exp.to_str().unwrap();
    let r = dir.path().join("r");
    let r = r.to_str().unwrap();
    train(&["--config", exp, "--run-dir", r, "training.steps=2"]);
    let before = losses(Path::new(r));
    // An existing run is not clobbered without --resume or --overwrite.
    assert_one_line_error(
        &run("train", &["--config", exp, "--run-dir", r]),
        "--overwrite",
    );
    assert_eq!(losses(Path::new(r)), before);
    // Resuming with a different learning rate is refused, naming the key.
    assert_one_line_error(
        &run("train", &["--resume", r, "training.learning_rate=0.5"]),
        "training.learning_rate",
    );
    // Discriminators without training.gan: refused before anything is written.
    let gan_cfg = format!(
        "{}/configs/settings/wave_vae_tiny_gan.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let g = dir.path().join("g");
    assert_one_line_error(
        &run(
            "train",
            &[
                "--config",
                &gan_cfg,
                "--run-dir",
                g.to_str().unwrap(),
                "training.gan=null",
            ],
        ),
        "training.gan",
    );
    assert!(!g.exists());
    // An unknown section names it.
    assert_one_line_error(
        &run(
            "train",
            &[
                "--config",
                exp,
                "--run-dir",
                r,
                "--overwrite",
                "convformr.channels=3",
            ],
        ),
        "convformr",
    );
    // --overwrite starts over.
    train(&[
        "--config",
        exp,
        "--run-dir",
        r,
        "--overwrite",
        "training.steps=1",
    ]);
    assert_eq!(losses(Path::new(r)).len(), 1);
    // Export: not a run, no best checkpoint.
    let out = dir.path().join("m.safetensors");
    assert_one_line_error(
        &run("export", &["--run", exp, "-o", out.to_str().unwrap()]),
        "det.yaml",
    );
    assert_one_line_error(
        &run(
            "export",
            &[
                "--run",
                r,
                "--checkpoint",
                "best",
                "-o",
                out.to_str().unwrap(),
            ],
        ),
        "no best checkpoint",
    );
    assert!(!out.exists());
}

#[test]
fn stream_bench_rejects_bad_arguments() {
    assert_one_line_error(&run("stream_bench", &["--minutes", "1"]), "--minutes");
    assert_one_line_error(&run("stream_bench", &["--chunk-ms=0"]), "--chunk-ms");
}

/// A small stereo 24 kHz waveform VAE model file with seeded random
/// weights, written into `dir`.
fn tiny_stereo_wave_vae(dir: &Path) -> PathBuf {
    use melvae::models::{WaveBottleneck, WaveVae, WaveVaeConfig};
    let cfg = WaveVaeConfig {
        audio_channels: 2,
        channels: 4,
        channel_mults: vec![2, 4],
        strides: vec![4, 5],
        dilations: vec![1],
        bottleneck: WaveBottleneck::None,
        latent_dim: 4,
        ..Default::default()
    };
    seeded_model_file::<WaveVae>(dir.join("wave.safetensors"), cfg)
}

/// A model file of family `F` with `cfg` and seeded random weights at `path`.
fn seeded_model_file<F: melvae::models::Family>(path: PathBuf, cfg: F::Config) -> PathBuf {
    let vm = candle_nn::VarMap::new();
    F::build(
        cfg.clone(),
        melvae::layers::seeded_var_builder(
            &vm,
            1,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        ),
    )
    .unwrap();
    let tensors = melvae::layers::named_tensors(&vm);
    melvae::models::model_file::save::<F>(&path, &cfg, &tensors, &Default::default(), &path)
        .unwrap();
    path
}

#[test]
fn reconstruct_takes_the_family_from_the_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_stereo_wave_vae(dir.path());
    // A mono 16 kHz input: resampled to 24 kHz and duplicated to stereo.
    let clip = dir.path().join("in.wav");
    let x: Vec<f32> = (0..8000).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
    melvae::dsp::save_wav(
        &clip,
        &melvae::dsp::Audio::new(16000, vec![x]).unwrap(),
        melvae::dsp::WavFormat::Pcm16,
    )
    .unwrap();
    let out = dir.path().join("out.wav");
    let lat = dir.path().join("lat.npy");
    let png = dir.path().join("cmp.png");
    let o = run(
        "reconstruct",
        &[
            "--model",
            model.to_str().unwrap(),
            clip.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--latents",
            lat.to_str().unwrap(),
            "--png",
            png.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("600 latent frames x 4 channels"));
    let y = melvae::dsp::load_audio(&out).unwrap();
    assert_eq!(
        (y.sample_rate, y.channels.len(), y.n_samples()),
        (24000, 2, 12000)
    );
    // 12000 samples padded to the hop 20: 600 latent frames of 4 channels.
    assert_eq!(melvae::dsp::read_npy(&lat).unwrap().shape(), &[4, 600]);
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
    // Latent exploration: an edit of two channels and two mixes with a
    // shorter clip, each written beside the output and stacked in the PNG.
    let other = dir.path().join("other.wav");
    let x: Vec<f32> = (0..6000).map(|i| (i as f32 * 0.11).sin() * 0.2).collect();
    melvae::dsp::save_wav(
        &other,
        &melvae::dsp::Audio::new(24000, vec![x]).unwrap(),
        melvae::dsp::WavFormat::Pcm16,
    )
    .unwrap();
    let o = run(
        "reconstruct",
        &[
            "--model",
            model.to_str().unwrap(),
            clip.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--scale",
            "2",
            "--shift=-0.5",
            "--dim",
            "0,3",
            "--interpolate",
            other.to_str().unwrap(),
            "--alpha",
            "0.5,1",
            "--png",
            png.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("input, reconstruction, edit, mix 0.5, mix 1, other"),
        "{stdout}"
    );
    let edit = melvae::dsp::load_audio(dir.path().join("out_edit.wav")).unwrap();
    assert_eq!(edit.n_samples(), 12000);
    assert_ne!(edit.channels, y.channels);
    let mix = melvae::dsp::load_audio(dir.path().join("out_mix0.5.wav")).unwrap();
    assert_eq!((mix.channels.len(), mix.n_samples()), (2, 6000));
    assert!(dir.path().join("out_mix1.wav").exists());
    assert_one_line_error(
        &run(
            "reconstruct",
            &[
                "--model",
                model.to_str().unwrap(),
                clip.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--scale",
                "2",
                "--dim",
                "9",
            ],
        ),
        "latent dim",
    );

    // encode streams the same latents, from the file and from raw
    // interleaved stereo on stdin.
    let want = melvae::dsp::read_npy(&lat).unwrap();
    let streamed = dir.path().join("streamed.npy");
    let close = || {
        let got = melvae::dsp::read_npy(&streamed).unwrap();
        assert_eq!(got.shape(), want.shape());
        let d = got
            .iter()
            .zip(want.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "{d}");
    };
    let m = model.to_str().unwrap();
    let s = streamed.to_str().unwrap();
    let o = run(
        "encode",
        &[
            "--model",
            m,
            clip.to_str().unwrap(),
            "-o",
            s,
            "--chunk-ms",
            "7",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    close();
    // The reconstruct input as the model hears it: 24 kHz, both channels.
    let heard = melvae::dsp::load_audio_with(
        &clip,
        &melvae::dsp::LoadOptions {
            channels: melvae::dsp::ChannelMode::Stereo,
            sample_rate: Some(24000),
            ..Default::default()
        },
    )
    .unwrap();
    let pcm: Vec<u8> = (0..heard.n_samples())
        .flat_map(|i| [heard.channels[0][i], heard.channels[1][i]])
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::remove_file(&streamed).unwrap();
    let o = encode_stdin(m, s, &pcm);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    close();
    // Half a stereo frame on stdin is named.
    assert_one_line_error(&encode_stdin(m, s, &pcm[..12]), "stereo");
}

#[test]
fn evaluate_reproduces_the_parity_fixtures_and_scores_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/melvae-models/tests/fixtures/eval");
    let text = std::fs::read_to_string(fixtures.join("expected.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    let (refs, degs) = (dir.path().join("refs"), dir.path().join("degs"));
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::create_dir_all(&degs).unwrap();
    for i in 0..3 {
        let name = format!("clip{i}.wav");
        std::fs::copy(fixtures.join(format!("ref_{i}.wav")), refs.join(&name)).unwrap();
        std::fs::copy(fixtures.join(format!("deg_{i}.wav")), degs.join(&name)).unwrap();
    }
    let json = dir.path().join("report.json");
    let (r, d, j) = (
        refs.to_str().unwrap(),
        degs.to_str().unwrap(),
        json.to_str().unwrap(),
    );
    let o = run(
        "evaluate",
        &["--reference", r, "--degraded", d, "--json", j],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("| clip2.wav |") && table.contains("mean of 3"),
        "{table}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for i in 0..3 {
        let (got, want) = (&report["clips"][i], &expected["pairs"][i]);
        for (key, tol) in [
            ("mel_distance", 1e-4),
            ("stft_distance", 1e-4),
            ("si_sdr", 1e-3),
            ("pesq_wb", 0.01),
        ] {
            let (g, w) = (got[key].as_f64().unwrap(), want[key].as_f64().unwrap());
            assert!(
                (g - w).abs() <= tol * w.abs().max(1.0),
                "clip{i} {key}: {g} vs {w}"
            );
        }
    }

    // A model: mono 16 kHz references become 24 kHz stereo for it.
    let model = tiny_stereo_wave_vae(dir.path());
    let m = model.to_str().unwrap();
    let o = run(
        "evaluate",
        &[
            "--reference",
            r,
            "--model",
            m,
            "--json",
            j,
            "--max-files",
            "2",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["sample_rate"], 24000);
    assert_eq!(report["clips"].as_array().unwrap().len(), 2);
    assert!(report["mean"]["encode_rtf"].as_f64().unwrap() > 0.0);
    assert!(report["mean"]["si_sdr"].as_f64().unwrap().is_finite());

    // The held-out files of a training config, with the baselines.
    let o = run(
        "evaluate",
        &[
            "--held-out",
            &format!(
                "{}/configs/settings/wave_vae_tiny.yaml",
                env!("CARGO_MANIFEST_DIR")
            ),
            "--model",
            m,
            "--baselines",
            "--max-files",
            "1",
            "--no-pesq",
            "--json",
            j,
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let estimates: Vec<&str> = report["reports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["estimate"].as_str().unwrap())
        .collect();
    assert_eq!(estimates.len(), 4, "{estimates:?}");
    assert!(estimates[1].starts_with("untrained") && estimates[3].contains("equal bandwidth"));

    // Bad input is named.
    let missing = dir.path().join("nowhere");
    assert_one_line_error(
        &run(
            "evaluate",
            &["--reference", missing.to_str().unwrap(), "--model", m],
        ),
        "nowhere",
    );
    std::fs::remove_file(degs.join("clip1.wav")).unwrap();
    assert_one_line_error(
        &run("evaluate", &["--reference", r, "--degraded", d]),
        "clip1.wav",
    );
    // A clip too short for the metrics is named with the reason.
    let tiny = dir.path().join("tiny");
    std::fs::create_dir_all(&tiny).unwrap();
    melvae::dsp::save_wav(
        tiny.join("blip.wav"),
        &melvae::dsp::Audio::new(24000, vec![vec![0.1; 500]]).unwrap(),
        melvae::dsp::WavFormat::Pcm16,
    )
    .unwrap();
    assert_one_line_error(
        &run(
            "evaluate",
            &["--reference", tiny.to_str().unwrap(), "--model", m],
        ),
        "blip.wav",
    );
    std::fs::write(refs.join("broken.wav"), b"RIFF1234WAVEjunk").unwrap();
    assert_one_line_error(
        &run("evaluate", &["--reference", r, "--model", m]),
        "broken.wav",
    );
}

#[test]
fn convert_writes_a_vocos_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/melvae-models/tests/fixtures/vocos");
    let out = dir.path().join("vocos.safetensors");
    let o = run(
        "convert",
        &[
            fixtures.join("vocos-24k").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("24000 Hz, 100 mels"));
    let info = melvae::models::model_file::read_info(&out).unwrap();
    assert_eq!(info.family, "vocos");
    melvae::models::Vocos::load(&out, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    // Explicit files, and the culprit named when something is missing.
    let f22 = fixtures.join("vocos-22k");
    let o = run(
        "convert",
        &[
            "--config",
            f22.join("config.yaml").to_str().unwrap(),
            "--weights",
            f22.join("model.safetensors").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("AdaLayerNorm over 4"));
    assert_one_line_error(
        &run(
            "convert",
            &[dir.path().to_str().unwrap(), "-o", out.to_str().unwrap()],
        ),
        "config.yaml",
    );
}

#[test]
fn mel_models_take_a_vocoder() {
    use melvae::models::{CfmConfig, ConvformerConfig, MelVae, MelVaeConfig};
    let dir = tempfile::tempdir().unwrap();
    // A tiny mel VAE with seeded random weights.
    let cfg = MelVaeConfig {
        convformer: ConvformerConfig {
            channels: 4,
            tf_dim: 16,
            tf_heads: 2,
            tf_layers: 1,
            ..Default::default()
        },
        cfm: CfmConfig {
            unet_dim: 16,
            unet_depth: 1,
            unet_heads: 2,
            ..Default::default()
        },
    };
    let model = seeded_model_file::<MelVae>(dir.path().join("mel.safetensors"), cfg);
    // The 24 kHz / 100-mel vocoder fixture, converted.
    let fixtures =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/melvae-models/tests/fixtures/vocos");
    let voc = dir.path().join("vocos.safetensors");
    let o = run(
        "convert",
        &[
            fixtures.join("vocos-24k").to_str().unwrap(),
            "-o",
            voc.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (m, v) = (model.to_str().unwrap(), voc.to_str().unwrap());
    let out = dir.path().join("out.wav");
    let o = run(
        "reconstruct",
        &[
            "--model",
            m,
            &sample(),
            "-o",
            out.to_str().unwrap(),
            "--vocoder",
            v,
            "--steps",
            "2",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let input = melvae::dsp::load_audio_with(
        sample(),
        &melvae::dsp::LoadOptions {
            sample_rate: Some(24000),
            ..Default::default()
        },
    )
    .unwrap();
    let y = melvae::dsp::load_audio(&out).unwrap();
    assert_eq!((y.sample_rate, y.n_samples()), (24000, input.n_samples()));
    // evaluate through the vocoder, with the baselines.
    let refs = dir.path().join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::copy(sample(), refs.join("clip.flac")).unwrap();
    let o = run(
        "evaluate",
        &[
            "--reference",
            refs.to_str().unwrap(),
            "--model",
            m,
            "--vocoder",
            v,
            "--steps",
            "2",
            "--no-pesq",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The vocoder alone (analysis-synthesis) with its baselines, Griffin-Lim
    // on the same mel among them; reconstruct takes it too.
    let o = run(
        "evaluate",
        &[
            "--reference",
            refs.to_str().unwrap(),
            "--model",
            v,
            "--baselines",
            "--no-pesq",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("the same mel through Griffin-Lim"));
    let o = run(
        "reconstruct",
        &["--model", v, &sample(), "-o", out.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        melvae::dsp::load_audio(&out).unwrap().n_samples(),
        input.n_samples()
    );
    // A vocoder of other features is refused, naming what differs; a
    // vocoder for a waveform model is refused.
    let v22 = dir.path().join("vocos22.safetensors");
    let o = run(
        "convert",
        &[
            fixtures.join("vocos-22k").to_str().unwrap(),
            "-o",
            v22.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_one_line_error(
        &run(
            "reconstruct",
            &[
                "--model",
                m,
                &sample(),
                "-o",
                out.to_str().unwrap(),
                "--vocoder",
                v22.to_str().unwrap(),
            ],
        ),
        "22050 Hz / 80 mels",
    );
    let wave = tiny_stereo_wave_vae(dir.path());
    assert_one_line_error(
        &run(
            "reconstruct",
            &[
                "--model",
                wave.to_str().unwrap(),
                &sample(),
                "-o",
                out.to_str().unwrap(),
                "--vocoder",
                v,
            ],
        ),
        "--vocoder is for mel models",
    );
}

#[test]
fn tokenize_writes_class_shards_and_names_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = melvae::models::MelVqVaeConfig::new("hifigan-22k", vec![2, 2], vec![[2, 2]], 8, 2);
    let model =
        seeded_model_file::<melvae::models::MelVqVae>(dir.path().join("vq.safetensors"), cfg);
    let classes = dir.path().join("classes");
    for class in ["a", "b"] {
        std::fs::create_dir_all(classes.join(class)).unwrap();
        std::fs::copy(sample(), classes.join(class).join("x.flac")).unwrap();
    }
    let out = dir.path().join("tokens");
    let (m, c, o) = (
        model.to_str().unwrap(),
        classes.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let r = run("tokenize", &["--model", m, c, "-o", o]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        text.contains("a: 1 clips") && text.contains("b: 1 clips"),
        "{text}"
    );
    assert!(out.join("tokens.safetensors").is_file() && out.join("classes.json").is_file());
    // No class sub-folders; a model of another family.
    let r = run("tokenize", &["--model", m, &format!("{c}/a"), "-o", o]);
    assert_one_line_error(&r, "has no sub-folders");
    // The same model as a codec: evaluate scores it at 22.05 kHz.
    let json = dir.path().join("vq.json");
    let j = json.to_str().unwrap();
    let r = run(
        "evaluate",
        &[
            "--reference",
            &format!("{c}/a"),
            "--model",
            m,
            "--json",
            j,
            "--no-pesq",
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["sample_rate"], 22050);
    assert!(report["mean"]["mel_distance"].as_f64().unwrap().is_finite());
    let wave = tiny_stereo_wave_vae(dir.path());
    let r = run("tokenize", &["--model", wave.to_str().unwrap(), c, "-o", o]);
    assert_one_line_error(&r, "wave_vae");
}

#[test]
fn generate_writes_class_samples_and_names_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let vq = melvae::models::MelVqVaeConfig::new("hifigan-22k", vec![2, 2], vec![[2, 2]], 8, 2);
    let vq = seeded_model_file::<melvae::models::MelVqVae>(dir.path().join("vq.safetensors"), vq);
    let gpt = |vocab: usize, name: &str| {
        let cfg = melvae::models::GptConfig {
            vocab_size: vocab,
            num_classes: 2,
            max_len: 80,
            dim: 8,
            heads: 2,
            layers: 1,
            positions: melvae::models::GptPositions::Learned,
            dropout: 0.0,
        };
        seeded_model_file::<melvae::models::Gpt>(dir.path().join(name), cfg)
    };
    let (g, bad_vocab) = (gpt(8, "gpt.safetensors"), gpt(9, "gpt9.safetensors"));
    let out = dir.path().join("gen");
    let (g, v, o) = (
        g.to_str().unwrap(),
        vq.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    // No class names in the file: classes are "0" and "1"; rows of 40 tokens.
    let r = run(
        "generate",
        &[
            "--model", g, "--vqvae", v, "--class", "1", "--n", "2", "-o", o,
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(out.join("1_0.wav").is_file() && out.join("1_1.png").is_file());
    let r = run(
        "generate",
        &["--model", g, "--vqvae", v, "--class", "dog", "-o", o],
    );
    assert_one_line_error(&r, "--class dog");
    let r = run(
        "generate",
        &[
            "--model", g, "--vqvae", v, "--class", "0", "--rows", "3", "-o", o,
        ],
    );
    assert_one_line_error(&r, "--rows 3");
    let b = bad_vocab.to_str().unwrap();
    let r = run(
        "generate",
        &["--model", b, "--vqvae", v, "--class", "0", "-o", o],
    );
    assert_one_line_error(&r, "codebook_size");
}

#[test]
fn interpolate_walks_both_ways_and_names_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let vq = melvae::models::MelVqVaeConfig::new("hifigan-22k", vec![2, 2], vec![[2, 2]], 8, 2);
    let vq = seeded_model_file::<melvae::models::MelVqVae>(dir.path().join("vq.safetensors"), vq);
    let cfg = melvae::models::GptVaeConfig {
        vocab_size: 8,
        max_len: 80,
        dim: 8,
        heads: 2,
        enc_layers: 1,
        dec_layers: 1,
        latent_dim: 3,
        injection: melvae::models::LatentInjection::Both,
        dropout: 0.0,
    };
    let vae = seeded_model_file::<melvae::models::GptVae>(dir.path().join("vae.safetensors"), cfg);
    let out = dir.path().join("walk");
    let (m, v, o, s) = (
        vae.to_str().unwrap(),
        vq.to_str().unwrap(),
        out.to_str().unwrap(),
        sample(),
    );
    let r = run(
        "interpolate",
        &["--model", m, "--vqvae", v, &s, &s, "--steps", "3", "-o", o],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    for f in ["linear_0_0.00.wav", "spherical_2_1.00.wav", "strip.png"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let r = run(
        "interpolate",
        &["--model", m, "--vqvae", v, &s, &s, "--steps", "1", "-o", o],
    );
    assert_one_line_error(&r, "--steps");
    let r = run(
        "interpolate",
        &["--model", m, "--vqvae", v, &s, "missing.wav", "-o", o],
    );
    assert_one_line_error(&r, "missing.wav");
}

#[test]
fn prepare_tts_and_synthesize_name_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    // Random data in the seed's manner; a second time into the same folder
    // is refused.
    let dummy = dir.path().join("dummy");
    let d = dummy.to_str().unwrap();
    let r = run("prepare_tts", &["--create-dummy", "6", "-o", d]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(dummy.join("symbols.json").is_file() && dummy.join("speakers.json").is_file());
    let r = run("prepare_tts", &["--create-dummy", "6", "-o", d]);
    assert_one_line_error(&r, "not empty");

    // Audio + transcripts with a VQ-VAE of 8 codes: one speaker, one clip
    // with a transcript, one without.
    let vq = melvae::models::MelVqVaeConfig::new("hifigan-22k", vec![2, 2], vec![[2, 2]], 8, 2);
    let vq = seeded_model_file::<melvae::models::MelVqVae>(dir.path().join("vq.safetensors"), vq);
    let tts = dir.path().join("tts");
    std::fs::create_dir_all(tts.join("anna")).unwrap();
    std::fs::copy(sample(), tts.join("anna").join("a.flac")).unwrap();
    std::fs::copy(sample(), tts.join("anna").join("b.flac")).unwrap();
    std::fs::write(tts.join("anna").join("a.txt"), "hello there.\n").unwrap();
    let out = dir.path().join("tokens");
    let (v, t, o) = (
        vq.to_str().unwrap(),
        tts.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let r = run("prepare_tts", &["--model", v, t, "-o", o]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        text.contains("anna: 1 clips") && text.contains("skipped") && text.contains("b.flac"),
        "{text}"
    );

    // Synthesis with an Echolancer of that vocabulary and codebook.
    let symbols: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(out.join("symbols.json")).unwrap()).unwrap();
    let echo = |mel_vocab_size: usize, name: &str, max_len: usize| {
        let cfg = melvae::models::EcholancerConfig {
            vocab_size: symbols.len() + 2,
            symbols: symbols.clone(),
            mel_vocab_size,
            n_speakers: 1,
            speaker_channels: 4,
            emotion_channels: 0,
            encoder_dim: 8,
            encoder_heads: 2,
            encoder_layers: 1,
            decoder_dim: 8,
            decoder_heads: 2,
            decoder_layers: 1,
            ffn_mult: 2,
            use_alibi: true,
            alibi_alpha: 1.0,
            activation: Default::default(),
            encoder_dropout: 0.0,
            decoder_dropout: 0.0,
            max_len,
            sinusoidal_positions: false,
        };
        seeded_model_file::<melvae::models::Echolancer>(dir.path().join(name), cfg)
    };
    let (e, bad) = (
        echo(8, "echo.safetensors", 120),
        echo(9, "echo9.safetensors", 120),
    );
    let long = echo(8, "echo_long.safetensors", 480);
    let syn = dir.path().join("syn");
    let (e, s) = (e.to_str().unwrap(), syn.to_str().unwrap());
    // A gate threshold of 1 never stops: 120 tokens, 3 rows of 40.
    let r = run(
        "synthesize",
        &[
            "--model",
            e,
            "--vqvae",
            v,
            "hello, there!",
            "--gate-threshold",
            "1",
            "-o",
            s,
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        text.contains("'!' x1") && text.contains("120 tokens"),
        "{text}"
    );
    for f in ["tokens.npy", "gates.npy", "mel.png", "audio.wav"] {
        assert!(syn.join(f).is_file(), "{f}");
    }
    // Streaming through a vocoder of the VQ-VAE's features (blocks of 1
    // row): the same audio as offline synthesis through it.
    let voc = melvae::models::VocosConfig {
        sample_rate: 22050,
        n_fft: 1024,
        hop_length: 256,
        n_mels: 80,
        padding: melvae::models::VocosPadding::Same,
        features: melvae::models::VocosFeatures::Hifigan22k,
        dim: 8,
        intermediate_dim: 12,
        num_layers: 1,
        layer_scale_init_value: None,
        adanorm_num_embeddings: None,
        magnitude_prior: false,
    };
    let voc = seeded_model_file::<melvae::models::Vocos>(dir.path().join("voc.safetensors"), voc);
    let vc = voc.to_str().unwrap();
    let offline = dir.path().join("offline");
    let o2 = offline.to_str().unwrap();
    // 480 tokens: 12 rows of 2 frames, so blocks become final before the
    // end (the vocoder's context is 6 frames).
    let common = [
        "--model",
        long.to_str().unwrap(),
        "--vqvae",
        v,
        "hello",
        "--gate-threshold",
        "1",
        "--vocoder",
        vc,
    ];
    let r = run("synthesize", &[&common[..], &["-o", o2]].concat());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let r = run(
        "synthesize",
        &[&common[..], &["--stream-rows", "1", "-o", s]].concat(),
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let text = String::from_utf8_lossy(&r.stdout);
    // Several blocks, the first before generation ended.
    assert!(
        text.contains("stream block 0:") && text.contains("stream block 3:"),
        "{text}"
    );
    let (x, y) = (
        melvae::dsp::load_audio(offline.join("audio.wav")).unwrap(),
        melvae::dsp::load_audio(syn.join("audio.wav")).unwrap(),
    );
    assert_eq!(x.channels[0].len(), y.channels[0].len());
    let d = x.channels[0]
        .iter()
        .zip(&y.channels[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d <= 2.0 / 32768.0, "streamed differs from offline by {d}");
    let peak = x.channels[0].iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(peak > 1e-3, "silent audio proves nothing: peak {peak}");
    // Streaming needs a vocoder (Griffin-Lim needs the whole mel).
    let r = run(
        "synthesize",
        &[
            "--model",
            e,
            "--vqvae",
            v,
            "hi",
            "--stream-rows",
            "1",
            "-o",
            s,
        ],
    );
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("--vocoder"));
    let r = run(
        "synthesize",
        &[
            "--model",
            e,
            "--vqvae",
            v,
            "hello",
            "--speaker",
            "3",
            "-o",
            s,
        ],
    );
    assert_one_line_error(&r, "--speaker 3");
    let b = bad.to_str().unwrap();
    let r = run(
        "synthesize",
        &["--model", b, "--vqvae", v, "hello", "-o", s],
    );
    assert_one_line_error(&r, "codebook_size");
    let r = run(
        "synthesize",
        &[
            "--model",
            e,
            "--vqvae",
            v,
            "hello",
            "--max-len",
            "121",
            "-o",
            s,
        ],
    );
    assert_one_line_error(&r, "generation length");
}

#[test]
fn generate_vqwave_walks_the_hierarchy_and_names_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let vq = |strides: Vec<usize>| melvae::models::VqVaeConfig {
        net: melvae::models::WaveVaeConfig {
            sample_rate: 22050,
            channels: 4,
            channel_mults: vec![2; strides.len()],
            strides,
            dilations: vec![1],
            latent_dim: 4,
            bottleneck: Default::default(),
            ..Default::default()
        },
        codebook_size: 16,
        commitment: 0.25,
        ema_decay: None,
        restart_threshold: None,
    };
    let prior = |upsample: Option<usize>| melvae::models::LstmPriorConfig {
        vocab_size: 16,
        embed_dim: 4,
        hidden: 6,
        layers: 1,
        context: upsample.map(|upsample| melvae::models::ContextConfig {
            vocab_size: 16,
            embed_dim: 4,
            channels: 4,
            dilations: vec![1],
            kernel_size: 3,
            upsample,
            combine: Default::default(),
        }),
    };
    let levels = dir.path().join("vqwave");
    std::fs::create_dir(&levels).unwrap();
    seeded_model_file::<melvae::models::VqVae>(
        levels.join("vqvae_32.safetensors"),
        vq(vec![2, 4, 4]),
    );
    seeded_model_file::<melvae::models::VqVae>(levels.join("vqvae_8.safetensors"), vq(vec![2, 4]));
    seeded_model_file::<melvae::models::LstmPrior>(
        levels.join("prior_32.safetensors"),
        prior(None),
    );
    seeded_model_file::<melvae::models::LstmPrior>(
        levels.join("prior_8.safetensors"),
        prior(Some(4)),
    );
    let (l, out) = (levels.to_str().unwrap(), dir.path().join("out.wav"));
    let o = out.to_str().unwrap();
    let r = run(
        "generate",
        &["--vqwave", l, "--length", "100", "--output", o],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(text.contains("32x: 4, 8x: 16"), "{text}");
    let offline = melvae::dsp::load_audio(&out).unwrap().channels[0].clone();
    assert_eq!(offline.len(), 128);
    // Streamed generation writes the same audio.
    let r = run(
        "generate",
        &[
            "--vqwave",
            l,
            "--length",
            "100",
            "--stream-codes",
            "3",
            "--output",
            o,
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stdout).contains("first audio was final"));
    // (Within one 16-bit step: the two decodes agree to 1e-5.)
    let streamed = melvae::dsp::load_audio(&out).unwrap().channels[0].clone();
    assert_eq!(streamed.len(), offline.len());
    let d = streamed
        .iter()
        .zip(&offline)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d <= 1.0 / 32768.0 + 1e-6, "{d}");
    // Greedy by temperature 0; stopping at the 32x level.
    let r = run(
        "generate",
        &[
            "--vqwave",
            l,
            "--generators",
            "32",
            "--temperature",
            "0",
            "--length",
            "100",
            "--output",
            o,
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stdout).contains("32x: 4)"));
    let r = run(
        "generate",
        &["--vqwave", l, "--generators", "64", "--output", o],
    );
    assert_one_line_error(&r, "--generators 64");
    let r = run("generate", &["--vqwave", l]);
    assert_one_line_error(&r, "--output");
    // A level reconstructs audio -> codes -> audio, and evaluate scores it
    // as a codec; latent edits are refused (its codes are discrete).
    let vq8 = levels.join("vqvae_8.safetensors");
    let v8 = vq8.to_str().unwrap();
    let rec = dir.path().join("rec.wav");
    let s = sample();
    let r = run(
        "reconstruct",
        &["--model", v8, &s, "-o", rec.to_str().unwrap()],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let r = run(
        "reconstruct",
        &[
            "--model",
            v8,
            &s,
            "-o",
            rec.to_str().unwrap(),
            "--scale",
            "2",
        ],
    );
    assert_one_line_error(&r, "discrete codes");
    let refs = dir.path().join("refs");
    std::fs::create_dir(&refs).unwrap();
    std::fs::copy(sample(), refs.join("x.flac")).unwrap();
    let r = run(
        "evaluate",
        &[
            "--reference",
            refs.to_str().unwrap(),
            "--model",
            v8,
            "--no-pesq",
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    std::fs::remove_file(levels.join("prior_8.safetensors")).unwrap();
    let r = run("generate", &["--vqwave", l, "--output", o]);
    assert_one_line_error(&r, "prior_8");
}

/// The quickstart in `dir` (it reads configs/ and writes runs/ there).
fn quickstart(dir: &Path, args: &[&str]) -> Output {
    Command::new(example("quickstart"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn quickstart_holds_out_voices_writes_listening_pages_and_names_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for sub in ["defaults", "settings"] {
        std::fs::create_dir_all(d.join("configs").join(sub)).unwrap();
    }
    for f in ["train", "data", "bundled_speech", "convformer", "cfm"] {
        let rel = format!("configs/defaults/{f}.yaml");
        std::fs::copy(repo.join(&rel), d.join(&rel)).unwrap();
    }
    let rel = "configs/settings/tiny.yaml";
    std::fs::copy(repo.join(rel), d.join(rel)).unwrap();
    // Three "voices" (one folder each) of two harmonic clips.
    for v in 0..3 {
        let voice = d.join(format!("speech/v{v}"));
        std::fs::create_dir_all(&voice).unwrap();
        for k in 0..2 {
            let f0 = 110.0 + 40.0 * v as f32 + 15.0 * k as f32;
            let x: Vec<f32> = (0..14400)
                .map(|n| {
                    let t = n as f32 / 24000.0;
                    (1..6)
                        .map(|h| (2.0 * std::f32::consts::PI * f0 * h as f32 * t).sin() * 0.1)
                        .sum()
                })
                .collect();
            melvae::dsp::save_wav(
                voice.join(format!("v{v}_s{k}.wav")),
                &melvae::dsp::Audio::new(24000, vec![x]).unwrap(),
                melvae::dsp::WavFormat::Pcm16,
            )
            .unwrap();
        }
    }
    let tiny = [
        "data.dir=speech",
        "data.crop_seconds=0.3",
        "data.batch_size=2",
        "convformer.channels=2",
        "convformer.tf_dim=16",
        "convformer.tf_heads=2",
        "convformer.tf_layers=1",
        "convformer.latent_dim=4",
        "cfm.unet_dim=16",
        "cfm.unet_depth=1",
        "cfm.unet_heads=2",
        "training.steps=2",
        "training.val_every=0",
        "training.sample_every=0",
        "training.tensorboard=false",
        "training.progress=false",
    ];
    // Bad input is named before anything trains.
    let bad = |extra: &[&str], culprit: &str| {
        let args: Vec<&str> = tiny.iter().chain(extra).copied().collect();
        assert_one_line_error(&quickstart(d, &args), culprit);
    };
    bad(&["data.held_out=[v1, v7]"], "data.held_out");
    bad(&["data.held_out=[v7]"], "\"v7\"");
    bad(&["--temperature", "warm"], "--temperature");
    bad(&["--temperature=-1"], "--temperature");
    bad(&["--sample-steps", "0"], "--sample-steps");
    bad(&["--guidance"], "--guidance");
    bad(&["--bogus"], "--bogus");
    bad(&["--eval-only"], "runs/quickstart/model.safetensors");
    bad(&["--eval-only=yes"], "--eval-only takes no value");
    bad(
        &["data.held_out=[]", "data.val_fraction=0"],
        "nothing to evaluate",
    );
    bad(
        &["--eval-only", "--vocoder", "missing.safetensors"],
        "missing.safetensors",
    );
    assert!(!d.join("runs").exists());

    let args: Vec<&str> = tiny
        .iter()
        .copied()
        .chain([
            "data.held_out=[v1]",
            "--sample-steps",
            "2",
            "cfm.reconstruction_temperature=0.3",
        ])
        .collect();
    let out = quickstart(d, &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without --temperature, the model's own temperature samples.
    assert!(stdout.contains("temperature 0.3,"), "{stdout}");
    assert!(
        stdout.contains("2 clips of 1 voice never heard in training"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| v1_s0 |") && stdout.contains("| v1_s1 |"),
        "{stdout}"
    );
    let eval = d.join("runs/quickstart/eval");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["clips"], 2);
    assert_eq!(summary["voices"], 1);
    assert_eq!(summary["rows"][0]["voice"], "v1");
    let (m, b) = (
        summary["log_mel_l1"].as_f64().unwrap(),
        summary["baseline_log_mel_l1"].as_f64().unwrap(),
    );
    assert_eq!(summary["beats_baseline"], m < b);
    let verdict = if m < b {
        "beats the clip-mean baseline"
    } else {
        "does NOT beat"
    };
    assert!(stdout.contains(verdict), "{stdout}");
    let html = std::fs::read_to_string(eval.join("index.html")).unwrap();
    for clip in ["v1_s0", "v1_s1"] {
        assert!(html.contains(&format!("src=\"{clip}.png\"")), "{html}");
        for kind in ["original", "recon_griffin_lim", "input_griffin_lim"] {
            let f = format!("{clip}_{kind}.wav");
            assert!(html.contains(&format!("src=\"{f}\"")), "{f}");
            let a = melvae::dsp::load_audio(eval.join(&f)).unwrap();
            assert_eq!((a.sample_rate, a.n_samples()), (24000, 14400), "{f}");
        }
        assert!(eval.join(format!("{clip}.png")).is_file());
    }
    assert!(!html.contains("v0_s0") && !html.contains("vocos"));

    // Evaluated again at other settings, without training.
    let metrics = std::fs::read(d.join("runs/quickstart/metrics.jsonl")).unwrap();
    let out = quickstart(d, &["--eval-only", "--temperature", "0.25"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = std::fs::read_to_string(eval.join("summary.json")).unwrap();
    assert!(summary.contains("temperature 0.25"), "{summary}");
    assert_eq!(
        std::fs::read(d.join("runs/quickstart/metrics.jsonl")).unwrap(),
        metrics
    );
    let out = quickstart(d, &["--eval-only", "training.steps=5"]);
    assert_one_line_error(&out, "training.steps=5");
    // A bad model override is named before the trained run is replaced:
    // its config, metrics, checkpoints and model file stay.
    let run = d.join("runs/quickstart");
    let kept = ["config.yaml", "metrics.jsonl", "model.safetensors"]
        .map(|f| std::fs::read(run.join(f)).unwrap());
    let checkpoints = std::fs::read_dir(run.join("checkpoints")).unwrap().count();
    for (extra, culprit) in [
        (
            "cfm.low_band_weight={bands: 0, weight: 3.0}",
            "cfm.low_band_weight.bands",
        ),
        ("convformer.tf_heads=3", "convformer.tf_heads"),
    ] {
        let args: Vec<&str> = tiny.iter().copied().chain([extra]).collect();
        assert_one_line_error(&quickstart(d, &args), culprit);
        for (f, bytes) in ["config.yaml", "metrics.jsonl", "model.safetensors"]
            .iter()
            .zip(&kept)
        {
            assert_eq!(&std::fs::read(run.join(f)).unwrap(), bytes, "{f}");
        }
        assert_eq!(
            std::fs::read_dir(run.join("checkpoints")).unwrap().count(),
            checkpoints
        );
    }
    // Any folder of voices: v0 and v2 were heard in training; the report
    // says where the voices come from instead of claiming they are new.
    let out = quickstart(d, &["--eval-only", "--eval-dir", "speech"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("6 clips of 3 voices in speech"), "{stdout}");
    assert!(!stdout.contains("never heard"), "{stdout}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval.join("summary.json")).unwrap()).unwrap();
    assert_eq!(
        (summary["clips"].clone(), summary["voices"].clone()),
        (6.into(), 3.into())
    );
    // The same file name in two voices' folders: both are kept.
    for v in ["a", "b"] {
        std::fs::create_dir_all(d.join("twins").join(v)).unwrap();
        std::fs::copy(
            d.join("speech/v0/v0_s0.wav"),
            d.join(format!("twins/{v}/take 1.wav")),
        )
        .unwrap();
    }
    let out = quickstart(d, &["--eval-only", "--eval-dir", "twins"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(eval.join("index.html")).unwrap();
    for f in [
        "take_1_original.wav",
        "take_1-2_original.wav",
        "take_1.png",
        "take_1-2.png",
    ] {
        assert!(html.contains(&format!("src=\"{f}\"")), "{f}");
        assert!(eval.join(f).is_file(), "{f}");
    }
    // Unreadable clips: the error names the first in path order (the
    // clips are evaluated in parallel, so before the ordered collect this
    // named any of them, depending on the threads), and names it once.
    std::fs::create_dir_all(d.join("broken/v")).unwrap();
    for f in ["a_bad.wav", "b_bad.wav", "c_bad.wav"] {
        std::fs::write(d.join("broken/v").join(f), b"RIFF not audio").unwrap();
    }
    std::fs::create_dir_all(d.join("empty")).unwrap();
    for (dir, culprit) in [
        ("nowhere", "nowhere"),
        ("empty", "empty"),
        ("broken", "a_bad.wav"),
    ] {
        let out = quickstart(d, &["--eval-only", "--eval-dir", dir]);
        assert_one_line_error(&out, culprit);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.matches(culprit).count(), 1, "{err}");
    }
}

/// `training.local_ranks=2`: two in-process ranks with half the batch each
/// follow one process (dropout off, as ranks draw their own masks); a
/// batch that does not split, and 0 ranks, are named.
#[test]
fn local_ranks_follow_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let exp = tiny_experiment(dir.path());
    let exp = exp.to_str().unwrap();
    let arg = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let no_dropout = ["convformer.drop_p=0", "cfm.unet_dropout_rate=0"];
    let with = |name: &str, extra: &[&str]| {
        let run_dir = arg(name);
        let mut a = vec!["--config", exp, "--run-dir", &run_dir];
        a.extend(no_dropout);
        a.extend(extra);
        train(&a);
        std::fs::read_to_string(dir.path().join(name).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["total"].as_f64()
            })
            .collect::<Vec<f64>>()
    };
    let one = with("one", &[]);
    let two = with("two", &["training.local_ranks=2"]);
    assert_eq!((one.len(), two.len()), (12, 12));
    for (a, b) in one.iter().zip(&two) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{one:?} vs {two:?}");
    }
    let bad = |v: &str| {
        let r = arg(&format!("bad{v}"));
        run(
            "train",
            &[
                "--config",
                exp,
                "--run-dir",
                &r,
                &format!("training.local_ranks={v}"),
            ],
        )
    };
    assert_one_line_error(&bad("3"), "data.batch_size");
    assert_one_line_error(&bad("0"), "training.local_ranks");
}

/// `reconstruct` and `evaluate` refuse a negative, infinite or non-numeric
/// `--temperature` while parsing, naming the flag.
#[test]
fn sampling_temperature_must_be_finite_and_not_negative() {
    for prog in ["reconstruct", "evaluate"] {
        for t in ["-1", "inf", "warm"] {
            let flag = format!("--temperature={t}");
            let out = run(prog, &["--model", "missing.safetensors", &flag]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{prog} {t}: {err}");
            assert!(
                err.contains("--temperature") && err.contains("a finite number >= 0"),
                "{prog} {t}: {err}"
            );
        }
    }
}

/// `quickstart --help` prints the usage and exits 0, before any work.
#[test]
fn quickstart_help_prints_usage() {
    let out = run("quickstart", &["--help"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("usage:")
            && text.contains("--eval-dir")
            && text.contains("cfm.reconstruction_temperature"),
        "{text}"
    );
}
