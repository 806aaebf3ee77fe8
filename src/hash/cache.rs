//! The digest cache: per-directory listings and per-file digests, persisted under `.pmesh/`.
//!
//! A file's digest is reused only when its size, mtime and ctime (nanoseconds), inode and mode
//! are unchanged *and* its timestamps are safely older than the moment the digest was taken
//! (git's racy-timestamp rule: two writes within one timestamp tick leave the stat unchanged,
//! so a digest taken in that tick cannot be trusted). A directory's filtered listing is reused
//! under the same rule when the ignore rules in force there are unchanged (git's untracked
//! cache). The file is versioned and checksummed; anything that does not verify is ignored.
//!
//! It is organised the way the walk reads it: one self-contained record per directory holds
//! its listing and, next to each file's name, that file's digest record. Records are kept in
//! their stored form: loading reads the file and indexes its records, a walk reads them in
//! place, and saving writes them out again as they are; only a directory that changed gets a
//! new record (see [`DirListing`]).

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustc_hash::FxHashSet;
use xxhash_rust::xxh3::Xxh3;

pub use super::listing::{DirListing, tree_order};
use super::mapped::Stored;
pub use super::record::{DirRecord, Slot, Slots};
use super::record::{Reader, record_at};

const MAGIC: &[u8; 8] = b"PMESHDC\0";
const VERSION: u32 = 3;

/// How much older than the moment a digest was taken a file's timestamps must be for the
/// digest to be trusted. Kernel timestamps come from a coarse clock (a tick of up to ~10 ms
/// on Linux) and some filesystems keep whole or even two seconds, so this is generous; it only
/// means that files written in the last two seconds are read again.
pub const RACY_MARGIN_NS: i64 = 2_000_000_000;

/// What was known about a file when its digest was taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatKey {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub mode: u32,
}

impl StatKey {
    pub fn of(m: &Metadata) -> StatKey {
        StatKey {
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            ino: m.ino(),
            mode: m.mode(),
        }
    }

    /// The same key from a raw `stat`, as the walk's directory-relative calls return it.
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    pub fn of_stat(st: &libc::stat) -> StatKey {
        StatKey {
            size: st.st_size as u64,
            mtime_ns: st.st_mtime as i64 * 1_000_000_000 + st.st_mtime_nsec as i64,
            ctime_ns: st.st_ctime as i64 * 1_000_000_000 + st.st_ctime_nsec as i64,
            ino: st.st_ino as u64,
            mode: st.st_mode as u32,
        }
    }

    /// Whether something observed at `taken_ns` can be trusted for this stat.
    pub fn safely_older_than(&self, taken_ns: i64) -> bool {
        self.mtime_ns
            .max(self.ctime_ns)
            .saturating_add(RACY_MARGIN_NS)
            <= taken_ns
    }

    /// What kind of file the mode says this is.
    #[allow(clippy::unnecessary_cast)] // mode_t differs between platforms
    pub fn entry_type(&self) -> EntryType {
        match self.mode & libc::S_IFMT as u32 {
            m if m == libc::S_IFREG as u32 => EntryType::File,
            m if m == libc::S_IFDIR as u32 => EntryType::Dir,
            m if m == libc::S_IFLNK as u32 => EntryType::Symlink,
            _ => EntryType::Other,
        }
    }
}

/// A cached file digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileRecord {
    pub key: StatKey,
    /// Wall-clock nanoseconds when the content was read (before reading began).
    pub taken_ns: i64,
    pub digest: u128,
}

impl FileRecord {
    /// The digest, if this record can be trusted for a file whose stat is now `key`.
    pub fn digest_for(&self, key: &StatKey) -> Option<u128> {
        (self.key == *key && key.safely_older_than(self.taken_ns)).then_some(self.digest)
    }
}

/// What a listed directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EntryType {
    File = 0,
    Dir = 1,
    Symlink = 2,
    /// A FIFO, socket or device: never opened, warned about.
    Other = 3,
}

impl EntryType {
    pub(super) fn from_u8(b: u8) -> Option<EntryType> {
        Some(match b {
            0 => EntryType::File,
            1 => EntryType::Dir,
            2 => EntryType::Symlink,
            3 => EntryType::Other,
            _ => return None,
        })
    }
}

