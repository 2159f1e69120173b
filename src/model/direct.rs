//! Direct 3x3 convolution with stride 1 and padding 1, in AVX-512 registers, for `f32` maps 12 to
//! 16 or 26 to 32 values wide where Winograd does not apply (layers with fewer than 32 channels on
//! a side, such as the router's and both stems, and every layer on a single image, as in an
//! attack on one picture): forward, and the input gradient as the same convolution of `dy` with
//! the filters transposed and turned by 180 degrees.
//!
//! im2col + gemm moves every input value nine times into a column matrix, then gemm copies that
//! matrix once more into its own panels; on the small CNN's 32 -> 64 layer (14 x 14) those copies
//! took a quarter of the time. Here a tile of outputs, 8 channels by 2 vectors of 16 positions
//! (whole rows of the map), sums in 16 registers while the inputs are read straight from a
//! zero-padded copy of the image: per filter tap, 2 unaligned loads (the 16 positions of a row,
//! shifted by the tap), 8 broadcast weights and 16 fused multiply-adds. The lanes past a row's
//! end compute garbage from the next row and are never stored.
//!
//! The weight gradient runs its vectors along output channels instead (see [`weight_grad`]).

use std::arch::x86_64::*;
use std::ops::Range;

use super::conv::{Geom, chunk, partial_sums, sum_parts, sum_transposed, transposed, with_cols, zeroed_chunks};
use super::pair;

/// Output channels per tile: the broadcast weights of one filter tap.
const MR: usize = 8;

/// Vectors of 16 outputs per tile, so `8 N` accumulators. Three (two rows more per tile, but a
/// third row of 14 x 14 maps' last tile computed for nothing) measured 5-7% slower on the small
/// CNN's 14 x 14 layers, the same on 28 x 28.
const N: usize = 2;

/// Whether [`run`]'s forward pass (with `g.c_out` outputs) or input gradient (`g.c_in`) handle a
/// convolution: 3x3, stride 1, padding 1, a multiple of 8 output channels, and rows that fill at
/// least three quarters of the vector lanes they take (12..=16 or 26..=32 values; narrower maps
/// waste more than im2col's copies cost).
pub(super) fn applies(g: &Geom, outputs: usize) -> bool {
    let lanes = g.w.div_ceil(16) * 16;
    g.k == 3 && g.stride == 1 && g.pad == 1 && outputs.is_multiple_of(MR) && g.w <= 32 && 4 * g.w >= 3 * lanes
}

/// `y[b, o, h, w] = sum_{i, ki, kj} f(o, i, ki * 3 + kj) x[b, i, h + ki - 1, w + kj - 1]` for
/// `x` `[b, inputs, h, w]`, with the filters `f` given as their 8-channel panels.
fn conv(g: &Geom, x: &[f32], inputs: usize, outputs: usize, panels: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (h, w) = (g.h, g.w);
    let wp = w + 2;
    let plane = (h + 2) * wp;
    // Reads run past the last plane by up to two rows and a vector.
    let padded_len = inputs * plane + 3 * wp + 32;
    let (x_image, y_image) = (inputs * h * w, outputs * h * w);
    let blocks = outputs / MR;
    let mut y: Vec<f32> = Vec::with_capacity(g.b * y_image);
    let pad = |x: &[f32], xp: &mut [f32]| pad(x, h, w, xp);
    let slots = &mut y.spare_capacity_mut()[..g.b * y_image];
    if g.b == 1 && pair::available() && blocks > 1 {
        with_cols(padded_len, |xp: &mut [f32]| {
            pad(x, xp);
            let out = slots.as_mut_ptr() as usize;
            pair::both(&|t| {
                let range = if t == 0 { 0..blocks / 2 } else { blocks / 2..blocks };
                let (out, planes) = (out as *mut f32, Planes::dense(h, w));
                // SAFETY: `out` holds the image's `outputs` channels; the two halves write
                // disjoint ones.
                unsafe { image(xp, inputs, h, w, panels, bias, range, out, planes) };
            });
        });
    } else {
        let per_task = chunk(g.b, 1);
        super::conv::each_chunk(slots, per_task * y_image, |t, out| {
            with_cols(padded_len, |xp: &mut [f32]| {
                for (i, out) in out.chunks_exact_mut(y_image).enumerate() {
                    let n = t * per_task + i;
                    pad(&x[n * x_image..][..x_image], xp);
                    // SAFETY: `out` holds the image's `outputs` channels.
                    unsafe {
                        let out = out.as_mut_ptr().cast();
                        image(xp, inputs, h, w, panels, bias, 0..blocks, out, Planes::dense(h, w))
                    };
                }
            })
        });
    }
    // SAFETY: every image's every output channel, row and value was stored by `image`.
    unsafe { y.set_len(g.b * y_image) };
    y
}

/// One image's `[c, h, w]` maps `x` into `xp` with a line and a column of zeros on each side:
/// planes `(h + 2) (w + 2)` values apart, lines `w + 2`, zeros after the last plane too. Only the
/// border is zeroed, and each line moves in masked vectors: filling the whole buffer and then a
/// `copy_from_slice` call per line took a sixth of a router layer's time.
fn pad(x: &[f32], h: usize, w: usize, xp: &mut [f32]) {
    let (wp, plane) = (w + 2, (h + 2) * (w + 2));
    let planes = x.len() / (h * w);
    assert!(x.len() == planes * h * w && xp.len() >= planes * plane);
    for (src, dst) in x.chunks_exact(h * w).zip(xp.chunks_exact_mut(plane)) {
        // The top line and the first line's left zero; then per line its values, its right zero
        // and the next line's left one (the bottom line's first value, zeroed with it below).
        dst[..=wp].fill(0.0);
        for (r, row) in src.chunks_exact(w).enumerate() {
            let line = &mut dst[(r + 1) * wp..][..wp + 1];
            for k in (0..w).step_by(16) {
                let mask = (u32::MAX >> (32 - (w - k).min(16))) as __mmask16;
                // SAFETY: the mask takes the `min(w - k, 16)` values from `k` on, inside `row`
                // and inside `line[1..=w]`.
                unsafe {
                    let v = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(k));
                    _mm512_mask_storeu_ps(line.as_mut_ptr().add(1 + k), mask, v);
                }
            }
            line[w + 1] = 0.0;
            line[wp] = 0.0;
        }
        dst[(h + 1) * wp..].fill(0.0);
    }
    xp[planes * plane..].fill(0.0);
}

/// Where an image's output planes go: channel `c`'s row `r` starts at `c * plane + first + r * line`.
#[derive(Clone, Copy)]
struct Planes {
    plane: usize,
    line: usize,
    first: usize,
}

impl Planes {
    /// `[c, h, w]`, the planes one after another.
    fn dense(h: usize, w: usize) -> Self {
        Self {
            plane: h * w,
            line: w,
            first: 0,
        }
    }

    /// The interior of [`pad`]'s layout, `[c, h + 2, w + 2]`: the next layer's padded input.
    fn padded(h: usize, w: usize) -> Self {
        let wp = w + 2;
        Self {
            plane: (h + 2) * wp,
            line: wp,
            first: wp + 1,
        }
    }
}

