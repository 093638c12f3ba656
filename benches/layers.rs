//! Criterion benches of melvae-layers (CPU, f32): `cargo bench --bench layers`.

#[macro_use]
mod support;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use melvae::layers::{
    testing::noise, AttentionConfig, Mode, MultiHeadAttention, ResidualStack, ResidualUnitConfig,
    Upsample, UpsampleConfig, VectorQuantizer, VqConfig,
};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    noise(shape, seed).unwrap().to_dtype(DType::F32).unwrap()
}

fn vb(vm: &VarMap) -> VarBuilder<'static> {
    VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu)
}

fn attention(c: &mut Criterion) {
    let vm = VarMap::new();
    let cfg = AttentionConfig {
        causal: true,
        ..AttentionConfig::new(512, 8)
    };
    let mha = MultiHeadAttention::new(cfg, vb(&vm)).unwrap();
    let x = randn(&[8, 512, 512], 1);
    let mut g = c.benchmark_group("layers");
    g.sample_size(10);
    g.throughput(Throughput::Elements(8 * 512));
    g.bench_function("attention_math_fwd_bwd_b8_t512_d512_h8", |b| {
        b.iter_batched(
            || Var::from_tensor(&x).unwrap(),
            |x| {
                mha.forward(x.as_tensor(), None, Mode::Eval)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn conv_stack(c: &mut Criterion) {
    let vm = VarMap::new();
    let stack = ResidualStack::new(ResidualUnitConfig::seanet(64, 1), &[1, 3, 9], vb(&vm)).unwrap();
    let x = randn(&[4, 64, 8192], 2);
    let mut g = c.benchmark_group("layers");
    g.sample_size(10);
    g.throughput(Throughput::Elements(4 * 8192));
    g.bench_function("causal_residual_stack_fwd_bwd_b4_c64_t8192", |b| {
        b.iter_batched(
            || Var::from_tensor(&x).unwrap(),
            |x| {
                stack
                    .forward(x.as_tensor())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn vq_search(c: &mut Criterion) {
    let vm = VarMap::new();
    let q = VectorQuantizer::new(VqConfig::new(1024, 32), vb(&vm)).unwrap();
    let x = randn(&[65536, 32], 3);
    let mut g = c.benchmark_group("layers");
    g.sample_size(10);
    g.throughput(Throughput::Elements(65536));
    g.bench_function("vq_nearest_1024x32_64k", |b| {
        b.iter(|| q.nearest(&x).unwrap())
    });
    g.finish();
}

fn upsample(c: &mut Criterion) {
    let vm = VarMap::new();
    let cfg = UpsampleConfig {
        in_channels: 64,
        out_channels: 32,
        kernel_size: 8,
        stride: 4,
        bias: true,
        weight_norm: false,
        causal: true,
    };
    let up = Upsample::new(cfg, vb(&vm)).unwrap();
    let x = randn(&[8, 64, 1024], 4);
    let w = up.weight().unwrap();
    let mut g = c.benchmark_group("layers");
    g.sample_size(10);
    g.throughput(Throughput::Elements(8 * 1024 * 4));
    g.bench_function("upsample_polyphase_fwd_bwd_b8_c64_t1024_s4", |b| {
        b.iter_batched(
            || Var::from_tensor(&x).unwrap(),
            |x| {
                up.forward(x.as_tensor())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("upsample_polyphase_fwd_b8_c64_t1024_s4", |b| {
        b.iter(|| up.forward_full(&x).unwrap())
    });
    g.bench_function("candle_conv_transpose1d_fwd_b8_c64_t1024_s4", |b| {
        b.iter(|| x.conv_transpose1d(&w, 0, 0, 4, 1, 1).unwrap())
    });
    g.finish();
}

criterion_group!(benches, attention, conv_stack, vq_search, upsample);
tuned_main!(benches);
