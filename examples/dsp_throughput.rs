//! Prints a table of melvae-dsp throughputs, in multiples of real time.
//!
//! ```text
//! cargo run --release --example dsp_throughput [-- --seconds 10 --reps 50]
//! ```
//!
//! Single-threaded rows run on the calling thread; the batch row uses rayon's
//! pool (all cores; set RAYON_NUM_THREADS to change it). Compare with
//! `tools/bench_librosa.py`.

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

use common::noise;

use clap::Parser;
use melvae::dsp::{resample, MelConfig, MelExtractor, ResampleQuality, Stft, StftConfig};

#[derive(Parser)]
struct Args {
    /// Seconds of audio per item.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Repetitions per row (the median is reported).
    #[arg(long, default_value_t = 30)]
    reps: usize,
    /// Items in the batch row.
    #[arg(long, default_value_t = 16)]
    batch: usize,
}

/// Median seconds of `reps` runs of `f`, after one warm-up run.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() -> melvae::dsp::Result<()> {
    let args = Args::parse();
    let secs = args.seconds;
    let n24 = (24000.0 * secs) as usize;
    let x24 = noise(n24, 1);
    let x44 = noise((44100.0 * secs) as usize, 2);
    let batch: Vec<Vec<f32>> = (0..args.batch).map(|i| noise(n24, 10 + i as u64)).collect();
    let mel = MelExtractor::new(MelConfig::vocos_24k())?;
    let stft = Stft::new(StftConfig {
        hop_length: 256,
        ..StftConfig::new(1024)
    })?;
    let threads = rayon::current_num_threads();

    let mut rows: Vec<(String, f64, f64)> = Vec::new();
    let t = time(args.reps, || drop(mel.extract(&x24).unwrap()));
    rows.push(("vocos-24k log-mel, 1 thread".into(), t, secs / t));
    let t = time(args.reps.div_ceil(4), || {
        drop(mel.extract_batch(&batch).unwrap())
    });
    rows.push((
        format!(
            "vocos-24k log-mel, batch {} on {threads} threads",
            args.batch
        ),
        t,
        secs * args.batch as f64 / t,
    ));
    let t = time(args.reps, || {
        let s = stft.stft(&x24).unwrap();
        drop(stft.istft(&s, Some(n24)).unwrap());
    });
    rows.push(("STFT+ISTFT 1024/256, 1 thread".into(), t, secs / t));
    for (name, q) in [
        ("sinc", ResampleQuality::Sinc),
        ("fft", ResampleQuality::Fft),
    ] {
        let t = time(args.reps.div_ceil(4), || {
            drop(resample(std::slice::from_ref(&x44), 44100, 24000, q).unwrap())
        });
        rows.push((
            format!("resample 44.1k->24k ({name}), 1 thread"),
            t,
            secs / t,
        ));
    }
    println!("| operation ({secs} s of audio) | median time | x real time |");
    println!("|---|---:|---:|");
    for (name, t, rt) in rows {
        println!("| {name} | {:.3} ms | {:.0}x |", t * 1e3, rt);
    }
    Ok(())
}
