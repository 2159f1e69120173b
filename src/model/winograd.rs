//! Winograd's F(2x2, 3x3) for 3x3 convolutions with stride 1 and padding 1 and enough channels
//! (ResNet-18's unstrided 3x3 layers; see [`applies`]): forward, input gradient and weight
//! gradient, each as 16 matrix products.
//!
//! Each 2 x 2 block of outputs (a "tile") reads a 4 x 4 patch `d` of every input channel.
//! Transformed, the patch becomes `B^T d B` and the filter `g` becomes `G g G^T`, both 4 x 4, and
//! the tile is `A^T [(G g G^T) ⊙ (B^T d B)] A`. Summed over input channels, the elementwise product
//! is 16 matrix products, one per position `xi` of the 4 x 4 transform: `M_xi = U_xi V_xi`, `U_xi`
//! `[c_out, c_in]` and `V_xi` `[c_in, tiles]`. That is 16 multiplications per tile, input and
//! output channel where im2col needs 36: 2.25 times fewer.
//!
//! The input gradient is the same convolution of `dy` with the filters transposed and turned by 180
//! degrees, whose transform is `U` transposed with rows and columns 0 and 3 of `xi` swapped
//! (`G J = P G` for the reversal `J` and that swap `P`). The weight gradient is the transpose of
//! the bilinear algorithm, `dg = G^T [sum over tiles (A dy A^T) ⊙ (B^T d B)] G`: 16 products
//! `[c_out, tiles] x [tiles, c_in]`, then `G^T S G` once per filter.
//!
//! Work is split into blocks of tiles (and, when there are few tiles, ranges of output channels)
//! that each transform their own patches into a buffer that stays in cache, run their 16 products
//! on one thread, and transform the results straight into the output.

use candle_core::WithDType;
use rayon::prelude::*;
use std::borrow::Cow;
use std::ops::Range;
use std::sync::OnceLock;

use super::conv::{Geom, Mat, matmul, matmul_into, partial_sums, sum_parts, with_cols, zeroed_chunks};

/// Whether a convolution runs here rather than through the direct kernels or im2col: 3x3, stride
/// 1, padding 1, a batch (one image keeps the two-thread paths of attacks), and channels enough on
/// both sides for the products (`16 c_in c_out` per tile) to outweigh the transforms (about
/// `16 (c_in + c_out)`). With the transforms in AVX-512 registers ([`gathered`]) that is 32 on
/// either side. On the small CNN's layers, batch 128, the forward then took 0.7 times the direct
/// kernels' time for 64 -> 64 channels on 14 x 14, 0.9 for 32 -> 64 and about the same for 32 ->
/// 32 on 28 x 28; in alternating bench runs of the whole model, inference was 1.25 times as fast,
/// the training step 1.15 times and the PGD-10 step 1.2 times. Built without AVX-512 the
/// transforms run line by line, and pay only on 64 channels of 32 x 32 maps or 128 on smaller
/// ones.
pub(super) fn applies(g: &Geom) -> bool {
    let channels = g.c_in.min(g.c_out);
    let enough = if cfg!(all(target_arch = "x86_64", target_feature = "avx512f")) {
        channels >= 32
    } else {
        channels >= 128 || (channels >= 64 && g.w >= 32)
    };
    g.k == 3 && g.stride == 1 && g.pad == 1 && g.b > 1 && enough
}

/// The tile grid of a batch of `h x w` maps: `ceil(h / 2) x ceil(w / 2)` tiles per image, numbered
/// image by image, row by row.
#[derive(Clone, Copy, Debug)]
struct Tiles {
    b: usize,
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
}

impl Tiles {
    fn new(b: usize, h: usize, w: usize) -> Self {
        Self {
            b,
            h,
            w,
            th: h.div_ceil(2),
            tw: w.div_ceil(2),
        }
    }

    fn count(&self) -> usize {
        self.b * self.th * self.tw
    }

    fn hw(&self) -> usize {
        self.h * self.w
    }

    /// `f(j, n, ty, txs)` for each run of tiles in `range` that lie on one tile row `ty` of image
    /// `n`, `j` the position of the run's first tile in `range`.
    fn rows(&self, range: Range<usize>, mut f: impl FnMut(usize, usize, usize, Range<usize>)) {
        let mut t = range.start;
        while t < range.end {
            let (row, tx) = (t / self.tw, t % self.tw);
            let len = (self.tw - tx).min(range.end - t);
            f(t - range.start, row / self.th, row % self.th, tx..tx + len);
            t += len;
        }
    }
}

/// Tiles per block: enough columns for efficient products, few enough that a block's transformed
/// patches (`16 * channels * tiles` values) stay in the core's cache.
fn block(channels: usize, tiles: usize) -> usize {
    (16384 / channels.max(1)).clamp(32, 1024).min(tiles.max(1))
}

/// The row stride of a block's transforms: `nt` rounded up to whole vectors, and off the large
/// powers of two, whose rows would share cache sets when gemm packs a column of them.
fn lead(nt: usize) -> usize {
    let l = nt.next_multiple_of(16);
    if l.is_multiple_of(256) { l + 16 } else { l }
}

fn half<T: WithDType>() -> T {
    T::from_f64(0.5)
}

/// Values per step of [`lanes`]: one AVX-512 vector of `f32`.
const LANES: usize = 16;

/// `dst[.., j] = f(src[.., j])` for every column `j`, `LANES` columns at a time through
/// fixed-size arrays, which the compiler turns into vector code (indexing the rows directly, it
/// kept every value in a scalar register). Whole chunks and the last, partial one are separate
/// loops: with one copy of `len` values for both, every copy became a call to `memmove`.
#[inline(always)]
fn lanes<T: WithDType, const I: usize, const O: usize>(
    src: &[&[T]; I],
    dst: &mut [&mut [T]; O],
    f: impl Fn([T; I]) -> [T; O],
) {
    let n = src.first().map_or(0, |s| s.len());
    let mut j = 0;
    while j + LANES <= n {
        let mut a = [[T::zero(); LANES]; I];
        for (a, s) in a.iter_mut().zip(src) {
            *a = s[j..j + LANES].try_into().expect("a whole chunk");
        }
        let b = columns(&a, &f);
        for (d, b) in dst.iter_mut().zip(&b) {
            d[j..j + LANES].copy_from_slice(b);
        }
        j += LANES;
    }
    if j < n {
        let len = n - j;
        let mut a = [[T::zero(); LANES]; I];
        for (a, s) in a.iter_mut().zip(src) {
            a[..len].copy_from_slice(&s[j..]);
        }
        let b = columns(&a, &f);
        for (d, b) in dst.iter_mut().zip(&b) {
            d[j..].copy_from_slice(&b[..len]);
        }
    }
}

/// `f` on each of the `LANES` columns of `a`.
#[inline(always)]
fn columns<T: WithDType, const I: usize, const O: usize>(
    a: &[[T; LANES]; I],
    f: &impl Fn([T; I]) -> [T; O],
) -> [[T; LANES]; O] {
    let mut b = [[T::zero(); LANES]; O];
    for l in 0..LANES {
        let out = f(std::array::from_fn(|k| a[k][l]));
        for (b, v) in b.iter_mut().zip(out) {
            b[l] = v;
        }
    }
    b
}

