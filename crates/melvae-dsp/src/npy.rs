//! Reading and writing `.npy` files through `ndarray-npy` (NumPy format
//! 1.0-3.0, little-endian `float32`; `float64` is read too).

use std::io::ErrorKind;
use std::path::Path;

use ndarray::{ArrayBase, ArrayD, Data, Dimension};
use ndarray_npy::{ReadNpyError, ReadNpyExt, WriteNpyError, WriteNpyExt};

use crate::fsutil::atomic_write;
use crate::{Error, Result};

/// Writes `array` as a float32 `.npy` (any dimension; C order, or Fortran
/// order for a Fortran-layout array), atomically.
pub fn write_npy<S, D>(path: impl AsRef<Path>, array: &ArrayBase<S, D>) -> Result<()>
where
    S: Data<Elem = f32>,
    D: Dimension,
{
    atomic_write(path.as_ref(), |w| {
        array.write_npy(w).map_err(|e| match e {
            WriteNpyError::Io(e) => e,
            other => std::io::Error::other(other),
        })
    })
}

/// Reads a float32 or float64 `.npy` of any dimension (values as f32).
/// Errors name the file and what is wrong with it.
pub fn read_npy(path: impl AsRef<Path>) -> Result<ArrayD<f32>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |e: ReadNpyError| {
        let why = match e {
            ReadNpyError::Io(e) if e.kind() == ErrorKind::UnexpectedEof => {
                "truncated header".to_string()
            }
            ReadNpyError::WrongDescriptor(d) => format!("dtype {d} is not '<f4' or '<f8'"),
            e => e.to_string(),
        };
        Error::invalid(format!("npy file {}", path.display()), why)
    };
    match ArrayD::<f32>::read_npy(bytes.as_slice()) {
        Ok(a) => Ok(a),
        Err(ReadNpyError::WrongDescriptor(_)) => ArrayD::<f64>::read_npy(bytes.as_slice())
            .map(|a| a.mapv(|v| v as f32))
            .map_err(bad),
        Err(e) => Err(bad(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array, Array2, IxDyn, ShapeBuilder};

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for shape in [vec![3usize, 4], vec![5], vec![2, 1, 3], vec![]] {
            let p = dir.path().join("a.npy");
            let n = shape.iter().product::<usize>();
            let data = (0..n).map(|i| i as f32 * 0.5 - 1.0).collect();
            let a = Array::from_shape_vec(IxDyn(&shape), data).unwrap();
            write_npy(&p, &a).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            // Header padded to a multiple of 64 bytes, as NumPy writes it.
            assert_eq!((bytes.len() - n * 4) % 64, 0);
            assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
            assert_eq!(read_npy(&p).unwrap(), a);
        }
        // A Fortran-layout array reads back with the same logical values.
        let f = Array2::from_shape_vec((2, 3).f(), vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let p = dir.path().join("f.npy");
        write_npy(&p, &f).unwrap();
        assert_eq!(read_npy(&p).unwrap(), f.into_dyn());
    }

    #[test]
    fn reads_float64() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.npy");
        let a = ndarray::array![[0.5f64, -2.0], [1e-3, 7.0]];
        a.write_npy(std::fs::File::create(&p).unwrap()).unwrap();
        assert_eq!(read_npy(&p).unwrap(), a.mapv(|v| v as f32).into_dyn());
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.npy");
        std::fs::write(&p, b"hello, this is not a numpy file").unwrap();
        let e = read_npy(&p).unwrap_err().to_string();
        assert!(e.contains("bad.npy") && e.contains("magic"), "{e}");
        std::fs::write(&p, b"hello").unwrap();
        let e = read_npy(&p).unwrap_err().to_string();
        assert!(e.contains("bad.npy") && e.contains("truncated"), "{e}");

        write_npy(&p, &ndarray::arr1(&[1.0f32; 4])).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&p, &bytes).unwrap();
        let e = read_npy(&p).unwrap_err().to_string();
        assert!(e.contains("bad.npy") && e.contains("EOF"), "{e}");

        let i = dir.path().join("int.npy");
        ndarray::arr1(&[1i32, 2])
            .write_npy(std::fs::File::create(&i).unwrap())
            .unwrap();
        let e = read_npy(&i).unwrap_err().to_string();
        assert!(e.contains("int.npy") && e.contains("<i4"), "{e}");

        let e = read_npy(dir.path().join("missing.npy"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.npy"), "{e}");
        let e = write_npy(
            dir.path().join("no/such/dir.npy"),
            &ndarray::arr1(&[1.0f32]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("dir.npy") || e.contains("no/such"), "{e}");
    }
}
