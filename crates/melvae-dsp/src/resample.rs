//! Sample-rate conversion (rubato) with the resampler's delay removed.

use rubato::{
    calculate_cutoff, FftFixedIn, Resampler, SincFixedIn, SincInterpolationParameters,
    SincInterpolationType, WindowFunction,
};

use crate::{Error, Result};

/// Which resampler to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResampleQuality {
    /// Band-limited sinc interpolation (256 taps, Blackman-Harris window,
    /// cubic interpolation between 256 oversampled points). Highest quality.
    #[default]
    Sinc,
    /// Synchronous FFT resampler for the fixed rational ratio `to / from`:
    /// several times faster than `Sinc`, with a slightly wider transition band.
    Fft,
}

/// Resamples planar `channels` (all of one length) from `from` Hz to `to` Hz.
///
/// The output has `ceil(len * to / from)` samples per channel (as librosa)
/// and is time-aligned with the input: the resampler's group delay is
/// discarded and the tail flushed, so sample `n` of the input lands at output
/// time `n * to / from`.
pub fn resample(
    channels: &[Vec<f32>],
    from: u32,
    to: u32,
    quality: ResampleQuality,
) -> Result<Vec<Vec<f32>>> {
    if from == 0 || to == 0 {
        return Err(Error::invalid(
            "sample rate",
            format!("must be > 0, got {from} -> {to}"),
        ));
    }
    let len = channels.first().map_or(0, Vec::len);
    if let Some((i, c)) = channels.iter().enumerate().find(|(_, c)| c.len() != len) {
        return Err(Error::shape(
            format!("channel {i}"),
            format!("{len} samples like channel 0"),
            format!("{} samples", c.len()),
        ));
    }
    if from == to || channels.is_empty() || len == 0 {
        return Ok(channels.to_vec());
    }
    let out_len = (len as u64 * to as u64).div_ceil(from as u64) as usize;
    let n_ch = channels.len();
    match quality {
        ResampleQuality::Sinc => {
            let window = WindowFunction::BlackmanHarris2;
            let params = SincInterpolationParameters {
                sinc_len: 256,
                f_cutoff: calculate_cutoff(256, window),
                oversampling_factor: 256,
                interpolation: SincInterpolationType::Cubic,
                window,
            };
            let r = SincFixedIn::<f32>::new(to as f64 / from as f64, 1.0, params, CHUNK, n_ch)
                .map_err(resampler_error)?;
            // rubato 0.16's SincFixedIn emits output k at input time
            // (k + 1) * from / to - 1 (its `output_delay()` does not describe
            // this; measured, and pinned by the alignment tests below).
            // Prepending from/g - 1 zeros and dropping to/g - 1 outputs
            // (g = gcd) puts output j exactly at input time j * from / to.
            let g = gcd(from, to);
            drive(
                r,
                channels,
                out_len,
                (from / g - 1) as usize,
                (to / g - 1) as usize,
            )
        }
        ResampleQuality::Fft => {
            let r = FftFixedIn::<f32>::new(from as usize, to as usize, CHUNK, 2, n_ch)
                .map_err(resampler_error)?;
            let delay = r.output_delay();
            drive(r, channels, out_len, 0, delay)
        }
    }
}

const CHUNK: usize = 1024;

