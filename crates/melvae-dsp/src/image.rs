//! Spectrogram pictures: a colour-mapped (log-)mel spectrogram with a
//! frequency axis in Hz and a time axis in seconds, written as PNG.

use std::path::Path;

use ndarray::Array2;

use crate::fsutil::atomic_write;
use crate::mel::{hz_to_mel, LogScale, MelConfig, MelScale};
use crate::{Error, Result};

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

    /// Renders `mel` (`[n_mels, frames]`) to `(width, height, rgb8 pixels)`.
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
        let (pw, ph) = (frames * xs, n_mels * ys);
        let (left, right, top, bottom) = (48usize, 10usize, 8usize, 26usize);
        let (w, h) = (left + pw + right, top + ph + bottom);
        let mut img = Canvas {
            w,
            h,
            px: vec![24; w * h * 3],
        };

        let finite = mel.iter().copied().filter(|v| v.is_finite());
        let vmax = finite.clone().fold(f32::NEG_INFINITY, f32::max);
        let dmin = finite.fold(f32::INFINITY, f32::min);
        let vmin = match self.range {
            Some(r) => dmin.max(vmax - r),
            None => dmin,
        };
        let span = (vmax - vmin).max(f32::MIN_POSITIVE);
        for y in 0..ph {
            let m = n_mels - 1 - y / ys;
            for x in 0..pw {
                let v = mel[[m, x / xs]];
                let c = if v.is_finite() {
                    magma(((v - vmin) / span).clamp(0.0, 1.0))
                } else {
                    [0, 0, 0]
                };
                img.set(left + x, top + y, c);
            }
        }
        let fg = [210, 210, 210];
        for y in top..top + ph + 1 {
            img.set(left - 1, y, fg);
        }
        for x in left - 1..left + pw {
            img.set(x, top + ph, fg);
        }

        // Frequency ticks at round frequencies, placed by the mel scale.
        let (mlo, mhi) = (
            hz_to_mel(self.fmin as f64, self.scale),
            hz_to_mel(self.fmax as f64, self.scale),
        );
        let mut last_y = usize::MAX;
        for hz in [
            0.0, 250.0, 500.0, 1e3, 2e3, 3e3, 4e3, 6e3, 8e3, 12e3, 16e3, 20e3, 24e3,
        ] {
            if hz < self.fmin as f64 || hz > self.fmax as f64 {
                continue;
            }
            // Band i is centred at mel mlo + (i + 1) (mhi - mlo) / (n + 1).
            let band = (hz_to_mel(hz, self.scale) - mlo) / (mhi - mlo) * (n_mels + 1) as f64 - 1.0;
            let yf = (n_mels as f64 - 0.5 - band) * ys as f64;
            if !(0.0..ph as f64).contains(&yf) {
                continue;
            }
            let y = top + yf as usize;
            if last_y != usize::MAX && last_y.abs_diff(y) < 14 {
                continue;
            }
            last_y = y;
            for x in left - 5..left - 1 {
                img.set(x, y, fg);
            }
            let label = if hz >= 1e3 {
                format!("{}k", hz / 1e3)
            } else {
                format!("{hz}")
            };
            let tw = label.len() * 8;
            img.text(left - 7 - tw, y.saturating_sub(5), &label, fg);
        }
        img.text(2, top, "Hz", fg);

        // Time ticks every 0.1 ... 60 s, at most ~8 of them.
        let secs = frames as f64 * self.hop_length as f64 / self.sample_rate as f64;
        let step = [
            0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
        ]
        .into_iter()
        .find(|s| secs / s <= 8.0)
        .unwrap_or(600.0);
        let px_per_sec =
            pw as f64 * self.sample_rate as f64 / (frames as f64 * self.hop_length as f64);
        let mut k = 0;
        loop {
            let t = k as f64 * step;
            let x = left + (t * px_per_sec).round() as usize;
            if x >= left + pw {
                break;
            }
            for y in top + ph..top + ph + 4 {
                img.set(x, y, fg);
            }
            let label = format!("{}s", (t * 10.0).round() / 10.0);
            let tw = label.len() * 8;
            img.text(
                (x + 1).saturating_sub(tw / 2).max(left.saturating_sub(8)),
                top + ph + 7,
                &label,
                fg,
            );
            k += 1;
        }
        Ok((w as u32, h as u32, img.px))
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

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < self.w && y < self.h {
            let i = (y * self.w + x) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Draws `s` with a 3x5 pixel font scaled 2x (8 px advance).
    fn text(&mut self, x: usize, y: usize, s: &str, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(x + i * 8 + col * 2 + dx, y + r * 2 + dy, c);
                        }
                    }
                }
            }
        }
    }
}

fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'k' => [4, 5, 6, 5, 5],
        'H' => [5, 5, 7, 5, 5],
        'z' => [0, 7, 1, 4, 7],
        's' => [0, 3, 6, 1, 6],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '/' => [1, 1, 2, 4, 4],
        '_' => [0, 0, 0, 0, 7],
        ':' => [0, 2, 0, 2, 0],
        // Other letters in capitals (3x5 has no room for lower case).
        c if c.is_ascii_alphabetic() => match c.to_ascii_uppercase() {
            'A' => [2, 5, 7, 5, 5],
            'B' => [6, 5, 6, 5, 6],
            'C' => [3, 4, 4, 4, 3],
            'D' => [6, 5, 5, 5, 6],
            'E' => [7, 4, 6, 4, 7],
            'F' => [7, 4, 6, 4, 4],
            'G' => [3, 4, 5, 5, 3],
            'I' => [7, 2, 2, 2, 7],
            'J' => [1, 1, 1, 5, 2],
            'K' => [5, 5, 6, 5, 5],
            'L' => [4, 4, 4, 4, 7],
            'M' => [5, 7, 7, 5, 5],
            'N' => [6, 5, 5, 5, 5],
            'O' => [2, 5, 5, 5, 2],
            'P' => [6, 5, 6, 4, 4],
            'Q' => [2, 5, 5, 6, 3],
            'R' => [6, 5, 6, 5, 5],
            'S' => [3, 4, 2, 1, 6],
            'T' => [7, 2, 2, 2, 2],
            'U' => [5, 5, 5, 5, 7],
            'V' => [5, 5, 5, 5, 2],
            'W' => [5, 5, 7, 7, 5],
            'X' => [5, 5, 2, 5, 5],
            'Y' => [5, 5, 2, 2, 2],
            'Z' => [7, 1, 2, 4, 7],
            _ => [5, 5, 7, 5, 5], // 'H'
        },
        _ => [0; 5],
    }
}

/// One named series of a [`line_plot_png`].
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text (letters are drawn in capitals).
    pub name: String,
    /// `(x, y)` points in order of `x`; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

/// Draws `series` as lines on shared axes (ticks labelled with their values,
/// a legend in each series' colour) into an RGB image, optionally with a
/// logarithmic y axis (non-positive values skipped). Returns
/// `(width, height, rgb8 pixels)`.
pub fn line_plot(series: &[Series], log_y: bool) -> Result<(u32, u32, Vec<u8>)> {
    const COLOURS: [[u8; 3]; 6] = [
        [86, 180, 233],
        [230, 159, 0],
        [0, 158, 115],
        [240, 228, 66],
        [204, 121, 167],
        [213, 94, 0],
    ];
    let ty = |y: f64| if log_y { y.log10() } else { y };
    let pts: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_y || *y > 0.0))
                .map(|&(x, y)| (x, ty(y)))
                .collect()
        })
        .collect();
    let all: Vec<&(f64, f64)> = pts.iter().flatten().collect();
    if all.is_empty() {
        return Err(Error::invalid("line plot", "no finite points to draw"));
    }
    let (mut x0, mut x1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if x1 <= x0 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    if y1 <= y0 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let (w, h) = (720usize, 400usize);
    let (left, right, top, bottom) = (72usize, 16usize, 16usize, 30usize);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let mut img = Canvas {
        w,
        h,
        px: vec![24; w * h * 3],
    };
    let fg = [210, 210, 210];
    let grid = [60, 60, 60];
    let px = |x: f64| left as f64 + (x - x0) / (x1 - x0) * (pw - 1) as f64;
    let py = |y: f64| top as f64 + (1.0 - (y - y0) / (y1 - y0)) * (ph - 1) as f64;
    let label = |v: f64| -> String {
        let v = if log_y { 10f64.powf(v) } else { v };
        let a = v.abs();
        if a != 0.0 && !(1e-3..1e5).contains(&a) {
            format!("{v:.1e}").to_uppercase()
        } else if a >= 100.0 {
            format!("{v:.0}")
        } else {
            let s = format!("{v:.3}");
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        }
    };
    for i in 0..=4 {
        let yv = y0 + (y1 - y0) * i as f64 / 4.0;
        let y = py(yv).round() as usize;
        for x in left..left + pw {
            img.set(x, y, grid);
        }
        let t = label(yv);
        img.text(
            left.saturating_sub(6 + t.len() * 8),
            y.saturating_sub(5),
            &t,
            fg,
        );
        let xv = x0 + (x1 - x0) * i as f64 / 4.0;
        let x = px(xv).round() as usize;
        for yy in top..top + ph {
            img.set(x, yy, grid);
        }
        let t = if (x1 - x0) >= 4.0 {
            format!("{}", xv.round() as i64)
        } else {
            format!("{xv:.2}")
        };
        img.text(x.saturating_sub(t.len() * 4), top + ph + 8, &t, fg);
    }
    for y in top..top + ph {
        img.set(left, y, fg);
    }
    for x in left..left + pw {
        img.set(x, top + ph - 1, fg);
    }
    for (k, p) in pts.iter().enumerate() {
        let c = COLOURS[k % COLOURS.len()];
        for seg in p.windows(2) {
            let (ax, ay, bx, by) = (px(seg[0].0), py(seg[0].1), px(seg[1].0), py(seg[1].1));
            let n = ((bx - ax).abs().max((by - ay).abs()).ceil() as usize).max(1);
            for j in 0..=n {
                let t = j as f64 / n as f64;
                let (x, y) = (
                    (ax + (bx - ax) * t).round() as usize,
                    (ay + (by - ay) * t).round() as usize,
                );
                img.set(x, y, c);
                img.set(x, y + 1, c);
            }
        }
        if p.len() == 1 {
            let (x, y) = (px(p[0].0).round() as usize, py(p[0].1).round() as usize);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                img.set(x + dx, y + dy, c);
            }
        }
        let name = &series[k].name;
        let lx = (left + pw)
            .saturating_sub(8 * name.len() + 24)
            .max(left + 4);
        let ly = top + 6 + k * 14;
        for x in lx..lx + 14 {
            img.set(x, ly + 4, c);
            img.set(x, ly + 5, c);
        }
        img.text(lx + 18, ly, name, c);
    }
    Ok((w as u32, h as u32, img.px))
}

