//! Spectrogram pictures: a colour-mapped (log-)mel spectrogram with a
//! frequency axis in Hz and a time axis in seconds.

use std::path::Path;

use ndarray::Array2;
use plotters::prelude::*;

use super::{magma, render, text, tick_label, write_png, Axis, Warp, FG};
use crate::mel::{hz_to_mel, mel_to_hz, LogScale, MelConfig, MelScale};
use crate::{Error, Result};

/// Room around the plot: left (a margin for the rotated axis name, which
/// plotters draws a few pixels left of its label area, and the label area),
/// right, top, bottom (tick labels and the axis name), pixels.
const MARGIN_LEFT: u32 = 8;
const LEFT: u32 = MARGIN_LEFT + 62;
const RIGHT: u32 = 14;
const TOP: u32 = 10;
const BOTTOM: u32 = 44;

/// How to draw a mel spectrogram `[n_mels, frames]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpectrogramImage {
    /// Sample rate of the audio, for the time axis.
    pub sample_rate: u32,
    /// Hop between frames, for the time axis.
    pub hop_length: usize,
    /// Mel scale and band edges, for the frequency axis.
    pub scale: MelScale,
    /// Lowest mel filter edge, Hz.
    pub fmin: f32,
    /// Highest mel filter edge, Hz.
    pub fmax: f32,
    /// Values below `max - range` are drawn as the darkest colour. `None`
    /// spans the data's full range.
    pub range: Option<f32>,
}

impl SpectrogramImage {
    /// Axes of `cfg`'s mels, with an 80 dB dynamic range converted to the
    /// units of its log (e.g. `ln(1e4)` for the natural log of a magnitude).
    pub fn for_mel(cfg: &MelConfig) -> Self {
        // Decibels per unit of the stored value.
        let db_per_unit = 10.0 * cfg.power;
        let range = match cfg.log {
            LogScale::None => None,
            LogScale::Ln { .. } => Some(80.0 / (db_per_unit / std::f32::consts::LN_10)),
            LogScale::Log10 { .. } => Some(80.0 / db_per_unit),
        };
        Self {
            sample_rate: cfg.sample_rate,
            hop_length: cfg.stft.hop_length,
            scale: cfg.scale,
            fmin: cfg.fmin,
            fmax: cfg.fmax.unwrap_or(cfg.sample_rate as f32 / 2.0),
            range,
        }
    }

    /// Renders `mel` (`[n_mels, frames]`) to `(width, height, rgb8 pixels)`:
    /// each value a block of 1-4 x 1-4 pixels, magma-coloured, with a time
    /// axis in seconds and a frequency axis in Hz placed by the mel scale.
    pub fn render(&self, mel: &Array2<f32>) -> Result<(u32, u32, Vec<u8>)> {
        let (n_mels, frames) = mel.dim();
        if n_mels == 0 || frames == 0 {
            return Err(Error::shape(
                "spectrogram",
                "[n_mels >= 1, frames >= 1]",
                format!("{:?}", mel.dim()),
            ));
        }
        let xs = 768usize.div_ceil(frames).clamp(1, 4);
        let ys = 320usize.div_ceil(n_mels).clamp(1, 4);
        let (pw, ph) = ((frames * xs) as u32, (n_mels * ys) as u32);
        let raster = self.raster(mel, xs, ys);
        let (time, freq) = (self.time_axis(frames, pw), self.freq_axis(n_mels, ph));
        let (w, h) = (LEFT + pw + RIGHT, TOP + ph + BOTTOM);
        let px = render(w, h, "spectrogram", |root| {
            let mut chart = ChartBuilder::on(root)
                .margin_top(TOP)
                .margin_right(RIGHT)
                .margin_left(MARGIN_LEFT)
                .y_label_area_size(LEFT - MARGIN_LEFT)
                .x_label_area_size(BOTTOM)
                .build_cartesian_2d(time, freq)?;
            chart.plotting_area().strip_coord_spec().draw(
                &BitMapElement::with_owned_buffer((0, 0), (pw, ph), raster).ok_or("raster size")?,
            )?;
            chart
                .configure_mesh()
                .disable_mesh()
                .axis_style(FG)
                .label_style(text(13.0))
                .axis_desc_style(text(14.0))
                .x_desc("time (s)")
                .y_desc("frequency (Hz)")
                .draw()?;
            Ok(())
        })?;
        Ok((w, h, px))
    }

