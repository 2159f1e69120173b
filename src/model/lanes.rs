//! Eight `f32` lanes for the sums over a plane that the kernels take (BatchNorm's and a ReLU's
//! backward). The compiler does not vectorise those loops on its own, even written in eight lanes:
//! its SLP vectoriser packed the several running sums of one lane together rather than the eight
//! lanes of one sum, and loaded a masked value one scalar at a time (BatchNorm's backward sums ran
//! at about 1 ns per value; as `F8` at 0.2-0.3 ns).
//!
//! Built for AVX (`-C target-cpu=native`, which `.cargo/config.toml` sets, on any x86-64 CPU of
//! the last decade) `F8` is a `__m256`; on other targets it is eight scalars with the same meaning.

#[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
mod imp {
    // SAFETY (every `unsafe` block below): the intrinsics need AVX (FMA for `_mm256_fmadd_ps`,
    // which has its own cfg), and this module is only compiled when the build enables them for
    // all of its code; loads and stores go through references to exactly eight f32s, and the
    // unaligned forms allow any alignment.
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    #[derive(Clone, Copy)]
    pub struct F8(__m256);

    impl F8 {
        #[inline(always)]
        pub fn splat(v: f32) -> Self {
            F8(unsafe { _mm256_set1_ps(v) })
        }

        #[inline(always)]
        pub fn load(v: &[f32; 8]) -> Self {
            F8(unsafe { _mm256_loadu_ps(v.as_ptr()) })
        }

        #[inline(always)]
        pub fn store(self, out: &mut [MaybeUninit<f32>; 8]) {
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().cast::<f32>(), self.0) }
        }

        #[inline(always)]
        pub fn to_array(self) -> [f32; 8] {
            let mut out = [0f32; 8];
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), self.0) };
            out
        }

        #[inline(always)]
        pub fn add(self, o: Self) -> Self {
            F8(unsafe { _mm256_add_ps(self.0, o.0) })
        }

        #[inline(always)]
        pub fn mul(self, o: Self) -> Self {
            F8(unsafe { _mm256_mul_ps(self.0, o.0) })
        }

        /// `self * a + b`.
        #[inline(always)]
        pub fn mul_add(self, a: Self, b: Self) -> Self {
            #[cfg(target_feature = "fma")]
            return F8(unsafe { _mm256_fmadd_ps(self.0, a.0, b.0) });
            #[cfg(not(target_feature = "fma"))]
            return self.mul(a).add(b);
        }

        /// `self` where `m > 0`, else 0.
        #[inline(always)]
        pub fn where_positive(self, m: Self) -> Self {
            F8(unsafe { _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(m.0, _mm256_setzero_ps()), self.0) })
        }

        #[inline(always)]
        pub fn sum(self) -> f32 {
            unsafe {
                let q = _mm_add_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps::<1>(self.0));
                let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
                _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)))
            }
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx")))]
mod imp {
    use std::mem::MaybeUninit;

    #[derive(Clone, Copy)]
    pub struct F8([f32; 8]);

    impl F8 {
        #[inline(always)]
        fn zip(self, o: Self, f: impl Fn(f32, f32) -> f32) -> Self {
            F8(std::array::from_fn(|l| f(self.0[l], o.0[l])))
        }

        #[inline(always)]
        pub fn splat(v: f32) -> Self {
            F8([v; 8])
        }

        #[inline(always)]
        pub fn load(v: &[f32; 8]) -> Self {
            F8(*v)
        }

        #[inline(always)]
        pub fn store(self, out: &mut [MaybeUninit<f32>; 8]) {
            for (o, v) in out.iter_mut().zip(self.0) {
                o.write(v);
            }
        }

        #[inline(always)]
        pub fn to_array(self) -> [f32; 8] {
            self.0
        }

        #[inline(always)]
        pub fn add(self, o: Self) -> Self {
            self.zip(o, |a, b| a + b)
        }

        #[inline(always)]
        pub fn mul(self, o: Self) -> Self {
            self.zip(o, |a, b| a * b)
        }

        /// `self * a + b`.
        #[inline(always)]
        pub fn mul_add(self, a: Self, b: Self) -> Self {
            self.mul(a).add(b)
        }

        /// `self` where `m > 0`, else 0.
        #[inline(always)]
        pub fn where_positive(self, m: Self) -> Self {
            self.zip(m, |v, m| if m > 0.0 { v } else { 0.0 })
        }

