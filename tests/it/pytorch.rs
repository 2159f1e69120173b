//! PyTorch state dicts load and give the logits PyTorch gave (fixtures made by
//! tests/fixtures/make_resnet18_fixture.py with PyTorch 2.15).

use awnet_lab::model::{Mode, ModelKind, pytorch};
use candle_core::{Device, Tensor};

use crate::common::*;

fn reference() -> (Tensor, Vec<f64>) {
    let text = std::fs::read_to_string(fixture("resnet18_w4_logits.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let shape: Vec<usize> = serde_json::from_value(v["input_shape"].clone()).unwrap();
    let input: Vec<f32> = serde_json::from_value(v["input"].clone()).unwrap();
    let logits: Vec<Vec<f64>> = serde_json::from_value(v["logits"].clone()).unwrap();
    (Tensor::from_vec(input, shape, &Device::Cpu).unwrap(), logits.concat())
}

#[test]
fn state_dicts_load_and_give_pytorchs_logits() {
    let (xs, expected) = reference();
    for file in ["resnet18_w4.pth", "resnet18_w4_nested.pth"] {
        let model = pytorch::import_pth(&fixture(file), Some(16)).unwrap();
        assert_eq!(model.config.kind, ModelKind::Static);
        assert_eq!(
            (model.config.width, model.config.in_channels, model.config.num_classes),
            (4, 3, 10)
        );
        let logits = to_vec(&model.forward(&xs, Mode::Eval).unwrap().logits);
        assert_close(&logits, &expected, 1e-4, file);
        assert!(model.meta.origin.as_deref().unwrap().contains("imported"));
    }
}

#[test]
fn legacy_files_and_whole_modules_get_a_clear_message() {
    let err = pytorch::import_pth(&fixture("resnet18_w4_legacy.pth"), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("legacy") && err.contains("torch.save(model.state_dict()"),
        "{err}"
    );
    let err = pytorch::import_pth(&fixture("resnet18_w4_module.pth"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("whole module") && err.contains("state_dict()"), "{err}");
}

#[test]
fn import_then_save_then_load_keeps_the_logits() {
    let (xs, expected) = reference();
    let model = pytorch::import_pth(&fixture("resnet18_w4.pth"), Some(16)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.safetensors");
    awnet_lab::model::checkpoint::save(&model, &path).unwrap();
    let back = awnet_lab::model::checkpoint::load(&path).unwrap();
    assert_eq!(back.meta.origin, model.meta.origin);
    assert_close(
        &to_vec(&back.forward(&xs, Mode::Eval).unwrap().logits),
        &expected,
        1e-4,
        "after round trip",
    );
}

#[test]
fn missing_unexpected_and_misshaped_keys_are_named() {
    use std::collections::BTreeMap;
    let model = pytorch::import_pth(&fixture("resnet18_w4.pth"), Some(16)).unwrap();
    let mut sd: BTreeMap<String, Tensor> = model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    sd.remove("layer3.1.bn2.running_var");
    sd.insert(
        "layer9.0.conv1.weight".into(),
        Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    sd.insert(
        "layer1.0.conv2.weight".into(),
        Tensor::zeros((4, 4, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let err = pytorch::model_from_state_dict(sd, std::path::Path::new("sd.pth"), Some(16))
        .unwrap_err()
        .to_string();
    for needle in [
        "missing: layer3.1.bn2.running_var",
        "unexpected: layer9.0.conv1.weight",
        "layer1.0.conv2.weight is [4, 4, 1, 1]",
    ] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }
}
