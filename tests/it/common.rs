use std::path::PathBuf;

use awnet_lab::attack::Classifier;
use awnet_lab::model::{Arch, Forward, Model, ModelConfig, ModelError, ModelKind};
use candle_core::{DType, Device, Tensor};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

/// A deterministic pseudo-random vector in [lo, hi) (xorshift, so tests need no RNG crate).
pub fn values(n: usize, seed: u64, lo: f64, hi: f64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            lo + (hi - lo) * ((s >> 11) as f64 / (1u64 << 53) as f64)
        })
        .collect()
}

pub fn tensor(shape: &[usize], seed: u64, lo: f64, hi: f64, dtype: DType) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(values(n, seed, lo, hi), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

pub fn tiny_config(arch: Arch, kind: ModelKind) -> ModelConfig {
    let mut c = ModelConfig::new(arch, kind, 2, 8, 3);
    c.width = match arch {
        Arch::SmallCnn => 3,
        Arch::Resnet18 => 2,
    };
    c.router.channels = [3, 4, 5];
    c.router.type_hidden = 4;
    c
}

/// Gives every variable random values: weights, BN affine and running statistics, and the
/// router's signal heads (zero at initialisation), so tests exercise non-trivial paths.
pub fn randomise(model: &Model, seed: u64) {
    for (k, (name, var)) in model.named_vars().into_iter().enumerate() {
        let is_bn = name.contains("bn") || name.contains("shortcut.1");
        let (lo, hi) = if name.ends_with("running_var") {
            (0.5, 2.0)
        } else if name.ends_with("running_mean") {
            (-0.2, 0.2)
        } else if is_bn && name.ends_with("weight") {
            (0.5, 1.5)
        } else if is_bn {
            (-0.1, 0.5)
        } else {
            (-0.6, 0.6)
        };
        let t = tensor(var.dims(), seed * 1000 + k as u64, lo, hi, var.dtype());
        var.set(&t).unwrap();
    }
}

pub fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

pub fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let scale = 1.0f64.max(x.abs()).max(y.abs());
        assert!((x - y).abs() <= tol * scale, "{what}[{i}]: {x} vs {y} (tol {tol})");
    }
}

/// A linear classifier, `logits = W flatten(x) + b`: closed-form worst cases, quick to train.
pub struct Linear {
    pub w: Tensor,
    pub b: Tensor,
}

impl Classifier for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Forward, ModelError> {
        let logits = xs.flatten_from(1)?.matmul(&self.w.t()?)?.broadcast_add(&self.b)?;
        Ok(Forward {
            logits,
            type_logits: None,
            signals: Vec::new(),
        })
    }

    fn device(&self) -> Device {
        self.w.device().clone()
    }
}
