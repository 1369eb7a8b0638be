//! Evaluation-driven merge search: a space of merge hyperparameters (`space`), solvers that
//! propose candidates (`solver`), candidates merged in memory and scored on a frozen subset
//! (`scorer`), successive halving onto larger subsets (`run`), and a journal that makes every
//! evaluation durable (`journal`).

pub mod journal;
pub mod run;
pub mod scorer;
pub mod solver;
pub mod space;

pub use journal::{Journal, JournalEntry};
pub use run::{run_search, SearchOptions, SearchSummary};
pub use scorer::{CandidateScorer, MergeInputs, Objective, ObjectiveMetric};
pub use solver::{minimize, Candidate, Outcome, Problem, SolverKind, SolverSettings};
pub use space::{MergeCandidate, SearchSpace};
