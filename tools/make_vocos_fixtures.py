#!/usr/bin/env python3
"""Writes the parity fixtures of melvae-models' Vocos vocoder (loading the
`vocos` package's PyTorch checkpoints).

Run by hand, never by tests:

    /tmp/refvenv/bin/pip install torch==2.15.0 torchaudio==2.11.1 vocos==0.1.0 \
        numpy==2.4.6 scipy==1.17.1 safetensors==0.8.0 soundfile==0.14.0
    nice /tmp/refvenv/bin/python tools/make_vocos_fixtures.py

Versions used (pip freeze of /tmp/refvenv): vocos==0.1.0, torch==2.15.0,
torchaudio==2.11.1 (pure-Python MelSpectrogram; pip pairs it with torch 2.15),
numpy==2.4.6, scipy==1.17.1, safetensors==0.8.0, soundfile==0.14.0, and
vocos' own dependencies einops==0.8.2, encodec==0.1.1, PyYAML==6.0.4,
huggingface_hub==2.4.0. Runs on the CPU, one thread, a few seconds.

Two presets, each a tiny `vocos.pretrained.Vocos` built by the package itself
(`Vocos.from_hparams` on the config.yaml written here), then every parameter
re-initialised from a seeded generator so that no weight is zero or one and
a wrong name, a transposition or a swapped half would show:

- vocos-24k: the charactr/vocos-mel-24khz layout (24 kHz, n_fft 1024,
  hop 256, 100 mels, padding "center") with a small backbone
  (dim 32, intermediate_dim 96, 2 ConvNeXt layers, plain LayerNorm).
- vocos-22k: 22.05 kHz, n_fft 1024, hop 256, 80 mels, padding "same" (the
  padding of the 22 kHz Matcha-TTS vocos config and of vocos-encodec-24khz's
  head), the same small backbone with AdaLayerNorm
  (adanorm_num_embeddings 4), decoded with bandwidth_id = tensor([2]).
  vocos 0.1.0's MelSpectrogramFeatures has no f_min / f_max / slaney options,
  so the mel is the package's (HTK scale, no norm, 0 .. sr/2), not HiFi-GAN's.

Files under crates/melvae-models/tests/fixtures/vocos/<preset>/:

- config.yaml        the published vocos format (feature_extractor / backbone /
                     head, each class_path + init_args); Vocos.from_hparams
                     loads it.
- model.safetensors  Vocos.state_dict() of the whole module, the package's
                     own key names, float32, parameters and buffers
                     (feature_extractor.mel_spec.spectrogram.window,
                     feature_extractor.mel_spec.mel_scale.fb, head.istft.window).
- pytorch_model.bin  vocos-24k only: torch.save(state_dict) of the same
                     tensors, as the Hugging Face checkpoints ship it
                     (Vocos.from_pretrained torch.load()s it).
- audio_in.npy       float32 [1, 12288]: 1536 samples of digital silence
                     (so a few mel frames hit the log clamp), then
                     assets/speech/v1_s2.flac from 0.3 s (at 24 kHz as stored;
                     for 22.05 kHz the whole file is first resampled with
                     scipy.signal.resample_poly(x, 147, 160)), with a 64-sample
                     linear fade-in.
- mel.npy            float32 [1, n_mels, frames]: model.feature_extractor(audio_in)
                     (natural-log mel).
- backbone_out.npy   float32 [1, frames, dim]: model.backbone(mel[, bandwidth_id])
                     (after final_layer_norm), to localise a mismatch.
- audio_out.npy      float32 [1, samples]: model.decode(mel[, bandwidth_id]),
                     float32, eval mode, inference mode.
- meta.json          sizes, the condition id, the DSP details the Rust side
                     needs, and the float32-vs-float64 differences (the same
                     decode run on model.double() with mel.double()).
"""
import copy
import json
import os
import sys

import numpy as np
import scipy.signal
import soundfile as sf
import torch
import torchaudio
import vocos
from safetensors.torch import load_file, save_file
from vocos import Vocos
from vocos.modules import AdaLayerNorm, ConvNeXtBlock

sys.dont_write_bytecode = True
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "crates", "melvae-models", "tests", "fixtures", "vocos")

N_SAMPLES = 48 * 256  # a whole number of hops: 0.512 s at 24 kHz, 0.557 s at 22.05 kHz
N_SILENCE = 1536
SPEECH = ("v1_s2.flac", 0.3)  # (file in assets/speech, offset in seconds)

PRESETS = {
    "vocos-24k": dict(sample_rate=24000, n_fft=1024, hop_length=256, n_mels=100, padding="center",
                      dim=32, intermediate_dim=96, num_layers=2, adanorm=None, bandwidth_id=None,
                      write_bin=True, seed=24000),
    "vocos-22k": dict(sample_rate=22050, n_fft=1024, hop_length=256, n_mels=80, padding="same",
                        dim=32, intermediate_dim=96, num_layers=2, adanorm=4, bandwidth_id=2,
                        write_bin=False, seed=22050),
}


