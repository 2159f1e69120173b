//! The static ResNet-18 in inference mode over plain `f32` buffers, with its input gradient
//! written out by hand, as [`super::PlainSmallCnn`] does for the small CNN.
//!
//! Through candle, the input gradient of a batch pays autograd's bookkeeping: a zero tensor and an
//! addition for every gradient it accumulates, a separate pass for each elementwise op, and the
//! graph itself. Here a pass is the convolutions (the project's kernels) and one fused pass over
//! each activation: BatchNorm's affine map with the ReLU (and the residual sum) forward, the ReLU
//! mask with BatchNorm's scale backward.
//!
//! The maths is the candle path's: eval-mode BatchNorm as a per-channel affine map, ReLU, the
//! residual sum, global average pooling, the linear layer. One difference at a measure-zero set:
//! a block's last ReLU passes no gradient where its input is exactly zero (candle's `relu` passes
//! it; the fused BatchNorm/ReLU, like this path, does not).

use candle_core::{Result, bail};
use rayon::prelude::*;

use super::{PConv, PLinear, PNorm, PlainOutput, global_avg, head_grad};
use crate::model::conv::{PAR_MIN, each_plane};
use crate::model::norm::Norm;
use crate::model::resnet::ResNet18;

/// A BatchNorm that is one affine map per channel.
struct Affine {
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl Affine {
    fn new(n: &Norm) -> Result<Option<Self>> {
        let Norm::Single(_) = n else {
            return Ok(None);
        };
        let p = PNorm::new(n)?;
        let [scale, _] = p.scale;
        let [shift, _] = p.shift;
        Ok(Some(Self { scale, shift }))
    }
}

struct Block {
    conv1: PConv,
    bn1: Affine,
    conv2: PConv,
    bn2: Affine,
    shortcut: Option<(PConv, Affine)>,
}

/// A snapshot of a static ResNet-18 in inference mode.
pub struct PlainResnet {
    stem: PConv,
    stem_bn: Affine,
    blocks: Vec<Block>,
    fc: PLinear,
    in_dims: [usize; 3],
}

/// What the forward pass keeps for the backward: every ReLU's output and its dims.
struct Tape {
    x_dims: [usize; 4],
    stem: (Vec<f32>, [usize; 4]),
    /// Per block: the first ReLU's output, the block's output.
    blocks: Vec<[(Vec<f32>, [usize; 4]); 2]>,
}

impl PlainResnet {
    /// `None` unless every normalisation is a single BatchNorm (AW-Net's MixBN and signals take
    /// the autograd path).
    pub(in crate::model) fn new(net: &ResNet18, in_channels: usize, image_size: usize) -> Result<Option<Self>> {
        let Some(stem_bn) = Affine::new(&net.bn1)? else {
            return Ok(None);
        };
        let mut blocks = Vec::new();
        for b in &net.blocks {
            let (Some(bn1), Some(bn2)) = (Affine::new(&b.bn1)?, Affine::new(&b.bn2)?) else {
                return Ok(None);
            };
            let shortcut = match &b.shortcut {
                Some((conv, bn)) => match Affine::new(bn)? {
                    Some(a) => Some((PConv::new(conv)?, a)),
                    None => return Ok(None),
                },
                None => None,
            };
            blocks.push(Block {
                conv1: PConv::new(&b.conv1)?,
                bn1,
                conv2: PConv::new(&b.conv2)?,
                bn2,
                shortcut,
            });
        }
        Ok(Some(Self {
            stem: PConv::new(&net.conv1)?,
            stem_bn,
            blocks,
            fc: PLinear::new(&net.linear)?,
            in_dims: [in_channels, image_size, image_size],
        }))
    }

    fn run(&self, x: &[f32], b: usize) -> Result<(PlainOutput, Tape)> {
        let [c, h, w] = self.in_dims;
        if x.len() != b * c * h * w {
            bail!("{} values for {b} images of {c}x{h}x{w}", x.len())
        }
        let x_dims = [b, c, h, w];
        let (mut cur, dims) = self.stem.forward(x, x_dims)?;
        affine_relu(&mut cur, dims, &self.stem_bn, None);
        let stem = (cur, dims);
        let mut blocks: Vec<[(Vec<f32>, [usize; 4]); 2]> = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let (input, in_dims) = blocks.last().map_or((&stem.0, stem.1), |t| (&t[1].0, t[1].1));
            let (mut mid, mid_dims) = block.conv1.forward(input, in_dims)?;
            affine_relu(&mut mid, mid_dims, &block.bn1, None);
            let (mut out, out_dims) = block.conv2.forward(&mid, mid_dims)?;
            match &block.shortcut {
                Some((conv, bn)) => {
                    let (mut s, _) = conv.forward(input, in_dims)?;
                    affine(&mut s, out_dims, bn);
                    affine_relu(&mut out, out_dims, &block.bn2, Some(&s));
                }
                None => affine_relu(&mut out, out_dims, &block.bn2, Some(input)),
            }
            blocks.push([(mid, mid_dims), (out, out_dims)]);
        }
        let (last, last_dims) = blocks.last().map_or((&stem.0, stem.1), |t| (&t[1].0, t[1].1));
        let logits = self.fc.forward(&global_avg(last, last_dims));
        let out = PlainOutput {
            logits,
            type_logits: None,
            signals: Vec::new(),
        };
        Ok((out, Tape { x_dims, stem, blocks }))
    }