/// One image's output channel blocks `blocks` from its padded input `xp`, written to `out` as
/// `planes` lays them out, in tiles of [`N`] vectors: two rows of up to 16 values, or one row of
/// up to 32; with `bias`, `relu(conv + bias)`.
///
/// # Safety
/// `out` must address the image's `outputs` channels as `planes` lays out `h` rows of `w`
/// values, writable, and nothing else may touch the channels of `blocks` meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn image(
    xp: &[f32],
    inputs: usize,
    h: usize,
    w: usize,
    panels: &[f32],
    bias: Option<&[f32]>,
    blocks: Range<usize>,
    out: *mut f32,
    planes: Planes,
) {
    let wp = w + 2;
    let per_row = w.div_ceil(16);
    let rows = N / per_row;
    let offsets: [usize; N] = std::array::from_fn(|j| (j / per_row) * wp + 16 * (j % per_row));
    let panel = inputs * 9 * MR;
    assert!(xp.len() >= inputs * (h + 2) * wp + 3 * wp + 32 && panels.len() >= blocks.end * panel);
    assert!(bias.is_none_or(|b| b.len() >= blocks.end * MR));
    for blk in blocks {
        let wk = &panels[blk * panel..][..panel];
        for oy in (0..h).step_by(rows) {
            // SAFETY: `xp` holds `inputs` padded planes and `3 wp + 32` values more, so every read
            // (padded row `oy + rows + 1 <= h + 2` at most, a vector from column
            // `16 (per_row - 1) + 2`) is inside it; `wk` holds the block's weights.
            let acc = unsafe {
                tile(
                    xp.as_ptr().add(oy * wp),
                    (2 + h) * wp,
                    wp,
                    inputs,
                    wk.as_ptr(),
                    &offsets,
                )
            };
            for (m, acc) in acc.iter().enumerate() {
                let channel = (blk * MR + m) * planes.plane + planes.first;
                // SAFETY: register operations only.
                let acc = bias.map_or(*acc, |b| unsafe {
                    let b = _mm512_set1_ps(b[blk * MR + m]);
                    acc.map(|a| _mm512_max_ps(_mm512_add_ps(a, b), _mm512_setzero_ps()))
                });
                for (j, acc) in acc.iter().enumerate() {
                    let (r, c0) = (oy + j / per_row, 16 * (j % per_row));
                    if r >= h {
                        continue;
                    }
                    let mask = (u32::MAX >> (32 - (w - c0).min(16))) as __mmask16;
                    // SAFETY: the mask stores `min(w - c0, 16)` lanes from row `r`'s value `c0`
                    // of channel `blk * 8 + m`, inside `out` (the caller's guarantee).
                    unsafe { _mm512_mask_storeu_ps(out.add(channel + r * planes.line + c0), mask, *acc) };
                }
            }
        }
    }
}

/// The `8 x N` accumulators of one tile: its vectors start at `xp + offsets[j]`, the first
/// tap's top-left corner; planes are `plane` values apart, rows `wp`.
///
/// # Safety
/// Every vector read, `xp + i * plane + offsets[j] + ki * wp + kj` for `i < inputs` and taps
/// `ki, kj < 3`, plus 16 values, must be inside one allocation; `wk` must hold `inputs * 72`
/// values.
#[inline(always)]
unsafe fn tile(
    xp: *const f32,
    plane: usize,
    wp: usize,
    inputs: usize,
    wk: *const f32,
    offsets: &[usize; N],
) -> [[__m512; N]; MR] {
    // SAFETY: the caller guarantees the extents of every read.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); N]; MR];
        for i in 0..inputs {
            let src = xp.add(i * plane);
            let wi = wk.add(i * 9 * MR);
            for ki in 0..3 {
                for kj in 0..3 {
                    let wt = wi.add((ki * 3 + kj) * MR);
                    let xv: [__m512; N] = std::array::from_fn(|j| _mm512_loadu_ps(src.add(offsets[j] + ki * wp + kj)));
                    for (m, acc) in acc.iter_mut().enumerate() {
                        let b = _mm512_set1_ps(*wt.add(m));
                        for (a, &v) in acc.iter_mut().zip(&xv) {
                            *a = _mm512_fmadd_ps(b, v, *a);
                        }
                    }
                }
            }
        }
        acc
    }
}

/// The filters as `[outputs / 8][inputs][9][8]` panels: `w` `[c_out, c_in, 3, 3]` itself for the
/// forward pass, or with `grad`, for the input gradient, each filter `w[o, i]` turned by 180
/// degrees and filed under input channel `i` as its output.
pub(super) fn panels(g: &Geom, w: &[f32], grad: bool) -> Vec<f32> {
    let (outputs, inputs) = if grad { (g.c_in, g.c_out) } else { (g.c_out, g.c_in) };
    let mut p = Vec::with_capacity(outputs * inputs * 9);
    for blk in 0..outputs / MR {
        for i in 0..inputs {
            for tap in 0..9 {
                p.extend((blk * MR..(blk + 1) * MR).map(|o| {
                    if grad {
                        w[(i * g.c_in + o) * 9 + 8 - tap]
                    } else {
                        w[(o * g.c_in + i) * 9 + tap]
                    }
                }));
            }
        }
    }
    p
}

/// The forward pass `conv(x, w)` from `x` `[b, c_in, h, w]`, or with `grad` the input gradient
/// `[b, c_in, h, w]` from `dy` `[b, c_out, h, w]`, given the [`panels`] made with the same `grad`.
/// With `bias` (forward only), `relu(conv(x, w) + bias)`: the bias and the ReLU applied to the
/// accumulators before they are stored, not in a pass of their own over the output.
pub(super) fn run(g: &Geom, a: &[f32], panels: &[f32], grad: bool, bias: Option<&[f32]>) -> Vec<f32> {
    let (outputs, inputs) = if grad { (g.c_in, g.c_out) } else { (g.c_out, g.c_in) };
    assert!(bias.is_none_or(|b| !grad && b.len() == outputs));
    conv(g, a, inputs, outputs, panels, bias)
}

/// Whether [`strided_forward`] handles a convolution: 3x3, stride 2, padding 1, a batch, and 32 or
/// 64 output channels (the router's downsampling layers; ResNet-18's, with 128 and more, keep
/// im2col, unmeasured here).
pub(super) fn strided_applies(g: &Geom) -> bool {
    strided_takes(g) && g.b > 1
}

/// Whether [`strided_image`] computes a layer: 3x3, stride 2, padding 1, 32 or 64 outputs.
fn strided_takes(g: &Geom) -> bool {
    g.k == 3 && g.stride == 2 && g.pad == 1 && (g.c_out == 32 || g.c_out == 64)
}

/// The filters `w` `[c_out, c_in, 3, 3]` as `[c_in, 9, c_out]`, for [`strided_forward`].
pub(super) fn strided_panels(g: &Geom, w: &[f32]) -> Vec<f32> {
    let mut p = vec![0.0; w.len()];
    transpose(w, g.c_out, g.c_in * 9, &mut p);
    p
}

/// `conv(x, w)` for a convolution [`strided_applies`] takes, with `panels` from
/// [`strided_panels`]. A stride-2 row of outputs reads every other input, which no vector load
/// does, so here the vectors run along output channels (as in [`weight_grad`]): a tile of 14 or
/// 7 positions by 32 output channels (2 vectors) adds, per input channel and tap, the broadcast
/// input value under each position times the tap's weights, and its accumulators, transposed in
/// registers, are stored as lines of the output's planes. With `bias`, `relu(conv + bias)`, as
/// in [`run`]. (The accumulators stored channels-last and the image transposed after it cost a
/// pass over the output; with 4 positions by 64 channels lines of 7 took an eighth more work.)
pub(super) fn strided_forward(g: &Geom, x: &[f32], panels: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (h, w, hw) = (g.h, g.w, g.h_out * g.w_out);
    let padded_len = padded_len(g);
    let (x_image, y_image) = (g.c_in * h * w, g.c_out * hw);
    let per_task = chunk(g.b, 1);
    let mut y: Vec<f32> = Vec::with_capacity(g.b * y_image);
    let slots = &mut y.spare_capacity_mut()[..g.b * y_image];
    super::conv::each_chunk(slots, per_task * y_image, |t, out| {
        with_cols(padded_len, |xp: &mut [f32]| {
            for (i, out) in out.chunks_exact_mut(y_image).enumerate() {
                let n = t * per_task + i;
                pad(&x[n * x_image..][..x_image], h, w, xp);
                let planes = Planes::dense(g.h_out, g.w_out);
                let out = out.as_mut_ptr().cast();
                strided(g, xp, panels, bias, &mut Sink::Planes(out, y_image, planes));
            }
        })
    });
    // SAFETY: `strided` wrote every image's every value (its tiles cover every position).
    unsafe { y.set_len(g.b * y_image) };
    y
}

