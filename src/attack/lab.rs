//! One image, attacked: what the Attack lab and `awnet attack` show. The adversarial image is
//! rounded to 8 bits inside the ball, and every number after the attack is measured on those
//! 8-bit pixels, so a saved PNG reproduces exactly what was reported.

use std::time::Instant;

use candle_core::{D, DType, Device, Tensor};
use serde::Serialize;

use super::{AttackConfig, AttackError, Classifier, Threat};
use crate::observe::Outcome;

/// How a model reacts to one image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reaction {
    /// Class probabilities.
    pub probs: Vec<f64>,
    /// AW-Net: the router's p_adv, and every block's signals.
    pub p_adv: Option<f64>,
    pub signals: Vec<Vec<f64>>,
}

impl Reaction {
    pub fn predicted(&self) -> usize {
        self.probs
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i)
    }
}

/// An attack on one image and how the model (and a second one) reacted.
#[derive(Clone, Debug, Serialize)]
pub struct LabResult {
    /// The class attacked (given, or the model's clean prediction).
    pub label: u32,
    pub attack: String,
    pub settings: AttackConfig,
    pub channels: usize,
    pub side: usize,
    /// `[c, s, s]` 8-bit pixels.
    pub original: Vec<u8>,
    pub adversarial: Vec<u8>,
    pub before: Reaction,
    pub after: Reaction,
    /// A second model on the same two images (transfer).
    pub second: Option<(Reaction, Reaction)>,
    /// The attack's objective after each iteration.
    pub trace: Vec<f64>,
    /// Of the saved 8-bit perturbation.
    pub linf: f64,
    pub l2: f64,
    pub seconds: f64,
}

/// Rounds an adversarial image to 8 bits without leaving the L-inf ball around the (8-bit)
/// original, so the saved picture is still a valid attack input.
pub fn quantise(adv: &[f32], x: &[f32], eps: f64, linf: bool) -> Vec<u8> {
    adv.iter()
        .zip(x)
        .map(|(&a, &o)| {
            let mut q = (f64::from(a) * 255.0).round();
            if linf {
                let lo = ((f64::from(o) - eps) * 255.0 - 1e-6).ceil();
                let hi = ((f64::from(o) + eps) * 255.0 + 1e-6).floor();
                q = q.clamp(lo, hi);
            }
            q.clamp(0.0, 255.0) as u8
        })
        .collect()
}

fn tensor(pixels: &[u8], c: usize, s: usize) -> candle_core::Result<Tensor> {
    let x: Vec<f32> = pixels.iter().map(|&p| f32::from(p) / 255.0).collect();
    Tensor::from_vec(x, (1, c, s, s), &Device::Cpu)
}

