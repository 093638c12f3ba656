//! Streams audio through a trained model's causal encoder (the family comes
//! from the model file or run) and writes the latents (posterior means: mel
//! VAE `[frames / C, latent_dim]`, waveform VAE `[latent_dim, frames]`) as
//! `.npy`, printing the real-time factor and the latency.
//!
//! ```text
//! cargo run --release --example encode -- --model MODEL.safetensors IN_AUDIO -o latents.npy [--chunk-ms 500]
//! sox in.wav -t raw -r 24000 -c 1 -e float -b 32 - | cargo run --release --example encode -- --model MODEL.safetensors - -o latents.npy
//! ```
//!
//! A file (any format melvae reads; resampled to the model's rate and
//! channel count: 24 kHz mono for the mel VAE) is fed in chunks of
//! `--chunk-ms` as if it arrived live; `-` reads raw PCM at the model's rate
//! from stdin (interleaved for stereo; `--format f32le` or `s16le`) as it
//! arrives. The latents equal the offline encoding of the whole signal (the
//! waveform VAE's zero-padded to its hop).

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use clap::{Parser, ValueEnum};
use melvae::dsp::{load_audio_with, write_npy, ChannelMode, LoadOptions, MelConfig};
use melvae::models::{EncoderStream, WaveEncoderStream};

#[derive(Clone, Copy, ValueEnum)]
enum RawFormat {
    F32le,
    S16le,
}

#[derive(Parser)]
#[command(about = "Stream audio through a trained encoder into latents (.npy)")]
struct Args {
    /// A model file, or a run / checkpoint directory.
    #[arg(long)]
    model: PathBuf,
    /// Input audio file, or `-` for raw mono PCM at 24 kHz on stdin.
    input: PathBuf,
    /// Output `.npy` of the latent means `[frames, latent_dim]`.
    #[arg(short, long)]
    output: PathBuf,
    /// Chunk size fed to the stream, in milliseconds.
    #[arg(long, default_value_t = 500.0)]
    chunk_ms: f64,
    /// Sample format of stdin input.
    #[arg(long, value_enum, default_value = "f32le")]
    format: RawFormat,
}

/// The next chunk of up to `n` samples from stdin; `None` at the end.
fn read_raw(r: &mut impl Read, n: usize, format: RawFormat) -> anyhow::Result<Option<Vec<f32>>> {
    let width = match format {
        RawFormat::F32le => 4,
        RawFormat::S16le => 2,
    };
    let mut bytes = vec![0u8; n * width];
    let mut got = 0;
    while got < bytes.len() {
        match r.read(&mut bytes[got..]).context("reading stdin")? {
            0 => break,
            k => got += k,
        }
    }
    if got % width != 0 {
        bail!("stdin: {got} bytes is not a whole number of {width}-byte samples (--format?)");
    }
    if got == 0 {
        return Ok(None);
    }
    let samples = bytes[..got]
        .chunks_exact(width)
        .map(|b| match format {
            RawFormat::F32le => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            RawFormat::S16le => i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0,
        })
        .collect::<Vec<f32>>();
    if let Some(i) = samples.iter().position(|v| !v.is_finite()) {
        bail!("stdin: sample {i} of a chunk is not finite (--format?)");
    }
    Ok(Some(samples))
}

/// The streaming encoder of either family, fed planar chunks
/// `[channels][t]`; latents come out in the family's layout (mel VAE
/// `[1, n, latent]`, waveform VAE `[1, latent, n]`).
enum Stream {
    Mel(Box<EncoderStream>),
    Wave(Box<WaveEncoderStream>),
}

impl Stream {
    fn push(&mut self, chunk: &[Vec<f32>], dev: &Device) -> anyhow::Result<Option<Tensor>> {
        Ok(match self {
            Stream::Mel(s) => s.push(&chunk[0], dev)?.map(|l| l.mean),
            Stream::Wave(s) => {
                let flat: Vec<f32> = chunk.iter().flatten().copied().collect();
                let x = Tensor::from_vec(flat, (chunk.len(), chunk[0].len()), dev)?;
                s.push(&x)?.map(|(mean, _)| mean)
            }
        })
    }

    fn finish(&mut self, dev: &Device) -> anyhow::Result<Option<Tensor>> {
        Ok(match self {
            Stream::Mel(s) => s.finish(dev)?.map(|l| l.mean),
            Stream::Wave(s) => s.finish()?.map(|(mean, _)| mean),
        })
    }

