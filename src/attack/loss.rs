//! Per-example attack objectives, all to be *maximised* by the attacker.

use candle_core::{D, Device, Result, Tensor};

use crate::model::Forward;

/// The objective an attack climbs.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "loss")]
pub enum Objective {
    /// Cross-entropy of the true label (untargeted) or minus that of the target (targeted).
    Ce,
    /// Carlini-Wagner margin: `max_{j != y} z_j - z_y` (untargeted) or `z_t - max_{j != t} z_j`.
    Cw,
    /// Difference of logits ratio (Croce and Hein 2020), untargeted or targeted.
    Dlr,
    /// AW-Net adaptive: `CE(z, y) - lambda * CE(type, clean)`, fooling the classifier while
    /// keeping the router convinced the input is clean.
    Adaptive { lambda: f64 },
}

/// One-hot `[b, k]` of `labels` as f32 (`labels`: `[b]` u32).
fn one_hot(labels: &[u32], k: usize, dev: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; labels.len() * k];
    for (i, &l) in labels.iter().enumerate() {
        v[i * k + l as usize] = 1.0;
    }
    Tensor::from_vec(v, (labels.len(), k), dev)
}

/// `z[i, labels[i]]`, `[b]`.
fn pick(z: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let idx = Tensor::from_vec(labels.to_vec(), (labels.len(), 1), z.device())?;
    z.gather(&idx, 1)?.squeeze(1)
}

/// Cross-entropy per example, `[b]`.
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    pick(&candle_nn::ops::log_softmax(logits, D::Minus1)?, labels)?.neg()
}

/// `max_{j != labels[i]} z[i, j]`, `[b]`.
fn max_other(z: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let k = z.dim(1)?;
    let mask = (one_hot(labels, k, z.device())? * 1e9)?.to_dtype(z.dtype())?;
    (z - mask)?.max(D::Minus1)
}

/// The `n`-th largest logit of every row, by index chosen without gradient, `[b]`.
fn ranked(z: &Tensor, n: usize) -> Result<Tensor> {
    let rows = z.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    let idx: Vec<u32> = rows
        .iter()
        .map(|r| {
            let mut order: Vec<usize> = (0..r.len()).collect();
            order.sort_by(|&a, &b| r[b].total_cmp(&r[a]));
            order[n.min(r.len() - 1)] as u32
        })
        .collect();
    pick(z, &idx)
}

/// The objective per example, `[b]`. `target`: the class each example is pushed towards, for
/// targeted attacks.
pub fn objective(out: &Forward, labels: &[u32], target: Option<&[u32]>, obj: Objective) -> Result<Tensor> {
    let z = &out.logits;
    match (obj, target) {
        (Objective::Ce, None) => cross_entropy(z, labels),
        (Objective::Ce, Some(t)) => cross_entropy(z, t)?.neg(),
        (Objective::Cw, None) => max_other(z, labels)? - pick(z, labels)?,
        (Objective::Cw, Some(t)) => pick(z, t)? - max_other(z, t)?,
        (Objective::Dlr, None) => {
            let num = (pick(z, labels)? - max_other(z, labels)?)?;
            let den = ((ranked(z, 0)? - ranked(z, 2)?)? + 1e-12)?;
            num.div(&den)?.neg()
        }
        (Objective::Dlr, Some(t)) => {
            let num = (pick(z, labels)? - pick(z, t)?)?;
            let den = ((ranked(z, 0)? - ((ranked(z, 2)? + ranked(z, 3)?)? * 0.5)?)? + 1e-12)?;
            num.div(&den)?.neg()
        }
        (Objective::Adaptive { lambda }, _) => {
            let ce = match target {
                None => cross_entropy(z, labels)?,
                Some(t) => cross_entropy(z, t)?.neg()?,
            };
            match &out.type_logits {
                Some(type_logits) => {
                    let clean = vec![0u32; labels.len()];
                    ce - (cross_entropy(type_logits, &clean)? * lambda)?
                }
                None => candle_core::bail!("the adaptive attack needs a model with a router (AW-Net)"),
            }
        }
    }
}
