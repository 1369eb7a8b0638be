//! Merging: task vectors δᵢ = θᵢ − θ₀, sparsified, sign-resolved and added back, with mergekit's
//! method names, parameters and defaults (see `methods`).
//!
//! `config` reads mergekit YAML, `engine` streams a merge to disk, `inspect` measures deltas.

mod blocks;
pub(crate) mod chat_template;
pub mod config;
pub mod consensus;
pub mod engine;
pub mod inspect;
pub mod load;
pub mod memory;
pub mod methods;
mod selective;
mod slices;
pub mod sparsify;
pub mod spec;
mod spherical;
pub(crate) mod tokenizer_source;

pub use config::{MergeConfig, ModelRef, ParamValue};
pub use consensus::SignRule;
pub use engine::{run_merge, MergeOptions};
pub use load::load_f32;
pub use memory::InMemoryMerger;
pub use methods::{merge_tensor, GlobalParams, ModelParams, Setting, TensorInputs};
pub use sparsify::{Rescale, Sparsifier};
pub use spec::MergeMethod;
