//! The error type of melvae-train.

use std::path::PathBuf;

/// Errors of melvae-train. Configuration errors name the file, the key path
/// and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is wrong.
    #[error("{origin}: key `{key}`: {reason}")]
    Config {
        /// The file (or command-line argument) that set the key.
        origin: String,
        /// Dotted key path, e.g. `training.learning_rate`.
        key: String,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// A file could not be read or parsed.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file concerned.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// An argument or value is invalid.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What is invalid.
        what: String,
        /// Why.
        reason: String,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An error from melvae-dsp.
    #[error(transparent)]
    Dsp(#[from] melvae_dsp::Error),
    /// An error from melvae-layers.
    #[error(transparent)]
    Layers(#[from] melvae_layers::Error),
    /// An error from melvae-losses.
    #[error(transparent)]
    Losses(#[from] melvae_losses::Error),
    /// An error from melvae-models (model files, configs, shapes).
    #[error(transparent)]
    Models(#[from] melvae_models::Error),
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

    pub(crate) fn file(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
