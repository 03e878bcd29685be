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
//!
//! ```
//! use comet_core::reference::{MoeWeights, ep_forward, forward};
//! use comet_core::routing::{RoutingPlan, router_logits, top_k};
//! use comet_core::{MoeConfig, ParallelConfig, numeric};
//!
//! # fn main() -> comet_core::Result<()> {
//! let cfg = MoeConfig::new(16, 8, 4, 2)?.with_renormalize(true);
//! let w = MoeWeights::<f32>::random(&cfg, 1);
//! let x = numeric::random_normal((10, 16), 2);
//!
//! // Routing: the definitions the GPU kernels reproduce.
//! let r = top_k(router_logits(x.view(), w.wr.view())?.view(), cfg.top_k(), true)?;
//! let plan = RoutingPlan::new(&[r.ids.view()], cfg.experts(), 1)?;
//! assert_eq!(plan.recv_rows(0), 10 * 2);
//!
//! // The reference layer, on one rank and over two simulated ranks.
//! let y = forward(&cfg, &w, x.view())?.y;
//! let par = ParallelConfig::expert_parallel(2)?;
//! let xs = vec![x.slice(ndarray::s![..4, ..]).to_owned(), x.slice(ndarray::s![4.., ..]).to_owned()];
//! let ep = ep_forward(&cfg, &par, &w, &xs)?;
//! let y_ep: Vec<f32> = ep.ranks.iter().flat_map(|r| r.y.iter().copied()).collect();
//! assert!(numeric::rel_l2(&y_ep, y.as_slice().unwrap_or(&[])) < 1e-6);
//! # Ok(())
//! # }
//! ```

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
