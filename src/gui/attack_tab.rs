//! The Attack lab: one image, attacked live. Every change of a setting submits a job to a
//! dedicated worker that keeps only the newest job (an attack in flight is abandoned when a newer
//! one arrives); results carry their generation and stale ones are dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use egui::{Color32, ColorImage, TextureHandle, TextureOptions, Ui};
use egui_plot::{Bar, BarChart, Legend, Line, Plot, PlotPoints};

use super::Command;
use super::worker::{self, Event, ModelSummary, PickPurpose, Waker, chain};
use crate::attack::lab::{self, LabResult, Reaction};
use crate::attack::{AttackConfig, AttackKind};
use crate::export::{Figure, Series, Style};
use crate::model::{ModelConfig, Network, checkpoint};
use crate::observe::Outcome;

/// Where the attacked image comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ImageSource {
    File(PathBuf),
    /// Image `index` of the test split of `data`.
    Dataset {
        data: String,
        index: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct AttackJob {
    pub generation: u64,
    pub model: PathBuf,
    pub second: Option<PathBuf>,
    pub source: ImageSource,
    pub config: AttackConfig,
}

/// A finished job, with what the window needs to label it.
#[derive(Clone, Debug)]
pub struct AttackOutput {
    pub result: LabResult,
    pub class_names: Vec<String>,
    /// Where the image came from and how it was converted.
    pub source: String,
    /// Whether the label is the dataset's or the model's clean prediction.
    pub label_source: String,
}

#[derive(Default)]
struct Slot {
    job: Option<AttackJob>,
    quit: bool,
}

/// The attack thread: holds at most one waiting job; dropping it stops and joins.
pub struct AttackWorker {
    slot: Arc<(Mutex<Slot>, Condvar)>,
    handle: Option<JoinHandle<()>>,
}

impl AttackWorker {
    pub fn spawn(tx: Sender<Event>, waker: Waker) -> std::io::Result<Self> {
        let slot = Arc::new((Mutex::new(Slot::default()), Condvar::new()));
        let shared = slot.clone();
        let handle = std::thread::Builder::new().name("awnet-attack".into()).spawn(move || {
            let mut cache = Cache::default();
            loop {
                let job = {
                    let (lock, cv) = &*shared;
                    let mut s = lock.lock().expect("attack slot poisoned");
                    while s.job.is_none() && !s.quit {
                        s = cv.wait(s).expect("attack slot poisoned");
                    }
                    if s.quit {
                        return;
                    }
                    s.job.take().expect("a job is waiting")
                };
                let newer = || shared.0.lock().map(|s| s.job.is_some() || s.quit).unwrap_or(true);
                let generation = job.generation;
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.run(&job, &newer)))
                    .unwrap_or_else(|_| Err("the attack panicked".into()));
                worker::send(
                    &tx,
                    &waker,
                    Event::Attack {
                        generation,
                        result: result.map(|o| o.map(Box::new)),
                    },
                );
            }
        })?;
        Ok(Self {
            slot,
            handle: Some(handle),
        })
    }

    /// Replaces any job still waiting: the newest wins.
    pub fn submit(&self, job: AttackJob) {
        let (lock, cv) = &*self.slot;
        if let Ok(mut s) = lock.lock() {
            s.job = Some(job);
            cv.notify_one();
        }
    }
}

