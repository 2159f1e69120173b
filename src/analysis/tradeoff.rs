//! Accuracy against eps for one model under one attack, with the sanity checks that concern it.

use serde::Serialize;

use crate::attack::{AttackConfig, format_eps};
use crate::data::{Dataset, Split};
use crate::eval::{self, AttackSpec, EvalError, Settings, Subject, checks::SanityCheck};
use crate::model::Model;
use crate::observe::{Observer, Outcome};

/// One model's curve.
#[derive(Clone, Debug, Serialize)]
pub struct Curve {
    pub model: String,
    pub file: String,
    pub sha256: String,
    /// The attack at the first radius, fully labelled (the radius varies along the curve).
    pub attack: String,
    pub n: usize,
    pub clean_accuracy: f64,
    /// `(eps, robust accuracy)`: an image counts if classified right clean and under the attack.
    pub points: Vec<(f64, f64)>,
    /// The sanity checks, run at the largest radius.
    pub checks: Vec<SanityCheck>,
}

/// Sweeps `eps` for `model` on the first `n` test images of `data`.
pub fn sweep_model(
    model: &Model,
    data: &Dataset,
    n: usize,
    attack: &AttackConfig,
    eps: &[f64],
    obs: &mut dyn Observer,
) -> Result<Outcome<Curve>, EvalError> {
    let net = model
        .frozen()
        .map_err(|e| EvalError::Settings(format!("cannot prepare the model ({e})")))?;
    let (file, sha256) = model.meta.file.clone().unwrap_or_default();
    let name = file
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let subject = Subject {
        model: &net,
        is_awnet: net.is_awnet(),
        name: name.clone(),
        file: file.display().to_string(),
        sha256: sha256.clone(),
    };
    let settings = Settings {
        attacks: vec![AttackSpec::Single(attack.clone())],
        batch_size: 128,
        seed: attack.seed,
        checks: true,
        check_n: n.min(100),
    };
    let n = n.min(data.len());
    let Outcome::Done(reports) = eval::sweep(&subject, None, data, Split::Test, n, &settings, eps, obs)? else {
        return Ok(Outcome::Cancelled);
    };
    let clean = reports.first().map_or(f64::NAN, |r| r.clean_accuracy);
    Ok(Outcome::Done(Curve {
        model: name,
        file: file.display().to_string(),
        sha256,
        attack: {
            let (lo, hi) = (
                eps.iter().copied().fold(f64::INFINITY, f64::min),
                eps.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            );
            let at_largest = AttackConfig {
                eps: hi,
                ..attack.clone()
            };
            format!(
                "{}; eps swept from {} to {}, the step size scaling with it",
                at_largest.label(),
                format_eps(lo),
                format_eps(hi)
            )
        },
        n,
        clean_accuracy: clean,
        points: eps
            .iter()
            .zip(&reports)
            .map(|(&e, r)| (e, r.attacks.first().map_or(f64::NAN, |a| a.robust_accuracy)))
            .collect(),
        checks: reports.last().map(|r| r.checks.clone()).unwrap_or_default(),
    }))
}
