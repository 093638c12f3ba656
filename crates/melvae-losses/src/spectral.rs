//! Waveform-domain losses: multi-resolution STFT (auraloss), multi-scale mel
//! (DAC), L1, and the stereo (mid/side + left/right) loss of the Audio VAE.

use candle_core::{Device, Tensor};
use melvae_dsp::{
    to_mid_side_tensor, LogScale, MelConfig, MelNorm, MelScale, PadMode, Padding, StftConfig,
    TensorMel, TensorStft, WindowKind,
};
use melvae_layers::upcast;

use crate::error::same_shape;
use crate::{Error, Result};

/// A loss between a predicted and a target waveform.
pub trait WaveformLoss {
    /// `pred`, `target`: `[batch, samples]` or `[batch, channels, samples]`
    /// (channels are folded into the batch). Returns a scalar.
    fn loss(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor>;
}

/// `[batch, samples]` or `[batch, channels, samples]` to `[batch * channels, samples]`.
/// `[batch, samples]` (channels folded into the batch), in f32 for half
/// inputs (see [`melvae_layers::precision`]).
fn as_batch(x: &Tensor, what: &str) -> Result<Tensor> {
    let x = upcast(x)?;
    match x.dims() {
        [_, _] => Ok(x),
        [b, c, t] => Ok(x.reshape((b * c, *t))?),
        d => Err(Error::shape(
            what,
            "[batch, samples] or [batch, channels, samples]",
            d,
        )),
    }
}

/// `sqrt(max(x, floor))`: a norm whose gradient stays finite (zero) where
/// the vector is exactly zero, e.g. when the prediction equals the target.
fn safe_sqrt(x: &Tensor) -> Result<Tensor> {
    Ok(x.maximum(1e-20)?.sqrt()?)
}

/// The terms of a multi-resolution STFT loss, each averaged over the
/// resolutions (scalars).
#[derive(Debug, Clone)]
pub struct StftLossTerms {
    /// `w_sc * sc + w_log_mag * log_mag + w_lin_mag * lin_mag`.
    pub total: Tensor,
    /// Spectral convergence `||Y - X||_F / ||Y||_F` over the whole batch.
    pub spectral_convergence: Tensor,
    /// `mean |ln X - ln Y|`.
    pub log_magnitude: Tensor,
    /// `mean |X - Y|`.
    pub linear_magnitude: Tensor,
}

/// Multi-resolution STFT loss, exactly as auraloss'
/// `MultiResolutionSTFTLoss` (Yamamoto et al. 2019):
///
/// for each resolution `(n_fft, hop, win)` (periodic Hann of `win`, centred
/// in `n_fft`, reflect padding, as `torch.stft`), magnitudes
/// `X = sqrt(max(|STFT(pred)|^2, eps))`, `Y` likewise for the target
/// (`eps = 1e-8`), and
/// `L_r = w_sc * ||Y - X||_F / ||Y||_F + w_log_mag * mean|ln X - ln Y| + w_lin_mag * mean|X - Y|`,
/// with the Frobenius norms over the whole batch; the loss is the mean of
/// `L_r` over resolutions. Finite on silence: `eps` bounds `||Y||` and the
/// logs away from zero.
#[derive(Debug, Clone)]
pub struct MultiResolutionStftLoss {
    stfts: Vec<TensorStft>,
    /// Weight of spectral convergence.
    pub w_sc: f64,
    /// Weight of the log-magnitude L1.
    pub w_log_mag: f64,
    /// Weight of the linear-magnitude L1.
    pub w_lin_mag: f64,
    /// Clamp of the squared magnitude.
    pub eps: f64,
}

impl MultiResolutionStftLoss {
    /// auraloss' defaults: FFT sizes (1024, 2048, 512), hops (120, 240, 50),
    /// windows (600, 1200, 240), `w_sc = w_log_mag = 1`, `w_lin_mag = 0`.
    pub fn auraloss_default(device: &Device) -> Result<Self> {
        Self::new(
            &[(1024, 120, 600), (2048, 240, 1200), (512, 50, 240)],
            1.0,
            1.0,
            0.0,
            device,
        )
    }

