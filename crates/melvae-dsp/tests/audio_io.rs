//! Decoding every supported format, channel/rate options, WAV writing, and
//! bad input: each error names the file and the cause.

use std::path::{Path, PathBuf};

use melvae_dsp::{
    load_audio, load_audio_with, save_wav, Audio, AudioErrorKind, ChannelMode, LoadOptions,
    ResampleQuality, Stft, StftConfig, WavFormat,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/audio")
        .join(name)
}

fn tone(freq: f64, rate: u32, n: usize, amp: f64) -> Vec<f32> {
    (0..n)
        .map(|i| (amp * (2.0 * std::f64::consts::PI * freq * i as f64 / rate as f64).sin()) as f32)
        .collect()
}

/// Frequency of the strongest STFT bin, in Hz.
fn dominant_hz(x: &[f32], rate: u32) -> f64 {
    let stft = Stft::new(StftConfig::new(4096)).unwrap();
    let mag = stft.spectrogram(x, 1.0).unwrap();
    let sums: Vec<f32> = mag.rows().into_iter().map(|r| r.sum()).collect();
    let bin = sums
        .iter()
        .enumerate()
        .fold((0, 0.0), |m, (i, &v)| if v > m.1 { (i, v) } else { m })
        .0;
    bin as f64 * rate as f64 / 4096.0
}

#[test]
fn compressed_formats_decode_to_the_encoded_tone() {
    for ext in ["flac", "mp3", "ogg", "aac", "m4a"] {
        let a = load_audio(fixture(&format!("tone.{ext}"))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.sample_rate, 44100, "{ext}");
        assert_eq!(a.n_channels(), 2, "{ext}");
        // 0.25 s encoded: exact where the container declares it (FLAC, MP3
        // gapless, Vorbis), plus AAC priming and block padding otherwise.
        let n = a.n_samples();
        match ext {
            "flac" | "mp3" | "ogg" => assert_eq!(n, 11025, "{ext}"),
            _ => assert!((11025..11025 + 4096).contains(&n), "{ext}: {n} samples"),
        }
        assert!(
            (dominant_hz(&a.channels[0], 44100) - 440.0).abs() < 11.0,
            "{ext} left"
        );
        assert!(
            (dominant_hz(&a.channels[1], 44100) - 660.0).abs() < 11.0,
            "{ext} right"
        );
    }
    // FLAC is lossless: the samples are the 16-bit tone.
    let a = load_audio(fixture("tone.flac")).unwrap();
    assert_eq!(a.n_samples(), 11025);
    let want = tone(440.0, 44100, 11025, 0.5);
    let err = a.channels[0]
        .iter()
        .zip(&want)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(err < 1.0 / 32768.0 + 1e-6, "flac max error {err}");
}

#[test]
fn wav_bit_depths_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let x = tone(300.0, 16000, 1600, 0.9);
    for (bits, float) in [
        (8u16, false),
        (16, false),
        (24, false),
        (32, false),
        (32, true),
    ] {
        let p = dir.path().join(format!("t{bits}{float}.wav"));
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 16000,
            bits_per_sample: bits,
            sample_format: if float {
                hound::SampleFormat::Float
            } else {
                hound::SampleFormat::Int
            },
        };
        let mut w = hound::WavWriter::create(&p, spec).unwrap();
        let scale = (1i64 << (bits - 1)) as f64;
        for &v in &x {
            if float {
                w.write_sample(v).unwrap();
            } else {
                w.write_sample(
                    ((v as f64 * scale).round() as i64).clamp(-(scale as i64), scale as i64 - 1)
                        as i32,
                )
                .unwrap();
            }
        }
        w.finalize().unwrap();
        let a = load_audio(&p).unwrap_or_else(|e| panic!("{bits} bit: {e}"));
        assert_eq!(
            (a.sample_rate, a.n_channels(), a.n_samples()),
            (16000, 1, 1600)
        );
        let tol = if float { 0.0 } else { 1.0 / scale as f32 };
        let err = a.channels[0]
            .iter()
            .zip(&x)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max);
        assert!(err <= tol, "{bits}-bit (float {float}): max error {err}");
    }
}

#[test]
fn save_wav_round_trips_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let audio = Audio::new(
        22050,
        vec![tone(200.0, 22050, 500, 0.7), tone(300.0, 22050, 500, 0.3)],
    )
    .unwrap();
    for (fmt, tol) in [(WavFormat::Pcm16, 0.5 / 32768.0), (WavFormat::Float32, 0.0)] {
        let p = dir.path().join("out.wav");
        save_wav(&p, &audio, fmt).unwrap();
        let back = load_audio(&p).unwrap();
        assert_eq!(
            (back.sample_rate, back.n_channels(), back.n_samples()),
            (22050, 2, 500)
        );
        for (c, d) in back.channels.iter().zip(&audio.channels) {
            let err = c
                .iter()
                .zip(d)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err <= tol, "{fmt:?}: {err}");
        }
    }
    // Clipping in 16-bit: out-of-range samples saturate.
    let loud = Audio::new(8000, vec![vec![2.0, -2.0, 1.0, -1.0]]).unwrap();
    let p = dir.path().join("loud.wav");
    save_wav(&p, &loud, WavFormat::Pcm16).unwrap();
    assert_eq!(
        load_audio(&p).unwrap().channels[0],
        vec![32767.0 / 32768.0, -1.0, 32767.0 / 32768.0, -1.0]
    );
}

