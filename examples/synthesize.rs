//! Text to speech with a trained Echolancer and the mel VQ-VAE whose
//! tokens it learned: text -> character ids (the model file's tokenizer)
//! -> spectrogram tokens (KV-cached generation until the stop gate fires
//! or `--max-len`) -> mel (the VQ-VAE's decoder) -> audio (a vocoder with
//! the same features, else Griffin-Lim).
//!
//! ```text
//! cargo run --release --example synthesize -- --model runs/echolancer_tiny --vqvae runs/mel_vqvae_tts_tiny \
//!     "the small dog runs home." -o out/ [--speaker 0|NAME] [--emotion emo.npy] \
//!     [--temperature 1.0] [--top-k 50] [--top-p 0.95] [--greedy] [--seed 0] \
//!     [--gate-threshold 0.5] [--max-len N] [--vocoder vocos-22k.safetensors]
//! ```
//!
//! Writes `OUT/tokens.npy` (the generated tokens, `[len]`, as f32),
//! `OUT/gates.npy` (the gate probability after each token), `OUT/mel.png`
//! and `OUT/audio.wav`, and prints the characters the tokenizer did not
//! know, why generation stopped and the synthesis speed. `--stream-rows R`
//! (with `--vocoder`) streams: every `R` finished token rows are decoded by
//! the VQ-VAE (causal in time: finished rows' frames never change) and
//! pushed through the vocoder's stream, and the time each block's audio
//! became final is printed; the audio equals the offline synthesis. `--model` takes an
//! `echolancer` model file or a run directory (its best checkpoint);
//! `--vqvae` a `mel_vqvae` model file or run directory (its latest
//! checkpoint, as `prepare_tts` read it).

mod common;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use melvae::dsp::{save_wav, write_npy, Audio, SpectrogramImage, WavFormat};
use melvae::models::mel_vae::mel_to_array;
use melvae::models::{Echolancer, EcholancerInputs};

#[derive(Parser)]
#[command(about = "Synthesize speech from text with Echolancer and its mel VQ-VAE")]
struct Args {
    /// An `echolancer` model file, or a run directory (its best checkpoint).
    #[arg(long)]
    model: PathBuf,
    /// The `mel_vqvae` model file (or run directory) whose tokens it learned.
    #[arg(long)]
    vqvae: PathBuf,
    /// The text.
    text: String,
    /// Speaker id or name (the model file's `speaker_names`).
    #[arg(long, default_value = "0")]
    speaker: String,
    /// An emotion vector (`.npy`, `emotion_channels` values).
    #[arg(long)]
    emotion: Option<PathBuf>,
    /// Longest token sequence (default: the model's max_len).
    #[arg(long)]
    max_len: Option<usize>,
    /// Gate probability that ends the utterance.
    #[arg(long, default_value_t = 0.5)]
    gate_threshold: f64,
    /// Always take the most likely token (top-k 1).
    #[arg(long)]
    greedy: bool,
    /// Streaming: every this many finished token rows, decode them and push
    /// their mel through the vocoder's stream (needs --vocoder); prints when
    /// each block's audio became final.
    #[arg(long, requires = "vocoder")]
    stream_rows: Option<usize>,
    #[command(flatten)]
    sampling: common::TokenSampling,
    /// Output folder.
    #[arg(short, long)]
    out: PathBuf,
}

