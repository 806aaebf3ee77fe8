//! Polling: the directories no event reaches (past the inotify watch limit, on filesystems
//! without events, on the BSDs) are looked at by a thread of their own, at an interval that
//! grows with what a pass costs, so that polling takes at most [`DUTY`] of one core on average.
//!
//! A pass costs one `lstat` per entry: a directory's listing is read again only when its own
//! stat changed (a directory's mtime moves with every entry added, removed or renamed in it),
//! and a file's stat (size, mtime, ctime, inode, mode) stands for its content, as for git. What
//! a pass finds is sent as the paths that changed, just as events would name them; the tree
//! then reads those paths. A directory's memory is its own name (its parent names the rest, see
//! [`names`]), its entries' names and one fingerprint per entry, in one block.
//!
//! A stat taken within [`RACY_MARGIN_NS`] of a change cannot vouch for the next (two writes in
//! one timestamp tick leave it unchanged): such an entry is named again by the next pass.

use std::ffi::OsStr;
use std::hash::{BuildHasher, Hasher};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use rustc_hash::{FxBuildHasher, FxHashMap};
use tokio::sync::mpsc::UnboundedSender;

use super::bigvec::MappedVec;
use super::names::{self, Finder, Nodes, Parent};
use super::{Batch, WatchMsg, deliver};
use crate::hash::cache::{EntryType, RACY_MARGIN_NS, StatKey};

/// The share of one core polling may take on average.
const DUTY: f64 = 0.05;
/// The longest a pass waits for the next, however slow passes are.
const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// Directories looked at between two takes of the lock, so that the engine's adds and removes
/// never wait for a whole pass.
const CHUNK: usize = 64;

/// A fingerprint that no stat gives: the entry is to be named by the next pass.
const UNSURE: u64 = 0;
/// The fingerprint of a directory that is gone (or unreadable).
const GONE: u64 = 1;
/// A directory's fingerprint before its first look (see [`Poller::add`]).
const PENDING: u64 = 2;
/// What a pass is taken to cost a directory before one was measured: what the first costs,
/// since it is the first that follows the first wait. That pass lists every directory; on the
/// deep bench tree (39k polled directories of about 3 entries) it took 13-17 us a directory,
/// later ones 4-6.
const PRIOR_US_PER_DIR: f64 = 15.0;

/// One polled directory, or one no longer polled whose name polled ones below still need.
#[derive(Debug, Clone, Copy)]
struct Dir {
    /// The parent's slot, or [`NO_PARENT`] when the name is the whole path (see [`names`]);
    /// and [`UNPOLLED`].
    parent: u32,
    /// Where its block is in [`Set::data`].
    at: u32,
}

const NO_PARENT: u32 = UNPOLLED - 1;
const UNPOLLED: u32 = 1 << 31;

/// The header of a block: how many fingerprints, and how many bytes of names, follow.
const HEADER: usize = 8;

/// The polled directories, each with one block in `data`: a header, the fingerprints of the
/// directory itself and of each entry, then its own name and each entry's (each followed by a
/// NUL). On the deep bench tree a directory costs 8 bytes and a block of about 70, where two
/// boxes and a whole path cost about 180.
#[derive(Default)]
struct Set {
    dirs: Vec<Dir>,
    /// In a mapping of its own once big: a pass may rewrite blocks at its end (the first one
    /// rewrites every block), growing it by steps that the allocator's arenas would keep
    /// resident once given up.
    data: MappedVec<u8>,
    /// Bytes of `data` that no block uses any more.
    garbage: usize,
    live: usize,
    unpolled: usize,
    /// How many of those were still needed to name others when last counted.
    needed: usize,
}

fn u32_at(data: &[u8], at: usize) -> usize {
    u32::from_ne_bytes(data[at..at + 4].try_into().expect("4 bytes")) as usize
}

fn block_len(prints: usize, names: usize) -> usize {
    HEADER + 8 * prints + names
}

impl names::Nodes for Set {
    fn slots(&self) -> usize {
        self.dirs.len()
    }

    fn name(&self, i: usize) -> &[u8] {
        let names = self.names(i);
        let end = names.iter().position(|&b| b == 0).unwrap_or(names.len());
        &names[..end]
    }

    fn parent(&self, i: usize) -> Parent {
        match self.dirs[i].parent & !UNPOLLED {
            NO_PARENT => Parent::None,
            p if (p as usize) < self.dirs.len() => Parent::Slot(p as usize),
            _ => Parent::Lost,
        }
    }

    fn live(&self, i: usize) -> bool {
        self.dirs[i].parent & UNPOLLED == 0
    }
}

impl Set {
    /// How many fingerprints slot `i` has, and where they start.
    fn prints_at(&self, i: usize) -> (usize, usize) {
        let at = self.dirs[i].at as usize;
        (u32_at(&self.data, at), at + HEADER)
    }

    fn print(&self, i: usize, j: usize) -> u64 {
        let (n, at) = self.prints_at(i);
        assert!(j < n, "fingerprint {j} of {n}");
        let at = at + 8 * j;
        u64::from_ne_bytes(self.data[at..at + 8].try_into().expect("8 bytes"))
    }

