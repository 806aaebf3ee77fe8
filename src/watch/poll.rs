//! Polling: the directories no event reaches (past the inotify watch limit, on filesystems
//! without events, on the BSDs) are looked at by a thread of their own, at an interval that
//! grows with what a pass costs, so that polling takes at most [`DUTY`] of one core on average.
//!
//! A pass costs one `lstat` per entry: a directory's listing is read again only when its own
//! stat changed (a directory's mtime moves with every entry added, removed or renamed in it),
//! and a file's stat (size, mtime, ctime, inode, mode) stands for its content, as for git. What
//! a pass finds is sent as the paths that changed, just as events would name them; the tree
//! then reads those paths. A directory's memory is its path, its entries' names and one
//! fingerprint per entry.
//!
//! A stat taken within [`RACY_MARGIN_NS`] of a change cannot vouch for the next (two writes in
//! one timestamp tick leave it unchanged): such an entry is named again by the next pass.

use std::ffi::OsStr;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;
use tokio::sync::mpsc::UnboundedSender;

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
/// What a pass is taken to cost a directory before one was measured (a pass of 39k directories
/// of the deep bench tree, at about 3 entries each, took 5-10 us a directory).
const PRIOR_US_PER_DIR: f64 = 10.0;

/// One polled directory: its path relative to the base (NUL-terminated), then each entry's name
/// (NUL-terminated), and the fingerprints of the directory itself and of each entry.
struct Polled {
    names: Box<[u8]>,
    prints: Box<[u64]>,
}

impl Polled {
    fn rel(&self) -> &[u8] {
        let end = self.names.iter().position(|&b| b == 0).unwrap_or(0);
        &self.names[..end]
    }

    /// The entries' names, each with its NUL.
    fn entries(&self) -> impl Iterator<Item = &[u8]> {
        let start = self.rel().len() + 1;
        self.names[start.min(self.names.len())..].split_inclusive(|&b| b == 0)
    }
}

#[derive(Default)]
struct Set {
    dirs: Vec<Polled>,
    /// Indices into `dirs`, by the hash of the relative path.
    index: HashTable<u32>,
}

fn hash(rel: &[u8]) -> u64 {
    let mut h = FxBuildHasher.build_hasher();
    h.write(rel);
    h.finish()
}

impl Set {
    fn find(&self, rel: &[u8]) -> Option<usize> {
        self.index
            .find(hash(rel), |&i| self.dirs[i as usize].rel() == rel)
            .map(|&i| i as usize)
    }

    fn insert(&mut self, p: Polled) {
        match self.find(p.rel()) {
            Some(i) => self.dirs[i] = p,
            None => {
                let i = self.dirs.len() as u32;
                let h = hash(p.rel());
                self.dirs.push(p);
                let dirs = &self.dirs;
                self.index
                    .insert_unique(h, i, |&j| hash(dirs[j as usize].rel()));
            }
        }
    }

    fn remove(&mut self, rel: &[u8]) {
        let Some(i) = self.find(rel) else {
            return;
        };
        let h = hash(rel);
        if let Ok(entry) = self.index.find_entry(h, |&j| j as usize == i) {
            entry.remove();
        }
        let last = self.dirs.len() - 1;
        if i != last {
            // The last one takes the freed place: its index entry follows.
            let moved = hash(self.dirs[last].rel());
            if let Some(slot) = self.index.find_mut(moved, |&j| j as usize == last) {
                *slot = i as u32;
            }
        }
        self.dirs.swap_remove(i);
    }
}

