//! The small backbone, sized for training on a 2-core CPU.
//!
//! ```text
//! stem    3x3 conv c_in -> w   (static)     MixBN  ReLU                    s x s
//! block0  3x3 conv w -> w      (weight-varied) MixBN ReLU  2x2 max pool    s/2
//! block1  3x3 conv w -> 2w     (weight-varied) MixBN ReLU                  s/2
//! block2  3x3 conv 2w -> 2w    (weight-varied) MixBN ReLU  2x2 max pool    s/4
//! head    global average pool, linear 2w -> classes
//! ```
//! With `w = 32`, 28x28x1 inputs and 10 classes the static model has 65,834 trainable parameters
//! and 18.29 M multiply-accumulates per image; AW-Net adds a router of 35,842 parameters and
//! 1.93 M multiply-accumulates, and doubles the 384 BatchNorm parameters (102,060 and 20.22 M in
//! all). `awnet info` prints both numbers for any configuration.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{Conv2d, Linear, global_avg_pool, max_pool2x2};
use super::norm::{Norm, NormCtx};
use super::{ConvInfo, ModelConfig, ModelKind};

#[derive(Clone, Debug)]
pub(super) struct Block {
    pub(super) conv: Conv2d,
    pub(super) bn: Norm,
    pub(super) pool: bool,
}

#[derive(Clone, Debug)]
pub struct SmallCnn {
    pub(super) stem: Conv2d,
    pub(super) stem_bn: Norm,
    pub(super) blocks: Vec<Block>,
    pub(super) fc: Linear,
    image_size: usize,
}

impl SmallCnn {
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (in_channels, num_classes, width, image_size) =
            (config.in_channels, config.num_classes, config.width, config.image_size);
        let (mix, eps, momentum) = (config.kind == ModelKind::Awnet, config.bn_eps, config.bn_momentum);
        let stem = Conv2d::new(in_channels, width, 3, 1, 1, false, vb.pp("stem.conv"))?;
        let stem_bn = Norm::new(width, mix, eps, momentum, vb.pp("stem.bn"))?;
        let plan = [
            (width, width, true),
            (width, 2 * width, false),
            (2 * width, 2 * width, true),
        ];
        let blocks = plan
            .iter()
            .enumerate()
            .map(|(i, &(c_in, c_out, pool))| {
                let vb = vb.pp(format!("block{i}"));
                Ok(Block {
                    conv: Conv2d::new(c_in, c_out, 3, 1, 1, false, vb.pp("conv"))?,
                    bn: Norm::new(c_out, mix, eps, momentum, vb.pp("bn"))?,
                    pool,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let fc = Linear::new(2 * width, num_classes, vb.pp("fc"))?;
        Ok(Self {
            stem,
            stem_bn,
            blocks,
            fc,
            image_size,
        })
    }

    /// Filters each block's signal scales: one per output filter of its convolution.
    pub fn signal_sizes(&self) -> Vec<usize> {
        self.blocks.iter().map(|b| b.conv.weight().dims()[0]).collect()
    }

    /// `xs`: `[b, c, s, s]`; `signals`: one `[b, n_j]` per block, or none for a static model.
    pub fn forward(&self, xs: &Tensor, signals: Option<&[Tensor]>, ctx: &NormCtx) -> Result<Tensor> {
        let mut h = self.stem_bn.forward_scaled(&self.stem.forward(xs)?, None, true, ctx)?;
        for (j, block) in self.blocks.iter().enumerate() {
            let z = block.conv.forward(&h)?;
            h = block.bn.forward_scaled(&z, signals.map(|s| &s[j]), true, ctx)?;
            if block.pool {
                h = max_pool2x2(&h)?;
            }
        }
        self.fc.forward(&global_avg_pool(&h)?)
    }

    pub fn convs(&self) -> Vec<ConvInfo> {
        let mut size = self.image_size;
        let mut out = vec![ConvInfo::new("stem.conv", &self.stem, size, None)];
        for (j, block) in self.blocks.iter().enumerate() {
            out.push(ConvInfo::new(
                &format!("block{j}.conv"),
                &block.conv,
                size,
                Some((j, 0)),
            ));
            if block.pool {
                size /= 2;
            }
        }
        out
    }

    /// Weights in f32 on the CPU, what [`super::plain`] takes.
    pub fn is_cpu_f32(&self) -> bool {
        let w = self.stem.weight();
        w.device().is_cpu() && w.dtype() == candle_core::DType::F32
    }

    pub fn classifier(&self) -> (&'static str, &Linear) {
        ("fc", &self.fc)
    }
}
