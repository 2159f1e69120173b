//! Adversarial attacks over one narrow trait: images in [0, 1] in, logits (and, for AW-Net, the
//! router's taps) out, always in inference mode.
//!
//! FGSM, PGD (L-inf and L2, random start, restarts), MI-FGSM, CW-inf (PGD on the Carlini-Wagner
//! margin), APGD-CE and targeted APGD-DLR (AutoAttack's step-size schedule and checkpoints),
//! Square (L-inf, query budget), uniform noise, and the adaptive attack on AW-Net. A transfer
//! attack is any of these crafted on one model and scored on another (see `eval`).

mod apgd;
pub mod lab;
pub mod loss;
mod pgd;
mod square;

use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

pub use loss::Objective;

use crate::model::plain::Plain;
use crate::model::{Forward, ModelError, Network};
use crate::observe::Outcome;

#[derive(Debug, thiserror::Error)]
pub enum AttackError {
    #[error("invalid attack settings: {0}")]
    Settings(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, AttackError>;

/// A model under attack: `[b, c, h, w]` in [0, 1] to its forward pass, in inference mode.
pub trait Classifier {
    fn forward(&self, xs: &Tensor) -> std::result::Result<Forward, ModelError>;

    /// The hand-written inference path of [`crate::model::plain`], where the model has one;
    /// attacks take their gradients from it instead of autograd.
    fn plain(&self) -> std::result::Result<Option<Arc<Plain>>, ModelError> {
        Ok(None)
    }

    /// The plain path if it is made already (a [`Snapshot`]'s): [`predict`] runs through it.
    fn prepared(&self) -> Option<&Plain> {
        None
    }

    /// Where the weights live; inputs go there.
    fn device(&self) -> Device;
}

/// A model with its plain path made once (taking it copies every weight out of its tensor, folds
/// the BatchNorms and, on first use, transforms the Winograd layers' filters), for the many
/// gradient steps of one attack or the many batches of one evaluation. The model's weights must
/// not change while it lives.
pub struct Snapshot<'a> {
    model: &'a dyn Classifier,
    plain: Option<Arc<Plain>>,
}

impl<'a> Snapshot<'a> {
    pub fn new(model: &'a dyn Classifier) -> Result<Self> {
        Ok(Self {
            model,
            plain: model.plain()?,
        })
    }
}

impl Classifier for Snapshot<'_> {
    fn forward(&self, xs: &Tensor) -> std::result::Result<Forward, ModelError> {
        self.model.forward(xs)
    }

    fn plain(&self) -> std::result::Result<Option<Arc<Plain>>, ModelError> {
        Ok(self.plain.clone())
    }

    fn prepared(&self) -> Option<&Plain> {
        self.plain.as_deref()
    }

    fn device(&self) -> Device {
        self.model.device()
    }
}

impl Classifier for Network {
    fn forward(&self, xs: &Tensor) -> std::result::Result<Forward, ModelError> {
        Network::forward(self, xs, crate::model::Mode::Eval)
    }

    fn plain(&self) -> std::result::Result<Option<Arc<Plain>>, ModelError> {
        Ok(Network::plain(self)?.map(Arc::new))
    }

    fn device(&self) -> Device {
        Network::device(self)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    Fgsm,
    Pgd,
    MiFgsm,
    /// PGD on the Carlini-Wagner margin loss.
    Cw,
    ApgdCe,
    /// Targeted APGD on the DLR loss over the top other classes (AutoAttack's APGD-T).
    ApgdDlr,
    Square,
    /// Uniform noise in the L-inf ball, or noise of norm eps for L2.
    Noise,
    /// PGD on `CE(z, y) - lambda * CE(type, clean)`: through the router, keeping it convinced.
    Adaptive,
}

impl AttackKind {
    /// Every attack, in the order the views list them.
    pub const ALL: [AttackKind; 9] = [
        Self::Fgsm,
        Self::Pgd,
        Self::MiFgsm,
        Self::Cw,
        Self::ApgdCe,
        Self::ApgdDlr,
        Self::Square,
        Self::Noise,
        Self::Adaptive,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Fgsm => "FGSM",
            Self::Pgd => "PGD",
            Self::MiFgsm => "MI-FGSM",
            Self::Cw => "CW-inf",
            Self::ApgdCe => "APGD-CE",
            Self::ApgdDlr => "APGD-T (DLR)",
            Self::Square => "Square",
            Self::Noise => "Noise",
            Self::Adaptive => "Adaptive",
        }
    }

