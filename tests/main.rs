//! Integration tests: one binary, one module per area. Each test gets a fresh temporary
//! directory and runs the real `pmesh-dev` binary.

mod util;

mod build;
mod cache;
mod control;
mod hash;
mod manifest;
mod serve;
mod tui;
mod watch;
