//! Clean and robust accuracy, the per-example worst case over attacks, W-Robust, the router's
//! clean/adversarial separation, and the sanity checks of `evaluation.md`, each result carrying
//! the full record of what was run.
//!
//! The images are the first `n` of the dataset split, in order. Attacks run only on the examples
//! the model classifies correctly when clean (the others count as non-robust anyway).

pub mod checks;
pub mod roc;

use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::attack::{self, AttackConfig, AttackError, AttackKind, Classifier, Threat, format_eps};
use crate::data::{Dataset, Split};
use crate::observe::{Observer, Outcome, Progress};

pub use checks::SanityCheck;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("invalid evaluation settings: {0}")]
    Settings(String),
    #[error(transparent)]
    Attack(#[from] AttackError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, EvalError>;

/// Peak memory of attacking a batch, in copies of the float32 convolution outputs per image
/// ([`crate::model::Network::activations_per_image`]): peak RSS of `awnet eval --attack pgd` at
/// batch 32 and 512 grew by 992 KiB per image on the small CNN (3.3 copies); a margin on top.
pub const ATTACK_COPIES: u64 = 5;

/// One entry of the attack list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum AttackSpec {
    Single(AttackConfig),
    /// APGD-CE, then APGD-T, then Square on the examples still robust, as AutoAttack runs them.
    /// FAB-T, part of the standard AutoAttack, is not implemented.
    AutoAttack {
        eps: f64,
        threat: Threat,
        apgd_steps: usize,
        square_queries: usize,
        seed: u64,
    },
    /// Crafted on the source model, scored on the model under evaluation.
    Transfer {
        config: AttackConfig,
        source: String,
    },
}

impl AttackSpec {
    pub fn name(&self) -> String {
        match self {
            Self::Single(c) => serde_json::to_value(c.kind)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            Self::AutoAttack { .. } => "autoattack".into(),
            Self::Transfer { .. } => "transfer".into(),
        }
    }

    pub fn label(&self) -> String {
        match self {
            Self::Single(c) => c.label(),
            Self::AutoAttack {
                eps,
                threat,
                apgd_steps,
                square_queries,
                seed,
            } => format!(
                "AutoAttack-style worst case (APGD-CE, APGD-T with 9 targets, Square; FAB-T not implemented; {}, eps {}, {apgd_steps} APGD steps, {square_queries} Square queries, seed {seed})",
                threat.name(),
                format_eps(*eps)
            ),
            Self::Transfer { config, source } => format!("transfer of {} crafted on {source}", config.label()),
        }
    }

    /// The same attack at another radius.
    pub fn with_eps(&self, eps: f64) -> Self {
        match self.clone() {
            Self::Single(mut c) => {
                c.eps = eps;
                Self::Single(c)
            }
            Self::AutoAttack {
                threat,
                apgd_steps,
                square_queries,
                seed,
                ..
            } => Self::AutoAttack {
                eps,
                threat,
                apgd_steps,
                square_queries,
                seed,
            },
            Self::Transfer { mut config, source } => {
                config.eps = eps;
                Self::Transfer { config, source }
            }
        }
    }

    fn is_white_box(&self) -> bool {
        match self {
            Self::Single(c) => c.kind.is_white_box(),
            Self::AutoAttack { .. } => true,
            Self::Transfer { .. } => false,
        }
    }

    fn components(&self) -> Vec<AttackConfig> {
        match self {
            Self::Single(c) | Self::Transfer { config: c, .. } => vec![c.clone()],
            Self::AutoAttack {
                eps,
                threat,
                apgd_steps,
                square_queries,
                seed,
            } => {
                let make = |kind, steps| {
                    let mut c = AttackConfig::new(kind, *eps);
                    c.threat = *threat;
                    c.steps = Some(steps);
                    c.seed = *seed;
                    c
                };
                let mut v = vec![
                    make(AttackKind::ApgdCe, *apgd_steps),
                    make(AttackKind::ApgdDlr, *apgd_steps),
                ];
                if *threat == Threat::Linf {
                    v.push(make(AttackKind::Square, *square_queries));
                }
                v
            }
        }
    }
}

