//! Import of PyTorch state dicts (`torch.save(model.state_dict(), path)`, zip format) for the
//! static CIFAR ResNet-18.
//!
//! Accepted key names: the common CIFAR code's (`conv1`, `bn1`, `layer1.0.conv1`,
//! `layer2.0.shortcut.0`, `linear`), torchvision-style `downsample` and `fc`, an optional
//! `module.` prefix (DataParallel), and the dict nested under `state_dict` or
//! `model_state_dict`. `num_batches_tracked` entries are ignored.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::checkpoint::{CheckpointError, MAX_MODEL_BYTES, assign};
use super::{Arch, Model, ModelConfig, ModelKind};

const NESTED_KEYS: [&str; 2] = ["state_dict", "model_state_dict"];

/// Imports a `.pt`/`.pth` state dict as a static ResNet-18 for `image_size` inputs (32 when
/// `None`).
pub fn import_pth(path: &Path, image_size: Option<usize>) -> Result<Model, CheckpointError> {
    let fail = |msg: String| CheckpointError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let bytes = super::checkpoint::read_limited(path, MAX_MODEL_BYTES)?;
    match bytes.as_slice() {
        [] => return Err(fail("empty file".into())),
        [b'P', b'K', 3, 4, ..] => {}
        [0x80, ..] => {
            return Err(fail(
                "legacy (non-zip) PyTorch file; load it in PyTorch and save it again with \
                 torch.save(model.state_dict(), path) (PyTorch 1.6 or newer writes the zip format)"
                    .into(),
            ));
        }
        _ => return Err(fail("not a PyTorch file (no zip archive inside)".into())),
    }
    let file_len = bytes.len();
    drop(bytes);
    let tensors = guarded(|| read_state_dict(path, file_len))
        .map_err(|e| fail(format!("cannot read the PyTorch file ({e})")))??;
    let hash = crate::fsutil::sha256_hex(&std::fs::read(path).map_err(|source| CheckpointError::Read {
        path: path.to_path_buf(),
        source,
    })?);
    let mut model = model_from_state_dict(tensors, path, image_size)?;
    model.meta.origin = Some(format!("imported from PyTorch state dict {}", path.display()));
    model.meta.file = Some((path.to_path_buf(), hash));
    Ok(model)
}

thread_local! {
    /// Set while a guarded reader runs on this thread: its panics are errors, not crashes, so
    /// the panic hook stays quiet about them.
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Candle's pickle reader can panic on malformed input; a panic there becomes an error here.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static QUIET_HOOK: std::sync::Once = std::sync::Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(|g| g.get()) {
                previous(info);
            }
        }));
    });
    GUARDED.with(|g| g.set(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(false));
    result.map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .map_or_else(|| "the reader panicked".into(), |m| format!("the reader panicked: {m}"))
    })
}

fn read_state_dict(path: &Path, file_len: usize) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    let fail = |msg: String| CheckpointError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let mut pth = None;
    for key in std::iter::once(None).chain(NESTED_KEYS.iter().map(|k| Some(*k))) {
        match candle_core::pickle::PthTensors::new(path, key) {
            Ok(p) if !p.tensor_infos().is_empty() => {
                pth = Some(p);
                break;
            }
            Ok(_) => {}
            Err(e) if key.is_none() => return Err(fail(format!("cannot read the PyTorch file ({e})"))),
            Err(_) => {}
        }
    }
    let pth = pth.ok_or_else(|| {
        fail(
            "no tensors at the top level or under 'state_dict': the file may hold a pickled whole \
             module; save model.state_dict() instead"
                .into(),
        )
    })?;
    let mut out = BTreeMap::new();
    for (name, info) in pth.tensor_infos() {
        // A header can claim any shape; refuse what the file cannot hold before allocating.
        let claimed = info
            .layout
            .shape()
            .elem_count()
            .saturating_mul(info.dtype.size_in_bytes());
        if !info.dtype.is_float() && !super::checkpoint::is_counter(name) {
            return Err(fail(format!(
                "tensor {name} holds {:?} values; weights must be floating point",
                info.dtype
            )));
        }
        if claimed > file_len {
            return Err(fail(format!(
                "tensor {name} claims {claimed} bytes, more than the file's {file_len}"
            )));
        }
        let t = pth
            .get(name)
            .map_err(|e| fail(format!("tensor {name}: {e}")))?
            .ok_or_else(|| fail(format!("tensor {name} vanished while reading")))?;
        let t = t
            .to_dtype(DType::F32)
            .map_err(|e| fail(format!("tensor {name}: {e}")))?;
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// Maps the usual PyTorch names onto ours.
fn canonical_name(name: &str) -> String {
    let name = name.strip_prefix("module.").unwrap_or(name);
    let name = name.replace(".downsample.", ".shortcut.");
    match name.strip_prefix("fc.") {
        Some(rest) => format!("linear.{rest}"),
        None => name,
    }
}

/// Builds a static ResNet-18 from a state dict, inferring input channels, width and classes
/// from `conv1` and `linear`.
pub fn model_from_state_dict(
    tensors: BTreeMap<String, Tensor>,
    path: &Path,
    image_size: Option<usize>,
) -> Result<Model, CheckpointError> {
    let fail = |msg: String| CheckpointError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let tensors: BTreeMap<String, Tensor> = tensors.into_iter().map(|(k, v)| (canonical_name(&k), v)).collect();
    let conv1 = tensors
        .get("conv1.weight")
        .ok_or_else(|| fail("no conv1.weight: not a ResNet-18 state dict (and no AW-Net Lab configuration)".into()))?;
    let (width, in_channels, k) = match conv1.dims() {
        &[w, c, k, k2] if k == k2 => (w, c, k),
        d => {
            return Err(fail(format!(
                "conv1.weight has shape {d:?}, not [width, channels, k, k]"
            )));
        }
    };
    if k != 3 {
        return Err(fail(format!(
            "conv1 is {k}x{k}: an ImageNet-style ResNet-18; only the CIFAR ResNet-18 (3x3 stem) is supported"
        )));
    }
    let num_classes = match tensors.get("linear.weight").map(|t| t.dims().to_vec()) {
        Some(d) if d.len() == 2 => d[0],
        Some(d) => return Err(fail(format!("linear.weight has shape {d:?}, not [classes, features]"))),
        None => return Err(fail("no linear.weight or fc.weight".into())),
    };
    let mut config = ModelConfig::new(
        Arch::Resnet18,
        ModelKind::Static,
        in_channels,
        image_size.unwrap_or(32),
        num_classes,
    );
    config.width = width;
    let model = Model::new(config, 0, DType::F32, &Device::Cpu).map_err(|source| CheckpointError::Model {
        path: path.to_path_buf(),
        source,
    })?;
    assign(&model, tensors, path, &|k| k.ends_with("num_batches_tracked"))?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::canonical_name;

    #[test]
    fn usual_pytorch_names_map_onto_ours() {
        assert_eq!(
            canonical_name("module.layer2.0.downsample.1.weight"),
            "layer2.0.shortcut.1.weight"
        );
        assert_eq!(canonical_name("fc.bias"), "linear.bias");
        assert_eq!(canonical_name("layer1.0.conv1.weight"), "layer1.0.conv1.weight");
    }
}
