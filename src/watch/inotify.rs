//! The inotify backend (Linux): one non-recursive watch per directory that takes part in the
//! tree (never on ignored directories such as `node_modules`, `target` or `.git`), symlinks
//! never followed, no access events asked for.
//!
//! Why inotify itself (through the `inotify` crate) and not notify: notify's recursive mode
//! watches every directory, ignored ones included, and follows symlinks; notify-debouncer-full's
//! file-id cache walks the whole tree again, and its 0.7 adds many roots in time quadratic in
//! their number. notify's non-recursive watches avoid those, but it keeps two maps of absolute
//! paths per watch: on a 100k-file tree in 41k directories that was 21 MB of heap (33 MB of RSS),
//! more than the whole hashed tree; and it asks for open events, which every build's reads
//! would raise. Here a watch costs one map entry, from the kernel's watch descriptor to the
//! directory, and the directories to watch come from our own walk; the engine debounces.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use ::inotify::{EventMask, WatchMask, Watches};
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::UnboundedSender;

use super::{WatchError, WatchMsg, deliver};
use crate::hash::arena::{Arena, Span};

/// What a directory's watch reports: entries created, deleted, written, changed in metadata or
/// moved in or out, and the directory itself deleted or moved. `ONLYDIR` and `DONT_FOLLOW` make
/// the kernel refuse anything but a real directory, so a path that became a file or a symlink
/// since the walk is never watched.
const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MODIFY)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR)
    .union(WatchMask::DONT_FOLLOW)
    .union(WatchMask::EXCL_UNLINK);

/// Room for several hundred events per read.
const BUFFER: usize = 64 * 1024;

/// Watched directories by watch descriptor, each path kept once, in an arena: relative to the
/// service root when below it (most of them), else absolute.
#[derive(Default)]
struct Watched {
    by_wd: FxHashMap<i32, Span>,
    paths: Arena,
    base: PathBuf,
}

impl Watched {
    /// How `dir` is kept.
    fn key<'p>(&self, dir: &'p Path) -> &'p [u8] {
        match dir.strip_prefix(&self.base) {
            Ok(rel) => rel.as_os_str().as_bytes(),
            Err(_) => dir.as_os_str().as_bytes(),
        }
    }

    fn path(&self, s: Span) -> PathBuf {
        let kept = Path::new(OsStr::from_bytes(self.paths.get(s)));
        if kept.is_absolute() {
            kept.to_path_buf()
        } else if kept.as_os_str().is_empty() {
            // The root itself (joining "" would add a trailing slash).
            self.base.clone()
        } else {
            self.base.join(kept)
        }
    }

    fn insert(&mut self, wd: i32, dir: &Path) {
        let span = self.paths.push(&[self.key(dir)]);
        if let Some(old) = self.by_wd.insert(wd, span) {
            self.paths.free(old);
        }
    }

    fn remove(&mut self, wd: i32) {
        if let Some(old) = self.by_wd.remove(&wd) {
            self.paths.free(old);
            if self.paths.wasteful() {
                self.paths.compact(self.by_wd.values_mut());
            }
        }
    }
}

type Dirs = Arc<Mutex<Watched>>;

/// The inotify watcher of one service. Dropping it stops the reader and closes the descriptor.
pub(super) struct Inotify {
    watches: Watches,
    raw_fd: RawFd,
    dirs: Dirs,
    reader: tokio::task::JoinHandle<()>,
}

impl Inotify {
    /// A watcher with nothing watched yet, whose reader sends to `tx` (see [`deliver`] for
    /// `overflow`). Must be called within a tokio runtime.
    pub(super) fn new(
        tx: UnboundedSender<WatchMsg>,
        base: PathBuf,
        overflow: bool,
    ) -> Result<Inotify, WatchError> {
        let inotify = ::inotify::Inotify::init().map_err(|e| match e.raw_os_error() {
            Some(libc::EMFILE) => WatchError::Other(format!(
                "inotify_init: {e} (fs.inotify.max_user_instances is reached)"
            )),
            _ => WatchError::Other(format!("inotify_init: {e}")),
        })?;
        let watches = inotify.watches();
        // Valid as long as `watches` (which shares the descriptor) is held.
        let raw_fd = inotify.as_raw_fd();
        // SAFETY: the descriptor belongs to `inotify`, which the AsyncFd owns: it stays open and
        // the same for the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }
            .map_err(|e| WatchError::Other(format!("inotify: {e}")))?;
        let dirs = Arc::new(Mutex::new(Watched {
            base,
            ..Watched::default()
        }));
        let reader = tokio::spawn(read(fd, dirs.clone(), tx, overflow));
        Ok(Inotify {
            watches,
            raw_fd,
            dirs,
            reader,
        })
    }

