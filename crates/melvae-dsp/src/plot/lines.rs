//! Line plots of training curves: loss against step.

use std::path::Path;

use plotters::prelude::*;

use super::{render, text, tick_label, write_png, Area, Axis, DrawResult, Warp, BG, FG, GRID};
use crate::{Error, Result};

/// Picture size, pixels.
const W: u32 = 720;
const H: u32 = 400;

/// Series colours, in order (Okabe-Ito, legible on the dark background).
const COLOURS: [RGBColor; 6] = [
    RGBColor(86, 180, 233),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(240, 228, 66),
    RGBColor(204, 121, 167),
    RGBColor(213, 94, 0),
];

/// One named series of a [`line_plot_png`].
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// `(x, y)` points in order of `x`; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

/// Draws `series` as lines against the step on shared axes (x labelled
/// `step`, y `loss`, round-valued ticks, a legend in each series' colour)
/// into a 720 x 400 RGB image, optionally with a logarithmic y axis
/// (non-positive values skipped). Returns `(width, height, rgb8 pixels)`.
pub fn line_plot(series: &[Series], log_y: bool) -> Result<(u32, u32, Vec<u8>)> {
    let pts: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_y || *y > 0.0))
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
    if x1 <= x0 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    // The y range with 4% room above and below, in log10 units for a log axis.
    let ty = |y: f64| if log_y { y.log10() } else { y };
    let (mut y0, mut y1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(ty(p.1)), b.max(ty(p.1)))
    });
    if y1 <= y0 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let pad = 0.04 * (y1 - y0);
    let (y0, y1) = (y0 - pad, y1 + pad);
    // Whole-numbered steps get whole-numbered ticks only.
    let mut xt = linear_ticks(x0, x1, 6);
    if all.iter().all(|p| p.0.fract() == 0.0) {
        xt.retain(|t| t.fract() == 0.0);
    }
    let x = Axis::new(x0..x1, Warp::Linear, xt, step_label);
    let y = if log_y {
        let (lo, hi) = (10f64.powf(y0), 10f64.powf(y1));
        Axis::new(lo..hi, Warp::Log10, log_ticks(lo, hi, 8), tick_label)
    } else {
        Axis::new(y0..y1, Warp::Linear, linear_ticks(y0, y1, 8), tick_label)
    };
    let px = render(W, H, "line plot", |root| draw(root, x, y, series, &pts))?;
    Ok((W, H, px))
}

/// Draws the axes, the lines and the legend.
fn draw(root: &Area, x: Axis, y: Axis, series: &[Series], pts: &[Vec<(f64, f64)>]) -> DrawResult {
    let mut chart = ChartBuilder::on(root)
        .margin_top(14)
        .margin_right(18)
        // Room for the rotated axis name, which plotters draws a few pixels
        // left of its label area.
        .margin_left(8)
        .x_label_area_size(44)
        .y_label_area_size(62)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .bold_line_style(GRID)
        .max_light_lines(0)
        .axis_style(FG)
        .label_style(text(13.0))
        .axis_desc_style(text(14.0))
        .x_desc("step")
        .y_desc("loss")
        .draw()?;
    for (k, (s, p)) in series.iter().zip(pts).enumerate() {
        if p.is_empty() {
            continue;
        }
        let c = COLOURS[k % COLOURS.len()];
        // A lone point gets a dot, since a line needs two.
        let (style, size) = match p.len() {
            1 => (c.filled(), 3),
            _ => (c.stroke_width(2), 0),
        };
        chart
            .draw_series(LineSeries::new(p.iter().copied(), style).point_size(size))?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(BG.mix(0.85))
        .border_style(GRID)
        .label_font(text(13.0))
        .draw()?;
    Ok(())
}

/// A step label: whole numbers in full, others as [`tick_label`].
fn step_label(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e12 {
        format!("{v:.0}")
    } else {
        tick_label(v)
    }
}

/// At most `max` round ticks (1, 2 or 5 times a power of ten apart) in
/// `[lo, hi]`.
fn linear_ticks(lo: f64, hi: f64, max: usize) -> Vec<f64> {
    let raw = (hi - lo) / max.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| (hi - lo) / s <= max as f64)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    (first..=last)
        .map(|k| decimal(k as f64 * step, decimals))
        .collect()
}

