//! File-system events for one service, from one backend chosen at start:
//! - `inotify` (Linux): one non-recursive inotify watch per directory that takes part in the
//!   tree, never on ignored ones (see [`inotify`] for why not notify's);
//! - `native`: the `notify` crate's recommended watcher: FSEvents on macOS and
//!   ReadDirectoryChangesW on Windows, each watching the root recursively (events under ignored
//!   directories are dropped by the engine), notify's own inotify backend on Linux;
//! - `poll`: [`poll::Poller`] looks at each directory at an interval that grows with what a
//!   pass costs.
//!
//! The engine knows only [`DirWatcher`]: it adds the directories that take part, removes those
//! that no longer do, and hears [`WatchMsg`]s. With inotify the first walk of the tree adds
//! them itself as it enters each one, before looking at it ([`DirWatcher::early`]), so that
//! nothing that changes once the walk has looked goes unreported. Past the inotify watch limit the directories left
//! over are polled, the shallowest (where people edit) watched first; `len` and `polled` say
//! how many of each.
//!
//! An event may name a directory alone (FSEvents coalesces; a directory replaced by a rename):
//! the tree then reads that directory again (see `LiveTree::apply`).

mod bigvec;
#[cfg(target_os = "linux")]
mod inotify;
mod names;
mod native;
mod poll;

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

/// What the watcher tells the engine.
#[derive(Debug)]
pub enum WatchMsg {
    /// Something happened at these paths; a directory among them is to be read again.
    Paths(Vec<PathBuf>),
    /// Events were lost (the kernel queue overflowed): the whole tree must be looked at again.
    Rescan(&'static str),
    /// The wait between polling passes moved by a quarter or more from the one last stated.
    Interval {
        polled: usize,
        every: Duration,
    },
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

/// Which backend watches (`watch --watcher`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Backend {
    /// inotify on Linux, the native watcher on macOS and Windows, polling elsewhere.
    #[default]
    Auto,
    /// Linux's inotify, one watch per directory.
    Inotify,
    /// The notify crate's recommended watcher (FSEvents, ReadDirectoryChangesW, inotify).
    Native,
    /// Look at every directory at an interval.
    Poll,
}

impl Backend {
    /// What `Auto` means here. The BSDs poll: kqueue, notify's watcher there, holds a
    /// descriptor open for every file.
    pub fn resolve(self) -> Backend {
        match self {
            Backend::Auto if cfg!(target_os = "linux") => Backend::Inotify,
            Backend::Auto if cfg!(any(target_os = "macos", windows)) => Backend::Native,
            Backend::Auto => Backend::Poll,
            b => b,
        }
    }

    /// The name `watching.mode` gives it.
    pub fn mode(self) -> &'static str {
        match self.resolve() {
            Backend::Inotify => "inotify",
            Backend::Native if cfg!(target_os = "macos") => "fsevents",
            Backend::Native => "native",
            _ => "poll",
        }
    }
}

/// Test hook: when set, every event is dropped and reported as a lost queue instead, as if the
/// kernel's event queue always overflowed.
const TEST_OVERFLOW: &str = "PMESH_DEV_TEST_OVERFLOW";
/// Test hook: behave as if at most this many directories could be watched (inotify or native).
const TEST_MAX_WATCHES: &str = "PMESH_DEV_TEST_MAX_WATCHES";

/// What a backend that receives events does.
enum Events {
    #[cfg(target_os = "linux")]
    Inotify(inotify::Inotify),
    Native(native::Native),
}

impl Events {
    /// Watches the directories of `batch` at the positions `todo`, at most `room` more of them
    /// if given; the positions left for lack of room.
    fn add(
        &mut self,
        batch: &Batch,
        todo: &[u32],
        room: Option<usize>,
    ) -> Result<Vec<u32>, WatchError> {
        match self {
            #[cfg(target_os = "linux")]
            Events::Inotify(w) => w.add(batch, todo, room),
            Events::Native(w) => {
                for (i, &k) in todo.iter().enumerate() {
                    let added = if room.is_some_and(|r| i >= r) {
                        Err(WatchError::Limit)
                    } else {
                        w.add(&batch.abs(k))
                    };
                    match added {
                        Ok(()) => {}
                        // Deeper ones would not fit either.
                        Err(WatchError::Limit) => return Ok(todo[i..].to_vec()),
                        Err(e) => return Err(e),
                    }
                }
                Ok(Vec::new())
            }
        }
    }

