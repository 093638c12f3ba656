//! Vocos against the `vocos` package (fixtures from
//! `tools/make_vocos_fixtures.py`: tiny models with seeded random weights,
//! a mel and the package's decode of it), loading its config.yaml with its
//! safetensors and its PyTorch pickle, and the model-file round trip.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use melvae_dsp::{read_npy, MelExtractor};
use melvae_models::{model_file, Vocos, VocosPadding};

fn dir(preset: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vocos")
        .join(preset)
}

fn npy(preset: &str, name: &str) -> Tensor {
    let a = read_npy(dir(preset).join(name)).unwrap();
    let shape = a.shape().to_vec();
    Tensor::from_vec(a.iter().copied().collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    melvae_layers::testing::max_abs_diff(a, b).unwrap()
}

/// The package checkpoint `weights` of `preset` with its config.yaml.
fn load(preset: &str, weights: &str) -> Vocos {
    Vocos::from_pretrained(
        &dir(preset).join("config.yaml"),
        &dir(preset).join(weights),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

/// `from_pretrained` with `config` and `weights`, expected to fail: the message.
fn load_err(config: &Path, weights: &Path) -> String {
    Vocos::from_pretrained(config, weights, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string()
}

fn meta(preset: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir(preset).join("meta.json")).unwrap()).unwrap()
}

/// The package's decode, within 1e-4 (its own f32 and f64 decodes differ
/// by 1.4e-6 on these outputs of peak 1.6; 1e-4 leaves room for a
/// different summation order in the ISTFT, and a wrong name, transposition
/// or window would be off by orders of magnitude more).
#[test]
fn decodes_as_the_vocos_package() {
    for (preset, weights) in [
        ("vocos-24k", "model.safetensors"),
        ("vocos-24k", "pytorch_model.bin"),
        ("vocos-22k", "model.safetensors"),
    ] {
        let m = meta(preset);
        let cond = m["bandwidth_id"].as_u64().map(|v| v as usize);
        let v = load(preset, weights);
        let mel = npy(preset, "mel.npy");
        let h = v.backbone(&mel, cond).unwrap();
        let d = max_diff(&h, &npy(preset, "backbone_out.npy"));
        assert!(d < 1e-4, "{preset} {weights}: backbone off by {d}");
        let y = v.decode(&mel, cond).unwrap();
        let d = max_diff(&y, &npy(preset, "audio_out.npy"));
        eprintln!("{preset} {weights}: audio within {d:.2e}");
        assert!(d < 1e-4, "{preset} {weights}: audio off by {d}");
        assert_eq!(
            y.dim(1).unwrap(),
            m["samples_out"].as_u64().unwrap() as usize
        );
    }
}

/// melvae's mel extractor with the vocoder's features reproduces the
/// package's feature extractor (log mels within 1e-3; its own f32 and f64
/// differ by 1.2e-4).
#[test]
fn features_match_the_package() {
    for preset in ["vocos-24k", "vocos-22k"] {
        let v = load(preset, "model.safetensors");
        let audio = npy(preset, "audio_in.npy")
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mel = MelExtractor::new(v.config().mel_config())
            .unwrap()
            .extract(&audio)
            .unwrap();
        let (m, t) = mel.dim();
        let ours = Tensor::from_vec(
            mel.iter().copied().collect::<Vec<_>>(),
            (1, m, t),
            &Device::Cpu,
        )
        .unwrap();
        let d = max_diff(&ours, &npy(preset, "mel.npy"));
        eprintln!("{preset}: log-mel within {d:.2e}");
        assert!(d < 1e-3, "{preset}: log-mel off by {d}");
    }
}

#[test]
fn converts_to_a_model_file_that_decodes_the_same() {
    let d = tempfile::tempdir().unwrap();
    let weights =
        melvae_models::vocoder::read_state_dict(&dir("vocos-22k").join("model.safetensors"))
            .unwrap();
    let v = load("vocos-22k", "model.safetensors");
    assert_eq!(v.config().padding, VocosPadding::Same);
    assert_eq!(v.config().adanorm_num_embeddings, Some(4));
    let path = d.path().join("vocos.safetensors");
    model_file::save::<Vocos>(
        &path,
        v.config(),
        &weights,
        &Default::default(),
        Path::new("fixture"),
    )
    .unwrap();
    let back = Vocos::load(&path, &Device::Cpu, DType::F32).unwrap();
    let mel = npy("vocos-22k", "mel.npy");
    assert_eq!(
        max_diff(
            &v.decode(&mel, Some(2)).unwrap(),
            &back.decode(&mel, Some(2)).unwrap()
        ),
        0.0
    );
    // A mel model's audio cannot use it: it needs a condition id.
    let e = melvae_models::eval::MelToAudio::new(Some(back.clone()), &back.config().mel_config())
        .unwrap_err()
        .to_string();
    assert!(e.contains("AdaLayerNorm"), "{e}");
    // The condition is checked.
    let e = back.decode(&mel, None).unwrap_err().to_string();
    assert!(e.contains("condition id"), "{e}");
    let e = back.decode(&mel, Some(4)).unwrap_err().to_string();
    assert!(e.contains("id 4") && e.contains("0 to 3"), "{e}");
    let e = back
        .decode(&mel.narrow(1, 0, 79).unwrap(), Some(0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocos mel") && e.contains("80"), "{e}");
}

#[test]
fn bad_checkpoints_are_named() {
    let d = tempfile::tempdir().unwrap();
    let cfg = dir("vocos-24k").join("config.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    // Another feature extractor: not a mel vocoder.
    let enc = d.path().join("encodec.yaml");
    std::fs::write(
        &enc,
        text.replace("MelSpectrogramFeatures", "EncodecFeatures"),
    )
    .unwrap();
    let e = load_err(&enc, &dir("vocos-24k").join("model.safetensors"));
    assert!(
        e.contains("encodec.yaml") && e.contains("EncodecFeatures"),
        "{e}"
    );
    // A head that disagrees with the features.
    let bad = d.path().join("bad.yaml");
    std::fs::write(&bad, text.replacen("n_fft: 1024", "n_fft: 2048", 1)).unwrap();
    let e = load_err(&bad, &dir("vocos-24k").join("model.safetensors"));
    assert!(
        e.contains("bad.yaml") && e.contains("head.init_args.n_fft"),
        "{e}"
    );
    // Weights of another model (the 22k one has AdaLayerNorm): the missing
    // tensor is named.
    let e = load_err(&cfg, &dir("vocos-22k").join("model.safetensors"));
    assert!(
        e.contains("model.safetensors") && e.contains("backbone."),
        "{e}"
    );
    // Not weights at all.
    let junk = d.path().join("junk.bin");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    let e = load_err(&cfg, &junk);
    assert!(e.contains("junk.bin"), "{e}");
}
