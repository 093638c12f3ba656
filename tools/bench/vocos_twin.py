#!/usr/bin/env python3
"""The Vocos training step in PyTorch, on the `vocos` package itself.

Reads what `cargo run --release --example vocos_throughput -- --dump DIR`
wrote (weights by the package's parameter names, the batch, the config
and melvae's loss), builds the package's VocosBackbone + ISTFTHead +
MelSpectrogramFeatures with those weights, checks that it computes the
same loss on the same batch (this proves the twin is the same model), then
times the same training step (log-mel of the crops, generator, mel_weight *
L1 of the output's log-mel against it, backward, AdamW) on the CPU with
melvae's thread count.

    /tmp/refvenv/bin/python tools/bench/vocos_twin.py DIR [--steps 10]

Needs torch, torchaudio, numpy, safetensors and the `vocos` package.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file
from vocos.feature_extractors import MelSpectrogramFeatures
from vocos.heads import ISTFTHead
from vocos.models import VocosBackbone


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tol", type=float, default=1e-4, help="relative tolerance of the loss")
    args = p.parse_args()
    with open(os.path.join(args.dir, "meta.json")) as f:
        meta = json.load(f)
    torch.set_num_threads(int(meta.get("threads", torch.get_num_threads())))
    cfg = meta["model"]
    if cfg["features"] != "vocos":
        sys.exit(f"features {cfg['features']!r}: the twin builds the package's own (vocos) features only")
    feats = MelSpectrogramFeatures(cfg["sample_rate"], cfg["n_fft"], cfg["hop_length"], cfg["n_mels"], cfg["padding"])
    backbone = VocosBackbone(cfg["n_mels"], cfg["dim"], cfg["intermediate_dim"], cfg["num_layers"],
                             cfg["layer_scale_init_value"], cfg["adanorm_num_embeddings"])
    head = ISTFTHead(cfg["dim"], cfg["n_fft"], cfg["hop_length"], cfg["padding"])
    model = torch.nn.ModuleDict({"backbone": backbone, "head": head})
    weights = load_file(os.path.join(args.dir, "weights.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("istft.window")]
    if missing or unexpected:
        sys.exit(f"weights do not match the package: missing {missing}, unexpected {unexpected}")
    audio = torch.from_numpy(np.load(os.path.join(args.dir, "batch.npy")).astype(np.float32))
    n = sum(v.numel() for v in model.parameters())
    print(f"setting {meta.get('setting')}: {n} parameters, batch {list(audio.shape)}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    weight = float(meta["loss"]["mel_weight"])

    def loss_fn(x):
        target = feats(x).detach()
        fake = head(backbone(target))
        return weight * (feats(fake) - target).abs().mean()

    with torch.no_grad():
        ours = float(loss_fn(audio))
    r = abs(ours - meta["eval_total"]) / max(abs(meta["eval_total"]), 1e-12)
    ok = r <= args.tol
    print(f"loss: melvae {meta['eval_total']:.8g}, torch {ours:.8g}, rel diff {r:.2e}: "
          f"parity (tol {args.tol:g}) {'OK' if ok else 'FAILED'}")

    opt = torch.optim.AdamW(model.parameters(), lr=float(meta["learning_rate"]), betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(audio).backward()
        opt.step()

    step()  # warm-up
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    mean_ms = 1e3 * sum(times) / len(times)
    print(f"train step (eager): mean {mean_ms:.1f} ms, min {1e3 * min(times):.1f} ms over {args.steps} steps")
    mv = meta.get("melvae_step_ms")
    if mv:
        print(f"melvae {mv:.1f} ms/step; melvae / torch eager = {mv / mean_ms:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
