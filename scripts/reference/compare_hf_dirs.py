#!/usr/bin/env python3
"""Compare two Hugging Face model directories tensor by tensor.

    scripts/.venv/bin/python scripts/reference/compare_hf_dirs.py A B [--atol 1e-6] [--all]

Prints, for every tensor name present in both, shapes/dtypes and the max abs difference
(computed in float64), then the names present in only one directory, then config.json
differences (and a short comparison of generation_config.json / tokenizer files).
Handles single-file and sharded (model.safetensors.index.json) checkpoints.  A tied
lm_head.weight stored in one directory only is compared against model.embed_tokens.weight
of the other and reported as such.

Exit status: 0 when every common tensor has the same shape and max|A-B| <= --atol, no name
is missing from either side (tied lm_head excepted) and config.json matches apart from
bookkeeping keys (transformers_version, _name_or_path, _model_name_or_path, dtype/torch_dtype);
1 otherwise.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

IGNORED_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_model_name_or_path", "torch_dtype", "dtype"}


def safetensors_files(d):
    d = Path(d)
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        return sorted({d / f for f in wm.values()})
    files = sorted(d.glob("*.safetensors"))
    if not files:
        sys.exit(f"{d}: no *.safetensors files")
    return files


def load(d):
    out = {}
    for f in safetensors_files(d):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if k in out:
                    sys.exit(f"{d}: tensor {k} appears in more than one file")
                out[k] = fh.get_tensor(k)
    return out


def flat(obj, prefix=""):
    if isinstance(obj, dict):
        r = {}
        for k, v in obj.items():
            r.update(flat(v, f"{prefix}{k}."))
        return r
    return {prefix[:-1]: obj}


def config_diff(a, b):
    fa, fb = flat(a), flat(b)
    rows = []
    for k in sorted(set(fa) | set(fb)):
        va, vb = fa.get(k, "<absent>"), fb.get(k, "<absent>")
        if va != vb:
            rows.append((k, va, vb))
    return rows


def diff(ta, tb):
    a, b = ta.to(torch.float64), tb.to(torch.float64)
    d = (a - b).abs()
    return d.max().item(), d.mean().item(), a.abs().max().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--atol", type=float, default=0.0, help="max abs diff still counted as equal (default 0)")
    ap.add_argument("--all", action="store_true", help="print every tensor, not only those above --atol")
    args = ap.parse_args()

    A, B = load(args.a), load(args.b)
    ok = True
    common = sorted(set(A) & set(B))
    only_a = sorted(set(A) - set(B))
    only_b = sorted(set(B) - set(A))

    print(f"A = {args.a}: {len(A)} tensors;  B = {args.b}: {len(B)} tensors;  {len(common)} in both")
    print(f"{'tensor':<52} {'shape':<16} {'dtype A/B':<18} {'max|A-B|':>12} {'mean|A-B|':>12} {'max|A|':>10}")
    worst = (0.0, None)
    n_shown = 0
    for k in common:
        ta, tb = A[k], B[k]
        dt = f"{str(ta.dtype)[6:]}/{str(tb.dtype)[6:]}"
        if ta.shape != tb.shape:
            print(f"{k:<52} SHAPE {tuple(ta.shape)} vs {tuple(tb.shape)}  {dt}")
            ok = False
            continue
        mx, mean, amax = diff(ta, tb)
        if mx > worst[0]:
            worst = (mx, k)
        if mx > args.atol:
            ok = False
        if args.all or mx > args.atol:
            n_shown += 1
            print(f"{k:<52} {str(tuple(ta.shape)):<16} {dt:<18} {mx:>12.4e} {mean:>12.4e} {amax:>10.4g}")
    if not args.all and n_shown == 0:
        print(f"(all {len(common)} common tensors within atol={args.atol})")
    print(f"largest max|A-B|: {worst[0]:.4e} ({worst[1]})")

    def tied_check(only, this, other, side):
        rest = []
        for k in only:
            if k == "lm_head.weight" and "model.embed_tokens.weight" in other and "lm_head.weight" not in other:
                mx, _, _ = diff(this[k], other["model.embed_tokens.weight"]) \
                    if this[k].shape == other["model.embed_tokens.weight"].shape else (float("inf"), 0, 0)
                print(f"only in {side}: lm_head.weight (other side tied?) vs other's model.embed_tokens.weight: "
                      f"max|diff| {mx:.4e}")
            else:
                rest.append(k)
        return rest

    ra = tied_check(only_a, A, B, "A")
    rb = tied_check(only_b, B, A, "B")
    for side, names, T in (("A", ra, A), ("B", rb, B)):
        if names:
            ok = False
            print(f"only in {side} ({len(names)}):")
            for k in names:
                print(f"  {k} {tuple(T[k].shape)} {T[k].dtype}")

    ca, cb = (Path(x) / "config.json" for x in (args.a, args.b))
    if ca.exists() and cb.exists():
        rows = config_diff(json.loads(ca.read_text()), json.loads(cb.read_text()))
        print("config.json: " + ("identical" if not rows else f"{len(rows)} differences"))
        for k, va, vb in rows:
            mark = "  (ignored)" if k.split(".")[0] in IGNORED_CONFIG_KEYS else ""
            if not mark:
                ok = False
            print(f"  {k}: A={json.dumps(va)} B={json.dumps(vb)}{mark}")
    else:
        print(f"config.json: missing in {'A' if not ca.exists() else ''}{'B' if not cb.exists() else ''}")
        ok = False

    # informational only
    for name in ("generation_config.json", "tokenizer_config.json", "tokenizer.json", "chat_template.jinja"):
        fa, fb = Path(args.a) / name, Path(args.b) / name
        if not (fa.exists() or fb.exists()):
            continue
        if not (fa.exists() and fb.exists()):
            print(f"{name}: only in {'A' if fa.exists() else 'B'}")
            continue
        if name.endswith(".json"):
            ja, jb = json.loads(fa.read_text(encoding="utf-8")), json.loads(fb.read_text(encoding="utf-8"))
            if name == "tokenizer.json":
                keys = sorted(set(ja) | set(jb))
                bad = [k for k in keys if ja.get(k) != jb.get(k)]
                print(f"{name}: " + ("identical" if not bad else "differs in " + ", ".join(bad)))
            else:
                rows = config_diff(ja, jb)
                print(f"{name}: " + ("identical" if not rows else ""))
                for k, va, vb in rows:
                    print(f"  {k}: A={json.dumps(va)[:100]} B={json.dumps(vb)[:100]}")
        else:
            same = fa.read_bytes() == fb.read_bytes()
            print(f"{name}: {'identical' if same else 'differs'}")

    print("RESULT:", "match" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
