#!/usr/bin/env python3
"""How fast can the waveform VAE's architecture learn the waveform itself?

A diagnostic behind docs/models/wave_vae.md ("Measured"): the PyTorch twin
of melvae's WaveVae (tools/bench/wave_vae_twin.py, same layers and
parameter names) trained as a deterministic autoencoder (posterior mean,
no KL) with the waveform L1 alone on random 0.49 s crops of the bundled
speech (batch 4, AdamW lr 1e-3), printing the L1 next to the L1 of silence
and the batch's SI-SDR every 100 steps. It runs about 5x faster than
melvae on the same CPU, so it maps the space of strides quickly.

    /tmp/refvenv/bin/python tools/bench/wave_vae_l1_probe.py --steps 600 strides=[2,4,4] channel_mults=[2,4,8] latent_dim=8

KEY=VALUE arguments (values as JSON) override configs/settings/
wave_vae_tiny.yaml's `wave_vae:` section (read with PyYAML, after the
defaults in configs/defaults/wave_vae.yaml). Needs torch, numpy,
soundfile, pyyaml.
"""
import argparse
import glob
import json
import os
import sys

import numpy as np
import soundfile as sf
import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
sys.path.insert(0, HERE)
import wave_vae_twin as twin  # noqa: E402


def config(overrides):
    with open(os.path.join(ROOT, "configs", "defaults", "wave_vae.yaml")) as f:
        cfg = yaml.safe_load(f)["wave_vae"]
    with open(os.path.join(ROOT, "configs", "settings", "wave_vae_tiny.yaml")) as f:
        cfg.update(yaml.safe_load(f)["wave_vae"])
    for kv in overrides:
        k, v = kv.split("=", 1)
        cfg[k] = json.loads(v)
    return cfg


def si_sdr(r, e):
    r = r - r.mean(-1, keepdim=True)
    e = e - e.mean(-1, keepdim=True)
    r, e = r.flatten(), e.flatten()
    a = (e @ r) / (r @ r)
    return float(10 * torch.log10(((a * r) ** 2).sum() / ((e - a * r) ** 2).sum()))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="wave_vae KEY=JSON_VALUE")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = config(args.overrides)
    model = twin.WaveVae(cfg)
    hop = int(np.prod(cfg["strides"]))
    crop = 11840 // hop * hop
    clips = [sf.read(f, dtype="float32")[0] for f in sorted(glob.glob(os.path.join(ROOT, "assets", "speech", "*.flac")))]
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    print(f"strides {cfg['strides']} (hop {hop}), latent_dim {cfg['latent_dim']}: "
          f"{cfg['sample_rate'] / hop * cfg['latent_dim']:.0f} latent numbers/s")
    for step in range(args.steps + 1):
        xs = []
        for _ in range(4):
            c = clips[rng.integers(len(clips))]
            o = rng.integers(len(c) - crop)
            xs.append(c[o:o + crop])
        x = torch.from_numpy(np.stack(xs))[:, None, :]
        mean, _ = model.encoder(x)
        y = model.decoder(mean)
        loss = (y - x).abs().mean()
        if step % 100 == 0:
            print(f"step {step}: L1 {loss.item():.4f} (silence {x.abs().mean().item():.4f}), "
                  f"SI-SDR {si_sdr(x, y.detach()):.2f} dB", flush=True)
        opt.zero_grad()
        loss.backward()
        opt.step()


if __name__ == "__main__":
    main()
