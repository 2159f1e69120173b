//! The project's own CPU convolution: im2col around the `gemm` crate, a few samples per task on
//! rayon's pool (one product per image, or per group of images on small maps; one image's
//! convolution split over two threads), with the input gradient and the weight gradient as
//! separate kernels that the backward pass runs only for the arguments that need them. A batch's
//! 3x3 "same" convolutions with enough channels go to Winograd's F(2x2, 3x3) instead
//! (`winograd.rs`, `winograd::applies`), all three kernels.
//!
//! candle 0.11's CPU convolution reaches a fraction of the gemm ceiling here, its input gradient is
//! a naive `conv_transpose2d`, and its backward always computes the weight gradient too, even in an
//! attack over frozen weights. This module replaces all three for `f32` and `f64` CPU tensors;
//! other devices and dtypes keep candle's convolution (`conv2d`).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType, bail};
use std::any::{Any, TypeId};
use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::{Mutex, OnceLock};

use rayon::prelude::*;

#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
use super::direct;
use super::lanes::F8;
use super::{pair, winograd};

/// Square kernel, equal stride and padding on both axes, no dilation, no groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Geom {
    pub(super) b: usize,
    pub(super) c_in: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) c_out: usize,
    pub(super) k: usize,
    pub(super) stride: usize,
    pub(super) pad: usize,
    pub(super) h_out: usize,
    pub(super) w_out: usize,
}

impl Geom {
    pub(super) fn new(x: &[usize], w: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let (&[b, c_in, h, wd], &[c_out, wc_in, k, k2]) = (x, w) else {
            bail!("convolution wants [b, c, h, w] input and [c_out, c_in, k, k] weight, got {x:?} and {w:?}")
        };
        if wc_in != c_in || k != k2 || stride == 0 || k == 0 || h + 2 * pad < k || wd + 2 * pad < k {
            bail!("convolution of {x:?} with weight {w:?}, stride {stride}, padding {pad} is not defined")
        }
        Ok(Self {
            b,
            c_in,
            h,
            w: wd,
            c_out,
            k,
            stride,
            pad,
            h_out: (h + 2 * pad - k) / stride + 1,
            w_out: (wd + 2 * pad - k) / stride + 1,
        })
    }

    /// Rows of the im2col matrix: `c_in * k * k`.
    fn kdim(&self) -> usize {
        self.c_in * self.k * self.k
    }

    fn hw(&self) -> usize {
        self.h * self.w
    }

    fn hw_out(&self) -> usize {
        self.h_out * self.w_out
    }

    /// A 1x1 convolution with stride 1 and no padding needs no im2col: the image is the matrix.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }

    /// Stride 1 with the output the input's size (3x3 with padding 1, 5x5 with 2, ...): each row
    /// of the column matrix is the image plane shifted, which `im2col` and `col2im` move in one
    /// piece.
    fn is_same(&self) -> bool {
        self.stride == 1 && self.w_out == self.w && self.h_out == self.h
    }

    /// For [`Self::is_same`]: the zeros before and after a plane in a buffer from which every
    /// column-matrix row reads one contiguous span, `pad` lines and `pad` values.
    fn same_margin(&self) -> usize {
        self.pad * self.w + self.pad
    }

    /// For [`Self::is_same`]: where column-matrix row `r` (`ki * k + kj`) starts reading in a
    /// plane with [`Self::same_margin`] zeros before it.
    fn same_offset(&self, r: usize) -> usize {
        let (ki, kj) = (r / self.k, r % self.k);
        ki * self.w + kj
    }

    /// For [`Self::is_same`]: per row `ki * k + kj` of the column matrix, `hw` flags, true where
    /// the entry reads inside the image, false where it reads padding (or, across a line's
    /// end, the next line's start). Empty for other convolutions.
    fn same_masks(&self) -> Vec<bool> {
        if !self.is_same() {
            return Vec::new();
        }
        let hw = self.hw();
        let mut masks = vec![false; self.k * self.k * hw];
        for (r, mask) in masks.chunks_exact_mut(hw).enumerate() {
            let (oy_lo, oy_hi) = self.valid(r / self.k, self.h_out, self.h);
            let (ox_lo, ox_hi) = self.valid(r % self.k, self.w_out, self.w);
            for line in mask.chunks_exact_mut(self.w).take(oy_hi).skip(oy_lo) {
                line[ox_lo..ox_hi].fill(true);
            }
        }
        masks
    }

    /// Output columns `[lo, hi)` of row `ki` (or `kj`) that read inside the image.
    fn valid(&self, kk: usize, n_out: usize, n_in: usize) -> (usize, usize) {
        // o * stride + kk - pad in [0, n_in)
        let lo = self.pad.saturating_sub(kk).div_ceil(self.stride);
        let hi = (n_in + self.pad).saturating_sub(kk).div_ceil(self.stride).min(n_out);
        (lo.min(hi), hi)
    }
}

/// `cols[(ci, ki, kj), (oy, ox)] = x[ci, oy*s + ki - p, ox*s + kj - p]`, zero outside.
#[cfg(test)]
fn im2col<T: WithDType>(g: &Geom, x: &[T], cols: &mut [T]) {
    im2col_chans(g, &Reads::new(g), x, cols, 0..g.c_in, g.hw_out())
}

/// [`im2col`]'s rows of the input channels `chans` only, into `cols` starting at the first, each
/// row `ld` values after the one before (`hw_out`, or more when several images share the matrix).
/// `reads` is built once per convolution by the caller.
fn im2col_chans<T: WithDType>(g: &Geom, reads: &Reads, x: &[T], cols: &mut [T], chans: Range<usize>, ld: usize) {
    let (k, s, p, wo, ho) = (g.k, g.stride, g.pad, g.w_out, g.h_out);
    let first = chans.start * k * k;
    if g.is_same() {
        let (hw, kk, margin) = (g.hw(), k * k, g.same_margin());
        // Each plane once into the middle of a zeroed buffer, so that every row is one
        // contiguous read at its offset, with the entries that read padding masked to zero:
        // no per-row arithmetic, which dominated on ResNet-18's 8x8 and 4x4 maps.
        let mut padded = vec![T::zero(); hw + 2 * margin];
        for (c, ci) in chans.enumerate() {
            padded[margin..margin + hw].copy_from_slice(&x[ci * hw..(ci + 1) * hw]);
            for (r, mask) in reads.same.chunks_exact(hw).enumerate() {
                let src = &padded[g.same_offset(r)..][..hw];
                let row = &mut cols[(c * kk + r) * ld..][..hw];
                for ((d, &v), &m) in row.iter_mut().zip(src).zip(mask) {
                    *d = if m { v } else { T::zero() };
                }
            }
        }
        return;
    }
    if let Some(hv) = &reads.halving {
        let (mut buf, mut eo) = (hv.buffer(), hv.split_buffer());
        for (c, ci) in chans.enumerate() {
            hv.split(&x[ci * g.hw()..(ci + 1) * g.hw()], &mut buf, &mut eo);
            for r in 0..k * k {
                let row = &mut cols[(c * k * k + r) * ld..][..g.hw_out()];
                let src = &buf[hv.start(r)..][..g.hw_out()];
                for ((d, &v), &m) in row.iter_mut().zip(src).zip(hv.mask(r)) {
                    *d = if m { v } else { T::zero() };
                }
            }
        }
        return;
    }
    for ci in chans {
        let plane = &x[ci * g.hw()..(ci + 1) * g.hw()];
        for ki in 0..k {
            let (oy_lo, oy_hi) = g.valid(ki, ho, g.h);
            for kj in 0..k {
                let (ox_lo, ox_hi) = g.valid(kj, wo, g.w);
                let row = &mut cols[((ci * k + ki) * k + kj - first) * ld..][..g.hw_out()];
                row[..oy_lo * wo].fill(T::zero());
                row[oy_hi * wo..].fill(T::zero());
                for oy in oy_lo..oy_hi {
                    let src = &plane[(oy * s + ki - p) * g.w..][..g.w];
                    let dst = &mut row[oy * wo..(oy + 1) * wo];
                    dst[..ox_lo].fill(T::zero());
                    dst[ox_hi..].fill(T::zero());
                    if s == 1 {
                        let start = ox_lo + kj - p;
                        dst[ox_lo..ox_hi].copy_from_slice(&src[start..start + ox_hi - ox_lo]);
                    } else {
                        for ox in ox_lo..ox_hi {
                            dst[ox] = src[ox * s + kj - p];
                        }
                    }
                }
            }
        }
    }
}

/// How a convolution's column matrix reads its input, worked out once per convolution.
struct Reads {
    /// [`Geom::same_masks`].
    same: Vec<bool>,
    halving: Option<Halving>,
}

impl Reads {
    fn new(g: &Geom) -> Self {
        Self {
            same: g.same_masks(),
            halving: Halving::new(g),
        }
    }
}

/// Values copied as one piece where a line is at most this wide.
const LANES: usize = 16;

