//! The main job: trains the tiny mel VAE on the bundled speech corpus
//! (assets/speech: 54 espeak-ng voices in 17 languages, made by
//! tools/make_assets.sh), then reconstructs the held-out clips, spoken by
//! voices training never heard, and prints their log-mel L1 and harmonic
//! detail next to a baseline (each clip's mean mel).
//!
//! ```text
//! cargo run --release --example quickstart [-- key=value ...] [--vocoder VOCOS.safetensors]
//!     [--eval-only] [--eval-dir DIR] [--sample-steps N] [--temperature T] [--guidance G]
//! ```
//!
//! Writes the run to runs/quickstart/ (replacing an earlier one) and, in
//! runs/quickstart/eval/, for each held-out clip: the original
//! (`*_original.wav`), the reconstruction through Griffin-Lim
//! (`*_recon_griffin_lim.wav`), the input's own log-mel through Griffin-Lim
//! (`*_input_griffin_lim.wav`: what a perfect model would sound like through
//! it), and a PNG with the input's log-mel above the reconstruction's; an
//! `index.html` lays them side by side with audio players, and
//! `summary.json` holds the numbers. With `--vocoder` (a Vocos model file on
//! the `vocos-24k` features: `convert`'s output, or `export` of a run of
//! configs/settings/vocos_tiny.yaml), each clip is also vocoded with it
//! (`*_recon_vocos.wav`, `*_input_vocos.wav`) and the DAC mel distance of
//! both audios to the original is printed side by side.
//!
//! `--eval-only` skips training and evaluates runs/quickstart's model file
//! again, e.g. at other sampling settings (`--sample-steps`,
//! `--temperature`, `--guidance`; the defaults are the tuned ones of
//! docs/models/mel_vae.md). `--eval-dir DIR` evaluates every audio file
//! under DIR (your own voices; a first-level folder is a voice) instead of
//! the held-out split.

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device};
use melvae::dsp::{save_wav, Audio, MelConfig, MelExtractor, SpectrogramImage, WavFormat};
use melvae::models::eval::{harmonic_detail, MelToAudio, Metrics, HARMONIC_MAX_HZ};
use melvae::models::{mel_to_array, MelVae, SampleOptions};
use melvae::train::run::{export, open_run, read_run_config, Start, Weights, Which};
use melvae::train::tasks::{check_config, train as train_run, TrainData};
use melvae::train::{AudioDataConfig, AudioFolder, ResolvedConfig, SplitBy, TrainerConfig};
use rayon::prelude::*;

struct Args {
    overrides: Vec<String>,
    vocoder: Option<PathBuf>,
    eval_only: bool,
    eval_dir: Option<PathBuf>,
    /// Sampling steps, guidance and temperature (`None`: the model's
    /// `cfm.reconstruction_temperature`): `common::mel_sampling`.
    sample_steps: usize,
    guidance: f64,
    temperature: Option<f64>,
}