impl Drop for AttackWorker {
    fn drop(&mut self) {
        let (lock, cv) = &*self.slot;
        if let Ok(mut s) = lock.lock() {
            s.quit = true;
            cv.notify_one();
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Models and datasets loaded once per attack thread.
#[derive(Default)]
struct Cache {
    models: HashMap<PathBuf, (ModelConfig, Network)>,
    data: HashMap<(String, usize, usize), crate::data::Dataset>,
}

impl Cache {
    fn model(&mut self, p: &Path) -> Result<(ModelConfig, Network), String> {
        if let Some(m) = self.models.get(p) {
            return Ok(m.clone());
        }
        let m = checkpoint::open(p).map_err(|e| chain(&e))?;
        let net = m.frozen().map_err(|e| chain(&e))?;
        self.models.insert(p.to_path_buf(), (m.config.clone(), net.clone()));
        Ok((m.config, net))
    }

    fn run(&mut self, job: &AttackJob, newer: &dyn Fn() -> bool) -> Result<Option<AttackOutput>, String> {
        let (config, net) = self.model(&job.model)?;
        let (c, s) = (config.in_channels, config.image_size);
        let second = match &job.second {
            Some(p) => {
                let (sc, snet) = self.model(p)?;
                if (sc.in_channels, sc.image_size, sc.num_classes) != (c, s, config.num_classes) {
                    return Err(format!(
                        "{} takes other images or classes than the attacked model",
                        p.display()
                    ));
                }
                Some(snet)
            }
            None => None,
        };
        let (pixels, label, source) = match &job.source {
            ImageSource::File(p) => {
                let img = crate::data::image::load(p, c, s).map_err(|e| chain(&e))?;
                let note = if img.note.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", img.note)
                };
                (img.pixels, None, format!("{}{note}", p.display()))
            }
            ImageSource::Dataset { data, index } => {
                let key = (data.clone(), c, s);
                if !self.data.contains_key(&key) {
                    let ds = crate::data::load(data, crate::data::Split::Test, Some((c, s))).map_err(|e| chain(&e))?;
                    self.data.insert(key.clone(), ds);
                }
                let ds = &self.data[&key];
                if *index >= ds.len() {
                    return Err(format!("{} has {} images, not {}", ds.name, ds.len(), index + 1));
                }
                (
                    ds.image(*index).to_vec(),
                    Some(u32::from(ds.labels[*index])),
                    format!("{} image {index}", ds.name),
                )
            }
        };
        let label_source = if label.is_some() {
            "the dataset's label"
        } else {
            "the model's clean prediction"
        };
        let out = lab::attack_one(
            &net,
            second.as_ref().map(|n| n as _),
            &pixels,
            c,
            s,
            label,
            &job.config,
            newer,
        )
        .map_err(|e| chain(&e))?;
        Ok(match out {
            Outcome::Done(result) => Some(AttackOutput {
                result,
                class_names: (0..config.num_classes).map(|i| config.class_name(i)).collect(),
                source,
                label_source: label_source.into(),
            }),
            Outcome::Cancelled => None,
        })
    }
}

/// The tab's settings and its newest result.
pub struct AttackState {
    pub model: Option<PathBuf>,
    pub second: Option<PathBuf>,
    pub source: Option<ImageSource>,
    pub kind: AttackKind,
    pub eps: f64,
    pub steps: usize,
    pub step_size: f64,
    pub restarts: usize,
    pub target: Option<u32>,
    pub lambda: f64,
    pub dataset_index: usize,
    pub generation: u64,
    pub submitted: Option<AttackJob>,
    pub output: Option<AttackOutput>,
    pub error: Option<String>,
    /// The bundled pictures, listed once (not a directory read per frame).
    gallery: Option<Vec<PathBuf>>,
    textures: Option<[TextureHandle; 3]>,
}

impl Default for AttackState {
    fn default() -> Self {
        Self {
            model: None,
            second: None,
            source: None,
            kind: AttackKind::Pgd,
            eps: 0.1,
            steps: 20,
            step_size: 0.0,
            restarts: 1,
            target: None,
            lambda: 1.0,
            dataset_index: 0,
            generation: 0,
            submitted: None,
            output: None,
            error: None,
            gallery: None,
            textures: None,
        }
    }
}

impl AttackState {
    /// Accepts the result of the newest job only.
    pub fn accept(&mut self, generation: u64, result: Result<Option<AttackOutput>, String>) -> bool {
        if generation != self.generation {
            return false;
        }
        match result {
            Ok(Some(o)) => {
                self.output = Some(o);
                self.error = None;
                self.textures = None;
            }
            Ok(None) => {}
            Err(e) => self.error = Some(e),
        }
        true
    }

    fn config(&self) -> AttackConfig {
        let mut c = AttackConfig::new(self.kind, self.eps);
        c.steps = Some(self.steps);
        c.step_size = (self.step_size > 0.0).then_some(self.step_size);
        c.restarts = self.restarts.max(1);
        c.target = self.target;
        c.lambda = self.lambda;
        c
    }
}

/// The bundled sample pictures.
pub fn gallery() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(crate::data::resolve::assets_dir().join("samples"))
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "png"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

const BEFORE: Color32 = Color32::from_rgb(70, 130, 220);
const AFTER: Color32 = Color32::from_rgb(230, 80, 60);

pub fn show(ui: &mut Ui, s: &mut AttackState, models: &[ModelSummary], data: &str, commands: &mut Vec<Command>) {
    if !s.model.as_ref().is_some_and(|p| models.iter().any(|m| &m.path == p)) {
        s.model = models.first().map(|m| m.path.clone());
    }
    let pictures = s.gallery.get_or_insert_with(gallery).clone();
    if s.source.is_none() {
        s.source = pictures.first().cloned().map(ImageSource::File);
    }
    let is_awnet = models.iter().any(|m| Some(&m.path) == s.model.as_ref() && m.is_awnet);
    egui::Panel::left("attack_controls")
        .resizable(false)
        .default_size(260.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| controls(ui, s, models, data, is_awnet, commands));
        });
    if let (Some(model), Some(source)) = (s.model.clone(), s.source.clone()) {
        let mut job = AttackJob {
            generation: s.generation + 1,
            model,
            second: s.second.clone(),
            source,
            config: s.config(),
        };
        let same = s.submitted.as_ref().is_some_and(|j| {
            job.generation = j.generation;
            *j == job
        });
        if !same {
            s.generation += 1;
            job.generation = s.generation;
            s.submitted = Some(job.clone());
            commands.push(Command::Attack(job));
        }
    }
    egui::CentralPanel::default().show(ui, |ui| {
        egui::ScrollArea::vertical().show(ui, |ui| {
            if let Some(e) = &s.error {
                ui.colored_label(ui.visuals().error_fg_color, e);
            }
            match &s.output {
                Some(o) => result_view(ui, o, &mut s.textures, commands),
                None if s.model.is_none() => {
                    ui.label("Open a model to attack.");
                }
                None => {
                    ui.spinner();
                }
            }
        });
    });
}

