//! Integration tests, compiled as one binary (each binary links the whole stack).

mod common;

mod alignment_tax;
mod bad_input;
mod config_layouts;
mod eval;
mod gradients;
mod hub;
mod kv_cache;
mod merge;
mod model_io;
mod parity;
mod pipeline;
mod report;
mod search;
mod slurm;
mod train;
