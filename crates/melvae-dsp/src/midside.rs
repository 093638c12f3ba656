//! Mid/side conversion for stereo audio.
//!
//! `mid = (left + right) / 2`, `side = (left - right) / 2`; the inverse is
//! `left = mid + side`, `right = mid - side`, so the pair round-trips exactly.
//! (auraloss' `SumAndDifferenceSTFTLoss` uses the unscaled sum and difference,
//! which is `2 * mid` and `2 * side`.)

use candle_core::Tensor;

use crate::{Error, Result};

/// `(mid, side)` of a stereo pair of equal length.
pub fn to_mid_side(left: &[f32], right: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
    check_pair("right", left.len(), right.len())?;
    Ok(left
        .iter()
        .zip(right)
        .map(|(l, r)| ((l + r) * 0.5, (l - r) * 0.5))
        .unzip())
}

/// `(left, right)` from mid and side of equal length.
pub fn from_mid_side(mid: &[f32], side: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
    check_pair("side", mid.len(), side.len())?;
    Ok(mid.iter().zip(side).map(|(m, s)| (m + s, m - s)).unzip())
}

fn check_pair(second: &str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::shape(
            second,
            format!("{a} samples"),
            format!("{b} samples"),
        ));
    }
    Ok(())
}

fn split_stereo(x: &Tensor, what: &str) -> Result<(Tensor, Tensor)> {
    match x.dims() {
        [_, 2, _] => Ok((x.narrow(1, 0, 1)?, x.narrow(1, 1, 1)?)),
        d => Err(Error::shape(what, "[batch, 2, samples]", format!("{d:?}"))),
    }
}

/// Left/right `[batch, 2, samples]` to mid/side `[batch, 2, samples]`
/// (channel 0 mid, channel 1 side). Differentiable.
pub fn to_mid_side_tensor(x: &Tensor) -> Result<Tensor> {
    let (l, r) = split_stereo(x, "stereo tensor")?;
    Ok(Tensor::cat(&[((&l + &r)? * 0.5)?, ((&l - &r)? * 0.5)?], 1)?)
}

/// Mid/side `[batch, 2, samples]` back to left/right `[batch, 2, samples]`.
pub fn from_mid_side_tensor(x: &Tensor) -> Result<Tensor> {
    let (m, s) = split_stereo(x, "mid/side tensor")?;
    Ok(Tensor::cat(&[(&m + &s)?, (&m - &s)?], 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn round_trip_host_and_tensor() {
        let l = vec![0.5, -0.25, 1.0];
        let r = vec![0.5, 0.25, -1.0];
        let (m, s) = to_mid_side(&l, &r).unwrap();
        assert_eq!(m, vec![0.5, 0.0, 0.0]);
        assert_eq!(s, vec![0.0, -0.25, 1.0]);
        assert_eq!(from_mid_side(&m, &s).unwrap(), (l.clone(), r.clone()));
        let x = Tensor::from_vec([l, r].concat(), (1, 2, 3), &Device::Cpu).unwrap();
        let ms = to_mid_side_tensor(&x).unwrap();
        assert_eq!(
            ms.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [m, s].concat()
        );
        let back = from_mid_side_tensor(&ms).unwrap();
        assert_eq!(back.to_vec3::<f32>().unwrap(), x.to_vec3::<f32>().unwrap());
    }

    #[test]
    fn mismatches_are_named() {
        let e = to_mid_side(&[0.0; 3], &[0.0; 2]).unwrap_err();
        assert!(e.to_string().contains("right"), "{e}");
        let x = Tensor::zeros((1, 3, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = to_mid_side_tensor(&x).unwrap_err();
        assert!(e.to_string().contains("[1, 3, 4]"), "{e}");
    }
}
