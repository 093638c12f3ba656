//! GPU benchmarks: the matmul ceiling, attention forward (math and flash
//! paths) and forward + backward (math), a DiT block forward + backward and
//! mel VAE training steps, each with its model FLOPs
//! (`melvae::layers::flops`) and model FLOPs utilisation (MFU) against the
//! matmul ceiling measured in the same run and dtype.
//!
//! ```text
//! # on a CUDA machine (docs/gpu.md), the shapes of docs/benchmarks.md:
//! cargo run --release --features cuda,flash-attn --example gpu_bench -- \
//!     --device cuda:0 --dtype bf16 --json candle.json
//! # a smoke run of the same code on the CPU, tiny shapes:
//! cargo run --release --example gpu_bench -- --shapes tiny --dtype f32
//! ```
//!
//! Shapes come from `tools/bench/shapes.json`, which
//! `tools/bench/torch_bench.py` reads too, so both time the same work;
//! `tools/bench/report.py` joins their JSON into the table of
//! docs/benchmarks.md. Each measurement is the mean over `--iters` runs
//! after `--warmup` runs, with the device synchronised before and after.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use common::{mean_seconds, MelVaeBench, MEL_FRAME_RATE};
use melvae::layers::flops::{self, TRAIN_FACTOR};
use melvae::layers::testing::{parse_device, randomize};
use melvae::layers::{attend, attention_probs, uses_flash, AttendOptions, DitBlock, Mode};
use melvae::models::CfmConfig;
use serde::{Deserialize, Serialize};

