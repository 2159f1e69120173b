//! How long-running work (evaluation now, training later) reports progress and learns that it
//! should stop, without knowing whether a terminal or a window is watching.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// How far a job has got.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// What is being done, e.g. "PGD-20 (L-inf, eps 0.1)".
    pub stage: String,
    pub done: usize,
    pub total: usize,
}

/// Receives progress; says when to stop. Both have defaults so an observer implements what it needs.
pub trait Observer {
    fn progress(&mut self, _progress: &Progress) {}

    /// Checked at every step of every long loop.
    fn stop_requested(&self) -> bool {
        false
    }
}

/// Watches nothing and never stops.
pub struct Silent;

impl Observer for Silent {}

/// A stop flag that another thread (the window, a Ctrl-C handler) can raise.
#[derive(Clone, Debug, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn raise(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The end of a job that can be stopped: cancelling is an outcome, not an error.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome<T> {
    Done(T),
    Cancelled,
}