/// What a result was computed on and with: travels with every result and export.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub program: String,
    pub model_file: String,
    pub model_sha256: String,
    pub model: String,
    pub source_model: Option<String>,
    pub dataset: String,
    pub dataset_source: String,
    pub split: String,
    pub n_images: usize,
    pub first_image: usize,
    pub seed: u64,
    pub batch_size: usize,
    /// "full" when every setting is at least the defaults of a strong evaluation, else "quick".
    pub strength: String,
}

/// How well the router's type head tells clean from adversarial inputs, and what the signals do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterSeparation {
    /// Pairs (clean, adversarial) compared.
    pub n: usize,
    /// Share of the 2n inputs the type head labels right (p_adv >= 0.5 means adversarial).
    pub type_accuracy: f64,
    pub auc: f64,
    /// `(false positive rate, true positive rate)` with p_adv as the score.
    pub roc: Vec<(f64, f64)>,
    pub mean_p_adv_clean: f64,
    pub mean_p_adv_adversarial: f64,
    /// Per block, mean signal over filters and images.
    pub mean_signal_clean: Vec<f64>,
    pub mean_signal_adversarial: Vec<f64>,
    /// Per block and filter, mean signal over images.
    pub filter_signal_clean: Vec<Vec<f64>>,
    pub filter_signal_adversarial: Vec<Vec<f64>>,
    /// p_adv per input, for histograms.
    pub p_adv_clean: Vec<f64>,
    pub p_adv_adversarial: Vec<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttackResult {
    pub name: String,
    pub label: String,
    pub spec: AttackSpec,
    pub robust_accuracy: f64,
    pub n_robust: usize,
    /// `(clean + robust) / 2` for this attack.
    pub w_robust: f64,
    pub seconds: f64,
    /// Which of the images survived, in image order.
    pub robust: Vec<bool>,
    pub router: Option<RouterSeparation>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub record: Record,
    pub clean_accuracy: f64,
    pub n_clean_correct: usize,
    pub attacks: Vec<AttackResult>,
    /// Per example: robust only if it survived every attack in the list.
    pub worst_case_accuracy: Option<f64>,
    /// `(clean + worst case) / 2`.
    pub w_robust: Option<f64>,
    pub checks: Vec<SanityCheck>,
}

/// Evaluation settings, parsed and validated by the caller.
#[derive(Clone, Debug)]
pub struct Settings {
    pub attacks: Vec<AttackSpec>,
    pub batch_size: usize,
    pub seed: u64,
    /// Run the sanity checks on the first `check_n` images.
    pub checks: bool,
    pub check_n: usize,
}

/// The model under evaluation and what identifies it.
pub struct Subject<'a> {
    pub model: &'a dyn Classifier,
    pub is_awnet: bool,
    pub name: String,
    pub file: String,
    pub sha256: String,
}

/// Robust per example after every attack: the per-example worst case, never an average.
pub fn worst_case(clean_correct: &[bool], per_attack: &[Vec<bool>]) -> Vec<bool> {
    (0..clean_correct.len())
        .map(|i| clean_correct[i] && per_attack.iter().all(|r| r[i]))
        .collect()
}

fn share(v: &[bool]) -> f64 {
    v.iter().filter(|&&b| b).count() as f64 / v.len().max(1) as f64
}

/// Images and labels `[start, start + n)` of the dataset, in batches.
pub(crate) struct Images<'a> {
    pub data: &'a Dataset,
    pub indices: Vec<usize>,
    pub batch_size: usize,
}

impl Images<'_> {
    fn labels(&self) -> Vec<u32> {
        self.indices.iter().map(|&i| u32::from(self.data.labels[i])).collect()
    }

    fn batches(&self) -> impl Iterator<Item = &[usize]> {
        self.indices.chunks(self.batch_size.max(1))
    }

    fn tensor(&self, idx: &[usize], device: &candle_core::Device) -> candle_core::Result<Tensor> {
        self.data.images_tensor(idx, device)
    }
}

