//! Data-loading throughput: crops from decoded audio vs the memory-mapped
//! cache, and a simulated training step with and without prefetching.
//!
//! ```text
//! cargo run --release --example data_throughput
//! ```
//!
//! Builds a temporary folder of 48 synthetic 3 s WAV files at 24 kHz.

use std::time::Instant;

use candle_core::{Device, Tensor};
use melvae::dsp::{save_wav, Audio, SplitMix64, WavFormat};
use melvae::train::{AudioDataConfig, AudioFolder, EpochCursor, Prefetcher, SplitBy};

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for i in 0..48 {
        let x: Vec<f32> = (0..72000)
            .map(|n| ((n * (i + 3)) as f32 * 0.001).sin() * 0.3)
            .collect();
        save_wav(
            dir.path().join(format!("clip{i:02}.wav")),
            &Audio::new(24000, vec![x])?,
            WavFormat::Pcm16,
        )?;
    }
    let cfg = AudioDataConfig {
        dir: dir.path().to_path_buf(),
        sample_rate: 24000,
        channels: 1,
        crop_seconds: 1.0,
        batch_size: 16,
        cache_dir: None,
        val_fraction: 0.0,
        split_by: SplitBy::File,
        held_out: Vec::new(),
    };
    let dev = Device::Cpu;
    let batch = 16;
    let reps = 200;

    let t = Instant::now();
    let mem = AudioFolder::load(&cfg)?;
    let load_s = t.elapsed().as_secs_f64();
    let cache = dir.path().join("cache");
    let t = Instant::now();
    let (mapped, _) = AudioFolder::load_cached(&cfg, &cache)?;
    let prepare_s = t.elapsed().as_secs_f64();

    let time_batches = |set: &melvae::train::AudioSet| -> anyhow::Result<f64> {
        let mut cur = EpochCursor { epoch: 0, pos: 0 };
        let mut rng = SplitMix64::new(1);
        let t = Instant::now();
        for _ in 0..reps {
            let idx = cur.next(set, 0, batch);
            set.batch(&idx, &mut rng, &dev)?;
        }
        Ok(t.elapsed().as_secs_f64() / reps as f64)
    };
    let mem_b = time_batches(&mem.train)?;
    let map_b = time_batches(&mapped.train)?;

    // A "training step": a matmul of roughly the cost of a small model.
    let w = Tensor::randn(0f32, 1.0, (1024, 1024), &dev)?;
    let step = |x: &Tensor| -> anyhow::Result<()> {
        let h = x.reshape((batch * 24000 / 1024, 1024))?.matmul(&w)?;
        h.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    };
    // Data side made deliberately expensive: decode from disk every batch.
    let files: Vec<_> = mem.train.paths().map(|p| p.to_path_buf()).collect();
    let make = move |i: u64| -> melvae::train::Result<Tensor> {
        let mut data = Vec::with_capacity(batch * 24000);
        for k in 0..batch {
            let a = melvae::dsp::load_audio(&files[(i as usize * batch + k) % files.len()])?;
            data.extend_from_slice(&a.channels[0][..24000]);
        }
        Ok(Tensor::from_vec(data, (batch, 24000), &Device::Cpu)?)
    };
    let n = 40u64;
    let t = Instant::now();
    for i in 0..n {
        step(&make(i)?)?;
    }
    let serial = t.elapsed().as_secs_f64() / n as f64;
    let mut pf = Prefetcher::new(0, 4, make.clone());
    let t = Instant::now();
    for _ in 0..n {
        step(&pf.next_batch()?)?;
    }
    let prefetched = t.elapsed().as_secs_f64() / n as f64;
    let t = Instant::now();
    let x = make(0)?;
    let decode_only = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..n {
        step(&x)?;
    }
    let step_only = t.elapsed().as_secs_f64() / n as f64;

    println!("| measurement (48 files x 3 s, 24 kHz mono; batch {batch} x 1 s) | time |");
    println!("|---|---:|");
    println!("| decode folder into memory | {:.1} ms |", load_s * 1e3);
    println!(
        "| prepare memory-mapped cache (first run) | {:.1} ms |",
        prepare_s * 1e3
    );
    println!("| crop batch from memory | {:.3} ms |", mem_b * 1e3);
    println!("| crop batch from mmap cache | {:.3} ms |", map_b * 1e3);
    println!(
        "| decode-from-disk batch alone | {:.1} ms |",
        decode_only * 1e3
    );
    println!("| simulated model step alone | {:.1} ms |", step_only * 1e3);
    println!("| step + decode, serial | {:.1} ms/step |", serial * 1e3);
    println!(
        "| step + decode, prefetched (depth 4) | {:.1} ms/step |",
        prefetched * 1e3
    );
    Ok(())
}
