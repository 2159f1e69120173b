//! Malformed files give errors, never panics, and absurd headers are refused before allocating.

use std::path::{Path, PathBuf};

use awnet_lab::data::{self, cifar, idx};
use awnet_lab::model::{checkpoint, pytorch};

use crate::common::*;

type Loader = fn(&Path) -> Result<(), String>;

fn loaders() -> Vec<(&'static str, Loader, PathBuf)> {
    let subset = repo().join("assets/fashion-mnist-subset");
    let model = std::env::temp_dir().join(format!("awnet-malformed-{}.safetensors", std::process::id()));
    let m = awnet_lab::Model::new(
        tiny_config(awnet_lab::Arch::SmallCnn, awnet_lab::ModelKind::Awnet),
        0,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    checkpoint::save(&m, &model).unwrap();
    vec![
        (
            "idx",
            |p| idx::read_idx(p).map(drop).map_err(|e| e.to_string()),
            subset.join("t10k-labels-idx1-ubyte.gz"),
        ),
        (
            "cifar",
            |p| {
                cifar::read(p, cifar::CifarKind::Cifar10)
                    .map(drop)
                    .map_err(|e| e.to_string())
            },
            PathBuf::new(),
        ),
        (
            "png",
            |p| data::image::load(p, 1, 28).map(drop).map_err(|e| e.to_string()),
            repo().join("assets/samples/4-coat-test6.png"),
        ),
        (
            "safetensors",
            |p| checkpoint::load(p).map(drop).map_err(|e| e.to_string()),
            model,
        ),
        (
            "pth",
            |p| pytorch::import_pth(p, None).map(drop).map_err(|e| e.to_string()),
            fixture("resnet18_w4.pth"),
        ),
    ]
}

#[test]
fn empty_truncated_and_random_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, load, real) in loaders() {
        let mut cases: Vec<(String, Vec<u8>)> = vec![("empty".into(), vec![])];
        if real.is_file() {
            let bytes = std::fs::read(&real).unwrap();
            assert!(load(&real).is_ok(), "{kind}: the real file must load");
            // (Not the last byte: a PNG missing only its IEND checksum still holds the whole image.)
            for cut in [1, 7, bytes.len() / 3, bytes.len() / 2, 2 * bytes.len() / 3] {
                cases.push((format!("truncated to {cut}"), bytes[..cut].to_vec()));
            }
        } else {
            // A CIFAR-10 file of one record and a bit.
            cases.push(("truncated".into(), vec![1; 3073 + 100]));
        }
        for (i, n) in [1usize, 16, 3073, 5000].iter().enumerate() {
            let noise: Vec<u8> = values(*n, 100 + i as u64, 0.0, 256.0)
                .iter()
                .map(|v| *v as u8)
                .collect();
            cases.push((format!("{n} random bytes"), noise));
        }
        for (what, bytes) in cases {
            let path = dir.path().join(format!("case.{kind}"));
            std::fs::write(&path, &bytes).unwrap();
            let err = load(&path).expect_err(&format!("{kind} {what} must fail"));
            assert!(err.contains("case."), "{kind} {what}: the error names the file: {err}");
        }
    }
}

/// Flips, overwrites and deletes bytes of real files. Mutants may load or fail, but never panic
/// (a panic fails this test) and every failure names the file.
#[test]
fn mutated_real_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut ran = 0;
    for (kind, load, real) in loaders() {
        if !real.is_file() {
            continue;
        }
        let bytes = std::fs::read(&real).unwrap();
        for case in 0..60u64 {
            let r = values(4, case * 31 + 7, 0.0, 1.0);
            let mut m = bytes.clone();
            // Most structure sits in the first bytes (headers); aim half the mutations there.
            let span = if case % 2 == 0 { m.len().min(256) } else { m.len() };
            let at = (r[0] * span as f64) as usize % m.len();
            match case % 3 {
                0 => m[at] ^= 1 << (r[1] * 8.0) as u32,
                1 => m[at] = (r[1] * 256.0) as u8,
                _ => {
                    let end = (at + 1 + (r[2] * 64.0) as usize).min(m.len());
                    m.drain(at..end);
                }
            }
            let path = dir.path().join(format!("mutant.{kind}"));
            std::fs::write(&path, &m).unwrap();
            if let Err(e) = load(&path) {
                assert!(e.contains("mutant."), "{kind} case {case}: {e}");
            }
            ran += 1;
        }
    }
    assert_eq!(ran, 4 * 60);
}

#[test]
fn headers_that_claim_huge_sizes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // idx: 60000 x 100000 x 100000 bytes promised, a few given.
    let path = dir.path().join("huge.idx");
    let mut b = vec![0, 0, 8, 3];
    for d in [60_000u32, 100_000, 100_000] {
        b.extend(d.to_be_bytes());
    }
    b.extend([0; 16]);
    std::fs::write(&path, &b).unwrap();
    assert!(idx::read_idx(&path).unwrap_err().to_string().contains("promises"));
    // safetensors: a header length of 2^60.
    let path = dir.path().join("huge.safetensors");
    let mut b = (1u64 << 60).to_le_bytes().to_vec();
    b.extend(b"{}");
    std::fs::write(&path, &b).unwrap();
    assert!(checkpoint::load(&path).is_err());
    // safetensors: a tensor whose shape promises 100 GB.
    let header = r#"{"w":{"dtype":"F32","shape":[100000,100000,3],"data_offsets":[0,16]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend([0; 16]);
    std::fs::write(&path, &b).unwrap();
    assert!(checkpoint::load(&path).is_err());
    // PNG: a valid header claiming 100,000 x 100,000 pixels.
    let path = dir.path().join("huge.png");
    std::fs::write(&path, png_header(100_000, 100_000)).unwrap();
    let err = data::image::load(&path, 1, 28).unwrap_err().to_string();
    assert!(err.contains("huge.png"), "{err}");
}

fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    let mut crc = flate2::Crc::new();
    crc.update(&ihdr);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc.sum().to_be_bytes());
    png
}
