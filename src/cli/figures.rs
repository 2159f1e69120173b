//! `awnet figures`: the full set of figures without a window.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::{FiguresArgs, emit};
use crate::analysis::{filters, router, tradeoff};
use crate::attack::{AttackConfig, parse_eps};
use crate::data::Split;
use crate::export::{Figure, figures, write};
use crate::model::{Model, checkpoint};
use crate::observe::{Observer, Outcome, Progress, StopFlag};

/// A line on stderr whenever the stage changes; Ctrl-C stops at the next step.
struct Stages {
    last: String,
    stop: StopFlag,
}

impl Observer for Stages {
    fn progress(&mut self, p: &Progress) {
        if p.stage != self.last {
            eprintln!("  {}", p.stage);
            self.last = p.stage.clone();
        }
    }

    fn stop_requested(&self) -> bool {
        self.stop.is_raised()
    }
}

fn name_of(p: &Path) -> String {
    p.file_stem()
        .map_or_else(|| p.display().to_string(), |s| s.to_string_lossy().into_owned())
}

pub fn run(a: &FiguresArgs) -> Result<()> {
    let eps = parse_eps(&a.eps).map_err(anyhow::Error::msg)?;
    if !(a.scale > 0.0 && a.scale <= 8.0) {
        bail!("--scale {} (0 to 8)", a.scale);
    }
    let paths: Vec<PathBuf> = std::iter::once(a.model.clone())
        .chain(a.compare.iter().cloned())
        .collect();
    let models: Vec<Model> = paths.iter().map(|p| checkpoint::open(p)).collect::<Result<_, _>>()?;
    let names: Vec<String> = paths.iter().map(|p| name_of(p)).collect();
    let sources: Vec<serde_json::Value> = models
        .iter()
        .zip(&names)
        .map(|(m, n)| {
            let (file, sha) = m.meta.file.clone().unwrap_or_default();
            json!({"name": n, "file": file, "sha256": sha})
        })
        .collect();
    let stop = StopFlag::default();
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || flag.raise());
    let mut obs = Stages {
        last: String::new(),
        stop,
    };
    let mut written: Vec<serde_json::Value> = Vec::new();
    let save = |fig: &Figure, files: &mut Vec<serde_json::Value>| -> Result<()> {
        for p in fig.write_all(&a.out, a.scale)? {
            files.push(json!({"file": p.file_name().map(|f| f.to_string_lossy().into_owned()), "figure": fig.name, "title": fig.title}));
        }
        Ok(())
    };

    eprintln!("weight distributions of {} model(s)", models.len());
    let weights: Vec<(String, Vec<filters::LayerWeights>)> = names
        .iter()
        .cloned()
        .zip(
            models
                .iter()
                .map(filters::layer_weights)
                .collect::<Result<Vec<_>, _>>()?,
        )
        .collect();
    let mut layers = vec![filters::POOLED.to_string()];
    layers.extend(weights[0].1.iter().map(|l| l.name.clone()));
    for layer in &layers {
        let analysis = filters::analyse(&weights, layer, 60, 0.01);
        for fig in figures::filters(&analysis, true, json!(sources)) {
            save(&fig, &mut written)?;
        }
        if layer == filters::POOLED {
            let p = write(
                &a.out.join("layer-statistics.csv"),
                figures::layer_table_csv(&analysis).as_bytes(),
            )?;
            written.push(json!({"file": p.file_name().map(|f| f.to_string_lossy().into_owned()), "figure": "layer-statistics", "title": "Per-layer weight statistics"}));
        }
    }

    let mut cfg = AttackConfig::new(a.attack, eps);
    cfg.steps = a.steps;
    let sweep: Vec<f64> = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0].iter().map(|f| f * eps).collect();
    let mut curves = Vec::new();
    for (m, name) in models.iter().zip(&names) {
        let ds = crate::data::load(&a.data, Split::Test, Some((m.config.in_channels, m.config.image_size)))
            .with_context(|| format!("test images for {name}"))?;
        if m.net.is_awnet() {
            eprintln!("router of {name}: {} on {} images", cfg.label(), a.n.min(ds.len()));
            let net = m.frozen()?;
            match router::analyse(&net, &ds, a.n, &cfg, 0, &mut obs)? {
                Outcome::Done(r) => {
                    for fig in figures::router(&r, name, json!(sources)) {
                        save(&fig, &mut written)?;
                    }
                }
                Outcome::Cancelled => bail!("stopped; the files written so far are in {}", a.out.display()),
            }
        }
        eprintln!("accuracy against eps for {name}");
        match tradeoff::sweep_model(m, &ds, a.n, &cfg, &sweep, &mut obs)? {
            Outcome::Done(c) => curves.push(c),
            Outcome::Cancelled => bail!("stopped; the files written so far are in {}", a.out.display()),
        }
        if let Some(log) = m
            .meta
            .log_summary
            .clone()
            .and_then(|v| serde_json::from_value::<Vec<crate::train::EpochReport>>(v).ok())
            .filter(|l| !l.is_empty())
        {
            save(&figures::training(name, &log, json!(sources)), &mut written)?;
        }
    }
    save(&figures::accuracy_vs_eps(&curves), &mut written)?;
    let at = sweep.iter().position(|&e| e == eps).unwrap_or(0);
    let points: Vec<(String, f64, f64, String)> = curves
        .iter()
        .map(|c| {
            (
                c.model.clone(),
                c.clean_accuracy,
                c.points[at].1,
                format!("{} at eps {}", c.attack, crate::attack::format_eps(eps)),
            )
        })
        .collect();
    save(&figures::scatter(&points), &mut written)?;

    let manifest = json!({
        "program": concat!("awnet-lab ", env!("CARGO_PKG_VERSION")),
        "models": sources, "data": a.data, "split": "test", "images": a.n,
        "attack": cfg.label(), "sweep_eps": sweep, "files": written,
    });
    write(
        &a.out.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    emit(&format!(
        "wrote {} files and manifest.json to {}\n",
        manifest["files"].as_array().map_or(0, Vec::len),
        a.out.display()
    ))
}
