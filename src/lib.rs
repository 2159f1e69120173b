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

/// Keeps freed tensor buffers in the heap instead of returning them to the kernel: candle
/// allocates and frees large buffers on every op, and glibc's defaults (mmap above 128 KiB, trim
/// on free) turn each into page faults. Call once, first thing in `main`.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