/// Values of [`pad`]'s copy of one image's input to `g`, with the slack its kernels read past it.
fn padded_len(g: &Geom) -> usize {
    g.c_in * (g.h + 2) * (g.w + 2) + 3 * (g.w + 2) + 32
}

/// Where [`strided_image`] puts one image's outputs (after the bias and ReLU, with a bias).
enum Sink<'a> {
    /// `c_out` planes, laid out in the `len` values from the pointer as [`Planes`] says: the
    /// output itself (not initialised before), or the interior of [`pad`]'s layout, the next
    /// stride-2 layer's input, with no copy between (its border is left as it is).
    Planes(*mut f32, usize, Planes),
    /// `[c_out]`: each channel's sum over the positions (a global average's numerator); the map
    /// itself is never stored.
    Sums(&'a mut [f32]),
}

/// [`strided_image`] for each 32 output channels, in tiles of 14 positions (a line of 14) or 7.
/// (64 channels at once, in tiles of 4 positions, computed an eighth more on lines of 7 and
/// had 4 positions to a 16 x 16 transpose.)
fn strided(g: &Geom, xp: &[f32], panels: &[f32], bias: Option<&[f32]>, sink: &mut Sink) {
    for c0 in (0..g.c_out).step_by(32) {
        if g.w_out == 14 {
            strided_image::<2, 14>(g, c0, xp, panels, bias, sink)
        } else {
            strided_image::<2, 7>(g, c0, xp, panels, bias, sink)
        }
    }
}

/// One image's `16 V` output channels from `c0` into `sink`, in tiles of `P` positions of one
/// output line: the tile's input values are then `2 p` apart, offsets that the unrolled loop
/// folds into its loads (a table of positions across lines cost registers, and the accumulators
/// spilled). With `bias`, `relu(conv + bias)`.
fn strided_image<const V: usize, const P: usize>(
    g: &Geom,
    c0: usize,
    xp: &[f32],
    panels: &[f32],
    bias: Option<&[f32]>,
    sink: &mut Sink,
) {
    const { assert!(P <= 16) };
    let (wp, co) = (g.w + 2, g.c_out);
    let plane = (g.h + 2) * wp;
    assert!(c0 + 16 * V <= co && xp.len() >= g.c_in * plane + 3 * wp + 32 && panels.len() == g.c_in * 9 * co);
    assert!(bias.is_none_or(|b| b.len() == co));
    match sink {
        Sink::Planes(_, len, p) => assert!(*len >= (co - 1) * p.plane + p.first + (g.h_out - 1) * p.line + g.w_out),
        Sink::Sums(s) => assert!(s.len() == co),
    }
    // SAFETY: `b` holds `co >= c0 + 16 V` values.
    let bias: Option<[__m512; V]> =
        bias.map(|b| std::array::from_fn(|v| unsafe { _mm512_loadu_ps(b.as_ptr().add(c0 + 16 * v)) }));
    // SAFETY: register operations only.
    let mut sums = [unsafe { _mm512_setzero_ps() }; V];
    for oy in 0..g.h_out {
        for ox0 in (0..g.w_out).step_by(P) {
            // SAFETY: every read, `2 oy wp + 2 (ox0 + p) + ki wp + kj` of channel `ci`'s plane
            // for taps `ki, kj < 3`, is inside the padded planes and their slack: positions past
            // the line (fewer than `P` of them) read on into the next line, or at most `2 P + 2`
            // values past the last plane. `panels` holds `c_in * 9` rows of `co` weights.
            let acc = unsafe {
                let mut acc = [[_mm512_setzero_ps(); V]; P];
                for ci in 0..g.c_in {
                    let xc = xp.as_ptr().add(ci * plane + 2 * oy * wp + 2 * ox0);
                    for tap in 0..9 {
                        let at = xc.add(tap / 3 * wp + tap % 3);
                        let wr = panels.as_ptr().add((ci * 9 + tap) * co + c0);
                        let wv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(wr.add(16 * v)));
                        for (p, acc) in acc.iter_mut().enumerate() {
                            let b = _mm512_set1_ps(*at.add(2 * p));
                            for (a, &wv) in acc.iter_mut().zip(&wv) {
                                *a = _mm512_fmadd_ps(b, wv, *a);
                            }
                        }
                    }
                }
                acc
            };
            // SAFETY: register operations only.
            let acc = acc.map(|row| {
                std::array::from_fn::<_, V, _>(|v| {
                    bias.map_or(row[v], |b| unsafe {
                        _mm512_max_ps(_mm512_add_ps(row[v], b[v]), _mm512_setzero_ps())
                    })
                })
            });
            let valid = (g.w_out - ox0).min(P);
            match sink {
                Sink::Planes(out, _, planes) => {
                    let mask = (u32::MAX >> (32 - valid)) as __mmask16;
                    // Per vector of channels, its values at the tile's positions as rows of a
                    // 16 x 16 block (zeros past `P`), turned into a line of `P` values per channel.
                    // SAFETY: register operations only.
                    let mut rows = [[unsafe { _mm512_setzero_ps() }; 16]; V];
                    for (p, acc) in acc.iter().enumerate() {
                        for (rows, &a) in rows.iter_mut().zip(acc) {
                            rows[p] = a;
                        }
                    }
                    for (v, rows) in rows.into_iter().enumerate() {
                        for (j, c) in transpose16(rows).into_iter().enumerate() {
                            let at = (c0 + 16 * v + j) * planes.plane + planes.first + oy * planes.line + ox0;
                            // SAFETY: the mask stores line `oy`'s `valid` values from `ox0` of
                            // channel `c0 + 16 v + j`, inside `out`'s `len` values (asserted).
                            unsafe { _mm512_mask_storeu_ps(out.add(at), mask, c) };
                        }
                    }
                }
                Sink::Sums(_) => {
                    for acc in acc.iter().take(valid) {
                        for (s, &a) in sums.iter_mut().zip(acc) {
                            // SAFETY: register operations only.
                            *s = unsafe { _mm512_add_ps(*s, a) };
                        }
                    }
                }
            }
        }
    }
    if let Sink::Sums(s) = sink {
        for (v, sum) in sums.into_iter().enumerate() {
            // SAFETY: `s` holds `co >= c0 + 16 V` values (asserted).
            unsafe { _mm512_storeu_ps(s.as_mut_ptr().add(c0 + 16 * v), sum) };
        }
    }
}

/// Whether [`router_features`] takes a router's three layers, given as their geometries: 3x3
/// with padding 1 and strides 1, 2, 2, the first one that [`run`]'s kernels take, the other two
/// [`strided_forward`]'s.
pub(super) fn features_apply(g: [&Geom; 3]) -> bool {
    let [g1, g2, g3] = g;
    applies(g1, g1.c_out)
        && strided_takes(g2)
        && strided_takes(g3)
        && (g2.c_in, g2.h, g2.w) == (g1.c_out, g1.h_out, g1.w_out)
        && (g3.c_in, g3.h, g3.w) == (g2.c_out, g2.h_out, g2.w_out)
}