/// `even[k] = src[2 k]` and `odd[k] = src[2 k + 1]` for every pair in `src` (an odd `src`'s last
/// value goes to `even`), in fixed-size blocks that the compiler turns into vector shuffles.
pub(super) fn deinterleave<T: Copy>(src: &[T], even: &mut [T], odd: &mut [T]) {
    let k = deinterleave_blocks::<T, 16>(src, even, odd, 0);
    let k = deinterleave_blocks::<T, 4>(src, even, odd, k);
    for (i, &v) in src.iter().enumerate().skip(2 * k) {
        if i % 2 == 0 {
            even[i / 2] = v;
        } else {
            odd[i / 2] = v;
        }
    }
}

fn deinterleave_blocks<T: Copy, const B: usize>(src: &[T], even: &mut [T], odd: &mut [T], mut k: usize) -> usize {
    while 2 * (k + B) <= src.len() {
        let s = &src[2 * k..2 * (k + B)];
        let (e, o) = (&mut even[k..k + B], &mut odd[k..k + B]);
        for l in 0..B {
            e[l] = s[2 * l];
            o[l] = s[2 * l + 1];
        }
        k += B;
    }
    k
}

/// The inverse of [`deinterleave`]: `dst[2 k] = even[k]`, `dst[2 k + 1] = odd[k]`.
pub(super) fn interleave<T: Copy>(even: &[T], odd: &[T], dst: &mut [T]) {
    let k = interleave_blocks::<T, 16>(even, odd, dst, 0);
    let k = interleave_blocks::<T, 4>(even, odd, dst, k);
    for (i, d) in dst.iter_mut().enumerate().skip(2 * k) {
        *d = if i % 2 == 0 { even[i / 2] } else { odd[i / 2] };
    }
}

fn interleave_blocks<T: Copy, const B: usize>(even: &[T], odd: &[T], dst: &mut [T], mut k: usize) -> usize {
    while 2 * (k + B) <= dst.len() {
        let d = &mut dst[2 * k..2 * (k + B)];
        let (e, o) = (&even[k..k + B], &odd[k..k + B]);
        for l in 0..B {
            d[2 * l] = e[l];
            d[2 * l + 1] = o[l];
        }
        k += B;
    }
    k
}

/// `G g G^T` of a 3 x 3 filter, row-major.
#[inline(always)]
fn filter_transform<T: WithDType>(g: &[T]) -> [T; 16] {
    let h = half::<T>();
    let mut r = [[T::zero(); 3]; 4];
    for j in 0..3 {
        let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
        r[0][j] = a;
        r[1][j] = h * (a + b + c);
        r[2][j] = h * (a - b + c);
        r[3][j] = c;
    }
    let mut e = [T::zero(); 16];
    for (i, r) in r.iter().enumerate() {
        let (a, b, c) = (r[0], r[1], r[2]);
        e[4 * i] = a;
        e[4 * i + 1] = h * (a + b + c);
        e[4 * i + 2] = h * (a - b + c);
        e[4 * i + 3] = c;
    }
    e
}

/// `A^T m A`: a tile's 2 x 2 outputs from its 16 products, row-major.
#[inline(always)]
fn output_transform<T: WithDType>(m: [T; 16]) -> [T; 4] {
    let mut r = [[T::zero(); 4]; 2];
    for j in 0..4 {
        r[0][j] = m[j] + m[4 + j] + m[8 + j];
        r[1][j] = m[4 + j] - m[8 + j] - m[12 + j];
    }
    [
        r[0][0] + r[0][1] + r[0][2],
        r[0][1] - r[0][2] - r[0][3],
        r[1][0] + r[1][1] + r[1][2],
        r[1][1] - r[1][2] - r[1][3],
    ]
}

/// `G^T s G`: a 3 x 3 filter's gradient from that of its transform.
#[inline(always)]
fn filter_grad_transform<T: WithDType>(s: [T; 16]) -> [T; 9] {
    let h = half::<T>();
    let fold = |a: T, b: T, c: T, d: T| [a + h * (b + c), h * (b - c), h * (b + c) + d];
    let mut r = [[T::zero(); 4]; 3];
    for j in 0..4 {
        let f = fold(s[j], s[4 + j], s[8 + j], s[12 + j]);
        for i in 0..3 {
            r[i][j] = f[i];
        }
    }
    let mut e = [T::zero(); 9];
    for (i, r) in r.iter().enumerate() {
        let f = fold(r[0], r[1], r[2], r[3]);
        e[3 * i..3 * i + 3].copy_from_slice(&f);
    }
    e
}

/// The transformed filters of `w` `[c_out, c_in, 3, 3]`, laid out `[c_out, 16, c_in]`: `U_xi` is
/// the `[c_out, c_in]` matrix at offset `xi * c_in` with rows `16 * c_in` apart.
fn filters<T: WithDType>(w: &[T], c_out: usize, c_in: usize) -> Vec<T> {
    zeroed_chunks(c_out * 16 * c_in, 16 * c_in, |o, u| {
        for i in 0..c_in {
            let e = filter_transform(&w[(o * c_in + i) * 9..][..9]);
            for (xi, e) in e.into_iter().enumerate() {
                u[xi * c_in + i] = e;
            }
        }
    })
}

/// The transformed filters of the input gradient, `U'_xi[i, o] = U_swap(xi)[o, i]` with rows and
/// columns 0 and 3 of `xi` swapped (the transform of `rot180(w[o, i])`), laid out `[c_in, 16,
/// c_out]` like [`filters`]: reading `U` transposed instead made gemm pack it from columns
/// `16 * c_in` apart, which cost more than the products on 4 x 4 maps.
fn turned_filters<T: WithDType>(w: &[T], c_out: usize, c_in: usize) -> Vec<T> {
    const SWAP: [usize; 4] = [3, 1, 2, 0];
    // Sixteen input channels per piece, so that each output channel's filters are read in runs
    // (a piece per input channel read them `9 * c_in` values apart, a cache miss each).
    const CHANS: usize = 16;
    zeroed_chunks(c_in * 16 * c_out, CHANS * 16 * c_out, |p, u| {
        let i0 = p * CHANS;
        let n = u.len() / (16 * c_out);
        // A block of 16 output by 16 input channels at a time: its filters copied first, a run of
        // `9 n` values per output channel (read in place, each value was a cache miss: with 512
        // input channels the runs are 18 KiB apart, and all map to the same two cache sets), then
        // transformed 16 output channels to a vector, each of the 16 results a run of 16 values
        // of one of the 256 rows `(input channel, xi)` the block writes.
        let mut src = vec![T::zero(); 16 * 9 * n];
        for o0 in (0..c_out).step_by(16) {
            let os = o0..(o0 + 16).min(c_out);
            for (k, o) in os.clone().enumerate() {
                src[k * 9 * n..][..9 * n].copy_from_slice(&w[(o * c_in + i0) * 9..][..9 * n]);
            }
            for di in 0..n {
                let mut a = [[T::zero(); LANES]; 9];
                for (k, f) in src.chunks_exact(9 * n).enumerate() {
                    for (t, a) in a.iter_mut().enumerate() {
                        a[k] = f[di * 9 + t];
                    }
                }
                let e = columns(&a, &|f: [T; 9]| {
                    let e = filter_transform(&f);
                    std::array::from_fn::<T, 16, _>(|xi| e[4 * SWAP[xi / 4] + SWAP[xi % 4]])
                });
                for (xi, row) in e.iter().enumerate() {
                    u[(di * 16 + xi) * c_out + o0..][..os.len()].copy_from_slice(&row[..os.len()]);
                }
            }
        }
    })
}