/// The model's reaction to 8-bit pixels `[c, s, s]`.
pub fn react(model: &dyn Classifier, pixels: &[u8], c: usize, s: usize) -> Result<Reaction, AttackError> {
    let f = model.forward(&tensor(pixels, c, s)?)?;
    let probs = candle_nn::ops::softmax(&f.logits, D::Minus1)?
        .squeeze(0)?
        .to_dtype(DType::F64)?
        .to_vec1()?;
    let p_adv = match f.type_probs()? {
        Some(t) => Some(t.squeeze(0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?[1]),
        None => None,
    };
    let signals = f
        .signals
        .iter()
        .map(|s| s.squeeze(0)?.to_dtype(DType::F64)?.to_vec1())
        .collect::<candle_core::Result<_>>()?;
    Ok(Reaction { probs, p_adv, signals })
}

/// Attacks one image (`[c, s, s]` 8-bit pixels) of class `label`, or of the model's clean
/// prediction when `None`.
#[allow(clippy::too_many_arguments)]
pub fn attack_one(
    model: &dyn Classifier,
    second: Option<&dyn Classifier>,
    pixels: &[u8],
    c: usize,
    s: usize,
    label: Option<u32>,
    cfg: &AttackConfig,
    stop: &dyn Fn() -> bool,
) -> Result<Outcome<LabResult>, AttackError> {
    let started = Instant::now();
    if pixels.len() != c * s * s {
        return Err(AttackError::Settings(format!(
            "{} pixels for a {c}x{s}x{s} image",
            pixels.len()
        )));
    }
    let before = react(model, pixels, c, s)?;
    let label = label.unwrap_or(before.predicted() as u32);
    if label as usize >= before.probs.len() {
        return Err(AttackError::Settings(format!(
            "class {label} is not one of the model's"
        )));
    }
    let xs = tensor(pixels, c, s)?;
    let Outcome::Done(run) = super::run(model, &xs, &[label], cfg, stop)? else {
        return Ok(Outcome::Cancelled);
    };
    let x: Vec<f32> = xs.flatten_all()?.to_vec1()?;
    let adv: Vec<f32> = run.adv.flatten_all()?.to_vec1()?;
    let adversarial = quantise(&adv, &x, cfg.eps, cfg.threat == Threat::Linf);
    let after = react(model, &adversarial, c, s)?;
    let deltas: Vec<f64> = adversarial
        .iter()
        .zip(pixels)
        .map(|(&a, &o)| (f64::from(a) - f64::from(o)) / 255.0)
        .collect();
    let second = match second {
        Some(m) => Some((react(m, pixels, c, s)?, react(m, &adversarial, c, s)?)),
        None => None,
    };
    Ok(Outcome::Done(LabResult {
        label,
        attack: cfg.label(),
        settings: cfg.clone(),
        channels: c,
        side: s,
        original: pixels.to_vec(),
        linf: deltas.iter().fold(0.0, |m, d| m.max(d.abs())),
        l2: deltas.iter().map(|d| d * d).sum::<f64>().sqrt(),
        adversarial,
        before,
        after,
        second,
        trace: run.trace,
        seconds: started.elapsed().as_secs_f64(),
    }))
}

/// Saves the adversarial image at `png` (lossless, exactly the pixels measured), the
/// perturbation beside it as `<name>-perturbation.png` (mid-grey is zero, scaled to its largest
/// value, the scale in the JSON), and the record as `<name>.json`. Returns the three paths.
pub fn save(
    r: &LabResult,
    png: &std::path::Path,
    provenance: serde_json::Value,
) -> Result<Vec<std::path::PathBuf>, crate::data::DataError> {
    use crate::data::image::save_png;
    let stem = png.with_extension("");
    let name = stem
        .file_name()
        .map_or_else(|| "adversarial".into(), |n| n.to_string_lossy().into_owned());
    let perturbation_path = stem.with_file_name(format!("{name}-perturbation.png"));
    let json_path = stem.with_file_name(format!("{name}.json"));
    let scale = r.linf.max(1.0 / 255.0);
    let perturbation: Vec<u8> = r
        .adversarial
        .iter()
        .zip(&r.original)
        .map(|(&a, &o)| {
            ((f64::from(a) - f64::from(o)) / 255.0 / scale * 127.5 + 127.5)
                .round()
                .clamp(0.0, 255.0) as u8
        })
        .collect();
    save_png(png, &r.adversarial, r.channels, r.side, r.side)?;
    save_png(&perturbation_path, &perturbation, r.channels, r.side, r.side)?;
    let record = serde_json::json!({
        "adversarial_png": png, "perturbation_png": perturbation_path,
        "perturbation_png_scale": format!("mid-grey is 0; white is +{scale:.5}, black -{scale:.5}"),
        "result": r, "provenance": provenance, "program": concat!("awnet-lab ", env!("CARGO_PKG_VERSION")),
    });
    let text = serde_json::to_string_pretty(&record).expect("the record serialises");
    crate::fsutil::write_atomic(&json_path, text.as_bytes()).map_err(|source| crate::data::DataError::Io {
        path: json_path.clone(),
        source,
    })?;
    Ok(vec![png.to_path_buf(), perturbation_path, json_path])
}

#[cfg(test)]
mod tests {
    use super::quantise;

    #[test]
    fn quantised_images_stay_in_the_ball() {
        let x = [10.0 / 255.0, 0.0, 1.0];
        let adv = [10.0 / 255.0 + 0.1, 0.1, 0.9];
        let q = quantise(&adv, &x, 0.1, true);
        // 0.1 is 25.5/255: rounding up would leave the ball, so 25 steps it is.
        assert_eq!(q, vec![35, 25, 230]);
    }
}
