//! # comet-layer
//!
//! WIP
#![warn(missing_docs)]

pub mod error;
pub mod options;
pub mod plan;

pub use error::{Error, Result};
pub use options::{GemmEngine, LayerOptions, Strategy};