/// A stride-2 convolution that halves an even map (3x3 with padding 1, 1x1 without), through the
/// input plane's four phases: phase `(a, b)` holds rows `a, a + 2, ...` and, of those, columns
/// `b, b + 2, ...`. Kernel offset `(ki, kj)` reads input `(2 oy + ki - p, 2 ox + kj - p)`: phase
/// `((ki - p) mod 2, (kj - p) mod 2)` at `(oy + dy, ox + dx)`, `dy = floor((ki - p) / 2)`. With the
/// output as wide as a phase, that is one contiguous span of the phase, shifted by
/// `dy * w / 2 + dx`, with the entries that fall outside it masked to zero: a row of the column
/// matrix is one masked copy, as for a stride-1 "same" convolution (`Geom::same_masks`).
/// Before, each row was gathered line by line from every other value, which took more time than
/// the product on the router's stride-2 convolutions. Batch 128, interleaved runs, before ->
/// after: 16 -> 32 channels from 28x28 1.9-2.6 -> 1.4-1.5 ms (forward), 6.7-7.1 -> 3.6-4.8 ms
/// (forward and input gradient); 32 -> 64 from 14x14 1.4-2.0 -> 1.0-1.2 and 4.2-4.5 -> 2.7-3.3.
struct Halving {
    /// A phase's rows and columns.
    rows: usize,
    cols: usize,
    /// Values between phases in the buffer (and before the first, after the last): room for
    /// the shifted spans to read, masked, and for whole-vector copies to run past a line.
    margin: usize,
    /// Per kernel offset: where its span starts in the buffer.
    starts: Vec<usize>,
    /// Per kernel offset, `hw_out` flags: true where the span reads inside its phase.
    masks: Vec<bool>,
    hw_out: usize,
}

impl Halving {
    fn new(g: &Geom) -> Option<Self> {
        let (h, w) = (g.h, g.w);
        if g.stride != 2 || h % 2 != 0 || w % 2 != 0 || g.h_out != h / 2 || g.w_out != w / 2 {
            return None;
        }
        let (rows, cols, hw_out) = (h / 2, w / 2, g.hw_out());
        let reach = g.pad.div_ceil(2) + 1;
        let margin = reach * (cols + 1) + LANES;
        let (mut starts, mut masks) = (Vec::new(), Vec::new());
        let shift = |kk: usize| {
            let u = kk as isize - g.pad as isize;
            (u.rem_euclid(2) as usize, u.div_euclid(2))
        };
        for r in 0..g.k * g.k {
            let ((a, dy), (b, dx)) = (shift(r / g.k), shift(r % g.k));
            let phase = margin + (2 * a + b) * (rows * cols + margin);
            starts.push((phase as isize + dy * cols as isize + dx) as usize);
            for oy in 0..g.h_out as isize {
                for ox in 0..g.w_out as isize {
                    let (y, x) = (oy + dy, ox + dx);
                    masks.push(y >= 0 && y < rows as isize && x >= 0 && x < cols as isize);
                }
            }
        }
        Some(Self {
            rows,
            cols,
            margin,
            starts,
            masks,
            hw_out,
        })
    }

    /// The four phases with their margins. A margin holds whatever whole-vector copies left
    /// there and is only ever read masked, so `im2col` zeroes the buffer once, not per plane.
    fn buffer<T: WithDType>(&self) -> Vec<T> {
        vec![T::zero(); self.margin + 4 * (self.rows * self.cols + self.margin)]
    }

    /// Room for a plane's even and odd columns, each `h x w / 2`, and a whole vector after each.
    fn split_buffer<T: WithDType>(&self) -> Vec<T> {
        vec![T::zero(); 2 * (2 * self.rows * self.cols + LANES)]
    }

    /// [`Self::split_buffer`] and room for the interleaved plane.
    fn merge_buffer<T: WithDType>(&self) -> Vec<T> {
        vec![T::zero(); 2 * (2 * self.rows * self.cols + LANES) + 4 * self.rows * self.cols]
    }

    fn start(&self, r: usize) -> usize {
        self.starts[r]
    }

    fn mask(&self, r: usize) -> &[bool] {
        &self.masks[r * self.hw_out..(r + 1) * self.hw_out]
    }

    /// Where phase `(a, b)`'s row `i` starts.
    fn line(&self, a: usize, b: usize, i: usize) -> usize {
        self.margin + (2 * a + b) * (self.rows * self.cols + self.margin) + i * self.cols
    }

    /// `plane` (`h x w`) into its phases in `buf`: its even and odd columns first (one pass over
    /// the whole plane, since no pair crosses a line), then each line of those to its phase.
    fn split<T: WithDType>(&self, plane: &[T], buf: &mut [T], eo: &mut [T]) {
        let half = 2 * self.rows * self.cols;
        let (even, odd) = eo.split_at_mut(half + LANES);
        winograd::deinterleave(plane, &mut even[..half], &mut odd[..half]);
        let n = self.cols;
        for y in 0..2 * self.rows {
            for (b, src) in [(0, &even[y * n..]), (1, &odd[y * n..])] {
                let at = self.line(y % 2, b, y / 2);
                if n <= LANES {
                    // A whole vector: what runs past the line lands on the phase's next line
                    // (written after this one) or in the margin.
                    let v: [T; LANES] = src[..LANES].try_into().expect("a whole vector");
                    buf[at..at + LANES].copy_from_slice(&v);
                } else {
                    buf[at..at + n].copy_from_slice(&src[..n]);
                }
            }
        }
    }

    /// The adjoint of [`Self::split`]: the phases in `buf` added onto `plane`.
    fn merge<T: WithDType>(&self, buf: &[T], plane: &mut [T], eo: &mut [T]) {
        let half = 2 * self.rows * self.cols;
        let (even, rest) = eo.split_at_mut(half + LANES);
        let (odd, tmp) = rest.split_at_mut(half + LANES);
        let n = self.cols;
        for y in 0..2 * self.rows {
            for (b, dst) in [(0, &mut even[y * n..]), (1, &mut odd[y * n..])] {
                let at = self.line(y % 2, b, y / 2);
                if n <= LANES {
                    let v: [T; LANES] = buf[at..at + LANES].try_into().expect("a whole vector");
                    dst[..LANES].copy_from_slice(&v);
                } else {
                    dst[..n].copy_from_slice(&buf[at..at + n]);
                }
            }
        }
        let tmp = &mut tmp[..2 * half];
        winograd::interleave(&even[..half], &odd[..half], tmp);
        plane.iter_mut().zip(tmp.iter()).for_each(|(d, &v)| *d += v);
    }
}

/// The adjoint of `im2col`: adds every column entry onto the pixel it was read from, in `dx`,
/// which the caller zeroes.
#[cfg(test)]
fn col2im<T: WithDType>(g: &Geom, cols: &[T], dx: &mut [T]) {
    col2im_chans(g, &Reads::new(g), cols, dx, 0..g.c_in, g.hw_out())
}

/// [`col2im`] for the input channels `chans` only: their rows of the column matrix in `cols`
/// (`ld` apart, as in [`im2col_chans`]), their planes in `dx`, each starting at the first.
fn col2im_chans<T: WithDType>(g: &Geom, reads: &Reads, cols: &[T], dx: &mut [T], chans: Range<usize>, ld: usize) {
    let (k, s, p, wo, ho) = (g.k, g.stride, g.pad, g.w_out, g.h_out);
    if g.is_same() {
        let (hw, kk, margin) = (g.hw(), k * k, g.same_margin());
        // The adjoint of `im2col_chans`'s padded plane: each row added at its offset into a
        // zeroed buffer (entries that read padding masked out), the middle then onto `dx`.
        let mut padded = vec![T::zero(); hw + 2 * margin];
        for (c, plane) in dx.chunks_exact_mut(hw).take(chans.len()).enumerate() {
            padded.fill(T::zero());
            for (r, mask) in reads.same.chunks_exact(hw).enumerate() {
                let dst = &mut padded[g.same_offset(r)..][..hw];
                let row = &cols[(c * kk + r) * ld..][..hw];
                for ((d, &v), &m) in dst.iter_mut().zip(row).zip(mask) {
                    *d += if m { v } else { T::zero() };
                }
            }
            for (d, &v) in plane.iter_mut().zip(&padded[margin..margin + hw]) {
                *d += v;
            }
        }
        return;
    }
    if let Some(hv) = &reads.halving {
        // The adjoint of `im2col_chans`'s: each row added, masked, into the phases, which are
        // then merged onto the plane.
        let mut buf = hv.buffer();
        let mut eo = hv.merge_buffer();
        for (ci, plane) in dx.chunks_exact_mut(g.hw()).take(chans.len()).enumerate() {
            buf.fill(T::zero());
            for r in 0..k * k {
                let row = &cols[(ci * k * k + r) * ld..][..g.hw_out()];
                let dst = &mut buf[hv.start(r)..][..g.hw_out()];
                for ((d, &v), &m) in dst.iter_mut().zip(row).zip(hv.mask(r)) {
                    *d += if m { v } else { T::zero() };
                }
            }
            hv.merge(&buf, plane, &mut eo);
        }
        return;
    }
    for ci in 0..chans.len() {
        let plane = &mut dx[ci * g.hw()..(ci + 1) * g.hw()];
        for ki in 0..k {
            let (oy_lo, oy_hi) = g.valid(ki, ho, g.h);
            for kj in 0..k {
                let (ox_lo, ox_hi) = g.valid(kj, wo, g.w);
                let row = &cols[((ci * k + ki) * k + kj) * ld..][..g.hw_out()];
                for oy in oy_lo..oy_hi {
                    let dst = &mut plane[(oy * s + ki - p) * g.w..][..g.w];
                    let src = &row[oy * wo..(oy + 1) * wo];
                    if s == 1 {
                        // Contiguous on both sides: a slice add the compiler vectorises.
                        let start = ox_lo + kj - p;
                        for (d, &v) in dst[start..start + ox_hi - ox_lo].iter_mut().zip(&src[ox_lo..ox_hi]) {
                            *d += v;
                        }
                    } else {
                        for ox in ox_lo..ox_hi {
                            dst[ox * s + kj - p] += src[ox];
                        }
                    }
                }
            }
        }
    }
}

/// Row-major matrix view for `gemm`: pointer, row stride, column stride.
#[derive(Clone, Copy)]
pub(super) struct Mat<T> {
    pub(super) ptr: *const T,
    pub(super) rs: isize,
    pub(super) cs: isize,
}

