//! Training data in TRL's formats (conversational SFT, prompt/completion, preference pairs):
//! loading, chat-template rendering, loss masks, batching. Arrives with the Trainer issue.