fn run() -> anyhow::Result<()> {
    let a = Args::parse();
    let dev = Device::Cpu;
    let model_path = common::best_model_file(&a.model)?;
    let mut model = Echolancer::load(&model_path, &dev, DType::F32)?;
    let cfg = model.config().clone();
    let info = melvae::models::model_file::read_info(&model_path)?;
    let speaker_names: Vec<String> = match info.metadata.get("speaker_names") {
        Some(j) => serde_json::from_str(j).with_context(|| {
            format!(
                "{}: speaker_names metadata is not a JSON list",
                model_path.display()
            )
        })?,
        None => Vec::new(),
    };
    let speaker = match speaker_names.iter().position(|n| *n == a.speaker) {
        Some(i) => i,
        None => match a.speaker.parse::<usize>() {
            Ok(i) if i < cfg.n_speakers => i,
            _ => anyhow::bail!(
                "--speaker {}: not a speaker id below {} or one of {speaker_names:?}",
                a.speaker,
                cfg.n_speakers
            ),
        },
    };
    anyhow::ensure!(
        !cfg.symbols.is_empty(),
        "{}: the model file has no tokenizer symbols (trained on ids only)",
        model_path.display()
    );
    let tokenizer = cfg.tokenizer()?;
    let (ids, unknown) = tokenizer.encode(a.text.trim());
    anyhow::ensure!(!ids.is_empty(), "the text is empty");
    if !unknown.is_empty() {
        let list: Vec<String> = unknown.iter().map(|(c, n)| format!("{c:?} x{n}")).collect();
        println!(
            "characters the model does not know (read as unknown): {}",
            list.join(", ")
        );
    }
    let emotion = match &a.emotion {
        Some(p) => {
            let v = melvae::dsp::read_npy(p)?;
            anyhow::ensure!(
                v.len() == cfg.emotion_channels,
                "--emotion {}: {} values, the model takes {} (echolancer.emotion_channels)",
                p.display(),
                v.len(),
                cfg.emotion_channels
            );
            let v: Vec<f32> = v.iter().copied().collect();
            Some((
                Tensor::from_vec(v, (1, cfg.emotion_channels), &dev)?,
                Tensor::new(&[1u32], &dev)?,
            ))
        }
        None => None,
    };
    let vq = common::load_mel_vqvae(&a.vqvae)?;
    anyhow::ensure!(
        vq.config().codebook_size == cfg.mel_vocab_size,
        "{}: the model's mel_vocab_size {} is not the VQ-VAE's codebook_size {} ({})",
        model_path.display(),
        cfg.mel_vocab_size,
        vq.config().codebook_size,
        a.vqvae.display()
    );
    let mel_cfg = *vq.mel_config();
    let to_audio = a.sampling.mel_to_audio(&mel_cfg)?;
    let mut opts = a.sampling.options();
    if a.greedy {
        opts.top_k = Some(1);
    }
    let inputs = EcholancerInputs {
        text: Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?,
        text_mask: None,
        speakers: Tensor::new(&[speaker as u32], &dev)?,
        emotion,
    };
    let max_len = a.max_len.unwrap_or(cfg.max_len);
    let cols = vq.cols();
    let mut streamer = match (a.stream_rows, &a.sampling.vocoder) {
        (Some(0), _) => anyhow::bail!("--stream-rows must be > 0"),
        (Some(rows), Some(p)) => Some(Streamer {
            rows,
            done_rows: 0,
            stream: melvae::models::Vocos::load(p, &dev, DType::F32)?.stream(None)?,
            rate: mel_cfg.sample_rate as f64,
            audio: Vec::new(),
            log: Vec::new(),
        }),
        _ => None,
    };
    let t = Instant::now();
    let g = model.generate_with(
        &inputs,
        max_len,
        a.gate_threshold,
        &opts,
        |st| match &mut streamer {
            Some(s) => s.step(
                &vq,
                &st.generated.tokens[0],
                cols,
                st.generated.stopped[0],
                t,
            ),
            None => Ok(()),
        },
    )?;
    if let Some(s) = &mut streamer {
        // Generation ended at --max-len: the rows not yet pushed, then the
        // vocoder's tail.
        s.step(&vq, &g.tokens[0], cols, true, t)?;
        s.finish(t)?;
    }
    let took = t.elapsed().as_secs_f64();
    let tokens = g.tokens.into_iter().next().unwrap_or_default();
    let gates = g.gates.into_iter().next().unwrap_or_default();
    let rows = tokens.len() / cols;
    println!(
        "{} tokens in {:.2} s ({:.0} tokens/s), {}",
        tokens.len(),
        took,
        tokens.len() as f64 / took.max(1e-9),
        if g.stopped[0] {
            "stopped by the gate".to_string()
        } else {
            format!("reached --max-len {max_len} without the gate firing")
        }
    );
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let as_array = |v: Vec<f32>| ndarray::Array1::from_vec(v);
    write_npy(
        a.out.join("tokens.npy"),
        &as_array(tokens.iter().map(|&t| t as f32).collect()),
    )?;
    write_npy(a.out.join("gates.npy"), &as_array(gates))?;
    anyhow::ensure!(
        rows > 0,
        "generated {} tokens, less than one row of {cols}: nothing to decode (a gate that fires early; try --gate-threshold nearer 1)",
        tokens.len()
    );
    let grid = Tensor::new(&tokens[..rows * cols], &dev)?.unsqueeze(0)?;
    let mel = vq.decode(&grid)?;
    let samples = mel_cfg.stft.n_samples(mel.dim(2)?);
    let wav = match &streamer {
        Some(s) => {
            for (i, (at, secs)) in s.log.iter().enumerate() {
                println!(
                    "stream block {i}: {secs:.2} s of audio final at {:.0} ms",
                    at * 1e3
                );
            }
            let mut w = s.audio.clone();
            w.resize(samples, 0.0);
            w
        }
        None => to_audio.audio(&mel, &mel_cfg, samples)?,
    };
    save_wav(
        a.out.join("audio.wav"),
        &Audio::new(mel_cfg.sample_rate, vec![wav])?,
        WavFormat::Pcm16,
    )?;
    SpectrogramImage::for_mel(&mel_cfg).save_png(a.out.join("mel.png"), &mel_to_array(&mel)?)?;
    println!(
        "wrote {} ({rows} rows, {:.2} s of audio, speaker {speaker}, through {})",
        a.out.display(),
        samples as f64 / mel_cfg.sample_rate as f64,
        to_audio.name()
    );
    Ok(())
}

