//! melvae-dsp: the signal processing under every melvae model.
//!
//! - [`load_audio`] / [`save_wav`]: decode WAV, FLAC, MP3, OGG/Vorbis and
//!   AAC/M4A into planar f32 ([`Audio`]), write 16-bit or float WAV.
//! - [`resample`]: rubato sinc or FFT resampling, delay-compensated.
//! - [`Stft`]: host STFT/ISTFT (realfft) with librosa/torch conventions.
//! - [`MelExtractor`] and [`MelConfig`] (presets `vocos-24k`, `hifigan-22k`):
//!   log-mel spectrograms matching librosa/torchaudio.
//! - [`griffin_lim`], [`mel_to_audio`]: phase reconstruction.
//! - [`TensorStft`], [`TensorMel`]: differentiable STFT and mel on candle
//!   tensors, for spectral losses.
//! - [`to_mid_side`] and friends; [`write_npy`] / [`read_npy`] (ndarray-npy);
//!   [`atomic_write`].
//! - With the `plot` feature: `SpectrogramImage` and `line_plot_png`, PNG
//!   pictures drawn with plotters.
//!
//! Layouts: audio is planar `[channels][samples]` on the host and
//! `[batch, samples]` (or `[batch, channels, samples]`) as tensors;
//! spectrograms are `[bins or n_mels, frames]` on the host and
//! `[batch, bins or n_mels, frames]` as tensors.
//!
//! ```
//! use melvae_dsp::{MelConfig, MelExtractor, TensorMel};
//!
//! // One second of a 440 Hz tone at 24 kHz.
//! let audio: Vec<f32> = (0..24000)
//!     .map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 24000.0).sin())
//!     .collect();
//! let mel = MelExtractor::new(MelConfig::vocos_24k())?.extract(&audio)?;
//! assert_eq!(mel.dim(), (100, 1 + 24000 / 256)); // [n_mels, frames]
//!
//! // The same features as a differentiable candle op, [batch, n_mels, frames].
//! let device = candle_core::Device::Cpu;
//! let x = candle_core::Tensor::from_vec(audio, (1, 24000), &device)?;
//! let t = TensorMel::new(MelConfig::vocos_24k(), &device)?.forward(&x)?;
//! assert_eq!(t.dims(), &[1, 100, 94]);
//! # Ok::<(), melvae_dsp::Error>(())
//! ```

#![warn(missing_docs)]

mod audio;
mod dft_op;
mod error;
mod fsutil;
mod griffin_lim;
mod mel;
mod mel_stream;
mod midside;
mod npy;
#[cfg(feature = "plot")]
mod plot;
mod resample;
mod rng;
mod stft;
mod tensor;
mod window;

pub use audio::{
    discover_audio, load_audio, load_audio_with, save_wav, Audio, ChannelMode, LoadOptions,
    WavFormat, AUDIO_EXTENSIONS,
};
pub use dft_op::kernel_enabled;
pub use error::{AudioErrorKind, Error, Result};
pub use fsutil::atomic_write;
pub use griffin_lim::{
    griffin_lim, mel_pseudo_inverse, mel_to_audio, mel_to_linear, GriffinLimConfig, MelInversion,
    PhaseInit,
};
pub use mel::{
    hz_to_mel, mel_filterbank, mel_points, mel_to_hz, LogScale, MelConfig, MelExtractor, MelNorm,
    MelScale,
};
pub use mel_stream::MelStream;
pub use midside::{from_mid_side, from_mid_side_tensor, to_mid_side, to_mid_side_tensor};
pub use npy::{read_npy, write_npy};
#[cfg(feature = "plot")]
pub use plot::{line_plot, line_plot_png, Series, SpectrogramImage};
pub use realfft::num_complex::Complex32;
pub use resample::{resample, ResampleQuality};
pub use rng::SplitMix64;
pub use stft::{PadMode, Padding, Stft, StftConfig};
pub use tensor::{IstftStream, TensorIstft, TensorMel, TensorStft};
pub use window::{window, WindowKind};
