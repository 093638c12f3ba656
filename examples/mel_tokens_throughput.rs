//! Measures the token models (the mel VQ-VAE, the class GPT, the GPT-VAE,
//! Echolancer, and the LSTM priors of the hierarchical waveform VQ-VAE):
//! training steps per second (the family's loss on one
//! batch, backward and an AdamW update, as `train` runs it), inference
//! speed (VQ-VAE: tokenizing and decoding in multiples of real time; GPT,
//! GPT-VAE and Echolancer: KV-cached sampling in tokens per second) and the process's
//! peak resident memory.
//!
//! ```text
//! cargo run --release --example mel_tokens_throughput -- [--setting mel_vqvae_tiny|gpt_tiny|gpt_vae_tiny_stage2|echolancer_tiny|prior_8_tiny] [--steps 5] [--dump DIR] [--codes 256]
//! ```
//!
//! `--setting` names a file in configs/settings/; its family (`mel_vqvae`,
//! `gpt`, `gpt_vae`, `echolancer` or `lstm_prior`) picks the model. An
//! LSTM prior learns on `data.batch_size` x `--codes` random codes (and
//! random coarser codes as its context; the LSTM steps once per code, so
//! its cost is linear in `--codes`), and sampling draws `--codes` codes. The batch is synthetic and needs no
//! data on disk: `data.batch_size` log-mels of `data.crop_seconds` of test
//! audio (cut to the time factor) for the VQ-VAE, `data.batch_size`
//! sequences of `max_len` seeded random tokens for the priors (GPT classes
//! `i % num_classes`; Echolancer: 40 random text ids each, speakers
//! `i % n_speakers`, `vocab_size: 0` read as the bundled corpus' 33). The GPT-VAE's KL weight is its schedule's final one
//! (past the warm-up). `--dump DIR` also writes what
//! `tools/bench/mel_tokens_twin.py` needs to rebuild the same model in
//! PyTorch, check that it computes the same loss and time the same step:
//! `weights.safetensors` (every variable by name), `batch.npy` (the mels
//! `[batch, n_mels, frames]`, or the tokens `[batch, len]` as f32) and
//! `meta.json` (the family, its configs, the evaluation-mode loss terms of
//! the batch, the measured step time; Echolancer's text ids and speakers). Runs on the CPU, or on the first
//! CUDA device when built with `--features cuda` and `--cuda` is given.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use melvae::dsp::{SplitMix64, TensorMel};
use melvae::layers::{DropoutRng, Mode};
use melvae::models::{
    Echolancer, EcholancerInputs, Gpt, GptVae, LstmPrior, MelVqVae, SamplingOptions,
};
use melvae::train::optim::{collect_grads, AdamW, AdamWConfig};
use melvae::train::tasks::{echolancer, family_of, gpt, gpt_vae, lstm_prior, mel_vqvae};

#[derive(Parser)]
struct Args {
    /// Settings file under configs/settings/ (without .yaml).
    #[arg(long, default_value = "mel_vqvae_tiny")]
    setting: String,
    #[command(flatten)]
    bench: common::BenchArgs,
    /// Write the weights, the batch and the loss for the PyTorch twin here.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// LSTM priors: codes per example of the batch and of the sampling.
    #[arg(long, default_value_t = 256)]
    codes: usize,
}

/// The learning rate of the timed updates.
const LR: f64 = 1e-4;

/// What one family's measurement hands back for the report and the dump.
struct Measured {
    /// The batch the twin rebuilds.
    batch: Tensor,
    /// The weights before any update, by name (the twin starts from them).
    weights: HashMap<String, Tensor>,
    /// The evaluation-mode loss terms of the untrained model on it.
    eval_terms: BTreeMap<String, f64>,
    /// Family-specific facts for the twin (configs, classes, KL weight).
    meta: serde_json::Value,
    /// Seconds per training step.
    per_step: f64,
}

/// Copies of the variables' values, by name.
fn snapshot(vars: &[(String, candle_core::Var)]) -> anyhow::Result<HashMap<String, Tensor>> {
    vars.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect()
}

