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

/// A mel VAE from a model file (`export`'s output, or `export.safetensors`
/// in a best checkpoint), or from a run or checkpoint directory (EMA
/// weights when the run kept them), in f32 on the CPU.
pub fn load_mel_vae(path: &Path) -> anyhow::Result<melvae::models::MelVae> {
    let dev = candle_core::Device::Cpu;
    Ok(if path.is_file() {
        melvae::models::MelVae::load(path, &dev, candle_core::DType::F32)?
    } else {
        melvae::train::tasks::mel_vae::load_trained(path, &dev)?.0
    })
}

/// A memory figure of this process from /proc/self/status in MiB (Linux):
/// `VmRSS` (resident now) or `VmHWM` (peak resident).
pub fn proc_status_mib(key: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(&format!("{key}:")))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// A model of family `F` from a model file, or from a run or checkpoint
/// directory through `from_run` (its latest checkpoint), in f32 on the CPU.
fn load_model<F: melvae::models::Family>(
    path: &Path,
    from_run: impl FnOnce(
        &Path,
        &melvae::train::run::Which,
        &candle_core::Device,
    ) -> melvae::train::Result<F>,
) -> anyhow::Result<F> {
    Ok(melvae::train::tasks::load_model_at(
        path,
        from_run,
        &candle_core::Device::Cpu,
    )?)
}

/// A waveform VAE from a model file or a run or checkpoint directory, as
/// [`load_mel_vae`].
pub fn load_wave_vae(path: &Path) -> anyhow::Result<melvae::models::WaveVae> {
    load_model(path, melvae::train::tasks::load_wave_vae)
}

/// A Vocos from a model file, or from a run or checkpoint directory (its
/// latest checkpoint).
pub fn load_vocos(path: &Path) -> anyhow::Result<melvae::models::Vocos> {
    load_model(path, melvae::train::tasks::load_vocos)
}

/// The model file of `path`: itself when a file, else the best
/// checkpoint's model file of the run directory `path`.
pub fn best_model_file(path: &Path) -> anyhow::Result<std::path::PathBuf> {
    Ok(if path.is_dir() {
        let loc = melvae::train::run::locate(path, &melvae::train::run::Which::Best)?;
        loc.checkpoint
            .join(melvae::train::run::CHECKPOINT_MODEL_FILE)
    } else {
        path.to_path_buf()
    })
}

/// A waveform VQ-VAE level from a model file, or from a run or checkpoint
/// directory (its latest checkpoint).
pub fn load_vqvae(path: &Path) -> anyhow::Result<melvae::models::VqVae> {
    load_model(path, melvae::train::tasks::load_vqvae)
}