/// `v[xi, i, j] = (B^T d B)[xi]` for the patch `d` of channel `i` of `inp` `[b, c, h, w]` under
/// tile `tiles.start + j`, rows of `v` `ld` apart.
///
/// Along a tile row everything is a vector over the row's tiles: `B^T` applied to the four
/// zero-padded input lines gives four lines `r`; split into even and odd columns `e`, `o`, the
/// tiles' transforms are `e[k] - e[k + 1]`, `o[k] + e[k + 1]`, `e[k + 1] - o[k]`, `o[k] - o[k + 1]`.
fn transform_patches<T: WithDType>(t: &Tiles, inp: &[T], c: usize, tiles: Range<usize>, v: &mut [T], ld: usize) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        use super::conv::{as_f32, as_f32_mut};
        if gathered::transform_patches(t, as_f32(inp), c, tiles.clone(), as_f32_mut(v), ld) {
            return;
        }
    }
    let (h, w, tw) = (t.h, t.w, t.tw);
    let zero = vec![T::zero(); w];
    // `r[p]` for the padded columns `p = x + 1` of a run: one zero before the map, zeros after.
    let mut r = vec![T::zero(); 2 * tw + 2];
    let (mut e, mut o) = (vec![T::zero(); tw + 1], vec![T::zero(); tw + 1]);
    for i in 0..c {
        t.rows(tiles.clone(), |j0, n, ty, txs| {
            let plane = &inp[(n * c + i) * t.hw()..][..t.hw()];
            let l: [&[T]; 4] = std::array::from_fn(|k| {
                let y = (2 * ty + k).wrapping_sub(1);
                if y < h { &plane[y * w..][..w] } else { &zero[..] }
            });
            let (len, lo) = (txs.len(), 2 * txs.start);
            let span = 2 * len + 2;
            // Columns x in [lo - 1, lo + span - 1) inside the map, at r[x + 1 - lo].
            let xs = lo.saturating_sub(1)..(lo + span - 1).min(w);
            let inner = xs.start + 1 - lo..xs.end + 1 - lo;
            for a in 0..4 {
                let r = &mut r[..span];
                r[..inner.start].fill(T::zero());
                r[inner.end..].fill(T::zero());
                let (p, q) = match a {
                    0 => (l[0], l[2]),
                    1 | 2 => (l[2], l[1]),
                    _ => (l[1], l[3]),
                };
                let ri = r[inner.clone()].iter_mut().zip(&p[xs.clone()]).zip(&q[xs.clone()]);
                if a == 1 {
                    ri.for_each(|((r, &p), &q)| *r = p + q);
                } else {
                    ri.for_each(|((r, &p), &q)| *r = p - q);
                }
                deinterleave(r, &mut e[..len + 1], &mut o[..len + 1]);
                let (e0, e1, o0, o1) = (&e[..len], &e[1..=len], &o[..len], &o[1..=len]);
                let mut rows = v
                    .chunks_exact_mut(ld)
                    .skip((4 * a) * c + i)
                    .step_by(c)
                    .map(|row| &mut row[j0..j0 + len]);
                let mut next = || rows.next().expect("16 rows per channel");
                for ((d, &x), &y) in next().iter_mut().zip(e0).zip(e1) {
                    *d = x - y;
                }
                for ((d, &x), &y) in next().iter_mut().zip(o0).zip(e1) {
                    *d = x + y;
                }
                for ((d, &x), &y) in next().iter_mut().zip(e1).zip(o0) {
                    *d = x - y;
                }
                for ((d, &x), &y) in next().iter_mut().zip(o0).zip(o1) {
                    *d = x - y;
                }
            }
        });
    }
}

