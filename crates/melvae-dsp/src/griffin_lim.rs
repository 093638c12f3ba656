//! Phase reconstruction: fast Griffin-Lim (Perraudin et al. 2013, as
//! `librosa.griffinlim`) and mel-to-linear inversion, so any mel model can be
//! listened to without a neural vocoder.

use ndarray::Array2;
use realfft::num_complex::Complex32;

use crate::mel::{MelExtractor, SparseFilterbank};
use crate::rng::SplitMix64;
use crate::stft::Stft;
use crate::{Error, Result};

/// Initial phase of Griffin-Lim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseInit {
    /// Uniform random phase from a seeded generator (librosa's default).
    Random {
        /// Seed of the phase generator.
        seed: u64,
    },
    /// Zero phase.
    Zeros,
}

/// Griffin-Lim parameters (defaults: librosa's, 32 iterations, momentum
/// 0.99, random phase).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GriffinLimConfig {
    /// Number of projection iterations.
    pub n_iter: usize,
    /// Momentum of the fast variant; 0 gives the original algorithm.
    pub momentum: f32,
    /// Initial phase.
    pub init: PhaseInit,
}

impl Default for GriffinLimConfig {
    fn default() -> Self {
        Self {
            n_iter: 32,
            momentum: 0.99,
            init: PhaseInit::Random { seed: 0 },
        }
    }
}

/// Reconstructs a waveform whose STFT magnitude approximates `magnitude`
/// (`[n_bins, frames]`, linear magnitude, not power).
///
/// `length` fixes the output length (default: the ISTFT's natural length).
pub fn griffin_lim(
    stft: &Stft,
    magnitude: &Array2<f32>,
    length: Option<usize>,
    cfg: &GriffinLimConfig,
) -> Result<Vec<f32>> {
    let (bins, frames) = magnitude.dim();
    if bins != stft.config().n_bins() || frames == 0 {
        return Err(Error::shape(
            "griffin-lim magnitude",
            format!("[{}, frames >= 1]", stft.config().n_bins()),
            format!("[{bins}, {frames}]"),
        ));
    }
    if let Some((i, _)) = magnitude
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite() || **v < 0.0)
    {
        return Err(Error::invalid(
            "griffin-lim magnitude",
            format!("element {i} is negative or not finite"),
        ));
    }
    if !(0.0..1.0 + 1e-6).contains(&cfg.momentum) {
        return Err(Error::invalid(
            "griffin_lim.momentum",
            format!("must be in [0, 1], got {}", cfg.momentum),
        ));
    }
    let mut angles = match cfg.init {
        PhaseInit::Zeros => Array2::from_elem((bins, frames), Complex32::new(1.0, 0.0)),
        PhaseInit::Random { seed } => {
            let mut rng = SplitMix64::new(seed);
            Array2::from_shape_fn((bins, frames), |_| {
                let phi = 2.0 * std::f64::consts::PI * rng.next_f64();
                Complex32::new(phi.cos() as f32, phi.sin() as f32)
            })
        }
    };
    let length = length.unwrap_or(
        stft.config().hop_length * (frames - 1) + stft.config().n_fft
            - 2 * stft.config().padding.amount(stft.config().n_fft),
    );
    let magnitude = magnitude.mapv(|m| Complex32::new(m, 0.0));
    let mut rebuilt = Array2::<Complex32>::zeros((bins, frames));
    let alpha = cfg.momentum / (1.0 + cfg.momentum);
    let eps = f32::MIN_POSITIVE;
    for _ in 0..cfg.n_iter {
        let inverse = stft.istft(&(&magnitude * &angles), Some(length))?;
        let new = stft.stft(&inverse)?;
        if new.dim() != (bins, frames) {
            return Err(Error::shape(
                "griffin-lim length",
                format!("{frames} frames after re-analysis"),
                format!("{} frames for {length} samples", new.dim().1),
            ));
        }
        ndarray::Zip::from(&mut angles)
            .and(&new)
            .and(&rebuilt)
            .for_each(|a, &n, &p| {
                let v = n - p * alpha;
                *a = v / (v.norm() + eps);
            });
        rebuilt = new;
    }
    stft.istft(&(&magnitude * &angles), Some(length))
}