/// The global averages `[b, c3]` of a router's three convolutions with their biases and ReLUs
/// (a batch `x` `[b, c, h, w]`, `g` as [`features_apply`] takes them, with [`panels`] for the
/// first and [`strided_panels`] for the others), one image at a time through all three: each
/// layer writes straight into the next one's padded input and the last one into its sums,
/// where layer by layer each output was zeroed, stored, transposed and copied into a padded
/// buffer again.
pub(super) fn router_features(g: [&Geom; 3], x: &[f32], panels: [&[f32]; 3], bias: [&[f32]; 3]) -> Vec<f32> {
    assert!(features_apply(g));
    let [g1, g2, g3] = g;
    let (x_image, c3) = (g1.c_in * g1.h * g1.w, g3.c_out);
    let lens = [g1, g2, g3].map(padded_len);
    let mean = 1.0 / (g3.h_out * g3.w_out) as f32;
    let per_task = chunk(g1.b, 1);
    zeroed_chunks(g1.b * c3, per_task * c3, |t, out| {
        // The second and third layers' borders stay zero: only their interiors are written.
        let mut buf = vec![0f32; lens.iter().sum()];
        let (xp1, rest) = buf.split_at_mut(lens[0]);
        let (xp2, xp3) = rest.split_at_mut(lens[1]);
        for (i, out) in out.chunks_exact_mut(c3).enumerate() {
            let n = t * per_task + i;
            pad(&x[n * x_image..][..x_image], g1.h, g1.w, xp1);
            let planes = Planes::padded(g1.h, g1.w);
            assert!(xp2.len() >= g1.c_out * planes.plane);
            let (bias1, blocks, dst) = (Some(bias[0]), 0..g1.c_out / MR, xp2.as_mut_ptr());
            // SAFETY: `xp2` holds the first layer's `c_out` padded planes (asserted).
            unsafe { image(xp1, g1.c_in, g1.h, g1.w, panels[0], bias1, blocks, dst, planes) };
            let planes = Planes::padded(g2.h_out, g2.w_out);
            let sink = &mut Sink::Planes(xp3.as_mut_ptr(), xp3.len(), planes);
            strided(g2, xp2, panels[1], Some(bias[1]), sink);
            strided(g3, xp3, panels[2], Some(bias[2]), &mut Sink::Sums(out));
            out.iter_mut().for_each(|v| *v *= mean);
        }
    })
}

/// Whether [`strided_input_grad`] handles a convolution's input gradient: 3x3, stride 2,
/// padding 1, a batch, and 16 or 32 input channels (its vectors run along them: the router's
/// downsampling layers).
pub(super) fn strided_grad_applies(g: &Geom) -> bool {
    g.k == 3 && g.stride == 2 && g.pad == 1 && g.b > 1 && (g.c_in == 16 || g.c_in == 32)
}

/// The filters `w` `[c_out, c_in, 3, 3]` as `[c_out, 9, c_in]`, for [`strided_input_grad`].
pub(super) fn strided_grad_panels(g: &Geom, w: &[f32]) -> Vec<f32> {
    let mut p = vec![0.0; w.len()];
    for (src, dst) in w.chunks_exact(g.c_in * 9).zip(p.chunks_exact_mut(g.c_in * 9)) {
        transpose(src, g.c_in, 9, dst);
    }
    p
}

/// The input gradient `[b, c_in, h, w]` from `dy` `[b, c_out, h_out, w_out]` for a convolution
/// [`strided_grad_applies`] takes, with `panels` from [`strided_grad_panels`]: per image, the
/// padded `dy`, then the gradient in tiles of 14 positions by 16 input channels (one pass per 16
/// channels; 8 positions by 32 channels in one pass took as long), each stored as lines of its
/// channels' planes (a channels-last image transposed at the end cost a pass over `dx`, and
/// with the forward pass's like it a tenth of the router's training step). im2col's way (a gemm
/// into a column matrix, then col2im's scatter-add into a zeroed `dx`) took a third of the
/// router's stride-2 layer's forward + backward.
pub(super) fn strided_input_grad(g: &Geom, dy: &[f32], panels: &[f32]) -> Vec<f32> {
    let (ho, wo, hw) = (g.h_out, g.w_out, g.h * g.w);
    // Tiles read up to 8 values past a line's end, so past the last plane too.
    let padded_len = g.c_out * (ho + 2) * (wo + 2) + 16;
    let (x_image, y_image) = (g.c_in * hw, g.c_out * ho * wo);
    let per_task = chunk(g.b, 1);
    let mut dx: Vec<f32> = Vec::with_capacity(g.b * x_image);
    let slots = &mut dx.spare_capacity_mut()[..g.b * x_image];
    super::conv::each_chunk(slots, per_task * x_image, |t, out| {
        with_cols(padded_len, |dp: &mut [f32]| {
            for (i, out) in out.chunks_exact_mut(x_image).enumerate() {
                let n = t * per_task + i;
                pad(&dy[n * y_image..][..y_image], ho, wo, dp);
                for c0 in (0..g.c_in).step_by(16) {
                    // SAFETY: `out` holds the image's `c_in` planes of `h w` values.
                    unsafe { strided_grad_image::<7, 14>(g, c0, dp, panels, out.as_mut_ptr().cast()) };
                }
            }
        })
    });
    // SAFETY: `strided_grad_image` wrote every image's every value (its tiles cover every
    // position of each 16 channels).
    unsafe { dx.set_len(g.b * x_image) };
    dx
}

/// One image's input gradient for the 16 input channels from `c0`, into `out` (`[c_in, h, w]`),
/// from its padded output gradient `dp` (planes `(h_out + 2) (w_out + 2)`), in tiles of
/// `P = 2 M` positions of one line from an even column, each tile's accumulators (a vector of
/// channels per position) transposed in registers into lines of the channels' planes.
///
/// With stride 2, input line `y` takes only the filter rows `ky` with `y + 1 - ky` even: row 1
/// from output line `y / 2` where `y` is even, rows 0 and 2 from lines `(y + 1) / 2` and
/// `(y - 1) / 2` where it is odd; columns likewise. So a tile of columns `2 j0 .. 2 j0 + P` takes,
/// per output channel and filter row, the `M + 1` values `dy[j0 ..= j0 + M]` of one line:
/// column `2 (j0 + t)` adds `dy[j0 + t] w[ky, 1]`, column `2 (j0 + t) + 1` adds
/// `dy[j0 + t + 1] w[ky, 0] + dy[j0 + t] w[ky, 2]`. Every product is one the gradient needs, and
/// each broadcast value serves three of them.
///
/// # Safety
/// `out` must address the image's `c_in h w` values, writable, and nothing else may touch the
/// channels `c0 .. c0 + 16` meanwhile.
unsafe fn strided_grad_image<const M: usize, const P: usize>(
    g: &Geom,
    c0: usize,
    dp: &[f32],
    panels: &[f32],
    out: *mut f32,
) {
    let (wq, ci) = (g.w_out + 2, g.c_in);
    let plane = (g.h_out + 2) * wq;
    assert!(P == 2 * M && P <= 16 && c0 + 16 <= ci && panels.len() == g.c_out * 9 * ci);
    assert!(dp.len() > g.c_out * plane + M);
    for y in 0..g.h {
        // (filter row, padded line of `dy`): output line `l` is padded line `l + 1`.
        let rows: &[(usize, usize)] = if y % 2 == 0 {
            &[(1, y / 2 + 1)]
        } else {
            &[(0, y / 2 + 2), (2, y / 2 + 1)]
        };
        for x0 in (0..g.w).step_by(P) {
            let j0 = x0 / 2;
            // SAFETY: the lines read, `y / 2 + 2 <= h_out + 1` at most, are inside a padded
            // plane; a tile's `M + 1` values from column `1 + j0` run past the line only for
            // positions past the map, into the next line or at most `M + 1` values past the
            // last plane, inside `dp`. `panels` holds `c_out * 9` rows of `c_in` weights, of
            // which a vector from `c0` is read.
            let acc = unsafe {
                let mut acc = [_mm512_setzero_ps(); P];
                for o in 0..g.c_out {
                    for &(ky, line) in rows {
                        let at = dp.as_ptr().add(o * plane + line * wq + 1 + j0);
                        let wr = panels.as_ptr().add((o * 9 + ky * 3) * ci + c0);
                        let [w0, w1, w2]: [__m512; 3] = std::array::from_fn(|kx| _mm512_loadu_ps(wr.add(kx * ci)));
                        let b: [__m512; 8] = std::array::from_fn(|t| {
                            if t <= M {
                                _mm512_set1_ps(*at.add(t))
                            } else {
                                _mm512_setzero_ps()
                            }
                        });
                        for t in 0..M {
                            acc[2 * t] = _mm512_fmadd_ps(b[t], w1, acc[2 * t]);
                            let odd = _mm512_fmadd_ps(b[t], w2, acc[2 * t + 1]);
                            acc[2 * t + 1] = _mm512_fmadd_ps(b[t + 1], w0, odd);
                        }
                    }
                }
                acc
            };
            let mask = (u32::MAX >> (32 - (g.w - x0).min(P))) as __mmask16;
            // SAFETY: register operations only.
            let rows = std::array::from_fn(|p| if p < P { acc[p] } else { unsafe { _mm512_setzero_ps() } });
            for (j, c) in transpose16(rows).into_iter().enumerate() {
                // SAFETY: the mask stores line `y`'s values from `x0` that lie in the map, of
                // channel `c0 + j`, inside `out` (the caller's guarantee).
                unsafe { _mm512_mask_storeu_ps(out.add(((c0 + j) * g.h + y) * g.w + x0), mask, c) };
            }
        }
    }
}

