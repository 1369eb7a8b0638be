#!/usr/bin/env python3
"""Reference merge fixtures from mergekit, for checking paft's merge engine without Python.

Run from the repository root (every path in the written YAML files is relative to it):

    scripts/.venv-mergekit/bin/python scripts/reference/make_merge_fixtures.py

It (1) writes tiny random Llama models with fixed seeds under tests/fixtures/merge/models/
(base, ft_a, ft_b, the PEFT LoRA adapter lora_b and ft_lora = base with lora_b merged by PEFT),
(2) runs `mergekit-yaml` on CPU for every case below and keeps config.yaml, model.safetensors and
config.json under tests/fixtures/merge/<case>/, (3) recomputes the core cases with an independent
float64 NumPy implementation of the formulas in tests/fixtures/merge/README.md and fails if
anything differs by more than 1e-5, and (4) writes tests/fixtures/merge/manifest.json.

`--probes` additionally runs the edge-case configs behind KNOWN_MERGEKIT_ISSUES.md (in a temp
dir; nothing is kept) and prints what happened.

No network access is needed or attempted (HF_HUB_OFFLINE=1).
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import load_file as load_np  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIX = Path("tests/fixtures/merge")  # relative to REPO; YAML paths use this prefix
MODELS = FIX / "models"

CONFIG = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

LORA_R, LORA_ALPHA = 4, 8
LORA_TARGETS = ["q_proj", "v_proj", "down_proj"]


# ----------------------------------------------------------------------------------------------
# input models


def base_shapes():
    h, i, v = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    kv = CONFIG["num_key_value_heads"] * h // CONFIG["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return dict(sorted(shapes.items()))


def write_model(dir_: Path, tensors: dict):
    dir_.mkdir(parents=True, exist_ok=True)
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{k: v for k, v in CONFIG.items() if k != "model_type"}, dtype="float32")
    cfg.save_pretrained(dir_)
    save_file(
        {k: v.contiguous() for k, v in sorted(tensors.items())},
        str(dir_ / "model.safetensors"),
        metadata={"format": "pt"},
    )


def make_models():
    g = torch.Generator().manual_seed(20261124)
    shapes = base_shapes()

    def randn(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    base = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            base[name] = 1.0 + randn(shape, 0.1)
        else:
            base[name] = randn(shape, 0.1)

    # ft_a: dense delta, std 0.02 on every tensor.
    d_a = {n: randn(s, 0.02) for n, s in shapes.items()}
    # ft_b: ~30% of entries changed; where changed the delta is 0.6*d_a + 0.8*noise (std 0.02),
    # i.e. correlated 0.6 with ft_a's delta there (model_stock gets a non-trivial t) while ~30%
    # of the overlapping entries still disagree in sign (TIES sign election matters).
    d_b = {}
    for n, s in shapes.items():
        keep = torch.rand(s, generator=g) < 0.3
        d_b[n] = torch.where(keep, 0.6 * d_a[n] + 0.8 * randn(s, 0.02), torch.zeros(s))
    ft_a = {n: base[n] + d_a[n] for n in shapes}
    ft_b = {n: base[n] + d_b[n] for n in shapes}

    # LoRA factors (PEFT layout: A is [r, in], B is [out, r]); delta = alpha/r * B @ A.
    lora = {}
    for layer in range(CONFIG["num_hidden_layers"]):
        for mod in LORA_TARGETS:
            sub = "mlp" if mod == "down_proj" else "self_attn"
            wname = f"model.layers.{layer}.{sub}.{mod}.weight"
            out_f, in_f = shapes[wname]
            lora[wname] = (randn((LORA_R, in_f), 0.1), randn((out_f, LORA_R), 0.05))

    root = REPO / MODELS
    if root.exists():
        shutil.rmtree(root)
    write_model(root / "base", base)
    write_model(root / "ft_a", ft_a)
    write_model(root / "ft_b", ft_b)
    write_lora(root / "lora_b", root / "base", lora)
    write_ft_lora(root / "ft_lora", root / "base", root / "lora_b")


def write_lora(dir_: Path, base_dir: Path, lora: dict):
    """Write the adapter with PEFT itself so the file layout is exactly what PEFT saves."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        bias="none",
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for wname, (a, b) in lora.items():
            mod_path = wname[: -len(".weight")]
            mod = pm.base_model.model.get_submodule(mod_path)
            mod.lora_A["default"].weight.copy_(a)
            mod.lora_B["default"].weight.copy_(b)
    pm.save_pretrained(dir_)
    cfg_path = dir_ / "adapter_config.json"
    acfg = json.loads(cfg_path.read_text())
    acfg["base_model_name_or_path"] = "base"  # not an absolute path of this machine
    acfg["target_modules"] = sorted(acfg["target_modules"])  # PEFT keeps a set: order varies
    cfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
    readme = dir_ / "README.md"
    if readme.exists():
        readme.unlink()  # PEFT's model-card template, not needed


