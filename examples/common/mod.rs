//! Helpers shared by the example programs and benches (not an example).
#![allow(dead_code)]

use std::path::Path;
use std::process::ExitCode;

use melvae::dsp::{load_audio_with, Audio, ChannelMode, LoadOptions, MelConfig};

/// Exit code of an example: success, or a one-line `error: ...` and exit 1.
pub fn exit_with<E: std::fmt::Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Loads `path` as mono at the sample rate of the mel preset `cfg`.
pub fn load_for_mel(path: &Path, cfg: &MelConfig) -> melvae::dsp::Result<Audio> {
    let opts = LoadOptions {
        channels: ChannelMode::Mono,
        sample_rate: Some(cfg.sample_rate),
        ..Default::default()
    };
    load_audio_with(path, &opts)
}

/// Deterministic uniform noise in [-0.5, 0.5) (xorshift64), for benchmarks.
pub fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// Keeps freed memory in the process instead of handing it back to the
/// kernel (glibc on Linux; elsewhere a no-op).
///
/// candle allocates a fresh buffer for every tensor op; with glibc's
/// defaults each buffer over 128 KiB-32 MiB is a new `mmap` that the kernel
/// must zero page by page, then `munmap` on drop. On the 2-core development
/// machine that page-fault traffic cost 40% of a mel VAE training step and
/// 55% of sampling time (docs/benchmarks.md). Raising the mmap and trim
/// thresholds to their maximum makes the heap reuse freed buffers; peak
/// memory is unchanged. Call it first thing in `main`.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called
    // before any other thread exists.
    unsafe {
        // glibc caps the mmap threshold at 32 MiB on 64-bit targets.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
