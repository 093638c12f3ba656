//! The error type of melvae-losses.

/// Errors of melvae-losses; each names the bad argument or shape.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value or argument is invalid.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The config field or argument concerned.
        what: String,
        /// Why it is invalid.
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
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An error from melvae-dsp (tensor STFT / mel).
    #[error(transparent)]
    Dsp(#[from] melvae_dsp::Error),
    /// An error from melvae-layers.
    #[error(transparent)]
    Layers(#[from] melvae_layers::Error),
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

/// Fails with a shape error unless `a` and `b` have the same shape.
pub(crate) fn same_shape(
    what: &str,
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::shape(
            what,
            format!("prediction and target of one shape (target {:?})", b.dims()),
            a.dims(),
        ));
    }
    Ok(())
}