/// `--help`, with the sampling defaults of [`SampleOptions::default`] (the
/// temperature is the model's).
fn usage() -> String {
    let d = SampleOptions::default();
    format!(
        "\
Trains the tiny mel VAE on the bundled speech (configs/settings/tiny.yaml),
then reconstructs held-out voices and compares them with a baseline.

usage: cargo run --release --example quickstart -- [key=value ...] [options]

options:
  --vocoder FILE      also vocode with this Vocos model file (vocos-24k features)
  --eval-only         evaluate runs/quickstart again without training
  --eval-dir DIR      evaluate the voices under DIR instead of the held-out split
  --sample-steps N    flow-matching steps (default {})
  --temperature T     sampling temperature (default: the model's
                      cfm.reconstruction_temperature)
  --guidance G        classifier-free guidance scale (default {})
  key=value           config overrides, e.g. training.steps=800
Outputs: runs/quickstart/eval/index.html, summary.json, WAVs and PNGs.
",
        d.num_steps, d.guidance_scale
    )
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        overrides: Vec::new(),
        vocoder: None,
        eval_only: false,
        eval_dir: None,
        sample_steps: SampleOptions::default().num_steps,
        guidance: SampleOptions::default().guidance_scale,
        temperature: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| anyhow::anyhow!("{flag} needs {what}"))
        };
        let number = |flag: &str, v: String| {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| anyhow::anyhow!("{flag}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--vocoder" => a.vocoder = Some(PathBuf::from(value("a model file")?)),
            "--eval-only" => {
                anyhow::ensure!(inline.is_none(), "--eval-only takes no value");
                a.eval_only = true
            }
            "--eval-dir" => a.eval_dir = Some(PathBuf::from(value("a folder")?)),
            "--sample-steps" => {
                let v = value("a step count")?;
                a.sample_steps =
                    v.parse().ok().filter(|&n: &usize| n > 0).ok_or_else(|| {
                        anyhow::anyhow!("--sample-steps: {v:?} is not a count > 0")
                    })?;
            }
            "--temperature" => {
                let t = common::parse_temperature(&value("a number")?);
                a.temperature = Some(t.map_err(|e| anyhow::anyhow!("--temperature: {e}"))?);
            }
            "--guidance" => a.guidance = number("--guidance", value("a number")?)?,
            "--help" | "-h" => {
                print!("{}", usage());
                std::process::exit(0);
            }
            f if f.starts_with("--") => anyhow::bail!(
                "unknown option {f} (options: --vocoder, --eval-only, --eval-dir, \
                 --sample-steps, --temperature, --guidance, --help; config overrides are key=value)"
            ),
            _ => a.overrides.push(arg),
        }
    }
    Ok(a)
}

/// One held-out clip's results.
struct Row {
    /// The clip's file stem.
    name: String,
    /// Base name of its outputs (unique, URL-safe).
    file: String,
    group: String,
    l1: f64,
    l1_baseline: f64,
    harmonics: Option<f64>,
    harmonics_baseline: Option<f64>,
    /// DAC mel distance to the original through Griffin-Lim and the vocoder.
    audio: Option<(f64, f64)>,
}

fn run() -> anyhow::Result<()> {
    let args = parse_args()?;
    // Checked before training: a vocoder of other features is named now.
    let vocoder = match &args.vocoder {
        Some(p) => Some(common::mel_vocoder(Some(p))?),
        None => None,
    };
    let root = PathBuf::from("runs/quickstart");
    let model_path = root.join("model.safetensors");
    // --eval-only evaluates the trained run on the held-out set it was
    // trained against (its own config.yaml).
    let resolved = if args.eval_only {
        anyhow::ensure!(
            model_path.is_file(),
            "--eval-only: {} does not exist; run the quickstart without it first",
            model_path.display()
        );
        anyhow::ensure!(
            args.overrides.is_empty(),
            "--eval-only takes no config overrides ({}): the run's own config.yaml says what \
             was trained and held out",
            args.overrides.join(" ")
        );
        read_run_config(&root)?
    } else {
        let resolved =
            ResolvedConfig::load(Path::new("configs/settings/tiny.yaml"), &args.overrides)?;
        // The whole config, model sections included, before the earlier
        // run is replaced: a bad override must not cost the trained model.
        check_config(&resolved)?;
        resolved
    };
    let data_cfg: AudioDataConfig = resolved.get("data")?;
    // The clips to evaluate, with their voice (split group).
    let (clips, what) = match &args.eval_dir {
        None => (
            data_cfg
                .held_out_files()?
                .into_iter()
                .map(|p| {
                    let group = data_cfg.group_of(&p);
                    (p, group)
                })
                .collect::<Vec<_>>(),
            match data_cfg.split_by {
                SplitBy::Directory => "never heard in training".to_string(),
                SplitBy::File => {
                    "held out by file (split_by: file, so their voices may be in training)".into()
                }
            },
        ),
        Some(dir) => {
            let files = melvae::train::discover_audio(dir)?;
            anyhow::ensure!(
                !files.is_empty(),
                "--eval-dir: {} has no audio files",
                dir.display()
            );
            let clips = files
                .into_iter()
                .map(|p| {
                    let group = SplitBy::Directory.group(p.strip_prefix(dir).unwrap_or(&p));
                    (p, group)
                })
                .collect::<Vec<_>>();
            (clips, format!("in {}", dir.display()))
        }
    };
    anyhow::ensure!(
        !clips.is_empty(),
        "nothing to evaluate: no file under {} is held out (data.held_out, data.val_fraction)",
        data_cfg.dir.display()
    );
    if !args.eval_only {
        train(&resolved, &data_cfg, &root, &model_path)?;
    }
    evaluate(&args, vocoder.as_ref(), &clips, what, &root, &model_path)
}

