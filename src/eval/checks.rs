//! The sanity checks of `evaluation.md`, run with every evaluation on its first `check_n` images
//! and shown next to the numbers they concern.
//!
//! The reference attack is the first iterative white-box attack of the list (PGD-20 at the
//! list's eps if there is none). A check that could not run says so (`passed: None`).

use serde::{Deserialize, Serialize};

use super::{AttackSpec, Images, Report, Result, Settings, Subject, craft, share};
use crate::attack::{self, AttackConfig, AttackKind, Threat, loss};
use crate::observe::{Observer, Outcome, Progress};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SanityCheck {
    pub name: String,
    /// `None`: not run, with the reason in `detail`.
    pub passed: Option<bool>,
    pub detail: String,
    /// The result this check casts doubt on when it fails.
    pub concerns: String,
}

fn check(name: &str, passed: Option<bool>, detail: String, concerns: &str) -> SanityCheck {
    SanityCheck {
        name: name.into(),
        passed,
        detail,
        concerns: concerns.into(),
    }
}

/// Accuracy on `images` under `spec` (attacks run on the correctly classified ones).
fn accuracy_under(
    subject: &Subject,
    images: &Images,
    spec: &AttackSpec,
    seed: u64,
    obs: &mut dyn Observer,
) -> Result<Option<f64>> {
    let labels = images.labels();
    let mut correct = vec![false; labels.len()];
    for (k, idx) in images.batches().enumerate() {
        let pos: Vec<usize> = idx
            .iter()
            .map(|i| images.indices.iter().position(|j| j == i).expect("own index"))
            .collect();
        let xs = images.tensor(idx, &subject.model.device())?;
        let y: Vec<u32> = pos.iter().map(|&p| labels[p]).collect();
        let pred = attack::predict(subject.model, &xs)?;
        let keep: Vec<usize> = (0..idx.len()).filter(|&j| pred[j] == y[j]).collect();
        if keep.is_empty() {
            continue;
        }
        let sub = attack::take_rows(&xs, &keep)?;
        let sub_y: Vec<u32> = keep.iter().map(|&j| y[j]).collect();
        let stop = || obs.stop_requested();
        let Some(adv) = craft(
            spec,
            subject.model,
            None,
            &sub,
            &sub_y,
            seed.wrapping_add(k as u64),
            &stop,
        )?
        else {
            return Ok(None);
        };
        for (&j, p) in keep.iter().zip(attack::predict(subject.model, &adv)?) {
            correct[pos[j]] = p == y[j];
        }
    }
    Ok(Some(share(&correct)))
}

