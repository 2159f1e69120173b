//! `awnet train`

use std::io::{IsTerminal, Write as _};

use anyhow::{Context, Result, bail};

use super::{TrainArgs, emit};
use crate::data::Augment;
use crate::model::{ModelKind, RouterConfig};
use crate::observe::{Observer, Outcome, Progress, StopFlag};
use crate::train::{self, Schedule, TrainConfig, TrainEvent, TrainObserver};

/// Progress bar on a terminal, a line per epoch always, the JSON-lines log, and Ctrl-C.
struct Terminal {
    tty: bool,
    log: Option<std::fs::File>,
    stop: StopFlag,
    log_error: Option<std::io::Error>,
}

impl Observer for Terminal {
    fn progress(&mut self, p: &Progress) {
        if self.tty {
            eprint!(
                "\r  {}: {}/{}          ",
                p.stage.chars().take(60).collect::<String>(),
                p.done,
                p.total
            );
        }
    }

    fn stop_requested(&self) -> bool {
        self.stop.is_raised()
    }
}

impl TrainObserver for Terminal {
    fn event(&mut self, e: &TrainEvent) {
        match e {
            TrainEvent::Started {
                epochs,
                steps_per_epoch,
                resumed_at,
            } => {
                eprintln!(
                    "training {epochs} epochs of {steps_per_epoch} steps{}",
                    match resumed_at {
                        Some((ep, st)) => format!(", resuming at epoch {ep}, step {st}"),
                        None => String::new(),
                    }
                );
            }
            TrainEvent::Step(s) if self.tty => {
                let terms = s
                    .terms
                    .iter()
                    .map(|(n, v)| format!("{n} {v:.3}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                let bal = s
                    .balance
                    .map(|(n, a)| format!(" w_nat {n:.3} w_adv {a:.3}"))
                    .unwrap_or_default();
                eprint!(
                    "\r  epoch {} step {}/{}  loss {:.4} ({terms}{bal})  {:.0} img/s   ",
                    s.epoch + 1,
                    s.step + 1,
                    s.steps_per_epoch,
                    s.loss,
                    s.images_per_second
                );
                let _ = std::io::stderr().flush();
            }
            TrainEvent::Step(_) => {}
            TrainEvent::Epoch(r) => {
                if self.tty {
                    eprintln!();
                }
                let router = match (r.router_auc, r.router_type_accuracy) {
                    (Some(auc), Some(acc)) => format!(", router AUC {auc:.4}, type accuracy {:.2}%", 100.0 * acc),
                    _ => String::new(),
                };
                let adaptive = match (r.adaptive_accuracy, r.router_auc_adaptive, r.worst_accuracy) {
                    (Some(acc), Some(auc), Some(worst)) => format!(
                        "; adaptive {:.2}% (router AUC {auc:.4}), worst of both {:.2}%",
                        100.0 * acc,
                        100.0 * worst
                    ),
                    _ => String::new(),
                };
                eprintln!(
                    "epoch {}: loss {:.4}, lr {:.5}, clean {:.2}%, robust {:.2}%, W-Robust {:.2}%{router}{adaptive}; {:.0} img/s, {:.0} s, about {:.0} s left\n  robust = {}",
                    r.epoch + 1,
                    r.train_loss,
                    r.lr,
                    100.0 * r.clean_accuracy,
                    100.0 * r.robust_accuracy,
                    100.0 * r.w_robust,
                    r.images_per_second,
                    r.seconds,
                    r.eta_seconds,
                    r.robust_label
                );
                if let Some(f) = &mut self.log
                    && let Err(e) =
                        writeln!(f, "{}", serde_json::to_string(r).expect("reports serialise")).and_then(|_| f.flush())
                {
                    self.log_error = Some(e);
                }
            }
            TrainEvent::Checkpoint { path, epoch, step } => {
                if self.tty {
                    eprintln!("  checkpoint {} (epoch {epoch}, step {step})", path.display());
                }
            }
        }
    }
}

fn schedule(s: &str) -> Result<Schedule> {
    Ok(match s {
        "constant" => Schedule::Constant,
        "cosine" => Schedule::Cosine,
        other => match other.strip_prefix("step:") {
            Some(list) => Schedule::Step {
                milestones: list
                    .split(',')
                    .map(|m| m.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("milestones are epoch numbers, as in step:15,25")?,
                gamma: 0.1,
            },
            None => bail!("unknown schedule '{other}' (constant, cosine, or step:E1,E2 for x0.1 at those epochs)"),
        },
    })
}

/// The router settings the command line asks for, the defaults filled in; `None` when it asks
/// for none.
fn router_config(a: &TrainArgs) -> Result<Option<RouterConfig>> {
    if a.router_channels.is_none() && a.signal_scale.is_none() {
        return Ok(None);
    }
    let mut r = RouterConfig::default();
    if let Some(list) = &a.router_channels {
        let c = list
            .split(',')
            .map(|c| c.trim().parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .ok()
            .and_then(|c| <[usize; 3]>::try_from(c).ok())
            .with_context(|| format!("--router-channels wants three channel counts, as 16,32,64; got '{list}'"))?;
        r.channels = c;
    }
    if let Some(s) = a.signal_scale {
        r.signal_scale = s;
    }
    r.check().map_err(anyhow::Error::msg)?;
    Ok(Some(r))
}

pub fn run(a: &TrainArgs) -> Result<()> {
    let device = crate::model::device_named(&a.device).map_err(anyhow::Error::msg)?;
    let mut prepared = if a.resume {
        let mut p = train::setup::resume_run(&a.out, Some(a.epochs), &device)?;
        // How often to save does not change the weights, so a resumed run may change it.
        if a.checkpoint_every.is_some() {
            p.config.checkpoint_every = a.checkpoint_every;
        }
        p
    } else {
        let eps = match &a.eps {
            Some(e) => crate::attack::parse_eps(e).map_err(anyhow::Error::msg)?,
            None => 0.1,
        };
        let mut c = TrainConfig::new(a.method, &a.data, a.epochs, eps);
        c.batch_size = a.batch_size;
        c.lr = a.lr;
        c.optimizer = a.optimizer;
        c.momentum = a.momentum;
        c.weight_decay = a.weight_decay;
        c.schedule = schedule(&a.schedule)?;
        c.attack_steps = a.attack_steps;
        c.trades_beta = a.trades_beta;
        c.lambda_type = a.lambda_type;
        c.craft_router_lambda = a.craft_router_lambda;
        c.type_adaptive_lambda = a.type_adaptive_lambda;
        c.seed = a.seed;
        c.holdout = a.holdout;
        c.monitor_n = a.monitor_n;
        c.monitor_steps = a.monitor_steps;
        c.checkpoint_every = a.checkpoint_every;
        if a.no_augment {
            c.augment = Augment::default();
        }
        c.teacher_clean = a.teacher_clean.as_ref().map(|p| p.display().to_string());
        c.teacher_robust = a.teacher_robust.as_ref().map(|p| p.display().to_string());
        let router = router_config(a)?;
        if router.is_some() && c.method.model_kind() != ModelKind::Awnet {
            bail!("--router-channels and --signal-scale apply to AW-Net only (--method awnet or awnet-free)");
        }
        train::setup::new_run(c, a.arch, a.width, router, &a.out, &device)?
    };
    eprintln!("data: {}", prepared.data_description);
    let stop = StopFlag::default();
    let handler_flag = stop.clone();
    // Ctrl-C asks the loop to stop at the next step; it then writes a checkpoint and returns.
    let _ = ctrlc::set_handler(move || handler_flag.raise());
    let log = match &a.log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open the log {}", p.display()))?,
        ),
        None => None,
    };
    let mut obs = Terminal {
        tty: std::io::stderr().is_terminal(),
        log,
        stop,
        log_error: None,
    };
    let outcome = prepared.train(&mut obs)?;
    if let Some(e) = obs.log_error {
        bail!("training finished, but the log could not be written: {e}");
    }
    match outcome {
        Outcome::Done(log) => {
            let last = log
                .last()
                .map(|r| {
                    format!(
                        "; last epoch: clean {:.2}%, robust {:.2}% ({})",
                        100.0 * r.clean_accuracy,
                        100.0 * r.robust_accuracy,
                        r.robust_label
                    )
                })
                .unwrap_or_default();
            emit(&format!("wrote {}{last}\n", a.out.display()))
        }
        Outcome::Cancelled => emit(&format!(
            "stopped; checkpoint in {} (continue with --resume)\n",
            a.out.display()
        )),
    }
}
