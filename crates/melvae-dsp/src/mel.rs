//! Mel filterbanks and log-mel spectrograms on the host.

use ndarray::Array2;
use rayon::prelude::*;
use realfft::num_complex::Complex32;

use crate::stft::{apply_power, PadMode, Padding, Stft, StftConfig};
use crate::window::WindowKind;
use crate::{Error, Result};

/// Hz <-> mel mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MelScale {
    /// `2595 log10(1 + f / 700)` (HTK; torchaudio's default, Vocos).
    Htk,
    /// Linear below 1 kHz, logarithmic above (Slaney's Auditory Toolbox;
    /// librosa's default, HiFi-GAN).
    Slaney,
}

/// Filter normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MelNorm {
    /// Triangles peak at 1.
    None,
    /// Each triangle scaled by `2 / (f_hi - f_lo)` so it has constant area
    /// (librosa `norm="slaney"`).
    Slaney,
}

/// Compression applied after the mel projection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LogScale {
    /// No compression.
    None,
    /// `ln(max(x, clamp))`.
    Ln {
        /// Floor applied before the log.
        clamp: f32,
    },
    /// `log10(max(x, clamp))`.
    Log10 {
        /// Floor applied before the log.
        clamp: f32,
    },
}

impl LogScale {
    #[inline]
    pub(crate) fn apply(&self, x: f32) -> f32 {
        match *self {
            LogScale::None => x,
            LogScale::Ln { clamp } => x.max(clamp).ln(),
            LogScale::Log10 { clamp } => x.max(clamp).log10(),
        }
    }

    /// Inverse of [`LogScale::apply`] above the clamp.
    pub fn invert(&self, y: f32) -> f32 {
        match *self {
            LogScale::None => y,
            LogScale::Ln { .. } => y.exp(),
            LogScale::Log10 { .. } => 10f32.powf(y),
        }
    }
}

// Slaney's scale: linear (200/3 Hz per mel) up to 1 kHz = mel 15, then
// logarithmic with 27 mels per factor of 6.4.
const SLANEY_F_SP: f64 = 200.0 / 3.0;
const SLANEY_MIN_LOG_HZ: f64 = 1000.0;
const SLANEY_MIN_LOG_MEL: f64 = SLANEY_MIN_LOG_HZ / SLANEY_F_SP;

fn slaney_logstep() -> f64 {
    6.4f64.ln() / 27.0
}

/// Hz to mel on the given scale (f64, as librosa).
pub fn hz_to_mel(f: f64, scale: MelScale) -> f64 {
    match scale {
        MelScale::Htk => 2595.0 * (1.0 + f / 700.0).log10(),
        MelScale::Slaney => {
            if f >= SLANEY_MIN_LOG_HZ {
                SLANEY_MIN_LOG_MEL + (f / SLANEY_MIN_LOG_HZ).ln() / slaney_logstep()
            } else {
                f / SLANEY_F_SP
            }
        }
    }
}

/// Mel to Hz on the given scale (f64, as librosa).
pub fn mel_to_hz(m: f64, scale: MelScale) -> f64 {
    match scale {
        MelScale::Htk => 700.0 * (10f64.powf(m / 2595.0) - 1.0),
        MelScale::Slaney => {
            if m >= SLANEY_MIN_LOG_MEL {
                SLANEY_MIN_LOG_HZ * (slaney_logstep() * (m - SLANEY_MIN_LOG_MEL)).exp()
            } else {
                SLANEY_F_SP * m
            }
        }
    }
}

/// The `n_mels + 2` frequencies (Hz) equally spaced in mel from `fmin` to
/// `fmax`: band `m` of the filterbank rises from point `m`, peaks at point
/// `m + 1` (its centre) and falls to point `m + 2`.
pub fn mel_points(n_mels: usize, fmin: f64, fmax: f64, scale: MelScale) -> Vec<f64> {
    let (mlo, mhi) = (hz_to_mel(fmin, scale), hz_to_mel(fmax, scale));
    (0..n_mels + 2)
        .map(|i| mel_to_hz(mlo + (mhi - mlo) * i as f64 / (n_mels + 1) as f64, scale))
        .collect()
}

