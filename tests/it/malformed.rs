//! Malformed files give errors, never panics, and absurd headers are refused before allocating.

use std::path::{Path, PathBuf};

use awnet_lab::data::{self, cifar, idx};
use awnet_lab::model::checkpoint;

use crate::common::*;

type Loader = fn(&Path) -> Result<(), String>;

/// Each loader with a real file it reads, written to `dir`.
fn loaders(dir: &Path) -> Vec<(&'static str, Loader, PathBuf)> {
    let subset = repo().join("assets/fashion-mnist-subset");
    let model = dir.join("real.safetensors");
    let m = awnet_lab::Model::new(
        tiny_config(awnet_lab::Arch::SmallCnn, awnet_lab::ModelKind::Awnet),
        0,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    checkpoint::save(&m, &model).unwrap();
    // Twenty images as a raw (not gzipped) idx file, so mutations reach the parser.
    let images = idx::read_idx(&subset.join("t10k-images-idx3-ubyte.gz")).unwrap();
    let raw_idx = dir.join("real-images.idx");
    let mut b = vec![0, 0, 8, 3];
    for d in [20u32, 28, 28] {
        b.extend(d.to_be_bytes());
    }
    b.extend(&images.data[..20 * 784]);
    std::fs::write(&raw_idx, b).unwrap();
    let cifar = dir.join("real.bin");
    let record: Vec<u8> = std::iter::once(7u8).chain((0..3072).map(|i| (i % 253) as u8)).collect();
    std::fs::write(&cifar, record.repeat(5)).unwrap();
    let png = repo().join("assets/samples/4-coat-test6.png");
    let jpeg = dir.join("real.jpg");
    data::image::decode(&png)
        .unwrap()
        .save_with_format(&jpeg, image::ImageFormat::Jpeg)
        .unwrap();
    let model_loader: Loader = |p| checkpoint::open(p).map(drop).map_err(|e| e.to_string());
    let image_loader: Loader = |p| data::image::load(p, 1, 28).map(drop).map_err(|e| e.to_string());
    let idx_loader: Loader = |p| idx::read_idx(p).map(drop).map_err(|e| e.to_string());
    vec![
        ("idx.gz", idx_loader, subset.join("t10k-labels-idx1-ubyte.gz")),
        ("idx", idx_loader, raw_idx),
        (
            "bin",
            |p| {
                cifar::read(p, cifar::CifarKind::Cifar10)
                    .map(drop)
                    .map_err(|e| e.to_string())
            },
            cifar,
        ),
        ("png", image_loader, png),
        ("jpg", image_loader, jpeg),
        ("safetensors", model_loader, model),
        ("pth", model_loader, fixture("resnet18_w4.pth")),
    ]
}

#[test]
fn empty_truncated_and_random_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, load, real) in loaders(dir.path()) {
        let mut cases: Vec<(String, Vec<u8>)> = vec![("empty".into(), vec![])];
        let bytes = std::fs::read(&real).unwrap();
        assert!(load(&real).is_ok(), "{kind}: the real file must load");
        // (Not the last byte: a PNG missing only its IEND checksum still holds the whole image.)
        for cut in [1, 7, bytes.len() / 3, bytes.len() / 2, 2 * bytes.len() / 3] {
            cases.push((format!("truncated to {cut}"), bytes[..cut].to_vec()));
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

/// Mutates real files of every format: bit flips, overwritten bytes, integers set to extremes
/// (header sizes that lie), deleted, inserted and duplicated runs, one to four at a time.
/// Mutants may load or fail, but never panic or abort (either fails this test), and every failure
/// names the file. `AWNET_FUZZ_CASES` sets the cases per format (default 60); the counts are
/// printed (`cargo test fuzz -- --nocapture`). A panic inside a dependency that our guard turned
/// into an error is saved under `target/fuzz-crashers/`: copy it into the corpus as `crasher-*`.
#[test]
fn fuzzed_real_files_never_panic() {
    let per_format: u64 = std::env::var("AWNET_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let only = std::env::var("AWNET_FUZZ_FORMAT").ok();
    let dir = tempfile::tempdir().unwrap();
    let mut summary = Vec::new();
    for (kind, load, real) in loaders(dir.path()) {
        if only.as_deref().is_some_and(|o| o != kind) {
            continue;
        }
        let bytes = std::fs::read(&real).unwrap();
        let (mut loaded, mut refused, mut caught) = (0, 0, 0);
        for case in 0..per_format {
            let mut m = bytes.clone();
            let r = values(1 + 5 * 4, case * 7919 + kind.len() as u64, 0.0, 1.0);
            for op in 0..1 + (r[0] * 4.0) as usize {
                let r = &r[1 + 5 * op..6 + 5 * op];
                if m.is_empty() {
                    break;
                }
                // Most structure sits in the first bytes (headers); aim half the mutations there.
                let span = if r[0] < 0.5 { m.len().min(512) } else { m.len() };
                let at = (r[1] * span as f64) as usize % m.len();
                let len = 1 + (r[2] * 64.0) as usize;
                match (r[3] * 6.0) as usize {
                    0 => m[at] ^= 1 << (r[4] * 8.0) as u32,
                    1 => m[at] = (r[4] * 256.0) as u8,
                    2 => {
                        let v: [u8; 4] = match (r[4] * 4.0) as usize {
                            0 => [0; 4],
                            1 => [0xff; 4],
                            2 => 0x7fff_ffffu32.to_le_bytes(),
                            _ => 0x7fff_ffffu32.to_be_bytes(),
                        };
                        let end = (at + 4).min(m.len());
                        m[at..end].copy_from_slice(&v[..end - at]);
                    }
                    3 => {
                        m.drain(at..(at + len).min(m.len()));
                    }
                    4 => {
                        let noise: Vec<u8> = values(len, case + op as u64, 0.0, 256.0)
                            .iter()
                            .map(|v| *v as u8)
                            .collect();
                        m.splice(at..at, noise);
                    }
                    _ => {
                        let run = m[at..(at + len).min(m.len())].to_vec();
                        m.splice(at..at, run);
                    }
                }
            }
            let path = dir.path().join(format!("mutant.{kind}"));
            std::fs::write(&path, &m).unwrap();
            match load(&path) {
                Ok(()) => loaded += 1,
                Err(e) => {
                    assert!(e.contains("mutant."), "{kind} case {case}: {e}");
                    refused += 1;
                    if e.contains("panicked") {
                        let keep = repo().join("target/fuzz-crashers");
                        std::fs::create_dir_all(&keep).unwrap();
                        std::fs::write(keep.join(format!("crasher-{case}.{kind}")), &m).unwrap();
                        caught += 1;
                    }
                }
            }
        }
        summary.push(format!(
            "{kind}: {per_format} cases, {loaded} loaded, {refused} refused ({caught} by a caught panic)"
        ));
    }
    eprintln!("fuzzed {} formats: {}", summary.len(), summary.join("; "));
    assert_eq!(summary.len(), if only.is_some() { 1 } else { 7 });
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

// ---- The committed corpus of malformed files ----------------------------------------------
//
// `tests/fixtures/malformed/` holds one file per way a real file can be wrong, and `cases.json`
// says which loader each goes to and a phrase its error must contain. The normal test run loads
// every one; `cargo test -- --ignored regenerate_malformed_corpus` remakes them from real files.

fn corpus_dir() -> PathBuf {
    fixture("malformed")
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CorpusCase {
    file: String,
    /// idx | cifar | image | model
    loader: String,
    /// What is wrong with it.
    what: String,
    /// A phrase the error must contain (besides the file's name).
    expect: String,
}

fn load_as(loader: &str, path: &Path) -> Result<(), String> {
    match loader {
        "idx" => idx::read_idx(path).map(drop).map_err(|e| e.to_string()),
        "cifar" => cifar::read(path, cifar::CifarKind::Cifar10)
            .map(drop)
            .map_err(|e| e.to_string()),
        "image" => data::image::load(path, 1, 28).map(drop).map_err(|e| e.to_string()),
        // With its causes, as the window and the terminal show it.
        "model" => checkpoint::open(path).map(drop).map_err(|e| {
            let mut s = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                s.push_str(&format!(": {c}"));
                cause = c.source();
            }
            s
        }),
        other => panic!("unknown loader {other}"),
    }
}

#[test]
fn every_file_of_the_malformed_corpus_is_a_clear_error() {
    let cases: Vec<CorpusCase> =
        serde_json::from_str(&std::fs::read_to_string(corpus_dir().join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 30, "the corpus lost cases: {}", cases.len());
    let listed: std::collections::BTreeSet<&str> = cases.iter().map(|c| c.file.as_str()).collect();
    for entry in std::fs::read_dir(corpus_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            name == "cases.json" || listed.contains(name.as_str()),
            "{name} is in the corpus but not in cases.json"
        );
    }
    for c in &cases {
        let path = corpus_dir().join(&c.file);
        let err = load_as(&c.loader, &path).expect_err(&format!("{} ({}) must fail", c.file, c.what));
        assert!(
            err.contains(&c.file) && err.contains(&c.expect),
            "{} ({}): the error must name the file and say {:?}: {err}",
            c.file,
            c.what,
            c.expect
        );
    }
}

/// Splits a safetensors file into its JSON header and its data.
fn st_split(bytes: &[u8]) -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

fn st_join(header: &serde_json::Map<String, serde_json::Value>, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// Byte range of tensor `name` in the data part.
fn st_range(header: &serde_json::Map<String, serde_json::Value>, name: &str) -> std::ops::Range<usize> {
    let o = &header[name]["data_offsets"];
    o[0].as_u64().unwrap() as usize..o[1].as_u64().unwrap() as usize
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
#[ignore = "remakes the committed corpus; run by hand after changing it"]
fn regenerate_malformed_corpus() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let mut cases = Vec::new();
    // Files the fuzzer found (copied in by hand) stay, with any error that names them.
    let mut crashers: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("crasher-"))
        .collect();
    crashers.sort();
    for file in crashers {
        let loader = match file.rsplit('.').next() {
            Some("pth" | "pt" | "safetensors") => "model",
            Some("png" | "jpg") => "image",
            Some("bin") => "cifar",
            _ => "idx",
        };
        cases.push(CorpusCase {
            file,
            loader: loader.into(),
            what: "found by the fuzzer: it made a dependency's parser panic (caught, an error)".into(),
            expect: String::new(),
        });
    }
    let mut add = |file: &str, loader: &str, what: &str, expect: &str, bytes: Vec<u8>| {
        std::fs::write(dir.join(file), bytes).unwrap();
        cases.push(CorpusCase {
            file: file.into(),
            loader: loader.into(),
            what: what.into(),
            expect: expect.into(),
        });
    };

    // idx, from the bundled labels (100 bytes of header + labels) and hand-made headers.
    let labels_gz = std::fs::read(repo().join("assets/fashion-mnist-subset/t10k-labels-idx1-ubyte.gz")).unwrap();
    let labels = idx::read_maybe_gz(
        &repo().join("assets/fashion-mnist-subset/t10k-labels-idx1-ubyte.gz"),
        1 << 20,
    )
    .unwrap();
    add("idx-empty", "idx", "an empty file", "too short", vec![]);
    add(
        "idx-truncated-gzip.gz",
        "idx",
        "a gzip stream cut in half",
        "cannot decompress",
        labels_gz[..labels_gz.len() / 2].to_vec(),
    );
    let mut m = labels.clone();
    m[0] = 0x1f;
    add(
        "idx-wrong-magic",
        "idx",
        "the magic number's first bytes",
        "bad magic",
        m,
    );
    let mut m = labels.clone();
    m[2] = 0x0d;
    add("idx-float-type", "idx", "element type float (0x0d)", "not supported", m);
    let mut m = labels.clone();
    m[3] = 9;
    add("idx-nine-dimensions", "idx", "rank 9", "9 dimensions", m);
    let mut m = labels.clone();
    m[4..8].copy_from_slice(&60_000u32.to_be_bytes());
    add(
        "idx-header-lies.gz",
        "idx",
        "the header promises 60,000 labels, the file holds 1,000",
        "truncated",
        gzip(&m),
    );
    let mut m = vec![0, 0, 8, 4];
    for d in [u32::MAX, u32::MAX, u32::MAX, 2] {
        m.extend(d.to_be_bytes());
    }
    m.extend([0; 64]);
    add(
        "idx-absurd-dimensions",
        "idx",
        "dimensions whose product overflows",
        "absurd dimensions",
        m,
    );
    let mut m = vec![0, 0, 8, 3];
    for d in [60_000u32, 100_000, 100_000] {
        m.extend(d.to_be_bytes());
    }
    m.extend([0; 64]);
    add("idx-100gb-claim", "idx", "a header promising 600 GB", "promises", m);

    // CIFAR-10 binary: records of a label byte and 3,072 pixel bytes.
    let record: Vec<u8> = std::iter::once(3u8).chain((0..3072).map(|i| (i % 251) as u8)).collect();
    add("cifar-empty.bin", "cifar", "an empty file", "empty", vec![]);
    add(
        "cifar-truncated.bin",
        "cifar",
        "two records less 100 bytes",
        "not a whole number",
        [record.clone(), record[..record.len() - 100].to_vec()].concat(),
    );
    let mut bad = record.clone();
    bad[0] = 200;
    add(
        "cifar-label-200.bin",
        "cifar",
        "a label outside 0..10",
        "label 200",
        [record.clone(), bad].concat(),
    );
    add(
        "cifar-100-format.bin",
        "cifar",
        "a CIFAR-100 file (two label bytes per record) read as CIFAR-10",
        "not a whole number",
        [vec![1u8, 5], record[1..].to_vec()].concat(),
    );

    // Pictures.
    let png = std::fs::read(repo().join("assets/samples/4-coat-test6.png")).unwrap();
    add("image-empty.png", "image", "an empty file", "cannot decode", vec![]);
    add(
        "image-truncated.png",
        "image",
        "a PNG cut in half",
        "cannot decode",
        png[..png.len() / 2].to_vec(),
    );
    add(
        "image-text.png",
        "image",
        "text named .png",
        "cannot decode",
        b"not a picture\n".to_vec(),
    );
    let mut m = png.clone();
    m[29] ^= 0xff; // inside IHDR's CRC
    add(
        "image-bad-crc.png",
        "image",
        "a wrong IHDR checksum",
        "cannot decode",
        m,
    );
    add(
        "image-100000x100000.png",
        "image",
        "a valid header claiming 100,000 x 100,000 pixels",
        "cannot decode",
        png_header(100_000, 100_000),
    );
    let img = data::image::decode(&repo().join("assets/samples/4-coat-test6.png")).unwrap();
    let mut jpeg = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
        .unwrap();
    add(
        "image-truncated.jpg",
        "image",
        "a JPEG cut in half",
        "cannot decode",
        jpeg[..jpeg.len() / 2].to_vec(),
    );
    // Found by the fuzzer: the decoder fills a JPEG missing its tail with grey and says nothing.
    add(
        "image-missing-tail.jpg",
        "image",
        "a JPEG missing its last fifth (it decoded, grey-filled, before the end-marker check)",
        "truncated",
        jpeg[..jpeg.len() * 4 / 5].to_vec(),
    );
    // Baseline JPEG start-of-frame: FF C0, length, precision, height, width.
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xff, 0xc0])
        .expect("a baseline JPEG");
    let mut m = jpeg.clone();
    m[sof + 5..sof + 9].copy_from_slice(&[0xfd, 0xe8, 0xfd, 0xe8]);
    add(
        "image-65000x65000.jpg",
        "image",
        "a JPEG frame header claiming 65,000 x 65,000 pixels",
        "cannot decode",
        m,
    );

    // Model files, from a small model of this program and the PyTorch fixtures.
    let model = awnet_lab::Model::new(
        tiny_config(awnet_lab::Arch::SmallCnn, awnet_lab::ModelKind::Static),
        0,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real.safetensors");
    checkpoint::save(&model, &real).unwrap();
    let st = std::fs::read(&real).unwrap();
    let (header, body) = st_split(&st);
    add("model-empty.safetensors", "model", "an empty file", "empty", vec![]);
    add(
        "model-truncated.safetensors",
        "model",
        "a checkpoint cut in half",
        "not a valid safetensors",
        st[..st.len() / 2].to_vec(),
    );
    let mut m = (1u64 << 60).to_le_bytes().to_vec();
    m.extend(&st[8..]);
    add(
        "model-header-2e60.safetensors",
        "model",
        "a header length of 2^60",
        "not a valid safetensors",
        m,
    );
    let mut m = st.clone();
    m[8] = b'[';
    add(
        "model-header-not-json.safetensors",
        "model",
        "a header that is not JSON",
        "not a valid safetensors",
        m,
    );
    let mut h = header.clone();
    h["fc.weight"]["shape"] = serde_json::json!([100_000, 100_000, 3]);
    add(
        "model-100gb-tensor.safetensors",
        "model",
        "a tensor whose shape promises 120 GB",
        "not a valid safetensors",
        st_join(&h, &body),
    );
    let mut h = header.clone();
    let r = st_range(&header, "fc.weight");
    h["fc.weight"]["data_offsets"] = serde_json::json!([r.start, body.len() + 4096]);
    add(
        "model-offsets-past-end.safetensors",
        "model",
        "data offsets past the end of the file",
        "not a valid safetensors",
        st_join(&h, &body),
    );
    let mut b = body.clone();
    let r = st_range(&header, "fc.weight");
    b[r.start..r.start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    b[r.start + 4..r.start + 8].copy_from_slice(&f32::INFINITY.to_le_bytes());
    add(
        "model-nan-weight.safetensors",
        "model",
        "a NaN and an infinite weight",
        "NaN or infinite values: fc.weight",
        st_join(&header, &b),
    );
    let mut h = header.clone();
    let shape = h["fc.weight"]["shape"].as_array().unwrap().clone();
    h["fc.weight"]["shape"] = serde_json::json!([shape[1], shape[0]]);
    add(
        "model-transposed-weight.safetensors",
        "model",
        "fc.weight stored transposed",
        "fc.weight",
        st_join(&h, &body),
    );
    let mut h = header.clone();
    h["fc.weight"]["dtype"] = serde_json::json!("I32");
    add(
        "model-integer-weight.safetensors",
        "model",
        "fc.weight stored as 32-bit integers (loaded, converted to floats, before the dtype check)",
        "weights must be floating point",
        st_join(&h, &body),
    );
    let mut h = header.clone();
    let meta = h["__metadata__"].as_object_mut().unwrap();
    let config = meta["awnet.config"]
        .as_str()
        .unwrap()
        .replace("\"static\"", "\"awnet\"");
    meta["awnet.config"] = serde_json::json!(config);
    add(
        "model-other-architecture.safetensors",
        "model",
        "a static model's tensors under an AW-Net configuration",
        "missing: ",
        st_join(&h, &body),
    );
    let mut h = header.clone();
    let meta = h["__metadata__"].as_object_mut().unwrap();
    let config: serde_json::Value = serde_json::from_str(meta["awnet.config"].as_str().unwrap()).unwrap();
    let mut config = config.as_object().unwrap().clone();
    config["width"] = serde_json::json!(1_000_000_000u64);
    meta["awnet.config"] = serde_json::json!(serde_json::to_string(&config).unwrap());
    add(
        "model-width-1e9.safetensors",
        "model",
        "a configuration asking for a billion filters per layer",
        "width 1000000000",
        st_join(&h, &body),
    );
    let mut h = header.clone();
    h.remove("__metadata__");
    add(
        "model-no-metadata.safetensors",
        "model",
        "this program's tensors without its metadata (read as a PyTorch state dict)",
        "",
        st_join(&h, &body),
    );
    add(
        "model-text.safetensors",
        "model",
        "text",
        "not a valid safetensors",
        b"hello\n".to_vec(),
    );
    let pth = std::fs::read(fixture("resnet18_w4.pth")).unwrap();
    add(
        "model-truncated.pth",
        "model",
        "a PyTorch zip cut in half",
        "",
        pth[..pth.len() / 2].to_vec(),
    );
    let legacy = std::fs::read(fixture("resnet18_w4_legacy.pth")).unwrap();
    add(
        "model-truncated-legacy.pth",
        "model",
        "a legacy (pre-1.6) PyTorch file cut in half",
        "",
        legacy[..legacy.len() / 2].to_vec(),
    );
    add(
        "model-text.pth",
        "model",
        "text named .pth",
        "",
        b"not a model\n".to_vec(),
    );
    add(
        "model-unknown.bin",
        "model",
        "a file whose name says no model format",
        "",
        b"\x00".to_vec(),
    );

    std::fs::write(
        dir.join("cases.json"),
        serde_json::to_string_pretty(&cases).unwrap() + "\n",
    )
    .unwrap();
}
