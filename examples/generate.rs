//! Generates sounds of a class with a class GPT and the mel VQ-VAE whose
//! tokens it learned: tokens (KV-cached sampling) -> mel (the VQ-VAE's
//! decoder) -> audio (a vocoder with the same features, else Griffin-Lim).
//! Writes `OUT/<class>_<i>.wav` and `OUT/<class>_<i>.png` (the mel).
//!
//! ```text
//! cargo run --release --example generate -- --model runs/gpt_tiny --vqvae runs/mel_vqvae_tiny \
//!     --class tone --n 4 -o gen/ [--temperature 1.0] [--top-k 50] [--top-p 0.95] [--seed 0] \
//!     [--rows 21] [--vocoder vocos-22k.safetensors] [--check assets/classes]
//! ```
//!
//! `--class` takes a class name (from the GPT model file's `class_names`)
//! or an index, or `all` for `--n` of every class. `--check DIR` (one
//! sub-folder of audio per class, named as the classes) scores the
//! generated mels with the nearest-class-centroid check
//! (`melvae_models::eval::ClassCentroids`) and prints its accuracy beside
//! the check's accuracy on DIR's own clips and chance.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use melvae::dsp::{save_wav, Audio, SpectrogramImage, WavFormat};
use melvae::models::eval::ClassCentroids;
use melvae::models::mel_vae::mel_to_array;
use melvae::models::Gpt;

#[derive(Parser)]
#[command(about = "Generate sounds of a class with a class GPT and its mel VQ-VAE")]
struct Args {
    /// A `gpt` model file, or a run directory (its best checkpoint).
    #[arg(long)]
    model: PathBuf,
    /// The `mel_vqvae` model file (or run directory) whose tokens the GPT learned.
    #[arg(long)]
    vqvae: PathBuf,
    /// A class name or index, or `all`.
    #[arg(long)]
    class: String,
    /// Samples per class.
    #[arg(long, default_value_t = 4)]
    n: usize,
    /// Token rows per sample (default: as many as the GPT's max_len holds).
    #[arg(long)]
    rows: Option<usize>,
    #[command(flatten)]
    sampling: common::TokenSampling,
    /// A folder of class sub-folders to check the samples against.
    #[arg(long)]
    check: Option<PathBuf>,
    /// Output folder.
    #[arg(short, long)]
    out: PathBuf,
}

fn run() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(a.n > 0, "--n must be > 0");
    let dev = Device::Cpu;
    let model = common::best_model_file(&a.model)?;
    let mut gpt = Gpt::load(&model, &dev, DType::F32)?;
    let info = melvae::models::model_file::read_info(&model)?;
    let names: Vec<String> = match info.metadata.get("class_names") {
        Some(j) => serde_json::from_str(j).with_context(|| {
            format!(
                "{}: class_names metadata is not a JSON list",
                model.display()
            )
        })?,
        None => (0..gpt.config().num_classes)
            .map(|i| i.to_string())
            .collect(),
    };
    anyhow::ensure!(
        names.len() == gpt.config().num_classes && !names.is_empty(),
        "{}: {} class names for gpt.num_classes {}",
        model.display(),
        names.len(),
        gpt.config().num_classes
    );
    let vq = common::load_mel_vqvae(&a.vqvae)?;
    anyhow::ensure!(
        vq.config().codebook_size == gpt.config().vocab_size,
        "{}: the GPT's vocab_size {} is not the VQ-VAE's codebook_size {} ({})",
        model.display(),
        gpt.config().vocab_size,
        vq.config().codebook_size,
        a.vqvae.display()
    );
    let cols = vq.cols();
    let rows = a.rows.unwrap_or(gpt.config().max_len / cols);
    anyhow::ensure!(
        rows > 0 && rows * cols <= gpt.config().max_len,
        "--rows {rows}: {} tokens a row, the GPT holds at most {} tokens",
        cols,
        gpt.config().max_len
    );
    let classes: Vec<usize> = if a.class == "all" {
        (0..names.len()).collect()
    } else if let Some(i) = names.iter().position(|n| *n == a.class) {
        vec![i]
    } else {
        match a.class.parse::<usize>() {
            Ok(i) if i < gpt.config().num_classes => vec![i],
            _ => anyhow::bail!("--class {}: not one of {names:?} (or an index)", a.class),
        }
    };
    let mel_cfg = *vq.mel_config();
    let to_audio = a.sampling.mel_to_audio(&mel_cfg)?;
    let opts = a.sampling.options();
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let img = SpectrogramImage::for_mel(&mel_cfg);
    let mut generated = Vec::new();
    for &c in &classes {
        let ids = Tensor::new(vec![c as u32; a.n].as_slice(), &dev)?;
        let tokens = gpt.sample(&ids, rows * cols, &opts)?;
        let mels = vq.decode(&tokens)?;
        for i in 0..a.n {
            let mel = mels.narrow(0, i, 1)?;
            let name = format!("{}_{i}", names.get(c).map_or("class", String::as_str));
            let samples = mel_cfg.stft.n_samples(mel.dim(2)?);
            let wav = to_audio.audio(&mel, &mel_cfg, samples)?;
            save_wav(
                a.out.join(format!("{name}.wav")),
                &Audio::new(mel_cfg.sample_rate, vec![wav])?,
                WavFormat::Pcm16,
            )?;
            let array = mel_to_array(&mel)?;
            img.save_png(a.out.join(format!("{name}.png")), &array)?;
            generated.push((c, array));
        }
    }
    println!(
        "wrote {} samples of {} rows x {cols} tokens ({:.2} s each) to {}",
        generated.len(),
        rows,
        mel_cfg.stft.n_samples(rows * vq.time_factor()) as f64 / mel_cfg.sample_rate as f64,
        a.out.display()
    );
    if let Some(dir) = &a.check {
        let real = melvae::train::tokens::class_mels(dir, &names, &mel_cfg)?;
        let check = ClassCentroids::fit(names.clone(), &real)?;
        let acc = |set: &[(usize, ndarray::Array2<f32>)]| {
            set.iter().filter(|(c, m)| check.classify(m) == *c).count() as f64 / set.len() as f64
        };
        println!(
            "nearest-class-centroid check: generated {:.0}% of {}, real clips of {} {:.0}% of {}, chance {:.0}%",
            100.0 * acc(&generated),
            generated.len(),
            dir.display(),
            100.0 * acc(&real),
            real.len(),
            100.0 / names.len() as f64
        );
        for &c in &classes {
            let of: Vec<_> = generated.iter().filter(|(g, _)| *g == c).cloned().collect();
            println!("  {}: {:.0}% of {}", names[c], 100.0 * acc(&of), of.len());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    common::exit_with(run())
}
