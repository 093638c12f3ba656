//! Reading and writing `.npy` files (NumPy format 1.0-3.0, little-endian
//! `float32` or `float64`, C order).

use std::io::Write;
use std::path::Path;

use crate::fsutil::atomic_write;
use crate::{Error, Result};

/// Writes `data` (row-major, `shape.iter().product()` values) as a float32
/// `.npy`, atomically.
pub fn write_npy(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<()> {
    let path = path.as_ref();
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(Error::shape(
            "npy data",
            format!("{n} values for shape {shape:?}"),
            format!("{} values", data.len()),
        ));
    }
    let dims = match shape {
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let header_len =
        u16::try_from(header.len()).map_err(|_| Error::invalid("npy shape", "header too long"))?;
    atomic_write(path, |w| {
        w.write_all(b"\x93NUMPY\x01\x00")?;
        w.write_all(&header_len.to_le_bytes())?;
        w.write_all(header.as_bytes())?;
        for v in data {
            w.write_all(&v.to_le_bytes())?;
        }
        Ok(())
    })
}

/// Reads a float32 or float64 `.npy` as `(shape, values)`; values are f32.
pub fn read_npy(path: impl AsRef<Path>) -> Result<(Vec<usize>, Vec<f32>)> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |why: &str| Error::invalid(format!("npy file {}", path.display()), why.to_string());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("missing the \\x93NUMPY magic"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(&format!("unsupported format version {v}"))),
    };
    let header = bytes
        .get(start..start + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated or non-UTF-8 header"))?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        Some(header[at..].trim_start().strip_prefix(':')?.trim_start())
    };
    let descr = field("descr").ok_or_else(|| bad("no 'descr' in header"))?;
    let width = if descr.starts_with("'<f4'") {
        4
    } else if descr.starts_with("'<f8'") {
        8
    } else {
        return Err(bad(&format!(
            "dtype {} is not '<f4' or '<f8'",
            descr.split(',').next().unwrap_or("")
        )));
    };
    if field("fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err(bad("Fortran order is not supported"));
    }
    let shape_str = field("shape").ok_or_else(|| bad("no 'shape' in header"))?;
    let inner = shape_str
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("malformed shape"))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("malformed shape")))
        .collect::<Result<Vec<_>>>()?;
    let n: usize = shape.iter().product();
    let body = &bytes[start + hlen..];
    if body.len() != n * width {
        return Err(bad(&format!(
            "shape {shape:?} needs {} data bytes, file has {}",
            n * width,
            body.len()
        )));
    }
    let values = if width == 4 {
        body.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        body.chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect()
    };
    Ok((shape, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for shape in [vec![3usize, 4], vec![5], vec![2, 1, 3]] {
            let p = dir.path().join("a.npy");
            let data: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|i| i as f32 * 0.5 - 1.0)
                .collect();
            write_npy(&p, &shape, &data).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!((bytes.len() - data.len() * 4) % 64, 0);
            assert_eq!(read_npy(&p).unwrap(), (shape, data));
        }
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.npy");
        std::fs::write(&p, b"hello").unwrap();
        let e = read_npy(&p).unwrap_err().to_string();
        assert!(e.contains("bad.npy") && e.contains("magic"), "{e}");
        write_npy(&p, &[4], &[1.0; 4]).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&p, bytes).unwrap();
        let e = read_npy(&p).unwrap_err().to_string();
        assert!(
            e.contains("bad.npy") && e.contains("needs 16 data bytes"),
            "{e}"
        );
        let e = write_npy(&p, &[2, 2], &[1.0; 3]).unwrap_err().to_string();
        assert!(e.contains("4 values"), "{e}");
    }
}