    fn set_print(&mut self, i: usize, j: usize, print: u64) {
        let (n, at) = self.prints_at(i);
        assert!(j < n, "fingerprint {j} of {n}");
        let at = at + 8 * j;
        self.data[at..at + 8].copy_from_slice(&print.to_ne_bytes());
    }

    /// The names of slot `i`: its own, then its entries', each followed by a NUL.
    fn names(&self, i: usize) -> &[u8] {
        let at = self.dirs[i].at as usize;
        let (prints, len) = (u32_at(&self.data, at), u32_at(&self.data, at + 4));
        let start = at + HEADER + 8 * prints;
        &self.data[start..start + len]
    }

    /// The entries' names, each with its NUL.
    fn entries(&self, i: usize) -> impl Iterator<Item = &[u8]> {
        let names = self.names(i);
        let start = names
            .iter()
            .position(|&b| b == 0)
            .map_or(names.len(), |e| e + 1);
        names[start..].split_inclusive(|&b| b == 0)
    }

    fn block_len(&self, i: usize) -> usize {
        let at = self.dirs[i].at as usize;
        block_len(u32_at(&self.data, at), u32_at(&self.data, at + 4))
    }

    /// Writes a block of `prints` and `names` at the end of `data`; where it is.
    fn append(&mut self, prints: &[u64], names: &[&[u8]]) -> u32 {
        let len: usize = names.iter().map(|n| n.len()).sum();
        self.data.reserve(block_len(prints.len(), len));
        let at = u32::try_from(self.data.len()).expect("less than 4 GiB of polled listings");
        let count = |n: usize| u32::try_from(n).expect("less than 4 GiB a listing");
        self.data
            .extend_from_slice(&count(prints.len()).to_ne_bytes());
        self.data.extend_from_slice(&count(len).to_ne_bytes());
        for p in prints {
            self.data.extend_from_slice(&p.to_ne_bytes());
        }
        for n in names {
            self.data.extend_from_slice(n);
        }
        at
    }

    /// Gives slot `i` a new block, in place if it fits.
    fn replace(&mut self, i: usize, prints: &[u64], names: &[&[u8]]) {
        let old = self.block_len(i);
        let len: usize = names.iter().map(|n| n.len()).sum();
        let new = block_len(prints.len(), len);
        if new > old {
            self.dirs[i].at = self.append(prints, names);
            self.garbage += old;
            return;
        }
        let mut at = self.dirs[i].at as usize;
        let mut put = |bytes: &[u8]| {
            self.data[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&(prints.len() as u32).to_ne_bytes());
        put(&(len as u32).to_ne_bytes());
        for p in prints {
            put(&p.to_ne_bytes());
        }
        for n in names {
            put(n);
        }
        self.garbage += old - new;
    }

    /// Polls the directories of `batch` at positions `which`, each to be listed by its next
    /// look (those polled already too); changes from `since` on count.
    fn add(&mut self, batch: &Batch, which: &[u32], since: u64) {
        let mut fresh = Vec::with_capacity(which.len());
        if self.live == 0 {
            fresh.extend(which.iter().copied());
        } else {
            let finder = Finder::new(&*self, which.len());
            let mut again = Vec::new();
            for &k in which {
                match finder.find(&*self, batch.rel(k)) {
                    Some(i) => again.push(i),
                    None => fresh.push(k),
                }
            }
            for i in again {
                let name = self.name(i).to_vec();
                self.replace(i, &[PENDING, since], &[&name, b"\0"]);
            }
        }
        // Named from their parent where it is polled too (deeper ones mostly are), else from
        // a slot that holds only its parent's name: those at the edge of the polled part, whose
        // parents are watched, share those names instead of each holding a whole path.
        let mut parents = vec![names::Found::None; fresh.len()];
        let rel = |j: usize| batch.rel(fresh[j]);
        names::parents(&*self, fresh.len(), rel, |_| true, |j, f| parents[j] = f);
        let mut edge: FxHashMap<&[u8], u32> = FxHashMap::default();
        for (j, &found) in parents.iter().enumerate() {
            if found == names::Found::None
                && let Some(p) = names::parent_path(rel(j))
            {
                self.name_only(p, &mut edge);
            }
        }
        let first = self.dirs.len();
        let parent_of = |j: usize, found: names::Found| match found {
            names::Found::None => names::parent_path(rel(j)).map_or(NO_PARENT, |p| edge[p]),
            names::Found::Added(a) => (first + a) as u32,
            names::Found::Slot(s) => s as u32,
        };
        let name = |j: usize, parent: u32| match parent {
            NO_PARENT => rel(j),
            _ => names::last(rel(j)),
        };
        let bytes: usize = (parents.iter().enumerate())
            .map(|(j, &f)| block_len(2, name(j, parent_of(j, f)).len() + 1))
            .sum();
        names::grow(&mut self.dirs, fresh.len());
        self.data.reserve(bytes);
        for (j, &found) in parents.iter().enumerate() {
            let parent = parent_of(j, found);
            let at = self.append(&[PENDING, since], &[name(j, parent), b"\0"]);
            self.dirs.push(Dir { parent, at });
        }
        self.live += fresh.len();
    }

    /// The slot that stands for the directory at `path` (not polled) to name those below it,
    /// made with those for its parents if not in `made` already.
    fn name_only<'p>(&mut self, path: &'p [u8], made: &mut FxHashMap<&'p [u8], u32>) -> u32 {
        // Up to one made already, or to the top; then down.
        let mut missing = Vec::new();
        let mut at = Some(path);
        let mut parent = NO_PARENT;
        while let Some(p) = at {
            if let Some(&slot) = made.get(p) {
                parent = slot;
                break;
            }
            missing.push(p);
            at = names::parent_path(p);
        }
        for p in missing.into_iter().rev() {
            let name = if parent == NO_PARENT {
                p
            } else {
                names::last(p)
            };
            let at = self.append(&[], &[name, b"\0"]);
            let slot = self.dirs.len() as u32;
            self.dirs.push(Dir {
                parent: parent | UNPOLLED,
                at,
            });
            self.unpolled += 1;
            self.needed += 1;
            made.insert(p, slot);
            parent = slot;
        }
        parent
    }