fn resampler_error(e: impl std::fmt::Display) -> Error {
    Error::invalid("resampler", e.to_string())
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Feeds `lead` zeros and then all of `channels` through `resampler`, flushes
/// its tail, and drops the first `delay` outputs, returning exactly `out_len`
/// samples per channel.
fn drive<R: Resampler<f32>>(
    mut resampler: R,
    channels: &[Vec<f32>],
    out_len: usize,
    lead: usize,
    delay: usize,
) -> Result<Vec<Vec<f32>>> {
    let padded: Vec<Vec<f32>>;
    let channels = if lead > 0 {
        padded = channels
            .iter()
            .map(|c| [vec![0.0; lead], c.clone()].concat())
            .collect();
        &padded[..]
    } else {
        channels
    };
    let len = channels[0].len();
    let needed = out_len + delay;
    let mut out: Vec<Vec<f32>> =
        vec![Vec::with_capacity(needed + resampler.output_frames_max()); channels.len()];
    let mut buf = resampler.output_buffer_allocate(true);
    let mut pos = 0;
    while out[0].len() < needed {
        let want = resampler.input_frames_next();
        let (_, written) = if pos + want <= len {
            let slices: Vec<&[f32]> = channels.iter().map(|c| &c[pos..pos + want]).collect();
            resampler.process_into_buffer(&slices, &mut buf, None)
        } else if pos < len {
            let slices: Vec<&[f32]> = channels.iter().map(|c| &c[pos..]).collect();
            resampler.process_partial_into_buffer(Some(&slices), &mut buf, None)
        } else {
            resampler.process_partial_into_buffer(None::<&[&[f32]]>, &mut buf, None)
        }
        .map_err(resampler_error)?;
        pos += want;
        for (o, b) in out.iter_mut().zip(&buf) {
            o.extend_from_slice(&b[..written]);
        }
    }
    for o in &mut out {
        o.drain(..delay);
        o.truncate(out_len);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(freq: f64, rate: u32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (2.0 * std::f64::consts::PI * freq * i as f64 / rate as f64).sin() as f32)
            .collect()
    }

    #[test]
    fn tone_is_preserved_and_aligned() {
        for quality in [ResampleQuality::Sinc, ResampleQuality::Fft] {
            for (from, to) in [
                (44100, 24000),
                (16000, 24000),
                (48000, 22050),
                (22050, 24000),
                (32000, 16000),
            ] {
                let n = from as usize; // 1 s
                let x = tone(440.0, from, n);
                let y = resample(&[x], from, to, quality).unwrap().remove(0);
                assert_eq!(
                    y.len(),
                    (n as u64 * to as u64).div_ceil(from as u64) as usize
                );
                let expect = tone(440.0, to, y.len());
                // Away from the edges (zero-padded), the waveform matches in phase.
                let m = to as usize / 10;
                let err = y[m..y.len() - m]
                    .iter()
                    .zip(&expect[m..])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                // A 440 Hz tone shifted by 0.05 samples at 24 kHz errs by ~6e-3.
                assert!(err < 2e-3, "{quality:?} {from}->{to}: max error {err}");
            }
        }
    }

    #[test]
    fn impulse_lands_at_scaled_time() {
        for quality in [ResampleQuality::Sinc, ResampleQuality::Fft] {
            let mut x = vec![0.0f32; 20000];
            x[8000] = 1.0;
            let y = resample(&[x], 32000, 16000, quality).unwrap().remove(0);
            let peak = y
                .iter()
                .enumerate()
                .fold((0, 0.0), |m, (i, &v)| if v > m.1 { (i, v) } else { m });
            assert_eq!(peak.0, 4000, "{quality:?}");
        }
    }

    #[test]
    fn stereo_and_short_inputs() {
        let l = tone(100.0, 8000, 10);
        let r: Vec<f32> = l.iter().map(|v| -v).collect();
        let y = resample(&[l, r], 8000, 16000, ResampleQuality::Sinc).unwrap();
        assert_eq!(y.len(), 2);
        assert_eq!(y[0].len(), 20);
        for (a, b) in y[0].iter().zip(&y[1]) {
            assert!((a + b).abs() < 1e-6);
        }
    }

    #[test]
    fn bad_inputs_are_named() {
        let e = resample(&[vec![0.0; 4]], 0, 16000, ResampleQuality::Sinc).unwrap_err();
        assert!(e.to_string().contains("sample rate"), "{e}");
        let e = resample(
            &[vec![0.0; 4], vec![0.0; 3]],
            8000,
            16000,
            ResampleQuality::Sinc,
        )
        .unwrap_err();
        assert!(e.to_string().contains("channel 1"), "{e}");
    }
}
