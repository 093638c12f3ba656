//! The windowed real DFT of [`TensorStft`](crate::TensorStft) and
//! [`TensorIstft`](crate::TensorIstft) as an FFT on the CPU: a candle
//! custom op with its own backward, in place of the matmul against a dense
//! `[n_fft, 2 * n_bins]` basis (O(n log n) per frame instead of O(n^2)).
//!
//! With `A` the basis (`A[t, k] = w[t] cos(2 pi k t / n)`, `A[t, K + k] =
//! -w[t] sin(2 pi k t / n)`, `K = n / 2 + 1` bins), the op computes `x A`
//! (analysis: `[rows, n]` to `[rows, 2K]`, real parts then imaginary parts)
//! or its adjoint `g A^T` (`[rows, 2K]` to `[rows, n]`); each is the
//! other's backward. The inverse STFT's basis is `diag(c) A^T` for the
//! irfft weights `c`, so it is the adjoint after a scaling.

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use realfft::num_complex::Complex;
use realfft::{ComplexToReal, FftNum, RealFftPlanner, RealToComplex};

/// Whether the CPU kernel `name` is on. The environment variable
/// `MELVAE_NO_FUSED_KERNELS` (a comma-separated list of names, or `all`)
/// turns kernels off, so each can be benchmarked against its composed
/// path; this crate's kernel is `fft` (melvae-layers reads the same list).
pub fn kernel_enabled(name: &str) -> bool {
    static OFF: OnceLock<Vec<String>> = OnceLock::new();
    let off = OFF.get_or_init(|| {
        std::env::var("MELVAE_NO_FUSED_KERNELS")
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default()
    });
    !off.iter().any(|o| o == name || o == "all")
}

/// Forward and inverse real FFT plans of one length and float type.
struct Plans<T: FftNum> {
    r2c: Arc<dyn RealToComplex<T>>,
    c2r: Arc<dyn ComplexToReal<T>>,
}

impl<T: FftNum> Plans<T> {
    fn new(n: usize) -> Self {
        let mut planner = RealFftPlanner::<T>::new();
        Self {
            r2c: planner.plan_fft_forward(n),
            c2r: planner.plan_fft_inverse(n),
        }
    }
}

/// The windowed real DFT of one length: the window and FFT plans (f32
/// and f64, planned on first use), shared by the op and its backward.
pub(crate) struct WindowedDft {
    n: usize,
    window: Vec<f32>,
    f32_plans: OnceLock<Plans<f32>>,
    f64_plans: OnceLock<Plans<f64>>,
}

impl std::fmt::Debug for WindowedDft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WindowedDft(n = {})", self.n)
    }
}

impl WindowedDft {
    /// The DFT of length `window.len()` with that analysis window.
    pub(crate) fn new(window: Vec<f32>) -> Arc<Self> {
        Arc::new(Self {
            n: window.len(),
            window,
            f32_plans: OnceLock::new(),
            f64_plans: OnceLock::new(),
        })
    }

    /// Whether the FFT path takes `t`: CPU, f32 or f64, kernel `fft` on.
    pub(crate) fn takes(t: &Tensor) -> bool {
        t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64) && kernel_enabled("fft")
    }

    /// `x A`: `[.., n]` to `[.., 2 * n_bins]` (real parts, then imaginary).
    pub(crate) fn analysis(self: &Arc<Self>, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(DftOp {
            dft: self.clone(),
            adjoint: false,
        })
    }

    /// `g A^T`: `[.., 2 * n_bins]` to `[.., n]`.
    pub(crate) fn adjoint(self: &Arc<Self>, g: &Tensor) -> candle_core::Result<Tensor> {
        g.contiguous()?.apply_op1(DftOp {
            dft: self.clone(),
            adjoint: true,
        })
    }

    /// The transform's length `n`.
    pub(crate) fn len(&self) -> usize {
        self.n
    }

    /// Bins of the one-sided spectrum, `n / 2 + 1`.
    pub(crate) fn bins(&self) -> usize {
        self.n / 2 + 1
    }

    /// The analysis window (`n` values).
    pub(crate) fn window(&self) -> &[f32] {
        &self.window
    }
}

/// A float type the op runs in.
trait DftElem: FftNum + candle_core::WithDType {
    fn plans(dft: &WindowedDft) -> &Plans<Self>;
    fn of(v: f32) -> Self;
}

impl DftElem for f32 {
    fn plans(dft: &WindowedDft) -> &Plans<f32> {
        dft.f32_plans.get_or_init(|| Plans::new(dft.n))
    }
    fn of(v: f32) -> Self {
        v
    }
}

impl DftElem for f64 {
    fn plans(dft: &WindowedDft) -> &Plans<f64> {
        dft.f64_plans.get_or_init(|| Plans::new(dft.n))
    }
    fn of(v: f32) -> Self {
        v as f64
    }
}

