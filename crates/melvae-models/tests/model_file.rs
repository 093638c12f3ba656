//! Model files as a downstream crate uses them: this test depends on
//! `melvae-models` (and the `melvae-dsp`/`melvae-layers` it re-uses), never
//! on `melvae-train`. It writes a quickstart-sized mel VAE, loads it back,
//! encodes, streams and decodes, and checks that bad files are named.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use melvae_layers::testing::max_abs_diff;
use melvae_layers::{seeded_var_builder, Streaming};
use melvae_models::model_file::{self, FORMAT};
use melvae_models::{
    CfmConfig, ConvformerConfig, LowBandWeight, MelVae, MelVaeConfig, SampleOptions,
};

/// The quickstart's model (`configs/settings/tiny.yaml`; keep the two in
/// step).
fn quickstart_config() -> MelVaeConfig {
    MelVaeConfig {
        convformer: ConvformerConfig {
            compress_factor: 4,
            channels: 8,
            n_residual_blocks: 1,
            tf_dim: 64,
            tf_heads: 4,
            tf_layers: 2,
            drop_p: 0.0,
            latent_dim: 32,
            kl_loss_weight: 1e-4,
            kl_loss_warmup_steps: 200,
            ..Default::default()
        },
        cfm: CfmConfig {
            unet_dim: 128,
            unet_depth: 2,
            unet_heads: 4,
            mel_std: 1.0,
            low_band_weight: Some(LowBandWeight {
                bands: 30,
                weight: 3.0,
            }),
            reconstruction_temperature: 0.1,
            ..Default::default()
        },
    }
}

/// A trained-looking model: seeded random weights (the zero-initialised
/// heads perturbed so that outputs depend on the input).
fn weights(cfg: &MelVaeConfig) -> HashMap<String, Tensor> {
    let vm = VarMap::new();
    MelVae::new(
        cfg.clone(),
        seeded_var_builder(&vm, 7, DType::F32, &Device::Cpu),
    )
    .unwrap();
    melvae_layers::testing::randomize(&vm, 0.05, 3).unwrap();
    melvae_layers::named_tensors(&vm)
}

fn write(path: &Path, cfg: &MelVaeConfig, w: &HashMap<String, Tensor>) {
    let extra = BTreeMap::from([("weights".to_string(), "raw".to_string())]);
    model_file::save::<MelVae>(path, cfg, w, &extra, Path::new("test weights")).unwrap();
}

fn speech() -> Vec<f32> {
    // 1.5 s of a gliding two-tone signal at 24 kHz.
    (0..36_000)
        .map(|i| {
            let t = i as f32 / 24_000.0;
            0.3 * (2.0 * std::f32::consts::PI * (150.0 + 40.0 * t) * t * 8.0).sin()
                + 0.1 * (2.0 * std::f32::consts::PI * 900.0 * t).sin()
        })
        .collect()
}