def config_yaml(p):
    """The published config.yaml layout (as charactr/vocos-mel-24khz)."""
    ada = f"    adanorm_num_embeddings: {p['adanorm']}\n" if p["adanorm"] else ""
    return (
        "feature_extractor:\n"
        "  class_path: vocos.feature_extractors.MelSpectrogramFeatures\n"
        "  init_args:\n"
        f"    sample_rate: {p['sample_rate']}\n"
        f"    n_fft: {p['n_fft']}\n"
        f"    hop_length: {p['hop_length']}\n"
        f"    n_mels: {p['n_mels']}\n"
        f"    padding: {p['padding']}\n"
        "\n"
        "backbone:\n"
        "  class_path: vocos.models.VocosBackbone\n"
        "  init_args:\n"
        f"    input_channels: {p['n_mels']}\n"
        f"    dim: {p['dim']}\n"
        f"    intermediate_dim: {p['intermediate_dim']}\n"
        f"    num_layers: {p['num_layers']}\n"
        f"{ada}"
        "\n"
        "head:\n"
        "  class_path: vocos.heads.ISTFTHead\n"
        "  init_args:\n"
        f"    dim: {p['dim']}\n"
        f"    n_fft: {p['n_fft']}\n"
        f"    hop_length: {p['hop_length']}\n"
        f"    padding: {p['padding']}\n"
    )


def test_signal(sr):
    x, file_sr = sf.read(os.path.join(ROOT, "assets", "speech", SPEECH[0]), dtype="float64", always_2d=True)
    x = x[:, 0]
    assert file_sr == 24000, file_sr
    if sr != file_sr:
        g = np.gcd(sr, file_sr)
        x = scipy.signal.resample_poly(x, sr // g, file_sr // g)
    start = int(round(SPEECH[1] * sr))
    speech = x[start:start + N_SAMPLES - N_SILENCE].copy()
    speech[:64] *= np.arange(64) / 64.0
    out = np.concatenate([np.zeros(N_SILENCE), speech])
    assert out.shape == (N_SAMPLES,)
    return out.astype(np.float32)[None, :]


def reinit(model, p, gen):
    """Seeded, non-trivial values for every parameter (buffers are left as built)."""
    done = set()

    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    with torch.no_grad():
        for name, m in model.named_modules():
            pre = name + "." if name else ""
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear)):
                fan_in = m.weight[0].numel()
                gain = 1.0
                if name == "head.out":
                    # log-magnitude rows 0..n_fft/2 and phase rows n_fft/2+1..: std ~2
                    # in the log-magnitude, so that ~1% of exp() hit the 1e2 clip.
                    gain = 2.0
                m.weight.copy_(randn(m.weight.shape) * gain / fan_in ** 0.5)
                m.bias.copy_(randn(m.bias.shape) * 0.1)
                done |= {pre + "weight", pre + "bias"}
            elif isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1.0 + 0.1 * randn(m.weight.shape))
                m.bias.copy_(0.1 * randn(m.bias.shape))
                done |= {pre + "weight", pre + "bias"}
            elif isinstance(m, AdaLayerNorm):
                m.scale.weight.copy_(1.0 + 0.2 * randn(m.scale.weight.shape))
                m.shift.weight.copy_(0.2 * randn(m.shift.weight.shape))
                done |= {pre + "scale.weight", pre + "shift.weight"}
            if isinstance(m, ConvNeXtBlock) and m.gamma is not None:
                m.gamma.copy_(0.5 + 0.2 * randn(m.gamma.shape))
                done.add(pre + "gamma")
    names = {n for n, _ in model.named_parameters()}
    assert names == done, (names - done, done - names)
    for n, t in model.named_parameters():
        assert not torch.any(t == 0) and not torch.any(t == 1), n


def decode_parts(model, mel, bw):
    kw = {} if bw is None else {"bandwidth_id": torch.tensor([bw])}
    with torch.inference_mode():
        h = model.backbone(mel, **kw)
        audio = model.head(h)
        # What the head clips: exp of the first n_fft/2+1 output channels.
        logmag = model.head.out(h).transpose(1, 2).chunk(2, dim=1)[0]
        clipped = float((logmag.exp() > 1e2).double().mean())
        ref = model.decode(mel, **kw)
    assert torch.equal(ref, audio)
    return h, audio, clipped


