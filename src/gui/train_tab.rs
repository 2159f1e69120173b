//! The Train tab: the run's settings, Start / Stop / Resume, and live plots of the run.

use std::path::PathBuf;

use egui::{Color32, Ui};
use egui_plot::{Legend, Line, LineStyle, MarkerShape, Plot, PlotPoints, Points};
use serde::{Deserialize, Serialize};

use super::Command;
use super::worker::{ModelSummary, PickPurpose, TrainRequest};
use crate::export::{Figure, Series, Style};
use crate::model::Arch;
use crate::observe::Progress;
use crate::train::{EpochReport, Method, OptimizerKind, Schedule, StepReport, TrainConfig, TrainEvent};

/// The settings form; persisted between sessions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainForm {
    pub method: Method,
    pub arch: Arch,
    pub epochs: usize,
    pub batch_size: usize,
    pub eps: String,
    pub lr: f64,
    pub schedule: ScheduleChoice,
    pub optimizer: OptimizerKind,
    pub seed: u64,
    pub teacher_clean: String,
    pub teacher_robust: String,
    pub out: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScheduleChoice {
    Cosine,
    Step,
    Constant,
}

impl Default for TrainForm {
    fn default() -> Self {
        Self {
            method: Method::Standard,
            arch: Arch::SmallCnn,
            epochs: 1,
            batch_size: 128,
            eps: "0.1".into(),
            lr: 0.05,
            schedule: ScheduleChoice::Cosine,
            optimizer: OptimizerKind::Sgd,
            seed: 0,
            teacher_clean: String::new(),
            teacher_robust: String::new(),
            out: "run.safetensors".into(),
        }
    }
}

impl TrainForm {
    /// The training settings the form describes, or what is wrong with it.
    pub fn config(&self, data: &str) -> Result<TrainConfig, String> {
        let eps = crate::attack::parse_eps(&self.eps).map_err(|e| format!("eps: {e}"))?;
        let mut c = TrainConfig::new(self.method, data, self.epochs, eps);
        c.batch_size = self.batch_size;
        c.lr = self.lr;
        c.optimizer = self.optimizer;
        c.seed = self.seed;
        c.schedule = match self.schedule {
            ScheduleChoice::Cosine => Schedule::Cosine,
            ScheduleChoice::Constant => Schedule::Constant,
            ScheduleChoice::Step => Schedule::Step {
                milestones: vec![self.epochs / 2, self.epochs * 3 / 4],
                gamma: 0.1,
            },
        };
        if self.method == Method::Awnet {
            if self.teacher_clean.is_empty() || self.teacher_robust.is_empty() {
                return Err("AW-Net distillation needs a clean and a robust teacher".into());
            }
            c.teacher_clean = Some(self.teacher_clean.clone());
            c.teacher_robust = Some(self.teacher_robust.clone());
        }
        if self.out.trim().is_empty() {
            return Err("choose where the model file goes".into());
        }
        Ok(c)
    }
}

/// What the tab plots: the current run, or the record of the selected model.
#[derive(Clone, Debug, Default)]
pub struct TrainHistory {
    /// Which run or file this is.
    pub title: String,
    pub steps: Vec<StepReport>,
    pub epochs: Vec<EpochReport>,
    pub total_steps: usize,
    /// Images per step, for the time left.
    pub batch_size: usize,
    pub progress: Option<Progress>,
}

impl TrainHistory {
    pub fn from_model(m: &ModelSummary) -> Self {
        Self {
            title: format!("training record of {}", m.name),
            epochs: m.log.clone(),
            ..Self::default()
        }
    }

    pub fn apply(&mut self, e: &TrainEvent) {
        match e {
            TrainEvent::Started {
                epochs,
                steps_per_epoch,
                ..
            } => self.total_steps = epochs * steps_per_epoch,
            TrainEvent::Step(s) => self.steps.push(s.clone()),
            TrainEvent::Epoch(r) => {
                self.epochs.retain(|x| x.epoch != r.epoch);
                self.epochs.push(r.clone());
            }
            TrainEvent::Checkpoint { .. } => {}
        }
    }

