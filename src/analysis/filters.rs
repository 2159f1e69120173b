//! The Filters view's numbers: per-layer weight distributions of one to three models on shared
//! bins, their statistics and distances, and the kernels drawn as heat maps.

use serde::Serialize;

use super::stats::{Histogram, Summary, wasserstein1};
use crate::model::Model;

/// The pseudo-layer that pools every layer's weights.
pub const POOLED: &str = "all layers pooled";

/// One layer's weights, flattened, with their shape `[c_out, c_in, k, k]` (`[out, in]` for the
/// classifier).
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl LayerWeights {
    /// L1 and L2 norm of each output filter.
    pub fn filter_norms(&self) -> (Vec<f64>, Vec<f64>) {
        let per = self.values.len() / self.shape[0].max(1);
        self.values
            .chunks(per.max(1))
            .map(|f| {
                (
                    f.iter().map(|x| x.abs()).sum::<f64>(),
                    f.iter().map(|x| x * x).sum::<f64>().sqrt(),
                )
            })
            .unzip()
    }
}

/// The backbone's convolutions in forward order, then the classifier.
pub fn layer_weights(model: &Model) -> candle_core::Result<Vec<LayerWeights>> {
    let flat = |t: &candle_core::Tensor| -> candle_core::Result<Vec<f64>> {
        t.to_dtype(candle_core::DType::F64)?.flatten_all()?.to_vec1::<f64>()
    };
    let mut out = Vec::new();
    for c in model.net.convs() {
        out.push(LayerWeights {
            values: flat(&c.weight)?,
            shape: c.weight.dims().to_vec(),
            name: c.name,
        });
    }
    let (name, w) = model.net.classifier();
    out.push(LayerWeights {
        name: name.to_string(),
        shape: w.dims().to_vec(),
        values: flat(w)?,
    });
    Ok(out)
}

/// One row of the statistics table.
#[derive(Clone, Debug, Serialize)]
pub struct LayerRow {
    /// Index into [`FiltersAnalysis::models`].
    pub model: usize,
    pub layer: String,
    pub summary: Summary,
    pub mean_filter_l1: f64,
    pub mean_filter_l2: f64,
    /// Wasserstein-1 distance to the same layer of the first model (none for the first).
    pub w1_to_first: Option<f64>,
}

/// A layer's kernels as an RGBA picture: one tile per output filter on a diverging scale
/// (blue negative, white zero, red positive) from `-scale` to `scale`.
#[derive(Clone, Debug, Serialize)]
pub struct KernelPicture {
    pub width: usize,
    pub height: usize,
    #[serde(skip)]
    pub rgba: Vec<u8>,
    pub scale: f64,
    /// How a tile is laid out, for the caption.
    pub tile: String,
}

/// What the Filters tab shows for a layer and a set of models.
#[derive(Clone, Debug, Serialize)]
pub struct FiltersAnalysis {
    pub models: Vec<String>,
    pub layers: Vec<String>,
    pub layer: String,
    pub near_zero: f64,
    /// Per model, its weights of the layer on shared bins; `None` if it has no such layer.
    pub histograms: Vec<Option<Histogram>>,
    /// Per model, the distribution of per-filter L2 norms on shared bins.
    pub norm_histograms: Vec<Option<Histogram>>,
    /// Every layer of every model.
    pub table: Vec<LayerRow>,
    /// The first model's kernels of the layer (none for the pooled view).
    pub kernels: Option<KernelPicture>,
}

/// Analyses `layer` (a layer name or [`POOLED`]) of `models` (name, weights).
pub fn analyse(models: &[(String, Vec<LayerWeights>)], layer: &str, bins: usize, near_zero: f64) -> FiltersAnalysis {
    let pick = |ws: &[LayerWeights]| -> Option<(Vec<f64>, Vec<f64>)> {
        if layer == POOLED {
            let values = ws.iter().flat_map(|l| l.values.iter().copied()).collect();
            let norms = ws.iter().flat_map(|l| l.filter_norms().1).collect();
            Some((values, norms))
        } else {
            ws.iter()
                .find(|l| l.name == layer)
                .map(|l| (l.values.clone(), l.filter_norms().1))
        }
    };
    let picked: Vec<Option<(Vec<f64>, Vec<f64>)>> = models.iter().map(|(_, ws)| pick(ws)).collect();
    let values: Vec<&[f64]> = picked.iter().flatten().map(|(v, _)| v.as_slice()).collect();
    let norms: Vec<&[f64]> = picked.iter().flatten().map(|(_, n)| n.as_slice()).collect();
    let edges = Histogram::shared_edges(&values, bins);
    let norm_edges = Histogram::shared_edges(&norms, bins.min(40));
    let histograms = picked
        .iter()
        .map(|p| p.as_ref().map(|(v, _)| Histogram::new(v, edges.clone())))
        .collect();
    let norm_histograms = picked
        .iter()
        .map(|p| p.as_ref().map(|(_, n)| Histogram::new(n, norm_edges.clone())))
        .collect();

    let mut table = Vec::new();
    let first = models.first().map(|(_, ws)| ws.as_slice()).unwrap_or(&[]);
    for (m, (_, ws)) in models.iter().enumerate() {
        for l in ws {
            let (l1, l2) = l.filter_norms();
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
            let w1_to_first = (m > 0)
                .then(|| first.iter().find(|f| f.name == l.name))
                .flatten()
                .map(|f| wasserstein1(&f.values, &l.values));
            table.push(LayerRow {
                model: m,
                layer: l.name.clone(),
                summary: Summary::of(&l.values, near_zero),
                mean_filter_l1: mean(&l1),
                mean_filter_l2: mean(&l2),
                w1_to_first,
            });
        }
    }
    let kernels = (layer != POOLED)
        .then(|| first.iter().find(|l| l.name == layer))
        .flatten()
        .map(kernel_picture);
    FiltersAnalysis {
        models: models.iter().map(|(n, _)| n.clone()).collect(),
        layers: first.iter().map(|l| l.name.clone()).collect(),
        layer: layer.to_string(),
        near_zero,
        histograms,
        norm_histograms,
        table,
        kernels,
    }
}