    fn remove(&mut self, dirs: &[PathBuf]) {
        match self {
            #[cfg(target_os = "linux")]
            Events::Inotify(w) => w.remove(dirs),
            Events::Native(w) => w.remove(dirs),
        }
    }

    fn len(&self) -> usize {
        match self {
            #[cfg(target_os = "linux")]
            Events::Inotify(w) => w.len(),
            Events::Native(w) => w.len(),
        }
    }
}

/// Directories to add, collected once: each one's path relative to the base (absolute when
/// outside it) in one buffer, the service's own first and the shallowest first.
struct Batch {
    base: PathBuf,
    bytes: Vec<u8>,
    /// Where each path is in `bytes`.
    spans: Vec<(u32, u32)>,
}

impl Batch {
    fn new<P: AsRef<Path>>(base: &Path, dirs: impl ExactSizeIterator<Item = P>) -> Batch {
        let mut bytes = Vec::new();
        let mut keyed = Vec::with_capacity(dirs.len());
        for d in dirs {
            let d = d.as_ref();
            let (rel, outside) = match d.strip_prefix(base) {
                Ok(rel) => (rel.as_os_str().as_bytes(), false),
                Err(_) => (d.as_os_str().as_bytes(), true),
            };
            let at = u32::try_from(bytes.len()).expect("more than 4 GiB of paths");
            bytes.extend_from_slice(rel);
            let depth = rel.iter().filter(|&&b| b == b'/').count() + usize::from(!rel.is_empty());
            let key = u32::from(outside) << 31 | depth.min(u32::MAX as usize >> 1) as u32;
            keyed.push((key, at, rel.len() as u32));
        }
        // Stable: directories of one depth stay in the order given.
        keyed.sort_by_key(|&(key, ..)| key);
        Batch {
            base: base.to_path_buf(),
            bytes,
            spans: keyed.into_iter().map(|(_, at, len)| (at, len)).collect(),
        }
    }

    fn len(&self) -> usize {
        self.spans.len()
    }

    /// The path at position `k`: relative to the base, or absolute.
    fn rel(&self, k: u32) -> &[u8] {
        let (at, len) = self.spans[k as usize];
        &self.bytes[at as usize..(at + len) as usize]
    }

    /// The absolute path at position `k`, appended to `out`.
    fn abs_into(&self, k: u32, out: &mut Vec<u8>) {
        let rel = self.rel(k);
        if rel.first() != Some(&b'/') {
            out.extend_from_slice(self.base.as_os_str().as_bytes());
            if rel.is_empty() {
                return;
            }
            out.push(b'/');
        }
        out.extend_from_slice(rel);
    }

    fn abs(&self, k: u32) -> PathBuf {
        let mut out = Vec::new();
        self.abs_into(k, &mut out);
        PathBuf::from(std::ffi::OsString::from_vec(out))
    }
}

/// Watches the first walk adds as it enters each directory (see [`DirWatcher::early`]).
pub struct EarlyWatches {
    #[cfg(target_os = "linux")]
    inner: inotify::Early,
    /// When the walk began: directories polled after it name what changed since.
    since: u64,
}

impl crate::hash::DirHook for EarlyWatches {
    fn enter(&self, parent: i32, rel: &[u8]) -> i32 {
        #[cfg(target_os = "linux")]
        return self.inner.enter(parent, rel);
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (parent, rel);
            0
        }
    }
}

/// The watcher of one service. Dropping it stops its reader and its poller.
pub struct DirWatcher {
    backend: Backend,
    /// `None` when every directory is polled.
    events: Option<Events>,
    /// The directories past the watch limit (or all of them, for `poll`).
    poller: poll::Poller,
    tx: UnboundedSender<WatchMsg>,
    /// A limit for tests, standing in for `fs.inotify.max_user_watches`.
    test_limit: Option<usize>,
    /// The limit was met once: said so in a warning.
    warned: bool,
    base: PathBuf,
}