/// The patch, gradient and output transforms of `f32` maps in AVX-512 registers, 16 tiles to a
/// vector whatever the map's width: each of a tile's patch values gathered from the map (zero
/// where the patch overhangs it) and each output scattered into it, so that ResNet-18's 4 x 4 and
/// 8 x 8 maps, whose tile rows are 2 and 4 tiles long, fill every lane as its 32 x 32 ones do.
/// Where 16 tiles lie on one tile row (maps 32 or more wide), a patch row is three masked loads
/// split into even and odd columns by permutes instead, and an output row two permutes and two
/// masked stores; where tile rows are 5 to 7 tiles long (maps 9 to 14 wide), the outputs of two
/// rows' tiles at a time go out as a permute and a masked store per row and output row.
/// Along tile rows, the scalar-indexed code above spent more time splitting even and odd columns
/// and in per-row bookkeeping than in the arithmetic.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod gathered {
    use super::Tiles;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Sixteen consecutive tiles of a block: the offset of each tile's patch corner (one row and
    /// one column before its first output) from the block's first image, and which of the
    /// patch's rows and columns lie inside the map.
    struct Group {
        offsets: [i32; 16],
        rows: [u16; 4],
        cols: [u16; 4],
        lanes: u16,
        /// The group's first tile, counted from the block's.
        start: usize,
        /// For a run of tiles along one tile row: which of the 48 columns from the first patch's
        /// corner on lie inside the map, a vector's lanes at a time.
        run: Option<[u16; 3]>,
        /// For two runs on consecutive tile rows (maps 9 to 14 wide, rows of 5 to 7 tiles), where
        /// the caller takes them.
        pair: Option<Pair>,
    }

    /// Two runs of a [`Group`], each within one tile row: the first in lanes `0..len`, the second
    /// (possibly empty) from lane `len` on, its first patch corner at `offsets[len]`. A run of
    /// `n <= 7` tiles writes `2 n <= 14` values per output row: one permute and one store, where
    /// scattered they were four scatters per group. (Reading patches and gradients so, a load
    /// per run and row and a permute per column instead of gathers, was no faster: perf samples
    /// relative to gemm's on the small CNN's 32->64 layer, forward and backward, 0.43 -> 0.43-0.45
    /// for the patches, 0.23 -> 0.26-0.29 for the gradients.)
    #[derive(Clone, Copy)]
    struct Pair {
        /// Tiles per run (the second's possibly 0).
        lens: [usize; 2],
        /// Per run, the store mask of an output row: its `2 lens[run]` values from one past the
        /// run's first patch corner, those inside the map.
        masks: [u16; 2],
        /// Per run, the permute that interleaves its tiles' two output columns.
        index: [[i32; 16]; 2],
    }

    impl Pair {
        /// Whether a run's tiles have row `dy` of their patches inside the map (all of a run's
        /// tiles or none do), given the group's `rows[dy]`.
        fn row_inside(self, rows: u16, run: usize) -> bool {
            rows >> (run * self.lens[0]) & 1 == 1
        }
    }

    /// The even and odd values of the 32 in `a` then `b`.
    ///
    /// # Safety
    /// AVX-512F must be available (it is enabled at compile time for this module).
    #[inline(always)]
    unsafe fn split(a: __m512, b: __m512) -> (__m512, __m512) {
        // SAFETY: the caller's.
        unsafe {
            let even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
            let odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
            (_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b))
        }
    }

    /// Of a run's column masks (48 columns from the patch corner on), those of the 32 columns
    /// from one past the corner on: where the tiles' 2 x 2 blocks lie.
    fn past_corner(m: [u16; 3]) -> [u16; 2] {
        std::array::from_fn(|k| (m[k] >> 1) | ((m[k + 1] & 1) << 15))
    }

    /// The groups of `tiles`, and the index of their first image; `None` where there are no
    /// tiles, or an offset would not fit the gather's 32-bit indices. With `pairs`, rows of 5 to 7
    /// tiles are taken two at a time ([`Pair`]).
    fn groups(t: &Tiles, c: usize, tiles: &Range<usize>, pairs: bool) -> Option<(usize, Vec<Group>)> {
        if tiles.is_empty() {
            return None;
        }
        let per_image = t.th * t.tw;
        let n0 = tiles.start / per_image;
        let images = (tiles.end - 1) / per_image + 1 - n0;
        if images * c * t.hw() + t.w + 1 >= i32::MAX as usize {
            return None;
        }
        let inside = |p: usize, len: usize| p >= 1 && p <= len;
        // Runs along tile rows where rows split into runs of 12 to 16 tiles (a 28 x 28 map's 14),
        // pairs of runs on rows of 5 to 7 tiles (a 14 x 14 map's 7), else 16 consecutive tiles
        // whatever their rows.
        let rows = t.tw.is_multiple_of(16) || t.tw % 16 >= 12;
        let pairs = pairs && (5..=7).contains(&t.tw);
        let mut starts = Vec::new();
        let mut g0 = tiles.start;
        while g0 < tiles.end {
            starts.push(g0);
            let len = if rows {
                16.min(t.tw - g0 % t.tw)
            } else if pairs {
                2 * t.tw - g0 % t.tw
            } else {
                16
            };
            g0 += len.min(tiles.end - g0);
        }
        let ends = starts.iter().skip(1).copied().chain([tiles.end]);
        let groups = starts
            .iter()
            .zip(ends)
            .map(|(&g0, end)| {
                let mut g = Group {
                    offsets: [0; 16],
                    rows: [0; 4],
                    cols: [0; 4],
                    lanes: 0,
                    start: g0 - tiles.start,
                    run: None,
                    pair: None,
                };
                for (l, tile) in (g0..end).enumerate() {
                    let (n, r) = (tile / per_image, tile % per_image);
                    let (y, x) = (2 * (r / t.tw), 2 * (r % t.tw));
                    // Row y - 1 + d of the map is padded row y + d: inside for 1..=h.
                    g.offsets[l] = (((n - n0) * c * t.hw() + y * t.w + x) as i64 - t.w as i64 - 1) as i32;
                    for d in 0..4 {
                        g.rows[d] |= u16::from(inside(y + d, t.h)) << l;
                        g.cols[d] |= u16::from(inside(x + d, t.w)) << l;
                    }
                    g.lanes |= 1 << l;
                }
                if rows {
                    // Loads may read past the run (into the next run's columns, inside the
                    // map); stores are masked to its own tiles.
                    let tx = g0 % t.tw;
                    let mut m = [0u16; 3];
                    for (k, m) in m.iter_mut().enumerate() {
                        for l in 0..16 {
                            *m |= u16::from(inside(2 * tx + 16 * k + l, t.w)) << l;
                        }
                    }
                    g.run = Some(m);
                }
                if pairs {
                    let len = (t.tw - g0 % t.tw).min(end - g0);
                    let lens = [len, end - g0 - len];
                    let mask = |tx: usize, n: usize| -> u16 {
                        (0..2 * n).fold(0, |m, l| m | u16::from(inside(2 * tx + 1 + l, t.w)) << l)
                    };
                    g.pair = Some(Pair {
                        lens,
                        masks: [mask(g0 % t.tw, lens[0]), mask(0, lens[1])],
                        index: std::array::from_fn(|run| {
                            std::array::from_fn(|l| ((l % 2) * 16 + (run * len + l / 2).min(15)) as i32)
                        }),
                    });
                }
                g
            })
            .collect();
        Some((n0, groups))
    }

    /// [`super::transform_patches`] for `f32`; false (and nothing written) where it does not
    /// apply.
    pub(super) fn transform_patches(
        t: &Tiles,
        inp: &[f32],
        c: usize,
        tiles: Range<usize>,
        v: &mut [f32],
        ld: usize,
    ) -> bool {
        let Some((n0, groups)) = groups(t, c, &tiles, false) else {
            return false;
        };
        assert!(inp.len() >= (n0 * c + c) * t.hw() && v.len() >= (15 * c + c - 1) * ld + tiles.len());
        let w = t.w as isize;
        for i in 0..c {
            // The map of channel i in the block's first image.
            let plane = inp[(n0 * c + i) * t.hw()..].as_ptr();
            for g in &groups {
                // SAFETY: AVX-512F is enabled at compile time. Each gathered lane lies in its
                // tile's own map (the masks drop the padding), which is inside `inp`; stores
                // write row `xi * c + i` of `v` from column `g.start`, `g.lanes` values inside the
                // block's `tiles.len()` columns, asserted above to be in `v`.
                unsafe {
                    let zero = _mm512_setzero_ps();
                    let mut d = [[zero; 4]; 4];
                    if let Some(m) = g.run {
                        // Three vectors of the patch rows' 48 columns from the corner on; the
                        // tiles' columns 0 and 1 are their even and odd columns, 2 and 3 the
                        // same one column on.
                        for (dy, row) in d.iter_mut().enumerate() {
                            if g.rows[dy] == 0 {
                                continue;
                            }
                            let p = plane.wrapping_offset(g.offsets[0] as isize + dy as isize * w);
                            let v: [__m512; 3] =
                                std::array::from_fn(|k| _mm512_maskz_loadu_ps(m[k], p.wrapping_add(16 * k)));
                            let (e, o) = split(v[0], v[1]);
                            let next = _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
                                _mm512_castps_si512(v[2]),
                                _mm512_castps_si512(v[2]),
                            ));
                            *row = [
                                e,
                                o,
                                _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
                                    _mm512_castps_si512(v[2]),
                                    _mm512_castps_si512(e),
                                )),
                                _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
                                    _mm512_castps_si512(next),
                                    _mm512_castps_si512(o),
                                )),
                            ];
                        }
                    } else {
                        let idx = _mm512_loadu_si512(g.offsets.as_ptr().cast());
                        for (dy, row) in d.iter_mut().enumerate() {
                            for (dx, d) in row.iter_mut().enumerate() {
                                let m = g.rows[dy] & g.cols[dx];
                                let base = plane.wrapping_offset(dy as isize * w + dx as isize);
                                *d = _mm512_mask_i32gather_ps::<4>(zero, m, idx, base.cast());
                            }
                        }
                    }
                    // B^T d: rows d0 - d2, d1 + d2, d2 - d1, d1 - d3.
                    let r: [[__m512; 4]; 4] = [
                        std::array::from_fn(|x| _mm512_sub_ps(d[0][x], d[2][x])),
                        std::array::from_fn(|x| _mm512_add_ps(d[1][x], d[2][x])),
                        std::array::from_fn(|x| _mm512_sub_ps(d[2][x], d[1][x])),
                        std::array::from_fn(|x| _mm512_sub_ps(d[1][x], d[3][x])),
                    ];
                    for (a, r) in r.iter().enumerate() {
                        let out = [
                            _mm512_sub_ps(r[0], r[2]),
                            _mm512_add_ps(r[1], r[2]),
                            _mm512_sub_ps(r[2], r[1]),
                            _mm512_sub_ps(r[1], r[3]),
                        ];
                        for (b, o) in out.into_iter().enumerate() {
                            let dst = v.as_mut_ptr().add(((4 * a + b) * c + i) * ld + g.start);
                            _mm512_mask_storeu_ps(dst, g.lanes, o);
                        }
                    }
                }
            }
        }
        true
    }

    /// [`super::transform_grads`] for `f32`; false (and nothing written) where it does not
    /// apply.
    pub(super) fn transform_grads(
        t: &Tiles,
        dy: &[f32],
        c: usize,
        chans: Range<usize>,
        tiles: Range<usize>,
        e: &mut [f32],
        ld: usize,
    ) -> bool {
        let Some((n0, groups)) = groups(t, c, &tiles, false) else {
            return false;
        };
        let nc = chans.len();
        assert!(dy.len() >= (n0 * c + chans.end) * t.hw() && e.len() >= (16 * nc - 1) * ld + tiles.len());
        let w = t.w as isize;
        for (oi, o) in chans.enumerate() {
            let plane = dy[(n0 * c + o) * t.hw()..].as_ptr();
            for g in &groups {
                // SAFETY: AVX-512F is enabled at compile time. A tile's 2 x 2 block starts one
                // row and one column past its patch's corner; its lanes are masked to the map,
                // which is inside `dy`. Stores write row `xi * nc + oi` of `e` from column
                // `g.start`, `g.lanes` values inside the block's columns, asserted to be in `e`.
                unsafe {
                    let zero = _mm512_setzero_ps();
                    // The block's rows: their first and second columns.
                    let mut d = [[zero; 2]; 2];
                    if let Some(m) = g.run {
                        let m = past_corner(m);
                        for (a, row) in d.iter_mut().enumerate() {
                            if g.rows[a + 1] == 0 {
                                continue;
                            }
                            let p = plane.wrapping_offset(g.offsets[0] as isize + (a as isize + 1) * w + 1);
                            let (e, o) = split(
                                _mm512_maskz_loadu_ps(m[0], p),
                                _mm512_maskz_loadu_ps(m[1], p.wrapping_add(16)),
                            );
                            *row = [e, o];
                        }
                    } else {
                        let idx = _mm512_loadu_si512(g.offsets.as_ptr().cast());
                        for (a, row) in d.iter_mut().enumerate() {
                            for (b, d) in row.iter_mut().enumerate() {
                                let m = g.rows[a + 1] & g.cols[b + 1];
                                let base = plane.wrapping_offset((a as isize + 1) * w + b as isize + 1);
                                *d = _mm512_mask_i32gather_ps::<4>(zero, m, idx, base.cast());
                            }
                        }
                    }
                    // A on the rows: d0, d0 + d1, d0 - d1, -d1; the same on each row's columns.
                    let neg = |x| _mm512_sub_ps(zero, x);
                    let rows = [
                        d[0],
                        [_mm512_add_ps(d[0][0], d[1][0]), _mm512_add_ps(d[0][1], d[1][1])],
                        [_mm512_sub_ps(d[0][0], d[1][0]), _mm512_sub_ps(d[0][1], d[1][1])],
                        [neg(d[1][0]), neg(d[1][1])],
                    ];
                    for (a, [u, v]) in rows.into_iter().enumerate() {
                        let out = [u, _mm512_add_ps(u, v), _mm512_sub_ps(u, v), neg(v)];
                        for (b, x) in out.into_iter().enumerate() {
                            let dst = e.as_mut_ptr().add(((4 * a + b) * nc + oi) * ld + g.start);
                            _mm512_mask_storeu_ps(dst, g.lanes, x);
                        }
                    }
                }
            }
        }
        true
    }

    /// [`super::write_tiles`] for `f32`; false (and nothing written) where it does not apply.
    ///
    /// # Safety
    /// As [`super::write_tiles`].
    pub(super) unsafe fn write_tiles(
        t: &Tiles,
        m: &[f32],
        c_out: usize,
        outs: Range<usize>,
        tiles: Range<usize>,
        out: *mut f32,
    ) -> bool {
        let Some((n0, groups)) = groups(t, c_out, &tiles, true) else {
            return false;
        };
        let (nt, no) = (tiles.len(), outs.len());
        assert!(m.len() >= 16 * no * nt);
        let w = t.w as isize;
        for (oi, o) in outs.enumerate() {
            let plane = out.wrapping_add((n0 * c_out + o) * t.hw());
            for g in &groups {
                // SAFETY: AVX-512F is enabled at compile time. Loads read `g.lanes` values of
                // row `xi * no + oi` of `m` from column `g.start`, inside its `nt` columns. A tile's
                // outputs start one row and one column past its patch's corner, masked to the
                // map: they lie in `out`, in this call's channels and tiles (the caller's
                // contract).
                unsafe {
                    let p: [__m512; 16] = std::array::from_fn(|xi| {
                        _mm512_maskz_loadu_ps(g.lanes, m.as_ptr().add((xi * no + oi) * nt + g.start))
                    });
                    // A^T p A.
                    let r0: [__m512; 4] =
                        std::array::from_fn(|j| _mm512_add_ps(_mm512_add_ps(p[j], p[4 + j]), p[8 + j]));
                    let r1: [__m512; 4] =
                        std::array::from_fn(|j| _mm512_sub_ps(_mm512_sub_ps(p[4 + j], p[8 + j]), p[12 + j]));
                    let y = [r0, r1].map(|r| {
                        [
                            _mm512_add_ps(_mm512_add_ps(r[0], r[1]), r[2]),
                            _mm512_sub_ps(_mm512_sub_ps(r[1], r[2]), r[3]),
                        ]
                    });
                    if let Some(mask) = g.run {
                        // Each output row of the run's tiles is up to 32 values from the first
                        // tile's column on: the two columns interleaved, masked to the map and
                        // to the run's own columns.
                        let len = g.lanes.count_ones();
                        let own = [2 * len, (2 * len).saturating_sub(16)]
                            .map(|n| if n >= 16 { u16::MAX } else { (1u16 << n) - 1 });
                        let m = past_corner(mask);
                        let m = [m[0] & own[0], m[1] & own[1]];
                        let (lo, hi) = (
                            _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0),
                            _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8),
                        );
                        for (a, [u, v]) in y.into_iter().enumerate() {
                            if g.rows[a + 1] == 0 {
                                continue;
                            }
                            let q = plane.wrapping_offset(g.offsets[0] as isize + (a as isize + 1) * w + 1);
                            _mm512_mask_storeu_ps(q, m[0], _mm512_permutex2var_ps(u, lo, v));
                            _mm512_mask_storeu_ps(q.wrapping_add(16), m[1], _mm512_permutex2var_ps(u, hi, v));
                        }
                    } else if let Some(pr) = g.pair {
                        // Per output row and run, its tiles' two columns interleaved: at most 14
                        // values from one past the run's corner, masked to the map and the run.
                        for run in (0..2).filter(|&run| pr.lens[run] > 0) {
                            let index = _mm512_loadu_si512(pr.index[run].as_ptr().cast());
                            for (a, [u, v]) in y.into_iter().enumerate() {
                                if !pr.row_inside(g.rows[a + 1], run) {
                                    continue;
                                }
                                let at = g.offsets[run * pr.lens[0]] as isize + (a as isize + 1) * w + 1;
                                let q = plane.wrapping_offset(at);
                                _mm512_mask_storeu_ps(q, pr.masks[run], _mm512_permutex2var_ps(u, index, v));
                            }
                        }
                    } else {
                        let idx = _mm512_loadu_si512(g.offsets.as_ptr().cast());
                        for (a, row) in y.into_iter().enumerate() {
                            for (b, x) in row.into_iter().enumerate() {
                                let mask = g.rows[a + 1] & g.cols[b + 1];
                                let base = plane.wrapping_offset((a as isize + 1) * w + b as isize + 1);
                                _mm512_mask_i32scatter_ps::<4>(base.cast(), mask, idx, x);
                            }
                        }
                    }
                }
            }
        }
        true
    }
}

