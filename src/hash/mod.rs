//! The tree hash: which files make up a service, their digests, and the build id.

pub mod cache;
pub mod live;
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
pub use walk::{Stats, kind_of_mode};

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
    pub stats: Stats,
}

impl fmt::Display for Timings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        write!(
            f,
            "load {:.1}ms, walk+stat+read {:.1}ms, sort+id {:.1}ms, save {:.1}ms; \
             dirs listed {}, from cache {}; files read {} ({} bytes), from cache {}",
            self.load.as_secs_f64() * 1e3,
            self.walk.as_secs_f64() * 1e3,
            self.id.as_secs_f64() * 1e3,
            self.save.as_secs_f64() * 1e3,
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
    let cache_path = spec.root.join(CACHE_FILE);
    let mut timings = Timings::default();
    let t = Instant::now();
    let old = match cache_use {
        CacheUse::Persist => DigestCache::load(&cache_path),
        CacheUse::None => DigestCache::default(),
    };
    timings.load = t.elapsed();

    let t = Instant::now();
    let out = full_walk(spec, &old, &timings.stats)?;
    timings.walk = t.elapsed();

    let t = Instant::now();
    let mut entries = out.entries;
    entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    let id = build_id(spec.recipe, entries.iter());
    let bytes = entries.iter().map(|e| e.size).sum();
    let changed = changed_paths(&old, &entries);
    timings.id = t.elapsed();

    let t = Instant::now();
    if cache_use == CacheUse::Persist && out.cache != old {
        // A cache that cannot be written only costs speed next time.
        let _ = out.cache.save(&cache_path);
    }
    timings.save = t.elapsed();

    Ok(TreeHash {
        id,
        entries,
        bytes,
        warnings: out.warnings,
        changed,
        timings,
    })
}

/// Walks the whole tree of `spec`, trusting `old` where the racy rule allows.
fn full_walk(
    spec: &HashSpec,
    old: &DigestCache,
    stats: &Stats,
) -> Result<walk::WalkOutput, HashError> {
    let top = rules::Level::top(spec.ignore_root, spec.root, spec.ignore);
    walk::Walker::new(spec.root, old, &spec.exclude, stats).run(top)
}

/// Paths whose digest differs from the cache's, and cached paths that are gone.
fn changed_paths(old: &DigestCache, entries: &[Entry]) -> Vec<String> {
    if old.files.is_empty() {
        return Vec::new();
    }
    let mut changed: Vec<String> = entries
        .iter()
        .filter(|e| e.kind != Kind::Symlink)
        .filter(|e| old.files.get(&e.path).is_none_or(|r| r.digest != e.digest))
        .map(|e| String::from_utf8_lossy(&e.path).into_owned())
        .collect();
    let present: rustc_hash::FxHashSet<&[u8]> = entries.iter().map(|e| &*e.path).collect();
    changed.extend(
        old.files
            .keys()
            .filter(|p| !present.contains(&***p))
            .map(|p| String::from_utf8_lossy(p).into_owned()),
    );
    changed.sort();
    changed
}

/// The build id of `entries`, sorted by path, built by `recipe`.
pub fn build_id<'e>(
    recipe: Option<Recipe>,
    entries: impl ExactSizeIterator<Item = &'e Entry>,
) -> BuildId {
    fn field(h: &mut Xxh3, b: &[u8]) {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    }
    let mut h = Xxh3::new();
    h.update(FORMAT_VERSION);
    match recipe {
        Some(r) => {
            h.update(&(r.steps.len() as u64).to_le_bytes());
            for s in r.steps {
                field(&mut h, s.as_bytes());
            }
            h.update(&(r.env.len() as u64).to_le_bytes());
            for (k, v) in r.env {
                field(&mut h, k.as_bytes());
                field(&mut h, v.as_bytes());
            }
        }
        None => h.update(&u64::MAX.to_le_bytes()),
    }
    h.update(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        field(&mut h, &e.path);
        h.update(&[e.kind.tag()]);
        if let Some(t) = &e.target {
            field(&mut h, t);
        }
        h.update(&e.digest.to_le_bytes());
    }
    BuildId(h.digest128())
}
