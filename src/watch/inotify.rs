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
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ::inotify::{EventMask, WatchMask, Watches};
use rustc_hash::FxHashMap;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::UnboundedSender;

use super::names::{self, Finder, Found, Nodes, Parent};
use super::{Batch, WatchError, WatchMsg, deliver};

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
/// Directories from which watches are added from two threads: the kernel takes the path
/// lookups in parallel and serialises only the insertion of the marks.
const PARALLEL_MIN: usize = 256;
/// What an add's result is when it was not tried (the limit was met first). The kernel's
/// descriptors start at 1.
const NOT_TRIED: i32 = 0;

/// One watched directory, or a gone one whose name its watched children still need.
#[derive(Debug, Clone, Copy)]
struct Entry {
    wd: i32,
    /// The parent's descriptor, or 0 when the name is the whole path (see [`names`]).
    parent: i32,
    /// Where the name ends in [`Watched::names`] (it starts where the previous one ends), and
    /// [`GONE`].
    end: u32,
}

const GONE: u32 = 1 << 31;

/// Watched directories by watch descriptor, each named by its parent and its own name (12
/// bytes and the name, 18 in all on the deep bench tree, where whole paths averaged 53). The
/// path of an event is put together when it comes (the tree is 8 deep there); a renamed
/// directory that keeps its descriptor renames what is below it with it.
struct Watched {
    /// In ascending order of descriptor: the order in which the kernel hands them out.
    entries: Vec<Entry>,
    names: Vec<u8>,
    live: usize,
    gone: usize,
    /// How many gone entries make it worth dropping those no longer needed.
    compact_at: usize,
    base: PathBuf,
    /// While the first walk adds watches (see [`Early`]): the events read meanwhile, whose
    /// descriptors the map does not know yet, to be translated once it does.
    held: Option<Held>,
}

/// Gone entries that are always tolerated.
const GONE_MIN: usize = 1024;

/// Events held while the first walk runs (a start-up's worth: a few, or a build's writes).
#[derive(Default)]
struct Held {
    events: Vec<(i32, EventMask, Option<Box<OsStr>>)>,
    /// More came than are held: the tree is looked at again instead.
    lost: bool,
}

/// Events held at most; past that, a rescan.
const HELD_MAX: usize = 16 * 1024;

impl Held {
    fn keep<'a>(&mut self, events: impl Iterator<Item = (i32, EventMask, Option<&'a OsStr>)>) {
        for (wd, mask, name) in events {
            if self.events.len() >= HELD_MAX {
                self.lost = true;
                return;
            }
            self.events.push((wd, mask, name.map(Box::from)));
        }
    }
}

impl Nodes for Watched {
    fn slots(&self) -> usize {
        self.entries.len()
    }

    fn name(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.end(i - 1) };
        &self.names[start..self.end(i)]
    }

    fn parent(&self, i: usize) -> Parent {
        match self.entries[i].parent {
            0 => Parent::None,
            p => self.find(p).map_or(Parent::Lost, Parent::Slot),
        }
    }

    fn live(&self, i: usize) -> bool {
        self.entries[i].end & GONE == 0
    }
}

impl Watched {
    fn new(base: PathBuf) -> Watched {
        Watched {
            entries: Vec::new(),
            names: Vec::new(),
            live: 0,
            gone: 0,
            compact_at: GONE_MIN,
            base,
            held: None,
        }
    }

    fn end(&self, i: usize) -> usize {
        (self.entries[i].end & !GONE) as usize
    }

