//! The tree hash: which files make up a service, their digests, and the build id.

pub(crate) mod arena;
pub mod cache;
mod entry;
pub(crate) mod files;
mod gather;
mod listing;
pub mod live;
mod mapped;
mod record;
pub mod rules;
mod walk;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::Xxh3;

use crate::manifest::Service;
pub use cache::DigestCache;
pub use live::LiveTree;
pub use walk::{DirHook, Stats, kind_of_mode};

/// Mixed into every build id; bump it when the entry encoding changes.
const FORMAT_VERSION: &[u8] = b"pmesh-dev tree v1\0";

/// Where the digest cache lives inside a service root.
pub const CACHE_FILE: &str = ".pmesh/digests";

/// A build id: xxh3-128 over the recipe and the sorted entries of a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BuildId(pub u128);

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl BuildId {
    /// The first 12 hex digits, for tables and log lines.
    pub fn short(&self) -> String {
        self.to_string()[..12].to_owned()
    }
}

impl FromStr for BuildId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("not a build id: `{s}`"));
        }
        u128::from_str_radix(s, 16)
            .map(BuildId)
            .map_err(|e| e.to_string())
    }
}

/// What an entry of the tree is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Regular,
    Executable,
    /// A symlink, never followed; its target is part of the entry.
    Symlink,
}

impl Kind {
    fn tag(self) -> u8 {
        match self {
            Kind::Regular => b'f',
            Kind::Executable => b'x',
            Kind::Symlink => b'l',
        }
    }
}

/// One hashed entry of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the service root, `/`-separated.
    pub path: Box<[u8]>,
    pub kind: Kind,
    /// The link target, for symlinks.
    pub target: Option<Box<[u8]>>,
    /// xxh3-128 of the content (of the target, for symlinks).
    pub digest: u128,
    pub size: u64,
}

impl Entry {
    /// The fields that make up the build id, borrowed.
    pub fn as_ref(&self) -> EntryRef<'_> {
        EntryRef {
            path: &self.path,
            kind: self.kind,
            target: self.target.as_deref(),
            digest: self.digest,
        }
    }
}

/// What the build id takes from one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRef<'a> {
    pub path: &'a [u8],
    pub kind: Kind,
    pub target: Option<&'a [u8]>,
    pub digest: u128,
}

/// The part of a service's configuration that decides what a build produces.
#[derive(Debug, Clone, Copy)]
pub struct Recipe<'a> {
    pub steps: &'a [String],
    pub env: &'a BTreeMap<String, String>,
}

/// What to hash and how.
#[derive(Debug, Clone)]
pub struct HashSpec<'a> {
    pub root: &'a Path,
    /// Ignore files apply from here down.
    pub ignore_root: &'a Path,
    /// The manifest's extra patterns.
    pub ignore: &'a [String],
    /// Absolute paths that never take part (the manifest file).
    pub exclude: Vec<PathBuf>,
    pub recipe: Option<Recipe<'a>>,
}

impl<'a> HashSpec<'a> {
    /// The spec of a service from `manifest_path`.
    pub fn service(svc: &'a Service, manifest_path: &Path) -> Self {
        HashSpec {
            root: &svc.root,
            ignore_root: &svc.ignore_root,
            ignore: &svc.ignore,
            exclude: vec![manifest_path.to_path_buf()],
            recipe: Some(Recipe {
                steps: &svc.build,
                env: &svc.env,
            }),
        }
    }

    /// Any directory with default settings: its own ignore files, no recipe.
    pub fn dir(dir: &'a Path) -> Self {
        HashSpec {
            root: dir,
            ignore_root: dir,
            ignore: &[],
            exclude: Vec::new(),
            recipe: None,
        }
    }
}

/// Why a tree could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("cannot read {}: {error}", .path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// A hashed tree.
#[derive(Debug)]
pub struct TreeHash {
    pub id: BuildId,
    /// Sorted by path bytes.
    pub entries: Vec<Entry>,
    /// Total size of the entries' content.
    pub bytes: u64,
    pub warnings: Vec<String>,
    /// Paths added, removed or changed since the cache was written.
    pub changed: Vec<String>,
    pub timings: Timings,
}

/// Where a hash spent its time, and how much work it did.
#[derive(Debug, Default)]
pub struct Timings {
    pub load: Duration,
    pub walk: Duration,
    pub id: Duration,
    pub save: Duration,
    /// All of [`hash_tree`], freeing what it no longer needs included.
    pub total: Duration,
    pub stats: Stats,
}

impl fmt::Display for Timings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        write!(
            f,
            "load {:.1}ms, walk+stat+read {:.1}ms, sort+id {:.1}ms, save {:.1}ms, \
             total {:.1}ms; dirs listed {}, from cache {}; files read {} ({} bytes), from cache {}",
            self.load.as_secs_f64() * 1e3,
            self.walk.as_secs_f64() * 1e3,
            self.id.as_secs_f64() * 1e3,
            self.save.as_secs_f64() * 1e3,
            self.total.as_secs_f64() * 1e3,
            s.dirs_listed.load(Ordering::Relaxed),
            s.dirs_from_cache.load(Ordering::Relaxed),
            s.files_read.load(Ordering::Relaxed),
            s.bytes_read.load(Ordering::Relaxed),
            s.files_from_cache.load(Ordering::Relaxed),
        )
    }
}

/// Whether the digest cache is read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheUse {
    /// Read `.pmesh/digests` and write it back when it changed.
    Persist,
    /// Hash everything from scratch and leave no file behind.
    None,
}