/// Trains the tiny mel VAE into `root` and exports its final weights to
/// `model_path`.
fn train(
    resolved: &ResolvedConfig,
    data_cfg: &AudioDataConfig,
    root: &Path,
    model_path: &Path,
) -> anyhow::Result<()> {
    let training: TrainerConfig = resolved.get("training")?;
    let data = AudioFolder::open(data_cfg)?;
    if root.exists() {
        println!("replacing {}", root.display());
    }
    let run = open_run(root, resolved, Start::Overwrite)?;
    println!(
        "training the tiny mel VAE on {} ({} clips; {} clips of {} voices never heard in training held out) for {} steps",
        data_cfg.dir.display(),
        data.train.len(),
        data.val.len(),
        count_groups(data_cfg, data.val.paths()),
        training.steps
    );
    let t = Instant::now();
    let s = train_run(resolved, TrainData::Audio(data), &run, false)?;
    println!(
        "trained {} steps in {:.0} s",
        s.steps,
        t.elapsed().as_secs_f64()
    );
    // Evaluate the model as a user would: export the run's final weights as
    // a model file and load it with melvae-models alone.
    export(root, &Which::Latest, Weights::Auto, model_path)?;
    println!("model file: {}", model_path.display());
    Ok(())
}

/// A unique, URL-safe base name for each clip's outputs: its file stem with
/// characters other than ASCII letters, digits, `-`, `_` and `.` replaced
/// by `_`, and `-2`, `-3`, ... added when stems repeat (the same name in two
/// voices' folders).
fn output_names<'a>(paths: impl Iterator<Item = &'a Path>) -> Vec<String> {
    let mut seen = std::collections::HashMap::<String, usize>::new();
    paths
        .map(|p| {
            let stem: String = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let k = seen.entry(stem.clone()).or_insert(0);
            *k += 1;
            if *k == 1 {
                stem
            } else {
                format!("{stem}-{k}")
            }
        })
        .collect()
}