/// Blue (negative) through white (zero) to red (positive), for `t` in [-1, 1].
pub fn diverging(t: f64) -> [u8; 3] {
    let t = t.clamp(-1.0, 1.0);
    let fade = |c: f64| (255.0 * (1.0 - t.abs()) + c * t.abs()).round() as u8;
    if t < 0.0 {
        [fade(33.0), fade(102.0), fade(172.0)]
    } else {
        [fade(178.0), fade(24.0), fade(43.0)]
    }
}

/// One tile per output filter: the input channels side by side (`k` x `c_in * k`) for a first
/// layer of up to three channels, otherwise a heat map with a row per input channel and a
/// column per tap (`c_in` x `k * k`).
pub fn kernel_picture(l: &LayerWeights) -> KernelPicture {
    let (c_out, c_in, k) = match *l.shape.as_slice() {
        [o, i, k, _] => (o, i, k),
        [o, i] => (o, i, 1),
        _ => (l.values.len(), 1, 1),
    };
    let patches = c_in <= 3 && k > 1;
    let (th, tw) = if patches {
        (k, c_in * k + c_in - 1)
    } else {
        (c_in, k * k)
    };
    let cols = (c_out as f64).sqrt().ceil().max(1.0) as usize;
    let rows = c_out.div_ceil(cols);
    let (width, height) = (cols * (tw + 1) + 1, rows * (th + 1) + 1);
    let scale = l.values.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-12);
    let mut rgba = vec![128u8; width * height * 4];
    for f in 0..c_out {
        let (ty, tx) = (1 + (f / cols) * (th + 1), 1 + (f % cols) * (tw + 1));
        for ci in 0..c_in {
            for a in 0..k {
                for b in 0..k {
                    let v = l.values[((f * c_in + ci) * k + a) * k + b];
                    let (y, x) = if patches {
                        (a, ci * (k + 1) + b)
                    } else {
                        (ci, a * k + b)
                    };
                    let px = ((ty + y) * width + tx + x) * 4;
                    let [r, g, bl] = diverging(v / scale);
                    rgba[px..px + 4].copy_from_slice(&[r, g, bl, 255]);
                }
            }
        }
    }
    KernelPicture {
        width,
        height,
        rgba,
        scale,
        tile: if patches {
            format!("{c_out} filters, each {k}x{k} per input channel side by side")
        } else {
            format!(
                "{c_out} filters, each a heat map of {c_in} input channels (rows) x {} taps",
                k * k
            )
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(name: &str, shape: &[usize], f: impl Fn(usize) -> f64) -> LayerWeights {
        let n = shape.iter().product();
        LayerWeights {
            name: name.into(),
            shape: shape.to_vec(),
            values: (0..n).map(f).collect(),
        }
    }

    #[test]
    fn filter_norms_by_hand() {
        let l = layer("c", &[2, 1, 1, 2], |i| [3.0, -4.0, 1.0, 0.0][i]);
        let (l1, l2) = l.filter_norms();
        assert_eq!(l1, vec![7.0, 1.0]);
        assert_eq!(l2, vec![5.0, 1.0]);
    }

    #[test]
    fn analysis_shares_bins_and_measures_distance() {
        let a = vec![
            layer("conv", &[4, 1, 3, 3], |i| i as f64 / 36.0),
            layer("fc", &[2, 4], |_| 0.5),
        ];
        let b = vec![layer("conv", &[4, 1, 3, 3], |i| i as f64 / 36.0 + 0.25)];
        let r = analyse(&[("a".into(), a), ("b".into(), b)], "conv", 10, 0.1);
        let (ha, hb) = (r.histograms[0].as_ref().unwrap(), r.histograms[1].as_ref().unwrap());
        assert_eq!(ha.edges, hb.edges);
        assert_eq!((ha.total(), hb.total()), (36, 36));
        let row = r.table.iter().find(|x| x.model == 1 && x.layer == "conv").unwrap();
        assert!((row.w1_to_first.unwrap() - 0.25).abs() < 1e-12);
        assert_eq!(r.table.len(), 3);
        let pic = r.kernels.unwrap();
        assert_eq!(pic.rgba.len(), pic.width * pic.height * 4);
        // The pooled view covers every layer of each model; the second lacks `fc`.
        let p = analyse(
            &[(
                "a".into(),
                vec![layer("x", &[1, 2], |_| 1.0), layer("y", &[1, 3], |_| 2.0)],
            )],
            POOLED,
            5,
            0.1,
        );
        assert_eq!(p.histograms[0].as_ref().unwrap().total(), 5);
        let r = analyse(
            &[("a".into(), vec![layer("fc", &[1, 2], |_| 1.0)]), ("b".into(), vec![])],
            "fc",
            5,
            0.1,
        );
        assert!(r.histograms[1].is_none());
    }
}
