//! Model files: one `.safetensors` file per model, its configuration and training record in
//! the metadata, written atomically.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{Model, ModelConfig, ModelError};
use crate::fsutil;

/// The largest model file we read; larger files are refused before reading.
pub const MAX_MODEL_BYTES: u64 = 2 << 30;

const FORMAT: &str = "awnet-lab/1";
const KEY_FORMAT: &str = "awnet.format";
const KEY_CONFIG: &str = "awnet.config";
const KEY_META: &str = "awnet.meta";
const KEY_STATE: &str = "awnet.train_state";
/// Tensors of the training state are stored under this prefix, beside the weights.
const STATE_PREFIX: &str = "optim.";

/// What a training run needs to resume, stored in the model file beside the weights: a JSON
/// document (epoch, step, loss balancing, log) and named tensors (optimizer buffers). Loading
/// a model for anything else ignores it.
#[derive(Clone, Debug, Default)]
pub struct TrainingState {
    pub json: String,
    pub tensors: BTreeMap<String, Tensor>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read {}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{msg}: {}", path.display())]
    Format { path: PathBuf, msg: String },
    #[error("the file does not fit the model ({}); {}: {}", .summary, .details.join("; "), path.display())]
    Mismatch {
        path: PathBuf,
        summary: String,
        details: Vec<String>,
    },
    #[error("cannot build the model described by {}", path.display())]
    Model { path: PathBuf, source: ModelError },
}

impl CheckpointError {
    fn format(path: &Path, msg: impl Into<String>) -> Self {
        Self::Format {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}

/// Training record and measured metrics stored with a model; free-form JSON so that later
/// training and evaluation code can add fields without a format change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// Training method and settings, or `None` for an untrained or imported model.
    #[serde(default)]
    pub training: Option<serde_json::Value>,
    /// Summary of the training log (per-epoch metrics).
    #[serde(default)]
    pub log_summary: Option<serde_json::Value>,
    /// Metrics measured on the model, each with its label and settings.
    #[serde(default)]
    pub metrics: Option<serde_json::Value>,
    /// Where the weights came from when not trained here (an imported file, say).
    #[serde(default)]
    pub origin: Option<String>,
    /// Program name and version that wrote the file.
    #[serde(default)]
    pub written_by: String,
    /// The file this model was loaded from, and its SHA-256; not stored in the file.
    #[serde(skip)]
    pub file: Option<(PathBuf, String)>,
}

/// Saves `model` to `path` atomically, weights as f32.
pub fn save(model: &Model, path: &Path) -> Result<(), CheckpointError> {
    save_with_state(model, None, path)
}

/// Saves `model` and, for a run that may resume, its training state, atomically.
pub fn save_with_state(model: &Model, state: Option<&TrainingState>, path: &Path) -> Result<(), CheckpointError> {
    let bytes = serialize(model, state).map_err(|source| CheckpointError::Model {
        path: path.to_path_buf(),
        source,
    })?;
    fsutil::write_atomic(path, &bytes).map_err(|source| CheckpointError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn serialize(model: &Model, state: Option<&TrainingState>) -> Result<Vec<u8>, ModelError> {
    let mut tensors = Vec::new();
    let named = model.named_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone()));
    let extra = state
        .into_iter()
        .flat_map(|s| s.tensors.iter().map(|(n, t)| (format!("{STATE_PREFIX}{n}"), t.clone())));
    for (name, tensor) in named.chain(extra) {
        let t = tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((name, tensor.dims().to_vec(), bytes));
    }
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map_err(|e| ModelError::Config(format!("tensor {name}: {e}")))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>, ModelError>>()?;
    let mut meta = model.meta.clone();
    meta.written_by = format!("awnet-lab {}", env!("CARGO_PKG_VERSION"));
    let mut header: HashMap<String, String> = HashMap::from([
        (KEY_FORMAT.to_string(), FORMAT.to_string()),
        (
            KEY_CONFIG.to_string(),
            serde_json::to_string(&model.config).expect("config serialises"),
        ),
        (
            KEY_META.to_string(),
            serde_json::to_string(&meta).expect("meta serialises"),
        ),
    ]);
    if let Some(state) = state {
        header.insert(KEY_STATE.to_string(), state.json.clone());
    }
    safetensors::serialize(views, Some(header)).map_err(|e| ModelError::Config(e.to_string()))
}

/// Reads a whole file, refusing files larger than `limit` before reading them.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, CheckpointError> {
    let read_err = |source| CheckpointError::Read {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > limit {
        return Err(CheckpointError::format(
            path,
            format!("file of {len} bytes is larger than the {limit} bytes allowed"),
        ));
    }
    std::fs::read(path).map_err(read_err)
}

/// Loads a model file written by [`save`]. A safetensors file without our metadata is taken as a
/// state dict of a static CIFAR ResNet-18 (see [`super::pytorch`]).
pub fn load(path: &Path) -> Result<Model, CheckpointError> {
    load_with_state(path).map(|(model, _)| model)
}

/// Batch norm's step counter, the one integer tensor a PyTorch state dict holds (and we ignore).
pub(crate) fn is_counter(name: &str) -> bool {
    name.ends_with("num_batches_tracked")
}

/// Loads a model file and the training state stored in it, if any.
pub fn load_with_state(path: &Path) -> Result<(Model, Option<TrainingState>), CheckpointError> {
    let bytes = read_limited(path, MAX_MODEL_BYTES)?;
    if bytes.is_empty() {
        return Err(CheckpointError::format(path, "empty file"));
    }
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| CheckpointError::format(path, format!("not a valid safetensors file ({e})")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| CheckpointError::format(path, format!("not a valid safetensors file ({e})")))?;
    let meta_map = header.metadata().clone().unwrap_or_default();
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        use safetensors::Dtype;
        if !matches!(view.dtype(), Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64) && !is_counter(&name) {
            return Err(CheckpointError::format(
                path,
                format!(
                    "tensor {name} holds {:?} values; weights must be floating point",
                    view.dtype()
                ),
            ));
        }
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| CheckpointError::format(path, format!("tensor {name}: {e}")))?;
        tensors.insert(name, t);
    }
    let state_tensors: BTreeMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(n, t)| n.strip_prefix(STATE_PREFIX).map(|k| (k.to_string(), t.clone())))
        .collect();
    tensors.retain(|n, _| !n.starts_with(STATE_PREFIX));
    let state = meta_map.get(KEY_STATE).map(|json| TrainingState {
        json: json.clone(),
        tensors: state_tensors,
    });
    let hash = fsutil::sha256_hex(&bytes);
    let mut model = match meta_map.get(KEY_CONFIG) {
        None => super::pytorch::model_from_state_dict(tensors, path, None)?,
        Some(config) => {
            match meta_map.get(KEY_FORMAT) {
                Some(f) if f == FORMAT => {}
                other => {
                    return Err(CheckpointError::format(
                        path,
                        format!("unknown model file format {other:?} (this program reads {FORMAT})"),
                    ));
                }
            }
            let config: ModelConfig = serde_json::from_str(config)
                .map_err(|e| CheckpointError::format(path, format!("unreadable model configuration ({e})")))?;
            let meta: ModelMeta = match meta_map.get(KEY_META) {
                Some(m) => serde_json::from_str(m)
                    .map_err(|e| CheckpointError::format(path, format!("unreadable model record ({e})")))?,
                None => ModelMeta::default(),
            };
            let mut model =
                Model::new(config, 0, DType::F32, &Device::Cpu).map_err(|source| CheckpointError::Model {
                    path: path.to_path_buf(),
                    source,
                })?;
            assign(&model, tensors, path, &|_| false)?;
            model.meta = meta;
            model
        }
    };
    model.meta.file = Some((path.to_path_buf(), hash));
    Ok((model, state))
}

