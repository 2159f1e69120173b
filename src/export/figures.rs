//! The figures of each view, built from the analysis types the window plots.

use serde_json::{Value, json};

use super::{Figure, Series, Style};
use crate::analysis::Histogram;
use crate::analysis::filters::FiltersAnalysis;
use crate::analysis::router::{ImagePair, RouterAnalysis};
use crate::analysis::tradeoff::Curve;
use crate::train::EpochReport;

/// A histogram as the step line the window draws.
pub fn steps(h: &Histogram, density: bool) -> Vec<(f64, f64)> {
    let ys: Vec<f64> = if density {
        h.density()
    } else {
        h.counts.iter().map(|&c| c as f64).collect()
    };
    let mut pts = vec![(h.edges[0], 0.0)];
    for (y, e) in ys.iter().zip(h.edges.windows(2)) {
        pts.push((e[0], *y));
        pts.push((e[1], *y));
    }
    pts.push((*h.edges.last().expect("a histogram has edges"), 0.0));
    pts
}

/// The program's name and version, with `extra` under `details`.
pub fn provenance(extra: Value) -> Value {
    json!({"program": concat!("awnet-lab ", env!("CARGO_PKG_VERSION")), "details": extra})
}

/// The weight histogram and the per-filter norm histogram of one Filters analysis.
pub fn filters(a: &FiltersAnalysis, density: bool, models: Value) -> Vec<Figure> {
    let prov = provenance(json!({"models": models, "layer": a.layer, "near_zero": a.near_zero}));
    let y = if density {
        "density (1 / weight unit)"
    } else {
        "count (weights per bin)"
    };
    let hist = |hs: &[Option<Histogram>]| -> Vec<Series> {
        a.models
            .iter()
            .zip(hs)
            .filter_map(|(m, h)| {
                h.as_ref().map(|h| Series {
                    name: m.clone(),
                    style: Style::Line,
                    points: steps(h, density),
                })
            })
            .collect()
    };
    vec![
        Figure {
            name: format!("weights-{}", a.layer),
            title: format!("Weight values, {}", a.layer),
            x_label: "weight value".into(),
            y_label: y.into(),
            series: hist(&a.histograms),
            x_range: None,
            y_range: None,
            provenance: prov.clone(),
        },
        Figure {
            name: format!("filter-norms-{}", a.layer),
            title: format!("Per-filter L2 norms, {}", a.layer),
            x_label: "L2 norm of a filter".into(),
            y_label: if density {
                "density (1 / norm unit)".into()
            } else {
                "count (filters per bin)".into()
            },
            series: hist(&a.norm_histograms),
            x_range: None,
            y_range: None,
            provenance: prov,
        },
    ]
}

/// The per-layer statistics table as CSV.
pub fn layer_table_csv(a: &FiltersAnalysis) -> String {
    let mut s = String::from(
        "model,layer,weights,mean,std,mean_abs,excess_kurtosis,near_zero_share,near_zero_threshold,mean_filter_l1,mean_filter_l2,w1_to_first_model\n",
    );
    for r in &a.table {
        let m = &r.summary;
        s.push_str(&format!(
            "\"{}\",{},{},{},{},{},{},{},{},{},{},{}\n",
            a.models[r.model],
            r.layer,
            m.count,
            m.mean,
            m.std,
            m.mean_abs,
            m.kurtosis,
            m.near_zero_share,
            m.near_zero,
            r.mean_filter_l1,
            r.mean_filter_l2,
            r.w1_to_first.map_or(String::new(), |d| d.to_string())
        ));
    }
    s
}

