#!/usr/bin/env python3
"""Seconds per optimizer step of TRL + PEFT LoRA on torch CPU, the baseline for paft's trainer.

    taskset -c 1 scripts/.venv-trl/bin/python benchmarks/trl_step.py \
        --model target/bench-assets/smollm-f32 --threads 1 --steps 3

Loads the Hugging Face model directory --model in float32, and for each objective drives TRL's own
trainer (SFTTrainer / DPOTrainer, `trainer.train()`) with a PEFT LoRA adapter given as
`peft_config`: r 16, alpha 32, dropout 0, on q/k/v/o/gate/up/down_proj. Optimizer: the Trainer's
AdamW (lr 1e-4, constant schedule, no warm-up); no gradient clipping; gradient accumulation 1;
float32 (bf16=False); gradient checkpointing off unless --grad-ckpt (TRL's configs default it on).

  sft: batch 4 x 512 random token ids (fixed seed), completion mask on the last 256 tokens
       (pre-tokenized `input_ids` + `completion_mask`, completion_only_loss=True).
  dpo: batch 4 pairs, each prompt 256 + chosen 256 and prompt 256 + rejected 256 random ids; the
       policy runs on all 8 sequences (forward + backward); the reference log-probs come from a
       no-grad forward of the same model with the adapter disabled (TRL's default with PEFT), inside
       each step, or are precomputed once before training with --dpo-ref precomputed
       (precompute_ref_log_probs=True; then not part of the step time). sigmoid loss, beta 0.1.

The random ids go straight to the trainer: the SFT dataset is already tokenized, and for DPO the
dataset preparation (text tokenization) is bypassed by a subclass whose `_prepare_dataset` returns
the `prompt_ids`/`chosen_ids`/`rejected_ids` columns unchanged. Everything else (collator, fused
LM-head log-probs, loss, backward, AdamW) is TRL's and transformers' own code.

A step is timed from the Trainer's `on_step_begin` to its `on_step_end` callback: fetching and
collating the batch, forward, backward, optimizer step, zero_grad. The first step is a warm-up and
is not counted; --steps more steps are timed. Prints one JSON line per objective:
  {"impl":"trl","objective":"sft"|"dpo","threads":T,"seconds_per_step":...,"steps":N, ...}
seconds_per_step is the mean wall-clock time of the N timed steps (the line also has their median,
each value, and cpu_s_per_step, the process CPU time per step: with --threads 1 on a shared core,
a wall time well above the CPU time means another process took turns on the core).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402

import trl  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class StepTimer(TrainerCallback):
    def __init__(self):
        self.t0 = self.c0 = None
        self.times = []
        self.cpu = []

    def on_step_begin(self, args, state, control, **kw):
        self.c0 = time.process_time()
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t0)
        self.cpu.append(time.process_time() - self.c0)


class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer fed prompt_ids/chosen_ids/rejected_ids directly (text tokenization bypassed)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def common_args(out, a, batch):
    return dict(
        output_dir=out,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=a.steps + 1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=0.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=a.grad_ckpt,
        use_cpu=True,
        seed=0,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        logging_steps=10**9,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def lora_config(a):
    return LoraConfig(
        r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"
    )


def load(a):
    return AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation=a.attn)


def run_sft(a, tok, out, gen, vocab):
    n = (a.steps + 1) * a.batch
    ids = torch.randint(3, vocab, (n, a.seq), generator=gen).tolist()
    mask = [[0] * (a.seq - a.completion) + [1] * a.completion for _ in range(n)]
    ds = Dataset.from_dict({"input_ids": ids, "completion_mask": mask})
    args = SFTConfig(**common_args(out, a, a.batch), completion_only_loss=True, max_length=None, packing=False)
    trainer = SFTTrainer(model=load(a), args=args, train_dataset=ds, processing_class=tok, peft_config=lora_config(a))
    return trainer


def run_dpo(a, tok, out, gen, vocab):
    n = (a.steps + 1) * a.batch
    p = a.seq - a.completion

    def rand(k):
        return torch.randint(3, vocab, (n, k), generator=gen).tolist()

    ds = Dataset.from_dict({"prompt_ids": rand(p), "chosen_ids": rand(a.completion), "rejected_ids": rand(a.completion)})
    args = DPOConfig(
        **common_args(out, a, a.batch),
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=None,
        precompute_ref_log_probs=a.dpo_ref == "precomputed",
    )
    trainer = PretokenizedDPOTrainer(
        model=load(a), args=args, train_dataset=ds, processing_class=tok, peft_config=lora_config(a)
    )
    return trainer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory (float32 SmolLM2-135M export)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after 1 warm-up step)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence (prompt + completion)")
    ap.add_argument("--completion", type=int, default=256, help="completion tokens per sequence")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--objectives", default="sft,dpo")
    ap.add_argument("--dpo-ref", choices=["live", "precomputed"], default="live")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (TRL's default; off here)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    vocab = AutoConfig.from_pretrained(a.model).vocab_size
    print(
        f"# torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
        f"threads {torch.get_num_threads()}, attn {a.attn}, grad_ckpt {a.grad_ckpt}",
        file=sys.stderr,
    )
    for obj in a.objectives.split(","):
        gen = torch.Generator().manual_seed(a.seed)
        with tempfile.TemporaryDirectory(prefix="trl-step-") as out:
            trainer = {"sft": run_sft, "dpo": run_dpo}[obj](a, tok, out, gen, vocab)
            n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            timer = StepTimer()
            trainer.add_callback(timer)
            # keep stdout to the one JSON line per objective (the Trainer prints its log dicts otherwise)
            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
            assert torch.get_num_threads() == a.threads
            t0 = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t0
            assert len(timer.times) == a.steps + 1, timer.times
            timed = timer.times[1:]
            rec = {
                "impl": "trl",
                "objective": obj,
                "threads": a.threads,
                "seconds_per_step": statistics.mean(timed),
                "steps": a.steps,
                "median_s": statistics.median(timed),
                "step_s": [round(t, 3) for t in timed],
                "warmup_s": round(timer.times[0], 3),
                "cpu_s_per_step": round(statistics.mean(timer.cpu[1:]), 3),
                "batch": a.batch,
                "seq": a.seq,
                "completion": a.completion,
                "lora_r": a.rank,
                "lora_alpha": a.alpha,
                "trainable_params": n_trainable,
                "grad_ckpt": a.grad_ckpt,
                "train_wall_s": round(wall, 1),
            }
            if obj == "dpo":
                rec["dpo_ref"] = a.dpo_ref
            print(json.dumps(rec), flush=True)
            del trainer


if __name__ == "__main__":
    main()
