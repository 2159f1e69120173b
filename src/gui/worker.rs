//! Work off the UI thread: training runs, model loading, file dialogs. Workers send plain
//! [`Event`] values over one channel; the window sends commands and a stop flag travels back.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::Duration;

use candle_core::Device;

use crate::model::{Arch, checkpoint};
use crate::observe::{Observer, Outcome, Progress, StopFlag};
use crate::train::{self, EpochReport, TrainConfig, TrainEvent, TrainObserver};

/// What a worker tells the window.
#[derive(Debug)]
pub enum Event {
    Train(TrainEvent),
    Progress(Progress),
    /// The run ended: finished, or stopped with its checkpoint written.
    TrainEnded {
        out: PathBuf,
        cancelled: bool,
    },
    ModelLoaded(Box<ModelSummary>),
    /// The dataset in use, described, or why it cannot be used (see `Command::SetData`).
    DataDescribed {
        result: Result<String, String>,
        announce: bool,
    },
    /// The run failed (or its thread panicked); the message carries the cause chain.
    TrainFailed(String),
    /// A background job failed; the message carries the cause chain.
    Error(String),
    /// A file dialog closed: what it was for, and the file picked (if any).
    Picked(PickPurpose, Option<PathBuf>),
    ScreenshotSaved(Result<PathBuf, String>),
    /// The Attack lab's job `generation`; `None` when a newer job replaced it mid-attack.
    Attack {
        generation: u64,
        result: Result<Option<Box<super::attack_tab::AttackOutput>>, String>,
    },
    /// Something worth telling the user that is not an error (a file saved, say).
    Notice(String),
    /// How far a long analysis (Router, Trade-off) of request `generation` has got.
    JobProgress {
        job: Job,
        generation: u64,
        progress: Progress,
    },
    /// Accuracy against eps for the open models, for request `generation`; `None` if cancelled.
    TradeOff {
        generation: u64,
        result: Result<Option<Vec<crate::analysis::tradeoff::Curve>>, String>,
    },
    /// The Router analysis of request `generation`; `None` when it was cancelled.
    Router {
        generation: u64,
        result: Result<Option<Box<crate::analysis::router::RouterAnalysis>>, String>,
    },
    /// A Filters analysis for request `generation`.
    Filters {
        generation: u64,
        result: Result<Box<crate::analysis::filters::FiltersAnalysis>, String>,
    },
}

/// The long analyses that report progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    Router,
    TradeOff,
}

/// What a file dialog was opened for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PickPurpose {
    OpenModel,
    TeacherClean,
    TeacherRobust,
    TrainOutput,
    DataFolder,
    AttackImage,
    SaveAttack,
    /// A folder for the current tab's figures.
    ExportFigures,
}

/// The window's view of an open model: numbers and text, no tensors.
#[derive(Clone, Debug)]
pub struct ModelSummary {
    pub path: PathBuf,
    pub name: String,
    pub description: String,
    pub parameters: usize,
    pub is_awnet: bool,
    /// The per-epoch training record stored in the file (held-out metrics).
    pub log: Vec<EpochReport>,
}

impl ModelSummary {
    /// The latest (clean, robust) accuracy the file records, with the robust number's label.
    pub fn trade_off_point(&self) -> Option<(f64, f64, &str)> {
        self.log
            .last()
            .map(|r| (r.clean_accuracy, r.robust_accuracy, r.robust_label.as_str()))
    }
}

/// Loads a model file and summarises it; the error names the file and the problem.
pub fn summarise(path: &Path) -> Result<ModelSummary, String> {
    let model = checkpoint::open(path).map_err(|e| chain(&e))?;
    let c = &model.config;
    let log = model
        .meta
        .log_summary
        .clone()
        .and_then(|v| serde_json::from_value::<Vec<EpochReport>>(v).ok())
        .unwrap_or_default();
    let method = model
        .meta
        .training
        .as_ref()
        .and_then(|t| t.get("method"))
        .and_then(|m| m.as_str())
        .unwrap_or("untrained or imported");
    Ok(ModelSummary {
        name: path
            .file_stem()
            .map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned()),
        description: format!(
            "{} {} ({}), {}x{}x{} in, {} classes, trained by {method}",
            c.arch.name(),
            c.kind.name(),
            c.width,
            c.in_channels,
            c.image_size,
            c.image_size,
            c.num_classes
        ),
        parameters: model.num_parameters(),
        is_awnet: model.net.is_awnet(),
        log,
        path: path.to_path_buf(),
    })
}

