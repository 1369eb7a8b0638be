#!/usr/bin/env python3
"""Write Hugging Face transformers reference numbers for paft's model-parity tests.

    scripts/.venv/bin/python scripts/reference/make_model_fixtures.py \
        --model /tmp/smollm-ref-hf --out tests/fixtures/model_parity/

--model is a Hugging Face model directory (made by convert_gguf_to_hf.py from the shared
SmolLM2 GGUF).  --shared defaults to $PAFT_SHARED or ../shared next to the repository.

Files written (UTF-8 JSON, one record per line where that helps reading diffs):
  tokenizer_ids.json   [{"source", "text", "ids"}]  ids = tokenizer(text, add_special_tokens=True)
  logprobs.json        {"text", "ids", "logprobs": [null, lp_1, ...], "sum", "argmax"}
  logprobs_batch.json  {"items": [same as logprobs.json, ...]}  each text run on its own, unpadded
  generate.json        greedy chat answer to "What is the capital of France?"
  meta.json            versions and the sha256 of the model weights the numbers came from

logprobs[i] = log p(ids[i] | ids[:i]): the float32 logits of one forward pass on CPU, then
log_softmax in float64.  "argmax" is the float32 argmax of the logits at each position (the
greedy next token after ids[:i+1]).  Selection of tokenizer lines is deterministic: rerunning
on the same data, library versions, machine and thread count reproduces the files byte for
byte (logprobs may move in the last float32 bits with another thread count or CPU).
"""
import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

MAX_CHARS = 600

# Files in the order they are read; paths relative to <shared>/data.
SOURCES = [
    "leaderboard/arc_challenge/test.jsonl",
    "leaderboard/arc_challenge/validation.jsonl",
    "leaderboard/hellaswag/validation.jsonl",
    "leaderboard/mmlu/test.jsonl",
    "leaderboard/mmlu/dev.jsonl",
    "leaderboard/mmlu/validation.jsonl",
    "leaderboard/truthfulqa_mc/validation.jsonl",
    "leaderboard/winogrande/validation.jsonl",
    "leaderboard/gsm8k/test.jsonl",
    "leaderboard/gsm8k/train.jsonl",
    "train/sft/mixed_qa.jsonl",
    "train/preference/hh_harmless.jsonl",
]
# Evenly spaced rows taken from each file.
STRIDE_ROWS = {
    "leaderboard/arc_challenge/test.jsonl": 24,
    "leaderboard/arc_challenge/validation.jsonl": 10,
    "leaderboard/hellaswag/validation.jsonl": 30,
    "leaderboard/mmlu/test.jsonl": 36,
    "leaderboard/mmlu/dev.jsonl": 10,
    "leaderboard/mmlu/validation.jsonl": 12,
    "leaderboard/truthfulqa_mc/validation.jsonl": 16,
    "leaderboard/winogrande/validation.jsonl": 20,
    "leaderboard/gsm8k/test.jsonl": 20,
    "leaderboard/gsm8k/train.jsonl": 16,
    "train/sft/mixed_qa.jsonl": 24,
    "train/preference/hh_harmless.jsonl": 24,
}
N_NON_ASCII = 70  # rows picked greedily to cover as many distinct non-ASCII characters as possible
N_MULTI_SPACE = 12
N_CHAT_SFT = 10
N_CHAT_PREF = 8

SYNTHETIC = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "\t",
    "a  1",
    "x\n\n2024",
    "a   12 b    345",
    "  leading and trailing spaces  ",
    "\tindented\n\t\tdouble\n    four spaces",
    "line one\r\nline two\r\n",
    "3.14159 1,000,000 -42 +7 0x1F 1e-5 2024-01-31 12:30:59",
    "1234567890123456789012345678901234567890",
    "I'm sure you'll see they've done it, didn't she? WE'RE SURE IT'S FINE.",
    "Café crème, naïve façade, Œuvre, straße, Ærø",
    "“Smart quotes” — en–dash … ellipsis • bullet ° × ÷ ± ≤ ≥ ≠ ∞ √ ∑ ∫",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी",
    "emoji: 🙂 👍🏽 👨‍👩‍👧 🇫🇷 ❤️",
    "e\u0301 vs \u00e9, zero\u200bwidth, nbsp\u00a0here, soft\u00adhyphen",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "fn main() {\n\tprintln!(\"{}\", 1 + 2);\n}\n",
    "<|im_start|>",
    "<|im_end|><|im_end|>",
    "<|endoftext|>",
    "text<|im_end|>more text<|endoftext|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "<repo_name>paft<file_sep><filename>src/main.rs<gh_stars>10",
    "<|im_start |> not special <| im_end|>",
    "<<48/2=24>>24 clips\n#### 72",
]