/// Whether [`weight_grad`] handles a convolution: 3x3 with padding 1 and a multiple of 16 output
/// channels (its vectors run along them); with stride 1 as [`applies`], with stride 2 as
/// [`strided_applies`].
pub(super) fn weight_applies(g: &Geom) -> bool {
    g.c_out.is_multiple_of(16) && (applies(g, g.c_out) || strided_applies(g))
}

/// `dw` `[c_out, c_in, 3, 3]`, summed over the batch, from `dy` `[b, c_out, h, w]` and `x`
/// `[b, c_in, h, w]`, for a convolution [`weight_applies`] takes.
///
/// Here the vectors run along output channels: each image's `dy` is turned channels-last, in
/// blocks of 32 channels (`[h w][32]`), so that at every position one tile adds the 9 taps of
/// one input channel (9 broadcast input values of the padded image) times 2 vectors of `dy`, in
/// 18 accumulators kept over the whole image. No lane is wasted on a line's end, and the
/// accumulators go to memory once per image and tile. (Vectors along positions, as in the
/// forward pass, needed 8 vector loads per 24 products and a sum across lanes: slower than
/// im2col + gemm.) The parts are `conv::partial_sums`'s, fixed by the thread count, so the sums'
/// rounding does not depend on scheduling.
pub(super) fn weight_grad(g: &Geom, dy: &[f32], x: &[f32]) -> Vec<f32> {
    sum_transposed(backward(g, dy, None, x, None).0, g.c_in * 9, g.c_out)
}

/// Whether [`bias_relu_backward`] takes the backward pass of `relu(conv(x, w) + bias)`: a
/// convolution whose weight gradient [`weight_applies`] takes and, where the input needs a
/// gradient too (`input_grad`), [`strided_grad_applies`] or [`applies`] (for its `c_in`).
pub(super) fn bias_relu_applies(g: &Geom, input_grad: bool) -> bool {
    weight_applies(g) && (!input_grad || strided_grad_applies(g) || applies(g, g.c_in))
}

/// The gradients of `relu(conv(x, w) + bias)`, whose output was `y`, from `dy`: the weight's,
/// the bias's and, given the input gradient's panels (from [`strided_grad_panels`] for stride
/// 2, [`panels`] with `grad` for stride 1), the input's, for a convolution
/// [`bias_relu_applies`] takes.
///
/// One pass per image: `dy` masked by `y > 0` into a buffer of the thread's (and summed per
/// channel, the bias's gradient), from which the weight gradient's channels-last copy and the
/// input gradient's padded one are made while it is in cache. As three ops (mask, weight
/// gradient, input gradient), the masked gradient went to memory and was read back by each.
pub(super) fn bias_relu_backward(
    g: &Geom,
    dy: &[f32],
    y: &[f32],
    x: &[f32],
    dx_panels: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
    let (parts, dx) = backward(g, dy, Some(y), x, dx_panels);
    let taps = g.c_out * g.c_in * 9;
    let mut sum = sum_parts(parts);
    // No images, no part.
    sum.resize(taps + g.c_out, 0.0);
    (transposed(&sum[..taps], g.c_in * 9, g.c_out), sum[taps..].to_vec(), dx)
}