    /// Resolutions as `(n_fft, hop, win_length)` and the term weights.
    pub fn new(
        resolutions: &[(usize, usize, usize)],
        w_sc: f64,
        w_log_mag: f64,
        w_lin_mag: f64,
        device: &Device,
    ) -> Result<Self> {
        if resolutions.is_empty() {
            return Err(Error::invalid("mrstft.resolutions", "need at least one"));
        }
        let stfts = resolutions
            .iter()
            .map(|&(n_fft, hop, win)| {
                let cfg = StftConfig {
                    n_fft,
                    hop_length: hop,
                    win_length: win,
                    window: WindowKind::Hann,
                    periodic: true,
                    padding: Padding::Center(PadMode::Reflect),
                };
                TensorStft::new(cfg, device)
            })
            .collect::<melvae_dsp::Result<_>>()?;
        Ok(Self {
            stfts,
            w_sc,
            w_log_mag,
            w_lin_mag,
            eps: 1e-8,
        })
    }

    /// The loss and its terms.
    pub fn terms(&self, pred: &Tensor, target: &Tensor) -> Result<StftLossTerms> {
        same_shape("mrstft", pred, target)?;
        let (x, y) = (
            as_batch(pred, "mrstft prediction")?,
            as_batch(target, "mrstft target")?,
        );
        let (mut sc, mut lg, mut ln) = (Vec::new(), Vec::new(), Vec::new());
        for stft in &self.stfts {
            let xm = stft.power(&x)?.maximum(self.eps)?.sqrt()?;
            let ym = stft.power(&y)?.maximum(self.eps)?.sqrt()?;
            let diff = (&ym - &xm)?;
            sc.push((safe_sqrt(&diff.sqr()?.sum_all()?)? / ym.sqr()?.sum_all()?.sqrt()?)?);
            lg.push((xm.log()? - ym.log()?)?.abs()?.mean_all()?);
            ln.push(diff.abs()?.mean_all()?);
        }
        let n = self.stfts.len() as f64;
        let mean =
            |v: Vec<Tensor>| -> Result<Tensor> { Ok((Tensor::stack(&v, 0)?.sum_all()? / n)?) };
        let (sc, lg, ln) = (mean(sc)?, mean(lg)?, mean(ln)?);
        let total = (((&sc * self.w_sc)? + (&lg * self.w_log_mag)?)? + (&ln * self.w_lin_mag)?)?;
        Ok(StftLossTerms {
            total,
            spectral_convergence: sc,
            log_magnitude: lg,
            linear_magnitude: ln,
        })
    }
}

impl WaveformLoss for MultiResolutionStftLoss {
    fn loss(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        Ok(self.terms(pred, target)?.total)
    }
}

/// Multi-scale mel loss, as DAC's `MelSpectrogramLoss`:
///
/// for each scale (window `w`, `n_mels`): STFT with `n_fft = w`,
/// `hop = w / 4`, periodic Hann, centred reflect padding; magnitude;
/// librosa's Slaney-scale, Slaney-normalised mel filters (`fmin` 0, `fmax`
/// Nyquist); then
/// `L_s = log_weight * mean|log10(max(X, clamp_eps)^pow) - log10(max(Y, clamp_eps)^pow)| + mag_weight * mean|X - Y|`;
/// the loss is the **sum** over scales (as DAC). Finite on silence through
/// the clamp.
#[derive(Debug, Clone)]
pub struct MultiScaleMelLoss {
    mels: Vec<TensorMel>,
    /// Floor of the mel magnitude before the log.
    pub clamp_eps: f64,
    /// Power of the magnitude inside the log.
    pub pow: f64,
    /// Weight of the log term.
    pub log_weight: f64,
    /// Weight of the linear term.
    pub mag_weight: f64,
}

impl MultiScaleMelLoss {
    /// DAC's training configuration: windows 32 ... 2048 with 5, 10, 20, 40,
    /// 80, 160, 320 mels, `clamp_eps` 1e-5, `pow` 1, `log_weight` 1,
    /// `mag_weight` 0.
    pub fn dac(sample_rate: u32, device: &Device) -> Result<Self> {
        let scales = [
            (5, 32),
            (10, 64),
            (20, 128),
            (40, 256),
            (80, 512),
            (160, 1024),
            (320, 2048),
        ];
        Self::new(sample_rate, &scales, 1e-5, 1.0, 1.0, 0.0, device)
    }