/// What the polling thread and the watcher share.
struct Shared {
    set: Mutex<Set>,
    base: PathBuf,
    /// The current wait between passes, in milliseconds.
    interval_ms: AtomicU64,
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
                floor,
                cost: AtomicU64::new(0),
            }),
            stop: None,
            tx,
            overflow,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.shared.set().dirs.len()
    }

    /// The wait between two passes, as things stand.
    pub(super) fn interval(&self) -> Duration {
        Duration::from_millis(self.shared.interval_ms.load(Ordering::Relaxed))
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
        (0..batch.len() as u32)
            .filter(|&k| set.find(batch.rel(k)).is_some())
            .collect()
    }

    /// Polls the directories of `batch` at positions `which` from now on. Their listings are
    /// taken by the polling thread's next pass, not here (that would be a pass's work added to
    /// the start): its first look at a directory names the directory itself, and each entry,
    /// that changed since this call.
    pub(super) fn add(&mut self, batch: &Batch, which: &[u32]) {
        if which.is_empty() {
            return;
        }
        // Changes within a timestamp tick of now count as after it.
        let since = now_ns().saturating_sub(RACY_MARGIN_NS) as u64;
        let mut set = self.shared.set();
        set.dirs.reserve(which.len());
        for &k in which {
            let rel = batch.rel(k);
            let mut names = Vec::with_capacity(rel.len() + 1);
            names.extend_from_slice(rel);
            names.push(0);
            set.insert(Polled {
                names: names.into_boxed_slice(),
                prints: Box::new([PENDING, since]),
            });
        }
        let n = set.dirs.len();
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
        for d in dirs {
            set.remove(self.rel(d));
        }
    }
}

/// The thread: a pass, then a wait, until the poller is dropped.
fn run(
    shared: &Shared,
    stopped: &mpsc::Receiver<()>,
    tx: &UnboundedSender<WatchMsg>,
    overflow: bool,
) {
    let mut path = Vec::with_capacity(256);
    loop {
        // New directories wait a whole interval for their first listing too: a listing costs
        // more than a pass, and the first seconds of a watch count as much as any.
        let wait = Duration::from_millis(shared.interval_ms.load(Ordering::Relaxed));
        match stopped.recv_timeout(wait) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let cpu = CpuClock::start();
        let (changed, dirs) = pass(shared, &mut path);
        // A pass that took many first listings is dear: the wait after it is long, and the
        // next passes bring it down by degrees. The average stays within the share.
        shared.measured(cpu.elapsed(), dirs);
        if !changed.is_empty() && !deliver(tx, WatchMsg::Paths(changed), overflow) {
            return;
        }
    }
}

/// One look at every polled directory; the paths that changed, and how many directories were
/// looked at.
fn pass(shared: &Shared, path: &mut Vec<u8>) -> (Vec<PathBuf>, usize) {
    let taken = now_ns();
    let mut changed = Vec::new();
    let mut i = 0;
    loop {
        let mut set = shared.set();
        if i >= set.dirs.len() {
            return (changed, i);
        }
        let end = (i + CHUNK).min(set.dirs.len());
        for d in &mut set.dirs[i..end] {
            look(shared, d, taken, path, &mut changed);
        }
        i = end;
    }
}

/// Looks at one directory; pushes what changed in it to `changed`.
fn look(
    shared: &Shared,
    d: &mut Polled,
    taken: i64,
    path: &mut Vec<u8>,
    changed: &mut Vec<PathBuf>,
) {
    // The directory's path is built in `path`, which is reused for its entries: a pass makes
    // no allocation for what did not change.
    path.clear();
    let rel = d.rel();
    if rel.first() != Some(&b'/') {
        path.extend_from_slice(shared.base.as_os_str().as_bytes());
        if !rel.is_empty() {
            path.push(b'/');
        }
    }
    path.extend_from_slice(rel);
    let dir_len = path.len();
    path.push(0);
    let print = match stat_key(path) {
        Some(key) if key.entry_type() == EntryType::Dir => print_of(&key, taken),
        _ => GONE,
    };
    path.truncate(dir_len);
    if d.prints[0] == PENDING {
        let since = d.prints.get(1).map_or(0, |s| *s as i64);
        let dir = PathBuf::from(OsStr::from_bytes(path));
        match snapshot(d.rel(), &dir, taken, Some((since, changed))) {
            Some(fresh) => *d = fresh,
            None => {
                d.prints[0] = GONE;
                changed.push(dir);
            }
        }
        return;
    }
    if print == GONE {
        // Named once; the engine then stops polling it.
        if d.prints[0] != GONE {
            d.prints[0] = GONE;
            changed.push(PathBuf::from(OsStr::from_bytes(path)));
        }
        return;
    }
    if print == d.prints[0] && print != UNSURE {
        // Same listing: each entry's stat is enough.
        path.push(b'/');
        let base_len = path.len();
        let Polled { names, prints } = d;
        let start = names
            .iter()
            .position(|&b| b == 0)
            .map_or(names.len(), |e| e + 1);
        let entries = names[start..].split_inclusive(|&b| b == 0);
        for (name, old) in entries.zip(prints[1..].iter_mut()) {
            path.truncate(base_len);
            path.extend_from_slice(name);
            let new = lstat_print(path, taken);
            // An entry unsure before may have changed again after it was read.
            if new != *old || new == UNSURE {
                let named = &path[..path.len() - 1];
                changed.push(PathBuf::from(OsStr::from_bytes(named)));
                *old = new;
            }
        }
        return;
    }
    // The listing changed: read it again, and name what came, went or changed.
    let dir = PathBuf::from(OsStr::from_bytes(path));
    let Some(fresh) = snapshot(d.rel(), &dir, taken, None) else {
        d.prints[0] = GONE;
        changed.push(dir);
        return;
    };
    let mut old: rustc_hash::FxHashMap<&[u8], u64> =
        d.entries().zip(d.prints[1..].iter().copied()).collect();
    for (name, new) in fresh.entries().zip(fresh.prints[1..].iter()) {
        match old.remove(name) {
            Some(o) if o == *new && o != UNSURE => {}
            _ => changed.push(dir.join(OsStr::from_bytes(&name[..name.len() - 1]))),
        }
    }
    for name in old.keys() {
        changed.push(dir.join(OsStr::from_bytes(&name[..name.len() - 1])));
    }
    *d = fresh;
}

