//! Editing latents for exploration: scale and shift (all channels or
//! chosen ones), linear interpolation between two clips' latents, and
//! spherical interpolation between global latents (the GPT-VAE's).
//!
//! Layouts differ by family, so each function takes the axis of the latent
//! channels (`1` for the waveform VAE's `[batch, latent_dim, frames]`, `2`
//! for the mel VAE's `[batch, frames, latent_dim]`) or of time.

use candle_core::Tensor;

use crate::error::ensure;
use crate::Result;

/// `z * scale + shift` on the latent channels in `dims` (all when empty).
#[derive(Debug, Clone, PartialEq)]
pub struct LatentEdit {
    /// Factor applied first.
    pub scale: f64,
    /// Offset added after scaling.
    pub shift: f64,
    /// Latent channels to edit; empty edits all.
    pub dims: Vec<usize>,
}

impl Default for LatentEdit {
    fn default() -> Self {
        Self {
            scale: 1.0,
            shift: 0.0,
            dims: Vec::new(),
        }
    }
}

impl LatentEdit {
    /// Whether it changes anything.
    pub fn is_identity(&self) -> bool {
        self.scale == 1.0 && self.shift == 0.0
    }

    /// Applies the edit to `z`, whose latent channels lie on
    /// `channel_axis`; a channel in `dims` past the latent size is an error
    /// naming it.
    pub fn apply(&self, z: &Tensor, channel_axis: usize) -> Result<Tensor> {
        ensure(
            self.scale.is_finite() && self.shift.is_finite(),
            "latent edit",
            || {
                format!(
                    "scale {} and shift {} must be finite",
                    self.scale, self.shift
                )
            },
        )?;
        let n = z.dim(channel_axis)?;
        if let Some(&d) = self.dims.iter().find(|&&d| d >= n) {
            ensure(false, "latent dim", || {
                format!(
                    "{d} is out of range: the latents have {n} channels (0 to {})",
                    n - 1
                )
            })?;
        }
        let edited = z.affine(self.scale, self.shift)?;
        if self.dims.is_empty() {
            return Ok(edited);
        }
        let mut mask = vec![0f32; n];
        for &d in &self.dims {
            mask[d] = 1.0;
        }
        let mut shape = vec![1; z.rank()];
        shape[channel_axis] = n;
        let mask = Tensor::from_vec(mask, shape, z.device())?.to_dtype(z.dtype())?;
        let keep = mask.affine(-1.0, 1.0)?;
        Ok((edited.broadcast_mul(&mask)? + z.broadcast_mul(&keep)?)?)
    }
}

/// `(1 - alpha) a + alpha b`, both cut to the shorter of their lengths on
/// `time_axis` (the other axes must match).
pub fn interpolate(a: &Tensor, b: &Tensor, alpha: f64, time_axis: usize) -> Result<Tensor> {
    ensure(alpha.is_finite(), "interpolation alpha", || {
        format!("must be finite, got {alpha}")
    })?;
    let n = a.dim(time_axis)?.min(b.dim(time_axis)?);
    let (a, b) = (a.narrow(time_axis, 0, n)?, b.narrow(time_axis, 0, n)?);
    let (mut da, mut db) = (a.dims().to_vec(), b.dims().to_vec());
    da.remove(time_axis);
    db.remove(time_axis);
    ensure(da == db, "interpolated latents", || {
        format!(
            "shapes {:?} and {:?} differ beyond time",
            a.dims(),
            b.dims()
        )
    })?;
    Ok(((a * (1.0 - alpha))? + (b * alpha)?)?)
}

