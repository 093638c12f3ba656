//! Decoding audio files (symphonia) and writing WAV (hound).

use std::fs::File;
use std::path::Path;

use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use crate::error::AudioErrorKind;
use crate::fsutil::atomic_write;
use crate::resample::{resample, ResampleQuality};
use crate::{Error, Result};

/// File extensions [`load_audio`] decodes.
pub const AUDIO_EXTENSIONS: [&str; 9] = [
    "wav", "wave", "flac", "mp3", "ogg", "oga", "m4a", "aac", "mp4",
];

/// Every file under `dir` (recursively) whose extension [`load_audio`]
/// handles (case-insensitive), sorted by path. Errors name the directory
/// that could not be read.
pub fn discover_audio(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    fn walk(d: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
        let entries = std::fs::read_dir(d).map_err(|e| Error::io(d, e))?;
        for entry in entries {
            let p = entry.map_err(|e| Error::io(d, e))?.path();
            if p.is_dir() {
                walk(&p, out)?;
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| AUDIO_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Planar audio: `channels[c][n]` is sample `n` of channel `c`, in [-1, 1]
/// for decoded integer PCM.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    /// Samples per second.
    pub sample_rate: u32,
    /// One `Vec` per channel, all of the same length.
    pub channels: Vec<Vec<f32>>,
}

impl Audio {
    /// Wraps planar samples; checks that the channels have equal lengths.
    pub fn new(sample_rate: u32, channels: Vec<Vec<f32>>) -> Result<Self> {
        if sample_rate == 0 {
            return Err(Error::invalid("sample_rate", "must be > 0"));
        }
        if channels.is_empty() {
            return Err(Error::shape("audio", "at least one channel", "0 channels"));
        }
        let len = channels[0].len();
        if let Some((i, c)) = channels.iter().enumerate().find(|(_, c)| c.len() != len) {
            return Err(Error::shape(
                format!("audio channel {i}"),
                format!("{len} samples like channel 0"),
                format!("{} samples", c.len()),
            ));
        }
        Ok(Self {
            sample_rate,
            channels,
        })
    }

    /// Number of channels.
    pub fn n_channels(&self) -> usize {
        self.channels.len()
    }

    /// Samples per channel.
    pub fn n_samples(&self) -> usize {
        self.channels.first().map_or(0, Vec::len)
    }

    /// Duration in seconds.
    pub fn duration_secs(&self) -> f64 {
        self.n_samples() as f64 / self.sample_rate as f64
    }

    /// The average of all channels.
    pub fn mono(&self) -> Vec<f32> {
        if self.channels.len() == 1 {
            return self.channels[0].clone();
        }
        let scale = 1.0 / self.channels.len() as f32;
        (0..self.n_samples())
            .map(|i| self.channels.iter().map(|c| c[i]).sum::<f32>() * scale)
            .collect()
    }

    /// Converts the channel layout as `mode` asks.
    pub fn with_channels(self, mode: ChannelMode) -> Result<Self> {
        match (mode, self.channels.len()) {
            (ChannelMode::Keep, _) | (ChannelMode::Mono, 1) | (ChannelMode::Stereo, 2) => Ok(self),
            (ChannelMode::Mono, _) => Ok(Self {
                channels: vec![self.mono()],
                ..self
            }),
            (ChannelMode::Stereo, 1) => Ok(Self {
                channels: vec![self.channels[0].clone(), self.channels[0].clone()],
                ..self
            }),
            (ChannelMode::Stereo, n) => Err(Error::shape(
                "audio channels",
                "1 or 2 channels to make stereo",
                format!("{n} channels"),
            )),
        }
    }

    /// Resamples to `rate` Hz (no-op if already there).
    pub fn resampled(self, rate: u32, quality: ResampleQuality) -> Result<Self> {
        if rate == self.sample_rate {
            return Ok(self);
        }
        Ok(Self {
            channels: resample(&self.channels, self.sample_rate, rate, quality)?,
            sample_rate: rate,
        })
    }
}

/// Channel layout wanted from [`load_audio_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelMode {
    /// As stored in the file.
    #[default]
    Keep,
    /// Average of all channels.
    Mono,
    /// Two channels: mono is duplicated, stereo kept; more channels are an
    /// error (no standard downmix without a layout).
    Stereo,
}

/// Options of [`load_audio_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadOptions {
    /// Channel layout of the result.
    pub channels: ChannelMode,
    /// Resample to this rate (Hz) if set.
    pub sample_rate: Option<u32>,
    /// Resampler used when resampling.
    pub quality: ResampleQuality,
}

/// Decodes an audio file with its native rate and channels.
///
/// Supported: WAV (8/16/24/32-bit PCM, 32/64-bit float), FLAC, MP3,
/// OGG/Vorbis, AAC (ADTS) and M4A/MP4 (AAC, ALAC). The container is detected
/// from the bytes, with the extension as a hint.
///
/// Errors name the path and the cause: an empty file or one with no samples
/// ([`AudioErrorKind::Empty`]), a stream that ends before the length its
/// header declares ([`AudioErrorKind::Truncated`]), bytes that are not audio
/// ([`AudioErrorKind::NotAudio`]), a codec melvae-dsp cannot decode
/// ([`AudioErrorKind::Unsupported`]) or a packet that fails to decode
/// ([`AudioErrorKind::Corrupt`]), or samples that are NaN or infinite (a
/// float WAV can hold them; [`AudioErrorKind::NonFinite`]). No packet is
/// ever skipped silently.
///
/// Lengths: decoding is gapless where the container says how (MP3 with a
/// LAME/Xing header), and output never runs past the length the stream
/// declares. AAC's encoder priming (typically 1024 or 2112 samples at the
/// start) is not removed: symphonia 0.5 does not read MP4 edit lists.
pub fn load_audio(path: impl AsRef<Path>) -> Result<Audio> {
    load_audio_with(path, &LoadOptions::default())
}

/// [`load_audio`] followed by the channel conversion and resampling that
/// `opts` asks for.
pub fn load_audio_with(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Audio> {
    let audio = decode_guarded(path.as_ref())?.with_channels(opts.channels)?;
    match opts.sample_rate {
        Some(rate) => audio.resampled(rate, opts.quality),
        None => Ok(audio),
    }
}

/// [`decode`], with a panic inside a decoder (symphonia has had them on
/// malformed streams) turned into a `Corrupt` error naming the file, so one
/// bad file cannot bring down a dataset scan.
fn decode_guarded(path: &Path) -> Result<Audio> {
    std::panic::catch_unwind(|| decode(path)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(Error::audio(
            path,
            AudioErrorKind::Corrupt,
            format!("decoder panicked: {msg}"),
        ))
    })
}

fn sym_error(path: &Path, stage: &str, e: SymError) -> Error {
    match e {
        SymError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => Error::audio(
            path,
            AudioErrorKind::Truncated,
            format!("unexpected end of file while {stage}"),
        ),
        SymError::IoError(io) => Error::io(path, io),
        // Only "no reader recognised the bytes" means not audio; a reader
        // that recognised its container but not the codec is "unsupported".
        SymError::Unsupported(what) if what.contains("no suitable format reader") => Error::audio(
            path,
            AudioErrorKind::NotAudio,
            "no supported container or codec recognised",
        ),
        SymError::Unsupported(what) => Error::audio(
            path,
            AudioErrorKind::Unsupported,
            format!("{what} while {stage}"),
        ),
        SymError::DecodeError(what) => Error::audio(
            path,
            AudioErrorKind::Corrupt,
            format!("{what} while {stage}"),
        ),
        other => Error::audio(
            path,
            AudioErrorKind::Corrupt,
            format!("{other} while {stage}"),
        ),
    }
}

fn decode(path: &Path) -> Result<Audio> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if size == 0 {
        return Err(Error::audio(
            path,
            AudioErrorKind::Empty,
            "file has 0 bytes",
        ));
    }
    let mss = MediaSourceStream::new(Box::new(file), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    // Gapless: the MP3 reader then trims the encoder delay and padding that
    // the LAME/Xing header declares, so the samples line up with the source.
    let fmt_opts = FormatOptions {
        enable_gapless: true,
        ..Default::default()
    };
    let probed = symphonia::default::get_probe()
        .format(&hint, mss, &fmt_opts, &MetadataOptions::default())
        .map_err(|e| sym_error(path, "probing the format", e))?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| {
            Error::audio(
                path,
                AudioErrorKind::Unsupported,
                "no audio track with a known codec",
            )
        })?;
    let track_id = track.id;
    let declared_frames = track.codec_params.n_frames;
    let mut sample_rate = track.codec_params.sample_rate;
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(|e| sym_error(path, "opening the decoder", e))?;

    let mut channels: Vec<Vec<f32>> = Vec::new();
    let mut sample_buf: Option<SampleBuffer<f32>> = None;
    let mut packet_index = 0usize;
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            // symphonia reports the end of the stream as an EOF I/O error.
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => {
                return Err(sym_error(
                    path,
                    &format!("reading packet {packet_index}"),
                    e,
                ))
            }
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = decoder
            .decode(&packet)
            .map_err(|e| sym_error(path, &format!("decoding packet {packet_index}"), e))?;
        packet_index += 1;
        let spec = *decoded.spec();
        if decoded.frames() == 0 {
            continue;
        }
        if channels.is_empty() {
            // One allocation for the declared length plus a final block's
            // slack (block codecs emit their last block whole), bounded by
            // the file size so a lying header cannot reserve gigabytes (64
            // frames per byte covers low-bit-rate codecs): no reallocation
            // copies and page faults while the vectors grow.
            let reserve = declared_frames.map_or(0, |n| {
                (n.min(size.saturating_mul(64)) as usize).saturating_add(16_384)
            });
            channels = (0..spec.channels.count())
                .map(|_| Vec::with_capacity(reserve))
                .collect();
        } else if channels.len() != spec.channels.count() {
            return Err(Error::audio(
                path,
                AudioErrorKind::Unsupported,
                format!(
                    "channel count changes mid-stream ({} -> {})",
                    channels.len(),
                    spec.channels.count()
                ),
            ));
        }
        sample_rate.get_or_insert(spec.rate);
        let sb = match &mut sample_buf {
            Some(sb) if sb.capacity() >= decoded.capacity() => sb,
            slot => slot.insert(SampleBuffer::new(decoded.capacity() as u64, spec)),
        };
        sb.copy_planar_ref(decoded);
        let frames = sb.samples().len() / channels.len();
        for (c, ch) in channels.iter_mut().enumerate() {
            ch.extend_from_slice(&sb.samples()[c * frames..(c + 1) * frames]);
        }
    }
    let n = channels.first().map_or(0, Vec::len);
    if let Some(declared) = declared_frames {
        if (n as u64) < declared {
            return Err(Error::audio(
                path,
                AudioErrorKind::Truncated,
                format!("header declares {declared} frames, the file holds {n}"),
            ));
        }
        // Decoders of block codecs (Vorbis, AAC) emit the final block whole;
        // the stream's declared length marks where the audio ends.
        for ch in &mut channels {
            ch.truncate(declared as usize);
        }
    }
    if n == 0 || declared_frames == Some(0) {
        return Err(Error::audio(
            path,
            AudioErrorKind::Empty,
            "no audio samples in the stream",
        ));
    }
    let rate = sample_rate.filter(|&r| r > 0).ok_or_else(|| {
        Error::audio(
            path,
            AudioErrorKind::Unsupported,
            "stream has no sample rate",
        )
    })?;
    for (c, ch) in channels.iter().enumerate() {
        if let Some(i) = ch.iter().position(|v| !v.is_finite()) {
            return Err(Error::audio(
                path,
                AudioErrorKind::NonFinite,
                format!("sample {i} of channel {c} is {}", ch[i]),
            ));
        }
    }
    Ok(Audio {
        sample_rate: rate,
        channels,
    })
}