    pub fn forward(&self, x: &[f32], b: usize) -> Result<PlainOutput> {
        Ok(self.run(x, b)?.0)
    }

    /// The forward pass, and the gradient with respect to the input of `sum(dlogits * logits)`,
    /// where `grads` maps the forward's output to `dlogits` (the type logits' gradient, which a
    /// static model has no use for, is ignored).
    pub fn input_grad(
        &self,
        x: &[f32],
        b: usize,
        grads: impl FnOnce(&PlainOutput) -> Result<(Vec<f32>, Option<Vec<f32>>)>,
    ) -> Result<(PlainOutput, Vec<f32>)> {
        let (out, tape) = self.run(x, b)?;
        let (dlogits, _) = grads(&out)?;
        let last_dims = tape.blocks.last().map_or(tape.stem.1, |t| t[1].1);
        // The gradient of the current block's output.
        let mut d = head_grad(&self.fc, &dlogits, b, last_dims);
        for (j, (block, [(mid, mid_dims), (y, y_dims)])) in self.blocks.iter().zip(&tape.blocks).enumerate().rev() {
            let in_dims = if j == 0 { tape.stem.1 } else { tape.blocks[j - 1][1].1 };
            // Back through the last ReLU to the residual sum, whose two terms get its gradient:
            // the main branch's through `bn2`, the shortcut's through its own BatchNorm.
            let mut dz = d.clone();
            mask(&mut dz, y, *y_dims, Some(&block.bn2));
            let mut dmid = block.conv2.input_grad(&dz, *mid_dims)?;
            mask(&mut dmid, mid, *mid_dims, Some(&block.bn1));
            let mut dx = block.conv1.input_grad(&dmid, in_dims)?;
            let short = match &block.shortcut {
                Some((conv, bn)) => {
                    mask(&mut d, y, *y_dims, Some(bn));
                    conv.input_grad(&d, in_dims)?
                }
                None => {
                    mask(&mut d, y, *y_dims, None);
                    d
                }
            };
            add(&mut dx, &short);
            d = dx;
        }
        mask(&mut d, &tape.stem.0, tape.stem.1, Some(&self.stem_bn));
        let dx = self.stem.input_grad(&d, tape.x_dims)?;
        Ok((out, dx))
    }
}

/// `z = max(z * scale + shift + residual, 0)` per channel, in place.
fn affine_relu(z: &mut [f32], d: [usize; 4], bn: &Affine, residual: Option<&[f32]>) {
    let (c, hw) = (d[1], d[2] * d[3]);
    each_plane(z, hw, |p, z| {
        let (a, s) = (bn.scale[p % c], bn.shift[p % c]);
        match residual {
            Some(r) => {
                for (z, r) in z.iter_mut().zip(&r[p * hw..(p + 1) * hw]) {
                    *z = (*z * a + s + r).max(0.0);
                }
            }
            None => z.iter_mut().for_each(|z| *z = (*z * a + s).max(0.0)),
        }
    });
}

/// `z = z * scale + shift` per channel, in place.
fn affine(z: &mut [f32], d: [usize; 4], bn: &Affine) {
    let (c, hw) = (d[1], d[2] * d[3]);
    each_plane(z, hw, |p, z| {
        let (a, s) = (bn.scale[p % c], bn.shift[p % c]);
        z.iter_mut().for_each(|z| *z = *z * a + s);
    });
}

/// `g = (y > 0) g`, times BatchNorm's per-channel scale when given: back through a ReLU whose
/// output is `y`, then through the BatchNorm before it.
fn mask(g: &mut [f32], y: &[f32], d: [usize; 4], bn: Option<&Affine>) {
    let (c, hw) = (d[1], d[2] * d[3]);
    each_plane(g, hw, |p, g| {
        let a = bn.map_or(1.0, |bn| bn.scale[p % c]);
        let y = &y[p * hw..(p + 1) * hw];
        for (g, &y) in g.iter_mut().zip(y) {
            // A mask multiply rather than a branch, which the compiler keeps scalar.
            *g *= a * f32::from(u8::from(y > 0.0));
        }
    });
}

/// `a += b`, elementwise.
fn add(a: &mut [f32], b: &[f32]) {
    if a.len() < PAR_MIN {
        a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    } else {
        a.par_iter_mut().zip(b).for_each(|(a, b)| *a += b);
    }
}
