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