    /// Uses the model's gradient.
    pub fn is_white_box(self) -> bool {
        !matches!(self, Self::Square | Self::Noise)
    }

    pub fn default_steps(self) -> usize {
        match self {
            Self::Fgsm | Self::Noise => 1,
            Self::Pgd | Self::Cw | Self::Adaptive => 20,
            Self::MiFgsm => 10,
            Self::ApgdCe | Self::ApgdDlr => 100,
            Self::Square => 1000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Threat {
    Linf,
    L2,
}

impl Threat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Linf => "L-inf",
            Self::L2 => "L2",
        }
    }
}

/// Every setting of one attack. `None` fields take the attack's default, shown in [`Self::label`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttackConfig {
    pub kind: AttackKind,
    pub threat: Threat,
    /// Radius in pixel units of [0, 1].
    pub eps: f64,
    /// Iterations; for Square, the query budget.
    pub steps: Option<usize>,
    pub step_size: Option<f64>,
    pub restarts: usize,
    /// PGD-style attacks start from a uniform random point in the ball when true, from the image
    /// itself when false.
    pub random_start: bool,
    /// A class to push every example towards; `None` is untargeted.
    pub target: Option<u32>,
    /// Weight of the router term in the adaptive attack.
    pub lambda: f64,
    /// MI-FGSM's momentum decay.
    pub decay: f64,
    /// APGD-T: how many of the highest other classes are tried as targets.
    pub target_classes: usize,
    pub seed: u64,
}

impl AttackConfig {
    pub fn new(kind: AttackKind, eps: f64) -> Self {
        Self {
            kind,
            threat: Threat::Linf,
            eps,
            steps: None,
            step_size: None,
            restarts: 1,
            random_start: !matches!(kind, AttackKind::Fgsm | AttackKind::MiFgsm),
            target: None,
            lambda: 1.0,
            decay: 1.0,
            target_classes: 9,
            seed: 0,
        }
    }

    pub fn steps(&self) -> usize {
        self.steps.unwrap_or(self.kind.default_steps()).max(1)
    }

    /// PGD family: `2.5 * eps / steps` (Madry et al.); MI-FGSM: `eps / steps`; FGSM: `eps`.
    /// APGD adapts its own, starting at `2 * eps`.
    pub fn step_size(&self) -> f64 {
        self.step_size.unwrap_or(match self.kind {
            AttackKind::Fgsm => self.eps,
            AttackKind::MiFgsm => self.eps / self.steps() as f64,
            AttackKind::ApgdCe | AttackKind::ApgdDlr => 2.0 * self.eps,
            _ => 2.5 * self.eps / self.steps() as f64,
        })
    }

    pub fn objective(&self) -> Objective {
        match self.kind {
            AttackKind::Cw => Objective::Cw,
            AttackKind::ApgdDlr => Objective::Dlr,
            AttackKind::Adaptive => Objective::Adaptive { lambda: self.lambda },
            _ => Objective::Ce,
        }
    }

