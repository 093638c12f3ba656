//! Text-to-speech data for Echolancer: a folder of audio + transcript
//! pairs turned into token shards with a trained mel VQ-VAE
//! ([`prepare_tts_folder`], the `prepare_tts` program), and a small random
//! dataset for trying the pipeline ([`write_dummy_tts`], the seed's
//! `--create_dummy`).
//!
//! Both write `tokens.safetensors` (examples with `text` ids, `speakers`,
//! the codes), `symbols.json` (the character vocabulary: text id = index +
//! 2) and `speakers.json` (speaker names by id) into one folder, which an
//! `echolancer` config names as `data.tokens`.

use std::path::{Path, PathBuf};

use melvae_dsp::SplitMix64;
use melvae_models::echolancer::{CharTokenizer, UnknownChars};

use crate::tokens::{
    class_folders, encode_file, folder_names, mono_at, write_json_list, write_shard_dir,
    TokenExample, SPEAKERS_FILE, SYMBOLS_FILE,
};
use crate::{Error, Result};

/// The files a TTS data folder holds.
const TTS_FILES: [&str; 3] = ["tokens.safetensors", SYMBOLS_FILE, SPEAKERS_FILE];

/// Refuses an output folder that exists and is not empty, unless
/// `overwrite` and it holds nothing but TTS data (the files this module
/// writes): data is never written over anything else.
fn check_fresh(out: &Path, overwrite: bool) -> Result<()> {
    let entries: Vec<String> = match std::fs::read_dir(out) {
        Ok(d) => d
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect(),
        Err(_) => return Ok(()),
    };
    if entries.is_empty() {
        return Ok(());
    }
    if !overwrite {
        return Err(Error::file(
            out,
            "exists and is not empty; TTS data is written only into a fresh folder \
             (choose another -o, or --overwrite to replace TTS data there)",
        ));
    }
    if let Some(other) = entries.iter().find(|e| !TTS_FILES.contains(&e.as_str())) {
        return Err(Error::file(
            out,
            format!("holds {other}, which is not TTS data: --overwrite replaces only TTS data"),
        ));
    }
    Ok(())
}

/// Writes the shard of `examples`, `symbols.json` and `speakers.json` into
/// a temporary folder beside `out`, then renames it to `out` (an absent or
/// empty folder): a run never sees a shard without its vocabulary.
fn write_tts_dir(
    out: &Path,
    examples: &[TokenExample],
    symbols: &[String],
    speakers: &[String],
    overwrite: bool,
) -> Result<PathBuf> {
    check_fresh(out, overwrite)?;
    let name = out
        .file_name()
        .map_or_else(|| "tts".into(), |n| n.to_string_lossy().into_owned());
    let tmp = out.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    write_shard_dir(&tmp, examples)?;
    write_json_list(&tmp.join(SYMBOLS_FILE), symbols)?;
    write_json_list(&tmp.join(SPEAKERS_FILE), speakers)?;
    if out.exists() {
        for f in TTS_FILES {
            let p = out.join(f);
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| Error::file(&p, e))?;
            }
        }
        std::fs::remove_dir(out).map_err(|e| Error::file(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::file(out, e))?;
    Ok(out.join("tokens.safetensors"))
}

/// What [`prepare_tts_folder`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareSummary {
    /// Speaker names (sub-folders), index = speaker id.
    pub speakers: Vec<String>,
    /// Examples written per speaker.
    pub counts: Vec<usize>,
    /// The character vocabulary written to `symbols.json`.
    pub symbols: Vec<String>,
    /// Characters outside a given vocabulary (mapped to the unknown id).
    pub unknown: UnknownChars,
    /// Files skipped, with the reason (no transcript, unreadable, too
    /// short, empty transcript).
    pub skipped: Vec<(PathBuf, String)>,
    /// The shard written.
    pub shard: PathBuf,
}

