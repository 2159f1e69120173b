//! Integration tests: the public API and the `awnet` binary.

mod cli;
mod common;
mod data;
mod malformed;
mod model;
mod pytorch;