/// p_adv histograms, the ROC, and each block's signal distributions.
pub fn router(a: &RouterAnalysis, model: &str, prov: Value) -> Vec<Figure> {
    let prov = provenance(
        json!({"model": prov, "attack": a.attack, "images": a.n, "auc": a.auc, "type_accuracy": a.type_accuracy}),
    );
    let pair = |c: &Histogram, d: &Histogram| {
        vec![
            Series {
                name: "clean".into(),
                style: Style::Line,
                points: steps(c, true),
            },
            Series {
                name: "adversarial".into(),
                style: Style::Line,
                points: steps(d, true),
            },
        ]
    };
    let mut out = vec![
        Figure {
            name: format!("router-{model}-p-adv"),
            title: format!(
                "Router type probability, {} images, {}",
                a.n,
                a.attack.split(" (").next().unwrap_or("")
            ),
            x_label: "p_adv (type head's probability of adversarial)".into(),
            y_label: "density".into(),
            series: pair(&a.p_hist_clean, &a.p_hist_adv),
            x_range: Some((0.0, 1.0)),
            y_range: None,
            provenance: prov.clone(),
        },
        Figure {
            name: format!("router-{model}-roc"),
            title: format!("ROC of p_adv, AUC {:.3}", a.auc),
            x_label: "false positive rate (clean called adversarial)".into(),
            y_label: "true positive rate".into(),
            series: vec![
                Series {
                    name: "chance".into(),
                    style: Style::Reference,
                    points: vec![(0.0, 0.0), (1.0, 1.0)],
                },
                Series {
                    name: format!("ROC (AUC {:.3})", a.auc),
                    style: Style::Line,
                    points: a.roc.clone(),
                },
            ],
            x_range: Some((0.0, 1.0)),
            y_range: Some((0.0, 1.0)),
            provenance: prov.clone(),
        },
    ];
    for b in &a.blocks {
        out.push(Figure {
            name: format!("router-{model}-block{}-signals", b.block),
            title: format!("Block {} signals, clean vs adversarial", b.block),
            x_label: "signal omega (filter scale)".into(),
            y_label: "density".into(),
            series: pair(&b.hist_clean, &b.hist_adv),
            x_range: None,
            y_range: None,
            provenance: prov.clone(),
        });
        out.push(Figure {
            name: format!("router-{model}-block{}-signal-diff", b.block),
            title: format!("Block {}: mean signal per filter, adversarial minus clean", b.block),
            x_label: "filter".into(),
            y_label: "mean omega, adversarial - clean".into(),
            series: vec![Series {
                name: "adv - clean".into(),
                style: Style::Bars,
                points: b
                    .filter_difference()
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| (i as f64, d))
                    .collect(),
            }],
            x_range: None,
            y_range: None,
            provenance: prov.clone(),
        });
    }
    out
}

/// Every block's signals one after another, as (filter, signal).
pub fn flat_signals(s: &[Vec<f64>]) -> Vec<(f64, f64)> {
    s.iter().flatten().enumerate().map(|(i, &v)| (i as f64, v)).collect()
}

/// One image and its adversarial twin: every filter's signal, and each weight-varied conv's
/// base and effective weights.
pub fn router_pair(p: &ImagePair, model: &str, attack: &str, prov: Value) -> Vec<Figure> {
    let prov = provenance(
        json!({"model": prov, "attack": attack, "image": p.index, "label": p.label,
        "predicted_clean": p.pred_clean, "predicted_adversarial": p.pred_adv,
        "p_adv_clean": p.p_adv_clean, "p_adv_adversarial": p.p_adv_adv}),
    );
    let line = Series::line;
    let mut out = vec![Figure {
        name: format!("router-{model}-image{}-signals", p.index),
        title: format!("Signals of test image {} and its adversarial twin", p.index),
        x_label: "filter (blocks one after another)".into(),
        y_label: "signal omega".into(),
        series: vec![
            line("clean", flat_signals(&p.signals_clean)),
            line("adversarial", flat_signals(&p.signals_adv)),
        ],
        x_range: None,
        y_range: None,
        provenance: prov.clone(),
    }];
    for e in &p.effective {
        out.push(Figure {
            name: format!("router-{model}-image{}-effective-{}", p.index, e.conv),
            title: format!(
                "{} (block {}): W and W * omega, test image {}",
                e.conv, e.block, p.index
            ),
            x_label: "weight value".into(),
            y_label: "density".into(),
            series: vec![
                line("base W", steps(&e.hist_base, true)),
                line("W * omega, clean", steps(&e.hist_clean, true)),
                line("W * omega, adversarial", steps(&e.hist_adv, true)),
            ],
            x_range: None,
            y_range: None,
            provenance: prov.clone(),
        });
    }
    out
}