#[test]
fn a_downstream_crate_loads_encodes_streams_and_decodes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mel_vae.safetensors");
    let cfg = quickstart_config();
    let w = weights(&cfg);
    write(&path, &cfg, &w);

    // The file says what it is.
    let info = model_file::read_info(&path).unwrap();
    assert_eq!(info.family, "mel_vae");
    assert_eq!(info.metadata["format"], FORMAT);
    assert_eq!(info.metadata["weights"], "raw");
    assert_eq!(info.melvae_version, env!("CARGO_PKG_VERSION"));

    // Loading works from a read-only file and never writes beside it.
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&path, perms).unwrap();
    let dev = Device::Cpu;
    let mut model = MelVae::load(&path, &dev, DType::F32).unwrap();
    assert_eq!(model.config(), &cfg);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    // Encode: the loaded model equals one built from the same tensors.
    let audio = speech();
    let mel = model.audio_to_mel(&audio, 24_000, &dev).unwrap();
    let (mean, logvar) = model.encode(&mel).unwrap();
    assert!(!mean.track_op(), "plain tensors track no gradients");
    let direct =
        model_file::from_tensors::<MelVae>(cfg.clone(), &w, Path::new("w"), &dev, DType::F32)
            .unwrap();
    assert_eq!(
        max_abs_diff(&mean, &direct.encode(&mel).unwrap().0).unwrap(),
        0.0
    );

    // Stream the encoder in chunks of mel frames: equal to the offline latents.
    let normalised = mel
        .affine(1.0 / cfg.cfm.mel_std, -cfg.cfm.mel_mean / cfg.cfm.mel_std)
        .unwrap();
    model.encoder.reset();
    let mut outs = Vec::new();
    let frames = normalised.dim(2).unwrap();
    let mut pos = 0;
    for n in [5, 13, 1, 30, 8].iter().cycle() {
        if pos >= frames {
            break;
        }
        let n = (*n).min(frames - pos);
        if let Some(y) = model
            .encoder
            .step(&normalised.narrow(2, pos, n).unwrap())
            .unwrap()
        {
            outs.push(y);
        }
        pos += n;
    }
    let streamed = model.stream_mean(&Tensor::cat(&outs, 1).unwrap()).unwrap();
    assert!(max_abs_diff(&streamed, &mean).unwrap() < 1e-5);
    let _ = logvar;

    // Stream raw audio (mel frontend + encoder) in uneven chunks: the same
    // latents as offline, and the stream restarts after finish.
    let mut stream = model.encoder_stream().unwrap();
    assert_eq!(stream.latency_samples(), (4 - 1) * 256 + 512);
    for _ in 0..2 {
        let mut means = Vec::new();
        let mut pos = 0;
        for n in [1000usize, 3, 4800, 777, 12000].iter().cycle() {
            if pos >= audio.len() {
                break;
            }
            let n = (*n).min(audio.len() - pos);
            if let Some(l) = stream.push(&audio[pos..pos + n], &dev).unwrap() {
                assert!(!l.mean.track_op());
                means.push(l.mean);
            }
            pos += n;
        }
        means.extend(stream.finish(&dev).unwrap().map(|l| l.mean));
        let streamed = Tensor::cat(&means, 1).unwrap();
        assert_eq!(streamed.dims(), mean.dims());
        assert!(max_abs_diff(&streamed, &mean).unwrap() < 1e-5);
    }

    // Decode: a mel of the input's shape, finite.
    let opts = SampleOptions {
        num_steps: 2,
        ..Default::default()
    };
    let out = model.sample(&mean, &opts).unwrap();
    assert_eq!(out.dims(), mel.dims());
    let total = out.sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(total.is_finite());
    let r = model.reconstruct(&audio, 24_000, &opts, &dev).unwrap();
    assert_eq!(r.output.dims(), r.input.dims());
    let _ = D::Minus1;
}

