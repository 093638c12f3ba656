//! melvae-models: the model families built on melvae's layers and losses.
//!
//! - [`convformer`]: the causal, streaming Convformer encoder of the mel VAE.
//! - [`dit_cfm`]: its DiT conditional flow-matching decoder, with Euler and
//!   midpoint sampling and classifier-free guidance.
//! - [`mel_vae`]: the two joined: encode, sample, encode-and-sample from
//!   audio, and the training loss (flow matching + KL with warm-up).
//! - [`wave_vae`]: the Encodec-style waveform VAE (SEANet encoder and
//!   decoder, Gaussian bottleneck, mono or stereo, streaming when causal).
//! - [`discriminators`]: discriminators for adversarial training (MSD, MPD,
//!   MS-STFT, multi-band MRD).
//! - [`eval`]: codec metrics (mel and STFT distances, SI-SDR, wideband
//!   PESQ, real-time factors) for clips, models and folders.
//! - [`latent`]: latent edits for exploration (scale, shift,
//!   interpolation).
//! - [`vocoder`]: Vocos, loading the `vocos` package's checkpoints.
//! - [`mel_vqvae`]: the mel VQ-VAE, mel spectrograms to a grid of tokens
//!   and back.
//! - [`priors`]: autoregressive priors over tokens (the class GPT).
//! - [`model_file`]: self-describing model files every family loads from.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use melvae_layers::Mode;
//! use melvae_models::{ConvformerConfig, ConvformerEncoder};
//!
//! let vm = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
//! let cfg = ConvformerConfig { channels: 4, tf_dim: 32, tf_heads: 4, tf_layers: 1, ..Default::default() };
//! let enc = ConvformerEncoder::new(cfg, vb)?;
//! let mel = Tensor::randn(0f32, 1.0, (1, 100, 64), &Device::Cpu)?; // [batch, mels, frames]
//! let (mean, logvar) = enc.forward(&mel, Mode::Eval)?;
//! assert_eq!(mean.dims(), &[1, 8, 64]); // 64 frames / C = 8 latent frames
//! # let _ = logvar;
//! # Ok::<(), melvae_models::Error>(())
//! ```

#![warn(missing_docs)]

pub mod convformer;
pub mod discriminators;
pub mod dit_cfm;
pub mod echolancer;
mod error;
pub mod eval;
pub mod latent;
pub mod mel_vae;
pub mod mel_vqvae;
pub mod model_file;
pub mod priors;
pub mod vocoder;
pub mod vqvae;
pub mod wave_vae;

pub use convformer::{ConvformerConfig, ConvformerEncoder};
pub use discriminators::{
    DiscOutput, Discriminator, Discriminators, DiscriminatorsConfig, MpdConfig, MsdConfig,
    MultiPeriodDiscriminator, MultiScaleDiscriminator, PatchConfig, PatchDiscriminator,
};
pub use dit_cfm::{
    integrate, normal_noise, CfmConfig, DitDecoder, LowBandWeight, Solver, TimeSampling,
};
pub use echolancer::{
    CharTokenizer, Echolancer, EcholancerConfig, EcholancerInputs, EcholancerLoss,
    EcholancerOutput, Generated, GenerationStep,
};
pub use error::{Error, Result};
pub use mel_vae::{
    mel_to_array, EncoderStream, LossDraws, MelVae, MelVaeConfig, MelVaeLoss, Reconstruction,
    SampleOptions, StreamedLatents,
};
pub use mel_vqvae::{MelVqVae, MelVqVaeConfig, MelVqVaeOutput, ReconLoss};
pub use model_file::{Family, ModelFileInfo};
pub use priors::gpt::{Gpt, GptConfig, GptPositions, SamplingOptions};
pub use priors::gpt_vae::{GptVae, GptVaeConfig, GptVaeLoss, LatentInjection};
pub use priors::lstm::{ContextCombine, ContextConfig, LstmPrior, LstmPriorConfig};
pub use vocoder::{Vocos, VocosConfig, VocosFeatures, VocosPadding, VocosStream};
pub use vqvae::{
    Hierarchy, HierarchySample, VqDecoderStream, VqEncoderStream, VqVae, VqVaeConfig, VqVaeOutput,
};
pub use wave_vae::{
    AdversarialWeights, BalancerSection, FreeBitsConfig, GanLossKind, StereoWeights,
    WaveActivation, WaveBottleneck, WaveDecoder, WaveEncoder, WaveEncoderStream, WaveVae,
    WaveVaeConfig, WaveVaeLoss, WaveVaeLossConfig, WaveVaeObjective,
};