fn scalar(t: &Tensor) -> anyhow::Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// `n * len` seeded random tokens below `vocab` as `[n, len]` u32.
fn random_tokens(n: usize, len: usize, vocab: usize, dev: &Device) -> anyhow::Result<Tensor> {
    random_ids(n, len, 0, vocab as u32, dev)
}

/// `n * len` seeded random ids in `low..high` as `[n, len]` u32.
fn random_ids(n: usize, len: usize, low: u32, high: u32, dev: &Device) -> anyhow::Result<Tensor> {
    let mut rng = SplitMix64::new(7);
    let span = u64::from(high.saturating_sub(low).max(1));
    let v: Vec<u32> = (0..n * len)
        .map(|_| low + (rng.next_u64() % span) as u32)
        .collect();
    Ok(Tensor::from_vec(v, (n, len), dev)?)
}

/// Seconds per training step of a token model: `loss` in training mode
/// (fresh dropout masks each step), backward, AdamW over `vars`; printed
/// with `tokens` per batch.
fn time_token_steps(
    args: &Args,
    dev: &Device,
    vars: &[(String, candle_core::Var)],
    tokens: usize,
    what: &str,
    mut loss: impl FnMut(Mode) -> anyhow::Result<Tensor>,
) -> anyhow::Result<f64> {
    let mut opt = AdamW::new(vars.to_vec(), AdamWConfig::default())?;
    let mut step = 0u64;
    let per_step = common::mean_seconds(dev, 1, args.bench.steps, || {
        step += 1;
        let dropout = DropoutRng::new(step);
        let l = loss(Mode::Train(&dropout))?;
        opt.step(&collect_grads(vars, &l.backward()?), LR)?;
        Ok(())
    })?;
    println!(
        "train step{what}: {:.1} ms, {:.2} steps/s, {:.0} tokens/s",
        per_step * 1e3,
        1.0 / per_step,
        tokens as f64 / per_step
    );
    Ok(per_step)
}

fn time_sampling(
    what: &str,
    n: usize,
    f: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let t = Instant::now();
    f()?;
    let s = t.elapsed().as_secs_f64();
    println!(
        "sample {n} tokens ({what}): {:.1} ms, {:.0} tokens/s",
        s * 1e3,
        n as f64 / s
    );
    Ok(())
}

fn mel_vqvae_bench(
    setting: &common::BenchSetting,
    args: &Args,
    dev: &Device,
) -> anyhow::Result<Measured> {
    let cfg = mel_vqvae::mel_vqvae_config(&setting.resolved)?;
    let data = setting.audio_data()?;
    let mut model = MelVqVae::new(cfg.clone(), setting.var_builder(dev))?;
    let mel_cfg = *model.mel_config();
    let mel = TensorMel::new(mel_cfg, dev)?;
    let (rate, hop) = (mel_cfg.sample_rate as f64, mel_cfg.stft.hop_length);
    let f = model.time_factor();
    let log_mel = |audio: &Tensor| -> anyhow::Result<Tensor> {
        let m = mel.forward(audio)?;
        Ok(m.narrow(2, 0, m.dim(2)? / f * f)?.contiguous()?)
    };
    let crop = common::BenchSetting::crop(&data, rate, hop);
    let batch = log_mel(&common::test_audio(data.batch_size, 1, crop, 1, dev)?.squeeze(1)?)?;
    let frames = batch.dim(2)?;
    println!(
        "batch {} x {} mels x {frames} frames ({:.2} s each), {} tokens per clip",
        data.batch_size,
        mel_cfg.n_mels,
        frames as f64 * hop as f64 / rate,
        frames / model.time_factor() * model.cols()
    );
    let out = model.forward(&batch, false)?;
    let eval_terms = BTreeMap::from([
        ("recon".to_string(), scalar(&out.recon_loss)?),
        ("codebook".to_string(), scalar(&out.vq.codebook_loss)?),
        ("commitment".to_string(), scalar(&out.vq.commitment_loss)?),
        ("total".to_string(), scalar(&out.loss)?),
    ]);
    drop(out);
    let (vars, _) = setting.vars();
    let weights = snapshot(&vars)?;
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default())?;
    let per_step = common::mean_seconds(dev, 1, args.bench.steps, || {
        let out = model.forward(&batch, true)?;
        opt.step(&collect_grads(&vars, &out.loss.backward()?), LR)?;
        Ok(())
    })?;
    common::print_train_step(
        per_step,
        data.batch_size as f64 * frames as f64 * hop as f64 / rate,
    );

    let n = ((args.bench.seconds * rate) as usize).div_ceil(hop) * hop;
    let secs = n as f64 / rate;
    let long = log_mel(&common::test_audio(1, 1, n, 2, dev)?.squeeze(1)?)?;
    let tokens = model.encode(&long)?;
    let enc = common::median_of_3(dev, || {
        model.encode(&long)?;
        Ok(())
    })?;
    let dec = common::median_of_3(dev, || {
        model.decode(&tokens)?;
        Ok(())
    })?;
    common::print_speed("tokenize (mel -> tokens)", secs, enc);
    common::print_speed("decode (tokens -> mel)", secs, dec);
    Ok(Measured {
        weights,
        batch,
        eval_terms,
        meta: serde_json::json!({"model": cfg}),
        per_step,
    })
}

