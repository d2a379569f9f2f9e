#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod backend;
pub mod config;
pub mod direction;
pub mod dtype;
pub mod error;
pub mod ffi;
pub mod fill;
pub mod optimizer;
pub mod philox;
pub mod protocol;
pub mod rules;
pub mod shard;
mod state;

pub use backend::cpu::CpuBackend;
pub use config::{Config, Estimator, Phase, PhaseRule, StateSet};
pub use direction::{DirectionId, DirectionKind};
pub use dtype::{DType, Element, Precision};
pub use error::{Error, Result};
pub use optimizer::{Feed, Optimizer, StepReport};
pub use rules::Rule;
pub use shard::{Location, ParamShard, TensorSpec, TensorView};

/// The crate version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
