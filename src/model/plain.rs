//! The small CNN, with AW-Net's router, in inference mode as loops over plain `f32` buffers, with
//! its input gradient written out by hand: what an attack needs, without an autograd graph. The
//! static ResNet-18's counterpart is [`PlainResnet`] (`plain/resnet.rs`); [`Plain`] holds either.
//!
//! Through candle, one PGD step on one image is about 80 tensor ops forward and as many backward,
//! each allocating its result, and autograd adds a zero tensor and an addition per gradient; at
//! batch 1 that bookkeeping, not arithmetic, was most of the step. Here a step is the
//! convolutions (the project's kernels, `conv`) and a few passes over small buffers.
//!
//! The maths is the candle path's, op for op: eval-mode BatchNorm (or MixBN's soft mix by the
//! router's `p_clean`) as a per-channel affine map with the block's signals folded into its
//! scale, ReLU, 2x2 max pooling (the gradient to the first maximum), global average pooling. The
//! backward includes every path AW-Net has from the input: through the backbone, through the
//! signals into the router, and through MixBN's mixing weight into the router's type head.
//! ReLU passes no gradient where its input is exactly zero, as the graph's fused ReLUs (router
//! and backbone) do, so the two paths agree to rounding: `tests/it/model.rs` holds outputs and
//! input gradients to the graph's and autograd's, `tests/it/attacks.rs` every attack objective's
//! loss and gradient.

use std::borrow::Cow;
use std::ops::Range;

use candle_core::{DType, Result, Tensor, bail};
use rayon::prelude::*;

use super::conv::{
    Kept, Mat, PAR_MIN, RouterConv, each_plane, forward_slices, input_grad_slices, matmul, router_features, zeros,
};
use super::lanes::relu_grad_sums;
use super::layers::{Conv2d, Linear};
use super::norm::Norm;
use super::router::Router;
use super::small_cnn::SmallCnn;
use super::{fused, pair};

mod resnet;

pub use resnet::PlainResnet;

/// A network's hand-written inference path and input gradient, where it has one.
pub enum Plain {
    SmallCnn(PlainSmallCnn),
    Resnet(PlainResnet),
}

impl Plain {
    /// Inference on `b` images `[b, c, h, w]` in [0, 1].
    pub fn forward(&self, x: &[f32], b: usize) -> Result<PlainOutput> {
        match self {
            Plain::SmallCnn(p) => p.forward(x, b),
            Plain::Resnet(p) => p.forward(x, b),
        }
    }

    /// The forward pass, and the gradient with respect to the input of `sum(dlogits * logits) +
    /// sum(dtype * type_logits)`, where `grads` maps the forward's output to `(dlogits, dtype)`.
    pub fn input_grad(
        &self,
        x: &[f32],
        b: usize,
        grads: impl FnOnce(&PlainOutput) -> Result<(Vec<f32>, Option<Vec<f32>>)>,
    ) -> Result<(PlainOutput, Vec<f32>)> {
        match self {
            Plain::SmallCnn(p) => p.input_grad(x, b, grads),
            Plain::Resnet(p) => p.input_grad(x, b, grads),
        }
    }
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
}

struct PConv {
    w: Vec<f32>,
    w_dims: [usize; 4],
    bias: Option<Vec<f32>>,
    stride: usize,
    pad: usize,
    /// The kernels' forms of `w`, made once for the snapshot's many passes.
    kept: Kept<f32>,
}

impl PConv {
    fn new(c: &Conv2d) -> Result<Self> {
        let d = c.weight().dims();
        Ok(Self {
            w: values(c.weight())?,
            w_dims: [d[0], d[1], d[2], d[3]],
            bias: c.bias().map(values).transpose()?,
            stride: c.stride(),
            pad: c.padding(),
            kept: Kept::default(),
        })
    }

    fn forward(&self, x: &[f32], x_dims: [usize; 4]) -> Result<(Vec<f32>, [usize; 4])> {
        self.forward_then(x, x_dims, false)
    }

