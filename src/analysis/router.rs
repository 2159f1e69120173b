//! The Router view's numbers: for N images and their adversarial twins, the type head's
//! p_adv, its ROC, and every block's signals for clean vs adversarial inputs.

use candle_core::{D, Device, Tensor};
use serde::Serialize;

use super::stats::Histogram;
use crate::attack::{self, AttackConfig, AttackError};
use crate::data::Dataset;
use crate::eval::roc::roc;
use crate::model::Network;
use crate::observe::{Observer, Outcome, Progress};

/// One block's signals over the images.
#[derive(Clone, Debug, Serialize)]
pub struct BlockSignals {
    pub block: usize,
    /// Every signal value (all filters, all images), on shared bins.
    pub hist_clean: Histogram,
    pub hist_adv: Histogram,
    /// Mean signal of each filter over the images.
    pub filter_mean_clean: Vec<f64>,
    pub filter_mean_adv: Vec<f64>,
}

impl BlockSignals {
    /// Mean signal difference per filter, adversarial minus clean.
    pub fn filter_difference(&self) -> Vec<f64> {
        self.filter_mean_adv
            .iter()
            .zip(&self.filter_mean_clean)
            .map(|(a, c)| a - c)
            .collect()
    }
}

/// The effective filters `W * omega` of one weight-varied convolution for one image pair.
#[derive(Clone, Debug, Serialize)]
pub struct EffectiveWeights {
    pub conv: String,
    pub block: usize,
    /// The base weights `W`, and `W * omega` for the clean and the adversarial image, on shared bins.
    pub hist_base: Histogram,
    pub hist_clean: Histogram,
    pub hist_adv: Histogram,
    /// The filters whose scaling changed most: (filter, omega clean, omega adversarial).
    pub most_changed: Vec<(usize, f64, f64)>,
}

