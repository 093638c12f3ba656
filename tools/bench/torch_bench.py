#!/usr/bin/env python3
"""PyTorch reference timings for examples/gpu_bench.rs.

Builds the same work from tools/bench/shapes.json -- the matmul ceiling,
SDPA attention forward and forward + backward (flash and math backends), a
DiT block of the mel VAE decoder's dims (adaLN-Zero, rotary, GELU MLP of 4x,
LayerNorm without affine, SDPA) forward + backward -- times it the way the
Rust example does (mean over --iters runs after --warmup runs, device
synchronised around the loop) and writes JSON with the same ids for
tools/bench/report.py, which takes the model FLOPs from the candle results.

    python3 tools/bench/torch_bench.py --device cuda --dtype bf16 --json torch.json
    python3 tools/bench/torch_bench.py --device cpu --dtype f32 --shapes tiny   # smoke run

Needs only torch. Nothing here is used by the tests.
"""

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean_seconds(device, warmup, iters, fn):
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t) / iters


def rotary(x, base=10000.0):
    """GPT-NeoX half rotation, as melvae_layers::apply_rotary: x [b, h, t, d]."""
    t, d = x.shape[-2], x.shape[-1]
    half = d // 2
    inv = base ** (-2.0 * torch.arange(half, device=x.device, dtype=torch.float64) / d)
    ang = torch.arange(t, device=x.device, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class DitBlock(nn.Module):
    """melvae_layers::DitBlock with CfmConfig::block_config: biases, rotary,
    non-causal attention, GELU (erf) MLP of 4 * dim, norms without affine
    (eps 1e-6), adaLN-Zero from SiLU(c)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ada = nn.Linear(dim, 6 * dim)

    def attention(self, x):
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = rotary(qkv[0]), rotary(qkv[1]), qkv[2]
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x, c):
        m = self.ada(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)
        x = x + self.attention(self.norm1(x) * (1 + m[1]) + m[0]) * m[2]
        return x + self.mlp(self.norm2(x) * (1 + m[4]) + m[3]) * m[5]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--shapes", default="full")
    p.add_argument("--shapes-file", default="tools/bench/shapes.json")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args()
    if a.iters < 1:
        sys.exit("error: --iters must be at least 1")
    with open(a.shapes_file) as f:
        sets = json.load(f)
    if a.shapes not in sets:
        sys.exit(f"error: {a.shapes_file}: no shape set {a.shapes!r} (has {', '.join(sets)})")
    shapes = sets[a.shapes]
    dev, dt = torch.device(a.device), DTYPES[a.dtype]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, grad=False):
        x = ((torch.rand(*shape, generator=gen) - 0.5) * 2 * scale).to(dev, dt)
        return x.requires_grad_(grad)

    results = []

    def record(id_, path, fn):
        s = mean_seconds(dev, a.warmup, a.iters, fn)
        results.append({"id": id_, "path": path, "ms": s * 1e3})
        print(f"{id_:<44} {path:<6} {s * 1e3:>10.3f} ms")
        return s

    print(f"torch_bench: torch {torch.__version__}, device {dev}, {a.dtype}, shapes {a.shapes!r}")
    mm = shapes["matmul"]
    x, y = rand(mm["m"], mm["k"]), rand(mm["k"], mm["n"])
    with torch.no_grad():
        s = record(f"matmul {mm['m']}x{mm['k']}x{mm['n']}", "gemm", lambda: x @ y)
    ceiling = 2 * mm["m"] * mm["k"] * mm["n"] / s / 1e12

    at = shapes["attention"]
    for dim in at["dims"]:
        for seq in at["seqs"]:
            shape = (at["batch"], dim // at["head_dim"], seq, at["head_dim"])
            tag = f"b{at['batch']} s{seq} d{dim}"
            q, k, v = (rand(*shape) for _ in range(3))
            qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            for path, backend in BACKENDS.items():
                try:
                    with sdpa_kernel(backend), torch.no_grad():
                        record(f"attention fwd {tag}", path,
                               lambda: F.scaled_dot_product_attention(q, k, v))
                    with sdpa_kernel(backend):
                        record(f"attention fwd+bwd {tag}", path,
                               lambda: F.scaled_dot_product_attention(qg, kg, vg).sum().backward())
                except RuntimeError as e:  # no flash kernel on this device/dtype
                    print(f"attention {tag} {path}: skipped ({str(e).splitlines()[0]})")

    dit = shapes["dit_block"]
    block = DitBlock(dit["dim"], dit["heads"]).to(dev, dt)
    with torch.no_grad():
        for prm in block.parameters():
            prm.copy_(rand(*prm.shape, scale=0.05))
    for case in dit["cases"]:
        xg = rand(case["batch"], case["frames"], dit["dim"], grad=True)
        cg = rand(case["batch"], dit["dim"], grad=True)
        for path, backend in BACKENDS.items():
            try:
                with sdpa_kernel(backend):
                    record(f"dit block fwd+bwd b{case['batch']} t{case['frames']} d{dit['dim']}",
                           path, lambda: block(xg, cg).sum().backward())
            except RuntimeError as e:
                print(f"dit block {path}: skipped ({str(e).splitlines()[0]})")

    if a.json:
        out = {
            "framework": "pytorch",
            "version": torch.__version__,
            "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
            "dtype": a.dtype,
            "shapes": a.shapes,
            "ceiling_tflops": ceiling,
            "results": results,
        }
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
