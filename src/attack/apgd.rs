//! APGD (Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble of
//! diverse parameter-free attacks", 2020), following the AutoAttack reference code: step size
//! starting at `2 eps`, momentum 0.75, and at checkpoints (first after 22% of the iterations,
//! then ever shorter intervals down to 6%) the step is halved and the iterate reset to the best
//! point for every example whose loss rose in at most 75% of the steps since the last checkpoint,
//! or which neither improved nor was reduced last time.
//!
//! APGD-CE is untargeted on cross-entropy; APGD-T runs the targeted DLR loss once for each of the
//! `target_classes` highest other classes (by the clean logits) on the examples not yet fooled.

use candle_core::Tensor;
use rand::{RngExt, rngs::StdRng};

use super::pgd::mean;
use super::{
    AttackConfig, AttackKind, AttackRun, Classifier, Objective, Result, Threat, ascent, fooled, loss_and_grad,
    per_example, per_example_norm, project, select,
};
use crate::observe::Outcome;

pub(super) fn run(
    model: &dyn Classifier,
    x: &Tensor,
    labels: &[u32],
    cfg: &AttackConfig,
    rng: &mut StdRng,
    stop: &dyn Fn() -> bool,
) -> Result<Outcome<AttackRun>> {
    let b = labels.len();
    let user_target = cfg.target.map(|t| vec![t; b]);
    // Each pass: the objective's target per example (None for untargeted).
    let passes: Vec<Option<Vec<u32>>> = match cfg.kind {
        AttackKind::ApgdDlr => {
            let logits = model
                .forward(x)?
                .logits
                .to_dtype(candle_core::DType::F32)?
                .to_vec2::<f32>()?;
            let k = logits[0].len();
            (1..=cfg.target_classes.min(k - 1))
                .map(|rank| {
                    Some(
                        logits
                            .iter()
                            .map(|r| {
                                let mut order: Vec<usize> = (0..k).collect();
                                order.sort_by(|&a, &b| r[b].total_cmp(&r[a]));
                                order[rank] as u32
                            })
                            .collect(),
                    )
                })
                .collect()
        }
        _ => vec![user_target.clone()],
    };
    let success_target = user_target.as_deref();
    let mut adv = x.clone();
    let mut done = fooled(&super::predict(model, x)?, labels, success_target);
    let mut trace = Vec::new();
    for pass in &passes {
        for _ in 0..cfg.restarts {
            let todo: Vec<usize> = (0..b).filter(|&i| !done[i]).collect();
            if todo.is_empty() {
                break;
            }
            let sub_x = super::take_rows(x, &todo)?;
            let sub_labels: Vec<u32> = todo.iter().map(|&i| labels[i]).collect();
            let sub_target: Option<Vec<u32>> = pass.as_ref().map(|t| todo.iter().map(|&i| t[i]).collect());
            let sub_success: Option<Vec<u32>> = success_target.map(|t| todo.iter().map(|&i| t[i]).collect());
            let obj = if cfg.kind == AttackKind::ApgdDlr {
                Objective::Dlr
            } else {
                cfg.objective()
            };
            let Outcome::Done((sub_adv, sub_trace)) = single(
                model,
                &sub_x,
                &sub_labels,
                sub_target.as_deref(),
                sub_success.as_deref(),
                obj,
                cfg,
                rng,
                stop,
            )?
            else {
                return Ok(Outcome::Cancelled);
            };
            if trace.is_empty() {
                trace = sub_trace;
            }
            let pred = super::predict(model, &sub_adv)?;
            let now = fooled(&pred, &sub_labels, sub_success.as_deref());
            // Take back each row that fooled the model; on the last pass, the rest too (their
            // highest-loss points).
            let last = pass == passes.last().expect("one pass at least");
            let take: Vec<bool> = now.iter().map(|&f| f || last).collect();
            adv = super::put_rows(&adv, &todo, &sub_adv, &take)?;
            for (j, &i) in todo.iter().enumerate() {
                done[i] |= now[j];
            }
        }
    }
    Ok(Outcome::Done(AttackRun { adv, trace }))
}