/// A record in a set, found by its path.
#[derive(Clone, Debug)]
struct ByPath(DirRecord);

impl std::hash::Hash for ByPath {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.path().hash(h);
    }
}

impl PartialEq for ByPath {
    fn eq(&self, other: &Self) -> bool {
        self.0.path() == other.0.path()
    }
}

impl Eq for ByPath {}

impl std::borrow::Borrow<[u8]> for ByPath {
    fn borrow(&self) -> &[u8] {
        self.0.path()
    }
}

/// Listings and digests by directory path relative to the service root (`/`-separated bytes;
/// the root directory itself is the empty path).
#[derive(Debug, Default, Clone)]
pub struct DigestCache {
    /// Keyed by the path each record holds, so that no path is stored twice.
    dirs: FxHashSet<ByPath>,
    /// The file the records were loaded from, mapped.
    file: Option<Arc<Stored>>,
}

impl PartialEq for DigestCache {
    fn eq(&self, other: &Self) -> bool {
        self.dirs.len() == other.dirs.len()
            && self
                .dirs
                .iter()
                .all(|r| other.get(r.0.path()) == Some(&r.0))
    }
}

impl Eq for DigestCache {}

/// `rel` split into its parent directory and its name.
fn split_rel(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

impl DigestCache {
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// How many directories have a record.
    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    /// The records, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &DirRecord> {
        self.dirs.iter().map(|r| &r.0)
    }

    /// Makes room for `n` more records.
    pub fn reserve(&mut self, n: usize) {
        self.dirs.reserve(n);
    }

    /// The record of the directory `rel`.
    pub fn get(&self, rel: &[u8]) -> Option<&DirRecord> {
        self.dirs.get(rel).map(|r| &r.0)
    }

    /// Adds `record`, in place of any other record of its directory.
    pub fn insert(&mut self, record: DirRecord) {
        self.dirs.replace(ByPath(record));
    }

    /// Takes in the records a walk made or changed; whether there were any.
    pub fn absorb(&mut self, other: DigestCache) -> bool {
        let changed = !other.dirs.is_empty();
        if self.dirs.is_empty() {
            *self = other;
        } else {
            for r in other.dirs {
                self.dirs.replace(r);
            }
        }
        changed
    }

    /// Keeps the records of the directories for which `keep(path)` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) {
        self.dirs.retain(|r| keep(r.0.path()));
    }

    /// Changes the record of `rel`, if there is one and it can be read.
    fn edit(&mut self, rel: &[u8], f: impl FnOnce(&mut DirListing)) {
        if let Some(mut l) = self.get(rel).and_then(DirListing::of) {
            f(&mut l);
            self.insert(l.record(rel));
        }
    }

    /// Stops vouching for the path `rel`: its digest record goes, and if it is a directory,
    /// its listing is no longer trusted.
    pub fn forget(&mut self, rel: &[u8]) {
        self.edit(rel, DirListing::invalidate);
        let (parent, name) = split_rel(rel);
        self.edit(parent, |l| {
            if let Some(i) = l.find(name) {
                l.set_file(i, None);
            }
        });
    }

    /// Records the digest of the regular file `rel`.
    pub fn insert_file(&mut self, rel: &[u8], record: FileRecord) {
        let (parent, name) = split_rel(rel);
        if !self.dirs.contains(parent) {
            let empty = DirListing::new(StatKey::default(), 0);
            self.insert(empty.record(parent));
        }
        self.edit(parent, |l| match l.find(name) {
            Some(i) if l.get(i).ty == EntryType::File => l.set_file(i, Some(record)),
            _ => {
                // A name the listing did not have: the listing is stale.
                l.retain(|n, _| n != name);
                l.push(name, EntryType::File, Some(record));
                l.sort();
                l.invalidate();
            }
        });
    }

    /// Drops the records of directories that no listing leads to from the root any more
    /// (removed, renamed or newly ignored ones).
    pub fn prune_unreachable(&mut self) {
        let mut keep = FxHashSet::default();
        keep.reserve(self.dirs.len());
        let mut todo: Vec<Vec<u8>> = vec![Vec::new()];
        while let Some(path) = todo.pop() {
            let Some(rec) = self.dirs.take(path.as_slice()) else {
                continue;
            };
            for s in rec.0.slots().filter(|s| s.ty == EntryType::Dir) {
                todo.push(join(&path, s.name));
            }
            keep.insert(rec);
        }
        self.dirs = keep;
    }

    /// Every path of a file with a digest record at or below the directory `rel`.
    pub fn files_below(&self, rel: &[u8], out: &mut Vec<Box<[u8]>>) {
        let mut todo = vec![rel.to_vec()];
        while let Some(path) = todo.pop() {
            let Some(rec) = self.get(&path) else {
                continue;
            };
            for (i, r) in rec.ignore_records().iter().enumerate() {
                if r.is_some() {
                    let name = super::rules::IGNORE_FILES[i].as_bytes();
                    out.push(join(&path, name).into());
                }
            }
            for s in rec.slots() {
                match s.ty {
                    EntryType::Dir => todo.push(join(&path, s.name)),
                    _ if s.file.is_some() => out.push(join(&path, s.name).into()),
                    _ => {}
                }
            }
        }
    }

    /// Reads the cache at `path`; a missing, corrupt, truncated or foreign file gives an empty
    /// cache, never an error. The file is mapped, not copied: records not changed since are
    /// read from the mapping.
    pub fn load(path: &Path) -> DigestCache {
        Stored::open(path).ok().and_then(decode).unwrap_or_default()
    }

    /// Hands back the pages of the loaded file that were read so far (all of them, after a
    /// walk): they are read again from the page cache when needed. Between walks, a watch
    /// touches only the records of the directories that events name.
    pub fn release_pages(&self) {
        if let Some(f) = &self.file {
            f.release();
        }
    }

    /// Writes the cache to `path` atomically (a temporary file renamed over it).
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let w = CacheWriter::create(path)?;
        for r in &self.dirs {
            w.add(&r.0);
        }
        w.finish()
    }

    #[cfg(test)]
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut sum = Xxh3::new();
        for r in &self.dirs {
            sum.update(r.0.bytes());
            out.extend_from_slice(r.0.bytes());
        }
        let mut file = header(self.dirs.len() as u64, out.len() as u64, sum.digest()).to_vec();
        file.extend_from_slice(&out);
        file
    }
}

