//! Datasets: idx files (MNIST, Fashion-MNIST), the CIFAR-10/100 binary format, image folders;
//! resolution by name; seeded batching with optional augmentation.

pub mod batch;
pub mod cifar;
pub mod folder;
pub mod idx;
pub mod image;
pub mod resolve;

use std::path::PathBuf;

use candle_core::{Device, Tensor};

pub use batch::{Augment, Batch, Batches};
pub use resolve::{Split, load};

/// Largest decoded dataset file we accept; a header that claims more is refused first.
pub const MAX_DATA_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{msg}: {}", path.display())]
    Format { path: PathBuf, msg: String },
    #[error("dataset '{name}' not found; looked in: {}", tried.join(", "))]
    NotFound { name: String, tried: Vec<String> },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl DataError {
    pub(crate) fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Labelled images held as bytes, `[n, c, h, w]`, pixel values 0..=255.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Human-readable name, e.g. "Fashion-MNIST test split".
    pub name: String,
    /// Where it was found, and by which rule.
    pub source: String,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub class_names: Vec<String>,
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    /// Problems that did not stop loading (unreadable images in a folder, say).
    pub warnings: Vec<String>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Images `range` (clipped to the dataset), named `"{name} ({what}: images a..b)"`.
    pub fn part(&self, range: std::ops::Range<usize>, what: &str) -> Dataset {
        let (end, n) = (range.end.min(self.len()), self.image_len());
        let start = range.start.min(end);
        Dataset {
            name: format!("{} ({what}: images {start}..{end})", self.name),
            images: self.images[start * n..end * n].to_vec(),
            labels: self.labels[start..end].to_vec(),
            warnings: Vec::new(),
            ..self.clone()
        }
    }

    /// The bytes of image `i`, `[c, h, w]`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// Images `indices` as `[b, c, h, w]` f32 in [0, 1].
    pub fn images_tensor(&self, indices: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let mut data = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            data.extend(self.image(i).iter().map(|&p| f32::from(p) / 255.0));
        }
        Tensor::from_vec(data, (indices.len(), self.channels, self.height, self.width), device)
    }

    /// Labels `indices` as `[b]` u32.
    pub fn labels_tensor(&self, indices: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let labels: Vec<u32> = indices.iter().map(|&i| u32::from(self.labels[i])).collect();
        Tensor::from_vec(labels, indices.len(), device)
    }

    /// A one-line summary: name, count, shape and where it came from.
    pub fn describe(&self) -> String {
        format!(
            "{}: {} images of {}x{}x{}, {} classes, from {}",
            self.name,
            self.len(),
            self.channels,
            self.height,
            self.width,
            self.num_classes(),
            self.source
        )
    }

    /// Checks that labels are in range; every reader ends with this.
    pub(crate) fn validated(self) -> Result<Self, DataError> {
        if self.images.len() != self.len() * self.image_len() {
            return Err(DataError::Invalid(format!(
                "{}: {} image bytes for {} labels",
                self.name,
                self.images.len(),
                self.len()
            )));
        }
        if let Some(&bad) = self.labels.iter().find(|&&l| usize::from(l) >= self.num_classes()) {
            return Err(DataError::Invalid(format!(
                "{}: label {bad} out of range for {} classes",
                self.name,
                self.num_classes()
            )));
        }
        Ok(self)
    }
}