fn controls(
    ui: &mut Ui,
    s: &mut AttackState,
    models: &[ModelSummary],
    data: &str,
    is_awnet: bool,
    commands: &mut Vec<Command>,
) {
    ui.heading("Model");
    egui::ComboBox::from_id_salt("attack_model")
        .selected_text(name_of(models, s.model.as_ref()))
        .show_ui(ui, |ui| {
            for m in models {
                ui.selectable_value(&mut s.model, Some(m.path.clone()), &m.name);
            }
        })
        .response
        .on_hover_text("The model attacked (white-box)");
    ui.label("Second model (transfer)");
    egui::ComboBox::from_id_salt("attack_second")
        .selected_text(name_of(models, s.second.as_ref()))
        .show_ui(ui, |ui| {
            ui.selectable_value(&mut s.second, None, "none");
            for m in models {
                ui.selectable_value(&mut s.second, Some(m.path.clone()), &m.name);
            }
        })
        .response
        .on_hover_text("Scored on the same adversarial image, not attacked");
    ui.separator();
    ui.heading("Image");
    ui.horizontal_wrapped(|ui| {
        for p in s.gallery.clone().unwrap_or_default() {
            let name = p
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let chosen = s.source == Some(ImageSource::File(p.clone()));
            if ui
                .selectable_label(chosen, &name)
                .on_hover_text("A bundled Fashion-MNIST test picture")
                .clicked()
            {
                s.source = Some(ImageSource::File(p));
            }
        }
    });
    ui.horizontal(|ui| {
        let r = ui
            .add(
                egui::DragValue::new(&mut s.dataset_index)
                    .range(0..=99_999)
                    .prefix("test image "),
            )
            .on_hover_text(format!("Image number in the test split of {data}"));
        if r.changed() || ui.button("Use").on_hover_text("Attack this dataset image").clicked() {
            s.source = Some(ImageSource::Dataset {
                data: data.to_string(),
                index: s.dataset_index,
            });
        }
    });
    if ui
        .button("Open image…")
        .on_hover_text("Any PNG or JPEG; converted to the model's input")
        .clicked()
    {
        commands.push(Command::Pick(PickPurpose::AttackImage));
    }
    ui.separator();
    ui.heading("Attack");
    egui::ComboBox::from_id_salt("attack_kind")
        .selected_text(s.kind.name())
        .show_ui(ui, |ui| {
            for k in AttackKind::ALL {
                let ok = k != AttackKind::Adaptive || is_awnet;
                ui.add_enabled_ui(ok, |ui| ui.selectable_value(&mut s.kind, k, k.name()));
            }
        })
        .response
        .on_hover_text("Adaptive needs an AW-Net model: it goes through the router");
    ui.add(egui::Slider::new(&mut s.eps, 0.0..=0.5).text("eps"))
        .on_hover_text("L-inf radius in pixel units of [0, 1]");
    ui.label(format!("eps = {:.4} = {:.1}/255", s.eps, s.eps * 255.0));
    ui.add(egui::DragValue::new(&mut s.steps).range(1..=1000).prefix("steps "))
        .on_hover_text("Iterations (queries for Square)");
    // 0 stands for the attack's own default, shown as such with its value.
    let default_step = {
        let mut c = s.config();
        c.step_size = None;
        c.step_size()
    };
    ui.add(
        egui::DragValue::new(&mut s.step_size)
            .range(0.0..=0.5)
            .speed(0.001)
            .prefix("step size ")
            .custom_formatter(move |v, _| {
                if v == 0.0 {
                    format!("default ({default_step:.4})")
                } else {
                    format!("{v:.4}")
                }
            }),
    )
    .on_hover_text("Drag to 0 for the attack's default (PGD: 2.5 eps / steps)");
    ui.add(egui::DragValue::new(&mut s.restarts).range(1..=20).prefix("restarts "))
        .on_hover_text("Random restarts; the best one counts");
    let classes: Vec<String> = s.output.as_ref().map(|o| o.class_names.clone()).unwrap_or_default();
    egui::ComboBox::from_id_salt("attack_target")
        .selected_text(match s.target {
            None => "untargeted".to_string(),
            Some(t) => classes.get(t as usize).cloned().unwrap_or_else(|| format!("class {t}")),
        })
        .show_ui(ui, |ui| {
            ui.selectable_value(&mut s.target, None, "untargeted");
            for (i, c) in classes.iter().enumerate() {
                ui.selectable_value(&mut s.target, Some(i as u32), c);
            }
        })
        .response
        .on_hover_text("Push the image towards this class instead of away from its own");
    if s.kind == AttackKind::Adaptive {
        ui.add(egui::Slider::new(&mut s.lambda, 0.0..=10.0).text("lambda"))
            .on_hover_text("Weight of the term that keeps the router convinced the input is clean");
    }
    ui.separator();
    let can_save = s.output.is_some();
    if ui
        .add_enabled(can_save, egui::Button::new("Save adversarial image…"))
        .on_hover_text("PNG (lossless, exactly these pixels), the perturbation and a JSON record")
        .clicked()
    {
        commands.push(Command::Pick(PickPurpose::SaveAttack));
    }
}

