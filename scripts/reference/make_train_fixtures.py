#!/usr/bin/env python3
"""Reference training fixtures from TRL 1.x + PEFT (torch, CPU, float32) for paft's trainer.

    scripts/.venv-trl/bin/python scripts/reference/make_train_fixtures.py --out tests/fixtures/train

Writes, under --out:
  tiny/                          seeded tiny Llama (config.json + model.safetensors), no tokenizer
  lora_init/                     PEFT LoRA adapter (r 4, alpha 8, 7 projections), lora_B != 0
  after_step/<obj>_full.safetensors   all parameters after ONE AdamW step (HF key names)
  after_step/<obj>_full_grad.safetensors   the gradients that step used
  after_step/<obj>_lora.safetensors   LoRA tensors after ONE AdamW step (PEFT key names)
  after_step/<obj>_lora_grad.safetensors   their gradients
  expected.json                  batches, hyper-parameters, step-0 losses/metrics, grad norms, the
                                 same metrics after the step, versions

<obj> is sft, dpo (sigmoid, beta 0.1, label_smoothing 0) or orpo (beta 0.1). Every number comes from
TRL's own trainers (SFTTrainer, DPOTrainer, trl.experimental.orpo.ORPOTrainer): the step-0 values
from the trainer's compute_loss / concatenated_forward / odds_ratio_loss on the batch its own data
collator builds, and the step from `trainer.train()` with max_steps=1 (AdamW from the Trainer,
constant LR, no clipping). Each value is also recomputed with plain PyTorch (full logits,
log_softmax in float64) and the script fails if the two differ by more than 1e-5; every updated
tensor is checked against the closed form of AdamW's first step (fails above 1e-6).

Token ids are fixed (SFT_EXAMPLES, PREF_EXAMPLES below). A tiny in-memory WordLevel tokenizer maps id i <-> word
("<pad>"=0, "<s>"=1, "</s>"=2, "t3".."t95") so that TRL's text pipelines (DPO, ORPO) run unchanged;
prompts already start with BOS (1) and completions already end with EOS (2), so TRL adds neither,
and the script asserts that the ids TRL tokenized are exactly the ids given here.

Offline (HF_HUB_OFFLINE=1), deterministic; run pinned to one core with one torch thread:
    taskset -c 1 scripts/.venv-trl/bin/python scripts/reference/make_train_fixtures.py --out tests/fixtures/train
"""

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import (  # noqa: E402
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    load_peft_weights,
    set_peft_model_state_dict,
)
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from tokenizers.pre_tokenizers import WhitespaceSplit  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    TrainerCallback,
)

import trl  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402
    from trl.experimental.orpo.orpo_trainer import log1mexp  # noqa: E402

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore")

PAD, BOS, EOS = 0, 1, 2
VOCAB = 96
TOL = 1e-5

MODEL_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    hidden_act="silu",
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
)

LORA = dict(
    r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    bias="none",
    task_type="CAUSAL_LM",
)

OPTIM = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
DPO_BETA = 0.1
ORPO_BETA = 0.1

# ---------------------------------------------------------------------------------------------
# Fixed batches (token ids chosen by hand from 3..95; written out explicitly).
# Prompts start with BOS=1, completions end with EOS=2, pad=0 (right padding).
SFT_EXAMPLES = [
    {"prompt": [1, 52, 18, 77, 40], "completion": [63, 9, 85, 2]},  # 5 + 4 = 9
    {"prompt": [1, 31, 94, 7, 26, 58], "completion": [12, 71, 45, 88, 33, 2]},  # 6 + 6 = 12
    {"prompt": [1, 66, 23], "completion": [90, 4, 57, 2]},  # 3 + 4 = 7
]
PREF_EXAMPLES = [
    {"prompt": [1, 14, 83, 29, 61], "chosen": [47, 5, 70, 2], "rejected": [38, 92, 11, 75, 20, 2]},
    {"prompt": [1, 55, 36], "chosen": [81, 17, 64, 27, 2], "rejected": [3, 49, 2]},
]


def ids_to_text(ids):
    return " ".join(word(i) for i in ids)


def word(i):
    return {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}.get(i, f"t{i}")


