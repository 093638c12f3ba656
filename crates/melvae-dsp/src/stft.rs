//! Short-time Fourier transform and its inverse on the host (realfft).
//!
//! Conventions follow `librosa.stft` / `torch.stft`: frame `t` covers padded
//! samples `[t * hop, t * hop + n_fft)`, the window (`win_length` samples) is
//! zero-padded to `n_fft` in the centre, there is no normalisation on the
//! forward transform, and spectra are laid out `[bins, frames]` with
//! `bins = n_fft / 2 + 1`.

use std::sync::Arc;

use ndarray::Array2;
use realfft::num_complex::Complex32;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};

use crate::window::{padded_window, WindowKind};
use crate::{Error, Result};

/// How a padded sample outside the signal is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadMode {
    /// Mirror without repeating the edge sample (`numpy.pad(mode="reflect")`).
    Reflect,
    /// Zeros.
    Constant,
}

/// Padding added to the signal before framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// No padding: the first frame starts at sample 0 (`center=False`).
    None,
    /// `n_fft / 2` samples on each side, so frame `t` is centred on sample
    /// `t * hop` (`center=True`).
    Center(PadMode),
    /// A fixed number of samples on each side (HiFi-GAN pads
    /// `(n_fft - hop) / 2` with reflection and frames with `center=False`).
    Both(usize, PadMode),
}

impl Padding {
    /// Samples added on each side for a given `n_fft`.
    pub fn amount(&self, n_fft: usize) -> usize {
        match *self {
            Padding::None => 0,
            Padding::Center(_) => n_fft / 2,
            Padding::Both(n, _) => n,
        }
    }

    /// The fill mode (`Constant` for `None`, where nothing is filled).
    pub fn mode(&self) -> PadMode {
        match *self {
            Padding::None => PadMode::Constant,
            Padding::Center(m) | Padding::Both(_, m) => m,
        }
    }
}

/// Index into a signal of length `len` (> 0) for padded position `i` (which
/// may lie outside `0..len`), or `None` where the padding is zero.
///
/// Reflection repeats with period `2 (len - 1)` like `numpy.pad`, so it is
/// defined for any amount of padding.
pub(crate) fn source_index(i: isize, len: usize, mode: PadMode) -> Option<usize> {
    let n = len as isize;
    if (0..n).contains(&i) {
        return Some(i as usize);
    }
    match mode {
        PadMode::Constant => None,
        PadMode::Reflect => {
            if n == 1 {
                return Some(0);
            }
            let period = 2 * (n - 1);
            let mut j = i.rem_euclid(period);
            if j >= n {
                j = period - j;
            }
            Some(j as usize)
        }
    }
}

/// STFT parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StftConfig {
    /// FFT size; `n_fft / 2 + 1` frequency bins.
    pub n_fft: usize,
    /// Hop between frames, in samples.
    pub hop_length: usize,
    /// Window length, `<= n_fft`.
    pub win_length: usize,
    /// Window function.
    pub window: WindowKind,
    /// Periodic (DFT-even) window if true, symmetric otherwise.
    pub periodic: bool,
    /// Signal padding before framing.
    pub padding: Padding,
}

impl StftConfig {
    /// `n_fft` with `hop = n_fft / 4`, a periodic Hann window of `n_fft`
    /// samples and centred reflect padding (librosa's defaults).
    pub fn new(n_fft: usize) -> Self {
        Self {
            n_fft,
            hop_length: n_fft / 4,
            win_length: n_fft,
            window: WindowKind::Hann,
            periodic: true,
            padding: Padding::Center(PadMode::Reflect),
        }
    }

    /// Number of frequency bins, `n_fft / 2 + 1`.
    pub fn n_bins(&self) -> usize {
        self.n_fft / 2 + 1
    }

    /// Checks the parameters; the error names the bad field.
    pub fn validate(&self) -> Result<()> {
        if self.n_fft < 2 {
            return Err(Error::invalid(
                "stft.n_fft",
                format!("must be >= 2, got {}", self.n_fft),
            ));
        }
        if self.hop_length == 0 {
            return Err(Error::invalid("stft.hop_length", "must be > 0"));
        }
        if self.win_length == 0 || self.win_length > self.n_fft {
            return Err(Error::invalid(
                "stft.win_length",
                format!(
                    "must be in 1..={} (n_fft), got {}",
                    self.n_fft, self.win_length
                ),
            ));
        }
        Ok(())
    }