/// The file's header: magic, version, record count, body length, xxh3-64 of the body (the
/// records, one after the other).
const HEADER_LEN: usize = 36;

fn header(count: u64, len: u64, sum: u64) -> [u8; HEADER_LEN] {
    let mut h = [0; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&count.to_le_bytes());
    h[20..28].copy_from_slice(&len.to_le_bytes());
    h[28..36].copy_from_slice(&sum.to_le_bytes());
    h
}

/// A cache file written one record at a time, so that a walk can write its records as it
/// makes them, from any thread. It replaces the cache only when [`CacheWriter::finish`]ed;
/// dropped before that, it leaves nothing behind.
pub struct CacheWriter {
    path: PathBuf,
    tmp: PathBuf,
    /// Written at offsets handed out under `state`'s lock, but outside it: a thread that adds
    /// a record never waits for another's write.
    file: File,
    state: Mutex<WriterState>,
}

struct WriterState {
    /// Records not written yet; they go at offset `HEADER_LEN + len - buf.len()`.
    buf: Vec<u8>,
    /// Of all the records so far, in file order.
    sum: Xxh3,
    count: u64,
    len: u64,
    error: Option<io::Error>,
}

/// Records are written in pieces of about this size.
const WRITE_SIZE: usize = 256 << 10;