/// Triangular mel filterbank `[n_mels, n_fft / 2 + 1]`, computed in f64 and
/// rounded to f32 exactly as `librosa.filters.mel` (which torchaudio's
/// `melscale_fbanks` matches to float precision).
pub fn mel_filterbank(
    sample_rate: u32,
    n_fft: usize,
    n_mels: usize,
    fmin: f32,
    fmax: Option<f32>,
    scale: MelScale,
    norm: MelNorm,
) -> Result<Array2<f32>> {
    let nyquist = sample_rate as f64 / 2.0;
    let fmax = fmax.map(f64::from).unwrap_or(nyquist);
    if sample_rate == 0 {
        return Err(Error::invalid("mel.sample_rate", "must be > 0"));
    }
    if n_mels == 0 {
        return Err(Error::invalid("mel.n_mels", "must be > 0"));
    }
    if !(fmin >= 0.0 && (fmin as f64) < fmax) {
        return Err(Error::invalid(
            "mel.fmin",
            format!("must be in [0, fmax={fmax}), got {fmin}"),
        ));
    }
    if fmax > nyquist + 1e-9 {
        return Err(Error::invalid(
            "mel.fmax",
            format!("must be <= sample_rate / 2 = {nyquist}, got {fmax}"),
        ));
    }
    let n_bins = n_fft / 2 + 1;
    let fft_freqs: Vec<f64> = (0..n_bins)
        .map(|i| i as f64 * nyquist / (n_bins - 1) as f64)
        .collect();
    let mel_f = mel_points(n_mels, fmin as f64, fmax, scale);
    let mut fb = Array2::<f32>::zeros((n_mels, n_bins));
    for m in 0..n_mels {
        let (lo, c, hi) = (mel_f[m], mel_f[m + 1], mel_f[m + 2]);
        let enorm = match norm {
            MelNorm::None => 1.0,
            MelNorm::Slaney => 2.0 / (hi - lo),
        };
        for (b, &f) in fft_freqs.iter().enumerate() {
            let lower = (f - lo) / (c - lo);
            let upper = (hi - f) / (hi - c);
            fb[[m, b]] = (lower.min(upper).max(0.0) * enorm) as f32;
        }
    }
    Ok(fb)
}

/// Dot product with four independent accumulators, so the adds pipeline (and
/// vectorise) instead of waiting on one another.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..4 {
            acc[k] += x[k] * y[k];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// A filterbank stored as, per mel band, its first non-zero bin and weights.
/// Mel filters are narrow, so this is ~50x fewer multiply-adds than a dense
/// product.
#[derive(Debug, Clone)]
pub(crate) struct SparseFilterbank {
    bands: Vec<(usize, Vec<f32>)>,
}

impl SparseFilterbank {
    pub(crate) fn new(fb: &Array2<f32>) -> Self {
        let bands = fb
            .rows()
            .into_iter()
            .map(|row| {
                let first = row.iter().position(|&v| v != 0.0).unwrap_or(0);
                let last = row.iter().rposition(|&v| v != 0.0).map_or(first, |l| l + 1);
                (
                    first,
                    row.iter().skip(first).take(last - first).copied().collect(),
                )
            })
            .collect();
        Self { bands }
    }

    #[inline]
    pub(crate) fn apply(&self, spectrum: &[f32], mut out: impl FnMut(usize, f32)) {
        for (m, (first, w)) in self.bands.iter().enumerate() {
            out(m, dot(&spectrum[*first..*first + w.len()], w));
        }
    }

    /// `out += F^T r` for a residual `r` over the mel bands.
    #[inline]
    pub(crate) fn apply_transpose(&self, r: &[f32], out: &mut [f32]) {
        for ((first, w), &rm) in self.bands.iter().zip(r) {
            for (o, wi) in out[*first..*first + w.len()].iter_mut().zip(w) {
                *o += wi * rm;
            }
        }
    }
}

/// Full description of a (log-)mel spectrogram. See the presets for the
/// reference configurations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MelConfig {
    /// Sample rate the audio must have, in Hz.
    pub sample_rate: u32,
    /// The underlying STFT.
    pub stft: StftConfig,
    /// Number of mel bands.
    pub n_mels: usize,
    /// Lowest filter edge, Hz.
    pub fmin: f32,
    /// Highest filter edge, Hz (`None`: Nyquist).
    pub fmax: Option<f32>,
    /// Mel scale.
    pub scale: MelScale,
    /// Filter normalisation.
    pub norm: MelNorm,
    /// Exponent of the magnitude: 1 (magnitude) or 2 (power).
    pub power: f32,
    /// Added to `|X|^2` before the power is applied (HiFi-GAN: 1e-9).
    pub power_eps: f32,
    /// Log compression.
    pub log: LogScale,
}