    /// The signal length an inverse STFT of `frames` frames gives:
    /// `(frames - 1) * hop + n_fft` less the padding on both sides (with
    /// centre padding `(frames - 1) * hop`); [`StftConfig::n_frames`] of it
    /// is `frames` again.
    pub fn n_samples(&self, frames: usize) -> usize {
        let full = frames.saturating_sub(1) * self.hop_length + self.n_fft;
        full.saturating_sub(2 * self.padding.amount(self.n_fft))
    }

    /// Number of frames for a signal of `len` samples, or an error naming
    /// the length when the padded signal is shorter than one frame.
    pub fn n_frames(&self, len: usize) -> Result<usize> {
        let padded = len + 2 * self.padding.amount(self.n_fft);
        if len == 0 || padded < self.n_fft {
            return Err(Error::shape(
                "stft input",
                format!(
                    "at least {} samples (n_fft {} with {} padding per side)",
                    (self
                        .n_fft
                        .saturating_sub(2 * self.padding.amount(self.n_fft)))
                    .max(1),
                    self.n_fft,
                    self.padding.amount(self.n_fft)
                ),
                format!("{len} samples"),
            ));
        }
        Ok(1 + (padded - self.n_fft) / self.hop_length)
    }

    /// The window zero-padded to `n_fft`.
    pub fn padded_window(&self) -> Vec<f32> {
        padded_window(self.window, self.win_length, self.periodic, self.n_fft)
    }
}

/// A planned STFT: window and FFT plans, reusable and shareable across
/// threads.
#[derive(Clone)]
pub struct Stft {
    cfg: StftConfig,
    window: Vec<f32>,
    forward: Arc<dyn RealToComplex<f32>>,
    inverse: Arc<dyn ComplexToReal<f32>>,
}

impl std::fmt::Debug for Stft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stft").field("cfg", &self.cfg).finish()
    }
}

/// Per-thread buffers for [`Stft::for_each_frame`].
pub(crate) struct FrameScratch {
    frame: Vec<f32>,
    pub(crate) spectrum: Vec<Complex32>,
    fft: Vec<Complex32>,
}