fn name_of(models: &[ModelSummary], p: Option<&PathBuf>) -> String {
    p.and_then(|p| models.iter().find(|m| &m.path == p))
        .map_or("none".into(), |m| m.name.clone())
}

fn picture(px: &[u8], c: usize, s: usize) -> ColorImage {
    let pixels = (0..s * s)
        .map(|i| {
            if c >= 3 {
                Color32::from_rgb(px[i], px[s * s + i], px[2 * s * s + i])
            } else {
                Color32::from_gray(px[i])
            }
        })
        .collect();
    ColorImage::new([s, s], pixels)
}

fn top(r: &Reaction, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..r.probs.len()).collect();
    idx.sort_by(|a, b| r.probs[*b].total_cmp(&r.probs[*a]));
    idx.truncate(k);
    idx
}

/// The classes the bars show: the five most probable before, then those after.
fn shown_classes(before: &Reaction, after: &Reaction) -> Vec<usize> {
    let mut shown = top(before, 5);
    for i in top(after, 5) {
        if !shown.contains(&i) {
            shown.push(i);
        }
    }
    shown
}

/// The result's plots as figures for export, with the values the window draws.
pub fn figures(o: &AttackOutput) -> Vec<Figure> {
    let r = &o.result;
    let prov = crate::export::figures::provenance(
        serde_json::json!({"image": o.source, "attack": r.attack, "label": r.label, "label_source": o.label_source,
            "linf": r.linf, "l2": r.l2, "class_names": o.class_names}),
    );
    let classes = |names: &[String]| {
        let list: Vec<String> = names.iter().enumerate().map(|(i, n)| format!("{i} {n}")).collect();
        if list.is_empty() {
            "class".to_string()
        } else {
            format!("class ({})", list.join(", "))
        }
    };
    let probabilities = |name: &str, title: String, before: &Reaction, after: &Reaction| {
        let shown = shown_classes(before, after);
        let bars = |name: &str, x: &Reaction| Series {
            name: name.into(),
            style: Style::Bars,
            points: shown.iter().map(|&i| (i as f64, x.probs[i])).collect(),
        };
        Figure {
            name: name.into(),
            title,
            x_label: classes(&o.class_names),
            y_label: "probability".into(),
            series: vec![bars("before", before), bars("after", after)],
            x_range: None,
            y_range: Some((0.0, 1.0)),
            provenance: prov.clone(),
        }
    };
    let (flat, line) = (crate::export::figures::flat_signals, Series::line);
    let mut out = vec![
        probabilities(
            "attack-probabilities",
            format!("Class probabilities before and after, {}", r.attack),
            &r.before,
            &r.after,
        ),
        Figure {
            name: "attack-objective".into(),
            title: format!("Objective per iteration, {}", r.attack),
            x_label: "iteration".into(),
            y_label: "objective".into(),
            series: vec![line(
                "objective",
                r.trace.iter().enumerate().map(|(i, &v)| (i as f64, v)).collect(),
            )],
            x_range: None,
            y_range: None,
            provenance: prov.clone(),
        },
    ];
    if r.before.p_adv.is_some() {
        out.push(Figure {
            name: "attack-signals".into(),
            title: "Router signals before and after the attack".into(),
            x_label: "filter (blocks one after another)".into(),
            y_label: "signal omega".into(),
            series: vec![
                line("before", flat(&r.before.signals)),
                line("after", flat(&r.after.signals)),
            ],
            x_range: None,
            y_range: None,
            provenance: prov.clone(),
        });
    }
    if let Some((b, a)) = &r.second {
        out.push(probabilities(
            "attack-transfer-probabilities",
            "Second model on the same images (transfer)".into(),
            b,
            a,
        ));
    }
    out
}

