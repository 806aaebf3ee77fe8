//! File-system events for one service: one non-recursive inotify watch per directory that
//! takes part in the tree (never on ignored directories such as `node_modules`, `target` or
//! `.git`), added in batches through notify's `update_paths`, symlinks never followed, and
//! access events filtered out in the kernel.
//!
//! Why not notify's recursive mode or notify-debouncer-full: a recursive watch walks and watches
//! every directory, ignored ones included, and follows symlinks; the debouncer's file-id cache
//! walks the whole tree again, and version 0.7 adds many roots in time quadratic in their
//! number. Directories to watch come from our own walk instead, and the engine debounces.

use std::path::PathBuf;

use notify::{
    Config, Event, EventKind, EventKindMask, INotifyWatcher, PathOp, RecursiveMode,
    WatchPathConfig, Watcher,
};
use tokio::sync::mpsc::UnboundedSender;

/// What the watcher tells the engine.
#[derive(Debug)]
pub enum WatchMsg {
    /// Something happened at these paths.
    Paths(Vec<PathBuf>),
    /// Events were lost (the kernel queue overflowed): the whole tree must be looked at again.
    Rescan(&'static str),
    /// The watch limit was reached while watching a new directory.
    Limit,
    Error(String),
}

/// Why directories could not be watched.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("the inotify watch limit was reached")]
    Limit,
    #[error("cannot watch: {0}")]
    Other(String),
}

/// The inotify watcher of one service.
pub struct DirWatcher {
    inner: INotifyWatcher,
    /// Directories watched now; checked against `PMESH_DEV_TEST_MAX_WATCHES`.
    count: usize,
    /// A limit for tests, standing in for `fs.inotify.max_user_watches`.
    test_limit: Option<usize>,
}

/// Test hook: when set, every event is dropped and reported as a lost queue instead, as if the
/// kernel's event queue always overflowed.
const TEST_OVERFLOW: &str = "PMESH_DEV_TEST_OVERFLOW";
/// Test hook: behave as if at most this many directories could be watched.
const TEST_MAX_WATCHES: &str = "PMESH_DEV_TEST_MAX_WATCHES";

impl DirWatcher {
    pub fn new(tx: UnboundedSender<WatchMsg>) -> Result<DirWatcher, WatchError> {
        let overflow = std::env::var_os(TEST_OVERFLOW).is_some();
        let handler = move |res: notify::Result<Event>| {
            let msg = match res {
                Ok(ev) if ev.need_rescan() => {
                    WatchMsg::Rescan("the kernel's event queue overflowed")
                }
                Ok(_) if overflow => WatchMsg::Rescan("events were dropped (test hook)"),
                Ok(Event {
                    kind: EventKind::Access(_),
                    ..
                }) => return,
                Ok(ev) if ev.paths.is_empty() => return,
                Ok(ev) => WatchMsg::Paths(ev.paths),
                Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => WatchMsg::Limit,
                Err(e) => WatchMsg::Error(e.to_string()),
            };
            let _ = tx.send(msg);
        };
        let config = Config::default()
            .with_follow_symlinks(false)
            .with_event_kinds(EventKindMask::CORE);
        let inner = INotifyWatcher::new(handler, config).map_err(|e| match e.kind {
            notify::ErrorKind::MaxFilesWatch => WatchError::Limit,
            _ => WatchError::Other(e.to_string()),
        })?;
        Ok(DirWatcher {
            inner,
            count: 0,
            test_limit: std::env::var(TEST_MAX_WATCHES)
                .ok()
                .and_then(|v| v.parse().ok()),
        })
    }

    /// Watches each of `dirs` (non-recursively). Directories that vanished meanwhile are
    /// skipped; their removal shows up as an event.
    pub fn add(&mut self, dirs: Vec<PathBuf>) -> Result<(), WatchError> {
        if let Some(limit) = self.test_limit
            && self.count + dirs.len() > limit
        {
            return Err(WatchError::Limit);
        }
        self.count += dirs.len();
        let config =
            WatchPathConfig::new(RecursiveMode::NonRecursive).with_dereference_symlinks(false);
        let mut ops: Vec<PathOp> = dirs
            .into_iter()
            .map(|d| PathOp::Watch(d, config.clone()))
            .collect();
        while !ops.is_empty() {
            match self.inner.update_paths(std::mem::take(&mut ops)) {
                Ok(()) => break,
                Err(e) => match e.source.kind {
                    notify::ErrorKind::MaxFilesWatch => return Err(WatchError::Limit),
                    notify::ErrorKind::PathNotFound => ops = e.remaining,
                    notify::ErrorKind::Io(ref io)
                        if io.kind() == std::io::ErrorKind::NotFound
                            || io.raw_os_error() == Some(libc::ENOTDIR) =>
                    {
                        ops = e.remaining
                    }
                    _ if e.origin.is_none() => return Err(WatchError::Other(e.to_string())),
                    _ => return Err(WatchError::Other(format!("{}: {e}", describe(&e.origin)))),
                },
            }
        }
        Ok(())
    }

    /// Stops watching `dirs`; those already gone are no error.
    pub fn remove(&mut self, dirs: Vec<PathBuf>) {
        self.count = self.count.saturating_sub(dirs.len());
        let mut ops: Vec<PathOp> = dirs.into_iter().map(PathOp::Unwatch).collect();
        while !ops.is_empty() {
            match self.inner.update_paths(std::mem::take(&mut ops)) {
                Ok(()) => break,
                Err(e) => ops = e.remaining,
            }
        }
    }
}

fn describe(op: &Option<PathOp>) -> String {
    match op {
        Some(op) => op.as_path().display().to_string(),
        None => String::new(),
    }
}

/// The current inotify watch limit, for the message that suggests raising it.
pub fn max_user_watches() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
        .ok()?
        .trim()
        .parse()
        .ok()
}
