//! Encodes and decodes an audio file with a trained model, and explores its
//! latent space; the family (mel VAE or waveform VAE) comes from the model
//! file or the run.
//!
//! ```text
//! cargo run --release --example reconstruct -- --model MODEL.safetensors IN_AUDIO -o OUT.wav [--latents OUT.npy] [--png OUT.png]
//! cargo run --release --example reconstruct -- --model runs/tiny IN_AUDIO -o OUT.wav
//! cargo run --release --example reconstruct -- --model M IN -o OUT.wav --scale 1.5 --dim 3 --dim 7 --png cmp.png
//! cargo run --release --example reconstruct -- --model M IN -o OUT.wav --interpolate OTHER --alpha 0.25,0.5,0.75 --png cmp.png
//! ```
//!
//! The waveform VAE decodes audio directly at its own rate and channel
//! count (mono or stereo) from the posterior mean; a vocoder (Vocos) turns
//! the file's mel back into audio; the mel VAE samples its
//! latents back to a log-mel (`--steps`, `--guidance`, `--temperature`) and
//! is vocoded with the Vocos model file given by `--vocoder` (from
//! `convert`), or with Griffin-Lim. `-o` gets the plain reconstruction.
//!
//! Latent exploration (the posterior means are edited before decoding):
//! `--scale S` and `--shift V` compute `z * S + V` on the latent channels
//! given by `--dim` (all without it) and write `OUT_edit.wav`;
//! `--interpolate OTHER` encodes a second file and writes, for each
//! `--alpha` a, `OUT_mix<a>.wav` decoded from `(1 - a) z_in + a z_other`
//! (both cut to the shorter clip). The PNG stacks the log-mels (first
//! channel) of the input, the reconstruction and each edit, top to bottom;
//! `--latents` writes the input's latents (`[latent_dim, frames]` for the
//! waveform VAE, `[frames / C, latent_dim]` for the mel VAE).

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::{Device, Tensor};
use clap::Parser;
use melvae::dsp::{
    load_audio_with, save_wav, write_npy, Audio, ChannelMode, LoadOptions, MelConfig, MelExtractor,
    SpectrogramImage, WavFormat,
};
use melvae::models::eval::{Codec, MelCodec, MelVaeCodec};
use melvae::models::latent::{interpolate, LatentEdit};

#[derive(Parser)]
#[command(about = "Reconstruct audio through a trained model and explore its latents")]
struct Args {
    /// A model file (from `export`, or `export.safetensors` in a best
    /// checkpoint), or a run directory (its latest checkpoint, EMA weights
    /// if kept) or checkpoint directory.
    #[arg(long, alias = "run")]
    model: PathBuf,
    /// Input audio.
    input: PathBuf,
    /// Output WAV (the plain reconstruction).
    #[arg(short, long)]
    output: PathBuf,
    /// Mel VAE: a Vocos model file (from `convert` or training) to turn
    /// its mels into audio instead of Griffin-Lim.
    #[arg(long)]
    vocoder: Option<PathBuf>,
    /// Mel VAE: sampling steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Mel VAE: classifier-free guidance scale.
    #[arg(long, default_value_t = 1.0)]
    guidance: f64,
    /// Mel VAE: scale of the initial noise (1 samples freely; lower stays
    /// closer to the input) [default: the model's
    /// `cfm.reconstruction_temperature`].
    #[arg(long, value_parser = common::parse_temperature)]
    temperature: Option<f64>,
    /// Write the input's latents here (.npy).
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Write a PNG of the input's and the outputs' log-mels here.
    #[arg(long)]
    png: Option<PathBuf>,
    /// Latent edit: multiply the latents by this.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Latent edit: add this to the latents (after scaling).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    shift: f64,
    /// Latent edit: only these latent channels (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    dim: Vec<usize>,
    /// Interpolate the latents towards this file's.
    #[arg(long)]
    interpolate: Option<PathBuf>,
    /// Interpolation weights of the other file (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,0.75")]
    alpha: Vec<f64>,
}

/// `path` at the codec's rate and channel count.
fn load(codec: &dyn Codec, path: &Path) -> anyhow::Result<Audio> {
    Ok(load_audio_with(
        path,
        &LoadOptions {
            channels: if codec.audio_channels() == 1 {
                ChannelMode::Mono
            } else {
                ChannelMode::Stereo
            },
            sample_rate: Some(codec.sample_rate()),
            ..Default::default()
        },
    )?)
}

/// Audio as the codec's input `[1, channels, samples]`.
fn tensor(codec: &dyn Codec, a: &Audio) -> anyhow::Result<Tensor> {
    Ok(Tensor::from_vec(
        a.channels.concat(),
        (1, a.n_channels(), a.n_samples()),
        &codec.device(),
    )?)
}

/// Decodes `latents` to `samples` samples and writes them to `path`.
fn decode_to(
    codec: &dyn Codec,
    latents: &Tensor,
    samples: usize,
    path: &Path,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let y = codec
        .decode(latents, samples)?
        .squeeze(0)?
        .to_device(&Device::Cpu)?
        .to_vec2::<f32>()?;
    save_wav(
        path,
        &Audio::new(codec.sample_rate(), y.clone())?,
        WavFormat::Pcm16,
    )?;
    Ok(y)
}