/// Crafts adversarial versions of `xs` under `spec`. Returns `None` if stopped.
pub(crate) fn craft(
    spec: &AttackSpec,
    model: &dyn Classifier,
    source: Option<&dyn Classifier>,
    xs: &Tensor,
    labels: &[u32],
    seed_offset: u64,
    stop: &dyn Fn() -> bool,
) -> Result<Option<Tensor>> {
    let crafter = match spec {
        AttackSpec::Transfer { .. } => {
            source.ok_or_else(|| EvalError::Settings("a transfer attack needs a source model".into()))?
        }
        _ => model,
    };
    let mut adv = xs.clone();
    let mut alive: Vec<usize> = (0..labels.len()).collect();
    for mut cfg in spec.components() {
        if alive.is_empty() {
            break;
        }
        cfg.seed = cfg.seed.wrapping_add(seed_offset);
        let sub_x = attack::take_rows(xs, &alive)?;
        let sub_labels: Vec<u32> = alive.iter().map(|&i| labels[i]).collect();
        let Outcome::Done(run) = attack::run(crafter, &sub_x, &sub_labels, &cfg, stop)? else {
            return Ok(None);
        };
        let pred = attack::predict(model, &run.adv)?;
        adv = attack::put_rows(&adv, &alive, &run.adv, &vec![true; alive.len()])?;
        alive = alive
            .iter()
            .zip(&pred)
            .filter(|&(&i, &p)| p == labels[i])
            .map(|(&i, _)| i)
            .collect();
    }
    Ok(Some(adv))
}

/// Router taps of a batch: p_adv per image, and per block the signals as rows `[b][n_j]`.
type Taps = (Vec<f64>, Vec<Vec<Vec<f32>>>);

