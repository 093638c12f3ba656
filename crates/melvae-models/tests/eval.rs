//! The codec metrics against the reference implementations (fixtures from
//! `tools/make_eval_fixtures.py`: DAC's mel distance, auraloss' MR-STFT,
//! audiotools' SI-SDR, the `pesq` package), and the folder evaluation's
//! errors.

use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::Tensor;
use melvae_dsp::{load_audio, save_wav, Audio, WavFormat};
use melvae_models::eval::{
    evaluate_codec, evaluate_folders, si_sdr, ClipMeanSpectrum, Codec, EvalOptions, Metrics,
    Resampled,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval")
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

#[test]
fn metrics_match_the_reference_implementations() {
    let exp = expected();
    let metrics = Metrics::new(16_000, true, &Device::Cpu).unwrap();
    let pairs = exp["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 3);
    for p in pairs {
        let r = load_audio(fixtures().join(p["reference"].as_str().unwrap())).unwrap();
        let d = load_audio(fixtures().join(p["degraded"].as_str().unwrap())).unwrap();
        let s = metrics.score(&r, &d).unwrap();
        let want = |k: &str| p[k].as_f64().unwrap();
        let name = p["degraded"].as_str().unwrap();
        assert!(
            rel(s.mel_distance, want("mel_distance")) < 1e-5,
            "{name}: mel distance {} vs DAC {}",
            s.mel_distance,
            want("mel_distance")
        );
        assert!(
            rel(s.stft_distance, want("stft_distance")) < 1e-5,
            "{name}: STFT distance {} vs auraloss {}",
            s.stft_distance,
            want("stft_distance")
        );
        assert!(
            (s.si_sdr - want("si_sdr")).abs() < 1e-4,
            "{name}: SI-SDR {} vs audiotools {}",
            s.si_sdr,
            want("si_sdr")
        );
        let pesq = s
            .pesq_wb
            .unwrap_or_else(|| panic!("{name}: {:?}", s.pesq_error));
        assert!(
            (pesq - want("pesq_wb")).abs() < 0.005,
            "{name}: PESQ wb {pesq} vs the pesq package {}",
            want("pesq_wb")
        );
    }
}

#[test]
fn si_sdr_is_scale_invariant_and_checks_lengths() {
    let r: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.05).sin()).collect();
    let noisy: Vec<f32> = r
        .iter()
        .enumerate()
        .map(|(i, x)| x + 0.1 * ((i * 7919 % 101) as f32 / 101.0 - 0.5))
        .collect();
    let a = si_sdr(&r, &noisy).unwrap();
    let scaled: Vec<f32> = noisy.iter().map(|x| 3.0 * x).collect();
    assert!((si_sdr(&r, &scaled).unwrap() - a).abs() < 1e-6);
    assert!(a > 10.0 && a < 40.0, "{a}");
    assert!(si_sdr(&r, &r).unwrap() > 70.0);
    let e = si_sdr(&r, &r[..999]).unwrap_err().to_string();
    assert!(e.contains("1000") && e.contains("999"), "{e}");
}

#[test]
fn pesq_of_silence_is_reported_not_a_panic() {
    let r = load_audio(fixtures().join("ref_0.wav")).unwrap();
    let zeros = Audio::new(16_000, vec![vec![0.0; r.n_samples()]]).unwrap();
    let s = Metrics::new(16_000, true, &Device::Cpu)
        .unwrap()
        .score(&r, &zeros)
        .unwrap();
    assert!(s.pesq_wb.is_none());
    assert!(!s.pesq_error.unwrap().is_empty());
    assert!(s.mel_distance.is_finite() && s.stft_distance.is_finite());
}

#[test]
fn score_names_what_differs() {
    let m = Metrics::new(16_000, false, &Device::Cpu).unwrap();
    let a = Audio::new(16_000, vec![vec![0.1; 1600]]).unwrap();
    let b = Audio::new(16_000, vec![vec![0.1; 1500]]).unwrap();
    let e = m.score(&a, &b).unwrap_err().to_string();
    assert!(e.contains("1500") && e.contains("1600"), "{e}");
    let c = Audio::new(24_000, vec![vec![0.1; 1600]]).unwrap();
    let e = m.score(&a, &c).unwrap_err().to_string();
    assert!(e.contains("24000 Hz"), "{e}");
    let short = Audio::new(16_000, vec![vec![0.1; 1000]]).unwrap();
    let e = m.score(&short, &short).unwrap_err().to_string();
    assert!(e.contains("1000 samples") && e.contains("1024"), "{e}");
}

