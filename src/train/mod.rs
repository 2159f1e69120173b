//! One training loop for every method: standard, PGD-AT (Madry et al.), TRADES, AW-Net with
//! MTARD-style adversarial distillation, and AW-Net's teacher-free variant.
//!
//! The loop knows nothing of windows or terminals: it reports [`TrainEvent`]s to an observer and
//! polls it for a stop request at every step. A checkpoint, with everything needed to resume
//! exactly, is written atomically at every epoch end and when stopped; a loss that turns NaN or
//! infinite ends the run with an error and leaves the last checkpoint as it was.

pub mod optim;
pub mod setup;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{D, DType, Tensor, Var};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::attack::{self, AttackConfig, AttackKind, Classifier, Objective, Threat, loss::cross_entropy};
use crate::data::{Augment, Batches, Dataset, Split};
use crate::eval::{self, AttackSpec, Settings, Subject};
use crate::model::checkpoint::{self, TrainingState};
use crate::model::{BatchType, Mode, Model, ModelKind, Network};
use crate::observe::{Observer, Outcome, Silent};
pub use optim::{Optimizer, OptimizerKind};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid training settings: {0}")]
    Settings(String),
    #[error("the loss became {value} at epoch {epoch}, step {step} ({terms}); the last checkpoint is kept")]
    NonFinite {
        value: f64,
        epoch: usize,
        step: usize,
        terms: String,
    },
    #[error("cannot resume: {0}")]
    Resume(String),
    #[error("not enough memory: {0}")]
    Memory(String),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error(transparent)]
    Eval(#[from] eval::EvalError),
    #[error(transparent)]
    Attack(#[from] attack::AttackError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
}

type Result<T> = std::result::Result<T, TrainError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Cross-entropy on clean images.
    Standard,
    /// Cross-entropy on PGD adversarial images (Madry et al.).
    PgdAt,
    /// Cross-entropy plus beta times KL(clean || adversarial) (Zhang et al.).
    Trades,
    /// AW-Net, MTARD-style distillation from a clean and a robust teacher.
    Awnet,
    /// AW-Net's teacher-free variant: cross-entropy on clean and adversarial images.
    AwnetFree,
}

impl Method {
    pub fn model_kind(self) -> ModelKind {
        match self {
            Self::Awnet | Self::AwnetFree => ModelKind::Awnet,
            _ => ModelKind::Static,
        }
    }

    /// Peak memory of one training step, in copies of the float32 convolution outputs
    /// ([`crate::model::Network::activations_per_image`]) per image, measured (peak RSS over
    /// batch sizes) with the small CNN on Fashion-MNIST and rounded up.
    fn activation_copies(self) -> u64 {
        match self {
            Self::Standard => STANDARD_COPIES,
            Self::PgdAt => PGD_AT_COPIES,
            Self::Trades => TRADES_COPIES,
            Self::Awnet | Self::AwnetFree => AWNET_COPIES,
        }
    }
}

// Peak RSS of `awnet train --holdout 59000` at batch 32 and 256 grew by 1498 (standard), 1515
// (PGD-AT), 2553 (TRADES) and 3632 KiB (AW-Net) per image: 5.0, 5.1, 8.6 and 12.2 copies of the
// small CNN's 76,048 values per image. A margin on top.
const STANDARD_COPIES: u64 = 6;
const PGD_AT_COPIES: u64 = 6;
const TRADES_COPIES: u64 = 10;
const AWNET_COPIES: u64 = 14;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Schedule {
    Constant,
    /// Multiply by `gamma` at each milestone epoch (0-based epochs that have passed).
    Step {
        milestones: Vec<usize>,
        gamma: f64,
    },
    /// Cosine from `lr` to 0 over the run.
    Cosine,
}

