//! melvae-train: the training engine every melvae model family uses.
//!
//! - [`config`]: YAML defaults + experiment settings + command-line
//!   overrides, typed with errors that name file, key and expectation.
//! - [`checkpoint`]: run directories, atomic checkpoints, `metrics.jsonl`.
//! - [`data`]: audio-folder datasets with random crops, deterministic epochs,
//!   a stable validation split and a report of skipped files.
//! - [`dist`]: data-parallel training: a communicator (single process,
//!   in-process threads, MPI, NCCL) and bucketed all-reduce.
//! - [`tokens`]: code sequences with labels, text and conditioning in
//!   safetensors shards, batched with padding masks.
//! - [`tasks`]: the `TrainTask`s of melvae's model families (the mel VAE).
//! - [`prefetch`]: background batch production, resumable by batch index.
//! - [`run`]: opening run directories without clobbering them, resuming
//!   with config checks, locating checkpoints, exporting model files.
//! - [`tensorboard`]: TensorBoard event files (written by the trainer).
//! - [`optim`]: AdamW with saveable state, global-norm clipping, gradient
//!   accumulation, learning-rate schedules, EMA of the weights.
//! - [`trainer`]: the [`TrainTask`] trait and the loop: validation, early
//!   stopping, checkpoints, exact resume, non-finite guard, GAN mode,
//!   initialisation from another run, frozen modules.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use melvae_train::optim::{clip_grad_norm, collect_grads, AdamW, AdamWConfig, LrSchedule};
//!
//! // Minimise (w - 3)^2 with AdamW under a warm-up + cosine schedule.
//! let w = Var::new(&[0f32], &Device::Cpu)?;
//! let vars = vec![("w".to_string(), w.clone())];
//! let mut opt = AdamW::new(vars.clone(), AdamWConfig { weight_decay: 0.0, ..Default::default() })?;
//! let sched = LrSchedule::WarmupCosine { warmup_steps: 10, total_steps: 300, min_lr: 0.0 };
//! for step in 0..300 {
//!     let loss = (w.as_tensor() - 3.0)?.sqr()?.sum_all()?;
//!     let mut grads = collect_grads(&vars, &loss.backward()?);
//!     clip_grad_norm(&mut grads, 1.0)?;
//!     opt.step(&grads, sched.lr(0.1, step))?;
//! }
//! assert!((w.as_tensor().to_vec1::<f32>()?[0] - 3.0).abs() < 0.05);
//! # Ok::<(), melvae_train::Error>(())
//! ```

#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dist;
mod error;
pub mod optim;
pub mod prefetch;
pub mod pt;
pub mod run;
pub mod tasks;
pub mod tensorboard;
pub mod tokens;
pub mod trainer;
pub mod tts;

pub use checkpoint::{Checkpoint, RunDir, TrainState};
pub use config::{check, ResolvedConfig, Validate};
pub use data::{
    discover_audio, prepare_cache, AudioDataConfig, AudioFolder, AudioSet, EpochCursor,
    PrepareReport, SkipReport, SplitBy,
};
pub use error::{Error, Result};
pub use prefetch::Prefetcher;
pub use tokens::{write_token_shard, TokenBatch, TokenDataset, TokenExample};
pub use trainer::{
    parse_device, parse_dtype, GanConfig, InitFrom, Losses, StepContext, TrainSummary, TrainTask,
    Trainer, TrainerConfig,
};