/// Spherical interpolation between global latents `a` and `b` (each
/// `[batch, dim]`, row by row): along the great circle between their
/// directions, the norm interpolated linearly; `alpha` 0 gives `a`, 1 gives
/// `b` (up to rounding). Rows that are (nearly) parallel or antiparallel
/// fall back to linear interpolation (which, for antiparallel rows, passes
/// near zero).
pub fn slerp(a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    ensure(alpha.is_finite(), "interpolation alpha", || {
        format!("must be finite, got {alpha}")
    })?;
    ensure(
        a.dims() == b.dims() && a.rank() == 2,
        "interpolated latents",
        || {
            format!(
                "need two [batch, dim] of one shape, got {:?} and {:?}",
                a.dims(),
                b.dims()
            )
        },
    )?;
    let (ra, rb): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (
        a.to_dtype(candle_core::DType::F32)?.to_vec2()?,
        b.to_dtype(candle_core::DType::F32)?.to_vec2()?,
    );
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let rows: Vec<f32> = ra
        .iter()
        .zip(&rb)
        .flat_map(|(x, y)| {
            let (nx, ny) = (norm(x), norm(y));
            let dot: f64 = x
                .iter()
                .zip(y)
                .map(|(p, q)| f64::from(*p) * f64::from(*q))
                .sum();
            let cos = if nx > 0.0 && ny > 0.0 {
                (dot / (nx * ny)).clamp(-1.0, 1.0)
            } else {
                1.0
            };
            let omega = cos.acos();
            let (wa, wb) = if omega.sin().abs() < 1e-6 {
                (1.0 - alpha, alpha)
            } else {
                // Unit directions slerped, then scaled to the lerped norm.
                let target = (1.0 - alpha) * nx + alpha * ny;
                let sa = ((1.0 - alpha) * omega).sin() / omega.sin() / nx * target;
                let sb = (alpha * omega).sin() / omega.sin() / ny * target;
                (sa, sb)
            };
            x.iter()
                .zip(y)
                .map(move |(p, q)| (wa * f64::from(*p) + wb * f64::from(*q)) as f32)
                .collect::<Vec<_>>()
        })
        .collect();
    Ok(Tensor::from_vec(rows, a.dims(), a.device())?.to_dtype(a.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn slerp_reaches_both_ends_and_keeps_to_the_sphere() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[2.0f32, 0.0], [1.0, 1.0]], &dev).unwrap();
        let b = Tensor::new(&[[0.0f32, 2.0], [2.0, 2.0]], &dev).unwrap();
        let close = |x: &Tensor, y: &Tensor| {
            let d: Vec<Vec<f32>> = (x - y).unwrap().abs().unwrap().to_vec2().unwrap();
            d.iter().flatten().all(|v| *v < 1e-5)
        };
        assert!(close(&slerp(&a, &b, 0.0).unwrap(), &a));
        assert!(close(&slerp(&a, &b, 1.0).unwrap(), &b));
        // Halfway between orthogonal vectors of norm 2: norm 2, at 45 degrees.
        let m: Vec<Vec<f32>> = slerp(&a, &b, 0.5).unwrap().to_vec2().unwrap();
        let r = 2f32.sqrt();
        assert!(
            (m[0][0] - r).abs() < 1e-5 && (m[0][1] - r).abs() < 1e-5,
            "{m:?}"
        );
        // Parallel rows: linear.
        assert!(
            (m[1][0] - 1.5).abs() < 1e-5 && (m[1][1] - 1.5).abs() < 1e-5,
            "{m:?}"
        );
        let e = slerp(
            &a,
            &Tensor::zeros((1, 2), candle_core::DType::F32, &dev).unwrap(),
            0.5,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("interpolated latents"), "{e}");
    }

    fn z() -> Tensor {
        // [1, 3 channels, 4 frames]
        Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 3, 4))
            .unwrap()
    }

    #[test]
    fn edits_only_the_chosen_channels() {
        let e = LatentEdit {
            scale: 2.0,
            shift: 1.0,
            dims: vec![1],
        };
        let y = e.apply(&z(), 1).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(y[0][0], vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(y[0][1], vec![9.0, 11.0, 13.0, 15.0]);
        assert_eq!(y[0][2], vec![8.0, 9.0, 10.0, 11.0]);
        // The mel VAE layout: channels last.
        let zt = z().transpose(1, 2).unwrap();
        let yt = e.apply(&zt, 2).unwrap().transpose(1, 2).unwrap();
        assert_eq!(yt.to_vec3::<f32>().unwrap(), y);
        let all = LatentEdit {
            shift: -1.0,
            ..Default::default()
        };
        let y = all.apply(&z(), 1).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(y[0][2][0], 7.0);
        let e = LatentEdit {
            dims: vec![3],
            ..Default::default()
        }
        .apply(&z(), 1)
        .unwrap_err()
        .to_string();
        assert!(e.contains("latent dim") && e.contains("3 channels"), "{e}");
    }

    #[test]
    fn interpolation_cuts_to_the_shorter_clip() {
        let a = z();
        let b = (z().narrow(2, 0, 3).unwrap() * 3.0).unwrap();
        let m = interpolate(&a, &b, 0.5, 2).unwrap();
        assert_eq!(m.dims(), &[1, 3, 3]);
        assert_eq!(m.to_vec3::<f32>().unwrap()[0][1], vec![8.0, 10.0, 12.0]);
        assert_eq!(
            interpolate(&a, &b, 0.0, 2)
                .unwrap()
                .to_vec3::<f32>()
                .unwrap()[0][0],
            vec![0.0, 1.0, 2.0]
        );
        let c = Tensor::zeros((1, 2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = interpolate(&a, &c, 0.5, 2).unwrap_err().to_string();
        assert!(e.contains("differ beyond time"), "{e}");
    }
}