    /// Stops polling slot `i`.
    fn unpoll(&mut self, i: usize) {
        if self.live(i) {
            self.dirs[i].parent |= UNPOLLED;
            self.garbage += self.block_len(i);
            self.live -= 1;
            self.unpolled += 1;
        }
    }

    /// Drops what no polled directory needs any more, once that is a quarter of what is held:
    /// the blocks replaced, and the directories no longer polled that name none below. Whether
    /// it did.
    fn compact(&mut self) -> bool {
        let wasteful = self.garbage >= 4096 && self.garbage * 4 >= self.data.len();
        let spare = self.unpolled.saturating_sub(self.needed);
        let compact = wasteful || spare >= UNPOLLED_MIN.max(self.dirs.len() / 4);
        if compact {
            self.compact_now();
        }
        compact
    }

    fn compact_now(&mut self) {
        let n = self.dirs.len();
        // The new slot of each kept one.
        let mut slot = vec![u32::MAX; n];
        for i in (0..n).filter(|&i| self.live(i)) {
            let mut at = i;
            while slot[at] == u32::MAX {
                slot[at] = 0;
                match self.parent(at) {
                    Parent::Slot(p) => at = p,
                    _ => break,
                }
            }
        }
        let mut kept = 0;
        let mut bytes = 0;
        for (i, s) in slot.iter_mut().enumerate() {
            if *s != u32::MAX {
                *s = kept;
                kept += 1;
                bytes += if self.live(i) {
                    self.block_len(i)
                } else {
                    block_len(0, self.name(i).len() + 1)
                };
            }
        }
        let old = std::mem::take(self);
        self.dirs.reserve_exact(kept as usize);
        self.data = MappedVec::with_capacity(bytes);
        for i in (0..n).filter(|&i| slot[i] != u32::MAX) {
            let d = old.dirs[i];
            let at = if old.live(i) {
                let at = old.dirs[i].at as usize;
                let new = self.data.len() as u32;
                self.data
                    .extend_from_slice(&old.data[at..at + old.block_len(i)]);
                self.live += 1;
                new
            } else {
                self.unpolled += 1;
                self.needed += 1;
                self.append(&[], &[old.name(i), b"\0"])
            };
            let parent = match d.parent & !UNPOLLED {
                NO_PARENT => NO_PARENT,
                p => slot.get(p as usize).copied().unwrap_or(NO_PARENT),
            };
            self.dirs.push(Dir {
                parent: parent | (d.parent & UNPOLLED),
                at,
            });
        }
    }
}

/// Directories no longer polled that are always tolerated.
const UNPOLLED_MIN: usize = 1024;

/// What the polling thread and the watcher share.
struct Shared {
    set: Mutex<Set>,
    base: PathBuf,
    /// The current wait between passes, in milliseconds.
    interval_ms: AtomicU64,
    /// The wait last told (0 before any): a `watching` event, a warning, or a
    /// [`WatchMsg::Interval`].
    stated_ms: AtomicU64,
    /// The shortest wait (the manifest's `poll`, 1s by default).
    floor: Duration,
    /// What a pass costs, smoothed, in microseconds per directory (times 1024).
    cost: AtomicU64,
}