    /// The convolution plus its bias, and then a ReLU when `relu`, in one pass over the output;
    /// the bias and ReLU inside `direct`'s kernels where they take the convolution (the router's).
    fn forward_then(&self, x: &[f32], x_dims: [usize; 4], relu: bool) -> Result<(Vec<f32>, [usize; 4])> {
        // A bias and a ReLU: `forward_slices`'s, inside the direct kernels where they apply.
        let fused = if relu { self.bias.as_deref() } else { None };
        let (mut y, d) = forward_slices(
            x,
            x_dims,
            &self.w,
            self.w_dims,
            self.stride,
            self.pad,
            fused,
            Some(&self.kept),
        )?;
        if fused.is_none() && (self.bias.is_some() || relu) {
            let hw = d[2] * d[3];
            each_plane(&mut y, hw, |p, plane| {
                let b = self.bias.as_ref().map_or(0.0, |bias| bias[p % d[1]]);
                if relu {
                    plane.iter_mut().for_each(|v| *v = (*v + b).max(0.0));
                } else {
                    plane.iter_mut().for_each(|v| *v += b);
                }
            });
        }
        Ok((y, d))
    }

    fn input_grad(&self, dy: &[f32], x_dims: [usize; 4]) -> Result<Vec<f32>> {
        input_grad_slices(
            dy,
            x_dims,
            &self.w,
            self.w_dims,
            self.stride,
            self.pad,
            Some(&self.kept),
        )
    }
}

/// `y = x W^T + b`, `W` `[out, in]`.
struct PLinear {
    w: Vec<f32>,
    b: Vec<f32>,
    d_in: usize,
    d_out: usize,
}

impl PLinear {
    fn new(l: &Linear) -> Result<Self> {
        let (d_out, d_in) = l.weight().dims2()?;
        Ok(Self {
            w: values(l.weight())?,
            b: values(l.bias())?,
            d_in,
            d_out,
        })
    }

    /// `[b, in]` to `[b, out]`, as one product (a batch's signal heads as dot products one at a
    /// time took a tenth of AW-Net's inference time).
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let b = x.len() / self.d_in;
        let mut y: Vec<f32> = (0..b).flat_map(|_| self.b.iter().copied()).collect();
        // SAFETY: x is [b, in] and w [out, in], read transposed as [in, out]; y is [b, out].
        unsafe {
            matmul(
                b,
                self.d_out,
                self.d_in,
                &mut y,
                true,
                Mat::rows(x.as_ptr(), self.d_in),
                Mat::transposed(self.w.as_ptr(), self.d_in),
            )
        };
        y
    }

    /// `dx += dy W`, `dy` `[b, out]`, `dx` `[b, in]`.
    fn add_input_grad(&self, dy: &[f32], dx: &mut [f32]) {
        // SAFETY: dy is [b, out], w [out, in], dx [b, in].
        unsafe {
            matmul(
                dx.len() / self.d_in,
                self.d_in,
                self.d_out,
                dx,
                true,
                Mat::rows(dy.as_ptr(), self.d_out),
                Mat::rows(self.w.as_ptr(), self.d_in),
            )
        };
    }
}

/// Eval-mode normalisation as `z * scale(p) + shift(p)` with `scale(p) = adv + p (clean - adv)`:
/// MixBN's soft mix by `p_clean`, or a single BN stored twice (so `p` drops out exactly).
struct PNorm {
    scale: [Vec<f32>; 2],
    shift: [Vec<f32>; 2],
}

impl PNorm {
    fn new(n: &Norm) -> Result<Self> {
        let ((sc, hc), (sa, ha)) = match n {
            Norm::Single(bn) => (bn.affine()?, bn.affine()?),
            Norm::Mix { clean, adv } => (clean.affine()?, adv.affine()?),
        };
        Ok(Self {
            scale: [values(&sc)?, values(&sa)?],
            shift: [values(&hc)?, values(&ha)?],
        })
    }

    fn mixed(v: &[Vec<f32>; 2], p: f32, c: usize) -> f32 {
        p * (v[0][c] - v[1][c]) + v[1][c]
    }
}

struct Stage {
    conv: PConv,
    norm: PNorm,
    pool: bool,
    /// Which router signal scales this stage's filters.
    signal: Option<usize>,
}

