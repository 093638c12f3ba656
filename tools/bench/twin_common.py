"""What the PyTorch twins under tools/bench/ share: loading melvae's dumped
weights by name, timing training steps, and small helpers."""
import math
import sys
import time

import numpy as np
import torch


def load_weights(model, path):
    """Every parameter and buffer of `model` from the dump at `path` by
    name; exits 2 listing what is missing, unused or mis-shaped (so the
    element counts agree). Returns the element count."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    missing = sorted(set(params) - set(tensors))
    unused = sorted(set(tensors) - set(params))
    shapes = [f"{n}: twin {tuple(params[n].shape)} vs melvae {tuple(tensors[n].shape)}"
              for n in sorted(set(params) & set(tensors)) if params[n].shape != tensors[n].shape]
    if missing or unused or shapes:
        for what, names in [("missing from the dump", missing), ("unused by the twin", unused),
                            ("mis-shaped", shapes)]:
            if names:
                print(f"weights {what} ({len(names)}):", file=sys.stderr)
                for n in names:
                    print(f"  {n}", file=sys.stderr)
        sys.exit(2)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n].to(p.dtype))
    return sum(p.numel() for p in params.values())


def time_steps(step, n):
    """Mean and min milliseconds of `n` calls of `step` (after one warm-up);
    `step` returns the loss, which must stay finite."""
    step()  # warm-up
    times = []
    for _ in range(n):
        t = time.perf_counter()
        total = step()
        times.append(time.perf_counter() - t)
        if not math.isfinite(float(total)):
            raise RuntimeError("non-finite training loss")
    return 1e3 * float(np.mean(times)), 1e3 * float(np.min(times))


def loadavg():
    """The 1, 5 and 15 minute load averages (Linux), or "unknown"."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def rel(a, b):
    """Relative difference of `a` against `b`."""
    return abs(a - b) / max(abs(b), 1e-12)
