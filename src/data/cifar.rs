//! The CIFAR-10 and CIFAR-100 binary formats: fixed-size records of label byte(s) and a
//! 3x32x32 image in channel-major order.

use std::path::Path;

use super::{DataError, MAX_DATA_BYTES};

pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

const IMAGE_BYTES: usize = 3 * 32 * 32;

/// Which of the two binary formats a file is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarKind {
    /// One label byte per record.
    Cifar10,
    /// Coarse and fine label bytes per record; the fine label (100 classes) is used.
    Cifar100,
}

impl CifarKind {
    fn label_bytes(self) -> usize {
        match self {
            Self::Cifar10 => 1,
            Self::Cifar100 => 2,
        }
    }

    pub fn num_classes(self) -> usize {
        match self {
            Self::Cifar10 => 10,
            Self::Cifar100 => 100,
        }
    }
}

/// Parses one binary batch file into `(images [n, 3, 32, 32], labels)`.
pub fn parse(bytes: &[u8], kind: CifarKind, path: &Path) -> Result<(Vec<u8>, Vec<u8>), DataError> {
    let record = kind.label_bytes() + IMAGE_BYTES;
    if bytes.is_empty() {
        return Err(DataError::format(path, "empty CIFAR file"));
    }
    if !bytes.len().is_multiple_of(record) {
        return Err(DataError::format(
            path,
            format!(
                "{} bytes is not a whole number of {record}-byte CIFAR records (truncated, or the other CIFAR format?)",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / record;
    let mut images = Vec::with_capacity(n * IMAGE_BYTES);
    let mut labels = Vec::with_capacity(n);
    for (i, rec) in bytes.chunks_exact(record).enumerate() {
        let label = rec[kind.label_bytes() - 1];
        if usize::from(label) >= kind.num_classes() {
            return Err(DataError::format(
                path,
                format!("record {i} has label {label}, outside 0..{}", kind.num_classes()),
            ));
        }
        labels.push(label);
        images.extend_from_slice(&rec[kind.label_bytes()..]);
    }
    Ok((images, labels))
}

pub fn read(path: &Path, kind: CifarKind) -> Result<(Vec<u8>, Vec<u8>), DataError> {
    let len = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?.len();
    if len > MAX_DATA_BYTES {
        return Err(DataError::format(
            path,
            format!("{len} bytes is larger than the {MAX_DATA_BYTES} allowed"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    parse(&bytes, kind, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_and_bad_lengths_fail() {
        let p = Path::new("c");
        let mut rec = vec![3u8];
        rec.extend((0..IMAGE_BYTES).map(|i| (i % 251) as u8));
        let (img, lab) = parse(&[rec.clone(), rec.clone()].concat(), CifarKind::Cifar10, p).unwrap();
        assert_eq!(lab, vec![3, 3]);
        assert_eq!(img.len(), 2 * IMAGE_BYTES);
        assert_eq!(&img[..IMAGE_BYTES], &rec[1..]);
        assert!(parse(&rec[..100], CifarKind::Cifar10, p).is_err());
        assert!(parse(&rec, CifarKind::Cifar100, p).is_err());
        let mut bad = rec.clone();
        bad[0] = 10;
        assert!(parse(&bad, CifarKind::Cifar10, p).is_err());
    }
}