    /// The colour-mapped values, `frames * xs` x `n_mels * ys` RGB pixels,
    /// lowest band at the bottom.
    fn raster(&self, mel: &Array2<f32>, xs: usize, ys: usize) -> Vec<u8> {
        let (n_mels, frames) = mel.dim();
        let finite = mel.iter().copied().filter(|v| v.is_finite());
        let vmax = finite.clone().fold(f32::NEG_INFINITY, f32::max);
        let dmin = finite.fold(f32::INFINITY, f32::min);
        let vmin = match self.range {
            Some(r) => dmin.max(vmax - r),
            None => dmin,
        };
        let span = (vmax - vmin).max(f32::MIN_POSITIVE);
        let (pw, ph) = (frames * xs, n_mels * ys);
        let mut px = Vec::with_capacity(pw * ph * 3);
        for y in 0..ph {
            let m = n_mels - 1 - y / ys;
            for x in 0..pw {
                let v = mel[[m, x / xs]];
                px.extend(if v.is_finite() {
                    magma(((v - vmin) / span).clamp(0.0, 1.0))
                } else {
                    [0, 0, 0]
                });
            }
        }
        px
    }

    /// Seconds over `frames` frames drawn `pw` pixels wide; ticks every
    /// 0.1 ... 600 s, at most 8 of them and at least 48 pixels apart.
    fn time_axis(&self, frames: usize, pw: u32) -> Axis {
        let secs = frames as f64 * self.hop_length as f64 / self.sample_rate as f64;
        let px_per_sec = pw as f64 / secs;
        let step = [
            0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
        ]
        .into_iter()
        .find(|s| secs / s <= 8.0 && s * px_per_sec >= 48.0)
        .unwrap_or(600.0);
        let ticks = (0..)
            .map(|k| k as f64 * step)
            .take_while(|t| *t < secs)
            .collect();
        Axis {
            lo: 0.0,
            hi: secs,
            values: 0.0..secs,
            warp: Warp::Linear,
            cells: true,
            ticks,
            label: tick_label,
        }
    }

    /// Hz over `n_mels` bands drawn `ph` pixels high: band `i` is centred at
    /// mel `mlo + (i + 1) (mhi - mlo) / (n + 1)` and fills `ph / n_mels` rows.
    /// Ticks at round frequencies, at least 16 pixels apart.
    fn freq_axis(&self, n_mels: usize, ph: u32) -> Axis {
        let (mlo, mhi) = (
            hz_to_mel(self.fmin as f64, self.scale),
            hz_to_mel(self.fmax as f64, self.scale),
        );
        let d = (mhi - mlo) / (n_mels + 1) as f64;
        let (lo, hi) = (mlo + 0.5 * d, mlo + (n_mels as f64 + 0.5) * d);
        let mut axis = Axis {
            lo,
            hi,
            values: mel_to_hz(lo, self.scale)..mel_to_hz(hi, self.scale),
            warp: Warp::Mel(self.scale),
            cells: true,
            ticks: Vec::new(),
            label: |hz| {
                if hz >= 1e3 {
                    format!("{}k", hz / 1e3)
                } else {
                    format!("{hz}")
                }
            },
        };
        let mut last = f64::NEG_INFINITY;
        for hz in [
            0.0, 250.0, 500.0, 1e3, 2e3, 3e3, 4e3, 6e3, 8e3, 12e3, 16e3, 20e3, 24e3,
        ] {
            let f = axis.frac(hz);
            if !(0.0..1.0).contains(&f) || (f - last) * (ph as f64) < 16.0 {
                continue;
            }
            last = f;
            axis.ticks.push(hz);
        }
        axis
    }

    /// Renders several mels of equal size one above the other (e.g. input
    /// and reconstruction) into one PNG at `path`, atomically; all share the
    /// colour range of the first.
    pub fn save_png_stack(&self, path: impl AsRef<Path>, mels: &[&Array2<f32>]) -> Result<()> {
        let first = mels
            .first()
            .ok_or_else(|| Error::invalid("spectrogram stack", "no mels"))?;
        let finite = first.iter().copied().filter(|v| v.is_finite());
        let vmax = finite.clone().fold(f32::NEG_INFINITY, f32::max);
        let dmin = finite.fold(f32::INFINITY, f32::min);
        let shared = Self {
            range: Some(vmax - self.range.map_or(dmin, |r| dmin.max(vmax - r))),
            ..*self
        };
        let mut out: Vec<u8> = Vec::new();
        let (mut w0, mut h_total) = (0u32, 0u32);
        for (i, m) in mels.iter().enumerate() {
            if m.dim() != first.dim() {
                return Err(Error::shape(
                    format!("spectrogram {i} of the stack"),
                    format!("{:?}", first.dim()),
                    format!("{:?}", m.dim()),
                ));
            }
            // Clamp to the first mel's range so colours compare.
            let clamped = m.mapv(|v| v.min(vmax));
            let (w, h, px) = shared.render(&clamped)?;
            w0 = w;
            h_total += h;
            out.extend(px);
        }
        write_png(path.as_ref(), w0, h_total, &out)
    }

