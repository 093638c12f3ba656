//! TensorBoard event files: a writer and a reader, with no TensorFlow.
//!
//! A file is a sequence of records (`u64` LE length, `u32` LE masked CRC-32C
//! of those 8 bytes, the data, `u32` LE masked CRC-32C of the data), each a
//! protobuf `tensorboard.Event`. Wall time, step, file version and summary
//! values holding a scalar, an encoded image or an encoded audio clip are
//! supported. Messages are serialised as protobuf's proto3 encoders do, so
//! the files match TensorBoard's Python writer byte for byte.
//!
//! ```no_run
//! use melvae_train::tensorboard::{read_events, EventWriter};
//!
//! let mut tb = EventWriter::create(std::path::Path::new("runs/exp/tb"))?;
//! tb.add_scalar("loss/total", 0.25, 100)?;
//! tb.flush()?;
//! assert_eq!(read_events(tb.path())?.len(), 2);
//! # Ok::<(), melvae_train::Error>(())
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{Error, Result};

/// The `file_version` of the first event of every file.
pub const FILE_VERSION: &str = "brain.Event:2";

/// One event of an events file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub wall_time: f64,
    /// The global step.
    pub step: i64,
    /// `Some` on a file's first event (`brain.Event:2`).
    pub file_version: Option<String>,
    /// The summary values (empty on a file-version event).
    pub values: Vec<Value>,
    /// A `SessionLog` START event (see [`EventWriter::add_session_start`]).
    pub session_start: bool,
}

/// One tagged summary value.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    /// The tag, e.g. `loss/total`.
    pub tag: String,
    /// What the value holds.
    pub data: ValueData,
}

/// What a [`Value`] holds.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueData {
    /// `simple_value`: a scalar.
    Scalar(f32),
    /// `Summary.Image`.
    Image(Image),
    /// `Summary.Audio`.
    Audio(Audio),
    /// A kind this module does not decode (histogram, tensor); not writable.
    Other,
}

/// `Summary.Image`: an encoded (PNG) image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Image {
    /// Height in pixels.
    pub height: i32,
    /// Width in pixels.
    pub width: i32,
    /// Channels: 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA.
    pub colorspace: i32,
    /// `encoded_image_string`: the image file's bytes.
    pub encoded: Vec<u8>,
}

/// `Summary.Audio`: an encoded (WAV) clip.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Audio {
    /// Sample rate in Hz.
    pub sample_rate: f32,
    /// Number of channels.
    pub num_channels: i64,
    /// Length in frames (samples per channel).
    pub length_frames: i64,
    /// `encoded_audio_string`: the audio file's bytes.
    pub encoded: Vec<u8>,
    /// MIME type, e.g. `audio/wav`.
    pub content_type: String,
}