/// Accuracy against eps, one curve per model.
pub fn accuracy_vs_eps(curves: &[Curve]) -> Figure {
    Figure {
        name: "accuracy-vs-eps".into(),
        title: match curves.first() {
            Some(c) => format!("Robust accuracy against eps, {} on {} images", c.attack.split(" (").next().unwrap_or(""), c.n),
            None => "Robust accuracy against eps".into(),
        },
        x_label: "eps (L-inf, pixel units of [0, 1])".into(),
        y_label: "robust accuracy (fraction of images)".into(),
        series: curves
            .iter()
            .map(|c| Series {
                name: c.model.clone(),
                style: Style::LinePoints,
                points: c.points.clone(),
            })
            .collect(),
        x_range: None,
        y_range: Some((0.0, 1.0)),
        provenance: provenance(json!(curves
            .iter()
            .map(|c| json!({"model": c.model, "file": c.file, "sha256": c.sha256, "attack": c.attack, "images": c.n, "sanity_checks": c.checks}))
            .collect::<Vec<_>>())),
    }
}

/// Clean vs robust accuracy per model, with lines of equal W-Robust.
pub fn scatter(points: &[(String, f64, f64, String)]) -> Figure {
    let mut series: Vec<Series> = (1..10)
        .map(|k| {
            let w = k as f64 / 10.0;
            let (a, b) = ((2.0 * w - 1.0).max(0.0), (2.0 * w).min(1.0));
            Series {
                name: format!("W-Robust {w:.1}"),
                style: Style::Reference,
                points: vec![(a, 2.0 * w - a), (b, 2.0 * w - b)],
            }
        })
        .collect();
    series.extend(points.iter().map(|(m, c, r, _)| Series {
        name: m.clone(),
        style: Style::Points,
        points: vec![(*c, *r)],
    }));
    Figure {
        name: "trade-off-scatter".into(),
        title: "Clean vs robust accuracy (grey: equal W-Robust)".into(),
        x_label: "clean accuracy".into(),
        y_label: "robust accuracy".into(),
        series,
        x_range: Some((0.0, 1.0)),
        y_range: Some((0.0, 1.0)),
        provenance: provenance(json!(
            points
                .iter()
                .map(|(m, c, r, l)| json!({"model": m, "clean": c, "robust": r, "robust_label": l}))
                .collect::<Vec<_>>()
        )),
    }
}

/// A model's stored training record: loss, clean and robust accuracy per epoch.
pub fn training(model: &str, log: &[EpochReport], prov: Value) -> Figure {
    let per = |f: fn(&EpochReport) -> f64| log.iter().map(|r| (r.epoch as f64 + 1.0, f(r))).collect();
    Figure {
        name: format!("training-{model}"),
        title: format!("Training record of {model} (held-out training images)"),
        x_label: "epoch".into(),
        y_label: "accuracy / loss".into(),
        series: vec![
            Series {
                name: "training loss".into(),
                style: Style::LinePoints,
                points: per(|r| r.train_loss),
            },
            Series {
                name: "clean accuracy".into(),
                style: Style::LinePoints,
                points: per(|r| r.clean_accuracy),
            },
            Series {
                name: log
                    .last()
                    .map_or("robust accuracy".into(), |r| format!("robust: {}", r.robust_label)),
                style: Style::LinePoints,
                points: per(|r| r.robust_accuracy),
            },
        ],
        x_range: None,
        y_range: None,
        provenance: provenance(prov),
    }
}
