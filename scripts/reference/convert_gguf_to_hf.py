#!/usr/bin/env python3
"""Dequantize a GGUF checkpoint to a float32 Hugging Face model directory using
transformers' own GGUF loader (the independent reference for paft's importer).

    python scripts/reference/convert_gguf_to_hf.py \
        --gguf ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smollm-ref-hf

transformers marks a GGUF-loaded model as "quantized" (quantization_config.quant_method
= gguf) even when every weight was dequantized into plain nn.Linear/Embedding modules, and
then refuses save_pretrained.  We check that the model really is dense float32, drop the
quantizer and the quantization_config, and save it as ordinary safetensors.

transformers' GGUF tokenizer conversion (5.23) ignores `tokenizer.ggml.pre = "smollm"`: it
writes a bare ByteLevel pre-tokenizer, without the individual-digit split that SmolLM2 (and
llama.cpp's "smollm" pre-tokenizer) apply first.  That changes ids where whitespace precedes
a digit ("a  1": [81,216,216,33] instead of [81,256,33]; "x\n\n2024").  We rewrite the saved
tokenizer.json's pre_tokenizer to Sequence[Digits(individual_digits), ByteLevel] and check
vocab, merges and special tokens against the GGUF metadata.
"""
import argparse
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

EXPECT = {
    "What is the capital of France?": [1780, 314, 260, 3575, 282, 4649, 47],
    "<|im_start|>user\nHi<|im_end|>\n": [1, 4093, 198, 26843, 2, 198],
}


SMOLLM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def fix_tokenizer(gguf_path, out):
    import gguf

    r = gguf.GGUFReader(gguf_path)
    meta = lambda k: r.fields[k].contents()
    tokens, types, merges = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type"), meta("tokenizer.ggml.merges")
    path = os.path.join(out, "tokenizer.json")
    tj = json.load(open(path, encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    assert tj["model"]["type"] == "BPE" and len(vocab) == len(tokens), "vocab size"
    assert all(vocab[t] == i for i, t in enumerate(tokens)), "vocab ids differ from GGUF tokens"
    assert [m.split(" ") for m in merges] == [list(m) for m in tj["model"]["merges"]], "merges differ from GGUF"
    specials = sorted(i for i, t in enumerate(types) if t == 3)
    added = sorted(a["id"] for a in tj["added_tokens"] if a["special"])
    assert specials == added, f"special tokens {added} != GGUF control tokens {specials}"
    assert tj["decoder"]["type"] == "ByteLevel", tj["decoder"]
    pre = meta("tokenizer.ggml.pre")
    if pre == "smollm" and tj["pre_tokenizer"] != SMOLLM_PRE_TOKENIZER:
        print(f"fixing tokenizer.json pre_tokenizer: {json.dumps(tj['pre_tokenizer'])} -> Digits+ByteLevel",
              file=sys.stderr)
        tj["pre_tokenizer"] = SMOLLM_PRE_TOKENIZER
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(tj, fh, ensure_ascii=False, indent=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    d, f = os.path.split(os.path.abspath(args.gguf))

    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()

    dense = {"Linear", "Embedding", "LlamaRMSNorm"}
    for name, mod in model.named_modules():
        if not list(mod.children()) and mod.__class__.__name__ not in dense | {"SiLUActivation", "LlamaRotaryEmbedding"}:
            sys.exit(f"unexpected leaf module {name}: {type(mod).__name__} (weights not dequantized?)")
    for name, p in model.named_parameters():
        if p.dtype != torch.float32:
            sys.exit(f"{name} is {p.dtype}, expected float32")

    # Un-mark the (fully dequantized) model as quantized so save_pretrained works.
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = ""

    for text, ids in EXPECT.items():
        got = tok(text, add_special_tokens=True)["input_ids"]
        if got != ids:
            print(f"WARNING: tokenizer gives {got} for {text!r}, expected {ids}", file=sys.stderr)

    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    fix_tokenizer(args.gguf, args.out)
    tok = AutoTokenizer.from_pretrained(args.out)
    for text, ids in EXPECT.items():
        got = tok(text, add_special_tokens=True)["input_ids"]
        if got != ids:
            sys.exit(f"saved tokenizer gives {got} for {text!r}, expected {ids}")
    got = tok("a  1\n\n2024")["input_ids"]
    if got != [81, 256, 33, 1116, 34, 32, 34, 36]:
        sys.exit(f"digit pre-tokenization not applied: {got}")
    cfg = json.load(open(os.path.join(args.out, "config.json")))
    assert "quantization_config" not in cfg, cfg
    print(f"saved {args.out}: {sum(p.numel() for p in model.parameters())} params")


if __name__ == "__main__":
    main()
