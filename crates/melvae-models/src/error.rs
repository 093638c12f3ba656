//! The error type of melvae-models.

/// Errors of melvae-models; configuration errors name the field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is invalid.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The config field (e.g. `convformer.compress_factor_C`).
        what: String,
        /// Why.
        reason: String,
    },
    /// A tensor has the wrong shape.
    #[error("bad shape for {what}: expected {expected}, got {got}")]
    Shape {
        /// The tensor concerned.
        what: String,
        /// The shape that was expected.
        expected: String,
        /// The shape that was given.
        got: String,
    },
    /// A model file is missing, unreadable, or does not fit the model.
    #[error("{}: {reason}", path.display())]
    ModelFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong (names the tensor or metadata key).
        reason: String,
    },
    /// From melvae-layers.
    #[error(transparent)]
    Layers(#[from] melvae_layers::Error),
    /// From melvae-losses.
    #[error(transparent)]
    Losses(#[from] melvae_losses::Error),
    /// From melvae-dsp.
    #[error(transparent)]
    Dsp(#[from] melvae_dsp::Error),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
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
}

/// Fails with [`Error::Invalid`] naming `what` unless `ok`.
pub(crate) fn ensure(ok: bool, what: &str, reason: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(what, reason()))
    }
}