/// Rows per parallel task: one task per thread of rayon's pool (each row
/// is transformed alone, so the split does not change any value).
fn rows_per_task(rows: usize) -> usize {
    rows.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

/// `x A` row by row: window, real FFT, real parts then imaginary parts.
fn analysis_rows<T: DftElem>(dft: &WindowedDft, x: &[T]) -> candle_core::Result<Vec<T>> {
    let (n, bins) = (dft.n, dft.bins());
    let rows = x.len() / n;
    let plan = &T::plans(dft).r2c;
    let mut out = vec![T::zero(); rows * 2 * bins];
    let per = rows_per_task(rows);
    out.par_chunks_mut(per * 2 * bins)
        .zip(x.par_chunks(per * n))
        .try_for_each(|(out, x)| {
            let mut buf = plan.make_input_vec();
            let mut spec = plan.make_output_vec();
            let mut scratch = plan.make_scratch_vec();
            for (o, row) in out.chunks_mut(2 * bins).zip(x.chunks(n)) {
                for ((b, &v), &w) in buf.iter_mut().zip(row).zip(&dft.window) {
                    *b = v * T::of(w);
                }
                plan.process_with_scratch(&mut buf, &mut spec, &mut scratch)
                    .map_err(|e| candle_core::Error::Msg(format!("fft: {e}")))?;
                let (re, im) = o.split_at_mut(bins);
                for ((r, i), c) in re.iter_mut().zip(im.iter_mut()).zip(&spec) {
                    *r = c.re;
                    *i = c.im;
                }
            }
            Ok::<_, candle_core::Error>(())
        })?;
    Ok(out)
}

/// `g A^T` row by row: `w[t] sum_k (g_re[k] cos - g_im[k] sin)(2 pi k t /
/// n)`, an inverse real FFT of the half-weighted one-sided spectrum.
fn adjoint_rows<T: DftElem>(dft: &WindowedDft, g: &[T]) -> candle_core::Result<Vec<T>> {
    let (n, bins) = (dft.n, dft.bins());
    let rows = g.len() / (2 * bins);
    let plan = &T::plans(dft).c2r;
    let half = T::of(0.5);
    let mut out = vec![T::zero(); rows * n];
    let per = rows_per_task(rows);
    out.par_chunks_mut(per * n)
        .zip(g.par_chunks(per * 2 * bins))
        .try_for_each(|(out, g)| {
            let mut spec = plan.make_input_vec();
            let mut buf = plan.make_output_vec();
            let mut scratch = plan.make_scratch_vec();
            for (o, row) in out.chunks_mut(n).zip(g.chunks(2 * bins)) {
                let (re, im) = row.split_at(bins);
                for (k, s) in spec.iter_mut().enumerate() {
                    // The inverse FFT counts each interior bin twice (with
                    // its mirror); DC and Nyquist once, without imaginary part.
                    *s = if k == 0 || 2 * k == n {
                        Complex::new(re[k], T::zero())
                    } else {
                        Complex::new(re[k] * half, im[k] * half)
                    };
                }
                plan.process_with_scratch(&mut spec, &mut buf, &mut scratch)
                    .map_err(|e| candle_core::Error::Msg(format!("inverse fft: {e}")))?;
                for ((o, &b), &w) in o.iter_mut().zip(&buf).zip(&dft.window) {
                    *o = b * T::of(w);
                }
            }
            Ok::<_, candle_core::Error>(())
        })?;
    Ok(out)
}

/// `x A` (or `g A^T` when `adjoint`) on the last axis.
struct DftOp {
    dft: Arc<WindowedDft>,
    adjoint: bool,
}

impl CustomOp1 for DftOp {
    fn name(&self) -> &'static str {
        if self.adjoint {
            "melvae-dft-adjoint"
        } else {
            "melvae-dft"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, bins) = (self.dft.n, self.dft.bins());
        let (inner, outer) = if self.adjoint {
            (2 * bins, n)
        } else {
            (n, 2 * bins)
        };
        let dims = l.shape().dims();
        if dims.last() != Some(&inner) {
            candle_core::bail!("{}: last axis must be {inner}, got {dims:?}", self.name());
        }
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("{}: input must be contiguous", self.name());
        };
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(outer);
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[start..end])?),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(&v[start..end])?),
            other => {
                candle_core::bail!("{}: f32 or f64 only, got {:?}", self.name(), other.dtype())
            }
        };
        Ok((out, Shape::from(out_dims)))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(if self.adjoint {
            self.dft.analysis(dy)?
        } else {
            self.dft.adjoint(dy)?
        }))
    }
}

impl DftOp {
    fn run<T: DftElem>(&self, x: &[T]) -> candle_core::Result<Vec<T>> {
        if self.adjoint {
            adjoint_rows(&self.dft, x)
        } else {
            analysis_rows(&self.dft, x)
        }
    }
}
