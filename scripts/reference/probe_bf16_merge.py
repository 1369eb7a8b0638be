#!/usr/bin/env python3
"""How far paft's and mergekit's merges of bfloat16 checkpoints are apart, and from float64.

mergekit computes in the checkpoints' dtype, rounding every intermediate to bf16 (its task
vectors, top-k and sign votes included); paft computes in f32 and rounds once. This script
merges the merge fixtures' base/ft_a/ft_b with both tools (task_arithmetic and ties) two ways:
(1) stored as bf16 (in a temp dir), no `dtype`, so each computes as it does for bf16 inputs;
(2) the f32 checkpoints with `dtype: bfloat16`, where mergekit rounds the inputs to bf16 first
and paft merges the f32 values. It prints how many entries differ between the two tools, and
how many of each are further than half a bf16 ULP from the float64 formula on the checkpoints
as stored.

    scripts/.venv-mergekit/bin/python scripts/reference/probe_bf16_merge.py --paft target/debug/paft

Nothing is written into the repository.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "tests/fixtures/merge/models"

CASES = {
    "task_arithmetic": "parameters: {normalize: true}",
    "ties": "parameters: {normalize: true}",
}
WEIGHTS, DENSITY = (1.0, 0.5), 0.5


def to_bf16(tmp: Path):
    for m in ("base", "ft_a", "ft_b"):
        d = tmp / m
        d.mkdir()
        sd = load_file(str(MODELS / m / "model.safetensors"))
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()},
                  str(d / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
        cfg = json.loads((MODELS / m / "config.json").read_text())
        cfg.pop("dtype", None)
        cfg["torch_dtype"] = "bfloat16"
        (d / "config.json").write_text(json.dumps(cfg))


def config(method: str, models: Path, dtype=None) -> str:
    return (
        f"merge_method: {method}\nbase_model: {models}/base\nmodels:\n"
        f"  - model: {models}/ft_a\n    parameters: {{weight: {WEIGHTS[0]}, density: {DENSITY}}}\n"
        f"  - model: {models}/ft_b\n    parameters: {{weight: {WEIGHTS[1]}, density: {DENSITY}}}\n"
        f"{CASES[method]}\n" + (f"dtype: {dtype}\n" if dtype else "")
    )


def topk(d, density):
    k = max(1, int(density * d.numel()))
    keep = torch.zeros(d.numel(), dtype=torch.float64)
    keep[torch.argsort(-d.flatten().abs(), stable=True)[:k]] = 1
    return d * keep.view(d.shape)


def formula(method, x0, xs):
    """float64, on the bf16 inputs (task_arithmetic ignores density)."""
    ds = [x - x0 for x in xs]
    if method == "ties":
        ds = [topk(d, DENSITY) for d in ds]
    wd = torch.stack([w * d for w, d in zip(WEIGHTS, ds)])
    w = torch.tensor(WEIGHTS, dtype=torch.float64).view(-1, *([1] * x0.dim()))
    if method == "ties":
        mask = (torch.sign(wd) == torch.where(wd.sum(0) >= 0, 1.0, -1.0)).double()
        div = (w * mask).sum(0)
        div[div == 0] = 1
        return x0 + (wd * mask).sum(0) / div
    return x0 + wd.sum(0) / sum(WEIGHTS)


def compare(method: str, models: Path, tmp: Path, paft: str, dtype=None):
    tag = f"{method}{'-' + dtype if dtype else ''}"
    cfg = tmp / f"{tag}.yaml"
    cfg.write_text(config(method, models, dtype))
    mk, pa = tmp / f"mergekit-{tag}", tmp / f"paft-{tag}"
    subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(cfg), str(mk),
                    "--no-cuda", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run([paft, "merge", str(cfg), str(pa), "--quiet"], check=True)
    inputs = {m: load_file(str(models / m / "model.safetensors")) for m in ("base", "ft_a", "ft_b")}
    outs = {n: load_file(str(d / "model.safetensors")) for n, d in (("mergekit", mk), ("paft", pa))}
    differ = total = 0
    worst = 0.0
    off = {n: [0, 0.0] for n in outs}
    for k in inputs["base"]:
        x0, xa, xb = (inputs[m][k].double() for m in ("base", "ft_a", "ft_b"))
        ref = formula(method, x0, [xa, xb])
        half_ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 8)
        for n, o in outs.items():
            assert o[k].dtype == torch.bfloat16, (n, k, o[k].dtype)
            e = (o[k].double() - ref).abs()
            off[n][0] += int((e > half_ulp * 1.0001).sum())
            off[n][1] = max(off[n][1], float(e.max()))
        d = (outs["mergekit"][k].double() - outs["paft"][k].double()).abs()
        differ += int((d > 0).sum())
        total += d.numel()
        worst = max(worst, float(d.max()))
    print(f"{tag}: {differ}/{total} entries differ ({100 * differ / total:.1f}%), "
          f"max |mergekit - paft| {worst:.3g}")  # fmt: skip
    for n, (count, err) in off.items():
        print(f"  {n:8}: {count} entries more than half a bf16 ULP from float64, "
              f"max |error| {err:.3g}")  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--paft", required=True, help="the paft binary")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        (tmp / "bf16").mkdir()
        to_bf16(tmp / "bf16")
        print("bf16 checkpoints, no dtype:")
        for method in CASES:
            compare(method, tmp / "bf16", tmp, args.paft)
        print("f32 checkpoints, dtype: bfloat16:")
        for method in CASES:
            compare(method, MODELS, tmp, args.paft, "bfloat16")


if __name__ == "__main__":
    main()