    fn dirs(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.dirs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many directories are watched.
    pub(super) fn len(&self) -> usize {
        self.dirs().by_wd.len()
    }

    /// Watches `dir` (non-recursively). A directory that vanished meanwhile, or is no longer
    /// a directory, is skipped: its change shows up as an event of its parent.
    pub(super) fn add(&mut self, dir: &Path) -> Result<(), WatchError> {
        // Locked from before the watch exists until it is in the map, so that the reader never
        // meets a descriptor it cannot name.
        let mut map = self.dirs.lock().unwrap_or_else(PoisonError::into_inner);
        match self.watches.add(dir, MASK) {
            // The same descriptor again means the same directory under a new path (a rename):
            // the new path is the one events must name.
            Ok(wd) => map.insert(wd.get_watch_descriptor_id(), dir),
            Err(e) => match e.raw_os_error() {
                Some(libc::ENOSPC) => return Err(WatchError::Limit),
                Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => {}
                _ => return Err(WatchError::Other(format!("{}: {e}", dir.display()))),
            },
        }
        Ok(())
    }

    /// Stops watching `dirs`; those not watched (or already gone) are no error.
    pub(super) fn remove(&mut self, dirs: &[PathBuf]) {
        let mut map = self.dirs();
        let gone: FxHashSet<&[u8]> = dirs.iter().map(|d| map.key(d)).collect();
        let wds: Vec<i32> = (map.by_wd.iter())
            .filter(|(_, s)| gone.contains(map.paths.get(**s)))
            .map(|(wd, _)| *wd)
            .collect();
        for wd in &wds {
            map.remove(*wd);
        }
        drop(map);
        for wd in wds {
            // The kernel may have dropped the watch already (its directory was deleted); the
            // IN_IGNORED that follows finds nothing left to remove.
            // SAFETY: inotify_rm_watch takes two integers and touches no memory of ours.
            unsafe {
                libc::inotify_rm_watch(self.raw_fd, wd);
            }
        }
    }
}

impl Drop for Inotify {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Reads events until the watcher is dropped, turning each batch into the paths it names.
async fn read(
    fd: AsyncFd<::inotify::Inotify>,
    dirs: Dirs,
    tx: UnboundedSender<WatchMsg>,
    overflow: bool,
) {
    let mut buffer = vec![0u8; BUFFER];
    let mut fd = fd;
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                let _ = tx.send(WatchMsg::Error(format!("inotify: {e}")));
                return;
            }
        };
        let batch = guard.try_io(|inner| {
            let events = inner.get_mut().read_events(&mut buffer)?;
            let mut map = dirs.lock().unwrap_or_else(PoisonError::into_inner);
            Ok(translate(events, &mut map))
        });
        let msgs = match batch {
            Ok(Ok(msgs)) => msgs,
            Ok(Err(e)) => {
                let _ = tx.send(WatchMsg::Error(format!("inotify: {e}")));
                return;
            }
            Err(_would_block) => continue,
        };
        for msg in msgs {
            if !deliver(&tx, msg, overflow) {
                return;
            }
        }
    }
}

/// What one read's events say: the paths they name, in one message, and a rescan if the queue
/// overflowed.
fn translate<'a>(
    events: impl Iterator<Item = ::inotify::Event<&'a OsStr>>,
    dirs: &mut Watched,
) -> Vec<WatchMsg> {
    let mut paths = Vec::new();
    let mut out = Vec::new();
    for ev in events {
        if ev.mask.contains(EventMask::Q_OVERFLOW) {
            out.push(WatchMsg::Rescan("the kernel's event queue overflowed"));
            continue;
        }
        let wd = ev.wd.get_watch_descriptor_id();
        if ev.mask.contains(EventMask::IGNORED) {
            // The watch is gone: removed by us, or its directory was deleted or unmounted.
            dirs.remove(wd);
            continue;
        }
        let Some(&span) = dirs.by_wd.get(&wd) else {
            continue;
        };
        let dir = dirs.path(span);
        paths.push(match ev.name {
            Some(name) => dir.join(name),
            None => dir,
        });
    }
    if !paths.is_empty() {
        out.insert(0, WatchMsg::Paths(paths));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::mpsc;

    /// The paths of the next messages, until `want` is among them.
    async fn until(rx: &mut mpsc::UnboundedReceiver<WatchMsg>, want: &Path) -> Vec<PathBuf> {
        let mut seen = Vec::new();
        while !seen.iter().any(|p| p == want) {
            let msg = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no event for {} in {seen:?}", want.display()));
            match msg {
                Some(WatchMsg::Paths(p)) => seen.extend(p),
                other => panic!("{other:?}"),
            }
        }
        seen
    }

    #[tokio::test]
    async fn events_name_paths_and_follow_renamed_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut w = Inotify::new(tx, root.clone(), false).unwrap();
        let add = |w: &mut Inotify, dirs: &[PathBuf]| {
            for d in dirs {
                w.add(d).unwrap();
            }
        };
        let dirs = [
            root.clone(),
            root.join("a"),
            root.join("a/b"),
            outside.clone(),
        ];
        add(&mut w, &dirs);
        // Gone already, or not a directory: skipped, no error.
        std::fs::write(root.join("file"), "x").unwrap();
        add(&mut w, &[root.join("missing"), root.join("file")]);
        assert_eq!(w.len(), 4);
        until(&mut rx, &root.join("file")).await;

        std::fs::write(root.join("a/b/f.txt"), "1").unwrap();
        until(&mut rx, &root.join("a/b/f.txt")).await;
        std::fs::write(outside.join("pmesh.toml"), "1").unwrap();
        until(&mut rx, &outside.join("pmesh.toml")).await;

        // A renamed directory keeps its watch; once watched under its new path, events name
        // the new path.
        std::fs::rename(root.join("a"), root.join("c")).unwrap();
        until(&mut rx, &root.join("c")).await;
        w.remove(&[root.join("a"), root.join("a/b")]);
        add(&mut w, &[root.join("c"), root.join("c/b")]);
        std::fs::write(root.join("c/b/g.txt"), "2").unwrap();
        until(&mut rx, &root.join("c/b/g.txt")).await;
        assert_eq!(w.len(), 4);

        // A deleted directory's watch goes by itself.
        std::fs::remove_dir_all(root.join("c")).unwrap();
        until(&mut rx, &root.join("c")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(w.len(), 2, "root and outside are left");
    }
}
