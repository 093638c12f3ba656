#!/usr/bin/env python3
"""Writes the TensorBoard event-file fixture of melvae-train's tensorboard
tests, and checks event files with TensorBoard's own reader.

Run by hand, never by tests, in a virtualenv outside the repository
(TensorBoard's writer and reader need no TensorFlow):

    python3 -m venv /tmp/tbvenv
    /tmp/tbvenv/bin/pip install tensorboard==2.21.0 protobuf==7.36.2
    /tmp/tbvenv/bin/python tools/make_tensorboard_fixture.py
    /tmp/tbvenv/bin/python tools/make_tensorboard_fixture.py --check FILE_OR_DIR

Made with tensorboard 2.21.0, protobuf 7.36.2 (upb backend), Python 3.11.7.

The events are built with TensorBoard's own protobuf classes
(`tensorboard.compat.proto.event_pb2` / `summary_pb2`) and framed by its
`RecordWriter`. `EventFileWriter` is not used because it stamps the first
event with the current time and adds `source_metadata`; here every wall time
is fixed so that the Rust writer can reproduce the file byte for byte.

Outputs, under crates/melvae-train/tests/fixtures/tensorboard/:
- events.out.tfevents.1700000000.fixture: the events file;
- expected.json: every event's wall time, step, file version and values,
  with the PNG and WAV bytes as hex.
"""
import argparse
import io
import json
import math
import os
import struct
import sys
import wave
import zlib

OUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..", "crates", "melvae-train", "tests", "fixtures", "tensorboard",
)
EVENTS_NAME = "events.out.tfevents.1700000000.fixture"
BASE_TIME = 1700000000.125


