//! The CIFAR ResNet-18 of the paper (3x3 stem, no initial max pool, four stages of two basic
//! blocks, global average pool, linear), with base width as a parameter.
//!
//! Variable names follow the common PyTorch CIFAR code (`conv1`, `bn1`, `layer1.0.conv1`,
//! `layer2.0.shortcut.0`, `linear`), so state dicts map onto it directly. In AW-Net both 3x3
//! convolutions of a block are weight-varied: block `j`'s signal has `2 * planes` values, the
//! first `planes` for `conv1`, the rest for `conv2`; the stem and 1x1 shortcuts are static.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{Conv2d, Linear, global_avg_pool};
use super::norm::{Norm, NormCtx};
use super::{ConvInfo, ModelConfig, ModelKind};

#[derive(Clone, Debug)]
pub(super) struct BasicBlock {
    name: String,
    pub(super) conv1: Conv2d,
    pub(super) bn1: Norm,
    pub(super) conv2: Conv2d,
    pub(super) bn2: Norm,
    pub(super) shortcut: Option<(Conv2d, Norm)>,
    planes: usize,
}

impl BasicBlock {
    fn forward(&self, xs: &Tensor, signal: Option<&Tensor>, ctx: &NormCtx) -> Result<Tensor> {
        let part = |offset: usize| signal.map(|s| s.narrow(1, offset, self.planes)).transpose();
        let h = self
            .bn1
            .forward_scaled(&self.conv1.forward(xs)?, part(0)?.as_ref(), true, ctx)?;
        let h = self
            .bn2
            .forward_scaled(&self.conv2.forward(&h)?, part(self.planes)?.as_ref(), false, ctx)?;
        let short = match &self.shortcut {
            Some((conv, bn)) => bn.forward(&conv.forward(xs)?, ctx)?,
            None => xs.clone(),
        };
        (h + short)?.relu()
    }
}

#[derive(Clone, Debug)]
pub struct ResNet18 {
    pub(super) conv1: Conv2d,
    pub(super) bn1: Norm,
    pub(super) blocks: Vec<BasicBlock>,
    pub(super) linear: Linear,
    image_size: usize,
}

impl ResNet18 {
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (in_channels, num_classes, width, image_size) =
            (config.in_channels, config.num_classes, config.width, config.image_size);
        let (mix, eps, momentum) = (config.kind == ModelKind::Awnet, config.bn_eps, config.bn_momentum);
        let norm = |c: usize, vb: VarBuilder| Norm::new(c, mix, eps, momentum, vb);
        let conv1 = Conv2d::new(in_channels, width, 3, 1, 1, false, vb.pp("conv1"))?;
        let bn1 = norm(width, vb.pp("bn1"))?;
        let mut blocks = Vec::new();
        let mut c_in = width;
        for (stage, (mult, first_stride)) in [(1, 1), (2, 2), (4, 2), (8, 2)].into_iter().enumerate() {
            let planes = width * mult;
            for i in 0..2 {
                let stride = if i == 0 { first_stride } else { 1 };
                let name = format!("layer{}.{i}", stage + 1);
                let vb = vb.pp(&name);
                let shortcut = if stride != 1 || c_in != planes {
                    Some((
                        Conv2d::new(c_in, planes, 1, stride, 0, false, vb.pp("shortcut.0"))?,
                        norm(planes, vb.pp("shortcut.1"))?,
                    ))
                } else {
                    None
                };
                blocks.push(BasicBlock {
                    conv1: Conv2d::new(c_in, planes, 3, stride, 1, false, vb.pp("conv1"))?,
                    bn1: norm(planes, vb.pp("bn1"))?,
                    conv2: Conv2d::new(planes, planes, 3, 1, 1, false, vb.pp("conv2"))?,
                    bn2: norm(planes, vb.pp("bn2"))?,
                    shortcut,
                    planes,
                    name,
                });
                c_in = planes;
            }
        }
        let linear = Linear::new(c_in, num_classes, vb.pp("linear"))?;
        Ok(Self {
            conv1,
            bn1,
            blocks,
            linear,
            image_size,
        })
    }

    pub fn is_cpu_f32(&self) -> bool {
        let w = self.conv1.weight();
        w.device().is_cpu() && w.dtype() == candle_core::DType::F32
    }

    pub fn signal_sizes(&self) -> Vec<usize> {
        self.blocks.iter().map(|b| 2 * b.planes).collect()
    }

    pub fn forward(&self, xs: &Tensor, signals: Option<&[Tensor]>, ctx: &NormCtx) -> Result<Tensor> {
        let mut h = self.bn1.forward_relu(&self.conv1.forward(xs)?, ctx)?;
        for (j, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h, signals.map(|s| &s[j]), ctx)?;
        }
        self.linear.forward(&global_avg_pool(&h)?)
    }

    pub fn convs(&self) -> Vec<ConvInfo> {
        let mut size = self.image_size;
        let mut out = vec![ConvInfo::new("conv1", &self.conv1, size, None)];
        for (j, b) in self.blocks.iter().enumerate() {
            out.push(ConvInfo::new(
                &format!("{}.conv1", b.name),
                &b.conv1,
                size,
                Some((j, 0)),
            ));
            let mid = b.conv1.out_size(size);
            out.push(ConvInfo::new(
                &format!("{}.conv2", b.name),
                &b.conv2,
                mid,
                Some((j, b.planes)),
            ));
            if let Some((conv, _)) = &b.shortcut {
                out.push(ConvInfo::new(&format!("{}.shortcut.0", b.name), conv, size, None));
            }
            size = mid;
        }
        out
    }

    pub fn classifier(&self) -> (&'static str, &Linear) {
        ("linear", &self.linear)
    }
}
