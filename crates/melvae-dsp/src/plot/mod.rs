//! Pictures (feature `plot`): spectrograms and line plots drawn with
//! `plotters` on an RGB bitmap and written as PNG.
//!
//! Text uses an embedded ASCII subset of DejaVu Sans (24 KB, Bitstream Vera
//! licence, `assets/fonts/`) through plotters' `ab_glyph` backend, so no
//! system fonts are needed.

mod lines;
mod spectrogram;

pub use lines::{line_plot, line_plot_png, Series};
pub use spectrogram::SpectrogramImage;

use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::fsutil::atomic_write;
use crate::mel::{hz_to_mel, MelScale};
use crate::{Error, Result};

/// Background, foreground (axes, text) and grid colours.
const BG: RGBColor = RGBColor(24, 24, 24);
const FG: RGBColor = RGBColor(210, 210, 210);
const GRID: RGBColor = RGBColor(60, 60, 60);

/// The family name the embedded font is registered under with plotters.
const FAMILY: &str = "melvae-dejavu-sans";
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-ascii.ttf");

/// Text in the embedded font, `size` pixels, foreground colour.
fn text(size: f64) -> TextStyle<'static> {
    (FAMILY, size).into_font().color(&FG)
}

/// A drawing error as plotters reports it.
type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// The area [`render`] hands its drawing function.
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Runs `draw` on a `w` x `h` RGB canvas filled with the background and
/// returns the pixels; `what` names the picture in errors.
fn render(w: u32, h: u32, what: &str, draw: impl FnOnce(&Area) -> DrawResult) -> Result<Vec<u8>> {
    static FONT_OK: OnceLock<bool> = OnceLock::new();
    if !*FONT_OK.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok()) {
        return Err(Error::plot(what, "the embedded font does not parse"));
    }
    let mut px = vec![0u8; w as usize * h as usize * 3];
    let drawn = (|| -> DrawResult {
        let root = BitMapBackend::with_buffer(&mut px, (w, h)).into_drawing_area();
        root.fill(&BG)?;
        draw(&root)?;
        root.present()?;
        Ok(())
    })();
    drawn.map_err(|e| Error::plot(what, e.to_string()))?;
    Ok(px)
}

/// Writes RGB pixels to `path` as PNG, atomically.
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

/// How an axis places its values.
#[derive(Debug, Clone, Copy)]
enum Warp {
    Linear,
    Log10,
    /// Hz placed by a mel scale.
    Mel(MelScale),
}

impl Warp {
    fn apply(self, v: f64) -> f64 {
        match self {
            Self::Linear => v,
            Self::Log10 => v.log10(),
            Self::Mel(scale) => hz_to_mel(v, scale),
        }
    }
}

/// A plotters axis with our own ticks and labels, linear, logarithmic or
/// mel-scaled. A `cells` axis fills the plotting area's whole extent, where
/// plotters' numeric axes span one pixel less, so that raster cells and the
/// ticks naming their boundaries line up exactly.
struct Axis {
    /// The ends of the axis, warped.
    lo: f64,
    hi: f64,
    /// The ends of the axis as values.
    values: Range<f64>,
    warp: Warp,
    cells: bool,
    /// Tick values.
    ticks: Vec<f64>,
    /// Tick label of a value.
    label: fn(f64) -> String,
}

impl Axis {
    /// A linear or log10 axis over `values` (`lo`, `hi` warped).
    fn new(values: Range<f64>, warp: Warp, ticks: Vec<f64>, label: fn(f64) -> String) -> Self {
        Self {
            lo: warp.apply(values.start),
            hi: warp.apply(values.end),
            values,
            warp,
            cells: false,
            ticks,
            label,
        }
    }

    /// Where `v` lies along the axis, 0 at `lo` and 1 at `hi`.
    fn frac(&self, v: f64) -> f64 {
        (self.warp.apply(v) - self.lo) / (self.hi - self.lo)
    }
}

impl Ranged for Axis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        // plotters hands the first and last pixel (bottom to top for y).
        let f = self.frac(*value);
        let (a, b) = (limit.0 as f64, limit.1 as f64);
        let p = match (self.cells, a <= b) {
            (false, _) => a + f * (b - a),
            (true, true) => a + f * (b - a + 1.0),
            (true, false) => b + (1.0 - f) * (a - b + 1.0),
        };
        if self.cells {
            (p + 1e-6).floor() as i32
        } else {
            p.round() as i32
        }
    }

    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        self.ticks.clone()
    }

    fn range(&self) -> Range<f64> {
        self.values.clone()
    }
}

impl ValueFormatter<f64> for Axis {
    fn format_ext(&self, value: &f64) -> String {
        (self.label)(*value)
    }
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

/// A tick label: up to 3 decimals without trailing zeros, scientific
/// notation outside [1e-3, 1e5).
fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels() {
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(0.25), "0.25");
        assert_eq!(tick_label(1500.0), "1500");
        assert_eq!(tick_label(2e-5), "2.0e-5");
        assert_eq!(tick_label(-0.5), "-0.5");
    }

    #[test]
    fn png_is_written_atomically_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.png");
        write_png(&p, 2, 1, &[255, 0, 0, 0, 0, 255]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&bytes[16..24], &[0, 0, 0, 2, 0, 0, 0, 1]);
        let e = write_png(&dir.path().join("nope/x.png"), 1, 1, &[0; 3]).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