    fn latency_samples(&self) -> usize {
        match self {
            Stream::Mel(s) => s.latency_samples(),
            Stream::Wave(s) => s.latency_samples(),
        }
    }

    /// The time axis of the latents.
    fn time_axis(&self) -> usize {
        match self {
            Stream::Mel(_) => 1,
            Stream::Wave(_) => 2,
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    if !(args.chunk_ms > 0.0 && args.chunk_ms.is_finite()) {
        bail!("--chunk-ms must be > 0, got {}", args.chunk_ms);
    }
    let dev = Device::Cpu;
    // The family, rate and channel count come from the model.
    let (mut stream, rate, channels) =
        if melvae::train::tasks::family_at(&args.model)? == "wave_vae" {
            let m = common::load_wave_vae(&args.model)?;
            let c = m.config();
            let (rate, ch) = (c.sample_rate, c.audio_channels);
            (Stream::Wave(Box::new(m.encoder_stream()?)), rate, ch)
        } else {
            let m = common::load_mel_vae(&args.model)?;
            (
                Stream::Mel(Box::new(m.encoder_stream()?)),
                MelConfig::vocos_24k().sample_rate,
                1,
            )
        };
    let chunk = ((args.chunk_ms / 1000.0 * rate as f64).round() as usize).max(1);
    let stdin = args.input.as_os_str() == "-";
    let file_audio = if stdin {
        None
    } else {
        let opts = LoadOptions {
            channels: if channels == 1 {
                ChannelMode::Mono
            } else {
                ChannelMode::Stereo
            },
            sample_rate: Some(rate),
            ..Default::default()
        };
        Some(load_audio_with(&args.input, &opts)?.channels)
    };
    let mut input = std::io::stdin().lock();
    let (mut latents, mut chunk_times) = (Vec::new(), Vec::new());
    let (mut samples, mut busy) = (0usize, 0f64);
    loop {
        let next: Option<Vec<Vec<f32>>> = match &file_audio {
            Some(a) if samples < a[0].len() => {
                let end = (samples + chunk).min(a[0].len());
                Some(a.iter().map(|c| c[samples..end].to_vec()).collect())
            }
            Some(_) => None,
            // Raw stdin: interleaved frames of `channels` samples.
            None => match read_raw(&mut input, chunk * channels, args.format)? {
                Some(x) if x.len() % channels != 0 => bail!(
                    "stdin: {} samples is not a whole number of {channels}-channel frames \
                     (the model is stereo: interleave left and right)",
                    x.len()
                ),
                Some(x) => Some(
                    (0..channels)
                        .map(|c| x.iter().skip(c).step_by(channels).copied().collect())
                        .collect(),
                ),
                None => None,
            },
        };
        let Some(x) = next else { break };
        if x[0].is_empty() {
            break;
        }
        let t = Instant::now();
        if let Some(l) = stream.push(&x, &dev)? {
            latents.push(l);
        }
        let dt = t.elapsed().as_secs_f64();
        busy += dt;
        chunk_times.push(dt);
        samples += x[0].len();
    }
    if samples == 0 {
        bail!("{}: no audio", args.input.display());
    }
    let t = Instant::now();
    latents.extend(stream.finish(&dev)?);
    busy += t.elapsed().as_secs_f64();
    let latents = Tensor::cat(&latents, stream.time_axis())?.squeeze(0)?;
    let (a, b) = latents.dims2()?;
    let array = ndarray::Array2::from_shape_vec((a, b), latents.flatten_all()?.to_vec1::<f32>()?)?;
    write_npy(&args.output, &array)?;
    let secs = samples as f64 / rate as f64;
    let mean_ms = 1000.0 * chunk_times.iter().sum::<f64>() / chunk_times.len().max(1) as f64;
    let max_ms = 1000.0 * chunk_times.iter().copied().fold(0.0, f64::max);
    println!(
        "{}: {secs:.2} s of audio -> latents [{a}, {b}] in {} ({busy:.3} s busy, real-time factor {:.4}, {:.0}x real time)",
        args.input.display(),
        args.output.display(),
        busy / secs,
        secs / busy.max(1e-9)
    );
    println!(
        "latency: algorithmic {:.1} ms (a latent is final {} samples after the first it covers), \
         plus the chunk ({:.0} ms) and its compute: mean {mean_ms:.2} ms, max {max_ms:.2} ms per chunk",
        1000.0 * stream.latency_samples() as f64 / rate as f64,
        stream.latency_samples(),
        args.chunk_ms
    );
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    common::exit_with(run(&Args::parse()))
}