pub(super) fn run(
    subject: &Subject,
    all: &Images,
    report: &Report,
    settings: &Settings,
    obs: &mut dyn Observer,
) -> Result<Outcome<Vec<SanityCheck>>> {
    let n = settings.check_n.min(all.indices.len()).max(1);
    let images = Images {
        data: all.data,
        indices: all.indices[..n].to_vec(),
        batch_size: all.batch_size,
    };
    let reference = settings
        .attacks
        .iter()
        .find_map(|s| match s {
            AttackSpec::Single(c) if c.kind.is_white_box() && c.kind != AttackKind::Fgsm => Some(c.clone()),
            _ => None,
        })
        .unwrap_or_else(|| {
            let eps = settings
                .attacks
                .iter()
                .flat_map(|s| s.components())
                .map(|c| c.eps)
                .next()
                .unwrap_or(0.1);
            let mut c = AttackConfig::new(AttackKind::Pgd, eps);
            c.threat = settings
                .attacks
                .iter()
                .flat_map(|s| s.components())
                .map(|c| c.threat)
                .next()
                .unwrap_or(Threat::Linf);
            c
        });
    let rl = reference.label();
    let seed = settings.seed;
    let mut out = Vec::new();
    let total = 7;
    let mut step = 0;
    let mut tick = |obs: &mut dyn Observer, what: &str| {
        step += 1;
        obs.progress(&Progress {
            stage: format!("sanity checks on {n} images: {what}"),
            done: step,
            total,
        });
    };
    macro_rules! acc {
        ($cfg:expr) => {
            match accuracy_under(subject, &images, &AttackSpec::Single($cfg), seed, obs)? {
                Some(a) => a,
                None => return Ok(Outcome::Cancelled),
            }
        };
    }
    let with = |f: &dyn Fn(&mut AttackConfig)| {
        let mut c = reference.clone();
        f(&mut c);
        c
    };
    let clean = match accuracy_under(subject, &images, &AttackSpec::Single(with(&|c| c.eps = 0.0)), seed, obs)? {
        Some(a) => a,
        None => return Ok(Outcome::Cancelled),
    };
    let labels = images.labels();
    let clean_direct = {
        let mut right = 0;
        for idx in images.batches() {
            let pred = attack::predict(subject.model, &images.tensor(idx, &subject.model.device())?)?;
            right += idx.iter().zip(pred).filter(|(i, p)| labels[**i] == *p).count();
        }
        right as f64 / n as f64
    };
    tick(obs, "eps = 0");
    out.push(check(
        "eps = 0 reproduces clean accuracy",
        Some(clean == clean_direct),
        format!(
            "{rl} at eps 0: {:.2}%; clean: {:.2}% ({n} images)",
            100.0 * clean,
            100.0 * clean_direct
        ),
        "clean accuracy",
    ));
    // Accuracy over a grid of eps, up to a large one where it must reach chance.
    let eps = reference.eps;
    let large = match reference.threat {
        Threat::Linf => 0.5,
        Threat::L2 => 0.5 * (all.data.image_len() as f64).sqrt(),
    };
    let mut grid: Vec<f64> = vec![eps / 4.0, eps / 2.0, eps, (2.0 * eps).min(large)];
    grid.push(large);
    grid.dedup();
    let mut accs = vec![clean];
    for &e in &grid {
        accs.push(acc!(with(&|c| c.eps = e)));
    }
    tick(obs, "eps sweep");
    let tol = 1.0 / n as f64;
    let rises: Vec<String> = accs
        .windows(2)
        .zip(
            std::iter::once(0.0)
                .chain(grid.iter().copied())
                .collect::<Vec<_>>()
                .windows(2),
        )
        .filter(|(a, _)| a[1] > a[0] + tol)
        .map(|(a, e)| {
            format!(
                "{:.2}% at eps {:.4} -> {:.2}% at eps {:.4}",
                100.0 * a[0],
                e[0],
                100.0 * a[1],
                e[1]
            )
        })
        .collect();
    let sweep: Vec<String> = std::iter::once(0.0)
        .chain(grid.iter().copied())
        .zip(&accs)
        .map(|(e, a)| format!("{e:.4}: {:.2}%", 100.0 * a))
        .collect();
    out.push(check(
        "accuracy does not rise with eps",
        Some(rises.is_empty()),
        format!(
            "{}; tolerance one image{}",
            sweep.join(", "),
            if rises.is_empty() {
                String::new()
            } else {
                format!("; rises: {}", rises.join("; "))
            }
        ),
        &rl,
    ));
    let chance = 1.0 / all.data.num_classes().max(1) as f64;
    let at_large = *accs.last().expect("grid is not empty");
    out.push(check(
        "a large eps reaches chance or below",
        Some(at_large <= chance),
        format!(
            "{:.2}% at eps {large:.4} ({}); chance {:.2}%",
            100.0 * at_large,
            reference.threat.name(),
            100.0 * chance
        ),
        &rl,
    ));
    let reference_acc = acc!(reference.clone());
    let fgsm = acc!({
        let mut c = AttackConfig::new(AttackKind::Fgsm, eps);
        c.threat = reference.threat;
        c
    });
    tick(obs, "FGSM");
    out.push(check(
        "iterative attack at least as strong as single-step",
        Some(reference_acc <= fgsm + tol),
        format!("{rl}: {:.2}%; FGSM: {:.2}%", 100.0 * reference_acc, 100.0 * fgsm),
        &rl,
    ));
    // White-box against gradient-free: Square from the list over all images, else a short one here.
    let white = report
        .attacks
        .iter()
        .filter(|a| a.spec.is_white_box())
        .map(|a| a.robust_accuracy)
        .fold(f64::INFINITY, f64::min);
    let black: Vec<(String, f64)> = report
        .attacks
        .iter()
        .filter(|a| !a.spec.is_white_box() && !matches!(&a.spec, AttackSpec::Single(c) if c.kind == AttackKind::Noise))
        .map(|a| (a.label.clone(), a.robust_accuracy))
        .collect();
    if white.is_finite() && !black.is_empty() {
        let worse: Vec<&(String, f64)> = black
            .iter()
            .filter(|(_, b)| white > b + 1.0 / report.record.n_images as f64)
            .collect();
        out.push(check(
            "white-box at least as strong as gradient-free and transfer",
            Some(worse.is_empty()),
            format!(
                "strongest white-box: {:.2}%; {}",
                100.0 * white,
                black
                    .iter()
                    .map(|(l, a)| format!("{l}: {:.2}%", 100.0 * a))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            "robust accuracy",
        ));
    } else if reference.threat == Threat::Linf {
        let mut sq = AttackConfig::new(AttackKind::Square, eps);
        sq.steps = Some(100);
        let square = acc!(sq.clone());
        out.push(check(
            "white-box at least as strong as gradient-free",
            Some(reference_acc <= square + tol),
            format!(
                "{rl}: {:.2}%; {}: {:.2}%",
                100.0 * reference_acc,
                sq.label(),
                100.0 * square
            ),
            &rl,
        ));
    } else {
        out.push(check(
            "white-box at least as strong as gradient-free",
            None,
            "no gradient-free L2 attack is implemented".into(),
            &rl,
        ));
    }
    tick(obs, "gradient-free");
    let doubled = acc!(with(&|c| c.steps = Some(2 * c.steps())));
    let conv_tol = (2.0 / n as f64).max(0.02);
    tick(obs, "doubled steps");
    out.push(check(
        "converged: doubling the steps changes little",
        Some((doubled - reference_acc).abs() <= conv_tol),
        format!(
            "{}: {:.2}%; {rl}: {:.2}%; tolerance {:.2} points",
            with(&|c| c.steps = Some(2 * c.steps())).label(),
            100.0 * doubled,
            100.0 * reference_acc,
            100.0 * conv_tol
        ),
        &rl,
    ));
    let noise = acc!({
        let mut c = AttackConfig::new(AttackKind::Noise, eps);
        c.threat = reference.threat;
        c
    });
    tick(obs, "noise");
    out.push(check(
        "random noise hurts less than the attack",
        Some(noise + tol >= reference_acc),
        format!(
            "uniform noise in the ball: {:.2}%; {rl}: {:.2}%",
            100.0 * noise,
            100.0 * reference_acc
        ),
        &rl,
    ));
    // Gradients reach the input, and (AW-Net) through the router.
    let m = 16.min(n);
    let xs = images.tensor(&images.indices[..m], &subject.model.device())?;
    let (_, g, _) = attack::loss_and_grad(subject.model, &xs, &labels[..m], None, attack::Objective::Ce)?;
    let zero = |g: &candle_core::Tensor| -> Result<usize> {
        let norms = g
            .abs()?
            .flatten_from(1)?
            .sum(1)?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        Ok(norms.iter().filter(|&&v| !(v > 0.0 && v.is_finite())).count())
    };
    let zero_cls = zero(&g)?;
    let mut detail = format!("{zero_cls} of {m} images with a zero or non-finite classifier input gradient");
    let mut ok = zero_cls == 0;
    if subject.is_awnet {
        let var = candle_core::Var::from_tensor(&xs)?;
        let out_f = subject.model.forward(var.as_tensor())?;
        let clean = vec![0u32; m];
        let type_loss = loss::cross_entropy(out_f.type_logits.as_ref().expect("AW-Net has a type head"), &clean)?;
        let grads = type_loss.sum_all()?.backward()?;
        let zero_router = match grads.get(var.as_tensor()) {
            Some(g) => zero(g)?,
            None => m,
        };
        ok &= zero_router == 0;
        detail.push_str(&format!(
            "; {zero_router} of {m} with a zero router (type head) input gradient"
        ));
    }
    tick(obs, "gradients");
    out.push(check(
        "input gradients are non-zero (no masking)",
        Some(ok),
        detail,
        "robust accuracy",
    ));
    Ok(Outcome::Done(out))
}