/// The number of split groups (voices) among `paths`.
fn count_groups<'a>(cfg: &AudioDataConfig, paths: impl Iterator<Item = &'a Path>) -> usize {
    paths
        .map(|p| cfg.group_of(p))
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// Reconstructs `clips` (path, voice) with the model file, writes the
/// listening material and prints the report; `what` says where the voices
/// come from ("never heard in training").
fn evaluate(
    args: &Args,
    vocoder: Option<&MelToAudio>,
    clips: &[(PathBuf, String)],
    what: String,
    root: &Path,
    model_path: &Path,
) -> anyhow::Result<()> {
    let model = MelVae::load(model_path, &Device::Cpu, DType::F32)?;
    let eval = root.join("eval");
    std::fs::create_dir_all(&eval)?;
    let ex = MelExtractor::new(MelConfig::vocos_24k())?;
    let mel = ex.config();
    let img = SpectrogramImage::for_mel(mel);
    let opts = &common::mel_sampling(
        &model.config().cfm,
        args.sample_steps,
        args.guidance,
        args.temperature,
    );
    let metrics = Metrics::new(24000, false, &Device::Cpu)?;
    let griffin_lim = MelToAudio::new(None, mel)?;
    let t = Instant::now();
    let files = output_names(clips.iter().map(|(p, _)| p.as_path()));
    // Clips in parallel: Griffin-Lim, the images and the files are
    // single-threaded, so the two cores of a laptop halve the wall time.
    let one = |((path, group), file): (&(PathBuf, String), String)| -> anyhow::Result<Row> {
        let in_clip = |e: &dyn std::fmt::Display| anyhow::anyhow!("{}: {e}", path.display());
        // melvae-dsp's load errors name the file already.
        let audio = common::load_for_mel(path, mel)?;
        let r = model
            .reconstruct(&audio.channels[0], 24000, opts, &Device::Cpu)
            .map_err(|e| in_clip(&e))?;
        let baseline = r.input.mean_keepdim(2)?.broadcast_as(r.input.shape())?;
        let (mi, mr, mb) = (
            mel_to_array(&r.input)?,
            mel_to_array(&r.output)?,
            mel_to_array(&baseline.contiguous()?)?,
        );
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        img.save_png_stack(eval.join(format!("{file}.png")), &[&mi, &mr])?;
        let n = audio.n_samples();
        let original = Audio::new(24000, vec![audio.channels[0].clone()])?;
        let wav = |suffix: &str, a: &Audio| {
            save_wav(
                eval.join(format!("{file}_{suffix}.wav")),
                a,
                WavFormat::Pcm16,
            )
        };
        // The reconstruction and the input's own mel through `v`, written
        // as `recon_<kind>` and `input_<kind>`; the reconstruction returned.
        let render = |v: &MelToAudio, kind: &str| -> anyhow::Result<Audio> {
            let recon = Audio::new(24000, vec![v.audio(&r.output, mel, n)?])?;
            wav(&format!("recon_{kind}"), &recon)?;
            wav(
                &format!("input_{kind}"),
                &Audio::new(24000, vec![v.audio(&r.input, mel, n)?])?,
            )?;
            Ok(recon)
        };
        wav("original", &original)?;
        let gl = render(&griffin_lim, "griffin_lim")?;
        let scores = match vocoder {
            Some(v) => {
                let voc = render(v, "vocos")?;
                Some((
                    metrics.score(&original, &gl)?.mel_distance,
                    metrics.score(&original, &voc)?.mel_distance,
                ))
            }
            None => None,
        };
        Ok(Row {
            group: group.clone(),
            file,
            name,
            l1: MelVae::mel_l1(&r.output, &r.input)?,
            l1_baseline: MelVae::mel_l1(&baseline, &r.input)?,
            harmonics: harmonic_detail(&mi, &mr, mel, HARMONIC_MAX_HZ)?,
            harmonics_baseline: harmonic_detail(&mi, &mb, mel, HARMONIC_MAX_HZ)?,
            audio: scores,
        })
    };
    // Every clip runs; the error reported is the first failing clip's in
    // path order, as in a sequential loop.
    let rows = clips
        .par_iter()
        .zip(files)
        .map(one)
        .collect::<Vec<_>>()
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    let settings = format!(
        "{} {} steps, temperature {}, guidance {}",
        opts.num_steps,
        format!("{:?}", opts.solver).to_lowercase(),
        opts.temperature,
        opts.guidance_scale
    );
    let report = Report {
        rows,
        settings,
        what,
        vocoder: args.vocoder.clone(),
    };
    print!("{}", report.markdown());
    println!(
        "(evaluated {} clips in {:.0} s; listen and look: {})",
        clips.len(),
        t.elapsed().as_secs_f64(),
        eval.join("index.html").display()
    );
    std::fs::write(eval.join("index.html"), report.html())?;
    std::fs::write(
        eval.join("summary.json"),
        serde_json::to_string_pretty(&report.json())?,
    )?;
    Ok(())
}

/// The evaluation's table, verdict, web page and JSON.
struct Report {
    rows: Vec<Row>,
    settings: String,
    /// Where the voices come from ("never heard in training").
    what: String,
    vocoder: Option<PathBuf>,
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    s / n.max(1) as f64
}

fn opt(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.2}"))
}