/// An error with its causes, one per line after the first.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!("\n  caused by: {c}"));
        cause = c.source();
    }
    s
}

/// Wakes the window after an event, at most every 50 ms.
#[derive(Clone)]
pub struct Waker(pub Option<egui::Context>);

impl Waker {
    pub fn wake(&self) {
        if let Some(ctx) = &self.0 {
            ctx.request_repaint_after(Duration::from_millis(50));
        }
    }
}

/// Sends an event and wakes the window; a closed window is no error for a worker.
pub fn send(tx: &Sender<Event>, waker: &Waker, event: Event) {
    let _ = tx.send(event);
    waker.wake();
}

/// Runs `job` on a named thread that sends its result as an event.
pub fn spawn_job(name: &str, tx: Sender<Event>, waker: Waker, job: impl FnOnce() -> Event + Send + 'static) {
    let fallback = tx.clone();
    let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
        let event = std::panic::catch_unwind(AssertUnwindSafe(job))
            .unwrap_or_else(|p| Event::Error(format!("a background job failed: {}", panic_text(&p))));
        send(&tx, &waker, event);
    });
    if let Err(e) = spawned {
        let _ = fallback.send(Event::Error(format!("cannot start a worker thread: {e}")));
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// What the Train tab asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum TrainRequest {
    New {
        config: Box<TrainConfig>,
        arch: Arch,
        out: PathBuf,
    },
    Resume {
        out: PathBuf,
        epochs: Option<usize>,
    },
}

impl TrainRequest {
    pub fn out(&self) -> &Path {
        match self {
            Self::New { out, .. } | Self::Resume { out, .. } => out,
        }
    }
}

/// The training thread. Dropping the handle stops the run (it writes its checkpoint) and joins.
pub struct TrainWorker {
    stop: StopFlag,
    handle: Option<JoinHandle<()>>,
}

struct Forward {
    tx: Sender<Event>,
    waker: Waker,
    stop: StopFlag,
}

impl Observer for Forward {
    fn progress(&mut self, p: &Progress) {
        send(&self.tx, &self.waker, Event::Progress(p.clone()));
    }

    fn stop_requested(&self) -> bool {
        self.stop.is_raised()
    }
}

impl TrainObserver for Forward {
    fn event(&mut self, e: &TrainEvent) {
        send(&self.tx, &self.waker, Event::Train(e.clone()));
    }
}