#[test]
fn channel_modes_and_resampling() {
    let stereo = fixture("tone.flac");
    let mono = load_audio_with(
        &stereo,
        &LoadOptions {
            channels: ChannelMode::Mono,
            ..Default::default()
        },
    )
    .unwrap();
    let both = load_audio(&stereo).unwrap();
    assert_eq!(mono.n_channels(), 1);
    for i in [0, 100, 5000] {
        assert!(
            (mono.channels[0][i] - (both.channels[0][i] + both.channels[1][i]) / 2.0).abs() < 1e-7
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mono.wav");
    save_wav(&p, &mono, WavFormat::Float32).unwrap();
    let st = load_audio_with(
        &p,
        &LoadOptions {
            channels: ChannelMode::Stereo,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        st.channels,
        vec![mono.channels[0].clone(), mono.channels[0].clone()]
    );

    for quality in [ResampleQuality::Sinc, ResampleQuality::Fft] {
        let opts = LoadOptions {
            channels: ChannelMode::Keep,
            sample_rate: Some(24000),
            quality,
        };
        let r = load_audio_with(&stereo, &opts).unwrap();
        assert_eq!(
            (r.sample_rate, r.n_channels(), r.n_samples()),
            (24000, 2, 6000)
        );
        assert!((dominant_hz(&r.channels[1], 24000) - 660.0).abs() < 6.0);
    }
}

#[test]
fn more_than_two_channels_to_stereo_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("quad.wav");
    save_wav(
        &p,
        &Audio::new(8000, vec![vec![0.1; 100]; 4]).unwrap(),
        WavFormat::Pcm16,
    )
    .unwrap();
    assert_eq!(load_audio(&p).unwrap().n_channels(), 4);
    let e = load_audio_with(
        &p,
        &LoadOptions {
            channels: ChannelMode::Stereo,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("4 channels"), "{e}");
}

fn assert_error(path: &Path, kind: AudioErrorKind, detail: &str) {
    let e = load_audio(path).expect_err("bad file must not load");
    let msg = e.to_string();
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(msg.contains(&*name), "error does not name the file: {msg}");
    assert_eq!(e.audio_kind(), Some(kind), "{msg}");
    assert!(msg.contains(detail), "expected {detail:?} in: {msg}");
}

#[test]
fn bad_files_name_the_path_and_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let empty = d.join("empty.wav");
    std::fs::write(&empty, b"").unwrap();
    assert_error(&empty, AudioErrorKind::Empty, "0 bytes");

    // Float WAVs can hold NaN and infinities: rejected, naming the sample.
    for (name, bad) in [("nan.wav", f32::NAN), ("inf.wav", f32::NEG_INFINITY)] {
        let p = d.join(name);
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 8000,
            bits_per_sample: 32,
            sample_format: hound::SampleFormat::Float,
        };
        let mut w = hound::WavWriter::create(&p, spec).unwrap();
        for i in 0..200 {
            w.write_sample(if i == 151 { bad } else { 0.1f32 }).unwrap();
        }
        w.finalize().unwrap();
        assert_error(&p, AudioErrorKind::NonFinite, "sample 75 of channel 1");
    }

    let text = d.join("notes.wav");
    std::fs::write(
        &text,
        "these are not the samples you are looking for\n".repeat(50),
    )
    .unwrap();
    assert_error(&text, AudioErrorKind::NotAudio, "no supported container");

    let noise = d.join("random.bin");
    std::fs::write(
        &noise,
        (0..5000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert_error(&noise, AudioErrorKind::NotAudio, "no supported container");

    // A valid WAV whose data chunk holds no frames.
    let silent = d.join("zero_frames.wav");
    let w = hound::WavWriter::create(
        &silent,
        hound::WavSpec {
            channels: 1,
            sample_rate: 8000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        },
    )
    .unwrap();
    w.finalize().unwrap();
    assert_error(&silent, AudioErrorKind::Empty, "no audio samples");

    // Truncations: inside the sample data, inside the header.
    let full = d.join("full.wav");
    save_wav(
        &full,
        &Audio::new(16000, vec![vec![0.25; 16000]]).unwrap(),
        WavFormat::Pcm16,
    )
    .unwrap();
    let bytes = std::fs::read(&full).unwrap();
    let cut = d.join("cut_data.wav");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_error(
        &cut,
        AudioErrorKind::Truncated,
        "header declares 16000 frames",
    );
    let cut_header = d.join("cut_header.wav");
    std::fs::write(&cut_header, &bytes[..30]).unwrap();
    let e = load_audio(&cut_header).unwrap_err();
    assert!(e.to_string().contains("cut_header.wav"), "{e}");
    assert!(
        matches!(
            e.audio_kind(),
            Some(AudioErrorKind::Truncated | AudioErrorKind::NotAudio)
        ),
        "{e}"
    );

    let flac = std::fs::read(fixture("tone.flac")).unwrap();
    let cut_flac = d.join("cut.flac");
    std::fs::write(&cut_flac, &flac[..flac.len() / 2]).unwrap();
    let e = load_audio(&cut_flac).unwrap_err();
    assert!(e.to_string().contains("cut.flac"), "{e}");
    assert_eq!(e.audio_kind(), Some(AudioErrorKind::Truncated), "{e}");

    // A RIFF/WAVE header with a codec symphonia does not decode (GSM 6.10).
    let gsm = d.join("gsm.wav");
    let mut h = Vec::new();
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&(4 + 8 + 20 + 8 + 65u32).to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&20u32.to_le_bytes());
    h.extend_from_slice(&0x31u16.to_le_bytes()); // WAVE_FORMAT_GSM610
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&8000u32.to_le_bytes());
    h.extend_from_slice(&1625u32.to_le_bytes());
    h.extend_from_slice(&65u16.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&2u16.to_le_bytes());
    h.extend_from_slice(&320u16.to_le_bytes());
    h.extend_from_slice(b"data");
    h.extend_from_slice(&65u32.to_le_bytes());
    h.extend_from_slice(&[0u8; 65]);
    std::fs::write(&gsm, h).unwrap();
    let e = load_audio(&gsm).unwrap_err();
    assert!(e.to_string().contains("gsm.wav"), "{e}");
    assert_eq!(e.audio_kind(), Some(AudioErrorKind::Unsupported), "{e}");

    let missing = d.join("missing.flac");
    let e = load_audio(&missing).unwrap_err();
    assert!(e.to_string().contains("missing.flac"), "{e}");

    let folder = d.join("a_folder.wav");
    std::fs::create_dir(&folder).unwrap();
    let e = load_audio(&folder).unwrap_err();
    assert!(e.to_string().contains("a_folder.wav"), "{e}");
}

#[test]
fn save_wav_rejects_bad_audio_and_keeps_the_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("keep.wav");
    save_wav(
        &p,
        &Audio::new(8000, vec![vec![0.5; 10]]).unwrap(),
        WavFormat::Pcm16,
    )
    .unwrap();
    let before = std::fs::read(&p).unwrap();
    let mut bad = Audio::new(8000, vec![vec![0.5; 10]]).unwrap();
    bad.channels[0][7] = f32::NAN;
    let e = save_wav(&p, &bad, WavFormat::Float32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sample 7 of channel 0") && e.contains("keep.wav"),
        "{e}"
    );
    assert_eq!(std::fs::read(&p).unwrap(), before);
    bad.channels = vec![vec![0.0; 10], vec![0.0; 9]];
    let e = save_wav(&p, &bad, WavFormat::Pcm16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("channel 1"), "{e}");
    let e = save_wav(
        dir.path().join("no/such/dir.wav"),
        &Audio::new(8000, vec![vec![0.0; 4]]).unwrap(),
        WavFormat::Pcm16,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("dir.wav"), "{e}");
}

