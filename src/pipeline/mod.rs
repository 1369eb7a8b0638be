//! The PAFT pipeline, stage by stage: base → SFT and preference training in parallel →
//! sequential SFT→preference baseline → merge search → full evaluation of every row → report.
//! Each finished stage leaves a marker in `RUN/stages/`, so a rerun skips it; the stages
//! themselves resume (training from checkpoints, the search from its journal).

pub mod demo;
pub mod experiment;
pub mod jobs;
pub mod stages;

pub use experiment::{Experiment, Stage};
pub use stages::{run_experiment, train_parallel, train_sft_then_sequential};