LOGPROB_PIECES = [
    # English prose
    "The old lighthouse keeper climbed the spiral stairs every evening, counting each of the "
    "one hundred and twelve steps. From the top he could see the fishing boats returning to "
    "harbour, their lanterns swaying like fireflies above the dark water.\n\n",
    # code
    "```python\ndef mean(xs):\n    \"\"\"Return the arithmetic mean of a non-empty list.\"\"\"\n"
    "    total = 0.0\n    for x in xs:\n        total += x\n    return total / len(xs)\n\n"
    "print(mean([3, 1, 4, 1, 5, 9, 2, 6]))  # 3.875\n```\n\n",
    # digits
    "In 2023 the town counted 48,215 residents; by 2024 that rose 3.7% to 49,999. "
    "Call 555-0123 before 09:30 on 12/05.\n\n",
    # non-ASCII
    "Le café « Über » à Zürich sert des crêpes — 5 € ou £4.50; temperature 21 °C ± 0.5, "
    "“quoted” text… 東京 and naïve résumé.\n\n",
]


def shared_dir(arg):
    if arg:
        return Path(arg)
    if os.environ.get("PAFT_SHARED"):
        return Path(os.environ["PAFT_SHARED"])
    return Path(__file__).resolve().parents[2].parent / "shared"


def row_text(rel, row):
    """One text per data row, built from the fields a prompt would use."""
    if rel.startswith("leaderboard/arc_challenge"):
        ch = row["choices"]
        return row["question"] + "\n" + "\n".join(f"{l}. {t}" for l, t in zip(ch["label"], ch["text"])) \
            + f"\nAnswer: {row['answerKey']}"
    if rel.startswith("leaderboard/hellaswag"):
        return f"{row['activity_label']}: {row['ctx']} {row['endings'][int(row['label'])]}"
    if rel.startswith("leaderboard/mmlu"):
        return row["question"] + "\n" + "\n".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(row["choices"])) \
            + "\nAnswer:"
    if rel.startswith("leaderboard/truthfulqa_mc"):
        return "Q: " + row["question"] + "\nA: " + row["mc1_targets"]["choices"][0]
    if rel.startswith("leaderboard/winogrande"):
        return row["sentence"].replace("_", row["option1"] if row["answer"] == "1" else row["option2"])
    if rel.startswith("leaderboard/gsm8k"):
        return "Question: " + row["question"] + "\nAnswer: " + row["answer"]
    if rel.startswith("train/sft"):
        return "\n\n".join(m["content"] for m in row["messages"])
    if rel.startswith("train/preference"):
        return "\n\n".join(m["content"] for m in row["prompt"]) + "\n\n" + row["chosen"][0]["content"]
    raise ValueError(rel)


def load_rows(shared):
    data = {}
    for rel in SOURCES:
        with open(shared / "data" / rel, encoding="utf-8") as fh:
            data[rel] = [json.loads(line) for line in fh]
    return data


def source_name(rel, i, suffix=""):
    # "<task>/<file>:<row>" with row the 0-based line number in the JSONL file
    parts = rel.split("/")
    name = "/".join(parts[1:]) if parts[0] == "leaderboard" else rel
    return f"{name}:{i}{suffix}"


