//! Integration tests: one binary, one module per area. Each test gets a fresh temporary
//! directory and runs the real `pmesh-dev` binary.

mod util;

mod browser;
mod build;
mod cache;
mod control;
mod firsthour;
mod hash;
mod live;
mod manifest;
mod serve;
mod session;
mod stacks;
mod tui;
mod watch;