impl<T> Mat<T> {
    pub(super) fn rows(ptr: *const T, cols: usize) -> Self {
        Self {
            ptr,
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose of a row-major `[rows, cols]` matrix.
    pub(super) fn transposed(ptr: *const T, cols: usize) -> Self {
        Self {
            ptr,
            rs: 1,
            cs: cols as isize,
        }
    }
}

/// `dst[m, n] (+)= lhs[m, k] * rhs[k, n]`, `dst` row-major, single-threaded (the callers already
/// run one sample per thread).
///
/// # Safety
/// `lhs` and `rhs` must address `m x k` and `k x n` readable elements with their strides; `dst`
/// must hold `m * n` elements.
pub(super) unsafe fn matmul<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
) {
    debug_assert!(dst.len() >= m * n);
    // SAFETY: the caller guarantees the extents of lhs and rhs; dst is [m, n] row-major.
    unsafe { matmul_into(m, n, k, dst.as_mut_ptr(), n, accumulate, lhs, rhs) }
}

/// [`matmul`] into `m x n` entries of a row-major matrix whose rows are `dst_stride` apart.
///
/// # Safety
/// As [`matmul`], and `dst` must address `m` rows of `n` writable elements, `dst_stride` apart,
/// that nothing else reads or writes meanwhile.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_into<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_stride: usize,
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
) {
    // SAFETY: the caller guarantees the extents; gemm's `alpha` scales the old `dst` (read only
    // when `read_dst`) and `beta` the product.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_stride as isize,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Columns a product should have at least: smaller maps (ResNet-18's last stages, 8x8 and 4x4)
/// share one column matrix between several images, since gemm is slow on thin products (and a
/// weight-gradient product over 16 columns reads and writes the whole `[c_out, kd]` result for
/// little work).
const MIN_COLS: usize = 256;

/// Images per product: one for maps of `MIN_COLS` outputs or more, and for pointwise
/// convolutions, whose image already is the matrix.
fn group(g: &Geom) -> usize {
    if g.is_pointwise() {
        1
    } else {
        (MIN_COLS / g.hw_out().max(1)).clamp(1, g.b.max(1))
    }
}

/// Samples per rayon task: enough tasks to balance, few enough to reuse the im2col buffer, and a
/// whole number of `group`s.
pub(super) fn chunk(b: usize, group: usize) -> usize {
    b.div_ceil(4 * rayon::current_num_threads())
        .max(1)
        .next_multiple_of(group)
}

/// `n` images' `[c, hw]` maps, one after another in `src`, as one `[c, n * hw]` matrix in `dst`.
fn gather<T: Copy>(src: &[T], c: usize, hw: usize, dst: &mut [T]) {
    let ld = src.len() / c;
    for (i, image) in src.chunks_exact(c * hw).enumerate() {
        for (ch, plane) in image.chunks_exact(hw).enumerate() {
            dst[ch * ld + i * hw..][..hw].copy_from_slice(plane);
        }
    }
}

/// The inverse of [`gather`]: a `[c, n * hw]` matrix back into `n` images' `[c, hw]` maps.
fn scatter<T: Copy>(src: &[T], c: usize, hw: usize, dst: &mut [T]) {
    let ld = dst.len() / c;
    for (i, image) in dst.chunks_exact_mut(c * hw).enumerate() {
        for (ch, plane) in image.chunks_exact_mut(hw).enumerate() {
            plane.copy_from_slice(&src[ch * ld + i * hw..][..hw]);
        }
    }
}

thread_local! {
    /// Each thread's column matrices, one per dtype, kept between calls.
    static COLS: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
}

/// `f` over a column-matrix buffer of `n` values that this thread keeps between calls. Its
/// contents are stale, and are never zeroed: `im2col` and a product that does not accumulate
/// write every element before anything reads it (zeroing cost about as much as filling it).
pub(super) fn with_cols<T: WithDType, R>(n: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    let held = COLS.with_borrow_mut(|held| {
        let i = held.iter().position(|b| b.is::<Vec<T>>())?;
        held.swap_remove(i).downcast::<Vec<T>>().ok()
    });
    let mut buf = held.map(|b| *b).unwrap_or_default();
    if buf.len() < n {
        buf.resize(n, T::zero());
    }
    let r = f(&mut buf[..n]);
    COLS.with_borrow_mut(|held| held.push(Box::new(buf)));
    r
}

/// `n` zeros. A batch's buffer is zeroed by rayon's pool, in pieces: the memset of a batch's
/// activations ran on the calling thread alone while the pool waited (6% of a batch PGD's
/// samples in a profile, all of them serial).
pub(crate) fn zeros<T: WithDType>(n: usize) -> Vec<T> {
    if n < PAR_MIN {
        return vec![T::zero(); n];
    }
    // A fill per piece is a memset; rayon's `collect` of zeros wrote them one at a time.
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(PAR_MIN)
        .for_each(|c| c.fill(MaybeUninit::new(T::zero())));
    // SAFETY: the pieces cover all `n` slots and each was filled.
    unsafe { v.set_len(n) };
    v
}

/// `n` values, written by `f(t, chunk)` for every chunk `t` of `size` values (as [`each_chunk`]),
/// each chunk zeroed by its own task just before `f`: the zeros then sit in the task's cache
/// when `f` overwrites or adds to them, where a separate zeroing pass wrote the whole buffer out
/// to memory first.
pub(super) fn zeroed_chunks<T: WithDType>(n: usize, size: usize, f: impl Fn(usize, &mut [T]) + Send + Sync) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    each_chunk(&mut v.spare_capacity_mut()[..n], size, |t, c| {
        c.fill(MaybeUninit::new(T::zero()));
        // SAFETY: every slot of `c` was just written, and `MaybeUninit<T>` has `T`'s layout.
        let c = unsafe { &mut *(c as *mut [MaybeUninit<T>] as *mut [T]) };
        f(t, c)
    });
    // SAFETY: the chunks cover all `n` slots and each was filled.
    unsafe { v.set_len(n) };
    v
}

/// Values below which an elementwise pass stays on the calling thread (a one-image attack's
/// largest map, 32 x 28 x 28, is under it; a batch's are far above).
pub(crate) const PAR_MIN: usize = 1 << 16;

/// `f(t, chunk)` for every chunk `t` of `size` values, on rayon's pool; inline when there is only
/// one, since handing a single task to the pool adds a thread wake-up (tens of microseconds, and
/// erratic on a virtual machine) to every convolution of an attack on one image.
pub(super) fn each_chunk<T: Send>(v: &mut [T], size: usize, f: impl Fn(usize, &mut [T]) + Send + Sync) {
    if v.len() <= size {
        f(0, v)
    } else {
        v.par_chunks_mut(size).enumerate().for_each(|(t, c)| f(t, c))
    }
}

/// One image on two threads: the input channels' rows of the column matrix, then the output's
/// columns, shared between the caller and [`pair`]'s helper.
fn forward_pair<T: WithDType>(g: &Geom, reads: &Reads, x: &[T], w: &[T], out: &mut [T], cols: &mut [T]) {
    let (kd, hwo, kk) = (g.kdim(), g.hw_out(), g.k * g.k);
    let half = g.c_in / 2;
    {
        let (top, bottom) = cols.split_at_mut(half * kk * hwo);
        let parts = [Mutex::new(Some(top)), Mutex::new(Some(bottom))];
        pair::both(&|t| {
            let part = parts[t].lock().ok().and_then(|mut p| p.take());
            if let Some(part) = part {
                let chans = if t == 0 { 0..half } else { half..g.c_in };
                im2col_chans(g, reads, x, part, chans, hwo);
            }
        });
    }
    // Column halves of `out`, a multiple of 16 wide so that both fill whole vectors.
    let split = (hwo / 2).next_multiple_of(16).min(hwo);
    let (cols, dst) = (cols.as_ptr() as usize, out.as_mut_ptr() as usize);
    pair::both(&|t| {
        let (n0, n1) = if t == 0 { (0, split) } else { (split, hwo) };
        // SAFETY: w is [c_out, kd] and cols [kd, hwo], both row-major; the two halves write
        // disjoint columns of out [c_out, hwo].
        unsafe {
            matmul_into(
                g.c_out,
                n1 - n0,
                kd,
                (dst as *mut T).add(n0),
                hwo,
                false,
                Mat::rows(w.as_ptr(), kd),
                Mat::rows((cols as *const T).add(n0), hwo),
            )
        }
    });
}

/// One image on two threads, each with half of the input channels: its rows of the column
/// matrix (a product with half of `w^T`'s rows), then its planes of `dx`.
fn input_grad_pair<T: WithDType>(g: &Geom, reads: &Reads, dy: &[T], w: &[T], dx: &mut [T], cols: &mut [T]) {
    let (kd, hwo, kk) = (g.kdim(), g.hw_out(), g.k * g.k);
    let half = g.c_in / 2;
    let (top, bottom) = cols.split_at_mut(half * kk * hwo);
    let (dx_top, dx_bottom) = dx.split_at_mut(half * g.hw());
    let parts = [Mutex::new(Some((top, dx_top))), Mutex::new(Some((bottom, dx_bottom)))];
    pair::both(&|t| {
        let Some((cols, dx)) = parts[t].lock().ok().and_then(|mut p| p.take()) else {
            return;
        };
        let chans = if t == 0 { 0..half } else { half..g.c_in };
        let rows = chans.len() * kk;
        // SAFETY: w^T is [kd, c_out] (w read with swapped strides); its rows from
        // `chans.start * kk` times dy [c_out, hwo] fill this half's rows [rows, hwo] of cols.
        unsafe {
            matmul(
                rows,
                hwo,
                g.c_out,
                cols,
                false,
                Mat::transposed(w.as_ptr().add(chans.start * kk), kd),
                Mat::rows(dy.as_ptr(), hwo),
            )
        };
        col2im_chans(g, reads, cols, dx, chans, hwo);
    });
}