/// Every training setting; stored in the model file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub method: Method,
    pub data: String,
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub schedule: Schedule,
    /// L-inf radius of the training attack.
    pub eps: f64,
    /// PGD steps of the training attack; step size `eps / 4` unless set.
    pub attack_steps: usize,
    pub attack_step_size: Option<f64>,
    pub trades_beta: f64,
    /// AW-Net: weight of the type head's cross-entropy.
    pub lambda_type: f64,
    /// AW-Net: distillation temperature.
    pub temperature: f64,
    /// AW-Net, a variant beyond the method: weight of the router term in the training attack.
    /// 0 (the method) crafts on cross-entropy alone; above 0 the training attack is the adaptive
    /// one (`CE - lambda * CE(type, clean)`), so the router learns from inputs made to look clean.
    #[serde(default)]
    pub craft_router_lambda: f64,
    /// AW-Net, a variant beyond the method: above 0, each batch also gets adaptive examples
    /// (router term at this weight) that only the type loss sees, labelled adversarial; the
    /// distillation examples stay as `craft_router_lambda` makes them.
    #[serde(default)]
    pub type_adaptive_lambda: f64,
    /// AW-Net: adaptive loss balancing rate and exponent.
    pub balance_rate: f64,
    pub balance_beta: f64,
    pub augment: Augment,
    pub seed: u64,
    /// The last `holdout` images of the training split are kept out of training and used for
    /// the per-epoch metrics; the test split is never looked at.
    pub holdout: usize,
    /// Held-out images evaluated at each epoch end.
    pub monitor_n: usize,
    /// PGD steps of the per-epoch quick robustness check.
    pub monitor_steps: usize,
    /// Also write a checkpoint every this many steps (besides every epoch end and on stop).
    #[serde(default)]
    pub checkpoint_every: Option<usize>,
    /// Teacher model files (AW-Net distillation).
    pub teacher_clean: Option<String>,
    pub teacher_robust: Option<String>,
}

impl TrainConfig {
    pub fn new(method: Method, data: &str, epochs: usize, eps: f64) -> Self {
        Self {
            method,
            data: data.into(),
            epochs,
            batch_size: 128,
            optimizer: OptimizerKind::Sgd,
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 5e-4,
            schedule: Schedule::Cosine,
            eps,
            attack_steps: 10,
            attack_step_size: None,
            trades_beta: 6.0,
            lambda_type: 1.0,
            temperature: 1.0,
            craft_router_lambda: 0.0,
            type_adaptive_lambda: 0.0,
            balance_rate: 0.025,
            balance_beta: 1.0,
            augment: Augment {
                crop_padding: 2,
                hflip: true,
            },
            seed: 0,
            holdout: 5000,
            monitor_n: 1000,
            monitor_steps: 10,
            checkpoint_every: None,
            teacher_clean: None,
            teacher_robust: None,
        }
    }

    pub fn lr_at(&self, epoch: usize) -> f64 {
        match &self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Step { milestones, gamma } => {
                self.lr * gamma.powi(milestones.iter().filter(|&&m| epoch >= m).count() as i32)
            }
            Schedule::Cosine => {
                0.5 * self.lr * (1.0 + (std::f64::consts::PI * epoch as f64 / self.epochs.max(1) as f64).cos())
            }
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Settings(m));
        if self.epochs == 0 || self.batch_size < 2 {
            return bad(format!(
                "{} epochs of batch {} (batch norm needs at least 2)",
                self.epochs, self.batch_size
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("learning rate {}", self.lr));
        }
        if !(self.eps.is_finite() && (0.0..=1.0).contains(&self.eps)) {
            return bad(format!("eps {}", self.eps));
        }
        for (what, l) in [
            ("the training attack", self.craft_router_lambda),
            ("the type loss's adaptive examples", self.type_adaptive_lambda),
        ] {
            if !(l.is_finite() && l >= 0.0) {
                return bad(format!("router term weight {l} of {what}"));
            }
            if l > 0.0 && !matches!(self.method, Method::Awnet | Method::AwnetFree) {
                return bad(format!("a router term in {what} needs an AW-Net method"));
            }
        }
        if self.method == Method::Awnet && (self.teacher_clean.is_none() || self.teacher_robust.is_none()) {
            return bad("AW-Net distillation needs --teacher-clean and --teacher-robust (or use awnet-free)".into());
        }
        Ok(())
    }
}

