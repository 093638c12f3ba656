//! Differentiable STFT and mel spectrogram on candle tensors.
//!
//! candle has no FFT op, so the transform is a gather (padding and framing in
//! one `index_select`) followed by the windowed real DFT of each frame: an
//! FFT custom op with its own backward on the CPU (f32, f64; `fft` in
//! `MELVAE_NO_FUSED_KERNELS` turns it off), a matmul against a windowed
//! DFT basis elsewhere. Every op has a backward pass, so spectral losses
//! train through it on any device and dtype. It agrees with the host
//! [`Stft`](crate::Stft) to float precision.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor, D};

use crate::dft_op::WindowedDft;
use crate::mel::MelConfig;
use crate::stft::{source_index, PadMode, StftConfig};
use crate::{Error, LogScale, Result};

/// The windowed real DFT of one [`StftConfig`] on one device, `A[t, k] =
/// w[t] cos(2 pi k t / n)`, `A[t, K + k] = -w[t] sin(2 pi k t / n)` for
/// `K` bins: `x A` and `g A^T` by FFT where [`WindowedDft`] takes the
/// tensor, by matmul against `A` (built on first use) elsewhere.
#[derive(Debug, Clone)]
struct Dft {
    fft: Arc<WindowedDft>,
    device: Device,
    /// `[n_fft, 2 * n_bins]`: windowed cosines, then windowed negative sines.
    basis: OnceLock<Tensor>,
    /// Whether the FFT op may be used (tests turn it off to compare).
    use_fft: bool,
}

impl Dft {
    fn new(cfg: StftConfig, device: &Device) -> Self {
        Self {
            fft: WindowedDft::new(cfg.padded_window()),
            device: device.clone(),
            basis: OnceLock::new(),
            use_fft: true,
        }
    }

    /// `A` as a `[n_fft, 2 * n_bins]` tensor of `dtype`.
    fn basis(&self, dtype: DType) -> Result<Tensor> {
        if let Some(b) = self.basis.get() {
            return Ok(b.to_dtype(dtype)?);
        }
        let (n, bins) = (self.fft.len(), self.fft.bins());
        let mut basis = vec![0.0f32; n * 2 * bins];
        for (t, &w) in self.fft.window().iter().enumerate() {
            for k in 0..bins {
                // Reduce k * t mod n in integers so the angle stays exact.
                let phase = 2.0 * std::f64::consts::PI * ((k * t) % n) as f64 / n as f64;
                basis[t * 2 * bins + k] = (w as f64 * phase.cos()) as f32;
                basis[t * 2 * bins + bins + k] = (-(w as f64) * phase.sin()) as f32;
            }
        }
        let b = Tensor::from_vec(basis, (n, 2 * bins), &self.device)?;
        Ok(self.basis.get_or_init(|| b).to_dtype(dtype)?)
    }

    fn fft_takes(&self, t: &Tensor) -> bool {
        self.use_fft && WindowedDft::takes(t)
    }

    /// `x A`: `[batch, rows, n_fft]` to `[batch, rows, 2 * n_bins]`.
    fn analysis(&self, x: &Tensor) -> Result<Tensor> {
        if self.fft_takes(x) {
            return Ok(self.fft.analysis(x)?);
        }
        Ok(x.broadcast_matmul(&self.basis(x.dtype())?)?)
    }

    /// `g A^T`: `[batch, rows, 2 * n_bins]` to `[batch, rows, n_fft]`.
    fn adjoint(&self, g: &Tensor) -> Result<Tensor> {
        if self.fft_takes(g) {
            return Ok(self.fft.adjoint(g)?);
        }
        Ok(g.broadcast_matmul(&self.basis(g.dtype())?.t()?)?)
    }
}

/// A differentiable STFT for a fixed [`StftConfig`] on one device.
#[derive(Debug, Clone)]
pub struct TensorStft {
    cfg: StftConfig,
    dft: Dft,
}

/// Smallest squared magnitude passed to `sqrt` for a dtype: below it the
/// magnitude is clamped, so the gradient stays finite at exact zeros.
fn power_floor(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 1e-7,
        _ => 1e-20,
    }
}