impl Shared {
    fn set(&self) -> std::sync::MutexGuard<'_, Set> {
        self.set.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The wait that keeps a pass over `dirs` directories at [`DUTY`].
    fn update_interval(&self, dirs: usize) {
        let per_dir = match self.cost.load(Ordering::Relaxed) {
            0 => PRIOR_US_PER_DIR,
            c => c as f64 / 1024.0,
        };
        let pass = Duration::from_secs_f64(per_dir * dirs as f64 / 1e6);
        let wait = pass
            .mul_f64((1.0 - DUTY) / DUTY)
            .clamp(self.floor, MAX_INTERVAL.max(self.floor));
        self.interval_ms.store(
            u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The message that tells the wait anew, once it moved by a quarter or more from the one
    /// last told (if one was).
    fn restate(&self, polled: usize) -> Option<WatchMsg> {
        let (now, told) = (
            self.interval_ms.load(Ordering::Relaxed),
            self.stated_ms.load(Ordering::Relaxed),
        );
        if told == 0 || (now * 4 < told * 5 && now * 4 > told * 3) {
            return None;
        }
        self.stated_ms.store(now, Ordering::Relaxed);
        Some(WatchMsg::Interval {
            polled,
            every: Duration::from_millis(now),
        })
    }

    /// Takes a pass's measured cost (CPU time) into the estimate.
    fn measured(&self, took: Duration, dirs: usize) {
        if dirs == 0 {
            return;
        }
        let sample = took.as_secs_f64() * 1e6 / dirs as f64 * 1024.0;
        let old = self.cost.load(Ordering::Relaxed) as f64;
        // A dearer pass sets the pace at once, so that the average stays bounded; a cheaper
        // one only by degrees, so that one lucky pass does not.
        let new = if old == 0.0 || sample > old {
            sample
        } else {
            old * 0.7 + sample * 0.3
        };
        self.cost.store(new as u64, Ordering::Relaxed);
        self.update_interval(dirs);
    }
}

/// The polled directories of one service. Dropping it stops its thread (after the pass under
/// way, if any).
pub(super) struct Poller {
    shared: Arc<Shared>,
    /// Dropped to stop the thread; started with the first directory.
    stop: Option<mpsc::Sender<()>>,
    tx: UnboundedSender<WatchMsg>,
    overflow: bool,
}

impl Poller {
    pub(super) fn new(
        tx: UnboundedSender<WatchMsg>,
        base: PathBuf,
        floor: Duration,
        overflow: bool,
    ) -> Poller {
        Poller {
            shared: Arc::new(Shared {
                set: Mutex::default(),
                base,
                interval_ms: AtomicU64::new(u64::try_from(floor.as_millis()).unwrap_or(1000)),
                stated_ms: AtomicU64::new(0),
                floor,
                cost: AtomicU64::new(0),
            }),
            stop: None,
            tx,
            overflow,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.shared.set().live
    }

    /// The wait between two passes, as things stand; told to the user, so a later move of
    /// it by a quarter or more is told too (see [`WatchMsg::Interval`]).
    pub(super) fn interval(&self) -> Duration {
        let ms = self.shared.interval_ms.load(Ordering::Relaxed);
        self.shared.stated_ms.store(ms, Ordering::Relaxed);
        Duration::from_millis(ms)
    }

    fn rel<'p>(&self, dir: &'p Path) -> &'p [u8] {
        match dir.strip_prefix(&self.shared.base) {
            Ok(rel) => rel.as_os_str().as_bytes(),
            Err(_) => dir.as_os_str().as_bytes(),
        }
    }

    /// The positions in `batch` of the directories polled already.
    pub(super) fn find(&self, batch: &Batch) -> Vec<u32> {
        if self.stop.is_none() {
            return Vec::new();
        }
        let set = self.shared.set();
        if set.live == 0 {
            return Vec::new();
        }
        let finder = Finder::new(&*set, batch.len());
        (0..batch.len() as u32)
            .filter(|&k| finder.find(&*set, batch.rel(k)).is_some())
            .collect()
    }

    /// Polls the directories of `batch` at positions `which` from now on. Their listings are
    /// taken by the polling thread's next pass, not here (that would be a pass's work added to
    /// the start): its first look at a directory names the directory itself, and each entry,
    /// that changed since this call, or since `since` (see [`since_now`]) if given.
    pub(super) fn add(&mut self, batch: &Batch, which: &[u32], since: Option<u64>) {
        if which.is_empty() {
            return;
        }
        let since = since.unwrap_or_else(since_now);
        let mut set = self.shared.set();
        set.add(batch, which, since);
        let n = set.live;
        drop(set);
        self.shared.update_interval(n);
        if self.stop.is_none() {
            let (stop, stopped) = mpsc::channel();
            let shared = self.shared.clone();
            let (tx, overflow) = (self.tx.clone(), self.overflow);
            let spawned = std::thread::Builder::new()
                .name("pmesh-dev-poll".to_owned())
                .spawn(move || run(&shared, &stopped, &tx, overflow));
            match spawned {
                Ok(_) => self.stop = Some(stop),
                Err(e) => {
                    let _ = self
                        .tx
                        .send(WatchMsg::Error(format!("cannot start polling: {e}")));
                }
            }
        }
    }

    /// Stops polling `dirs` (those not polled are no error).
    pub(super) fn remove(&mut self, dirs: &[PathBuf]) {
        if self.stop.is_none() {
            return;
        }
        let mut set = self.shared.set();
        let finder = Finder::new(&*set, dirs.len());
        let mut gone = Vec::new();
        for d in dirs {
            finder.find_all(&*set, self.rel(d), |i| gone.push(i));
        }
        for i in gone {
            // Kept while a polled directory below needs its name.
            set.unpoll(i);
        }
    }
}

/// What a pass reuses from one directory to the next: a pass makes no allocation for what did
/// not change.
#[derive(Default)]
struct Scratch {
    path: Vec<u8>,
    rel: Vec<u8>,
    listing: Listing,
}

/// A directory's listing as [`snapshot`] takes it: the fingerprints of the directory and of
/// each entry, and its own name and each entry's, each followed by a NUL.
#[derive(Default)]
struct Listing {
    prints: Vec<u64>,
    names: Vec<u8>,
}

/// The thread: a pass, then a wait, until the poller is dropped.
fn run(
    shared: &Shared,
    stopped: &mpsc::Receiver<()>,
    tx: &UnboundedSender<WatchMsg>,
    overflow: bool,
) {
    let mut scratch = Scratch::default();
    loop {
        // New directories wait a whole interval for their first listing too: a listing costs
        // more than a pass, and the first seconds of a watch count as much as any.
        let wait = Duration::from_millis(shared.interval_ms.load(Ordering::Relaxed));
        match stopped.recv_timeout(wait) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let cpu = CpuClock::start();
        let (changed, dirs, lost) = pass(shared, &mut scratch);
        // A pass that took many first listings is dear: the wait after it is long, and the
        // next passes bring it down by degrees. The average stays within the share.
        shared.measured(cpu.elapsed(), dirs);
        if let Some(msg) = shared.restate(dirs)
            && !deliver(tx, msg, overflow)
        {
            return;
        }
        if lost
            && !deliver(
                tx,
                WatchMsg::Rescan("a polled directory could not be named"),
                overflow,
            )
        {
            return;
        }
        if !changed.is_empty() && !deliver(tx, WatchMsg::Paths(changed), overflow) {
            return;
        }
    }
}

/// One look at every polled directory; the paths that changed, how many directories were
/// looked at, and whether one could not be named.
fn pass(shared: &Shared, scratch: &mut Scratch) -> (Vec<PathBuf>, usize, bool) {
    let taken = now_ns();
    let mut changed = Vec::new();
    let (mut i, mut looked, mut lost) = (0, 0, false);
    loop {
        let mut set = shared.set();
        if i >= set.dirs.len() {
            // Slots move: only here, between passes.
            if set.compact() {
                drop(set);
                // The blocks were rewritten into a buffer of their own: the pages of the old
                // one (and of those it grew through) go back to the system.
                crate::sys::trim_heap();
            }
            return (changed, looked, lost);
        }
        let end = (i + CHUNK).min(set.dirs.len());
        for d in i..end {
            if set.live(d) {
                lost |= !look(shared, &mut set, d, taken, scratch, &mut changed);
                looked += 1;
            }
        }
        i = end;
    }
}

/// Looks at the directory in slot `i`; pushes what changed in it to `changed`. False if it
/// cannot be named.
fn look(
    shared: &Shared,
    set: &mut Set,
    i: usize,
    taken: i64,
    scratch: &mut Scratch,
    changed: &mut Vec<PathBuf>,
) -> bool {
    // The directory's path is built in `path`, which is reused for its entries.
    let Scratch { path, rel, listing } = scratch;
    rel.clear();
    if !names::path(&*set, i, rel) {
        return false;
    }
    path.clear();
    if rel.first() != Some(&b'/') {
        path.extend_from_slice(shared.base.as_os_str().as_bytes());
        if !rel.is_empty() {
            path.push(b'/');
        }
    }
    path.extend_from_slice(rel);
    let dir_len = path.len();
    path.push(0);
    let old = set.print(i, 0);
    let name_len = set.name(i).len();
    if old == PENDING {
        let since = set.print(i, 1) as i64;
        let dir = PathBuf::from(OsStr::from_bytes(&path[..dir_len]));
        let name = &rel[rel.len() - name_len..];
        if snapshot(name, &dir, path, taken, Some((since, changed)), listing) {
            set.replace(i, &listing.prints, &[&listing.names]);
        } else {
            set.set_print(i, 0, GONE);
            changed.push(dir);
        }
        return true;
    }
    // Its entries are stat'ed from the directory, not each looked up from the root again.
    let fd = (set.prints_at(i).0 > 1)
        .then(|| open_dir(path, false))
        .flatten();
    let key = match &fd {
        Some(fd) => fstat_key(fd, b"\0"),
        None => stat_key(path),
    };
    let print = match key {
        Some(key) if key.entry_type() == EntryType::Dir => print_of(&key, taken),
        _ => GONE,
    };
    path.truncate(dir_len);
    if print == GONE {
        // Named once; the engine then stops polling it.
        if old != GONE {
            set.set_print(i, 0, GONE);
            changed.push(PathBuf::from(OsStr::from_bytes(path)));
        }
        return true;
    }
    if print == old && print != UNSURE {
        // Same listing: each entry's stat is enough.
        path.push(b'/');
        let base_len = path.len();
        let (prints, _) = set.prints_at(i);
        let mut next = name_len + 1;
        for j in 1..prints {
            let Some(rest) = set.names(i).get(next..).filter(|r| !r.is_empty()) else {
                break;
            };
            let name = rest
                .iter()
                .position(|&b| b == 0)
                .map_or(rest, |e| &rest[..=e]);
            next += name.len();
            path.truncate(base_len);
            path.extend_from_slice(name);
            let key = match &fd {
                Some(fd) => fstat_key(fd, name),
                None => stat_key(path),
            };
            let new = key.map_or(GONE, |k| entry_print(&k, taken));
            let old = set.print(i, j);
            // An entry unsure before may have changed again after it was read.
            if new != old || new == UNSURE {
                let named = &path[..path.len() - 1];
                changed.push(PathBuf::from(OsStr::from_bytes(named)));
                set.set_print(i, j, new);
            }
        }
        return true;
    }
    // The listing changed: read it again, and name what came, went or changed.
    drop(fd);
    let dir = PathBuf::from(OsStr::from_bytes(path));
    path.push(0);
    let name = &rel[rel.len() - name_len..];
    if !snapshot(name, &dir, path, taken, None, listing) {
        set.set_print(i, 0, GONE);
        changed.push(dir);
        return true;
    }
    let mut before: rustc_hash::FxHashMap<&[u8], u64> = set
        .entries(i)
        .enumerate()
        .map(|(j, name)| (name, set.print(i, j + 1)))
        .collect();
    let fresh = listing.names.split_inclusive(|&b| b == 0).skip(1);
    for (name, new) in fresh.zip(listing.prints[1..].iter()) {
        match before.remove(name) {
            Some(o) if o == *new && o != UNSURE => {}
            _ => changed.push(dir.join(OsStr::from_bytes(&name[..name.len() - 1]))),
        }
    }
    for name in before.keys() {
        changed.push(dir.join(OsStr::from_bytes(&name[..name.len() - 1])));
    }
    drop(before);
    set.replace(i, &listing.prints, &[&listing.names]);
    true
}

/// `dir` as it is now, named `name`, in `out`: its listing and every entry's fingerprint;
/// false if it cannot be read. With `since`, the directory itself and each entry whose stat
/// changed since then are pushed to its list (the directory so that the tree reads it again:
/// what left it is not listed).
fn snapshot(
    name: &[u8],
    dir: &Path,
    dir_nul: &[u8],
    taken: i64,
    mut since: Option<(i64, &mut Vec<PathBuf>)>,
    out: &mut Listing,
) -> bool {
    let Some(fd) = open_dir(dir_nul, true) else {
        return false;
    };
    let Some(key) = fstat_key(&fd, b"\0") else {
        return false;
    };
    let print = print_of(&key, taken);
    let after = |key: &StatKey, since: i64| key.mtime_ns.max(key.ctime_ns) >= since;
    if let Some((t, changed)) = since.as_mut()
        && after(&key, *t)
    {
        changed.push(dir.to_path_buf());
    }
    out.names.clear();
    out.names.extend_from_slice(name);
    out.names.push(0);
    out.prints.clear();
    out.prints.push(print);
    let listed = crate::hash::files::list(fd.as_fd(), dir, |name, _| {
        let at = out.names.len();
        out.names.extend_from_slice(name);
        out.names.push(0);
        let key = fstat_key(&fd, &out.names[at..]);
        if let (Some(key), Some((t, changed))) = (&key, since.as_mut())
            && after(key, *t)
        {
            changed.push(dir.join(OsStr::from_bytes(name)));
        }
        out.prints
            .push(key.map_or(GONE, |k| entry_print(&k, taken)));
    });
    listed.is_ok()
}

/// The stat of `path` (NUL-terminated), symlinks not followed.
/// The directory at `path` (NUL-terminated), not following a symlink: opened to list it, or
/// only to stat what is in it.
fn open_dir(path: &[u8], list: bool) -> Option<OwnedFd> {
    debug_assert_eq!(path.last(), Some(&0));
    #[cfg(target_os = "linux")]
    let how = if list { libc::O_RDONLY } else { libc::O_PATH };
    #[cfg(not(target_os = "linux"))]
    let how = {
        let _ = list;
        libc::O_RDONLY
    };
    let flags = how | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `path` is NUL-terminated; open only reads it.
    let fd = unsafe { libc::open(path.as_ptr().cast(), flags) };
    // SAFETY: a descriptor open just now, owned by nothing else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The stat of `name` (NUL-terminated; the directory itself for a lone NUL) in the directory
/// `fd`, not following a symlink.
fn fstat_key(fd: &OwnedFd, name: &[u8]) -> Option<StatKey> {
    debug_assert_eq!(name.last(), Some(&0));
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `name` is NUL-terminated, `fd` is open and `st` has room for a stat.
    let rc = unsafe {
        match name {
            b"\0" => libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()),
            _ => libc::fstatat(
                fd.as_raw_fd(),
                name.as_ptr().cast(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            ),
        }
    };
    // SAFETY: the call succeeded, so it filled `st`.
    (rc == 0).then(|| StatKey::of_stat(&unsafe { st.assume_init() }))
}

fn stat_key(path: &[u8]) -> Option<StatKey> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    debug_assert_eq!(path.last(), Some(&0));
    // SAFETY: `path` is NUL-terminated and `st` has room for a stat.
    let rc = unsafe { libc::lstat(path.as_ptr().cast(), st.as_mut_ptr()) };
    // SAFETY: lstat succeeded, so it filled `st`.
    (rc == 0).then(|| StatKey::of_stat(&unsafe { st.assume_init() }))
}

/// The fingerprint of an entry whose stat is `key`: the stat, [`UNSURE`] if too recent to
/// vouch for the next change. A directory's is only what it is (inode and mode): what it holds
/// is looked at by its own watch or poll.
fn entry_print(key: &StatKey, taken: i64) -> u64 {
    if key.entry_type() == EntryType::Dir {
        let mut h = FxBuildHasher.build_hasher();
        h.write_u64(key.ino);
        h.write_u32(key.mode);
        return h.finish().max(PENDING + 1);
    }
    print_of(key, taken)
}

fn print_of(key: &StatKey, taken: i64) -> u64 {
    if !key.safely_older_than(taken) {
        return UNSURE;
    }
    let mut h = FxBuildHasher.build_hasher();
    h.write_u64(key.size);
    h.write_i64(key.mtime_ns);
    h.write_i64(key.ctime_ns);
    h.write_u64(key.ino);
    h.write_u32(key.mode);
    // Never one of the reserved values.
    h.finish().max(PENDING + 1)
}

/// The CPU time of the calling thread (what "a share of a core" counts: a pass waiting for a
/// busy disk or for a core costs none), or the wall clock where there is no such clock.
struct CpuClock {
    cpu: Option<Duration>,
    wall: Instant,
}

impl CpuClock {
    fn start() -> CpuClock {
        CpuClock {
            cpu: thread_cpu(),
            wall: Instant::now(),
        }
    }