    /// Renders `mel` and writes it to `path` as PNG, atomically.
    pub fn save_png(&self, path: impl AsRef<Path>, mel: &Array2<f32>) -> Result<()> {
        let (w, h, px) = self.render(mel)?;
        write_png(path.as_ref(), w, h, &px)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ops::Range;

    #[test]
    fn renders_a_gradient_with_axes() {
        let cfg = MelConfig::vocos_24k();
        let mel = Array2::from_shape_fn((100, 200), |(m, t)| -10.0 + (m + t) as f32 * 0.05);
        let img = SpectrogramImage::for_mel(&cfg);
        let (w, h, px) = img.render(&mel).unwrap();
        let (pw, ph) = (200 * 4, 100 * 4);
        assert_eq!((w, h), (LEFT + pw + RIGHT, TOP + ph + BOTTOM));
        assert_eq!(px.len(), (w * h * 3) as usize);
        let at = |x: u32, y: u32| {
            let i = ((y * w + x) * 3) as usize;
            [px[i], px[i + 1], px[i + 2]]
        };
        // Bottom-left of the plot is the lowest value (darkest), top-right
        // the highest; the raster fills the plotting area exactly.
        assert_eq!(at(LEFT, TOP + ph - 1), magma(0.0));
        assert_eq!(at(LEFT + pw - 1, TOP), magma(1.0));
        // Tick labels and axis names: text-coloured pixels left of and
        // below the plot.
        let texty = |xr: Range<u32>, yr: Range<u32>| {
            yr.flat_map(|y| xr.clone().map(move |x| (x, y)))
                .filter(|&(x, y)| at(x, y).iter().all(|&c| c > 150))
                .count()
        };
        assert!(texty(0..LEFT - 2, TOP..TOP + ph) > 200);
        assert!(texty(LEFT..LEFT + pw, TOP + ph + 2..h) > 80);
        let dir = tempfile::tempdir().unwrap();
        img.save_png(dir.path().join("m.png"), &mel).unwrap();
        let bytes = std::fs::read(dir.path().join("m.png")).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert_eq!(&bytes[16..24], [w.to_be_bytes(), h.to_be_bytes()].concat());
    }

    #[test]
    fn ticks_fall_on_round_values_in_range() {
        let img = SpectrogramImage::for_mel(&MelConfig::vocos_24k());
        let t = img.time_axis(559, 559 * 2);
        assert_eq!(t.ticks, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let f = img.freq_axis(100, 400);
        assert_eq!(f.ticks.first(), Some(&250.0));
        assert_eq!(f.ticks.last(), Some(&8e3));
        // The 12 kHz edge of the top band lies above the axis' end.
        assert!(f.frac(12e3) > 1.0 && f.frac(8e3) < 1.0);
    }

    #[test]
    fn empty_nan_and_stack_inputs() {
        let img = SpectrogramImage::for_mel(&MelConfig::vocos_24k());
        let e = img.render(&Array2::zeros((100, 0))).unwrap_err();
        assert!(e.to_string().contains("spectrogram"), "{e}");
        let mut mel = Array2::zeros((4, 4));
        mel[[0, 0]] = f32::NAN;
        assert!(img.render(&mel).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.png");
        let a = Array2::from_shape_fn((80, 100), |(m, t)| (m * t) as f32 * 0.01);
        img.save_png_stack(&p, &[&a, &a]).unwrap();
        let (w, h, _) = img.render(&a).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(
            &bytes[16..24],
            [w.to_be_bytes(), (2 * h).to_be_bytes()].concat()
        );
        let e = img
            .save_png_stack(&p, &[&a, &Array2::zeros((80, 3))])
            .unwrap_err();
        assert!(e.to_string().contains("spectrogram 1"), "{e}");
        let e = img
            .save_png(dir.path().join("missing/s.png"), &a)
            .unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
