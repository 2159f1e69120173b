//! The Filters tab: weight distributions per layer for up to three models on shared bins, the
//! per-layer statistics table, and the kernels drawn as heat maps. The numbers come from
//! `analysis::filters`, computed in a worker.

use std::path::PathBuf;

use egui::{Color32, ColorImage, TextureHandle, TextureOptions, Ui};
use egui_plot::{Legend, Line, Plot, PlotPoints};

use super::Command;
use super::worker::ModelSummary;
use crate::analysis::Histogram;
use crate::analysis::filters::{FiltersAnalysis, LayerRow, POOLED, diverging};

/// What a Filters analysis is computed for.
#[derive(Clone, Debug, PartialEq)]
pub struct FiltersRequest {
    pub generation: u64,
    pub models: Vec<PathBuf>,
    pub layer: String,
    pub bins: usize,
    pub near_zero: f64,
}

impl FiltersRequest {
    fn same_question(&self, o: &Self) -> bool {
        (&self.models, &self.layer, self.bins, self.near_zero) == (&o.models, &o.layer, o.bins, o.near_zero)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Column {
    Layer,
    Count,
    Mean,
    Std,
    MeanAbs,
    Kurtosis,
    NearZero,
    FilterL1,
    FilterL2,
    W1,
}

pub struct FiltersState {
    /// Models compared (paths of open models), at most three; the first is the reference.
    pub compare: Vec<PathBuf>,
    pub layer: String,
    pub bins: usize,
    pub near_zero: f64,
    pub density: bool,
    pub sort: (Column, bool),
    pub requested: Option<FiltersRequest>,
    pub result: Option<FiltersAnalysis>,
    texture: Option<TextureHandle>,
}

impl Default for FiltersState {
    fn default() -> Self {
        Self {
            compare: Vec::new(),
            layer: POOLED.into(),
            bins: 60,
            near_zero: 0.01,
            density: true,
            sort: (Column::Layer, false),
            requested: None,
            result: None,
            texture: None,
        }
    }
}

impl FiltersState {
    /// Accepts a result for the newest request only; stale ones are dropped.
    pub fn accept(&mut self, generation: u64, result: FiltersAnalysis) -> bool {
        if self.requested.as_ref().is_some_and(|r| r.generation == generation) {
            self.result = Some(result);
            self.texture = None;
            true
        } else {
            false
        }
    }
}

const COLOURS: [Color32; 3] = [
    Color32::from_rgb(70, 130, 220),
    Color32::from_rgb(230, 120, 40),
    Color32::from_rgb(90, 180, 90),
];

pub fn show(ui: &mut Ui, s: &mut FiltersState, models: &[ModelSummary], commands: &mut Vec<Command>) {
    s.compare.retain(|p| models.iter().any(|m| &m.path == p));
    if s.compare.is_empty() {
        s.compare.extend(models.iter().take(3).map(|m| m.path.clone()));
    }
    egui::Panel::left("filters_controls")
        .resizable(false)
        .default_size(230.0)
        .show(ui, |ui| controls(ui, s, models));
    if !s.compare.is_empty() {
        let next = s.requested.as_ref().map_or(1, |r| r.generation + 1);
        let want = FiltersRequest {
            generation: next,
            models: s.compare.clone(),
            layer: s.layer.clone(),
            bins: s.bins,
            near_zero: s.near_zero,
        };
        if !s.requested.as_ref().is_some_and(|r| r.same_question(&want)) {
            s.requested = Some(want.clone());
            commands.push(Command::AnalyseFilters(want));
        }
    }
    egui::CentralPanel::default().show(ui, |ui| {
        egui::ScrollArea::vertical().show(ui, |ui| match &s.result {
            None if s.compare.is_empty() => {
                ui.label("Open a model to see its filters.");
            }
            None => {
                ui.spinner();
            }
            Some(r) => {
                let stale = s
                    .requested
                    .as_ref()
                    .is_some_and(|q| q.layer != r.layer || q.models.len() != r.models.len());
                if stale {
                    ui.horizontal(|ui| {
                        ui.spinner();
                        ui.label("recomputing…");
                    });
                }
                results(ui, r, s.density, &mut s.sort, &mut s.texture, commands);
            }
        });
    });
}

fn controls(ui: &mut Ui, s: &mut FiltersState, models: &[ModelSummary]) {
    ui.heading("Compare");
    for m in models {
        let mut on = s.compare.contains(&m.path);
        let full = !on && s.compare.len() >= 3;
        let r = ui
            .add_enabled(!full, egui::Checkbox::new(&mut on, &m.name))
            .on_hover_text(format!(
                "{}\nThe first ticked model is the reference for distances.",
                m.description
            ));
        if r.changed() {
            if on {
                s.compare.push(m.path.clone());
            } else {
                s.compare.retain(|p| p != &m.path);
            }
        }
    }
    ui.separator();
    ui.label("Layer");
    let layers: Vec<String> = s.result.as_ref().map(|r| r.layers.clone()).unwrap_or_default();
    egui::ComboBox::from_id_salt("filters_layer")
        .selected_text(&s.layer)
        .show_ui(ui, |ui| {
            ui.selectable_value(&mut s.layer, POOLED.to_string(), POOLED);
            for l in layers {
                ui.selectable_value(&mut s.layer, l.clone(), l);
            }
        })
        .response
        .on_hover_text("A convolution or the classifier, or every layer pooled");
    ui.add(egui::Slider::new(&mut s.bins, 10..=200).text("bins"))
        .on_hover_text("Histogram bins, shared by every model shown");
    ui.add(
        egui::Slider::new(&mut s.near_zero, 1e-4..=0.2)
            .logarithmic(true)
            .text("near zero"),
    )
    .on_hover_text("A weight counts as near zero when |w| is below this");
    ui.horizontal(|ui| {
        ui.selectable_value(&mut s.density, false, "counts")
            .on_hover_text("Weights per bin");
        ui.selectable_value(&mut s.density, true, "density")
            .on_hover_text("Counts / (total x bin width): models with different sizes compare");
    });
}

fn step_line(h: &Histogram, density: bool) -> Vec<[f64; 2]> {
    crate::export::figures::steps(h, density)
        .into_iter()
        .map(|(x, y)| [x, y])
        .collect()
}

fn results(
    ui: &mut Ui,
    r: &FiltersAnalysis,
    density: bool,
    sort: &mut (Column, bool),
    texture: &mut Option<TextureHandle>,
    commands: &mut Vec<Command>,
) {
    ui.heading(format!("Weights of {}", r.layer));
    let w = (ui.available_width() / 2.0 - 8.0).max(200.0);
    ui.horizontal(|ui| {
        for (title, hists, x_label, id, figure) in [
            ("Weight values", &r.histograms, "weight", "weights_hist", "weights"),
            (
                "Per-filter L2 norms",
                &r.norm_histograms,
                "L2 norm of a filter",
                "norms_hist",
                "filter-norms",
            ),
        ] {
            ui.vertical(|ui| {
                ui.set_width(w);
                ui.label(title);
                let shown = Plot::new(id)
                    .height(240.0)
                    .legend(Legend::default())
                    .x_axis_label(x_label)
                    .y_axis_label(if density { "density" } else { "count" })
                    .show(ui, |p| {
                        for (i, (name, h)) in r.models.iter().zip(hists).enumerate() {
                            if let Some(h) = h {
                                p.line(
                                    Line::new(name.clone(), PlotPoints::from(step_line(h, density)))
                                        .color(COLOURS[i % 3])
                                        .width(1.0),
                                );
                            }
                        }
                    });
                // The names `export::figures::filters` gives.
                super::export_menu(&shown.response, &format!("{figure}-{}", r.layer), commands);
            });
        }
    });
    for (name, h) in r.models.iter().zip(&r.histograms) {
        if h.is_none() {
            ui.label(format!("{name} has no layer {}", r.layer));
        }
    }
    if let Some(k) = &r.kernels {
        ui.separator();
        ui.label(format!("Kernels of {} in {}: {}", r.layer, r.models[0], k.tile));
        let tex = texture.get_or_insert_with(|| {
            let img = ColorImage::from_rgba_unmultiplied([k.width, k.height], &k.rgba);
            ui.ctx().load_texture("kernels", img, TextureOptions::NEAREST)
        });
        let zoom = (420.0 / k.width.max(k.height) as f32).clamp(1.0, 24.0);
        ui.horizontal(|ui| {
            ui.image((tex.id(), egui::vec2(k.width as f32 * zoom, k.height as f32 * zoom)));
            colour_legend(ui, k.scale);
        });
    }
    ui.separator();
    table(ui, r, sort);
}

fn colour_legend(ui: &mut Ui, scale: f64) {
    ui.vertical(|ui| {
        ui.label(format!("+{scale:.3}"));
        let (rect, _) = ui.allocate_exact_size(egui::vec2(18.0, 160.0), egui::Sense::hover());
        let steps = 40;
        for i in 0..steps {
            let t = 1.0 - 2.0 * (i as f64 + 0.5) / steps as f64;
            let [r, g, b] = diverging(t);
            let y0 = rect.top() + rect.height() * i as f32 / steps as f32;
            let y1 = rect.top() + rect.height() * (i + 1) as f32 / steps as f32;
            ui.painter().rect_filled(
                egui::Rect::from_min_max(egui::pos2(rect.left(), y0), egui::pos2(rect.right(), y1)),
                0.0,
                Color32::from_rgb(r, g, b),
            );
        }
        ui.label(format!("-{scale:.3}"));
        ui.small("weight (0 is white)");
    });
}

fn key(row: &LayerRow, c: Column) -> f64 {
    let s = &row.summary;
    match c {
        Column::Layer => 0.0,
        Column::Count => s.count as f64,
        Column::Mean => s.mean,
        Column::Std => s.std,
        Column::MeanAbs => s.mean_abs,
        Column::Kurtosis => s.kurtosis,
        Column::NearZero => s.near_zero_share,
        Column::FilterL1 => row.mean_filter_l1,
        Column::FilterL2 => row.mean_filter_l2,
        Column::W1 => row.w1_to_first.unwrap_or(f64::NEG_INFINITY),
    }
}

fn table(ui: &mut Ui, r: &FiltersAnalysis, sort: &mut (Column, bool)) {
    ui.heading("Per-layer statistics");
    let most = r
        .table
        .iter()
        .filter_map(|x| x.w1_to_first.map(|d| (d, x)))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((d, x)) = most {
        ui.label(format!(
            "Largest difference from {}: {} in {} (Wasserstein-1 {d:.4})",
            r.models[0], r.models[x.model], x.layer
        ));
    }
    let mut rows: Vec<&LayerRow> = r.table.iter().collect();
    let (col, desc) = *sort;
    if col == Column::Layer {
        rows.sort_by_key(|x| (r.layers.iter().position(|l| l == &x.layer), x.model));
    } else {
        rows.sort_by(|a, b| key(a, col).total_cmp(&key(b, col)));
    }
    if desc {
        rows.reverse();
    }
    egui::Grid::new("filters_table").striped(true).show(ui, |ui| {
        let headers = [
            ("layer", Column::Layer, "Layer, then model"),
            ("weights", Column::Count, "Number of weights"),
            ("mean", Column::Mean, "Mean weight"),
            ("std", Column::Std, "Standard deviation"),
            ("mean |w|", Column::MeanAbs, "Mean absolute weight"),
            (
                "kurtosis",
                Column::Kurtosis,
                "Excess kurtosis (0 for a normal distribution)",
            ),
            (
                "near 0",
                Column::NearZero,
                "Share of weights with |w| below the threshold",
            ),
            ("filter L1", Column::FilterL1, "Mean L1 norm of a filter"),
            ("filter L2", Column::FilterL2, "Mean L2 norm of a filter"),
            (
                "W1 to ref.",
                Column::W1,
                "Wasserstein-1 distance to the same layer of the first model",
            ),
        ];
        ui.label("model");
        for (name, c, tip) in headers {
            let arrow = if sort.0 == c {
                if sort.1 { " v" } else { " ^" }
            } else {
                ""
            };
            if ui
                .button(format!("{name}{arrow}"))
                .on_hover_text(format!("{tip}; click to sort"))
                .clicked()
            {
                *sort = (c, sort.0 == c && !sort.1);
            }
        }
        ui.end_row();
        for x in rows {
            let s = &x.summary;
            ui.colored_label(COLOURS[x.model % 3], &r.models[x.model]);
            ui.label(&x.layer);
            ui.label(s.count.to_string());
            ui.label(format!("{:+.4}", s.mean));
            ui.label(format!("{:.4}", s.std));
            ui.label(format!("{:.4}", s.mean_abs));
            ui.label(format!("{:.2}", s.kurtosis));
            ui.label(format!("{:.1}% (<{})", 100.0 * s.near_zero_share, s.near_zero));
            ui.label(format!("{:.3}", x.mean_filter_l1));
            ui.label(format!("{:.3}", x.mean_filter_l2));
            ui.label(x.w1_to_first.map_or("-".into(), |d| format!("{d:.4}")));
            ui.end_row();
        }
    });
}
