//! melvae-train: the training engine every melvae model family uses.
//!
//! - [`config`]: YAML defaults + experiment settings + command-line
//!   overrides, typed with errors that name file, key and expectation.

#![warn(missing_docs)]

pub mod config;
mod error;

pub use config::{check, ResolvedConfig, Validate};
pub use error::{Error, Result};
