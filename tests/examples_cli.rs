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
    let (shape, data) = melvae::dsp::read_npy(&npy).unwrap();
    assert_eq!(shape[0], 100);
    assert!(shape[1] > 500 && data.iter().all(|v| v.is_finite()));
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
    assert_eq!(melvae::dsp::read_npy(&npy).unwrap().0[0], 80);
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
