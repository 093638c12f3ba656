//! The error type of melvae-dsp.

use std::path::{Path, PathBuf};

/// What went wrong with an audio file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioErrorKind {
    /// The file has no bytes, or decodes to zero samples.
    Empty,
    /// The file ends before the stream it declares is complete.
    Truncated,
    /// The bytes are not a container or codec melvae-dsp recognises.
    NotAudio,
    /// A recognised container whose codec or layout is not supported.
    Unsupported,
    /// A supported stream that fails to decode part-way.
    Corrupt,
    /// Samples that are NaN or infinite (float WAV).
    NonFinite,
}

impl std::fmt::Display for AudioErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Empty => "empty",
            Self::Truncated => "truncated",
            Self::NotAudio => "not an audio file",
            Self::Unsupported => "unsupported",
            Self::Corrupt => "corrupt",
            Self::NonFinite => "non-finite samples",
        })
    }
}

/// Errors of melvae-dsp. Every variant names its culprit: a path, a config
/// field or a tensor shape.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing `path` failed at the OS level.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        #[source]
        /// The OS error.
        source: std::io::Error,
    },
    /// `path` could not be decoded as audio.
    #[error("{}: {kind}: {detail}", path.display())]
    Audio {
        /// The file concerned.
        path: PathBuf,
        /// What kind of failure.
        kind: AudioErrorKind,
        /// What exactly went wrong.
        detail: String,
    },
    /// A configuration value or argument is invalid; `what` names it.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The config field or argument concerned.
        what: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A tensor or buffer has the wrong shape; `what` names it.
    #[error("bad shape for {what}: expected {expected}, got {got}")]
    Shape {
        /// The tensor, buffer or value concerned.
        what: String,
        /// The shape that was expected.
        expected: String,
        /// The shape that was given.
        got: String,
    },
    /// Drawing a picture failed; `what` names it.
    #[error("drawing {what}: {reason}")]
    Plot {
        /// The picture concerned.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn audio(path: &Path, kind: AudioErrorKind, detail: impl Into<String>) -> Self {
        Self::Audio {
            path: path.to_path_buf(),
            kind,
            detail: detail.into(),
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    #[cfg_attr(not(feature = "plot"), allow(dead_code))]
    pub(crate) fn plot(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Plot {
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn shape(
        what: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Self::Shape {
            what: what.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }

    /// The kind of an audio error, if this is one.
    pub fn audio_kind(&self) -> Option<AudioErrorKind> {
        match self {
            Self::Audio { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}