/// Whether one image's convolution is shared with [`pair`]'s helper: a column matrix to split
/// by input channel, and more than one core to split it over.
fn paired(g: &Geom) -> bool {
    g.b == 1 && !g.is_pointwise() && g.c_in >= 2 && pair::available()
}

fn forward<T: WithDType>(g: &Geom, x: &[T], w: &[T], kept: Option<&Kept<T>>) -> Vec<T> {
    if winograd::applies(g) {
        return winograd::forward(g, x, w, kept.map(|k| &k.forward));
    }
    if let Some(y) = direct(g, false, x, w, kept.map(|k| &k.panels), None) {
        return y;
    }
    let reads = Reads::new(g);
    let (kd, hwo) = (g.kdim(), g.hw_out());
    if paired(g) {
        let mut out = zeros(g.b * g.c_out * hwo);
        with_cols(kd * hwo, |cols: &mut [T]| forward_pair(g, &reads, x, w, &mut out, cols));
        return out;
    }
    let n_g = group(g);
    let c = chunk(g.b, n_g);
    let cols_len = if g.is_pointwise() { 0 } else { kd * hwo * n_g };
    zeroed_chunks(g.b * g.c_out * hwo, c * g.c_out * hwo, |t, out| {
        with_cols(cols_len, |cols: &mut [T]| {
            for (j, out) in out.chunks_mut(n_g * g.c_out * hwo).enumerate() {
                let n = out.len() / (g.c_out * hwo);
                let x = &x[(t * c + j * n_g) * g.c_in * g.hw()..][..n * g.c_in * g.hw()];
                if g.is_pointwise() {
                    // SAFETY: w is [c_out, kd], x [kd, hwo] (n is 1), out [c_out, hwo].
                    unsafe {
                        matmul(
                            g.c_out,
                            hwo,
                            kd,
                            out,
                            false,
                            Mat::rows(w.as_ptr(), kd),
                            Mat::rows(x.as_ptr(), hwo),
                        )
                    };
                    continue;
                }
                let ld = n * hwo;
                for (i, x) in x.chunks_exact(g.c_in * g.hw()).enumerate() {
                    im2col_chans(g, &reads, x, &mut cols[i * hwo..], 0..g.c_in, ld);
                }
                let product = |dst: &mut [T]| {
                    // SAFETY: w is [c_out, kd], cols [kd, ld], dst [c_out, ld], all row-major.
                    unsafe {
                        matmul(
                            g.c_out,
                            ld,
                            kd,
                            dst,
                            false,
                            Mat::rows(w.as_ptr(), kd),
                            Mat::rows(cols.as_ptr(), ld),
                        )
                    }
                };
                if n == 1 {
                    product(out);
                } else {
                    with_cols(g.c_out * ld, |wide: &mut [T]| {
                        product(&mut *wide);
                        scatter(wide, g.c_out, hwo, out);
                    });
                }
            }
        })
    })
}

/// The forward pass (or with `grad`, the input gradient from `dy` as `a`) by `direct`'s kernels,
/// where one applies: `f32`, on a build with AVX-512; with `bias` (forward only),
/// `relu(conv + bias)`. `kept` keeps the filters' panels (one
/// layer's: its stride, so which kernel's panels it holds, never changes; the strided kernels
/// decline one image before the panels are made).
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
fn direct<T: WithDType>(
    g: &Geom,
    grad: bool,
    a: &[T],
    w: &[T],
    kept: Option<&OnceLock<Vec<T>>>,
    bias: Option<&[T]>,
) -> Option<Vec<T>> {
    if TypeId::of::<T>() != TypeId::of::<f32>() {
        return None;
    }
    let strided = if grad {
        direct::strided_grad_applies(g)
    } else {
        direct::strided_applies(g)
    };
    if !strided && !direct::applies(g, if grad { g.c_in } else { g.c_out }) {
        return None;
    }
    let make = || match (strided, grad) {
        (true, false) => direct::strided_panels(g, as_f32(w)),
        (true, true) => direct::strided_grad_panels(g, as_f32(w)),
        (false, _) => direct::panels(g, as_f32(w), grad),
    };
    let made;
    let panels = match kept {
        Some(k) => as_f32(k.get_or_init(|| from_f32(make()))),
        None => {
            made = make();
            &made
        }
    };
    let bias = bias.map(as_f32);
    Some(from_f32(match (strided, grad) {
        (true, false) => direct::strided_forward(g, as_f32(a), panels, bias),
        (true, true) => direct::strided_input_grad(g, as_f32(a), panels),
        (false, _) => direct::run(g, as_f32(a), panels, grad, bias),
    }))
}

/// One of a router's convolutions, for [`router_features`]: filters `[c_out, c_in, k, k]`, bias
/// `[c_out]`, stride and padding, and the kept forms of its filters.
pub(crate) struct RouterConv<'a> {
    pub(crate) w: &'a [f32],
    pub(crate) w_dims: [usize; 4],
    pub(crate) bias: &'a [f32],
    pub(crate) stride: usize,
    pub(crate) pad: usize,
    /// Read by the AVX-512 kernels alone.
    #[cfg_attr(not(all(target_arch = "x86_64", target_feature = "avx512f")), allow(dead_code))]
    pub(crate) kept: &'a Kept<f32>,
}

