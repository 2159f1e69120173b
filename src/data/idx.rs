//! The idx format of MNIST and Fashion-MNIST, raw or gzipped.

use std::io::Read;
use std::path::Path;

use super::{DataError, MAX_DATA_BYTES};

/// An unsigned-byte idx array.
#[derive(Clone, Debug, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads a file, decompressing gzip (detected by its magic bytes), at most `limit` bytes out.
pub fn read_maybe_gz(path: &Path, limit: u64) -> Result<Vec<u8>, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut head = [0u8; 2];
    let mut raw = Vec::new();
    let mut reader = std::io::BufReader::new(file);
    let n = reader.read(&mut head).map_err(|e| DataError::io(path, e))?;
    raw.extend_from_slice(&head[..n]);
    let chained = std::io::Cursor::new(raw).chain(reader);
    let mut out = Vec::new();
    let result = if n == 2 && head == [0x1f, 0x8b] {
        flate2::read::GzDecoder::new(chained)
            .take(limit + 1)
            .read_to_end(&mut out)
    } else {
        chained.take(limit + 1).read_to_end(&mut out)
    };
    result.map_err(|e| DataError::format(path, format!("cannot decompress ({e})")))?;
    if out.len() as u64 > limit {
        return Err(DataError::format(path, format!("more than {limit} bytes of data")));
    }
    Ok(out)
}

/// Parses idx bytes: magic `00 00 08 ndim`, `ndim` big-endian u32 sizes, then the values.
pub fn parse_idx(bytes: &[u8], path: &Path) -> Result<IdxArray, DataError> {
    let fail = |msg: String| DataError::format(path, msg);
    if bytes.len() < 4 {
        return Err(fail(format!("too short for an idx file ({} bytes)", bytes.len())));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(fail("not an idx file (bad magic number)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(fail(format!(
            "idx element type 0x{:02x} is not supported (only unsigned bytes, 0x08)",
            bytes[2]
        )));
    }
    let ndim = usize::from(bytes[3]);
    if !(1..=4).contains(&ndim) {
        return Err(fail(format!("idx file with {ndim} dimensions (1 to 4 supported)")));
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(fail("truncated idx header".into()));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let count = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let body = bytes.len() - header;
    match count {
        Some(c) if c == body => Ok(IdxArray {
            dims,
            data: bytes[header..].to_vec(),
        }),
        Some(c) if c > body => Err(fail(format!(
            "header promises {c} values, the file holds {body} (truncated?)"
        ))),
        Some(c) => Err(fail(format!("header promises {c} values, the file holds {body}"))),
        None => Err(fail(format!("absurd dimensions {dims:?}"))),
    }
}

pub fn read_idx(path: &Path) -> Result<IdxArray, DataError> {
    parse_idx(&read_maybe_gz(path, MAX_DATA_BYTES)?, path)
}

/// Reads an images file `[n, h, w]` and a labels file `[n]` into `(images, labels, h, w)`.
pub fn read_pair(images: &Path, labels: &Path) -> Result<(Vec<u8>, Vec<u8>, usize, usize), DataError> {
    let img = read_idx(images)?;
    let lab = read_idx(labels)?;
    let (n, h, w) = match img.dims[..] {
        [n, h, w] => (n, h, w),
        _ => {
            return Err(DataError::format(
                images,
                format!("images idx has dimensions {:?}, not [n, h, w]", img.dims),
            ));
        }
    };
    if lab.dims.len() != 1 {
        return Err(DataError::format(
            labels,
            format!("labels idx has dimensions {:?}, not [n]", lab.dims),
        ));
    }
    if lab.dims[0] != n {
        return Err(DataError::format(
            labels,
            format!("{} labels for {n} images in {}", lab.dims[0], images.display()),
        ));
    }
    Ok((img.data, lab.data, h, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend(d.to_be_bytes());
        }
        v.extend(data);
        v
    }

    #[test]
    fn parses_and_rejects() {
        let p = Path::new("t");
        let ok = parse_idx(&idx(&[2, 3], &[1, 2, 3, 4, 5, 6]), p).unwrap();
        assert_eq!(ok.dims, vec![2, 3]);
        assert_eq!(ok.data, vec![1, 2, 3, 4, 5, 6]);
        assert!(parse_idx(&idx(&[2, 3], &[1, 2, 3]), p).is_err());
        assert!(parse_idx(&idx(&[u32::MAX, u32::MAX, u32::MAX], &[]), p).is_err());
        assert!(parse_idx(&[], p).is_err());
        assert!(parse_idx(&[0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0], p).is_err());
    }

    #[test]
    fn gzip_is_detected_and_bounded() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&idx(&[4], &[9, 8, 7, 6])).unwrap();
        std::fs::write(&path, enc.finish().unwrap()).unwrap();
        assert_eq!(read_idx(&path).unwrap().data, vec![9, 8, 7, 6]);
        assert!(read_maybe_gz(&path, 5).is_err());
    }
}