def make(preset, p):
    d = os.path.join(OUT, preset)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    cfg_path = os.path.join(d, "config.yaml")
    with open(cfg_path, "w") as f:
        f.write(config_yaml(p))

    torch.manual_seed(p["seed"])
    model = Vocos.from_hparams(cfg_path)
    gen = torch.Generator().manual_seed(p["seed"])
    reinit(model, p, gen)
    model.eval()

    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    if p["write_bin"]:
        torch.save(sd, os.path.join(d, "pytorch_model.bin"))

    audio_in = test_signal(p["sample_rate"])
    with torch.inference_mode():
        mel = model.feature_extractor(torch.from_numpy(audio_in))
    bw = p["bandwidth_id"]
    h, audio, clipped = decode_parts(model, mel, bw)

    # The files as written load back into a fresh package model and give the same audio.
    for loader in ["safetensors"] + (["bin"] if p["write_bin"] else []):
        m2 = Vocos.from_hparams(cfg_path)
        if loader == "bin":
            m2.load_state_dict(torch.load(os.path.join(d, "pytorch_model.bin"), map_location="cpu"))
        else:
            m2.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
        m2.eval()
        assert torch.equal(decode_parts(m2, mel, bw)[1], audio), loader
    if bw is not None:
        other = decode_parts(model, mel, (bw + 1) % p["adanorm"])[1]
        assert float((other - audio).abs().max()) > 1e-3, "bandwidth_id has no effect"

    # float64: the same decode on a double copy, from the float32 mel; and the mel itself.
    m64 = copy.deepcopy(model).double()
    h64, audio64, _ = decode_parts(m64, mel.double(), bw)
    with torch.inference_mode():
        mel64 = m64.feature_extractor(torch.from_numpy(audio_in).double())
    diff_audio = float((audio.double() - audio64).abs().max())
    diff_h = float((h.double() - h64).abs().max())
    diff_mel = float((mel.double() - mel64).abs().max())

    np.save(os.path.join(d, "audio_in.npy"), audio_in)
    np.save(os.path.join(d, "mel.npy"), mel.numpy().astype(np.float32))
    np.save(os.path.join(d, "backbone_out.npy"), h.numpy().astype(np.float32))
    np.save(os.path.join(d, "audio_out.npy"), audio.numpy().astype(np.float32))

    frames = mel.shape[-1]
    meta = {
        "preset": preset,
        "versions": {"vocos": vocos.__version__, "torch": torch.__version__.split("+")[0],
                     "torchaudio": torchaudio.__version__.split("+")[0]},
        "seed": p["seed"],
        "sample_rate": p["sample_rate"],
        "n_fft": p["n_fft"],
        "hop_length": p["hop_length"],
        "win_length": p["n_fft"],
        "n_mels": p["n_mels"],
        "padding": p["padding"],
        "bandwidth_id": bw,
        "adanorm_num_embeddings": p["adanorm"],
        "dim": p["dim"],
        "intermediate_dim": p["intermediate_dim"],
        "num_layers": p["num_layers"],
        "samples_in": int(audio_in.shape[-1]),
        "frames": int(frames),
        "samples_out": int(audio.shape[-1]),
        "input": f"{N_SILENCE} zeros, then assets/speech/{SPEECH[0]} from {SPEECH[1]} s"
                 + ("" if p["sample_rate"] == 24000 else " after resample_poly(x, 147, 160)")
                 + ", 64-sample linear fade-in",
        "mel": {"window": "hann periodic (torch.hann_window(n_fft))", "power": 1.0, "norm": None,
                "mel_scale": "htk", "f_min": 0.0, "f_max": p["sample_rate"] // 2,
                "stft_center": p["padding"] == "center", "pad_mode": "reflect",
                "same_reflect_pad_each_side": (p["n_fft"] - p["hop_length"]) // 2 if p["padding"] == "same" else 0,
                "log": "natural log of max(mel, 1e-7)"},
        "backbone": {"layer_norm_eps": 1e-6, "embed_kernel": 7, "dwconv_kernel": 7, "gelu": "exact (erf)"},
        "head": {"out_dim": p["n_fft"] + 2, "mag": "exp(out[:n_fft/2+1]) clipped at max 1e2",
                 "phase": "out[n_fft/2+1:], S = mag * (cos p + i sin p)",
                 "istft_window": "hann periodic", "padding": p["padding"],
                 "fraction_of_mags_clipped": clipped},
        "max_abs_diff_f32_vs_f64": {"audio_out": diff_audio, "backbone_out": diff_h, "mel": diff_mel},
        "audio_out_max_abs": float(audio.abs().max()),
    }
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(preset, json.dumps(meta["max_abs_diff_f32_vs_f64"]), "clipped", clipped,
          "frames", frames, "samples", audio.shape[-1], "peak", meta["audio_out_max_abs"])
    for k, v in sd.items():
        print(f"  {k} {list(v.shape)}")


def main():
    torch.set_num_threads(1)
    for preset, p in PRESETS.items():
        make(preset, p)
    total = 0
    for dp, _, files in os.walk(OUT):
        for f in sorted(files):
            s = os.path.getsize(os.path.join(dp, f))
            total += s
            print(f"{os.path.relpath(os.path.join(dp, f), OUT)} {s}")
    print("total bytes", total)


if __name__ == "__main__":
    main()