/// How [`mel_to_linear`] inverts the mel projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MelInversion {
    /// Non-negative least squares per frame (accelerated projected gradient,
    /// started from the clipped pseudo-inverse), as `librosa`'s
    /// `mel_to_stft`. Best quality.
    Nnls {
        /// Projected-gradient iterations.
        iterations: usize,
    },
    /// Ridge-regularised pseudo-inverse, clipped at zero. Fast.
    PseudoInverse,
}

impl Default for MelInversion {
    fn default() -> Self {
        Self::Nnls { iterations: 200 }
    }
}

/// Cholesky factorisation `a = L L^T` of a symmetric positive definite
/// `n x n` row-major matrix, in place (`L` in the lower triangle).
fn cholesky_factor(a: &mut [f64], n: usize) -> Result<()> {
    for j in 0..n {
        let d = a[j * n + j] - (0..j).map(|k| a[j * n + k] * a[j * n + k]).sum::<f64>();
        if d <= 0.0 {
            return Err(Error::invalid(
                "mel filterbank",
                "Gram matrix is not positive definite",
            ));
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let s = a[i * n + j] - (0..j).map(|k| a[i * n + k] * a[j * n + k]).sum::<f64>();
            a[i * n + j] = s / d;
        }
    }
    Ok(())
}

/// Solves `L L^T x = b` in place on `b`, with `l` from [`cholesky_factor`].
fn cholesky_solve(l: &[f64], n: usize, b: &mut [f64]) {
    for i in 0..n {
        let s = b[i] - (0..i).map(|k| l[i * n + k] * b[k]).sum::<f64>();
        b[i] = s / l[i * n + i];
    }
    for i in (0..n).rev() {
        let s = b[i] - (i + 1..n).map(|k| l[k * n + i] * b[k]).sum::<f64>();
        b[i] = s / l[i * n + i];
    }
}

/// The pseudo-inverse `F^T (F F^T)^-1` (`[n_bins, n_mels]`, f64) of a mel
/// filterbank `F` (`[n_mels, n_bins]`), with a negligible ridge (1e-10 of
/// the Gram matrix's mean diagonal) for numerical safety; maps linear mel
/// magnitudes back to the least-norm linear spectrum. An empty filter (more
/// mels than the FFT resolves) gets a zero column, thanks to the ridge.
pub fn mel_pseudo_inverse(filterbank: &Array2<f32>) -> Result<Array2<f64>> {
    let (n_mels, n_bins) = filterbank.dim();
    // Gram matrix G = F F^T (+ ridge): one factorisation, one solve per
    // bin; row b of the pseudo-inverse is G^-1 F[:, b].
    let fb64 = filterbank.mapv(f64::from);
    let gram = fb64.dot(&fb64.t());
    let ridge = 1e-10 * (0..n_mels).map(|i| gram[[i, i]]).sum::<f64>() / n_mels as f64 + 1e-300;
    let mut chol: Vec<f64> = gram.iter().copied().collect();
    for i in 0..n_mels {
        chol[i * n_mels + i] += ridge;
    }
    cholesky_factor(&mut chol, n_mels)?;
    let mut pinv = Array2::<f64>::zeros((n_bins, n_mels));
    for (b, mut row) in pinv.rows_mut().into_iter().enumerate() {
        let mut col: Vec<f64> = fb64.column(b).to_vec();
        cholesky_solve(&chol, n_mels, &mut col);
        row.assign(&ndarray::Array1::from(col));
    }
    Ok(pinv)
}

