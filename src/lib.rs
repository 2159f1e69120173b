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
pub fn tune_runtime() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        // SAFETY: called before any other thread exists, so nothing reads the environment
        // concurrently.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
}