    fn elapsed(&self) -> Duration {
        match (self.cpu, thread_cpu()) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => self.wall.elapsed(),
        }
    }
}

fn thread_cpu() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| {
        Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        )
    })
}

/// A time for [`Poller::add`] to name changes since: now, less a timestamp tick (changes within
/// one of now count as after it).
pub(super) fn since_now() -> u64 {
    now_ns().saturating_sub(RACY_MARGIN_NS) as u64
}

/// Wall-clock nanoseconds since the epoch: the digest cache's clock.
fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn shared(base: &Path) -> Shared {
        Shared {
            set: Mutex::default(),
            base: base.to_path_buf(),
            interval_ms: AtomicU64::new(1000),
            stated_ms: AtomicU64::new(0),
            floor: Duration::from_secs(1),
            cost: AtomicU64::new(0),
        }
    }

    /// What a pass names, relative and sorted.
    fn names(base: &Path, mut paths: Vec<PathBuf>) -> Vec<String> {
        paths.sort();
        paths
            .iter()
            .map(|p| p.strip_prefix(base).unwrap().to_string_lossy().into_owned())
            .collect()
    }

    /// Polls `dirs` (relative), counting changes from `since` on.
    fn add(s: &Shared, dirs: &[&str], since: i64) {
        let paths: Vec<PathBuf> = dirs.iter().map(|d| s.base.join(d)).collect();
        let batch = Batch::new(&s.base, paths.iter());
        let all: Vec<u32> = (0..batch.len() as u32).collect();
        s.set().add(&batch, &all, since as u64);
    }

    fn look_all(s: &Shared, taken: i64, scratch: &mut Scratch) -> Vec<PathBuf> {
        let mut changed = Vec::new();
        let mut set = s.set();
        for i in 0..set.dirs.len() {
            if set.live(i) {
                assert!(look(s, &mut set, i, taken, scratch, &mut changed));
            }
        }
        changed
    }

    #[test]
    fn a_pass_names_what_was_added_removed_or_written_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        fs::create_dir(base.join("d")).unwrap();
        fs::write(base.join("d/a"), "1").unwrap();
        fs::write(base.join("d/b"), "2").unwrap();
        fs::write(base.join("top"), "t").unwrap();
        let s = shared(base);
        // As if taken later than the margin: nothing is too recent to vouch for.
        let later = now_ns() + 2 * RACY_MARGIN_NS;
        add(&s, &["", "d"], later);
        let mut scratch = Scratch::default();
        let look_all = |taken: i64, scratch: &mut Scratch| look_all(&s, taken, scratch);
        assert!(look_all(later, &mut scratch).is_empty(), "first looks");
        assert!(look_all(later, &mut scratch).is_empty(), "nothing changed");

        // A write of the same size: the stat still tells.
        fs::write(base.join("d/a"), "9").unwrap();
        fs::remove_file(base.join("d/b")).unwrap();
        fs::write(base.join("d/c"), "3").unwrap();
        fs::create_dir(base.join("new")).unwrap();
        let later = now_ns() + 2 * RACY_MARGIN_NS;
        assert_eq!(
            names(base, look_all(later, &mut scratch)),
            ["d/a", "d/b", "d/c", "new"]
        );
        assert!(look_all(later, &mut scratch).is_empty(), "named once");

        // Too recent to vouch for: named again by the next pass.
        fs::write(base.join("d/a"), "8").unwrap();
        let now = now_ns();
        assert!(names(base, look_all(now, &mut scratch)).contains(&"d/a".to_owned()));
        let later = now + 2 * RACY_MARGIN_NS;
        assert!(names(base, look_all(later, &mut scratch)).contains(&"d/a".to_owned()));
        assert!(look_all(later, &mut scratch).is_empty());

        // A polled directory that goes is named once.
        fs::remove_dir_all(base.join("d")).unwrap();
        let later = now_ns() + 2 * RACY_MARGIN_NS;
        assert_eq!(names(base, look_all(later, &mut scratch)), ["d", "d"]);
        assert!(look_all(later, &mut scratch).is_empty());
    }

    #[test]
    fn a_first_look_names_what_changed_since_the_directory_was_added() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        fs::create_dir(base.join("d")).unwrap();
        fs::write(base.join("d/old"), "1").unwrap();
        let s = shared(base);
        let mut scratch = Scratch::default();
        // Added long after everything in it changed: its first look names nothing.
        let later = now_ns() + 2 * RACY_MARGIN_NS;
        add(&s, &["d"], later);
        assert!(look_all(&s, later, &mut scratch).is_empty());
        // Added again before a file was written: the file and the directory.
        add(&s, &["d"], now_ns() - RACY_MARGIN_NS);
        let slots = |s: &Shared| {
            let set = s.set();
            (set.dirs.len(), set.live)
        };
        assert_eq!(
            slots(&s),
            (2, 1),
            "the same directory, and the root to name it"
        );
        fs::write(base.join("d/new"), "2").unwrap();
        let later = now_ns() + 2 * RACY_MARGIN_NS;
        assert_eq!(
            names(base, look_all(&s, later, &mut scratch)),
            ["d", "d/new", "d/old"]
        );
        assert!(
            look_all(&s, later, &mut scratch).is_empty(),
            "then as any other"
        );
    }

    #[test]
    fn polled_directories_are_named_through_their_parents_until_none_needs_them() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        fs::create_dir_all(base.join("a/b/c")).unwrap();
        fs::create_dir_all(base.join("x/y")).unwrap();
        let s = shared(base);
        let mut scratch = Scratch::default();
        let later = now_ns() + 2 * RACY_MARGIN_NS;
        add(&s, &["a/b/c", "", "a", "a/b", "x/y"], later);
        assert!(look_all(&s, later, &mut scratch).is_empty());
        let slot = |p: &str| {
            let set = s.set();
            Finder::new(&*set, 1).find(&*set, p.as_bytes())
        };
        let name = |p: &str| {
            let i = slot(p).unwrap();
            s.set().name(i).to_vec()
        };
        assert_eq!(name("a/b/c"), b"c", "only its own name");
        assert_eq!(name("x/y"), b"y", "named from a slot that stands for x");

        let write = |rel: &str| {
            fs::write(base.join(rel), rel).unwrap();
            now_ns() + 2 * RACY_MARGIN_NS
        };
        let later = write("a/b/c/f");
        assert_eq!(names(base, look_all(&s, later, &mut scratch)), ["a/b/c/f"]);

        // No longer polled, but still naming the one below.
        let b = slot("a/b").unwrap();
        s.set().unpoll(b);
        assert_eq!(slot("a/b"), None);
        write("a/b/not-polled");
        let later = write("a/b/c/g");
        assert_eq!(names(base, look_all(&s, later, &mut scratch)), ["a/b/c/g"]);
        s.set().compact_now();
        {
            let set = s.set();
            // x and the root stand for watched directories (here not polled) to name x/y.
            assert_eq!((set.dirs.len(), set.live), (7, 4), "a/b kept");
            assert_eq!(set.garbage, 0);
            assert_eq!(set.data.len(), set.data.capacity(), "sized to fit");
        }
        let later = write("a/b/c/h");
        assert_eq!(names(base, look_all(&s, later, &mut scratch)), ["a/b/c/h"]);

        let c = slot("a/b/c").unwrap();
        s.set().unpoll(c);
        s.set().compact_now();
        assert_eq!(s.set().dirs.len(), 5, "a/b and a/b/c dropped");
        let later = write("x/y/z");
        assert_eq!(names(base, look_all(&s, later, &mut scratch)), ["x/y/z"]);
    }

    #[test]
    fn the_interval_keeps_polling_within_its_share_of_a_core() {
        let tmp = tempfile::tempdir().unwrap();
        let s = shared(tmp.path());
        // A pass of 10k directories that took 500ms: 5% means 9.5s of rest after it.
        s.measured(Duration::from_millis(500), 10_000);
        assert_eq!(s.interval_ms.load(Ordering::Relaxed), 9500);
        // Cheap passes never go below the floor.
        let s = shared(tmp.path());
        s.measured(Duration::from_millis(1), 10_000);
        assert_eq!(s.interval_ms.load(Ordering::Relaxed), 1000);
    }

    #[test]
    fn a_wait_that_moved_by_a_quarter_from_the_one_told_is_told_again() {
        let tmp = tempfile::tempdir().unwrap();
        let s = shared(tmp.path());
        s.measured(Duration::from_millis(500), 10_000);
        assert!(
            s.restate(10_000).is_none(),
            "nothing told yet: `watching` tells first"
        );
        s.stated_ms.store(9500, Ordering::Relaxed);
        // Cheaper by degrees: 9500, then 0.7 of the cost plus 0.3 of 400ms's, ...
        s.measured(Duration::from_millis(400), 10_000);
        assert!(s.restate(10_000).is_none(), "within a quarter");
        for _ in 0..3 {
            s.measured(Duration::from_millis(100), 10_000);
        }
        match s.restate(10_000) {
            Some(WatchMsg::Interval { polled, every }) => {
                assert_eq!(polled, 10_000);
                assert_eq!(
                    every.as_millis() as u64,
                    s.interval_ms.load(Ordering::Relaxed)
                );
                assert!(every < Duration::from_millis(9500 * 3 / 4), "{every:?}");
            }
            other => panic!("{other:?}"),
        }
        assert!(s.restate(10_000).is_none(), "told once");
        // A dearer pass sets the pace at once, and is told.
        s.measured(Duration::from_millis(2000), 10_000);
        assert!(matches!(s.restate(10_000), Some(WatchMsg::Interval { .. })));
    }
}
