#!/usr/bin/env python3
"""Joins the JSON of examples/gpu_bench.rs (candle) and tools/bench/torch_bench.py
(PyTorch) from one machine into the markdown table of docs/benchmarks.md.

    python3 tools/bench/report.py candle.json torch.json > table.md

Model FLOPs come from the candle results (melvae_layers::flops); each
framework's MFU is against its own measured matmul ceiling. The ratio is
candle time / PyTorch time on the same path (math or flash): above 1,
candle is slower.
"""

import json
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: {path}: {e}")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().split("\n\n")[1])
    candle, torch = load(sys.argv[1]), load(sys.argv[2])
    if candle.get("shapes") != torch.get("shapes") or candle.get("dtype") != torch.get("dtype"):
        sys.exit(f"error: the runs differ: candle {candle.get('shapes')}/{candle.get('dtype')}, "
                 f"PyTorch {torch.get('shapes')}/{torch.get('dtype')}")
    flops = {r["id"]: r["flops"] for r in candle["results"]}
    ours = {(r["id"], r["path"]): r for r in candle["results"]}
    theirs = {(r["id"], r["path"]): r for r in torch["results"]}
    keys = list(ours) + [k for k in theirs if k not in ours]

    def cells(r, ceiling, fl):
        if r is None:
            return ["", ""]
        tf = fl / (r["ms"] / 1e3) / 1e12
        return [f"{r['ms']:.3f}", f"{tf:.3g} ({100 * tf / ceiling:.0f}%)"]

    print(f"dtype {candle['dtype']}; matmul ceilings: candle {candle['ceiling_tflops']:.3g} TFLOP/s, "
          f"PyTorch {torch['ceiling_tflops']:.3g} TFLOP/s (torch {torch.get('version', '?')}, {torch['device']}).\n")
    print("| benchmark | path | candle ms | candle TFLOP/s (MFU) | PyTorch ms | PyTorch TFLOP/s (MFU) | candle / PyTorch |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for key in keys:
        fl = flops.get(key[0])
        if fl is None:
            continue  # a PyTorch row candle has no FLOP count for
        o, t = ours.get(key), theirs.get(key)
        ratio = f"{o['ms'] / t['ms']:.2f}" if o and t else ""
        name = key[0]
        if o and o.get("extra"):
            name += " (" + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in o["extra"].items()) + ")"
        print("| " + " | ".join([name, key[1]]
                                + cells(o, candle["ceiling_tflops"], fl)
                                + cells(t, torch["ceiling_tflops"], fl) + [ratio]) + " |")


if __name__ == "__main__":
    main()