/// `e[xi, o - chans.start, j] = (A dy A^T)[xi]` for the 2 x 2 block of `dy` `[b, c, h, w]` channel `o` under
/// tile `tiles.start + j` (zero past the map's edge), rows of `e` `ld` apart, computed like
/// [`transform_patches`]: `A` on the block's two lines `d0`, `d1` gives `d0`, `d0 + d1`,
/// `d0 - d1`, `-d1`; each split into even and odd columns `u`, `v` gives `u`, `u + v`, `u - v`,
/// `-v`.
fn transform_grads<T: WithDType>(
    t: &Tiles,
    dy: &[T],
    c: usize,
    chans: Range<usize>,
    tiles: Range<usize>,
    e: &mut [T],
    ld: usize,
) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        use super::conv::{as_f32, as_f32_mut};
        if gathered::transform_grads(t, as_f32(dy), c, chans.clone(), tiles.clone(), as_f32_mut(e), ld) {
            return;
        }
    }
    let (h, w, tw) = (t.h, t.w, t.tw);
    let zero = vec![T::zero(); w];
    let mut r = vec![T::zero(); 2 * tw];
    let (mut ev, mut od) = (vec![T::zero(); tw], vec![T::zero(); tw]);
    let nc = chans.len();
    for (oi, o) in chans.enumerate() {
        t.rows(tiles.clone(), |j0, n, ty, txs| {
            let plane = &dy[(n * c + o) * t.hw()..][..t.hw()];
            let line = |y: usize| if y < h { &plane[y * w..][..w] } else { &zero[..] };
            let (len, x0) = (txs.len(), 2 * txs.start);
            let xs = x0..(x0 + 2 * len).min(w);
            let (d0, d1) = (&line(2 * ty)[xs.clone()], &line(2 * ty + 1)[xs.clone()]);
            for a in 0..4 {
                let r = &mut r[..2 * len];
                // An odd map's last tile reads one column past its edge.
                r[xs.len()..].fill(T::zero());
                let ri = r.iter_mut().zip(d0).zip(d1);
                match a {
                    0 => ri.for_each(|((r, &p), _)| *r = p),
                    1 => ri.for_each(|((r, &p), &q)| *r = p + q),
                    2 => ri.for_each(|((r, &p), &q)| *r = p - q),
                    _ => ri.for_each(|((r, _), &q)| *r = T::zero() - q),
                }
                deinterleave(r, &mut ev[..len], &mut od[..len]);
                let (u, v) = (&ev[..len], &od[..len]);
                let mut rows = e
                    .chunks_exact_mut(ld)
                    .skip((4 * a) * nc + oi)
                    .step_by(nc)
                    .map(|row| &mut row[j0..j0 + len]);
                let mut next = || rows.next().expect("16 rows per channel");
                next().copy_from_slice(u);
                for ((d, &x), &y) in next().iter_mut().zip(u).zip(v) {
                    *d = x + y;
                }
                for ((d, &x), &y) in next().iter_mut().zip(u).zip(v) {
                    *d = x - y;
                }
                for (d, &y) in next().iter_mut().zip(v) {
                    *d = T::zero() - y;
                }
            }
        });
    }
}

