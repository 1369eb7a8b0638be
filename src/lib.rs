//! paft — PArallel Fine-Tuning: train an SFT model and a preference-aligned model from one base
//! in parallel, then search for the merge of their task vectors that scores best on the Open LLM
//! Leaderboard tasks.
//!
//! Stages, in the order data flows: [`model`] (files, forward pass) → `train` → `merge` → `eval`
//! → `search` → `report`. Stages after `model` arrive with their issues.

pub mod cli;
pub mod cluster;
pub mod data;
pub mod eval;
pub mod io;
pub mod merge;
pub mod model;
pub mod paths;
pub mod pipeline;
pub mod process;
pub mod progress;
pub mod report;
pub mod search;
pub mod stats;
pub mod train;