impl DirWatcher {
    /// A watcher of the tree at `base` with nothing watched yet, whose events go to `tx`;
    /// directories that are polled are looked at every `poll_every` or more. Must be called
    /// within a tokio runtime.
    pub fn new(
        backend: Backend,
        poll_every: Duration,
        tx: UnboundedSender<WatchMsg>,
        base: PathBuf,
    ) -> Result<DirWatcher, WatchError> {
        let mut backend = backend.resolve();
        let overflow = std::env::var_os(TEST_OVERFLOW).is_some();
        let made = match backend {
            #[cfg(target_os = "linux")]
            Backend::Inotify => inotify::Inotify::new(tx.clone(), base.clone(), overflow)
                .map(|w| Some(Events::Inotify(w))),
            #[cfg(not(target_os = "linux"))]
            Backend::Inotify => Err(WatchError::Other(
                "inotify exists only on Linux (try --watcher native)".to_owned(),
            )),
            Backend::Native => native::Native::new(tx.clone(), base.clone(), overflow)
                .map(|w| Some(Events::Native(w))),
            _ => Ok(None),
        };
        let events = match made {
            Ok(events) => events,
            // No events to be had (out of inotify instances, say): every directory is polled,
            // at a cost bounded as past the watch limit, and the engine warns.
            Err(WatchError::Other(e)) => {
                let _ = tx.send(WatchMsg::Error(format!("{e}: polling instead")));
                backend = Backend::Poll;
                None
            }
            Err(e) => return Err(e),
        };
        Ok(DirWatcher {
            backend,
            events,
            poller: poll::Poller::new(tx.clone(), base.clone(), poll_every, overflow),
            tx,
            test_limit: std::env::var(TEST_MAX_WATCHES)
                .ok()
                .and_then(|v| v.parse().ok()),
            warned: false,
            base,
        })
    }

    /// The name `watching.mode` gives the backend: `inotify`, `fsevents`, `native` or `poll`.
    pub fn mode(&self) -> &'static str {
        self.backend.mode()
    }

    /// How many directories get events (those polled not counted).
    pub fn len(&self) -> usize {
        self.events.as_ref().map_or(0, Events::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0 && self.poller.len() == 0
    }

    /// How many directories are polled, and how long a pass waits for the next at present.
    pub fn polled(&self) -> (usize, Duration) {
        (self.poller.len(), self.poller.interval())
    }

    /// Watches for the first walk of the tree to add as it enters each directory, before it
    /// looks at it (inotify only; `None` for the other backends, or once anything is watched):
    /// hand it to the walk (it is a [`crate::hash::DirHook`]), then to [`DirWatcher::adopt`].
    pub fn early(&mut self) -> Option<EarlyWatches> {
        let since = poll::since_now();
        match self.events.as_mut()? {
            #[cfg(target_os = "linux")]
            Events::Inotify(w) => Some(EarlyWatches {
                inner: w.early(self.test_limit)?,
                since,
            }),
            _ => {
                let _ = since;
                None
            }
        }
    }

    /// Takes in the watches the first walk added through `early`, where `dirs` are the
    /// directories that walk found to take part. Past the watch limit the walk's watches are
    /// not the shallowest: those that should not have one lose it and are polled, and those
    /// that should get one. Polled directories name what changed since the walk began.
    pub fn adopt<P: AsRef<Path>>(
        &mut self,
        early: EarlyWatches,
        dirs: impl ExactSizeIterator<Item = P>,
    ) -> Result<(), WatchError> {
        #[cfg(target_os = "linux")]
        if let Some(Events::Inotify(w)) = self.events.as_mut() {
            match w.adopt(early.inner) {
                inotify::Adopted::All => return Ok(()),
                inotify::Adopted::Undone => {}
                inotify::Adopted::Full => {
                    let batch = Batch::new(&self.base, dirs);
                    let (add, mut poll) = w.reshape(&batch, w.len());
                    let room = self.test_limit.map(|l| l.saturating_sub(w.len()));
                    // What changes in these between the walk's look and their watch goes
                    // unseen (reading them again would walk all below them): a narrow window,
                    // past the limit only.
                    poll.extend(w.add(&batch, &add, room)?);
                    poll.sort_unstable();
                    self.poll_past_the_limit(&batch, &poll, Some(early.since));
                    return Ok(());
                }
            }
        }
        self.add_since(dirs, Some(early.since))
    }

    /// Watches each of `dirs` (non-recursively), the service's own shallowest directories
    /// first; past the watch limit, the rest are polled. Directories that vanished meanwhile,
    /// or are no longer directories, are skipped: their change shows up as an event of their
    /// parent. A directory added again is watched under its new path (a rename).
    pub fn add<P: AsRef<Path>>(
        &mut self,
        dirs: impl ExactSizeIterator<Item = P>,
    ) -> Result<(), WatchError> {
        self.add_since(dirs, None)
    }

    /// [`DirWatcher::add`]; those polled name what changed since `since`, if given.
    fn add_since<P: AsRef<Path>>(
        &mut self,
        dirs: impl ExactSizeIterator<Item = P>,
        since: Option<u64>,
    ) -> Result<(), WatchError> {
        // Which directories get a watch matters only once the limit is met, but that is known
        // only on meeting it; sorting first costs a few milliseconds on 100k directories.
        let batch = Batch::new(&self.base, dirs);
        let Some(events) = self.events.as_mut() else {
            let all: Vec<u32> = (0..batch.len() as u32).collect();
            self.poller.add(&batch, &all, since);
            return Ok(());
        };
        // Polled already: looked at afresh.
        let polled = self.poller.find(&batch);
        let todo: Vec<u32> = if polled.is_empty() {
            (0..batch.len() as u32).collect()
        } else {
            let mut p = polled.iter().peekable();
            (0..batch.len() as u32)
                .filter(|k| p.next_if_eq(&k).is_none())
                .collect()
        };
        let room = self.test_limit.map(|l| l.saturating_sub(events.len()));
        let mut spill = events.add(&batch, &todo, room)?;
        if !polled.is_empty() {
            spill.extend(polled);
            spill.sort_unstable();
        }
        if spill.is_empty() {
            return Ok(());
        }
        self.poll_past_the_limit(&batch, &spill, since);
        Ok(())
    }

    /// Polls the directories of `batch` at positions `spill`, left over past the watch limit,
    /// and says so once.
    fn poll_past_the_limit(&mut self, batch: &Batch, spill: &[u32], since: Option<u64>) {
        if spill.is_empty() {
            return;
        }
        self.poller.add(batch, spill, since);
        if !self.warned {
            self.warned = true;
            let (n, every) = self.polled();
            let _ = self.tx.send(WatchMsg::Error(format!(
                "the watch limit (fs.inotify.max_user_watches = {}) is reached: {} watched \
                 directories, {n} polled (every {}ms for now). Raise it with: \
                 sudo sysctl fs.inotify.max_user_watches=524288",
                max_user_watches().map_or_else(|| "?".to_owned(), |n| n.to_string()),
                self.len(),
                every.as_millis(),
            )));
        }
    }

    /// Stops watching `dirs`; those not watched (or already gone) are no error.
    pub fn remove(&mut self, dirs: &[PathBuf]) {
        if let Some(events) = self.events.as_mut() {
            events.remove(dirs);
        }
        self.poller.remove(dirs);
    }
}

