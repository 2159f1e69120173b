//! The application state and its frame: menu and tabs on top, open models and data on the
//! left, the tab in the middle, status at the bottom, notifications in the corner.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Instant;

use egui::{Key, KeyboardShortcut, Modifiers, Ui};
use serde::{Deserialize, Serialize};

use super::Command;
use super::attack_tab::{self, AttackState, AttackWorker, ImageSource};
use super::filters_tab::{self, FiltersState};
use super::router_tab::{self, RouterState};
use super::tradeoff_tab::{self, TradeOffState};
use super::train_tab::{self, TrainForm, TrainHistory, TrainView};
use super::worker::{self, Event, ModelSummary, PickPurpose, TrainWorker, Waker};
use crate::observe::StopFlag;
use crate::train::TrainEvent;

pub const SETTINGS_KEY: &str = "awnet-lab-settings";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Tab {
    Train,
    Filters,
    Router,
    AttackLab,
    TradeOff,
}

impl Tab {
    pub const ALL: [Tab; 5] = [Tab::Train, Tab::Filters, Tab::Router, Tab::AttackLab, Tab::TradeOff];

    pub fn title(self) -> &'static str {
        match self {
            Tab::Train => "Train",
            Tab::Filters => "Filters",
            Tab::Router => "Router",
            Tab::AttackLab => "Attack lab",
            Tab::TradeOff => "Trade-off",
        }
    }
}

/// What survives a restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub dark: bool,
    pub recent_models: Vec<PathBuf>,
    pub data: String,
    pub train: TrainForm,
    pub tab: Tab,
    /// Where figures were last exported; the folder dialog opens there.
    pub export_dir: Option<PathBuf>,
    /// PNG size of exported figures, times 720x480.
    pub export_scale: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            dark: true,
            recent_models: Vec::new(),
            data: "fashion-mnist".into(),
            train: TrainForm::default(),
            tab: Tab::Train,
            export_dir: None,
            export_scale: 2.0,
        }
    }
}

/// How the window starts.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// Models to open; the bundled ones when empty.
    pub models: Vec<PathBuf>,
    pub tab: Option<Tab>,
    /// Write a screenshot here once the content is computed, then close.
    pub screenshot: Option<PathBuf>,
}