/// The global averages `[b, c3]` of a router's three convolutions on `x` `[b, c, h, w]`, each
/// with its bias and a ReLU, one image at a time through all three by `direct`'s kernels (no map
/// stored between layers); `None` where those kernels do not take the layers, or the build has
/// no AVX-512: the caller then runs the layers one by one.
pub(crate) fn router_features(x: &[f32], x_dims: [usize; 4], layers: &[RouterConv; 3]) -> Result<Option<Vec<f32>>> {
    let mut dims = x_dims;
    let mut geoms = Vec::with_capacity(3);
    for l in layers {
        let g = Geom::new(&dims, &l.w_dims, l.stride, l.pad)?;
        if l.w.len() != l.w_dims.iter().product::<usize>() || l.bias.len() != g.c_out {
            bail!("router convolution buffers do not match their shape {:?}", l.w_dims)
        }
        dims = [g.b, g.c_out, g.h_out, g.w_out];
        geoms.push(g);
    }
    if x.len() != x_dims.iter().product::<usize>() {
        bail!("{} values for router input {x_dims:?}", x.len())
    }
    Ok(fused_router(&geoms, x, layers))
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
fn fused_router(geoms: &[Geom], x: &[f32], layers: &[RouterConv; 3]) -> Option<Vec<f32>> {
    let g = [&geoms[0], &geoms[1], &geoms[2]];
    if !direct::features_apply(g) {
        return None;
    }
    // The same panels as `direct` keeps for each layer's forward pass.
    let panels: [&[f32]; 3] = std::array::from_fn(|i| {
        let (g, w) = (g[i], layers[i].w);
        layers[i]
            .kept
            .panels
            .get_or_init(|| {
                if i == 0 {
                    direct::panels(g, w, false)
                } else {
                    direct::strided_panels(g, w)
                }
            })
            .as_slice()
    });
    Some(direct::router_features(g, x, panels, layers.each_ref().map(|l| l.bias)))
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
fn fused_router(_: &[Geom], _: &[f32], _: &[RouterConv; 3]) -> Option<Vec<f32>> {
    None
}

/// The weight gradient by `direct`'s kernel, where it applies.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
fn direct_weight_grad<T: WithDType>(g: &Geom, dy: &[T], x: &[T]) -> Option<Vec<T>> {
    if TypeId::of::<T>() != TypeId::of::<f32>() || !direct::weight_applies(g) {
        return None;
    }
    Some(from_f32(direct::weight_grad(g, as_f32(dy), as_f32(x))))
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
fn direct_weight_grad<T: WithDType>(_: &Geom, _: &[T], _: &[T]) -> Option<Vec<T>> {
    None
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
fn direct<T: WithDType>(
    _: &Geom,
    _: bool,
    _: &[T],
    _: &[T],
    _: Option<&OnceLock<Vec<T>>>,
    _: Option<&[T]>,
) -> Option<Vec<T>> {
    None
}

/// A `T` slice as the `f32` slice it is; panics for any other `T`.
#[cfg_attr(not(all(target_arch = "x86_64", target_feature = "avx512f")), allow(dead_code))]
pub(super) fn as_f32<T: WithDType>(s: &[T]) -> &[f32] {
    assert_eq!(TypeId::of::<T>(), TypeId::of::<f32>());
    // SAFETY: `T` is `f32`.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) }
}

/// A mutable `T` slice as the `f32` slice it is; panics for any other `T`.
#[cfg_attr(not(all(target_arch = "x86_64", target_feature = "avx512f")), allow(dead_code))]
pub(super) fn as_f32_mut<T: WithDType>(s: &mut [T]) -> &mut [f32] {
    assert_eq!(TypeId::of::<T>(), TypeId::of::<f32>());
    // SAFETY: `T` is `f32`.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<f32>(), s.len()) }
}

/// An `f32` vector as the `Vec<T>` it is; panics for any other `T`.
#[cfg_attr(not(all(target_arch = "x86_64", target_feature = "avx512f")), allow(dead_code))]
fn from_f32<T: WithDType>(v: Vec<f32>) -> Vec<T> {
    assert_eq!(TypeId::of::<T>(), TypeId::of::<f32>());
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `T` is `f32`: the same allocation, length and capacity.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<T>(), v.len(), v.capacity()) }
}

/// `dx` from the output gradient `dy` `[b, c_out, h_out, w_out]` and the weight.
fn input_grad<T: WithDType>(g: &Geom, dy: &[T], w: &[T], kept: Option<&Kept<T>>) -> Vec<T> {
    if winograd::applies(g) {
        return winograd::input_grad(g, dy, w, kept.map(|k| &k.turned));
    }
    if let Some(dx) = direct(g, true, dy, w, kept.map(|k| &k.turned_panels), None) {
        return dx;
    }
    let reads = Reads::new(g);
    let (kd, hwo) = (g.kdim(), g.hw_out());
    if paired(g) {
        let mut dx = zeros(g.b * g.c_in * g.hw());
        with_cols(kd * hwo, |cols: &mut [T]| {
            input_grad_pair(g, &reads, dy, w, &mut dx, cols)
        });
        return dx;
    }
    let n_g = group(g);
    let c = chunk(g.b, n_g);
    let cols_len = if g.is_pointwise() { 0 } else { kd * hwo * n_g };
    zeroed_chunks(g.b * g.c_in * g.hw(), c * g.c_in * g.hw(), |t, dx| {
        with_cols(cols_len, |cols: &mut [T]| {
            for (j, dx) in dx.chunks_mut(n_g * g.c_in * g.hw()).enumerate() {
                let n = dx.len() / (g.c_in * g.hw());
                let dy = &dy[(t * c + j * n_g) * g.c_out * hwo..][..n * g.c_out * hwo];
                let ld = n * hwo;
                let product = |dy: &[T], dst: &mut [T]| {
                    // SAFETY: w^T is [kd, c_out], dy [c_out, ld], dst [kd, ld].
                    unsafe {
                        matmul(
                            kd,
                            ld,
                            g.c_out,
                            dst,
                            false,
                            Mat::transposed(w.as_ptr(), kd),
                            Mat::rows(dy.as_ptr(), ld),
                        )
                    }
                };
                if g.is_pointwise() {
                    product(dy, dx);
                    continue;
                }
                if n == 1 {
                    product(dy, &mut *cols);
                } else {
                    with_cols(g.c_out * ld, |wide: &mut [T]| {
                        gather(dy, g.c_out, hwo, wide);
                        product(wide, &mut *cols);
                    });
                }
                for (i, dx) in dx.chunks_exact_mut(g.c_in * g.hw()).enumerate() {
                    col2im_chans(g, &reads, &cols[i * hwo..], dx, 0..g.c_in, ld);
                }
            }
        })
    })
}

/// `dw` `[c_out, c_in, k, k]` from the output gradient and the input, summed over the batch.
///
/// Each task sums `dw^T = cols dy^T` (`[kd, c_out]`), transposed once at the end: gemm ran the
/// product the other way round, `dy cols^T`, at a quarter of the speed on ResNet-18's first stage
/// (`c_out` 64, `kd` 576, 1,024 columns: 42-51 against 157 GFLOP/s on one core), at 75-95% of
/// it on every other shape measured.
fn weight_grad<T: WithDType>(g: &Geom, dy: &[T], x: &[T]) -> Vec<T> {
    if winograd::applies(g) {
        return winograd::weight_grad(g, dy, x);
    }
    if let Some(dw) = direct_weight_grad(g, dy, x) {
        return dw;
    }
    let reads = Reads::new(g);
    let (kd, hwo) = (g.kdim(), g.hw_out());
    let n_g = group(g);
    let c = chunk(g.b, n_g);
    // Adds task `t`'s samples onto `dw_t`, or overwrites it when `fresh`.
    let partial = |t: usize, dw_t: &mut [T], fresh: bool| {
        let cols_len = if g.is_pointwise() { 0 } else { kd * hwo * n_g };
        let samples = t * c..((t + 1) * c).min(g.b);
        with_cols(cols_len, |buf: &mut [T]| {
            for (j, first) in samples.clone().step_by(n_g).enumerate() {
                let n = n_g.min(samples.end - first);
                let ld = n * hwo;
                let x = &x[first * g.c_in * g.hw()..][..n * g.c_in * g.hw()];
                let dy = &dy[first * g.c_out * hwo..][..n * g.c_out * hwo];
                let cols: &[T] = if g.is_pointwise() {
                    x
                } else {
                    for (i, x) in x.chunks_exact(g.c_in * g.hw()).enumerate() {
                        im2col_chans(g, &reads, x, &mut buf[i * hwo..], 0..g.c_in, ld);
                    }
                    buf
                };
                let mut product = |dy: &[T]| {
                    // SAFETY: cols is [kd, ld], dy^T [ld, c_out] (dy [c_out, ld] read with
                    // swapped strides), dw_t [kd, c_out].
                    unsafe {
                        matmul(
                            kd,
                            g.c_out,
                            ld,
                            &mut *dw_t,
                            j > 0 || !fresh,
                            Mat::rows(cols.as_ptr(), ld),
                            Mat::transposed(dy.as_ptr(), ld),
                        )
                    }
                };
                if n == 1 {
                    product(dy);
                } else {
                    with_cols(g.c_out * ld, |wide: &mut [T]| {
                        gather(dy, g.c_out, hwo, wide);
                        product(wide);
                    });
                }
            }
        });
    };
    let add = |mut dw_t: Vec<T>, t: usize| {
        let fresh = dw_t.is_empty();
        if fresh {
            dw_t = vec![T::zero(); kd * g.c_out];
        }
        partial(t, &mut dw_t, fresh);
        dw_t
    };
    sum_transposed(partial_sums(g.b.div_ceil(c), add), kd, g.c_out)
}

/// `add(part, t)` for the tasks `t` in `0..tasks`, with one part per thread's run of consecutive
/// tasks, not one per task; `add` gets an empty part to start each run. The runs are fixed by the
/// thread count alone, so the parts (and the order of their sums) do not depend on which thread
/// happened to steal what: a training run resumed from a checkpoint repeats the uninterrupted
/// one bit for bit. (rayon's `fold` splits where work is stolen, which changed the sums' rounding
/// from run to run once training steps ran on the pool.) A lone run stays on the calling thread.
pub(super) fn partial_sums<T: Send>(tasks: usize, add: impl Fn(Vec<T>, usize) -> Vec<T> + Sync + Send) -> Vec<Vec<T>> {
    let runs = rayon::current_num_threads().min(tasks).max(1);
    let run = |r: usize| (r * tasks / runs..(r + 1) * tasks / runs).fold(Vec::new(), &add);
    if runs == 1 {
        return vec![run(0)];
    }
    (0..runs).into_par_iter().map(run).filter(|p| !p.is_empty()).collect()
}

/// The sum of `parts`, each a row-major `[rows, cols]` matrix, transposed to `[cols, rows]`, on
/// rayon's pool: the parts added in place, then the transpose in tiles of 16 x 16, whose reads and
/// writes stay in cache. An element-by-element transpose of the last stage's `[4608, 512]` weight
/// gradient on one thread, one cache miss per write, took a quarter of that layer's
/// weight-gradient time.
pub(super) fn sum_transposed<T: WithDType>(parts: Vec<Vec<T>>, rows: usize, cols: usize) -> Vec<T> {
    let sum = sum_parts(parts);
    if sum.is_empty() {
        return vec![T::zero(); rows * cols];
    }
    transposed(&sum, rows, cols)
}

/// `m`, a row-major `[rows, cols]` matrix, transposed to `[cols, rows]` (see [`sum_transposed`]).
pub(super) fn transposed<T: WithDType>(m: &[T], rows: usize, cols: usize) -> Vec<T> {
    const TILE: usize = 16;
    let n = rows * cols;
    assert_eq!(m.len(), n);
    let mut out = vec![T::zero(); n];
    if n == 0 {
        return out;
    }
    for_chunks(&mut out, TILE * rows, |t, block| {
        let o0 = t * TILE;
        for i0 in (0..rows).step_by(TILE) {
            let i1 = (i0 + TILE).min(rows);
            for (oo, line) in block.chunks_exact_mut(rows).enumerate() {
                for (d, i) in line[i0..i1].iter_mut().zip(i0..i1) {
                    *d = m[i * cols + o0 + oo];
                }
            }
        }
    });
    out
}

/// The elementwise sum of equally long `parts`: the others added onto the first, in place, on
/// rayon's pool. Empty when there are no parts.
pub(super) fn sum_parts<T: WithDType>(parts: Vec<Vec<T>>) -> Vec<T> {
    let mut parts = parts.into_iter();
    let Some(mut sum) = parts.next() else {
        return Vec::new();
    };
    let rest: Vec<Vec<T>> = parts.collect();
    if !rest.is_empty() {
        sum.par_chunks_mut(PAR_MIN).enumerate().for_each(|(c, chunk)| {
            for part in &rest {
                for (a, &b) in chunk.iter_mut().zip(&part[c * PAR_MIN..]) {
                    *a += b;
                }
            }
        });
    }
    sum
}

/// `f(i, chunk)` for every chunk `i` of `size` values of `v`: on rayon's pool when `v` holds
/// `PAR_MIN` values or more, on the calling thread below that.
pub(super) fn for_chunks<T: Send>(v: &mut [T], size: usize, f: impl Fn(usize, &mut [T]) + Send + Sync) {
    if v.len() < PAR_MIN {
        v.chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        v.par_chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// What the kernels derive from a filter bank, kept by code whose weights do not change between
/// calls (an attack's snapshot, over its many steps): Winograd's transformed filters (16/9 of the
/// weights; on ResNet-18's 512-channel layers, making them cost as much as a quarter of the
/// layer's forward pass) and the direct kernels' panels, for the forward pass and the input
/// gradient, each made on first use. Winograd's and the direct kernels' are kept apart: which
/// of them a layer takes depends on the batch (Winograd wants more than one image). A `Kept`
/// belongs to one `w`: passing it with other weights gives wrong results.
pub(crate) struct Kept<T> {
    forward: OnceLock<Vec<T>>,
    turned: OnceLock<Vec<T>>,
    panels: OnceLock<Vec<T>>,
    turned_panels: OnceLock<Vec<T>>,
}

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Self {
            forward: OnceLock::new(),
            turned: OnceLock::new(),
            panels: OnceLock::new(),
            turned_panels: OnceLock::new(),
        }
    }
}

/// `conv(x, w)` over plain slices, for code that keeps its own buffers: `x` `[b, c_in, h, w]`
/// and `w` `[c_out, c_in, k, k]` give `[b, c_out, h_out, w_out]`, returned with its shape; with
/// `bias_relu`, `relu(conv(x, w) + bias)` (as `conv2d_bias_relu`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_slices<T: WithDType>(
    x: &[T],
    x_dims: [usize; 4],
    w: &[T],
    w_dims: [usize; 4],
    stride: usize,
    pad: usize,
    bias_relu: Option<&[T]>,
    kept: Option<&Kept<T>>,
) -> Result<(Vec<T>, [usize; 4])> {
    let g = Geom::new(&x_dims, &w_dims, stride, pad)?;
    if x.len() != x_dims.iter().product::<usize>()
        || w.len() != w_dims.iter().product::<usize>()
        || bias_relu.is_some_and(|b| b.len() != g.c_out)
    {
        bail!("convolution buffers do not match their shapes {x_dims:?} and {w_dims:?}")
    }
    let y = match bias_relu {
        Some(bias) => forward_bias_relu(&g, x, w, bias, kept),
        None => forward(&g, x, w, kept),
    };
    Ok((y, [g.b, g.c_out, g.h_out, g.w_out]))
}

/// The input gradient of [`forward_slices`]: `dy` `[b, c_out, h_out, w_out]` to `[b, c_in, h, w]`
/// for an input of shape `x_dims`.
pub(crate) fn input_grad_slices<T: WithDType>(
    dy: &[T],
    x_dims: [usize; 4],
    w: &[T],
    w_dims: [usize; 4],
    stride: usize,
    pad: usize,
    kept: Option<&Kept<T>>,
) -> Result<Vec<T>> {
    let g = Geom::new(&x_dims, &w_dims, stride, pad)?;
    if dy.len() != g.b * g.c_out * g.hw_out() || w.len() != w_dims.iter().product::<usize>() {
        bail!("convolution gradient buffers do not match the shapes {x_dims:?} and {w_dims:?}")
    }
    Ok(input_grad(&g, dy, w, kept))
}

/// A contiguous slice of a CPU storage of dtype `T`.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("the convolution kernel wants contiguous tensors")
    };
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