impl TrainWorker {
    pub fn spawn(request: TrainRequest, tx: Sender<Event>, waker: Waker) -> std::io::Result<Self> {
        let stop = StopFlag::default();
        let mut obs = Forward {
            tx: tx.clone(),
            waker: waker.clone(),
            stop: stop.clone(),
        };
        let handle = std::thread::Builder::new().name("awnet-train".into()).spawn(move || {
            let out = request.out().to_path_buf();
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let mut prepared = match request {
                    TrainRequest::New { config, arch, out } => {
                        train::setup::new_run(*config, arch, None, None, &out, &Device::Cpu)
                    }
                    TrainRequest::Resume { out, epochs } => train::setup::resume_run(&out, epochs, &Device::Cpu),
                }?;
                prepared.train(&mut obs)
            }));
            let event = match run {
                Ok(Ok(Outcome::Done(_))) => Event::TrainEnded { out, cancelled: false },
                Ok(Ok(Outcome::Cancelled)) => Event::TrainEnded { out, cancelled: true },
                Ok(Err(e)) => Event::TrainFailed(format!("training stopped: {}", chain(&e))),
                Err(p) => Event::TrainFailed(format!("the training worker panicked: {}", panic_text(&p))),
            };
            send(&tx, &waker, event);
        })?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Asks the run to stop at its next step; it writes a checkpoint first.
    pub fn stop(&self) {
        self.stop.raise();
    }

    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for TrainWorker {
    fn drop(&mut self) {
        self.stop.raise();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Loads the models of a Filters request and analyses them.
pub fn analyse_filters(
    r: &super::filters_tab::FiltersRequest,
) -> Result<crate::analysis::filters::FiltersAnalysis, String> {
    use crate::analysis::filters;
    let mut models = Vec::new();
    for p in &r.models {
        let m = checkpoint::open(p).map_err(|e| chain(&e))?;
        let name = p
            .file_stem()
            .map_or_else(|| p.display().to_string(), |s| s.to_string_lossy().into_owned());
        let weights =
            filters::layer_weights(&m).map_err(|e| format!("cannot read the weights of {}: {e}", p.display()))?;
        models.push((name, weights));
    }
    Ok(filters::analyse(&models, &r.layer, r.bins, r.near_zero))
}

struct JobObserver {
    job: Job,
    tx: Sender<Event>,
    waker: Waker,
    stop: StopFlag,
    generation: u64,
}

impl Observer for JobObserver {
    fn progress(&mut self, p: &Progress) {
        send(
            &self.tx,
            &self.waker,
            Event::JobProgress {
                job: self.job,
                generation: self.generation,
                progress: p.clone(),
            },
        );
    }

    fn stop_requested(&self) -> bool {
        self.stop.is_raised()
    }
}

/// Loads the model and the test images of a Router request, attacks them and analyses the
/// router; progress goes out as events, `stop` cancels.
pub fn analyse_router(r: &super::router_tab::RouterRequest, tx: Sender<Event>, waker: Waker, stop: StopFlag) -> Event {
    let generation = r.generation;
    let result = (|| -> Result<Option<Box<crate::analysis::router::RouterAnalysis>>, String> {
        let m = checkpoint::open(&r.model).map_err(|e| chain(&e))?;
        let net = m.frozen().map_err(|e| chain(&e))?;
        let ds = crate::data::load(
            &r.data,
            crate::data::Split::Test,
            Some((m.config.in_channels, m.config.image_size)),
        )
        .map_err(|e| chain(&e))?;
        let mut obs = JobObserver {
            job: Job::Router,
            tx,
            waker,
            stop,
            generation,
        };
        match crate::analysis::router::analyse(&net, &ds, r.n, &r.attack, 32, &mut obs).map_err(|e| chain(&e))? {
            Outcome::Done(a) => Ok(Some(Box::new(a))),
            Outcome::Cancelled => Ok(None),
        }
    })();
    Event::Router { generation, result }
}

/// Sweeps eps for every model of a Trade-off request.
pub fn sweep_models(r: &super::tradeoff_tab::SweepRequest, tx: Sender<Event>, waker: Waker, stop: StopFlag) -> Event {
    let generation = r.generation;
    let mut obs = JobObserver {
        job: Job::TradeOff,
        tx,
        waker,
        stop,
        generation,
    };
    let mut curves = Vec::new();
    let result = (|| -> Result<Option<Vec<crate::analysis::tradeoff::Curve>>, String> {
        for p in &r.models {
            let m = checkpoint::open(p).map_err(|e| chain(&e))?;
            let ds = crate::data::load(
                &r.data,
                crate::data::Split::Test,
                Some((m.config.in_channels, m.config.image_size)),
            )
            .map_err(|e| chain(&e))?;
            match crate::analysis::tradeoff::sweep_model(&m, &ds, r.n, &r.attack, &r.eps, &mut obs)
                .map_err(|e| chain(&e))?
            {
                Outcome::Done(c) => curves.push(c),
                Outcome::Cancelled => return Ok(None),
            }
        }
        Ok(Some(curves))
    })();
    Event::TradeOff { generation, result }
}