impl TensorStft {
    /// The STFT of `cfg` on `device` (checked here; FFT plans and any DFT
    /// basis are made on first use).
    pub fn new(cfg: StftConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            dft: Dft::new(cfg, device),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &StftConfig {
        &self.cfg
    }

    /// Frames `x` (`[batch, samples]`) into `[batch, frames, n_fft]`,
    /// applying the configured padding.
    fn frames(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, len) = x.dims2().map_err(|_| {
            Error::shape(
                "tensor stft input",
                "[batch, samples]",
                format!("{:?}", x.dims()),
            )
        })?;
        let n_frames = self.cfg.n_frames(len)?;
        let n_fft = self.cfg.n_fft;
        let pad = self.cfg.padding.amount(n_fft) as isize;
        let mode = self.cfg.padding.mode();
        // Constant padding reads a zero appended after the signal.
        // index_select needs a contiguous source; views (narrow, transpose) are copied.
        let source = if mode == PadMode::Constant && pad > 0 {
            x.pad_with_zeros(1, 0, 1)?
        } else {
            x.contiguous()?
        };
        let mut idx = Vec::with_capacity(n_frames * n_fft);
        for t in 0..n_frames {
            let start = (t * self.cfg.hop_length) as isize - pad;
            for k in 0..n_fft {
                idx.push(source_index(start + k as isize, len, mode).unwrap_or(len) as u32);
            }
        }
        let idx = Tensor::from_vec(idx, n_frames * n_fft, x.device())?;
        Ok(source
            .index_select(&idx, 1)?
            .reshape((batch, n_frames, n_fft))?)
    }

    /// Real and imaginary parts of the STFT of `x` (`[batch, samples]`), each
    /// `[batch, n_bins, frames]`.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let frames = self.frames(x)?;
        let spec = self.dft.analysis(&frames)?; // [B, F, 2K]
        let bins = self.cfg.n_bins();
        let re = spec
            .narrow(D::Minus1, 0, bins)?
            .transpose(1, 2)?
            .contiguous()?;
        let im = spec
            .narrow(D::Minus1, bins, bins)?
            .transpose(1, 2)?
            .contiguous()?;
        Ok((re, im))
    }

    /// Squared magnitude `re^2 + im^2`: `[batch, n_bins, frames]`.
    pub fn power(&self, x: &Tensor) -> Result<Tensor> {
        let (re, im) = self.forward(x)?;
        Ok((re.sqr()? + im.sqr()?)?)
    }

    /// Magnitude `sqrt(max(re^2 + im^2, floor))`: `[batch, n_bins, frames]`.
    ///
    /// The floor (1e-20, or 1e-7 in f16) keeps the gradient finite at exact
    /// zeros without changing any audible value.
    pub fn magnitude(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.power(x)?;
        Ok(p.maximum(power_floor(p.dtype()))?.sqrt()?)
    }
}

/// A differentiable (log-)mel spectrogram for a [`MelConfig`] on one device.
#[derive(Debug, Clone)]
pub struct TensorMel {
    cfg: MelConfig,
    stft: TensorStft,
    /// `[n_mels, n_bins]`.
    filterbank: Tensor,
}

