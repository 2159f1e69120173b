//! The Router tab: how AW-Net's router sees N images and their adversarial twins: p_adv
//! histograms, the ROC curve, each block's signal distributions and per-filter differences, and
//! one image pair side by side. Computed by `analysis::router` in a worker, cancellable.

use std::path::PathBuf;

use egui::{Color32, ColorImage, TextureHandle, TextureOptions, Ui};
use egui_plot::{Bar, BarChart, Legend, Line, Plot, PlotPoints};

use super::Command;
use super::worker::ModelSummary;
use crate::analysis::Histogram;
use crate::analysis::router::{ImagePair, RouterAnalysis};
use crate::attack::{AttackConfig, AttackKind};
use crate::observe::Progress;

/// What a Router analysis is computed for.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterRequest {
    pub generation: u64,
    pub model: PathBuf,
    pub data: String,
    pub n: usize,
    pub attack: AttackConfig,
}

pub struct RouterState {
    pub model: Option<PathBuf>,
    pub kind: AttackKind,
    pub eps: String,
    pub steps: usize,
    pub n: usize,
    pub image: usize,
    pub requested: Option<RouterRequest>,
    pub result: Option<RouterAnalysis>,
    pub progress: Option<Progress>,
    pub error: Option<String>,
    textures: Option<(TextureHandle, TextureHandle, TextureHandle)>,
}

impl Default for RouterState {
    fn default() -> Self {
        Self {
            model: None,
            kind: AttackKind::Pgd,
            eps: "0.1".into(),
            steps: 10,
            n: 256,
            image: 0,
            requested: None,
            result: None,
            progress: None,
            error: None,
            textures: None,
        }
    }
}

impl RouterState {
    /// Accepts the newest request's result only.
    pub fn accept(&mut self, generation: u64, result: Result<RouterAnalysis, String>) -> bool {
        if self.requested.as_ref().is_none_or(|r| r.generation != generation) {
            return false;
        }
        self.progress = None;
        self.textures = None;
        match result {
            Ok(r) => {
                self.result = Some(r);
                self.error = None;
            }
            Err(e) => self.error = Some(e),
        }
        true
    }

    pub fn is_current(&self, generation: u64) -> bool {
        self.requested.as_ref().is_some_and(|r| r.generation == generation)
    }
}

const CLEAN: Color32 = Color32::from_rgb(70, 130, 220);
const ADV: Color32 = Color32::from_rgb(230, 80, 60);

pub fn show(ui: &mut Ui, s: &mut RouterState, models: &[ModelSummary], data: &str, commands: &mut Vec<Command>) {
    let awnets: Vec<&ModelSummary> = models.iter().filter(|m| m.is_awnet).collect();
    if !s.model.as_ref().is_some_and(|p| awnets.iter().any(|m| &m.path == p)) {
        s.model = awnets.first().map(|m| m.path.clone());
    }
    ui.horizontal_wrapped(|ui| {
        ui.label("Model");
        egui::ComboBox::from_id_salt("router_model")
            .selected_text(s.model.as_ref().map_or("none".into(), |p| p.display().to_string()))
            .show_ui(ui, |ui| {
                for m in &awnets {
                    ui.selectable_value(&mut s.model, Some(m.path.clone()), &m.name);
                }
            })
            .response
            .on_hover_text("The open AW-Net models (static models have no router)");
        ui.label("Attack");
        egui::ComboBox::from_id_salt("router_attack")
            .selected_text(s.kind.name())
            .show_ui(ui, |ui| {
                for k in AttackKind::ALL.into_iter().filter(|&k| k != AttackKind::ApgdDlr) {
                    ui.selectable_value(&mut s.kind, k, k.name());
                }
            })
            .response
            .on_hover_text("Crafts the adversarial twin of each image (L-inf)");
        ui.label("eps");
        ui.add(egui::TextEdit::singleline(&mut s.eps).desired_width(60.0))
            .on_hover_text("L-inf radius in pixel units of [0, 1]; 8/255 is accepted");
        ui.add(egui::DragValue::new(&mut s.steps).range(1..=1000).prefix("steps "))
            .on_hover_text("Iterations (queries for Square)");
        ui.add(egui::Slider::new(&mut s.n, 16..=2000).logarithmic(true).text("images"))
            .on_hover_text("The first N test images of the dataset");
        if s.progress.is_some() && ui.button("Stop").on_hover_text("Cancel this computation").clicked() {
            commands.push(Command::CancelRouter);
        }
    });
    let Some(model) = s.model.clone() else {
        ui.label("Open an AW-Net model: none of the open models has a router.");
        return;
    };
    match crate::attack::parse_eps(&s.eps) {
        Ok(eps) => {
            let mut attack = AttackConfig::new(s.kind, eps);
            attack.steps = Some(s.steps);
            let want = RouterRequest {
                generation: s.requested.as_ref().map_or(1, |r| r.generation + 1),
                model,
                data: data.to_string(),
                n: s.n,
                attack,
            };
            let same = s.requested.as_ref().is_some_and(|r| {
                (&r.model, &r.data, r.n, &r.attack) == (&want.model, &want.data, want.n, &want.attack)
            });
            if !same {
                s.requested = Some(want.clone());
                s.progress = Some(Progress {
                    stage: "starting".into(),
                    done: 0,
                    total: want.n,
                });
                commands.push(Command::AnalyseRouter(want));
            }
        }
        Err(e) => {
            ui.colored_label(ui.visuals().error_fg_color, format!("eps: {e}"));
        }
    }
    if let Some(p) = &s.progress {
        ui.add(
            egui::ProgressBar::new(p.done as f32 / p.total.max(1) as f32)
                .text(format!("{}: {}/{}", p.stage, p.done, p.total)),
        );
    }
    if let Some(e) = &s.error {
        ui.colored_label(ui.visuals().error_fg_color, e);
    }
    let Some(r) = &s.result else { return };
    egui::ScrollArea::vertical().show(ui, |ui| {
        let name = figure_stem(s.requested.as_ref().map(|q| q.model.as_path()));
        results(ui, r, &name, &mut s.image, &mut s.textures, commands);
    });
}

