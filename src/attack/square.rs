//! Square attack, L-inf (Andriushchenko et al., ECCV 2020), following the AutoAttack reference
//! code: vertical-stripe initialisation, then random squares set to +-eps per channel, accepted
//! when they lower the margin `z_y - max_{j != y} z_j`; the square's area follows the reference
//! schedule from `p_init = 0.8` of the image. Gradient-free: it only queries predictions.

use candle_core::Tensor;
use rand::{RngExt, rngs::StdRng};

use super::{AttackConfig, AttackRun, Classifier, Result};
use crate::observe::Outcome;

const P_INIT: f64 = 0.8;

/// The reference schedule for the fraction of pixels changed at iteration `it` of `n`.
fn p_selection(it: usize, n: usize) -> f64 {
    let it = (it as f64 / n as f64 * 10_000.0) as usize;
    let div = match it {
        0..=10 => 1.0,
        11..=50 => 2.0,
        51..=200 => 4.0,
        201..=500 => 8.0,
        501..=1000 => 16.0,
        1001..=2000 => 32.0,
        2001..=4000 => 64.0,
        4001..=6000 => 128.0,
        6001..=8000 => 256.0,
        _ => 512.0,
    };
    P_INIT / div
}

/// Margin per example: positive while the true class still wins.
fn margins(model: &dyn Classifier, xs: &Tensor, labels: &[u32]) -> Result<Vec<f32>> {
    let z = model
        .forward(xs)?
        .logits
        .to_dtype(candle_core::DType::F32)?
        .to_vec2::<f32>()?;
    Ok(z.iter()
        .zip(labels)
        .map(|(row, &y)| {
            let other = row
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != y as usize)
                .map(|(_, &v)| v)
                .fold(f32::NEG_INFINITY, f32::max);
            row[y as usize] - other
        })
        .collect())
}

pub(super) fn run(
    model: &dyn Classifier,
    x: &Tensor,
    labels: &[u32],
    cfg: &AttackConfig,
    rng: &mut StdRng,
    stop: &dyn Fn() -> bool,
) -> Result<Outcome<AttackRun>> {
    let (b, c, h, w) = x.dims4()?;
    let eps = cfg.eps as f32;
    let n_queries = cfg.steps();
    let plane = h * w;
    let xv: Vec<f32> = x.flatten_all()?.to_vec1::<f32>()?;
    let img = c * plane;
    let clip = |v: f32, orig: f32| v.clamp(orig - eps, orig + eps).clamp(0.0, 1.0);
    // Vertical stripes: one sign per (example, channel, column).
    let mut best = xv.clone();
    for e in 0..b {
        for ch in 0..c {
            for col in 0..w {
                let s = if rng.random::<bool>() { eps } else { -eps };
                for row in 0..h {
                    let i = e * img + ch * plane + row * w + col;
                    best[i] = clip(xv[i] + s, xv[i]);
                }
            }
        }
    }
    let to_tensor = |v: &[f32], n: usize| Tensor::from_vec(v.to_vec(), (n, c, h, w), x.device());
    let mut margin = margins(model, &to_tensor(&best, b)?, labels)?;
    let mut trace = vec![super::pgd::mean(&margin.iter().map(|m| -m).collect::<Vec<_>>())];
    for it in 1..n_queries {
        if stop() {
            return Ok(Outcome::Cancelled);
        }
        let todo: Vec<usize> = (0..b).filter(|&e| margin[e] > 0.0).collect();
        if todo.is_empty() {
            break;
        }
        let p = p_selection(it, n_queries);
        let s = ((p * (img as f64) / c as f64).sqrt().round() as usize).clamp(1, h.min(w) - 1);
        let (vh, vw) = (rng.random_range(0..=h - s), rng.random_range(0..=w - s));
        let signs: Vec<f32> = (0..c).map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 }).collect();
        let mut cand = Vec::with_capacity(todo.len() * img);
        for &e in &todo {
            let mut v = best[e * img..(e + 1) * img].to_vec();
            for (ch, sign) in signs.iter().enumerate() {
                for row in vh..vh + s {
                    for col in vw..vw + s {
                        let i = ch * plane + row * w + col;
                        v[i] = clip(v[i] + 2.0 * eps * sign, xv[e * img + i]);
                    }
                }
            }
            cand.extend(v);
        }
        let sub_labels: Vec<u32> = todo.iter().map(|&e| labels[e]).collect();
        let new_margin = margins(model, &to_tensor(&cand, todo.len())?, &sub_labels)?;
        for (j, &e) in todo.iter().enumerate() {
            if new_margin[j] < margin[e] {
                margin[e] = new_margin[j];
                best[e * img..(e + 1) * img].copy_from_slice(&cand[j * img..(j + 1) * img]);
            }
        }
        trace.push(super::pgd::mean(&margin.iter().map(|m| -m).collect::<Vec<_>>()));
    }
    Ok(Outcome::Done(AttackRun {
        adv: to_tensor(&best, b)?,
        trace,
    }))
}
