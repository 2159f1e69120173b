//! Everything a run needs before its first step: the data (less the held-out part), a fresh or
//! restored model, the teachers. The command line and the window both start runs through here.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::{EpochReport, Result, Run, TrainConfig, TrainError, TrainObserver, split_holdout, train};
use crate::data::{self, Dataset, Split};
use crate::model::{Arch, Model, ModelConfig, Network, RouterConfig, TrainingState, checkpoint};
use crate::observe::Outcome;

/// A run ready to start: call [`Prepared::train`].
pub struct Prepared {
    pub model: Model,
    pub config: TrainConfig,
    pub resume: Option<TrainingState>,
    pub train: Dataset,
    pub held_out: Dataset,
    /// (clean, robust), frozen.
    pub teachers: Option<(Network, Network)>,
    pub out: PathBuf,
    /// Where the training images came from, for the user.
    pub data_description: String,
}

/// A new run of `config` on a freshly initialised `arch` (base width `width`, or its default),
/// shaped by the dataset's images and classes.
/// A new run of `config` on a fresh model; `width` and `router` replace the architecture's
/// defaults where given.
pub fn new_run(
    config: TrainConfig,
    arch: Arch,
    width: Option<usize>,
    router: Option<RouterConfig>,
    out: &Path,
    device: &Device,
) -> Result<Prepared> {
    let ds = data::load(&config.data, Split::Test, None)?;
    let mut mc = ModelConfig::new(
        arch,
        config.method.model_kind(),
        ds.channels,
        ds.height,
        ds.num_classes(),
    );
    mc.class_names = ds.class_names.clone();
    if let Some(w) = width {
        mc.width = w;
    }
    if let Some(r) = router {
        mc.router = r;
    }
    let model = Model::new(mc, config.seed, DType::F32, device)?;
    prepare(model, config, None, out)
}

/// Continues the run stored in `out`, with its own settings; `epochs` may extend it.
pub fn resume_run(out: &Path, epochs: Option<usize>, device: &Device) -> Result<Prepared> {
    if !out.is_file() {
        return Err(TrainError::Resume(format!("{} does not exist yet", out.display())));
    }
    let (model, state) = checkpoint::load_with_state(out)?;
    let model = model.into_device(device)?;
    let mut state = state.ok_or_else(|| {
        TrainError::Resume(format!(
            "{} holds no training state to resume (a finished or imported model?)",
            out.display()
        ))
    })?;
    for t in state.tensors.values_mut() {
        *t = t.to_device(device)?;
    }
    let training = model
        .meta
        .training
        .clone()
        .ok_or_else(|| TrainError::Resume(format!("{} records no training settings", out.display())))?;
    let mut config: TrainConfig = serde_json::from_value(training)
        .map_err(|e| TrainError::Resume(format!("unreadable training settings in {} ({e})", out.display())))?;
    if let Some(e) = epochs {
        config.epochs = e;
    }
    prepare(model, config, Some(state), out)
}

fn prepare(model: Model, config: TrainConfig, resume: Option<TrainingState>, out: &Path) -> Result<Prepared> {
    let full = data::load(
        &config.data,
        Split::Train,
        Some((model.config.in_channels, model.config.image_size)),
    )?;
    let (train_part, held_out) = split_holdout(&full, config.holdout)?;
    let clean = teacher(config.teacher_clean.as_deref(), &model)?;
    let robust = teacher(config.teacher_robust.as_deref(), &model)?;
    Ok(Prepared {
        model,
        teachers: clean.zip(robust),
        resume,
        train: train_part,
        held_out,
        out: out.to_path_buf(),
        data_description: full.describe(),
        config,
    })
}

/// A teacher for distillation, frozen, on the student's device.
fn teacher(path: Option<&str>, student: &Model) -> Result<Option<Network>> {
    let Some(p) = path else { return Ok(None) };
    let m = checkpoint::open(Path::new(p))?;
    let shape = |c: &ModelConfig| (c.in_channels, c.image_size, c.num_classes);
    if shape(&m.config) != shape(&student.config) {
        return Err(TrainError::Settings(format!(
            "teacher {p} takes {:?} (channels, side, classes); the student {:?}",
            shape(&m.config),
            shape(&student.config)
        )));
    }
    Ok(Some(m.into_device(&student.device())?.frozen()?))
}

impl Prepared {
    /// Runs the loop; the model file at `out` is rewritten at every epoch end and on stop.
    pub fn train(&mut self, obs: &mut dyn TrainObserver) -> Result<Outcome<Vec<EpochReport>>> {
        let run = Run {
            config: self.config.clone(),
            train: &self.train,
            monitor: &self.held_out,
            teachers: self.teachers.as_ref().map(|(c, r)| (c, r)),
            out: self.out.clone(),
        };
        train(&mut self.model, &run, self.resume.take(), obs)
    }
}