/// Writes one events file; buffered, flushed by [`Self::flush`] and on drop.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` if missing and in it a new file
    /// `events.out.tfevents.<unix seconds>.<hostname>.<pid>.melvae`
    /// (`<pid>.<n>.melvae` if taken), starting with the file-version event.
    pub fn create(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create: {e}")))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH);
        let now = now.unwrap_or_default();
        let (secs, host, pid) = (now.as_secs(), hostname(), std::process::id());
        let stem = format!("events.out.tfevents.{secs:010}.{host}.{pid}");
        for n in 0..1000 {
            let path = match n {
                0 => dir.join(format!("{stem}.melvae")),
                n => dir.join(format!("{stem}.{n}.melvae")),
            };
            match open_new(&path) {
                Ok(file) => return Self::start(path, file, now.as_secs_f64()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::file(path, format!("cannot create: {e}"))),
            }
        }
        Err(Error::file(dir, "no free events file name"))
    }

    /// Creates the new file `path` (never overwriting one) and writes the
    /// file-version event stamped `wall_time`.
    pub fn create_file(path: &Path, wall_time: f64) -> Result<Self> {
        let file = open_new(path).map_err(|e| Error::file(path, format!("cannot create: {e}")))?;
        Self::start(path.to_path_buf(), file, wall_time)
    }

    fn start(path: PathBuf, file: File, wall_time: f64) -> Result<Self> {
        let out = BufWriter::new(file);
        let mut writer = Self { path, out };
        writer.write_record(&encode_event(wall_time, 0, Some(FILE_VERSION), &[])?)?;
        Ok(writer)
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs a scalar (stored as a protobuf `float`) at `step`, stamped now.
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: u64) -> Result<()> {
        self.write_event_at(
            now(),
            step,
            &[value_of(tag, ValueData::Scalar(value as f32))],
        )
    }

    /// Logs a PNG image of `width` x `height` pixels with `channels`
    /// channels at `step`, stamped now.
    pub fn add_image_png(
        &mut self,
        tag: &str,
        png: &[u8],
        width: u32,
        height: u32,
        channels: u32,
        step: u64,
    ) -> Result<()> {
        let int = |what: &str, v: u32| {
            i32::try_from(v).map_err(|_| Error::invalid(format!("image {what}"), v.to_string()))
        };
        let image = Image {
            height: int("height", height)?,
            width: int("width", width)?,
            colorspace: int("channels", channels)?,
            encoded: png.to_vec(),
        };
        self.write_event_at(now(), step, &[value_of(tag, ValueData::Image(image))])
    }

    /// Logs a WAV clip at `step`, stamped now.
    pub fn add_audio_wav(
        &mut self,
        tag: &str,
        wav: &[u8],
        sample_rate: f32,
        num_channels: i64,
        length_frames: i64,
        step: u64,
    ) -> Result<()> {
        let audio = Audio {
            sample_rate,
            num_channels,
            length_frames,
            encoded: wav.to_vec(),
            content_type: "audio/wav".into(),
        };
        self.write_event_at(now(), step, &[value_of(tag, ValueData::Audio(audio))])
    }

    /// Writes one summary event holding `values`, stamped `wall_time`.
    pub fn write_event_at(&mut self, wall_time: f64, step: u64, values: &[Value]) -> Result<()> {
        let step = i64::try_from(step)
            .map_err(|_| Error::invalid("TensorBoard step", format!("{step} exceeds i64")))?;
        self.write_record(&encode_event(wall_time, step, None, values)?)
    }

    /// Marks a (re)start of training at `step` (a `SessionLog` START
    /// event): TensorBoard then discards what earlier files logged at
    /// `step` and after, so a resumed run shows one trajectory. A run
    /// resumed from the checkpoint of step `s` passes `s + 1`.
    pub fn add_session_start(&mut self, step: u64) -> Result<()> {
        let step = i64::try_from(step)
            .map_err(|_| Error::invalid("TensorBoard step", format!("{step} exceeds i64")))?;
        let mut buf = Vec::new();
        put_key(&mut buf, 1, 1);
        buf.extend_from_slice(&now().to_le_bytes());
        put_int(&mut buf, 2, step);
        // Event.session_log (7) = SessionLog { status (1): START (1) }.
        put_len(&mut buf, 7, &[0x08, 0x01]);
        self.write_record(&buf)
    }

    /// Flushes the buffer and syncs the file to disk.
    pub fn flush(&mut self) -> Result<()> {
        let synced = self
            .out
            .flush()
            .and_then(|()| self.out.get_ref().sync_data());
        synced.map_err(|e| Error::file(&self.path, format!("cannot flush: {e}")))
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut head = [0u8; 12];
        head[..8].copy_from_slice(&len);
        head[8..].copy_from_slice(&masked_crc32c(&len).to_le_bytes());
        let tail = masked_crc32c(data).to_le_bytes();
        let written = [&head[..], data, &tail]
            .iter()
            .try_for_each(|b| self.out.write_all(b));
        written.map_err(|e| Error::file(&self.path, format!("cannot write: {e}")))
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

fn value_of(tag: &str, data: ValueData) -> Value {
    let tag = tag.to_string();
    Value { tag, data }
}

fn open_new(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

fn now() -> f64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH);
    since.map_or(0.0, |d| d.as_secs_f64())
}

/// The host name from /etc/hostname or `HOSTNAME`, else `localhost`, made
/// safe for a file name.
fn hostname() -> String {
    let non_empty = |s: String| Some(s.trim().to_string()).filter(|s| !s.is_empty());
    let name = fs::read_to_string("/etc/hostname").ok().and_then(non_empty);
    let name = name.or_else(|| std::env::var("HOSTNAME").ok().and_then(non_empty));
    let safe = |c: char| c.is_alphanumeric() || "-_.".contains(c);
    let name = name.unwrap_or_else(|| "localhost".into());
    name.chars()
        .map(|c| if safe(c) { c } else { '_' })
        .collect()
}