/// One training step, as the observer sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub epoch: usize,
    pub step: usize,
    pub steps_per_epoch: usize,
    pub global_step: usize,
    pub lr: f64,
    pub loss: f64,
    /// Each term of the loss, by name.
    pub terms: Vec<(String, f64)>,
    /// AW-Net's balancing weights `(w_nat, w_adv)`.
    pub balance: Option<(f64, f64)>,
    pub images_per_second: f64,
}

/// One epoch's metrics on the held-out images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub clean_accuracy: f64,
    pub robust_accuracy: f64,
    /// The quick attack behind `robust_accuracy`, fully labelled.
    pub robust_label: String,
    pub w_robust: f64,
    pub router_auc: Option<f64>,
    pub router_type_accuracy: Option<f64>,
    /// AW-Net: accuracy under the adaptive attack (the quick PGD's settings, with the router
    /// term at lambda 1), the router's AUC against it, and the per-example worst case of both.
    #[serde(default)]
    pub adaptive_accuracy: Option<f64>,
    #[serde(default)]
    pub router_auc_adaptive: Option<f64>,
    #[serde(default)]
    pub worst_accuracy: Option<f64>,
    pub monitor: String,
    pub images_per_second: f64,
    pub seconds: f64,
    pub eta_seconds: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TrainEvent {
    Started {
        epochs: usize,
        steps_per_epoch: usize,
        resumed_at: Option<(usize, usize)>,
    },
    Step(StepReport),
    Epoch(EpochReport),
    Checkpoint {
        path: PathBuf,
        epoch: usize,
        step: usize,
    },
}

/// Receives the training events; stop requests come through [`Observer`].
pub trait TrainObserver: Observer {
    fn event(&mut self, _event: &TrainEvent) {}
}

impl TrainObserver for Silent {}

/// The resumable part of a run, stored in the checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Epochs completed.
    pub epoch: usize,
    /// Steps completed in the current epoch.
    pub step: usize,
    pub global_step: usize,
    pub optimizer_steps: usize,
    /// AW-Net adaptive balancing: `w_adv` and the first mini-batch's losses.
    pub w_adv: f64,
    pub initial_losses: Option<(f64, f64)>,
    pub log: Vec<EpochReport>,
    pub train_loss_sum: f64,
}

/// Everything a run uses besides the model.
pub struct Run<'a> {
    pub config: TrainConfig,
    pub train: &'a Dataset,
    pub monitor: &'a Dataset,
    /// (clean teacher, robust teacher), frozen.
    pub teachers: Option<(&'a Network, &'a Network)>,
    pub out: PathBuf,
}

/// Splits off the last `holdout` images of a training split for monitoring.
pub fn split_holdout(ds: &Dataset, holdout: usize) -> Result<(Dataset, Dataset)> {
    if holdout >= ds.len() {
        return Err(TrainError::Settings(format!(
            "holdout {holdout} leaves nothing of {} images to train on",
            ds.len()
        )));
    }
    let cut = ds.len() - holdout;
    Ok((ds.part(0..cut, "training part"), ds.part(cut..ds.len(), "held out")))
}

/// KL(p || q) per example, from logits, with temperature `t`: `[b]`.
fn kl(teacher_logits: &Tensor, student_logits: &Tensor, t: f64) -> candle_core::Result<Tensor> {
    let p_log = candle_nn::ops::log_softmax(&(teacher_logits / t)?, D::Minus1)?;
    let q_log = candle_nn::ops::log_softmax(&(student_logits / t)?, D::Minus1)?;
    (p_log.exp()? * (p_log - q_log)?)?.sum(D::Minus1)
}

