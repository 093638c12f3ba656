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
//! With `--vqwave DIR` it generates audio with the hierarchical waveform
//! VQ-VAE instead (docs/models/vqwave.md): DIR holds `vqvae_<hop>` and
//! `prior_<hop>` for each level (model files or run directories); the
//! coarsest prior samples, each finer one conditioned on the codes above,
//! down to `--generators` (a hop, or `all`), whose VQ-VAE decodes
//! `--length` samples into `--output FILE.wav`:
//!
//! ```text
//! cargo run --release --example generate -- --vqwave runs/vqwave_tiny --generators all --length 44100 \
//!     --temperature 1.0 [--top-k 40] [--seed 0] --output out.wav
//! ```
//!
//! `--top-k 1` or `--temperature 0` is greedy. `--stream-codes N` samples
//! the levels together and decodes every `N` finest-level codes as they
//! become final (a causal VQ-VAE), printing when the first audio was ready;
//! the WAV equals the offline one.
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
    #[arg(long, required_unless_present = "vqwave")]
    model: Option<PathBuf>,
    /// The `mel_vqvae` model file (or run directory) whose tokens the GPT learned.
    #[arg(long, required_unless_present = "vqwave")]
    vqvae: Option<PathBuf>,
    /// A class name or index, or `all`.
    #[arg(long, required_unless_present = "vqwave")]
    class: Option<String>,
    /// Hierarchical waveform generation instead: a folder holding each
    /// level's VQ-VAE and prior as `vqvae_<hop>` and `prior_<hop>` (model
    /// files `.safetensors` or run directories), e.g. `vqvae_512`,
    /// `prior_512`, ..., `vqvae_8`, `prior_8`.
    #[arg(long, conflicts_with_all = ["model", "vqvae", "class", "check"])]
    vqwave: Option<PathBuf>,
    /// With --vqwave: how far down the hierarchy to go, a hop (512, 128,
    /// 32, 8: that level and all coarser ones) or `all`.
    #[arg(long, default_value = "all")]
    generators: String,
    /// With --vqwave: samples of audio to generate (rounded up to the
    /// coarsest level's hop).
    #[arg(long, default_value_t = 22050)]
    length: usize,
    /// With --vqwave: the WAV to write.
    #[arg(long)]
    output: Option<PathBuf>,
    /// With --vqwave: stream, decoding every N codes of the finest level as
    /// they become final; prints when the first audio was ready.
    #[arg(long)]
    stream_codes: Option<usize>,
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
    #[arg(short, long, required_unless_present = "vqwave")]
    out: Option<PathBuf>,
}

/// The levels of `dir` (`vqvae_<hop>` with its `prior_<hop>`), coarsest
/// first; a VQ-VAE without its prior is an error naming it.
fn vqwave_levels(dir: &std::path::Path) -> anyhow::Result<Vec<(usize, PathBuf, PathBuf)>> {
    let mut levels = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("--vqwave {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = name.trim_end_matches(".safetensors");
        let Some(hop) = stem
            .strip_prefix("vqvae_")
            .and_then(|h| h.parse::<usize>().ok())
        else {
            continue;
        };
        let prior = ["", ".safetensors"]
            .iter()
            .map(|ext| dir.join(format!("prior_{hop}{ext}")))
            .find(|p| p.exists())
            .with_context(|| {
                format!(
                    "{}: a VQ-VAE at {hop}x but no prior_{hop} beside it",
                    dir.display()
                )
            })?;
        levels.push((hop, path, prior));
    }
    anyhow::ensure!(
        !levels.is_empty(),
        "--vqwave {}: no vqvae_<hop> levels in it",
        dir.display()
    );
    levels.sort_by_key(|l| std::cmp::Reverse(l.0));
    Ok(levels)
}