#[test]
fn folders_pair_by_name_and_name_the_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let (refs, ests) = (dir.path().join("ref"), dir.path().join("est"));
    std::fs::create_dir_all(refs.join("sub")).unwrap();
    std::fs::create_dir_all(ests.join("sub")).unwrap();
    for (i, name) in ["ref_0.wav", "ref_1.wav"].iter().enumerate() {
        let r = load_audio(fixtures().join(name)).unwrap();
        let d = load_audio(fixtures().join(format!("deg_{i}.wav"))).unwrap();
        save_wav(
            refs.join("sub").join(format!("clip{i}.wav")),
            &r,
            WavFormat::Pcm16,
        )
        .unwrap();
        save_wav(
            ests.join("sub").join(format!("clip{i}.wav")),
            &d,
            WavFormat::Pcm16,
        )
        .unwrap();
    }
    let opts = EvalOptions {
        pesq: false,
        max_files: None,
    };
    let report = evaluate_folders(&refs, &ests, opts, &mut |_| {}).unwrap();
    assert_eq!(report.clips.len(), 2);
    assert_eq!(report.clips[0].file, Path::new("sub/clip0.wav"));
    let exp = expected();
    let want = exp["pairs"][1]["si_sdr"].as_f64().unwrap();
    assert!((report.clips[1].scores.si_sdr - want).abs() < 1e-3);
    let md = report.to_markdown();
    assert!(
        md.contains("sub/clip1.wav") && md.contains("mean of 2"),
        "{md}"
    );
    let json = serde_json::to_string(&report).unwrap();
    assert!(json.contains("\"si_sdr\""), "{json}");

    std::fs::remove_file(ests.join("sub/clip1.wav")).unwrap();
    let e = evaluate_folders(&refs, &ests, opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("sub/clip1.wav") && e.contains("est"), "{e}");

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = evaluate_folders(&empty, &ests, opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty") && e.contains("no audio files"), "{e}");
}

