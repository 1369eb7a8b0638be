//! Merging: task vectors δᵢ = θᵢ − θ₀, sparsified, sign-resolved and added back, with mergekit's
//! method names, parameters and defaults (see `methods`).
//!
//! `config` reads mergekit YAML, `engine` streams a merge to disk. Still to come for the Merge
//! issue: `paft inspect-delta`, in-place in-memory merging for the search, chunking of huge tensors.

pub mod config;
pub mod consensus;
pub mod engine;
pub mod methods;
pub mod sparsify;

pub use config::{MergeConfig, ModelRef, ParamValue};
pub use consensus::SignRule;
pub use engine::{run_merge, MergeOptions};
pub use methods::{merge_tensor, GlobalParams, MergeMethod, ModelParams, TensorInputs};
pub use sparsify::{Rescale, Sparsifier};
