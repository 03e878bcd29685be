//! comet-comm: the transport of comet-rs.
#![warn(missing_docs)]

pub mod env;
pub mod epoch;
pub mod error;
pub mod rendezvous;

pub use error::{Error, Result};