fn taps(model: &dyn Classifier, xs: &Tensor) -> Result<Taps> {
    let out = model.forward(xs)?;
    let p = match out.type_probs()? {
        Some(p) => p.narrow(1, 1, 1)?.squeeze(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
        None => Vec::new(),
    };
    let signals = out
        .signals
        .iter()
        .map(|s| s.to_dtype(DType::F32)?.to_vec2::<f32>())
        .collect::<candle_core::Result<_>>()?;
    Ok((p, signals))
}

#[derive(Default)]
struct TapSums {
    p_adv: Vec<f64>,
    /// Per block, per filter: sum over images.
    filter_sums: Vec<Vec<f64>>,
}

impl TapSums {
    fn add(&mut self, p: Vec<f64>, signals: Vec<Vec<Vec<f32>>>) {
        self.p_adv.extend(p);
        if self.filter_sums.is_empty() {
            self.filter_sums = signals
                .iter()
                .map(|s| vec![0.0; s.first().map_or(0, Vec::len)])
                .collect();
        }
        for (sums, block) in self.filter_sums.iter_mut().zip(signals) {
            for row in block {
                for (acc, v) in sums.iter_mut().zip(row) {
                    *acc += f64::from(v);
                }
            }
        }
    }

    fn filter_means(&self) -> Vec<Vec<f64>> {
        let n = self.p_adv.len().max(1) as f64;
        self.filter_sums
            .iter()
            .map(|s| s.iter().map(|v| v / n).collect())
            .collect()
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn separation(clean: &TapSums, adv: &TapSums) -> RouterSeparation {
    let (points, auc) = roc::roc(&clean.p_adv, &adv.p_adv);
    let right = clean.p_adv.iter().filter(|&&p| p < 0.5).count() + adv.p_adv.iter().filter(|&&p| p >= 0.5).count();
    let (fc, fa) = (clean.filter_means(), adv.filter_means());
    RouterSeparation {
        n: adv.p_adv.len(),
        type_accuracy: right as f64 / (clean.p_adv.len() + adv.p_adv.len()).max(1) as f64,
        auc,
        roc: thin(points, 201),
        mean_p_adv_clean: mean(&clean.p_adv),
        mean_p_adv_adversarial: mean(&adv.p_adv),
        mean_signal_clean: fc.iter().map(|f| mean(f)).collect(),
        mean_signal_adversarial: fa.iter().map(|f| mean(f)).collect(),
        filter_signal_clean: fc,
        filter_signal_adversarial: fa,
        p_adv_clean: clean.p_adv.clone(),
        p_adv_adversarial: adv.p_adv.clone(),
    }
}

/// At most `max` points, always keeping the first and last.
fn thin(points: Vec<(f64, f64)>, max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max {
        return points;
    }
    let step = (points.len() - 1) as f64 / (max - 1) as f64;
    (0..max)
        .map(|k| points[((k as f64 * step).round() as usize).min(points.len() - 1)])
        .collect()
}

/// Runs the evaluation. `source` is the model transfer attacks are crafted on.
pub fn evaluate(
    subject: &Subject,
    source: Option<(&dyn Classifier, String)>,
    data: &Dataset,
    split: Split,
    n: usize,
    settings: &Settings,
    obs: &mut dyn Observer,
) -> Result<Outcome<Report>> {
    if n == 0 || n > data.len() {
        return Err(EvalError::Settings(format!(
            "{n} images asked for; the split has {}",
            data.len()
        )));
    }
    if settings.batch_size == 0 {
        return Err(EvalError::Settings("batch size 0".into()));
    }
    for spec in &settings.attacks {
        for c in spec.components() {
            c.validate()?;
            if c.kind == AttackKind::Adaptive && !subject.is_awnet {
                return Err(EvalError::Settings(format!(
                    "the adaptive attack needs an AW-Net model; {} is static",
                    subject.name
                )));
            }
        }
        if matches!(spec, AttackSpec::Transfer { .. }) && source.is_none() {
            return Err(EvalError::Settings("a transfer attack needs a source model".into()));
        }
    }
    // One snapshot for the whole evaluation: the plain path's weights (and Winograd's filters)
    // made once for every batch's predictions and attacks, not once per batch.
    let snapshot = attack::Snapshot::new(subject.model)?;
    let subject = &Subject {
        model: &snapshot,
        is_awnet: subject.is_awnet,
        name: subject.name.clone(),
        file: subject.file.clone(),
        sha256: subject.sha256.clone(),
    };
    let images = Images {
        data,
        indices: (0..n).collect(),
        batch_size: settings.batch_size,
    };
    let labels = images.labels();
    let model = subject.model;
    let device = model.device();
    // Clean pass: predictions and router taps of every image.
    let mut clean_pred = Vec::with_capacity(n);
    for (k, idx) in images.batches().enumerate() {
        if obs.stop_requested() {
            return Ok(Outcome::Cancelled);
        }
        let xs = images.tensor(idx, &device)?;
        clean_pred.extend(attack::predict(model, &xs)?);
        obs.progress(&Progress {
            stage: "clean accuracy".into(),
            done: (k * images.batch_size + idx.len()).min(n),
            total: n,
        });
    }
    let clean_correct: Vec<bool> = clean_pred.iter().zip(&labels).map(|(p, l)| p == l).collect();
    let clean_accuracy = share(&clean_correct);
    let attacked: Vec<usize> = (0..n).filter(|&i| clean_correct[i]).collect();
    let mut results = Vec::new();
    for spec in &settings.attacks {
        let start = Instant::now();
        let label = spec.label();
        let mut robust = clean_correct.clone();
        let mut clean_sums = TapSums::default();
        let mut adv_sums = TapSums::default();
        let sub = Images {
            data,
            indices: attacked.clone(),
            batch_size: settings.batch_size,
        };
        let mut done = 0;
        let src = source.as_ref().map(|(m, _)| *m);
        for (k, idx) in sub.batches().enumerate() {
            let xs = sub.tensor(idx, &device)?;
            let y: Vec<u32> = idx.iter().map(|&i| labels[i]).collect();
            let stop = || obs.stop_requested();
            let Some(adv) = craft(spec, model, src, &xs, &y, settings.seed.wrapping_add(k as u64), &stop)? else {
                return Ok(Outcome::Cancelled);
            };
            for (&i, p) in idx.iter().zip(attack::predict(model, &adv)?) {
                robust[i] = p == labels[i];
            }
            if subject.is_awnet {
                let (p, s) = taps(model, &xs)?;
                clean_sums.add(p, s);
                let (p, s) = taps(model, &adv)?;
                adv_sums.add(p, s);
            }
            done += idx.len();
            obs.progress(&Progress {
                stage: label.clone(),
                done,
                total: attacked.len(),
            });
        }
        let robust_accuracy = share(&robust);
        results.push(AttackResult {
            name: spec.name(),
            label,
            spec: spec.clone(),
            robust_accuracy,
            n_robust: robust.iter().filter(|&&r| r).count(),
            w_robust: (clean_accuracy + robust_accuracy) / 2.0,
            seconds: start.elapsed().as_secs_f64(),
            robust,
            router: subject.is_awnet.then(|| separation(&clean_sums, &adv_sums)),
        });
    }
    let worst = (!results.is_empty()).then(|| {
        let per_attack: Vec<Vec<bool>> = results.iter().map(|r| r.robust.clone()).collect();
        share(&worst_case(&clean_correct, &per_attack))
    });
    let mut report = Report {
        record: Record {
            program: format!("awnet-lab {}", env!("CARGO_PKG_VERSION")),
            model_file: subject.file.clone(),
            model_sha256: subject.sha256.clone(),
            model: subject.name.clone(),
            source_model: source.as_ref().map(|(_, s)| s.clone()),
            dataset: data.name.clone(),
            dataset_source: data.source.clone(),
            split: split.to_string(),
            n_images: n,
            first_image: 0,
            seed: settings.seed,
            batch_size: settings.batch_size,
            strength: strength(&settings.attacks, n),
        },
        clean_accuracy,
        n_clean_correct: attacked.len(),
        attacks: results,
        worst_case_accuracy: worst,
        w_robust: worst.map(|w| (clean_accuracy + w) / 2.0),
        checks: Vec::new(),
    };
    if settings.checks {
        let Outcome::Done(checks) = checks::run(subject, &images, &report, settings, obs)? else {
            return Ok(Outcome::Cancelled);
        };
        report.checks = checks;
    }
    Ok(Outcome::Done(report))
}

/// "full" only for an AutoAttack-style list on at least 1,000 images; everything else is "quick".
fn strength(specs: &[AttackSpec], n: usize) -> String {
    let full = n >= 1000
        && specs
            .iter()
            .any(|s| matches!(s, AttackSpec::AutoAttack { apgd_steps, .. } if *apgd_steps >= 100));
    if full { "full".into() } else { "quick".into() }
}

/// Accuracy against eps: the whole evaluation once per radius, on the same images with the same
/// attacks and seed. The sanity checks, if asked for, run with the largest radius only.
#[allow(clippy::too_many_arguments)]
pub fn sweep(
    subject: &Subject,
    source: Option<(&dyn Classifier, String)>,
    data: &Dataset,
    split: Split,
    n: usize,
    settings: &Settings,
    eps: &[f64],
    obs: &mut dyn Observer,
) -> Result<Outcome<Vec<Report>>> {
    let largest = eps.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut reports = Vec::with_capacity(eps.len());
    for &e in eps {
        let s = Settings {
            attacks: settings.attacks.iter().map(|a| a.with_eps(e)).collect(),
            checks: settings.checks && e == largest,
            ..settings.clone()
        };
        let src = source.as_ref().map(|(m, name)| (*m, name.clone()));
        match evaluate(subject, src, data, split, n, &s, obs)? {
            Outcome::Done(r) => reports.push(r),
            Outcome::Cancelled => return Ok(Outcome::Cancelled),
        }
    }
    Ok(Outcome::Done(reports))
}
