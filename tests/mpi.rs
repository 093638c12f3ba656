//! Data-parallel training over MPI with the real `train` program (feature
//! `mpi`; needs `mpirun` from Open MPI or MPICH, and the example built with
//! the feature: `cargo build --features mpi --example train`):
//! 2 ranks equal 1 rank with the same global batch, a 2-rank run resumes
//! exactly, and killing a rank stops the run and leaves the last checkpoint
//! valid.
#![cfg(feature = "mpi")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

fn train_exe() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples")
        .join(format!("train{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} not built: cargo build --features mpi --example train",
        path.display()
    );
    path
}

/// The tiny mel VAE on the bundled speech, cut to seconds of work.
fn args(run: &Path, steps: u64) -> Vec<String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut a: Vec<String> = vec![
        "--config".into(),
        repo.join("configs/settings/tiny.yaml")
            .display()
            .to_string(),
        "--run-dir".into(),
        run.display().to_string(),
    ];
    a.extend([
        format!("training.steps={steps}"),
        "data.batch_size=4".into(),
        "data.crop_seconds=0.5".into(),
        format!("data.dir={}", repo.join("assets/speech").display()),
        "training.log_every=1".into(),
        "training.val_every=3".into(),
        "training.ckpt_every=3".into(),
        "training.sample_every=0".into(),
        "training.tensorboard=false".into(),
        // tiny.yaml's in-process ranks give way to MPI's.
        "training.local_ranks=1".into(),
    ]);
    a
}

/// `mpirun -n ranks train ...` (one core per rank; allowed as root, as in
/// CI containers).
fn mpirun(ranks: usize, args: &[String]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-n", &ranks.to_string(), "--oversubscribe"])
        .arg(train_exe())
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    c
}

fn ok(out: Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

fn logged(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_u64()?, v["total"].as_f64()?))
        })
        .collect()
}

fn latest_weights(run: &Path) -> HashMap<String, Tensor> {
    let ck = run.join("checkpoints");
    let name = std::fs::read_to_string(ck.join("latest")).unwrap();
    candle_core::safetensors::load(ck.join(name.trim()).join("model.safetensors"), &Device::Cpu)
        .unwrap()
}

fn max_difference(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(k, x)| {
            (x - &b[k])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

#[test]
fn two_mpi_ranks_equal_one_and_resume_exactly() {
    let d = tempfile::tempdir().unwrap();
    let one = d.path().join("one");
    ok(Command::new(train_exe())
        .args(args(&one, 6))
        .output()
        .unwrap());
    let two = d.path().join("two");
    let text = ok(mpirun(2, &args(&two, 6)).output().unwrap());
    assert_eq!(
        text.matches("data-parallel: 2 ranks (mpi)").count(),
        1,
        "rank 0 alone prints: {text}"
    );
    let (l1, l2) = (logged(&one), logged(&two));
    assert_eq!((l1.len(), l2.len()), (6, 6));
    for ((s, a), (_, b)) in l1.iter().zip(&l2) {
        // f32 sums of two half-batch gradients instead of one batch's.
        assert!((a - b).abs() <= 1e-5 * a.abs(), "step {s}: loss {a} vs {b}");
    }
    let diff = max_difference(&latest_weights(&one), &latest_weights(&two));
    assert!(
        diff < 1e-5,
        "1 rank vs 2 ranks: max weight difference {diff}"
    );

    // 3 steps, then resumed by a new 2-rank job to 6: the straight run's
    // weights, bit for bit (the same reductions in the same order).
    let split = d.path().join("split");
    ok(mpirun(2, &args(&split, 3)).output().unwrap());
    ok(mpirun(
        2,
        &[
            "--resume".into(),
            split.display().to_string(),
            "training.steps=6".into(),
        ],
    )
    .output()
    .unwrap());
    assert_eq!(
        max_difference(&latest_weights(&two), &latest_weights(&split)),
        0.0
    );
    assert_eq!(logged(&split), l2);
}

/// The pid of rank `rank` of a job training into `run`.
fn rank_pid(run: &Path, rank: usize) -> Option<u32> {
    let want_env = format!("OMPI_COMM_WORLD_RANK={rank}");
    let want_arg = run.display().to_string();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let has = |buf: &[u8], s: &str| buf.split(|&b| b == 0).any(|p| p == s.as_bytes());
        if has(&cmd, &want_arg) && has(&env, &want_env) && !has(&cmd, "mpirun") {
            return Some(pid);
        }
    }
    None
}

#[test]
fn killing_a_rank_stops_the_run_and_keeps_the_last_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("kill");
    let mut a = args(&run, 100_000);
    a.push("training.ckpt_every=2".into());
    let mut child = mpirun(2, &a)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !run.join("checkpoints/latest").exists() {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "the job ended before its first checkpoint: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint after 5 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = rank_pid(&run, 1).expect("rank 1 is running");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    // Open MPI: "... process rank 1 with PID ... exited on signal 9 (Killed)".
    assert!(
        text.contains("rank 1") && text.contains("signal 9"),
        "{text}"
    );
    // The last complete checkpoint resumes, here on one rank (the global
    // batch is the config's, whatever the number of ranks).
    let name = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let step: u64 = name.trim().trim_start_matches("step-").parse().unwrap();
    ok(Command::new(train_exe())
        .args([
            "--resume".to_string(),
            run.display().to_string(),
            format!("training.steps={}", step + 1),
        ])
        .output()
        .unwrap());
}