    /// A complete label: attack, norm, eps (both ways), steps, step size, restarts, start, seed.
    pub fn label(&self) -> String {
        let mut parts = vec![self.threat.name().to_string(), format!("eps {}", format_eps(self.eps))];
        let k = self.kind;
        match k {
            AttackKind::Fgsm | AttackKind::Noise => {}
            AttackKind::Square => parts.push(format!("{} queries", self.steps())),
            _ => {
                parts.push(format!("{} steps", self.steps()));
                if matches!(k, AttackKind::ApgdCe | AttackKind::ApgdDlr) {
                    parts.push("adaptive step from 2 eps".into());
                } else {
                    parts.push(format!("step {:.4}", self.step_size()));
                }
            }
        }
        if matches!(
            k,
            AttackKind::Pgd | AttackKind::Cw | AttackKind::Adaptive | AttackKind::ApgdCe | AttackKind::ApgdDlr
        ) {
            parts.push(format!(
                "{} restart{}",
                self.restarts,
                if self.restarts == 1 { "" } else { "s" }
            ));
        }
        if matches!(k, AttackKind::Pgd | AttackKind::Cw | AttackKind::Adaptive) {
            parts.push(if self.random_start {
                "random start".into()
            } else {
                "start at the image".into()
            });
        }
        if k == AttackKind::MiFgsm {
            parts.push(format!("decay {}", self.decay));
        }
        if k == AttackKind::Adaptive {
            parts.push(format!("lambda {}", self.lambda));
        }
        if k == AttackKind::ApgdDlr {
            parts.push(format!("{} target classes", self.target_classes));
        }
        if let Some(t) = self.target {
            parts.push(format!("targeted at class {t}"));
        }
        parts.push(format!("seed {}", self.seed));
        let name = match k {
            AttackKind::Pgd | AttackKind::Cw | AttackKind::Adaptive | AttackKind::ApgdCe => {
                format!("{}-{}", k.name(), self.steps())
            }
            _ => k.name().to_string(),
        };
        format!("{name} ({})", parts.join(", "))
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(AttackError::Settings(m));
        if !(self.eps.is_finite() && (0.0..=1.0).contains(&self.eps)) {
            return bad(format!("eps {} is outside [0, 1]", self.eps));
        }
        if let Some(s) = self.step_size
            && !(s.is_finite() && s >= 0.0)
        {
            return bad(format!("step size {s}"));
        }
        if self.restarts == 0 || self.restarts > 100 {
            return bad(format!("{} restarts (1 to 100)", self.restarts));
        }
        if self.steps() > 100_000 {
            return bad(format!("{} steps", self.steps()));
        }
        if self.kind == AttackKind::Square && self.threat != Threat::Linf {
            return bad("Square is implemented for L-inf only".into());
        }
        if self.target.is_some() && matches!(self.kind, AttackKind::Square | AttackKind::Noise | AttackKind::ApgdDlr) {
            return bad(format!(
                "{} takes no user target (APGD-T picks its own)",
                self.kind.name()
            ));
        }
        Ok(())
    }
}

/// Parses eps as a number or a fraction: `0.1`, `8/255`.
pub fn parse_eps(s: &str) -> std::result::Result<f64, String> {
    let s = s.trim();
    let v = match s.split_once('/') {
        Some((a, b)) => {
            let a: f64 = a
                .trim()
                .parse()
                .map_err(|_| format!("'{s}' is not a number or fraction"))?;
            let b: f64 = b
                .trim()
                .parse()
                .map_err(|_| format!("'{s}' is not a number or fraction"))?;
            if b == 0.0 {
                return Err(format!("'{s}' divides by zero"));
            }
            a / b
        }
        None => s
            .parse()
            .map_err(|_| format!("'{s}' is not a number or fraction like 8/255"))?,
    };
    if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
        return Err(format!("eps {v} is outside [0, 1] (pixel units)"));
    }
    Ok(v)
}

/// eps both ways: `0.0314 (8/255)`.
pub fn format_eps(eps: f64) -> String {
    let n = eps * 255.0;
    if (n - n.round()).abs() < 1e-6 {
        format!("{eps:.4} ({}/255)", n.round())
    } else {
        format!("{eps:.4} ({n:.2}/255)")
    }
}

/// What an attack produced.
#[derive(Clone, Debug)]
pub struct AttackRun {
    /// `[b, c, h, w]`, inside the eps-ball around the input and inside [0, 1].
    pub adv: Tensor,
    /// Mean objective over the batch after each iteration (the first is the starting point).
    pub trace: Vec<f64>,
}

