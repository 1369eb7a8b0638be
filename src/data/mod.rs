//! Training data in the formats TRL users have: conversational SFT (`messages`),
//! prompt/completion, and preference pairs (`prompt`, `chosen`, `rejected`, each a string or a
//! message list), from JSONL or parquet, split into training rows and a fixed held-out tenth
//! (`heldout`), tokenized with the model's chat template into token ids with loss masks, then
//! batched by length with a seeded shuffle.

pub mod batches;
pub mod examples;
pub mod heldout;
pub mod tokenize;

pub use batches::{length_grouped_batches, BatchPlan};
pub use examples::{parquet_to_jsonl, PreferenceExample, SftExample, Text};
pub use heldout::{first_held_out_rows, training_rows, HeldOutRow};
pub use tokenize::{PreferencePair, Tokenization, TokenizedSequence, Truncation};