/// Sends `msg`, or under the overflow test hook a lost queue in place of paths; whether the
/// engine still listens.
fn deliver(tx: &UnboundedSender<WatchMsg>, msg: WatchMsg, overflow: bool) -> bool {
    let msg = match msg {
        WatchMsg::Paths(_) if overflow => WatchMsg::Rescan("events were dropped (test hook)"),
        m => m,
    };
    tx.send(msg).is_ok()
}

/// The current inotify watch limit, for the message that suggests raising it.
pub fn max_user_watches() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::hash::{DirHook, HashSpec, LiveTree};
    use std::fs;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::sync::mpsc;

    /// The watches of the first walk, and a write into the root once the walk is past the
    /// root's listing (a child is entered only after it): no walk sees it, only a watch.
    struct WritesLate<'a> {
        early: &'a EarlyWatches,
        root: &'a Path,
        wrote: AtomicBool,
    }

    impl DirHook for WritesLate<'_> {
        fn enter(&self, parent: i32, rel: &[u8]) -> i32 {
            let wd = self.early.enter(parent, rel);
            if !rel.is_empty() && !self.wrote.swap(true, Ordering::SeqCst) {
                fs::write(self.root.join("late.txt"), "late\n").unwrap();
            }
            wd
        }
    }

    /// The paths of the next messages, until `want` is among them.
    async fn until(rx: &mut mpsc::UnboundedReceiver<WatchMsg>, want: &Path) {
        let mut seen = Vec::new();
        while !seen.iter().any(|p| p == want) {
            let msg = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no event for {} in {seen:?}", want.display()));
            match msg {
                Some(WatchMsg::Paths(p)) => seen.extend(p),
                Some(WatchMsg::Error(_) | WatchMsg::Interval { .. }) => {}
                other => panic!("{other:?}"),
            }
        }
    }

    fn inotify(w: &DirWatcher) -> &inotify::Inotify {
        match &w.events {
            Some(Events::Inotify(i)) => i,
            _ => panic!("not inotify"),
        }
    }

    #[tokio::test]
    async fn what_changes_during_the_first_walk_is_reported_once_its_watches_are_taken_in() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        for d in ["a/b", "c"] {
            fs::create_dir_all(root.join(d)).unwrap();
            fs::write(root.join(d).join("f.txt"), d).unwrap();
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut w =
            DirWatcher::new(Backend::Inotify, Duration::from_secs(1), tx, root.clone()).unwrap();
        let early = w.early().expect("inotify watches as the walk goes");
        assert!(w.early().is_none(), "one first walk");
        let hook = WritesLate {
            early: &early,
            root: &root,
            wrote: AtomicBool::new(false),
        };
        let (tree, _) = LiveTree::scan_hooked(&HashSpec::dir(&root), Some(&hook)).unwrap();
        assert!(hook.wrote.load(Ordering::SeqCst));
        assert!(
            !tree.has_entry("late.txt"),
            "written after the root was listed"
        );
        w.adopt(early, tree.dir_paths()).unwrap();
        let all: Vec<PathBuf> = ["", "a", "a/b", "c"].iter().map(|d| root.join(d)).collect();
        let mut want = all.clone();
        want[0] = root.clone();
        assert_eq!(inotify(&w).watched(), want);
        assert_eq!(w.polled().0, 0);
        // Held until the watches were in the map, then named.
        until(&mut rx, &root.join("late.txt")).await;
        // And events as usual afterwards, named through the parents the walk recorded.
        fs::write(root.join("a/b/g.txt"), "g").unwrap();
        until(&mut rx, &root.join("a/b/g.txt")).await;
        fs::write(root.join("c/h.txt"), "h").unwrap();
        until(&mut rx, &root.join("c/h.txt")).await;
    }

    #[tokio::test]
    async fn past_the_limit_met_in_the_first_walk_the_shallowest_are_watched_the_rest_polled() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        for i in 0..5 {
            for j in 0..5 {
                fs::create_dir_all(root.join(format!("d{i}/e{j}"))).unwrap();
            }
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut w =
            DirWatcher::new(Backend::Inotify, Duration::from_secs(1), tx, root.clone()).unwrap();
        w.test_limit = Some(6);
        let early = w.early().unwrap();
        // Seen by the walk, and by the poller's first look at the directory, which names what
        // changed since the walk began (not only since the directory was polled).
        let before = root.join("d3/e4/before.txt");
        fs::write(&before, "b").unwrap();
        let hook = WritesLate {
            early: &early,
            root: &root,
            wrote: AtomicBool::new(false),
        };
        let (tree, _) = LiveTree::scan_hooked(&HashSpec::dir(&root), Some(&hook)).unwrap();
        assert_eq!(tree.dirs(), 31);
        w.adopt(early, tree.dir_paths()).unwrap();
        let mut want = vec![root.clone()];
        want.extend((0..5).map(|i| root.join(format!("d{i}"))));
        assert_eq!(
            inotify(&w).watched(),
            want,
            "the root and the top directories"
        );
        assert_eq!(w.polled().0, 25);
        // What the walk's own watches saw before they were given up is still named.
        until(&mut rx, &root.join("late.txt")).await;
        assert!(tree.has_entry("d3/e4/before.txt"));
        until(&mut rx, &before).await;
        let polled = root.join("d3/e4/new.txt");
        fs::write(&polled, "p").unwrap();
        until(&mut rx, &polled).await;
        fs::write(root.join("d2/w.txt"), "w").unwrap();
        until(&mut rx, &root.join("d2/w.txt")).await;
    }

    /// Enters one directory twice, as a walk does one moved while it runs.
    struct EntersTwice<'a>(&'a EarlyWatches);

    impl DirHook for EntersTwice<'_> {
        fn enter(&self, parent: i32, rel: &[u8]) -> i32 {
            if rel == b"a" {
                self.0.enter(parent, rel);
            }
            self.0.enter(parent, rel)
        }
    }

    #[tokio::test]
    async fn a_directory_entered_twice_has_the_watches_added_again_and_the_tree_rescanned() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("a/b")).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut w =
            DirWatcher::new(Backend::Inotify, Duration::from_secs(1), tx, root.clone()).unwrap();
        let early = w.early().unwrap();
        let (tree, _) =
            LiveTree::scan_hooked(&HashSpec::dir(&root), Some(&EntersTwice(&early))).unwrap();
        w.adopt(early, tree.dir_paths()).unwrap();
        let want = vec![root.clone(), root.join("a"), root.join("a/b")];
        assert_eq!(inotify(&w).watched(), want);
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(WatchMsg::Rescan(why))) => assert!(why.contains("again"), "{why}"),
            other => panic!("{other:?}"),
        }
        fs::write(root.join("a/b/f.txt"), "f").unwrap();
        until(&mut rx, &root.join("a/b/f.txt")).await;
    }
}