/// Writes tiles `tiles` of output channels `outs` into `out` `[b, c_out, h, w]` from their
/// products `m[xi, o - outs.start, j]`: the outputs of a channel's tiles into `y[2 a + parity, j]`
/// (row `a` of the tile, even or odd column), then interleaved into the map's rows.
///
/// # Safety
/// `out` must address `b * c_out * h * w` values, of which nothing else reads or writes these
/// tiles' channels `outs` meanwhile.
unsafe fn write_tiles<T: WithDType>(
    t: &Tiles,
    m: &[T],
    c_out: usize,
    outs: Range<usize>,
    tiles: Range<usize>,
    out: *mut T,
) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        use super::conv::as_f32;
        // SAFETY: as this function's.
        if unsafe { gathered::write_tiles(t, as_f32(m), c_out, outs.clone(), tiles.clone(), out.cast()) } {
            return;
        }
    }
    let (nt, no) = (tiles.len(), outs.len());
    let (h, w) = (t.h, t.w);
    let mut y = vec![T::zero(); 4 * nt];
    for (oi, o) in outs.enumerate() {
        {
            let p: [&[T]; 16] = std::array::from_fn(|xi| &m[(xi * no + oi) * nt..][..nt]);
            let mut rows = y.chunks_exact_mut(nt);
            let mut q: [&mut [T]; 4] = std::array::from_fn(|_| rows.next().expect("4 rows"));
            lanes(&p, &mut q, output_transform);
        }
        t.rows(tiles.clone(), |j0, n, ty, txs| {
            let len = txs.len();
            let x0 = 2 * txs.start;
            let width = (2 * txs.end).min(w) - x0;
            for a in 0..2 {
                let yy = 2 * ty + a;
                if yy >= h {
                    break;
                }
                // SAFETY: these columns of row yy of plane (n, o) belong to this call's tiles
                // alone, and lie inside `out`.
                let row =
                    unsafe { std::slice::from_raw_parts_mut(out.add((n * c_out + o) * t.hw() + yy * w + x0), width) };
                let (ev, od) = (&y[2 * a * nt + j0..][..len], &y[(2 * a + 1) * nt + j0..][..len]);
                interleave(ev, od, row);
            }
        });
    }
}

