//! SFT (with L1-sparsified deltas), DPO and ORPO on the differentiable forward pass, LoRA or full,
//! run in parallel. Arrives with the Trainer issue.
