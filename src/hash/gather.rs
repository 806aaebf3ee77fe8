//! Putting a parallel walk's entries in tree order as it goes.
//!
//! Every directory of the walk has a [`Node`]. Its task leaves there the directory's own
//! entries, in tree order, with a place for each subdirectory. When a directory's whole
//! subtree is done, whichever task finished last splices the subdirectories' entries in,
//! and so on up the tree: the ordering is done during the walk, on every thread, and the
//! root ends up with the entries of the whole tree in a few long runs.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::Entry;

/// Counters that show where a hash spent its effort.
#[derive(Debug, Default)]
pub struct Stats {
    pub dirs_listed: AtomicU64,
    pub dirs_from_cache: AtomicU64,
    pub files_read: AtomicU64,
    pub files_from_cache: AtomicU64,
    pub bytes_read: AtomicU64,
}

/// Work counts, added up per subtree and put into [`Stats`] once at the end.
#[derive(Debug, Default)]
pub struct Counts {
    pub dirs_listed: u64,
    pub dirs_from_cache: u64,
    pub files_read: u64,
    pub files_from_cache: u64,
    pub bytes_read: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.dirs_listed += o.dirs_listed;
        self.dirs_from_cache += o.dirs_from_cache;
        self.files_read += o.files_read;
        self.files_from_cache += o.files_from_cache;
        self.bytes_read += o.bytes_read;
    }

    pub fn store(&self, s: &Stats) {
        s.dirs_listed.fetch_add(self.dirs_listed, Ordering::Relaxed);
        s.dirs_from_cache
            .fetch_add(self.dirs_from_cache, Ordering::Relaxed);
        s.files_read.fetch_add(self.files_read, Ordering::Relaxed);
        s.files_from_cache
            .fetch_add(self.files_from_cache, Ordering::Relaxed);
        s.bytes_read.fetch_add(self.bytes_read, Ordering::Relaxed);
    }
}

/// A directory of the walk.
pub struct Node {
    parent: Option<Arc<Node>>,
    /// The directory's own task, plus each subdirectory whose subtree is not done yet.
    pending: AtomicUsize,
    done: Mutex<Subtree>,
}

/// What a directory's task found, then (once the subtree is done) what its subtree did.
#[derive(Default)]
struct Subtree {
    entries: Vec<Entry>,
    dirs: Vec<(usize, Arc<Node>)>,
    /// Once the subtree is done: all its entries, in order, in runs.
    runs: Vec<Vec<Entry>>,
    counts: Counts,
}

/// Runs of entries are merged up to this length as subtrees are put together: few runs are
/// left to join at the end, and no entry is moved more than a few times.
const RUN: usize = 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Appends a run of entries to `runs`, merging it into the last run while that is short.
fn push_run(runs: &mut Vec<Vec<Entry>>, run: Vec<Entry>) {
    if run.is_empty() {
        return;
    }
    match runs.last_mut() {
        Some(last) if last.len() + run.len() <= RUN => last.extend(run),
        _ => runs.push(run),
    }
}

/// Appends the next `n` entries of `own` to `runs`.
fn push_own(runs: &mut Vec<Vec<Entry>>, own: &mut std::vec::IntoIter<Entry>, n: usize) {
    if n == 0 {
        return;
    }
    match runs.last_mut() {
        Some(last) if last.len() + n <= RUN => last.extend(own.take(n)),
        _ => runs.push(own.take(n).collect()),
    }
}

impl Node {
    /// The node of a directory below `parent` (the root has none).
    pub fn new(parent: Option<Arc<Node>>) -> Arc<Node> {
        Arc::new(Node {
            parent,
            pending: AtomicUsize::new(1),
            done: Mutex::default(),
        })
    }

    /// The node of a subdirectory, whose subtree this one now waits for.
    pub fn child(self: &Arc<Node>) -> Arc<Node> {
        self.pending.fetch_add(1, Ordering::Relaxed);
        Node::new(Some(self.clone()))
    }

    /// Called once by the directory's task with what it found: its own `entries` in tree
    /// order, its subdirectories (`dirs`, each with the number of entries that come before
    /// it) and its work counts. Whoever finishes a subtree last puts its entries in order,
    /// and so on up the tree.
    pub fn finish(
        self: Arc<Node>,
        entries: Vec<Entry>,
        dirs: Vec<(usize, Arc<Node>)>,
        counts: Counts,
    ) {
        *lock(&self.done) = Subtree {
            entries,
            dirs,
            runs: Vec::new(),
            counts,
        };
        let mut node = self;
        loop {
            if node.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
                return;
            }
            {
                let mut done = lock(&node.done);
                let entries = std::mem::take(&mut done.entries);
                let dirs = std::mem::take(&mut done.dirs);
                if dirs.is_empty() {
                    // A leaf: its entries are its run.
                    push_run(&mut done.runs, entries);
                } else {
                    let mut runs = Vec::with_capacity(dirs.len() + 1);
                    let mut own = entries.into_iter();
                    let mut at = 0;
                    for (before, child) in dirs {
                        push_own(&mut runs, &mut own, before - at);
                        at = before;
                        // Done, like everything below it: nobody else holds its lock.
                        let mut c = lock(&child.done);
                        done.counts.add(&c.counts);
                        for run in c.runs.drain(..) {
                            push_run(&mut runs, run);
                        }
                    }
                    let rest = own.len();
                    push_own(&mut runs, &mut own, rest);
                    done.runs = runs;
                }
            }
            match &node.parent {
                Some(p) => node = p.clone(),
                None => return,
            }
        }
    }

    /// The entries of the finished tree below this root, in order, and the work counts.
    pub fn take(&self) -> (Vec<Entry>, Counts) {
        let done = std::mem::take(&mut *lock(&self.done));
        let mut entries = Vec::with_capacity(done.runs.iter().map(Vec::len).sum());
        for run in done.runs {
            entries.extend(run);
        }
        (entries, done.counts)
    }
}
