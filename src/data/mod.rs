//! Training data in the formats TRL users have: conversational SFT (`messages`),
//! prompt/completion, and preference pairs (`prompt`, `chosen`, `rejected`, each a string or a
//! message list), from JSONL or parquet, tokenized with the model's chat template into token ids
//! with loss masks, then batched by length with a seeded shuffle.

pub mod batches;
pub mod examples;
pub mod tokenize;

pub use batches::{length_grouped_batches, BatchPlan};
pub use examples::{load_rows, parquet_to_jsonl, PreferenceExample, SftExample, Text};
pub use tokenize::{PreferencePair, Tokenization, TokenizedSequence, Truncation};