struct PRouter {
    convs: Vec<PConv>,
    hidden: PLinear,
    out: PLinear,
    heads: Vec<PLinear>,
    scale: f32,
}

impl PRouter {
    /// The feature extractor's output `[b, c3]`, with no tape: by [`router_features`] (one image
    /// at a time through all three convolutions, each writing into the next one's padded input)
    /// where its kernels take the layers, else a few images at a time through all three layers,
    /// while their maps are still in cache (layer by layer over a batch of 128, each convolution
    /// read its 3-6 MiB input back from memory, which took as long as its arithmetic).
    fn features(&self, x: &[f32], x_dims: [usize; 4]) -> Result<Vec<f32>> {
        if let [c1, c2, c3] = &self.convs[..]
            && let (Some(b1), Some(b2), Some(b3)) = (&c1.bias, &c2.bias, &c3.bias)
        {
            let layers = [(c1, b1), (c2, b2), (c3, b3)].map(|(c, bias)| RouterConv {
                w: &c.w,
                w_dims: c.w_dims,
                bias,
                stride: c.stride,
                pad: c.pad,
                kept: &c.kept,
            });
            if let Some(f) = router_features(x, x_dims, &layers)? {
                return Ok(f);
            }
        }
        let [b, c, h, w] = x_dims;
        let per = (b / (8 * rayon::current_num_threads())).max(2);
        let parts = x
            .par_chunks(per * c * h * w)
            .map(|x| {
                let (mut cur, mut dims) = (Cow::Borrowed(x), [x.len() / (c * h * w), c, h, w]);
                for conv in &self.convs {
                    let (y, d) = conv.forward_then(&cur, dims, true)?;
                    (cur, dims) = (Cow::Owned(y), d);
                }
                Ok(global_avg(&cur, dims))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(parts.concat())
    }
}

/// A snapshot of a small CNN (and its router) in inference mode.
pub struct PlainSmallCnn {
    stages: Vec<Stage>,
    fc: PLinear,
    router: Option<PRouter>,
    in_dims: [usize; 3],
}

/// Everything one forward pass keeps for the backward, per batch.
struct Tape {
    x_dims: [usize; 4],
    /// Router: each convolution's input dims and its output after the ReLU; the last output's dims
    /// (both only with a backward pass, which alone reads them).
    router: Vec<([usize; 4], Vec<f32>)>,
    router_out_dims: [usize; 4],
    feat: Vec<f32>,
    hidden_pre: Vec<f32>,
    /// `[b]`; all ones for a static model.
    p_clean: Vec<f32>,
    /// Per block, `[b, n_j]`.
    signals: Vec<Vec<f32>>,
    stages: Vec<StageTape>,
    last_dims: [usize; 4],
}

struct StageTape {
    in_dims: [usize; 4],
    /// The convolution's output (empty without a router, whose gradients alone read it, or when
    /// no backward pass follows).
    z: Vec<f32>,
    z_dims: [usize; 4],
    /// After the ReLU, before pooling.
    y: Vec<f32>,
    /// `[b, c]`: the effective scale (signal times mixed BN scale).
    a: Vec<f32>,
}

/// What the forward pass returns: `[b, classes]` logits, `[b, 2]` type logits (AW-Net), signals.
pub struct PlainOutput {
    pub logits: Vec<f32>,
    pub type_logits: Option<Vec<f32>>,
    pub signals: Vec<Vec<f32>>,
}

impl PlainSmallCnn {
    pub(super) fn new(net: &SmallCnn, router: Option<&Router>, in_channels: usize, image_size: usize) -> Result<Self> {
        let mut stages = vec![Stage {
            conv: PConv::new(&net.stem)?,
            norm: PNorm::new(&net.stem_bn)?,
            pool: false,
            signal: None,
        }];
        for (j, b) in net.blocks.iter().enumerate() {
            stages.push(Stage {
                conv: PConv::new(&b.conv)?,
                norm: PNorm::new(&b.bn)?,
                pool: b.pool,
                signal: router.map(|_| j),
            });
        }
        let router = router
            .map(|r| -> Result<PRouter> {
                Ok(PRouter {
                    convs: r.features.iter().map(PConv::new).collect::<Result<_>>()?,
                    hidden: PLinear::new(&r.type_hidden)?,
                    out: PLinear::new(&r.type_out)?,
                    heads: r.signal_heads.iter().map(PLinear::new).collect::<Result<_>>()?,
                    scale: r.signal_scale as f32,
                })
            })
            .transpose()?;
        Ok(Self {
            stages,
            fc: PLinear::new(&net.fc)?,
            router,
            in_dims: [in_channels, image_size, image_size],
        })
    }

    /// The forward pass and its tape; `backward` keeps in it what the input gradient reads.
    fn run(&self, x: &[f32], b: usize, backward: bool) -> Result<(PlainOutput, Tape)> {
        let [c, h, w] = self.in_dims;
        if x.len() != b * c * h * w {
            bail!("{} values for {b} images of {c}x{h}x{w}", x.len())
        }
        let x_dims = [b, c, h, w];
        let mut tape = Tape {
            x_dims,
            router: Vec::new(),
            router_out_dims: x_dims,
            feat: Vec::new(),
            hidden_pre: Vec::new(),
            p_clean: vec![1.0; b],
            signals: Vec::new(),
            stages: Vec::new(),
            last_dims: x_dims,
        };
        let mut type_logits = None;
        if let Some(r) = &self.router {
            if backward {
                let mut dims = x_dims;
                for conv in &r.convs {
                    let input = tape.router.last().map_or(x, |(_, y)| y);
                    let (y, d) = conv.forward_then(input, dims, true)?;
                    tape.router.push((dims, y));
                    dims = d;
                }
                tape.feat = global_avg(tape.router.last().map_or(x, |(_, y)| y), dims);
                tape.router_out_dims = dims;
            } else {
                tape.feat = r.features(x, x_dims)?;
            }
            tape.hidden_pre = r.hidden.forward(&tape.feat);
            let hidden: Vec<f32> = tape.hidden_pre.iter().map(|v| v.max(0.0)).collect();
            let t = r.out.forward(&hidden);
            tape.p_clean = t.chunks(2).map(|l| softmax2(l[0], l[1])).collect();
            tape.signals = r
                .heads
                .iter()
                .map(|head| {
                    head.forward(&tape.feat)
                        .into_iter()
                        .map(|u| r.scale * sigmoid(u))
                        .collect()
                })
                .collect();
            type_logits = Some(t);
        }
        // Each stage reads the previous one's pooled output, or its ReLU output kept in the tape.
        let (mut pooled, mut dims): (Option<Vec<f32>>, _) = (None, x_dims);
        for stage in &self.stages {
            let input = current(&pooled, &tape.stages, x);
            let (z, zd) = stage.conv.forward(input, dims)?;
            let (ch, hw) = (zd[1], zd[2] * zd[3]);
            let mut a = vec![0f32; b * ch];
            // Only the router's gradients read `z` again: otherwise (a static model, or no
            // backward pass) the ReLU output overwrites it.
            let (z, mut y) = if backward && self.router.is_some() {
                let y = zeros(z.len());
                (z, y)
            } else {
                (Vec::new(), z)
            };
            let sample = |bi: usize, (y, a): (&mut [f32], &mut [f32])| {
                let p = tape.p_clean[bi];
                for ci in 0..ch {
                    let mut scale = PNorm::mixed(&stage.norm.scale, p, ci);
                    if let Some(j) = stage.signal {
                        scale *= tape.signals[j][bi * ch + ci];
                    }
                    let shift = PNorm::mixed(&stage.norm.shift, p, ci);
                    a[ci] = scale;
                    let y = &mut y[ci * hw..(ci + 1) * hw];
                    if z.is_empty() {
                        y.iter_mut().for_each(|y| *y = (*y * scale + shift).max(0.0));
                    } else {
                        for (y, z) in y.iter_mut().zip(&z[(bi * ch + ci) * hw..][..hw]) {
                            *y = (z * scale + shift).max(0.0);
                        }
                    }
                }
            };
            if b == 1 {
                sample(0, (&mut y, &mut a));
            } else {
                y.par_chunks_mut(ch * hw)
                    .zip(a.par_chunks_mut(ch))
                    .enumerate()
                    .for_each(|(bi, chunks)| sample(bi, chunks));
            }
            let next = stage.pool.then(|| max_pool(&y, zd));
            tape.stages.push(StageTape {
                in_dims: dims,
                z,
                z_dims: zd,
                y,
                a,
            });
            dims = next.as_ref().map_or(zd, |(_, d)| *d);
            pooled = next.map(|(v, _)| v);
        }
        let last = current(&pooled, &tape.stages, x);
        let g = global_avg(last, dims);
        let logits = self.fc.forward(&g);
        tape.last_dims = dims;
        let out = PlainOutput {
            logits,
            type_logits,
            signals: tape.signals.clone(),
        };
        Ok((out, tape))
    }

    /// Inference on `b` images `[b, c, h, w]` in [0, 1].
    pub fn forward(&self, x: &[f32], b: usize) -> Result<PlainOutput> {
        Ok(self.run(x, b, false)?.0)
    }

    /// The forward pass, and the gradient with respect to the input of `sum(dlogits * logits) +
    /// sum(dtype * type_logits)`, where `grads` maps the forward's output to `(dlogits, dtype)`.
    pub fn input_grad(
        &self,
        x: &[f32],
        b: usize,
        grads: impl FnOnce(&PlainOutput) -> Result<(Vec<f32>, Option<Vec<f32>>)>,
    ) -> Result<(PlainOutput, Vec<f32>)> {
        let (out, tape) = self.run(x, b, true)?;
        let (dlogits, dtype) = grads(&out)?;
        let mut dh = head_grad(&self.fc, &dlogits, b, tape.last_dims);
        let mut dp = vec![0f32; b];
        let mut dsignals: Vec<Vec<f32>> = tape.signals.iter().map(|s| vec![0f32; s.len()]).collect();
        let mut dx = Vec::new();
        for (i, (stage, st)) in self.stages.iter().zip(&tape.stages).enumerate().rev() {
            let dy = if stage.pool { unpool(&dh, &st.y, st.z_dims) } else { dh };
            let (ch, hw) = (st.z_dims[1], st.z_dims[2] * st.z_dims[3]);
            let mut dz = zeros(st.y.len());
            // Per sample and range of channels: its part of dz (from the first channel of the
            // range), and its gradients of p_clean and of the signals.
            let sample = |bi: usize, chans: Range<usize>, dz: &mut [f32]| -> (f32, Vec<f32>) {
                let p = tape.p_clean[bi];
                let mut dsig = Vec::new();
                let mut dp = 0f32;
                let first = chans.start;
                for ci in chans {
                    let k = bi * ch + ci;
                    let r = k * hw..(k + 1) * hw;
                    let at = (ci - first) * hw;
                    let (dz, dy, y) = (&mut dz[at..at + hw], &dy[r.clone()], &st.y[r.clone()]);
                    if self.router.is_none() {
                        for ((dz, &dy), &y) in dz.iter_mut().zip(dy).zip(y) {
                            *dz = if y > 0.0 { dy * st.a[k] } else { 0.0 };
                        }
                        continue;
                    }
                    let (sum_g, sum_gz) = relu_grad_sums(dy, y, &st.z[r], st.a[k], dz);
                    // a = signal * scale(p), shift(p): into the signal and the mixing weight.
                    let mixed = PNorm::mixed(&stage.norm.scale, p, ci);
                    let da_scale = match stage.signal {
                        Some(j) => {
                            dsig.push(sum_gz * mixed);
                            sum_gz * tape.signals[j][k]
                        }
                        None => sum_gz,
                    };
                    let n = &stage.norm;
                    dp += da_scale * (n.scale[0][ci] - n.scale[1][ci]) + sum_g * (n.shift[0][ci] - n.shift[1][ci]);
                }
                (dp, dsig)
            };
            let per_sample: Vec<(f32, Vec<f32>)> = if b == 1 && ch >= 2 && pair::available() {
                // One image: half of the channels on the pair's helper thread.
                let half = ch / 2;
                let [(dp0, mut dsig), (dp1, dsig1)] = pair::halves(&mut dz, half * hw, |t, dz| {
                    sample(0, if t == 0 { 0..half } else { half..ch }, dz)
                });
                dsig.extend(dsig1);
                vec![(dp0 + dp1, dsig)]
            } else if b == 1 {
                vec![sample(0, 0..ch, &mut dz)]
            } else {
                dz.par_chunks_mut(ch * hw)
                    .enumerate()
                    .map(|(bi, dz)| sample(bi, 0..ch, dz))
                    .collect()
            };
            for (bi, (d, dsig)) in per_sample.into_iter().enumerate() {
                dp[bi] += d;
                if let Some(j) = stage.signal {
                    dsignals[j][bi * ch..(bi + 1) * ch]
                        .iter_mut()
                        .zip(dsig)
                        .for_each(|(a, b)| *a += b);
                }
            }
            let g = stage.conv.input_grad(&dz, st.in_dims)?;
            if i == 0 {
                dx = g;
                dh = Vec::new();
            } else {
                dh = g;
            }
        }
        if let Some(r) = &self.router {
            // p_clean = softmax(t)[0]: dp/dt = p (1 - p) (1, -1).
            let mut dt = dtype.unwrap_or_else(|| vec![0f32; 2 * b]);
            for bi in 0..b {
                let p = tape.p_clean[bi];
                dt[2 * bi] += dp[bi] * p * (1.0 - p);
                dt[2 * bi + 1] -= dp[bi] * p * (1.0 - p);
            }
            let mut dhidden = vec![0f32; tape.hidden_pre.len()];
            r.out.add_input_grad(&dt, &mut dhidden);
            for (d, &pre) in dhidden.iter_mut().zip(&tape.hidden_pre) {
                if pre < 0.0 {
                    *d = 0.0;
                }
            }
            let mut dfeat = vec![0f32; tape.feat.len()];
            r.hidden.add_input_grad(&dhidden, &mut dfeat);
            for ((head, ds), s) in r.heads.iter().zip(&dsignals).zip(&tape.signals) {
                // signal = scale * sigmoid(u): d signal / du = signal (1 - signal / scale).
                let du: Vec<f32> = ds.iter().zip(s).map(|(d, s)| d * s * (1.0 - s / r.scale)).collect();
                head.add_input_grad(&du, &mut dfeat);
            }
            let mut dcur = spread_avg(&dfeat, tape.router_out_dims);
            for (conv, (in_dims, y)) in r.convs.iter().zip(&tape.router).rev() {
                let gate = |(d, &v): (&mut f32, &f32)| {
                    if v <= 0.0 {
                        *d = 0.0;
                    }
                };
                if dcur.len() < PAR_MIN {
                    dcur.iter_mut().zip(y).for_each(gate);
                } else {
                    dcur.par_iter_mut().zip(y).for_each(gate);
                }
                dcur = conv.input_grad(&dcur, *in_dims)?;
            }
            if dx.len() < PAR_MIN {
                dx.iter_mut().zip(&dcur).for_each(|(a, b)| *a += b);
            } else {
                dx.par_iter_mut().zip(&dcur).for_each(|(a, b)| *a += b);
            }
        }
        debug_assert_eq!(dx.len(), tape.x_dims.iter().product::<usize>());
        Ok((out, dx))
    }
}

/// The backbone's current activations: the last stage's pooled output, else its ReLU output as
/// the tape keeps it, else the input.
fn current<'a>(pooled: &'a Option<Vec<f32>>, stages: &'a [StageTape], x: &'a [f32]) -> &'a [f32] {
    match (pooled, stages.last()) {
        (Some(p), _) => p,
        (None, Some(prev)) => &prev.y,
        (None, None) => x,
    }
}

