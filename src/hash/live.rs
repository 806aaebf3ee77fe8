//! A tree held in memory while watching: events name paths, only those are read again, and the
//! build id is recomputed from the entries held, without a walk.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::cache::DigestCache;
use super::rules::{IGNORE_FILES, Level, always_excluded};
use super::walk::{self, Stats, WalkOutput};
use super::{BuildId, CACHE_FILE, Entry, HashError, HashSpec, Recipe, build_id};

/// What one update found.
#[derive(Debug, Default)]
pub struct Change {
    /// Paths (relative, `/`) added, removed or with new content, kind or target; sorted.
    pub changed: Vec<String>,
    /// Directories that now take part and need a watch.
    pub watch: Vec<PathBuf>,
    /// Directories that no longer take part.
    pub unwatch: Vec<PathBuf>,
    pub warnings: Vec<String>,
    /// An ignore file changed, so the whole tree was filtered again.
    pub rules_reloaded: bool,
}

/// The hashed tree of one service, kept current by [`LiveTree::apply`].
pub struct LiveTree {
    root: PathBuf,
    ignore_root: PathBuf,
    ignore: Vec<String>,
    exclude: Vec<PathBuf>,
    recipe: Option<(Vec<String>, BTreeMap<String, String>)>,
    /// Entries sorted by relative path: the id's order.
    entries: SortedEntries,
    /// Every directory that takes part, with the rules in force in it.
    dirs: FxHashMap<Box<[u8]>, Arc<Level>>,
    /// Digests and listings, persisted for the next start.
    cache: DigestCache,
    cache_dirty: bool,
    id: BuildId,
}

impl LiveTree {
    /// Walks the whole tree, trusting the persisted digest cache where the racy rule allows.
    pub fn scan(spec: &HashSpec) -> Result<(LiveTree, Vec<String>), HashError> {
        let cache = DigestCache::load(&spec.root.join(CACHE_FILE));
        let mut tree = LiveTree {
            root: spec.root.to_path_buf(),
            ignore_root: spec.ignore_root.to_path_buf(),
            ignore: spec.ignore.to_vec(),
            exclude: spec.exclude.clone(),
            recipe: spec.recipe.map(|r| (r.steps.to_vec(), r.env.clone())),
            entries: SortedEntries::default(),
            dirs: FxHashMap::default(),
            cache,
            cache_dirty: false,
            id: BuildId(0),
        };
        let out = tree.walk_all()?;
        let warnings = out.warnings.clone();
        tree.replace(out);
        Ok((tree, warnings))
    }

    fn walk_all(&self) -> Result<WalkOutput, HashError> {
        let stats = Stats::default();
        let top = Level::top(&self.ignore_root, &self.root, &self.ignore);
        walk::Walker::new(&self.root, &self.cache, &self.exclude, &stats).run(top)
    }

    /// Takes a full walk's result as the tree; returns the change from the previous tree.
    fn replace(&mut self, out: WalkOutput) -> Change {
        let mut change = Change::default();
        let entries = SortedEntries::from_unsorted(out.entries);
        for e in entries.values() {
            let path = &e.path;
            if self.entries.get(path) != Some(e) {
                change.changed.push(lossy(path));
            }
        }
        for path in self.entries.keys() {
            if entries.get(path).is_none() {
                change.changed.push(lossy(path));
            }
        }
        change.changed.sort();
        let dirs: FxHashMap<_, _> = out.dirs.into_iter().collect();
        for d in dirs.keys() {
            if !self.dirs.contains_key(d) {
                change.watch.push(self.abs(d));
            }
        }
        for d in self.dirs.keys() {
            if !dirs.contains_key(d) {
                change.unwatch.push(self.abs(d));
            }
        }
        if self.cache.absorb(out.cache) {
            self.cache_dirty = true;
        }
        self.entries = entries;
        self.dirs = dirs;
        self.id = self.compute_id();
        change
    }

    fn compute_id(&self) -> BuildId {
        let recipe = self
            .recipe
            .as_ref()
            .map(|(steps, env)| Recipe { steps, env });
        build_id(recipe, self.entries.values())
    }

