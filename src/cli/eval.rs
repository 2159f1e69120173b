//! `awnet eval` and `awnet attack`

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};

use anyhow::{Context, Result, bail};
use candle_core::{D, Device, Tensor};
use serde_json::json;

use super::{AttackArgs, EvalArgs, emit, open_model};
use crate::attack::{self, AttackConfig, AttackKind, Classifier, format_eps};
use crate::data::image;
use crate::eval::{self, AttackSpec, Report, Settings, Subject};
use crate::model::{Mode, Model};
use crate::observe::{Observer, Outcome, Progress};

/// Draws a progress bar on stderr when it is a terminal; silent otherwise.
struct TerminalProgress {
    tty: bool,
    stage: String,
}

impl Observer for TerminalProgress {
    fn progress(&mut self, p: &Progress) {
        if !self.tty {
            return;
        }
        let mut err = std::io::stderr().lock();
        if p.stage != self.stage && !self.stage.is_empty() {
            let _ = writeln!(err);
        }
        self.stage = p.stage.clone();
        let width = 30;
        let filled = (width * p.done).checked_div(p.total).unwrap_or(width);
        let stage: String = p.stage.chars().take(70).collect();
        let _ = write!(
            err,
            "\r[{}{}] {}/{} {stage}",
            "#".repeat(filled),
            " ".repeat(width - filled),
            p.done,
            p.total
        );
        let _ = err.flush();
    }
}

impl Drop for TerminalProgress {
    fn drop(&mut self) {
        if self.tty && !self.stage.is_empty() {
            eprintln!();
        }
    }
}

/// Builds one attack's settings from the command line.
fn config(kind: AttackKind, a: &EvalArgs, eps: f64) -> AttackConfig {
    let mut c = AttackConfig::new(kind, eps);
    c.threat = a.norm;
    c.seed = a.seed;
    c.restarts = a.restarts;
    c.lambda = a.lambda;
    c.step_size = a.step_size;
    c.steps = match kind {
        AttackKind::Square => Some(a.queries),
        AttackKind::ApgdCe | AttackKind::ApgdDlr => Some(a.apgd_steps),
        _ => a.steps,
    };
    c
}

fn specs(a: &EvalArgs, eps: f64, source: Option<&str>) -> Result<Vec<AttackSpec>> {
    let mut out = Vec::new();
    for name in a.attack.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let single = |k| AttackSpec::Single(config(k, a, eps));
        out.push(match name {
            "clean" => continue,
            "fgsm" => single(AttackKind::Fgsm),
            "pgd" => single(AttackKind::Pgd),
            "mi-fgsm" | "mifgsm" => single(AttackKind::MiFgsm),
            "cw" | "cw-inf" => single(AttackKind::Cw),
            "apgd-ce" => single(AttackKind::ApgdCe),
            "apgd-dlr" | "apgd-t" => single(AttackKind::ApgdDlr),
            "square" => single(AttackKind::Square),
            "noise" => single(AttackKind::Noise),
            "adaptive" => single(AttackKind::Adaptive),
            "autoattack" => AttackSpec::AutoAttack {
                eps,
                threat: a.norm,
                apgd_steps: a.apgd_steps,
                square_queries: a.queries,
                seed: a.seed,
            },
            "transfer" => AttackSpec::Transfer {
                config: config(AttackKind::Pgd, a, eps),
                source: source.context("--attack transfer needs --source MODEL")?.to_string(),
            },
            other => bail!(
                "unknown attack '{other}' (known: clean, fgsm, pgd, mi-fgsm, cw, apgd-ce, apgd-dlr, square, noise, adaptive, autoattack, transfer)"
            ),
        });
    }
    Ok(out)
}

fn model_name(m: &Model) -> String {
    let file = m
        .meta
        .file
        .as_ref()
        .map(|(p, _)| p.display().to_string())
        .unwrap_or_default();
    format!("{} ({} {})", file, m.config.kind.name(), m.config.arch.name())
}