/// Every fixture cut at 40 points and with bytes flipped at 40 places: each
/// load either succeeds or fails with an error naming the file. Counts the
/// decoder panics that were caught, so a regression in symphonia shows up.
#[test]
fn corrupted_files_never_escape_as_panics() {
    let dir = tempfile::tempdir().unwrap();
    let mut wav = Vec::new();
    {
        let p = dir.path().join("src.wav");
        save_wav(
            &p,
            &Audio::new(16000, vec![tone(300.0, 16000, 4000, 0.5); 2]).unwrap(),
            WavFormat::Pcm16,
        )
        .unwrap();
        wav.push(("wav", std::fs::read(&p).unwrap()));
    }
    let mut sources = wav;
    for ext in ["flac", "mp3", "ogg", "aac", "m4a"] {
        sources.push((ext, std::fs::read(fixture(&format!("tone.{ext}"))).unwrap()));
    }
    let mut caught = 0;
    for (ext, bytes) in &sources {
        let mut variants: Vec<Vec<u8>> = (1..=40)
            .map(|k| bytes[..bytes.len() * k / 41].to_vec())
            .collect();
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..40 {
            let mut b = bytes.clone();
            for _ in 0..8 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let i = (state % b.len() as u64) as usize;
                b[i] ^= (state >> 32) as u8 | 1;
            }
            variants.push(b);
        }
        for (i, v) in variants.iter().enumerate() {
            let p = dir.path().join(format!("bad{i}.{ext}"));
            std::fs::write(&p, v).unwrap();
            if let Err(e) = load_audio(&p) {
                let msg = e.to_string();
                assert!(msg.contains(&format!("bad{i}.{ext}")), "{msg}");
                caught += msg.contains("decoder panicked") as usize;
            }
        }
    }
    eprintln!("decoder panics caught: {caught}");
}
