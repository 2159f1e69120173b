//! AW-Net Lab's engine: datasets, the AW-Net model and its static baselines, checkpoints.
//!
//! AW-Net (Wei, Zhao, Li, IEEE TPAMI 2024) re-scales each convolution filter per input with
//! signals from an adversarial router, so clean and adversarial images are processed with
//! different effective weights. Everything here is a library that the command line, the window
//! and tests drive; only `cli` touches the terminal.

pub mod attack;
pub mod cli;
pub mod data;
pub mod eval;
pub mod fsutil;
pub mod model;
pub mod observe;
pub mod train;

pub use data::Dataset;
pub use model::{Arch, Forward, Mode, Model, ModelConfig, ModelKind};