    /// How `dir` is kept.
    fn key<'p>(&self, dir: &'p Path) -> &'p [u8] {
        match dir.strip_prefix(&self.base) {
            Ok(rel) => rel.as_os_str().as_bytes(),
            Err(_) => dir.as_os_str().as_bytes(),
        }
    }

    /// The entry of `wd`.
    fn find(&self, wd: i32) -> Option<usize> {
        // Descriptors are handed out one after the other: an entry is where its descriptor
        // says, or before, where some were removed.
        let first = self.entries.first()?.wd;
        let guess = usize::try_from(wd.checked_sub(first)?).ok()?;
        if self.entries.get(guess).is_some_and(|e| e.wd == wd) {
            return Some(guess);
        }
        let upto = (guess + 1).min(self.entries.len());
        self.entries[..upto]
            .binary_search_by_key(&wd, |e| e.wd)
            .ok()
    }

    /// The path of entry `i`, put together in `buf`; `None` if it cannot be.
    fn dir(&self, i: usize, buf: &mut Vec<u8>) -> Option<PathBuf> {
        buf.clear();
        if !names::path(self, i, buf) {
            return None;
        }
        let kept = Path::new(OsStr::from_bytes(buf));
        Some(if kept.is_absolute() {
            kept.to_path_buf()
        } else if kept.as_os_str().is_empty() {
            // The root itself (joining "" would add a trailing slash).
            self.base.clone()
        } else {
            self.base.join(kept)
        })
    }

    /// Takes in the descriptors the kernel gave the directories of `batch` at positions
    /// `todo`: `wds[j]` for `todo[j]`, none if not positive.
    fn record(&mut self, batch: &Batch, todo: &[u32], wds: &[i32]) {
        let mut parents = vec![0i32; todo.len()];
        names::parents(
            self,
            todo.len(),
            |j| batch.rel(todo[j]),
            |j| wds[j] > 0,
            |j, found| {
                parents[j] = match found {
                    Found::None => 0,
                    Found::Added(a) => wds[a],
                    Found::Slot(s) => self.entries[s].wd,
                };
            },
        );
        let new: Vec<(i32, i32, usize)> = (0..todo.len())
            .filter(|&j| wds[j] > 0)
            .map(|j| (wds[j], parents[j], j))
            .collect();
        self.insert(new, |j, parent| {
            let rel = batch.rel(todo[j]);
            if parent == 0 { rel } else { names::last(rel) }
        });
    }

    /// Takes in `new` watches, each (descriptor, parent's descriptor or 0, position), named by
    /// `name(position, parent)`: the last of one descriptor is kept.
    fn insert<'n>(
        &mut self,
        mut new: Vec<(i32, i32, usize)>,
        name: impl Fn(usize, i32) -> &'n [u8],
    ) {
        new.sort_by_key(|&(wd, ..)| wd);
        let before = new.len();
        new.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0;
            if same {
                *earlier = *later;
            }
            same
        });
        let again = new.iter().any(|&(wd, ..)| self.find(wd).is_some());
        if again || new.len() < before {
            // The same descriptor again is the same directory under a new path (a rename):
            // the new path is the one events must name, and what is below it follows. A
            // parent named from stale paths could be the directory itself, or below it.
            self.break_cycles(&mut new);
        }
        let name = |&(_, parent, j): &(i32, i32, usize)| name(j, parent);
        let bytes: usize = new.iter().map(|n| name(n).len()).sum();
        let appends = !again
            && new
                .first()
                .is_none_or(|f| self.entries.last().is_none_or(|l| f.0 > l.wd));
        if appends {
            names::grow(&mut self.entries, new.len());
            names::grow(&mut self.names, bytes);
            for n in &new {
                self.names.extend_from_slice(name(n));
                let end = self.end_of_names();
                self.entries.push(Entry {
                    wd: n.0,
                    parent: n.1,
                    end,
                });
            }
            self.live += new.len();
            return;
        }
        // Rare (a rename, or descriptors wrapping around): all entries again, merged.
        let old = std::mem::take(&mut self.entries);
        let old_names = std::mem::take(&mut self.names);
        let old_name = |i: usize| {
            let start = if i == 0 {
                0
            } else {
                (old[i - 1].end & !GONE) as usize
            };
            &old_names[start..(old[i].end & !GONE) as usize]
        };
        self.entries.reserve_exact(old.len() + new.len());
        self.names.reserve_exact(old_names.len() + bytes);
        let (mut i, mut k) = (0, 0);
        let (mut live, mut gone) = (0, 0);
        while i < old.len() || k < new.len() {
            let take_new = k < new.len() && (i == old.len() || new[k].0 <= old[i].wd);
            let (wd, parent, gone_now) = if take_new {
                let n = &new[k];
                self.names.extend_from_slice(name(n));
                if i < old.len() && old[i].wd == n.0 {
                    i += 1;
                }
                k += 1;
                (n.0, n.1, false)
            } else {
                self.names.extend_from_slice(old_name(i));
                let e = old[i];
                i += 1;
                (e.wd, e.parent, e.end & GONE != 0)
            };
            let end = self.end_of_names() | if gone_now { GONE } else { 0 };
            if gone_now {
                gone += 1;
            } else {
                live += 1;
            }
            self.entries.push(Entry { wd, parent, end });
        }
        self.live = live;
        self.gone = gone;
    }

    fn end_of_names(&self) -> u32 {
        let end = u32::try_from(self.names.len()).expect("less than 2 GiB of names");
        assert!(end & GONE == 0, "less than 2 GiB of names");
        end
    }

    /// Makes each of `new` whose parent would be itself or below it keep its whole path.
    fn break_cycles(&self, new: &mut [(i32, i32, usize)]) {
        let mut parent_of: FxHashMap<i32, i32> = new.iter().map(|&(wd, p, _)| (wd, p)).collect();
        for n in new.iter_mut() {
            let mut at = n.1;
            // Bounded: a cycle that does not go through `n` is broken at one of its own.
            for _ in 0..=self.entries.len() + parent_of.len() {
                if at == 0 {
                    break;
                }
                if at == n.0 {
                    n.1 = 0;
                    parent_of.insert(n.0, 0);
                    break;
                }
                at = match parent_of.get(&at) {
                    Some(&p) => p,
                    None => self.find(at).map_or(0, |i| self.entries[i].parent),
                };
            }
        }
    }

    fn mark_gone(&mut self, i: usize) {
        if self.live(i) {
            self.entries[i].end |= GONE;
            self.live -= 1;
            self.gone += 1;
        }
    }

    /// Drops the gone entries that no watched one needs for its name, once they are many.
    fn compact(&mut self) {
        if self.gone < self.compact_at {
            return;
        }
        let n = self.entries.len();
        let mut keep = vec![false; n];
        for i in (0..n).filter(|&i| self.live(i)) {
            let mut at = i;
            while !keep[at] {
                keep[at] = true;
                match self.parent(at) {
                    Parent::Slot(p) => at = p,
                    _ => break,
                }
            }
        }
        let kept = keep.iter().filter(|&&k| k).count();
        let bytes: usize = (0..n)
            .filter(|&i| keep[i])
            .map(|i| self.name(i).len())
            .sum();
        let mut entries = Vec::with_capacity(kept);
        let mut names = Vec::with_capacity(bytes);
        for i in (0..n).filter(|&i| keep[i]) {
            names.extend_from_slice(self.name(i));
            let e = self.entries[i];
            entries.push(Entry {
                end: names.len() as u32 | (e.end & GONE),
                ..e
            });
        }
        self.entries = entries;
        self.names = names;
        self.gone = kept - self.live;
        self.compact_at = self.gone + GONE_MIN.max(kept / 4);
    }
}

