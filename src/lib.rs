//! AW-Net Lab's engine: datasets, the AW-Net model and its static baselines, checkpoints.
//!
//! AW-Net (Wei, Zhao, Li, IEEE TPAMI 2024) re-scales each convolution filter per input with
//! signals from an adversarial router, so clean and adversarial images are processed with
//! different effective weights. Everything here is a library that the command line, the window
//! and tests drive; only `cli` touches the terminal.

pub mod analysis;
pub mod attack;
pub mod cli;
pub mod data;
pub mod eval;
pub mod export;
pub mod fsutil;
pub mod gui;
pub mod memory;
pub mod model;
pub mod observe;
pub mod train;

pub use data::Dataset;
pub use model::{Arch, Forward, Mode, Model, ModelConfig, ModelKind};

/// Process-wide settings for speed. Call once, first thing in `main`, before any thread exists.
///
/// Keeps freed tensor buffers in the heap instead of returning them to the kernel: candle
/// allocates and frees large buffers on every op, and glibc's defaults (mmap above 128 KiB, trim
/// on free) turn each into page faults.
///
/// Fixes the thread count once: unless `RAYON_NUM_THREADS` is set, candle 0.11 works it out again
/// on every matrix product by parsing `/proc/cpuinfo` (five system calls), which was 15% of a
/// one-image PGD-20 attack. Setting the variable to candle's own answer keeps the count candle
/// would use, and gives rayon's pool (our kernels) the same.
///
/// Shortens the spin of candle's own thread pool between its ops (unless
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set) from 25,000 rounds to 500, after which its thread
/// parks: on two cores it spun beside rayon's workers running our kernels (8% of a ResNet-18
/// training step's samples). Interleaved runs: ResNet-18 step (batch 32, uncommitted example)
/// 8-12% faster in 5 of 6, small-CNN standard step 2-7% faster in 6 of 6 (`cargo bench`),
/// one-image PGD-20 unchanged (7.9-8.1 ms).
pub fn tune_runtime() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: called before any other thread exists, so nothing reads the environment
        // concurrently; candle reads the variable when its pool starts, at its first op.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "500") };
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        // SAFETY: called before any other thread exists, so nothing reads the environment
        // concurrently.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
}

/// Runs `f` on one of rayon's worker threads and returns its result; inline when the caller is
/// one already.
///
/// A training step alternates candle's serial ops on the calling thread with our kernels'
/// parallel loops on rayon's pool. Called from any other thread, each loop wakes the pool's
/// workers and puts the caller to sleep until they finish, and between loops both workers spin
/// beside the caller: three threads on two cores. On a worker, the caller takes its share of
/// each loop and only one other thread waits.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    #[test]
    fn on_pool_runs_on_a_worker_and_stays_there_when_nested() {
        assert_eq!(rayon::current_thread_index(), None, "the test thread is no worker");
        let (index, value) = super::on_pool(|| (rayon::current_thread_index(), 6 * 7));
        assert!(index.is_some());
        assert_eq!(value, 42);
        let same = super::on_pool(|| {
            let outer = rayon::current_thread_index();
            super::on_pool(rayon::current_thread_index) == outer
        });
        assert!(same);
        let panicked = std::panic::catch_unwind(|| super::on_pool(|| panic!("inside")));
        assert!(panicked.is_err(), "a panic reaches the caller");
    }
}