    /// Loss terms by name, each as (global step, value).
    fn term_series(&self) -> Vec<(String, Vec<[f64; 2]>)> {
        let mut out: Vec<(String, Vec<[f64; 2]>)> = vec![("loss".into(), Vec::new())];
        for s in &self.steps {
            out[0].1.push([s.global_step as f64, s.loss]);
            for (name, v) in &s.terms {
                match out.iter_mut().find(|(n, _)| n == name) {
                    Some((_, pts)) => pts.push([s.global_step as f64, *v]),
                    None => out.push((name.clone(), vec![[s.global_step as f64, *v]])),
                }
            }
        }
        out
    }
}

/// The state the tab reads; the window owns it.
pub struct TrainView<'a> {
    pub form: &'a mut TrainForm,
    pub history: &'a TrainHistory,
    pub running: bool,
    pub data: &'a str,
    pub models: &'a [ModelSummary],
}

pub fn show(ui: &mut Ui, v: TrainView, commands: &mut Vec<Command>) {
    egui::Panel::left("train_settings")
        .resizable(false)
        .default_size(270.0)
        .show(ui, |ui| settings(ui, v.form, v.running, v.data, commands));
    egui::CentralPanel::default().show(ui, |ui| {
        egui::ScrollArea::vertical().show(ui, |ui| plots(ui, v.history, v.models, commands));
    });
}

fn settings(ui: &mut Ui, f: &mut TrainForm, running: bool, data: &str, commands: &mut Vec<Command>) {
    ui.heading("Run settings");
    ui.label(format!(
        "Data: {data} (train split; the last 5,000 images are held out)"
    ));
    egui::Grid::new("train_form").num_columns(2).show(ui, |ui| {
        ui.label("Method");
        egui::ComboBox::from_id_salt("method")
            .selected_text(format!("{:?}", f.method))
            .show_ui(ui, |ui| {
                for m in [Method::Standard, Method::PgdAt, Method::Trades, Method::Awnet, Method::AwnetFree] {
                    ui.selectable_value(&mut f.method, m, format!("{m:?}"));
                }
            })
            .response
            .on_hover_text("Standard: cross-entropy. PGD-AT: on PGD-10 images. TRADES: CE + beta KL. AwNet: distilled from two teachers. AwnetFree: AW-Net without teachers (a variant).");
        ui.end_row();
        ui.label("Backbone");
        egui::ComboBox::from_id_salt("arch")
            .selected_text(f.arch.name())
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut f.arch, Arch::SmallCnn, "small-cnn");
                ui.selectable_value(&mut f.arch, Arch::Resnet18, "resnet18");
            })
            .response
            .on_hover_text("small-cnn trains on this CPU; resnet18 is the paper's backbone");
        ui.end_row();
        ui.label("Epochs");
        ui.add(egui::DragValue::new(&mut f.epochs).range(1..=500))
            .on_hover_text("Passes over the training images");
        ui.end_row();
        ui.label("Batch size");
        ui.add(egui::DragValue::new(&mut f.batch_size).range(2..=1024))
            .on_hover_text("Images per step");
        ui.end_row();
        ui.label("eps (L-inf)");
        ui.text_edit_singleline(&mut f.eps)
            .on_hover_text("Radius of the training attack in pixel units of [0, 1]; 8/255 is accepted");
        ui.end_row();
        ui.label("Learning rate");
        ui.add(egui::DragValue::new(&mut f.lr).speed(0.001).range(1e-6..=1.0))
            .on_hover_text("Initial learning rate");
        ui.end_row();
        ui.label("Schedule");
        ui.horizontal(|ui| {
            for (s, name, tip) in [
                (ScheduleChoice::Cosine, "cosine", "Cosine decay to zero over the run"),
                (ScheduleChoice::Step, "step", "x0.1 at 1/2 and 3/4 of the epochs"),
                (ScheduleChoice::Constant, "constant", "The same rate throughout"),
            ] {
                ui.selectable_value(&mut f.schedule, s, name).on_hover_text(tip);
            }
        });
        ui.end_row();
        ui.label("Optimizer");
        ui.horizontal(|ui| {
            ui.selectable_value(&mut f.optimizer, OptimizerKind::Sgd, "SGD")
                .on_hover_text("SGD, momentum 0.9, weight decay 5e-4");
            ui.selectable_value(&mut f.optimizer, OptimizerKind::Adamw, "AdamW")
                .on_hover_text("AdamW");
        });
        ui.end_row();
        ui.label("Seed");
        ui.add(egui::DragValue::new(&mut f.seed))
            .on_hover_text("The same seed and thread count give the same weights");
        ui.end_row();
        if f.method == Method::Awnet {
            for (label, path, purpose) in [
                ("Clean teacher", &mut f.teacher_clean, PickPurpose::TeacherClean),
                ("Robust teacher", &mut f.teacher_robust, PickPurpose::TeacherRobust),
            ] {
                ui.label(label);
                ui.horizontal(|ui| {
                    ui.add(egui::TextEdit::singleline(path).desired_width(140.0))
                        .on_hover_text("A trained model file of the same input shape and classes");
                    if ui.button("…").on_hover_text("Choose a file").clicked() {
                        commands.push(Command::Pick(purpose));
                    }
                });
                ui.end_row();
            }
        }
        ui.label("Model file");
        ui.horizontal(|ui| {
            ui.add(egui::TextEdit::singleline(&mut f.out).desired_width(140.0))
                .on_hover_text("Written at every epoch end and on Stop; Resume continues it");
            if ui.button("…").on_hover_text("Choose where to write").clicked() {
                commands.push(Command::Pick(PickPurpose::TrainOutput));
            }
        });
        ui.end_row();
    });
    ui.separator();
    ui.horizontal(|ui| {
        let start = ui
            .add_enabled(!running, egui::Button::new("Start"))
            .on_hover_text("Start a new run with these settings (Ctrl+Enter)");
        if start.clicked() {
            commands.push(start_command(f, data));
        }
        let stop = ui
            .add_enabled(running, egui::Button::new("Stop"))
            .on_hover_text("Stop at the next step and write a checkpoint (Esc)");
        if stop.clicked() {
            commands.push(Command::StopTraining);
        }
        let resume = ui
            .add_enabled(!running, egui::Button::new("Resume"))
            .on_hover_text("Continue the run stored in the model file, up to the epochs above");
        if resume.clicked() {
            commands.push(Command::StartTraining(TrainRequest::Resume {
                out: PathBuf::from(&f.out),
                epochs: Some(f.epochs),
            }));
        }
    });
}