/// Which of the three kernels an op runs; each is a `CustomOp2` over two contiguous tensors.
#[derive(Clone, Copy, Debug)]
enum Kernel {
    /// `(x, w) -> y`
    Forward,
    /// `(dy, w) -> dx`, for an input of side `(h, w)`
    InputGrad { h: usize, w: usize },
    /// `(dy, x) -> dw`, for a kernel of side `k`
    WeightGrad { k: usize },
}

#[derive(Clone, Copy, Debug)]
struct ConvOp {
    kernel: Kernel,
    stride: usize,
    pad: usize,
}

impl ConvOp {
    fn run<T: WithDType>(&self, a: &[T], la: &Layout, b: &[T], lb: &Layout) -> Result<(Vec<T>, Shape)> {
        let (s, p) = (self.stride, self.pad);
        Ok(match self.kernel {
            Kernel::Forward => {
                let g = Geom::new(la.dims(), lb.dims(), s, p)?;
                (forward(&g, a, b, None), Shape::from((g.b, g.c_out, g.h_out, g.w_out)))
            }
            Kernel::InputGrad { h, w } => {
                let (&[bs, _, _, _], &[c_out, c_in, k, _]) = (la.dims(), lb.dims()) else {
                    bail!(
                        "input gradient of a convolution: bad shapes {:?} {:?}",
                        la.dims(),
                        lb.dims()
                    )
                };
                let g = Geom::new(&[bs, c_in, h, w], lb.dims(), s, p)?;
                if la.dims() != [bs, c_out, g.h_out, g.w_out] || k != g.k {
                    bail!("input gradient of a convolution: gradient {:?} for {g:?}", la.dims())
                }
                (input_grad(&g, a, b, None), Shape::from((bs, c_in, h, w)))
            }
            Kernel::WeightGrad { k } => {
                let (&[bs, c_out, _, _], xd) = (la.dims(), lb.dims()) else {
                    bail!("weight gradient of a convolution: bad shape {:?}", la.dims())
                };
                let g = Geom::new(xd, &[c_out, xd[1], k, k], s, p)?;
                if la.dims() != [bs, c_out, g.h_out, g.w_out] {
                    bail!("weight gradient of a convolution: gradient {:?} for {g:?}", la.dims())
                }
                (weight_grad(&g, a, b), Shape::from((c_out, g.c_in, k, k)))
            }
        })
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        match self.kernel {
            Kernel::Forward => "awnet-conv2d",
            Kernel::InputGrad { .. } => "awnet-conv2d-input-grad",
            Kernel::WeightGrad { .. } => "awnet-conv2d-weight-grad",
        }
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (v, shape) = self.run::<f32>(slice(s1, l1)?, l1, slice(s2, l2)?, l2)?;
                Ok((CpuStorage::F32(v), shape))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (v, shape) = self.run::<f64>(slice(s1, l1)?, l1, slice(s2, l2)?, l2)?;
                Ok((CpuStorage::F64(v), shape))
            }
            _ => bail!("{}: f32 or f64 tensors of one dtype only", self.name()),
        }
    }

    /// Each gradient only for an argument that needs one: frozen weights get none (attacks), and
    /// neither do the raw images of a training batch.
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let op = |kernel| ConvOp { kernel, ..*self };
        let dx = if x.track_op() {
            let (_, _, h, wd) = x.dims4()?;
            Some(dy.apply_op2_no_bwd(w, &op(Kernel::InputGrad { h, w: wd }))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let k = w.dim(3)?;
            Some(dy.apply_op2_no_bwd(&x.contiguous()?, &op(Kernel::WeightGrad { k }))?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// `conv2d(xs, weight)` with square kernel, stride and padding: `[b, c_in, h, w]` and
/// `[c_out, c_in, k, k]` to `[b, c_out, h', w']`. The project's kernels on the CPU for f32/f64,
/// candle's elsewhere; the results agree to rounding.
pub fn conv2d(xs: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let ours = xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::F64) && xs.dtype() == weight.dtype();
    if !ours {
        return xs.conv2d(weight, padding, stride, 1, 1);
    }
    let op = ConvOp {
        kernel: Kernel::Forward,
        stride,
        pad: padding,
    };
    xs.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

/// `relu(conv(x, w) + bias)` as one op: the bias and the ReLU in one pass over the convolution's
/// output; backward, the gradient masked by the output and summed per channel (the bias's
/// gradient) in one pass, then the convolution's own kernels. As a convolution followed by a fused
/// bias/ReLU op, each map was read and written three more times backward, with candle's gradient
/// accumulation (a zeroed tensor and an addition) between the two.
#[derive(Clone, Copy, Debug)]
struct ConvBiasRelu {
    stride: usize,
    pad: usize,
}

type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

impl ConvBiasRelu {
    fn run<T: WithDType>(&self, x: &[T], lx: &Layout, w: &[T], lw: &Layout, bias: &[T]) -> Result<(Vec<T>, Shape)> {
        let g = Geom::new(lx.dims(), lw.dims(), self.stride, self.pad)?;
        if bias.len() != g.c_out {
            bail!(
                "convolution bias of {} values for {} output channels",
                bias.len(),
                g.c_out
            )
        }
        let y = forward_bias_relu(&g, x, w, bias, None);
        Ok((y, Shape::from((g.b, g.c_out, g.h_out, g.w_out))))
    }

    /// The backward pass in one op of `direct`'s, where it applies (`f32` on an AVX-512 build, a
    /// trained weight, shapes its kernels take); `None` otherwise.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    fn direct_bwd(&self, x: &Tensor, w: &Tensor, bias: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Grads3>> {
        if dy.dtype() != DType::F32 || !w.track_op() {
            return Ok(None);
        }
        let g = Geom::new(x.dims(), w.dims(), self.stride, self.pad)?;
        let input_grad = x.track_op();
        if !direct::bias_relu_applies(&g, input_grad) {
            return Ok(None);
        }
        let (dw, db, dx) = with_values::<f32, _>(dy, |dy| {
            with_values(y, |y| {
                with_values(x, |xs| {
                    with_values(w, |ws| {
                        let panels = input_grad.then(|| {
                            if g.stride == 2 {
                                direct::strided_grad_panels(&g, ws)
                            } else {
                                direct::panels(&g, ws, true)
                            }
                        });
                        Ok(direct::bias_relu_backward(&g, dy, y, xs, panels.as_deref()))
                    })
                })
            })
        })?;
        let dev = y.device();
        Ok(Some((
            dx.map(|dx| Tensor::from_vec(dx, x.dims(), dev)).transpose()?,
            Some(Tensor::from_vec(dw, w.dims(), dev)?),
            bias.track_op()
                .then(|| Tensor::from_vec(db, bias.dims(), dev))
                .transpose()?,
        )))
    }

    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
    fn direct_bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Grads3>> {
        Ok(None)
    }
}

/// `relu(conv(x, w) + bias)`: the bias and the ReLU inside `direct`'s kernels where they take the
/// convolution (after Winograd's, as in [`forward`]), else in one pass over the output.
fn forward_bias_relu<T: WithDType>(g: &Geom, x: &[T], w: &[T], bias: &[T], kept: Option<&Kept<T>>) -> Vec<T> {
    if !winograd::applies(g)
        && let Some(y) = direct(g, false, x, w, kept.map(|k| &k.panels), Some(bias))
    {
        return y;
    }
    let mut y = forward(g, x, w, kept);
    each_plane(&mut y, g.hw_out(), |p, plane| {
        let b = bias[p % g.c_out];
        plane
            .iter_mut()
            .for_each(|v| *v = if *v + b > T::zero() { *v + b } else { T::zero() });
    });
    y
}

/// `f(p, plane)` for every `hw`-value plane of `v`, on rayon's pool for a large `v`.
pub(crate) fn each_plane<T: Send>(v: &mut [T], hw: usize, f: impl Fn(usize, &mut [T]) + Send + Sync) {
    if v.len() < PAR_MIN {
        v.chunks_mut(hw.max(1)).enumerate().for_each(|(p, c)| f(p, c));
    } else {
        v.par_chunks_mut(hw.max(1)).enumerate().for_each(|(p, c)| f(p, c));
    }
}

/// One plane of [`relu_masked`]: writes `g` and returns its sum; in [`F8`] lanes for f32.
fn mask_plane<T: WithDType>(dy: &[T], y: &[T], g: &mut [MaybeUninit<T>]) -> T {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: `T` is `f32`, so each slice is an `f32` slice of the same length.
        let (dy, y, g) = unsafe {
            (
                std::slice::from_raw_parts(dy.as_ptr().cast::<f32>(), dy.len()),
                std::slice::from_raw_parts(y.as_ptr().cast::<f32>(), y.len()),
                std::slice::from_raw_parts_mut(g.as_mut_ptr().cast::<MaybeUninit<f32>>(), g.len()),
            )
        };
        let ((dy8, dy_rest), (y8, y_rest)) = (dy.as_chunks::<8>(), y.as_chunks::<8>());
        let (g8, g_rest) = g.as_chunks_mut::<8>();
        let mut acc = F8::splat(0.0);
        for ((g, dy), y) in g8.iter_mut().zip(dy8).zip(y8) {
            let v = F8::load(dy).where_positive(F8::load(y));
            v.store(g);
            acc = acc.add(v);
        }
        let mut sum = acc.sum();
        for ((g, &dy), &y) in g_rest.iter_mut().zip(dy_rest).zip(y_rest) {
            let v = if y > 0.0 { dy } else { 0.0 };
            g.write(v);
            sum += v;
        }
        return T::from_f64(f64::from(sum));
    }
    let mut sum = T::zero();
    for ((g, &dy), &y) in g.iter_mut().zip(dy).zip(y) {
        let v = if y > T::zero() { dy } else { T::zero() };
        g.write(v);
        sum += v;
    }
    sum
}

/// `dy` where `y > 0`, else zero, and that gradient's sum per channel: `[b, c, hw]` maps. One
/// parallel pass writes the masked gradient into a buffer that is never zeroed or copied first.
fn relu_masked<T: WithDType>(dy: &[T], y: &[T], c: usize, hw: usize) -> (Vec<T>, Vec<T>) {
    let n = dy.len();
    let mut g: Vec<T> = Vec::with_capacity(n);
    let mut plane_sums = vec![T::zero(); n / hw.max(1)];
    let mask = |(p, (g, s)): (usize, (&mut [MaybeUninit<T>], &mut T))| {
        let r = p * hw..(p + 1) * hw;
        *s = mask_plane(&dy[r.clone()], &y[r], g);
    };
    let slots = &mut g.spare_capacity_mut()[..n];
    if n < PAR_MIN {
        slots
            .chunks_mut(hw.max(1))
            .zip(plane_sums.iter_mut())
            .enumerate()
            .for_each(mask);
    } else {
        slots
            .par_chunks_mut(hw.max(1))
            .zip(plane_sums.par_iter_mut())
            .enumerate()
            .for_each(mask);
    }
    // SAFETY: the planes cover all `n` slots (`n` is a whole number of planes) and each plane's
    // loops wrote every slot of it.
    unsafe { g.set_len(n) };
    let mut sums = vec![T::zero(); c];
    for (p, s) in plane_sums.into_iter().enumerate() {
        sums[p % c] += s;
    }
    (g, sums)
}

/// A contiguous CPU tensor's values, as a `T` slice, for the duration of `f`.
pub(super) fn with_values<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("the convolution kernel wants CPU tensors")
    };
    f(slice(cpu, layout)?)
}