    fn abs(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(std::ffi::OsStr::from_bytes(rel))
        }
    }

    pub fn id(&self) -> BuildId {
        self.id
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How many entries the tree has.
    pub fn files(&self) -> usize {
        self.entries.len()
    }

    /// Every directory that takes part, absolute.
    pub fn dir_paths(&self) -> Vec<PathBuf> {
        self.dirs.keys().map(|d| self.abs(d)).collect()
    }

    /// Whether `path` is inside a directory of the tree and not excluded by a fixed rule: the
    /// events worth reading. Ignore rules are applied by [`LiveTree::apply`].
    pub fn concerns(&self, path: &Path) -> bool {
        let Ok(rel) = path.strip_prefix(&self.root) else {
            return false;
        };
        !rel.as_os_str().is_empty()
            && !rel
                .components()
                .any(|c| always_excluded(c.as_os_str().as_bytes()))
            && !self.exclude.iter().any(|x| x == path)
    }

    /// Re-reads exactly `paths` (never trusting the cache for them), walks new directories, and
    /// recomputes the id. An edited ignore file makes it filter the whole tree again.
    pub fn apply(&mut self, paths: &[PathBuf]) -> Result<Change, HashError> {
        let mut change = Change::default();
        let mut changed = BTreeSet::new();
        let mut rules = false;
        for p in paths {
            if !self.concerns(p) {
                continue;
            }
            let Ok(rel) = p.strip_prefix(&self.root) else {
                continue;
            };
            let rel_b: Box<[u8]> = rel.as_os_str().as_bytes().into();
            let name = rel.file_name().map_or(&b""[..], |n| n.as_bytes());
            if IGNORE_FILES.iter().any(|f| f.as_bytes() == name) {
                rules = true;
            }
            // The cache must never vouch for a path an event named.
            self.cache.forget(&rel_b);
            let parent: &[u8] = rel.parent().map_or(&b""[..], |r| r.as_os_str().as_bytes());
            let Some(level) = self.dirs.get(parent).cloned() else {
                // Its directory does not take part (ignored, or gone itself).
                continue;
            };
            let meta = match fs::symlink_metadata(p) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.remove(&rel_b, &mut changed, &mut change.unwatch);
                    continue;
                }
                Err(source) => {
                    return Err(HashError::Read {
                        path: p.clone(),
                        error: source,
                    });
                }
            };
            if meta.is_dir() {
                if self.dirs.contains_key(&rel_b) || level.is_ignored(p, true) {
                    continue;
                }
                self.remove(&rel_b, &mut changed, &mut change.unwatch);
                let stats = Stats::default();
                let empty = DigestCache::default();
                let out = walk::Walker::new(&self.root, &empty, &self.exclude, &stats).run_at(
                    rel_b.to_vec(),
                    p.clone(),
                    level,
                )?;
                for e in out.entries {
                    changed.insert(e.path.clone());
                    self.entries.insert(e);
                }
                for (d, l) in out.dirs {
                    change.watch.push(self.abs(&d));
                    self.dirs.insert(d, l);
                }
                self.cache.absorb(out.cache);
                change.warnings.extend(out.warnings);
                self.cache_dirty = true;
                continue;
            }
            if self.dirs.contains_key(&rel_b) {
                // A directory replaced by a file.
                self.remove(&rel_b, &mut changed, &mut change.unwatch);
            }
            if level.is_ignored(p, false) {
                self.remove(&rel_b, &mut changed, &mut change.unwatch);
                continue;
            }
            let walk::Fresh {
                entry,
                record,
                warnings,
            } = walk::digest_fresh(&self.root, &rel_b, p, &meta)?;
            change.warnings.extend(warnings);
            if let Some(r) = record {
                self.cache.insert_file(&rel_b, r);
            }
            self.cache_dirty = true;
            match entry {
                Some(e) => {
                    if self.entries.get(&rel_b) != Some(&e) {
                        changed.insert(rel_b.clone());
                        self.entries.insert(e);
                    }
                }
                None => self.remove(&rel_b, &mut changed, &mut change.unwatch),
            }
        }
        if rules {
            let mut full = self.rescan()?;
            full.rules_reloaded = true;
            full.changed.extend(changed.iter().map(|p| lossy(p)));
            full.changed.sort();
            full.changed.dedup();
            full.warnings.extend(change.warnings);
            return Ok(full);
        }
        change.changed = changed.iter().map(|p| lossy(p)).collect();
        self.id = self.compute_id();
        Ok(change)
    }

    /// Walks the whole tree again through the cache: after a rescan event, a queue overflow,
    /// a rules change, or as a poll.
    pub fn rescan(&mut self) -> Result<Change, HashError> {
        let out = self.walk_all()?;
        let warnings = out.warnings.clone();
        let mut change = self.replace(out);
        change.warnings = warnings;
        Ok(change)
    }

    /// Removes `rel` and, if it was a directory, everything below it.
    fn remove(
        &mut self,
        rel: &[u8],
        changed: &mut BTreeSet<Box<[u8]>>,
        unwatch: &mut Vec<PathBuf>,
    ) {
        if self.entries.remove(rel).is_some() {
            changed.insert(rel.into());
        }
        if self.dirs.remove(rel).is_none() {
            return;
        }
        unwatch.push(self.abs(rel));
        let mut prefix = rel.to_vec();
        prefix.push(b'/');
        for k in self.entries.remove_below(&prefix) {
            changed.insert(k);
        }
        let dirs: Vec<Box<[u8]>> = self
            .dirs
            .keys()
            .filter(|d| d.starts_with(&prefix))
            .cloned()
            .collect();
        for d in dirs {
            unwatch.push(self.abs(&d));
            self.dirs.remove(&d);
        }
    }

    /// Writes the digest cache if it changed, dropping records of paths no longer in the tree.
    pub fn save_cache(&mut self) {
        if !self.cache_dirty {
            return;
        }
        let dirs = &self.dirs;
        self.cache.retain(|k| dirs.contains_key(k));
        if self.cache.save(&self.root.join(CACHE_FILE)).is_ok() {
            self.cache_dirty = false;
        }
    }
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Entries kept sorted by path in one vector: the id is recomputed after every change, and a
/// contiguous pass over 100k entries is several times faster than walking a tree map's nodes.
/// Changes cost a binary search and a move of the tail (about a millisecond for 100k).
#[derive(Default)]
struct SortedEntries(Vec<Entry>);