fn bars(ui: &mut Ui, id: &str, before: &Reaction, after: &Reaction, names: &[String]) -> egui::Response {
    let shown = shown_classes(before, after);
    let label = |i: usize| names.get(i).cloned().unwrap_or_else(|| i.to_string());
    let b: Vec<Bar> = shown
        .iter()
        .enumerate()
        .map(|(x, &i)| Bar::new(x as f64 - 0.2, before.probs[i]).width(0.38).name(label(i)))
        .collect();
    let a: Vec<Bar> = shown
        .iter()
        .enumerate()
        .map(|(x, &i)| Bar::new(x as f64 + 0.2, after.probs[i]).width(0.38).name(label(i)))
        .collect();
    let names_shown: Vec<String> = shown.iter().map(|&i| label(i)).collect();
    let response = Plot::new(id)
        .height(200.0)
        .legend(Legend::default())
        .include_y(0.0)
        .include_y(1.0)
        .y_axis_label("probability")
        .x_axis_formatter(move |m, _| {
            let i = m.value.round();
            if (m.value - i).abs() < 1e-6 && i >= 0.0 {
                names_shown.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .show(ui, |p| {
            p.bar_chart(BarChart::new("before", b).color(BEFORE));
            p.bar_chart(BarChart::new("after", a).color(AFTER));
        })
        .response;
    egui::Grid::new(format!("{id}_table")).striped(true).show(ui, |ui| {
        ui.label("class");
        ui.label("before");
        ui.label("after");
        ui.end_row();
        for &i in &shown {
            ui.label(label(i));
            ui.label(format!("{:.2}%", 100.0 * before.probs[i]));
            ui.label(format!("{:.2}%", 100.0 * after.probs[i]));
            ui.end_row();
        }
    });
    response
}

fn result_view(ui: &mut Ui, o: &AttackOutput, textures: &mut Option<[TextureHandle; 3]>, commands: &mut Vec<Command>) {
    let r = &o.result;
    let names = &o.class_names;
    let cls = |i: usize| names.get(i).cloned().unwrap_or_else(|| i.to_string());
    ui.heading(format!(
        "{} -> {}  ({})",
        cls(r.before.predicted()),
        cls(r.after.predicted()),
        r.attack
    ));
    ui.label(format!(
        "Image: {}. Attacked class {} ({}, {}). Perturbation of the saved 8-bit image: L-inf {:.4} ({:.1}/255), L2 {:.4}. {:.0} ms.",
        o.source,
        r.label,
        cls(r.label as usize),
        o.label_source,
        r.linf,
        r.linf * 255.0,
        r.l2,
        1000.0 * r.seconds
    ));
    let scale = r.linf.max(1.0 / 255.0);
    let tex = textures.get_or_insert_with(|| {
        let delta: Vec<u8> = r
            .adversarial
            .iter()
            .zip(&r.original)
            .map(|(&a, &b)| {
                ((f64::from(a) - f64::from(b)) / 255.0 / scale * 127.5 + 127.5)
                    .round()
                    .clamp(0.0, 255.0) as u8
            })
            .collect();
        let load = |n: &str, img| ui.ctx().load_texture(n, img, TextureOptions::NEAREST);
        [
            load("lab_original", picture(&r.original, r.channels, r.side)),
            load("lab_adversarial", picture(&r.adversarial, r.channels, r.side)),
            load("lab_delta", picture(&delta, r.channels, r.side)),
        ]
    });
    ui.horizontal(|ui| {
        for (t, caption) in [
            (&tex[0], "original".to_string()),
            (&tex[1], "adversarial".to_string()),
            (
                &tex[2],
                format!("perturbation x{:.0} (grey = 0, white = +{scale:.3})", 0.5 / scale),
            ),
        ] {
            ui.vertical(|ui| {
                ui.image((t.id(), egui::vec2(168.0, 168.0)));
                ui.label(caption);
            });
        }
    });
    let w = (ui.available_width() / 2.0 - 8.0).max(200.0);
    ui.horizontal(|ui| {
        ui.vertical(|ui| {
            ui.set_width(w);
            ui.label("Class probabilities, before and after");
            let shown = bars(ui, "lab_bars", &r.before, &r.after, names);
            super::export_menu(&shown, "attack-probabilities", commands);
        });
        ui.vertical(|ui| {
            ui.set_width(w);
            ui.label("The attack's objective per iteration");
            let shown = Plot::new("lab_trace")
                .height(200.0)
                .x_axis_label("iteration")
                .y_axis_label("objective")
                .show(ui, |p| {
                    let pts: Vec<[f64; 2]> = r.trace.iter().enumerate().map(|(i, &v)| [i as f64, v]).collect();
                    p.line(Line::new("objective", PlotPoints::from(pts)).color(AFTER));
                });
            super::export_menu(&shown.response, "attack-objective", commands);
        });
    });
    if let (Some(b), Some(a)) = (r.before.p_adv, r.after.p_adv) {
        ui.separator();
        ui.label(format!("Router: p_adv {b:.3} before, {a:.3} after"));
        let shown = Plot::new("lab_signals")
            .height(200.0)
            .legend(Legend::default())
            .x_axis_label("filter (blocks one after another)")
            .y_axis_label("signal")
            .show(ui, |p| {
                let flat = |s: &[Vec<f64>]| -> Vec<[f64; 2]> {
                    s.iter().flatten().enumerate().map(|(i, &v)| [i as f64, v]).collect()
                };
                p.line(Line::new("before", PlotPoints::from(flat(&r.before.signals))).color(BEFORE));
                p.line(Line::new("after", PlotPoints::from(flat(&r.after.signals))).color(AFTER));
            });
        super::export_menu(&shown.response, "attack-signals", commands);
    }
    if let Some((b, a)) = &r.second {
        ui.separator();
        ui.label(format!(
            "Second model on the same images (transfer): {} -> {}{}",
            cls(b.predicted()),
            cls(a.predicted()),
            match (b.p_adv, a.p_adv) {
                (Some(x), Some(y)) => format!(", router p_adv {x:.3} -> {y:.3}"),
                _ => String::new(),
            }
        ));
        let shown = bars(ui, "lab_second_bars", b, a, names);
        super::export_menu(&shown, "attack-transfer-probabilities", commands);
    }
}
