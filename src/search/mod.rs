//! Evaluation-driven merge search: a space of merge hyperparameters (`space`), solvers that
//! propose candidates (`solver`), candidates merged in memory and scored on a frozen subset,
//! successive halving onto larger subsets, and a journal that makes every evaluation durable.

pub mod journal;
pub mod solver;

pub use journal::{Journal, JournalEntry};
pub use solver::{minimize, Candidate, Outcome, Problem, SolverKind, SolverSettings};