fn sigmoid(u: f32) -> f32 {
    1.0 / (1.0 + (-u).exp())
}

/// `softmax(a, b)[0]`.
fn softmax2(a: f32, b: f32) -> f32 {
    1.0 / (1.0 + (b - a).exp())
}

/// `[b, c, h, w]` to `[b, c]` means.
fn global_avg(x: &[f32], d: [usize; 4]) -> Vec<f32> {
    let hw = d[2] * d[3];
    // Each plane summed in 8 lanes, which vectorises (a single running sum cannot).
    let mean = |p: &[f32]| {
        let (eights, rest) = p.as_chunks::<8>();
        let mut acc = [0f32; 8];
        for e in eights {
            (0..8).for_each(|l| acc[l] += e[l]);
        }
        (acc.iter().sum::<f32>() + rest.iter().sum::<f32>()) / hw as f32
    };
    if x.len() < PAR_MIN {
        x.chunks(hw).map(mean).collect()
    } else {
        x.par_chunks(hw).map(mean).collect()
    }
}

/// The gradient of the last activations (dims `d`) from that of the logits, back through the
/// linear layer and global average pooling.
fn head_grad(fc: &PLinear, dlogits: &[f32], b: usize, d: [usize; 4]) -> Vec<f32> {
    let mut dg = vec![0f32; b * fc.d_in];
    fc.add_input_grad(dlogits, &mut dg);
    spread_avg(&dg, d)
}