/// [`line_plot`] written to `path` as PNG, atomically.
pub fn line_plot_png(path: impl AsRef<Path>, series: &[Series], log_y: bool) -> Result<()> {
    let (w, h, px) = line_plot(series, log_y)?;
    write_png(path.as_ref(), w, h, &px)
}

fn write_png(path: &Path, w: u32, h: u32, px: &[u8]) -> Result<()> {
    atomic_write(path, |out| {
        let mut enc = png::Encoder::new(out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(std::io::Error::other)?;
        writer.write_image_data(px).map_err(std::io::Error::other)?;
        writer.finish().map_err(std::io::Error::other)
    })
}

/// The magma colour map (matplotlib), piecewise linear through 9 anchors.
fn magma(v: f32) -> [u8; 3] {
    const A: [[f32; 3]; 9] = [
        [0.0, 0.0, 4.0],
        [28.0, 16.0, 68.0],
        [79.0, 18.0, 123.0],
        [129.0, 37.0, 129.0],
        [181.0, 54.0, 122.0],
        [229.0, 80.0, 100.0],
        [251.0, 135.0, 97.0],
        [254.0, 194.0, 135.0],
        [252.0, 253.0, 191.0],
    ];
    let p = v * 8.0;
    let i = (p.floor() as usize).min(7);
    let f = p - i as f32;
    let mut out = [0u8; 3];
    for (k, o) in out.iter_mut().enumerate() {
        *o = (A[i][k] + (A[i + 1][k] - A[i][k]) * f).round() as u8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_gradient_with_axes() {
        let cfg = MelConfig::vocos_24k();
        let mel = Array2::from_shape_fn((100, 200), |(m, t)| -10.0 + (m + t) as f32 * 0.05);
        let img = SpectrogramImage::for_mel(&cfg);
        let (w, h, px) = img.render(&mel).unwrap();
        assert_eq!(px.len(), (w * h * 3) as usize);
        // Bottom-left of the plot is the lowest value (darkest), top-right the highest.
        let at = |x: usize, y: usize| {
            let i = (y * w as usize + x) * 3;
            [px[i], px[i + 1], px[i + 2]]
        };
        let (left, top) = (48, 8);
        let ph = 100 * 4;
        let pw = 200 * 4;
        assert_eq!(at(left, top + ph - 1), magma(0.0));
        assert_eq!(at(left + pw - 1, top), magma(1.0));
        let dir = tempfile::tempdir().unwrap();
        img.save_png(dir.path().join("m.png"), &mel).unwrap();
        let bytes = std::fs::read(dir.path().join("m.png")).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
    }

    #[test]
    fn empty_and_nan_inputs() {
        let img = SpectrogramImage::for_mel(&MelConfig::vocos_24k());
        let e = img.render(&Array2::zeros((100, 0))).unwrap_err();
        assert!(e.to_string().contains("spectrogram"), "{e}");
        let mut mel = Array2::zeros((4, 4));
        mel[[0, 0]] = f32::NAN;
        assert!(img.render(&mel).is_ok());
    }

    #[test]
    fn line_plot_draws_series_and_rejects_empty() {
        let train = Series {
            name: "total".into(),
            points: (0..50)
                .map(|i| (i as f64, 1.0 / (1.0 + i as f64)))
                .collect(),
        };
        let val = Series {
            name: "val/total".into(),
            points: vec![(10.0, 0.2), (20.0, 0.1), (30.0, f64::NAN), (40.0, 0.05)],
        };
        for log_y in [false, true] {
            let (w, h, px) = line_plot(&[train.clone(), val.clone()], log_y).unwrap();
            assert_eq!(px.len(), (w * h * 3) as usize);
            // Both series' colours appear.
            let has = |c: [u8; 3]| px.chunks_exact(3).any(|p| p == c);
            assert!(has([86, 180, 233]) && has([230, 159, 0]));
        }
        let dir = tempfile::tempdir().unwrap();
        line_plot_png(dir.path().join("loss.png"), &[train], true).unwrap();
        assert_eq!(
            &std::fs::read(dir.path().join("loss.png")).unwrap()[1..4],
            b"PNG"
        );
        let empty = Series {
            name: "x".into(),
            points: vec![(0.0, f64::NAN)],
        };
        assert!(line_plot(&[empty], false)
            .unwrap_err()
            .to_string()
            .contains("no finite points"));
    }
}
