#!/usr/bin/env python3
"""Make a synthetic "fine-tune" of a Hugging Face model dir for the merge benchmark.

    python benchmarks/perturb_model.py SRC_DIR OUT_DIR --seed 1 [--scale 0.01]

Every floating-point tensor t of every *.safetensors file becomes t + N(0, 1) * scale * std(t)
(std over the whole tensor; a constant tensor, e.g. a norm initialised to ones, gets the absolute
std `scale` instead so it still moves).  Noise is drawn per tensor from a generator seeded with
(seed, tensor name), so the result does not depend on file or tensor order.  Dtypes, names,
shard layout and safetensors metadata are kept; all other files (config, tokenizer, index) are
copied.  Needs only numpy and safetensors (scripts/.venv or scripts/.venv-mergekit); bf16 tensors
need torch.  Works shard by shard, so peak memory is about one shard.
"""

import argparse
import hashlib
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def read_metadata(path: Path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__")


def perturb_numpy(path: Path, out: Path, seed: int, scale: float):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    for name, t in tensors.items():
        if np.issubdtype(t.dtype, np.floating):
            x = t.astype(np.float64)
            std = float(x.std()) if x.size > 1 else 0.0
            sigma = scale * (std if std > 0 else 1.0)
            rng = np.random.default_rng(tensor_seed(seed, name))
            tensors[name] = (x + rng.standard_normal(x.shape) * sigma).astype(t.dtype)
    save_file(tensors, str(out), metadata=read_metadata(path))


def perturb_torch(path: Path, out: Path, seed: int, scale: float):
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    for name, t in tensors.items():
        if t.is_floating_point():
            x = t.to(torch.float64)
            std = float(x.std()) if x.numel() > 1 else 0.0
            sigma = scale * (std if std > 0 else 1.0)
            rng = np.random.default_rng(tensor_seed(seed, name))
            noise = torch.from_numpy(rng.standard_normal(tuple(x.shape)))
            tensors[name] = (x + noise * sigma).to(t.dtype)
    save_file(tensors, str(out), metadata=read_metadata(path))


def has_bf16(path: Path) -> bool:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return any(isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--scale", type=float, default=0.01, help="noise std as a fraction of std(t)")
    args = ap.parse_args()

    shards = sorted(args.src.glob("*.safetensors"))
    if not shards:
        sys.exit(f"no *.safetensors in {args.src}")
    if args.out.exists():
        sys.exit(f"refusing to overwrite {args.out}")
    args.out.mkdir(parents=True)
    for p in sorted(args.src.iterdir()):
        if p.is_file() and p.suffix != ".safetensors":
            shutil.copy2(p, args.out / p.name)
    for p in shards:
        fn = perturb_torch if has_bf16(p) else perturb_numpy
        fn(p, args.out / p.name, args.seed, args.scale)
        print(f"{p.name}: perturbed", file=sys.stderr)


if __name__ == "__main__":
    main()