/// The gradient of [`global_avg`]: each of `[b, c]` spread evenly over its plane.
fn spread_avg(dg: &[f32], d: [usize; 4]) -> Vec<f32> {
    let hw = d[2] * d[3];
    let mut out = zeros(dg.len() * hw);
    each_plane(&mut out, hw, |p, plane| plane.fill(dg[p] / hw as f32));
    out
}

fn max_pool(x: &[f32], d: [usize; 4]) -> (Vec<f32>, [usize; 4]) {
    let (h, w) = (d[2], d[3]);
    let (ho, wo) = (h / 2, w / 2);
    let mut y = zeros(d[0] * d[1] * ho * wo);
    let pool = |(y, plane): (&mut [f32], &[f32])| {
        for (i, y) in y.chunks_mut(wo).enumerate() {
            let (r0, r1) = (&plane[2 * i * w..], &plane[(2 * i + 1) * w..]);
            for (j, y) in y.iter_mut().enumerate() {
                *y = r0[2 * j].max(r0[2 * j + 1]).max(r1[2 * j]).max(r1[2 * j + 1]);
            }
        }
    };
    if x.len() < PAR_MIN {
        y.chunks_mut(ho * wo).zip(x.chunks(h * w)).for_each(pool);
    } else {
        y.par_chunks_mut(ho * wo).zip(x.par_chunks(h * w)).for_each(pool);
    }
    (y, [d[0], d[1], ho, wo])
}