/// Start, or a notification saying what is wrong with the form.
pub fn start_command(f: &TrainForm, data: &str) -> Command {
    match f.config(data) {
        Ok(config) => Command::StartTraining(TrainRequest::New {
            config: Box::new(config),
            arch: f.arch,
            out: PathBuf::from(&f.out),
        }),
        Err(e) => Command::Notify(format!("cannot start: {e}")),
    }
}

const CLEAN: Color32 = Color32::from_rgb(70, 130, 220);
const ROBUST: Color32 = Color32::from_rgb(230, 120, 40);

/// A line with a marker at each point, one legend entry.
fn series(p: &mut egui_plot::PlotUi, name: &str, pts: Vec<[f64; 2]>, colour: Color32) {
    p.line(Line::new(name, PlotPoints::from(pts.clone())).color(colour));
    p.points(Points::new(name, PlotPoints::from(pts)).radius(3.0).color(colour));
}

type Lines = Vec<(String, Vec<[f64; 2]>)>;

/// The loss plot's lines and x axis: each loss term per step, or the loss per epoch of a record.
fn loss_lines(h: &TrainHistory) -> (Lines, &'static str) {
    if h.steps.is_empty() {
        let pts = h.epochs.iter().map(|r| [r.epoch as f64 + 1.0, r.train_loss]).collect();
        (vec![("loss".into(), pts)], "epoch")
    } else {
        (h.term_series(), "step")
    }
}

/// Clean and robust accuracy per epoch.
fn accuracy_lines(h: &TrainHistory) -> Lines {
    let per = |f: fn(&EpochReport) -> f64| h.epochs.iter().map(|r| [r.epoch as f64 + 1.0, f(r)]).collect();
    vec![
        ("clean".into(), per(|r| r.clean_accuracy)),
        ("robust".into(), per(|r| r.robust_accuracy)),
    ]
}

/// The learning rate (per step, or per epoch of a record) and AW-Net's w_adv per step.
fn lr_lines(h: &TrainHistory) -> (Lines, &'static str) {
    if h.steps.is_empty() {
        let lr = h.epochs.iter().map(|r| [r.epoch as f64 + 1.0, r.lr]).collect();
        return (vec![("learning rate".into(), lr)], "epoch");
    }
    let lr = h.steps.iter().map(|s| [s.global_step as f64, s.lr]).collect();
    let balance: Vec<[f64; 2]> = h
        .steps
        .iter()
        .filter_map(|s| s.balance.map(|(_, a)| [s.global_step as f64, a]))
        .collect();
    let mut out = vec![("learning rate".into(), lr)];
    if !balance.is_empty() {
        out.push(("w_adv".into(), balance));
    }
    (out, "step")
}