const CRC_TABLE: [u32; 256] = crc_table();

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            // Reflected Castagnoli polynomial, applied when the low bit is set.
            c = (c >> 1) ^ (0x82F6_3B78 & (c & 1).wrapping_neg());
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// CRC-32C (Castagnoli) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    let crc = data.iter().fold(!0u32, |c, &b| {
        CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    });
    !crc
}

/// The masked CRC-32C stored by the record framing.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push(v as u8 | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// A field key; wire types: 0 varint, 1 64-bit, 2 length-delimited, 5 32-bit.
fn put_key(buf: &mut Vec<u8>, field: u32, wire: u32) {
    put_varint(buf, u64::from(field << 3 | wire));
}

fn put_len(buf: &mut Vec<u8>, field: u32, data: &[u8]) {
    put_key(buf, field, 2);
    put_varint(buf, data.len() as u64);
    buf.extend_from_slice(data);
}

// proto3 omits zero / empty singular fields outside a oneof; a set oneof
// member (simple_value, file_version, summary, image, audio) is always written.
fn put_nonempty(buf: &mut Vec<u8>, field: u32, data: &[u8]) {
    if !data.is_empty() {
        put_len(buf, field, data);
    }
}

fn put_int(buf: &mut Vec<u8>, field: u32, v: i64) {
    if v != 0 {
        put_key(buf, field, 0);
        put_varint(buf, v as u64);
    }
}

fn put_f32(buf: &mut Vec<u8>, field: u32, v: f32) {
    put_key(buf, field, 5);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn encode_event(time: f64, step: i64, version: Option<&str>, values: &[Value]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    if time.to_bits() != 0 {
        put_key(&mut buf, 1, 1);
        buf.extend_from_slice(&time.to_le_bytes());
    }
    put_int(&mut buf, 2, step);
    if let Some(version) = version {
        put_len(&mut buf, 3, version.as_bytes());
    } else {
        let mut summary = Vec::new();
        for value in values {
            put_len(&mut summary, 1, &encode_value(value)?);
        }
        put_len(&mut buf, 5, &summary);
    }
    Ok(buf)
}

fn encode_value(value: &Value) -> Result<Vec<u8>> {
    let (mut buf, mut msg) = (Vec::new(), Vec::new());
    put_nonempty(&mut buf, 1, value.tag.as_bytes());
    match &value.data {
        ValueData::Scalar(x) => put_f32(&mut buf, 2, *x),
        ValueData::Image(im) => {
            put_int(&mut msg, 1, im.height.into());
            put_int(&mut msg, 2, im.width.into());
            put_int(&mut msg, 3, im.colorspace.into());
            put_nonempty(&mut msg, 4, &im.encoded);
            put_len(&mut buf, 4, &msg);
        }
        ValueData::Audio(au) => {
            if au.sample_rate.to_bits() != 0 {
                put_f32(&mut msg, 1, au.sample_rate);
            }
            put_int(&mut msg, 2, au.num_channels);
            put_int(&mut msg, 3, au.length_frames);
            put_nonempty(&mut msg, 4, &au.encoded);
            put_nonempty(&mut msg, 5, au.content_type.as_bytes());
            put_len(&mut buf, 6, &msg);
        }
        ValueData::Other => {
            let reason = format!("`{}`: this kind cannot be written", value.tag);
            return Err(Error::invalid("TensorBoard value", reason));
        }
    }
    Ok(buf)
}

/// Reads every event of an events file, checking both CRCs of each record.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let (mut events, mut pos) = (Vec::new(), 0);
    while pos < bytes.len() {
        let bad = |what: String| Error::file(path, format!("record at byte offset {pos}: {what}"));
        let rest = &bytes[pos..];
        let Some((len, _)) = rest.split_first_chunk::<8>().filter(|_| rest.len() >= 12) else {
            return Err(bad(format!("truncated header ({} bytes)", rest.len())));
        };
        check_crc(&rest[8..12], len).map_err(|e| bad(format!("length {e}")))?;
        let len = u64::from_le_bytes(*len);
        let len = match usize::try_from(len) {
            Ok(n) if n.checked_add(16).is_some_and(|end| end <= rest.len()) => n,
            _ => return Err(bad(format!("truncated record of {len} data bytes"))),
        };
        let data = &rest[12..12 + len];
        check_crc(&rest[12 + len..], data).map_err(|e| bad(format!("data {e}")))?;
        events.push(decode_event(data).map_err(|e| bad(format!("bad Event protobuf: {e}")))?);
        pos += 16 + len;
    }
    Ok(events)
}