        #[inline(always)]
        pub fn sum(self) -> f32 {
            self.0.iter().sum()
        }
    }
}

pub(crate) use imp::F8;

/// A ReLU's backward over one plane, with the sums that a per-plane affine map before the ReLU
/// needs for its own gradient: `g = dy where y > 0`, returned as `(sum g, sum g x)`, and written
/// out as `dx = g a` unless `dx` is empty.
pub(crate) fn relu_grad_sums(dy: &[f32], y: &[f32], x: &[f32], a: f32, dx: &mut [f32]) -> (f32, f32) {
    let write = !dx.is_empty();
    assert!(y.len() == dy.len() && x.len() == dy.len() && (!write || dx.len() == dy.len()));
    let (mut sg, mut sgx) = (F8::splat(0.0), F8::splat(0.0));
    let av = F8::splat(a);
    let ((dx8, dx_rest), (dy8, dy_rest)) = (dx.as_chunks_mut::<8>(), dy.as_chunks::<8>());
    let ((y8, y_rest), (x8, x_rest)) = (y.as_chunks::<8>(), x.as_chunks::<8>());
    for (i, ((dy, y), x)) in dy8.iter().zip(y8).zip(x8).enumerate() {
        let g = F8::load(dy).where_positive(F8::load(y));
        if write {
            dx8[i] = g.mul(av).to_array();
        }
        sg = sg.add(g);
        sgx = g.mul_add(F8::load(x), sgx);
    }
    let (mut sg, mut sgx) = (sg.sum(), sgx.sum());
    for (i, ((&dy, &y), &x)) in dy_rest.iter().zip(y_rest).zip(x_rest).enumerate() {
        let g = if y > 0.0 { dy } else { 0.0 };
        if write {
            dx_rest[i] = g * a;
        }
        sg += g;
        sgx += g * x;
    }
    (sg, sgx)
}

#[cfg(test)]
mod tests {
    use super::{F8, relu_grad_sums};
    use std::mem::MaybeUninit;

    #[test]
    fn lanes_compute_what_they_say() {
        let a: [f32; 8] = [1.0, -2.0, 3.0, 0.0, -0.5, 6.0, 7.5, -8.0];
        let b: [f32; 8] = [0.5, 4.0, -1.0, 2.0, 3.0, -0.0, 1.0, 2.0];
        let (fa, fb) = (F8::load(&a), F8::load(&b));
        let mut out = [MaybeUninit::uninit(); 8];
        fa.mul_add(fb, F8::splat(1.0)).add(fa.mul(fb)).store(&mut out);
        for l in 0..8 {
            // SAFETY: `store` wrote all eight lanes.
            assert_eq!(unsafe { out[l].assume_init() }, 2.0 * a[l] * b[l] + 1.0);
        }
        fa.where_positive(fb).store(&mut out);
        for l in 0..8 {
            let want = if b[l] > 0.0 { a[l] } else { 0.0 };
            // SAFETY: as above.
            assert_eq!(unsafe { out[l].assume_init() }, want, "lane {l}");
        }
        assert_eq!(fa.to_array(), a);
        assert_eq!(fa.sum(), a.iter().sum::<f32>());
    }

    #[test]
    fn relu_gradient_sums_match_the_plain_loop() {
        let n = 21;
        let dy: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..n).map(|i| (i as f32 * 1.3).cos()).collect();
        let x: Vec<f32> = (0..n).map(|i| 0.1 * i as f32 - 1.0).collect();
        let g: Vec<f32> = dy
            .iter()
            .zip(&y)
            .map(|(&d, &y)| if y > 0.0 { d } else { 0.0 })
            .collect();
        let (sg, sgx) = (g.iter().sum::<f32>(), g.iter().zip(&x).map(|(g, x)| g * x).sum::<f32>());
        let mut dx = vec![0.0; n];
        for (got_g, got_gx) in [
            relu_grad_sums(&dy, &y, &x, 2.0, &mut dx),
            relu_grad_sums(&dy, &y, &x, 2.0, &mut []),
        ] {
            assert!((got_g - sg).abs() < 1e-5 && (got_gx - sgx).abs() < 1e-5);
        }
        assert!(dx.iter().zip(&g).all(|(d, g)| *d == 2.0 * g));
    }
}