/// Sample format of [`save_wav`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WavFormat {
    /// 16-bit integer PCM; samples are clipped to [-1, 1).
    #[default]
    Pcm16,
    /// 32-bit IEEE float, unclipped.
    Float32,
}

/// Writes `audio` as a WAV file, atomically (see [`crate::atomic_write`]).
///
/// 16-bit PCM stores `round(x * 32768)` clamped to the i16 range, which
/// [`load_audio`] reads back as `v / 32768`. Non-finite samples are an error
/// naming the channel and sample index.
pub fn save_wav(path: impl AsRef<Path>, audio: &Audio, format: WavFormat) -> Result<()> {
    let path = path.as_ref();
    let audio = Audio::new(audio.sample_rate, audio.channels.clone())?;
    for (c, ch) in audio.channels.iter().enumerate() {
        if let Some(i) = ch.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(
                format!("sample {i} of channel {c}"),
                format!(
                    "{} is not finite; refusing to write {}",
                    ch[i],
                    path.display()
                ),
            ));
        }
    }
    let n_ch = u16::try_from(audio.n_channels())
        .map_err(|_| Error::invalid("audio channels", "more than 65535"))?;
    let spec = hound::WavSpec {
        channels: n_ch,
        sample_rate: audio.sample_rate,
        bits_per_sample: match format {
            WavFormat::Pcm16 => 16,
            WavFormat::Float32 => 32,
        },
        sample_format: match format {
            WavFormat::Pcm16 => hound::SampleFormat::Int,
            WavFormat::Float32 => hound::SampleFormat::Float,
        },
    };
    let to_io = |e: hound::Error| match e {
        hound::Error::IoError(e) => e,
        other => std::io::Error::other(other.to_string()),
    };
    atomic_write(path, |w| {
        let mut wav = hound::WavWriter::new(w, spec).map_err(to_io)?;
        for i in 0..audio.n_samples() {
            for ch in &audio.channels {
                match format {
                    WavFormat::Pcm16 => {
                        let v = (ch[i] as f64 * 32768.0).round().clamp(-32768.0, 32767.0) as i16;
                        wav.write_sample(v).map_err(to_io)?
                    }
                    WavFormat::Float32 => wav.write_sample(ch[i]).map_err(to_io)?,
                }
            }
        }
        wav.finalize().map_err(to_io)
    })
}