type Dirs = Arc<Mutex<Watched>>;

/// The inotify watcher of one service. Dropping it stops the reader and closes the descriptor.
pub(super) struct Inotify {
    /// Holds the descriptor open (the reader's end of it may close first); watches are added
    /// and removed through `raw_fd`.
    _fd: Watches,
    raw_fd: RawFd,
    dirs: Dirs,
    reader: tokio::task::JoinHandle<()>,
    /// Where the events held during the first walk go once translated (see [`Inotify::adopt`]).
    tx: UnboundedSender<WatchMsg>,
    overflow: bool,
}

/// The watches the first walk adds as it enters each directory (see [`crate::hash::DirHook`]):
/// a directory is watched before the walk looks at it, so that whatever changes after that is
/// reported, and the adds, which the kernel serialises, run beside the walk's stats instead of
/// after them. Taken in by [`Inotify::adopt`].
pub(super) struct Early {
    fd: RawFd,
    base: Vec<u8>,
    /// At most this many (the test limit).
    room: Option<usize>,
    tried: AtomicUsize,
    /// The limit was met (ENOSPC, or `room`): the directories entered after are not watched.
    full: AtomicBool,
    /// An add failed otherwise: none is tried after it.
    failed: AtomicBool,
    made: Mutex<Made>,
}

/// What [`Early`] added: (descriptor, parent's descriptor or 0, where the name starts in
/// `names`, its length), in the order added; names as [`Watched`] keeps them.
#[derive(Default)]
struct Made {
    watches: Vec<(i32, i32, u32, u32)>,
    names: Vec<u8>,
}

/// How the first walk's watches were taken in.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Adopted {
    /// Every directory the walk entered is watched.
    All,
    /// The limit was met: those watched are kept, but they are not the shallowest (see
    /// [`Inotify::reshape`]).
    Full,
    /// An add failed, or a directory was entered twice (moved during the walk, or mounted
    /// twice): the watches were removed again, to be added as usual.
    Undone,
}