/// [`weight_grad`]'s parts (`[c_in, 9, c_out]`, then with `relu` the `c_out` sums of the
/// masked gradient), and the input gradient where `dx_panels` are given (see
/// [`bias_relu_backward`]).
fn backward(
    g: &Geom,
    dy: &[f32],
    relu: Option<&[f32]>,
    x: &[f32],
    dx_panels: Option<&[f32]>,
) -> (Vec<Vec<f32>>, Option<Vec<f32>>) {
    let (h, w, hw) = (g.h, g.w, g.h_out * g.w_out);
    let wp = w + 2;
    let plane = (h + 2) * wp;
    let padded_len = padded_len(g);
    let (x_image, y_image) = (g.c_in * h * w, g.c_out * hw);
    let taps = g.c_out * g.c_in * 9;
    let part_len = taps + if relu.is_some() { g.c_out } else { 0 };
    // The masked gradient; for the input gradient, that gradient padded (with the slack that
    // both of its kernels read past the last plane).
    let masked_len = if relu.is_some() { y_image } else { 0 };
    let wq = g.w_out + 2;
    let dp_len = dx_panels.map_or(0, |_| g.c_out * (g.h_out + 2) * wq + 3 * wq + 32);
    // Not initialised: every image's every value is written below.
    let mut dx: Option<Vec<f32>> = dx_panels.map(|_| Vec::with_capacity(g.b * x_image));
    let dx_at = dx.as_mut().map(|d| d.as_mut_ptr() as usize);
    let per_task = chunk(g.b, 1);
    // Channel blocks: 32 wide, and a last one of 16 where `c_out` is an odd multiple of 16.
    let blocks: Vec<(usize, usize)> = (0..g.c_out)
        .step_by(32)
        .map(|c0| (c0, (g.c_out - c0).min(32)))
        .collect();
    let add = |mut part: Vec<f32>, t: usize| {
        if part.is_empty() {
            part = vec![0.0; part_len];
        }
        let (part_taps, sums) = part.split_at_mut(taps);
        with_cols(padded_len + y_image + masked_len + dp_len, |buf: &mut [f32]| {
            let (xp, rest) = buf.split_at_mut(padded_len);
            let (dyt, rest) = rest.split_at_mut(y_image);
            let (masked, rest) = rest.split_at_mut(masked_len);
            let dp = &mut rest[..dp_len];
            for n in t * per_task..((t + 1) * per_task).min(g.b) {
                pad(&x[n * x_image..][..x_image], h, w, xp);
                let mut dy = &dy[n * y_image..][..y_image];
                if let Some(y) = relu {
                    mask(dy, &y[n * y_image..][..y_image], hw, masked, sums);
                    dy = masked;
                }
                for &(c0, width) in &blocks {
                    transpose(
                        &dy[c0 * hw..][..width * hw],
                        width,
                        hw,
                        &mut dyt[c0 * hw..][..width * hw],
                    );
                }
                for &(c0, width) in &blocks {
                    let d = &dyt[c0 * hw..][..width * hw];
                    for ci in 0..g.c_in {
                        let xc = &xp[ci * plane..][..plane];
                        // SAFETY: `xc` is input channel `ci`'s padded plane, `(h + 2) (w + 2)`
                        // values; `d` the block's `h w` positions of `width` values.
                        let sums: [[__m512; 2]; 9] = unsafe {
                            if width == 32 {
                                weight_tile::<2>(xc.as_ptr(), d.as_ptr(), g, wp)
                            } else {
                                let one = weight_tile::<1>(xc.as_ptr(), d.as_ptr(), g, wp);
                                one.map(|[v]| [v, _mm512_setzero_ps()])
                            }
                        };
                        for (tap, sums) in sums.iter().enumerate() {
                            let dst = &mut part_taps[(ci * 9 + tap) * g.c_out + c0..][..width];
                            for (dst, sum) in dst.chunks_exact_mut(16).zip(sums) {
                                // SAFETY: `dst` holds 16 values.
                                unsafe {
                                    _mm512_storeu_ps(
                                        dst.as_mut_ptr(),
                                        _mm512_add_ps(_mm512_loadu_ps(dst.as_ptr()), *sum),
                                    )
                                };
                            }
                        }
                    }
                }
                if let (Some(panels), Some(at)) = (dx_panels, dx_at) {
                    // Image `n`'s values of `dx`, which only this task writes.
                    // SAFETY: inside `dx`'s capacity.
                    let out = unsafe { (at as *mut f32).add(n * x_image) };
                    pad(dy, g.h_out, g.w_out, dp);
                    if g.stride == 2 {
                        for c0 in (0..g.c_in).step_by(16) {
                            // SAFETY: `out` addresses the image's `c_in` planes.
                            unsafe { strided_grad_image::<7, 14>(g, c0, dp, panels, out) };
                        }
                    } else {
                        // SAFETY: `out` addresses the image's `c_in` planes.
                        unsafe {
                            image(
                                dp,
                                g.c_out,
                                h,
                                w,
                                panels,
                                None,
                                0..g.c_in / MR,
                                out,
                                Planes::dense(h, w),
                            )
                        };
                    }
                }
            }
        });
        part
    };
    let parts = partial_sums(g.b.div_ceil(per_task), add);
    if let Some(dx) = &mut dx {
        // SAFETY: the tasks covered every image, and each wrote all of its `dx` (every plane,
        // line and value: `strided_grad_image`'s tiles or `image`'s channel blocks).
        unsafe { dx.set_len(g.b * x_image) };
    }
    (parts, dx)
}

/// `masked = dy where y > 0, else 0`, both `[c, hw]`, with each channel's sum added to `sums`.
fn mask(dy: &[f32], y: &[f32], hw: usize, masked: &mut [f32], sums: &mut [f32]) {
    assert!(y.len() == dy.len() && masked.len() == dy.len() && sums.len() * hw == dy.len());
    let planes = dy
        .chunks_exact(hw)
        .zip(y.chunks_exact(hw))
        .zip(masked.chunks_exact_mut(hw));
    for (((dy, y), masked), sum) in planes.zip(sums) {
        // SAFETY: each mask covers `min(hw - c0, 16)` values from `c0`, inside the three planes.
        unsafe {
            let mut acc = _mm512_setzero_ps();
            for c0 in (0..hw).step_by(16) {
                let lanes = (u32::MAX >> (32 - (hw - c0).min(16))) as __mmask16;
                let d = _mm512_maskz_loadu_ps(lanes, dy.as_ptr().add(c0));
                let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(
                    _mm512_maskz_loadu_ps(lanes, y.as_ptr().add(c0)),
                    _mm512_setzero_ps(),
                );
                let v = _mm512_maskz_mov_ps(positive, d);
                _mm512_mask_storeu_ps(masked.as_mut_ptr().add(c0), lanes, v);
                acc = _mm512_add_ps(acc, v);
            }
            *sum += _mm512_reduce_add_ps(acc);
        }
    }
}

/// `src` `[rows, cols]` as `dst` `[cols, rows]`: 16 x 16 blocks transposed in registers, the
/// rest value by value.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert!(src.len() == rows * cols && dst.len() == rows * cols);
    let (r16, c16) = (rows / 16 * 16, cols / 16 * 16);
    for r in (0..r16).step_by(16) {
        for c in (0..c16).step_by(16) {
            // SAFETY: rows `r..r + 16` of `src` hold columns `c..c + 16`, and rows `c..c + 16`
            // of `dst` columns `r..r + 16`.
            unsafe {
                let block: [__m512; 16] =
                    std::array::from_fn(|i| _mm512_loadu_ps(src.as_ptr().add((r + i) * cols + c)));
                for (j, v) in transpose16(block).into_iter().enumerate() {
                    _mm512_storeu_ps(dst.as_mut_ptr().add((c + j) * rows + r), v);
                }
            }
        }
    }
    for r in 0..rows {
        for c in (if r < r16 { c16 } else { 0 })..cols {
            dst[c * rows + r] = src[r * cols + c];
        }
    }
}

/// The transpose of a 16 x 16 block held as 16 rows: within 128-bit lanes by unpacking and
/// shuffling pairs, then across lanes.
#[inline(always)]
fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // SAFETY: register operations only (the build has AVX-512).
    unsafe {
        // t[2i] = unpacklo(r[2i], r[2i + 1]), t[2i + 1] = unpackhi: per lane [a0 b0 a1 b1] / [a2 b2 a3 b3].
        let t: [__m512; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        // u[4g + k]: per lane, column k of rows 4g..4g + 4.
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let (g, k) = (i / 4, i % 4);
            let (a, b) = (t[4 * g + k / 2], t[4 * g + 2 + k / 2]);
            if k % 2 == 0 {
                _mm512_shuffle_ps::<0x44>(a, b)
            } else {
                _mm512_shuffle_ps::<0xEE>(a, b)
            }
        });
        // Column 4 l + k is lane l of u[k], u[4 + k], u[8 + k], u[12 + k].
        let mut out = [_mm512_setzero_ps(); 16];
        for k in 0..4 {
            let v = _mm512_shuffle_f32x4::<0x88>(u[k], u[4 + k]);
            let w = _mm512_shuffle_f32x4::<0xDD>(u[k], u[4 + k]);
            let v2 = _mm512_shuffle_f32x4::<0x88>(u[8 + k], u[12 + k]);
            let w2 = _mm512_shuffle_f32x4::<0xDD>(u[8 + k], u[12 + k]);
            out[k] = _mm512_shuffle_f32x4::<0x88>(v, v2);
            out[8 + k] = _mm512_shuffle_f32x4::<0xDD>(v, v2);
            out[4 + k] = _mm512_shuffle_f32x4::<0x88>(w, w2);
            out[12 + k] = _mm512_shuffle_f32x4::<0xDD>(w, w2);
        }
        out
    }
}

