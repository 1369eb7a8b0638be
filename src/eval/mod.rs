//! The six Open LLM Leaderboard tasks with lm-evaluation-harness semantics, one file per task
//! behind one task trait. Arrives with the Evaluator issue.