impl CustomOp3 for ConvBiasRelu {
    fn name(&self) -> &'static str {
        "awnet-conv2d-bias-relu"
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
        match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (v, shape) = self.run::<f32>(slice(s1, l1)?, l1, slice(s2, l2)?, l2, slice(s3, l3)?)?;
                Ok((CpuStorage::F32(v), shape))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (v, shape) = self.run::<f64>(slice(s1, l1)?, l1, slice(s2, l2)?, l2, slice(s3, l3)?)?;
                Ok((CpuStorage::F64(v), shape))
            }
            _ => bail!("{}: f32 or f64 tensors of one dtype only", self.name()),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if let Some(grads) = self.direct_bwd(x, w, bias, y, dy)? {
            return Ok(grads);
        }
        let (c, hw) = (y.dim(1)?, y.dim(2)? * y.dim(3)?);
        let (g, sums) = match dy.dtype() {
            DType::F32 => {
                let (g, s) = with_values(dy, |dy| with_values(y, |y| Ok(relu_masked::<f32>(dy, y, c, hw))))?;
                (
                    Tensor::from_vec(g, y.dims(), y.device())?,
                    Tensor::from_vec(s, c, y.device())?,
                )
            }
            DType::F64 => {
                let (g, s) = with_values(dy, |dy| with_values(y, |y| Ok(relu_masked::<f64>(dy, y, c, hw))))?;
                (
                    Tensor::from_vec(g, y.dims(), y.device())?,
                    Tensor::from_vec(s, c, y.device())?,
                )
            }
            other => bail!("{}: no backward for {other:?}", self.name()),
        };
        let conv = ConvOp {
            kernel: Kernel::Forward,
            stride: self.stride,
            pad: self.pad,
        };
        let (dx, dw) = conv.bwd(x, w, y, &g)?;
        Ok((dx, dw, bias.track_op().then_some(sums)))
    }
}

