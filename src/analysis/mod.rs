//! Numbers the views plot, computed from models: weight statistics, histograms, distances.
//! Plain `Vec<f64>` out, no tensors, so the window and the exporters draw from the same data.

pub mod filters;
pub mod router;
pub mod stats;
pub mod tradeoff;

pub use stats::{Histogram, Summary, wasserstein1};
