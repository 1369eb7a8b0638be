//! Models: Hugging Face config/tokenizer/safetensors I/O, the Llama-family forward pass with LoRA
//! and KV cache, GGUF import, Hub access, and scoring/generation on top.

pub mod attention_kernel;
pub mod config;
pub mod dispatch;
pub mod gguf;
pub mod hub;
pub mod inference;
pub mod kv_cache;
pub mod llama;
pub mod lora;
pub mod ops;
pub mod prefix_attention;
pub mod pretrained;
pub mod rms_norm_kernel;
pub mod rope;
pub mod rope_kernel;
pub mod small_matmul;
pub mod source;
pub mod swiglu;
pub mod target_scores;
pub mod tiny;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use kv_cache::KvCache;
pub use llama::{LlamaModel, Mode, PackSlot, TokenBatch};
pub use lora::{LoraAdapter, LoraConfig, LoraPair, TargetModule};
pub use pretrained::{parse_device, parse_dtype, ModelFiles, Pretrained};
pub use tokenizer::{ChatMessage, ModelTokenizer};
pub use weights::{AtomicDir, SafetensorsFiles, ShardedWriter, WeightMap};
