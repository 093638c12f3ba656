//! Criterion benches of melvae-models (CPU, f32): `cargo bench --bench models`.
//!
//! The mel VAE of `configs/settings/tiny.yaml` (the quickstart's model):
//! one training loss with backward on a batch of 8 x 88 frames, encoding
//! and 10-step midpoint sampling of 240 frames (2.56 s of vocos-24k mel).
//! `examples/mel_vae_throughput.rs` reports the same for any setting.
//!
//! The waveform VAE of `configs/settings/wave_vae_tiny.yaml`: the training
//! loss (MR-STFT + mel + L1 + KL) with backward on a batch of 4 x 11840
//! samples (0.49 s at 24 kHz), encoding and decoding of 2 s of audio.
//! `examples/wave_vae_throughput.rs` reports the same for any setting.
//!
//! Vocos at the published mel-24khz size (`VocosConfig::mel_24khz`, seeded
//! random weights): synthesis of 2 s (188 frames), offline and in chunks
//! of 32 frames.

#[macro_use]
mod support;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use criterion::{criterion_group, Criterion, Throughput};
use melvae::dsp::SplitMix64;
use melvae::layers::{seeded_var_builder, testing::noise};
use melvae::models::{MelVae, SampleOptions, Vocos, VocosConfig, WaveVae, WaveVaeObjective};
use melvae::train::tasks::mel_vae::mel_vae_config;
use melvae::train::tasks::wave_vae::wave_vae_config;
use melvae::train::ResolvedConfig;

fn tiny_mel_vae() -> MelVae {
    let resolved = ResolvedConfig::load(Path::new("configs/settings/tiny.yaml"), &[]).unwrap();
    let cfg = mel_vae_config(&resolved).unwrap();
    let vm = VarMap::new();
    MelVae::new(cfg, seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu)).unwrap()
}

/// Log-mel-like input `[batch, 100, frames]` around -5.
fn mel(b: usize, f: usize, seed: u64) -> Tensor {
    let x = noise(&[b, 100, f], seed)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    ((x * 3.0).unwrap() - 5.0).unwrap()
}

fn mel_vae(c: &mut Criterion) {
    let model = tiny_mel_vae();
    let batch = mel(8, 88, 1);
    let long = mel(1, 240, 2);
    let mut g = c.benchmark_group("mel_vae_tiny");
    g.sample_size(10);
    g.throughput(Throughput::Elements(8 * 88));
    g.bench_function("loss_fwd_bwd_b8_f88", |b| {
        let mut rng = SplitMix64::new(0);
        b.iter(|| {
            model
                .loss(&batch, 1000, &mut rng, true)
                .unwrap()
                .total
                .backward()
                .unwrap()
        })
    });
    g.throughput(Throughput::Elements(240));
    g.bench_function("encode_f240", |b| b.iter(|| model.encode(&long).unwrap()));
    let (latent, _) = model.encode(&long).unwrap();
    g.bench_function("sample_10_midpoint_f240", |b| {
        b.iter(|| model.sample(&latent, &SampleOptions::default()).unwrap())
    });
    g.finish();
}

fn wave_vae(c: &mut Criterion) {
    let resolved =
        ResolvedConfig::load(Path::new("configs/settings/wave_vae_tiny.yaml"), &[]).unwrap();
    let sections = wave_vae_config(&resolved).unwrap();
    let vm = VarMap::new();
    let dev = Device::Cpu;
    let model = WaveVae::new(sections.model, seeded_var_builder(&vm, 0, DType::F32, &dev)).unwrap();
    let objective = WaveVaeObjective::new(sections.loss, model.config(), &dev).unwrap();
    let audio = |b: usize, t: usize, seed: u64| {
        (noise(&[b, 1, t], seed)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            * 0.3)
            .unwrap()
    };
    let batch = audio(4, 11840, 1);
    let long = audio(1, 48000, 2);
    let mut g = c.benchmark_group("wave_vae_tiny");
    g.sample_size(10);
    g.throughput(Throughput::Elements(4 * 11840));
    g.bench_function("loss_fwd_bwd_b4_s11840", |b| {
        let mut rng = SplitMix64::new(0);
        b.iter(|| {
            model
                .loss(&batch, 1000, &objective, &mut rng, true)
                .unwrap()
                .total
                .backward()
                .unwrap()
        })
    });
    g.throughput(Throughput::Elements(48000));
    g.bench_function("encode_s48000", |b| b.iter(|| model.encode(&long).unwrap()));
    let (z, _) = model.encode(&long).unwrap();
    g.bench_function("decode_s48000", |b| b.iter(|| model.decode(&z).unwrap()));
    g.finish();
}

fn vocos(c: &mut Criterion) {
    let vm = VarMap::new();
    let v = Vocos::new(
        VocosConfig::mel_24khz(),
        seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let mel = (noise(&[1, 100, 188], 3)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        - 5.0)
        .unwrap();
    let mut g = c.benchmark_group("vocos_mel_24khz");
    g.sample_size(10);
    g.throughput(Throughput::Elements(188 * 256));
    g.bench_function("decode_f188", |b| b.iter(|| v.decode(&mel, None).unwrap()));
    g.bench_function("decode_chunked32_f188", |b| {
        b.iter(|| v.decode_chunked(&mel, None, 32).unwrap())
    });
    g.finish();
}

criterion_group!(benches, mel_vae, wave_vae, vocos);
tuned_main!(benches);