fn trajectory(epochs: &[EpochReport]) -> Vec<[f64; 2]> {
    epochs.iter().map(|r| [r.clean_accuracy, r.robust_accuracy]).collect()
}

/// The tab's four plots as figures for export, from the same lines the window draws.
pub fn figures(h: &TrainHistory, models: &[ModelSummary]) -> Vec<Figure> {
    let prov = crate::export::figures::provenance(serde_json::json!({
        "shown": h.title,
        "robust_label": h.epochs.last().map(|r| r.robust_label.clone()),
        "monitor": h.epochs.last().map(|r| r.monitor.clone()),
        "models": models.iter().map(|m| m.path.clone()).collect::<Vec<_>>(),
    }));
    let lines = |lines: Lines, style: Style| -> Vec<Series> {
        lines
            .into_iter()
            .map(|(name, pts)| Series {
                name,
                style,
                points: pts.iter().map(|p| (p[0], p[1])).collect(),
            })
            .collect()
    };
    let figure = |name: &str, title: String, x: &str, y: &str, series, range| Figure {
        name: name.into(),
        title,
        x_label: x.into(),
        y_label: y.into(),
        series,
        x_range: None,
        y_range: range,
        provenance: prov.clone(),
    };
    let (loss, loss_x) = loss_lines(h);
    let (lr, lr_x) = lr_lines(h);
    let epoch_style = if h.steps.is_empty() {
        Style::LinePoints
    } else {
        Style::Line
    };
    let mut scatter = trade_off_figure(&h.epochs, models);
    scatter.name = "train-trade-off".into();
    vec![
        figure(
            "train-loss",
            format!("Loss, {}", h.title),
            loss_x,
            "loss",
            lines(loss, epoch_style),
            None,
        ),
        figure(
            "train-accuracy",
            format!("Accuracy per epoch on held-out training images, {}", h.title),
            "epoch",
            "accuracy (fraction of images)",
            lines(accuracy_lines(h), Style::LinePoints),
            Some((0.0, 1.0)),
        ),
        figure(
            "train-lr",
            format!("Learning rate and w_adv, {}", h.title),
            lr_x,
            "learning rate / w_adv",
            lines(lr, epoch_style),
            None,
        ),
        scatter,
    ]
}

