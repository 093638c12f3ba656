//! Log-mel frames as audio arrives.

use ndarray::Array2;

use crate::mel::{MelConfig, MelExtractor};
use crate::stft::FrameScratch;
use crate::Result;

/// A streaming (log-)mel extractor: [`MelStream::push`] takes the next
/// samples and returns the frames no later sample can change; after the
/// last sample, [`MelStream::finish`] returns the rest (the frames whose
/// padding reflects the end of the signal). Concatenated, the frames equal
/// [`MelExtractor::extract`] on the whole signal, bit for bit. State is
/// bounded: about one FFT window of samples.
///
/// A frame is final `latency_samples()` samples after its centre (with
/// centred padding, half a window).
pub struct MelStream {
    ex: MelExtractor,
    scratch: FrameScratch,
    mag: Vec<f32>,
    /// Samples `buf_start..buf_start + buf.len()` of the signal.
    buf: Vec<f32>,
    buf_start: usize,
    /// Samples pushed so far.
    total: usize,
    /// The next frame to emit.
    next: usize,
}

impl std::fmt::Debug for MelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MelStream")
            .field("cfg", self.ex.config())
            .field("total", &self.total)
            .field("next", &self.next)
            .finish()
    }
}

impl MelStream {
    /// A stream for `cfg` (validated).
    pub fn new(cfg: MelConfig) -> Result<Self> {
        let ex = MelExtractor::new(cfg)?;
        Ok(Self {
            scratch: ex.stft().scratch(),
            mag: vec![0.0; cfg.stft.n_bins()],
            ex,
            buf: Vec::new(),
            buf_start: 0,
            total: 0,
            next: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MelConfig {
        self.ex.config()
    }

    /// Samples between a frame's centre (the sample `t * hop`) and the
    /// moment it is final: the padding of the STFT (`n_fft / 2` when
    /// centred).
    pub fn latency_samples(&self) -> usize {
        let s = &self.ex.config().stft;
        s.n_fft - s.padding.amount(s.n_fft)
    }

    /// Samples held for frames still to come (about one window).
    pub fn buffered_samples(&self) -> usize {
        self.buf.len()
    }

    /// Frames emitted so far.
    pub fn frames_emitted(&self) -> usize {
        self.next
    }

    fn pad(&self) -> isize {
        let s = &self.ex.config().stft;
        s.padding.amount(s.n_fft) as isize
    }

    fn frame_start(&self, t: usize) -> isize {
        (t * self.ex.config().stft.hop_length) as isize - self.pad()
    }

    /// Computes frames `self.next..end` of a signal of `len` samples.
    fn emit(&mut self, end: usize, len: usize) -> Result<Array2<f32>> {
        let n_mels = self.ex.config().n_mels;
        let n = end.saturating_sub(self.next);
        let mut by_frame = vec![0.0f32; n * n_mels];
        let mode = self.ex.config().stft.padding.mode();
        for (i, row) in by_frame.chunks_mut(n_mels).enumerate() {
            let start = self.frame_start(self.next + i);
            self.ex.stft().frame_at(
                &self.buf,
                self.buf_start,
                start,
                len,
                mode,
                &mut self.scratch,
            )?;
            self.ex
                .mel_frame(&self.scratch.spectrum, &mut self.mag, row);
        }
        self.next = end.max(self.next);
        self.ex.frames_to_mel(by_frame, n)
    }

    /// Drops samples no future frame reads: from the next frame's start,
    /// and from what the end's reflection may read (the last `pad + 1`
    /// samples).
    fn trim(&mut self) {
        let keep_from = self
            .frame_start(self.next)
            .min(self.total as isize - 1 - self.pad())
            .max(0) as usize;
        if keep_from > self.buf_start {
            self.buf.drain(..keep_from - self.buf_start);
            self.buf_start = keep_from;
        }
    }

    /// Feeds the next mono samples; returns the newly final frames
    /// `[n_mels, k]` (`k` may be 0).
    pub fn push(&mut self, samples: &[f32]) -> Result<Array2<f32>> {
        self.buf.extend_from_slice(samples);
        self.total += samples.len();
        let s = self.ex.config().stft;
        // Frame t is final once its whole window lies inside the signal
        // seen so far (the start's reflection reads only earlier samples).
        let limit = self.total as isize + self.pad() - s.n_fft as isize;
        let end = if limit < 0 {
            0
        } else {
            // Reflection at the start reads samples up to `pad`: also wait
            // for those.
            let ready = (limit as usize) / s.hop_length + 1;
            if self.total as isize > self.pad() {
                ready
            } else {
                0
            }
        };
        let out = self.emit(end, self.total)?;
        self.trim();
        Ok(out)
    }

    /// Ends the signal: returns the remaining frames `[n_mels, k]`, so that
    /// all frames together equal the offline extraction, and resets the
    /// stream. An empty stream gives no frames.
    pub fn finish(&mut self) -> Result<Array2<f32>> {
        let out = if self.total == 0 {
            Ok(Array2::zeros((self.ex.config().n_mels, 0)))
        } else {
            let total = self.total;
            self.ex.n_frames(total).and_then(|n| self.emit(n, total))
        };
        self.reset();
        out
    }

    /// Forgets all samples, as if none had been pushed.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.buf_start = 0;
        self.total = 0;
        self.next = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SplitMix64;

    fn signal(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..n)
            .map(|i| (i as f32 * 0.05).sin() * 0.5 + (r.next_f64() as f32 - 0.5) * 0.1)
            .collect()
    }

    #[test]
    fn streamed_frames_equal_offline_bit_for_bit() {
        for cfg in [MelConfig::vocos_24k(), MelConfig::hifigan_22k()] {
            let ex = MelExtractor::new(cfg).unwrap();
            let mut stream = MelStream::new(cfg).unwrap();
            for (len, seed) in [(24_000, 1), (700, 2), (513, 3), (5000, 4)] {
                let x = signal(len, seed);
                let offline = ex.extract(&x).unwrap();
                let mut rng = SplitMix64::new(seed);
                let mut parts = Vec::new();
                let mut pos = 0;
                let mut held = 0;
                while pos < len {
                    let n = (1 + rng.below(900)).min(len - pos);
                    let y = stream.push(&x[pos..pos + n]).unwrap();
                    held = held.max(stream.buf.len());
                    parts.push(y);
                    pos += n;
                }
                parts.push(stream.finish().unwrap());
                let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
                let streamed = ndarray::concatenate(ndarray::Axis(1), &views).unwrap();
                assert_eq!(streamed, offline, "{} samples", len);
                // Bounded state: about one window (plus the last chunk).
                assert!(held <= cfg.stft.n_fft + 2 * 900, "{held}");
            }
        }
    }

    #[test]
    fn any_padding_streams_like_offline() {
        use crate::{PadMode, Padding};
        for padding in [
            Padding::None,
            Padding::Both(384, PadMode::Reflect),
            Padding::Both(1500, PadMode::Reflect),
            Padding::Center(PadMode::Constant),
        ] {
            let mut cfg = MelConfig::vocos_24k();
            cfg.stft.padding = padding;
            let ex = MelExtractor::new(cfg).unwrap();
            let mut stream = MelStream::new(cfg).unwrap();
            let x = signal(6000, 5);
            let mut parts: Vec<Array2<f32>> =
                x.chunks(700).map(|c| stream.push(c).unwrap()).collect();
            parts.push(stream.finish().unwrap());
            let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
            let streamed = ndarray::concatenate(ndarray::Axis(1), &views).unwrap();
            assert_eq!(streamed, ex.extract(&x).unwrap(), "{padding:?}");
        }
        // Too short for one frame: the offline error, and the stream resets.
        let mut cfg = MelConfig::vocos_24k();
        cfg.stft.padding = Padding::None;
        let mut stream = MelStream::new(cfg).unwrap();
        stream.push(&signal(100, 1)).unwrap();
        let e = stream.finish().unwrap_err().to_string();
        assert!(e.contains("100 samples"), "{e}");
        assert_eq!((stream.buffered_samples(), stream.frames_emitted()), (0, 0));
    }

    #[test]
    fn frames_become_final_after_half_a_window() {
        let cfg = MelConfig::vocos_24k();
        let mut s = MelStream::new(cfg).unwrap();
        assert_eq!(s.latency_samples(), 512);
        // Frame 0 (centred on sample 0) reads samples 0..=512 (its start
        // reflects sample 512).
        assert_eq!(s.push(&signal(512, 1)).unwrap().ncols(), 0);
        assert_eq!(s.push(&signal(1, 2)).unwrap().ncols(), 1);
        // Every hop then finalises one more.
        assert_eq!(s.push(&signal(255, 3)).unwrap().ncols(), 1);
        assert_eq!(s.frames_emitted(), 2);
        assert_eq!(s.finish().unwrap().ncols(), 2);
        assert_eq!(s.finish().unwrap().ncols(), 0);
    }
}