/// `relu(conv2d(xs, weight) + bias)`, `bias` `[c_out]`: one op on the CPU for f32/f64 (see
/// [`ConvBiasRelu`]), the composite elsewhere.
pub fn conv2d_bias_relu(xs: &Tensor, weight: &Tensor, bias: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let ours = xs.device().is_cpu()
        && matches!(xs.dtype(), DType::F32 | DType::F64)
        && xs.dtype() == weight.dtype()
        && xs.dtype() == bias.dtype();
    if !ours {
        return conv2d(xs, weight, stride, padding)?
            .broadcast_add(&bias.reshape((1, (), 1, 1))?)?
            .relu();
    }
    let op = ConvBiasRelu { stride, pad: padding };
    xs.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::{Device, Var};

    pub(in crate::model) fn rand(shape: &[usize], seed: u64) -> Tensor {
        // A deterministic, non-symmetric fill (candle's CPU RNG cannot be seeded).
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f64 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// `d/dt sum(conv(x + t e_i, w) * probe)` by a central difference: exact up to rounding,
    /// since the convolution is linear in each argument.
    fn fd_grad(f: &dyn Fn(&Tensor) -> f64, at: &Tensor) -> Vec<f64> {
        let base = at.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        (0..base.len())
            .map(|i| {
                let mut v = base.clone();
                v[i] += 0.5;
                let up = f(&Tensor::from_vec(v.clone(), at.dims(), &Device::Cpu).unwrap());
                v[i] -= 1.0;
                let down = f(&Tensor::from_vec(v, at.dims(), &Device::Cpu).unwrap());
                up - down
            })
            .collect()
    }

    /// The forward pass against candle's reference convolution, and both gradients against
    /// exact differences, on many shapes, strides and paddings (f64, so an indexing error shows
    /// far above rounding). candle's own backward cannot be the reference: it returns an input
    /// gradient of the wrong shape whenever the stride does not divide the padded extent.
    #[test]
    fn agrees_with_references_on_many_shapes() {
        let cases = [
            // (b, c_in, h, w, c_out, k, stride, pad)
            (2, 1, 5, 5, 3, 3, 1, 1),
            (3, 2, 7, 6, 4, 3, 2, 1),
            (1, 3, 8, 8, 2, 1, 2, 0),
            (2, 4, 6, 6, 5, 1, 1, 0),
            (2, 2, 9, 9, 3, 5, 1, 2),
            (5, 3, 4, 4, 2, 3, 1, 0),
            (1, 2, 10, 7, 3, 3, 3, 2),
            (9, 1, 3, 3, 1, 3, 1, 1),
            (2, 3, 6, 9, 2, 3, 1, 1),
            (2, 2, 1, 4, 3, 3, 1, 1),
            // Maps under MIN_COLS outputs share a product: several groups per task, a last
            // group of one, and a strided one.
            (40, 2, 8, 8, 3, 3, 1, 1),
            (13, 2, 16, 16, 2, 3, 2, 1),
            // One image with channels to split: the two-thread path where there are two cores.
            (1, 3, 6, 9, 2, 3, 1, 1),
            (1, 5, 20, 20, 4, 3, 1, 1),
            (1, 4, 9, 9, 3, 3, 2, 1),
            // Strided: stride 2 halving an even map goes through its phases (`Halving`: 3x3,
            // 4x4 and 5x5 kernels, lines as wide as one vector copy and wider, a group of
            // images); the rest gathers (odd sizes, stride 3, padding wider than the kernel).
            (3, 2, 28, 28, 4, 3, 2, 1),
            (2, 2, 8, 10, 3, 4, 2, 1),
            (2, 2, 12, 10, 3, 5, 2, 2),
            (2, 2, 40, 36, 2, 3, 2, 1),
            (2, 2, 32, 34, 2, 1, 2, 0),
            (7, 3, 14, 14, 2, 3, 2, 1),
            (2, 3, 26, 27, 4, 3, 2, 1),
            (1, 2, 40, 38, 3, 3, 3, 2),
            (3, 2, 9, 8, 3, 3, 2, 0),
            (2, 2, 7, 7, 3, 4, 2, 1),
            (2, 1, 6, 5, 2, 3, 2, 3),
            (2, 2, 9, 10, 2, 1, 3, 0),
        ];
        for (i, &(b, ci, h, w, co, k, s, p)) in cases.iter().enumerate() {
            let x = Var::from_tensor(&rand(&[b, ci, h, w], i as u64)).unwrap();
            let wt = Var::from_tensor(&rand(&[co, ci, k, k], 100 + i as u64)).unwrap();
            let probe = rand(&[b, co, (h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1], 7);
            let ours = conv2d(&x, &wt, s, p).unwrap();
            let theirs = x.conv2d(&wt, p, s, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "case {i}");
            assert!(max_diff(&ours, &theirs) < 1e-12, "forward, case {i}");
            let grads = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let objective = |x: &Tensor, w: &Tensor| -> f64 {
                let y = conv2d(x, w, s, p).unwrap();
                (y * &probe).unwrap().sum_all().unwrap().to_scalar().unwrap()
            };
            let wd = wt.as_detached_tensor();
            let xd = x.as_detached_tensor();
            for (what, v, reference) in [
                ("input", x.as_tensor(), fd_grad(&|t| objective(t, &wd), &xd)),
                ("weight", wt.as_tensor(), fd_grad(&|t| objective(&xd, t), &wd)),
            ] {
                let got = grads.get(v).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let d = got
                    .iter()
                    .zip(&reference)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                assert!(d < 1e-9, "{what} gradient, case {i}: {d}");
            }
        }
    }

    /// The two-thread kernels for one image equal the one-thread ones, on any machine (with one
    /// core, `pair::both` runs both halves in turn).
    #[test]
    fn the_split_kernels_match_the_whole_ones() {
        for (i, &(c_in, h, w, c_out, k, s, p)) in [
            (2, 5, 5, 3, 3, 1, 1),
            (3, 28, 28, 8, 3, 1, 1),
            (7, 14, 14, 6, 3, 1, 1),
            (4, 9, 11, 3, 3, 2, 1),
            (4, 14, 14, 3, 3, 2, 1),
            (3, 8, 8, 2, 5, 1, 2),
        ]
        .iter()
        .enumerate()
        {
            let g = Geom::new(&[1, c_in, h, w], &[c_out, c_in, k, k], s, p).unwrap();
            let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let x = flat(rand(&[1, c_in, h, w], i as u64));
            let wt = flat(rand(&[c_out, c_in, k, k], 50 + i as u64));
            let dy = flat(rand(&[1, c_out, g.h_out, g.w_out], 90 + i as u64));
            let close = |a: &[f64], b: &[f64], what: &str| {
                assert_eq!(a.len(), b.len());
                let d = a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                assert!(d < 1e-12, "{what}, case {i}: {d}");
            };
            let mut cols = vec![f64::NAN; g.kdim() * g.hw_out()];
            let mut y = vec![0.0; c_out * g.hw_out()];
            forward_pair(&g, &Reads::new(&g), &x, &wt, &mut y, &mut cols);
            let mut cols1 = vec![0.0; cols.len()];
            im2col(&g, &x, &mut cols1);
            let mut y1 = vec![0.0; y.len()];
            // SAFETY: as in `forward`.
            unsafe {
                matmul(
                    c_out,
                    g.hw_out(),
                    g.kdim(),
                    &mut y1,
                    false,
                    Mat::rows(wt.as_ptr(), g.kdim()),
                    Mat::rows(cols1.as_ptr(), g.hw_out()),
                )
            };
            close(&y, &y1, "forward");
            let mut dx = vec![0.0; c_in * h * w];
            input_grad_pair(&g, &Reads::new(&g), &dy, &wt, &mut dx, &mut cols);
            // The reference: the transposed product and col2im in one piece.
            unsafe {
                matmul(
                    g.kdim(),
                    g.hw_out(),
                    c_out,
                    &mut cols1,
                    false,
                    Mat::transposed(wt.as_ptr(), g.kdim()),
                    Mat::rows(dy.as_ptr(), g.hw_out()),
                )
            };
            let mut dx1 = vec![0.0; dx.len()];
            col2im(&g, &cols1, &mut dx1);
            close(&dx, &dx1, "input gradient");
        }
    }

    /// The convolution with its bias and ReLU as one op against the three ops composed, in f64:
    /// output and the gradients of input, weight and bias (stride 1 and 2, one and several
    /// input channels); a frozen bias gets no gradient.
    #[test]
    fn conv_bias_relu_matches_the_composite() {
        for (i, &(b, ci, h, co, s)) in [(2, 3, 8, 4, 1), (3, 2, 28, 5, 2), (2, 1, 6, 3, 1)].iter().enumerate() {
            let x = Var::from_tensor(&rand(&[b, ci, h, h], 10 + i as u64)).unwrap();
            let w = Var::from_tensor(&rand(&[co, ci, 3, 3], 20 + i as u64)).unwrap();
            let bias = Var::from_tensor(&(rand(&[co], 30 + i as u64) * 0.3).unwrap()).unwrap();
            let ho = (h + 2 - 3) / s + 1;
            let probe = rand(&[b, co, ho, ho], 40 + i as u64);
            let fused = conv2d_bias_relu(&x, &w, &bias, s, 1).unwrap();
            let plain = conv2d(&x, &w, s, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
                .unwrap()
                .relu()
                .unwrap();
            assert!(max_diff(&fused, &plain) < 1e-12, "forward, case {i}");
            let cut = fused
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .filter(|v| **v == 0.0)
                .count();
            assert!(
                cut > 0 && cut < fused.elem_count(),
                "case {i}: the ReLU cuts {cut} values"
            );
            let g1 = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (plain * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w, &bias] {
                let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert_eq!(a.dims(), b.dims());
                assert!(max_diff(a, b) < 1e-10, "gradient, case {i}: {}", max_diff(a, b));
            }
        }
        let x = Var::from_tensor(&rand(&[2, 2, 5, 5], 1)).unwrap();
        let (w, bias) = (rand(&[3, 2, 3, 3], 2), rand(&[3], 3));
        let g = conv2d_bias_relu(&x, &w, &bias, 1, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(x.as_tensor()).is_some() && g.get(&w).is_none() && g.get(&bias).is_none());
    }

    /// Frozen weights get no gradient computed, and raw inputs none either.
    #[test]
    fn computes_only_the_gradients_that_are_needed() {
        let x = Var::from_tensor(&rand(&[2, 2, 5, 5], 1)).unwrap();
        let w = rand(&[3, 2, 3, 3], 2);
        let g = conv2d(&x, &w, 1, 1).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
        assert!(g.get(&w).is_none());
        let w = Var::from_tensor(&w).unwrap();
        let x = rand(&[2, 2, 5, 5], 1);
        let g = conv2d(&x, &w, 1, 1).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(w.as_tensor()).is_some());
        assert!(g.get(&x).is_none());
    }

    #[test]
    fn f32_matches_f64() {
        let x = rand(&[4, 3, 9, 9], 3);
        let w = rand(&[6, 3, 3, 3], 4);
        let a = conv2d(&x, &w, 1, 1).unwrap();
        let b = conv2d(&x.to_dtype(DType::F32).unwrap(), &w.to_dtype(DType::F32).unwrap(), 1, 1)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
    }

    /// One `Kept` over a batch (Winograd, on AVX-512 builds) then one image (the direct kernels
    /// there): each kernel finds its own filters, and the results are those made without one.
    #[test]
    fn kept_filters_follow_the_kernel() {
        let (wd, xd) = ([64, 64, 3, 3], [1, 64, 32, 32]);
        let values = |shape: &[usize], seed| -> Vec<f32> {
            let t = rand(shape, seed).to_dtype(DType::F32).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        let (w, x) = (values(&wd, 1), values(&[2, 64, 32, 32], 2));
        let kept = Kept::default();
        forward_slices(&x, [2, 64, 32, 32], &w, wd, 1, 1, None, Some(&kept)).unwrap();
        input_grad_slices(&x, [2, 64, 32, 32], &w, wd, 1, 1, Some(&kept)).unwrap();
        let one = &x[..x.len() / 2];
        let (with, _) = forward_slices(one, xd, &w, wd, 1, 1, None, Some(&kept)).unwrap();
        let (without, _) = forward_slices(one, xd, &w, wd, 1, 1, None, None).unwrap();
        assert_eq!(with, without);
        let with = input_grad_slices(one, xd, &w, wd, 1, 1, Some(&kept)).unwrap();
        let without = input_grad_slices(one, xd, &w, wd, 1, 1, None).unwrap();
        assert_eq!(with, without);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = rand(&[1, 2, 2, 2], 0);
        assert!(conv2d(&x, &rand(&[1, 2, 5, 5], 0), 1, 0).is_err());
        assert!(conv2d(&x, &rand(&[1, 3, 1, 1], 0), 1, 0).is_err());
    }
}