impl Stft {
    /// Plans an STFT; fails if `cfg` is invalid.
    pub fn new(cfg: StftConfig) -> Result<Self> {
        cfg.validate()?;
        let mut planner = RealFftPlanner::<f32>::new();
        Ok(Self {
            window: cfg.padded_window(),
            forward: planner.plan_fft_forward(cfg.n_fft),
            inverse: planner.plan_fft_inverse(cfg.n_fft),
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &StftConfig {
        &self.cfg
    }

    pub(crate) fn scratch(&self) -> FrameScratch {
        FrameScratch {
            frame: self.forward.make_input_vec(),
            spectrum: self.forward.make_output_vec(),
            fft: self.forward.make_scratch_vec(),
        }
    }

    /// Calls `f(t, spectrum)` with the `n_bins` complex values of each frame
    /// in order. The hot loop of every host-side spectral feature.
    pub(crate) fn for_each_frame(
        &self,
        signal: &[f32],
        scratch: &mut FrameScratch,
        mut f: impl FnMut(usize, &[Complex32]),
    ) -> Result<usize> {
        let n_frames = self.cfg.n_frames(signal.len())?;
        let n_fft = self.cfg.n_fft;
        let pad = self.cfg.padding.amount(n_fft) as isize;
        let mode = self.cfg.padding.mode();
        let len = signal.len();
        for t in 0..n_frames {
            let start = (t * self.cfg.hop_length) as isize - pad;
            self.frame_at(signal, 0, start, len, mode, scratch)?;
            f(t, &scratch.spectrum);
        }
        Ok(n_frames)
    }

    /// The spectrum of the frame starting at padded position `start`
    /// (signal index, may be negative) of a signal of `len` samples of which
    /// `part` holds samples `offset..offset + part.len()` (every sample the
    /// frame and its padding read must be there), into `scratch.spectrum`.
    pub(crate) fn frame_at(
        &self,
        part: &[f32],
        offset: usize,
        start: isize,
        len: usize,
        mode: PadMode,
        scratch: &mut FrameScratch,
    ) -> Result<()> {
        let n_fft = self.cfg.n_fft;
        let at = |j: usize| part[j - offset];
        if start >= offset as isize && start as usize + n_fft <= offset + part.len() {
            let s0 = start as usize - offset;
            let src = &part[s0..s0 + n_fft];
            for ((d, s), w) in scratch.frame.iter_mut().zip(src).zip(&self.window) {
                *d = s * w;
            }
        } else {
            for (k, (d, w)) in scratch.frame.iter_mut().zip(&self.window).enumerate() {
                *d = match source_index(start + k as isize, len, mode) {
                    Some(j) => at(j) * w,
                    None => 0.0,
                };
            }
        }
        self.forward
            .process_with_scratch(&mut scratch.frame, &mut scratch.spectrum, &mut scratch.fft)
            .map_err(|e| Error::invalid("stft", e.to_string()))
    }

    /// Complex STFT of `signal`: `[n_bins, frames]`.
    pub fn stft(&self, signal: &[f32]) -> Result<Array2<Complex32>> {
        let n_frames = self.cfg.n_frames(signal.len())?;
        let mut out = Array2::<Complex32>::zeros((self.cfg.n_bins(), n_frames));
        let mut scratch = self.scratch();
        self.for_each_frame(signal, &mut scratch, |t, spec| {
            for (b, &v) in spec.iter().enumerate() {
                out[[b, t]] = v;
            }
        })?;
        Ok(out)
    }

    /// Magnitude `|X|^power` of the STFT: `[n_bins, frames]`.
    pub fn spectrogram(&self, signal: &[f32], power: f32) -> Result<Array2<f32>> {
        let n_frames = self.cfg.n_frames(signal.len())?;
        let mut out = Array2::<f32>::zeros((self.cfg.n_bins(), n_frames));
        let mut scratch = self.scratch();
        self.for_each_frame(signal, &mut scratch, |t, spec| {
            for (b, v) in spec.iter().enumerate() {
                out[[b, t]] = apply_power(v.norm_sqr(), power);
            }
        })?;
        Ok(out)
    }

    /// Inverse STFT by weighted overlap-add, normalised by the summed squared
    /// window (librosa's `istft`), so `istft(stft(x), Some(x.len()))`
    /// reconstructs `x` wherever the window sum is non-zero.
    ///
    /// `spec` is `[n_bins, frames]`. The padding of the config is removed;
    /// `length` trims or zero-extends the output to exactly that many samples
    /// (without it: `hop * (frames - 1) + n_fft - 2 * padding`).
    pub fn istft(&self, spec: &Array2<Complex32>, length: Option<usize>) -> Result<Vec<f32>> {
        let (bins, n_frames) = spec.dim();
        if bins != self.cfg.n_bins() || n_frames == 0 {
            return Err(Error::shape(
                "istft input",
                format!("[{}, frames >= 1]", self.cfg.n_bins()),
                format!("[{bins}, {n_frames}]"),
            ));
        }
        let n_fft = self.cfg.n_fft;
        let hop = self.cfg.hop_length;
        let pad = self.cfg.padding.amount(n_fft);
        let full = n_fft + hop * (n_frames - 1);
        let mut y = vec![0.0f32; full];
        let mut wss = vec![0.0f32; full];
        let mut spectrum = self.inverse.make_input_vec();
        let mut frame = self.inverse.make_output_vec();
        let mut scratch = self.inverse.make_scratch_vec();
        let scale = 1.0 / n_fft as f32;
        for t in 0..n_frames {
            for (b, s) in spectrum.iter_mut().enumerate() {
                *s = spec[[b, t]];
            }
            // A real signal's DC and Nyquist bins are real; drop any imaginary
            // part as numpy's irfft does.
            spectrum[0].im = 0.0;
            if n_fft % 2 == 0 {
                spectrum[bins - 1].im = 0.0;
            }
            self.inverse
                .process_with_scratch(&mut spectrum, &mut frame, &mut scratch)
                .map_err(|e| Error::invalid("istft", e.to_string()))?;
            let off = t * hop;
            for k in 0..n_fft {
                let w = self.window[k];
                y[off + k] += frame[k] * scale * w;
                wss[off + k] += w * w;
            }
        }
        let tiny = f32::MIN_POSITIVE;
        for (v, w) in y.iter_mut().zip(&wss) {
            if *w > tiny {
                *v /= w;
            }
        }
        let natural = full.saturating_sub(2 * pad);
        let len = length.unwrap_or(natural);
        let mut out: Vec<f32> = y.into_iter().skip(pad).take(len).collect();
        out.resize(len, 0.0);
        Ok(out)
    }
}

/// `x^(power/2)` for a squared magnitude `x`, with the common powers exact.
#[inline]
pub(crate) fn apply_power(norm_sqr: f32, power: f32) -> f32 {
    if power == 2.0 {
        norm_sqr
    } else if power == 1.0 {
        norm_sqr.sqrt()
    } else {
        norm_sqr.powf(power / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let t = i as f32;
                (0.013 * t).sin() * 0.5
                    + (0.41 * t + 0.3).sin() * 0.25
                    + ((i * 7919 % 113) as f32 / 113.0 - 0.5) * 0.1
            })
            .collect()
    }

    #[test]
    fn reflect_index_matches_numpy() {
        // numpy.pad([0,1,2,3], 5, 'reflect') = [3 2 1 2 1 | 0 1 2 3 | 2 1 0 1 2]
        let got: Vec<usize> = (-5..9)
            .map(|i| source_index(i, 4, PadMode::Reflect).unwrap())
            .collect();
        assert_eq!(got, vec![1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2]);
        assert_eq!(source_index(-1, 4, PadMode::Constant), None);
        assert_eq!(source_index(-3, 1, PadMode::Reflect), Some(0));
    }

    #[test]
    fn roundtrip_reconstructs() {
        let x = signal(5000);
        let configs = [
            StftConfig::new(512),
            StftConfig {
                hop_length: 100,
                win_length: 400,
                ..StftConfig::new(512)
            },
            StftConfig {
                window: WindowKind::Hamming,
                periodic: false,
                hop_length: 64,
                win_length: 256,
                ..StftConfig::new(256)
            },
            StftConfig {
                padding: Padding::Center(PadMode::Constant),
                ..StftConfig::new(128)
            },
            StftConfig {
                n_fft: 255,
                win_length: 255,
                hop_length: 60,
                ..StftConfig::new(255)
            },
        ];
        for cfg in configs {
            let stft = Stft::new(cfg).unwrap();
            let spec = stft.stft(&x).unwrap();
            let y = stft.istft(&spec, Some(x.len())).unwrap();
            let err = x
                .iter()
                .zip(&y)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err < 1e-5, "{cfg:?}: max error {err}");
        }
    }

    #[test]
    fn uncentred_roundtrip_inside_covered_region() {
        let x = signal(4096);
        let cfg = StftConfig {
            padding: Padding::None,
            ..StftConfig::new(512)
        };
        let stft = Stft::new(cfg).unwrap();
        let y = stft.istft(&stft.stft(&x).unwrap(), Some(x.len())).unwrap();
        // The first and last hop are covered by a single tapering window.
        for i in 128..(4096 - 512) {
            assert!(
                (x[i] - y[i]).abs() < 1e-5,
                "sample {i}: {} vs {}",
                x[i],
                y[i]
            );
        }
    }

    #[test]
    fn frame_count_matches_librosa() {
        let cfg = StftConfig {
            hop_length: 256,
            ..StftConfig::new(1024)
        };
        assert_eq!(cfg.n_frames(24000).unwrap(), 1 + 24000 / 256);
        let cfg = StftConfig {
            padding: Padding::None,
            ..cfg
        };
        assert_eq!(cfg.n_frames(24000).unwrap(), 1 + (24000 - 1024) / 256);
    }

    #[test]
    fn bad_config_and_short_input_name_culprit() {
        let e = Stft::new(StftConfig {
            win_length: 600,
            ..StftConfig::new(512)
        })
        .unwrap_err();
        assert!(e.to_string().contains("win_length"), "{e}");
        let e = Stft::new(StftConfig {
            hop_length: 0,
            ..StftConfig::new(512)
        })
        .unwrap_err();
        assert!(e.to_string().contains("hop_length"), "{e}");
        let stft = Stft::new(StftConfig {
            padding: Padding::None,
            ..StftConfig::new(512)
        })
        .unwrap();
        let e = stft.stft(&[0.0; 100]).unwrap_err();
        assert!(
            e.to_string().contains("stft input") && e.to_string().contains("100 samples"),
            "{e}"
        );
        let e = stft.stft(&[]).unwrap_err();
        assert!(e.to_string().contains("0 samples"), "{e}");
    }

    #[test]
    fn pure_tone_peaks_at_its_bin() {
        let n_fft = 256;
        let x: Vec<f32> = (0..2048)
            .map(|i| (2.0 * std::f32::consts::PI * 16.0 * i as f32 / n_fft as f32).cos())
            .collect();
        let stft = Stft::new(StftConfig::new(n_fft)).unwrap();
        let mag = stft.spectrogram(&x, 1.0).unwrap();
        let col = mag.column(4);
        let peak = col
            .iter()
            .enumerate()
            .fold((0, 0.0), |m, (i, &v)| if v > m.1 { (i, v) } else { m });
        assert_eq!(peak.0, 16);
        // Periodic Hann sums to n_fft / 2, so a unit cosine peaks at n_fft / 4.
        assert!((peak.1 - n_fft as f32 / 4.0).abs() < 1e-2, "{}", peak.1);
    }
}
