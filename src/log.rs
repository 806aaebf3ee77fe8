//! Front ends that print events: plain, readable lines or NDJSON.

use std::io::{IsTerminal, Write};
use std::sync::Arc;

use crate::event::{Event, EventKind, Sink};

/// How events are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Plain,
    Json,
    /// Nothing is printed: events only reach the tap (the TUI owns the terminal).
    Quiet,
}

/// Prints events to stdout, one line each: a subscriber of the sink that the CLI starts.
pub struct Printer {
    format: Format,
    color: bool,
    /// Prefix lines with the service name (several services in one run).
    prefix: bool,
}

const RESET: &str = "\x1b[0m";
const DIM: &str = "\x1b[2m";
const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
/// The colours services' names take in plain output, one each (by a hash of the name, so a
/// service keeps its colour from run to run).
const SERVICE_COLOURS: [&str; 6] = [
    "\x1b[36m", "\x1b[35m", "\x1b[34m", "\x1b[96m", "\x1b[95m", "\x1b[94m",
];

fn service_colour(name: &str) -> &'static str {
    let h = xxhash_rust::xxh3::xxh3_64(name.as_bytes());
    SERVICE_COLOURS[(h % SERVICE_COLOURS.len() as u64) as usize]
}

/// Whether colour goes to the terminal: stdout is one and `NO_COLOR` is not set.
pub fn colour_terminal() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// An attached printer; [`Printing::finish`] ends the sink's subscriptions once all is said.
pub struct Printing {
    sink: Arc<Sink>,
}

impl Printing {
    /// Closes the sink: every event emitted before has been printed (printing is synchronous)
    /// and the other subscribers end after reading theirs.
    pub async fn finish(self) {
        self.sink.close();
    }
}

impl Printer {
    pub fn new(format: Format, prefix: bool) -> Printer {
        let color = format == Format::Plain && colour_terminal();
        Printer {
            format,
            color,
            prefix,
        }
    }

