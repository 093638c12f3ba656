//! Criterion benches of melvae-models (CPU, f32): `cargo bench --bench models`.
//!
//! The mel VAE of `configs/settings/tiny.yaml` (the quickstart's model):
//! one training loss with backward on a batch of 8 x 88 frames, encoding
//! and 10-step midpoint sampling of 240 frames (2.56 s of vocos-24k mel).
//! `examples/mel_vae_throughput.rs` reports the same for any setting.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use melvae::dsp::SplitMix64;
use melvae::layers::{seeded_var_builder, testing::noise};
use melvae::models::{MelVae, SampleOptions};
use melvae::train::tasks::mel_vae::mel_vae_config;
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

criterion_group!(benches, mel_vae);
criterion_main!(benches);
