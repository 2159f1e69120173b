//! Deterministic parameter initialisation.
//!
//! Candle's CPU random generator cannot be seeded, so models are built through this
//! `VarBuilder` backend instead: each variable is drawn from its own generator, seeded by the
//! model seed and the variable's name. The same seed gives the same weights whatever order the
//! layers are built in, and the variables land in an ordinary `VarMap` for training.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarMap, init::NormalOrUniform};
use rand::{RngExt, SeedableRng, rngs::StdRng};

/// A `VarMap` that creates missing variables from a seeded generator.
pub struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

impl SeededVarMap {
    pub fn new(varmap: VarMap, seed: u64) -> Self {
        Self { varmap, seed }
    }
}

/// FNV-1a: a stable hash of a variable name (std's hasher may change between releases).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Draws a tensor for `init` from a generator seeded by `seed` and `name`.
pub fn seeded_tensor(shape: &Shape, init: Init, seed: u64, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
    let n = shape.elem_count();
    let mut rng = StdRng::seed_from_u64(seed ^ name_hash(name));
    let mut normal = |mean: f64, std: f64| -> f64 {
        // Box-Muller; 1 - u keeps the logarithm finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    };
    let values: Vec<f64> = match init {
        Init::Const(v) => vec![v; n],
        Init::Randn { mean, stdev } => (0..n).map(|_| normal(mean, stdev)).collect(),
        Init::Uniform { lo, up } => {
            let mut rng = StdRng::seed_from_u64(seed ^ name_hash(name));
            (0..n).map(|_| lo + (up - lo) * rng.random::<f64>()).collect()
        }
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => (0..n).map(|_| normal(0.0, std)).collect(),
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    let mut rng = StdRng::seed_from_u64(seed ^ name_hash(name));
                    (0..n).map(|_| bound * (2.0 * rng.random::<f64>() - 1.0)).collect()
                }
            }
        }
    };
    Tensor::from_vec(values, shape.clone(), dev)?.to_dtype(dtype)
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.varmap.data().lock().expect("var map lock poisoned");
        if let Some(var) = data.get(name) {
            let tensor = var.as_tensor();
            if tensor.shape() != &s {
                candle_core::bail!("shape mismatch for {name}: {:?} stored, {s:?} wanted", tensor.shape());
            }
            return Ok(tensor.clone());
        }
        let var = Var::from_tensor(&seeded_tensor(&s, h, self.seed, name, dtype, dev)?)?;
        let tensor = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: a seeded var map only creates variables with a known shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .expect("var map lock poisoned")
            .contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_values_other_seed_other_values() {
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let shape = Shape::from((8, 3, 3, 3));
        let dev = Device::Cpu;
        let a = seeded_tensor(&shape, init, 7, "conv.weight", DType::F32, &dev).unwrap();
        let b = seeded_tensor(&shape, init, 7, "conv.weight", DType::F32, &dev).unwrap();
        let c = seeded_tensor(&shape, init, 8, "conv.weight", DType::F32, &dev).unwrap();
        let d = seeded_tensor(&shape, init, 7, "other.weight", DType::F32, &dev).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&a), v(&b));
        assert_ne!(v(&a), v(&c));
        assert_ne!(v(&a), v(&d));
        // Kaiming normal, fan-in 27, ReLU gain: std = sqrt(2/27) ~ 0.272.
        let values = v(&a);
        let std = (values.iter().map(|x| x * x).sum::<f32>() / values.len() as f32).sqrt();
        assert!((0.18..0.37).contains(&std), "std {std}");
    }
}