    /// Scales as `(n_mels, window_length)`.
    pub fn new(
        sample_rate: u32,
        scales: &[(usize, usize)],
        clamp_eps: f64,
        pow: f64,
        log_weight: f64,
        mag_weight: f64,
        device: &Device,
    ) -> Result<Self> {
        if scales.is_empty() {
            return Err(Error::invalid("mel_loss.scales", "need at least one"));
        }
        if clamp_eps.is_nan() || clamp_eps <= 0.0 {
            return Err(Error::invalid(
                "mel_loss.clamp_eps",
                format!("must be > 0, got {clamp_eps}"),
            ));
        }
        let mels = scales
            .iter()
            .map(|&(n_mels, w)| {
                let cfg = MelConfig {
                    sample_rate,
                    stft: StftConfig {
                        n_fft: w,
                        hop_length: (w / 4).max(1),
                        win_length: w,
                        window: WindowKind::Hann,
                        periodic: true,
                        padding: Padding::Center(PadMode::Reflect),
                    },
                    n_mels,
                    fmin: 0.0,
                    fmax: None,
                    scale: MelScale::Slaney,
                    norm: MelNorm::Slaney,
                    power: 1.0,
                    power_eps: 0.0,
                    log: LogScale::None,
                };
                TensorMel::new(cfg, device)
            })
            .collect::<melvae_dsp::Result<_>>()?;
        Ok(Self {
            mels,
            clamp_eps,
            pow,
            log_weight,
            mag_weight,
        })
    }
}

impl WaveformLoss for MultiScaleMelLoss {
    fn loss(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        same_shape("mel loss", pred, target)?;
        let (x, y) = (
            as_batch(pred, "mel loss prediction")?,
            as_batch(target, "mel loss target")?,
        );
        let mut total: Option<Tensor> = None;
        for mel in &self.mels {
            let (xm, ym) = (mel.forward(&x)?, mel.forward(&y)?);
            let lx = (xm.maximum(self.clamp_eps)?.log()? * (self.pow / std::f64::consts::LN_10))?;
            let ly = (ym.maximum(self.clamp_eps)?.log()? * (self.pow / std::f64::consts::LN_10))?;
            let mut l = ((lx - ly)?.abs()?.mean_all()? * self.log_weight)?;
            if self.mag_weight != 0.0 {
                l = (l + ((&xm - &ym)?.abs()?.mean_all()? * self.mag_weight)?)?;
            }
            total = Some(match total {
                Some(t) => (t + l)?,
                None => l,
            });
        }
        total.ok_or_else(|| Error::invalid("mel_loss.scales", "need at least one"))
    }
}

/// `mean |pred - target|` over all elements (any matching shapes).
pub fn l1_loss(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    same_shape("l1 loss", pred, target)?;
    Ok(upcast(&(pred - target)?.abs()?)?.mean_all()?)
}

/// Waveform L1 as a [`WaveformLoss`].
#[derive(Debug, Clone, Copy, Default)]
pub struct L1Loss;

impl WaveformLoss for L1Loss {
    fn loss(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        l1_loss(pred, target)
    }
}

/// The stereo loss of the Audio VAE: an inner waveform loss applied to
/// mid/side and to left/right, each with its own weight:
/// `w_mid L(M', M) + w_side L(S', S) + w_left L(L', L) + w_right L(R', R)`,
/// with `M = (L + R) / 2`, `S = (L - R) / 2` (`melvae_dsp::to_mid_side`).
/// Input `[batch, 2, samples]`. (auraloss' sum/difference loss uses
/// `L + R` and `L - R`; spectral convergence and log magnitude are
/// invariant to that factor of 2 up to the magnitude clamp.)
#[derive(Debug, Clone)]
pub struct StereoLoss<L> {
    /// The per-signal loss.
    pub inner: L,
    /// Weight of the mid signal.
    pub w_mid: f64,
    /// Weight of the side signal.
    pub w_side: f64,
    /// Weight of the left channel.
    pub w_left: f64,
    /// Weight of the right channel.
    pub w_right: f64,
}

impl<L: WaveformLoss> WaveformLoss for StereoLoss<L> {
    fn loss(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        same_shape("stereo loss", pred, target)?;
        if !matches!(pred.dims(), [_, 2, _]) {
            return Err(Error::shape(
                "stereo loss input",
                "[batch, 2, samples]",
                pred.dims(),
            ));
        }
        let (pms, tms) = (to_mid_side_tensor(pred)?, to_mid_side_tensor(target)?);
        let terms = [
            (&pms, &tms, 0, self.w_mid),
            (&pms, &tms, 1, self.w_side),
            (pred, target, 0, self.w_left),
            (pred, target, 1, self.w_right),
        ];
        let mut total = Tensor::zeros((), pred.dtype(), pred.device())?;
        for (p, t, ch, w) in terms {
            if w != 0.0 {
                let l = self.inner.loss(
                    &p.narrow(1, ch, 1)?.squeeze(1)?,
                    &t.narrow(1, ch, 1)?.squeeze(1)?,
                )?;
                total = (total + (l * w)?)?;
            }
        }
        Ok(total)
    }
}