/// `sum over output positions (y, x) of dy[y, x] * xp[s y + ki, s x + kj]` for the 9 taps
/// `ki * 3 + kj` of `g`'s stride `s`: `dy` the positions' `16 V` channels, one after another,
/// `xp` a padded input plane, lines `wp` apart.
///
/// # Safety
/// `xp` must address `(g.h + 2) wp` readable values, `dy` `g.h_out g.w_out 16 V`.
#[inline(always)]
unsafe fn weight_tile<const V: usize>(xp: *const f32, dy: *const f32, g: &Geom, wp: usize) -> [[__m512; V]; 9] {
    let s = g.stride;
    // SAFETY: the caller guarantees the extents: `s y + ki < h + 2`, `s x + kj < w + 2`.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); V]; 9];
        for y in 0..g.h_out {
            let xr = xp.add(s * y * wp);
            let dr = dy.add(y * g.w_out * 16 * V);
            for x in 0..g.w_out {
                let d: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(dr.add((x * V + v) * 16)));
                for ki in 0..3 {
                    for kj in 0..3 {
                        let b = _mm512_set1_ps(*xr.add(ki * wp + s * x + kj));
                        for (a, &d) in acc[ki * 3 + kj].iter_mut().zip(&d) {
                            *a = _mm512_fmadd_ps(b, d, *a);
                        }
                    }
                }
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::conv::{conv2d, forward_slices, input_grad_slices};
    use candle_core::{Device, Tensor, Var};

    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 40) as f64 / (1u64 << 24) as f64 - 0.5
            })
            .collect()
    }

    fn f32s(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&v| v as f32).collect()
    }

    /// The weight gradient of `sum(conv(x, w) * dy)` through candle's autograd over the f64
    /// im2col path.
    fn autograd_weight_grad(g: &Geom, x: &[f64], w: &[f64], dy: &[f64]) -> Vec<f64> {
        let cpu = &Device::Cpu;
        let xt = Tensor::from_vec(x.to_vec(), (g.b, g.c_in, g.h, g.w), cpu).unwrap();
        let wv = Var::from_vec(w.to_vec(), (g.c_out, g.c_in, 3, 3), cpu).unwrap();
        let probe = Tensor::from_vec(dy.to_vec(), (g.b, g.c_out, g.h_out, g.w_out), cpu).unwrap();
        let y = conv2d(&xt, wv.as_tensor(), g.stride, 1).unwrap();
        let grads = (y * probe).unwrap().sum_all().unwrap().backward().unwrap();
        grads
            .get(wv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn max_diff(a: &[f32], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(&a, &b)| (f64::from(a) - b).abs())
            .fold(0.0, f64::max)
    }

    /// The three kernels against the im2col path in f64 (which `direct` never takes), on rows of
    /// every width class (12 to 16 and 26 to 32 values), odd heights (a tile's last rows past
    /// the map), one image (two threads, an odd number of channel blocks) and several.
    #[test]
    fn matches_the_im2col_path() {
        let cases = [
            // (b, c_in, c_out, h, w)
            (2, 3, 8, 5, 12),
            (3, 5, 16, 14, 14),
            (1, 4, 16, 7, 16),
            (2, 2, 8, 3, 26),
            (1, 3, 24, 9, 28),
            (2, 8, 8, 1, 32),
            (1, 8, 24, 14, 14),
            (2, 16, 8, 6, 28),
            (5, 8, 16, 4, 13),
            (2, 3, 48, 6, 14),
            (3, 2, 32, 5, 28),
        ];
        for (i, &(b, ci, co, h, w)) in cases.iter().enumerate() {
            let g = Geom::new(&[b, ci, h, w], &[co, ci, 3, 3], 1, 1).unwrap();
            let x = values(b * ci * h * w, i as u64);
            let wt = values(co * ci * 9, 50 + i as u64);
            let dy = values(b * co * h * w, 100 + i as u64);
            let (x32, w32, dy32) = (f32s(&x), f32s(&wt), f32s(&dy));
            // Tolerance: f32 rounding of sums of up to 144 products of values under 0.5.
            assert!(applies(&g, co), "case {i}");
            let (want, _) = forward_slices(&x, [b, ci, h, w], &wt, [co, ci, 3, 3], 1, 1, None, None).unwrap();
            let got = run(&g, &x32, &panels(&g, &w32, false), false, None);
            assert!(max_diff(&got, &want) < 1e-5, "forward, case {i}");
            if weight_applies(&g) {
                let want = autograd_weight_grad(&g, &x, &wt, &dy);
                // Sums over up to 5 x 14 x 14 positions.
                assert!(
                    max_diff(&weight_grad(&g, &dy32, &x32), &want) < 1e-4,
                    "weight gradient, case {i}"
                );
            }
            if applies(&g, ci) {
                let want = input_grad_slices(&dy, [b, ci, h, w], &wt, [co, ci, 3, 3], 1, 1, None).unwrap();
                let got = run(&g, &dy32, &panels(&g, &w32, true), true, None);
                assert!(max_diff(&got, &want) < 1e-5, "input gradient, case {i}");
            }
        }
    }

    /// The stride-2 kernels against the im2col path in f64: 32 and 64 output channels, 16 and 32
    /// input channels for the input gradient, even and odd maps, a last tile of positions past
    /// the map.
    #[test]
    fn strided_kernels_match_the_im2col_path() {
        for (i, &(b, ci, co, h, w)) in [
            (2, 3, 32, 28, 28),
            (3, 5, 64, 14, 14),
            (2, 4, 32, 9, 7),
            (2, 1, 64, 5, 12),
            (2, 16, 32, 28, 28),
            (3, 32, 64, 14, 14),
            (2, 16, 64, 9, 7),
            (2, 32, 32, 6, 17),
        ]
        .iter()
        .enumerate()
        {
            let g = Geom::new(&[b, ci, h, w], &[co, ci, 3, 3], 2, 1).unwrap();
            assert!(strided_applies(&g) && weight_applies(&g), "case {i}");
            let x = values(b * ci * h * w, i as u64);
            let wt = values(co * ci * 9, 50 + i as u64);
            let dy = values(b * co * g.h_out * g.w_out, 100 + i as u64);
            let (want, _) = forward_slices(&x, [b, ci, h, w], &wt, [co, ci, 3, 3], 2, 1, None, None).unwrap();
            let got = strided_forward(&g, &f32s(&x), &strided_panels(&g, &f32s(&wt)), None);
            assert!(max_diff(&got, &want) < 1e-5, "forward, case {i}");
            let want = autograd_weight_grad(&g, &x, &wt, &dy);
            let got = weight_grad(&g, &f32s(&dy), &f32s(&x));
            assert!(max_diff(&got, &want) < 1e-4, "weight gradient, case {i}");
            if strided_grad_applies(&g) {
                let want = input_grad_slices(&dy, [b, ci, h, w], &wt, [co, ci, 3, 3], 2, 1, None).unwrap();
                let got = strided_input_grad(&g, &f32s(&dy), &strided_grad_panels(&g, &f32s(&wt)));
                assert!(max_diff(&got, &want) < 1e-5, "input gradient, case {i}");
            }
        }
    }

    /// The router's three layers in one pass per image against the im2col path in f64, layer by
    /// layer, then averaged: every tile the pass picks (14 or 7 positions by 32 channels, 4 by
    /// 64; positions past a line), both sinks, odd and non-square maps, one image and several.
    #[test]
    fn router_features_match_the_layers() {
        for (i, &(b, c, h, w, channels)) in [
            (3, 1, 28, 28, [16, 32, 64]),
            (2, 3, 32, 32, [16, 32, 64]),
            (2, 2, 26, 26, [8, 64, 32]),
            (2, 1, 15, 13, [24, 32, 32]),
            (1, 4, 14, 14, [8, 64, 64]),
        ]
        .iter()
        .enumerate()
        {
            let (mut dims, mut cur) = ([b, c, h, w], values(b * c * h * w, i as u64));
            let (mut geoms, mut ws, mut biases) = (Vec::new(), Vec::new(), Vec::new());
            for (l, &co) in channels.iter().enumerate() {
                let (s, ci) = (if l == 0 { 1 } else { 2 }, dims[1]);
                let g = Geom::new(&dims, &[co, ci, 3, 3], s, 1).unwrap();
                let wt = values(co * ci * 9, 50 + 10 * i as u64 + l as u64);
                let bias = values(co, 90 + 10 * i as u64 + l as u64);
                let (y, d) = forward_slices(&cur, dims, &wt, [co, ci, 3, 3], s, 1, Some(&bias), None).unwrap();
                (cur, dims) = (y, d);
                geoms.push(g);
                ws.push(f32s(&wt));
                biases.push(f32s(&bias));
            }
            let hw = dims[2] * dims[3];
            let want: Vec<f64> = cur.chunks(hw).map(|p| p.iter().sum::<f64>() / hw as f64).collect();
            let g = [&geoms[0], &geoms[1], &geoms[2]];
            assert!(features_apply(g), "case {i}");
            let panels = [
                panels(g[0], &ws[0], false),
                strided_panels(g[1], &ws[1]),
                strided_panels(g[2], &ws[2]),
            ];
            let x = f32s(&values(b * c * h * w, i as u64));
            let bias = [&biases[0][..], &biases[1][..], &biases[2][..]];
            let got = router_features(g, &x, panels.each_ref().map(|p| &p[..]), bias);
            assert!(max_diff(&got, &want) < 1e-5, "case {i}: {}", max_diff(&got, &want));
        }
        let g = |dims: [usize; 4], co, s| Geom::new(&dims, &[co, dims[1], 3, 3], s, 1).unwrap();
        let (a, b) = (g([2, 1, 28, 28], 16, 1), g([2, 16, 28, 28], 32, 2));
        assert!(!features_apply([&a, &b, &g([2, 32, 14, 14], 48, 2)]), "48 channels");
        assert!(!features_apply([&a, &b, &g([2, 32, 14, 14], 64, 1)]), "stride 1");
        assert!(
            !features_apply([&a, &b, &g([2, 16, 14, 14], 64, 2)]),
            "a shape that does not follow"
        );
    }

    /// `relu(conv(x, w) + bias)` against the im2col path in f64, and its fused backward against
    /// the three steps (mask, weight gradient by candle's autograd, input gradient by the im2col
    /// path): stride 2 with
    /// 16 and 32 input channels, stride 1 with and without the input gradient, 16 to 64 output
    /// channels, odd maps.
    #[test]
    fn bias_relu_matches_the_steps() {
        for (i, &(b, ci, co, h, w, s, input_grad)) in [
            (2, 16, 32, 28, 28, 2, true),
            (3, 32, 64, 14, 14, 2, true),
            (2, 16, 64, 9, 7, 2, true),
            (3, 1, 16, 28, 28, 1, false),
            (2, 8, 32, 14, 14, 1, true),
            (3, 16, 16, 7, 13, 1, true),
        ]
        .iter()
        .enumerate()
        {
            let g = Geom::new(&[b, ci, h, w], &[co, ci, 3, 3], s, 1).unwrap();
            assert!(bias_relu_applies(&g, input_grad), "case {i}");
            let n_out = b * co * g.h_out * g.w_out;
            let x = values(b * ci * h * w, i as u64);
            let wt = values(co * ci * 9, 50 + i as u64);
            let dy = values(n_out, 100 + i as u64);
            // Only the sign of `y` matters here; about half of it is cut.
            let y = values(n_out, 150 + i as u64);
            let masked: Vec<f64> = dy
                .iter()
                .zip(&y)
                .map(|(&d, &y)| if y > 0.0 { d } else { 0.0 })
                .collect();
            let hw = g.h_out * g.w_out;
            let mut want_db = vec![0.0; co];
            for (p, plane) in masked.chunks_exact(hw).enumerate() {
                want_db[p % co] += plane.iter().sum::<f64>();
            }
            let w32 = f32s(&wt);
            // Forward: the bias and ReLU on the f64 im2col path's output.
            let bias = values(co, 200 + i as u64);
            let (conv, _) = forward_slices(&x, [b, ci, h, w], &wt, [co, ci, 3, 3], s, 1, None, None).unwrap();
            let want: Vec<f64> = conv
                .iter()
                .enumerate()
                .map(|(k, &v)| (v + bias[k / hw % co]).max(0.0))
                .collect();
            let (x32, b32) = (f32s(&x), f32s(&bias));
            let got = if s == 2 {
                strided_forward(&g, &x32, &strided_panels(&g, &w32), Some(&b32))
            } else {
                run(&g, &x32, &panels(&g, &w32, false), false, Some(&b32))
            };
            assert!(max_diff(&got, &want) < 1e-5, "forward, case {i}");
            let cut = want.iter().filter(|&&v| v == 0.0).count();
            assert!(cut > 0 && cut < want.len(), "case {i}: the ReLU cuts {cut} values");
            let panels = input_grad.then(|| {
                if s == 2 {
                    strided_grad_panels(&g, &w32)
                } else {
                    panels(&g, &w32, true)
                }
            });
            let (dw, db, dx) = bias_relu_backward(&g, &f32s(&dy), &f32s(&y), &f32s(&x), panels.as_deref());
            assert!(
                max_diff(&dw, &autograd_weight_grad(&g, &x, &wt, &masked)) < 1e-4,
                "weight gradient, case {i}"
            );
            assert!(max_diff(&db, &want_db) < 1e-4, "bias gradient, case {i}");
            assert_eq!(dx.is_some(), input_grad);
            if let Some(dx) = dx {
                let want = input_grad_slices(&masked, [b, ci, h, w], &wt, [co, ci, 3, 3], s, 1, None).unwrap();
                assert!(max_diff(&dx, &want) < 1e-5, "input gradient, case {i}");
            }
        }
        // No images: zero gradients of the right sizes.
        let g = Geom::new(&[0, 8, 14, 14], &[16, 8, 3, 3], 1, 1).unwrap();
        let (dw, db, dx) = bias_relu_backward(&g, &[], &[], &[], Some(&panels(&g, &[0.5; 16 * 8 * 9], true)));
        assert!(dw == vec![0.0; 16 * 8 * 9] && db == vec![0.0; 16] && dx == Some(Vec::new()));
    }

    #[test]
    fn transposes_any_shape() {
        for (rows, cols) in [(16, 16), (32, 48), (17, 33), (5, 3), (64, 196)] {
            let src: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
            let mut dst = vec![0.0; rows * cols];
            transpose(&src, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(dst[c * rows + r], src[r * cols + c], "{rows} x {cols} at {r}, {c}");
                }
            }
        }
    }

    #[test]
    fn takes_only_the_shapes_it_fits() {
        let fits = |c_in, c_out, h, w, k, s, p| {
            Geom::new(&[2, c_in, h, w], &[c_out, c_in, k, k], s, p).is_ok_and(|g| applies(&g, c_out))
        };
        assert!(fits(4, 8, 14, 14, 3, 1, 1));
        assert!(!fits(4, 6, 14, 14, 3, 1, 1), "channels not a multiple of 8");
        assert!(!fits(4, 8, 8, 8, 3, 1, 1), "rows filling half a vector");
        assert!(!fits(4, 8, 20, 20, 3, 1, 1), "rows filling 20 of 32 lanes");
        assert!(!fits(4, 8, 40, 40, 3, 1, 1), "rows over two vectors");
        assert!(!fits(4, 8, 14, 14, 3, 2, 1), "strided");
        assert!(!fits(4, 8, 14, 14, 5, 1, 2), "5x5");
    }
}
