//! Parity with librosa 0.11 and torchaudio 2.11, through the fixtures that
//! `tools/make_dsp_fixtures.py` writes.

use std::path::PathBuf;

use melvae_dsp::{
    mel_filterbank, read_npy, MelConfig, MelExtractor, MelNorm, MelScale, PadMode, Padding, Stft,
    StftConfig, WindowKind,
};
use ndarray::Array2;

fn fixture(name: &str) -> (Vec<usize>, Vec<f32>) {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.npy"));
    let a = read_npy(&p).unwrap_or_else(|e| panic!("{e}"));
    (a.shape().to_vec(), a.iter().copied().collect())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_fb(name: &str, fb: Array2<f32>, tol: f32) {
    let (shape, want) = fixture(name);
    assert_eq!(shape, vec![fb.nrows(), fb.ncols()], "{name}");
    let d = max_abs_diff(fb.as_slice().unwrap(), &want);
    assert!(d < tol, "{name}: max abs difference {d}");
}

#[test]
fn filterbanks_match_librosa_and_torchaudio() {
    use MelNorm::{None as NoNorm, Slaney as SlaneyNorm};
    use MelScale::{Htk, Slaney};
    let htk24 = mel_filterbank(24000, 1024, 100, 0.0, None, Htk, NoNorm).unwrap();
    check_fb("fb_htk_24k_1024_100", htk24.clone(), 1e-6);
    // torchaudio builds its bank in float32 (frequencies up to 12 kHz divided
    // by ~100 Hz band widths), so it sits up to 7e-6 from the exact weights.
    check_fb("fb_torchaudio_htk_24k_1024_100", htk24, 1e-5);
    check_fb(
        "fb_slaney_22k_1024_80_8k",
        mel_filterbank(22050, 1024, 80, 0.0, Some(8000.0), Slaney, SlaneyNorm).unwrap(),
        1e-6,
    );
    check_fb(
        "fb_slaney_nonorm_16k_512_40_50_7000",
        mel_filterbank(16000, 512, 40, 50.0, Some(7000.0), Slaney, NoNorm).unwrap(),
        1e-6,
    );
    check_fb(
        "fb_htk_slaneynorm_8k_256_20",
        mel_filterbank(8000, 256, 20, 0.0, None, Htk, SlaneyNorm).unwrap(),
        1e-6,
    );
    // The presets use exactly these banks.
    check_fb(
        "fb_htk_24k_1024_100",
        MelConfig::vocos_24k().filterbank().unwrap(),
        1e-6,
    );
    check_fb(
        "fb_slaney_22k_1024_80_8k",
        MelConfig::hifigan_22k().filterbank().unwrap(),
        1e-6,
    );
}

#[test]
fn stft_magnitudes_match_librosa_and_torch() {
    let (_, x) = fixture("signal_chirp_24k");
    let cases = [
        (
            "stft_librosa_512_128_hann",
            StftConfig {
                hop_length: 128,
                ..StftConfig::new(512)
            },
        ),
        (
            "stft_librosa_400_100_300_hamming_constant",
            StftConfig {
                n_fft: 400,
                hop_length: 100,
                win_length: 300,
                window: WindowKind::Hamming,
                periodic: true,
                padding: Padding::Center(PadMode::Constant),
            },
        ),
        (
            "stft_torch_1024_256_nocenter",
            StftConfig {
                hop_length: 256,
                padding: Padding::None,
                ..StftConfig::new(1024)
            },
        ),
    ];
    for (name, cfg) in cases {
        let (shape, want) = fixture(name);
        let got = Stft::new(cfg).unwrap().spectrogram(&x, 1.0).unwrap();
        assert_eq!(shape, vec![got.nrows(), got.ncols()], "{name}");
        let peak = want.iter().copied().fold(0.0, f32::max);
        let d = max_abs_diff(got.as_slice().unwrap(), &want);
        assert!(
            d / peak < 1e-5,
            "{name}: max abs difference {d} (peak {peak})"
        );
    }
}

/// Log-mels agree to 1e-4 (absolute, natural log) wherever the reference is
/// within 60 dB of the clip's peak, and below that to 2e-7 of the peak
/// (-134 dB) in the linear domain. Further down, float32 FFT rounding (in the
/// reference as much as here) dominates, and the log magnifies it: librosa
/// and torchaudio themselves differ by 2e-4 at -80 dB. See docs/dsp.md.
fn check_logmel(cfg: MelConfig, signal: &str, reference: &str) {
    let (_, x) = fixture(signal);
    let (shape, want) = fixture(reference);
    let got = MelExtractor::new(cfg).unwrap().extract(&x).unwrap();
    assert_eq!(shape, vec![got.nrows(), got.ncols()], "{reference}");
    let log_peak = want.iter().copied().fold(f32::MIN, f32::max);
    let peak = log_peak.exp();
    let floor = log_peak - 1e3f32.ln();
    let mut within = 0;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        if *w > floor {
            within += 1;
            assert!((g - w).abs() < 1e-4, "{reference}[{i}]: log-mel {g} vs {w}");
        } else {
            let lin = (g.exp() - w.exp()).abs() / peak;
            assert!(
                lin < 2e-7,
                "{reference}[{i}]: linear difference {lin:e} of peak ({g} vs {w})"
            );
        }
    }
    // Not vacuous: even the narrowband chirp has 10.5% (vocos) and 15% (hifigan)
    // of its values within 60 dB.
    assert!(
        within * 10 > want.len(),
        "{reference}: only {within} of {} values within 60 dB",
        want.len()
    );
}

#[test]
fn vocos_24k_matches_vocos_feature_extractor() {
    for k in ["chirp", "noise", "speech"] {
        check_logmel(
            MelConfig::vocos_24k(),
            &format!("signal_{k}_24k"),
            &format!("logmel_vocos24k_{k}"),
        );
        check_logmel(
            MelConfig::vocos_24k(),
            &format!("signal_{k}_24k"),
            &format!("logmel_vocos24k_librosa_{k}"),
        );
    }
}

#[test]
fn hifigan_22k_matches_hifigan_mel_spectrogram() {
    for k in ["chirp", "noise", "speech"] {
        check_logmel(
            MelConfig::hifigan_22k(),
            &format!("signal_{k}_22k"),
            &format!("logmel_hifigan22k_{k}"),
        );
    }
}
