//! Fused CPU kernels for the elementwise tail of a block: `relu(x * scale + shift)` (eval-mode
//! BatchNorm or MixBN, with AW-Net's channel signals folded into `scale`) and 2x2 max pooling.
//! candle runs each as several passes over the activations forward and more backward; these run
//! one pass each way and compute only the gradients that are needed. f32 on the CPU; other
//! tensors take the plain candle ops, which agree to rounding.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::lanes::{F8, relu_grad_sums};

/// A contiguous f32 CPU view of a tensor for the duration of `f`.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    super::conv::with_values(t, f)
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("fused kernels take f32 tensors")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("fused kernels take contiguous tensors")
    };
    Ok(&data[a..b])
}

/// `relu(x * scale + shift)`; `scale` and `shift` are `[b, c]` (per sample) or `[c]`.
struct AffineRelu;

/// Index of the coefficient for (sample, channel).
fn coef(per_sample: bool, c: usize, bi: usize, ci: usize) -> usize {
    if per_sample { bi * c + ci } else { ci }
}

/// `count` planes of `hw` values, plane `p` being what `f(p)` yields, computed in parallel into a
/// buffer that is never zeroed first (for these memory-bound ops that pass costs as much as the
/// op itself).
fn planes<I: Iterator<Item = f32>>(count: usize, hw: usize, f: impl Fn(usize) -> I + Sync + Send) -> Vec<f32> {
    let n = count * hw;
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(hw.max(1))
        .enumerate()
        .for_each(|(p, plane)| {
            let mut written = 0;
            for (slot, value) in plane.iter_mut().zip(f(p)) {
                slot.write(value);
                written += 1;
            }
            assert_eq!(written, plane.len(), "a plane is written whole");
        });
    // SAFETY: every plane of the first `n` elements was written whole (asserted above; a panic
    // there leaves the length at 0).
    unsafe { v.set_len(n) };
    v
}

impl CustomOp3 for AffineRelu {
    fn name(&self) -> &'static str {
        "awnet-affine-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, scale, shift) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (_, c, h, w) = l1.shape().dims4()?;
        let per_sample = l2.dims().len() == 2;
        let hw = h * w;
        let y = planes(x.len() / hw.max(1), hw, |p| {
            let k = coef(per_sample, c, p / c, p % c);
            let (a, s) = (scale[k], shift[k]);
            x[p * hw..(p + 1) * hw].iter().map(move |&x| (x * a + s).max(0.0))
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, c, h, w) = x.dims4()?;
        let hw = h * w;
        let per_sample = scale.rank() == 2;
        let want = (x.track_op(), scale.track_op() || shift.track_op());
        // g = dy where y > 0; per (sample, channel) plane: sum g and sum g * x.
        let (dx, sums) = with_f32(dy, |dy| {
            with_f32(y, |y| {
                with_f32(x, |xv| {
                    with_f32(scale, |sc| {
                        // Skipped when no coefficient wants them. (In plain loops, even in 8
                        // lanes, they stayed scalar: a third of the router's time in an AW-Net
                        // training step.)
                        let sums = |p: usize| -> (f32, f32) {
                            let r = p * hw..(p + 1) * hw;
                            relu_grad_sums(&dy[r.clone()], &y[r.clone()], &xv[r], 0.0, &mut [])
                        };
                        if want.0 {
                            let dx = planes(b * c, hw, |p| {
                                let a = sc[coef(per_sample, c, p / c, p % c)];
                                let r = p * hw..(p + 1) * hw;
                                dy[r.clone()]
                                    .iter()
                                    .zip(&y[r])
                                    .map(move |(dy, y)| if *y > 0.0 { dy * a } else { 0.0 })
                            });
                            let sums = if want.1 {
                                (0..b * c).into_par_iter().map(sums).collect()
                            } else {
                                Vec::new()
                            };
                            Ok((Some(dx), sums))
                        } else if want.1 {
                            Ok((None, (0..b * c).into_par_iter().map(sums).collect()))
                        } else {
                            Ok((None, Vec::new()))
                        }
                    })
                })
            })
        })?;
        let dev = x.device();
        let dx = dx.map(|v| Tensor::from_vec(v, (b, c, h, w), dev)).transpose()?;
        let coefs = |pick: fn(&(f32, f32)) -> f32| -> Result<Tensor> {
            let per: Vec<f32> = sums.iter().map(pick).collect();
            let t = Tensor::from_vec(per, (b, c), dev)?;
            if per_sample { Ok(t) } else { t.sum(0) }
        };
        let dscale = if scale.track_op() { Some(coefs(|s| s.1)?) } else { None };
        let dshift = if shift.track_op() { Some(coefs(|s| s.0)?) } else { None };
        Ok((dx, dscale, dshift))
    }
}