/// Inverts a mel projection: finds non-negative `x` (`[n_bins, frames]`) with
/// `filterbank . x ~= mel`, where `filterbank` is `[n_mels, n_bins]` and `mel`
/// is `[n_mels, frames]` (linear, not log).
pub fn mel_to_linear(
    filterbank: &Array2<f32>,
    mel: &Array2<f32>,
    method: MelInversion,
) -> Result<Array2<f32>> {
    let n_mels = filterbank.nrows();
    if mel.nrows() != n_mels {
        return Err(Error::shape(
            "mel",
            format!("[{n_mels}, frames]"),
            format!("{:?}", mel.dim()),
        ));
    }
    let fb64 = filterbank.mapv(f64::from);
    let gram = fb64.dot(&fb64.t());
    let pinv = mel_pseudo_inverse(filterbank)?;
    let mut out = pinv.dot(&mel.mapv(f64::from)).mapv(|v| v.max(0.0) as f32);
    let sparse = SparseFilterbank::new(filterbank);
    if let MelInversion::Nnls { iterations } = method {
        nnls_refine(&sparse, n_mels, &gram, mel, &mut out, iterations);
    }
    Ok(out)
}

/// FISTA on `0.5 ||F x - m||^2` subject to `x >= 0`, per frame, from `x`.
fn nnls_refine(
    fb: &SparseFilterbank,
    n_mels: usize,
    gram: &Array2<f64>,
    mel: &Array2<f32>,
    x: &mut Array2<f32>,
    iterations: usize,
) {
    // Lipschitz constant: the largest eigenvalue of F F^T (power iteration).
    let mut v = vec![1.0f64; n_mels];
    let mut lip = 1.0;
    for _ in 0..100 {
        let w: Vec<f64> = (0..n_mels)
            .map(|i| (0..n_mels).map(|j| gram[[i, j]] * v[j]).sum())
            .collect();
        let norm = w.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm == 0.0 {
            return;
        }
        lip = norm;
        v = w.into_iter().map(|a| a / norm).collect();
    }
    let step = (1.0 / (lip * 1.01)) as f32;
    let n_bins = x.nrows();
    let mut resid = vec![0.0f32; n_mels];
    let mut grad = vec![0.0f32; n_bins];
    for t in 0..mel.ncols() {
        let mut xk: Vec<f32> = x.column(t).to_vec();
        let mut y = xk.clone();
        let mut tk = 1.0f32;
        for _ in 0..iterations {
            fb.apply(&y, |m, v| resid[m] = v - mel[[m, t]]);
            grad.iter_mut().for_each(|g| *g = 0.0);
            fb.apply_transpose(&resid, &mut grad);
            let t_next = (1.0 + (1.0 + 4.0 * tk * tk).sqrt()) / 2.0;
            let beta = (tk - 1.0) / t_next;
            for i in 0..n_bins {
                let new = (y[i] - step * grad[i]).max(0.0);
                y[i] = new + beta * (new - xk[i]);
                xk[i] = new;
            }
            tk = t_next;
        }
        for (i, v) in xk.into_iter().enumerate() {
            x[[i, t]] = v;
        }
    }
}

