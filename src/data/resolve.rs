//! Datasets by name or path.
//!
//! A name (`fashion-mnist`, `mnist`, `cifar10`, `cifar100`) is looked up, in order, in
//! `$AWNET_DATA/<folder>`, in the folder Debian's `dataset-fashion-mnist` package installs
//! (`/usr/share/datasets/fashion-mnist`), and in the bundled Fashion-MNIST subset in `assets/`
//! (test split only). The dataset says where it was found.

use std::path::{Path, PathBuf};

use super::cifar::{self, CifarKind};
use super::{DataError, Dataset, folder, idx};

pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// The folder inside `assets/` that holds the bundled subset.
pub const BUNDLED_SUBSET: &str = "fashion-mnist-subset";

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

impl Split {
    fn idx_prefix(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Test => "t10k",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Self::Train => "train",
            Self::Test => "test",
        })
    }
}

/// The application's assets folder: `$AWNET_ASSETS`, or the one in the source tree.
pub fn assets_dir() -> PathBuf {
    match std::env::var_os("AWNET_ASSETS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets"),
    }
}

/// Loads a dataset by name or path. Image folders are converted to `image_hint`
/// `(channels, size)`, 1x28x28 when `None`.
pub fn load(name: &str, split: Split, image_hint: Option<(usize, usize)>) -> Result<Dataset, DataError> {
    let data_root = std::env::var_os("AWNET_DATA").map(PathBuf::from);
    let mut tried = Vec::new();
    let mut candidates: Vec<(PathBuf, &str)> = Vec::new();
    let folder_name = match name {
        "fashion-mnist" => Some("fashion-mnist"),
        "mnist" => Some("mnist"),
        "cifar10" => Some("cifar-10-batches-bin"),
        "cifar100" => Some("cifar-100-binary"),
        _ => None,
    };
    let Some(folder_name) = folder_name else {
        let path = Path::new(name);
        if !path.exists() {
            return Err(DataError::NotFound {
                name: name.into(),
                tried: vec![format!(
                    "{} (no such file or folder; names are fashion-mnist, mnist, cifar10, cifar100)",
                    path.display()
                )],
            });
        }
        return load_path(path, split, image_hint, "the given path");
    };
    match &data_root {
        Some(root) => candidates.push((root.join(folder_name), "$AWNET_DATA")),
        None => tried.push("$AWNET_DATA (not set)".to_string()),
    }
    if name == "fashion-mnist" {
        candidates.push((
            PathBuf::from(DEBIAN_FASHION_MNIST),
            "Debian's dataset-fashion-mnist package",
        ));
        candidates.push((assets_dir().join(BUNDLED_SUBSET), "the bundled subset"));
    }
    for (dir, rule) in candidates {
        if dir.is_dir() {
            match load_path(&dir, split, image_hint, rule) {
                Err(DataError::NotFound { tried: more, .. }) => tried.extend(more),
                other => {
                    return other.map(|mut ds| {
                        ds.name = format!("{} {split} split", pretty_name(name));
                        ds
                    });
                }
            }
        } else {
            tried.push(format!("{} (from {rule}: no such folder)", dir.display()));
        }
    }
    Err(DataError::NotFound {
        name: format!("{name} ({split} split)"),
        tried,
    })
}

fn pretty_name(name: &str) -> &str {
    match name {
        "fashion-mnist" => "Fashion-MNIST",
        "mnist" => "MNIST",
        "cifar10" => "CIFAR-10",
        "cifar100" => "CIFAR-100",
        other => other,
    }
}

fn find_file(dir: &Path, stems: &[&str]) -> Option<PathBuf> {
    stems
        .iter()
        .flat_map(|s| [dir.join(s), dir.join(format!("{s}.gz"))])
        .find(|p| p.is_file())
}

/// Loads whatever a folder holds: idx files, CIFAR batches, or class subfolders.
fn load_path(path: &Path, split: Split, image_hint: Option<(usize, usize)>, rule: &str) -> Result<Dataset, DataError> {
    if !path.is_dir() {
        return Err(DataError::format(path, "a dataset path must be a folder"));
    }
    let p = split.idx_prefix();
    let images = find_file(
        path,
        &[&format!("{p}-images-idx3-ubyte"), &format!("{p}-images.idx3-ubyte")],
    );
    let labels = find_file(
        path,
        &[&format!("{p}-labels-idx1-ubyte"), &format!("{p}-labels.idx1-ubyte")],
    );
    if let (Some(images), Some(labels)) = (&images, &labels) {
        let (data, labels_v, h, w) = idx::read_pair(images, labels)?;
        let fashion = path.to_string_lossy().contains("fashion");
        let class_names = if fashion {
            FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect()
        } else {
            (0..10).map(|i| i.to_string()).collect()
        };
        return Dataset {
            name: format!("{} {split} split", path.display()),
            source: format!("{} (from {rule})", path.display()),
            channels: 1,
            height: h,
            width: w,
            class_names,
            images: data,
            labels: labels_v,
            warnings: Vec::new(),
        }
        .validated();
    }
    let cifar10: Vec<PathBuf> = match split {
        Split::Train => (1..=5).map(|i| path.join(format!("data_batch_{i}.bin"))).collect(),
        Split::Test => vec![path.join("test_batch.bin")],
    };
    if cifar10.iter().all(|f| f.is_file()) {
        return load_cifar(path, &cifar10, CifarKind::Cifar10, rule);
    }
    let cifar100 = path.join(format!("{split}.bin"));
    if cifar100.is_file() {
        return load_cifar(path, &[cifar100], CifarKind::Cifar100, rule);
    }
    if folder::looks_like(path) {
        let split_dir = path.join(split.to_string());
        let root = if split_dir.is_dir() {
            split_dir
        } else {
            path.to_path_buf()
        };
        let (c, s) = image_hint.unwrap_or((1, 28));
        let mut ds = folder::load(&root, c, s)?;
        ds.source = format!("{} (from {rule})", ds.source);
        return Ok(ds);
    }
    if images.is_some() || labels.is_some() {
        return Err(DataError::format(
            path,
            format!("has only one of the {p}-images/{p}-labels idx files"),
        ));
    }
    Err(DataError::NotFound {
        name: path.display().to_string(),
        tried: vec![format!(
            "{} (from {rule}: no {split}-split idx files, CIFAR batches or class subfolders)",
            path.display()
        )],
    })
}

fn load_cifar(dir: &Path, files: &[PathBuf], kind: CifarKind, rule: &str) -> Result<Dataset, DataError> {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for f in files {
        let (i, l) = cifar::read(f, kind)?;
        images.extend(i);
        labels.extend(l);
    }
    let class_names = match kind {
        CifarKind::Cifar10 => cifar::CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
        CifarKind::Cifar100 => {
            let names: Vec<String> = std::fs::read_to_string(dir.join("fine_label_names.txt"))
                .map(|t| {
                    t.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            if names.len() == 100 {
                names
            } else {
                (0..100).map(|i| format!("class {i}")).collect()
            }
        }
    };
    Dataset {
        name: format!("{} ({} files)", dir.display(), files.len()),
        source: format!("{} (from {rule})", dir.display()),
        channels: 3,
        height: 32,
        width: 32,
        class_names,
        images,
        labels,
        warnings: Vec::new(),
    }
    .validated()
}
