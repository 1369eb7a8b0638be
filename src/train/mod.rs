//! Training: SFT (with optional L1-sparsified deltas), DPO and ORPO with TRL's losses, LoRA or
//! full fine-tuning, AdamW with warm-up and decay, checkpoints that resume exactly.
//!
//! Sparsity of the SFT delta: `l1_mode = "proximal"` soft-thresholds δ = θ − θ₀ after every
//! optimizer step and gives exact zeros when training every weight (`lora_r = 0`). On LoRA it
//! soft-thresholds the factors A and B, which makes them sparse but not the product B·A.
//! `l1_mode = "proximal_adam"` takes the same step in AdamW's metric (threshold lr·λ/(√v̂+ε)),
//! which zeroes the coordinates with the weakest gradients rather than nearly all or none.
//! `l1_refit_steps = N` ends a proximal run with N steps that train only the surviving
//! coordinates without L1 (the relaxed lasso): the zeros stay, the survivors lose their shrinkage.
//! `l1_mode = "penalty"` adds λ‖δ‖₁ to the loss; AdamW then shrinks δ without making it exactly 0.

pub mod config;
pub mod objective;
pub mod optimizer;
pub mod params;
pub mod precision;
pub mod trainer;

pub use config::{L1Mode, Objective, TrainConfig};
pub use precision::MixedPrecision;
pub use trainer::Trainer;