fn step_line(h: &Histogram) -> Vec<[f64; 2]> {
    crate::export::figures::steps(h, true)
        .into_iter()
        .map(|(x, y)| [x, y])
        .collect()
}

/// The model part of this tab's figure names (`export::figures::router`).
pub fn figure_stem(model: Option<&std::path::Path>) -> String {
    model
        .and_then(|m| m.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn results(
    ui: &mut Ui,
    r: &RouterAnalysis,
    name: &str,
    image: &mut usize,
    textures: &mut Option<(TextureHandle, TextureHandle, TextureHandle)>,
    commands: &mut Vec<Command>,
) {
    let mut menu = |shown: &egui::Response, figure: String| {
        super::export_menu(shown, &format!("router-{name}-{figure}"), commands)
    };
    ui.heading(format!(
        "{} images, {}: type accuracy {:.1}%, AUC {:.3}; classifier accuracy clean {:.1}%, adversarial {:.1}%",
        r.n,
        r.attack,
        100.0 * r.type_accuracy,
        r.auc,
        100.0 * r.clean_accuracy,
        100.0 * r.adv_accuracy
    ));
    let w = (ui.available_width() / 2.0 - 8.0).max(200.0);
    ui.horizontal(|ui| {
        ui.vertical(|ui| {
            ui.set_width(w);
            ui.label("Type probability p_adv");
            let shown = Plot::new("p_adv_hist")
                .height(220.0)
                .legend(Legend::default())
                .x_axis_label("p_adv")
                .y_axis_label("density")
                .show(ui, |p| {
                    p.line(Line::new("clean", PlotPoints::from(step_line(&r.p_hist_clean))).color(CLEAN));
                    p.line(Line::new("adversarial", PlotPoints::from(step_line(&r.p_hist_adv))).color(ADV));
                });
            menu(&shown.response, "p-adv".into());
        });
        ui.vertical(|ui| {
            ui.set_width(w);
            ui.label(format!("ROC of p_adv as a detector (AUC {:.3})", r.auc));
            let shown = Plot::new("router_roc")
                .height(220.0)
                .data_aspect(1.0)
                .x_axis_label("false positive rate")
                .y_axis_label("true positive rate")
                .include_x(0.0)
                .include_x(1.0)
                .include_y(1.0)
                .show(ui, |p| {
                    p.line(Line::new("chance", PlotPoints::from(vec![[0.0, 0.0], [1.0, 1.0]])).color(Color32::GRAY));
                    p.line(
                        Line::new(
                            "ROC",
                            PlotPoints::from(r.roc.iter().map(|&(x, y)| [x, y]).collect::<Vec<_>>()),
                        )
                        .color(ADV),
                    );
                });
            menu(&shown.response, "roc".into());
        });
    });
    for b in &r.blocks {
        ui.horizontal(|ui| {
            ui.vertical(|ui| {
                ui.set_width(w);
                ui.label(format!("Block {}: all signals (every filter, every image)", b.block));
                let shown = Plot::new(format!("signals_{}", b.block))
                    .height(180.0)
                    .legend(Legend::default())
                    .x_axis_label("signal (omega)")
                    .y_axis_label("density")
                    .show(ui, |p| {
                        p.line(Line::new("clean", PlotPoints::from(step_line(&b.hist_clean))).color(CLEAN));
                        p.line(Line::new("adversarial", PlotPoints::from(step_line(&b.hist_adv))).color(ADV));
                    });
                menu(&shown.response, format!("block{}-signals", b.block));
            });
            ui.vertical(|ui| {
                ui.set_width(w);
                ui.label(format!(
                    "Block {}: mean signal per filter, adversarial minus clean",
                    b.block
                ));
                let bars = b
                    .filter_difference()
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| {
                        Bar::new(i as f64, d)
                            .width(0.8)
                            .fill(if d >= 0.0 { ADV } else { CLEAN })
                    })
                    .collect();
                let shown = Plot::new(format!("signal_diff_{}", b.block))
                    .height(180.0)
                    .x_axis_label("filter")
                    .y_axis_label("difference")
                    .show(ui, |p| p.bar_chart(BarChart::new("adv - clean", bars)));
                menu(&shown.response, format!("block{}-signal-diff", b.block));
            });
        });
    }
    if r.images.is_empty() {
        return;
    }
    ui.separator();
    ui.heading("One image and its adversarial twin");
    let last = r.images.len() - 1;
    if ui.add(egui::Slider::new(image, 0..=last).text("image")).changed() {
        *textures = None;
    }
    *image = (*image).min(last);
    let pair = &r.images[*image];
    let (tc, ta, td) = textures.get_or_insert_with(|| pair_textures(ui.ctx(), pair));
    ui.horizontal(|ui| {
        let size = egui::vec2(168.0, 168.0);
        for (tex, caption) in [
            (
                &*tc,
                format!("clean: predicted {}, p_adv {:.3}", pair.pred_clean, pair.p_adv_clean),
            ),
            (
                &*ta,
                format!("adversarial: predicted {}, p_adv {:.3}", pair.pred_adv, pair.p_adv_adv),
            ),
            (&*td, "perturbation, scaled to its largest value".to_string()),
        ] {
            ui.vertical(|ui| {
                ui.image((tex.id(), size));
                ui.label(caption);
            });
        }
    });
    ui.label(format!("test image {} (label {})", pair.index, pair.label));
    let shown = Plot::new("pair_signals")
        .height(200.0)
        .legend(Legend::default())
        .x_axis_label("filter (blocks one after another)")
        .y_axis_label("signal")
        .show(ui, |p| {
            let flat = |s: &[Vec<f64>]| -> Vec<[f64; 2]> {
                s.iter().flatten().enumerate().map(|(i, &v)| [i as f64, v]).collect()
            };
            p.line(Line::new("clean", PlotPoints::from(flat(&pair.signals_clean))).color(CLEAN));
            p.line(Line::new("adversarial", PlotPoints::from(flat(&pair.signals_adv))).color(ADV));
        });
    menu(&shown.response, format!("image{}-signals", pair.index));
    ui.heading("Effective filters W * omega of this image pair");
    for e in &pair.effective {
        ui.horizontal(|ui| {
            ui.vertical(|ui| {
                ui.set_width(w);
                ui.label(format!("{} (block {}): base W and W * omega", e.conv, e.block));
                let shown = Plot::new(format!("effective_{}", e.conv))
                    .height(180.0)
                    .legend(Legend::default())
                    .x_axis_label("weight")
                    .y_axis_label("density")
                    .show(ui, |p| {
                        p.line(Line::new("base W", PlotPoints::from(step_line(&e.hist_base))).color(Color32::GRAY));
                        p.line(Line::new("W * omega, clean", PlotPoints::from(step_line(&e.hist_clean))).color(CLEAN));
                        p.line(
                            Line::new("W * omega, adversarial", PlotPoints::from(step_line(&e.hist_adv))).color(ADV),
                        );
                    });
                menu(&shown.response, format!("image{}-effective-{}", pair.index, e.conv));
            });
            ui.vertical(|ui| {
                ui.label("Filters whose scaling changed most");
                egui::Grid::new(format!("changed_{}", e.conv))
                    .striped(true)
                    .show(ui, |ui| {
                        ui.label("filter");
                        ui.label("omega clean");
                        ui.label("omega adv.");
                        ui.end_row();
                        for (f, c, a) in &e.most_changed {
                            ui.label(f.to_string());
                            ui.label(format!("{c:.4}"));
                            ui.label(format!("{a:.4}"));
                            ui.end_row();
                        }
                    });
            });
        });
    }
}

fn to_image(px: &[f32], c: usize, s: usize, map: impl Fn(f32) -> f32) -> ColorImage {
    let byte = |v: f32| (map(v).clamp(0.0, 1.0) * 255.0).round() as u8;
    let pixels = (0..s * s)
        .map(|i| {
            if c >= 3 {
                Color32::from_rgb(byte(px[i]), byte(px[s * s + i]), byte(px[2 * s * s + i]))
            } else {
                Color32::from_gray(byte(px[i]))
            }
        })
        .collect();
    ColorImage::new([s, s], pixels)
}

fn pair_textures(ctx: &egui::Context, p: &ImagePair) -> (TextureHandle, TextureHandle, TextureHandle) {
    let delta: Vec<f32> = p.pixels_adv.iter().zip(&p.pixels_clean).map(|(a, c)| a - c).collect();
    let scale = delta.iter().fold(1e-12f32, |m, d| m.max(d.abs()));
    let load = |name: &str, img: ColorImage| ctx.load_texture(name, img, TextureOptions::NEAREST);
    (
        load("router_clean", to_image(&p.pixels_clean, p.channels, p.side, |v| v)),
        load("router_adv", to_image(&p.pixels_adv, p.channels, p.side, |v| v)),
        load(
            "router_delta",
            to_image(&delta, p.channels, p.side, |v| 0.5 + 0.5 * v / scale),
        ),
    )
}