pub fn run_eval(a: &EvalArgs) -> Result<()> {
    let device = crate::model::device_named(&a.device).map_err(anyhow::Error::msg)?;
    let model = open_model(&a.model)?;
    let data = crate::data::load(
        &a.data,
        a.split,
        Some((model.config.in_channels, model.config.image_size)),
    )?;
    if a.first >= data.len() {
        bail!(
            "--first {} is past the end of {} ({} images)",
            a.first,
            data.name,
            data.len()
        );
    }
    let data = if a.first > 0 {
        data.part(a.first..data.len(), "from --first")
    } else {
        data
    };
    if (data.channels, data.height) != (model.config.in_channels, model.config.image_size) || data.height != data.width
    {
        bail!(
            "{} has {}x{}x{} images; the model takes {}x{}x{}",
            data.name,
            data.channels,
            data.height,
            data.width,
            model.config.in_channels,
            model.config.image_size,
            model.config.image_size
        );
    }
    if data.num_classes() != model.config.num_classes {
        bail!(
            "{} has {} classes; the model has {}",
            data.name,
            data.num_classes(),
            model.config.num_classes
        );
    }
    let eps_list: Vec<f64> = match &a.eps {
        Some(e) => e
            .split(',')
            .map(|e| attack::parse_eps(e).map_err(anyhow::Error::msg))
            .collect::<Result<_>>()?,
        None if model.config.in_channels == 3 => vec![8.0 / 255.0],
        None => vec![0.1],
    };
    let eps = eps_list[0];
    let source_model = match &a.source {
        Some(p) => Some(open_model(p)?.into_device(&device)?),
        None => None,
    };
    let source_net = source_model.as_ref().map(|m| m.frozen()).transpose()?;
    let specs = specs(a, eps, source_model.as_ref().map(model_name).as_deref())?;
    let model = model.into_device(&device)?;
    let net = model.frozen()?;
    let (file, sha) = model.meta.file.clone().unwrap_or_default();
    let subject = Subject {
        model: &net,
        is_awnet: net.is_awnet(),
        name: model_name(&model),
        file: file.display().to_string(),
        sha256: sha,
    };
    let settings = Settings {
        attacks: specs,
        batch_size: a.batch_size,
        seed: a.seed,
        checks: !a.no_checks,
        check_n: a.check_n,
    };
    let n = a.n.unwrap_or(data.len()).min(data.len());
    let batch = a.batch_size.clamp(1, n.max(1));
    crate::memory::check(
        4 * net.activations_per_image() * crate::eval::ATTACK_COPIES * batch as u64,
        &format!("an attack on a batch of {batch} images"),
    )
    .map_err(|e| anyhow::anyhow!("not enough memory: {e}"))?;
    let mut progress = TerminalProgress {
        tty: std::io::stderr().is_terminal(),
        stage: String::new(),
    };
    let source = source_net
        .as_ref()
        .zip(source_model.as_ref())
        .map(|(n, m)| (n as &dyn Classifier, model_name(m)));
    if eps_list.len() > 1 {
        let outcome = eval::sweep(&subject, source, &data, a.split, n, &settings, &eps_list, &mut progress)?;
        drop(progress);
        let Outcome::Done(mut reports) = outcome else {
            bail!("evaluation stopped");
        };
        reports.iter_mut().for_each(|r| r.record.first_image = a.first);
        let json = serde_json::json!({"sweep": reports.iter().map(report_json).collect::<Vec<_>>()});
        if let Some(out) = &a.out {
            crate::fsutil::write_atomic(out, serde_json::to_string_pretty(&json)?.as_bytes())
                .with_context(|| format!("cannot write {}", out.display()))?;
        }
        return emit(&if a.json {
            serde_json::to_string_pretty(&json)? + "\n"
        } else {
            sweep_text(&reports)?
        });
    }
    let outcome = eval::evaluate(&subject, source, &data, a.split, n, &settings, &mut progress)?;
    drop(progress);
    let Outcome::Done(mut report) = outcome else {
        bail!("evaluation stopped");
    };
    report.record.first_image = a.first;
    let text = if a.json {
        serde_json::to_string_pretty(&report_json(&report))? + "\n"
    } else {
        report_text(&report)?
    };
    if let Some(out) = &a.out {
        crate::fsutil::write_atomic(out, serde_json::to_string_pretty(&report_json(&report))?.as_bytes())
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    emit(&text)
}

/// The report as JSON, per-example vectors left out (they are in the library's `Report`).
pub fn report_json(r: &Report) -> serde_json::Value {
    let mut v = serde_json::to_value(r).expect("reports serialise");
    if let Some(attacks) = v["attacks"].as_array_mut() {
        for a in attacks {
            a.as_object_mut().map(|o| o.remove("robust"));
        }
    }
    v
}

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

fn report_text(r: &Report) -> Result<String> {
    let mut o = String::new();
    let rec = &r.record;
    writeln!(o, "model     {}", rec.model)?;
    writeln!(o, "sha256    {}", rec.model_sha256)?;
    writeln!(
        o,
        "data      {}, first {} images; {}",
        rec.dataset, rec.n_images, rec.dataset_source
    )?;
    writeln!(
        o,
        "settings  seed {}, batch {}, {} evaluation",
        rec.seed, rec.batch_size, rec.strength
    )?;
    writeln!(
        o,
        "clean accuracy   {} ({} of {})",
        pct(r.clean_accuracy),
        r.n_clean_correct,
        rec.n_images
    )?;
    for a in &r.attacks {
        writeln!(o, "{}", a.label)?;
        writeln!(
            o,
            "    robust accuracy {}  W-Robust {}  ({} robust, {:.1} s)",
            pct(a.robust_accuracy),
            pct(a.w_robust),
            a.n_robust,
            a.seconds
        )?;
        if let Some(s) = &a.router {
            writeln!(
                o,
                "    router: type accuracy {}, AUC {:.4}, mean p_adv clean {:.3} / adversarial {:.3}, mean signal per block clean {:?} / adversarial {:?}",
                pct(s.type_accuracy),
                s.auc,
                s.mean_p_adv_clean,
                s.mean_p_adv_adversarial,
                s.mean_signal_clean
                    .iter()
                    .map(|v| (v * 1000.0).round() / 1000.0)
                    .collect::<Vec<_>>(),
                s.mean_signal_adversarial
                    .iter()
                    .map(|v| (v * 1000.0).round() / 1000.0)
                    .collect::<Vec<_>>()
            )?;
        }
    }
    if let (Some(w), Some(wr)) = (r.worst_case_accuracy, r.w_robust) {
        writeln!(
            o,
            "worst case over all {} attacks, per example: {}  W-Robust {}",
            r.attacks.len(),
            pct(w),
            pct(wr)
        )?;
    }
    if !r.checks.is_empty() {
        writeln!(o, "sanity checks:")?;
        for c in &r.checks {
            let mark = match c.passed {
                Some(true) => "pass",
                Some(false) => "FAIL",
                None => "skip",
            };
            writeln!(o, "  [{mark}] {}: {}", c.name, c.detail)?;
            if c.passed == Some(false) {
                writeln!(o, "         casts doubt on: {}", c.concerns)?;
            }
        }
    } else {
        writeln!(o, "sanity checks: not run (--no-checks)")?;
    }
    Ok(o)
}

/// Accuracy against eps as a table, one column per attack and the worst case.
fn sweep_text(reports: &[Report]) -> Result<String> {
    let mut o = String::new();
    let first = &reports[0];
    writeln!(o, "model     {}", first.record.model)?;
    writeln!(
        o,
        "data      {}, first {} images",
        first.record.dataset, first.record.n_images
    )?;
    for a in &first.attacks {
        writeln!(o, "attack    {}", a.label)?;
    }
    write!(o, "{:>22} {:>9}", "eps", "clean")?;
    for a in &first.attacks {
        write!(o, " {:>12}", a.name)?;
    }
    writeln!(o, " {:>11}", "worst case")?;
    let mut previous = f64::INFINITY;
    let mut rises = Vec::new();
    for r in reports {
        let eps = match &r.attacks.first().map(|a| &a.spec) {
            Some(AttackSpec::Single(c)) | Some(AttackSpec::Transfer { config: c, .. }) => c.eps,
            Some(AttackSpec::AutoAttack { eps, .. }) => *eps,
            None => f64::NAN,
        };
        write!(o, "{:>22} {:>9}", format_eps(eps), pct(r.clean_accuracy))?;
        for a in &r.attacks {
            write!(o, " {:>12}", pct(a.robust_accuracy))?;
        }
        let worst = r.worst_case_accuracy.unwrap_or(r.clean_accuracy);
        writeln!(o, " {:>11}", pct(worst))?;
        if worst > previous {
            rises.push(format_eps(eps));
        }
        previous = worst;
    }
    if !rises.is_empty() {
        writeln!(
            o,
            "WARNING: worst-case accuracy rose with eps at {} (order the list by eps; otherwise the attack is not converging)",
            rises.join(", ")
        )?;
    }
    if let Some(last) = reports.last() {
        o.push_str(
            &report_text(last)?
                .lines()
                .filter(|l| l.starts_with("sanity") || l.starts_with("  [") || l.starts_with("         casts"))
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
        );
    }
    Ok(o)
}

fn describe(model: &Model, xs: &Tensor) -> Result<serde_json::Value> {
    let out = model.forward(xs, Mode::Eval)?;
    let probs = candle_nn::ops::softmax(&out.logits, D::Minus1)?
        .squeeze(0)?
        .to_vec1::<f32>()?;
    let top: Vec<_> = super::predict::top_k(&probs, 5)
        .into_iter()
        .map(|(i, p)| json!({"class": i, "name": model.config.class_name(i), "probability": p}))
        .collect();
    let mut v = json!({"top5": top});
    if let Some(tp) = out.type_probs()? {
        let tp = tp.squeeze(0)?.to_vec1::<f32>()?;
        v["type_probabilities"] = json!({"clean": tp[0], "adversarial": tp[1]});
        let means: Vec<f32> = out
            .signals
            .iter()
            .map(|s| s.mean_all().and_then(|m| m.to_scalar::<f32>()))
            .collect::<candle_core::Result<_>>()?;
        v["mean_signal_per_block"] = json!(means);
    }
    Ok(v)
}

pub fn run_attack(a: &AttackArgs) -> Result<()> {
    let model = open_model(&a.model)?;
    let c = &model.config;
    let img = image::load(&a.image, c.in_channels, c.image_size)?;
    let x: Vec<f32> = img.pixels.iter().map(|&p| f32::from(p) / 255.0).collect();
    let xs = Tensor::from_vec(x.clone(), (1, c.in_channels, c.image_size, c.image_size), &Device::Cpu)?;
    let net = model.frozen()?;
    let before = describe(&model, &xs)?;
    let predicted = before["top5"][0]["class"].as_u64().unwrap_or(0) as u32;
    let label = match a.label {
        Some(l) if (l as usize) < c.num_classes => l,
        Some(l) => bail!("--label {l} is not a class of this model (0 to {})", c.num_classes - 1),
        None => predicted,
    };
    if let Some(t) = a.target
        && t as usize >= c.num_classes
    {
        bail!("--target {t} is not a class of this model (0 to {})", c.num_classes - 1);
    }
    let eps = attack::parse_eps(&a.eps).map_err(anyhow::Error::msg)?;
    let mut cfg = AttackConfig::new(a.attack, eps);
    cfg.threat = a.norm;
    cfg.steps = a.steps;
    cfg.step_size = a.step_size;
    cfg.restarts = a.restarts;
    cfg.target = a.target;
    cfg.lambda = a.lambda;
    cfg.seed = a.seed;
    if cfg.kind == AttackKind::Adaptive && !net.is_awnet() {
        bail!(
            "the adaptive attack needs an AW-Net model; {} is static",
            a.model.display()
        );
    }
    let Outcome::Done(run) = attack::run(&net, &xs, &[label], &cfg, &|| false)? else {
        bail!("attack stopped");
    };
    let adv: Vec<f32> = run.adv.flatten_all()?.to_vec1::<f32>()?;
    let saved = attack::lab::quantise(&adv, &x, eps, cfg.threat == attack::Threat::Linf);
    image::save_png(&a.out, &saved, c.in_channels, c.image_size, c.image_size)?;
    let saved_f: Vec<f32> = saved.iter().map(|&p| f32::from(p) / 255.0).collect();
    let saved_t = Tensor::from_vec(saved_f.clone(), xs.shape(), &Device::Cpu)?;
    let after = describe(&model, &saved_t)?;
    let linf = saved_f.iter().zip(&x).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let l2 = saved_f
        .iter()
        .zip(&x)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f32>()
        .sqrt();
    let v = json!({
        "image": a.image, "conversion": img.note, "label": label,
        "label_source": if a.label.is_some() { "given" } else { "the model's clean prediction" },
        "attack": cfg.label(), "settings": cfg, "out": a.out,
        "before": before, "after": after,
        "perturbation": {"linf": linf, "l2": l2, "linf_255": linf * 255.0},
        "loss_trace": run.trace,
    });
    let text = if a.json {
        serde_json::to_string_pretty(&v)? + "\n"
    } else {
        let mut o = String::new();
        let name = |v: &serde_json::Value| {
            format!(
                "{} ({:.2}%)",
                v["top5"][0]["name"].as_str().unwrap_or(""),
                100.0 * v["top5"][0]["probability"].as_f64().unwrap_or(0.0)
            )
        };
        writeln!(o, "{}: {}", a.image.display(), cfg.label())?;
        if !img.note.is_empty() {
            writeln!(o, "  input: {}", img.note)?;
        }
        writeln!(
            o,
            "  label {label} ({}), {}",
            c.class_name(label as usize),
            v["label_source"].as_str().unwrap_or("")
        )?;
        writeln!(o, "  before: {}", name(&before))?;
        writeln!(o, "  after:  {}  (saved 8-bit image)", name(&after))?;
        writeln!(
            o,
            "  perturbation: L-inf {:.4} ({:.1}/255), L2 {:.4}; eps {}",
            linf,
            linf * 255.0,
            l2,
            format_eps(eps)
        )?;
        if let (Some(b), Some(f)) = (before.get("type_probabilities"), after.get("type_probabilities")) {
            writeln!(
                o,
                "  router p(adversarial): {:.3} -> {:.3}",
                b["adversarial"].as_f64().unwrap_or(0.0),
                f["adversarial"].as_f64().unwrap_or(0.0)
            )?;
        }
        writeln!(o, "  wrote {}", a.out.display())?;
        o
    };
    emit(&text)
}