    /// Prints every event `sink` receives from now on, as it is emitted; nothing with
    /// [`Format::Quiet`]. Nothing is dropped: a slow stdout slows the emitter, as a terminal
    /// would any program.
    pub fn spawn(self, sink: &Arc<Sink>) -> Printing {
        if self.format != Format::Quiet {
            sink.attach(move |e| self.print(e));
        }
        Printing { sink: sink.clone() }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("{code}{text}{RESET}")
        } else {
            text.to_owned()
        }
    }

    fn print(&self, e: &Event) {
        let line = match self.format {
            Format::Quiet => None,
            Format::Json => serde_json::to_string(e).ok(),
            Format::Plain => self.plain(e),
        };
        let Some(mut line) = line else { return };
        line.push('\n');
        let mut out = std::io::stdout().lock();
        // A closed stdout (a pipe to `head`) is a normal end, not worth a panic.
        let _ = out.write_all(line.as_bytes());
        let _ = out.flush();
    }

    fn plain(&self, e: &Event) -> Option<String> {
        let short = |id: &str| id.get(..12).unwrap_or(id).to_owned();
        if let EventKind::Output { line, source } = &e.kind {
            // An instance's output is always marked, so that it is not taken for pmesh-dev's.
            return Some(if source == "run" {
                format!(
                    "{} {line}",
                    self.paint(service_colour(&e.service), &format!("{} >", e.service))
                )
            } else if self.prefix {
                format!(
                    "{} {line}",
                    self.paint(service_colour(&e.service), &format!("{} |", e.service))
                )
            } else {
                line.clone()
            });
        }
        let time = e.ts.get(11..19).unwrap_or("");
        let head = format!(
            "{} {}",
            self.paint(DIM, time),
            self.paint(service_colour(&e.service), &e.service)
        );
        let body = match &e.kind {
            EventKind::Watching {
                files,
                dirs,
                mode,
                startup_ms,
                url,
                polled_dirs,
                poll_interval_ms,
            } => {
                let polled = match *polled_dirs {
                    0 => String::new(),
                    n if n == *dirs => format!(" every {}", human_ms(*poll_interval_ms)),
                    n => format!("; {n} polled every {}", human_ms(*poll_interval_ms)),
                };
                let mut s = format!(
                    "watching {} in {} ({mode}{polled}, ready in {})",
                    plural(*files, "file"),
                    plural(*dirs, "directory"),
                    human_ms(*startup_ms)
                );
                if let Some(url) = url {
                    s.push_str(&format!("; open {url}"));
                }
                s
            }
            EventKind::Polling {
                polled_dirs,
                poll_interval_ms,
            } => polling_line(*polled_dirs, *poll_interval_ms),
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
            EventKind::Live {
                id,
                archive,
                port,
                url,
            } => self.paint(
                GREEN,
                &match url {
                    Some(url) => format!(
                        "{} -> {url}  live: {} from {archive} (instance on port {port})",
                        e.service,
                        short(id)
                    ),
                    None => format!("live: {} from {archive} on port {port}", short(id)),
                },
            ),
            EventKind::Unhealthy {
                id,
                reason,
                back,
                retry_in_ms,
                ..
            } => self.paint(
                RED,
                &match (back, retry_in_ms) {
                    (Some(back), _) => format!(
                        "build {} is unhealthy, .run went back to {back}: {reason}",
                        short(id)
                    ),
                    (None, Some(ms)) => format!(
                        "build {} is unhealthy and there is no earlier build to go back to; \
                         starting it again in {}: {reason}",
                        short(id),
                        human_ms(*ms)
                    ),
                    (None, None) => format!(
                        "build {} is unhealthy and there is no earlier build to go back to: \
                         {reason}",
                        short(id)
                    ),
                },
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
            EventKind::Waiting {
                id, for_services, ..
            } => format!(
                "{} is built; its first instance starts once {} {} live",
                short(id),
                for_services.join(", "),
                if for_services.len() == 1 { "is" } else { "are" }
            ),
            EventKind::Stopped { id, port, .. } => {
                format!("stopped the instance of {} on port {port}", short(id))
            }
            EventKind::Fetched {
                id,
                archive,
                bytes,
                duration_ms,
            } => self.paint(
                GREEN,
                &format!(
                    "fetched {} from the cache ({} in {}) -> {archive}",
                    short(id),
                    human_bytes(*bytes),
                    human_ms(*duration_ms)
                ),
            ),
            EventKind::Pushed {
                id,
                bytes,
                duration_ms,
            } => format!(
                "pushed {} to the cache ({} in {})",
                short(id),
                human_bytes(*bytes),
                human_ms(*duration_ms)
            ),
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
            EventKind::ManifestError { message, .. } => self.paint(
                RED,
                &format!(
                    "the manifest has an error; nothing changed until it is fixed:\n{message}"
                ),
            ),
            EventKind::ManifestApplied {
                file,
                added,
                removed,
                changed,
            } => {
                let mut parts = Vec::new();
                for (what, list) in [
                    ("started", added),
                    ("stopped", removed),
                    ("restarted", changed),
                ] {
                    if !list.is_empty() {
                        parts.push(format!("{what} {}", list.join(", ")));
                    }
                }
                if parts.is_empty() {
                    parts.push("no service changed".to_owned());
                }
                format!("applied {file}: {}", parts.join("; "))
            }
            EventKind::Output { .. } => return None,
        };
        Some(format!("{head}  {body}"))
    }
}

/// `512 B`, `3.4 MB`.
fn human_bytes(n: u64) -> String {
    match n {
        0..1000 => format!("{n} B"),
        1000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

/// `1 file`, `2 files`, `1 directory`, `3 directories`.
fn plural(n: usize, one: &str) -> String {
    match (n, one.strip_suffix('y')) {
        (1, _) => format!("1 {one}"),
        (_, Some(stem)) => format!("{n} {stem}ies"),
        (_, None) => format!("{n} {one}s"),
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

/// What a `polling` event says: how often the polled directories are looked at now.
pub fn polling_line(polled_dirs: usize, poll_interval_ms: u64) -> String {
    format!(
        "{} polled, one pass every {} now (the wait follows what a pass costs)",
        plural(polled_dirs, "directory"),
        human_ms(poll_interval_ms)
    )
}
