//! Mini-batches with seeded shuffling and optional augmentation.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng, rngs::StdRng};

use super::Dataset;

/// Training-time augmentation; the default does nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    /// Random crop after zero-padding each side by this many pixels; 0 switches it off.
    pub crop_padding: usize,
    /// Mirror left-right with probability 1/2.
    pub hflip: bool,
}

/// One mini-batch.
pub struct Batch {
    /// `[b, c, h, w]` f32 in [0, 1].
    pub images: Tensor,
    /// `[b]` u32.
    pub labels: Tensor,
    /// Which dataset items these are.
    pub indices: Vec<usize>,
}

/// Iterates over a dataset in batches; the order (and augmentation) is fixed by the seed.
pub struct Batches<'a> {
    dataset: &'a Dataset,
    order: Vec<usize>,
    pos: usize,
    batch_size: usize,
    augment: Augment,
    rng: StdRng,
    device: Device,
}

impl<'a> Batches<'a> {
    /// `seed: None` keeps the dataset order.
    pub fn new(dataset: &'a Dataset, batch_size: usize, seed: Option<u64>, augment: Augment, device: &Device) -> Self {
        let mut rng = StdRng::seed_from_u64(seed.unwrap_or(0));
        let mut order: Vec<usize> = (0..dataset.len()).collect();
        if seed.is_some() {
            order.shuffle(&mut rng);
        }
        Self {
            dataset,
            order,
            pos: 0,
            batch_size: batch_size.max(1),
            augment,
            rng,
            device: device.clone(),
        }
    }

    fn augmented(&mut self, i: usize) -> Vec<u8> {
        let ds = self.dataset;
        let src = ds.image(i);
        let (c, h, w) = (ds.channels, ds.height, ds.width);
        let p = self.augment.crop_padding as i64;
        let (dy, dx) = if p > 0 {
            (
                self.rng.random_range(0..=2 * p) as isize - p as isize,
                self.rng.random_range(0..=2 * p) as isize - p as isize,
            )
        } else {
            (0, 0)
        };
        let flip = self.augment.hflip && self.rng.random::<bool>();
        let mut out = vec![0u8; src.len()];
        for ch in 0..c {
            for y in 0..h {
                let sy = y as isize + dy;
                if sy < 0 || sy >= h as isize {
                    continue;
                }
                for x in 0..w {
                    let xx = if flip { w - 1 - x } else { x };
                    let sx = xx as isize + dx;
                    if sx >= 0 && sx < w as isize {
                        out[(ch * h + y) * w + x] = src[(ch * h + sy as usize) * w + sx as usize];
                    }
                }
            }
        }
        out
    }
}

impl Iterator for Batches<'_> {
    type Item = candle_core::Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.order.len() {
            return None;
        }
        let end = (self.pos + self.batch_size).min(self.order.len());
        let indices = self.order[self.pos..end].to_vec();
        self.pos = end;
        let ds = self.dataset;
        let images = if self.augment == Augment::default() {
            ds.images_tensor(&indices, &self.device)
        } else {
            let mut data = Vec::with_capacity(indices.len() * ds.image_len());
            for &i in &indices {
                data.extend(self.augmented(i).into_iter().map(|p| f32::from(p) / 255.0));
            }
            Tensor::from_vec(data, (indices.len(), ds.channels, ds.height, ds.width), &self.device)
        };
        Some(images.and_then(|images| {
            Ok(Batch {
                images,
                labels: ds.labels_tensor(&indices, &self.device)?,
                indices,
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(n: usize) -> Dataset {
        Dataset {
            name: "toy".into(),
            source: "test".into(),
            channels: 1,
            height: 4,
            width: 4,
            class_names: vec!["a".into(), "b".into()],
            images: (0..n * 16).map(|i| (i % 200) as u8 + 1).collect(),
            labels: (0..n).map(|i| (i % 2) as u8).collect(),
            warnings: vec![],
        }
    }

    #[test]
    fn seeded_shuffle_covers_everything_once_and_repeats() {
        let ds = toy(10);
        let order = |seed| -> Vec<usize> {
            Batches::new(&ds, 3, seed, Augment::default(), &Device::Cpu)
                .flat_map(|b| b.unwrap().indices)
                .collect()
        };
        let a = order(Some(1));
        assert_eq!(a, order(Some(1)));
        assert_ne!(a, order(Some(2)));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(order(None), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn augmentation_keeps_pixels_from_the_image_and_off_is_identity() {
        let ds = toy(4);
        let aug = Augment {
            crop_padding: 1,
            hflip: true,
        };
        for b in Batches::new(&ds, 4, Some(3), aug, &Device::Cpu) {
            let b = b.unwrap();
            let v = b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(v.len(), 4 * 16);
            // Padding brings in zeros, never values from outside the image.
            for (k, chunk) in v.chunks(16).enumerate() {
                let src: Vec<f32> = ds.image(b.indices[k]).iter().map(|&p| f32::from(p) / 255.0).collect();
                assert!(chunk.iter().all(|x| *x == 0.0 || src.contains(x)));
            }
        }
        let plain = Batches::new(&ds, 4, None, Augment::default(), &Device::Cpu)
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(
            plain.images.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            ds.images.iter().map(|&p| f32::from(p) / 255.0).collect::<Vec<_>>()
        );
    }
}
