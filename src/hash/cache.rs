//! The digest cache: per-file digests and per-directory listings, persisted under `.pmesh/`.
//!
//! A file's digest is reused only when its size, mtime and ctime (nanoseconds), inode and mode
//! are unchanged *and* its timestamps are safely older than the moment the digest was taken
//! (git's racy-timestamp rule: two writes within one timestamp tick leave the stat unchanged,
//! so a digest taken in that tick cannot be trusted). A directory's filtered listing is reused
//! under the same rule when the ignore rules in force there are unchanged (git's untracked
//! cache). The file is versioned and checksummed; anything that does not verify is ignored.

use std::fs::Metadata;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustc_hash::FxHashMap;

const MAGIC: &[u8; 8] = b"PMESHDC\0";
const VERSION: u32 = 1;

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

    /// Whether something observed at `taken_ns` can be trusted for this stat.
    pub fn safely_older_than(&self, taken_ns: i64) -> bool {
        self.mtime_ns
            .max(self.ctime_ns)
            .saturating_add(RACY_MARGIN_NS)
            <= taken_ns
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

/// A cached, already filtered directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirRecord {
    pub key: StatKey,
    pub taken_ns: i64,
    /// The fingerprint of the ignore rules the listing was filtered with.
    pub rules: u128,
    /// Which ignore files the directory holds (see `rules::IGNORE_FILES`).
    pub ignore_files: [bool; 2],
    /// Entries that take part, by name.
    pub entries: Vec<(Box<[u8]>, EntryType)>,
}

impl DirRecord {
    /// Whether this listing can be trusted for a directory whose stat is now `key`.
    pub fn valid_for(&self, key: &StatKey) -> bool {
        self.key == *key && key.safely_older_than(self.taken_ns)
    }
}

/// Digests and listings by path relative to the service root (`/`-separated bytes; the root
/// directory itself is the empty path).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DigestCache {
    pub files: FxHashMap<Box<[u8]>, FileRecord>,
    pub dirs: FxHashMap<Box<[u8]>, DirRecord>,
}

impl DigestCache {
    /// Reads the cache at `path`; a missing, corrupt, truncated or foreign file gives an empty
    /// cache, never an error.
    pub fn load(path: &Path) -> DigestCache {
        std::fs::read(path)
            .ok()
            .and_then(|bytes| decode(&bytes))
            .unwrap_or_default()
    }

    /// Writes the cache to `path` atomically (a temporary file renamed over it).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let bytes = self.encode();
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        drop(f);
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.files.len() * 96);
        put_u64(&mut body, self.files.len() as u64);
        for (path, r) in &self.files {
            put_bytes(&mut body, path);
            put_key(&mut body, &r.key);
            put_u64(&mut body, r.taken_ns as u64);
            body.extend_from_slice(&r.digest.to_le_bytes());
        }
        put_u64(&mut body, self.dirs.len() as u64);
        for (path, d) in &self.dirs {
            put_bytes(&mut body, path);
            put_key(&mut body, &d.key);
            put_u64(&mut body, d.taken_ns as u64);
            body.extend_from_slice(&d.rules.to_le_bytes());
            body.push(u8::from(d.ignore_files[0]) | (u8::from(d.ignore_files[1]) << 1));
            put_u64(&mut body, d.entries.len() as u64);
            for (name, t) in &d.entries {
                body.push(*t as u8);
                put_bytes(&mut body, name);
            }
        }
        let mut out = Vec::with_capacity(body.len() + 28);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_key(out: &mut Vec<u8>, k: &StatKey) {
    put_u64(out, k.size);
    put_u64(out, k.mtime_ns as u64);
    put_u64(out, k.ctime_ns as u64);
    put_u64(out, k.ino);
    out.extend_from_slice(&k.mode.to_le_bytes());
}

/// A bounds-checked reader over the cache body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn u128(&mut self) -> Option<u128> {
        self.take(16)
            .map(|b| u128::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn bytes(&mut self) -> Option<Box<[u8]>> {
        let n = self.u32()? as usize;
        self.take(n).map(Box::from)
    }
    fn key(&mut self) -> Option<StatKey> {
        Some(StatKey {
            size: self.u64()?,
            mtime_ns: self.u64()? as i64,
            ctime_ns: self.u64()? as i64,
            ino: self.u64()?,
            mode: self.u32()?,
        })
    }
    /// A count that cannot exceed what the remaining bytes could hold.
    fn count(&mut self, min_item: usize) -> Option<usize> {
        let n = usize::try_from(self.u64()?).ok()?;
        (n <= self.0.len() / min_item).then_some(n)
    }
}

fn decode(bytes: &[u8]) -> Option<DigestCache> {
    let mut r = Reader(bytes);
    if r.take(8)? != MAGIC || r.u32()? != VERSION {
        return None;
    }
    let len = usize::try_from(r.u64()?).ok()?;
    let sum = r.u64()?;
    let body = r.take(len)?;
    if !r.0.is_empty() || xxhash_rust::xxh3::xxh3_64(body) != sum {
        return None;
    }
    let mut r = Reader(body);
    let mut cache = DigestCache::default();
    let n = r.count(4 + 36 + 8 + 16)?;
    cache.files.reserve(n);
    for _ in 0..n {
        let path = r.bytes()?;
        let key = r.key()?;
        let taken_ns = r.u64()? as i64;
        let digest = r.u128()?;
        cache.files.insert(
            path,
            FileRecord {
                key,
                taken_ns,
                digest,
            },
        );
    }
    let n = r.count(4 + 36 + 8 + 16 + 1 + 8)?;
    cache.dirs.reserve(n);
    for _ in 0..n {
        let path = r.bytes()?;
        let key = r.key()?;
        let taken_ns = r.u64()? as i64;
        let rules = r.u128()?;
        let flags = r.u8()?;
        let m = r.count(5)?;
        let mut entries = Vec::with_capacity(m);
        for _ in 0..m {
            let t = match r.u8()? {
                0 => EntryType::File,
                1 => EntryType::Dir,
                2 => EntryType::Symlink,
                3 => EntryType::Other,
                _ => return None,
            };
            entries.push((r.bytes()?, t));
        }
        cache.dirs.insert(
            path,
            DirRecord {
                key,
                taken_ns,
                rules,
                ignore_files: [flags & 1 != 0, flags & 2 != 0],
                entries,
            },
        );
    }
    r.0.is_empty().then_some(cache)
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

    fn sample() -> DigestCache {
        let mut c = DigestCache::default();
        c.files.insert(
            Box::from(&b"a/b.txt"[..]),
            FileRecord {
                key: key(1),
                taken_ns: 5,
                digest: 42,
            },
        );
        c.dirs.insert(
            Box::from(&b""[..]),
            DirRecord {
                key: key(2),
                taken_ns: 9,
                rules: 3,
                ignore_files: [false, true],
                entries: vec![(Box::from(&b"a"[..]), EntryType::Dir)],
            },
        );
        c
    }

    #[test]
    fn round_trip() {
        let c = sample();
        assert_eq!(decode(&c.encode()), Some(c));
    }

    #[test]
    fn corrupt_truncated_and_foreign_files_are_ignored() {
        let bytes = sample().encode();
        for cut in [0, 5, 12, bytes.len() - 1] {
            assert_eq!(decode(&bytes[..cut]), None, "truncated at {cut}");
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0xff;
        assert_eq!(decode(&flipped), None);
        let mut foreign = bytes.clone();
        foreign[8] = 99;
        assert_eq!(decode(&foreign), None);
        assert_eq!(decode(b"not a cache at all"), None);
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