/// The bundled trained models in `models/`.
pub fn bundled_models() -> Vec<PathBuf> {
    let dir = crate::data::resolve::assets_dir().with_file_name("models");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

#[derive(Clone, Debug)]
pub struct Notification {
    pub id: u64,
    pub text: String,
    pub error: bool,
}

struct Screenshot {
    path: PathBuf,
    calm_frames: u32,
    requested: bool,
}

pub struct App {
    pub settings: Settings,
    pub models: Vec<ModelSummary>,
    pub selected: Option<usize>,
    pub notifications: Vec<Notification>,
    /// The run of this session, if one was started.
    pub run: Option<TrainHistory>,
    pub filters: FiltersState,
    pub router: RouterState,
    pub attack: AttackState,
    pub tradeoff: TradeOffState,
    tradeoff_stop: StopFlag,
    attack_worker: Option<AttackWorker>,
    /// Cancels the Router analysis in flight.
    router_stop: StopFlag,
    /// The training data, described, or why it cannot be used; `None` while it resolves.
    pub data_description: Option<Result<String, String>>,
    /// Commands are recorded in `sent` instead of executed (tests).
    pub dry_run: bool,
    pub sent: Vec<Command>,
    outbox: Vec<Command>,
    /// The figure a per-plot export asked for; `None` exports the whole tab.
    pub export_only: Option<String>,
    pending_jobs: usize,
    /// Between a run's `Started` event and its end.
    live: bool,
    next_id: u64,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    waker: Waker,
    worker: Option<TrainWorker>,
    screenshot: Option<Screenshot>,
    frame_ms: VecDeque<f32>,
}

impl App {
    pub fn new(options: StartOptions, stored: Option<Settings>, ctx: Option<egui::Context>) -> Self {
        let (tx, rx) = channel();
        let mut settings = stored.unwrap_or_default();
        if let Some(t) = options.tab {
            settings.tab = t;
        }
        let mut app = Self {
            settings,
            models: Vec::new(),
            selected: None,
            notifications: Vec::new(),
            run: None,
            filters: FiltersState::default(),
            router: RouterState::default(),
            attack: AttackState::default(),
            tradeoff: TradeOffState::default(),
            tradeoff_stop: StopFlag::default(),
            attack_worker: None,
            router_stop: StopFlag::default(),
            data_description: None,
            dry_run: false,
            sent: Vec::new(),
            outbox: Vec::new(),
            export_only: None,
            pending_jobs: 0,
            live: false,
            next_id: 0,
            tx,
            rx,
            waker: Waker(ctx),
            worker: None,
            screenshot: options.screenshot.map(|path| Screenshot {
                path,
                calm_frames: 0,
                requested: false,
            }),
            frame_ms: VecDeque::new(),
        };
        let models = if options.models.is_empty() {
            bundled_models()
        } else {
            options.models
        };
        app.outbox.extend(models.into_iter().map(Command::OpenModel));
        // Training data is checked quietly at start: without Debian's full Fashion-MNIST the data
        // panel says so, and only starting a run (or choosing other data) raises an error.
        app.outbox.push(Command::SetData {
            name: app.settings.data.clone(),
            announce: false,
        });
        app
    }

    /// A copy of the app that records commands instead of running them (tests).
    pub fn dry(options: StartOptions) -> Self {
        let mut app = Self::new(options, None, None);
        app.dry_run = true;
        app
    }

    /// Feeds an event as if a worker had sent it (tests).
    pub fn inject(&mut self, event: Event) {
        let _ = self.tx.send(event);
    }

    /// A run is going: its thread exists, or its events say it started and has not ended.
    pub fn is_training(&self) -> bool {
        self.worker.is_some() || self.live
    }

    pub fn notify(&mut self, text: impl Into<String>, error: bool) {
        self.next_id += 1;
        self.notifications.push(Notification {
            id: self.next_id,
            text: text.into(),
            error,
        });
    }

    /// Draws the whole window into `ui`.
    pub fn show(&mut self, ui: &mut Ui) {
        let started = Instant::now();
        while let Ok(e) = self.rx.try_recv() {
            self.handle(e);
        }
        if self.worker.as_ref().is_some_and(TrainWorker::is_finished) {
            self.worker = None; // already finished: dropping joins at once
        }
        ui.ctx().set_theme(if self.settings.dark {
            egui::Theme::Dark
        } else {
            egui::Theme::Light
        });
        self.shortcuts(ui);
        let dropped: Vec<PathBuf> = ui
            .ctx()
            .input(|i| i.raw.dropped_files.iter().map(|f| f.path().to_path_buf()).collect());
        self.outbox.extend(dropped.into_iter().map(Command::OpenModel));

        egui::Panel::top("top").show(ui, |ui| self.top_bar(ui));
        egui::Panel::bottom("status").show(ui, |ui| self.status_bar(ui));
        egui::Panel::left("models")
            .resizable(true)
            .default_size(250.0)
            .show(ui, |ui| self.side_panel(ui));
        egui::CentralPanel::default().show(ui, |ui| self.tab(ui));
        self.show_notifications(ui);

        for c in std::mem::take(&mut self.outbox) {
            if self.dry_run {
                self.sent.push(c);
            } else {
                self.execute(c);
            }
        }
        self.screenshot_step(ui.ctx());
        if self.frame_ms.len() == 120 {
            self.frame_ms.pop_front();
        }
        self.frame_ms.push_back(started.elapsed().as_secs_f32() * 1000.0);
    }

    /// A dropped picture goes to the Attack lab; anything else is opened as a model.
    pub fn open_dropped(&mut self, p: PathBuf) {
        let ext = p
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if ["png", "jpg", "jpeg", "bmp", "gif", "webp"].contains(&ext.as_str()) {
            self.attack.source = Some(ImageSource::File(p));
            self.settings.tab = Tab::AttackLab;
        } else {
            self.outbox.push(Command::OpenModel(p));
        }
    }

    fn shortcuts(&mut self, ui: &Ui) {
        let open = KeyboardShortcut::new(Modifiers::COMMAND, Key::O);
        let start = KeyboardShortcut::new(Modifiers::COMMAND, Key::Enter);
        let theme = KeyboardShortcut::new(Modifiers::COMMAND | Modifiers::SHIFT, Key::D);
        let tabs = [Key::Num1, Key::Num2, Key::Num3, Key::Num4, Key::Num5];
        ui.ctx().input_mut(|i| {
            if i.consume_shortcut(&open) {
                self.outbox.push(Command::Pick(PickPurpose::OpenModel));
            }
            if i.consume_shortcut(&start) && !self.is_training() {
                self.outbox
                    .push(train_tab::start_command(&self.settings.train, &self.settings.data));
            }
            if i.consume_key(Modifiers::NONE, Key::Escape) && self.is_training() {
                self.outbox.push(Command::StopTraining);
            }
            if i.consume_shortcut(&theme) {
                self.settings.dark = !self.settings.dark;
            }
            for (k, t) in tabs.iter().zip(Tab::ALL) {
                if i.consume_shortcut(&KeyboardShortcut::new(Modifiers::COMMAND, *k)) {
                    self.settings.tab = t;
                }
            }
        });
    }

    fn top_bar(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            ui.menu_button("File", |ui| {
                if ui.button("Open model…  (Ctrl+O)").clicked() {
                    self.outbox.push(Command::Pick(PickPurpose::OpenModel));
                }
                ui.menu_button("Open recent", |ui| {
                    if self.settings.recent_models.is_empty() {
                        ui.label("nothing yet");
                    }
                    for p in self.settings.recent_models.clone() {
                        if ui.button(p.display().to_string()).clicked() {
                            self.outbox.push(Command::OpenModel(p));
                        }
                    }
                });
            });
            ui.menu_button("Export", |ui| {
                ui.add(egui::Slider::new(&mut self.settings.export_scale, 0.5..=6.0).text("PNG scale"))
                    .on_hover_text("PNG size: 720x480 times this; SVG, CSV and JSON do not depend on it");
                if ui.button("Export this tab's figures…").clicked() {
                    self.outbox.push(Command::Export(None));
                }
                ui.label("(right-click a plot to export it alone)");
            });
            ui.menu_button("View", |ui| {
                if ui
                    .button(if self.settings.dark {
                        "Light theme"
                    } else {
                        "Dark theme"
                    })
                    .on_hover_text("Ctrl+Shift+D")
                    .clicked()
                {
                    self.settings.dark = !self.settings.dark;
                }
            });
            if ui
                .button("Export figures…")
                .on_hover_text("This tab's plots as SVG, PNG (scale in the Export menu), CSV of the plotted data and JSON with provenance; right-click a plot to export it alone")
                .clicked()
            {
                self.outbox.push(Command::Export(None));
            }
            ui.separator();
            for (i, t) in Tab::ALL.into_iter().enumerate() {
                ui.selectable_value(&mut self.settings.tab, t, t.title())
                    .on_hover_text(format!("Ctrl+{}", i + 1));
            }
        });
    }

    fn status_bar(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            match (self.is_training(), &self.run) {
                (true, Some(r)) => {
                    let s = r.steps.last();
                    ui.spinner();
                    ui.label(match s {
                        Some(s) => format!(
                            "training: epoch {}, step {}/{}, {:.0} img/s",
                            s.epoch + 1,
                            s.step + 1,
                            s.steps_per_epoch,
                            s.images_per_second
                        ),
                        None => "training: preparing data and model…".into(),
                    });
                }
                _ => {
                    ui.label("idle");
                }
            }
            if self.pending_jobs > 0 {
                ui.separator();
                ui.spinner();
                ui.label(format!("{} background job(s)", self.pending_jobs));
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                if let Some(max) = self.frame_ms.iter().copied().reduce(f32::max) {
                    let mean = self.frame_ms.iter().sum::<f32>() / self.frame_ms.len() as f32;
                    ui.label(format!("UI frame {mean:.2} ms (max {max:.1})"))
                        .on_hover_text("Time spent building the UI per frame, over the last 120 frames");
                }
            });
        });
    }

    fn side_panel(&mut self, ui: &mut Ui) {
        ui.heading("Models");
        if self.models.is_empty() {
            ui.label("No model open. File › Open, or drop a .safetensors, .pt or .pth file here.");
        }
        let mut close = None;
        for (i, m) in self.models.iter().enumerate() {
            ui.horizontal(|ui| {
                let sel = ui
                    .selectable_label(self.selected == Some(i), &m.name)
                    .on_hover_text(format!(
                        "{}\n{}\n{} parameters",
                        m.path.display(),
                        m.description,
                        m.parameters
                    ));
                if sel.clicked() {
                    self.selected = Some(i);
                }
                if ui.small_button("x").on_hover_text("Close this model").clicked() {
                    close = Some(i);
                }
            });
        }
        if let Some(i) = close {
            self.outbox.push(Command::CloseModel(i));
        }
        if ui.button("Open model…").on_hover_text("Ctrl+O").clicked() {
            self.outbox.push(Command::Pick(PickPurpose::OpenModel));
        }
        ui.separator();
        ui.heading("Data");
        let mut data = self.settings.data.clone();
        egui::ComboBox::from_id_salt("data")
            .selected_text(&data)
            .show_ui(ui, |ui| {
                for name in ["fashion-mnist", "mnist", "cifar10", "cifar100"] {
                    ui.selectable_value(&mut data, name.to_string(), name);
                }
            })
            .response
            .on_hover_text("By name: $AWNET_DATA, then Debian's package, then the bundled subset");
        if data != self.settings.data {
            self.outbox.push(Command::SetData {
                name: data,
                announce: true,
            });
        }
        if ui
            .button("Folder…")
            .on_hover_text("idx, CIFAR binary, or one subfolder of pictures per class")
            .clicked()
        {
            self.outbox.push(Command::Pick(PickPurpose::DataFolder));
        }
        match &self.data_description {
            None => ui.label("resolving…"),
            Some(Ok(d)) => ui.label(d),
            Some(Err(e)) => ui.colored_label(ui.visuals().error_fg_color, e),
        };
    }

    fn tab(&mut self, ui: &mut Ui) {
        match self.settings.tab {
            Tab::Train => {
                let running = self.is_training();
                let history = train_history(&self.run, self.selected.and_then(|i| self.models.get(i)));
                let history = history.as_ref();
                train_tab::show(
                    ui,
                    TrainView {
                        form: &mut self.settings.train,
                        history,
                        running,
                        data: &self.settings.data,
                        models: &self.models,
                    },
                    &mut self.outbox,
                );
            }
            Tab::TradeOff => {
                let epochs = self.run.as_ref().map(|r| r.epochs.clone()).unwrap_or_default();
                tradeoff_tab::show(
                    ui,
                    &mut self.tradeoff,
                    &self.models,
                    &epochs,
                    &self.settings.data,
                    &mut self.outbox,
                );
            }
            Tab::Filters => filters_tab::show(ui, &mut self.filters, &self.models, &mut self.outbox),
            Tab::Router => router_tab::show(
                ui,
                &mut self.router,
                &self.models,
                &self.settings.data,
                &mut self.outbox,
            ),
            Tab::AttackLab => attack_tab::show(
                ui,
                &mut self.attack,
                &self.models,
                &self.settings.data,
                &mut self.outbox,
            ),
        }
    }

    fn show_notifications(&mut self, ui: &mut Ui) {
        if self.notifications.is_empty() {
            return;
        }
        let mut dismiss = None;
        egui::Area::new(egui::Id::unique("notifications"))
            .anchor(egui::Align2::RIGHT_BOTTOM, [-12.0, -36.0])
            .show(ui.ctx(), |ui| {
                ui.set_max_width(420.0);
                for n in self.notifications.iter().rev().take(5) {
                    egui::Frame::popup(ui.style()).show(ui, |ui| {
                        ui.horizontal(|ui| {
                            let colour = if n.error {
                                ui.visuals().error_fg_color
                            } else {
                                ui.visuals().text_color()
                            };
                            ui.colored_label(colour, &n.text);
                            if ui.small_button("x").on_hover_text("Dismiss").clicked() {
                                dismiss = Some(n.id);
                            }
                        });
                    });
                }
            });
        if let Some(id) = dismiss {
            self.notifications.retain(|n| n.id != id);
        }
    }

    fn handle(&mut self, e: Event) {
        match e {
            Event::Train(t) => {
                let run = self.run.get_or_insert_with(TrainHistory::default);
                if matches!(t, TrainEvent::Started { .. }) {
                    self.live = true;
                }
                if let TrainEvent::Checkpoint { path, epoch, step } = &t {
                    let text = format!(
                        "checkpoint written: {} (epoch {}, step {step})",
                        path.display(),
                        epoch + 1
                    );
                    self.notify(text, false);
                } else {
                    run.apply(&t);
                }
            }
            Event::Progress(p) => {
                if let Some(r) = &mut self.run {
                    r.progress = Some(p);
                }
            }
            Event::TrainEnded { out, cancelled } => {
                self.live = false;
                self.notify(
                    if cancelled {
                        format!(
                            "training stopped; checkpoint in {} (Resume continues it)",
                            out.display()
                        )
                    } else {
                        format!("training finished: {}", out.display())
                    },
                    false,
                );
                if let Some(r) = &mut self.run {
                    r.progress = None;
                }
                self.outbox.push(Command::OpenModel(out));
            }
            Event::ModelLoaded(m) => {
                self.pending_jobs = self.pending_jobs.saturating_sub(1);
                self.settings.recent_models.retain(|p| p != &m.path);
                self.settings.recent_models.insert(0, m.path.clone());
                self.settings.recent_models.truncate(10);
                match self.models.iter().position(|x| x.path == m.path) {
                    Some(i) => self.models[i] = *m,
                    None => self.models.push(*m),
                }
                self.selected.get_or_insert(self.models.len() - 1);
            }
            Event::TrainFailed(text) => {
                self.live = false;
                if let Some(r) = &mut self.run {
                    r.progress = None;
                }
                self.notify(text, true);
            }
            Event::Error(text) => {
                self.pending_jobs = self.pending_jobs.saturating_sub(1);
                self.notify(text, true);
            }
            Event::Picked(purpose, path) => {
                let Some(path) = path else { return };
                let text = path.display().to_string();
                match purpose {
                    PickPurpose::OpenModel => self.outbox.push(Command::OpenModel(path)),
                    PickPurpose::TeacherClean => self.settings.train.teacher_clean = text,
                    PickPurpose::TeacherRobust => self.settings.train.teacher_robust = text,
                    PickPurpose::TrainOutput => self.settings.train.out = text,
                    PickPurpose::DataFolder => self.outbox.push(Command::SetData {
                        name: text,
                        announce: true,
                    }),
                    PickPurpose::AttackImage => self.attack.source = Some(ImageSource::File(path)),
                    PickPurpose::ExportFigures => {
                        self.settings.export_dir = Some(path.clone());
                        let (mut figs, mut tables) = self.tab_figures();
                        if let Some(only) = &self.export_only {
                            figs.retain(|f| &f.name == only);
                            tables.clear();
                        }
                        if figs.is_empty() && tables.is_empty() {
                            self.notify(
                                match &self.export_only {
                                    Some(name) => format!("the plot '{name}' has nothing to export now"),
                                    None => "this tab has nothing to export yet".into(),
                                },
                                true,
                            );
                            return;
                        }
                        let (tx, waker) = (self.tx.clone(), self.waker.clone());
                        let scale = self.settings.export_scale.clamp(0.5, 6.0);
                        self.pending_jobs += 1;
                        worker::spawn_job("awnet-export", tx, waker, move || {
                            let mut n = 0;
                            for f in &figs {
                                match f.write_all(&path, scale) {
                                    Ok(p) => n += p.len(),
                                    Err(e) => {
                                        return Event::Error(format!(
                                            "export failed after {n} files: {}",
                                            worker::chain(&e)
                                        ));
                                    }
                                }
                            }
                            for (name, text) in &tables {
                                if let Err(e) = crate::export::write(&path.join(name), text.as_bytes()) {
                                    return Event::Error(format!(
                                        "export failed after {n} files: {}",
                                        worker::chain(&e)
                                    ));
                                }
                                n += 1;
                            }
                            Event::Notice(format!("exported {n} files to {}", path.display()))
                        });
                    }
                    PickPurpose::SaveAttack => {
                        let Some(o) = &self.attack.output else { return };
                        let (result, tx, waker) = (o.result.clone(), self.tx.clone(), self.waker.clone());
                        let provenance = serde_json::json!({
                            "model": self.attack.submitted.as_ref().map(|j| j.model.clone()),
                            "image": o.source, "label": o.label_source,
                        });
                        self.pending_jobs += 1;
                        worker::spawn_job("awnet-save", tx, waker, move || {
                            match crate::attack::lab::save(&result, &path, provenance) {
                                Ok(paths) => Event::Notice(format!(
                                    "saved {}",
                                    paths
                                        .iter()
                                        .map(|p| p.display().to_string())
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                )),
                                Err(e) => Event::Error(format!("cannot save the attack: {}", worker::chain(&e))),
                            }
                        });
                    }
                }
            }
            Event::DataDescribed { result, announce } => {
                self.pending_jobs = self.pending_jobs.saturating_sub(1);
                if let (Err(e), true) = (&result, announce) {
                    self.notify(e.clone(), true);
                }
                self.data_description = Some(result);
            }
            Event::Attack { generation, result } => {
                if self.attack.accept(generation, result.map(|o| o.map(|b| *b)))
                    && let Some(e) = &self.attack.error
                {
                    let text = format!("the attack failed: {e}");
                    self.notify(text, true);
                }
            }
            Event::Notice(text) => {
                self.pending_jobs = self.pending_jobs.saturating_sub(1);
                self.notify(text, false);
            }
            Event::JobProgress {
                job,
                generation,
                progress,
            } => match job {
                worker::Job::Router if self.router.is_current(generation) => self.router.progress = Some(progress),
                worker::Job::TradeOff if self.tradeoff.generation == generation => {
                    self.tradeoff.progress = Some(progress)
                }
                _ => {}
            },
            Event::TradeOff { generation, result } => {
                self.pending_jobs = self.pending_jobs.saturating_sub(1);
                if self.tradeoff.generation == generation {
                    self.tradeoff.progress = None;
                    match result {
                        Ok(Some(curves)) => self.tradeoff.curves = curves,
                        Ok(None) => {}
                        Err(e) => self.notify(format!("the accuracy-vs-eps sweep failed: {e}"), true),
                    }
                }
            }
            Event::Router { generation, result } => {
                self.pending_jobs = self.pending_jobs.saturating_sub(1);
                match result {
                    Ok(Some(a)) => {
                        self.router.accept(generation, Ok(*a));
                    }
                    Ok(None) => {
                        if self.router.is_current(generation) {
                            self.router.progress = None;
                        }
                    }
                    Err(e) => {
                        if self.router.accept(generation, Err(e.clone())) {
                            self.notify(format!("router analysis failed: {e}"), true);
                        }
                    }
                }
            }
            Event::Filters { generation, result } => {
                self.pending_jobs = self.pending_jobs.saturating_sub(1);
                match result {
                    Ok(a) => {
                        self.filters.accept(generation, *a);
                    }
                    Err(e) => self.notify(format!("cannot analyse the filters: {e}"), true),
                }
            }
            Event::ScreenshotSaved(r) => match r {
                Ok(p) => {
                    eprintln!("screenshot written: {}", p.display());
                    if let Some(ctx) = &self.waker.0 {
                        ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    self.notify(e, true);
                    self.screenshot = None;
                }
            },
        }
    }

    /// The one place commands take effect.
    pub fn execute(&mut self, c: Command) {
        let (tx, waker) = (self.tx.clone(), self.waker.clone());
        match c {
            Command::StartTraining(request) => {
                if self.worker.is_some() {
                    self.notify("a run is already going; stop it first", true);
                    return;
                }
                let mut history = TrainHistory {
                    title: format!("run: {}", request.out().display()),
                    ..TrainHistory::default()
                };
                if let worker::TrainRequest::New { config, .. } = &request {
                    history.batch_size = config.batch_size;
                } else {
                    history.batch_size = self.settings.train.batch_size;
                }
                match TrainWorker::spawn(request, tx, waker) {
                    Ok(w) => {
                        self.worker = Some(w);
                        self.run = Some(history);
                    }
                    Err(e) => self.notify(format!("cannot start the training thread: {e}"), true),
                }
            }
            Command::StopTraining => {
                if let Some(w) = &self.worker {
                    w.stop();
                }
            }
            Command::OpenModel(path) => {
                self.pending_jobs += 1;
                worker::spawn_job("awnet-open-model", tx, waker, move || match worker::summarise(&path) {
                    Ok(m) => Event::ModelLoaded(Box::new(m)),
                    Err(e) => Event::Error(format!("cannot open the model: {e}")),
                });
            }
            Command::CloseModel(i) => {
                if i < self.models.len() {
                    self.models.remove(i);
                    self.selected =
                        (!self.models.is_empty()).then(|| self.selected.unwrap_or(0).min(self.models.len() - 1));
                }
            }
            Command::Pick(purpose) => {
                let export_dir = self.settings.export_dir.clone();
                worker::spawn_job("awnet-file-dialog", tx, waker, move || {
                    let dialog = rfd::FileDialog::new();
                    let path = match purpose {
                        PickPurpose::OpenModel | PickPurpose::TeacherClean | PickPurpose::TeacherRobust => {
                            dialog.add_filter("model", &["safetensors", "pt", "pth"]).pick_file()
                        }
                        PickPurpose::TrainOutput => dialog
                            .add_filter("model", &["safetensors"])
                            .set_file_name("run.safetensors")
                            .save_file(),
                        PickPurpose::DataFolder => dialog.pick_folder(),
                        PickPurpose::ExportFigures => match &export_dir {
                            Some(d) => dialog.set_directory(d).pick_folder(),
                            None => dialog.pick_folder(),
                        },
                        PickPurpose::AttackImage => dialog
                            .add_filter("picture", &["png", "jpg", "jpeg", "bmp", "gif", "webp"])
                            .pick_file(),
                        PickPurpose::SaveAttack => dialog
                            .add_filter("PNG", &["png"])
                            .set_file_name("adversarial.png")
                            .save_file(),
                    };
                    Event::Picked(purpose, path)
                });
            }
            Command::SetData { name, announce } => {
                self.settings.data = name.clone();
                self.data_description = None;
                self.pending_jobs += 1;
                worker::spawn_job("awnet-data", tx, waker, move || {
                    let result = crate::data::load(&name, crate::data::Split::Train, None)
                        .map(|ds| ds.describe())
                        .map_err(|e| format!("cannot use the data '{name}': {}", worker::chain(&e)));
                    Event::DataDescribed { result, announce }
                });
            }
            Command::AnalyseFilters(request) => {
                self.pending_jobs += 1;
                worker::spawn_job("awnet-filters", tx, waker, move || Event::Filters {
                    generation: request.generation,
                    result: worker::analyse_filters(&request).map(Box::new),
                });
            }
            Command::AnalyseRouter(request) => {
                // A newer question cancels the older computation.
                self.router_stop.raise();
                self.router_stop = StopFlag::default();
                let stop = self.router_stop.clone();
                self.pending_jobs += 1;
                let (tx2, waker2) = (tx.clone(), waker.clone());
                worker::spawn_job("awnet-router", tx, waker, move || {
                    worker::analyse_router(&request, tx2, waker2, stop)
                });
            }
            Command::CancelRouter => self.router_stop.raise(),
            Command::Sweep(request) => {
                self.tradeoff_stop.raise();
                self.tradeoff_stop = StopFlag::default();
                let stop = self.tradeoff_stop.clone();
                self.pending_jobs += 1;
                let (tx2, waker2) = (tx.clone(), waker.clone());
                worker::spawn_job("awnet-sweep", tx, waker, move || {
                    worker::sweep_models(&request, tx2, waker2, stop)
                });
            }
            Command::CancelSweep => self.tradeoff_stop.raise(),
            Command::Attack(job) => {
                if self.attack_worker.is_none() {
                    match AttackWorker::spawn(tx, waker) {
                        Ok(w) => self.attack_worker = Some(w),
                        Err(e) => return self.notify(format!("cannot start the attack thread: {e}"), true),
                    }
                }
                if let Some(w) = &self.attack_worker {
                    w.submit(job);
                }
            }
            Command::Notify(text) => self.notify(text, true),
            Command::Export(only) => {
                self.export_only = only;
                self.execute(Command::Pick(PickPurpose::ExportFigures));
            }
        }
    }

    /// The current tab's figures, from the same data it plots, and any tables as CSV.
    pub fn tab_figures(&self) -> (Vec<crate::export::Figure>, Vec<(String, String)>) {
        use crate::export::figures;
        let sources = serde_json::json!(self.models.iter().map(|m| m.path.clone()).collect::<Vec<_>>());
        match self.settings.tab {
            Tab::Train => {
                let history = train_history(&self.run, self.selected.and_then(|i| self.models.get(i)));
                let mut figs = train_tab::figures(&history, &self.models);
                for m in &self.models {
                    if !m.log.is_empty() {
                        figs.push(figures::training(&m.name, &m.log, serde_json::json!({"file": m.path})));
                    }
                }
                (figs, Vec::new())
            }
            Tab::Filters => match &self.filters.result {
                Some(a) => (
                    figures::filters(a, self.filters.density, sources),
                    vec![("layer-statistics.csv".into(), figures::layer_table_csv(a))],
                ),
                None => (Vec::new(), Vec::new()),
            },
            Tab::Router => match (&self.router.result, &self.router.requested) {
                (Some(a), Some(q)) => {
                    let name = router_tab::figure_stem(Some(&q.model));
                    let prov = serde_json::json!({"file": q.model, "data": q.data});
                    let mut figs = figures::router(a, &name, prov.clone());
                    if let Some(p) = a.images.get(self.router.image.min(a.images.len().saturating_sub(1))) {
                        figs.extend(figures::router_pair(p, &name, &a.attack, prov));
                    }
                    (figs, Vec::new())
                }
                _ => (Vec::new(), Vec::new()),
            },
            Tab::TradeOff => {
                let epochs = self.run.as_ref().map(|r| r.epochs.clone()).unwrap_or_default();
                let mut figs = vec![train_tab::trade_off_figure(&epochs, &self.models)];
                if !self.tradeoff.curves.is_empty() {
                    figs.push(figures::accuracy_vs_eps(&self.tradeoff.curves));
                }
                (figs, Vec::new())
            }
            Tab::AttackLab => (
                self.attack.output.as_ref().map(attack_tab::figures).unwrap_or_default(),
                Vec::new(),
            ),
        }
    }

    fn screenshot_step(&mut self, ctx: &egui::Context) {
        let Some(s) = &mut self.screenshot else { return };
        ctx.request_repaint();
        if s.requested {
            return;
        }
        // The content is computed when no job is pending; a few calm frames let layout settle.
        let ready = match self.settings.tab {
            Tab::AttackLab => self.attack.output.is_some() || self.attack.error.is_some() || self.models.is_empty(),
            _ => true,
        };
        if self.pending_jobs == 0 && self.outbox.is_empty() && ready {
            s.calm_frames += 1;
        } else {
            s.calm_frames = 0;
        }
        if s.calm_frames < 10 {
            return;
        }
        s.requested = true;
        let (path, tx, waker) = (s.path.clone(), self.tx.clone(), self.waker.clone());
        ctx.request_screenshot(move |img| {
            let [w, h] = img.size;
            let bytes: Vec<u8> = img.pixels.iter().flat_map(|c| c.to_array()).collect();
            let saved = image::RgbaImage::from_raw(w as u32, h as u32, bytes)
                .ok_or_else(|| "the screenshot has the wrong size".to_string())
                .and_then(|im| {
                    let mut png = std::io::Cursor::new(Vec::new());
                    im.write_to(&mut png, image::ImageFormat::Png)
                        .map_err(|e| format!("cannot encode the screenshot: {e}"))?;
                    crate::fsutil::write_atomic(&path, png.get_ref())
                        .map_err(|e| format!("cannot write the screenshot {}: {e}", path.display()))
                })
                .map(|()| path.clone());
            worker::send(&tx, &waker, Event::ScreenshotSaved(saved));
        });
    }
}

impl eframe::App for App {
    fn ui(&mut self, ui: &mut Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
        if self.worker.is_some() {
            ui.ctx().request_repaint_after(std::time::Duration::from_millis(250));
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, SETTINGS_KEY, &self.settings);
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        // Stops the run at its next step (it writes its checkpoint) and joins the thread.
        self.worker = None;
    }
}

/// What the Train tab shows: the run, or else the selected model's stored record.
fn train_history<'a>(run: &'a Option<TrainHistory>, selected: Option<&ModelSummary>) -> Cow<'a, TrainHistory> {
    match (run, selected) {
        (Some(r), _) => Cow::Borrowed(r),
        (None, Some(m)) => Cow::Owned(TrainHistory::from_model(m)),
        (None, None) => Cow::Owned(TrainHistory::default()),
    }
}