fn check_crc(stored: &[u8], data: &[u8]) -> std::result::Result<(), String> {
    let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
    let computed = masked_crc32c(data);
    let msg = || format!("CRC mismatch (stored {stored:#010x}, computed {computed:#010x})");
    (stored == computed).then_some(()).ok_or_else(msg)
}

type PbResult<T> = std::result::Result<T, &'static str>;

/// One protobuf field's payload, by wire type.
enum Field<'a> {
    Varint(u64),
    I64([u8; 8]),
    Len(&'a [u8]),
    I32([u8; 4]),
}

fn varint(buf: &mut &[u8]) -> PbResult<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first().ok_or("truncated varint")?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes")
}

fn chunk<const N: usize>(buf: &mut &[u8]) -> PbResult<[u8; N]> {
    let (head, rest) = buf.split_first_chunk::<N>().ok_or("truncated field")?;
    *buf = rest;
    Ok(*head)
}

/// Calls `visit` with each field number and payload of a message; a field
/// the visitor does not match is thereby skipped.
fn fields<'a>(
    mut buf: &'a [u8],
    mut visit: impl FnMut(u64, Field<'a>) -> PbResult<()>,
) -> PbResult<()> {
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let field = match key & 7 {
            0 => Field::Varint(varint(&mut buf)?),
            1 => Field::I64(chunk(&mut buf)?),
            2 => {
                let len = usize::try_from(varint(&mut buf)?).map_err(|_| "bad length")?;
                let bytes = buf.get(..len).ok_or("truncated field")?;
                buf = &buf[len..];
                Field::Len(bytes)
            }
            5 => Field::I32(chunk(&mut buf)?),
            _ => return Err("unsupported wire type (group or invalid)"),
        };
        visit(key >> 3, field)?;
    }
    Ok(())
}

fn utf8(bytes: &[u8]) -> PbResult<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| "string is not UTF-8")
}

fn decode_event(data: &[u8]) -> PbResult<Event> {
    let mut event = Event::default();
    fields(data, |number, field| {
        match (number, field) {
            (1, Field::I64(b)) => event.wall_time = f64::from_le_bytes(b),
            (2, Field::Varint(v)) => event.step = v as i64,
            (3, Field::Len(b)) => event.file_version = Some(utf8(b)?),
            (5, Field::Len(b)) => fields(b, |number, field| {
                if let (1, Field::Len(b)) = (number, field) {
                    event.values.push(decode_value(b)?);
                }
                Ok(())
            })?,
            (7, Field::Len(b)) => fields(b, |number, field| {
                if let (1, Field::Varint(1)) = (number, field) {
                    event.session_start = true;
                }
                Ok(())
            })?,
            _ => {}
        }
        Ok(())
    })?;
    Ok(event)
}