fn plots(ui: &mut Ui, h: &TrainHistory, models: &[ModelSummary], commands: &mut Vec<Command>) {
    ui.heading(if h.title.is_empty() { "No run yet" } else { &h.title });
    if let Some(last) = h.steps.last() {
        let frac = last.global_step as f64 / h.total_steps.max(1) as f64;
        let left = h.total_steps.saturating_sub(last.global_step) as f64 * h.batch_size.max(1) as f64
            / last.images_per_second.max(1e-9);
        ui.add(egui::ProgressBar::new(frac as f32).show_percentage().text(format!(
            "epoch {} step {}/{} · {:.0} img/s · about {} left",
            last.epoch + 1,
            last.step + 1,
            last.steps_per_epoch,
            last.images_per_second,
            human_seconds(left)
        )));
    }
    if let Some(p) = &h.progress {
        ui.label(format!("{}: {}/{}", p.stage, p.done, p.total));
    }
    let w = (ui.available_width() / 2.0 - 8.0).max(200.0);
    ui.horizontal(|ui| {
        ui.vertical(|ui| {
            ui.set_width(w);
            let (loss, x) = loss_lines(h);
            ui.label(if h.steps.is_empty() {
                "Training loss per epoch"
            } else {
                "Loss terms per step"
            });
            let r = Plot::new("loss_plot")
                .height(220.0)
                .legend(Legend::default())
                .x_axis_label(x)
                .y_axis_label("loss")
                .show(ui, |p| {
                    for (name, pts) in loss {
                        if h.steps.is_empty() {
                            p.points(Points::new(name.clone(), PlotPoints::from(pts.clone())).radius(3.0));
                        }
                        p.line(Line::new(name, PlotPoints::from(pts)));
                    }
                });
            super::export_menu(&r.response, "train-loss", commands);
        });
        ui.vertical(|ui| {
            ui.set_width(w);
            ui.label("Accuracy per epoch (held-out training images)");
            let r = Plot::new("acc_plot")
                .height(220.0)
                .legend(Legend::default())
                .x_axis_label("epoch")
                .y_axis_label("accuracy")
                .include_y(0.0)
                .include_y(1.0)
                .show(ui, |p| {
                    for ((name, pts), colour) in accuracy_lines(h).into_iter().zip([CLEAN, ROBUST]) {
                        series(p, &name, pts, colour);
                    }
                });
            super::export_menu(&r.response, "train-accuracy", commands);
            if let Some(r) = h.epochs.last() {
                ui.small(format!("robust: {}", r.robust_label));
            }
        });
    });
    ui.horizontal(|ui| {
        ui.vertical(|ui| {
            ui.set_width(w);
            ui.label("Learning rate, and AW-Net's balancing weight w_adv");
            let (lines, x) = lr_lines(h);
            let top = lines
                .iter()
                .flat_map(|(_, pts)| pts.iter().map(|p| p[1]))
                .fold(0.0, f64::max);
            let r = Plot::new("lr_plot")
                .height(200.0)
                .include_y(0.0)
                .include_y(top * 1.1)
                .legend(Legend::default())
                .x_axis_label(x)
                .show(ui, |p| {
                    for (name, pts) in lines {
                        p.line(Line::new(name, PlotPoints::from(pts)));
                    }
                });
            super::export_menu(&r.response, "train-lr", commands);
        });
        ui.vertical(|ui| {
            ui.set_width(w);
            ui.label("Trade-off: clean vs robust accuracy, one point per epoch");
            let r = trade_off_plot(ui, "train_trade_off", &h.epochs, models);
            super::export_menu(&r, "train-trade-off", commands);
        });
    });
}

/// [`trade_off_plot`] as a figure: the open models' points, equal-W-Robust lines, the run's
/// trajectory.
pub fn trade_off_figure(epochs: &[EpochReport], models: &[ModelSummary]) -> Figure {
    let mut f = crate::export::figures::scatter(
        &models
            .iter()
            .filter_map(|m| {
                m.trade_off_point()
                    .map(|(c, r, l)| (m.name.clone(), c, r, l.to_string()))
            })
            .collect::<Vec<_>>(),
    );
    let traj = trajectory(epochs);
    if !traj.is_empty() {
        f.series.push(Series {
            name: "per epoch".into(),
            style: Style::LinePoints,
            points: traj.iter().map(|p| (p[0], p[1])).collect(),
        });
    }
    f
}

/// Clean vs robust accuracy with iso-W-Robust lines, the run's trajectory and the open models.
pub fn trade_off_plot(ui: &mut Ui, id: &str, epochs: &[EpochReport], models: &[ModelSummary]) -> egui::Response {
    Plot::new(id)
        .height(260.0)
        .data_aspect(1.0)
        .legend(Legend::default())
        .x_axis_label("clean accuracy")
        .y_axis_label("robust accuracy")
        .include_x(0.0)
        .include_x(1.0)
        .include_y(0.0)
        .include_y(1.0)
        .show(ui, |p| {
            for k in 1..10 {
                let w = k as f64 / 10.0;
                // clean + robust = 2 W, inside the unit square.
                let (a, b) = ((2.0 * w - 1.0).max(0.0), (2.0 * w).min(1.0));
                p.line(
                    Line::new(
                        "equal W-Robust (0.1 apart)",
                        PlotPoints::from(vec![[a, 2.0 * w - a], [b, 2.0 * w - b]]),
                    )
                    .color(Color32::from_gray(140).gamma_multiply(0.5))
                    .style(LineStyle::dashed_dense()),
                );
            }
            let traj = trajectory(epochs);
            if !traj.is_empty() {
                series(p, "per epoch", traj, CLEAN);
            }
            for m in models {
                if let Some((c, r, _)) = m.trade_off_point() {
                    p.points(
                        Points::new(m.name.clone(), PlotPoints::from(vec![[c, r]]))
                            .shape(MarkerShape::Diamond)
                            .radius(6.0),
                    );
                }
            }
        })
        .response
}

pub fn human_seconds(s: f64) -> String {
    if !s.is_finite() {
        return "?".into();
    }
    let s = s.round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}
