//! # comet-core
//!
//! The CUDA-free foundation of comet-rs: layer shapes and how ranks split them
//! ([`MoeConfig`], [`ParallelConfig`], [`Preset`]), element types ([`DType`]), the routing
//! definitions every GPU path must reproduce ([`routing`]), the CPU reference MoE layer with
//! forward, backward and an expert-parallel simulation ([`mod@reference`]), and numeric helpers
//! for tests ([`numeric`]).
//!
//! Every constructor validates its input and returns a [`Result`] whose [`enum@Error`]
//! variant names the rejected value and the rule it broke.

#![warn(missing_docs)]

mod config;
mod dtype;
mod error;
pub mod numeric;
mod preset;
mod real;
pub mod reference;
pub mod routing;

pub use config::{MAX_TENSOR_ELEMS, MoeConfig, ParallelConfig};
pub use dtype::{Activation, DType};
pub use error::{Error, Result};
pub use preset::Preset;
pub use real::Real;
pub use routing::{RoutingPlan, TopK};