fn decode_value(data: &[u8]) -> PbResult<Value> {
    let mut value = value_of("", ValueData::Other);
    fields(data, |number, field| {
        match (number, field) {
            (1, Field::Len(b)) => value.tag = utf8(b)?,
            (2, Field::I32(b)) => value.data = ValueData::Scalar(f32::from_le_bytes(b)),
            (4, Field::Len(b)) => {
                let mut im = Image::default();
                fields(b, |number, field| {
                    match (number, field) {
                        (1, Field::Varint(v)) => im.height = v as i32,
                        (2, Field::Varint(v)) => im.width = v as i32,
                        (3, Field::Varint(v)) => im.colorspace = v as i32,
                        (4, Field::Len(b)) => im.encoded = b.to_vec(),
                        _ => {}
                    }
                    Ok(())
                })?;
                value.data = ValueData::Image(im);
            }
            (6, Field::Len(b)) => {
                let mut au = Audio::default();
                fields(b, |number, field| {
                    match (number, field) {
                        (1, Field::I32(b)) => au.sample_rate = f32::from_le_bytes(b),
                        (2, Field::Varint(v)) => au.num_channels = v as i64,
                        (3, Field::Varint(v)) => au.length_frames = v as i64,
                        (4, Field::Len(b)) => au.encoded = b.to_vec(),
                        (5, Field::Len(b)) => au.content_type = utf8(b)?,
                        _ => {}
                    }
                    Ok(())
                })?;
                value.data = ValueData::Audio(au);
            }
            // Histograms and tensors: the other members of the `value` oneof.
            (3 | 5 | 8, _) => value.data = ValueData::Other,
            _ => {}
        }
        Ok(())
    })?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value as Json};

    /// The Python-written events file and expected.json.
    fn fixture() -> (PathBuf, Json) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard");
        let json: Json =
            serde_json::from_slice(&fs::read(dir.join("expected.json")).unwrap()).unwrap();
        (dir.join(json["file"].as_str().unwrap()), json)
    }

    /// An event in expected.json's form.
    fn to_json(e: &Event) -> Json {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let values: Vec<Json> = e
            .values
            .iter()
            .map(|v| match &v.data {
                ValueData::Scalar(x) => {
                    json!({"tag": v.tag, "kind": "scalar", "value": f64::from(*x)})
                }
                ValueData::Image(im) => json!({"tag": v.tag, "kind": "image", "height": im.height,
                "width": im.width, "colorspace": im.colorspace, "png_len": im.encoded.len(),
                "png_hex": hex(&im.encoded)}),
                ValueData::Audio(au) => json!({"tag": v.tag, "kind": "audio",
                "sample_rate": f64::from(au.sample_rate), "num_channels": au.num_channels,
                "length_frames": au.length_frames, "content_type": au.content_type,
                "wav_len": au.encoded.len(), "wav_hex": hex(&au.encoded)}),
                ValueData::Other => json!({"tag": v.tag, "kind": "other"}),
            })
            .collect();
        json!({"wall_time": e.wall_time, "step": e.step, "file_version": e.file_version,
            "values": values})
    }

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn reads_the_python_written_fixture() {
        let (path, expected) = fixture();
        let events: Vec<Json> = read_events(&path).unwrap().iter().map(to_json).collect();
        assert_eq!(events.len(), 7);
        assert_eq!(Json::from(events), expected["events"]);
    }

    #[test]
    fn writes_the_fixture_byte_for_byte() {
        // The input is what `reads_the_python_written_fixture` checks
        // against expected.json.
        let (path, _) = fixture();
        let events = read_events(&path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("events.out.tfevents.x");
        let mut w = EventWriter::create_file(&out, events[0].wall_time).unwrap();
        for e in &events[1..] {
            w.write_event_at(e.wall_time, e.step as u64, &e.values)
                .unwrap();
        }
        drop(w); // drop flushes
        assert_eq!(fs::read(&out).unwrap(), fs::read(&path).unwrap());
        assert!(
            EventWriter::create_file(&out, 0.0).is_err(),
            "never overwrites"
        );
    }

    #[test]
    fn session_start_is_a_session_log_start_event() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.out.tfevents.1.test");
        let mut w = EventWriter::create_file(&p, 1.0).unwrap();
        w.add_session_start(21).unwrap();
        w.add_scalar("x", 1.0, 21).unwrap();
        w.flush().unwrap();
        let events = read_events(&p).unwrap();
        assert!(events[1].session_start && events[1].step == 21 && events[1].values.is_empty());
        assert!(!events[2].session_start);
        // Event field 7 (session_log), length 2: SessionLog { status: START }.
        let bytes = std::fs::read(&p).unwrap();
        assert!(bytes.windows(4).any(|b| b == [0x3a, 0x02, 0x08, 0x01]));
    }

    #[test]
    fn round_trip_through_create() {
        let dir = tempfile::tempdir().unwrap();
        let logdir = dir.path().join("run/tb");
        let mut w = EventWriter::create(&logdir).unwrap();
        w.add_scalar("loss/total", 0.5, 10).unwrap();
        w.add_image_png("mel", b"png", 640, 80, 3, 12).unwrap();
        w.add_audio_wav("audio", b"wav", 24_000.0, 2, 48_000, 1 << 40)
            .unwrap();
        w.flush().unwrap();
        let name = w.path().file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("events.out.tfevents.") && name.ends_with(".melvae"));
        assert!(name.contains(&format!(".{}.", std::process::id())));
        let w2 = EventWriter::create(&logdir).unwrap();
        assert_ne!(w2.path(), w.path(), "a second writer gets a new file");

        let events = read_events(w.path()).unwrap();
        assert_eq!(events[0].file_version.as_deref(), Some(FILE_VERSION));
        assert!(events[0].wall_time > 1.6e9 && events[0].values.is_empty());
        let got: Vec<Json> = events[1..]
            .iter()
            .map(|e| json!([e.step, to_json(e)["values"]]))
            .collect();
        let want = json!([
            [10, [{"tag": "loss/total", "kind": "scalar", "value": 0.5}]],
            [12, [{"tag": "mel", "kind": "image", "height": 80, "width": 640, "colorspace": 3,
                "png_len": 3, "png_hex": "706e67"}]],
            [1u64 << 40, [{"tag": "audio", "kind": "audio", "sample_rate": 24000.0,
                "num_channels": 2, "length_frames": 48000, "content_type": "audio/wav",
                "wav_len": 3, "wav_hex": "776176"}]],
        ]);
        assert_eq!(Json::from(got), want);
    }

    #[test]
    fn bad_crc_and_truncation_name_the_offset() {
        let good = fs::read(fixture().0).unwrap();
        let mut starts = vec![0];
        while let Some(&at) = starts.last().filter(|&&at| at < good.len()) {
            starts
                .push(at + 16 + u64::from_le_bytes(good[at..at + 8].try_into().unwrap()) as usize);
        }
        let (second, last) = (starts[1], starts[starts.len() - 2]);
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.tfevents");
        let check = |bytes: &[u8], want: String| {
            fs::write(&bad, bytes).unwrap();
            let msg = read_events(&bad).unwrap_err().to_string();
            assert!(msg.starts_with(&bad.display().to_string()), "{msg}");
            assert!(
                msg.contains(&format!("record at byte offset {want}")),
                "{msg}"
            );
        };
        let mut flipped = good.clone();
        flipped[second + 14] ^= 0x01;
        check(&flipped, format!("{second}: data CRC mismatch"));
        flipped[second] ^= 0x40;
        check(&flipped, format!("{second}: length CRC mismatch"));
        check(&good[..good.len() - 3], format!("{last}: truncated record"));
        check(&good[..last + 5], format!("{last}: truncated header"));
    }

    #[test]
    fn skips_unknown_fields_and_kinds() {
        let (mut histo, mut scalar, mut summary, mut event) = (vec![], vec![], vec![], vec![]);
        put_len(&mut histo, 1, b"h");
        put_len(&mut histo, 9, b"\x0a\x00"); // metadata
        put_len(&mut histo, 5, &[9, 0, 0, 0, 0, 0, 0, 0, 0]); // histo
        put_key(&mut histo, 77, 5);
        histo.extend_from_slice(&[1, 2, 3, 4]);
        put_len(
            &mut scalar,
            4,
            &[8, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x48, 0xac, 0x02],
        );
        put_len(&mut scalar, 7, b"node");
        put_f32(&mut scalar, 2, 1.5); // the last oneof member wins
        put_len(&mut summary, 1, &histo);
        put_len(&mut summary, 1, &scalar);
        put_int(&mut summary, 2, 5);
        put_key(&mut event, 1, 1);
        event.extend_from_slice(&2.5f64.to_le_bytes());
        put_int(&mut event, 2, -7);
        put_len(&mut event, 10, b"\x0a\x03abc"); // source_metadata
        put_key(&mut event, 99, 1);
        event.extend_from_slice(&[0; 8]);
        put_len(&mut event, 5, &summary);
        let decoded = decode_event(&event).unwrap();
        assert_eq!((decoded.wall_time, decoded.step), (2.5, -7));
        assert_eq!(decoded.values[0], value_of("h", ValueData::Other));
        assert_eq!(decoded.values[1], value_of("", ValueData::Scalar(1.5)));
        assert!(decode_event(&event[..event.len() - 1]).is_err());
        assert!(decode_event(&[0x0b]).is_err(), "group wire type");
        let err = encode_event(0.0, 0, None, &decoded.values).unwrap_err();
        assert!(err.to_string().contains("`h`"), "{err}");
    }
}