/// Runs one attack on a batch. `labels` are the true classes; `stop` is polled every iteration.
pub fn run(
    model: &dyn Classifier,
    xs: &Tensor,
    labels: &[u32],
    cfg: &AttackConfig,
    stop: &dyn Fn() -> bool,
) -> Result<Outcome<AttackRun>> {
    cfg.validate()?;
    let b = xs.dim(0)?;
    if labels.len() != b {
        return Err(AttackError::Settings(format!("{} labels for {b} images", labels.len())));
    }
    let xs = xs.to_dtype(DType::F32)?.detach();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let snapshot = Snapshot::new(model)?;
    let model: &dyn Classifier = &snapshot;
    if b == 0 {
        return Ok(Outcome::Done(AttackRun {
            adv: xs,
            trace: Vec::new(),
        }));
    }
    match cfg.kind {
        AttackKind::Noise => {
            let adv = project(
                &(&xs + random_in_ball(&xs, cfg.eps, cfg.threat, &mut rng)?)?,
                &xs,
                cfg.eps,
                cfg.threat,
            )?;
            Ok(Outcome::Done(AttackRun { adv, trace: Vec::new() }))
        }
        AttackKind::Square => square::run(model, &xs, labels, cfg, &mut rng, stop),
        AttackKind::ApgdCe | AttackKind::ApgdDlr => apgd::run(model, &xs, labels, cfg, &mut rng, stop),
        _ => pgd::run(model, &xs, labels, cfg, &mut rng, stop),
    }
}

