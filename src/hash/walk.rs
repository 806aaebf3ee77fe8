//! The parallel tree walk: list directories (or reuse their cached listings), stat every
//! entry, and read only the files whose cached digest cannot be trusted.
//!
//! Every directory is a task on the rayon pool. Names are resolved relative to a directory's
//! descriptor, never from `/`: a directory that is listed is opened (relative to its parent)
//! and its entries are opened and stat'ed relative to it; a directory whose cached listing
//! holds is not even opened, its entries are stat'ed through the nearest opened ancestor.
//! The entries come out in tree order (see [`super::gather`]), so sorted by path.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::{fs, io};

use nix::errno::Errno;

pub use super::entry::kind_of_mode;
use super::entry::{Digested, Found, found};

use super::cache::{
    CacheWriter, DigestCache, DirListing, DirRecord, EntryType, FileRecord, StatKey,
};
use super::files;
pub use super::gather::Stats;
use super::gather::{Counts, Node};
use super::rules::{IGNORE_FILES, Level};
use super::{Entry, HashError};

/// What one walk found.
pub struct WalkOutput {
    /// Entries sorted by path.
    pub entries: Vec<Entry>,
    /// Every directory that takes part (relative path) with the rules in force in it and its
    /// parent's position here ([`NO_DIR`] for the walk's first), parents before children;
    /// empty if [`Walker::collect_dirs`] said so.
    pub dirs: Vec<(Box<[u8]>, Arc<Level>, u32)>,
    /// The directory records this walk made or changed, to be taken in with
    /// [`DigestCache::absorb`]; empty when the cache walked with was right everywhere.
    pub cache: DigestCache,
    /// Whether some directory was listed afresh: then records of directories that left the
    /// tree may remain in the cache (see [`DigestCache::prune_unreachable`]).
    pub relisted: bool,
    /// Paths added, removed or with other content than the cache walked with says, sorted;
    /// empty when that cache was empty.
    pub changed: Vec<String>,
    pub warnings: Vec<String>,
}

/// Told of each directory a walk enters, before the walk looks at it: a watcher adds its watch
/// there, so that whatever changes once the walk has looked is reported (see `watch`).
pub trait DirHook: Sync {
    /// The walk enters the directory `rel` (relative to the root) whose parent's call returned
    /// `parent` (0 for the walk's first directory); what it returns is handed to its children.
    fn enter(&self, parent: i32, rel: &[u8]) -> i32;
}

pub struct Walker<'a> {
    pub root: &'a Path,
    pub old: &'a DigestCache,
    pub stats: &'a Stats,
    /// Paths that never take part (the manifest itself), as (directory, name) relative to
    /// the root.
    excluded: Vec<(Vec<u8>, Vec<u8>)>,
    collect_dirs: bool,
    records: Records<'a>,
    /// Whether to tell which paths changed against `old` (not when it is empty).
    track_changes: bool,
    /// What the tasks found besides entries, in no particular order.
    collected: Mutex<Collected>,
    hook: Option<&'a dyn DirHook>,
}

/// What a walk does with the directory records it makes or changes.
pub enum Records<'a> {
    /// Returns them in [`WalkOutput::cache`].
    Output,
    /// Writes them to a new cache file as it goes (which is right only when walking without
    /// a cache: the file holds nothing else).
    Write(&'a CacheWriter),
    /// Makes none.
    Discard,
}

/// The parent position in [`WalkOutput::dirs`] of the walk's first directory.
pub const NO_DIR: u32 = u32::MAX;

#[derive(Default)]
struct Collected {
    dirs: Vec<(Box<[u8]>, Arc<Level>, u32)>,
    records: Vec<DirRecord>,
    relisted: bool,
    /// An entry took the place of a directory during the walk: it was put where the
    /// directory's entries go, which may not be its place in path order.
    out_of_order: bool,
    changed: Vec<Box<[u8]>>,
    warnings: Vec<String>,
    errors: Vec<HashError>,
}

