#!/usr/bin/env python3
"""The Vocos training step in PyTorch, on the `vocos` package itself.

Reads what `cargo run --release --example vocos_throughput -- --dump DIR`
wrote (weights by the package's parameter names, the batch, the config
and melvae's loss), builds the package's VocosBackbone + ISTFTHead +
MelSpectrogramFeatures with those weights, checks that it computes the
same loss on the same batch (this proves the twin is the same model), then
times the same training step (log-mel of the crops, generator, the task's
loss: mel_weight * L1 of the output's log-mel against it, plus the
multi-scale mel and mel-distance terms when weighted, backward, AdamW) on
the CPU with melvae's thread count. melvae's magnitude prior
(`magnitude_prior`) is added to the package's head as melvae computes it.

    /tmp/refvenv/bin/python tools/bench/vocos_twin.py DIR [--steps 10]

Needs torch, torchaudio, numpy, safetensors, librosa and the `vocos`
package (the mel losses are vocos_recipe_probe.py's port of melvae's).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vocos_recipe_probe import DAC_SCALES, METRIC_SCALES, SR, MultiScaleMel  # noqa: E402


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
    w = meta["loss"]
    weight = float(w["mel_weight"])
    extra = []  # (weight, loss of (fake [b, 1, t], real [b, 1, t]))
    for key, scales, args_ in [("multiscale_mel_weight", DAC_SCALES, (1e-5, 1.0, 1.0, 0.0)),
                               ("mel_distance_weight", METRIC_SCALES, (1e-5, 2.0, 1.0, 1.0))]:
        if float(w.get(key, 0.0)):
            if cfg["sample_rate"] != SR:
                sys.exit(f"{key}: the ported mel losses are at {SR} Hz, the model at {cfg['sample_rate']}")
            extra.append((float(w[key]), MultiScaleMel(scales, *args_)))
    bins = cfg["n_fft"] // 2 + 1
    pinv = None
    if cfg.get("magnitude_prior"):
        fb = feats.mel_spec.mel_scale.fb.T.double()  # [n_mels, bins]
        pinv = torch.linalg.pinv(fb).float()  # [bins, n_mels]

    def generate(mel):
        if pinv is None:
            return head(backbone(mel))
        # The package's ISTFTHead with melvae's prior added to its log-magnitudes.
        x = head.out(backbone(mel)).transpose(1, 2)
        lm, p = x[:, :bins], x[:, bins:]
        lm = lm + (pinv @ mel.exp()).clamp(min=1e-5).log()
        mag = torch.exp(lm).clip(max=1e2)
        return head.istft(mag * (torch.cos(p) + 1j * torch.sin(p)))

    def loss_fn(x):
        target = feats(x).detach()
        fake = generate(target)
        total = weight * (feats(fake) - target).abs().mean()
        for wt, l in extra:
            total = total + wt * l(fake, x)
        return total

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