/// Resynthesises audio from a (log-)mel spectrogram `[n_mels, frames]`
/// produced by `extractor`: undoes the log, inverts the mel projection, takes
/// the `1 / power` root and runs Griffin-Lim with the extractor's STFT.
/// `length` fixes the number of output samples.
pub fn mel_to_audio(
    extractor: &MelExtractor,
    mel: &Array2<f32>,
    length: Option<usize>,
    inversion: MelInversion,
    cfg: &GriffinLimConfig,
) -> Result<Vec<f32>> {
    let mcfg = extractor.config();
    let linear_mel = mel.mapv(|v| mcfg.log.invert(v));
    let power_spec = mel_to_linear(extractor.filterbank(), &linear_mel, inversion)?;
    let magnitude = power_spec.mapv(|v| v.powf(1.0 / mcfg.power));
    griffin_lim(extractor.stft(), &magnitude, length, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MelConfig, StftConfig};

    fn voiced(n: usize, rate: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let t = i as f32 / rate;
                let f0 = 140.0 + 30.0 * (2.0 * std::f32::consts::PI * 3.0 * t).sin();
                (1..8)
                    .map(|h| (2.0 * std::f32::consts::PI * f0 * h as f32 * t).sin() / h as f32)
                    .sum::<f32>()
                    * 0.2
            })
            .collect()
    }

    fn spectral_convergence(stft: &Stft, target: &Array2<f32>, y: &[f32]) -> f32 {
        let m = stft.spectrogram(y, 1.0).unwrap();
        let num: f32 = (&m - target).iter().map(|v| v * v).sum::<f32>().sqrt();
        let den: f32 = target.iter().map(|v| v * v).sum::<f32>().sqrt();
        num / den
    }

    #[test]
    fn griffin_lim_converges() {
        let stft = Stft::new(StftConfig {
            hop_length: 128,
            ..StftConfig::new(512)
        })
        .unwrap();
        let x = voiced(16000, 16000.0);
        let target = stft.spectrogram(&x, 1.0).unwrap();
        let sc = |n_iter| {
            let cfg = GriffinLimConfig {
                n_iter,
                ..Default::default()
            };
            let y = griffin_lim(&stft, &target, Some(x.len()), &cfg).unwrap();
            assert_eq!(y.len(), x.len());
            spectral_convergence(&stft, &target, &y)
        };
        let (sc0, sc32) = (sc(0), sc(32));
        assert!(
            sc32 < 0.12 && sc32 < sc0 / 4.0,
            "spectral convergence {sc0} -> {sc32}"
        );
    }

    /// `F pinv(F) = I` for both presets' filterbanks (full row rank), and
    /// an empty filter gives a zero column instead of a failure.
    #[test]
    fn pseudo_inverse_is_a_right_inverse() {
        for cfg in [MelConfig::vocos_24k(), MelConfig::hifigan_22k()] {
            let fb = cfg.filterbank().unwrap();
            let eye = fb.mapv(f64::from).dot(&mel_pseudo_inverse(&fb).unwrap());
            for ((i, j), v) in eye.indexed_iter() {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-6, "{i} {j}: {v}");
            }
        }
        let mut fb = MelConfig::vocos_24k().filterbank().unwrap();
        fb.row_mut(5).fill(0.0);
        let pinv = mel_pseudo_inverse(&fb).unwrap();
        assert!(pinv.column(5).iter().all(|&v| v == 0.0));
        assert!(pinv.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn mel_inversion_reproduces_the_mel() {
        let ex = MelExtractor::new(MelConfig {
            log: crate::LogScale::None,
            ..MelConfig::vocos_24k()
        })
        .unwrap();
        let x = voiced(12000, 24000.0);
        let mel = ex.extract(&x).unwrap();
        for method in [MelInversion::PseudoInverse, MelInversion::default()] {
            let lin = mel_to_linear(ex.filterbank(), &mel, method).unwrap();
            assert!(lin.iter().all(|&v| v >= 0.0));
            let back = ex.filterbank().dot(&lin);
            let err = (&back - &mel).iter().map(|v| v * v).sum::<f32>().sqrt()
                / mel.iter().map(|v| v * v).sum::<f32>().sqrt();
            let bound = if method == MelInversion::PseudoInverse {
                0.2
            } else {
                0.02
            };
            assert!(err < bound, "{method:?}: relative error {err}");
        }
    }

    #[test]
    fn mel_to_audio_is_intelligible_spectrally() {
        let ex = MelExtractor::new(MelConfig::vocos_24k()).unwrap();
        let x = voiced(24000, 24000.0);
        let mel = ex.extract(&x).unwrap();
        let y = mel_to_audio(
            &ex,
            &mel,
            Some(x.len()),
            MelInversion::default(),
            &GriffinLimConfig::default(),
        )
        .unwrap();
        assert_eq!(y.len(), x.len());
        let mel_y = ex.extract(&y).unwrap();
        let mae = (&mel_y - &mel).iter().map(|v| v.abs()).sum::<f32>() / mel.len() as f32;
        assert!(mae < 0.5, "log-mel MAE {mae}");
    }

    #[test]
    fn bad_magnitude_is_rejected() {
        let stft = Stft::new(StftConfig::new(64)).unwrap();
        let e = griffin_lim(&stft, &Array2::zeros((10, 4)), None, &Default::default()).unwrap_err();
        assert!(e.to_string().contains("[33, frames >= 1]"), "{e}");
        let mut m = Array2::zeros((33, 4));
        m[[2, 1]] = f32::NAN;
        let e = griffin_lim(&stft, &m, None, &Default::default()).unwrap_err();
        assert!(e.to_string().contains("not finite"), "{e}");
    }
}