impl SortedEntries {
    fn from_unsorted(mut v: Vec<Entry>) -> SortedEntries {
        v.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        SortedEntries(v)
    }

    fn find(&self, path: &[u8]) -> Result<usize, usize> {
        self.0.binary_search_by(|e| (*e.path).cmp(path))
    }

    fn get(&self, path: &[u8]) -> Option<&Entry> {
        self.find(path).ok().map(|i| &self.0[i])
    }

    /// Adds `e`, replacing the entry of the same path.
    fn insert(&mut self, e: Entry) {
        match self.find(&e.path) {
            Ok(i) => self.0[i] = e,
            Err(i) => self.0.insert(i, e),
        }
    }

    fn remove(&mut self, path: &[u8]) -> Option<Entry> {
        self.find(path).ok().map(|i| self.0.remove(i))
    }

    /// Removes every entry whose path starts with `prefix`; returns their paths.
    fn remove_below(&mut self, prefix: &[u8]) -> Vec<Box<[u8]>> {
        let start = self.0.partition_point(|e| *e.path < *prefix);
        let end = start + self.0[start..].partition_point(|e| e.path.starts_with(prefix));
        self.0.drain(start..end).map(|e| e.path).collect()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn values(&self) -> std::slice::Iter<'_, Entry> {
        self.0.iter()
    }

    fn keys(&self) -> impl Iterator<Item = &Box<[u8]>> {
        self.0.iter().map(|e| &e.path)
    }
}