#[test]
fn baselines_keep_what_they_promise() {
    // 0.5 s of a 300 Hz tone in noise at 16 kHz, stereo.
    let n = 8000;
    let tone: Vec<f32> = (0..n)
        .map(|i| (i as f32 * 300.0 / 16000.0 * std::f32::consts::TAU).sin() * 0.5)
        .collect();
    let x = Tensor::from_vec([tone.clone(), tone].concat(), (1, 2, n), &Device::Cpu).unwrap();
    // Resampling to 2 kHz keeps the tone (SI-SDR high), and the latent rate
    // counts both channels.
    let r = Resampled {
        sample_rate: 16_000,
        audio_channels: 2,
        rate: 2000,
    };
    assert_eq!(r.latent_rate(), 4000.0);
    let z = r.encode(&x).unwrap();
    assert_eq!(z.dims(), &[1, 2, 1000]);
    let y = r.decode(&z, n).unwrap();
    assert_eq!(y.dims(), &[1, 2, n]);
    let (a, b) = (
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    // The first and last few ms carry the resampler's edge effects.
    assert!(si_sdr(&a[400..7600], &b[400..7600]).unwrap() > 25.0);
    // The clip-mean spectrum keeps the tone's frequency, not its phase.
    let c = ClipMeanSpectrum {
        sample_rate: 16_000,
        audio_channels: 2,
        griffin_lim: Default::default(),
    };
    let z = c.encode(&x).unwrap();
    assert_eq!(z.dims(), &[1, 2, 513]);
    let peak = z.get(0).unwrap().get(0).unwrap().argmax(0).unwrap();
    assert_eq!(peak.to_scalar::<u32>().unwrap(), 19); // 300 Hz / (16000 / 1024)
    let y = c.decode(&z, n).unwrap();
    assert_eq!(y.dims(), &[1, 2, n]);
    // Through the folder evaluation: per-clip rows and means, and the
    // metrics at the codec's rate.
    let files = vec![fixtures().join("ref_0.wav")];
    let opts = EvalOptions {
        pesq: false,
        max_files: None,
    };
    let report = evaluate_codec(
        &r,
        "resampled".into(),
        &fixtures(),
        &files,
        opts,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(report.clips.len(), 1);
    assert_eq!(report.latent_rate, Some(4000.0));
    assert!(report.mean.encode_rtf.unwrap() > 0.0);
}

#[test]
fn class_centroids_classify_by_spectral_balance() {
    use melvae_models::eval::ClassCentroids;
    let low = ndarray::Array2::from_shape_fn((3, 4), |(m, _)| if m == 0 { 1.0 } else { -5.0 });
    let high = ndarray::Array2::from_shape_fn((3, 4), |(m, _)| if m == 2 { 1.0 } else { -5.0 });
    let c = ClassCentroids::fit(
        vec!["low".into(), "high".into()],
        &[(0, low.clone()), (1, high.clone()), (1, high.clone())],
    )
    .unwrap();
    assert_eq!((c.classify(&low), c.classify(&high)), (0, 1));
    let e = ClassCentroids::fit(vec!["low".into(), "none".into()], &[(0, low.clone())])
        .unwrap_err()
        .to_string();
    assert!(e.contains("class none"), "{e}");
    let e = ClassCentroids::fit(vec!["low".into()], &[(3, low)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("class label"), "{e}");
}

/// The vocos-24k log-mel `[100, frames]` of a voiced glide (f0 from `f0` to
/// 1.6 `f0` over 1.5 s, 20 harmonics) after 0.25 s of silence.
fn glide_mel(f0: f64) -> ndarray::Array2<f32> {
    let rate = 24000.0;
    let mut phase = 0.0f64;
    let x: Vec<f32> = (0..42000)
        .map(|n| {
            let t = n as f64 / rate;
            if t < 0.25 {
                return 0.0;
            }
            phase += 2.0 * std::f64::consts::PI * f0 * (1.0 + 0.4 * (t - 0.25)) / rate;
            (1..=20)
                .map(|h| (h as f64 * phase).sin() / h as f64)
                .sum::<f64>() as f32
                * 0.1
        })
        .collect();
    melvae_dsp::MelExtractor::new(melvae_dsp::MelConfig::vocos_24k())
        .unwrap()
        .extract(&x)
        .unwrap()
}

#[test]
fn harmonic_detail_sees_harmonics_and_only_them() {
    use melvae_models::eval::{harmonic_detail, HARMONIC_MAX_HZ};
    let cfg = melvae_dsp::MelConfig::vocos_24k();
    let r = |a: &ndarray::Array2<f32>, b: &ndarray::Array2<f32>| {
        harmonic_detail(a, b, &cfg, HARMONIC_MAX_HZ).unwrap()
    };
    let x = glide_mel(120.0);
    assert!((r(&x, &x).unwrap() - 1.0).abs() < 1e-9);
    // The clip's mean spectrum at every frame: the pitch moves, so its
    // ripple lines up with the frames' harmonics only in part (0.30 here,
    // where the glide keeps the lowest harmonics within a few bands).
    let mean = x.mean_axis(ndarray::Axis(1)).unwrap();
    let flat = ndarray::Array2::from_shape_fn(x.dim(), |(m, _)| mean[m]);
    let rb = r(&x, &flat).unwrap();
    assert!(rb.abs() < 0.5, "clip mean: {rb}");
    // The envelope alone (harmonics smoothed away) keeps little.
    let smooth = ndarray::Array2::from_shape_fn(x.dim(), |(m, t)| {
        let (a, b) = (m.saturating_sub(3), (m + 3).min(99));
        (a..=b).map(|g| x[[g, t]]).sum::<f32>() / (b - a + 1) as f32
    });
    let rs = r(&x, &smooth).unwrap();
    assert!(rs < 0.2, "envelope: {rs}");
    // Another voice's harmonics (a fifth higher) are not this voice's.
    let other = r(&x, &glide_mel(180.0)).unwrap();
    assert!(other.abs() < 0.2, "other pitch: {other}");
    // Silence has no detail; unequal shapes are named.
    let silent = ndarray::Array2::from_elem((100, 20), (1e-7f32).ln());
    assert_eq!(r(&silent, &silent), None);
    let mut broken = x.clone();
    broken[[3, 40]] = f32::NAN;
    assert_eq!(r(&x, &broken), None);
    let e = harmonic_detail(&x, &silent, &cfg, HARMONIC_MAX_HZ)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[100, 20]") && e.contains(&format!("{:?}", x.shape())),
        "{e}"
    );
}
