//! Measures the waveform codecs, the waveform VAE and a level of the
//! hierarchical waveform VQ-VAE: training steps per second (the family's
//! loss on a batch of crops, backward and an AdamW update, as `train` runs
//! it without an adversarial phase), offline encoding and decoding speed in
//! multiples of real time (and codes per second for a VQ-VAE), and the
//! process's peak resident memory.
//!
//! ```text
//! cargo run --release --example wave_vae_throughput -- [--setting wave_vae_tiny|vqvae_8_tiny] [--steps 5] [--dump DIR]
//! ```
//!
//! `--setting` names a file in configs/settings/; its family (`wave_vae` or
//! `vqvae`) picks the model, its model, loss and `data` sections give the
//! batch (`data.batch_size` crops of `data.crop_seconds`, cut to the hop).
//! `--dump DIR` also writes what `tools/bench/wave_vae_twin.py` needs to
//! rebuild the same model in PyTorch, check that it computes the same loss
//! and time the same step: `weights.safetensors` (every tensor by name),
//! `batch.npy` (`[batch, channels, samples]`) and `meta.json` (the family,
//! the configs, the evaluation-mode loss terms of the batch, the measured
//! step time). Runs on the CPU, or on the first CUDA device when built with
//! `--features cuda` and `--cuda` is given.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::{DType, Tensor};
use clap::Parser;
use melvae::dsp::SplitMix64;
use melvae::losses::{MultiResolutionStftLoss, WaveformLoss};
use melvae::models::{VqVae, WaveVae, WaveVaeConfig, WaveVaeObjective};
use melvae::train::optim::{collect_grads, AdamW, AdamWConfig};

#[derive(Parser)]
struct Args {
    /// Settings file under configs/settings/ (without .yaml).
    #[arg(long, default_value = "wave_vae_tiny")]
    setting: String,
    #[command(flatten)]
    bench: common::BenchArgs,
    /// Write the weights, the batch and the loss for the PyTorch twin here.
    #[arg(long)]
    dump: Option<PathBuf>,
}

/// The loss step the KL weight is taken at: past any warm-up.
const STEP: u64 = 1_000_000;
/// The learning rate of the timed updates.
const LR: f64 = 1e-4;

fn scalar(t: &Tensor) -> anyhow::Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// What a waveform codec family plugs into this benchmark (not
/// `eval::Codec`, which scores reconstructions).
trait CodecBench {
    /// The network (rate, channels).
    fn net(&self) -> &WaveVaeConfig;
    /// Samples per frame.
    fn hop(&self) -> usize;
    /// Evaluation-mode loss terms of the batch and their total.
    fn eval_terms(&mut self, batch: &Tensor) -> anyhow::Result<(BTreeMap<String, f64>, f64)>;
    /// The training-mode loss `train` would step on.
    fn train_loss(&mut self, batch: &Tensor) -> anyhow::Result<Tensor>;
    /// Audio to the bottleneck (latent means or codes).
    fn encode(&self, audio: &Tensor) -> anyhow::Result<Tensor>;
    /// The bottleneck back to audio.
    fn decode(&self, z: &Tensor) -> anyhow::Result<Tensor>;
    /// What the twin needs beyond the common fields.
    fn meta(&self) -> serde_json::Value;
}

struct WaveVaeBench {
    model: WaveVae,
    objective: WaveVaeObjective,
    rng: SplitMix64,
}

impl CodecBench for WaveVaeBench {
    fn net(&self) -> &WaveVaeConfig {
        self.model.config()
    }
    fn hop(&self) -> usize {
        self.model.hop()
    }
    fn eval_terms(&mut self, batch: &Tensor) -> anyhow::Result<(BTreeMap<String, f64>, f64)> {
        let l = self
            .model
            .loss(batch, STEP, &self.objective, &mut self.rng, false)?;
        let terms = l
            .terms
            .iter()
            .map(|(k, v)| Ok((k.clone(), scalar(v)?)))
            .collect::<anyhow::Result<_>>()?;
        Ok((terms, scalar(&l.total)?))
    }
    fn train_loss(&mut self, batch: &Tensor) -> anyhow::Result<Tensor> {
        let l = self
            .model
            .loss(batch, STEP, &self.objective, &mut self.rng, true)?;
        Ok(l.total)
    }
    fn encode(&self, audio: &Tensor) -> anyhow::Result<Tensor> {
        Ok(self.model.encode(audio)?.0)
    }
    fn decode(&self, z: &Tensor) -> anyhow::Result<Tensor> {
        Ok(self.model.decode(z)?)
    }
    fn meta(&self) -> serde_json::Value {
        serde_json::json!({
            "model": self.model.config(),
            "loss": self.objective.config(),
            "step": STEP,
            "kl_weight": self.objective.config().kl_schedule().weight(STEP),
        })
    }
}

/// A level of the hierarchical waveform VQ-VAE: the multi-resolution STFT
/// loss plus the quantiser's (restarts included in training mode), as
/// `train` runs it.
struct VqVaeBench {
    model: VqVae,
    stft: MultiResolutionStftLoss,
}

