//! Analysis windows.

/// Window function of an STFT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// Hann: `0.5 - 0.5 cos(2 pi n / N)`.
    Hann,
    /// Hamming: `0.54 - 0.46 cos(2 pi n / N)`.
    Hamming,
    /// All ones.
    Rectangular,
}

/// A window of `len` samples.
///
/// `periodic` selects the DFT-even window (`N = len`, as `torch.hann_window`
/// and `scipy.signal.get_window(..., fftbins=True)`, the right choice for
/// spectral analysis); otherwise the symmetric window (`N = len - 1`, as
/// `numpy.hanning`). Computed in f64 and rounded once.
pub fn window(kind: WindowKind, len: usize, periodic: bool) -> Vec<f32> {
    if len == 0 {
        return Vec::new();
    }
    if len == 1 {
        return vec![1.0];
    }
    let n = if periodic { len } else { len - 1 } as f64;
    let (a0, a1) = match kind {
        WindowKind::Hann => (0.5, 0.5),
        WindowKind::Hamming => (0.54, 0.46),
        WindowKind::Rectangular => (1.0, 0.0),
    };
    (0..len)
        .map(|i| (a0 - a1 * (2.0 * std::f64::consts::PI * i as f64 / n).cos()) as f32)
        .collect()
}

/// `window` zero-padded on both sides to `n_fft` samples, centred as librosa's
/// `util.pad_center` and `torch.stft` do (left pad `(n_fft - len) / 2`).
pub(crate) fn padded_window(
    kind: WindowKind,
    len: usize,
    periodic: bool,
    n_fft: usize,
) -> Vec<f32> {
    let w = window(kind, len, periodic);
    let mut out = vec![0.0; n_fft];
    let left = (n_fft - len) / 2;
    out[left..left + len].copy_from_slice(&w);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hann_periodic_and_symmetric() {
        let p = window(WindowKind::Hann, 4, true);
        let expect = [0.0, 0.5, 1.0, 0.5];
        for (a, b) in p.iter().zip(expect) {
            assert!((a - b).abs() < 1e-7, "{p:?}");
        }
        let s = window(WindowKind::Hann, 5, false);
        let expect = [0.0, 0.5, 1.0, 0.5, 0.0];
        for (a, b) in s.iter().zip(expect) {
            assert!((a - b).abs() < 1e-7, "{s:?}");
        }
    }

    #[test]
    fn hamming_endpoints() {
        let s = window(WindowKind::Hamming, 9, false);
        assert!((s[0] - 0.08).abs() < 1e-6 && (s[8] - 0.08).abs() < 1e-6);
        assert!((s[4] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn padded_window_is_centred() {
        let w = padded_window(WindowKind::Rectangular, 4, true, 8);
        assert_eq!(w, vec![0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
    }
}
