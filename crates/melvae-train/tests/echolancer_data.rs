//! The Echolancer seed's `.pt` examples (written by `torch.save` from
//! tools/make_echolancer_fixtures.py): values, Python-int and tensor
//! speakers, missing keys, bad files named.

use std::path::{Path, PathBuf};

use melvae_train::pt::read_pt_example;
use melvae_train::tokens::TokenDataset;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/echolancer")
        .join(name)
}

#[test]
fn pt_examples_load_with_the_right_values() {
    let e = read_pt_example(&fixture("full.pt")).unwrap();
    assert_eq!(e.text.as_deref(), Some(&[3u32, 1, 4, 1, 5][..]));
    let mel: Vec<u32> = e.codes.iter().flatten().copied().collect();
    assert_eq!(mel, [9, 2, 6, 5, 3, 5, 8]);
    assert!(e.codes.iter().all(|f| f.len() == 1));
    assert_eq!(e.speaker, Some(1));
    assert_eq!(e.cond.as_deref(), Some(&[0.5f32, -1.25, 2.0, 0.0][..]));

    let e = read_pt_example(&fixture("tensor_speaker.pt")).unwrap();
    assert_eq!((e.speaker, e.cond.is_none()), (Some(2), true));
    // No speaker: speaker 0; int32 ids; a 2-D mel read flat.
    let e = read_pt_example(&fixture("no_speaker.pt")).unwrap();
    assert_eq!(e.speaker, Some(0));
    assert_eq!(e.text.as_deref(), Some(&[6u32, 6, 6][..]));
    assert_eq!(e.codes.len(), 6);
}

#[test]
fn bad_pt_files_are_named() {
    for (name, what) in [
        ("no_mel.pt", "`mel`"),
        ("negative.pt", "`text`"),
        ("truncated.pt", "truncated.pt"),
    ] {
        let e = read_pt_example(&fixture(name)).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(what), "{name}: {e}");
    }
    let d = tempfile::tempdir().unwrap();
    let junk = d.path().join("junk.pt");
    std::fs::write(&junk, b"not a zip").unwrap();
    let e = read_pt_example(&junk).unwrap_err().to_string();
    assert!(e.contains("junk.pt") && e.contains("zip"), "{e}");
}

/// A folder of `.pt` files is a token dataset; an example without emotion
/// gets zeros and a 0 in the batch's presence mask.
#[test]
fn a_folder_of_pt_files_is_a_dataset() {
    let d = tempfile::tempdir().unwrap();
    for name in ["full.pt", "tensor_speaker.pt"] {
        std::fs::copy(fixture(name), d.path().join(name)).unwrap();
    }
    let set = TokenDataset::load(&[d.path().to_path_buf()]).unwrap();
    assert_eq!(set.len(), 2);
    let b = set.batch(&[0, 1], 0, &candle_core::Device::Cpu).unwrap();
    let (cond, present) = b.cond.unwrap();
    assert_eq!(present.to_vec1::<u8>().unwrap(), [1, 0]);
    assert_eq!(cond.to_vec2::<f32>().unwrap()[1], [0.0; 4]);
    assert_eq!(b.speakers.unwrap().to_vec1::<u32>().unwrap(), [1, 2]);
    // Mixed with a shard: refused, naming both kinds.
    std::fs::write(d.path().join("x.safetensors"), b"").unwrap();
    let e = TokenDataset::load(&[d.path().to_path_buf()])
        .unwrap_err()
        .to_string();
    assert!(e.contains(".pt") && e.contains("shards"), "{e}");
}
