//! The leaderboard evaluator: the six Open LLM Leaderboard tasks scored as lm-evaluation-harness
//! 0.4.x scores them on local copies (`../shared/docs/leaderboard-tasks.md`, LOCAL semantics),
//! with shared prefixes and document contexts prefilled once.
//!
//! Flow: [`TaskStore`] (files) → [`tasks`] (documents → requests, one file per task behind
//! [`Task`]) → [`PreparedSuite`] (pool, selection, shots, tokens; built once per tokenizer) →
//! [`engine`] (KV-cache scoring and generation) → [`SuiteResult`] (metrics) → [`output`]
//! (results.json, samples). [`Evaluator`] is the one entry point; [`pools`] holds the search /
//! report split.

pub mod alignment_tax;
mod draft;
pub mod engine;
pub mod evaluator;
pub mod fetch;
pub mod fewshot;
pub mod multiple_choice;
pub mod output;
pub mod pools;
pub mod pyrandom;
pub mod results;
pub mod store;
pub mod subset;
pub mod suite;
pub mod task;
pub mod tasks;
pub mod tokenize;

pub use evaluator::Evaluator;
pub use pools::{Pool, PoolSplit};
pub use results::{SuiteResult, TaskResult};
pub use store::TaskStore;
pub use subset::Selection;
pub use suite::{DocSet, EvalConfig, EvalModel, PreparedSuite};
pub use task::{Benchmark, MetricKey, Task};
pub use tasks::gsm8k::Gsm8kScoring;
pub use tasks::{parse_task_list, TaskOptions, TaskSpec};