fn fusable(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// `relu(x * scale + shift)` for `x` `[b, c, h, w]` and `scale`, `shift` both `[b, c]` or both `[c]`.
pub fn affine_relu(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let (b, c, _, _) = x.dims4()?;
    let per_sample = match (scale.dims(), shift.dims()) {
        ([bs, cs], [bh, ch]) if (*bs, *cs, *bh, *ch) == (b, c, b, c) => true,
        ([cs], [ch]) if (*cs, *ch) == (c, c) => false,
        (s, h) => bail!("affine_relu: coefficients {s:?} and {h:?} for input {:?}", x.dims()),
    };
    if !fusable(&[x, scale, shift]) {
        let shape = if per_sample { (b, c, 1, 1) } else { (1, c, 1, 1) };
        return x
            .broadcast_mul(&scale.reshape(shape)?)?
            .broadcast_add(&shift.reshape(shape)?)?
            .relu();
    }
    x.contiguous()?
        .apply_op3(&scale.contiguous()?, &shift.contiguous()?, AffineRelu)
}

/// The mean of each `h x w` plane: `[b, c, h, w] -> [b, c]`.
struct PlaneMean;

impl CustomOp1 for PlaneMean {
    fn name(&self) -> &'static str {
        "awnet-plane-mean"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1)?;
        let (b, c, h, w) = l1.shape().dims4()?;
        let hw = h * w;
        let means: Vec<f32> = (0..b * c)
            .into_par_iter()
            .map(|p| (lane_sum(&x[p * hw..(p + 1) * hw], |v| v) / hw as f64) as f32)
            .collect();
        Ok((CpuStorage::F32(means), Shape::from((b, c))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (b, c, h, w) = x.dims4()?;
        let hw = h * w;
        let dx = with_f32(dy, |dy| {
            Ok(planes(b * c, hw, |p| std::iter::repeat_n(dy[p] / hw as f32, hw)))
        })?;
        Tensor::from_vec(dx, (b, c, h, w), x.device()).map(Some)
    }
}

/// Global average pooling, `[b, c, h, w] -> [b, c]`, one parallel pass each way: candle's mean
/// over the two axes ran its backward as a broadcast and a scaling on one thread (4 ms of a
/// router's training step at batch 128 when it followed the router's first convolution).
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    if !fusable(&[x]) {
        return x.mean(3)?.mean(2);
    }
    x.contiguous()?.apply_op1(PlaneMean)
}

/// 2x2 max pooling with stride 2; the gradient goes to the first maximum of each window.
struct MaxPool2x2;