impl MelConfig {
    /// Vocos' feature extractor (`torchaudio.transforms.MelSpectrogram` then
    /// `log(clip(x, 1e-7))`): 24 kHz, n_fft 1024, hop 256, periodic Hann of
    /// 1024, centred reflect padding, 100 HTK mels without normalisation,
    /// magnitude.
    pub fn vocos_24k() -> Self {
        Self {
            sample_rate: 24000,
            stft: StftConfig {
                n_fft: 1024,
                hop_length: 256,
                win_length: 1024,
                window: WindowKind::Hann,
                periodic: true,
                padding: Padding::Center(PadMode::Reflect),
            },
            n_mels: 100,
            fmin: 0.0,
            fmax: None,
            scale: MelScale::Htk,
            norm: MelNorm::None,
            power: 1.0,
            power_eps: 0.0,
            log: LogScale::Ln { clamp: 1e-7 },
        }
    }

    /// HiFi-GAN's `mel_spectrogram` (config v1): 22.05 kHz, n_fft 1024, hop
    /// 256, periodic Hann of 1024, reflect padding of `(n_fft - hop) / 2` per
    /// side without centring, 80 Slaney mels with Slaney normalisation from 0
    /// to 8 kHz, magnitude `sqrt(|X|^2 + 1e-9)`, `ln(max(x, 1e-5))`.
    pub fn hifigan_22k() -> Self {
        Self {
            sample_rate: 22050,
            stft: StftConfig {
                n_fft: 1024,
                hop_length: 256,
                win_length: 1024,
                window: WindowKind::Hann,
                periodic: true,
                padding: Padding::Both((1024 - 256) / 2, PadMode::Reflect),
            },
            n_mels: 80,
            fmin: 0.0,
            fmax: Some(8000.0),
            scale: MelScale::Slaney,
            norm: MelNorm::Slaney,
            power: 1.0,
            power_eps: 1e-9,
            log: LogScale::Ln { clamp: 1e-5 },
        }
    }

    /// The names [`MelConfig::preset`] accepts.
    pub const PRESETS: [&'static str; 2] = ["vocos-24k", "hifigan-22k"];

    /// A preset by name: `vocos-24k` or `hifigan-22k`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "vocos-24k" => Ok(Self::vocos_24k()),
            "hifigan-22k" => Ok(Self::hifigan_22k()),
            other => Err(Error::invalid(
                "mel preset",
                format!(
                    "unknown preset {other:?}; expected one of {:?}",
                    Self::PRESETS
                ),
            )),
        }
    }

    /// Checks every field; the error names the bad one.
    pub fn validate(&self) -> Result<()> {
        self.stft.validate()?;
        if !(self.power > 0.0 && self.power.is_finite()) {
            return Err(Error::invalid(
                "mel.power",
                format!("must be > 0, got {}", self.power),
            ));
        }
        if self.power_eps.is_nan() || self.power_eps < 0.0 {
            return Err(Error::invalid("mel.power_eps", "must be >= 0"));
        }
        if let LogScale::Ln { clamp } | LogScale::Log10 { clamp } = self.log {
            if clamp.is_nan() || clamp <= 0.0 {
                return Err(Error::invalid(
                    "mel.log.clamp",
                    format!("must be > 0, got {clamp}"),
                ));
            }
        }
        self.filterbank().map(|_| ())
    }

    /// Centre frequency (Hz) of each of the `n_mels` bands, low to high.
    pub fn band_centres_hz(&self) -> Vec<f64> {
        let fmax = self.fmax.map_or(self.sample_rate as f64 / 2.0, f64::from);
        let points = mel_points(self.n_mels, self.fmin as f64, fmax, self.scale);
        points[1..=self.n_mels].to_vec()
    }

    /// The filterbank `[n_mels, n_fft / 2 + 1]`.
    pub fn filterbank(&self) -> Result<Array2<f32>> {
        mel_filterbank(
            self.sample_rate,
            self.stft.n_fft,
            self.n_mels,
            self.fmin,
            self.fmax,
            self.scale,
            self.norm,
        )
    }
}

/// Frames per tile of the frame-major to `[n_mels, frames]` transpose.
const TILE: usize = 64;

