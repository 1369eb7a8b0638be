#!/usr/bin/env python3
"""Three models whose largest tensor is over 1 GB, for the bounded-memory merge benchmark.

    python benchmarks/big_tensor_models.py OUT_DIR [--vocab 262144] [--hidden 1024]

Writes OUT_DIR/{base,ft1,ft2}: a one-layer Llama config whose tied embedding is vocab × hidden
f32 (1.07 GB at the defaults) plus small layer tensors; base ~ N(0, 0.02), each fine-tune the
base plus N(0, 0.002) noise from its own seed. Weight-only directories (no tokenizer): enough
for merging. Needs numpy and safetensors (scripts/.venv or scripts/.venv-mergekit).
"""

import argparse
import json
import os

import zlib

import numpy as np
from safetensors.numpy import save_file


def tensors(vocab, hidden, inter):
    yield "model.embed_tokens.weight", (vocab, hidden)
    for m in ["q_proj", "k_proj", "v_proj", "o_proj"]:
        yield f"model.layers.0.self_attn.{m}.weight", (hidden, hidden)
    yield "model.layers.0.mlp.gate_proj.weight", (inter, hidden)
    yield "model.layers.0.mlp.up_proj.weight", (inter, hidden)
    yield "model.layers.0.mlp.down_proj.weight", (hidden, inter)
    yield "model.layers.0.input_layernorm.weight", (hidden,)
    yield "model.layers.0.post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--hidden", type=int, default=1024)
    a = ap.parse_args()
    inter = 2 * a.hidden
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": a.vocab,
        "hidden_size": a.hidden, "intermediate_size": inter, "num_hidden_layers": 1,
        "num_attention_heads": 8, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": True,
        "hidden_act": "silu", "torch_dtype": "float32",
    }
    for name, seed in [("base", None), ("ft1", 1), ("ft2", 2)]:
        d = os.path.join(a.out, name)
        if os.path.exists(os.path.join(d, "model.safetensors")):
            continue
        os.makedirs(d, exist_ok=True)
        out = {}
        for t, shape in tensors(a.vocab, a.hidden, inter):
            x = np.random.default_rng(zlib.crc32(t.encode())).standard_normal(shape, dtype=np.float32) * 0.02
            if seed is not None:
                x += np.random.default_rng([seed, zlib.crc32(t.encode())]).standard_normal(shape, dtype=np.float32) * 0.002
            out[t] = x
        save_file(out, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        del out
        json.dump(config, open(os.path.join(d, "config.json"), "w"), indent=2)
        print(f"{d}: written")


if __name__ == "__main__":
    main()