fn gpt_bench(
    setting: &common::BenchSetting,
    args: &Args,
    dev: &Device,
) -> anyhow::Result<Measured> {
    let (cfg, loss_cfg) = gpt::gpt_config(&setting.resolved)?;
    let data: melvae::train::tokens::TokenDataConfig = setting.resolved.get("data")?;
    let mut model = Gpt::new(cfg.clone(), setting.var_builder(dev))?;
    let (n, len) = (data.batch_size, cfg.max_len);
    let batch = random_tokens(n, len, cfg.vocab_size, dev)?;
    let classes: Vec<u32> = (0..n)
        .map(|i| (i % cfg.num_classes.max(1)) as u32)
        .collect();
    let class_t = Tensor::new(classes.as_slice(), dev)?;
    println!("batch {n} x {len} tokens");
    let ls = loss_cfg.label_smoothing;
    let eval = model.loss(&batch, &class_t, None, ls, Mode::Eval)?;
    let eval_terms = BTreeMap::from([("total".to_string(), scalar(&eval)?)]);
    let (vars, _) = setting.vars();
    let weights = snapshot(&vars)?;
    let per_step = time_token_steps(args, dev, &vars, n * len, "", |mode| {
        Ok(model.loss(&batch, &class_t, None, ls, mode)?)
    })?;
    let opts = SamplingOptions::default();
    time_sampling("one class, KV cache", len, || {
        model.sample(&class_t.narrow(0, 0, 1)?, len, &opts)?;
        Ok(())
    })?;
    Ok(Measured {
        weights,
        batch: batch.to_dtype(DType::F32)?,
        eval_terms,
        meta: serde_json::json!({"model": cfg, "loss": loss_cfg, "classes": classes}),
        per_step,
    })
}