/// `OUT.wav` -> `OUT_<suffix>.wav`.
fn sibling(output: &Path, suffix: &str) -> PathBuf {
    let stem = output
        .file_stem()
        .map_or_else(|| "out".to_string(), |s| s.to_string_lossy().into_owned());
    output.with_file_name(format!("{stem}_{suffix}.wav"))
}

fn run(args: &Args) -> anyhow::Result<()> {
    let family = melvae::train::tasks::family_at(&args.model)?;
    anyhow::ensure!(
        family == "mel_vae" || args.vocoder.is_none(),
        "--vocoder is for mel models; {} is a {family} model",
        args.model.display()
    );
    anyhow::ensure!(
        family != "vqvae"
            || (args.interpolate.is_none() && args.scale == 1.0 && args.shift == 0.0),
        "{}: a waveform VQ-VAE has discrete codes; latent edits and interpolation need a continuous latent",
        args.model.display()
    );
    let codec: Box<dyn Codec> = if family == "vocos" {
        Box::new(MelCodec::vocos(common::load_vocos(&args.model)?)?)
    } else if family == "vqvae" {
        Box::new(common::load_vqvae(&args.model)?)
    } else if family == "wave_vae" {
        Box::new(common::load_wave_vae(&args.model)?)
    } else {
        let vocoder = common::mel_vocoder(args.vocoder.as_deref())?;
        let model = common::load_mel_vae(&args.model)?;
        let sampling = common::mel_sampling(
            &model.config().cfm,
            args.steps,
            args.guidance,
            args.temperature,
        );
        Box::new(MelVaeCodec {
            model,
            sampling,
            vocoder,
            device: Device::Cpu,
        })
    };
    let codec = codec.as_ref();
    let (channel_axis, time_axis) = codec.latent_axes();
    let audio = load(codec, &args.input)?;
    let n = audio.n_samples();
    let z = codec.encode(&tensor(codec, &audio)?)?;
    let y = decode_to(codec, &z, n, &args.output)?;
    // (label, first channel) of every picture row.
    let mut rows: Vec<(String, Vec<f32>)> = vec![
        ("input".into(), audio.channels[0].clone()),
        ("reconstruction".into(), y[0].clone()),
    ];
    let mut written = vec![args.output.clone()];

    let edit = LatentEdit {
        scale: args.scale,
        shift: args.shift,
        dims: args.dim.clone(),
    };
    anyhow::ensure!(
        args.dim.is_empty() || !edit.is_identity(),
        "--dim selects latent channels to edit: give --scale or --shift too"
    );
    if !edit.is_identity() {
        let path = sibling(&args.output, "edit");
        let y = decode_to(codec, &edit.apply(&z, channel_axis)?, n, &path)?;
        rows.push(("edit".into(), y[0].clone()));
        written.push(path);
    }
    if let Some(other) = &args.interpolate {
        let b = load(codec, other)?;
        let zb = codec.encode(&tensor(codec, &b)?)?;
        // The mix is as long as the shorter clip.
        let m = n.min(b.n_samples());
        for &alpha in &args.alpha {
            let path = sibling(&args.output, &format!("mix{alpha}"));
            let mixed = interpolate(&z, &zb, alpha, time_axis)?;
            let y = decode_to(codec, &mixed, m, &path)?;
            rows.push((format!("mix {alpha}"), y[0].clone()));
            written.push(path);
        }
        rows.push(("other".into(), b.channels[0][..m].to_vec()));
    }

    let ex = MelExtractor::new(MelConfig {
        sample_rate: codec.sample_rate(),
        ..MelConfig::vocos_24k()
    })?;
    let (mi, mr) = (ex.extract(&rows[0].1)?, ex.extract(&rows[1].1)?);
    if let Some(p) = &args.png {
        // Shorter rows (mixes with a shorter clip) end in silence.
        let mels = rows
            .iter()
            .map(|(_, x)| {
                let mut x = x.clone();
                x.resize(n, 0.0);
                ex.extract(&x)
            })
            .collect::<melvae::dsp::Result<Vec<_>>>()?;
        let refs: Vec<_> = mels.iter().collect();
        SpectrogramImage::for_mel(ex.config()).save_png_stack(p, &refs)?;
        let labels: Vec<&str> = rows.iter().map(|(l, _)| l.as_str()).collect();
        println!("{}: rows top to bottom: {}", p.display(), labels.join(", "));
    }
    if let Some(p) = &args.latents {
        let z2 = z.squeeze(0)?.to_device(&Device::Cpu)?;
        let (a, b) = z2.dims2()?;
        write_npy(
            p,
            &ndarray::Array2::from_shape_vec((a, b), z2.flatten_all()?.to_vec1::<f32>()?)?,
        )?;
    }
    let l1 = (&mi - &mr).mapv(f32::abs).mean().unwrap_or(f32::NAN);
    println!(
        "{}: {} latent frames x {} channels, log-mel L1 {l1:.3} -> {}",
        args.input.display(),
        z.dim(time_axis)?,
        z.dim(channel_axis)?,
        written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    common::exit_with(run(&Args::parse()))
}
