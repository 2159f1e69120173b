//! FGSM, PGD (also CW-inf and the adaptive attack, which are PGD on other objectives) and MI-FGSM.

use candle_core::Tensor;
use rand::rngs::StdRng;

use super::{
    AttackConfig, AttackKind, AttackRun, Classifier, Result, ascent, fooled, loss_and_grad, project, random_in_ball,
    select,
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
    let targets = cfg.target.map(|t| vec![t; labels.len()]);
    let target = targets.as_deref();
    let restarts = if matches!(cfg.kind, AttackKind::Fgsm | AttackKind::MiFgsm) {
        1
    } else {
        cfg.restarts
    };
    let mut best: Option<(Tensor, Vec<bool>, Vec<f32>)> = None;
    let mut trace = Vec::new();
    for _ in 0..restarts {
        let start = if cfg.random_start {
            project(
                &(x + random_in_ball(x, cfg.eps, cfg.threat, rng)?)?,
                x,
                cfg.eps,
                cfg.threat,
            )?
        } else {
            x.clone()
        };
        let Outcome::Done((adv, run_trace)) = iterate(model, x, start, labels, target, cfg, stop)? else {
            return Ok(Outcome::Cancelled);
        };
        if trace.is_empty() {
            trace = run_trace;
        }
        if restarts == 1 {
            return Ok(Outcome::Done(AttackRun { adv, trace }));
        }
        // Per example, keep the restart that fooled the model, else the one with the higher loss.
        let (loss, _, pred) = loss_and_grad(model, &adv, labels, target, cfg.objective())?;
        let ok = fooled(&pred, labels, target);
        best = Some(match best {
            None => (adv, ok, loss),
            Some((b_adv, b_ok, b_loss)) => {
                let take: Vec<bool> = (0..labels.len())
                    .map(|i| (ok[i], loss[i]) > (b_ok[i], b_loss[i]))
                    .collect();
                let adv = select(&take, &adv, &b_adv)?;
                let ok = (0..labels.len())
                    .map(|i| if take[i] { ok[i] } else { b_ok[i] })
                    .collect();
                let loss = (0..labels.len())
                    .map(|i| if take[i] { loss[i] } else { b_loss[i] })
                    .collect();
                (adv, ok, loss)
            }
        });
    }
    let (adv, _, _) = best.expect("at least one restart ran");
    Ok(Outcome::Done(AttackRun { adv, trace }))
}

/// One run from `start`: `steps` signed-gradient (L-inf) or normalised-gradient (L2) steps with
/// projection; MI-FGSM accumulates L1-normalised gradients with momentum first.
fn iterate(
    model: &dyn Classifier,
    x: &Tensor,
    start: Tensor,
    labels: &[u32],
    target: Option<&[u32]>,
    cfg: &AttackConfig,
    stop: &dyn Fn() -> bool,
) -> Result<Outcome<(Tensor, Vec<f64>)>> {
    let obj = cfg.objective();
    let alpha = cfg.step_size();
    let mut adv = start;
    let mut momentum: Option<Tensor> = None;
    let mut trace = Vec::with_capacity(cfg.steps() + 1);
    for _ in 0..cfg.steps() {
        if stop() {
            return Ok(Outcome::Cancelled);
        }
        let (loss, mut grad, _) = loss_and_grad(model, &adv, labels, target, obj)?;
        trace.push(mean(&loss));
        if cfg.kind == AttackKind::MiFgsm {
            let b = grad.dim(0)?;
            let l1 = grad.abs()?.flatten_from(1)?.mean_keepdim(1)?.reshape((b, 1, 1, 1))?;
            grad = grad.broadcast_div(&(l1 + 1e-12)?)?;
            if let Some(m) = &momentum {
                grad = (grad + (m * cfg.decay)?)?;
            }
            momentum = Some(grad.clone());
        }
        adv = project(&(&adv + (ascent(&grad, cfg.threat)? * alpha)?)?, x, cfg.eps, cfg.threat)?;
    }
    let (loss, _, _) = loss_and_grad(model, &adv, labels, target, obj)?;
    trace.push(mean(&loss));
    Ok(Outcome::Done((adv, trace)))
}

pub(super) fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len().max(1) as f64
}