impl TensorMel {
    /// The mel spectrogram of `cfg` on `device` (the filterbank is built
    /// here, the STFT's FFT plans or basis on first use).
    pub fn new(cfg: MelConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let fb = cfg.filterbank()?;
        let (m, b) = fb.dim();
        let fb: Vec<f32> = fb.iter().copied().collect();
        Ok(Self {
            stft: TensorStft::new(cfg.stft, device)?,
            filterbank: Tensor::from_vec(fb, (m, b), device)?,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MelConfig {
        &self.cfg
    }

    /// The STFT it is built on.
    pub fn stft(&self) -> &TensorStft {
        &self.stft
    }

    /// Mel spectrogram of `x` (`[batch, samples]`) before the log:
    /// `[batch, n_mels, frames]`.
    pub fn mel(&self, x: &Tensor) -> Result<Tensor> {
        let mut p = self.stft.power(x)?;
        if self.cfg.power_eps > 0.0 {
            p = (p + self.cfg.power_eps as f64)?;
        }
        let mag = if self.cfg.power == 2.0 {
            p
        } else {
            let p = p.maximum(power_floor(p.dtype()))?;
            if self.cfg.power == 1.0 {
                p.sqrt()?
            } else {
                p.powf(self.cfg.power as f64 / 2.0)?
            }
        };
        let fb = self.filterbank.to_dtype(x.dtype())?;
        Ok(fb.broadcast_matmul(&mag)?)
    }

    /// The configured (log-)mel of `x` (`[batch, samples]`):
    /// `[batch, n_mels, frames]`, equal to [`MelExtractor::extract`]
    /// (crate::MelExtractor::extract) per item.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mel = self.mel(x)?;
        Ok(match self.cfg.log {
            LogScale::None => mel,
            LogScale::Ln { clamp } => mel.maximum(clamp as f64)?.log()?,
            LogScale::Log10 { clamp } => {
                (mel.maximum(clamp as f64)?.log()? / std::f64::consts::LN_10)?
            }
        })
    }
}

/// A differentiable inverse STFT for a fixed [`StftConfig`] on one device:
/// the inverse real DFT of each frame (as `irfft`: the imaginary parts of
/// the DC and Nyquist bins are ignored), the synthesis window, overlap-add,
/// division by the summed squared window, and the configured padding
/// trimmed from both ends (`torch.istft` for `Padding::Center`; Vocos'
/// "same" ISTFT for `Padding::Both`).
#[derive(Debug, Clone)]
pub struct TensorIstft {
    cfg: StftConfig,
    /// The analysis DFT `A`: the windowed inverse DFT is `(spec * c) A^T`.
    dft: Dft,
    /// `c`, `[2 * n_bins]` (f32): the irfft weight of each real and
    /// imaginary part (`2 / n` for bins standing for two, `1 / n` for DC
    /// and Nyquist, 0 for their ignored imaginary parts).
    weights: Tensor,
}

impl TensorIstft {
    /// The inverse STFT of `cfg` on `device` (checked here; FFT plans and
    /// any DFT basis are made on first use).
    pub fn new(cfg: StftConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let n = cfg.n_fft;
        let bins = cfg.n_bins();
        let mut weights = vec![0.0f32; 2 * bins];
        for k in 0..bins {
            // irfft: bins other than DC and Nyquist stand for two.
            let edge = k == 0 || (n % 2 == 0 && k == n / 2);
            weights[k] = (if edge { 1.0 } else { 2.0 } / n as f64) as f32;
            if !edge {
                weights[bins + k] = weights[k];
            }
        }
        Ok(Self {
            cfg,
            dft: Dft::new(cfg, device),
            weights: Tensor::from_vec(weights, 2 * bins, device)?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &StftConfig {
        &self.cfg
    }

    /// Samples for `frames` frames: `(frames - 1) * hop + n_fft` less the
    /// padding on both sides.
    pub fn n_samples(&self, frames: usize) -> usize {
        self.cfg.n_samples(frames)
    }

    /// `(batch, frames)` of a valid `re`, `im` pair (each `[batch, n_bins,
    /// frames]`, `frames >= 1`).
    fn check(&self, re: &Tensor, im: &Tensor) -> Result<(usize, usize)> {
        let bins = self.cfg.n_bins();
        let (batch, b, frames) = re.dims3().map_err(|_| {
            Error::shape(
                "istft input",
                "[batch, n_bins, frames]",
                format!("{:?}", re.dims()),
            )
        })?;
        if b != bins || im.dims() != re.dims() || frames == 0 {
            return Err(Error::shape(
                "istft input",
                format!("re and im both [batch, {bins}, frames >= 1]"),
                format!("{:?} and {:?}", re.dims(), im.dims()),
            ));
        }
        Ok((batch, frames))
    }

    /// The overlap-added windowed inverse DFTs of `frames` frames: `[batch,
    /// (frames - 1) * hop + n_fft]`, not yet divided by the window envelope.
    fn overlap_add(&self, re: &Tensor, im: &Tensor, batch: usize, frames: usize) -> Result<Tensor> {
        let (n, hop) = (self.cfg.n_fft, self.cfg.hop_length);
        // [B, T, 2F] x [2F, N] -> windowed frames [B, T, N].
        let spec = Tensor::cat(&[re, im], 1)?.transpose(1, 2)?;
        let spec = spec.broadcast_mul(&self.weights.to_dtype(re.dtype())?)?;
        let frames_t = self.dft.adjoint(&spec)?;
        // Overlap-add as r = ceil(N / hop) shifted sums of hop-long segments.
        let r = n.div_ceil(hop);
        let padded = frames_t.pad_with_zeros(2, 0, r * hop - n)?;
        let segment = |j: usize| -> Result<Tensor> {
            Ok(padded
                .narrow(2, j * hop, hop)?
                .contiguous()?
                .reshape((batch, frames * hop))?
                .pad_with_zeros(1, j * hop, (r - 1 - j) * hop)?)
        };
        let mut out = segment(0)?;
        for j in 1..r {
            out = (out + segment(j)?)?;
        }
        Ok(out.narrow(1, 0, (frames - 1) * hop + n)?)
    }

    /// `[1, len]`: the reciprocal of the summed squared window of frames
    /// `0..frames` at the unpadded positions `from..from + len` (0 where
    /// the envelope vanishes).
    fn inverse_envelope(
        &self,
        frames: usize,
        from: usize,
        len: usize,
        like: &Tensor,
    ) -> Result<Tensor> {
        let (n, hop) = (self.cfg.n_fft, self.cfg.hop_length);
        let window = self.dft.fft.window();
        let first = from.saturating_sub(n - 1) / hop;
        let mut env = vec![0f32; len];
        for t in first..frames.min((from + len).div_ceil(hop)) {
            for (i, w) in window.iter().enumerate() {
                let p = t * hop + i;
                if p >= from && p < from + len {
                    env[p - from] += w * w;
                }
            }
        }
        let inv: Vec<f32> = env
            .iter()
            .map(|&e| if e > 1e-11 { 1.0 / e } else { 0.0 })
            .collect();
        Ok(Tensor::from_vec(inv, (1, len), like.device())?.to_dtype(like.dtype())?)
    }

    /// The signal `[batch, samples]` whose STFT has real and imaginary
    /// parts `re`, `im` (each `[batch, n_bins, frames]`); samples as
    /// [`TensorIstft::n_samples`].
    pub fn forward(&self, re: &Tensor, im: &Tensor) -> Result<Tensor> {
        let (batch, frames) = self.check(re, im)?;
        let out = self.overlap_add(re, im, batch, frames)?;
        let pad = self.cfg.padding.amount(self.cfg.n_fft);
        let len = self.n_samples(frames);
        let inv = self.inverse_envelope(frames, pad, len, re)?;
        Ok(out.narrow(1, pad, len)?.broadcast_mul(&inv)?)
    }

    /// A stream of this inverse STFT: frames in, final samples out (see
    /// [`IstftStream`]). Fails when the padding is wider than `n_fft -
    /// hop_length` (the end trim would reach samples already given out).
    pub fn stream(&self) -> Result<IstftStream> {
        let (n, hop) = (self.cfg.n_fft, self.cfg.hop_length);
        let pad = self.cfg.padding.amount(n);
        if hop > n || pad > n - hop {
            return Err(Error::Invalid {
                what: "istft stream".into(),
                reason: format!("needs padding ({pad}) + hop_length ({hop}) <= n_fft ({n})"),
            });
        }
        Ok(IstftStream {
            istft: self.clone(),
            frames: 0,
            tail: None,
        })
    }
}

/// Streaming [`TensorIstft`]: [`IstftStream::push`] frames (`re`, `im`,
/// each `[batch, n_bins, frames]`) as they come and get `[batch, samples]`
/// of the samples no later frame can change; [`IstftStream::finish`] gives
/// the rest. All the pieces joined equal [`TensorIstft::forward`] of all
/// the frames (up to float rounding). Output sample `i` is final once
/// frame `(i + padding) / hop_length` is in (no later frame's window starts
/// at or before it): with centre padding (`n_fft / 2`) that is
/// `n_fft / (2 hop_length)` frames after the frame centred on it.
#[derive(Debug, Clone)]
pub struct IstftStream {
    istft: TensorIstft,
    /// Frames pushed since the start.
    frames: usize,
    /// `[batch, n_fft - hop]`: the overlap-added samples from `frames *
    /// hop` on, not final yet (no envelope applied).
    tail: Option<Tensor>,
}

impl IstftStream {
    /// Feeds frames; returns the samples that became final, if any.
    pub fn push(&mut self, re: &Tensor, im: &Tensor) -> Result<Option<Tensor>> {
        let (batch, frames) = self.istft.check(re, im)?;
        let (n, hop) = (self.istft.cfg.n_fft, self.istft.cfg.hop_length);
        if let Some(tail) = &self.tail {
            if tail.dim(0)? != batch {
                return Err(Error::shape(
                    "istft stream input",
                    format!("[{}, n_bins, frames] (the batch so far)", tail.dim(0)?),
                    format!("{:?}", re.dims()),
                ));
            }
        }
        let mut out = self.istft.overlap_add(re, im, batch, frames)?;
        if let Some(tail) = self.tail.take() {
            let rest = out.dim(1)? - (n - hop);
            out = Tensor::cat(
                &[
                    (out.narrow(1, 0, n - hop)? + tail)?,
                    out.narrow(1, n - hop, rest)?,
                ],
                1,
            )?;
        }
        let start = self.frames * hop;
        self.frames += frames;
        // Carried state holds no autograd graph (a stream runs for hours).
        self.tail = Some(out.narrow(1, frames * hop, n - hop)?.detach());
        self.emit(&out.narrow(1, 0, frames * hop)?, start, frames * hop)
    }

    /// The samples still held (the last frames' overlap, less the end
    /// padding); the stream then starts afresh. `None` before any frame.
    pub fn finish(&mut self) -> Result<Option<Tensor>> {
        let Some(tail) = self.tail.take() else {
            self.reset();
            return Ok(None);
        };
        let n = self.istft.cfg.n_fft;
        let hop = self.istft.cfg.hop_length;
        let pad = self.istft.cfg.padding.amount(n);
        let start = self.frames * hop;
        let out = self.emit(&tail.narrow(1, 0, n - hop - pad)?, start, n - hop - pad);
        self.reset();
        out
    }

    /// Forgets every frame.
    pub fn reset(&mut self) {
        self.frames = 0;
        self.tail = None;
    }

    /// Numbers held between pushes (`batch * (n_fft - hop)`).
    pub fn state_elements(&self) -> usize {
        self.tail.as_ref().map_or(0, |t| t.elem_count())
    }

    /// `samples` (`len` long, padded positions from `start`) divided by the
    /// envelope, less what falls in the start padding.
    fn emit(&self, samples: &Tensor, start: usize, len: usize) -> Result<Option<Tensor>> {
        let pad = self.istft.cfg.padding.amount(self.istft.cfg.n_fft);
        let skip = pad.saturating_sub(start).min(len);
        if skip == len {
            return Ok(None);
        }
        let inv = self
            .istft
            .inverse_envelope(self.frames, start + skip, len - skip, samples)?;
        Ok(Some(
            samples.narrow(1, skip, len - skip)?.broadcast_mul(&inv)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stft::Padding;
    use crate::{MelExtractor, Stft};
    use candle_core::Var;

    /// The streamed inverse STFT joins to the offline one for any push
    /// sizes and both paddings; a padding too wide to stream is refused.
    #[test]
    fn istft_stream_equals_offline() {
        let dev = Device::Cpu;
        for padding in [
            Padding::Center(PadMode::Reflect),
            Padding::Both(6, PadMode::Reflect),
        ] {
            let cfg = StftConfig {
                n_fft: 16,
                hop_length: 4,
                win_length: 16,
                padding,
                ..StftConfig::new(16)
            };
            let istft = TensorIstft::new(cfg, &dev).unwrap();
            let frames = 23;
            let re = Tensor::from_vec(signal(9 * frames * 2, 5), (2, 9, frames), &dev).unwrap();
            let im = Tensor::from_vec(signal(9 * frames * 2, 6), (2, 9, frames), &dev).unwrap();
            let offline = istft.forward(&re, &im).unwrap();
            let mut stream = istft.stream().unwrap();
            for sizes in [vec![1], vec![2, 5], vec![23]] {
                let (mut parts, mut at, mut i) = (Vec::new(), 0, 0);
                while at < frames {
                    let n = sizes[i % sizes.len()].min(frames - at);
                    let (r, m) = (re.narrow(2, at, n).unwrap(), im.narrow(2, at, n).unwrap());
                    parts.extend(stream.push(&r, &m).unwrap());
                    assert!(stream.state_elements() <= 2 * 12);
                    at += n;
                    i += 1;
                }
                parts.extend(stream.finish().unwrap());
                let y = Tensor::cat(&parts, 1).unwrap();
                assert_eq!(y.dims(), offline.dims(), "{padding:?} {sizes:?}");
                let d = (y - &offline).unwrap().abs().unwrap().max_all().unwrap();
                let d = d.to_scalar::<f32>().unwrap();
                assert!(d < 1e-5, "{padding:?} {sizes:?}: {d}");
            }
        }
        let cfg = StftConfig {
            n_fft: 16,
            hop_length: 12,
            win_length: 16,
            ..StftConfig::new(16)
        };
        let e = TensorIstft::new(cfg, &dev)
            .unwrap()
            .stream()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("istft stream") && e.contains("hop_length (12)"),
            "{e}"
        );
    }

    #[test]
    fn istft_inverts_the_stft_and_matches_the_host_istft() {
        let dev = Device::Cpu;
        let x: Vec<f32> = signal(3000, 3);
        for padding in [
            Padding::Center(PadMode::Reflect),
            Padding::Both(192, PadMode::Reflect),
        ] {
            let cfg = StftConfig {
                n_fft: 512,
                hop_length: 128,
                win_length: 512,
                padding,
                ..StftConfig::new(512)
            };
            let stft = TensorStft::new(cfg, &dev).unwrap();
            let istft = TensorIstft::new(cfg, &dev).unwrap();
            let xt = Tensor::from_vec(x.clone(), (1, 3000), &dev).unwrap();
            let (re, im) = stft.forward(&xt).unwrap();
            let y = istft.forward(&re, &im).unwrap();
            let frames = re.dim(2).unwrap();
            assert_eq!(y.dim(1).unwrap(), istft.n_samples(frames));
            let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // Away from the ends (where reflection padding was cut) the
            // signal comes back.
            let err = x[256..y.len() - 256]
                .iter()
                .zip(&y[256..y.len() - 256])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-4, "{padding:?}: {err}");
        }
        // Against the host ISTFT (centred), on a spectrum that is not the
        // STFT of any signal.
        let cfg = StftConfig::new(256);
        let (bins, frames) = (129, 9);
        let re: Vec<f32> = signal(bins * frames, 5);
        let im: Vec<f32> = signal(bins * frames, 6);
        let spec = ndarray::Array2::from_shape_fn((bins, frames), |(k, t)| {
            realfft::num_complex::Complex32::new(re[k * frames + t], im[k * frames + t])
        });
        let host = Stft::new(cfg).unwrap().istft(&spec, None).unwrap();
        let istft = TensorIstft::new(cfg, &dev).unwrap();
        let t = |v: Vec<f32>| Tensor::from_vec(v, (1, bins, frames), &dev).unwrap();
        let y = istft
            .forward(&t(re), &t(im))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(y.len(), host.len());
        let err = y
            .iter()
            .zip(&host)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-5, "{err}");
        let e = istft
            .forward(
                &t(vec![0.0; bins * frames]),
                &Tensor::zeros((1, 3, 9), DType::F32, &dev).unwrap(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("istft input"), "{e}");
    }

    fn signal(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let t = i as f32;
                (0.031 * t * (1.0 + seed as f32 * 0.1)).sin() * 0.6
                    + (((i * 2654435761 + seed * 97) % 1000) as f32 / 1000.0 - 0.5) * 0.3
            })
            .collect()
    }

    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        let num: f32 = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt();
        let den: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt();
        num / den
    }

    #[test]
    fn agrees_with_host_stft() {
        let configs = [
            StftConfig::new(512),
            StftConfig {
                hop_length: 100,
                win_length: 300,
                padding: Padding::Center(PadMode::Constant),
                ..StftConfig::new(512)
            },
            StftConfig {
                padding: Padding::None,
                hop_length: 64,
                ..StftConfig::new(256)
            },
            StftConfig {
                padding: Padding::Both(96, PadMode::Reflect),
                hop_length: 64,
                ..StftConfig::new(256)
            },
        ];
        let dev = Device::Cpu;
        for cfg in configs {
            let host = Stft::new(cfg).unwrap();
            let ts = TensorStft::new(cfg, &dev).unwrap();
            let xs: Vec<Vec<f32>> = (0..2).map(|s| signal(3000, s)).collect();
            let x = Tensor::from_vec(xs.concat(), (2, 3000), &dev).unwrap();
            let (re, im) = ts.forward(&x).unwrap();
            let mag = ts.magnitude(&x).unwrap();
            for (b, xb) in xs.iter().enumerate() {
                let h = host.stft(xb).unwrap();
                let hr: Vec<f32> = h.iter().map(|c| c.re).collect();
                let hi: Vec<f32> = h.iter().map(|c| c.im).collect();
                let hm: Vec<f32> = h.iter().map(|c| c.norm()).collect();
                let tr: Vec<f32> = re.get(b).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let ti: Vec<f32> = im.get(b).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let tm: Vec<f32> = mag
                    .get(b)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (name, t, h) in [("re", &tr, &hr), ("im", &ti, &hi), ("mag", &tm, &hm)] {
                    let e = rel_err(t, h);
                    assert!(e < 1e-4, "{cfg:?} {name}: relative error {e}");
                }
            }
        }
    }

    #[test]
    fn mel_agrees_with_host_extractor() {
        let dev = Device::Cpu;
        for cfg in [MelConfig::vocos_24k(), MelConfig::hifigan_22k()] {
            let ex = MelExtractor::new(cfg).unwrap();
            let tm = TensorMel::new(cfg, &dev).unwrap();
            let mut x = signal(6000, 3);
            x[..1500].iter_mut().for_each(|v| *v = 0.0); // silence hits the clamp
            let host = ex.extract(&x).unwrap();
            let t = tm
                .forward(&Tensor::from_vec(x, (1, 6000), &dev).unwrap())
                .unwrap();
            let t: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let max_abs = t
                .iter()
                .zip(host.iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(max_abs < 1e-3, "max abs log-mel difference {max_abs}");
            assert!(rel_err(&t, host.as_slice().unwrap()) < 1e-4);
        }
    }

    /// Richardson-extrapolated central differences in f64 against candle's
    /// backward pass. The input is uniform noise from the first seed whose
    /// STFT magnitudes all exceed 0.02, so no bin sits near the
    /// non-differentiable |X| = 0 where finite differences are meaningless.
    fn check_grad(cfg: StftConfig, f: impl Fn(&Tensor) -> Tensor) {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let dev = Device::Cpu;
        let n = 48;
        let ts = TensorStft::new(cfg, &dev).unwrap();
        let x0 = (0..1000u64)
            .map(|seed| {
                let mut rng = StdRng::seed_from_u64(seed);
                (0..2 * n)
                    .map(|_| rng.random::<f64>() * 2.0 - 1.0)
                    .collect::<Vec<f64>>()
            })
            .find(|x| {
                let t = Tensor::from_vec(x.clone(), (2, n), &dev).unwrap();
                let m = ts.magnitude(&t).unwrap().flatten_all().unwrap();
                m.min(0).unwrap().to_scalar::<f64>().unwrap() > 0.02
            })
            .expect("no seed below 1000 gives an input away from |X| = 0");
        let x = Var::from_vec(x0.clone(), (2, n), &dev).unwrap();
        let loss = f(x.as_tensor());
        let grads = loss.backward().unwrap();
        let g: Vec<f64> = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let h = 1e-4;
        for i in 0..x0.len() {
            let eval = |d: f64| {
                let mut xp = x0.clone();
                xp[i] += d;
                let t = Tensor::from_vec(xp, (2, n), &dev).unwrap();
                f(&t).to_scalar::<f64>().unwrap()
            };
            // Richardson-extrapolated central differences: O(h^4) truncation,
            // needed where |X| is small and the magnitude curves sharply.
            let central = |h: f64| (eval(h) - eval(-h)) / (2.0 * h);
            let fd = (4.0 * central(h / 2.0) - central(h)) / 3.0;
            assert!(
                (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "{cfg:?} x[{i}]: autograd {} vs fd {fd}",
                g[i]
            );
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let cfgs = [
            StftConfig {
                hop_length: 4,
                ..StftConfig::new(16)
            },
            StftConfig {
                hop_length: 5,
                win_length: 12,
                padding: Padding::Center(PadMode::Constant),
                ..StftConfig::new(16)
            },
        ];
        for cfg in cfgs {
            let ts = TensorStft::new(cfg, &Device::Cpu).unwrap();
            let frames = cfg.n_frames(48).unwrap();
            let w: Vec<f64> = (0..2 * cfg.n_bins() * frames)
                .map(|i| ((i * 37 % 11) as f64 - 5.0) / 5.0)
                .collect();
            let w = Tensor::from_vec(w, (2, cfg.n_bins(), frames), &Device::Cpu).unwrap();
            check_grad(cfg, |x| {
                ts.magnitude(x).unwrap().mul(&w).unwrap().sum_all().unwrap()
            });
            check_grad(cfg, |x| {
                let (re, im) = ts.forward(x).unwrap();
                (re.mul(&w).unwrap() - im.sqr().unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
            });
        }
    }

    #[test]
    fn log_mel_gradient_matches_finite_differences() {
        let cfg = MelConfig {
            sample_rate: 8000,
            stft: StftConfig {
                hop_length: 8,
                ..StftConfig::new(32)
            },
            n_mels: 6,
            ..MelConfig::vocos_24k()
        };
        let tm = TensorMel::new(cfg, &Device::Cpu).unwrap();
        check_grad(cfg.stft, |x| tm.forward(x).unwrap().sum_all().unwrap());
    }

    #[test]
    fn silence_has_finite_gradient() {
        let ts = TensorStft::new(StftConfig::new(32), &Device::Cpu).unwrap();
        let x = Var::zeros((1, 64), DType::F32, &Device::Cpu).unwrap();
        let g = ts
            .magnitude(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<f32> = g.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(g.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn accepts_non_contiguous_input() {
        let dev = Device::Cpu;
        let ts = TensorStft::new(StftConfig::new(64), &dev).unwrap();
        let x = Tensor::from_vec(signal(2 * 300, 1), (300, 2), &dev).unwrap();
        let view = x.t().unwrap(); // [2, 300], not contiguous
        let a = ts.magnitude(&view).unwrap();
        let b = ts.magnitude(&view.contiguous().unwrap()).unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
    }

    /// The FFT op and the matmul against the DFT basis give the same STFT,
    /// inverse STFT and gradients of both, for even and odd lengths and a
    /// window shorter than the FFT, in f32 and f64.
    #[test]
    fn fft_path_equals_matmul_path() {
        let dev = Device::Cpu;
        let cfgs = [
            StftConfig {
                hop_length: 128,
                ..StftConfig::new(512)
            },
            StftConfig {
                hop_length: 4,
                win_length: 11,
                padding: Padding::Center(PadMode::Constant),
                ..StftConfig::new(15)
            },
        ];
        for cfg in cfgs {
            for dtype in [DType::F32, DType::F64] {
                // The basis is f32 (cast on use), so f64 agrees to f32's rounding.
                let tol = if dtype == DType::F32 { 2e-5 } else { 1e-7 };
                let fft = TensorStft::new(cfg, &dev).unwrap();
                let mut mm = fft.clone();
                mm.dft.use_fft = false;
                let ifft = TensorIstft::new(cfg, &dev).unwrap();
                let mut imm = ifft.clone();
                imm.dft.use_fft = false;
                let x = Tensor::from_vec(signal(2 * 700, 4), (2, 700), &dev).unwrap();
                let x = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
                assert!(
                    fft.dft.fft_takes(&x) && !mm.dft.fft_takes(&x),
                    "the FFT op is off: run without `fft` or `all` in MELVAE_NO_FUSED_KERNELS"
                );
                let frames = cfg.n_frames(700).unwrap();
                let w = Tensor::from_vec(
                    signal(2 * cfg.n_bins() * frames, 7),
                    (2, cfg.n_bins(), frames),
                    &dev,
                )
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
                // STFT, then the inverse STFT of (re * w, im), summed against a ramp.
                let run = |s: &TensorStft, i: &TensorIstft| {
                    let (re, im) = s.forward(x.as_tensor()).unwrap();
                    let y = i.forward(&re.mul(&w).unwrap(), &im).unwrap();
                    let ramp = Tensor::arange(0u32, y.dim(1).unwrap() as u32, &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    let loss = y.broadcast_mul(&ramp).unwrap().sum_all().unwrap();
                    let g = loss.backward().unwrap().remove(&x).unwrap();
                    let flat = |t: &Tensor| -> Vec<f64> {
                        t.flatten_all()
                            .unwrap()
                            .to_dtype(DType::F64)
                            .unwrap()
                            .to_vec1()
                            .unwrap()
                    };
                    (flat(&re), flat(&im), flat(&y), flat(&g))
                };
                let a = run(&fft, &ifft);
                let b = run(&mm, &imm);
                for (name, p, q) in [
                    ("re", &a.0, &b.0),
                    ("im", &a.1, &b.1),
                    ("istft", &a.2, &b.2),
                    ("grad", &a.3, &b.3),
                ] {
                    let scale = q.iter().fold(0f64, |m, v| m.max(v.abs()));
                    let d = p.iter().zip(q).fold(0f64, |m, (u, v)| m.max((u - v).abs()));
                    assert!(
                        d <= tol * scale,
                        "{cfg:?} {dtype:?} {name}: max diff {d} (scale {scale})"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_named() {
        let ts = TensorStft::new(
            StftConfig {
                padding: Padding::None,
                ..StftConfig::new(64)
            },
            &Device::Cpu,
        )
        .unwrap();
        let e = ts
            .forward(&Tensor::zeros((2, 1, 100), DType::F32, &Device::Cpu).unwrap())
            .unwrap_err();
        assert!(
            e.to_string().contains("[batch, samples]") && e.to_string().contains("[2, 1, 100]"),
            "{e}"
        );
        let e = ts
            .forward(&Tensor::zeros((2, 10), DType::F32, &Device::Cpu).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("10 samples"), "{e}");
    }
}