impl CodecBench for VqVaeBench {
    fn net(&self) -> &WaveVaeConfig {
        &self.model.config().net
    }
    fn hop(&self) -> usize {
        self.model.hop()
    }
    fn eval_terms(&mut self, batch: &Tensor) -> anyhow::Result<(BTreeMap<String, f64>, f64)> {
        let out = self.model.forward(batch, false)?;
        let stft = scalar(&self.stft.loss(&out.recon, batch)?)?;
        let terms = BTreeMap::from([
            ("stft".to_string(), stft),
            ("codebook".to_string(), scalar(&out.vq.codebook_loss)?),
            ("commitment".to_string(), scalar(&out.vq.commitment_loss)?),
        ]);
        Ok((terms, stft + scalar(&out.vq.loss)?))
    }
    fn train_loss(&mut self, batch: &Tensor) -> anyhow::Result<Tensor> {
        let out = self.model.forward(batch, true)?;
        Ok((self.stft.loss(&out.recon, batch)? + &out.vq.loss)?)
    }
    fn encode(&self, audio: &Tensor) -> anyhow::Result<Tensor> {
        Ok(self.model.encode(audio)?)
    }
    fn decode(&self, z: &Tensor) -> anyhow::Result<Tensor> {
        Ok(self.model.decode(z)?)
    }
    fn meta(&self) -> serde_json::Value {
        serde_json::json!({"model": self.model.config()})
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let dev = args.bench.device()?;
    let setting = common::BenchSetting::load(&args.setting)?;
    let family = melvae::train::tasks::family_of(&setting.resolved)?;
    let mut codec: Box<dyn CodecBench> = match family {
        "wave_vae" => {
            let sections = melvae::train::tasks::wave_vae::wave_vae_config(&setting.resolved)?;
            let model = WaveVae::new(sections.model, setting.var_builder(&dev))?;
            let objective = WaveVaeObjective::new(sections.loss, model.config(), &dev)?;
            Box::new(WaveVaeBench {
                model,
                objective,
                rng: SplitMix64::new(0),
            })
        }
        "vqvae" => {
            let cfg = melvae::train::tasks::vqvae::vqvae_config(&setting.resolved)?;
            Box::new(VqVaeBench {
                model: VqVae::new(cfg, setting.var_builder(&dev))?,
                stft: MultiResolutionStftLoss::auraloss_default(&dev)?,
            })
        }
        other => anyhow::bail!(
            "--setting {}: family {other} is not a waveform codec (wave_vae, vqvae; \
             see the other *_throughput examples)",
            args.setting
        ),
    };
    let (vars, n_params) = setting.vars();
    let data = setting.audio_data()?;
    let net = codec.net();
    let (rate, channels, hop) = (net.sample_rate as f64, net.audio_channels, codec.hop());
    let crop = common::BenchSetting::crop(&data, rate, hop);
    let threads = candle_core::utils::get_num_threads();
    println!(
        "{} ({family}): {:.3} M parameters, hop {hop}, batch {} x {channels} x {crop} samples ({:.2} s each), {threads} threads",
        setting.path.display(),
        n_params as f64 / 1e6,
        data.batch_size,
        crop as f64 / rate
    );

    let batch = common::test_audio(data.batch_size, channels, crop, 1, &dev)?;
    let (eval_terms, eval_total) = codec.eval_terms(&batch)?;
    // The weights before any update, for the twin (it reproduces this loss).
    let weights: HashMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect::<anyhow::Result<_>>()?;
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default())?;
    let per_step = common::mean_seconds(&dev, 1, args.bench.steps, || {
        let loss = codec.train_loss(&batch)?;
        opt.step(&collect_grads(&vars, &loss.backward()?), LR)?;
        Ok(())
    })?;
    common::print_train_step(per_step, data.batch_size as f64 * crop as f64 / rate);

    let n = ((args.bench.seconds * rate) as usize).div_ceil(hop) * hop;
    let secs = n as f64 / rate;
    let long = common::test_audio(1, channels, n, 2, &dev)?;
    let z = codec.encode(&long)?;
    let enc = common::median_of_3(&dev, || {
        codec.encode(&long)?;
        Ok(())
    })?;
    let dec = common::median_of_3(&dev, || {
        codec.decode(&z)?;
        Ok(())
    })?;
    common::print_speed("encode", secs, enc);
    println!(
        "  {:.0} frames/s (latent vectors or codes)",
        (n / hop) as f64 / enc
    );
    common::print_speed("decode", secs, dec);
    let mut meta = serde_json::json!({
        "family": family,
        "setting": args.setting,
        "eval_terms": eval_terms,
        "eval_total": eval_total,
        "melvae_step_ms": per_step * 1e3,
        "threads": threads,
        "learning_rate": LR,
        "n_params": n_params,
    });
    if let (Some(m), serde_json::Value::Object(extra)) = (meta.as_object_mut(), codec.meta()) {
        m.extend(extra);
    }
    common::finish_bench(args.dump.as_deref(), &weights, &batch, meta)
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    common::exit_with(run())
}