/// `dir` as it is now: its listing and every entry's fingerprint; `None` if it cannot be read.
/// With `since`, the directory itself and each entry whose stat changed since then are pushed
/// to its list (the directory so that the tree reads it again: what left it is not listed).
fn snapshot(
    rel: &[u8],
    dir: &Path,
    taken: i64,
    mut since: Option<(i64, &mut Vec<PathBuf>)>,
) -> Option<Polled> {
    let meta = std::fs::symlink_metadata(dir).ok().filter(|m| m.is_dir())?;
    let key = StatKey::of(&meta);
    let print = print_of(&key, taken);
    let after = |key: &StatKey, since: i64| key.mtime_ns.max(key.ctime_ns) >= since;
    if let Some((t, changed)) = since.as_mut()
        && after(&key, *t)
    {
        changed.push(dir.to_path_buf());
    }
    let listing = std::fs::read_dir(dir).ok()?;
    let mut names = Vec::with_capacity(rel.len() + 1 + 16 * 8);
    names.extend_from_slice(rel);
    names.push(0);
    let mut prints = vec![print];
    let mut path = Vec::with_capacity(dir.as_os_str().len() + 64);
    path.extend_from_slice(dir.as_os_str().as_bytes());
    path.push(b'/');
    let base_len = path.len();
    for entry in listing.flatten() {
        let name = entry.file_name();
        let name = name.as_bytes();
        path.truncate(base_len);
        path.extend_from_slice(name);
        path.push(0);
        names.extend_from_slice(name);
        names.push(0);
        let key = stat_key(&path);
        if let (Some(key), Some((t, changed))) = (&key, since.as_mut())
            && after(key, *t)
        {
            changed.push(dir.join(OsStr::from_bytes(name)));
        }
        prints.push(key.map_or(GONE, |k| entry_print(&k, taken)));
    }
    Some(Polled {
        names: names.into_boxed_slice(),
        prints: prints.into_boxed_slice(),
    })
}

/// The stat of `path` (NUL-terminated), symlinks not followed.
fn stat_key(path: &[u8]) -> Option<StatKey> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    debug_assert_eq!(path.last(), Some(&0));
    // SAFETY: `path` is NUL-terminated and `st` has room for a stat.
    let rc = unsafe { libc::lstat(path.as_ptr().cast(), st.as_mut_ptr()) };
    // SAFETY: lstat succeeded, so it filled `st`.
    (rc == 0).then(|| StatKey::of_stat(&unsafe { st.assume_init() }))
}

/// The fingerprint of the entry at `path` (NUL-terminated): its stat, [`UNSURE`] if too recent
/// to vouch for the next change, [`GONE`] if it cannot be read. A directory's is only what it
/// is (inode and mode): what it holds is looked at by its own watch or poll.
fn lstat_print(path: &[u8], taken: i64) -> u64 {
    stat_key(path).map_or(GONE, |k| entry_print(&k, taken))
}