/// The PGD of training: eval-mode model (frozen weights, soft MixBN), maximising `objective`
/// per example, from `start`.
fn craft(
    net: &Network,
    xs: &Tensor,
    start: Tensor,
    cfg: &TrainConfig,
    objective: &dyn Fn(&crate::model::Forward) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let step = cfg.attack_step_size.unwrap_or(cfg.eps / 4.0);
    let mut adv = attack::project_linf(&start, xs, cfg.eps)?;
    // The small CNN and the static ResNet-18, in f32 on the CPU, take the hand-written path, as
    // attacks do.
    let plain = if xs.dtype() == DType::F32 && xs.device().is_cpu() {
        net.plain()?
    } else {
        None
    };
    for _ in 0..cfg.attack_steps {
        let g = match &plain {
            Some(plain) => attack::plain_objective_grad(plain, &adv, objective)?.1,
            None => {
                let var = Var::from_tensor(&adv)?;
                let out = Classifier::forward(net, var.as_tensor())?;
                let grads = objective(&out)?.sum_all()?.backward()?;
                grads
                    .get(var.as_tensor())
                    .ok_or_else(|| TrainError::Settings("no input gradient".into()))?
                    .detach()
            }
        };
        adv = attack::project_linf(&(&adv + (g.sign()? * step)?)?, xs, cfg.eps)?;
    }
    Ok(adv.detach())
}

fn uniform_start(xs: &Tensor, eps: f64, rng: &mut StdRng) -> Result<Tensor> {
    let v: Vec<f32> = (0..xs.elem_count())
        .map(|_| (eps * (2.0 * rng.random::<f64>() - 1.0)) as f32)
        .collect();
    Ok((xs + Tensor::from_vec(v, xs.shape(), xs.device())?)?)
}