impl Early {
    /// The directory `rel` is watched, if it can be: its descriptor, or 0.
    pub(super) fn enter(&self, parent: i32, rel: &[u8]) -> i32 {
        if self.full.load(Ordering::Relaxed) || self.failed.load(Ordering::Relaxed) {
            return 0;
        }
        if self
            .room
            .is_some_and(|r| self.tried.fetch_add(1, Ordering::Relaxed) >= r)
        {
            self.full.store(true, Ordering::Relaxed);
            return 0;
        }
        let mut path = Vec::with_capacity(self.base.len() + rel.len() + 2);
        path.extend_from_slice(&self.base);
        if !rel.is_empty() {
            path.push(b'/');
            path.extend_from_slice(rel);
        }
        path.push(0);
        // SAFETY: `path` is NUL-terminated; inotify_add_watch only reads it.
        let wd = unsafe { libc::inotify_add_watch(self.fd, path.as_ptr().cast(), MASK.bits()) };
        if wd < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                // Gone, or no longer a directory: its parent's events tell.
                Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => {}
                Some(libc::ENOSPC) => self.full.store(true, Ordering::Relaxed),
                _ => self.failed.store(true, Ordering::Relaxed),
            }
            return 0;
        }
        let name = if parent > 0 { names::last(rel) } else { rel };
        let mut made = self.made.lock().unwrap_or_else(PoisonError::into_inner);
        let at = u32::try_from(made.names.len()).expect("less than 4 GiB of names");
        made.names.extend_from_slice(name);
        made.watches.push((wd, parent, at, name.len() as u32));
        wd
    }
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
        let dirs = Arc::new(Mutex::new(Watched::new(base)));
        let reader = tokio::spawn(read(fd, dirs.clone(), tx.clone(), overflow));
        Ok(Inotify {
            _fd: watches,
            raw_fd,
            dirs,
            reader,
            tx,
            overflow,
        })
    }

    /// Watches for the first walk to add as it enters each directory, at most `room` of them
    /// if given; `None` once anything is watched. Until [`Inotify::adopt`], events are held.
    pub(super) fn early(&mut self, room: Option<usize>) -> Option<Early> {
        let mut map = self.dirs();
        if map.live > 0 || map.held.is_some() {
            return None;
        }
        map.held = Some(Held::default());
        Some(Early {
            fd: self.raw_fd,
            base: map.base.as_os_str().as_bytes().to_vec(),
            room,
            tried: AtomicUsize::new(0),
            full: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            made: Mutex::default(),
        })
    }

    /// Takes in the watches of `early` and sends what the events held meanwhile name.
    pub(super) fn adopt(&mut self, early: Early) -> Adopted {
        let Made { watches, names } = early
            .made
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        let new = watches
            .iter()
            .enumerate()
            .map(|(j, &(wd, parent, ..))| (wd, parent, j))
            .collect();
        let mut map = self.dirs();
        map.insert(new, |j, _| {
            let (_, _, at, len) = watches[j];
            &names[at as usize..(at + len) as usize]
        });
        let adopted = if early.failed.into_inner() || map.live < watches.len() {
            Adopted::Undone
        } else if early.full.into_inner() {
            Adopted::Full
        } else {
            Adopted::All
        };
        let held = map.held.take().unwrap_or_default();
        let mut msgs = translate(
            held.events
                .iter()
                .map(|(wd, mask, name)| (*wd, *mask, name.as_deref())),
            &mut map,
        );
        if held.lost {
            msgs.push(WatchMsg::Rescan(
                "more events came than could be held while the tree was walked",
            ));
        }
        let undo: Vec<i32> = match adopted {
            Adopted::Undone => {
                // Between these watches and those added again, changes go unreported, and
                // events still queued for these are dropped: the tree is looked at again.
                msgs.push(WatchMsg::Rescan(
                    "the watches of the first walk were added again",
                ));
                let wds = map.entries.iter().map(|e| e.wd).collect();
                *map = Watched::new(map.base.clone());
                wds
            }
            _ => Vec::new(),
        };
        drop(map);
        for wd in undo {
            rm_watch(self.raw_fd, wd);
        }
        for msg in msgs {
            if !deliver(&self.tx, msg, self.overflow) {
                break;
            }
        }
        adopted
    }

    /// After [`Adopted::Full`]: keeps watches on the first `keep` directories of `batch` (the
    /// shallowest) and on no other. Removes the watches of the others and returns the
    /// positions of those first ones that have none yet (to add) and of the others (to poll).
    pub(super) fn reshape(&mut self, batch: &Batch, keep: usize) -> (Vec<u32>, Vec<u32>) {
        let map = self.dirs();
        let finder = Finder::new(&*map, batch.len());
        let (mut add, mut poll, mut off) = (Vec::new(), Vec::new(), Vec::new());
        for k in 0..batch.len() as u32 {
            let watched = finder.find(&*map, batch.rel(k));
            if (k as usize) < keep {
                if watched.is_none() {
                    add.push(k);
                }
            } else {
                off.extend(watched);
                poll.push(k);
            }
        }
        drop(finder);
        self.unwatch(map, &off);
        (add, poll)
    }

    /// Removes the watches of the entries at `slots` of `map`, locked since they were found
    /// (a compaction moves slots); the entries stay while a watched directory below needs
    /// their names.
    fn unwatch(&self, mut map: MutexGuard<'_, Watched>, slots: &[usize]) {
        let wds: Vec<i32> = slots.iter().map(|&i| map.entries[i].wd).collect();
        for &i in slots {
            map.mark_gone(i);
        }
        map.compact();
        drop(map);
        for wd in wds {
            // The kernel may have dropped the watch already (its directory was deleted); the
            // IN_IGNORED that follows finds nothing left to remove.
            rm_watch(self.raw_fd, wd);
        }
    }

    fn dirs(&self) -> MutexGuard<'_, Watched> {
        self.dirs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many directories are watched.
    pub(super) fn len(&self) -> usize {
        self.dirs().live
    }

    /// Watches the directories of `batch` at positions `todo` (non-recursively), at most
    /// `room` more if given; the positions left for lack of room (past the limit). A directory
    /// that vanished meanwhile, or is no longer a directory, is skipped: its change shows up
    /// as an event of its parent.
    pub(super) fn add(
        &mut self,
        batch: &Batch,
        todo: &[u32],
        room: Option<usize>,
    ) -> Result<Vec<u32>, WatchError> {
        // Locked from before the watches exist until they are in the map, so that the reader
        // never meets a descriptor it cannot name.
        let mut map = self.dirs.lock().unwrap_or_else(PoisonError::into_inner);
        let wds = add_watches(self.raw_fd, batch, todo, room);
        map.record(batch, todo, &wds);
        drop(map);
        let mut spill = Vec::new();
        let mut failed = None;
        for (&r, &k) in wds.iter().zip(todo) {
            match -r {
                _ if r > 0 => {}
                NOT_TRIED | libc::ENOSPC => spill.push(k),
                libc::ENOENT | libc::ENOTDIR | libc::ELOOP => {}
                e => {
                    failed.get_or_insert((k, e));
                }
            }
        }
        if let Some((k, e)) = failed {
            let e = std::io::Error::from_raw_os_error(e);
            return Err(WatchError::Other(format!(
                "{}: {e}",
                batch.abs(k).display()
            )));
        }
        if !spill.is_empty() {
            self.add_again(batch, &mut spill);
        }
        Ok(spill)
    }

    /// Past the limit, the directories of `spill` that are watched already (a directory read
    /// again is added again) are added all the same: the kernel gives such a directory the
    /// descriptor it has, at no cost in watches, and a rename is recorded so. They leave
    /// `spill` instead of being polled on top of their watch. One that turns out to be another
    /// directory now gets no watch past the limit: it stays in `spill`.
    fn add_again(&mut self, batch: &Batch, spill: &mut Vec<u32>) {
        let mut map = self.dirs();
        let finder = Finder::new(&*map, spill.len());
        let again: Vec<u32> = (spill.iter().copied())
            .filter(|&k| finder.find(&*map, batch.rel(k)).is_some())
            .collect();
        drop(finder);
        if again.is_empty() {
            return;
        }
        let wds: Vec<i32> = add_watches(self.raw_fd, batch, &again, None)
            .into_iter()
            .map(|wd| match wd {
                wd if wd > 0 && map.find(wd).is_some() => wd,
                wd => {
                    if wd > 0 {
                        rm_watch(self.raw_fd, wd);
                    }
                    0
                }
            })
            .collect();
        map.record(batch, &again, &wds);
        let mut kept = (again.iter().zip(&wds))
            .filter(|&(_, &wd)| wd > 0)
            .map(|(&k, _)| k)
            .peekable();
        spill.retain(|&k| kept.next_if_eq(&k).is_none());
    }

    /// The directories watched, sorted.
    #[cfg(test)]
    pub(super) fn watched(&self) -> Vec<PathBuf> {
        let map = self.dirs();
        let mut buf = Vec::new();
        let mut all: Vec<PathBuf> = (0..map.slots())
            .filter(|&i| map.live(i))
            .filter_map(|i| map.dir(i, &mut buf))
            .collect();
        all.sort();
        all
    }

    /// Stops watching `dirs`; those not watched (or already gone) are no error.
    pub(super) fn remove(&mut self, dirs: &[PathBuf]) {
        let map = self.dirs();
        let finder = Finder::new(&*map, dirs.len());
        let mut gone = Vec::new();
        for d in dirs {
            finder.find_all(&*map, map.key(d), |i| gone.push(i));
        }
        drop(finder);
        self.unwatch(map, &gone);
    }
}