#[derive(Parser)]
struct Args {
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// `bf16`, `f16` or `f32`.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Shape set of the shapes file: `full` or `tiny`.
    #[arg(long, default_value = "full")]
    shapes: String,
    /// The shapes file.
    #[arg(long, default_value = "tools/bench/shapes.json")]
    shapes_file: PathBuf,
    /// Timed runs per measurement (at least 1).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    iters: u64,
    /// Untimed runs before them.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One shape set of `tools/bench/shapes.json`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Shapes {
    matmul: MatmulShape,
    attention: AttentionShapes,
    dit_block: DitShapes,
    mel_vae: MelVaeShape,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatmulShape {
    m: usize,
    k: usize,
    n: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttentionShapes {
    batch: usize,
    head_dim: usize,
    seqs: Vec<usize>,
    dims: Vec<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DitShapes {
    dim: usize,
    heads: usize,
    cases: Vec<DitCase>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DitCase {
    batch: usize,
    frames: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MelVaeShape {
    setting: String,
}

/// One measurement, as `tools/bench/report.py` reads it.
#[derive(Serialize)]
struct Record {
    /// What ran, at which shape (the same text in the PyTorch results).
    id: String,
    /// `math`, `flash` or `gemm`.
    path: String,
    /// Mean milliseconds per run.
    ms: f64,
    /// Model FLOPs per run.
    flops: f64,
    /// Extra figures (audio seconds per second, ...).
    extra: BTreeMap<String, f64>,
}

#[derive(Serialize)]
struct Report {
    framework: &'static str,
    device: String,
    dtype: String,
    shapes: String,
    /// TFLOP/s of the matmul: the MFU denominator.
    ceiling_tflops: f64,
    results: Vec<Record>,
}

fn load_shapes(file: &PathBuf, set: &str) -> anyhow::Result<Shapes> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the shapes file {}", file.display()))?;
    let mut all: BTreeMap<String, serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a JSON object of shape sets", file.display()))?;
    let names: Vec<String> = all.keys().cloned().collect();
    let value = all.remove(set).with_context(|| {
        format!(
            "{}: no shape set {set:?} (has {})",
            file.display(),
            names.join(", ")
        )
    })?;
    let shapes: Shapes = serde_json::from_value(value)
        .with_context(|| format!("{}: set {set:?}", file.display()))?;
    shapes
        .check()
        .map_err(|e| anyhow::anyhow!("{}: set {set:?}: {e}", file.display()))?;
    Ok(shapes)
}

impl Shapes {
    /// Sizes a run can use: every size > 0, attention widths a multiple of
    /// the head size, the DiT width a multiple of its (even) head count.
    fn check(&self) -> Result<(), String> {
        let MatmulShape { m, k, n } = self.matmul;
        let a = &self.attention;
        let d = &self.dit_block;
        let sizes = [m, k, n, a.batch, a.head_dim, d.dim, d.heads]
            .into_iter()
            .chain(a.seqs.iter().chain(&a.dims).copied())
            .chain(d.cases.iter().flat_map(|c| [c.batch, c.frames]));
        if sizes.into_iter().any(|x| x == 0) {
            return Err("every size must be > 0".into());
        }
        if let Some(dim) = a.dims.iter().find(|&&dim| dim % a.head_dim != 0) {
            return Err(format!(
                "attention.dims: {dim} is not a multiple of head_dim {}",
                a.head_dim
            ));
        }
        if d.dim % d.heads != 0 || (d.dim / d.heads) % 2 != 0 {
            return Err(format!(
                "dit_block: dim {} must split into {} heads of an even size",
                d.dim, d.heads
            ));
        }
        Ok(())
    }
}

fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    Ok(match s {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        _ => anyhow::bail!("--dtype must be bf16, f16 or f32, got {s:?}"),
    })
}

/// Deterministic uniform noise in `[-scale, scale)` of `shape` and `dtype`.
fn random(
    shape: &[usize],
    seed: u64,
    scale: f64,
    dtype: DType,
    dev: &Device,
) -> anyhow::Result<Tensor> {
    let n = shape.iter().product();
    let data: Vec<f32> = common::noise(n, seed)
        .into_iter()
        .map(|x| x * 2.0 * scale as f32)
        .collect();
    Ok(Tensor::from_vec(data, shape, dev)?.to_dtype(dtype)?)
}

struct Bench {
    dev: Device,
    warmup: u64,
    iters: u64,
    records: Vec<Record>,
    ceiling: f64,
}

impl Bench {
    fn run(
        &mut self,
        id: String,
        path: &str,
        flops: f64,
        f: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<f64> {
        let s = mean_seconds(&self.dev, self.warmup, self.iters, f)?;
        let tflops = flops / s / 1e12;
        let mfu = if self.ceiling > 0.0 {
            format!("{:5.1}% MFU", 100.0 * tflops / self.ceiling)
        } else {
            "(ceiling)".into()
        };
        println!(
            "{id:<44} {path:<6} {:>10.3} ms {tflops:>9.2} TFLOP/s {mfu}",
            s * 1e3
        );
        self.records.push(Record {
            id,
            path: path.into(),
            ms: s * 1e3,
            flops,
            extra: BTreeMap::new(),
        });
        Ok(s)
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let dev = parse_device(&args.device).map_err(anyhow::Error::msg)?;
    let dtype = parse_dtype(&args.dtype)?;
    let shapes = load_shapes(&args.shapes_file, &args.shapes)?;
    let mut b = Bench {
        dev: dev.clone(),
        warmup: args.warmup,
        iters: args.iters,
        records: Vec::new(),
        ceiling: 0.0,
    };
    println!(
        "gpu_bench: device {}, {}, shapes {:?}, mean of {} runs after {} warm-up",
        args.device, args.dtype, args.shapes, args.iters, args.warmup
    );

    // The matmul ceiling.
    let MatmulShape { m, k, n } = shapes.matmul;
    let x = random(&[m, k], 1, 1.0, dtype, &dev)?;
    let y = random(&[k, n], 2, 1.0, dtype, &dev)?;
    let s = b.run(
        format!("matmul {m}x{k}x{n}"),
        "gemm",
        flops::linear(m, k, n),
        || {
            x.matmul(&y)?;
            Ok(())
        },
    )?;
    b.ceiling = flops::linear(m, k, n) / s / 1e12;

    // Attention: forward on both paths, forward + backward on the math path.
    let a = &shapes.attention;
    for &dim in &a.dims {
        for &seq in &a.seqs {
            let heads = dim / a.head_dim;
            let shape = [a.batch, heads, seq, a.head_dim];
            let tag = format!("b{} s{seq} d{dim}", a.batch);
            let qkv: Vec<Tensor> = (0..3)
                .map(|i| random(&shape, 10 + i, 1.0, dtype, &dev))
                .collect::<anyhow::Result<_>>()?;
            let (q, k, v) = (&qkv[0], &qkv[1], &qkv[2]);
            let opts = AttendOptions::default();
            let scale = 1.0 / (a.head_dim as f64).sqrt();
            let fwd = flops::attention(a.batch, seq, seq, dim);
            b.run(format!("attention fwd {tag}"), "math", fwd, || {
                attention_probs(q, k, scale, &opts)?.matmul(v)?;
                Ok(())
            })?;
            if uses_flash(q, k, v, &opts)? {
                b.run(format!("attention fwd {tag}"), "flash", fwd, || {
                    attend(q, k, v, &opts)?;
                    Ok(())
                })?;
            }
            let vars: Vec<Var> = qkv
                .iter()
                .map(Var::from_tensor)
                .collect::<candle_core::Result<_>>()?;
            let (q, k, v) = (
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            );
            b.run(
                format!("attention fwd+bwd {tag}"),
                "math",
                TRAIN_FACTOR * fwd,
                || {
                    attend(q, k, v, &opts)?.sum_all()?.backward()?;
                    Ok(())
                },
            )?;
        }
    }
    if !a.dims.is_empty() && !b.records.iter().any(|r| r.path == "flash") {
        println!("(no flash rows: they need --features flash-attn, a CUDA device and bf16/f16)");
    }

    // A DiT block of the mel VAE decoder, forward + backward.
    let d = &shapes.dit_block;
    let cfg = CfmConfig {
        unet_dim: d.dim,
        unet_heads: d.heads,
        ..Default::default()
    }
    .block_config();
    let vm = VarMap::new();
    let block = DitBlock::new(cfg, d.dim, VarBuilder::from_varmap(&vm, dtype, &dev))?;
    randomize(&vm, 0.05, 3)?;
    for case in &d.cases {
        let x = Var::from_tensor(&random(
            &[case.batch, case.frames, d.dim],
            4,
            1.0,
            dtype,
            &dev,
        )?)?;
        let c = Var::from_tensor(&random(&[case.batch, d.dim], 5, 1.0, dtype, &dev)?)?;
        b.run(
            format!(
                "dit block fwd+bwd b{} t{} d{}",
                case.batch, case.frames, d.dim
            ),
            "math",
            TRAIN_FACTOR * flops::dit_block(&cfg, d.dim, case.batch, case.frames),
            || {
                let y = block.forward(x.as_tensor(), c.as_tensor(), None, Mode::Eval)?;
                y.sum_all()?.backward()?;
                Ok(())
            },
        )?;
    }

    // Mel VAE training steps (loss, backward, AdamW).
    let vae = MelVaeBench::new(&shapes.mel_vae.setting, dtype, &dev)?;
    let step_flops = vae.model.config().train_step_flops(vae.batch, vae.frames);
    let id = format!(
        "mel vae train {} b{} t{}",
        shapes.mel_vae.setting, vae.batch, vae.frames
    );
    let t = Instant::now();
    let s = vae.time_train_steps(args.iters)?;
    let audio = vae.batch as f64 * vae.frames as f64 / MEL_FRAME_RATE;
    let tflops = step_flops / s / 1e12;
    println!(
        "{id:<44} {:<6} {:>10.3} ms {tflops:>9.2} TFLOP/s {:5.1}% MFU, {:.2} steps/s, {:.1} audio-s/s ({:.1} M params; {:.1} s)",
        "math",
        s * 1e3,
        100.0 * tflops / b.ceiling,
        1.0 / s,
        audio / s,
        vae.n_params() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    b.records.push(Record {
        id,
        path: "math".into(),
        ms: s * 1e3,
        flops: step_flops,
        extra: BTreeMap::from([
            ("steps_per_s".to_string(), 1.0 / s),
            ("audio_s_per_s".to_string(), audio / s),
        ]),
    });

    if let Some(path) = &args.json {
        let report = Report {
            framework: "candle",
            device: args.device.clone(),
            dtype: args.dtype.clone(),
            shapes: args.shapes.clone(),
            ceiling_tflops: b.ceiling,
            results: b.records,
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    common::exit_with(run())
}