/// `out[n, o] = sum_i conv3x3(inp[n, i], filter(o, i))` with padding 1, for `inp`
/// `[b, c_in, h, w]`; `lhs(xi, o0)` is `U_xi` from row (output channel) `o0` on.
fn correlate<T: WithDType>(
    t: &Tiles,
    inp: &[T],
    c_in: usize,
    c_out: usize,
    lhs: impl Fn(usize, usize) -> Mat<T> + Sync,
) -> Vec<T> {
    // Never zeroed: the tasks' tiles and channels cover every output, and `write_tiles` writes
    // each one.
    let mut out: Vec<T> = Vec::with_capacity(t.b * c_out * t.hw());
    let n = t.count();
    let nb = block(c_in, n);
    let blocks = n.div_ceil(nb);
    let threads = rayon::current_num_threads();
    let splits = (2 * threads).div_ceil(blocks).min(c_out.div_ceil(32)).max(1);
    let per = c_out.div_ceil(splits);
    let dst = out.as_mut_ptr() as usize;
    let task = |j: usize| {
        let (blk, s) = (j / splits, j % splits);
        let tiles = blk * nb..((blk + 1) * nb).min(n);
        let outs = (s * per).min(c_out)..((s + 1) * per).min(c_out);
        let (nt, no) = (tiles.len(), outs.len());
        if nt == 0 || no == 0 {
            return;
        }
        let ld = lead(nt);
        with_cols(16 * c_in * ld, |v: &mut [T]| {
            transform_patches(t, inp, c_in, tiles.clone(), v, ld);
            with_cols(16 * no * nt, |m: &mut [T]| {
                for xi in 0..16 {
                    // SAFETY: lhs is [no, c_in] from row outs.start, v's block xi [c_in, nt],
                    // m's block xi [no, nt].
                    unsafe {
                        matmul(
                            no,
                            nt,
                            c_in,
                            &mut m[xi * no * nt..],
                            false,
                            lhs(xi, outs.start),
                            Mat::rows(v[xi * c_in * ld..].as_ptr(), ld),
                        )
                    }
                }
                // SAFETY: tasks write disjoint (tile, channel) sets of out.
                unsafe { write_tiles(t, m, c_out, outs.clone(), tiles.clone(), dst as *mut T) }
            })
        })
    };
    let tasks = blocks * splits;
    if tasks == 1 {
        task(0)
    } else {
        (0..tasks).into_par_iter().for_each(task)
    }
    // SAFETY: every value was written (above), and the capacity is this length.
    unsafe { out.set_len(t.b * c_out * t.hw()) };
    out
}

/// What `kept` holds, made by `make` on first use; or `make`'s result when nothing keeps it.
fn kept_or_made<T: Clone>(kept: Option<&OnceLock<Vec<T>>>, make: impl FnOnce() -> Vec<T>) -> Cow<'_, [T]> {
    match kept {
        Some(k) => Cow::Borrowed(k.get_or_init(make)),
        None => Cow::Owned(make()),
    }
}

/// `conv(x, w)`, `[b, c_in, h, w]` to `[b, c_out, h, w]`.
pub(super) fn forward<T: WithDType>(g: &Geom, x: &[T], w: &[T], kept: Option<&OnceLock<Vec<T>>>) -> Vec<T> {
    let u = kept_or_made(kept, || filters(w, g.c_out, g.c_in));
    let ci = g.c_in;
    correlate(&Tiles::new(g.b, g.h, g.w), x, ci, g.c_out, |xi, o0| Mat {
        ptr: u[o0 * 16 * ci + xi * ci..].as_ptr(),
        rs: (16 * ci) as isize,
        cs: 1,
    })
}

/// `dx` `[b, c_in, h, w]` from `dy` `[b, c_out, h, w]`: the convolution of `dy` with the filters
/// `w'[i, o] = rot180(w[o, i])`.
pub(super) fn input_grad<T: WithDType>(g: &Geom, dy: &[T], w: &[T], kept: Option<&OnceLock<Vec<T>>>) -> Vec<T> {
    let u = kept_or_made(kept, || turned_filters(w, g.c_out, g.c_in));
    let co = g.c_out;
    correlate(&Tiles::new(g.b, g.h, g.w), dy, co, g.c_in, |xi, i0| Mat {
        ptr: u[i0 * 16 * co + xi * co..].as_ptr(),
        rs: (16 * co) as isize,
        cs: 1,
    })
}