/// Turns `dir` — one sub-folder per speaker (sorted names give the ids),
/// each audio file with its transcript in a `.txt` file of the same stem
/// beside it — into `out/tokens.safetensors`, `out/symbols.json` and
/// `out/speakers.json`: the audio is decoded to mono at the model's rate
/// and encoded by the mel VQ-VAE `model` (rows of `cols` codes), the
/// transcript (trimmed) to character ids with `symbols` when given (other
/// characters become the unknown id and are counted) or with the sorted
/// character set of all transcripts. Files without a transcript, unreadable
/// or too short are skipped and listed; no usable pair is an error naming
/// `dir`. `out` must be absent or empty, or with `overwrite` hold nothing
/// but TTS data: the three files appear together (written beside it, then
/// renamed), never over anything else.
pub fn prepare_tts_folder(
    model: &melvae_models::MelVqVae,
    dir: &Path,
    out: &Path,
    symbols: Option<&[String]>,
    overwrite: bool,
) -> Result<PrepareSummary> {
    check_fresh(out, overwrite)?;
    let speakers = class_folders(dir)?;
    let opts = mono_at(model.mel_config().sample_rate);
    let mut pairs = Vec::new();
    let mut counts = vec![0usize; speakers.len()];
    let mut skipped = Vec::new();
    for (id, folder) in speakers.iter().enumerate() {
        for file in melvae_dsp::discover_audio(folder)? {
            let txt = file.with_extension("txt");
            let text = match std::fs::read_to_string(&txt) {
                Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
                Ok(_) => {
                    skipped.push((file, format!("{} is empty", txt.display())));
                    continue;
                }
                Err(e) => {
                    skipped.push((file, format!("no transcript {} ({e})", txt.display())));
                    continue;
                }
            };
            match encode_file(model, &file, &opts) {
                Ok(codes) => {
                    pairs.push((id as u32, text, codes));
                    counts[id] += 1;
                }
                Err(e) => skipped.push((file, e)),
            }
        }
    }
    if pairs.is_empty() {
        return Err(Error::file(
            dir,
            "no audio file with a transcript could be tokenized",
        ));
    }
    let tokenizer = match symbols {
        Some(s) => CharTokenizer::new(s)?,
        None => CharTokenizer::from_corpus(pairs.iter().map(|(_, t, _)| t.as_str())),
    };
    let mut unknown = UnknownChars::new();
    let examples: Vec<TokenExample> = pairs
        .into_iter()
        .map(|(speaker, text, codes)| {
            let (ids, unk) = tokenizer.encode(&text);
            for (c, n) in unk {
                *unknown.entry(c).or_default() += n;
            }
            TokenExample {
                codes,
                label: None,
                speaker: Some(speaker),
                text: Some(ids),
                cond: None,
            }
        })
        .collect();
    let names = folder_names(&speakers);
    let shard = write_tts_dir(out, &examples, &tokenizer.symbols(), &names, overwrite)?;
    Ok(PrepareSummary {
        speakers: names,
        counts,
        symbols: tokenizer.symbols(),
        unknown,
        skipped,
        shard,
    })
}

/// What [`write_dummy_tts`] makes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DummyTts {
    /// Examples.
    pub examples: usize,
    /// Speakers (ids drawn below this).
    pub speakers: usize,
    /// Spectrogram tokens (drawn below this).
    pub mel_vocab_size: usize,
    /// Codes per token row.
    pub cols: usize,
    /// Size of an emotion vector per example (0: none).
    pub emotion_channels: usize,
    /// Seed of the draws.
    pub seed: u64,
}

/// Writes a random TTS dataset into `out` (absent or empty: nothing is
/// overwritten): `examples` sentences of 2-6 words of
/// lower-case letters (the vocabulary `a`-`z` and space), each with 2-8
/// random token rows, a random speaker, and a standard-normal emotion
/// vector when asked. For trying the pipeline, as the seed's
/// `--create_dummy`; it teaches nothing.
pub fn write_dummy_tts(out: &Path, d: &DummyTts) -> Result<PathBuf> {
    check_fresh(out, false)?;
    if d.examples == 0 || d.speakers == 0 || d.mel_vocab_size == 0 || d.cols == 0 {
        return Err(Error::invalid(
            "dummy dataset",
            "needs examples, speakers, a token vocabulary and row width > 0",
        ));
    }
    let symbols: Vec<String> = (b'a'..=b'z')
        .map(|c| (c as char).to_string())
        .chain([" ".to_string()])
        .collect();
    let tokenizer = CharTokenizer::new(&symbols)?;
    let mut rng = SplitMix64::new(d.seed);
    let mut below = |n: usize| (rng.next_u64() % n as u64) as usize;
    let mut examples = Vec::with_capacity(d.examples);
    for _ in 0..d.examples {
        let words: Vec<String> = (0..2 + below(5))
            .map(|_| {
                (0..1 + below(6))
                    .map(|_| (b'a' + below(26) as u8) as char)
                    .collect()
            })
            .collect();
        let (text, _) = tokenizer.encode(&words.join(" "));
        let codes = (0..2 + below(7))
            .map(|_| {
                (0..d.cols)
                    .map(|_| below(d.mel_vocab_size) as u32)
                    .collect()
            })
            .collect();
        examples.push(TokenExample {
            codes,
            label: None,
            speaker: Some(below(d.speakers) as u32),
            text: Some(text),
            cond: None,
        });
    }
    if d.emotion_channels > 0 {
        let mut normal = SplitMix64::new(d.seed ^ 0xE307);
        for e in &mut examples {
            e.cond = Some(
                (0..d.emotion_channels)
                    .map(|_| normal.normal() as f32)
                    .collect(),
            );
        }
    }
    let names: Vec<String> = (0..d.speakers).map(|i| format!("speaker{i}")).collect();
    write_tts_dir(out, &examples, &symbols, &names, false)
}