/// A mel VQ-VAE from a model file, or from a run or checkpoint directory
/// (its latest checkpoint).
pub fn load_mel_vqvae(path: &Path) -> anyhow::Result<melvae::models::MelVqVae> {
    load_model(path, melvae::train::tasks::load_mel_vqvae)
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

/// Mel frames per second of the `vocos-24k` preset the settings use.
pub const MEL_FRAME_RATE: f64 = 24000.0 / 256.0;

/// The mel VAE of a settings file, built for timing training steps.
pub struct MelVaeBench {
    /// The model (seeded initialisation).
    pub model: melvae::models::MelVae,
    /// Its trainable variables.
    pub vars: Vec<(String, candle_core::Var)>,
    /// `data.batch_size` of the setting.
    pub batch: usize,
    /// `data.crop_seconds` in mel frames, rounded down to a multiple of C.
    pub frames: usize,
    /// The settings file.
    pub path: std::path::PathBuf,
}

impl MelVaeBench {
    /// Builds the model of `configs/settings/<setting>.yaml` in `dtype` on
    /// `dev`.
    pub fn new(
        setting: &str,
        dtype: candle_core::DType,
        dev: &candle_core::Device,
    ) -> anyhow::Result<Self> {
        let path = std::path::PathBuf::from(format!("configs/settings/{setting}.yaml"));
        let resolved = melvae::train::ResolvedConfig::load(&path, &[])?;
        let cfg = melvae::train::tasks::mel_vae::mel_vae_config(&resolved)?;
        let data: melvae::train::AudioDataConfig = resolved.get("data")?;
        let varmap = candle_nn::VarMap::new();
        let model = melvae::models::MelVae::new(
            cfg,
            melvae::layers::seeded_var_builder(&varmap, 0, dtype, dev),
        )?;
        let c = model.compress();
        Ok(Self {
            model,
            vars: melvae::layers::testing::named_vars(&varmap),
            batch: data.batch_size,
            frames: ((data.crop_seconds * MEL_FRAME_RATE) as usize / c) * c,
            path,
        })
    }

    /// Trainable parameters.
    pub fn n_params(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Deterministic log-mel-like input `[batch, mel, frames]` around -5.
    pub fn random_mel(
        &self,
        batch: usize,
        frames: usize,
        seed: u64,
    ) -> anyhow::Result<candle_core::Tensor> {
        let m = self.model.config().convformer.mel_channels;
        let data: Vec<f32> = noise(batch * m * frames, seed)
            .into_iter()
            .map(|x| -5.0 + 6.0 * x)
            .collect();
        let dev = self.vars[0].1.device();
        let dtype = self.vars[0].1.dtype();
        Ok(candle_core::Tensor::from_vec(data, (batch, m, frames), dev)?.to_dtype(dtype)?)
    }

    /// Mean seconds per training step (loss, backward, AdamW update) on a
    /// batch of random crops, over `steps` steps after one warm-up step.
    pub fn time_train_steps(&self, steps: u64) -> anyhow::Result<f64> {
        use melvae::train::optim::{collect_grads, AdamW, AdamWConfig};
        let mut opt = AdamW::new(self.vars.clone(), AdamWConfig::default())?;
        let mel = self.random_mel(self.batch, self.frames, 1)?;
        let mut rng = melvae::dsp::SplitMix64::new(0);
        let mut i = 0;
        mean_seconds(mel.device(), 1, steps, || {
            let loss = self.model.loss(&mel, i, &mut rng, true)?;
            let store = loss.total.backward()?;
            opt.step(&collect_grads(&self.vars, &store), 1e-4)?;
            i += 1;
            Ok(())
        })
    }
}

/// Mean seconds per call of `f` over `iters` calls after `warmup` calls,
/// the device synchronised before and after the timed calls.
pub fn mean_seconds(
    dev: &candle_core::Device,
    warmup: u64,
    iters: u64,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let t = std::time::Instant::now();
    for _ in 0..iters {
        f()?;
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

/// How the mel VAE CLIs sample reconstructions: the model's defaults
/// (`SampleOptions::reconstruction`, its own temperature) with the
/// command line's steps, guidance and, when given, temperature.
pub fn mel_sampling(
    cfm: &melvae::models::CfmConfig,
    num_steps: usize,
    guidance_scale: f64,
    temperature: Option<f64>,
) -> melvae::models::SampleOptions {
    let d = melvae::models::SampleOptions::reconstruction(cfm);
    melvae::models::SampleOptions {
        num_steps,
        guidance_scale,
        temperature: temperature.unwrap_or(d.temperature),
        ..d
    }
}

/// `--temperature`: a finite number >= 0 (clap `value_parser`).
pub fn parse_temperature(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!("{s:?} is not a temperature (a finite number >= 0)")),
    }
}

/// The arguments every model throughput example takes.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Timed training steps (after one warm-up step), at least 1.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,
    /// Seconds of audio to encode and decode (> 0).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Run on CUDA device 0 (needs `--features cuda`).
    #[arg(long)]
    pub cuda: bool,
}

impl BenchArgs {
    /// Checks `--seconds` and opens the device.
    pub fn device(&self) -> anyhow::Result<candle_core::Device> {
        anyhow::ensure!(
            self.seconds > 0.0 && self.seconds.is_finite(),
            "--seconds must be > 0, got {}",
            self.seconds
        );
        Ok(if self.cuda {
            candle_core::Device::new_cuda(0)?
        } else {
            candle_core::Device::Cpu
        })
    }
}

/// The median of three timed calls of `f`, in seconds.
pub fn median_of_3(
    dev: &candle_core::Device,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let mut runs = (0..3)
        .map(|_| mean_seconds(dev, 0, 1, &mut f))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    runs.sort_by(f64::total_cmp);
    Ok(runs[1])
}

/// How the mel VAE's mels become audio: the Vocos model file at `path`
/// (its features must be the mel VAE's `vocos-24k`), or Griffin-Lim.
pub fn mel_vocoder(path: Option<&Path>) -> anyhow::Result<melvae::models::eval::MelToAudio> {
    let vocos = match path {
        Some(p) => Some(melvae::models::Vocos::load(
            p,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )?),
        None => None,
    };
    Ok(melvae::models::eval::MelToAudio::new(
        vocos,
        &MelConfig::vocos_24k(),
    )?)
}

/// Prints a training step's time as ms, steps/s and seconds of audio per
/// second (`audio_per_step` seconds of audio in a batch).
pub fn print_train_step(per_step: f64, audio_per_step: f64) {
    println!(
        "train step: {:.1} ms, {:.2} steps/s, {:.1} audio-s/s",
        per_step * 1e3,
        1.0 / per_step,
        audio_per_step / per_step
    );
}

/// Prints `what` of `secs` seconds of audio taking `took` seconds (median
/// of 3) in ms and multiples of real time.
pub fn print_speed(what: &str, secs: f64, took: f64) {
    println!(
        "{what} {secs:.2} s (median of 3): {:.1} ms, {:.0}x real time",
        took * 1e3,
        secs / took
    );
}

/// Deterministic audio-like input `[batch, channels, samples]`: a few
/// sweeping tones under noise, amplitude about 0.5.
pub fn test_audio(
    batch: usize,
    channels: usize,
    samples: usize,
    seed: u64,
    dev: &candle_core::Device,
) -> anyhow::Result<candle_core::Tensor> {
    let noise = noise(batch * channels * samples, seed);
    let data: Vec<f32> = noise
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let t = (i % samples) as f32 / samples as f32;
            let f = 40.0 + 30.0 * (i / samples) as f32;
            0.4 * (std::f32::consts::TAU * f * t * (1.0 + t)).sin() + 0.2 * n
        })
        .collect();
    Ok(candle_core::Tensor::from_vec(
        data,
        (batch, channels, samples),
        dev,
    )?)
}

