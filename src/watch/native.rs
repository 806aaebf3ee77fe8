//! The `notify` crate's recommended watcher: FSEvents on macOS, ReadDirectoryChangesW on
//! Windows, inotify on Linux (where it is chosen only on request, so that this path is tested
//! on every run).
//!
//! FSEvents and ReadDirectoryChangesW watch a whole tree at the cost of one: the service root is
//! watched recursively, once, and the directories below it need nothing more (the engine drops
//! events under ignored ones). Elsewhere each directory has its own non-recursive watch, as
//! with inotify. FSEvents names canonical paths (`/private/var/...` for `/var/...`): they are
//! put back under the path the engine knows.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use rustc_hash::FxHashSet;
use tokio::sync::mpsc::UnboundedSender;

use super::{WatchError, WatchMsg, deliver};

/// Whether this system's native watcher covers a tree with one recursive watch.
const RECURSIVE: bool = cfg!(any(target_os = "macos", windows));

/// Canonical roots of the recursive watches and the paths the engine knows them by.
type Aliases = Arc<Mutex<Vec<(PathBuf, PathBuf)>>>;

pub(super) struct Native {
    watcher: RecommendedWatcher,
    base: PathBuf,
    /// Directories with a watch of their own.
    watched: FxHashSet<PathBuf>,
    /// Directories below a recursive watch (counted, nothing else).
    covered: usize,
    /// Whether `base` has its recursive watch.
    recursive_base: bool,
    aliases: Aliases,
}

impl Native {
    pub(super) fn new(
        tx: UnboundedSender<WatchMsg>,
        base: PathBuf,
        overflow: bool,
    ) -> Result<Native, WatchError> {
        let aliases = Aliases::default();
        let names = aliases.clone();
        let handler = move |res: notify::Result<notify::Event>| {
            let msg = match res {
                Ok(ev) => match translate(ev, &names) {
                    Some(m) => m,
                    None => return,
                },
                Err(e) => WatchMsg::Error(format!("watcher: {e}")),
            };
            // The engine stopped listening: it drops this watcher next.
            let _ = deliver(&tx, msg, overflow);
        };
        let watcher = notify::recommended_watcher(handler).map_err(|e| match e.kind {
            notify::ErrorKind::MaxFilesWatch => WatchError::Limit,
            _ => WatchError::Other(format!("watcher: {e}")),
        })?;
        Ok(Native {
            watcher,
            base,
            watched: FxHashSet::default(),
            covered: 0,
            recursive_base: false,
            aliases,
        })
    }

    pub(super) fn len(&self) -> usize {
        self.watched.len() + self.covered
    }

    pub(super) fn add(&mut self, dir: &Path) -> Result<(), WatchError> {
        if RECURSIVE && dir.starts_with(&self.base) {
            if !self.recursive_base {
                let base = self.base.clone();
                self.watch(&base, RecursiveMode::Recursive)?;
                self.recursive_base = true;
            }
            if dir != self.base {
                self.covered += 1;
            }
            return Ok(());
        }
        self.watch(dir, RecursiveMode::NonRecursive)
    }

    fn watch(&mut self, dir: &Path, mode: RecursiveMode) -> Result<(), WatchError> {
        match self.watcher.watch(dir, mode) {
            Ok(()) => {
                self.watched.insert(dir.to_path_buf());
                if let Ok(canonical) = dir.canonicalize()
                    && canonical != dir
                {
                    let mut aliases = self.aliases.lock().unwrap_or_else(PoisonError::into_inner);
                    aliases.push((canonical, dir.to_path_buf()));
                }
                Ok(())
            }
            Err(e) => match e.kind {
                notify::ErrorKind::MaxFilesWatch => Err(WatchError::Limit),
                notify::ErrorKind::PathNotFound => Ok(()),
                notify::ErrorKind::Io(ref io) => match io.raw_os_error() {
                    Some(libc::ENOSPC) => Err(WatchError::Limit),
                    Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => Ok(()),
                    _ => Err(WatchError::Other(format!("{}: {e}", dir.display()))),
                },
                _ => Err(WatchError::Other(format!("{}: {e}", dir.display()))),
            },
        }
    }

    pub(super) fn remove(&mut self, dirs: &[PathBuf]) {
        for d in dirs {
            if self.watched.remove(d) {
                // Gone already (its directory was deleted) is no error.
                let _ = self.watcher.unwatch(d);
                let mut aliases = self.aliases.lock().unwrap_or_else(PoisonError::into_inner);
                aliases.retain(|(_, known)| known != d);
                if *d == self.base {
                    self.recursive_base = false;
                }
            } else if RECURSIVE && d.starts_with(&self.base) {
                self.covered = self.covered.saturating_sub(1);
            }
        }
    }
}

/// What one of notify's events means to the engine: `None` for what never changes a tree.
fn translate(ev: notify::Event, aliases: &Aliases) -> Option<WatchMsg> {
    if ev.need_rescan() {
        // A directory is named when its events were coalesced or dropped: reading it again is
        // enough. Without one, or for the root itself, everything is.
        return Some(if ev.paths.is_empty() {
            WatchMsg::Rescan("the watcher lost events")
        } else {
            WatchMsg::Paths(known_paths(ev.paths, aliases))
        });
    }
    if matches!(ev.kind, EventKind::Access(_)) {
        // Opens and reads (notify asks inotify for them): a build reads every file.
        return None;
    }
    (!ev.paths.is_empty()).then(|| WatchMsg::Paths(known_paths(ev.paths, aliases)))
}

/// `paths` under the names the engine gave the watched directories.
fn known_paths(paths: Vec<PathBuf>, aliases: &Aliases) -> Vec<PathBuf> {
    let aliases = aliases.lock().unwrap_or_else(PoisonError::into_inner);
    if aliases.is_empty() {
        return paths;
    }
    paths
        .into_iter()
        .map(|p| {
            for (canonical, known) in aliases.iter() {
                if let Ok(rest) = p.strip_prefix(canonical) {
                    return if rest.as_os_str().is_empty() {
                        known.clone()
                    } else {
                        known.join(rest)
                    };
                }
            }
            p
        })
        .collect()
}