impl Report {
    fn l1(&self) -> (f64, f64) {
        (
            mean(self.rows.iter().map(|r| r.l1)),
            mean(self.rows.iter().map(|r| r.l1_baseline)),
        )
    }
    /// Mean harmonic detail r of the model and the baseline (`None` where
    /// no clip has one).
    fn harmonics(&self) -> (Option<f64>, Option<f64>) {
        let m = |f: fn(&Row) -> Option<f64>| {
            let v: Vec<f64> = self.rows.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| mean(v.into_iter()))
        };
        (m(|r| r.harmonics), m(|r| r.harmonics_baseline))
    }
    /// "16 clips of 8 voices never heard in training".
    fn set(&self) -> String {
        let (n, v) = (self.rows.len(), self.voices());
        format!(
            "{n} clip{} of {v} voice{} {}",
            if n == 1 { "" } else { "s" },
            if v == 1 { "" } else { "s" },
            self.what
        )
    }
    fn voices(&self) -> usize {
        self.rows
            .iter()
            .map(|r| &r.group)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    }
    fn wins(&self) -> usize {
        self.rows.iter().filter(|r| r.l1 < r.l1_baseline).count()
    }
    /// The plain verdict, with the margin.
    fn verdict(&self) -> String {
        let (m, b) = self.l1();
        let n = self.rows.len();
        if m < b {
            format!(
                "The reconstruction beats the clip-mean baseline on {}: log-mel L1 {m:.3} \
                 against {b:.3}, {:.3} lower ({:.0}%); better on {} of {n} clips.",
                self.set(),
                b - m,
                100.0 * (b - m) / b,
                self.wins()
            )
        } else {
            format!(
                "The reconstruction does NOT beat the clip-mean baseline on {}: log-mel L1 \
                 {m:.3} against {b:.3}; better on {} of {n} clips.",
                self.set(),
                self.wins()
            )
        }
    }
    fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "\n{}, sampling: {}\n", self.set(), self.settings);
        let _ = writeln!(
            s,
            "| clip | log-mel L1 | baseline L1 | harmonic detail r | baseline r |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        for r in &self.rows {
            let _ = writeln!(
                s,
                "| {} | {:.3} | {:.3} | {} | {} |",
                r.name,
                r.l1,
                r.l1_baseline,
                opt(r.harmonics),
                opt(r.harmonics_baseline)
            );
        }
        let ((m, b), (h, hb)) = (self.l1(), self.harmonics());
        let _ = writeln!(
            s,
            "| **mean** | **{m:.3}** | **{b:.3}** | **{}** | **{}** |",
            opt(h),
            opt(hb)
        );
        let _ = writeln!(
            s,
            "\nbaseline: each clip's mean log-mel at every frame. Harmonic detail r: correlation \
             of the input's and output's harmonic ripple below {HARMONIC_MAX_HZ} Hz in sounding \
             frames (1: the input's harmonics; about 0: none)."
        );
        if self.rows.iter().any(|r| r.audio.is_some()) {
            let _ = writeln!(
                s,
                "\nthe reconstructions as audio, DAC mel distance to the original (lower is better; {}):\n",
                self.vocoder
                    .as_deref()
                    .map_or(String::new(), |p| p.display().to_string())
            );
            let _ = writeln!(s, "| clip | Griffin-Lim | Vocos |");
            let _ = writeln!(s, "|---|---:|---:|");
            for r in &self.rows {
                if let Some((g, v)) = r.audio {
                    let _ = writeln!(s, "| {} | {g:.3} | {v:.3} |", r.name);
                }
            }
            let _ = writeln!(
                s,
                "| **mean** | **{:.3}** | **{:.3}** |",
                mean(self.rows.iter().filter_map(|r| r.audio.map(|a| a.0))),
                mean(self.rows.iter().filter_map(|r| r.audio.map(|a| a.1)))
            );
        }
        let _ = writeln!(s, "\n{}", self.verdict());
        s
    }
    fn html(&self) -> String {
        let esc = |t: &str| {
            t.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
                .replace('"', "&quot;")
        };
        let vocoded = self.rows.iter().any(|r| r.audio.is_some());
        let mut s = String::from(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>melvae quickstart: \
             held-out reconstructions</title>\n<style>body{font-family:sans-serif;margin:1.5em;\
             background:#fafafa}table{border-collapse:collapse}td,th{border:1px solid #ccc;\
             padding:6px;vertical-align:top}img{width:560px}audio{width:260px;display:block}\
             .n{text-align:right}</style></head><body>\n<h1>melvae quickstart: held-out \
             reconstructions</h1>\n",
        );
        let ((m, b), (h, hb)) = (self.l1(), self.harmonics());
        let _ = write!(
            s,
            "<p><b>{}</b></p>\n<p>Sampling: {}. Mean log-mel L1 {m:.3} (baseline, each clip's \
             mean log-mel: {b:.3}); mean harmonic detail r {} (baseline {}). Each \
             image: the input's log-mel above the reconstruction's. \"Input through\" plays the \
             input's own log-mel through the same vocoder: what a perfect reconstruction would \
             sound like.</p>\n<table>\n<tr><th>clip</th><th>log-mels (input above, \
             reconstruction below)</th><th>listen</th></tr>\n",
            esc(&self.verdict()),
            esc(&self.settings),
            opt(h),
            opt(hb)
        );
        for r in &self.rows {
            let (n, file) = (esc(&r.name), &r.file);
            let audio = |label: &str, suffix: &str| {
                format!(
                    "{label}<audio controls preload=\"none\" src=\"{file}_{suffix}.wav\"></audio>"
                )
            };
            let mut players = vec![
                audio("original", "original"),
                audio("reconstruction, Griffin-Lim", "recon_griffin_lim"),
            ];
            if vocoded {
                players.push(audio("reconstruction, Vocos", "recon_vocos"));
                players.push(audio("input through Vocos", "input_vocos"));
            }
            players.push(audio("input through Griffin-Lim", "input_griffin_lim"));
            let _ = writeln!(
                s,
                "<tr><td>{n}<br>voice {}<br>L1 {:.3} (baseline {:.3})<br>harmonic r {} \
                 (baseline {})</td><td><img src=\"{file}.png\" alt=\"{n} log-mels\"></td><td>{}</td></tr>",
                esc(&r.group),
                r.l1,
                r.l1_baseline,
                opt(r.harmonics),
                opt(r.harmonics_baseline),
                players.join("\n")
            );
        }
        s.push_str("</table>\n</body></html>\n");
        s
    }
    fn json(&self) -> serde_json::Value {
        let ((m, b), (h, hb)) = (self.l1(), self.harmonics());
        serde_json::json!({
            "sampling": self.settings,
            "clips": self.rows.len(),
            "voices": self.voices(),
            "log_mel_l1": m,
            "baseline_log_mel_l1": b,
            "harmonic_detail": h,
            "baseline_harmonic_detail": hb,
            "beats_baseline": m < b,
            "rows": self.rows.iter().map(|r| serde_json::json!({
                "clip": r.name,
                "files": r.file,
                "voice": r.group,
                "log_mel_l1": r.l1,
                "baseline_log_mel_l1": r.l1_baseline,
                "harmonic_detail": r.harmonics,
                "baseline_harmonic_detail": r.harmonics_baseline,
                "mel_distance_griffin_lim": r.audio.map(|a| a.0),
                "mel_distance_vocos": r.audio.map(|a| a.1),
            })).collect::<Vec<_>>(),
        })
    }
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { melvae::layers::tune_cpu() };
    common::exit_with(run())
}