/// The end of a model throughput example: prints the peak resident memory
/// and, with `--dump DIR`, writes what a PyTorch twin under tools/bench/
/// needs to rebuild the model and check its loss (see [`dump_for_twin`]).
pub fn finish_bench(
    dump: Option<&Path>,
    weights: &std::collections::HashMap<String, candle_core::Tensor>,
    batch: &candle_core::Tensor,
    meta: serde_json::Value,
) -> anyhow::Result<()> {
    if let Some(mib) = proc_status_mib("VmHWM") {
        println!("peak resident memory: {mib:.0} MiB");
    }
    if let Some(dir) = dump {
        dump_for_twin(dir, weights, batch, meta)?;
        println!("wrote {}", dir.display());
    }
    Ok(())
}

/// Writes what a PyTorch twin under tools/bench/ needs to rebuild a model
/// and check its loss: `weights.safetensors` (by name), `batch.npy` and
/// `meta.json`.
pub fn dump_for_twin(
    dir: &Path,
    weights: &std::collections::HashMap<String, candle_core::Tensor>,
    batch: &candle_core::Tensor,
    meta: serde_json::Value,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    candle_core::safetensors::save(weights, dir.join("weights.safetensors"))?;
    let b = batch.to_device(&candle_core::Device::Cpu)?;
    let shape = b.dims().to_vec();
    let array = ndarray::ArrayD::from_shape_vec(shape, b.flatten_all()?.to_vec1::<f32>()?)?;
    melvae::dsp::write_npy(dir.join("batch.npy"), &array)?;
    std::fs::write(
        dir.join("meta.json"),
        serde_json::to_string_pretty(&meta)? + "\n",
    )?;
    Ok(())
}

