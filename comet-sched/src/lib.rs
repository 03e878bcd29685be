//! # comet-sched (work in progress)

#![warn(missing_docs)]

pub mod counts;
mod error;
pub mod exec;
pub mod layer0;
pub mod layer1;
pub mod tile;

#[cfg(test)]
pub(crate) mod testutil;

pub use counts::Counts;
pub use error::{Error, Result};
