//! The main job: trains the tiny mel VAE on the bundled speech corpus
//! (assets/speech, synthetic speech made with espeak-ng by
//! tools/make_assets.sh), then reconstructs the held-out clips and prints
//! their log-mel L1 next to a baseline (each clip's mean mel).
//!
//! ```text
//! cargo run --release --example quickstart [-- key=value ...] [-- --vocoder VOCOS.safetensors]
//! ```
//!
//! Writes the run to runs/quickstart/ (replacing an earlier one) and the
//! reconstructions (WAV through Griffin-Lim, and PNG with the input above
//! the output) to runs/quickstart/eval/. With `--vocoder` (a Vocos model
//! file on the `vocos-24k` features, e.g. from `convert`), each clip is
//! also vocoded with it (`*_recon_vocos.wav`), and the DAC mel distance of
//! both audios to the original is printed side by side.

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device};
use melvae::dsp::{save_wav, Audio, MelConfig, MelExtractor, SpectrogramImage, WavFormat};
use melvae::models::{mel_to_array, MelVae, SampleOptions};
use melvae::train::run::{export, open_run, Start, Weights, Which};
use melvae::train::tasks::mel_vae::{mel_vae_config, MelVaeTask};
use melvae::train::{AudioDataConfig, AudioFolder, ResolvedConfig, Trainer, TrainerConfig};

fn run() -> anyhow::Result<()> {
    let mut overrides: Vec<String> = Vec::new();
    let mut vocoder_path: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--vocoder" {
            let p = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("--vocoder needs a model file"))?;
            vocoder_path = Some(PathBuf::from(p));
        } else if let Some(p) = a.strip_prefix("--vocoder=") {
            vocoder_path = Some(PathBuf::from(p));
        } else {
            overrides.push(a);
        }
    }
    // Checked before training: a vocoder of other features is named now.
    let vocoder = match &vocoder_path {
        Some(p) => Some(common::mel_vocoder(Some(p))?),
        None => None,
    };
    let root = PathBuf::from("runs/quickstart");
    if root.exists() {
        println!("replacing {}", root.display());
    }
    let resolved = ResolvedConfig::load(Path::new("configs/settings/tiny.yaml"), &overrides)?;
    let training: TrainerConfig = resolved.get("training")?;
    let data_cfg: AudioDataConfig = resolved.get("data")?;
    let model_cfg = mel_vae_config(&resolved)?;
    let data = AudioFolder::open(&data_cfg)?;
    let run = open_run(&root, &resolved, Start::Overwrite)?;
    println!(
        "training the tiny mel VAE on {} ({} clips, {} held out) for {} steps",
        data_cfg.dir.display(),
        data.train.len(),
        data.val.len(),
        training.steps
    );
    let held_out: Vec<PathBuf> = data.val.paths().map(Path::to_path_buf).collect();
    let dev = training.device()?;
    let mut task = MelVaeTask::new(
        model_cfg,
        data,
        data_cfg,
        training.seed,
        &dev,
        training.dtype()?,
    )?;
    let t = Instant::now();
    let s = Trainer::new(training, &run)?.fit(&mut task, false)?;
    println!(
        "trained {} steps in {:.0} s",
        s.steps,
        t.elapsed().as_secs_f64()
    );

    // Evaluate the model as a user would: export the run's final weights as
    // a model file and load it with melvae-models alone.
    let model_path = root.join("model.safetensors");
    export(&root, &Which::Latest, Weights::Auto, &model_path)?;
    println!("model file: {}", model_path.display());
    let model = MelVae::load(&model_path, &Device::Cpu, DType::F32)?;
    let eval = root.join("eval");
    std::fs::create_dir_all(&eval)?;
    let ex = MelExtractor::new(MelConfig::vocos_24k())?;
    let img = SpectrogramImage::for_mel(ex.config());
    // Temperature 0.5: at 1 the flow adds random detail that an L1 against the
    // original punishes (docs/models/mel_vae.md).
    let opts = SampleOptions {
        num_steps: 10,
        temperature: 0.5,
        ..Default::default()
    };
    println!("\n| held-out clip | reconstruction log-mel L1 | baseline (clip mean mel) L1 |");
    println!("|---|---:|---:|");
    let (mut sum_r, mut sum_b) = (0.0, 0.0);
    let metrics = melvae::models::eval::Metrics::new(24000, false, &Device::Cpu)?;
    let griffin_lim = melvae::models::eval::MelToAudio::new(None, ex.config())?;
    let mut vocoded: Vec<(String, f64, f64)> = Vec::new();
    for path in &held_out {
        let audio = common::load_for_mel(path, ex.config())?;
        let r = model.reconstruct(&audio.channels[0], 24000, &opts, &Device::Cpu)?;
        let baseline = r.input.mean_keepdim(2)?.broadcast_as(r.input.shape())?;
        let l1_r = MelVae::mel_l1(&r.output, &r.input)?;
        let l1_b = MelVae::mel_l1(&baseline, &r.input)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        println!("| {name} | {l1_r:.3} | {l1_b:.3} |");
        sum_r += l1_r;
        sum_b += l1_b;
        let (mi, mr) = (mel_to_array(&r.input)?, mel_to_array(&r.output)?);
        img.save_png_stack(eval.join(format!("{name}.png")), &[&mi, &mr])?;
        let gl = Audio::new(
            24000,
            vec![griffin_lim.audio(&r.output, ex.config(), audio.n_samples())?],
        )?;
        save_wav(
            eval.join(format!("{name}_recon.wav")),
            &gl,
            WavFormat::Pcm16,
        )?;
        if let Some(v) = &vocoder {
            let voc = Audio::new(
                24000,
                vec![v.audio(&r.output, ex.config(), audio.n_samples())?],
            )?;
            save_wav(
                eval.join(format!("{name}_recon_vocos.wav")),
                &voc,
                WavFormat::Pcm16,
            )?;
            let original = Audio::new(24000, vec![audio.channels[0].clone()])?;
            vocoded.push((
                name.clone(),
                metrics.score(&original, &gl)?.mel_distance,
                metrics.score(&original, &voc)?.mel_distance,
            ));
        }
    }
    let n = held_out.len().max(1) as f64;
    println!("| **mean** | **{:.3}** | **{:.3}** |", sum_r / n, sum_b / n);
    if !vocoded.is_empty() {
        println!(
            "\nthe reconstructions as audio, DAC mel distance to the original (lower is better; {}):\n",
            vocoder_path.as_deref().map_or(String::new(), |p| p.display().to_string())
        );
        println!("| held-out clip | Griffin-Lim | Vocos |");
        println!("|---|---:|---:|");
        for (name, g, v) in &vocoded {
            println!("| {name} | {g:.3} | {v:.3} |");
        }
        let k = vocoded.len() as f64;
        println!(
            "| **mean** | **{:.3}** | **{:.3}** |",
            vocoded.iter().map(|x| x.1).sum::<f64>() / k,
            vocoded.iter().map(|x| x.2).sum::<f64>() / k
        );
    }
    println!(
        "\nreconstruction {} the baseline; results in {}",
        if sum_r < sum_b {
            "beats"
        } else {
            "does NOT beat"
        },
        eval.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    common::exit_with(run())
}