def write_ft_lora(dir_: Path, base_dir: Path, lora_dir: Path):
    """base with lora_b merged by PEFT's merge_and_unload (what mergekit does for base+lora)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(lora_dir), is_trainable=False).merge_and_unload()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_model(dir_, sd)


# Chat templates for the chat_template cases. ft_b's own template is in chat_template.jinja
# (with a trailing newline, which `auto` strips), and its tokenizer_config.json holds another
# one that transformers (so mergekit) must not see: the file takes priority.
TEMPLATE_BASE = "{% for m in messages %}base {{ m['content'] }}\n{% endfor %}"
TEMPLATE_FT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
TEMPLATE_FT_B_SHADOWED = "{% for m in messages %}shadowed {{ m['content'] }}{% endfor %}"


def make_tokenizers():
    """A 128-word tokenizer and a chat template for base, ft_a and ft_b (weights untouched)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, CONFIG["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for m, in_config, in_file in (
        ("base", TEMPLATE_BASE, None),
        ("ft_a", TEMPLATE_FT, None),
        ("ft_b", TEMPLATE_FT_B_SHADOWED, TEMPLATE_FT + "\n"),
    ):
        d = REPO / MODELS / m
        tok.save(str(d / "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
               "eos_token": "</s>", "unk_token": "<unk>", "chat_template": in_config}  # fmt: skip
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if in_file:
            (d / "chat_template.jinja").write_text(in_file)


# ----------------------------------------------------------------------------------------------
# cases

B, A, Bm, L = (f"{MODELS}/{m}" for m in ("base", "ft_a", "ft_b", "lora_b"))


def ta_family(method, params, weights=(1.0, 0.5), density=None, gamma=None, extra_models=None):
    models = []
    for path, w in zip(extra_models or (A, Bm), weights):
        p = {"weight": w}
        if density is not None:
            p["density"] = density
        if gamma is not None:
            p["gamma"] = gamma
        models.append({"model": path, "parameters": p})
    cfg = {"merge_method": method, "base_model": B, "models": models, "dtype": "float32"}
    if params:
        cfg["parameters"] = params
    return cfg


CASES = {
    # --- the cases paft's merge engine must match ---------------------------------------------
    "linear": {
        "merge_method": "linear",
        "models": [
            {"model": A, "parameters": {"weight": 0.6}},
            {"model": Bm, "parameters": {"weight": 0.4}},
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    },
    "task_arithmetic": ta_family("task_arithmetic", None, weights=(0.7, 0.5)),
    "task_arithmetic_extrapolate": ta_family("task_arithmetic", None, weights=(1.3, -0.4)),
    "ties_d03_norm": ta_family("ties", {"normalize": True}, density=0.3),
    "ties_d03_nonorm": ta_family("ties", {"normalize": False}, density=0.3),
    "ties_d07_norm": ta_family("ties", {"normalize": True}, density=0.7),
    "ties_d07_nonorm": ta_family("ties", {"normalize": False}, density=0.7),
    "breadcrumbs": ta_family("breadcrumbs", None, density=0.5, gamma=0.1),
    "breadcrumbs_ties": ta_family("breadcrumbs_ties", None, density=0.5, gamma=0.1),
    "slerp": {
        "merge_method": "slerp",
        "base_model": A,
        "models": [{"model": A}, {"model": Bm}],
        "parameters": {"t": 0.3},
        "dtype": "float32",
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": B,
        "models": [{"model": A}, {"model": Bm}, {"model": B}],
        "dtype": "float32",
    },
    "ties_lora": ta_family(
        "ties", {"normalize": True}, density=0.5, extra_models=(A, f"{B}+{L}")
    ),
    # --- extras: parameter plumbing and the other deterministic methods -----------------------
    "linear_nonorm": {
        "merge_method": "linear",
        "models": [
            {"model": A, "parameters": {"weight": 0.6}},
            {"model": Bm, "parameters": {"weight": 0.6}},
            {"model": B, "parameters": {"weight": -0.1}},
        ],
        "parameters": {"normalize": False},
        "dtype": "float32",
    },
    "ties_params": {
        # a layer gradient (layer 0 -> 1.0, layer 1 -> 0.25, embed/norm/lm_head -> 1.0), a
        # top-level density default (used by ft_a), a per-model filtered list that overrides it
        # (ft_b: 0.9 in self_attn tensors, else 0.2), and lambda
        "merge_method": "ties",
        "base_model": B,
        "models": [
            {"model": A, "parameters": {"weight": [1.0, 0.25]}},  # density: top-level 0.1
            {
                "model": Bm,
                "parameters": {
                    "weight": 0.8,
                    "density": [{"filter": "self_attn", "value": 0.9}, {"value": 0.2}],
                },
            },
        ],
        "parameters": {"normalize": True, "lambda": 0.5, "density": 0.1},
        "dtype": "float32",
    },
    "model_stock_filterwise": {
        "merge_method": "model_stock",
        "base_model": B,
        "models": [{"model": A}, {"model": Bm}],
        "parameters": {"filter_wise": True},
        "dtype": "float32",
    },
    "sce": {
        "merge_method": "sce",
        "base_model": B,
        "models": [{"model": A}, {"model": Bm}],
        "parameters": {"select_topk": 0.5},
        "dtype": "float32",
    },
    "nuslerp": {
        "merge_method": "nuslerp",
        "base_model": B,
        "models": [
            {"model": A, "parameters": {"weight": 0.7}},
            {"model": Bm, "parameters": {"weight": 0.3}},
        ],
        "dtype": "float32",
    },
    "multislerp": {
        "merge_method": "multislerp",
        "base_model": B,
        "models": [
            {"model": A, "parameters": {"weight": 0.6}},
            {"model": Bm, "parameters": {"weight": 0.4}},
        ],
        "dtype": "float32",
    },
    "karcher": {
        "merge_method": "karcher",
        "models": [{"model": A}, {"model": Bm}],
        "dtype": "float32",
    },
    "nearswap": {
        "merge_method": "nearswap",
        "base_model": A,
        "models": [{"model": A}, {"model": Bm}],
        "parameters": {"t": 0.01},
        "dtype": "float32",
    },
    "ram": {
        "merge_method": "ram",
        "base_model": B,
        "models": [{"model": A}, {"model": Bm}],
        "dtype": "float32",
    },
    "ramplus_tl": {
        "merge_method": "ramplus_tl",
        "base_model": B,
        "models": [{"model": A}, {"model": Bm}],
        "dtype": "float32",
    },
    "arcee_fusion": {
        # the base is added to the inputs; small tensors (< 1e6 entries): exact quantiles
        "merge_method": "arcee_fusion",
        "base_model": B,
        "models": [{"model": A}],
        "dtype": "float32",
    },
    "passthrough_scale": {
        "merge_method": "passthrough",
        "models": [{"model": A, "parameters": {"scale": 0.5}}],
        "dtype": "float32",
    },
    # a frankenmerge: ft_a's two layers, then ft_b's layer 1 as layer 2 (3 layers out); the
    # embeddings come from the first slice's source, the final norm and head from the last's
    "passthrough_slices": {
        "slices": [
            {"sources": [{"model": A, "layer_range": [0, 2]}]},
            {"sources": [{"model": Bm, "layer_range": [1, 2]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float32",
    },
    # slices with a merge in each: a top-level weight gradient evaluated per slice (t = idx/(n-1),
    # 1 for a one-layer slice), per-source weights overriding it, sources from different layers
    "linear_slices": {
        "slices": [
            {"sources": [{"model": A, "layer_range": [0, 2]}, {"model": Bm, "layer_range": [0, 2]}]},
            {"sources": [
                {"model": Bm, "layer_range": [1, 2], "parameters": {"weight": 1.0}},
                {"model": A, "layer_range": [0, 1], "parameters": {"weight": 0.25}},
            ]},
        ],
        "merge_method": "linear",
        "parameters": {"weight": [1.0, 0.5]},
        "dtype": "float32",
    },
    # slice-level parameters, between the sources' and the top level's (ft_a's weight in the
    # first slice: its own 0.2 in mlp, the slice's 0.6 in self_attn, else the slice's 0.9; the
    # second slice: 0.3 in mlp, else the top level's 1.0, and `normalize: false`), and
    # `residual_weight`, which mergekit accepts and never reads
    "linear_slice_params": {
        "slices": [
            {
                "sources": [
                    {"model": A, "layer_range": [0, 2],
                     "parameters": {"weight": [{"filter": "mlp", "value": 0.2}]}},
                    {"model": Bm, "layer_range": [0, 2]},
                ],
                "parameters": {"weight": [{"filter": "self_attn", "value": 0.6}, {"value": 0.9}]},
                "residual_weight": 0.5,
            },
            {
                "sources": [
                    {"model": Bm, "layer_range": [1, 2]},
                    {"model": A, "layer_range": [0, 1]},
                ],
                "parameters": {"weight": [{"filter": "mlp", "value": 0.3}], "normalize": False},
            },
        ],
        "merge_method": "linear",
        "parameters": {"weight": 1.0},
        "dtype": "float32",
    },  # fmt: skip
    # slices with a base_model method: each slice's θ₀ is the base's source, layers taken from
    # different ranges; per-source parameters, a top-level normalize
    "ties_slices": {
        "slices": [
            {"sources": [
                {"model": B, "layer_range": [0, 2]},
                {"model": A, "layer_range": [0, 2], "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": Bm, "layer_range": [0, 2], "parameters": {"weight": 0.7, "density": 0.5}},
            ]},
            {"sources": [
                {"model": B, "layer_range": [1, 2]},
                {"model": A, "layer_range": [0, 1], "parameters": {"weight": 0.5, "density": 0.3}},
                {"model": Bm, "layer_range": [1, 2], "parameters": {"weight": 1.0, "density": 0.3}},
            ]},
        ],
        "merge_method": "ties",
        "base_model": B,
        "parameters": {"normalize": True},
        "dtype": "float32",
    },
    # `modules:` with the one module of a plain decoder ("default"); the module's parameters
    # override the top-level ones (lambda), the models' their own
    "modules_task_arithmetic": {
        "modules": {
            "default": {
                "models": [
                    {"model": A, "parameters": {"weight": 0.7}},
                    {"model": Bm, "parameters": {"weight": 0.5}},
                ],
                "parameters": {"lambda": 0.8},
            }
        },
        "merge_method": "task_arithmetic",
        "base_model": B,
        "parameters": {"lambda": 2.0, "weight": 0.1},
        "dtype": "float32",
    },
    # filtered lists whose filters miss a tensor give nothing at their level: the lookup goes on
    # to the global value, then the default (ft_a's density: self_attn 0.9, mlp 0.2 from the
    # global list, else ties' default 1; ft_b's weight: mlp 0.4, else the global 0.6)
    "ties_filter_fallthrough": {
        "merge_method": "ties",
        "base_model": B,
        "models": [
            {
                "model": A,
                "parameters": {"weight": 0.7, "density": [{"filter": "self_attn", "value": 0.9}]},
            },
            {
                "model": Bm,
                "parameters": {"weight": [{"filter": "mlp", "value": 0.4}], "density": 0.5},
            },
        ],
        "parameters": {
            "normalize": True,
            "weight": 0.6,
            "density": [{"filter": "mlp", "value": 0.2}],
        },
        "dtype": "float32",
    },
    # the same through a module: ft_a's weight is 1.2 in self_attn, the module's 0.8 in mlp,
    # else the top level's 0.3
    "modules_filter_fallthrough": {
        "modules": {
            "default": {
                "models": [
                    {"model": A, "parameters": {"weight": [{"filter": "self_attn", "value": 1.2}]}},
                    {"model": Bm, "parameters": {"weight": 0.5}},
                ],
                "parameters": {"weight": [{"filter": "mlp", "value": 0.8}]},
            }
        },
        "merge_method": "task_arithmetic",
        "base_model": B,
        "parameters": {"weight": 0.3},
        "dtype": "float32",
    },
    # `chat_template: auto`: the template most inputs declare (ft_a's and ft_b's, once ft_b's
    # chat_template.jinja is read before its tokenizer_config.json and stripped), written to
    # the output's chat_template.jinja
    "chat_template_auto": ta_family("task_arithmetic", None, weights=(0.5, 0.5))
    | {"chat_template": "auto"},
    # a template given as Jinja text
    # `auto` counts each input once: here the base is also listed among the models (linear reads
    # no base), and ft_a's and ft_b's template wins two to one, as in mergekit's set of models
    "chat_template_auto_base_listed": {
        "merge_method": "linear",
        "base_model": B,
        "models": [
            {"model": B, "parameters": {"weight": 0.4}},
            {"model": A, "parameters": {"weight": 0.3}},
            {"model": Bm, "parameters": {"weight": 0.3}},
        ],
        "dtype": "float32",
        "chat_template": "auto",
    },
    "chat_template_text": ta_family("task_arithmetic", None, weights=(0.5, 0.5))
    | {"chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"},
    # a tokenizer source: mergekit realigns every input's embedding rows to the output
    # tokenizer, which with one shared 128-token vocabulary changes nothing; the output's
    # tokenizer (and so its chat template) is the source's: the base's for union, ft_a's here
    "ties_tokenizer_union": ta_family("ties", {"normalize": True}, density=0.5)
    | {"tokenizer_source": "union"},
    "ties_tokenizer_model": ta_family("ties", {"normalize": True}, density=0.5)
    | {"tokenizer": {"source": A, "pad_to_multiple_of": 64}},
    # parameters the method does not read (density on task_arithmetic, gamma at the top level):
    # mergekit ignores them, so the output is the `task_arithmetic` case's
    "task_arithmetic_unread_params": {
        "merge_method": "task_arithmetic",
        "base_model": B,
        "models": [
            {"model": A, "parameters": {"weight": 0.7, "density": 0.3}},
            {"model": Bm, "parameters": {"weight": 0.5, "density": 0.3}},
        ],
        "parameters": {"gamma": 0.1},
        "dtype": "float32",
    },
}
CORE = [
    "linear", "task_arithmetic", "task_arithmetic_extrapolate", "ties_d03_norm",
    "ties_d03_nonorm", "ties_d07_norm", "ties_d07_nonorm", "breadcrumbs", "breadcrumbs_ties",
    "slerp", "model_stock", "ties_lora",
]  # fmt: skip

# cases recomputed by expected() below (all but multislerp, karcher and ramplus_tl)
CHECKED = CORE + [
    "linear_nonorm", "ties_params", "model_stock_filterwise", "sce", "nearswap", "ram", "nuslerp",
    "arcee_fusion", "passthrough_scale", "task_arithmetic_unread_params", "passthrough_slices",
    "ties_filter_fallthrough", "modules_filter_fallthrough", "chat_template_auto",
    "chat_template_text", "ties_tokenizer_union", "ties_tokenizer_model",
    "chat_template_auto_base_listed",
]  # fmt: skip

MERGEKIT_FLAGS = [
    "--no-cuda",
    "--device", "cpu",
    "--num-threads", "1",
    "--out-shard-size", "1B",
    "--no-copy-tokenizer",
    "--no-write-model-card",
    "--quiet",
]  # fmt: skip


def yaml_dump(cfg) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=100)


def run_mergekit(config_path: Path, out_dir: Path, lora_cache: Path, check=True, pythonpath=None,
                 copy_tokenizer=False):  # fmt: skip
    env = dict(os.environ)
    flags = [f for f in MERGEKIT_FLAGS if not (copy_tokenizer and f == "--no-copy-tokenizer")]
    if pythonpath:  # e.g. an older mergekit from `pip install --no-deps --target DIR mergekit==X`
        env["PYTHONPATH"] = str(pythonpath)
    cmd = [
        sys.executable,
        "-m",
        "mergekit.scripts.run_yaml",  # what the mergekit-yaml entry point runs
        str(config_path),
        str(out_dir),
        *flags,
        "--lora-merge-cache",
        str(lora_cache),
    ]
    return subprocess.run(cmd, cwd=REPO, check=check, capture_output=not check, text=True, env=env)


def make_case(name: str, cfg: dict, lora_cache: Path):
    case_dir = REPO / FIX / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    (case_dir / "config.yaml").write_text(yaml_dump(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        # A chat_template or tokenizer source goes into the tokenizer files: mergekit writes them.
        templated = any(k in cfg for k in ("chat_template", "tokenizer_source", "tokenizer"))
        run_mergekit(case_dir / "config.yaml", out, lora_cache, copy_tokenizer=templated)
        files = sorted(p.name for p in out.iterdir())
        shards = [f for f in files if f.endswith(".safetensors")]
        assert shards == ["model.safetensors"], files
        shutil.copy(out / "model.safetensors", case_dir / "model.safetensors")
        shutil.copy(out / "config.json", case_dir / "config.json")
        if templated:
            for f in ("chat_template.jinja", "tokenizer_config.json"):
                shutil.copy(out / f, case_dir / f)


# ----------------------------------------------------------------------------------------------
# independent float64 re-implementation of the core formulas (checks our reading of mergekit)


def load(rel):
    return load_np(str(REPO / rel / "model.safetensors"))


def sparsify_magnitude(d, density):
    if density >= 1:
        return d
    flat = d.reshape(-1)
    k = max(1, int(density * flat.size))
    idx = np.argsort(-np.abs(flat), kind="stable")[:k]
    m = np.zeros_like(flat)
    m[idx] = 1
    return (flat * m).reshape(d.shape)


def sparsify_outliers(d, density, gamma):
    if density >= 1:
        return d
    flat = d.reshape(-1)
    n = flat.size
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    idx = np.argsort(np.abs(flat), kind="stable")[n_bot : n_bot + target]
    m = np.zeros_like(flat)
    m[idx] = 1
    return (flat * m).reshape(d.shape)


def gta(base, models, weights, sparsify, consensus, normalize, lam=1.0):
    deltas = []
    for m in models:
        d = (m - base).astype(np.float32)  # mergekit subtracts in float32
        deltas.append(sparsify(d).astype(np.float64))
    wd = np.stack([w * d for w, d in zip(weights, deltas)])
    w = np.array(weights, dtype=np.float64).reshape((-1,) + (1,) * base.ndim)
    if consensus:
        elected = np.where(wd.sum(0) >= 0, 1.0, -1.0)
        mask = (np.sign(wd) == elected).astype(np.float64)
        mixed = (wd * mask).sum(0)
        div = (w * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = w.sum()
        div = 1.0 if abs(div) < 1e-8 else div
    if normalize:
        mixed = mixed / div
    return base + lam * mixed


def slerp64(t, v0, v1, thresh=0.9995):
    """slerp: lerp when |dot| > 0.9995; nuslerp (thresh=None): lerp only when 1-dot^2 <= 1e-16."""
    a, b = v0.reshape(-1).astype(np.float64), v1.reshape(-1).astype(np.float64)
    dot = np.clip(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)), -1, 1)
    if (abs(dot) > thresh) if thresh is not None else (1 - dot * dot <= 1e-16):
        return (1 - t) * v0 + t * v1, dot
    th = np.arccos(dot)
    return (np.sin((1 - t) * th) * v0 + np.sin(t * th) * v1) / np.sin(th), dot


def model_stock64(base, models):
    w0 = base.reshape(-1).astype(np.float64)
    offs = [m.reshape(-1).astype(np.float64) - w0 for m in models]
    cos = []
    for i in range(len(offs)):
        for j in range(i + 1, len(offs)):
            nrm = max(np.linalg.norm(offs[i]) * np.linalg.norm(offs[j]), 1e-6)
            cos.append(np.clip(np.dot(offs[i], offs[j]) / nrm, -1, 1))
    c = float(np.mean(cos))
    n = len(models)
    t = n * c / (1 + (n - 1) * c)
    avg = sum(m.astype(np.float64) for m in models) / n
    return t * avg + (1 - t) * base, t


def model_stock_rows64(base, models):
    """filter_wise: cosine per row (last axis) of 2-D tensors; a 1-D tensor is one row."""
    w0 = np.atleast_2d(base).astype(np.float64)
    ws = [np.atleast_2d(m).astype(np.float64) for m in models]
    offs = [w - w0 for w in ws]
    nrm = np.maximum(np.linalg.norm(offs[0], axis=-1) * np.linalg.norm(offs[1], axis=-1), 1e-6)
    c = np.clip((offs[0] * offs[1]).sum(-1) / nrm, -1, 1)[:, None]
    t = 2 * c / (1 + c)
    return (t * (ws[0] + ws[1]) / 2 + (1 - t) * w0).reshape(base.shape)


def sce64(base, models, topk):
    tv = np.stack([(m - base).astype(np.float32) for m in models]).astype(np.float64)
    var = tv.var(0)
    k = int(np.count_nonzero(var) * topk)
    mask = np.zeros(var.size)
    mask[np.argsort(-np.abs(var.reshape(-1)), kind="stable")[:k]] = 1
    tv = tv * mask.reshape(var.shape)
    elected = np.where(tv.sum(0) >= 0, 1.0, -1.0)
    erase = (np.sign(tv) == elected).astype(np.float64)
    w = (tv**2).reshape(len(models), -1).mean(1)
    w = w / w.sum() if abs(w.sum()) >= 1e-6 else np.full_like(w, 1 / len(w))
    ew = w.reshape((-1,) + (1,) * base.ndim) * erase
    return base + (tv * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)


def ram64(base, models, eps=1e-5):
    tv = np.stack([(m - base).astype(np.float32) for m in models]).astype(np.float64)
    active = np.abs(tv) > eps
    cnt = active.sum(0)
    return base + np.where(cnt > 0, (tv * active).sum(0) / np.maximum(cnt, 1), 0.0)


def arcee_fusion64(base, other):
    """importance = |b - a| * KL(softmax(b) || softmax(a)) per row; keep b where it reaches
    median + 1.5 IQR of all importances (quantile index = int(q * (n - 1)))."""

    def softmax(x):
        x = x.astype(np.float64)
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(other) + 1e-8, softmax(base) + 1e-8
    kl = (p * np.log(p / q)).sum(-1, keepdims=True)
    imp = np.abs(other.astype(np.float64) - base) * kl
    s = np.sort(imp.reshape(-1))
    at = lambda f: s[int(f * (s.size - 1))]  # noqa: E731
    mask = imp >= at(0.5) + 1.5 * (at(0.75) - at(0.25))
    return np.where(mask, other.astype(np.float64), base.astype(np.float64))


def expected(case, inputs):
    base, a, b = inputs["base"], inputs["ft_a"], inputs["ft_b"]
    out, info = {}, {}
    for name in base:
        x0, xa, xb = base[name], a[name], b[name]
        if case == "linear":
            y = (0.6 * xa.astype(np.float64) + 0.4 * xb) / 1.0
        elif case == "task_arithmetic":
            y = gta(x0, [xa, xb], [0.7, 0.5], lambda d: d, False, False)
        elif case == "task_arithmetic_extrapolate":
            y = gta(x0, [xa, xb], [1.3, -0.4], lambda d: d, False, False)
        elif case.startswith("ties_d"):
            dens = 0.3 if "d03" in case else 0.7
            y = gta(x0, [xa, xb], [1.0, 0.5], lambda d: sparsify_magnitude(d, dens), True,
                    case.endswith("_norm"))  # fmt: skip
        elif case == "ties_lora":
            xl = inputs["ft_lora"][name]
            y = gta(x0, [xa, xl], [1.0, 0.5], lambda d: sparsify_magnitude(d, 0.5), True, True)
        elif case.startswith("breadcrumbs"):
            y = gta(x0, [xa, xb], [1.0, 0.5], lambda d: sparsify_outliers(d, 0.5, 0.1),
                    case == "breadcrumbs_ties", False)  # fmt: skip
        elif case == "slerp":
            y, dot = slerp64(0.3, xa, xb)
            info[name] = {"dot": float(dot), "branch": "lerp" if abs(dot) > 0.9995 else "slerp"}
        elif case == "model_stock":
            y, t = model_stock64(x0, [xa, xb])
            info[name] = {"t": t}
        # extras
        elif case == "linear_nonorm":
            y = 0.6 * xa.astype(np.float64) + 0.6 * xb - 0.1 * x0
        elif case == "ties_params":
            t = 1.0 if ".layers.1." in name else 0.0  # layer_idx / (num_layers - 1); 0 outside
            wa = 1.0 + t * (0.25 - 1.0)
            db = 0.9 if "self_attn" in name else 0.2
            dens = {0: 0.1, 1: db}
            deltas = []
            for i, m in enumerate((xa, xb)):
                deltas.append(sparsify_magnitude((m - x0).astype(np.float32), dens[i]))
            y = gta(x0, [x0 + deltas[0].astype(np.float64), x0 + deltas[1].astype(np.float64)],
                    [wa, 0.8], lambda d: d, True, True, lam=0.5)  # fmt: skip
        elif case == "ties_filter_fallthrough":
            da = 0.9 if "self_attn" in name else 0.2 if "mlp" in name else 1.0
            wb = 0.4 if "mlp" in name else 0.6
            deltas = [sparsify_magnitude((m - x0).astype(np.float32), dens)
                      for m, dens in ((xa, da), (xb, 0.5))]  # fmt: skip
            y = gta(x0, [x0 + d.astype(np.float64) for d in deltas], [0.7, wb], lambda d: d,
                    True, True)  # fmt: skip
        elif case == "modules_filter_fallthrough":
            wa = 1.2 if "self_attn" in name else 0.8 if "mlp" in name else 0.3
            y = gta(x0, [xa, xb], [wa, 0.5], lambda d: d, False, False)
        elif case == "chat_template_auto_base_listed":
            y = (0.4 * x0.astype(np.float64) + 0.3 * xa + 0.3 * xb) / 1.0
        elif case in ("chat_template_auto", "chat_template_text"):
            y = gta(x0, [xa, xb], [0.5, 0.5], lambda d: d, False, False)
        elif case in ("ties_tokenizer_union", "ties_tokenizer_model"):
            y = gta(x0, [xa, xb], [1.0, 0.5], lambda d: sparsify_magnitude(d, 0.5), True, True)
        elif case == "model_stock_filterwise":
            y = model_stock_rows64(x0, [xa, xb])
        elif case == "sce":
            y = sce64(x0, [xa, xb], 0.5)
        elif case == "nearswap":
            d = np.abs(xa.astype(np.float64) - xb)
            w = np.clip(0.01 / np.maximum(d, 1e-6), 0, 1)
            y = w * xb + (1 - w) * xa
        elif case == "ram":
            y = ram64(x0, [xa, xb])
        elif case == "arcee_fusion":
            y = arcee_fusion64(x0, xa)
        elif case == "passthrough_scale":
            y = 0.5 * xa.astype(np.float64)
        elif case == "task_arithmetic_unread_params":
            y = gta(x0, [xa, xb], [0.7, 0.5], lambda d: d, False, False)
        elif case == "nuslerp":
            y, _ = slerp64(0.3 / (0.7 + 0.3), (xa - x0).astype(np.float64),
                           (xb - x0).astype(np.float64), thresh=None)  # fmt: skip
            y = x0 + y
        else:
            raise KeyError(case)
        out[name] = y
    return out, info


def expected_slices(case, inputs):
    """passthrough_slices: ft_a layers 0, 1 then ft_b layer 1; embed from ft_a, norm/head ft_b."""
    a, b = inputs["ft_a"], inputs["ft_b"]
    out = {}
    for name in a:
        if ".layers." not in name:
            src = a if name.startswith("model.embed_tokens.") else b
            out[name] = src[name].astype(np.float64)
        elif ".layers.1." in name:
            out[name] = a[name].astype(np.float64)
            out[name.replace(".layers.1.", ".layers.2.")] = b[name].astype(np.float64)
        else:
            out[name] = a[name].astype(np.float64)
    return out, {}


def check_case(case, inputs):
    exp, info = expected_slices(case, inputs) if case == "passthrough_slices" else expected(case, inputs)
    got = load(FIX / case)
    assert sorted(got) == sorted(exp), (case, sorted(set(got) ^ set(exp)))
    worst = 0.0
    flips = 0
    for name in exp:
        assert got[name].dtype == np.float32, (case, name, got[name].dtype)
        diff = np.abs(got[name].astype(np.float64) - exp[name])
        if case == "arcee_fusion":
            # The importance is a KL divergence of nearly equal softmaxes: mergekit's f32 has
            # ~1e-4 relative error there, so entries that near the threshold may flip. A flip
            # is the base's value on one side and the model's on the other.
            off = diff > 1e-5
            x0, xa = inputs["base"][name], inputs["ft_a"][name]
            taken = (x0 + (xa - x0)).astype(np.float64)
            ok = np.isclose(got[name], x0, atol=1e-6) & np.isclose(exp[name], taken, atol=1e-6)
            ok |= np.isclose(got[name], taken, atol=1e-6) & np.isclose(exp[name], x0, atol=1e-6)
            assert np.all(ok[off]), (case, name)
            flips += int(off.sum())
            diff = np.where(off, 0.0, diff)
        worst = max(worst, float(np.max(diff)))
    if flips:
        info["mask_flips"] = flips
        print(f"{case}: {flips} entries on the other side of the threshold than float64")
    if worst > 1e-5:
        raise SystemExit(f"{case}: mergekit differs from the float64 formula by {worst:.3g}")
    return worst, info


# ----------------------------------------------------------------------------------------------
# edge-case probes (KNOWN_MERGEKIT_ISSUES.md)

PROBES = {
    # k = int(density * numel) is 0 for every tensor here (numel <= 4096 < 1/0.0001)
    "ties_density_tiny": ta_family("ties", None, density=0.0001),
    "ties_density_zero": ta_family("ties", None, density=0.0),
    # gamma * numel < 1 for the 32-element norms (n_top = 0) - the old empty-slice bug
    "breadcrumbs_gamma_small": ta_family("breadcrumbs", None, density=0.5, gamma=0.01),
    "breadcrumbs_gamma_zero": ta_family("breadcrumbs", None, density=0.5, gamma=0.0),
    # density + gamma > 1: n_bot would be negative
    "breadcrumbs_density_plus_gamma_gt1": ta_family("breadcrumbs", None, density=0.95, gamma=0.2),
    "della_eps_too_big": ta_family("della", None, density=0.9, extra_models=None)
    | {"parameters": {"epsilon": 0.15}},
    "linear_weights_sum_zero": {
        "merge_method": "linear",
        "models": [
            {"model": A, "parameters": {"weight": 1.0}},
            {"model": Bm, "parameters": {"weight": -1.0}},
        ],
        "dtype": "float32",
    },
    # the required weight given only for mlp tensors: mergekit stops at the first other tensor
    "ties_weight_filter_misses": {
        "merge_method": "ties",
        "base_model": B,
        "models": [
            {"model": A, "parameters": {"weight": [{"filter": "mlp", "value": 0.5}]}},
            {"model": Bm, "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    },
    "ties_missing_weight": {
        "merge_method": "ties",
        "base_model": B,
        "models": [{"model": A, "parameters": {"density": 0.5}}, {"model": Bm}],
        "dtype": "float32",
    },
    "slerp_base_not_listed": {
        "merge_method": "slerp",
        "base_model": A,
        "models": [{"model": Bm}],
        "parameters": {"t": 0.3},
        "dtype": "float32",
    },
    "unknown_method": {"merge_method": "dare-ties", "base_model": B,
                       "models": [{"model": A}], "dtype": "float32"},  # fmt: skip
}


def probe_sparsify(path=None):
    """Call mergekit's sparsify functions directly on a 32-element tensor (a norm-sized tensor).

    `path` may point at another release's mergekit/sparsify.py (it only imports torch), e.g. from
    `pip install --no-deps --target /tmp/mk014 mergekit==0.1.4`; default: the installed one.
    """
    import importlib.util
    import traceback

    if path is None:
        import mergekit.sparsify as sp

        path = sp.__file__
    spec = importlib.util.spec_from_file_location("_probe_sparsify", path)
    sp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sp)
    t = torch.randn(32, generator=torch.Generator().manual_seed(0))
    print(f"=== sparsify functions from {path} on a 32-element tensor")
    calls = {
        "magnitude(density=0.01)  [int(0.32)=0]": lambda: sp.magnitude(t, density=0.01),
        "magnitude(density=0.5)": lambda: sp.magnitude(t, density=0.5),
        "magnitude_outliers(density=0.5, gamma=0.01)  [int(0.32)=0]":
            lambda: sp.magnitude_outliers(t, density=0.5, gamma=0.01),
        "magnitude_outliers(density=0.5, gamma=0.0)":
            lambda: sp.magnitude_outliers(t, density=0.5, gamma=0.0),
        "magnitude_outliers(density=0.5, gamma=0.1)":
            lambda: sp.magnitude_outliers(t, density=0.5, gamma=0.1),
        "magnitude_outliers(density=0.95, gamma=0.2)":
            lambda: sp.magnitude_outliers(t, density=0.95, gamma=0.2),
    }  # fmt: skip
    for label, fn in calls.items():
        try:
            r = fn()
            print(f"   {label}: kept {int(torch.count_nonzero(r))}/32")
        except Exception as e:  # noqa: BLE001 - we want to see any failure
            last = traceback.extract_tb(e.__traceback__)[-1]
            print(f"   {label}: {type(e).__name__}: {e} (at {Path(last.filename).name}:"
                  f"{last.lineno}: {last.line})")  # fmt: skip


def run_probes(lora_cache: Path, pythonpath=None):
    inputs = {m: load(MODELS / m) for m in ("base", "ft_a", "ft_b")}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in PROBES.items():
            cfgp = Path(tmp) / f"{name}.yaml"
            cfgp.write_text(yaml_dump(cfg))
            out = Path(tmp) / name
            r = run_mergekit(cfgp, out, lora_cache, check=False, pythonpath=pythonpath)
            print(f"=== {name} (rc {r.returncode})")
            print(yaml_dump(cfg).strip())
            if r.returncode != 0:
                tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-6:]
                print("   " + "\n   ".join(tail))
                continue
            got = load_np(str(out / "model.safetensors"))
            for t in ("model.norm.weight", "model.layers.0.self_attn.q_proj.weight"):
                d = got[t].astype(np.float64) - inputs["base"][t]
                print(f"   {t}: nonzero(out-base)={int(np.count_nonzero(d))}/{d.size}, "
                      f"finite={bool(np.isfinite(got[t]).all())}")  # fmt: skip


# ----------------------------------------------------------------------------------------------


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", nargs="*", help="only these cases (default: all)")
    ap.add_argument("--probes", action="store_true", help="also run the edge-case probes")
    ap.add_argument("--probes-only", action="store_true", help="only run the probes")
    ap.add_argument("--probe-pythonpath", help="PYTHONPATH for the probes (another mergekit)")
    ap.add_argument("--old-sparsify", help="also probe this (older) mergekit/sparsify.py file")
    ap.add_argument("--skip-models", action="store_true", help="reuse the existing input models")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.chdir(REPO)

    if args.probes_only:
        with tempfile.TemporaryDirectory() as cache:
            run_probes(Path(cache), args.probe_pythonpath)
        probe_sparsify()
        if args.old_sparsify:
            probe_sparsify(args.old_sparsify)
        return
    if not args.skip_models:
        make_models()
    make_tokenizers()
    names = args.cases or list(CASES)
    with tempfile.TemporaryDirectory() as cache:
        lora_cache = Path(cache)
        for name in names:
            print(f"mergekit: {name}", flush=True)
            make_case(name, CASES[name], lora_cache)
        # mergekit's own base+lora merge must equal the ft_lora we saved with PEFT
        merged = [p for p in lora_cache.iterdir() if p.is_dir()]
        lora_vs_peft = None
        if merged:
            a = load_np(str(merged[0] / "model.safetensors"))
            b = load(MODELS / "ft_lora")
            assert sorted(a) == sorted(b)
            lora_vs_peft = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
            print(f"mergekit base+lora cache vs models/ft_lora: max |diff| = {lora_vs_peft}")
        if args.probes:
            run_probes(lora_cache, args.probe_pythonpath)
            probe_sparsify()
            if args.old_sparsify:
                probe_sparsify(args.old_sparsify)

    inputs = {m: load(MODELS / m) for m in ("base", "ft_a", "ft_b", "ft_lora")}
    lora_delta = 0.0
    lw = load_np(str(REPO / MODELS / "lora_b" / "adapter_model.safetensors"))
    for k in lw:
        if ".lora_A." in k:
            wname = k.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
            d = (LORA_ALPHA / LORA_R) * (
                lw[k.replace("lora_A", "lora_B")].astype(np.float64) @ lw[k].astype(np.float64)
            )
            diff = inputs["ft_lora"][wname].astype(np.float64) - inputs["base"][wname] - d
            lora_delta = max(lora_delta, float(np.max(np.abs(diff))))
    print(f"ft_lora - base vs alpha/r*B@A (float64): max |diff| = {lora_delta:.3g}")

    checks = {}
    for name in names:
        if name in CHECKED:
            worst, info = check_case(name, inputs)
            checks[name] = {"max_abs_diff_vs_float64_formula": worst}
            if info:
                checks[name]["per_tensor"] = info
            print(f"check {name}: max |mergekit - float64 formula| = {worst:.3g}")

    manifest_path = REPO / FIX / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update(
        {
            "generator": "scripts/reference/make_merge_fixtures.py",
            "versions": {
                p: version(p)
                for p in ("mergekit", "torch", "transformers", "peft", "safetensors", "numpy")
            },
            "paths_relative_to": "repository root",
            "models": {
                m: {
                    "dir": str(MODELS / m),
                    "sha256": sha256(
                        REPO / MODELS / m
                        / ("adapter_model.safetensors" if m == "lora_b" else "model.safetensors")
                    ),
                }
                for m in ("base", "ft_a", "ft_b", "lora_b", "ft_lora")
            },
            "lora": {"r": LORA_R, "lora_alpha": LORA_ALPHA, "scaling": LORA_ALPHA / LORA_R,
                     "target_modules": LORA_TARGETS,
                     "ft_lora_minus_formula_max_abs": lora_delta},  # fmt: skip
            "mergekit_flags": MERGEKIT_FLAGS + ["--lora-merge-cache", "<tmpdir>"],
        }
    )
    cases = manifest.setdefault("cases", {})
    for name in names:
        d = REPO / FIX / name
        cases[name] = {
            "group": "core" if name in CORE else "extra",
            "method": CASES[name]["merge_method"],
            "config": str(FIX / name / "config.yaml"),
            "output": str(FIX / name / "model.safetensors"),
            "sha256": sha256(d / "model.safetensors"),
            **checks.get(name, {}),
        }
        if name == "ties_lora" and lora_vs_peft is not None:
            cases[name]["mergekit_lora_cache_vs_ft_lora_max_abs"] = lora_vs_peft
    manifest["cases"] = dict(sorted(cases.items()))
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    for p in (REPO / FIX).rglob("*"):  # safetensors and tempfile copies come out 0600
        if p.is_file():
            p.chmod(0o644)
    print(f"wrote {manifest_path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