def pick_tokenizer_texts(data, tok):
    picked, seen = [], set()

    def add(source, text):
        text = text[:MAX_CHARS]
        if text in seen:
            return False
        seen.add(text)
        picked.append((source, text))
        return True

    # 1. evenly spaced rows of every file
    for rel in SOURCES:
        rows, k = data[rel], STRIDE_ROWS[rel]
        for j in range(k):
            i = (j * len(rows)) // k + (len(rows) // (2 * k))
            add(source_name(rel, i), row_text(rel, rows[i]))

    # 2. rows with tabs, carriage returns (all of them), and runs of 3+ spaces (the first few)
    multi = 0
    for rel in SOURCES:
        for i, row in enumerate(data[rel]):
            t = row_text(rel, row)[:MAX_CHARS]
            if "\t" in t or "\r" in t:
                add(source_name(rel, i), t)
            elif multi < N_MULTI_SPACE and re.search(r"\S {3,}\S", t) and i % 7 == 0:
                if add(source_name(rel, i), t):
                    multi += 1

    # 3. non-ASCII: greedily cover distinct characters, rarest first
    cands = []
    for rel in SOURCES:
        for i, row in enumerate(data[rel]):
            t = row_text(rel, row)[:MAX_CHARS]
            chars = {c for c in t if ord(c) > 127}
            if chars:
                cands.append((rel, i, t, chars))
    covered = {c for _, t in picked for c in t if ord(c) > 127}
    n = 0
    while n < N_NON_ASCII and cands:
        best = max(range(len(cands)), key=lambda k: (len(cands[k][3] - covered), -len(cands[k][2]), -k))
        rel, i, t, chars = cands.pop(best)
        if not chars - covered:
            # everything covered: keep adding short non-ASCII rows spread over the files
            cands.sort(key=lambda c: (len(c[2]), c[0], c[1]))
            for rel, i, t, chars in cands[:: max(1, len(cands) // (N_NON_ASCII - n))]:
                if n >= N_NON_ASCII:
                    break
                if add(source_name(rel, i), t):
                    n += 1
            break
        if add(source_name(rel, i), t):
            covered |= chars
            n += 1

    # 4. chat-template-rendered conversations (special tokens inside the text)
    sft = "train/sft/mixed_qa.jsonl"
    for j in range(N_CHAT_SFT):
        i = 101 + j * (len(data[sft]) // N_CHAT_SFT)
        msgs = data[sft][i]["messages"]
        gen = j % 2 == 1
        if gen:
            msgs = msgs[:1]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        add(source_name(sft, i, "#chat" + ("+gen" if gen else "")), text)
    pref = "train/preference/hh_harmless.jsonl"
    for j in range(N_CHAT_PREF):
        i = 57 + j * (len(data[pref]) // N_CHAT_PREF)
        row = data[pref][i]
        msgs = [{"role": "system", "content": "Answer briefly."}] if j % 2 else []
        msgs += row["prompt"] + row["chosen"]
        text = tok.apply_chat_template(msgs, tokenize=False)
        add(source_name(pref, i, "#chat"), text)

    # 5. hand-written edge cases
    for k, t in enumerate(SYNTHETIC):
        add(f"synthetic:{k}", t)
    return picked


@torch.no_grad()
def token_logprobs(model, ids):
    x = torch.tensor([ids], dtype=torch.long)
    logits = model(input_ids=x).logits[0]  # float32 [T, V]
    assert logits.dtype == torch.float32
    lp = torch.log_softmax(logits.double(), dim=-1)
    out = [None] + [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    argmax = logits.argmax(-1).tolist()
    return out, argmax


def logprob_record(model, tok, text, ids=None):
    if ids is None:
        ids = tok(text, add_special_tokens=True)["input_ids"]
    lps, argmax = token_logprobs(model, ids)
    return {"text": text, "n_tokens": len(ids), "ids": ids, "logprobs": lps,
            "sum": float(sum(lps[1:])), "argmax": argmax}


def truncate_to_tokens(tok, text, n):
    """A prefix of text that tokenizes to exactly n tokens and decodes back to itself."""
    ids = tok(text)["input_ids"]
    assert len(ids) >= n, (len(ids), n)
    while n > 0:
        t = tok.decode(ids[:n])
        if tok(t)["input_ids"] == ids[:n]:
            return t
        n -= 1
    raise ValueError("cannot truncate")


@torch.no_grad()
def greedy(model, prompt_ids, n_new, stop_at=None):
    ids, new, margins = list(prompt_ids), [], []
    for _ in range(n_new):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        lp = torch.log_softmax(logits.double(), -1)
        top = torch.topk(lp, 2)
        nxt = int(top.indices[0])
        margins.append(float(top.values[0] - top.values[1]))
        ids.append(nxt)
        new.append(nxt)
        if stop_at is not None and nxt in stop_at:
            break
    return new, margins


def dump(path, obj, list_key=None):
    """Compact JSON with one list element per line (readable diffs, small files)."""
    def lines(items):
        return "[\n" + ",\n".join(json.dumps(e, ensure_ascii=False) for e in items) + "\n]"
    if isinstance(obj, list):
        s = lines(obj)
    else:
        parts = []
        for k, v in obj.items():
            if k == list_key:
                parts.append(json.dumps(k) + ": " + lines(v))
            else:
                parts.append(json.dumps(k) + ": " + json.dumps(v, ensure_ascii=False))
        s = "{\n" + ",\n".join(parts) + "\n}"
    path.write_text(s + "\n", encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--out", required=True, help="output folder, e.g. tests/fixtures/model_parity/")
    ap.add_argument("--shared", help="shared/ folder (default: $PAFT_SHARED or ../shared)")
    args = ap.parse_args()

    torch.manual_seed(0)
    shared = shared_dir(args.shared)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    model.eval()

    for text, want in {"What is the capital of France?": [1780, 314, 260, 3575, 282, 4649, 47],
                       "<|im_start|>user\nHi<|im_end|>\n": [1, 4093, 198, 26843, 2, 198],
                       "a  1\n\n2024": [81, 256, 33, 1116, 34, 32, 34, 36]}.items():
        got = tok(text, add_special_tokens=True)["input_ids"]
        if got != want:
            sys.exit(f"tokenizer in {args.model} gives {got} for {text!r}, expected {want} "
                     "(was tokenizer.json fixed by convert_gguf_to_hf.py?)")

    data = load_rows(shared)

    # a. tokenizer ids
    picked = pick_tokenizer_texts(data, tok)
    recs = [{"source": s, "text": t, "ids": tok(t, add_special_tokens=True)["input_ids"]} for s, t in picked]
    for r in recs:
        assert tok.decode(r["ids"]) == r["text"], r["source"]  # byte-level BPE is lossless
    dump(out / "tokenizer_ids.json", recs)
    n_non_ascii = sum(any(ord(c) > 127 for c in r["text"]) for r in recs)
    print(f"  {len(recs)} texts, {n_non_ascii} with non-ASCII, "
          f"{sum(len(r['ids']) for r in recs)} tokens")

    # b. log-probabilities
    gsm = data["leaderboard/gsm8k/test.jsonl"][0]["question"]
    text = "".join(LOGPROB_PIECES) + "Question: " + gsm + "\nAnswer:"
    rec = logprob_record(model, tok, text)
    dump(out / "logprobs.json", rec)
    print(f"  {rec['n_tokens']} tokens, sum {rec['sum']:.6f}")

    batch_src = [
        (40, "leaderboard/hellaswag/validation.jsonl", 5),
        (90, "leaderboard/mmlu/test.jsonl", 7000),
        (150, "train/sft/mixed_qa.jsonl", 2000),
    ]
    items = []
    for n, rel, i in batch_src:
        full = row_text(rel, data[rel][i])
        while len(tok(full)["input_ids"]) < n:  # pad out short rows with the following rows
            i += 1
            full += "\n\n" + row_text(rel, data[rel][i])
        t = truncate_to_tokens(tok, full, n)
        r = logprob_record(model, tok, t)
        r["source"] = source_name(rel, batch_src[len(items)][2])
        items.append(r)
    dump(out / "logprobs_batch.json", {"note": "each item run alone, unpadded; batch them padded and compare",
                                       "items": items}, list_key="items")
    print("  batch lengths", [r["n_tokens"] for r in items])

    # c. greedy generation
    question = "What is the capital of France?"
    messages = [{"role": "user", "content": question}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    new, margins = greedy(model, prompt_ids, 20, stop_at=eos)
    full20, margins20 = greedy(model, prompt_ids, 20)
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt_ids]), max_new_tokens=20, do_sample=False)[0, len(prompt_ids):]
    assert hf.tolist() == new, (hf.tolist(), new)
    answer = tok.decode(new, skip_special_tokens=True)
    gen = {
        "messages": messages, "add_generation_prompt": True, "max_new_tokens": 20,
        "prompt": prompt, "prompt_ids": prompt_ids,
        "eos_token_ids": sorted(eos),
        "ids": new, "text": tok.decode(new), "answer": answer,
        "top1_margins": margins,
        "no_stop": {"note": "20 greedy tokens ignoring EOS", "ids": full20, "text": tok.decode(full20),
                    "top1_margins": margins20},
    }
    dump(out / "generate.json", gen)
    print(f"  answer {answer!r}")

    wpath = Path(args.model) / "model.safetensors"
    meta = {
        "generator": "scripts/reference/make_model_fixtures.py",
        "model_dir_made_by": "scripts/reference/convert_gguf_to_hf.py from shared/models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "model_safetensors_sha256": sha256(wpath) if wpath.exists() else None,
        "config": json.loads((Path(args.model) / "config.json").read_text()),
        "dtype": "float32 weights and logits, CPU; log_softmax in float64",
        "attn_implementation": "eager",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "tokenizers": __import__("tokenizers").__version__,
        "torch_num_threads": torch.get_num_threads(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
