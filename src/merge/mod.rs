//! Merging: task vectors δᵢ = θᵢ − θ₀, sparsified, sign-resolved and added back, with mergekit's
//! method names, parameters and defaults (see `methods`).
//!
//! Still to come for the Merge issue: the mergekit YAML front end, the streaming engine over
//! safetensors (rayon, per-tensor seeded streams), `paft merge` and `paft inspect-delta`.

pub mod config;
pub mod consensus;
pub mod methods;
pub mod sparsify;

pub use config::{MergeConfig, ModelRef, ParamValue};
pub use consensus::SignRule;
pub use methods::{merge_tensor, GlobalParams, MergeMethod, ModelParams, TensorInputs};
pub use sparsify::{Rescale, Sparsifier};
