//! All-reduce bandwidth of the data-parallel communicator (docs/benchmarks.md,
//! docs/distributed.md): the time of `melvae_train::dist::all_reduce` (mean,
//! 4 MiB buckets) for payloads from 4 KiB to 64 MiB, and for the gradient
//! list of the tiny mel VAE, as one training step sends it.
//!
//! ```text
//! cargo build --release --features mpi --example allreduce_throughput
//! mpirun -n 2 target/release/examples/allreduce_throughput
//! # GPUs, one rank each (NCCL): build with --features mpi,nccl, then
//! mpirun -n 2 target/release/examples/allreduce_throughput --device cuda
//! ```
//!
//! Prints, per payload, the mean time of one all-reduce, the algorithm
//! bandwidth (payload / time) and the bus bandwidth (algorithm bandwidth x
//! 2 (n - 1) / n, what each link carries in a ring all-reduce, comparable
//! across rank counts as in nccl-tests). Rank 0 prints.

mod common;

use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Tensor};
use melvae::train::dist::{all_reduce, from_env, Communicator, ReduceOp, DEFAULT_BUCKET_BYTES};

/// Times `reps` all-reduces of `tensors` after two warm-up calls; seconds
/// per call.
fn time(comm: &dyn Communicator, tensors: &[Tensor], reps: usize) -> anyhow::Result<f64> {
    for _ in 0..2 {
        all_reduce(comm, tensors, ReduceOp::Mean, DEFAULT_BUCKET_BYTES)?;
    }
    comm.barrier()?;
    let t = Instant::now();
    for _ in 0..reps {
        all_reduce(comm, tensors, ReduceOp::Mean, DEFAULT_BUCKET_BYTES)?;
    }
    comm.barrier()?;
    Ok(t.elapsed().as_secs_f64() / reps as f64)
}

fn run() -> anyhow::Result<()> {
    let device = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => "cpu".to_string(),
        [flag, d] if flag == "--device" => d.clone(),
        other => anyhow::bail!("unexpected arguments {other:?} (usage: [--device cpu|cuda])"),
    };
    let training = melvae::train::TrainerConfig {
        device,
        ..melvae::train::TrainerConfig::new(1, 1e-3)
    };
    let device = training.device()?;
    let comm = from_env(&device)?;
    let n = comm.world_size();
    let rank0 = comm.rank() == 0;
    if n == 1 {
        println!(
            "1 rank: nothing to measure. Build with --features mpi and run under mpirun -n 2."
        );
        return Ok(());
    }
    let bus = 2.0 * (n - 1) as f64 / n as f64;
    if rank0 {
        println!(
            "all-reduce (mean, {} MiB buckets), {n} ranks, backend {}",
            DEFAULT_BUCKET_BYTES >> 20,
            comm.backend()
        );
        println!("| payload | time per call | algorithm bandwidth | bus bandwidth |");
        println!("|---|---:|---:|---:|");
    }
    let row = |label: &str, bytes: usize, secs: f64| {
        if rank0 {
            let gbs = bytes as f64 / secs / 1e9;
            println!(
                "| {label} | {:.3} ms | {gbs:.2} GB/s | {:.2} GB/s |",
                secs * 1e3,
                gbs * bus
            );
        }
    };
    for kib in [4usize, 64, 1024, 4096, 16384, 65536] {
        let elems = kib * 1024 / 4;
        let t = Tensor::ones(elems, DType::F32, &device)?;
        let reps = (256 * 1024 / kib).clamp(5, 200);
        let label = if kib >= 1024 {
            format!("{} MiB", kib / 1024)
        } else {
            format!("{kib} KiB")
        };
        row(&label, elems * 4, time(comm.as_ref(), &[t], reps)?);
    }
    // The tiny mel VAE's gradients: one tensor per parameter, as the
    // trainer sends them each step.
    let cfg = melvae::train::ResolvedConfig::load(
        std::path::Path::new("configs/settings/tiny.yaml"),
        &[],
    )?;
    let model_cfg = melvae::train::tasks::mel_vae::mel_vae_config(&cfg)?;
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &device);
    melvae::models::MelVae::new(model_cfg, vb)?;
    let grads: Vec<Tensor> = varmap
        .all_vars()
        .iter()
        .map(|v| v.as_tensor().clone())
        .collect();
    let bytes: usize = grads.iter().map(|g| g.elem_count() * 4).sum();
    let label = format!("tiny mel VAE gradients ({} tensors)", grads.len());
    row(&label, bytes, time(comm.as_ref(), &grads, 50)?);
    Ok(())
}

fn main() -> ExitCode {
    common::exit_with(run())
}