/// A throughput example's settings file (`configs/settings/NAME.yaml`)
/// and a fresh variable map for its model.
pub struct BenchSetting {
    pub path: std::path::PathBuf,
    pub resolved: melvae::train::ResolvedConfig,
    pub varmap: candle_nn::VarMap,
}

impl BenchSetting {
    /// Loads `configs/settings/{name}.yaml`.
    pub fn load(name: &str) -> anyhow::Result<Self> {
        let path = std::path::PathBuf::from(format!("configs/settings/{name}.yaml"));
        let resolved = melvae::train::ResolvedConfig::load(&path, &[])?;
        Ok(Self {
            path,
            resolved,
            varmap: candle_nn::VarMap::new(),
        })
    }

    /// The `data:` section of an audio family's setting.
    pub fn audio_data(&self) -> anyhow::Result<melvae::train::AudioDataConfig> {
        Ok(self.resolved.get("data")?)
    }

    /// A builder creating the model's variables in the map (seed 0, f32).
    pub fn var_builder(&self, dev: &candle_core::Device) -> candle_nn::VarBuilder<'static> {
        melvae::layers::seeded_var_builder(&self.varmap, 0, candle_core::DType::F32, dev)
    }

    /// The variables by name and their number of elements.
    pub fn vars(&self) -> (Vec<(String, candle_core::Var)>, usize) {
        let vars = melvae::layers::testing::named_vars(&self.varmap);
        let n = vars.iter().map(|(_, v)| v.elem_count()).sum();
        (vars, n)
    }

    /// Samples per training crop: `data.crop_seconds` cut to the hop.
    pub fn crop(data: &melvae::train::AudioDataConfig, rate: f64, hop: usize) -> usize {
        ((data.crop_seconds * rate) as usize / hop).max(1) * hop
    }
}

/// How the token models' programs sample and vocode (`generate`,
/// `interpolate`).
#[derive(clap::Args)]
pub struct TokenSampling {
    /// Logits are divided by this (0: greedy).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Keep the k most likely tokens (1: greedy; 0: all).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Seed of the draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A Vocos model file with the VQ-VAE's mel features (else Griffin-Lim).
    #[arg(long)]
    pub vocoder: Option<std::path::PathBuf>,
}

impl TokenSampling {
    /// The sampling options (temperature 0 is greedy: top-k 1; top-k 0 is
    /// no top-k, as the VQWave seed's flags).
    pub fn options(&self) -> melvae::models::SamplingOptions {
        let greedy = self.temperature == 0.0;
        melvae::models::SamplingOptions {
            temperature: if greedy { 1.0 } else { self.temperature },
            top_k: if greedy {
                Some(1)
            } else {
                self.top_k.filter(|&k| k > 0)
            },
            top_p: self.top_p,
            seed: self.seed,
        }
    }

    /// How mels of features `mel` become audio: `--vocoder` (checked
    /// against the features) or Griffin-Lim.
    pub fn mel_to_audio(
        &self,
        mel: &MelConfig,
    ) -> anyhow::Result<melvae::models::eval::MelToAudio> {
        let vocoder = match &self.vocoder {
            Some(p) => Some(melvae::models::Vocos::load(
                p,
                &candle_core::Device::Cpu,
                candle_core::DType::F32,
            )?),
            None => None,
        };
        Ok(melvae::models::eval::MelToAudio::new(vocoder, mel)?)
    }
}
