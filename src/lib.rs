//! pmesh-dev: a filesystem-watching dev server that builds each service into content-addressed
//! archives and flips a `.run` symlink atomically.

pub mod builder;
pub mod cache;
pub mod cli;
pub mod control;
pub mod deploy;
pub mod engine;
pub mod event;
pub mod files;
pub mod guardian;
pub mod hash;
pub mod init;
pub mod log;
pub mod manifest;
pub mod pipeline;
pub mod proxy;
pub mod session;
pub mod store;
pub mod supervisor;
pub mod sys;
pub mod tui;
pub mod watch;