fn join_rel(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(rel.len() + 1 + name.len());
    if !rel.is_empty() {
        p.extend_from_slice(rel);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Where names are resolved: an open directory, and how much of a relative path it stands
/// for (the entry at relative path `p` is `p[skip..]` from `fd`).
#[derive(Clone)]
struct Loc {
    /// Shared with the tasks of the subdirectories until they have done without it.
    fd: Arc<OwnedFd>,
    skip: usize,
}

impl Loc {
    /// The directory at `rel`, opened as `fd`.
    fn own(fd: OwnedFd, rel: &[u8]) -> Loc {
        let skip = if rel.is_empty() { 0 } else { rel.len() + 1 };
        Loc {
            fd: Arc::new(fd),
            skip,
        }
    }

    /// What the entry at relative path `p` is called from here.
    fn name<'p>(&self, p: &'p [u8]) -> &'p [u8] {
        &p[self.skip.min(p.len())..]
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Longer paths from an opened ancestor are not used: the directory is opened instead.
const LONGEST_NAME: usize = 2048;

/// Where a task finds its directory.
enum Opener {
    /// The start of a walk, by absolute path.
    Path(PathBuf),
    /// Below the parent's location.
    At(Loc),
}

/// How a task reached its directory.
enum Place {
    /// Opened: the location is its own.
    Opened(Loc),
    /// Only stat'ed, through an ancestor's location.
    Through(Loc),
}

struct DirTask {
    from: Opener,
    rel: Vec<u8>,
    /// The rules in force in the parent.
    parent: Arc<Level>,
    node: Arc<Node>,
    /// What the hook returned for the parent.
    hooked: i32,
    /// The parent's position in [`Collected::dirs`].
    up: u32,
}

/// What one directory's task found.
#[derive(Default)]
struct DirOut {
    /// The directory's own entries, in tree order.
    entries: Vec<Entry>,
    /// Its subdirectories, each with the number of entries that come before it.
    dirs: Vec<(usize, Arc<Node>)>,
    counts: Counts,
    record: Option<DirRecord>,
    relisted: bool,
    out_of_order: bool,
    changed: Vec<Box<[u8]>>,
    warnings: Vec<String>,
    error: Option<HashError>,
}

impl DirOut {
    fn fail(&mut self, path: PathBuf, error: io::Error) {
        self.error.get_or_insert(HashError::Read { path, error });
    }

    /// Whether it holds anything for [`Collected`].
    fn has_news(&self) -> bool {
        self.record.is_some()
            || self.relisted
            || self.out_of_order
            || !self.changed.is_empty()
            || !self.warnings.is_empty()
            || self.error.is_some()
    }
}

/// The digests of a directory's ignore files (see [`IGNORE_FILES`]) that are regular files.
type Ignores = [Option<Digested>; 2];

/// A directory's listing: the cached one, or one just read.
// One lives on a task's stack at a time; boxing the big variant would cost an allocation per
// listed directory.
#[allow(clippy::large_enum_variant)]
enum Listing<'r> {
    Cached(&'r DirRecord),
    Fresh(DirListing),
}

impl<'a> Walker<'a> {
    /// A walk below `root` that trusts `old` where the racy rule allows; `exclude` holds
    /// absolute paths that never take part.
    pub fn new(
        root: &'a Path,
        old: &'a DigestCache,
        exclude: &[PathBuf],
        stats: &'a Stats,
    ) -> Self {
        let excluded = exclude
            .iter()
            .filter_map(|x| {
                let rel = x.strip_prefix(root).ok()?;
                let name = rel.file_name()?.as_bytes().to_vec();
                let dir: Vec<&[u8]> = rel
                    .parent()?
                    .components()
                    .map(|c| c.as_os_str().as_bytes())
                    .collect();
                Some((dir.join(&b'/'), name))
            })
            .collect();
        Walker {
            root,
            old,
            stats,
            excluded,
            collect_dirs: true,
            records: Records::Output,
            track_changes: !old.is_empty(),
            collected: Mutex::default(),
            hook: None,
        }
    }

    /// Tells `hook` of each directory before it is looked at.
    pub fn hook(mut self, hook: Option<&'a dyn DirHook>) -> Self {
        self.hook = hook;
        self
    }

    /// Whether [`WalkOutput::dirs`] is filled (it is by default).
    pub fn collect_dirs(mut self, yes: bool) -> Self {
        self.collect_dirs = yes;
        self
    }

    /// What to do with the directory records (returned by default).
    pub fn records(mut self, to: Records<'a>) -> Self {
        self.records = to;
        self
    }

    /// Walks the whole tree below the root with the rules of `top`.
    pub fn run(self, top: Arc<Level>) -> Result<WalkOutput, HashError> {
        let root = self.root.to_path_buf();
        self.run_at(Vec::new(), root, top)
    }

    /// Walks the subtree at `abs` (relative path `rel`) whose parent directory's rules are
    /// `parent`.
    pub fn run_at(
        self,
        rel: Vec<u8>,
        abs: PathBuf,
        parent: Arc<Level>,
    ) -> Result<WalkOutput, HashError> {
        let root = Node::new(None);
        let task = DirTask {
            from: Opener::Path(abs),
            rel,
            parent,
            node: root.clone(),
            hooked: 0,
            up: NO_DIR,
        };
        rayon::scope(|s| s.spawn(|s| self.visit(s, task)));
        let (mut entries, counts) = root.take();
        counts.store(self.stats);
        let c = self
            .collected
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        // The first error in path order, whichever thread met it first.
        if let Some(e) = c
            .errors
            .into_iter()
            .min_by(|a, b| error_path(a).cmp(error_path(b)))
        {
            return Err(e);
        }
        // Tree order makes the paths sorted, but for an entry that replaced a directory.
        if c.out_of_order {
            entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        }
        debug_assert!(entries.is_sorted_by(|a, b| a.path < b.path));
        let mut changed: Vec<String> = c
            .changed
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        changed.sort();
        let mut warnings = c.warnings;
        warnings.sort();
        let mut cache = DigestCache::default();
        cache.reserve(c.records.len());
        for r in c.records {
            cache.insert(r);
        }
        Ok(WalkOutput {
            entries,
            dirs: c.dirs,
            cache,
            relisted: c.relisted,
            changed,
            warnings,
        })
    }

    fn abs(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.to_path_buf()
        } else {
            self.root.join(std::ffi::OsStr::from_bytes(rel))
        }
    }

    fn visit<'s>(&'s self, scope: &rayon::Scope<'s>, task: DirTask) {
        let DirTask {
            from,
            rel,
            parent,
            node,
            hooked,
            up,
        } = task;
        let hooked = self.hook.map_or(0, |h| h.enter(hooked, &rel));
        let mut out = DirOut::default();
        let old = self.old.get(&rel);
        if let Some((place, key)) = self.locate(from, &rel, old, &mut out) {
            let up = (hooked, up);
            self.dir(scope, place, key, &rel, old, &parent, &node, up, &mut out);
        }
        if let (Records::Write(w), Some(rec)) = (&self.records, &out.record) {
            w.add(rec);
            out.record = None;
        }
        if out.has_news() {
            let mut c = self.collected.lock().unwrap_or_else(|e| e.into_inner());
            c.records.extend(out.record);
            c.relisted |= out.relisted;
            c.out_of_order |= out.out_of_order;
            c.changed.append(&mut out.changed);
            c.warnings.append(&mut out.warnings);
            c.errors.extend(out.error);
        }
        node.finish(out.entries, out.dirs, out.counts);
    }

    /// Finds the directory of a task: a directory the cache knows is only stat'ed, since
    /// if its listing holds it need not be opened at all; any other is opened. `None` (with
    /// what took its place, or the error, in `out`) when there is no directory.
    fn locate(
        &self,
        from: Opener,
        rel: &[u8],
        old: Option<&DirRecord>,
        out: &mut DirOut,
    ) -> Option<(Place, StatKey)> {
        let parent = match from {
            Opener::Path(abs) => {
                let at = nix::fcntl::AT_FDCWD;
                let opened = files::open_dir(at, abs.as_os_str().as_bytes(), true)
                    .and_then(|fd| Ok((files::stat(&fd)?, fd)));
                return match opened {
                    Ok((key, fd)) => Some((Place::Opened(Loc::own(fd, rel)), key)),
                    Err(e) => {
                        out.fail(abs, e);
                        None
                    }
                };
            }
            Opener::At(parent) => parent,
        };
        let name = parent.name(rel);
        let located = if old.is_some() && name.len() <= LONGEST_NAME {
            files::stat_at(parent.fd(), name).map(|key| {
                (key.entry_type() == EntryType::Dir).then(|| (Place::Through(parent.clone()), key))
            })
        } else {
            match files::open_dir(parent.fd(), name, false) {
                Ok(fd) => files::stat(&fd).map(|key| Some((Place::Opened(Loc::own(fd, rel)), key))),
                Err(e) if matches!(files::errno(&e), Some(Errno::ENOTDIR | Errno::ELOOP)) => {
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        };
        match located {
            Ok(Some(found)) => Some(found),
            Ok(None) => {
                // No longer a directory: what took its place is an entry of the parent.
                let found = found(parent.fd(), name, None, None);
                self.add(rel.to_vec(), found, None, out);
                out.out_of_order = true;
                None
            }
            Err(e) if files::is_gone(&e) => None,
            Err(e) => {
                out.fail(self.abs(rel), e);
                None
            }
        }
    }

    /// Takes the listing of the directory `rel` (its stat was `key`) from the cache, or
    /// lists it; digests its files and starts a task for each subdirectory.
    #[allow(clippy::too_many_arguments)]
    fn dir<'s>(
        &'s self,
        scope: &rayon::Scope<'s>,
        place: Place,
        key: StatKey,
        rel: &[u8],
        old: Option<&DirRecord>,
        parent: &Arc<Level>,
        node: &Arc<Node>,
        (hooked, up): (i32, u32),
        out: &mut DirOut,
    ) {
        let Some((listing, loc, level, ignores)) = self.listing(place, key, rel, parent, old, out)
        else {
            return;
        };
        // Taken in before any subdirectory's task starts: parents come before children.
        let at = if self.collect_dirs {
            let mut c = self.collected.lock().unwrap_or_else(|e| e.into_inner());
            c.dirs.push((rel.into(), level.clone(), up));
            u32::try_from(c.dirs.len() - 1).expect("fewer than 4 billion directories")
        } else {
            NO_DIR
        };
        // When listed afresh, what each name was before is looked up in the old listing.
        let before_listing = match (&listing, old) {
            (Listing::Fresh(_), Some(o)) => DirListing::of(o),
            _ => None,
        };
        // Digest records that differ from the listing's (all of them, in a new listing).
        let mut updates: Vec<(usize, Option<FileRecord>)> = match &listing {
            Listing::Cached(_) => Vec::new(),
            Listing::Fresh(l) => Vec::with_capacity(l.len()),
        };
        let (cached, fresh) = match &listing {
            Listing::Cached(r) => (Some(r.slots()), None),
            Listing::Fresh(l) => (None, Some(l.iter())),
        };
        let slots = cached
            .into_iter()
            .flatten()
            .chain(fresh.into_iter().flatten());
        out.entries.reserve(match &listing {
            Listing::Cached(r) => r.len(),
            Listing::Fresh(l) => l.len(),
        });
        for (i, slot) in slots.enumerate() {
            let path = join_rel(rel, slot.name);
            let before = match &before_listing {
                Some(b) => b.find(slot.name).map(|j| b.get(j)),
                None if matches!(listing, Listing::Cached(_)) => Some(slot),
                None => None,
            };
            // An ignore file that is a regular file was digested already, for the rules.
            let ignore = IGNORE_FILES
                .iter()
                .position(|f| f.as_bytes() == slot.name)
                .filter(|&j| slot.ty == EntryType::File && ignores[j].is_some());
            let (found, before_file) = match ignore.and_then(|j| Some((j, ignores[j]?))) {
                Some((j, d)) => (
                    Ok(Found::Regular(d)),
                    old.and_then(|o| o.ignore_records()[j]),
                ),
                None => {
                    let before_file = before.and_then(|s| s.file);
                    let found = match slot.ty {
                        EntryType::Other => Ok(Found::Other),
                        EntryType::Dir => Ok(Found::Dir),
                        ty => found(loc.fd(), loc.name(&path), Some(ty), before_file.as_ref()),
                    };
                    (found, before_file)
                }
            };
            if before.is_some_and(|b| (b.ty == EntryType::Dir) != matches!(found, Ok(Found::Dir))) {
                self.was(rel, before, out);
            }
            if let Ok(Found::Dir) = found {
                // Listed as something else: it was sorted as a file name, not as a directory.
                out.out_of_order |= slot.ty != EntryType::Dir;
                let child = node.child();
                out.dirs.push((out.entries.len(), child.clone()));
                let task = DirTask {
                    from: Opener::At(loc.clone()),
                    rel: path,
                    parent: level.clone(),
                    node: child,
                    hooked,
                    up: at,
                };
                scope.spawn(move |s| self.visit(s, task));
                continue;
            }
            let record = self.add(path, found, before_file, out);
            if ignore.is_none() && record != slot.file {
                updates.push((i, record));
            }
        }
        if let (Listing::Fresh(new), Some(old)) = (&listing, old) {
            self.gone(rel, old, new, &ignores, out);
        }

        // A record for the cache when anything in it changed.
        let ignore_records = ignores.map(|d| d.and_then(|d| d.record));
        let changed = match &listing {
            Listing::Fresh(_) => {
                out.relisted = true;
                true
            }
            Listing::Cached(rec) => !updates.is_empty() || ignore_records != rec.ignore_records(),
        };
        if !changed || matches!(self.records, Records::Discard) {
            return;
        }
        let mut l = match listing {
            Listing::Fresh(l) => l,
            Listing::Cached(rec) => match DirListing::of(rec) {
                Some(l) => l,
                None => return,
            },
        };
        for (i, r) in updates {
            l.set_file(i, r);
        }
        l.ignore_records = ignore_records;
        out.record = Some(l.record(rel));
    }
}

fn error_path(e: &HashError) -> &Path {
    match e {
        HashError::Read { path, .. } => path,
    }
}

/// One path digested afresh.
pub struct Fresh {
    /// `None` when it is gone or not a file or symlink.
    pub entry: Option<Entry>,
    /// The record to cache, when the file was stable while read.
    pub record: Option<FileRecord>,
    pub warnings: Vec<String>,
}

/// Digests one file or symlink afresh, never trusting the cache.
pub fn digest_fresh(
    root: &Path,
    rel: &[u8],
    abs: &Path,
    meta: &fs::Metadata,
) -> Result<Fresh, HashError> {
    let empty = DigestCache::default();
    let stats = Stats::default();
    let w = Walker::new(root, &empty, &[], &stats);
    let mut out = DirOut::default();
    let found = match StatKey::of(meta).entry_type() {
        EntryType::Dir => Ok(Found::Other),
        ty => found(
            nix::fcntl::AT_FDCWD,
            abs.as_os_str().as_bytes(),
            Some(ty),
            None,
        ),
    };
    let record = w.add(rel.to_vec(), found, None, &mut out);
    if let Some(e) = out.error {
        return Err(e);
    }
    Ok(Fresh {
        record,
        entry: out.entries.pop(),
        warnings: out.warnings,
    })
}

mod list;
mod outcome;
#[cfg(test)]
mod tests;
