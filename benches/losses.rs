//! Criterion benches of melvae-losses (CPU, f32): `cargo bench --bench losses`.

#[macro_use]
mod support;

use candle_core::{DType, Device, Var};
use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use melvae::layers::testing::noise;
use melvae::losses::{MultiResolutionStftLoss, MultiScaleMelLoss, WaveformLoss};

/// Forward + backward of `loss` on a batch of 8 x 1 s at 24 kHz.
fn bench_loss(c: &mut Criterion, name: &str, loss: &dyn WaveformLoss) {
    let target = noise(&[8, 24000], 1).unwrap().to_dtype(DType::F32).unwrap();
    let pred = (noise(&[8, 24000], 2).unwrap().to_dtype(DType::F32).unwrap() * 0.5).unwrap();
    let mut g = c.benchmark_group("losses");
    g.sample_size(10);
    g.throughput(Throughput::Elements(8 * 24000));
    g.bench_function(name, |b| {
        b.iter_batched(
            || Var::from_tensor(&pred).unwrap(),
            |p| {
                loss.loss(p.as_tensor(), &target)
                    .unwrap()
                    .backward()
                    .unwrap()
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn losses(c: &mut Criterion) {
    let dev = Device::Cpu;
    bench_loss(
        c,
        "mrstft_auraloss_default_fwd_bwd_8x1s_24k",
        &MultiResolutionStftLoss::auraloss_default(&dev).unwrap(),
    );
    bench_loss(
        c,
        "multiscale_mel_dac_fwd_bwd_8x1s_24k",
        &MultiScaleMelLoss::dac(24000, &dev).unwrap(),
    );
}

criterion_group!(benches, losses);
tuned_main!(benches);