/// Hierarchical waveform generation (`--vqwave`).
fn run_vqwave(a: &Args, dir: &std::path::Path) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let found = vqwave_levels(dir)?;
    let upto = if a.generators == "all" {
        found.len()
    } else {
        let hop: usize = a
            .generators
            .trim_start_matches("generator_")
            .parse()
            .with_context(|| {
                format!(
                    "--generators {}: a hop (512, 128, ...) or all",
                    a.generators
                )
            })?;
        1 + found
            .iter()
            .position(|(h, _, _)| *h == hop)
            .with_context(|| {
                let hops: Vec<usize> = found.iter().map(|l| l.0).collect();
                format!(
                    "--generators {}: no such level in {} (levels {hops:?})",
                    a.generators,
                    dir.display()
                )
            })?
    };
    let mut levels = Vec::new();
    for (_, vq, prior) in found.iter().take(upto) {
        let p = common::best_model_file(prior)?;
        levels.push((
            common::load_vqvae(vq)?,
            melvae::models::LstmPrior::load(&p, &dev, DType::F32)?,
        ));
    }
    let hierarchy = melvae::models::Hierarchy::new(levels)?;
    let out = a
        .output
        .clone()
        .context("--vqwave needs --output FILE.wav (nothing is played)")?;
    let t = std::time::Instant::now();
    let opts = a.sampling.options();
    let mut first_audio = None;
    let sample = match a.stream_codes {
        None => hierarchy.generate(a.length, upto, &opts, &dev)?,
        Some(0) => anyhow::bail!("--stream-codes must be > 0"),
        Some(n) => hierarchy.generate_stream(a.length, upto, n, &opts, &dev, |_| {
            first_audio.get_or_insert_with(|| t.elapsed().as_secs_f64());
            Ok(())
        })?,
    };
    let took = t.elapsed().as_secs_f64();
    if let Some(f) = first_audio {
        println!(
            "streamed: the first audio was final after {:.0} ms (every {} codes of the {}x level)",
            f * 1e3,
            a.stream_codes.unwrap_or(0),
            hierarchy.hops()[upto - 1]
        );
    }
    let rate = hierarchy.sample_rate();
    let audio: Vec<f32> = sample.audio.flatten_all()?.to_vec1()?;
    let secs = audio.len() as f64 / rate as f64;
    save_wav(&out, &Audio::new(rate, vec![audio])?, WavFormat::Pcm16)?;
    let counts: Vec<String> = sample
        .codes
        .iter()
        .zip(hierarchy.hops())
        .map(|(c, h)| format!("{h}x: {}", c.dim(1).unwrap_or(0)))
        .collect();
    println!(
        "generated {secs:.2} s in {took:.2} s ({:.2}x real time; codes {}), wrote {}",
        secs / took.max(1e-9),
        counts.join(", "),
        out.display()
    );
    Ok(())
}

fn run() -> anyhow::Result<()> {
    let a = Args::parse();
    if let Some(dir) = &a.vqwave {
        return run_vqwave(&a, dir);
    }
    let (Some(model_arg), Some(vqvae_arg), Some(class), Some(out_dir)) =
        (&a.model, &a.vqvae, &a.class, &a.out)
    else {
        anyhow::bail!("give --model, --vqvae, --class and -o (or --vqwave)");
    };
    anyhow::ensure!(a.n > 0, "--n must be > 0");
    let dev = Device::Cpu;
    let model = common::best_model_file(model_arg)?;
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
    let vq = common::load_mel_vqvae(vqvae_arg)?;
    anyhow::ensure!(
        vq.config().codebook_size == gpt.config().vocab_size,
        "{}: the GPT's vocab_size {} is not the VQ-VAE's codebook_size {} ({})",
        model.display(),
        gpt.config().vocab_size,
        vq.config().codebook_size,
        vqvae_arg.display()
    );
    let cols = vq.cols();
    let rows = a.rows.unwrap_or(gpt.config().max_len / cols);
    anyhow::ensure!(
        rows > 0 && rows * cols <= gpt.config().max_len,
        "--rows {rows}: {} tokens a row, the GPT holds at most {} tokens",
        cols,
        gpt.config().max_len
    );
    let classes: Vec<usize> = if class == "all" {
        (0..names.len()).collect()
    } else if let Some(i) = names.iter().position(|n| n == class) {
        vec![i]
    } else {
        match class.parse::<usize>() {
            Ok(i) if i < gpt.config().num_classes => vec![i],
            _ => anyhow::bail!("--class {class}: not one of {names:?} (or an index)"),
        }
    };
    let mel_cfg = *vq.mel_config();
    let to_audio = a.sampling.mel_to_audio(&mel_cfg)?;
    let opts = a.sampling.options();
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
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
                out_dir.join(format!("{name}.wav")),
                &Audio::new(mel_cfg.sample_rate, vec![wav])?,
                WavFormat::Pcm16,
            )?;
            let array = mel_to_array(&mel)?;
            img.save_png(out_dir.join(format!("{name}.png")), &array)?;
            generated.push((c, array));
        }
    }
    println!(
        "wrote {} samples of {} rows x {cols} tokens ({:.2} s each) to {}",
        generated.len(),
        rows,
        mel_cfg.stft.n_samples(rows * vq.time_factor()) as f64 / mel_cfg.sample_rate as f64,
        out_dir.display()
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
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    common::exit_with(run())
}