/// Class predictions, `[b]`: through the plain path when the model has it made (a
/// [`Snapshot`]), else through candle's graph.
pub fn predict(model: &dyn Classifier, xs: &Tensor) -> Result<Vec<u32>> {
    if let Some(plain) = model.prepared()
        && xs.dtype() == DType::F32
        && xs.device().is_cpu()
    {
        let b = xs.dim(0)?;
        let logits = plain.forward(&xs.flatten_all()?.to_vec1::<f32>()?, b)?.logits;
        return Ok(argmax_rows(&logits, b));
    }
    Ok(model.forward(xs)?.logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

/// The class of each of `b` rows of logits: its first maximum, as candle's argmax.
fn argmax_rows(logits: &[f32], b: usize) -> Vec<u32> {
    let k = logits.len() / b.max(1);
    logits
        .chunks(k.max(1))
        .map(|row| {
            row.iter()
                .enumerate()
                .fold(0, |m, (i, v)| if *v > row[m] { i } else { m }) as u32
        })
        .collect()
}

/// Has each example reached the attacker's goal (misclassified, or at its target)?
pub(crate) fn fooled(pred: &[u32], labels: &[u32], target: Option<&[u32]>) -> Vec<bool> {
    match target {
        None => pred.iter().zip(labels).map(|(p, l)| p != l).collect(),
        Some(t) => pred.iter().zip(t).map(|(p, t)| p == t).collect(),
    }
}

/// Objective per example and its gradient with respect to the input.
pub fn loss_and_grad(
    model: &dyn Classifier,
    x: &Tensor,
    labels: &[u32],
    target: Option<&[u32]>,
    obj: Objective,
) -> Result<(Vec<f32>, Tensor, Vec<u32>)> {
    if x.dtype() == DType::F32
        && x.device().is_cpu()
        && let Some(plain) = model.plain()?
    {
        return plain_loss_and_grad(&plain, x, labels, target, obj);
    }
    let var = candle_core::Var::from_tensor(&x.detach())?;
    let out = model.forward(var.as_tensor())?;
    let loss = loss::objective(&out, labels, target, obj)?;
    let mut grads = loss.sum_all()?.backward()?;
    // Detached, so nothing keeps this step's graph alive.
    let grad = grads
        .remove(var.as_tensor())
        .ok_or_else(|| AttackError::Settings("the model gives no gradient for its input".into()))?
        .detach();
    let pred = out.logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok((loss.to_dtype(DType::F32)?.to_vec1::<f32>()?, grad, pred))
}

/// [`loss_and_grad`] through the hand-written path: the objective itself still goes through
/// `loss::objective` (on the `[b, classes]` logits, with autograd for their gradient), so both
/// routes climb exactly the same function.
fn plain_loss_and_grad(
    plain: &Plain,
    x: &Tensor,
    labels: &[u32],
    target: Option<&[u32]>,
    obj: Objective,
) -> Result<(Vec<f32>, Tensor, Vec<u32>)> {
    let (losses, grad, logits) = plain_objective_grad(plain, x, &|fwd| loss::objective(fwd, labels, target, obj))?;
    Ok((losses, grad, argmax_rows(&logits, x.dim(0)?)))
}

/// The per-example `objective` of the model's output and its gradient with respect to the input
/// `x` (f32, on the CPU), through the hand-written path; also the `[b, classes]` logits. The
/// objective sees the logits and type logits (as leaves of a small autograd graph), not the
/// signals.
pub(crate) fn plain_objective_grad(
    plain: &Plain,
    x: &Tensor,
    objective: &dyn Fn(&Forward) -> candle_core::Result<Tensor>,
) -> Result<(Vec<f32>, Tensor, Vec<f32>)> {
    let b = x.dim(0)?;
    let dev = x.device();
    let pixels = x.flatten_all()?.to_vec1::<f32>()?;
    let mut losses = Vec::new();
    let (out, dx) = plain.input_grad(&pixels, b, |o| {
        let k = o.logits.len() / b.max(1);
        let z = candle_core::Var::from_vec(o.logits.clone(), (b, k), dev)?;
        let t = o
            .type_logits
            .as_ref()
            .map(|t| candle_core::Var::from_vec(t.clone(), (b, 2), dev))
            .transpose()?;
        let fwd = Forward {
            logits: z.as_tensor().clone(),
            type_logits: t.as_ref().map(|t| t.as_tensor().clone()),
            signals: Vec::new(),
        };
        let loss = objective(&fwd)?;
        let grads = loss.sum_all()?.backward()?;
        let flat = |v: &candle_core::Var| {
            grads
                .get(v.as_tensor())
                .map(|g| g.flatten_all()?.to_vec1::<f32>())
                .transpose()
        };
        let dz = flat(&z)?.unwrap_or_else(|| vec![0.0; b * k]);
        let dt = t.as_ref().map(flat).transpose()?.flatten();
        losses = loss.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok((dz, dt))
    })?;
    Ok((losses, Tensor::from_vec(dx, x.shape(), dev)?, out.logits))
}

/// Back into the eps-ball around `x` and into [0, 1].
pub(crate) fn project(adv: &Tensor, x: &Tensor, eps: f64, threat: Threat) -> Result<Tensor> {
    let projected = match threat {
        Threat::Linf => adv.maximum(&(x - eps)?)?.minimum(&(x + eps)?)?,
        Threat::L2 => {
            let delta = (adv - x)?;
            let norm = per_example_norm(&delta)?;
            let factor = (eps / (norm + 1e-12)?)?.clamp(0.0, 1.0)?;
            (x + delta.broadcast_mul(&factor)?)?
        }
    };
    Ok(projected.clamp(0.0, 1.0)?)
}

/// Into the L-inf ball around `x` and into [0, 1] (for training's own PGD).
pub fn project_linf(adv: &Tensor, x: &Tensor, eps: f64) -> Result<Tensor> {
    project(adv, x, eps, Threat::Linf)
}

/// L2 norm of each example, `[b, 1, 1, 1]`.
pub(crate) fn per_example_norm(t: &Tensor) -> Result<Tensor> {
    let b = t.dim(0)?;
    Ok(t.sqr()?
        .flatten_from(1)?
        .sum_keepdim(1)?
        .sqrt()?
        .reshape((b, 1, 1, 1))?)
}

/// The steepest-ascent direction of unit size for the threat: `sign(g)` or `g / ||g||_2`.
pub(crate) fn ascent(grad: &Tensor, threat: Threat) -> Result<Tensor> {
    Ok(match threat {
        Threat::Linf => grad.sign()?,
        Threat::L2 => grad.broadcast_div(&(per_example_norm(grad)? + 1e-12)?)?,
    })
}

/// Uniform in the L-inf ball, or of norm `eps` in a uniformly random direction for L2.
pub(crate) fn random_in_ball(x: &Tensor, eps: f64, threat: Threat, rng: &mut StdRng) -> Result<Tensor> {
    let n = x.elem_count();
    Ok(match threat {
        Threat::Linf => {
            let v: Vec<f32> = (0..n)
                .map(|_| (eps * (2.0 * rng.random::<f64>() - 1.0)) as f32)
                .collect();
            Tensor::from_vec(v, x.shape(), x.device())?
        }
        Threat::L2 => {
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    let (u1, u2) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
                    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
                })
                .collect();
            let g = Tensor::from_vec(v, x.shape(), x.device())?;
            (g.broadcast_div(&(per_example_norm(&g)? + 1e-12)?)? * eps)?
        }
    })
}

