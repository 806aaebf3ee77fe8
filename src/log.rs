//! Front ends that print events: plain, readable lines or NDJSON.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use crate::event::{Event, EventKind};

/// How events are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Plain,
    Json,
    /// Nothing is printed: events only reach the tap (the TUI owns the terminal).
    Quiet,
}

/// Prints events to stdout, one line each; shared by every service's task.
pub struct Reporter {
    format: Format,
    color: bool,
    /// Prefix lines with the service name (several services in one run).
    prefix: bool,
    /// Serialises whole lines from concurrent services.
    out: Mutex<()>,
    /// Every event is also sent here, for the TUI and control-socket clients.
    tap: tokio::sync::broadcast::Sender<Event>,
}

const RESET: &str = "\x1b[0m";
const DIM: &str = "\x1b[2m";
const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const CYAN: &str = "\x1b[36m";

impl Reporter {
    pub fn new(format: Format, prefix: bool) -> Reporter {
        let color = format == Format::Plain
            && std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        Reporter {
            format,
            color,
            prefix,
            out: Mutex::new(()),
            tap: tokio::sync::broadcast::channel(4096).0,
        }
    }

    /// Events from now on, as they are emitted.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.tap.subscribe()
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("{code}{text}{RESET}")
        } else {
            text.to_owned()
        }
    }

    /// Prints one event and hands it to subscribers.
    pub fn emit(&self, e: &Event) {
        if self.tap.receiver_count() > 0 {
            let _ = self.tap.send(e.clone());
        }
        let line = match self.format {
            Format::Quiet => return,
            Format::Json => match serde_json::to_string(e) {
                Ok(l) => l,
                Err(_) => return,
            },
            Format::Plain => match self.plain(e) {
                Some(l) => l,
                None => return,
            },
        };
        let _guard = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = std::io::stdout().lock();
        // A closed stdout (a pipe to `head`) is a normal end, not worth a panic.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    fn plain(&self, e: &Event) -> Option<String> {
        let short = |id: &str| id.get(..12).unwrap_or(id).to_owned();
        if let EventKind::Output { line, source } = &e.kind {
            // An instance's output is always marked, so that it is not taken for pmesh-dev's.
            return Some(if source == "run" {
                format!("{} {line}", self.paint(DIM, &format!("{} >", e.service)))
            } else if self.prefix {
                format!("{} {line}", self.paint(DIM, &format!("{} |", e.service)))
            } else {
                line.clone()
            });
        }
        let time = e.ts.get(11..19).unwrap_or("");
        let head = format!("{} {}", self.paint(DIM, time), self.paint(CYAN, &e.service));
        let body = match &e.kind {
            EventKind::Watching {
                files,
                dirs,
                mode,
                startup_ms,
                polled_dirs,
                poll_interval_ms,
            } => {
                let polled = match *polled_dirs {
                    0 => String::new(),
                    n if n == *dirs => format!(" every {}", human_ms(*poll_interval_ms)),
                    n => format!("; {n} polled every {}", human_ms(*poll_interval_ms)),
                };
                format!(
                    "watching {files} files in {dirs} directories ({mode}{polled}, ready in {})",
                    human_ms(*startup_ms)
                )
            }
            EventKind::Rescan { reason } => format!("looking at the whole tree again: {reason}"),
            EventKind::LoopDetected { paths, patterns } => self.paint(
                RED,
                &format!(
                    "stopped rebuilding: each build writes into its own watched tree ({}). \
                     Ignore those files, e.g. add to .gitignore or the manifest's `ignore`: {}",
                    paths.join(", "),
                    patterns.join(" ")
                ),
            ),
            EventKind::UpToDate { id, .. } => format!("up to date ({})", short(id)),
            EventKind::Reused { id, archive } => {
                format!("reused {archive} ({}): .run points to it", short(id))
            }
            EventKind::BuildStarted { id, changed } => {
                let mut s = format!("building {}", short(id));
                match changed.as_slice() {
                    [] => {}
                    [one] => s.push_str(&format!(" ({one} changed)")),
                    many => s.push_str(&format!(
                        " ({} changed: {}{})",
                        many.len(),
                        many[..many.len().min(3)].join(", "),
                        if many.len() > 3 { ", …" } else { "" }
                    )),
                }
                s
            }
            EventKind::BuildFinished {
                id,
                ok: true,
                duration_ms,
                archive,
                ..
            } => self.paint(
                GREEN,
                &format!(
                    "built {} in {} -> {}",
                    short(id),
                    human_ms(*duration_ms),
                    archive.as_deref().unwrap_or("?")
                ),
            ),
            EventKind::BuildFinished { id, error, .. } => self.paint(
                RED,
                &format!(
                    "build {} failed: {}",
                    short(id),
                    error.as_deref().unwrap_or("unknown error")
                ),
            ),
            EventKind::Live { id, archive, port } => self.paint(
                GREEN,
                &format!("live: {} from {archive} on port {port}", short(id)),
            ),
            EventKind::Unhealthy { id, reason, .. } => self.paint(
                RED,
                &format!("build {} is unhealthy, .run went back: {reason}", short(id)),
            ),
            EventKind::Crashed {
                id,
                reason,
                restart_in_ms,
            } => self.paint(
                RED,
                &format!(
                    "instance of {} crashed: {reason}; restarting in {}",
                    short(id),
                    human_ms(*restart_in_ms)
                ),
            ),
            EventKind::Stopped { id, port, .. } => {
                format!("stopped the instance of {} on port {port}", short(id))
            }
            EventKind::Pruned { removed } => {
                format!("removed old builds: {}", removed.join(", "))
            }
            EventKind::Rollback { from, to, .. } => format!(
                "rolled back: .run -> {to} (was {})",
                from.as_deref().unwrap_or("nothing")
            ),
            EventKind::Cancelled { id } => {
                self.paint(YELLOW, &format!("build {} cancelled", short(id)))
            }
            EventKind::Warning { message } => self.paint(YELLOW, &format!("warning: {message}")),
            EventKind::Output { .. } => return None,
        };
        Some(format!("{head}  {body}"))
    }
}

/// `850ms`, `1.2s`, `3m04s`.
pub fn human_ms(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms}ms"),
        1000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60),
    }
}
