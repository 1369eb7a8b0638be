//! Evaluation-driven merge search with argmin solvers, journal and resume. Arrives with the Search
//! issue.
