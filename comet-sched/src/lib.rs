//! # comet-sched (work in progress)

#![warn(missing_docs)]

pub mod budget;
pub mod counts;
mod error;
pub mod exec;
pub mod layer0;
pub mod layer1;
pub mod model;
pub mod sim;
pub mod tile;
pub mod tuning;

#[cfg(test)]
pub(crate) mod testutil;

pub use counts::Counts;
pub use error::{Error, Result};
