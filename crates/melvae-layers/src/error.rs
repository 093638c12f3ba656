//! The error type of melvae-layers.

/// Errors of melvae-layers; each names the bad config field or tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is invalid; `what` names it.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The config field or argument concerned.
        what: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A tensor has the wrong shape; `what` names it.
    #[error("bad shape for {what}: expected {expected}, got {got}")]
    Shape {
        /// The tensor, buffer or value concerned.
        what: String,
        /// The shape that was expected.
        expected: String,
        /// The shape that was given.
        got: String,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An error from melvae-dsp.
    #[error(transparent)]
    Dsp(#[from] melvae_dsp::Error),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn shape(
        what: impl Into<String>,
        expected: impl Into<String>,
        got: impl std::fmt::Debug,
    ) -> Self {
        Self::Shape {
            what: what.into(),
            expected: expected.into(),
            got: format!("{got:?}"),
        }
    }
}

/// Fails with [`Error::Invalid`] naming `what` unless `ok`.
pub(crate) fn ensure(ok: bool, what: &str, reason: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(what, reason()))
    }
}
