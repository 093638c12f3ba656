#!/usr/bin/env python3
"""Writes the `.pt` fixtures of melvae-train's reader of the Echolancer
seed's data format (one `torch.save`d dict per example).

Run by hand, never by tests:

    /tmp/refvenv/bin/pip install torch==2.15.0
    /tmp/refvenv/bin/python tools/make_echolancer_fixtures.py

Writes crates/melvae-train/tests/fixtures/echolancer/:

- `full.pt`: `text` int64 [5], `mel` int64 [7], `speaker` a Python int (1),
  `emotion` float32 [4] — every key, as the seed's README example;
- `tensor_speaker.pt`: `speaker` as a 0-d int64 tensor (2), no `emotion`;
- `no_speaker.pt`: only `text` and `mel` (int32 here, a 2-D `mel` [1, 6]
  that the reader flattens);
- `no_mel.pt`: `text` and `speaker` only (an error naming `mel`);
- `negative.pt`: a negative token id (an error naming `text`);
- `truncated.pt`: the first 200 bytes of `full.pt` (an error naming the
  file).

The expected values are written into the test itself
(crates/melvae-train/tests/echolancer_data.rs).
"""

import os

import torch

OUT = os.path.join(
    os.path.dirname(__file__), "..", "crates", "melvae-train", "tests", "fixtures", "echolancer"
)


def save(name, obj):
    torch.save(obj, os.path.join(OUT, name))


def main():
    os.makedirs(OUT, exist_ok=True)
    save(
        "full.pt",
        {
            "text": torch.tensor([3, 1, 4, 1, 5], dtype=torch.int64),
            "mel": torch.tensor([9, 2, 6, 5, 3, 5, 8], dtype=torch.int64),
            "speaker": 1,
            "emotion": torch.tensor([0.5, -1.25, 2.0, 0.0], dtype=torch.float32),
        },
    )
    save(
        "tensor_speaker.pt",
        {
            "text": torch.tensor([2, 7], dtype=torch.int64),
            "mel": torch.tensor([1, 1, 2], dtype=torch.int64),
            "speaker": torch.tensor(2),
        },
    )
    save(
        "no_speaker.pt",
        {
            "text": torch.tensor([6, 6, 6], dtype=torch.int32),
            "mel": torch.tensor([[4, 3, 2, 1, 0, 7]], dtype=torch.int32),
        },
    )
    save("no_mel.pt", {"text": torch.tensor([1, 2]), "speaker": 0})
    save("negative.pt", {"text": torch.tensor([1, -2]), "mel": torch.tensor([1]), "speaker": 0})
    with open(os.path.join(OUT, "full.pt"), "rb") as f:
        head = f.read(200)
    with open(os.path.join(OUT, "truncated.pt"), "wb") as f:
        f.write(head)


if __name__ == "__main__":
    main()
