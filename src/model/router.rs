//! The adversarial router: a small feature extractor, a type head and one signal head per
//! AW-Net block.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::layers::{Conv2d, Linear, global_avg_pool};

/// Router sizes and the signal range. Every field is a configuration value so a user can set the
/// paper's exact settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouterConfig {
    /// Output channels of the three 3x3 convolutions (strides 1, 2, 2) of the feature extractor.
    pub channels: [usize; 3],
    /// Hidden width of the two-layer type head.
    pub type_hidden: usize,
    /// `omega = signal_scale * sigmoid(z)`; with the default 2 and zero-initialised heads every
    /// signal starts at exactly 1.
    pub signal_scale: f64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            channels: [16, 32, 64],
            type_hidden: 32,
            signal_scale: 2.0,
        }
    }
}

impl RouterConfig {
    /// Why these settings cannot make a router, if they cannot.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.channels.contains(&0) || self.type_hidden == 0 {
            return Err(format!(
                "router channels {:?} and type-head width {} must all be above 0",
                self.channels, self.type_hidden
            ));
        }
        if !(self.signal_scale.is_finite() && self.signal_scale > 0.0) {
            return Err(format!(
                "the signal scale must be a positive number, not {}",
                self.signal_scale
            ));
        }
        Ok(())
    }
}

/// What the router computes for a batch.
pub struct RouterOutput {
    /// `[b, 2]`: (clean, adversarial) logits of the type head.
    pub type_logits: Tensor,
    /// One `[b, n_j]` tensor per block, every value in `(0, signal_scale)`.
    pub signals: Vec<Tensor>,
}

#[derive(Clone, Debug)]
pub struct Router {
    pub(super) features: Vec<Conv2d>,
    pub(super) type_hidden: Linear,
    pub(super) type_out: Linear,
    pub(super) signal_heads: Vec<Linear>,
    pub(super) signal_scale: f64,
}

impl Router {
    /// `signal_sizes[j]` is the number of filters that block `j`'s signal scales.
    pub fn new(config: &RouterConfig, in_channels: usize, signal_sizes: &[usize], vb: VarBuilder) -> Result<Self> {
        config.check().map_err(candle_core::Error::Msg)?;
        let [c1, c2, c3] = config.channels;
        let vf = vb.pp("features");
        let features = vec![
            Conv2d::new(in_channels, c1, 3, 1, 1, true, vf.pp("0"))?,
            Conv2d::new(c1, c2, 3, 2, 1, true, vf.pp("1"))?,
            Conv2d::new(c2, c3, 3, 2, 1, true, vf.pp("2"))?,
        ];
        let type_hidden = Linear::new(c3, config.type_hidden, vb.pp("type_head.0"))?;
        let type_out = Linear::new(config.type_hidden, 2, vb.pp("type_head.1"))?;
        let signal_heads = signal_sizes
            .iter()
            .enumerate()
            .map(|(j, &n)| Linear::zeros(c3, n, vb.pp(format!("signal_heads.{j}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            features,
            type_hidden,
            type_out,
            signal_heads,
            signal_scale: config.signal_scale,
        })
    }

    /// `xs`: `[b, c, h, w]` raw images in [0, 1].
    pub fn forward(&self, xs: &Tensor) -> Result<RouterOutput> {
        let mut h = xs.clone();
        for conv in &self.features {
            h = conv.forward_relu(&h)?;
        }
        let f = global_avg_pool(&h)?; // [b, c3]
        let type_logits = self.type_out.forward(&self.type_hidden.forward(&f)?.relu()?)?;
        let signals = self
            .signal_heads
            .iter()
            .map(|head| candle_nn::ops::sigmoid(&head.forward(&f)?)? * self.signal_scale)
            .collect::<Result<Vec<_>>>()?;
        Ok(RouterOutput { type_logits, signals })
    }
}