/// Hashes the tree of `spec`, reading and updating the digest cache under its root.
pub fn hash_tree(spec: &HashSpec, cache_use: CacheUse) -> Result<TreeHash, HashError> {
    let start = Instant::now();
    let cache_path = spec.root.join(CACHE_FILE);
    let mut timings = Timings::default();
    let t = Instant::now();
    let mut cache = match cache_use {
        CacheUse::Persist => DigestCache::load(&cache_path),
        CacheUse::None => DigestCache::default(),
    };
    timings.load = t.elapsed();

    let t = Instant::now();
    let top = rules::Level::top(spec.ignore_root, spec.root, spec.ignore);
    // Without a cache to start from, the walk writes the new one as it goes.
    let writer = match cache_use {
        CacheUse::Persist if cache.is_empty() => cache::CacheWriter::create(&cache_path).ok(),
        _ => None,
    };
    let records = match (&writer, cache_use) {
        (Some(w), _) => walk::Records::Write(w),
        (None, CacheUse::Persist) => walk::Records::Output,
        (None, CacheUse::None) => walk::Records::Discard,
    };
    let out = walk::Walker::new(spec.root, &cache, &spec.exclude, &timings.stats)
        .collect_dirs(false)
        .records(records)
        .run(top)?;
    timings.walk = t.elapsed();

    let t = Instant::now();
    // The walk emits entries sorted by path.
    let entries = out.entries;
    let id = build_id(spec.recipe, entries.iter().map(Entry::as_ref));
    let bytes = entries.iter().map(|e| e.size).sum();
    timings.id = t.elapsed();

    let t = Instant::now();
    // A cache that cannot be written only costs speed next time. A warm hash of an unchanged
    // tree writes nothing.
    if let Some(w) = writer {
        let _ = w.finish();
    } else if cache_use == CacheUse::Persist && !out.cache.is_empty() {
        cache.absorb(out.cache);
        if out.relisted {
            cache.prune_unreachable();
        }
        let _ = cache.save(&cache_path);
    }
    timings.save = t.elapsed();
    if !cache.is_empty() {
        // Freeing tens of thousands of records takes milliseconds that nobody waits for.
        rayon::spawn(move || drop(cache));
    }
    timings.total = start.elapsed();

    Ok(TreeHash {
        id,
        entries,
        bytes,
        warnings: out.warnings,
        changed: out.changed,
        timings,
    })
}

/// The build id of `entries`, sorted by path, built by `recipe`.
pub fn build_id<'e>(
    recipe: Option<Recipe>,
    entries: impl ExactSizeIterator<Item = EntryRef<'e>>,
) -> BuildId {
    let mut h = IdHasher::new(recipe, entries.len());
    for e in entries {
        h.entry(e);
    }
    h.finish()
}

/// The build id's hash, fed one entry at a time. Its state after any number of entries can be
/// kept ([`IdHasher::checkpoint`]) and resumed from, so that a watcher recomputing the id
/// after an edit starts at the edited entry rather than the first one.
#[derive(Clone)]
pub struct IdHasher {
    h: Xxh3,
    /// The fields go through a buffer: one hasher update per 64 KiB instead of five per entry.
    buf: Vec<u8>,
}

impl IdHasher {
    /// Starts the id of a tree of `entries` entries built by `recipe`.
    pub fn new(recipe: Option<Recipe>, entries: usize) -> IdHasher {
        let mut f = IdHasher {
            h: Xxh3::new(),
            buf: Vec::with_capacity(64 << 10),
        };
        f.bytes(FORMAT_VERSION);
        match recipe {
            Some(r) => {
                f.bytes(&(r.steps.len() as u64).to_le_bytes());
                for s in r.steps {
                    f.field(s.as_bytes());
                }
                f.bytes(&(r.env.len() as u64).to_le_bytes());
                for (k, v) in r.env {
                    f.field(k.as_bytes());
                    f.field(v.as_bytes());
                }
            }
            None => f.bytes(&u64::MAX.to_le_bytes()),
        }
        f.bytes(&(entries as u64).to_le_bytes());
        f
    }

    fn bytes(&mut self, b: &[u8]) {
        if self.buf.len() + b.len() > self.buf.capacity() {
            self.h.update(&self.buf);
            self.buf.clear();
            if b.len() > self.buf.capacity() {
                self.h.update(b);
                return;
            }
        }
        self.buf.extend_from_slice(b);
    }

    fn field(&mut self, b: &[u8]) {
        self.bytes(&(b.len() as u64).to_le_bytes());
        self.bytes(b);
    }

    /// Adds the next entry (entries come sorted by path).
    pub fn entry(&mut self, e: EntryRef) {
        self.field(e.path);
        self.bytes(&[e.kind.tag()]);
        if let Some(t) = e.target {
            self.field(t);
        }
        self.bytes(&e.digest.to_le_bytes());
    }

    /// The state so far, compact (without the buffer), to resume from with
    /// [`IdHasher::resume`].
    pub fn checkpoint(&mut self) -> Xxh3 {
        self.h.update(&self.buf);
        self.buf.clear();
        self.h.clone()
    }

    /// Goes on from a [`IdHasher::checkpoint`].
    pub fn resume(h: Xxh3) -> IdHasher {
        IdHasher {
            h,
            buf: Vec::with_capacity(64 << 10),
        }
    }

    pub fn finish(mut self) -> BuildId {
        self.h.update(&self.buf);
        BuildId(self.h.digest128())
    }
}