fn gpt_vae_bench(
    setting: &common::BenchSetting,
    args: &Args,
    dev: &Device,
) -> anyhow::Result<Measured> {
    let (cfg, loss_cfg) = gpt_vae::gpt_vae_config(&setting.resolved)?;
    let data: melvae::train::tokens::TokenDataConfig = setting.resolved.get("data")?;
    let mut model = GptVae::new(cfg.clone(), setting.var_builder(dev))?;
    let (n, len) = (data.batch_size, cfg.max_len);
    let batch = random_tokens(n, len, cfg.vocab_size, dev)?;
    println!("batch {n} x {len} tokens");
    let free_bits = loss_cfg.free_bits();
    // Evaluation: decoding from the posterior mean (kl_weight 0 draws no
    // noise), the KL term with the setting's free bits beside it.
    let mut rng = SplitMix64::new(0);
    let eval = model.loss(&batch, None, 0.0, free_bits, &mut rng, Mode::Eval)?;
    let eval_terms = BTreeMap::from([
        ("ce".to_string(), scalar(&eval.ce)?),
        ("kl".to_string(), scalar(&eval.kl)?),
        ("kl_raw".to_string(), scalar(&eval.kl_per_dim.sum_all()?)?),
    ]);
    drop(eval);
    let kl_weight = loss_cfg.schedule().weight(u64::MAX);
    let (vars, _) = setting.vars();
    let weights = snapshot(&vars)?;
    let what = format!(" (KL weight {kl_weight})");
    let per_step = time_token_steps(args, dev, &vars, n * len, &what, |mode| {
        Ok(model
            .loss(&batch, None, kl_weight, free_bits, &mut rng, mode)?
            .total)
    })?;
    let z = Tensor::zeros((1, cfg.latent_dim), DType::F32, dev)?;
    time_sampling("one latent, KV cache", len, || {
        model.generate(&z, len, &SamplingOptions::default())?;
        Ok(())
    })?;
    Ok(Measured {
        weights,
        batch: batch.to_dtype(DType::F32)?,
        eval_terms,
        meta: serde_json::json!({"model": cfg, "loss": loss_cfg, "kl_weight": kl_weight}),
        per_step,
    })
}

/// Text ids per example of the Echolancer batch (a sentence of the
/// bundled TTS corpus is 15-45 characters).
const TEXT_LEN: usize = 40;

fn echolancer_bench(
    setting: &common::BenchSetting,
    args: &Args,
    dev: &Device,
) -> anyhow::Result<Measured> {
    let sections = echolancer::echolancer_config(&setting.resolved)?;
    let mut cfg = sections.model;
    if cfg.vocab_size == 0 {
        // The bundled corpus' 31 symbols, plus padding and unknown.
        cfg.vocab_size = 33;
    }
    let data: melvae::train::tokens::TokenDataConfig = setting.resolved.get("data")?;
    let mut model = Echolancer::new(cfg.clone(), setting.var_builder(dev))?;
    let (n, len) = (data.batch_size, cfg.max_len);
    // Symbol ids (from 2: no padding or unknown among them).
    let first = melvae::models::echolancer::FIRST_SYMBOL;
    let text = random_ids(n, TEXT_LEN, first, cfg.vocab_size as u32, dev)?;
    let batch = random_tokens(n, len, cfg.mel_vocab_size, dev)?;
    let speakers: Vec<u32> = (0..n).map(|i| (i % cfg.n_speakers) as u32).collect();
    let inputs = EcholancerInputs {
        text: text.clone(),
        text_mask: None,
        speakers: Tensor::new(speakers.as_slice(), dev)?,
        emotion: None,
    };
    println!("batch {n} x {TEXT_LEN} characters -> {len} tokens");
    let w = Some(sections.loss.gate_pos_weight);
    let eval = model.loss(&inputs, &batch, None, w, Mode::Eval)?;
    let eval_terms = BTreeMap::from([
        ("ce".to_string(), scalar(&eval.ce)?),
        ("gate".to_string(), scalar(&eval.gate)?),
    ]);
    let (vars, _) = setting.vars();
    let weights = snapshot(&vars)?;
    let per_step = time_token_steps(args, dev, &vars, n * len, "", |mode| {
        Ok(model.loss(&inputs, &batch, None, w, mode)?.total)
    })?;
    let one = EcholancerInputs {
        text: text.narrow(0, 0, 1)?,
        text_mask: None,
        speakers: inputs.speakers.narrow(0, 0, 1)?,
        emotion: None,
    };
    time_sampling("one sentence, gate off, KV cache", len, || {
        model.generate(&one, len, 1.0, &SamplingOptions::default())?;
        Ok(())
    })?;
    let text_rows: Vec<Vec<u32>> = text.to_vec2()?;
    Ok(Measured {
        weights,
        batch: batch.to_dtype(DType::F32)?,
        eval_terms,
        meta: serde_json::json!({
            "model": cfg,
            "loss": sections.loss,
            "text": text_rows,
            "speakers": speakers,
        }),
        per_step,
    })
}