#[test]
fn bad_model_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = quickstart_config();
    let w = weights(&cfg);
    let err = |p: &Path| {
        MelVae::load(p, &Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string()
    };

    // A missing tensor (checked when writing, and when loading a file made
    // by hand).
    let mut missing = w.clone();
    missing.remove("encoder.out.bias");
    let e = model_file::save::<MelVae>(
        &dir.path().join("x.safetensors"),
        &cfg,
        &missing,
        &BTreeMap::new(),
        Path::new("my checkpoint"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("my checkpoint") && e.contains("encoder.out.bias"),
        "{e}"
    );

    let good = dir.path().join("good.safetensors");
    write(&good, &cfg, &w);
    let info = model_file::read_info(&good).unwrap();
    let raw = |name: &str, tensors: &HashMap<String, Tensor>, meta: &BTreeMap<String, String>| {
        let p = dir.path().join(name);
        let bytes = safetensors::serialize(
            tensors.iter().map(|(k, v)| (k.as_str(), v)),
            Some(meta.clone().into_iter().collect()),
        )
        .unwrap();
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let p = raw("missing.safetensors", &missing, &info.metadata);
    let e = err(&p);
    assert!(
        e.contains("missing.safetensors") && e.contains("encoder.out.bias"),
        "{e}"
    );

    // A tensor of the wrong shape.
    let mut wrong = w.clone();
    wrong.insert(
        "encoder.out.bias".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = err(&raw("shape.safetensors", &wrong, &info.metadata));
    assert!(
        e.contains("shape.safetensors") && e.contains("encoder.out.bias") && e.contains("[3]"),
        "{e}"
    );

    // A tensor the model does not use.
    let mut extra = w.clone();
    extra.insert(
        "encoder.stray".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = err(&raw("extra.safetensors", &extra, &info.metadata));
    assert!(
        e.contains("extra.safetensors") && e.contains("encoder.stray"),
        "{e}"
    );

    // Another family, a config that does not parse, no metadata at all.
    let mut meta = info.metadata.clone();
    meta.insert("family".into(), "wave_vae".into());
    let e = err(&raw("family.safetensors", &w, &meta));
    assert!(
        e.contains("family.safetensors") && e.contains("`wave_vae` model"),
        "{e}"
    );
    let mut meta = info.metadata.clone();
    meta.insert("config".into(), "{\"convformer\": 3}".into());
    let e = err(&raw("config.safetensors", &w, &meta));
    assert!(
        e.contains("config.safetensors") && e.contains("config"),
        "{e}"
    );
    let e = err(&raw("plain.safetensors", &w, &BTreeMap::new()));
    assert!(
        e.contains("plain.safetensors") && e.contains("not a melvae model file"),
        "{e}"
    );

    // Not a file, not safetensors, truncated.
    let e = err(&dir.path().join("absent.safetensors"));
    assert!(e.contains("absent.safetensors"), "{e}");
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"RIFF....WAVEfmt ").unwrap();
    let e = err(&junk);
    assert!(
        e.contains("junk.safetensors") && e.contains("not a safetensors file"),
        "{e}"
    );
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&cut);
    assert!(e.contains("cut.safetensors"), "{e}");

    // Half precision needs CUDA.
    let e = MelVae::load(&good, &Device::Cpu, DType::BF16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("dtype") && e.contains("CUDA"), "{e}");
}

/// Writes the variables of `vm` as a model file of family `F`, loads it
/// back (memory-mapped, read-only) and returns the loaded model.
fn round_trip<F: model_file::Family>(dir: &Path, cfg: &F::Config, vm: &VarMap) -> F {
    let path = dir.join(format!("{}.safetensors", F::NAME));
    model_file::save::<F>(
        &path,
        cfg,
        &melvae_layers::named_tensors(vm),
        &BTreeMap::new(),
        Path::new("test weights"),
    )
    .unwrap();
    let info = model_file::read_info(&path).unwrap();
    assert_eq!(info.family, F::NAME);
    model_file::load::<F>(&path, &Device::Cpu, DType::F32)
        .unwrap()
        .0
}

/// The spectrogram-token families load from their model files with
/// melvae-models alone and compute what the models that wrote them do.
#[test]
fn token_models_round_trip_through_model_files() {
    use melvae_layers::Mode;
    use melvae_models::{
        Echolancer, EcholancerConfig, EcholancerInputs, Gpt, GptConfig, GptPositions, GptVae,
        GptVaeConfig, LatentInjection, MelVqVae, MelVqVaeConfig,
    };
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let built = |seed| {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, seed, DType::F32, &dev);
        (vm, vb)
    };

    let cfg = MelVqVaeConfig {
        attention: true,
        attention_heads: 2,
        ..MelVqVaeConfig::new("hifigan-22k", vec![2, 4], vec![[2, 2]], 16, 3)
    };
    let (vm, vb) = built(1);
    let vq = MelVqVae::new(cfg.clone(), vb).unwrap();
    let loaded: MelVqVae = round_trip(dir.path(), &cfg, &vm);
    let mel = Tensor::randn(0f32, 1.0, (1, 80, 8), &dev).unwrap();
    let (a, b) = (vq.encode(&mel).unwrap(), loaded.encode(&mel).unwrap());
    assert_eq!(a.to_vec2::<u32>().unwrap(), b.to_vec2::<u32>().unwrap());
    assert!(max_abs_diff(&vq.decode(&a).unwrap(), &loaded.decode(&b).unwrap()).unwrap() < 1e-6);

    let cfg = GptConfig {
        vocab_size: 16,
        num_classes: 2,
        max_len: 8,
        dim: 8,
        heads: 2,
        layers: 1,
        positions: GptPositions::Rotary,
        dropout: 0.0,
    };
    let (vm, vb) = built(2);
    let gpt = Gpt::new(cfg.clone(), vb).unwrap();
    let loaded: Gpt = round_trip(dir.path(), &cfg, &vm);
    let tokens = Tensor::new(&[[1u32, 5, 9]], &dev).unwrap();
    let class = Tensor::new(&[1u32], &dev).unwrap();
    let (a, b) = (
        gpt.forward(&tokens, &class, Mode::Eval).unwrap(),
        loaded.forward(&tokens, &class, Mode::Eval).unwrap(),
    );
    assert!(max_abs_diff(&a, &b).unwrap() < 1e-6);

    let cfg = GptVaeConfig {
        vocab_size: 16,
        max_len: 8,
        dim: 8,
        heads: 2,
        enc_layers: 1,
        dec_layers: 1,
        latent_dim: 4,
        injection: LatentInjection::Both,
        dropout: 0.0,
    };
    let (vm, vb) = built(3);
    let vae = GptVae::new(cfg.clone(), vb).unwrap();
    let loaded: GptVae = round_trip(dir.path(), &cfg, &vm);
    let (a, _) = vae.encode(&tokens, None, Mode::Eval).unwrap();
    let (b, _) = loaded.encode(&tokens, None, Mode::Eval).unwrap();
    assert!(max_abs_diff(&a, &b).unwrap() < 1e-6);

    let cfg = EcholancerConfig {
        vocab_size: 6,
        symbols: ["a", "b", "c", " "].map(String::from).to_vec(),
        mel_vocab_size: 16,
        n_speakers: 2,
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
        max_len: 8,
        sinusoidal_positions: true,
    };
    let (vm, vb) = built(4);
    let mut tts = Echolancer::new(cfg.clone(), vb).unwrap();
    let wave_cfg = melvae_models::VqVaeConfig {
        net: melvae_models::WaveVaeConfig {
            sample_rate: 22050,
            channels: 4,
            channel_mults: vec![2, 2],
            strides: vec![2, 4],
            latent_dim: 4,
            bottleneck: Default::default(),
            ..Default::default()
        },
        codebook_size: 16,
        commitment: 0.25,
        ema_decay: None,
        restart_threshold: Some(1.0),
    };
    let (wvm, wvb) = built(5);
    let wave = melvae_models::VqVae::new(wave_cfg.clone(), wvb).unwrap();
    let loaded_wave: melvae_models::VqVae = round_trip(dir.path(), &wave_cfg, &wvm);
    let audio = Tensor::randn(0f32, 0.3, (1, 1, 64), &dev).unwrap();
    let (a, b) = (
        wave.encode(&audio).unwrap(),
        loaded_wave.encode(&audio).unwrap(),
    );
    assert_eq!(a.to_vec2::<u32>().unwrap(), b.to_vec2::<u32>().unwrap());
    let prior_cfg = melvae_models::LstmPriorConfig {
        vocab_size: 16,
        embed_dim: 4,
        hidden: 8,
        layers: 2,
        context: Some(melvae_models::ContextConfig {
            vocab_size: 16,
            embed_dim: 4,
            channels: 4,
            dilations: vec![1, 2],
            kernel_size: 3,
            upsample: 4,
            combine: Default::default(),
        }),
    };
    let (pvm, pvb) = built(6);
    let prior = melvae_models::LstmPrior::new(prior_cfg.clone(), pvb).unwrap();
    let loaded_prior: melvae_models::LstmPrior = round_trip(dir.path(), &prior_cfg, &pvm);
    let ctx = Tensor::new(&[[3u32, 9]], &dev).unwrap();
    let opts = melvae_models::SamplingOptions::default();
    let (a, b) = (
        prior.sample(1, 8, Some(&ctx), &opts, &dev).unwrap(),
        loaded_prior.sample(1, 8, Some(&ctx), &opts, &dev).unwrap(),
    );
    assert_eq!(a.to_vec2::<u32>().unwrap(), b.to_vec2::<u32>().unwrap());
    let mut loaded: Echolancer = round_trip(dir.path(), &cfg, &vm);
    // The tokenizer travels in the config.
    let (ids, unknown) = loaded.config().tokenizer().unwrap().encode("abc ba");
    assert!(unknown.is_empty());
    let inputs = EcholancerInputs {
        text: Tensor::new(ids.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        text_mask: None,
        speakers: Tensor::new(&[1u32], &dev).unwrap(),
        emotion: None,
    };
    let opts = melvae_models::SamplingOptions::default();
    let (a, b) = (
        tts.generate(&inputs, 8, 1.0, &opts).unwrap(),
        loaded.generate(&inputs, 8, 1.0, &opts).unwrap(),
    );
    assert_eq!(a.tokens, b.tokens);
}