/// The gradient of [`max_pool`]: each value to the first maximum of its window in `x`.
fn unpool(dy: &[f32], x: &[f32], d: [usize; 4]) -> Vec<f32> {
    let (h, w, planes) = (d[2], d[3], d[0] * d[1]);
    let mut dx = zeros(x.len());
    if d[0] > 1 && x.len() >= PAR_MIN {
        // A batch: planes on rayon's pool.
        let (hw, hw_out) = (h * w, (h / 2) * (w / 2));
        dx.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .zip(dy.par_chunks(hw_out))
            .for_each(|((dx, x), dy)| unpool_planes(dy, x, h, w, dx));
    } else if d[0] == 1 && planes >= 2 && pair::available() {
        let half = planes / 2;
        pair::halves(&mut dx, half * h * w, |t, dx| {
            let p = if t == 0 { 0 } else { half };
            unpool_planes(&dy[p * (h / 2) * (w / 2)..], &x[p * h * w..], h, w, dx)
        });
    } else {
        unpool_planes(dy, x, h, w, &mut dx);
    }
    dx
}

/// [`unpool`] of as many `h x w` planes as `dx` holds, from the first of `dy` and `x`.
fn unpool_planes(dy: &[f32], x: &[f32], h: usize, w: usize, dx: &mut [f32]) {
    let (ho, wo) = (h / 2, w / 2);
    if ho * wo == 0 {
        return;
    }
    for ((dx, x), dy) in dx.chunks_mut(h * w).zip(x.chunks(h * w)).zip(dy.chunks(ho * wo)) {
        for (i, dy) in dy.chunks(wo).enumerate() {
            fused::unpool_row(dy, &x[2 * i * w..], &mut dx[2 * i * w..], w);
        }
    }
}