/// Rows of `a` where `mask` holds, rows of `b` elsewhere; `[b, ...]` each.
pub(crate) fn select(mask: &[bool], a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let m: Vec<u8> = mask.iter().map(|&m| u8::from(m)).collect();
    let mut shape = vec![m.len()];
    shape.extend(std::iter::repeat_n(1, a.rank() - 1));
    let m = Tensor::from_vec(m, shape, a.device())?.broadcast_as(a.shape())?;
    Ok(m.where_cond(a, b)?)
}

/// Rows `rows` of `t`, in that order.
pub fn take_rows(t: &Tensor, rows: &[usize]) -> candle_core::Result<Tensor> {
    let idx = Tensor::from_vec(
        rows.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        rows.len(),
        t.device(),
    )?;
    t.index_select(&idx, 0)
}

/// `dst` with row `rows[j]` replaced by row `j` of `src` wherever `take[j]` holds.
pub fn put_rows(dst: &Tensor, rows: &[usize], src: &Tensor, take: &[bool]) -> candle_core::Result<Tensor> {
    let mut out: Vec<Tensor> = (0..dst.dim(0)?)
        .map(|i| dst.narrow(0, i, 1))
        .collect::<candle_core::Result<_>>()?;
    for (j, &i) in rows.iter().enumerate() {
        if take[j] {
            out[i] = src.narrow(0, j, 1)?;
        }
    }
    Tensor::cat(&out, 0)
}

/// A per-example scalar as `[b, 1, 1, 1]`.
pub(crate) fn per_example(values: &[f32], like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![values.len()];
    shape.extend(std::iter::repeat_n(1, like.rank() - 1));
    Ok(Tensor::from_vec(values.to_vec(), shape, like.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eps_parses_both_ways_and_rejects_nonsense() {
        assert_eq!(parse_eps("8/255").unwrap(), 8.0 / 255.0);
        assert_eq!(parse_eps(" 0.1 ").unwrap(), 0.1);
        for bad in ["", "x", "1/0", "2", "-0.1", "8/x", "nan"] {
            assert!(parse_eps(bad).is_err(), "{bad}");
        }
        assert_eq!(format_eps(8.0 / 255.0), "0.0314 (8/255)");
        assert_eq!(format_eps(0.1), "0.1000 (25.50/255)");
    }

    #[test]
    fn labels_carry_every_setting() {
        let mut c = AttackConfig::new(AttackKind::Pgd, 0.1);
        c.restarts = 2;
        let l = c.label();
        for part in [
            "PGD-20",
            "L-inf",
            "eps 0.1000 (25.50/255)",
            "20 steps",
            "step 0.0125",
            "2 restarts",
            "random start",
            "seed 0",
        ] {
            assert!(l.contains(part), "{part} missing from {l}");
        }
        assert!(
            AttackConfig::new(AttackKind::ApgdDlr, 0.1)
                .label()
                .contains("9 target classes")
        );
    }
}