fn rm_watch(fd: RawFd, wd: i32) {
    // SAFETY: inotify_rm_watch takes two integers and touches no memory of ours.
    unsafe {
        libc::inotify_rm_watch(fd, wd);
    }
}

/// Adds a watch on each directory of `batch` at positions `todo`, at most `room` of them if
/// given, from two threads when there are many: the descriptor of each, or its error negated,
/// or [`NOT_TRIED`]. The threads take the directories in turn, and past the limit both stop:
/// those watched are still the shallowest.
fn add_watches(fd: RawFd, batch: &Batch, todo: &[u32], room: Option<usize>) -> Vec<i32> {
    let results: Vec<AtomicI32> = todo.iter().map(|_| AtomicI32::new(NOT_TRIED)).collect();
    let stop = AtomicBool::new(false);
    let next = AtomicUsize::new(0);
    let work = || {
        let mut path = Vec::with_capacity(batch.base.as_os_str().len() + 256);
        loop {
            let j = next.fetch_add(1, Ordering::Relaxed);
            if j >= todo.len() || stop.load(Ordering::Relaxed) {
                return;
            }
            if room.is_some_and(|r| j >= r) {
                stop.store(true, Ordering::Relaxed);
                return;
            }
            path.clear();
            batch.abs_into(todo[j], &mut path);
            path.push(0);
            // SAFETY: `path` is NUL-terminated; inotify_add_watch only reads it.
            let wd = unsafe { libc::inotify_add_watch(fd, path.as_ptr().cast(), MASK.bits()) };
            let r = if wd >= 0 {
                wd
            } else {
                let e = std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO);
                if !matches!(e, libc::ENOENT | libc::ENOTDIR | libc::ELOOP) {
                    stop.store(true, Ordering::Relaxed);
                }
                -e
            };
            results[j].store(r, Ordering::Relaxed);
        }
    };
    let two = todo.len() >= PARALLEL_MIN
        && std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
    if two {
        std::thread::scope(|s| {
            // Should the thread not start, this one does it all.
            let _ = std::thread::Builder::new()
                .name("pmesh-dev-watch".to_owned())
                .spawn_scoped(s, work);
            work();
        });
    } else {
        work();
    }
    results.into_iter().map(AtomicI32::into_inner).collect()
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
            let events = inner
                .get_mut()
                .read_events(&mut buffer)?
                .map(|e| (e.wd.get_watch_descriptor_id(), e.mask, e.name));
            let mut map = dirs.lock().unwrap_or_else(PoisonError::into_inner);
            Ok(match map.held.as_mut() {
                Some(held) => {
                    held.keep(events);
                    Vec::new()
                }
                None => translate(events, &mut map),
            })
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
/// overflowed or a directory could not be named.
fn translate<'a>(
    events: impl Iterator<Item = (i32, EventMask, Option<&'a OsStr>)>,
    dirs: &mut Watched,
) -> Vec<WatchMsg> {
    let mut paths = Vec::new();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let (mut ignored, mut lost) = (false, false);
    for (wd, mask, name) in events {
        if mask.contains(EventMask::Q_OVERFLOW) {
            out.push(WatchMsg::Rescan("the kernel's event queue overflowed"));
            continue;
        }
        let at = dirs.find(wd);
        if mask.contains(EventMask::IGNORED) {
            // The watch is gone: removed by us, or its directory was deleted or unmounted.
            if let Some(i) = at {
                dirs.mark_gone(i);
                ignored = true;
            }
            continue;
        }
        // Not watched any more: the engine removed it.
        let Some(i) = at.filter(|&i| dirs.live(i)) else {
            continue;
        };
        let Some(dir) = dirs.dir(i, &mut buf) else {
            lost = true;
            continue;
        };
        paths.push(match name {
            Some(name) => dir.join(name),
            None => dir,
        });
    }
    if ignored {
        dirs.compact();
    }
    if lost {
        out.push(WatchMsg::Rescan("a watched directory could not be named"));
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
            let batch = Batch::new(&root, dirs.iter());
            let todo: Vec<u32> = (0..batch.len() as u32).collect();
            assert_eq!(w.add(&batch, &todo, None).unwrap(), [0u32; 0]);
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

    /// Adds `dirs` (relative) to `w`, in one batch.
    fn add_all(w: &mut Inotify, root: &Path, dirs: &[&str]) -> Vec<u32> {
        let dirs: Vec<PathBuf> = dirs.iter().map(|d| root.join(d)).collect();
        let batch = Batch::new(root, dirs.iter());
        let todo: Vec<u32> = (0..batch.len() as u32).collect();
        w.add(&batch, &todo, None).unwrap()
    }

    #[tokio::test]
    async fn a_directory_renamed_keeps_its_watch_and_what_is_below_follows() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(root.join("p/q")).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut w = Inotify::new(tx, root.clone(), false).unwrap();
        add_all(&mut w, &root, &["", "a", "a/b", "p", "p/q"]);
        assert_eq!(w.len(), 5);

        // Added under its new path without the old one removed: the same descriptor, and
        // the directory below is named under the new path before it is added again.
        std::fs::rename(root.join("a"), root.join("c")).unwrap();
        until(&mut rx, &root.join("c")).await;
        add_all(&mut w, &root, &["c"]);
        std::fs::write(root.join("c/b/f"), "1").unwrap();
        until(&mut rx, &root.join("c/b/f")).await;
        add_all(&mut w, &root, &["c/b"]);
        w.remove(&[root.join("a"), root.join("a/b")]);
        assert_eq!(w.len(), 5, "the old paths name nothing");
        std::fs::write(root.join("c/b/g"), "2").unwrap();
        until(&mut rx, &root.join("c/b/g")).await;

        // A parent removed first: what is below keeps its name.
        w.remove(&[root.join("c")]);
        assert_eq!(w.len(), 4);
        std::fs::write(root.join("c/b/h"), "3").unwrap();
        until(&mut rx, &root.join("c/b/h")).await;

        // A parent deleted while a directory that was below it is watched: that one is
        // named from its new path once added there.
        std::fs::rename(root.join("p/q"), root.join("y")).unwrap();
        std::fs::remove_dir(root.join("p")).unwrap();
        until(&mut rx, &root.join("p")).await;
        add_all(&mut w, &root, &["y"]);
        std::fs::write(root.join("y/f"), "4").unwrap();
        until(&mut rx, &root.join("y/f")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(w.len(), 3, "the root, c/b and y");
    }

    #[tokio::test]
    async fn past_the_room_given_the_shallowest_are_watched() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let mut dirs = vec![String::new()];
        for i in 0..20 {
            for j in 0..15 {
                dirs.push(format!("d{i}/e{j}"));
                std::fs::create_dir_all(root.join(&dirs[dirs.len() - 1])).unwrap();
            }
            dirs.push(format!("d{i}"));
        }
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut w = Inotify::new(tx, root.clone(), false).unwrap();
        let paths: Vec<PathBuf> = dirs.iter().map(|d| root.join(d)).collect();
        let batch = Batch::new(&root, paths.iter());
        let todo: Vec<u32> = (0..batch.len() as u32).collect();
        assert!(todo.len() >= PARALLEL_MIN);
        let spill = w.add(&batch, &todo, Some(100)).unwrap();
        assert_eq!(spill, (100..batch.len() as u32).collect::<Vec<_>>());
        assert_eq!(w.len(), 100);
        // The root and the 20 top directories, then the deeper ones.
        for k in 0..21 {
            assert!(batch.rel(k).iter().all(|&b| b != b'/'));
        }
        let map = w.dirs();
        let mut buf = Vec::new();
        let mut named: Vec<PathBuf> = (0..map.slots())
            .map(|i| map.dir(i, &mut buf).unwrap())
            .collect();
        named.sort();
        let mut want: Vec<PathBuf> = (0..100).map(|k| batch.abs(k)).collect();
        want.sort();
        assert_eq!(named, want);
        drop(map);
        // Added again with no room left (a directory read again): those watched keep their
        // watch and are not left over to be polled on top of it.
        let again = w.add(&batch, &todo, Some(0)).unwrap();
        assert_eq!(again, (100..batch.len() as u32).collect::<Vec<_>>());
        assert_eq!(w.len(), 100);
    }

    /// Records `dirs` (relative) with the descriptors given, as if the kernel had.
    fn record(w: &mut Watched, dirs: &[(&str, i32)]) {
        let paths: Vec<PathBuf> = dirs.iter().map(|(d, _)| w.base.join(d)).collect();
        let batch = Batch::new(&w.base.clone(), paths.iter());
        let todo: Vec<u32> = (0..batch.len() as u32).collect();
        let wds: Vec<i32> = todo
            .iter()
            .map(|&k| {
                let rel = batch.rel(k);
                dirs.iter().find(|(d, _)| d.as_bytes() == rel).unwrap().1
            })
            .collect();
        w.record(&batch, &todo, &wds);
    }

    fn named(w: &Watched, wd: i32) -> Option<String> {
        let i = w.find(wd)?;
        let p = w.dir(i, &mut Vec::new())?;
        Some(match p.strip_prefix(&w.base) {
            Ok(rel) => rel.to_string_lossy().into_owned(),
            Err(_) => p.to_string_lossy().into_owned(),
        })
    }

    #[test]
    fn watched_directories_are_named_through_their_parents() {
        let mut w = Watched::new(PathBuf::from("/base"));
        record(
            &mut w,
            &[
                ("", 1),
                ("a", 2),
                ("a/b", 3),
                ("a/b/c", 4),
                ("x/y", 5),
                ("/out", 6),
            ],
        );
        let names = |w: &Watched| (1..=6).map(|wd| named(w, wd)).collect::<Vec<_>>();
        let want = ["", "a", "a/b", "a/b/c", "x/y", "/out"];
        assert_eq!(names(&w), want.map(|s| Some(s.to_owned())));
        assert_eq!(w.entries.capacity(), 6, "sized to fit");
        assert_eq!(w.name(w.find(4).unwrap()), b"c", "only its own name");
        assert_eq!(
            w.name(w.find(5).unwrap()),
            b"x/y",
            "its parent is not watched"
        );

        // Renamed: what is below follows.
        record(&mut w, &[("c", 2)]);
        assert_eq!(named(&w, 4).as_deref(), Some("c/b/c"));
        // Moved below itself (from stale paths): it keeps its whole path, no cycle.
        record(&mut w, &[("c/b/c/n", 2)]);
        assert_eq!(named(&w, 2).as_deref(), Some("c/b/c/n"));
        assert_eq!(named(&w, 3).as_deref(), Some("c/b/c/n/b"));
        // Descriptors wrapping around: kept in order.
        record(&mut w, &[("x/y/z", 7), ("w", 0)]);
        let mut low = Watched::new(PathBuf::from("/base"));
        record(&mut low, &[("", 10), ("k", 11)]);
        record(&mut low, &[("k/l", 3)]);
        assert_eq!(named(&low, 3).as_deref(), Some("k/l"));
        assert_eq!(named(&low, 11).as_deref(), Some("k"));
        assert_eq!(named(&w, 7).as_deref(), Some("x/y/z"));
        assert_eq!(w.live, 7);

        // Gone, but kept to name what is below until that goes too.
        w.compact_at = 0;
        let (c, z) = (w.find(3).unwrap(), w.find(7).unwrap());
        w.mark_gone(c);
        w.mark_gone(z);
        w.compact();
        assert_eq!(w.entries.len(), 6, "only x/y/z dropped");
        assert_eq!(named(&w, 4).as_deref(), Some("c/b/c/n/b/c"));
        assert_eq!(named(&w, 7), None);
        w.mark_gone(w.find(4).unwrap());
        w.compact_at = 0;
        w.compact();
        assert_eq!(w.entries.len(), 4);
        assert_eq!((w.live, w.gone), (4, 0));
        assert_eq!(
            names(&w)[..2],
            [Some(String::new()), Some("c/b/c/n".to_owned())]
        );
    }
}