def f32(x):
    """The float32 nearest to x, as a Python float (what the file stores)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def make_png(width=4, height=3):
    """A tiny deterministic RGB PNG (8 bits per channel, no filtering)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    raw = b""
    for y in range(height):
        raw += b"\x00"  # filter type: none
        for x in range(width):
            raw += bytes([(x * 80) % 256, (y * 120) % 256, ((x + y) * 40) % 256])
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def make_wav(sample_rate=8000, frames=64):
    """A short deterministic 16-bit mono WAV: a 440 Hz sine at half scale."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        samples = [round(16000 * math.sin(2 * math.pi * 440 * n / sample_rate))
                   for n in range(frames)]
        w.writeframes(struct.pack("<%dh" % frames, *samples))
    return buf.getvalue()


def write_fixture():
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    png = make_png()
    wav = make_wav()
    # (wall_time, step, file_version or None, [value spec]); a value spec is
    # ("scalar", tag, x), ("image", tag, png) or ("audio", tag, wav).
    plan = [
        (BASE_TIME, 0, "brain.Event:2", []),
        (BASE_TIME + 1.5, 1, None, [("scalar", "loss/total", 2.5), ("scalar", "lr", 1e-3)]),
        (BASE_TIME + 2.75, 2, None, [("scalar", "loss/total", 1.25), ("scalar", "loss/zero", 0.0)]),
        (BASE_TIME + 4.0, 3, None, [("scalar", "loss/total", 0.1), ("scalar", "lr", 5e-4),
                                    ("scalar", "grad/min", -3.0)]),
        (BASE_TIME + 5.0625, 3, None, [("image", "spec/mel", png)]),
        (BASE_TIME + 6.5, 3, None, [("audio", "audio/sample", wav)]),
        (BASE_TIME + 1e6, 1_000_000_000_000, None, [("scalar", "lr", 1e-6)]),
    ]

    os.makedirs(OUT, exist_ok=True)
    expected = {"file": EVENTS_NAME, "events": []}
    with open(os.path.join(OUT, EVENTS_NAME), "wb") as f:
        writer = RecordWriter(f)
        for wall_time, step, file_version, specs in plan:
            event = event_pb2.Event(wall_time=wall_time, step=step)
            record = {"wall_time": wall_time, "step": step,
                      "file_version": file_version, "values": []}
            if file_version is not None:
                event.file_version = file_version
            else:
                summary = summary_pb2.Summary()
                for kind, tag, payload in specs:
                    if kind == "scalar":
                        summary.value.add(tag=tag, simple_value=payload)
                        record["values"].append(
                            {"tag": tag, "kind": "scalar", "value": f32(payload)})
                    elif kind == "image":
                        image = summary_pb2.Summary.Image(
                            height=3, width=4, colorspace=3, encoded_image_string=payload)
                        summary.value.add(tag=tag, image=image)
                        record["values"].append(
                            {"tag": tag, "kind": "image", "height": 3, "width": 4,
                             "colorspace": 3, "png_len": len(payload),
                             "png_hex": payload.hex()})
                    else:
                        audio = summary_pb2.Summary.Audio(
                            sample_rate=8000.0, num_channels=1, length_frames=64,
                            encoded_audio_string=payload, content_type="audio/wav")
                        summary.value.add(tag=tag, audio=audio)
                        record["values"].append(
                            {"tag": tag, "kind": "audio", "sample_rate": 8000.0,
                             "num_channels": 1, "length_frames": 64,
                             "content_type": "audio/wav", "wav_len": len(payload),
                             "wav_hex": payload.hex()})
                event.summary.CopyFrom(summary)
            writer.write(event.SerializeToString())
            expected["events"].append(record)
        writer.flush()
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    print("wrote", os.path.normpath(OUT))


def check(target):
    """Prints what TensorBoard's own readers find in an events file or a run
    directory; raises on a bad CRC or an unreadable record."""
    from tensorboard.backend.event_processing import event_accumulator, event_file_loader

    if os.path.isdir(target):
        files = sorted(os.path.join(target, n) for n in os.listdir(target) if "tfevents" in n)
    else:
        files = [target]
    if not files:
        sys.exit("no events file in %s" % target)
    for path in files:
        print("== raw events of", path)
        for ev in event_file_loader.LegacyEventFileLoader(path).Load():
            what = ev.WhichOneof("what")
            if what == "file_version":
                print("  wall_time=%.6f step=%d file_version=%r" % (ev.wall_time, ev.step, ev.file_version))
            else:
                print("  wall_time=%.6f step=%d %s" % (ev.wall_time, ev.step, what))
                for v in ev.summary.value:
                    kind = v.WhichOneof("value")
                    if kind == "simple_value":
                        detail = repr(v.simple_value)
                    elif kind == "image":
                        detail = "height=%d width=%d colorspace=%d bytes=%d" % (
                            v.image.height, v.image.width, v.image.colorspace,
                            len(v.image.encoded_image_string))
                    elif kind == "audio":
                        detail = "sample_rate=%g num_channels=%d length_frames=%d type=%s bytes=%d" % (
                            v.audio.sample_rate, v.audio.num_channels, v.audio.length_frames,
                            v.audio.content_type, len(v.audio.encoded_audio_string))
                    else:
                        detail = ""
                    print("    %s %s %s" % (v.tag, kind, detail))

    acc = event_accumulator.EventAccumulator(
        target, size_guidance=event_accumulator.STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    tags = acc.Tags()
    print("== EventAccumulator of", target)
    for tag in tags["scalars"]:
        for s in acc.Scalars(tag):
            print("  scalar %s step=%d wall_time=%.6f value=%r" % (tag, s.step, s.wall_time, s.value))
    for tag in tags["images"]:
        for im in acc.Images(tag):
            ok = im.encoded_image_string.startswith(b"\x89PNG\r\n\x1a\n")
            print("  image %s step=%d %dx%d bytes=%d png_signature=%s"
                  % (tag, im.step, im.width, im.height, len(im.encoded_image_string), ok))
    for tag in tags["audio"]:
        for au in acc.Audio(tag):
            with wave.open(io.BytesIO(au.encoded_audio_string)) as w:
                parsed = "wav: %d ch, %d Hz, %d frames" % (w.getnchannels(), w.getframerate(), w.getnframes())
            print("  audio %s step=%d sample_rate=%g frames=%d type=%s bytes=%d (%s)"
                  % (tag, au.step, au.sample_rate, au.length_frames,
                     au.content_type, len(au.encoded_audio_string), parsed))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", metavar="FILE_OR_DIR",
                        help="read an events file (or run directory) with TensorBoard's reader")
    args = parser.parse_args()
    if args.check:
        check(args.check)
    else:
        write_fixture()


if __name__ == "__main__":
    main()
