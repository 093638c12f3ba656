//! Criterion benches of melvae-dsp: `cargo bench --bench dsp`.

#[path = "../examples/common/mod.rs"]
mod common;

#[macro_use]
mod support;

use common::noise;

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use melvae::dsp::{
    resample, MelConfig, MelExtractor, ResampleQuality, Stft, StftConfig, TensorStft,
};

fn host(c: &mut Criterion) {
    let x = noise(240_000, 1); // 10 s at 24 kHz
    let mel = MelExtractor::new(MelConfig::vocos_24k()).unwrap();
    let mut g = c.benchmark_group("host");
    g.throughput(Throughput::Elements(x.len() as u64));
    g.bench_function("vocos24k_logmel_10s", |b| {
        b.iter(|| mel.extract(&x).unwrap())
    });
    let batch: Vec<Vec<f32>> = (0..8).map(|i| noise(240_000, 10 + i)).collect();
    g.throughput(Throughput::Elements(8 * 240_000));
    g.bench_function("vocos24k_logmel_batch8x10s_parallel", |b| {
        b.iter(|| mel.extract_batch(&batch).unwrap())
    });
    let stft = Stft::new(StftConfig {
        hop_length: 256,
        ..StftConfig::new(1024)
    })
    .unwrap();
    g.throughput(Throughput::Elements(x.len() as u64));
    g.bench_function("stft_istft_1024_256_10s", |b| {
        b.iter(|| {
            let s = stft.stft(&x).unwrap();
            stft.istft(&s, Some(x.len())).unwrap()
        })
    });
    let x44 = vec![noise(441_000, 3)];
    g.throughput(Throughput::Elements(441_000));
    for (name, q) in [
        ("sinc", ResampleQuality::Sinc),
        ("fft", ResampleQuality::Fft),
    ] {
        g.bench_function(format!("resample_44k1_24k_10s_{name}"), |b| {
            b.iter(|| resample(&x44, 44100, 24000, q).unwrap())
        });
    }
    g.finish();
}

fn tensor(c: &mut Criterion) {
    let dev = Device::Cpu;
    let ts = TensorStft::new(
        StftConfig {
            hop_length: 256,
            ..StftConfig::new(1024)
        },
        &dev,
    )
    .unwrap();
    let data = noise(4 * 24_000, 4);
    let mut g = c.benchmark_group("tensor");
    g.sample_size(20);
    g.throughput(Throughput::Elements(data.len() as u64));
    g.bench_function("tensor_stft_mag_fwd_bwd_4x1s_24k", |b| {
        b.iter_batched(
            || Var::from_vec(data.clone(), (4, 24_000), &dev).unwrap(),
            |x| {
                let loss = ts.magnitude(x.as_tensor()).unwrap().sum_all().unwrap();
                loss.backward().unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    let x = Tensor::from_vec(data.clone(), (4, 24_000), &dev).unwrap();
    g.bench_function("tensor_stft_mag_fwd_4x1s_24k", |b| {
        b.iter(|| ts.magnitude(&x).unwrap())
    });
    g.finish();
}

criterion_group!(benches, host, tensor);
tuned_main!(benches);