/// See [`lstat_print`].
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
        for (rel, dir) in [("", base.to_path_buf()), ("d", base.join("d"))] {
            let p = snapshot(rel.as_bytes(), &dir, later, None).unwrap();
            s.set().insert(p);
        }
        let mut buf = Vec::new();
        let look_all = |taken: i64, buf: &mut Vec<u8>| {
            let mut changed = Vec::new();
            for d in &mut s.set().dirs {
                look(&s, d, taken, buf, &mut changed);
            }
            changed
        };
        assert!(look_all(later, &mut buf).is_empty(), "nothing changed");

        // A write of the same size: the stat still tells.
        fs::write(base.join("d/a"), "9").unwrap();
        fs::remove_file(base.join("d/b")).unwrap();
        fs::write(base.join("d/c"), "3").unwrap();
        fs::create_dir(base.join("new")).unwrap();
        let later = now_ns() + 2 * RACY_MARGIN_NS;
        assert_eq!(
            names(base, look_all(later, &mut buf)),
            ["d/a", "d/b", "d/c", "new"]
        );
        assert!(look_all(later, &mut buf).is_empty(), "named once");

        // Too recent to vouch for: named again by the next pass.
        fs::write(base.join("d/a"), "8").unwrap();
        let now = now_ns();
        assert!(names(base, look_all(now, &mut buf)).contains(&"d/a".to_owned()));
        let later = now + 2 * RACY_MARGIN_NS;
        assert!(names(base, look_all(later, &mut buf)).contains(&"d/a".to_owned()));
        assert!(look_all(later, &mut buf).is_empty());

        // A polled directory that goes is named once.
        fs::remove_dir_all(base.join("d")).unwrap();
        let later = now_ns() + 2 * RACY_MARGIN_NS;
        assert_eq!(names(base, look_all(later, &mut buf)), ["d", "d"]);
        assert!(look_all(later, &mut buf).is_empty());
    }

    #[test]
    fn a_first_look_names_what_changed_since_the_directory_was_added() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        fs::create_dir(base.join("d")).unwrap();
        fs::write(base.join("d/old"), "1").unwrap();
        let s = shared(base);
        let mut buf = Vec::new();
        let look_all = |taken: i64, buf: &mut Vec<u8>| {
            let mut changed = Vec::new();
            for d in &mut s.set().dirs {
                look(&s, d, taken, buf, &mut changed);
            }
            changed
        };
        let pending = |since: i64| Polled {
            names: b"d\0".to_vec().into_boxed_slice(),
            prints: Box::new([PENDING, since as u64]),
        };
        // Added long after everything in it changed: its first look names nothing.
        let later = now_ns() + 2 * RACY_MARGIN_NS;
        s.set().insert(pending(later));
        assert!(look_all(later, &mut buf).is_empty());
        // Added before a file was written and another removed: the file and the directory.
        s.set().remove(b"d");
        s.set().insert(pending(now_ns() - RACY_MARGIN_NS));
        fs::write(base.join("d/new"), "2").unwrap();
        let later = now_ns() + 2 * RACY_MARGIN_NS;
        assert_eq!(
            names(base, look_all(later, &mut buf)),
            ["d", "d/new", "d/old"]
        );
        assert!(look_all(later, &mut buf).is_empty(), "then as any other");
    }

    #[test]
    fn removing_keeps_the_index_of_the_directory_moved_into_the_gap() {
        let tmp = tempfile::tempdir().unwrap();
        let s = shared(tmp.path());
        for d in ["a", "b", "c"] {
            fs::create_dir(tmp.path().join(d)).unwrap();
            let p = snapshot(d.as_bytes(), &tmp.path().join(d), now_ns(), None).unwrap();
            s.set().insert(p);
        }
        s.set().remove(b"a");
        let set = s.set();
        assert_eq!(set.dirs.len(), 2);
        assert_eq!(set.find(b"c").map(|i| set.dirs[i].rel()), Some(&b"c"[..]));
        assert_eq!(set.find(b"b").map(|i| set.dirs[i].rel()), Some(&b"b"[..]));
        assert_eq!(set.find(b"a"), None);
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
}