def make_tokenizer():
    vocab = {word(i): i for i in range(VOCAB)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    t.padding_side = "right"
    for i in range(VOCAB):
        assert t(word(i), add_special_tokens=False)["input_ids"] == [i], i
    return t


# ---------------------------------------------------------------------------------------------
# Model


def make_tiny_model(out_dir: Path):
    torch.manual_seed(0)
    config = LlamaConfig(**MODEL_CONFIG)
    model = LlamaForCausalLM(config).to(torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out_dir, safe_serialization=True)
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg.pop("transformers_version", None)
    # transformers 5 writes only rope_parameters.rope_theta; also keep the top-level key that older readers use
    assert cfg["rope_parameters"]["rope_theta"] == MODEL_CONFIG["rope_theta"]
    cfg["rope_theta"] = MODEL_CONFIG["rope_theta"]
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = out_dir / "generation_config.json"
    if gen.exists():
        gen.unlink()
    return model


def load_tiny(tiny_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    assert model.config.rope_parameters["rope_theta"] == MODEL_CONFIG["rope_theta"]
    return model


def make_lora_init(tiny_dir: Path, out_dir: Path):
    base = load_tiny(tiny_dir)
    torch.manual_seed(1)  # lora_A: PEFT's default kaiming-uniform init under this seed
    model = get_peft_model(base, LoraConfig(**LORA))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out_dir, safe_serialization=True)
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "../tiny"  # relative to this directory; no machine-specific path
    cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT stores a set: fix the order
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    readme = out_dir / "README.md"
    if readme.exists():
        readme.unlink()


def load_adapter_weights(model, lora_dir: Path):
    """Copy lora_init's tensors into the "default" adapter of a PeftModel, checking every tensor is covered."""
    saved = load_peft_weights(str(lora_dir), device="cpu")
    res = set_peft_model_state_dict(model, saved)
    assert not [k for k in res.unexpected_keys if "lora_" in k], res.unexpected_keys
    now = get_peft_model_state_dict(model)
    assert sorted(now) == sorted(saved), (sorted(now)[:3], sorted(saved)[:3])
    for k, v in saved.items():
        assert torch.equal(now[k], v), k


def load_lora(tiny_dir: Path, lora_dir: Path):
    base = load_tiny(tiny_dir)
    return PeftModel.from_pretrained(base, lora_dir, is_trainable=True)


# ---------------------------------------------------------------------------------------------
# Helpers


def common_args(out: str, batch_size: int, max_length=None):
    return dict(
        output_dir=out,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        max_steps=1,
        learning_rate=OPTIM["lr"],
        adam_beta1=OPTIM["betas"][0],
        adam_beta2=OPTIM["betas"][1],
        adam_epsilon=OPTIM["eps"],
        weight_decay=OPTIM["weight_decay"],
        optim="adamw_torch",
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        seed=0,
        data_seed=0,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **({"max_length": max_length} if max_length is not None else {}),
    )


class StepProbe(TrainerCallback):
    """Records the gradient norm and the optimizer's param groups right before the single step."""

    def __init__(self):
        self.trainer = None
        self.grad_norm = None
        self.groups = None

    def on_pre_optimizer_step(self, args, state, control, **kw):
        model = self.trainer.model
        sq = 0.0
        for p in model.parameters():
            if p.grad is not None:
                sq += float(p.grad.detach().double().pow(2).sum())
        self.grad_norm = math.sqrt(sq)
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        names = {id(p): n for n, p in model.named_parameters()}
        opt = self.trainer.optimizer
        self.groups = [
            {
                "lr": g["lr"],
                "betas": list(g["betas"]),
                "eps": g["eps"],
                "weight_decay": g["weight_decay"],
                "params": [names[id(p)] for p in g["params"]],
            }
            for g in opt.param_groups
        ]
        self.optimizer_class = type(getattr(opt, "optimizer", opt)).__module__ + "." + type(
            getattr(opt, "optimizer", opt)
        ).__name__


def run_one_step(trainer):
    probe = StepProbe()
    probe.trainer = trainer
    trainer.add_callback(probe)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 1, trainer.state.global_step
    assert len(logs) == 1
    log = logs[0]
    groups = probe.groups
    for g in groups:
        assert abs(g["lr"] - OPTIM["lr"]) < 1e-15, g["lr"]
    if "grad_norm" in log:
        assert abs(log["grad_norm"] - probe.grad_norm) <= 1e-5 * max(1.0, probe.grad_norm), (log, probe.grad_norm)
    assert "learning_rate" not in log or abs(log["learning_rate"] - OPTIM["lr"]) < 1e-15, log
    no_decay = sorted(n for g in groups if g["weight_decay"] == 0.0 for n in g["params"])
    # Independent check of the update: AdamW's first step, in float64, from the captured params and grads
    after = dict(trainer.model.named_parameters())
    wd_of = {n: g["weight_decay"] for g in groups for n in g["params"]}
    lr, (b1, b2), eps = OPTIM["lr"], OPTIM["betas"], OPTIM["eps"]
    worst = 0.0
    for n, p0 in probe.before.items():
        g = probe.grads[n].double()
        m_hat = (1 - b1) * g / (1 - b1)
        v_hat = (1 - b2) * g * g / (1 - b2)
        want = p0.double() * (1 - lr * wd_of[n]) - lr * m_hat / (v_hat.sqrt() + eps)
        worst = max(worst, float((after[n].detach().double() - want).abs().max()))
    if worst > 1e-6:
        raise SystemExit(f"AdamW step differs from the closed form by {worst}")
    trainer._probe = probe
    return {
        "adamw_closed_form_max_abs_diff": worst,
        "grad_global_l2_norm": probe.grad_norm,
        "trainer_logged_grad_norm": log.get("grad_norm"),
        "trainer_logged_loss": log["loss"],
        "trainer_logged_learning_rate": log.get("learning_rate"),
        "optimizer_class": probe.optimizer_class,
        "num_trainable_tensors": sum(len(g["params"]) for g in groups),
        "no_weight_decay_params": no_decay,
    }


def peft_key(name: str) -> str:
    """Trainer-side LoRA parameter name -> PEFT file key (the adapter name is dropped, as in save_pretrained)."""
    assert ".default." in name, name
    return name.replace(".default.", ".")


def save_step(trainer, kind: str, out_dir: Path, obj: str):
    """after_step/<obj>_<kind>.safetensors (updated tensors) and <obj>_<kind>_grad.safetensors (the gradients that
    the step used)."""
    model = trainer.model
    if kind == "full":
        sd = dict(model.state_dict())
        grads = dict(trainer._probe.grads)
        assert sorted(grads) == sorted(sd), "every parameter of the full model must get a gradient"
    else:
        sd = get_peft_model_state_dict(model)
        grads = {peft_key(n): g for n, g in trainer._probe.grads.items()}
        assert sorted(grads) == sorted(sd), (sorted(grads)[:2], sorted(sd)[:2])
    for name, tensors in [(f"{obj}_{kind}", sd), (f"{obj}_{kind}_grad", grads)]:
        tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
        save_file(tensors, str(out_dir / f"{name}.safetensors"), metadata={"format": "pt"})


def tolist(t):
    return t.detach().cpu().tolist()


def naive_token_logps(model, input_ids, attention_mask):
    """Plain PyTorch: full logits, log_softmax in float64; logp[b, t] = log p(ids[b, t+1] | ids[b, :t+1])."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    lp = torch.log_softmax(logits.double(), dim=-1)[:, :-1]
    return lp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def check(name, a, b, tol=TOL):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    d = float((a - b).abs().max())
    if not d <= tol:
        raise SystemExit(f"{name}: TRL and plain PyTorch differ by {d} (> {tol})\n{a}\n{b}")
    return d


# ---------------------------------------------------------------------------------------------
# SFT


def sft_dataset():
    rows = {"input_ids": [], "completion_mask": []}
    for ex in SFT_EXAMPLES:
        rows["input_ids"].append(ex["prompt"] + ex["completion"])
        rows["completion_mask"].append([0] * len(ex["prompt"]) + [1] * len(ex["completion"]))
    return Dataset.from_dict(rows)


def make_sft_trainer(model, tok, tmp):
    args = SFTConfig(
        **common_args(tmp, len(SFT_EXAMPLES)),
        completion_only_loss=True,  # REQUIRED for pre-tokenized input_ids/completion_mask (default None -> False)
        max_length=None,
        packing=False,
        padding_free=False,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft_dataset(), processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    for r, ex in zip(rows, SFT_EXAMPLES, strict=True):
        assert r["input_ids"] == ex["prompt"] + ex["completion"], r
        assert r["labels"] == [-100] * len(ex["prompt"]) + ex["completion"], r
    batch = trainer.data_collator(rows)
    return trainer, batch


def sft_eval(trainer, batch, checks, tag):
    step0 = {}
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, dict(batch)))
        # independent: mean over all completion target tokens of the batch
        lp = naive_token_logps(trainer.model, batch["input_ids"], batch["attention_mask"])
        tgt = batch["labels"][:, 1:] != -100
        per_seq_sum = (-(lp * tgt)).sum(1)
        n_tok = tgt.sum(1)
        naive = float(per_seq_sum.sum() / n_tok.sum())
    checks[tag] = check(tag, trl_loss, naive)
    step0["loss"] = trl_loss
    step0["per_sequence_nll_sum"] = tolist(per_seq_sum)
    step0["per_sequence_num_target_tokens"] = tolist(n_tok)
    step0["mean_of_per_sequence_means_NOT_used_by_TRL"] = float((per_seq_sum / n_tok).mean())
    return step0


# ---------------------------------------------------------------------------------------------
# DPO


def pref_text_dataset():
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for ex in PREF_EXAMPLES:
        rows["prompt"].append(ids_to_text(ex["prompt"]))
        rows["chosen"].append(" " + ids_to_text(ex["chosen"]))
        rows["rejected"].append(" " + ids_to_text(ex["rejected"]))
    return Dataset.from_dict(rows)


def dpo_per_example(trainer, batch):
    """Per-example policy/reference log-probs exactly as DPOTrainer._compute_loss gets them."""
    model = trainer.model
    kw = {k: v for k, v in batch.items() if k not in {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}}
    kw["use_cache"] = False
    cm = batch["completion_mask"]
    labels = batch["input_ids"].masked_fill(cm == 0, -100)
    seq_len = cm.size(1) - 1
    with torch.no_grad():
        pol = model(**kw, labels=labels, fused_lm_head=True).log_probs[:, -seq_len:].sum(1)
        if isinstance(model, PeftModel):
            with model.disable_adapter():
                ref = model(**kw, labels=labels, fused_lm_head=True).log_probs[:, -seq_len:].sum(1)
        else:
            ref = trainer.ref_model(**kw, labels=labels, fused_lm_head=True).log_probs[:, -seq_len:].sum(1)
    pc, pr = pol.chunk(2)
    rc, rr = ref.chunk(2)
    return pc, pr, rc, rr


def dpo_naive(trainer, batch):
    model = trainer.model
    tgt = batch["completion_mask"][:, 1:].bool()
    lp = naive_token_logps(model, batch["input_ids"], batch["attention_mask"])
    pol = (lp * tgt).sum(1)
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            lp_ref = naive_token_logps(model, batch["input_ids"], batch["attention_mask"])
    else:
        lp_ref = naive_token_logps(trainer.ref_model, batch["input_ids"], batch["attention_mask"])
    ref = (lp_ref * tgt).sum(1)
    return (*pol.chunk(2), *ref.chunk(2))


def make_dpo_trainer(model, ref_model, tok, tmp, label_smoothing=0.0, loss_type="sigmoid", lora_dir=None):
    """With lora_dir, `model` is the plain base model: the trainer gets `peft_config` (a fresh adapter, so TRL's
    reference is the base model with the adapter disabled) and the lora_init weights are then copied into the
    adapter. Passing a PeftModel that already has an adapter would make TRL 1.x use a frozen copy of that adapter
    ("ref") as the reference instead."""
    args = DPOConfig(
        **common_args(tmp, len(PREF_EXAMPLES)),
        beta=DPO_BETA,
        loss_type=[loss_type],
        label_smoothing=label_smoothing,
        max_length=None,
        precompute_ref_log_probs=False,
        dataset_num_proc=None,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=pref_text_dataset(),
        processing_class=tok,
        peft_config=LoraConfig(**LORA) if lora_dir is not None else None,
    )
    if lora_dir is not None:
        assert "ref" not in trainer.model.peft_config
        load_adapter_weights(trainer.model, lora_dir)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    for r, ex in zip(rows, PREF_EXAMPLES, strict=True):
        assert r["prompt_ids"] == ex["prompt"], r
        assert r["chosen_ids"] == ex["chosen"], r
        assert r["rejected_ids"] == ex["rejected"], r
    batch = trainer.data_collator(rows)
    return trainer, batch


def dpo_step0(trainer, batch, label_smoothing, checks, tag):
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, dict(batch)))
    m = trainer._metrics["train" if trainer.model.training else "eval"]
    pc, pr, rc, rr = dpo_per_example(trainer, batch)
    npc, npr, nrc, nrr = dpo_naive(trainer, batch)
    for nm, a, b in [("policy_chosen", pc, npc), ("policy_rejected", pr, npr), ("ref_chosen", rc, nrc),
                     ("ref_rejected", rr, nrr)]:
        checks[f"{tag}_{nm}_logps"] = check(f"{tag} {nm}", a, b)
    beta = DPO_BETA
    cr = beta * (pc - rc)
    rj = beta * (pr - rr)
    z = cr - rj  # = beta * ((pc - rc) - (pr - rr))
    sigmoid_per = -F.logsigmoid(z)
    cdpo_per = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    out = {
        "loss": trl_loss,
        "per_example_loss": tolist(sigmoid_per),
        "policy_chosen_logps": tolist(pc),
        "policy_rejected_logps": tolist(pr),
        "ref_chosen_logps": tolist(rc),
        "ref_rejected_logps": tolist(rr),
        "chosen_rewards": tolist(cr),
        "rejected_rewards": tolist(rj),
        "margins": tolist(cr - rj),
        "reward_accuracies": tolist((cr > rj).float()),
        "reward_accuracy": float((cr > rj).float().mean()),
        "trl_logged_means": {
            k: m[k][-1]
            for k in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                      "logps/rejected"]
        },
    }
    checks[f"{tag}_loss_recomputed"] = check(f"{tag} loss", trl_loss, float(sigmoid_per.mean()))
    if label_smoothing:
        out["cdpo_loss_label_smoothed"] = float(cdpo_per.mean())
        out["cdpo_per_example_loss"] = tolist(cdpo_per)
    for k, v in [("rewards/chosen", cr), ("rewards/rejected", rj), ("rewards/margins", cr - rj),
                 ("logps/chosen", pc), ("logps/rejected", pr)]:
        check(f"{tag} logged {k}", out["trl_logged_means"][k], float(v.mean()), tol=1e-5)
    return out


# ---------------------------------------------------------------------------------------------
# ORPO


def make_orpo_trainer(model, tok, tmp):
    args = ORPOConfig(
        **common_args(tmp, len(PREF_EXAMPLES)),
        beta=ORPO_BETA,
        max_length=64,
        max_completion_length=None,
        dataset_num_proc=None,
        remove_unused_columns=False,
    )
    trainer = ORPOTrainer(model=model, args=args, train_dataset=pref_text_dataset(), processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    for r, ex in zip(rows, PREF_EXAMPLES, strict=True):
        assert r["prompt_input_ids"] == ex["prompt"], r
        assert r["chosen_input_ids"] == ex["prompt"] + ex["chosen"], r
        assert r["rejected_input_ids"] == ex["prompt"] + ex["rejected"], r
        assert r["chosen_labels"] == [-100] * len(ex["prompt"]) + ex["chosen"], r
        assert r["rejected_labels"] == [-100] * len(ex["prompt"]) + ex["rejected"], r
    batch = trainer.data_collator(rows)
    return trainer, batch


def orpo_step0(trainer, batch, checks, tag):
    with torch.no_grad():
        ch_lp, rj_lp, _, _, nll = trainer.concatenated_forward(trainer.model, batch)[:5]
        losses, ch_rw, rj_rw, mean_ratio, mean_log_odds = trainer.odds_ratio_loss(ch_lp, rj_lp)
        loss = nll - losses.mean()
        trl_loss = float(trainer.compute_loss(trainer.model, dict(batch)))
    checks[f"{tag}_loss_recomputed"] = check(f"{tag} loss", trl_loss, float(loss))
    log_odds = (ch_lp - rj_lp) - (log1mexp(ch_lp) - log1mexp(rj_lp))
    ratio = F.logsigmoid(log_odds)
    # independent recomputation
    cat = trainer.concatenated_inputs(batch, padding_value=PAD)
    ids, am, lab = cat["concatenated_input_ids"], cat["concatenated_attention_mask"], cat["concatenated_labels"]
    lp = naive_token_logps(trainer.model, ids, am)
    comp = lab[:, 1:] != -100
    avg = (lp * comp).sum(1) / comp.sum(1)
    n = len(PREF_EXAMPLES)
    full = am[:n, 1:].bool()  # NLL over prompt + chosen tokens (every non-pad target of the chosen rows)
    naive_nll = -(lp[:n] * full).sum() / full.sum()
    checks[f"{tag}_avg_logps"] = check(f"{tag} avg logps", torch.cat([ch_lp, rj_lp]), avg)
    checks[f"{tag}_nll"] = check(f"{tag} nll", nll, naive_nll)
    pc, pr = avg[:n], avg[n:]
    naive_lo = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
    checks[f"{tag}_log_odds"] = check(f"{tag} log odds", log_odds, naive_lo)
    return {
        "loss": trl_loss,
        "nll_loss": float(nll),
        "nll_num_target_tokens": int(full.sum()),
        "nll_num_target_tokens_per_example": tolist(full.sum(1)),
        "or_term_per_example_beta_logsigmoid": tolist(losses),
        "log_odds_ratio_per_example": tolist(log_odds),
        "logsigmoid_log_odds_per_example": tolist(ratio),
        "policy_chosen_avg_logps": tolist(ch_lp),
        "policy_rejected_avg_logps": tolist(rj_lp),
        "num_completion_tokens_chosen": tolist(comp[:n].sum(1)),
        "num_completion_tokens_rejected": tolist(comp[n:].sum(1)),
        "chosen_rewards": tolist(ch_rw),
        "rejected_rewards": tolist(rj_rw),
        "trl_metric_log_odds_ratio_mean": float(mean_ratio),
        "trl_metric_log_odds_chosen_mean": float(mean_log_odds),
    }


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/train", help="output directory")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    out = Path(args.out)
    for sub in ["tiny", "lora_init", "after_step"]:
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "after_step").mkdir(parents=True, exist_ok=True)
    tiny_dir, lora_dir = out / "tiny", out / "lora_init"

    make_tiny_model(tiny_dir)
    make_lora_init(tiny_dir, lora_dir)
    tok = make_tokenizer()
    checks = {}
    res = {}
    tmp = tempfile.mkdtemp(prefix="paft-trl-")
    try:
        # ---------------- SFT
        for kind in ["full", "lora"]:
            model = load_tiny(tiny_dir) if kind == "full" else load_lora(tiny_dir, lora_dir)
            trainer, batch = make_sft_trainer(model, tok, tmp)
            step0 = sft_eval(trainer, batch, checks, f"sft_{kind}")
            step = run_one_step(trainer)
            check(f"sft {kind} logged loss", step["trainer_logged_loss"], step0["loss"], tol=1e-4)
            save_step(trainer, kind, out / "after_step", "sft")
            after = sft_eval(trainer, batch, checks, f"sft_{kind}_after_step")
            res.setdefault("sft", {})[kind] = {"step0": step0, "step": step, "after_step_same_batch": after}
            res["sft"]["collated_batch"] = {k: tolist(v) for k, v in batch.items()}
            print(f"sft {kind}: loss {step0['loss']:.6f} grad_norm {step['grad_global_l2_norm']:.6f} "
                  f"after {after['loss']:.6f}", file=sys.stderr)

        # ---------------- DPO
        for kind in ["full", "lora"]:
            lora_arg = lora_dir if kind == "lora" else None
            for ls in [0.0, 0.1]:
                ref = load_tiny(tiny_dir) if kind == "full" else None
                trainer, batch = make_dpo_trainer(load_tiny(tiny_dir), ref, tok, tmp, label_smoothing=ls,
                                                  lora_dir=lora_arg)
                tag = f"dpo_{kind}_ls{ls}"
                step0 = dpo_step0(trainer, batch, ls, checks, tag)
                entry = {"step0": step0}
                if ls == 0.0:
                    step = run_one_step(trainer)
                    check(f"{tag} logged loss", step["trainer_logged_loss"], step0["loss"], tol=1e-4)
                    save_step(trainer, kind, out / "after_step", "dpo")
                    entry["step"] = step
                    entry["after_step_same_batch"] = dpo_step0(trainer, batch, ls, checks, tag + "_after_step")
                    res.setdefault("dpo", {})["collated_batch"] = {k: tolist(v) for k, v in batch.items()}
                    res["dpo"][kind] = entry
                    print(f"{tag}: loss {step0['loss']:.6f} grad_norm {step['grad_global_l2_norm']:.6f} after "
                          f"{entry['after_step_same_batch']['loss']:.6f}", file=sys.stderr)
                else:
                    res["dpo"][f"{kind}_label_smoothing_0.1"] = entry
                    print(f"{tag}: loss {step0['loss']:.6f} cdpo {step0['cdpo_loss_label_smoothed']:.6f}",
                          file=sys.stderr)
            # TRL's "robust" loss with label_smoothing 0.1 (the one TRL 1.x loss that reads label_smoothing
            # on a paired sigmoid objective), for reference
            ref = load_tiny(tiny_dir) if kind == "full" else None
            trainer, batch = make_dpo_trainer(load_tiny(tiny_dir), ref, tok, tmp, label_smoothing=0.1,
                                              loss_type="robust", lora_dir=lora_arg)
            with torch.no_grad():
                robust = float(trainer.compute_loss(trainer.model, dict(batch)))
            res["dpo"][f"{kind}_label_smoothing_0.1"]["step0"]["trl_robust_loss"] = robust
        # What TRL does when handed a PeftModel that already carries a (non-zero) adapter and ref_model=None: it
        # adds a frozen copy of the adapter named "ref" and uses it as the reference, so at step 0 policy == ref.
        trainer, batch = make_dpo_trainer(load_lora(tiny_dir, lora_dir), None, tok, tmp)
        assert "ref" in trainer.model.peft_config
        with torch.no_grad():
            res["dpo"]["lora_passed_as_PeftModel_ref_is_adapter_copy"] = {
                "loss": float(trainer.compute_loss(trainer.model, dict(batch))),
                "note": "not the fixture's setting: DPOTrainer(model=PeftModel with adapter, ref_model=None) makes "
                "the reference a frozen copy of the initial adapter (adapter 'ref'), so step-0 loss = log 2 and "
                "rewards = 0. The 'lora' entry instead uses peft_config (reference = base model, adapter disabled).",
            }

        # ---------------- ORPO
        for kind in ["full", "lora"]:
            model = load_tiny(tiny_dir) if kind == "full" else load_lora(tiny_dir, lora_dir)
            trainer, batch = make_orpo_trainer(model, tok, tmp)
            tag = f"orpo_{kind}"
            step0 = orpo_step0(trainer, batch, checks, tag)
            step = run_one_step(trainer)
            check(f"{tag} logged loss", step["trainer_logged_loss"], step0["loss"], tol=1e-4)
            save_step(trainer, kind, out / "after_step", "orpo")
            after = orpo_step0(trainer, batch, checks, tag + "_after_step")
            res.setdefault("orpo", {})[kind] = {"step0": step0, "step": step, "after_step_same_batch": after}
            res["orpo"]["collated_batch"] = {
                k: tolist(v) for k, v in batch.items() if isinstance(v, torch.Tensor) and not k.startswith("prompt_")
            }
            print(f"{tag}: loss {step0['loss']:.6f} grad_norm {step['grad_global_l2_norm']:.6f} "
                  f"after {after['loss']:.6f}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    expected = {
        "description": "Reference values from TRL/PEFT on torch CPU float32; see scripts/reference/README.md "
        "(section 'TRL/PEFT training fixtures').",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": version("peft"),
            "accelerate": version("accelerate"),
            "datasets": version("datasets"),
            "torch_threads": torch.get_num_threads(),
            "attn_implementation": load_tiny(tiny_dir).config._attn_implementation,
        },
        "model": {
            "dir": "tiny",
            "config": MODEL_CONFIG,
            "init": "LlamaForCausalLM(config) after torch.manual_seed(0); then, with "
            "torch.Generator().manual_seed(0) in named_parameters() order, every *norm.weight = 1 + 0.1*randn, every "
            "other parameter = 0.2*randn",
        },
        "lora": {
            "dir": "lora_init",
            "config": LORA,
            "scaling": LORA["lora_alpha"] / LORA["r"],
            "init": "get_peft_model after torch.manual_seed(1) (lora_A = PEFT default kaiming-uniform), then every "
            "lora_B = 0.1*randn from torch.Generator().manual_seed(2) in named_parameters() order",
        },
        "special_ids": {"pad": PAD, "bos": BOS, "eos": EOS},
        "batches": {
            "sft": SFT_EXAMPLES,
            "preference": PREF_EXAMPLES,
            "note": "Token ids that entered the model, exactly: TRL added no BOS/EOS (prompts already start with 1, "
            "completions already end with 2). Right padding with id 0; attention_mask 0 on padding. SFT labels = "
            "input_ids with -100 on prompt and padding. DPO rows are [chosen_0, chosen_1, rejected_0, rejected_1], "
            "all padded to the longest of the four. ORPO concatenates chosen and rejected the same way.",
        },
        "hyperparameters": {
            "optimizer": "torch.optim.AdamW (Trainer optim='adamw_torch')",
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in OPTIM.items()},
            "weight_decay_exclusions": "transformers Trainer.get_decay_parameter_names: no weight decay for names "
            "matching bias|layernorm|rmsnorm|(^|.)norm($|.)|_norm($|.) -> input_layernorm, post_attention_layernorm "
            "and model.norm weights (all LoRA tensors decay). Decoupled decay p -= lr*wd*p is applied to every "
            "tensor in the decay group, including embedding rows with zero gradient.",
            "lr_scheduler": "constant (LR used at step 1 = 1e-3)",
            "warmup_steps": 0,
            "max_grad_norm": 0.0,
            "gradient_clipping": "none (Trainer clips only if max_grad_norm > 0; it still computes the norm with "
            "clip_grad_norm_(params, inf) for logging)",
            "gradient_accumulation_steps": 1,
            "dpo": {"loss_type": "sigmoid", "beta": DPO_BETA, "label_smoothing": 0.0},
            "orpo": {"beta": ORPO_BETA},
        },
        "normalisation": {
            "sft": "token mean over the whole batch: sum over all completion target tokens of -log p / number of "
            "completion target tokens in the batch (labels[:, 1:] != -100). NOT a mean of per-sequence means.",
            "dpo": "per-sequence log-prob = SUM of log p over completion tokens (prompt and padding excluded); "
            "loss = mean over pairs of -logsigmoid(beta*((pc-rc)-(pr-rr))); rewards = beta*(policy-ref).",
            "orpo": "avg log-prob = MEAN of log p over completion tokens per sequence; log_odds = (ac-ar) - "
            "(log(1-exp(ac)) - log(1-exp(ar))); loss = nll - mean(beta*logsigmoid(log_odds)); nll = token mean "
            "cross-entropy over ALL non-pad target tokens (prompt AND completion) of the chosen sequences.",
        },
        "sft": res["sft"],
        "dpo": res["dpo"],
        "orpo": res["orpo"],
        "trl_vs_plain_pytorch_max_abs_diff": checks,
        "files": {
            "after_step/<obj>_full.safetensors": "all parameters after one AdamW step (HF names)",
            "after_step/<obj>_full_grad.safetensors": "the gradients of the step-0 loss that the step used",
            "after_step/<obj>_lora.safetensors": "LoRA tensors after one AdamW step (PEFT names, as in "
            "lora_init/adapter_model.safetensors)",
            "after_step/<obj>_lora_grad.safetensors": "their gradients (PEFT names)",
        },
    }
    res["sft"]["normalisation"] = expected["normalisation"]["sft"]
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1024:.0f} KiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
