//! `awnet predict`

use std::fmt::Write as _;

use anyhow::{Result, bail};
use candle_core::{D, Device, Tensor};
use serde_json::json;

use super::{PredictArgs, open_model};
use crate::data::image;
use crate::model::{Mode, Model};

/// Top-k `(class, probability)` of one row of probabilities.
pub fn top_k(probs: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..probs.len()).collect();
    idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    idx.into_iter().take(k).map(|i| (i, probs[i])).collect()
}

fn predict_one(model: &Model, path: &std::path::Path) -> Result<serde_json::Value> {
    let c = &model.config;
    let img = image::load(path, c.in_channels, c.image_size)?;
    let pixels: Vec<f32> = img.pixels.iter().map(|&p| f32::from(p) / 255.0).collect();
    let xs = Tensor::from_vec(pixels, (1, c.in_channels, c.image_size, c.image_size), &Device::Cpu)?;
    let out = model.forward(&xs, Mode::Eval)?;
    let probs = candle_nn::ops::softmax(&out.logits, D::Minus1)?
        .squeeze(0)?
        .to_vec1::<f32>()?;
    let top: Vec<_> = top_k(&probs, 5)
        .into_iter()
        .map(|(i, p)| json!({"class": i, "name": c.class_name(i), "probability": p}))
        .collect();
    let mut v = json!({"image": path, "conversion": img.note, "top5": top});
    if let Some(tp) = out.type_probs()? {
        let tp = tp.squeeze(0)?.to_vec1::<f32>()?;
        v["type_probabilities"] = json!({"clean": tp[0], "adversarial": tp[1]});
        let mut blocks = Vec::new();
        for (j, s) in out.signals.iter().enumerate() {
            let s = s.squeeze(0)?.to_vec1::<f32>()?;
            let mean = s.iter().sum::<f32>() / s.len() as f32;
            let (min, max) = s
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
            blocks.push(json!({"block": j, "filters": s.len(), "mean": mean, "min": min, "max": max}));
        }
        v["signals"] = json!(blocks);
    }
    Ok(v)
}

pub fn run(a: &PredictArgs) -> Result<()> {
    let model = open_model(&a.model)?;
    let mut results = Vec::new();
    let mut failures = 0;
    let mut o = String::new();
    for path in &a.images {
        match predict_one(&model, path) {
            Ok(v) => results.push(v),
            Err(e) => {
                failures += 1;
                eprintln!("error: {e:#}");
            }
        }
    }
    if a.json {
        writeln!(o, "{}", serde_json::to_string_pretty(&results)?)?;
    } else {
        for v in &results {
            writeln!(o, "{}", v["image"].as_str().unwrap_or_default())?;
            if let Some(note) = v["conversion"].as_str().filter(|n| !n.is_empty()) {
                writeln!(o, "  input: {note}")?;
            }
            for t in v["top5"].as_array().into_iter().flatten() {
                writeln!(
                    o,
                    "  {:>6.2}%  {}",
                    100.0 * t["probability"].as_f64().unwrap_or(0.0),
                    t["name"].as_str().unwrap_or("")
                )?;
            }
            if let Some(tp) = v.get("type_probabilities") {
                writeln!(
                    o,
                    "  router: p(clean) {:.3}, p(adversarial) {:.3}",
                    tp["clean"].as_f64().unwrap_or(0.0),
                    tp["adversarial"].as_f64().unwrap_or(0.0)
                )?;
                for s in v["signals"].as_array().into_iter().flatten() {
                    writeln!(
                        o,
                        "  block {} signals ({} filters): mean {:.3}, min {:.3}, max {:.3}",
                        s["block"],
                        s["filters"],
                        s["mean"].as_f64().unwrap_or(0.0),
                        s["min"].as_f64().unwrap_or(0.0),
                        s["max"].as_f64().unwrap_or(0.0)
                    )?;
                }
            }
        }
    }
    super::emit(&o)?;
    if failures > 0 {
        bail!("{failures} of {} images could not be classified", a.images.len());
    }
    Ok(())
}
