//! Integration tests: the public API and the `awnet` binary.

mod attacks;
mod cli;
mod common;
mod data;
mod eval;
mod gui;
mod malformed;
mod model;
mod pytorch;
mod train;