/// One APGD run; returns the best adversarial point found per example (or the last iterate
/// where none fooled the model) and the mean loss per iteration.
#[allow(clippy::too_many_arguments)]
fn single(
    model: &dyn Classifier,
    x: &Tensor,
    labels: &[u32],
    target: Option<&[u32]>,
    success: Option<&[u32]>,
    obj: Objective,
    cfg: &AttackConfig,
    rng: &mut StdRng,
    stop: &dyn Fn() -> bool,
) -> Result<Outcome<(Tensor, Vec<f64>)>> {
    let (b, eps, n_iter) = (labels.len(), cfg.eps, cfg.steps());
    let n_iter2 = ((0.22 * n_iter as f64) as usize).max(1);
    let n_iter_min = ((0.06 * n_iter as f64) as usize).max(1);
    let size_decr = ((0.03 * n_iter as f64) as usize).max(1);
    // Start: a random point on the ball's boundary direction, as the reference code does.
    let t: Vec<f32> = (0..x.elem_count())
        .map(|_| (2.0 * rng.random::<f64>() - 1.0) as f32)
        .collect();
    let t = Tensor::from_vec(t, x.shape(), x.device())?;
    let scale = match cfg.threat {
        Threat::Linf => t.abs()?.flatten_from(1)?.max_keepdim(1)?.reshape((b, 1, 1, 1))?,
        Threat::L2 => per_example_norm(&t)?,
    };
    let mut x_adv = project(&(x + (t.broadcast_div(&(scale + 1e-12)?)? * eps)?)?, x, eps, cfg.threat)?;
    let mut x_best = x_adv.clone();
    let mut x_best_adv = x_adv.clone();
    let (loss, mut grad, pred) = loss_and_grad(model, &x_adv, labels, target, obj)?;
    let mut loss_best = loss.clone();
    let mut grad_best = grad.clone();
    let mut any_fooled = fooled(&pred, labels, success);
    let mut step = vec![cfg.step_size() as f32; b];
    let mut x_adv_old = x_adv.clone();
    let mut k = n_iter2;
    let mut counter = 0;
    let mut loss_best_last_check = loss_best.clone();
    let mut reduced_last_check = vec![true; b];
    let mut loss_steps: Vec<Vec<f32>> = vec![loss.clone()];
    let mut trace = vec![mean(&loss)];
    for i in 0..n_iter {
        if stop() {
            return Ok(Outcome::Cancelled);
        }
        let grad2 = (&x_adv - &x_adv_old)?;
        x_adv_old = x_adv.clone();
        let a = if i > 0 { 0.75 } else { 1.0 };
        let step_t = per_example(&step, x)?;
        let z = project(
            &(&x_adv + ascent(&grad, cfg.threat)?.broadcast_mul(&step_t)?)?,
            x,
            eps,
            cfg.threat,
        )?;
        let z = project(
            &((&x_adv + ((z - &x_adv)? * a)?)? + (grad2 * (1.0 - a))?)?,
            x,
            eps,
            cfg.threat,
        )?;
        x_adv = z;
        let (loss, g, pred) = loss_and_grad(model, &x_adv, labels, target, obj)?;
        grad = g;
        let now = fooled(&pred, labels, success);
        x_best_adv = select(&now, &x_adv, &x_best_adv)?;
        for (f, n) in any_fooled.iter_mut().zip(&now) {
            *f |= n;
        }
        // Every example has a point that fools the model: nothing left to search for.
        if any_fooled.iter().all(|&f| f) {
            trace.push(mean(&loss));
            break;
        }
        let improved: Vec<bool> = loss.iter().zip(&loss_best).map(|(l, b)| l > b).collect();
        x_best = select(&improved, &x_adv, &x_best)?;
        grad_best = select(&improved, &grad, &grad_best)?;
        for (j, &imp) in improved.iter().enumerate() {
            if imp {
                loss_best[j] = loss[j];
            }
        }
        trace.push(mean(&loss));
        loss_steps.push(loss);
        counter += 1;
        if counter == k {
            let last = loss_steps.len() - 1;
            let reduce: Vec<bool> = (0..b)
                .map(|e| {
                    let rises = (0..k)
                        .filter(|&c| last > c && loss_steps[last - c][e] > loss_steps[last - c - 1][e])
                        .count();
                    let oscillating = rises as f64 <= k as f64 * 0.75;
                    let stalled = !reduced_last_check[e] && loss_best_last_check[e] >= loss_best[e];
                    oscillating || stalled
                })
                .collect();
            reduced_last_check = reduce.clone();
            loss_best_last_check = loss_best.clone();
            if reduce.iter().any(|&r| r) {
                for (s, &r) in step.iter_mut().zip(&reduce) {
                    if r {
                        *s /= 2.0;
                    }
                }
                x_adv = select(&reduce, &x_best, &x_adv)?;
                grad = select(&reduce, &grad_best, &grad)?;
            }
            counter = 0;
            k = k.saturating_sub(size_decr).max(n_iter_min);
        }
    }
    // Where nothing fooled the model, return the highest-loss point.
    let out = select(&any_fooled, &x_best_adv, &x_best)?;
    Ok(Outcome::Done((out, trace)))
}