/// `v` rounded to `decimals` places through its decimal form, so that ticks
/// are the numbers they print as (0.3, not 0.30000000000000004), and -0 is 0.
fn decimal(v: f64, decimals: usize) -> f64 {
    format!("{v:.decimals$}").parse::<f64>().unwrap_or(v) + 0.0
}

/// Ticks for a log axis over `[lo, hi]`: powers of ten, or 1-2-5 or 1-9
/// times them when fewer than three powers fall in range, at most `max`;
/// round linear ticks when the range is narrower still.
fn log_ticks(lo: f64, hi: f64, max: usize) -> Vec<f64> {
    let decades = || (lo.log10().floor() as i32)..=(hi.log10().ceil() as i32);
    let with = |mantissas: &[f64]| -> Vec<f64> {
        decades()
            .flat_map(|e| {
                mantissas.iter().map(move |m| {
                    format!("{m}e{e}")
                        .parse::<f64>()
                        .unwrap_or(m * 10f64.powi(e))
                })
            })
            .filter(|v| (lo..=hi).contains(v))
            .collect()
    };
    let powers = with(&[1.0]);
    if powers.len() > max {
        let every = powers.len().div_ceil(max);
        return powers.into_iter().step_by(every).collect();
    }
    for t in [
        powers,
        with(&[1.0, 2.0, 5.0]),
        with(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]),
    ] {
        if t.len() >= 3 && t.len() <= max {
            return t;
        }
    }
    linear_ticks(lo, hi, max.min(5))
}

/// [`line_plot`] written to `path` as PNG, atomically.
pub fn line_plot_png(path: impl AsRef<Path>, series: &[Series], log_y: bool) -> Result<()> {
    let (w, h, px) = line_plot(series, log_y)?;
    write_png(path.as_ref(), w, h, &px)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!((w, h), (W, H));
            assert_eq!(px.len(), (w * h * 3) as usize);
            // Both series' colours appear, and text: the axis names and ticks.
            let count = |c: RGBColor| px.chunks_exact(3).filter(|p| *p == [c.0, c.1, c.2]).count();
            assert!(count(COLOURS[0]) > 100 && count(COLOURS[1]) > 50);
            assert!(count(FG) > 300);
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.png");
        line_plot_png(&p, std::slice::from_ref(&train), true).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert_eq!(&bytes[16..24], [W.to_be_bytes(), H.to_be_bytes()].concat());
        let e = line_plot_png(dir.path().join("gone/loss.png"), &[train], true).unwrap_err();
        assert!(e.to_string().contains("gone"), "{e}");
        let empty = Series {
            name: "x".into(),
            points: vec![(0.0, f64::NAN)],
        };
        assert!(line_plot(&[empty], false)
            .unwrap_err()
            .to_string()
            .contains("no finite points"));
        // One point is drawn as a dot; only non-positive values on a log axis
        // leave nothing to draw.
        let one = Series {
            name: "val".into(),
            points: vec![(100.0, 0.5)],
        };
        let (_, _, px) = line_plot(&[one], true).unwrap();
        let c = COLOURS[0];
        assert!(px.chunks_exact(3).any(|p| p == [c.0, c.1, c.2]));
        let neg = Series {
            name: "x".into(),
            points: vec![(0.0, -1.0), (1.0, 0.0)],
        };
        assert!(line_plot(&[neg], true).is_err());
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(
            linear_ticks(0.0, 2000.0, 6),
            [0.0, 500.0, 1000.0, 1500.0, 2000.0]
        );
        assert_eq!(
            linear_ticks(0.13, 0.52, 8),
            [0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]
        );
        assert_eq!(
            log_ticks(0.02, 2.5, 8),
            [0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
        );
        assert_eq!(
            log_ticks(1e-4, 10.0, 8),
            [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
        );
        assert_eq!(log_ticks(0.15, 0.25, 8), [0.16, 0.18, 0.2, 0.22, 0.24]);
    }
}
