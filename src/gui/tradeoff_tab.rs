//! The Trade-off tab: accuracy against eps for the open models under one attack (computed in a
//! worker, with progress and Stop), the sanity checks beside the curves, and the clean-vs-robust
//! scatter with lines of equal W-Robust and this session's training trajectory.

use std::path::PathBuf;

use egui::{Color32, Ui};
use egui_plot::{Legend, Line, Plot, PlotPoints, Points};

use super::Command;
use super::train_tab::trade_off_plot;
use super::worker::ModelSummary;
use crate::analysis::tradeoff::Curve;
use crate::attack::{AttackConfig, AttackKind};
use crate::observe::Progress;
use crate::train::EpochReport;

#[derive(Clone, Debug, PartialEq)]
pub struct SweepRequest {
    pub generation: u64,
    pub models: Vec<PathBuf>,
    pub data: String,
    pub n: usize,
    pub attack: AttackConfig,
    pub eps: Vec<f64>,
}

pub struct TradeOffState {
    pub kind: AttackKind,
    pub steps: usize,
    pub eps: String,
    pub n: usize,
    pub generation: u64,
    pub progress: Option<Progress>,
    pub curves: Vec<Curve>,
}

impl Default for TradeOffState {
    fn default() -> Self {
        Self {
            kind: AttackKind::Pgd,
            steps: 20,
            eps: "0, 0.025, 0.05, 0.1, 0.15, 0.2".into(),
            n: 200,
            generation: 0,
            progress: None,
            curves: Vec::new(),
        }
    }
}

/// `"0, 0.05, 8/255"` to radii.
pub fn parse_list(s: &str) -> Result<Vec<f64>, String> {
    let v: Vec<f64> = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(crate::attack::parse_eps)
        .collect::<Result<_, _>>()?;
    if v.is_empty() {
        return Err("give at least one eps".into());
    }
    Ok(v)
}

const COLOURS: [Color32; 4] = [
    Color32::from_rgb(70, 130, 220),
    Color32::from_rgb(230, 120, 40),
    Color32::from_rgb(90, 180, 90),
    Color32::from_rgb(200, 80, 200),
];

pub fn show(
    ui: &mut Ui,
    s: &mut TradeOffState,
    models: &[ModelSummary],
    epochs: &[EpochReport],
    data: &str,
    commands: &mut Vec<Command>,
) {
    ui.heading("Accuracy against eps");
    ui.horizontal_wrapped(|ui| {
        egui::ComboBox::from_id_salt("sweep_attack")
            .selected_text(s.kind.name())
            .show_ui(ui, |ui| {
                for k in [
                    AttackKind::Fgsm,
                    AttackKind::Pgd,
                    AttackKind::Cw,
                    AttackKind::ApgdCe,
                    AttackKind::Square,
                    AttackKind::Noise,
                ] {
                    ui.selectable_value(&mut s.kind, k, k.name());
                }
            })
            .response
            .on_hover_text("The attack run at every radius (L-inf)");
        ui.add(egui::DragValue::new(&mut s.steps).range(1..=1000).prefix("steps "));
        ui.label("eps");
        ui.add(egui::TextEdit::singleline(&mut s.eps).desired_width(220.0))
            .on_hover_text("Comma-separated radii in pixel units; 8/255 is accepted");
        ui.add(
            egui::Slider::new(&mut s.n, 10..=10_000)
                .logarithmic(true)
                .text("images"),
        )
        .on_hover_text("The first N test images");
        let running = s.progress.is_some();
        if ui
            .add_enabled(!running && !models.is_empty(), egui::Button::new("Compute"))
            .on_hover_text("Evaluate every open model at every radius, with the sanity checks")
            .clicked()
        {
            match parse_list(&s.eps) {
                Ok(eps) => {
                    let mut attack = AttackConfig::new(s.kind, eps[0]);
                    attack.steps = Some(s.steps);
                    s.generation += 1;
                    s.progress = Some(Progress {
                        stage: "starting".into(),
                        done: 0,
                        total: s.n,
                    });
                    commands.push(Command::Sweep(SweepRequest {
                        generation: s.generation,
                        models: models.iter().map(|m| m.path.clone()).collect(),
                        data: data.to_string(),
                        n: s.n,
                        attack,
                        eps,
                    }));
                }
                Err(e) => commands.push(Command::Notify(format!("eps: {e}"))),
            }
        }
        if running && ui.button("Stop").on_hover_text("Cancel the sweep").clicked() {
            commands.push(Command::CancelSweep);
            s.progress = None;
        }
    });
    if let Some(p) = &s.progress {
        ui.add(
            egui::ProgressBar::new(p.done as f32 / p.total.max(1) as f32)
                .text(format!("{}: {}/{}", p.stage, p.done, p.total)),
        );
    }
    let w = (ui.available_width() / 2.0 - 8.0).max(200.0);
    ui.horizontal(|ui| {
        ui.vertical(|ui| {
            ui.set_width(w);
            match s.curves.first() {
                Some(c) => ui.label(format!("{} on the first {} test images", c.attack, c.n)),
                None => ui.label("Press Compute to evaluate the open models."),
            };
            let shown = Plot::new("acc_vs_eps")
                .height(300.0)
                .legend(Legend::default())
                .x_axis_label("eps (L-inf, pixel units)")
                .y_axis_label("robust accuracy")
                .include_y(0.0)
                .include_y(1.0)
                .show(ui, |p| {
                    for (i, c) in s.curves.iter().enumerate() {
                        let pts: Vec<[f64; 2]> = c.points.iter().map(|&(e, a)| [e, a]).collect();
                        let col = COLOURS[i % COLOURS.len()];
                        p.line(Line::new(c.model.clone(), PlotPoints::from(pts.clone())).color(col));
                        p.points(
                            Points::new(c.model.clone(), PlotPoints::from(pts))
                                .radius(3.0)
                                .color(col),
                        );
                    }
                });
            super::export_menu(&shown.response, "accuracy-vs-eps", commands);
        });
        ui.vertical(|ui| {
            ui.set_width(w);
            ui.label("Clean vs robust accuracy: each model's latest held-out record; dashed lines have equal W-Robust");
            let shown = trade_off_plot(ui, "tab_trade_off", epochs, models);
            super::export_menu(&shown, "trade-off-scatter", commands);
        });
    });
    for c in &s.curves {
        ui.collapsing(
            format!(
                "Sanity checks for {} (at the largest eps, first {} images)",
                c.model,
                c.n.min(100)
            ),
            |ui| {
                for k in &c.checks {
                    let (mark, colour) = match k.passed {
                        Some(true) => ("pass", Color32::from_rgb(90, 180, 90)),
                        Some(false) => ("FAIL", ui.visuals().error_fg_color),
                        None => ("not run", ui.visuals().weak_text_color()),
                    };
                    ui.horizontal_wrapped(|ui| {
                        ui.colored_label(colour, mark);
                        ui.label(format!("{}: {} (concerns {})", k.name, k.detail, k.concerns));
                    });
                }
            },
        );
    }
    for m in models {
        if let Some((c, r, label)) = m.trade_off_point() {
            ui.small(format!(
                "{}: clean {:.2}%, robust {:.2}% under {label}, W-Robust {:.2}% (held-out training images)",
                m.name,
                100.0 * c,
                100.0 * r,
                50.0 * (c + r)
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn eps_lists_parse() {
        assert_eq!(super::parse_list("0, 0.1,8/255").unwrap(), vec![0.0, 0.1, 8.0 / 255.0]);
        assert!(super::parse_list("").is_err());
        assert!(super::parse_list("0.1, x").is_err());
    }
}