/// An LSTM prior of the hierarchical waveform VQ-VAE on `--codes` random
/// codes per example (and random coarse codes as context): the codes come
/// from frozen VQ-VAEs in `train`, so the setting's VQ-VAE model files are
/// not needed here.
fn lstm_prior_bench(
    setting: &common::BenchSetting,
    args: &Args,
    dev: &Device,
) -> anyhow::Result<Measured> {
    let (cfg, _) = lstm_prior::lstm_prior_config(&setting.resolved)?;
    let data: melvae::train::AudioDataConfig = setting.resolved.get("data")?;
    let model = LstmPrior::new(cfg.clone(), setting.var_builder(dev))?;
    let (n, len) = (data.batch_size, args.codes);
    anyhow::ensure!(len > 0, "--codes must be > 0");
    let batch = random_tokens(n, len, cfg.vocab_size, dev)?;
    let context = cfg
        .context
        .as_ref()
        .map(|c| random_ids(n, len.div_ceil(c.upsample), 0, c.vocab_size as u32, dev))
        .transpose()?;
    println!(
        "batch {n} x {len} codes{}",
        if context.is_some() {
            " (and their coarse context codes)"
        } else {
            ""
        }
    );
    let eval = model.loss(&batch, context.as_ref())?;
    let eval_terms = BTreeMap::from([("total".to_string(), scalar(&eval)?)]);
    let (vars, _) = setting.vars();
    let weights = snapshot(&vars)?;
    let per_step = time_token_steps(args, dev, &vars, n * len, "", |_| {
        Ok(model.loss(&batch, context.as_ref())?)
    })?;
    let one = context.as_ref().map(|c| c.narrow(0, 0, 1)).transpose()?;
    time_sampling("one sequence, LSTM state carried", len, || {
        model.sample(1, len, one.as_ref(), &SamplingOptions::default(), dev)?;
        Ok(())
    })?;
    let context_rows: Option<Vec<Vec<u32>>> = context.map(|c| c.to_vec2()).transpose()?;
    Ok(Measured {
        weights,
        batch: batch.to_dtype(DType::F32)?,
        eval_terms,
        meta: serde_json::json!({"model": cfg, "context": context_rows}),
        per_step,
    })
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let dev = args.bench.device()?;
    let setting = common::BenchSetting::load(&args.setting)?;
    let family = family_of(&setting.resolved)?;
    let threads = candle_core::utils::get_num_threads();
    println!("{} ({family}), {threads} threads", setting.path.display());
    let m = match family {
        "mel_vqvae" => mel_vqvae_bench(&setting, &args, &dev)?,
        "gpt" => gpt_bench(&setting, &args, &dev)?,
        "gpt_vae" => gpt_vae_bench(&setting, &args, &dev)?,
        "echolancer" => echolancer_bench(&setting, &args, &dev)?,
        "lstm_prior" => lstm_prior_bench(&setting, &args, &dev)?,
        other => anyhow::bail!(
            "--setting {}: family {other} is not a token model \
             (mel_vqvae, gpt, gpt_vae, echolancer, lstm_prior; see the other *_throughput examples)",
            args.setting
        ),
    };
    let (_, n_params) = setting.vars();
    println!("{:.3} M parameters", n_params as f64 / 1e6);
    common::finish_bench(
        args.dump.as_deref(),
        &m.weights,
        &m.batch,
        serde_json::json!({
            "family": family,
            "setting": args.setting,
            "config": m.meta,
            "eval_terms": m.eval_terms,
            "melvae_step_ms": m.per_step * 1e3,
            "threads": threads,
            "learning_rate": LR,
            "n_params": n_params,
        }),
    )
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    common::exit_with(run())
}
