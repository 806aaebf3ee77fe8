//! Events: everything the engine tells its front ends, and the NDJSON shape scripts rely on.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// One thing that happened to one service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub service: String,
    /// RFC 3339, UTC, milliseconds.
    pub ts: String,
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    pub fn now(service: &str, kind: EventKind) -> Event {
        Event {
            service: service.to_owned(),
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            kind,
        }
    }
}

/// What happened. The `event` field of the JSON form is the variant's snake_case name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// The service's tree is watched; `mode` is `inotify`, `fsevents`, `native` or `poll`.
    /// `polled_dirs` of the `dirs` are polled (past the watch limit, or all of them), one
    /// pass every `poll_interval_ms` for now (it grows with what a pass costs).
    Watching {
        files: usize,
        dirs: usize,
        mode: String,
        polled_dirs: usize,
        poll_interval_ms: u64,
        startup_ms: u64,
    },
    /// The whole tree is looked at again (lost events, ignore rules edited).
    Rescan {
        reason: String,
    },
    /// Builds kept triggering themselves by writing into the watched tree; rebuilding is
    /// paused until another file changes.
    LoopDetected {
        paths: Vec<String>,
        patterns: Vec<String>,
    },
    /// `.run` already holds this id; nothing to do.
    UpToDate {
        id: String,
        archive: Option<String>,
    },
    /// An archive with this id existed and `.run` now points to it; nothing was built.
    Reused {
        id: String,
        archive: String,
    },
    BuildStarted {
        id: String,
        changed: Vec<String>,
    },
    /// A line a build step (`source` = `build`) or an instance (`run`) printed.
    Output {
        line: String,
        source: String,
    },
    /// An instance of build `id` is serving: the proxy sends new requests to it.
    Live {
        id: String,
        archive: String,
        port: u16,
    },
    /// An instance never became healthy; `.run` went back to the previous build.
    Unhealthy {
        id: String,
        archive: String,
        reason: String,
    },
    /// The live instance exited on its own; it is restarted after `restart_in_ms`.
    Crashed {
        id: String,
        reason: String,
        restart_in_ms: u64,
    },
    /// An instance was stopped (replaced, or pmesh-dev is quitting).
    Stopped {
        id: String,
        archive: String,
        port: u16,
    },
    /// Sent once the archive exists and `.run` points to it (when `ok`).
    BuildFinished {
        id: String,
        ok: bool,
        duration_ms: u64,
        archive: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Old archives deleted by retention.
    Pruned {
        removed: Vec<String>,
    },
    /// `.run` moved back to an older build.
    Rollback {
        from: Option<String>,
        to: String,
        id: Option<String>,
    },
    /// The build was cancelled (Ctrl-C, SIGTERM or a newer change).
    Cancelled {
        id: String,
    },
    Warning {
        message: String,
    },
}

/// What a front end (the TUI, or a command sent over the control socket) asks of a service's
/// engine. The keyboard and the socket send the same commands.
#[derive(Debug)]
pub enum Command {
    /// Build the current tree (even if `.run` holds it already, when `force`).
    Build {
        force: bool,
        reply: Option<tokio::sync::oneshot::Sender<Done>>,
    },
    /// Re-point `.run` at `build` (default: the newest good build older than the live one),
    /// then serve it through the same health-gated swap as a new build.
    Rollback {
        build: Option<String>,
        reply: Option<tokio::sync::oneshot::Sender<Done>>,
    },
    /// Start a fresh instance of the live build and swap to it.
    Restart {
        reply: Option<tokio::sync::oneshot::Sender<Done>>,
    },
}

/// How a command ended: the exit code the CLI ends with, and a line saying why.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Done {
    pub code: u8,
    pub message: String,
}

impl Done {
    pub fn new(code: u8, message: impl Into<String>) -> Done {
        Done {
            code,
            message: message.into(),
        }
    }
}