/// Writes `n` frame-major frames of `tile` (`[n][n_mels]`) into columns
/// `t0..t0 + n` of `out` (`[n_mels, n_frames]`).
fn transpose_tile(
    tile: &[f32],
    n_mels: usize,
    t0: usize,
    n: usize,
    out: &mut [f32],
    n_frames: usize,
) {
    for m in 0..n_mels {
        let row = &mut out[m * n_frames + t0..m * n_frames + t0 + n];
        for (k, o) in row.iter_mut().enumerate() {
            *o = tile[k * n_mels + m];
        }
    }
}

/// A planned (log-)mel extractor; cheap to share across threads.
#[derive(Debug, Clone)]
pub struct MelExtractor {
    cfg: MelConfig,
    stft: Stft,
    filterbank: Array2<f32>,
    sparse: SparseFilterbank,
}

impl MelExtractor {
    /// Plans the STFT and builds the filterbank; fails on an invalid config.
    pub fn new(cfg: MelConfig) -> Result<Self> {
        cfg.validate()?;
        let filterbank = cfg.filterbank()?;
        Ok(Self {
            stft: Stft::new(cfg.stft)?,
            sparse: SparseFilterbank::new(&filterbank),
            filterbank,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MelConfig {
        &self.cfg
    }

    /// The dense filterbank `[n_mels, n_bins]`.
    pub fn filterbank(&self) -> &Array2<f32> {
        &self.filterbank
    }

    /// The STFT this extractor frames with.
    pub fn stft(&self) -> &Stft {
        &self.stft
    }

    /// Number of frames for `len` samples.
    pub fn n_frames(&self, len: usize) -> Result<usize> {
        self.cfg.stft.n_frames(len)
    }

    /// The (log-)mel spectrogram of mono `audio` at `cfg.sample_rate`:
    /// `[n_mels, frames]`.
    pub fn extract(&self, audio: &[f32]) -> Result<Array2<f32>> {
        let n_frames = self.n_frames(audio.len())?;
        let n_mels = self.cfg.n_mels;
        // Frames accumulate frame-major in a small tile (contiguous writes)
        // that is transposed into the output every TILE frames, while it is
        // still in cache: no whole-length frame-major buffer.
        let mut out = vec![0.0f32; n_frames * n_mels];
        let mut tile = vec![0.0f32; TILE * n_mels];
        let mut scratch = self.stft.scratch();
        let mut mag = vec![0.0f32; self.cfg.stft.n_bins()];
        self.stft.for_each_frame(audio, &mut scratch, |t, spec| {
            let k = t % TILE;
            self.mel_frame(spec, &mut mag, &mut tile[k * n_mels..(k + 1) * n_mels]);
            if k == TILE - 1 || t + 1 == n_frames {
                transpose_tile(&tile, n_mels, t - k, k + 1, &mut out, n_frames);
            }
        })?;
        Array2::from_shape_vec((n_mels, n_frames), out)
            .map_err(|e| Error::invalid("mel output", e.to_string()))
    }

    /// One frame's spectrum to its (log-)mel values in `row` (`n_mels`);
    /// `mag` is scratch of `n_bins`.
    pub(crate) fn mel_frame(&self, spec: &[Complex32], mag: &mut [f32], row: &mut [f32]) {
        let (power, eps) = (self.cfg.power, self.cfg.power_eps);
        let mags = mag.iter_mut().zip(spec);
        if power == 1.0 {
            mags.for_each(|(m, v)| *m = (v.norm_sqr() + eps).sqrt());
        } else if power == 2.0 {
            mags.for_each(|(m, v)| *m = v.norm_sqr() + eps);
        } else {
            mags.for_each(|(m, v)| *m = apply_power(v.norm_sqr() + eps, power));
        }
        self.sparse.apply(mag, |m, v| row[m] = v);
        let log = self.cfg.log;
        if log != LogScale::None {
            row.iter_mut().for_each(|v| *v = log.apply(*v));
        }
    }

    /// Frame-major values `[frames][n_mels]` as `[n_mels, frames]`.
    pub(crate) fn frames_to_mel(&self, by_frame: Vec<f32>, n_frames: usize) -> Result<Array2<f32>> {
        let n_mels = self.cfg.n_mels;
        if by_frame.len() != n_frames * n_mels {
            return Err(Error::invalid(
                "mel output",
                format!(
                    "{} values for {n_frames} frames of {n_mels}",
                    by_frame.len()
                ),
            ));
        }
        // A blocked transpose (ndarray's element-wise copy of the
        // transposed view walked the input with a stride of n_mels).
        let mut out = vec![0.0f32; n_frames * n_mels];
        for t0 in (0..n_frames).step_by(TILE) {
            let n = TILE.min(n_frames - t0);
            let tile = &by_frame[t0 * n_mels..(t0 + n) * n_mels];
            transpose_tile(tile, n_mels, t0, n, &mut out, n_frames);
        }
        Array2::from_shape_vec((n_mels, n_frames), out)
            .map_err(|e| Error::invalid("mel output", e.to_string()))
    }

    /// [`MelExtractor::extract`] on many clips in parallel (rayon's pool).
    pub fn extract_batch<A: AsRef<[f32]> + Sync>(&self, batch: &[A]) -> Result<Vec<Array2<f32>>> {
        batch.par_iter().map(|a| self.extract(a.as_ref())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_round_trip() {
        for scale in [MelScale::Htk, MelScale::Slaney] {
            for f in [0.0, 100.0, 999.0, 1000.0, 4000.0, 11025.0] {
                let back = mel_to_hz(hz_to_mel(f, scale), scale);
                assert!((back - f).abs() < 1e-9, "{scale:?} {f} {back}");
            }
        }
        assert!((hz_to_mel(1000.0, MelScale::Slaney) - 15.0).abs() < 1e-12);
        assert!((hz_to_mel(700.0, MelScale::Htk) - 2595.0 * 2f64.log10()).abs() < 1e-9);
    }

    #[test]
    fn sparse_equals_dense() {
        let cfg = MelConfig::hifigan_22k();
        let fb = cfg.filterbank().unwrap();
        let sparse = SparseFilterbank::new(&fb);
        let spec: Vec<f32> = (0..fb.ncols())
            .map(|i| (i as f32 * 0.37).sin().abs())
            .collect();
        let dense = fb.dot(&ndarray::Array1::from(spec.clone()));
        sparse.apply(&spec, |m, v| assert!((v - dense[m]).abs() < 1e-5));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases: Vec<(MelConfig, &str)> = vec![
            (
                MelConfig {
                    n_mels: 0,
                    ..MelConfig::vocos_24k()
                },
                "n_mels",
            ),
            (
                MelConfig {
                    fmax: Some(20000.0),
                    ..MelConfig::vocos_24k()
                },
                "fmax",
            ),
            (
                MelConfig {
                    fmin: 13000.0,
                    ..MelConfig::vocos_24k()
                },
                "fmin",
            ),
            (
                MelConfig {
                    power: 0.0,
                    ..MelConfig::vocos_24k()
                },
                "power",
            ),
            (
                MelConfig {
                    log: LogScale::Ln { clamp: 0.0 },
                    ..MelConfig::vocos_24k()
                },
                "clamp",
            ),
        ];
        for (cfg, field) in cases {
            let e = MelExtractor::new(cfg).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
        let e = MelConfig::preset("vocos-22k").unwrap_err().to_string();
        assert!(e.contains("vocos-22k") && e.contains("vocos-24k"), "{e}");
    }

    #[test]
    fn silence_is_finite_and_clamped() {
        let ex = MelExtractor::new(MelConfig::vocos_24k()).unwrap();
        let mel = ex.extract(&vec![0.0; 4000]).unwrap();
        assert!(mel.iter().all(|&v| v == (1e-7f32).ln()));
    }

    #[test]
    fn band_centres_are_where_the_filters_peak() {
        let cfg = MelConfig::vocos_24k();
        let centres = cfg.band_centres_hz();
        let fb = cfg.filterbank().unwrap();
        assert_eq!(centres.len(), cfg.n_mels);
        let bin_hz = cfg.sample_rate as f64 / cfg.stft.n_fft as f64;
        for (m, &c) in centres.iter().enumerate() {
            let row = fb.row(m);
            let peak = (0..row.len())
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap();
            assert!(
                (peak as f64 * bin_hz - c).abs() <= bin_hz,
                "band {m}: {c} Hz, peak bin {peak}"
            );
        }
        assert!(centres.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(centres.iter().filter(|&&c| c < 1000.0).count(), 30);
    }

    #[test]
    fn batch_equals_single() {
        let ex = MelExtractor::new(MelConfig::vocos_24k()).unwrap();
        let clips: Vec<Vec<f32>> = (1..5)
            .map(|k| {
                (0..3000 * k)
                    .map(|i| ((i * k) as f32 * 0.01).sin())
                    .collect()
            })
            .collect();
        let batch = ex.extract_batch(&clips).unwrap();
        for (c, b) in clips.iter().zip(&batch) {
            assert_eq!(&ex.extract(c).unwrap(), b);
        }
    }
}