/// `dw` `[c_out, c_in, 3, 3]` from `dy` `[b, c_out, h, w]` and `x` `[b, c_in, h, w]`.
pub(super) fn weight_grad<T: WithDType>(g: &Geom, dy: &[T], x: &[T]) -> Vec<T> {
    let t = Tiles::new(g.b, g.h, g.w);
    let (ci, co) = (g.c_in, g.c_out);
    let n = t.count();
    let threads = rayon::current_num_threads();
    // Deep products, as long as a block's transforms stay under 8 MiB of f32.
    let cap = ((1 << 21) / (16 * (ci + co))).max(32);
    // The products of tiles `tiles` and output channels `outs` onto `s` `[outs, 16, c_in]`, or
    // into it when `fresh`.
    let product = |tiles: Range<usize>, outs: Range<usize>, s: &mut [T], fresh: bool| {
        let (nt, no) = (tiles.len(), outs.len());
        let ld = lead(nt);
        with_cols(16 * ci * ld, |v: &mut [T]| {
            transform_patches(&t, x, ci, tiles.clone(), v, ld);
            with_cols(16 * no * ld, |e: &mut [T]| {
                transform_grads(&t, dy, co, outs.clone(), tiles.clone(), e, ld);
                for xi in 0..16 {
                    // SAFETY: e's block xi is [no, nt], v's [ci, nt] read transposed as
                    // [nt, ci]; s's rows are 16 * ci apart, from column xi * ci.
                    unsafe {
                        matmul_into(
                            no,
                            ci,
                            nt,
                            s.as_mut_ptr().add(xi * ci),
                            16 * ci,
                            !fresh,
                            Mat::rows(e[xi * no * ld..].as_ptr(), ld),
                            Mat::transposed(v[xi * ci * ld..].as_ptr(), ld),
                        )
                    }
                }
            })
        });
    };
    let s = if co > n && threads > 1 {
        // More output channels than tiles (ResNet-18's last stage): each task owns a range of
        // output channels over all tiles, transforming the input once per task, rather than each
        // thread summing the whole `[c_out, 16, c_in]` (16 MiB there) to be added up after.
        let per = co.div_ceil(threads);
        let nb = n.min(cap);
        zeroed_chunks(co * 16 * ci, per * 16 * ci, |p, s| {
            let outs = p * per..((p + 1) * per).min(co);
            for (k, t0) in (0..n).step_by(nb).enumerate() {
                product(t0..(t0 + nb).min(n), outs.clone(), s, k == 0);
            }
        })
    } else {
        // One block of tiles per thread, each thread's sum added up after.
        let nb = n.div_ceil(threads).clamp(1, cap);
        let blocks = n.div_ceil(nb);
        let add = |mut s: Vec<T>, blk: usize| {
            let fresh = s.is_empty();
            if fresh {
                s = vec![T::zero(); co * 16 * ci];
            }
            product(blk * nb..((blk + 1) * nb).min(n), 0..co, &mut s, fresh);
            s
        };
        sum_parts(partial_sums(blocks, add))
    };
    if s.is_empty() {
        return vec![T::zero(); co * ci * 9];
    }
    // G^T S G per filter, vectorised over input channels: 16 rows of `s` in, 9 planes out,
    // then written filter by filter.
    zeroed_chunks(co * ci * 9, 9 * ci, |o, dw| {
        let src: [&[T]; 16] = std::array::from_fn(|xi| &s[(o * 16 + xi) * ci..][..ci]);
        let mut planes = vec![T::zero(); 9 * ci];
        {
            let mut rows = planes.chunks_exact_mut(ci);
            let mut dst: [&mut [T]; 9] = std::array::from_fn(|_| rows.next().expect("9 planes"));
            lanes(&src, &mut dst, filter_grad_transform);
        }
        for (i, f) in dw.chunks_exact_mut(9).enumerate() {
            for (k, f) in f.iter_mut().enumerate() {
                *f = planes[k * ci + i];
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::conv::tests::rand;
    use candle_core::{Tensor, Var};

    fn flat(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    /// All three kernels against candle's convolution and its backward (correct for stride 1),
    /// in f64, on even and odd maps, one and several blocks of tiles and of output channels.
    #[test]
    fn agrees_with_candle_on_many_shapes() {
        for (case, &(b, ci, h, w, co)) in [
            (1, 1, 2, 2, 1),
            (2, 3, 5, 5, 4),
            (3, 2, 7, 6, 5),
            (2, 5, 1, 3, 2),
            (4, 8, 8, 8, 70),
            (9, 40, 9, 11, 33),
            (5, 70, 4, 4, 3),
            (33, 16, 6, 6, 16),
            (2, 64, 4, 5, 72),
            // More output channels than tiles, and more tiles than one block holds.
            (10, 1, 4, 4, 4000),
        ]
        .iter()
        .enumerate()
        {
            let x = Var::from_tensor(&rand(&[b, ci, h, w], case as u64)).unwrap();
            let wt = Var::from_tensor(&rand(&[co, ci, 3, 3], 50 + case as u64)).unwrap();
            let probe = rand(&[b, co, h, w], 90 + case as u64);
            let y = x.conv2d(&wt, 1, 1, 1, 1).unwrap();
            let grads = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g = Geom::new(&[b, ci, h, w], &[co, ci, 3, 3], 1, 1).unwrap();
            let (xs, ws, ps) = (flat(x.as_tensor()), flat(wt.as_tensor()), flat(&probe));
            let close = |got: Vec<f64>, want: Vec<f64>, what: &str| {
                assert_eq!(got.len(), want.len(), "{what}, case {case}");
                let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                assert!(d < 1e-10, "{what}, case {case}: {d}");
            };
            // Without kept transforms, then twice with: the first call makes them, the second
            // reads them.
            let (fwd, turned) = (OnceLock::new(), OnceLock::new());
            for kept in [None, Some(()), Some(())] {
                let (fwd, turned) = (kept.map(|_| &fwd), kept.map(|_| &turned));
                close(forward(&g, &xs, &ws, fwd), flat(&y), "forward");
                close(
                    input_grad(&g, &ps, &ws, turned),
                    flat(grads.get(x.as_tensor()).unwrap()),
                    "input gradient",
                );
            }
            close(
                weight_grad(&g, &ps, &xs),
                flat(grads.get(wt.as_tensor()).unwrap()),
                "weight gradient",
            );
        }
    }

    /// The register path's output transform writes its own tiles and nothing else (tasks write
    /// the tiles of one map side by side), with the line-by-line code's values: blocks that start
    /// and end inside tile rows, on runs of 14 tiles, an odd map, pairs of rows of 7 and 6 tiles
    /// (a 14 x 14 map, an odd 13 x 11 one) and gathered 4 x 4 maps.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    #[test]
    fn register_outputs_stay_in_their_tiles() {
        for &(b, h, w, co) in &[
            (2, 28, 28, 3),
            (2, 9, 27, 2),
            (6, 4, 4, 5),
            (2, 32, 32, 2),
            (3, 14, 14, 2),
            (2, 13, 11, 3),
        ] {
            let t = Tiles::new(b, h, w);
            let tiles = 5..t.count() - 7;
            let nt = tiles.len();
            let m: Vec<f64> = (0..16 * co * nt).map(|i| ((i * 37) % 101) as f64 - 50.0).collect();
            let m32: Vec<f32> = m.iter().map(|&v| v as f32).collect();
            let (mut want, mut got) = (vec![f64::NAN; b * co * h * w], vec![f32::NAN; b * co * h * w]);
            // SAFETY: both buffers hold the whole batch, and nothing else touches them.
            unsafe {
                write_tiles(&t, &m, co, 0..co, tiles.clone(), want.as_mut_ptr());
                assert!(gathered::write_tiles(
                    &t,
                    &m32,
                    co,
                    0..co,
                    tiles.clone(),
                    got.as_mut_ptr()
                ));
            }
            for (i, (&a, &g)) in want.iter().zip(&got).enumerate() {
                let (n, y, x) = (i / (co * h * w), (i / w) % h, i % w);
                let tile = (n * t.th + y / 2) * t.tw + x / 2;
                assert_eq!(tiles.contains(&tile), !g.is_nan(), "{:?} at {i}", (b, h, w, co));
                assert!(
                    a.is_nan() && g.is_nan() || (a - g as f64).abs() < 1e-4,
                    "{a} {g} at {i}"
                );
            }
        }
    }

    /// The `f32` kernels (with their AVX-512 transforms where built) against the `f64` ones, on
    /// even and odd maps from 1 x 3 to 6 x 60, partial groups of 16 tiles, runs of 14, blocks that
    /// start inside an image or a tile row, and both backbones' map sizes.
    #[test]
    fn f32_matches_f64() {
        for &(b, ci, h, w, co) in &[
            (3, 20, 10, 10, 24),
            (2, 3, 5, 5, 4),
            (3, 2, 7, 6, 5),
            (2, 5, 1, 3, 2),
            (5, 70, 4, 4, 3),
            (2, 9, 33, 31, 7),
            (7, 300, 8, 8, 20),
            (4, 16, 32, 32, 16),
            (6, 40, 16, 16, 600),
            // Runs of 14 tiles (blocks of 409 starting inside a row), 14 on an odd map, 16 + 14.
            (3, 40, 28, 28, 36),
            (2, 33, 9, 27, 40),
            (2, 8, 6, 60, 5),
            // Pairs of runs: rows of 7 (blocks starting inside a row), 7 on an odd map, 6, 5.
            (3, 40, 14, 14, 36),
            (2, 12, 13, 13, 20),
            (3, 17, 12, 11, 9),
            (2, 64, 9, 10, 64),
        ] {
            let g = Geom::new(&[b, ci, h, w], &[co, ci, 3, 3], 1, 1).unwrap();
            let x = flat(&rand(&[b, ci, h, w], 1));
            let wt = flat(&rand(&[co, ci, 3, 3], 2));
            let dy = flat(&rand(&[b, co, h, w], 3));
            let f32s = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
            let (x32, w32, dy32) = (f32s(&x), f32s(&wt), f32s(&dy));
            let close = |want: Vec<f64>, got: Vec<f32>, what: &str| {
                assert_eq!(want.len(), got.len());
                let scale = want.iter().fold(1.0, |m: f64, a| m.max(a.abs()));
                let d = want
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - *b as f64).abs())
                    .fold(0.0, f64::max);
                assert!(d < 1e-5 * scale, "{what} {:?}: {d} (scale {scale})", (b, ci, h, w, co));
            };
            close(forward(&g, &x, &wt, None), forward(&g, &x32, &w32, None), "forward");
            close(
                input_grad(&g, &dy, &wt, None),
                input_grad(&g, &dy32, &w32, None),
                "input gradient",
            );
            close(
                weight_grad(&g, &dy, &x),
                weight_grad(&g, &dy32, &x32),
                "weight gradient",
            );
        }
    }
}
