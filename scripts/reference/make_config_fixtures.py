#!/usr/bin/env python3
"""Tiny llama / mistral / qwen2 models saved by one transformers generation, with its log-probs.

Run once in each reference environment (transformers 4.x: scripts/.venv-tf4, 5.x: scripts/.venv):

    scripts/.venv-tf4/bin/python scripts/reference/make_config_fixtures.py --out tests/fixtures/config_layouts/tf4
    scripts/.venv/bin/python     scripts/reference/make_config_fixtures.py --out tests/fixtures/config_layouts/tf5

Each case is built from config keyword arguments as a user of that generation writes them
(`rope_scaling` + `rope_theta` in 4.x, `rope_parameters` in 5.x), given the same seeded weights in
both generations, and written with `save_pretrained`, so `config.json` is exactly the layout that
generation writes. The RoPE settings are far from transformers' defaults (θ ≠ 10 000, scaled
frequencies, short sliding windows) and the weights large enough that reading them wrong changes
the log-probs visibly; the Rust test measures by how much.

`expected.json`: per case, for each token sequence, `logprobs[i] = log p(ids[i+1] | ids[:i+1])`
(float32 eager forward on the CPU, one unpadded sequence at a time, log_softmax in float64).
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

TF_MAJOR = int(transformers.__version__.split(".")[0])

# Shapes shared by every case: small enough to commit, big enough for RoPE to matter.
BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)


def rope(theta, scaling=None):
    """RoPE keyword arguments in the layout this transformers generation takes."""
    if TF_MAJOR >= 5:
        params = {"rope_type": "default", "rope_theta": theta}
        if scaling:
            params = {**scaling, "rope_theta": theta}
        return {"rope_parameters": params}
    out = {"rope_theta": theta}
    if scaling:
        out["rope_scaling"] = dict(scaling)
    return out


CASES = {
    # SmolLM2-like: large θ, tied embeddings.
    "llama_theta": dict(model_type="llama", tie_word_embeddings=True, **rope(100000.0)),
    # Llama 3.1-style frequency scaling, and a head_dim that is not hidden/heads.
    "llama_llama3": dict(
        model_type="llama",
        tie_word_embeddings=False,
        num_attention_heads=4,
        head_dim=16,
        **rope(
            500000.0,
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "llama_linear": dict(
        model_type="llama",
        tie_word_embeddings=False,
        **rope(20000.0, {"rope_type": "linear", "factor": 4.0}),
    ),
    # Sliding window shorter than the sequences.
    "mistral_window": dict(
        model_type="mistral", tie_word_embeddings=False, sliding_window=8, **rope(1000000.0)
    ),
    # Qwen2: large θ, untied embeddings, q/k/v biases.
    "qwen2_theta": dict(
        model_type="qwen2",
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=2,
        **rope(1000000.0),
    ),
    # Qwen2's per-layer window: layers from max_window_layers on slide.
    "qwen2_window_layers": dict(
        model_type="qwen2",
        tie_word_embeddings=False,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        **rope(1000000.0),
    ),
    # YaRN, as the Qwen2.5 model cards add it for long contexts.
    "qwen2_yarn": dict(
        model_type="qwen2",
        tie_word_embeddings=False,
        use_sliding_window=False,
        max_window_layers=2,
        # factor = max_position_embeddings / original, as transformers 5 expects.
        max_position_embeddings=64,
        **rope(
            1000000.0,
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        ),
    ),
}


def sequences():
    rng = np.random.RandomState(7)
    return [rng.randint(3, BASE["vocab_size"], size=n).tolist() for n in (48, 29)]


def seeded_weights(model, seed):
    """The same numbers in both generations: one RandomState, parameters in name order."""
    rng = np.random.RandomState(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                v = 1.0 + 0.1 * rng.randn(*p.shape)
            else:
                v = 0.3 * rng.randn(*p.shape)
            p.copy_(torch.from_numpy(v.astype(np.float32)))


def build(name, kwargs, seed):
    kwargs = {**BASE, **kwargs}
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **dtype_kw())
    seeded_weights(model, seed)
    model.eval()
    return model


def dtype_kw():
    return {"dtype": torch.float32} if TF_MAJOR >= 5 else {"torch_dtype": torch.float32}


def logprobs(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    return [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    seqs = sequences()
    expected = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "sequences": seqs,
        "cases": {},
    }
    for i, (name, kwargs) in enumerate(CASES.items()):
        model = build(name, kwargs, seed=100 + i)
        out = os.path.join(args.out, name)
        model.save_pretrained(out, safe_serialization=True)
        # Reload what was written: the log-probs are those of the saved files.
        reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", **dtype_kw())
        reloaded.eval()
        lps = [logprobs(reloaded, s) for s in seqs]
        direct = [logprobs(model, s) for s in seqs]
        diff = max(abs(a - b) for x, y in zip(lps, direct) for a, b in zip(x, y))
        if diff > 1e-6:
            sys.exit(f"{name}: the reloaded model differs from the built one by {diff}")
        expected["cases"][name] = {"logprobs": lps}
        print(name, "saved;", "mean logprob", float(np.mean(lps[0])))
    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