/// Copies named tensors into the model's variables. Every variable must be present with its
/// shape and finite values, and every tensor must be used unless `ignore` says so; otherwise the
/// error names each missing, unexpected, mis-shaped and non-finite tensor.
pub fn assign(
    model: &Model,
    mut tensors: BTreeMap<String, Tensor>,
    path: &Path,
    ignore: &dyn Fn(&str) -> bool,
) -> Result<(), CheckpointError> {
    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    let mut non_finite = Vec::new();
    let mut ready = Vec::new();
    for (name, var) in model.named_vars() {
        match tensors.remove(&name) {
            None => missing.push(name),
            Some(t) if t.dims() != var.dims() => {
                misshaped.push(format!("{name} is {:?}, the model has {:?}", t.dims(), var.dims()))
            }
            Some(t) => {
                let values = t
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| CheckpointError::format(path, format!("tensor {name}: {e}")))?;
                if values.iter().any(|v| !v.is_finite()) {
                    non_finite.push(name);
                } else {
                    ready.push((var, t));
                }
            }
        }
    }
    let unexpected: Vec<String> = tensors.into_keys().filter(|k| !ignore(k)).collect();
    let mut details = Vec::new();
    let mut push = |what: &str, list: &[String]| {
        if !list.is_empty() {
            details.push(format!("{what}: {}", list.join(", ")));
        }
    };
    push("missing", &missing);
    push("unexpected", &unexpected);
    push("wrong shape", &misshaped);
    push("NaN or infinite values", &non_finite);
    if !details.is_empty() {
        let summary = format!(
            "{} missing, {} unexpected, {} of the wrong shape, {} not finite",
            missing.len(),
            unexpected.len(),
            misshaped.len(),
            non_finite.len()
        );
        return Err(CheckpointError::Mismatch {
            path: path.to_path_buf(),
            summary,
            details,
        });
    }
    for (var, t) in ready {
        var.set(
            &t.to_dtype(var.dtype())
                .map_err(|e| CheckpointError::format(path, e.to_string()))?,
        )
        .map_err(|e| CheckpointError::format(path, e.to_string()))?;
    }
    Ok(())
}

/// Opens any model file this program reads: its own `.safetensors`, or a PyTorch state dict
/// (`.pt`/`.pth`) of a CIFAR ResNet-18, imported as a static model.
pub fn open(path: &Path) -> Result<Model, CheckpointError> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("pt" | "pth") => super::pytorch::import_pth(path, None),
        Some("safetensors") => load(path),
        _ => Err(CheckpointError::format(
            path,
            "unknown model file type (expected .safetensors, .pt or .pth)",
        )),
    }
}