/// `x + 0.001 * N(0, 1)`, the start of TRADES and MTARD.
fn gaussian_start(xs: &Tensor, rng: &mut StdRng) -> Result<Tensor> {
    let v: Vec<f32> = (0..xs.elem_count())
        .map(|_| {
            let (u1, u2) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
            (0.001 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    Ok((xs + Tensor::from_vec(v, xs.shape(), xs.device())?)?)
}

struct StepLoss {
    total: Tensor,
    terms: Vec<(String, f64)>,
    /// The two balanced losses (AW-Net), for the weight update.
    balanced: Option<(f64, f64)>,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The loss of one mini-batch for the run's method.
fn step_loss(
    model: &Model,
    run: &Run,
    state: &RunState,
    xs: &Tensor,
    ys: &[u32],
    rng: &mut StdRng,
) -> Result<StepLoss> {
    let cfg = &run.config;
    let y = Tensor::from_vec(ys.to_vec(), ys.len(), xs.device())?;
    let ce_mean = |logits: &Tensor| -> candle_core::Result<Tensor> { candle_nn::loss::cross_entropy(logits, &y) };
    let frozen = || model.frozen();
    Ok(match cfg.method {
        Method::Standard => {
            let loss = ce_mean(&model.forward(xs, Mode::Train(BatchType::Clean))?.logits)?;
            let v = scalar(&loss)?;
            StepLoss {
                total: loss,
                terms: vec![("ce".into(), v)],
                balanced: None,
            }
        }
        Method::PgdAt => {
            let net = frozen()?;
            let adv = craft(&net, xs, uniform_start(xs, cfg.eps, rng)?, cfg, &|o| {
                cross_entropy(&o.logits, ys)
            })?;
            let loss = ce_mean(&model.forward(&adv, Mode::Train(BatchType::Adversarial))?.logits)?;
            let v = scalar(&loss)?;
            StepLoss {
                total: loss,
                terms: vec![("ce_adv".into(), v)],
                balanced: None,
            }
        }
        Method::Trades => {
            let net = frozen()?;
            let clean_logits = Classifier::forward(&net, xs)?.logits.detach();
            let adv = craft(&net, xs, gaussian_start(xs, rng)?, cfg, &|o| {
                kl(&clean_logits, &o.logits, 1.0)
            })?;
            let nat = model.forward(xs, Mode::Train(BatchType::Clean))?.logits;
            let adv_logits = model.forward(&adv, Mode::Train(BatchType::Clean))?.logits;
            let natural = ce_mean(&nat)?;
            let robust = kl(&nat, &adv_logits, 1.0)?.mean_all()?;
            let total = (&natural + (&robust * cfg.trades_beta)?)?;
            StepLoss {
                total,
                terms: vec![("ce".into(), scalar(&natural)?), ("kl".into(), scalar(&robust)?)],
                balanced: None,
            }
        }
        Method::Awnet | Method::AwnetFree => {
            let net = frozen()?;
            // PGD on cross-entropy (the method), or the adaptive attack with a router term.
            let mut pgd = |lambda: f64| -> Result<Tensor> {
                let obj = if lambda > 0.0 {
                    Objective::Adaptive { lambda }
                } else {
                    Objective::Ce
                };
                craft(&net, xs, gaussian_start(xs, rng)?, cfg, &|o| {
                    attack::loss::objective(o, ys, None, obj)
                })
            };
            let adv = pgd(cfg.craft_router_lambda)?;
            let s_nat = model.forward(xs, Mode::Train(BatchType::Clean))?;
            let s_adv = model.forward(&adv, Mode::Train(BatchType::Adversarial))?;
            let (l_nat, l_adv, names) = match (cfg.method, run.teachers) {
                (Method::Awnet, Some((t_clean, t_robust))) => {
                    let t = cfg.temperature;
                    let tn = Classifier::forward(t_clean, xs)?.logits.detach();
                    let ta = Classifier::forward(t_robust, &adv)?.logits.detach();
                    let l_nat = (kl(&tn, &s_nat.logits, t)?.mean_all()? * (t * t))?;
                    let l_adv = (kl(&ta, &s_adv.logits, t)?.mean_all()? * (t * t))?;
                    (l_nat, l_adv, ["kl_nat", "kl_adv"])
                }
                (Method::Awnet, None) => {
                    return Err(TrainError::Settings("AW-Net distillation needs two teachers".into()));
                }
                _ => (ce_mean(&s_nat.logits)?, ce_mean(&s_adv.logits)?, ["ce_nat", "ce_adv"]),
            };
            let types = |o: &crate::model::Forward, label: u32| -> Result<Tensor> {
                let tl = o
                    .type_logits
                    .as_ref()
                    .ok_or_else(|| TrainError::Settings("the model has no router".into()))?;
                Ok(cross_entropy(tl, &vec![label; ys.len()])?.mean_all()?)
            };
            let (clean, attacked) = (types(&s_nat, 0)?, types(&s_adv, 1)?);
            let l_type = if cfg.type_adaptive_lambda > 0.0 {
                // Inputs made to look clean, for the router alone: half the adversarial share.
                let hidden = pgd(cfg.type_adaptive_lambda)?;
                let tl = model
                    .net
                    .type_logits(&hidden)?
                    .ok_or_else(|| TrainError::Settings("the model has no router".into()))?;
                let hidden = cross_entropy(&tl, &vec![1; ys.len()])?.mean_all()?;
                ((clean * 0.5)? + ((attacked + hidden)? * 0.25)?)?
            } else {
                ((clean + attacked)? * 0.5)?
            };
            let (w_nat, w_adv) = (1.0 - state.w_adv, state.w_adv);
            let total = (((&l_nat * w_nat)? + (&l_adv * w_adv)?)? + (&l_type * cfg.lambda_type)?)?;
            let (vn, va) = (scalar(&l_nat)?, scalar(&l_adv)?);
            StepLoss {
                total,
                terms: vec![
                    (names[0].into(), vn),
                    (names[1].into(), va),
                    ("type".into(), scalar(&l_type)?),
                ],
                balanced: Some((vn, va)),
            }
        }
    })
}

/// MTARD's adaptive balancing: each weight moves towards the share of its loss relative to
/// its first value, so the loss that has fallen less gets more weight.
fn rebalance(state: &mut RunState, (l_nat, l_adv): (f64, f64), rate: f64, beta: f64) {
    let (n0, a0) = *state.initial_losses.get_or_insert((l_nat, l_adv));
    let rn = (l_nat / n0).powf(beta);
    let ra = (l_adv / a0).powf(beta);
    if (rn + ra).is_finite() && rn + ra > 0.0 {
        state.w_adv = rate * ra / (rn + ra) + (1.0 - rate) * state.w_adv;
    }
}

fn save(model: &mut Model, run: &Run, state: &RunState, opt: &Optimizer) -> Result<()> {
    model.meta.training = Some(serde_json::to_value(&run.config).expect("config serialises"));
    model.meta.log_summary = Some(serde_json::to_value(&state.log).expect("log serialises"));
    let mut s = state.clone();
    s.optimizer_steps = opt.steps;
    let ts = TrainingState {
        json: serde_json::to_string(&s).expect("state serialises"),
        tensors: opt.state().clone(),
    };
    checkpoint::save_with_state(model, Some(&ts), &run.out)?;
    Ok(())
}

/// What the per-epoch check measured.
struct Monitored {
    clean: f64,
    robust: f64,
    label: String,
    /// AW-Net: (AUC, type accuracy) of the router.
    router: Option<(f64, f64)>,
    /// AW-Net: (accuracy, router AUC) under the adaptive attack, and the worst case of both.
    adaptive: Option<(f64, f64)>,
    worst: Option<f64>,
}

/// Per-epoch metrics on the held-out images: clean, a labelled quick PGD, W-Robust, router.
fn monitor(model: &Model, run: &Run, obs: &mut dyn TrainObserver) -> Result<Option<Monitored>> {
    let cfg = &run.config;
    let n = cfg.monitor_n.min(run.monitor.len());
    if n == 0 {
        return Ok(Some(Monitored {
            clean: f64::NAN,
            robust: f64::NAN,
            label: "no held-out images".into(),
            router: None,
            adaptive: None,
            worst: None,
        }));
    }
    let mut pgd = AttackConfig::new(AttackKind::Pgd, cfg.eps);
    pgd.threat = Threat::Linf;
    pgd.steps = Some(cfg.monitor_steps);
    pgd.seed = cfg.seed;
    let net = model.frozen()?;
    let mut attacks = vec![AttackSpec::Single(pgd.clone())];
    if net.is_awnet() {
        let mut adaptive = pgd;
        adaptive.kind = AttackKind::Adaptive;
        adaptive.lambda = 1.0;
        attacks.push(AttackSpec::Single(adaptive));
    }
    let subject = Subject {
        model: &net,
        is_awnet: net.is_awnet(),
        name: "training".into(),
        file: String::new(),
        sha256: String::new(),
    };
    let settings = Settings {
        attacks,
        batch_size: cfg.batch_size,
        seed: cfg.seed,
        checks: false,
        check_n: 0,
    };
    let Outcome::Done(r) = eval::evaluate(&subject, None, run.monitor, Split::Train, n, &settings, obs)? else {
        return Ok(None);
    };
    let a = &r.attacks[0];
    let router = a.router.as_ref().map(|s| (s.auc, s.type_accuracy));
    let adaptive = r
        .attacks
        .get(1)
        .map(|b| (b.robust_accuracy, b.router.as_ref().map_or(f64::NAN, |s| s.auc)));
    Ok(Some(Monitored {
        clean: r.clean_accuracy,
        robust: a.robust_accuracy,
        label: format!("{} on {n} held-out images", a.label),
        router,
        adaptive,
        worst: adaptive.and(r.worst_case_accuracy),
    }))
}

/// The outcome of one optimisation step.
pub struct StepDone {
    pub loss: f64,
    pub terms: Vec<(String, f64)>,
    /// Whether the AW-Net balancing weights were updated.
    pub balanced: bool,
}

/// One optimisation step on a mini-batch: the method's loss, its backward pass, the optimizer
/// update and (AW-Net) the balancing update. `seed` fixes the attack's random start. A loss
/// that is not finite leaves the model untouched and returns `NonFinite`.
#[allow(clippy::too_many_arguments)]
pub fn step(
    model: &Model,
    run: &Run,
    state: &mut RunState,
    opt: &mut Optimizer,
    xs: &Tensor,
    ys: &[u32],
    lr: f64,
    seed: u64,
) -> Result<StepDone> {
    // On rayon's pool: ResNet-18 (batch 32), six interleaved runs of five steps, 2-19% faster
    // (median 5%); its PGD-10 step 3-5% in three runs of four.
    crate::on_pool(|| {
        let cfg = &run.config;
        let mut rng = StdRng::seed_from_u64(seed);
        let loss = step_loss(model, run, state, xs, ys, &mut rng)?;
        let value = scalar(&loss.total)?;
        if !value.is_finite() {
            let terms = loss
                .terms
                .iter()
                .map(|(n, v)| format!("{n} {v:.4}"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(TrainError::NonFinite {
                value,
                epoch: state.epoch,
                step: state.step,
                terms,
            });
        }
        let grads = loss.total.backward()?;
        opt.step(&grads, lr)?;
        drop(grads);
        if let Some(pair) = loss.balanced {
            rebalance(state, pair, cfg.balance_rate, cfg.balance_beta);
        }
        Ok(StepDone {
            loss: value,
            terms: loss.terms,
            balanced: loss.balanced.is_some(),
        })
    })
}

/// Trains `model` (fresh, or restored from `resume`) and returns the epoch log, or `Cancelled`
/// after writing a checkpoint when the observer asks to stop.
pub fn train(
    model: &mut Model,
    run: &Run,
    resume: Option<TrainingState>,
    obs: &mut dyn TrainObserver,
) -> Result<Outcome<Vec<EpochReport>>> {
    let cfg = &run.config;
    cfg.validate()?;
    if model.config.kind != cfg.method.model_kind() {
        return Err(TrainError::Settings(format!(
            "{:?} trains a {} model, not {}",
            cfg.method,
            cfg.method.model_kind().name(),
            model.config.kind.name()
        )));
    }
    let batch = cfg.batch_size.min(run.train.len()).max(1);
    let need = 4 * model.net.activations_per_image() * cfg.method.activation_copies() * batch as u64;
    crate::memory::check(need, &format!("a training step of {batch} images")).map_err(TrainError::Memory)?;
    let mut opt = Optimizer::new(model, cfg.optimizer, cfg.momentum, cfg.weight_decay);
    let mut state = RunState {
        w_adv: 0.5,
        ..RunState::default()
    };
    if let Some(ts) = resume {
        state = serde_json::from_str(&ts.json)
            .map_err(|e| TrainError::Resume(format!("unreadable training state ({e})")))?;
        opt.restore(ts.tensors, state.optimizer_steps)
            .map_err(TrainError::Resume)?;
    }
    let steps_per_epoch = run.train.len().div_ceil(cfg.batch_size);
    let resumed_at = (state.global_step > 0).then_some((state.epoch, state.step));
    obs.event(&TrainEvent::Started {
        epochs: cfg.epochs,
        steps_per_epoch,
        resumed_at,
    });
    let mut epoch_seconds = Vec::new();
    let device = model.device();
    while state.epoch < cfg.epochs {
        let epoch = state.epoch;
        let lr = cfg.lr_at(epoch);
        let started = Instant::now();
        let mut images = 0usize;
        // The order and augmentation of an epoch depend only on (seed, epoch); a resumed epoch
        // replays the batches it already trained on without training, to reach the same state.
        let batches = Batches::new(
            run.train,
            cfg.batch_size,
            Some(cfg.seed.wrapping_add(epoch as u64 * 1_000_003)),
            cfg.augment,
            &device,
        );
        for (k, batch) in batches.enumerate() {
            let batch = batch?;
            if k < state.step {
                continue;
            }
            if obs.stop_requested() {
                save(model, run, &state, &opt)?;
                obs.event(&TrainEvent::Checkpoint {
                    path: run.out.clone(),
                    epoch,
                    step: state.step,
                });
                return Ok(Outcome::Cancelled);
            }
            let ys: Vec<u32> = batch.labels.to_vec1::<u32>()?;
            let seed = cfg.seed ^ ((epoch as u64) << 32) ^ k as u64;
            let done = step(model, run, &mut state, &mut opt, &batch.images, &ys, lr, seed).map_err(|e| match e {
                TrainError::NonFinite { value, terms, .. } => TrainError::NonFinite {
                    value,
                    epoch,
                    step: k,
                    terms,
                },
                other => other,
            })?;
            images += ys.len();
            state.step = k + 1;
            state.global_step += 1;
            state.train_loss_sum += done.loss;
            obs.event(&TrainEvent::Step(StepReport {
                epoch,
                step: k,
                steps_per_epoch,
                global_step: state.global_step,
                lr,
                loss: done.loss,
                terms: done.terms,
                balance: done.balanced.then_some((1.0 - state.w_adv, state.w_adv)),
                images_per_second: images as f64 / started.elapsed().as_secs_f64().max(1e-9),
            }));
            if cfg
                .checkpoint_every
                .is_some_and(|n| n > 0 && state.global_step.is_multiple_of(n))
            {
                save(model, run, &state, &opt)?;
                obs.event(&TrainEvent::Checkpoint {
                    path: run.out.clone(),
                    epoch,
                    step: state.step,
                });
            }
        }
        let train_seconds = started.elapsed().as_secs_f64();
        let Some(Monitored {
            clean,
            robust,
            label,
            router,
            adaptive,
            worst,
        }) = monitor(model, run, obs)?
        else {
            save(model, run, &state, &opt)?;
            return Ok(Outcome::Cancelled);
        };
        let seconds = started.elapsed().as_secs_f64();
        epoch_seconds.push(seconds);
        let mean = epoch_seconds.iter().sum::<f64>() / epoch_seconds.len() as f64;
        let report = EpochReport {
            epoch,
            lr,
            train_loss: state.train_loss_sum / state.step.max(1) as f64,
            clean_accuracy: clean,
            robust_accuracy: robust,
            robust_label: label,
            w_robust: (clean + robust) / 2.0,
            router_auc: router.map(|r| r.0),
            router_type_accuracy: router.map(|r| r.1),
            adaptive_accuracy: adaptive.map(|a| a.0),
            router_auc_adaptive: adaptive.map(|a| a.1),
            worst_accuracy: worst,
            monitor: run.monitor.name.clone(),
            images_per_second: images as f64 / train_seconds.max(1e-9),
            seconds,
            eta_seconds: mean * (cfg.epochs - epoch - 1) as f64,
        };
        state.log.push(report.clone());
        state.epoch += 1;
        state.step = 0;
        state.train_loss_sum = 0.0;
        save(model, run, &state, &opt)?;
        obs.event(&TrainEvent::Epoch(report));
        obs.event(&TrainEvent::Checkpoint {
            path: run.out.clone(),
            epoch: state.epoch,
            step: 0,
        });
    }
    Ok(Outcome::Done(state.log))
}