/// Streaming synthesis: token rows decoded a block at a time (the mel
/// VQ-VAE's decoder is causal in time, so the frames of finished rows do
/// not change as more rows come) and pushed through the vocoder's stream.
struct Streamer {
    rows: usize,
    done_rows: usize,
    stream: melvae::models::VocosStream,
    /// Samples per second of the audio.
    rate: f64,
    audio: Vec<f32>,
    /// When each block's audio became final (seconds from the start) and
    /// how much audio it held.
    log: Vec<(f64, f64)>,
}

impl Streamer {
    /// After a generation step: pushes the rows finished since the last
    /// block once there are `rows` of them (or all, when `last`).
    fn step(
        &mut self,
        vq: &melvae::models::MelVqVae,
        tokens: &[u32],
        cols: usize,
        last: bool,
        t0: Instant,
    ) -> melvae::models::Result<()> {
        let rows = tokens.len() / cols;
        if rows == self.done_rows || (rows < self.done_rows + self.rows && !last) {
            return Ok(());
        }
        let grid = Tensor::new(&tokens[..rows * cols], &Device::Cpu)?.unsqueeze(0)?;
        let mel = vq.decode(&grid)?;
        let f = vq.time_factor();
        let new = mel.narrow(2, self.done_rows * f, (rows - self.done_rows) * f)?;
        self.done_rows = rows;
        let out = self.stream.push(&new)?;
        self.emit(out, t0)
    }

    fn finish(&mut self, t0: Instant) -> melvae::models::Result<()> {
        let out = self.stream.finish()?;
        self.emit(out, t0)
    }

    fn emit(&mut self, out: Option<Tensor>, t0: Instant) -> melvae::models::Result<()> {
        if let Some(a) = out {
            let v: Vec<f32> = a.flatten_all()?.to_vec1()?;
            self.log
                .push((t0.elapsed().as_secs_f64(), v.len() as f64 / self.rate));
            self.audio.extend(v);
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    common::exit_with(run())
}