impl CustomOp1 for MaxPool2x2 {
    fn name(&self) -> &'static str {
        "awnet-max-pool-2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let (b, c, h, w) = l.shape().dims4()?;
        let (ho, wo) = (h / 2, w / 2);
        let mut y = vec![0f32; b * c * ho * wo];
        y.par_chunks_mut(ho * wo).zip(x.par_chunks(h * w)).for_each(|(y, x)| {
            for i in 0..ho {
                for j in 0..wo {
                    let (r0, r1) = (&x[2 * i * w..], &x[(2 * i + 1) * w..]);
                    y[i * wo + j] = r0[2 * j].max(r0[2 * j + 1]).max(r1[2 * j]).max(r1[2 * j + 1]);
                }
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((b, c, ho, wo))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let (b, c, h, w) = x.dims4()?;
        let wo = w / 2;
        let dx = with_f32(x, |x| {
            with_f32(dy, |dy| {
                let mut dx = super::conv::zeros::<f32>(x.len());
                dx.par_chunks_mut(2 * w)
                    .zip(x.par_chunks(2 * w))
                    .zip(dy.par_chunks(wo))
                    .for_each(|((dx, x), dy)| unpool_row(dy, x, dx, w));
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, (b, c, h, w), x.device())?))
    }
}

/// The gradient of one row of 2x2 windows: `x` and `dx` start at the windows' two rows of `w`
/// values, `dy` holds their gradients. Each goes to the first maximum of its window in row-major
/// order, found with selects rather than branches (a branchy search mispredicted on half the
/// windows: 11.7 -> 5.4 ms for a 128 x 32 x 28 x 28 map); the other three get zeros. An odd
/// row's last value is left as it is.
pub(crate) fn unpool_row(dy: &[f32], x: &[f32], dx: &mut [f32], w: usize) {
    let (x0, x1) = x[..2 * w].split_at(w);
    let (d0, d1) = dx[..2 * w].split_at_mut(w);
    for (j, &g) in dy.iter().enumerate() {
        let (a, b, c, d) = (x0[2 * j], x0[2 * j + 1], x1[2 * j], x1[2 * j + 1]);
        let (m, k) = if b > a { (b, 1) } else { (a, 0) };
        let (m, k) = if c > m { (c, 2) } else { (m, k) };
        let k = if d > m { 3 } else { k };
        let pick = |q: u8| if k == q { g } else { 0.0 };
        d0[2 * j] = pick(0);
        d0[2 * j + 1] = pick(1);
        d1[2 * j] = pick(2);
        d1[2 * j + 1] = pick(3);
    }
}

/// 2x2 max pooling with stride 2, `[b, c, h, w] -> [b, c, h/2, w/2]`; `h` and `w` even.
pub fn max_pool2x2(xs: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        bail!("2x2 max pooling needs even sides, got {h}x{w}");
    }
    if !fusable(&[xs]) {
        // Not candle's max_pool2d: its backward scales the gradient by 1/4.
        return xs.reshape((b, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3);
    }
    xs.contiguous()?.apply_op1(MaxPool2x2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 7919 + seed * 31) % 997) as f32) / 498.5 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The fused kernels against the plain ops (f64 copies), outputs and every gradient.
    #[test]
    fn agree_with_the_plain_ops() {
        for per_sample in [false, true] {
            let (b, c) = (3, 4);
            let coef_shape: &[usize] = if per_sample { &[b, c] } else { &[c] };
            let x = Var::from_tensor(&t(&[b, c, 6, 4], 1)).unwrap();
            let sc = Var::from_tensor(&t(coef_shape, 2)).unwrap();
            let sh = Var::from_tensor(&t(coef_shape, 3)).unwrap();
            let probe = t(&[b, c, 3, 2], 4);
            let fused = max_pool2x2(&affine_relu(&x, &sc, &sh).unwrap()).unwrap();
            let to64 = |v: &Var| v.as_tensor().to_dtype(DType::F64).unwrap();
            let (x64, sc64, sh64) = (to64(&x), to64(&sc), to64(&sh));
            let (x64, sc64, sh64) = (
                Var::from_tensor(&x64).unwrap(),
                Var::from_tensor(&sc64).unwrap(),
                Var::from_tensor(&sh64).unwrap(),
            );
            let plain = max_pool2x2(&affine_relu(&x64, &sc64, &sh64).unwrap()).unwrap();
            assert!(close(&fused, &plain.to_dtype(DType::F32).unwrap()) < 1e-6);
            let g1 = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (plain * probe.to_dtype(DType::F64).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (a, b) in [(&x, &x64), (&sc, &sc64), (&sh, &sh64)] {
                let ga = g1.get(a.as_tensor()).unwrap();
                let gb = g2.get(b.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
                assert!(close(ga, &gb) < 1e-4, "per_sample {per_sample}: {}", close(ga, &gb));
            }
        }
    }

    /// The fused global average pool against candle's means in f64, forward and gradient.
    #[test]
    fn global_avg_pool_agrees_with_the_means() {
        let x = Var::from_tensor(&t(&[3, 4, 5, 3], 5)).unwrap();
        let probe = t(&[3, 4], 6);
        let fused = global_avg_pool(&x).unwrap();
        let x64 = Var::from_tensor(&x.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
        let plain = x64.mean(3).unwrap().mean(2).unwrap();
        assert_eq!(fused.dims(), [3, 4]);
        assert!(close(&fused, &plain.to_dtype(DType::F32).unwrap()) < 1e-6);
        let g1 = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (plain * probe.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ga = g1.get(x.as_tensor()).unwrap();
        let gb = g2.get(x64.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
        assert!(close(ga, &gb) < 1e-6, "{}", close(ga, &gb));
    }

    #[test]
    fn only_needed_gradients() {
        let x = Var::from_tensor(&t(&[2, 2, 2, 2], 1)).unwrap();
        let (sc, sh) = (t(&[2], 2), t(&[2], 3));
        let g = affine_relu(&x, &sc, &sh)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(x.as_tensor()).is_some());
        assert!(g.get(&sc).is_none() && g.get(&sh).is_none());
    }
}

/// Train-mode batch normalisation with precomputed batch statistics, of `x = z * s[b, c]`:
/// `y = (x - mean[c]) * invstd[c] * weight[c] + bias[c]` over `[b, c, h, w]`, followed by a ReLU
/// when `relu` is set (then the gradient passes only where `y > 0`). `s` is AW-Net's per-sample
/// channel signal, ones for a static model; the op's inputs are `z`, `s` and `[weight; bias]`.
struct BatchNormTrain {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    relu: bool,
}

impl BatchNormTrain {
    fn plane(&self, c: usize, p: usize) -> (f32, f32) {
        (self.mean[p % c], self.invstd[p % c])
    }
}

/// One plane's sums for the backward pass, each over its `hw` values: the masked gradient `g`,
/// `g * xhat`, and for the signal's gradient `g * z`, `xhat * z` and `z`.
#[derive(Clone, Copy, Default)]
struct PlaneSums {
    g: f32,
    gx: f32,
    gz: f32,
    xz: f32,
    z: f32,
}

/// [`PlaneSums`] of one plane; `SIGNAL` adds the three sums that only the signal's gradient
/// needs. `xhat = (z * s - m) * is`.
fn plane_sums<const SIGNAL: bool>(dy: &[f32], y: &[f32], z: &[f32], smi: (f32, f32, f32), relu: bool) -> PlaneSums {
    if relu {
        lane_plane_sums::<SIGNAL, true>(dy, y, z, smi)
    } else {
        lane_plane_sums::<SIGNAL, false>(dy, y, z, smi)
    }
}

#[inline(always)]
fn lane_plane_sums<const SIGNAL: bool, const RELU: bool>(
    dy: &[f32],
    y: &[f32],
    z: &[f32],
    (s, m, is): (f32, f32, f32),
) -> PlaneSums {
    let zero = F8::splat(0.0);
    let [mut g, mut gx, mut gz, mut xz, mut zs] = [zero; 5];
    let (a, b) = (F8::splat(s * is), F8::splat(-m * is));
    let ((dy8, dy_rest), (y8, y_rest), (z8, z_rest)) = (dy.as_chunks::<8>(), y.as_chunks::<8>(), z.as_chunks::<8>());
    for ((dy, y), z) in dy8.iter().zip(y8).zip(z8) {
        let (d, zv) = (F8::load(dy), F8::load(z));
        let gv = if RELU { d.where_positive(F8::load(y)) } else { d };
        let xh = zv.mul_add(a, b);
        g = g.add(gv);
        gx = gv.mul_add(xh, gx);
        if SIGNAL {
            gz = gv.mul_add(zv, gz);
            xz = xh.mul_add(zv, xz);
            zs = zs.add(zv);
        }
    }
    let mut q = PlaneSums {
        g: g.sum(),
        gx: gx.sum(),
        gz: gz.sum(),
        xz: xz.sum(),
        z: zs.sum(),
    };
    for ((&dy, &y), &z) in dy_rest.iter().zip(y_rest).zip(z_rest) {
        let gv = if RELU && y <= 0.0 { 0.0 } else { dy };
        let xh = (z * s - m) * is;
        q.g += gv;
        q.gx += gv * xh;
        if SIGNAL {
            q.gz += gv * z;
            q.xz += xh * z;
            q.z += z;
        }
    }
    q
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "awnet-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (z, s, wb) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (_, c, h, wd) = l1.shape().dims4()?;
        let hw = h * wd;
        let (w, b) = wb.split_at(c);
        let relu = self.relu;
        let y = planes(z.len() / hw.max(1), hw, |p| {
            let (m, is) = self.plane(c, p);
            let (a, sh) = (s[p] * is * w[p % c], b[p % c] - m * is * w[p % c]);
            z[p * hw..(p + 1) * hw].iter().map(move |&z| {
                let v = z * a + sh;
                if relu { v.max(0.0) } else { v }
            })
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        z: &Tensor,
        s: &Tensor,
        wb: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, c, h, w) = z.dims4()?;
        let hw = h * w;
        let n = (b * hw) as f32;
        let relu = self.relu;
        let signal = s.track_op();
        // With g the gradient at the normalised value (dy, or 0 where the ReLU cut it off) and
        // xhat the normalised value, per channel: S = sum(g), SX = sum(g * xhat); then
        // dx = k (n g - S - xhat SX) with k = weight * invstd / n, dz = dx * s, and
        // ds = sum(dx * z) = k (n sum(g z) - S sum(z) - SX sum(xhat z)) from the plane sums.
        let (sums, dz, ds) = with_f32(dy, |dy| {
            with_f32(y, |y| {
                with_f32(z, |zv| {
                    with_f32(s, |sv| {
                        with_f32(wb, |wt| {
                            let per_plane: Vec<PlaneSums> = (0..b * c)
                                .into_par_iter()
                                .map(|p| {
                                    let (m, is) = self.plane(c, p);
                                    let r = p * hw..(p + 1) * hw;
                                    let (dy, y, z) = (&dy[r.clone()], &y[r.clone()], &zv[r]);
                                    if signal {
                                        plane_sums::<true>(dy, y, z, (sv[p], m, is), relu)
                                    } else {
                                        plane_sums::<false>(dy, y, z, (sv[p], m, is), relu)
                                    }
                                })
                                .collect();
                            let mut sums = vec![(0f32, 0f32); c];
                            for (p, q) in per_plane.iter().enumerate() {
                                sums[p % c].0 += q.g;
                                sums[p % c].1 += q.gx;
                            }
                            let k = |ch: usize| wt[ch] * self.invstd[ch] / n;
                            let ds = signal.then(|| {
                                per_plane
                                    .iter()
                                    .enumerate()
                                    .map(|(p, q)| {
                                        let (sg, sgx) = sums[p % c];
                                        k(p % c) * (n * q.gz - sg * q.z - sgx * q.xz)
                                    })
                                    .collect::<Vec<f32>>()
                            });
                            let dz =
                                z.track_op().then(|| {
                                    planes(b * c, hw, |p| {
                                        let (m, is) = self.plane(c, p);
                                        let (sg, sgx) = sums[p % c];
                                        let (sp, kp) = (sv[p], k(p % c));
                                        let r = p * hw..(p + 1) * hw;
                                        let gate = move |dy: f32, y: f32| dy * f32::from(u8::from(!(relu && y <= 0.0)));
                                        dy[r.clone()].iter().zip(&y[r.clone()]).zip(&zv[r]).map(
                                            move |((&dy, &y), &z)| {
                                                let xh = (z * sp - m) * is;
                                                kp * sp * (n * gate(dy, y) - sg - xh * sgx)
                                            },
                                        )
                                    })
                                });
                            Ok((sums, dz, ds))
                        })
                    })
                })
            })
        })?;
        let dev = z.device();
        let dz = dz.map(|v| Tensor::from_vec(v, (b, c, h, w), dev)).transpose()?;
        let ds = ds.map(|v| Tensor::from_vec(v, (b, c), dev)).transpose()?;
        let dwb = wb
            .track_op()
            .then(|| {
                let v: Vec<f32> = sums.iter().map(|s| s.1).chain(sums.iter().map(|s| s.0)).collect();
                Tensor::from_vec(v, 2 * c, dev)
            })
            .transpose()?;
        Ok((dz, ds, dwb))
    }
}

/// `sum(f(v))` over `v` in f64, in 8 lanes so that the loop vectorises: one running f64 sum is a
/// chain of dependent additions, and the mean's was the hottest line of a standard training
/// step's profile outside gemm (5%).
fn lane_sum(v: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let (chunks, rest) = v.as_chunks::<8>();
    let mut acc = [0f64; 8];
    for c in chunks {
        for l in 0..8 {
            acc[l] += f(f64::from(c[l]));
        }
    }
    acc.iter().sum::<f64>() + rest.iter().map(|&v| f(f64::from(v))).sum::<f64>()
}

/// Train-mode batch normalisation of `z * signal` (`z` `[b, c, h, w]` f32 on the CPU, `signal`
/// `[b, c]` or none) with batch statistics, one pass for the mean, one for the variance and one
/// for the output, with a ReLU after it when `relu` is set. The signal never makes a tensor of its
/// own: the passes scale each plane as they read it, and the backward pass gives the signal's
/// gradient from per-plane sums it takes anyway. Returns the output and the batch mean and
/// biased variance (`[c]`, detached) for the running statistics; `None` for other tensors.
pub fn batch_norm_train(
    z: &Tensor,
    signal: Option<&Tensor>,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let (b, c, h, w) = z.dims4()?;
    if signal.is_some_and(|s| s.dims() != [b, c]) {
        bail!(
            "batch_norm_train: signal {:?} for input {:?}",
            signal.map(Tensor::dims),
            z.dims()
        );
    }
    if !fusable(&[z, weight, bias]) || signal.is_some_and(|s| !fusable(&[s])) {
        return Ok(None);
    }
    let s = match signal {
        Some(s) => s.contiguous()?,
        None => Tensor::ones((b, c), DType::F32, z.device())?,
    };
    let hw = h * w;
    let n = (b * hw) as f64;
    let z = z.contiguous()?;
    let (mean, var) = with_f32(&z, |zv| {
        with_f32(&s, |sv| {
            let plane = |p: usize| &zv[p * hw..(p + 1) * hw];
            let sums: Vec<f64> = (0..b * c)
                .into_par_iter()
                .map(|p| f64::from(sv[p]) * lane_sum(plane(p), |v| v))
                .collect();
            let mut mean = vec![0f64; c];
            for (p, s) in sums.iter().enumerate() {
                mean[p % c] += s;
            }
            mean.iter_mut().for_each(|m| *m /= n);
            let sq: Vec<f64> = (0..b * c)
                .into_par_iter()
                .map(|p| {
                    let (m, sp) = (mean[p % c], f64::from(sv[p]));
                    lane_sum(plane(p), |v| (v * sp - m) * (v * sp - m))
                })
                .collect();
            let mut var = vec![0f64; c];
            for (p, s) in sq.iter().enumerate() {
                var[p % c] += s;
            }
            var.iter_mut().for_each(|v| *v /= n);
            Ok((mean, var))
        })
    })?;
    let op = BatchNormTrain {
        mean: mean.iter().map(|&m| m as f32).collect(),
        invstd: var.iter().map(|&v| (1.0 / (v + eps).sqrt()) as f32).collect(),
        relu,
    };
    let wb = Tensor::cat(&[weight, bias], 0)?;
    let y = z.apply_op3(&s, &wb, op)?;
    let dev = z.device();
    let to = |v: Vec<f64>| Tensor::from_vec(v.into_iter().map(|x| x as f32).collect::<Vec<f32>>(), c, dev);
    Ok(Some((y, to(mean)?, to(var)?)))
}

#[cfg(test)]
mod bn_tests {
    use super::*;
    use crate::model::layers::BatchNorm;
    use candle_core::{Device, Var};
    use candle_nn::{VarBuilder, VarMap};

    /// The fused train-mode BN, with and without its ReLU and AW-Net's signal, against the
    /// composite ops in f64: output, every gradient, and the running statistics it leaves.
    #[test]
    fn fused_train_batch_norm_matches_the_composite() {
        for relu in [false, true] {
            for signal in [false, true] {
                fused_train_batch_norm_case(relu, signal);
            }
        }
    }

    fn fused_train_batch_norm_case(relu: bool, signal: bool) {
        let make = |dtype: DType| {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
            let bn = BatchNorm::new(3, 1e-5, 0.1, vb).unwrap();
            for (name, v) in vm.data().lock().unwrap().iter() {
                let n = v.elem_count();
                let vals: Vec<f64> = (0..n)
                    .map(|i| 0.5 + 0.3 * i as f64 + if name.contains("bias") { -0.2 } else { 0.0 })
                    .collect();
                v.set(
                    &Tensor::from_vec(vals, n, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap(),
                )
                .unwrap();
            }
            (vm, bn)
        };
        let x0: Vec<f64> = (0..2 * 3 * 4 * 5).map(|i| ((i * 37 % 23) as f64) / 7.0 - 1.5).collect();
        let probe: Vec<f64> = (0..2 * 3 * 4 * 5).map(|i| ((i * 11 % 17) as f64) / 9.0 - 0.8).collect();
        // Signals in (0, 2), as the router's are, one per (sample, channel).
        let s0: Vec<f64> = (0..2 * 3).map(|i| 0.3 + 0.29 * i as f64).collect();
        let mut results = Vec::new();
        for dtype in [DType::F32, DType::F64] {
            let (vm, bn) = make(dtype);
            let x = Var::from_tensor(
                &Tensor::from_vec(x0.clone(), (2, 3, 4, 5), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let p = Tensor::from_vec(probe.clone(), (2, 3, 4, 5), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let s = Var::from_tensor(
                &Tensor::from_vec(s0.clone(), (2, 3), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let y = bn.forward_train(&x, signal.then_some(s.as_tensor()), relu).unwrap();
            let g = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            let data = vm.data().lock().unwrap();
            let mut r = vec![flat(&y), flat(g.get(x.as_tensor()).unwrap())];
            for name in ["weight", "bias"] {
                r.push(flat(g.get(data[name].as_tensor()).unwrap()));
            }
            for name in ["running_mean", "running_var"] {
                r.push(flat(data[name].as_tensor()));
            }
            if signal {
                r.push(flat(g.get(s.as_tensor()).unwrap()));
            }
            results.push(r);
        }
        if relu {
            let cut = results[0][0].iter().filter(|&&v| v == 0.0).count();
            assert!(cut > 10 && cut < 110, "the ReLU cuts {cut} of 120 values");
        }
        for (i, (a, b)) in results[0].iter().zip(&results[1]).enumerate() {
            let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
            assert!(d < 1e-4, "relu {relu}, signal {signal}: quantity {i} differs by {d}");
        }
        assert_eq!(results[0].len(), 6 + usize::from(signal));
    }
}