/// One image and its adversarial twin, as the per-image view shows them.
#[derive(Clone, Debug, Serialize)]
pub struct ImagePair {
    pub index: usize,
    pub label: u32,
    pub pred_clean: u32,
    pub pred_adv: u32,
    pub p_adv_clean: f64,
    pub p_adv_adv: f64,
    /// Per block, the signal of every filter.
    pub signals_clean: Vec<Vec<f64>>,
    pub signals_adv: Vec<Vec<f64>>,
    /// `[c, s, s]` pixels in [0, 1].
    #[serde(skip)]
    pub pixels_clean: Vec<f32>,
    #[serde(skip)]
    pub pixels_adv: Vec<f32>,
    pub channels: usize,
    pub side: usize,
    pub effective: Vec<EffectiveWeights>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RouterAnalysis {
    pub n: usize,
    /// The attack, fully labelled.
    pub attack: String,
    pub p_adv_clean: Vec<f64>,
    pub p_adv_adv: Vec<f64>,
    pub p_hist_clean: Histogram,
    pub p_hist_adv: Histogram,
    /// `(false positive rate, true positive rate)`, adversarial is positive, p_adv the score.
    pub roc: Vec<(f64, f64)>,
    pub auc: f64,
    /// Share of the 2n inputs labelled right with p_adv >= 0.5 meaning adversarial.
    pub type_accuracy: f64,
    pub clean_accuracy: f64,
    pub adv_accuracy: f64,
    pub blocks: Vec<BlockSignals>,
    pub images: Vec<ImagePair>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("this model has no router: it is a static network")]
    NoRouter,
    #[error("no images to analyse")]
    NoImages,
    #[error(transparent)]
    Attack(#[from] AttackError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A weight-varied convolution: its block, where its filters start in the block's signal, its
/// weights `[c_out, c_in, k, k]`.
struct Varied {
    name: String,
    block: usize,
    offset: usize,
    shape: Vec<usize>,
    values: Vec<f64>,
}

fn effective(v: &Varied, clean: &[f64], adv: &[f64]) -> EffectiveWeights {
    let (w, shape) = (&v.values[..], &v.shape[..]);
    let per = w.len() / shape[0].max(1);
    let scaled = |omega: &[f64]| -> Vec<f64> { w.iter().enumerate().map(|(i, x)| x * omega[i / per]).collect() };
    let (sc, sa) = (scaled(clean), scaled(adv));
    let edges = Histogram::shared_edges(&[w, &sc, &sa], 60);
    let mut changed: Vec<(usize, f64, f64)> = (0..shape[0]).map(|f| (f, clean[f], adv[f])).collect();
    changed.sort_by(|a, b| (b.2 - b.1).abs().total_cmp(&(a.2 - a.1).abs()));
    changed.truncate(8);
    EffectiveWeights {
        conv: v.name.clone(),
        block: v.block,
        hist_base: Histogram::new(w, edges.clone()),
        hist_clean: Histogram::new(&sc, edges.clone()),
        hist_adv: Histogram::new(&sa, edges),
        most_changed: changed,
    }
}

struct Taps {
    p_adv: Vec<f64>,
    pred: Vec<u32>,
    /// Per block, `[n][filters]`.
    signals: Vec<Vec<Vec<f64>>>,
}

fn taps(net: &Network, xs: &Tensor) -> Result<Taps, RouterError> {
    let f = net.forward(xs, crate::model::Mode::Eval)?;
    let probs = f.type_probs()?.ok_or(RouterError::NoRouter)?;
    Ok(Taps {
        p_adv: probs
            .narrow(1, 1, 1)?
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1()?,
        pred: f.logits.argmax(D::Minus1)?.to_vec1()?,
        signals: f
            .signals
            .iter()
            .map(|s| s.to_dtype(candle_core::DType::F64)?.to_vec2())
            .collect::<candle_core::Result<_>>()?,
    })
}

/// Attacks the first `n` images of `data` and compares the router's view of both versions;
/// `per_image` pairs are kept for the per-image view.
pub fn analyse(
    net: &Network,
    data: &Dataset,
    n: usize,
    cfg: &AttackConfig,
    per_image: usize,
    obs: &mut dyn Observer,
) -> Result<Outcome<RouterAnalysis>, RouterError> {
    if !net.is_awnet() {
        return Err(RouterError::NoRouter);
    }
    let n = n.min(data.len());
    if n == 0 {
        return Err(RouterError::NoImages);
    }
    let dev = Device::Cpu;
    let (mut clean, mut adv) = (Vec::new(), Vec::new());
    let mut labels_all = Vec::new();
    let mut images = Vec::new();
    let varied = net
        .convs()
        .into_iter()
        .filter_map(|c| {
            let (block, offset) = c.signal?;
            let values = c
                .weight
                .to_dtype(candle_core::DType::F64)
                .ok()?
                .flatten_all()
                .ok()?
                .to_vec1()
                .ok()?;
            Some(Varied {
                shape: c.weight.dims().to_vec(),
                name: c.name,
                block,
                offset,
                values,
            })
        })
        .collect::<Vec<_>>();
    let stage = format!("router: {} on {n} images", cfg.label());
    for start in (0..n).step_by(128) {
        if obs.stop_requested() {
            return Ok(Outcome::Cancelled);
        }
        obs.progress(&Progress {
            stage: stage.clone(),
            done: start,
            total: n,
        });
        let idx: Vec<usize> = (start..(start + 128).min(n)).collect();
        let xs = data.images_tensor(&idx, &dev)?;
        let ys: Vec<u32> = idx.iter().map(|&i| u32::from(data.labels[i])).collect();
        let stop = || obs.stop_requested();
        let Outcome::Done(run) = attack::run(net, &xs, &ys, cfg, &stop)? else {
            return Ok(Outcome::Cancelled);
        };
        let (tc, ta) = (taps(net, &xs)?, taps(net, &run.adv)?);
        for (k, &i) in idx.iter().enumerate() {
            if images.len() >= per_image {
                break;
            }
            let px = |t: &Tensor| -> candle_core::Result<Vec<f32>> { t.get(k)?.flatten_all()?.to_vec1() };
            images.push(ImagePair {
                index: i,
                label: ys[k],
                pred_clean: tc.pred[k],
                pred_adv: ta.pred[k],
                p_adv_clean: tc.p_adv[k],
                p_adv_adv: ta.p_adv[k],
                signals_clean: tc.signals.iter().map(|b| b[k].clone()).collect(),
                signals_adv: ta.signals.iter().map(|b| b[k].clone()).collect(),
                pixels_clean: px(&xs)?,
                pixels_adv: px(&run.adv)?,
                channels: data.channels,
                side: data.height,
                effective: varied
                    .iter()
                    .map(|v| {
                        effective(
                            v,
                            &tc.signals[v.block][k][v.offset..],
                            &ta.signals[v.block][k][v.offset..],
                        )
                    })
                    .collect(),
            });
        }
        labels_all.extend(ys);
        clean.push(tc);
        adv.push(ta);
    }
    obs.progress(&Progress {
        stage,
        done: n,
        total: n,
    });
    let cat = |parts: &[Taps]| -> Taps {
        let blocks = parts[0].signals.len();
        Taps {
            p_adv: parts.iter().flat_map(|t| t.p_adv.iter().copied()).collect(),
            pred: parts.iter().flat_map(|t| t.pred.iter().copied()).collect(),
            signals: (0..blocks)
                .map(|b| parts.iter().flat_map(|t| t.signals[b].iter().cloned()).collect())
                .collect(),
        }
    };
    let (c, a) = (cat(&clean), cat(&adv));
    let (points, auc) = roc(&c.p_adv, &a.p_adv);
    let right = c.p_adv.iter().filter(|&&p| p < 0.5).count() + a.p_adv.iter().filter(|&&p| p >= 0.5).count();
    let acc = |pred: &[u32]| pred.iter().zip(&labels_all).filter(|(p, y)| p == y).count() as f64 / n as f64;
    let p_edges: Vec<f64> = (0..=20).map(|i| i as f64 / 20.0).collect();
    let blocks = (0..c.signals.len())
        .map(|b| {
            let flat = |s: &[Vec<f64>]| -> Vec<f64> { s.iter().flatten().copied().collect() };
            let (fc, fa) = (flat(&c.signals[b]), flat(&a.signals[b]));
            let edges = Histogram::shared_edges(&[&fc, &fa], 40);
            let filters = c.signals[b].first().map_or(0, Vec::len);
            let filter_mean = |s: &[Vec<f64>]| -> Vec<f64> {
                (0..filters)
                    .map(|f| s.iter().map(|row| row[f]).sum::<f64>() / s.len() as f64)
                    .collect()
            };
            BlockSignals {
                block: b,
                hist_clean: Histogram::new(&fc, edges.clone()),
                hist_adv: Histogram::new(&fa, edges),
                filter_mean_clean: filter_mean(&c.signals[b]),
                filter_mean_adv: filter_mean(&a.signals[b]),
            }
        })
        .collect();
    Ok(Outcome::Done(RouterAnalysis {
        n,
        attack: cfg.label(),
        p_hist_clean: Histogram::new(&c.p_adv, p_edges.clone()),
        p_hist_adv: Histogram::new(&a.p_adv, p_edges),
        roc: points,
        auc,
        type_accuracy: right as f64 / (2 * n) as f64,
        clean_accuracy: acc(&c.pred),
        adv_accuracy: acc(&a.pred),
        blocks,
        images,
        p_adv_clean: c.p_adv,
        p_adv_adv: a.p_adv,
    }))
}