impl CacheWriter {
    /// Starts the cache file `path` (in a temporary file next to it).
    pub fn create(path: &Path) -> io::Result<CacheWriter> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
            remove_leftovers(dir, path);
        }
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let file = File::create(&tmp)?;
        Ok(CacheWriter {
            path: path.to_path_buf(),
            tmp,
            file,
            state: Mutex::new(WriterState {
                buf: Vec::with_capacity(WRITE_SIZE + (64 << 10)),
                sum: Xxh3::new(),
                count: 0,
                len: 0,
                error: None,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a record (whose directory must not have one yet).
    pub fn add(&self, record: &DirRecord) {
        let bytes = record.bytes();
        let full = {
            let mut s = self.state();
            s.sum.update(bytes);
            s.buf.extend_from_slice(bytes);
            s.count += 1;
            s.len += bytes.len() as u64;
            if s.buf.len() < WRITE_SIZE || s.error.is_some() {
                return;
            }
            let at = HEADER_LEN as u64 + s.len - s.buf.len() as u64;
            let buf = std::mem::replace(&mut s.buf, Vec::with_capacity(WRITE_SIZE + (64 << 10)));
            (at, buf)
        };
        let (at, buf) = full;
        if let Err(e) = self.file.write_all_at(&buf, at) {
            self.state().error.get_or_insert(e);
        }
    }

    /// Completes the file and puts it in place of the cache.
    pub fn finish(self) -> io::Result<()> {
        let mut s = self.state();
        if let Some(e) = s.error.take() {
            return Err(e);
        }
        let at = HEADER_LEN as u64 + s.len - s.buf.len() as u64;
        self.file.write_all_at(&s.buf, at)?;
        self.file
            .write_all_at(&header(s.count, s.len, s.sum.digest()), 0)?;
        drop(s);
        std::fs::rename(&self.tmp, &self.path)
        // (Drop removes the temporary file if the rename failed.)
    }
}

/// Removes the temporary files that writers of `path` killed before they finished left in
/// `dir` (named after their process, which is gone).
fn remove_leftovers(dir: &Path, path: &Path) {
    let Some(prefix) = path
        .file_name()
        .map(|n| format!("{}.tmp-", n.to_string_lossy()))
    else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix)?.parse::<i32>().ok());
        let gone = |pid| {
            let pid = nix::unistd::Pid::from_raw(pid);
            nix::sys::signal::kill(pid, None) == Err(nix::errno::Errno::ESRCH)
        };
        if pid.is_some_and(gone) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        // Nothing to remove after a successful rename.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    if !dir.is_empty() {
        p.extend_from_slice(dir);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Checks the file and indexes its records; their entries are checked when a walk first
/// uses them ([`DirRecord::is_well_formed`]).
fn decode(bytes: impl Into<Stored>) -> Option<DigestCache> {
    let bytes = bytes.into();
    let mut r = Reader(&bytes);
    if r.take(8)? != MAGIC || r.u32()? != VERSION {
        return None;
    }
    let count = usize::try_from(r.u64()?).ok()?;
    let len = usize::try_from(r.u64()?).ok()?;
    let sum = r.u64()?;
    let body = r.take(len)?;
    if !r.0.is_empty() || xxhash_rust::xxh3::xxh3_64(body) != sum || count > len / 8 {
        return None;
    }
    let file = Arc::new(bytes);
    let mut dirs = FxHashSet::default();
    dirs.reserve(count);
    let mut at = HEADER_LEN;
    for _ in 0..count {
        let (rec, len) = record_at(&file, at)?;
        at += len;
        if !dirs.insert(ByPath(rec)) {
            return None;
        }
    }
    (at == file.len()).then_some(DigestCache {
        dirs,
        file: Some(file),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(mtime_ns: i64) -> StatKey {
        StatKey {
            size: 4,
            mtime_ns,
            ctime_ns: mtime_ns,
            ino: 7,
            mode: 0o100644,
        }
    }

    fn record(digest: u128) -> FileRecord {
        FileRecord {
            key: key(1),
            taken_ns: 5,
            digest,
        }
    }

    fn sample() -> DigestCache {
        let mut c = DigestCache::default();
        let mut root = DirListing::new(key(2), 9);
        root.rules = 3;
        root.ignore_files = [false, true];
        root.ignore_records = [None, Some(record(8))];
        root.push(b"a", EntryType::Dir, None);
        root.push(b"a.txt", EntryType::File, Some(record(1)));
        root.push(b"link", EntryType::Symlink, None);
        root.sort();
        c.insert(root.record(b""));
        let mut a = DirListing::new(key(3), 9);
        a.push(b"b.txt", EntryType::File, Some(record(42)));
        a.push(b"racy.txt", EntryType::File, None);
        a.sort();
        c.insert(a.record(b"a"));
        c
    }

    #[test]
    fn round_trip() {
        let c = sample();
        let d = decode(c.encode()).unwrap();
        assert_eq!(d, c);
        let root = d.get(b"").unwrap();
        assert!(root.is_well_formed());
        assert_eq!(root.key(), key(2));
        assert_eq!(root.taken_ns(), 9);
        assert_eq!(root.rules(), 3);
        assert_eq!(root.ignore_files(), [false, true]);
        assert_eq!(root.ignore_records(), [None, Some(record(8))]);
        let slots: Vec<_> = root.slots().map(|s| (s.name, s.ty, s.file)).collect();
        assert_eq!(
            slots,
            [
                (&b"a.txt"[..], EntryType::File, Some(record(1))),
                (b"a", EntryType::Dir, None),
                (b"link", EntryType::Symlink, None),
            ],
            "tree order: a.txt < a/ < link"
        );
    }

    #[test]
    fn corrupt_truncated_and_foreign_files_are_ignored() {
        let bytes = sample().encode();
        for cut in [0, 5, 12, bytes.len() - 1] {
            assert_eq!(decode(bytes[..cut].to_vec()), None, "truncated at {cut}");
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0xff;
        assert_eq!(decode(flipped), None);
        let mut foreign = bytes.clone();
        foreign[8] = 99;
        assert_eq!(decode(foreign), None);
        assert_eq!(decode(b"not a cache at all".to_vec()), None);
    }

    #[test]
    fn names_that_are_paths_are_never_trusted() {
        for bad in [&b"../x"[..], b"..", b"", b"a\0b"] {
            let mut l = DirListing::new(key(3), 9);
            l.push(bad, EntryType::File, None);
            assert!(!l.record(b"a").is_well_formed(), "{bad:?}");
        }
        let mut l = DirListing::new(key(3), 9);
        l.push(b"b", EntryType::File, None);
        l.push(b"a", EntryType::File, None);
        assert!(!l.record(b"a").is_well_formed(), "out of order");
    }

    #[test]
    fn forget_insert_and_prune() {
        let mut c = sample();
        c.forget(b"a/b.txt");
        let file = |c: &DigestCache, dir: &[u8], name: &[u8]| {
            c.get(dir)
                .unwrap()
                .slots()
                .find(|s| s.name == name)
                .map(|s| s.file)
        };
        assert_eq!(file(&c, b"a", b"b.txt"), Some(None));
        c.forget(b"a");
        assert!(
            !c.get(b"a").unwrap().valid_for(&key(3)),
            "listing no longer trusted"
        );
        c.insert_file(b"a/new.txt", record(5));
        assert_eq!(file(&c, b"a", b"new.txt"), Some(Some(record(5))));
        c.insert(DirListing::new(key(4), 9).record(b"gone"));
        c.prune_unreachable();
        assert_eq!(c.len(), 2, "only the root and `a` are reachable");
        let mut below = Vec::new();
        c.files_below(b"", &mut below);
        below.sort();
        assert_eq!(
            below,
            [&b".gitignore"[..], b"a.txt", b"a/new.txt"].map(Box::from)
        );
    }

    #[test]
    fn a_writer_killed_before_it_finished_leaves_nothing_for_long() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join(".pmesh/digests");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // A process id that cannot be running (above any pid_max).
        let stale = path.with_extension("tmp-2147483000");
        let live = path.with_extension(format!("tmp-{}", std::os::unix::process::parent_id()));
        std::fs::write(&stale, b"half a cache").unwrap();
        std::fs::write(&live, b"being written").unwrap();
        let w = CacheWriter::create(&path).unwrap();
        w.add(&DirListing::new(key(1), 2).record(b""));
        w.finish().unwrap();
        assert!(!stale.exists(), "the dead writer's file is gone");
        assert!(live.exists(), "a running writer's file stays");
        assert_eq!(DigestCache::load(&path).len(), 1);
    }

    #[test]
    fn racy_digests_are_not_trusted() {
        let now = 10 * RACY_MARGIN_NS;
        let fresh = FileRecord {
            key: key(now - 1_000),
            taken_ns: now,
            digest: 1,
        };
        assert_eq!(fresh.digest_for(&fresh.key), None);
        let settled = FileRecord {
            key: key(now - RACY_MARGIN_NS),
            taken_ns: now,
            digest: 1,
        };
        assert_eq!(settled.digest_for(&settled.key), Some(1));
        let mut moved = settled.key;
        moved.ino += 1;
        assert_eq!(settled.digest_for(&moved), None);
    }
}
