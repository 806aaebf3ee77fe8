//! A tree held in memory while watching: events name paths, only those are read again, and the
//! build id is recomputed from the entries held, without a walk.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustc_hash::FxHashSet;
use xxhash_rust::xxh3::Xxh3;

use super::cache::DigestCache;
use super::rules::{IGNORE_FILES, Level, always_excluded};
use super::walk::{self, DirHook, Stats, WalkOutput};
use super::{BuildId, CACHE_FILE, HashError, HashSpec, IdHasher, Recipe};

mod dirs;
mod entries;
use dirs::Dirs;
use entries::SortedEntries;

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
    /// Of `changed`, the paths that had no entry before and have one now (from [`LiveTree::apply`]
    /// only): a later update that finds one gone again can tell it never took part.
    pub added: Vec<String>,
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
    dirs: Dirs,
    /// Digests and listings, persisted for the next start.
    cache: DigestCache,
    cache_dirty: bool,
    id: BuildId,
    /// The id's hash state before entry `i * CHECKPOINT_EVERY`, for each `i`, as of the last
    /// computation; valid while the number of entries stays `checkpointed`.
    checkpoints: Vec<Xxh3>,
    checkpointed: usize,
}

/// Entries between two kept states of the id's hash: after an edit the id is hashed again from
/// the last state before the edited entry, not from the first entry (about half the work on
/// average; ~50 states of a few hundred bytes for 100k entries).
const CHECKPOINT_EVERY: usize = 2048;

impl LiveTree {
    /// Walks the whole tree, trusting the persisted digest cache where the racy rule allows.
    pub fn scan(spec: &HashSpec) -> Result<(LiveTree, Vec<String>), HashError> {
        LiveTree::scan_hooked(spec, None)
    }

    /// [`LiveTree::scan`], telling `hook` of each directory before the walk looks at it.
    pub fn scan_hooked(
        spec: &HashSpec,
        hook: Option<&dyn DirHook>,
    ) -> Result<(LiveTree, Vec<String>), HashError> {
        let cache = DigestCache::load(&spec.root.join(CACHE_FILE));
        let cold = cache.is_empty();
        let mut tree = LiveTree {
            root: spec.root.to_path_buf(),
            ignore_root: spec.ignore_root.to_path_buf(),
            ignore: spec.ignore.to_vec(),
            exclude: spec.exclude.clone(),
            recipe: spec.recipe.map(|r| (r.steps.to_vec(), r.env.clone())),
            entries: SortedEntries::default(),
            dirs: Dirs::default(),
            cache,
            cache_dirty: false,
            id: BuildId(0),
            checkpoints: Vec::new(),
            checkpointed: 0,
        };
        let mut out = tree.walk_all(hook)?;
        let warnings = std::mem::take(&mut out.warnings);
        // Nothing to compare with: the walk's result is taken as it is.
        tree.install(out);
        if cold {
            // The first watch of a checkout made every record on the heap, where they would
            // stay until the first save (the RSS of a cold start was twice a warm one's):
            // written now, the file takes their place, mapped, as after any save.
            tree.save_cache();
        }
        Ok((tree, warnings))
    }

    fn walk_all(&self, hook: Option<&dyn DirHook>) -> Result<WalkOutput, HashError> {
        let stats = Stats::default();
        let top = Level::top(&self.ignore_root, &self.root, &self.ignore);
        walk::Walker::new(&self.root, &self.cache, &self.exclude, &stats)
            .hook(hook)
            .run(top)
    }

    /// Takes a full walk's result as the tree, with its entries sorted.
    fn install(&mut self, out: WalkOutput) {
        self.dirs = Dirs::from_walk(out.dirs);
        self.entries = SortedEntries::from_sorted(&out.entries, &self.dirs);
        drop(out.entries);
        if self.cache.absorb(out.cache) {
            self.cache_dirty = true;
        }
        // The walk read every record of the loaded file; until the next walk only a few are.
        self.cache.release_pages();
        self.id = self.compute_id(0);
    }

    /// Takes a full walk's result as the tree; returns the change from the previous tree.
    fn replace(&mut self, out: WalkOutput) -> Change {
        let mut change = Change::default();
        // Both in path order: one merge finds what was added, changed and removed.
        let fresh = &out.entries;
        let mut next = 0;
        self.entries.for_each_from(0, &self.dirs, |_, old| {
            while next < fresh.len() && *fresh[next].path < *old.path {
                change.changed.push(lossy(&fresh[next].path));
                next += 1;
            }
            if next < fresh.len() && *fresh[next].path == *old.path {
                if fresh[next].as_ref() != old {
                    change.changed.push(lossy(old.path));
                }
                next += 1;
            } else {
                change.changed.push(lossy(old.path));
            }
        });
        change
            .changed
            .extend(fresh[next..].iter().map(|e| lossy(&e.path)));
        let old_dirs: FxHashSet<Vec<u8>> = self.dirs.paths().collect();
        self.install(out);
        let mut kept = FxHashSet::default();
        for d in self.dirs.paths() {
            if old_dirs.contains(&d) {
                kept.insert(d);
            } else {
                change.watch.push(self.abs(&d));
            }
        }
        for d in &old_dirs {
            if !kept.contains(d) {
                change.unwatch.push(self.abs(d));
            }
        }
        change
    }

    /// The id, given that the entries before index `from` are as they were at the last
    /// computation.
    fn compute_id(&mut self, from: usize) -> BuildId {
        let count = self.entries.len();
        if count != self.checkpointed {
            // The count is hashed before the entries: no state kept is valid.
            self.checkpoints.clear();
        }
        let k = (from / CHECKPOINT_EVERY).min(self.checkpoints.len().saturating_sub(1));
        let mut h = match self.checkpoints.get(k) {
            Some(state) => IdHasher::resume(state.clone()),
            None => {
                let recipe = self
                    .recipe
                    .as_ref()
                    .map(|(steps, env)| Recipe { steps, env });
                IdHasher::new(recipe, count)
            }
        };
        self.checkpoints.truncate(k);
        let start = k * CHECKPOINT_EVERY;
        let checkpoints = &mut self.checkpoints;
        self.entries.for_each_from(start, &self.dirs, |i, e| {
            if i % CHECKPOINT_EVERY == 0 {
                checkpoints.push(h.checkpoint());
            }
            h.entry(e);
        });
        if self.checkpoints.len() <= k {
            // No entry at or after `start` (an empty tree): the state before them all.
            self.checkpoints.push(h.checkpoint());
        }
        self.checkpointed = count;
        h.finish()
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

    /// Whether the path `rel` (relative, `/`) is an entry of the tree.
    pub fn has_entry(&self, rel: &str) -> bool {
        self.entries.get(rel.as_bytes(), &self.dirs).is_some()
    }

    /// How many directories take part.
    pub fn dirs(&self) -> usize {
        self.dirs.len()
    }

    /// Every directory that takes part, absolute.
    pub fn dir_paths(&self) -> impl ExactSizeIterator<Item = PathBuf> + '_ {
        self.dirs.paths().map(|d| self.abs(&d))
    }

    /// Whether the directory `path` (absolute) takes part.
    pub fn has_dir(&self, path: &Path) -> bool {
        path.strip_prefix(&self.root)
            .is_ok_and(|rel| self.dirs.contains(rel.as_os_str().as_bytes()))
    }

    /// Whether `path` is the root or inside a directory of the tree and not excluded by a fixed
    /// rule: the events worth reading. Ignore rules are applied by [`LiveTree::apply`].
    pub fn concerns(&self, path: &Path) -> bool {
        let Ok(rel) = path.strip_prefix(&self.root) else {
            return false;
        };
        !rel.components()
            .any(|c| always_excluded(c.as_os_str().as_bytes()))
            && !self.exclude.iter().any(|x| x == path)
    }

    /// Re-reads exactly `paths` (never trusting the cache for them), walks new directories, and
    /// recomputes the id. An edited ignore file makes it filter the whole tree again.
    pub fn apply(&mut self, paths: &[PathBuf]) -> Result<Change, HashError> {
        let mut change = Change::default();
        let mut changed = BTreeSet::new();
        let mut added: Vec<Box<[u8]>> = Vec::new();
        let mut rules = false;
        let mut whole = false;
        for p in paths {
            if !self.concerns(p) {
                continue;
            }
            let Ok(rel) = p.strip_prefix(&self.root) else {
                continue;
            };
            if rel.as_os_str().is_empty() {
                // The root named alone: everything is read again, below.
                whole = true;
                continue;
            }
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
                if level.is_ignored(p, true) {
                    continue;
                }
                if self.dirs.contains(&rel_b) {
                    // A directory named again: another one renamed into its place, or a
                    // watcher that coalesced what happened in it (FSEvents) or a poll.
                    self.reread(&rel_b, p, level, &mut changed, &mut added, &mut change)?;
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
                // Directories first (the walk has parents before children): entries name
                // theirs by slot.
                for (d, l, _) in out.dirs {
                    change.watch.push(self.abs(&d));
                    self.dirs.insert(&d, l);
                }
                for e in out.entries {
                    self.entries.insert(&e, &self.dirs);
                    added.push(e.path.clone());
                    changed.insert(e.path);
                }
                self.cache.absorb(out.cache);
                change.warnings.extend(out.warnings);
                self.cache_dirty = true;
                continue;
            }
            if self.dirs.contains(&rel_b) {
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
                    let old = self.entries.get(&rel_b, &self.dirs);
                    if old != Some(e.as_ref()) {
                        if old.is_none() {
                            added.push(rel_b.clone());
                        }
                        changed.insert(rel_b.clone());
                        self.entries.insert(&e, &self.dirs);
                    }
                }
                None => self.remove(&rel_b, &mut changed, &mut change.unwatch),
            }
        }
        if rules || whole {
            let mut full = self.rescan()?;
            full.rules_reloaded = rules;
            full.changed.extend(changed.iter().map(|p| lossy(p)));
            full.changed.sort();
            full.changed.dedup();
            full.warnings.extend(change.warnings);
            // What this update's own reads found: the walk compared with the tree they left.
            let dirs = &self.dirs;
            (change.watch).retain(|d| {
                d.strip_prefix(&self.root)
                    .is_ok_and(|r| dirs.contains(r.as_os_str().as_bytes()))
            });
            full.watch.extend(change.watch);
            full.unwatch.extend(change.unwatch);
            return Ok(full);
        }
        // A path that came and went within this update never took part.
        for p in &added {
            if self.entries.get(p, &self.dirs).is_none() {
                changed.remove(p);
            }
        }
        change.added = (added.iter())
            .filter(|p| changed.contains(*p))
            .map(|p| lossy(p))
            .collect();
        change.changed = changed.iter().map(|p| lossy(p)).collect();
        let from = changed
            .iter()
            .map(|p| self.entries.position(p, &self.dirs))
            .min()
            .unwrap_or(self.entries.len());
        if !changed.is_empty() {
            self.id = self.compute_id(from);
        }
        Ok(change)
    }

    /// Reads the directory `rel` (at `abs`, taking part already) and everything below it again
    /// through the cache, which vouches only for what kept its stat; adds what changed to
    /// `changed` and `change`. Every directory below is watched again: one renamed into the
    /// place of another brings its own subdirectories, whose watches name their old paths.
    fn reread(
        &mut self,
        rel: &[u8],
        abs: &Path,
        parent: std::sync::Arc<Level>,
        changed: &mut BTreeSet<Box<[u8]>>,
        added: &mut Vec<Box<[u8]>>,
        change: &mut Change,
    ) -> Result<(), HashError> {
        let stats = Stats::default();
        let out = walk::Walker::new(&self.root, &self.cache, &self.exclude, &stats).run_at(
            rel.to_vec(),
            abs.to_path_buf(),
            parent,
        )?;
        let mut prefix = rel.to_vec();
        prefix.push(b'/');
        let fresh: FxHashSet<&[u8]> = out.entries.iter().map(|e| &*e.path).collect();
        for e in &out.entries {
            match self.entries.get(&e.path, &self.dirs) {
                Some(old) if old == e.as_ref() => {}
                Some(_) => {
                    changed.insert(e.path.clone());
                }
                None => {
                    changed.insert(e.path.clone());
                    added.push(e.path.clone());
                }
            }
        }
        for gone in self.entries.remove_below(&prefix, &self.dirs) {
            if !fresh.contains(&*gone) {
                changed.insert(gone);
            }
        }
        drop(fresh);
        // Entries name their directories by slot: those below go after their entries, and
        // come back before them.
        let fresh: FxHashSet<&[u8]> = out.dirs.iter().map(|(d, ..)| &**d).collect();
        for gone in self.dirs.remove_below(rel) {
            if !fresh.contains(&*gone) {
                change.unwatch.push(self.abs(&gone));
            }
        }
        drop(fresh);
        // Parents before children, as the walk has them.
        for (d, l, _) in out.dirs {
            change.watch.push(self.abs(&d));
            self.dirs.insert(&d, l);
        }
        for e in &out.entries {
            self.entries.insert(e, &self.dirs);
        }
        self.cache.absorb(out.cache);
        change.warnings.extend(out.warnings);
        self.cache_dirty = true;
        Ok(())
    }

    /// Walks the whole tree again through the cache: after a rescan event, a queue overflow,
    /// a rules change, or as a poll.
    pub fn rescan(&mut self) -> Result<Change, HashError> {
        let out = self.walk_all(None)?;
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
        if self.entries.remove(rel, &self.dirs) {
            changed.insert(rel.into());
        }
        if !self.dirs.contains(rel) {
            return;
        }
        // The entries first: they name their directories by slot.
        let mut prefix = rel.to_vec();
        prefix.push(b'/');
        for k in self.entries.remove_below(&prefix, &self.dirs) {
            changed.insert(k);
        }
        for d in self.dirs.remove(rel) {
            unwatch.push(self.abs(&d));
        }
    }

    /// Writes the digest cache if it changed, dropping records of paths no longer in the tree.
    pub fn save_cache(&mut self) {
        if !self.cache_dirty {
            return;
        }
        let dirs = &self.dirs;
        self.cache.retain(|k| dirs.contains(k));
        let path = self.root.join(CACHE_FILE);
        if self.cache.save(&path).is_ok() {
            self.cache_dirty = false;
            // The records made since the load live on the heap; the file just written holds
            // them all, so it takes their place (mapped, its pages handed back). Anything else
            // that replaced the file meanwhile holds records validated against the files'
            // stats just the same.
            let saved = DigestCache::load(&path);
            if saved.len() == self.cache.len() {
                self.cache = saved;
                self.cache.release_pages();
            }
        }
    }
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The id of the tree as a fresh scan sees it.
    fn fresh_id(root: &Path) -> BuildId {
        LiveTree::scan(&HashSpec::dir(root)).unwrap().0.id()
    }

    #[test]
    fn the_id_after_edits_is_the_id_of_a_fresh_scan() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // Enough entries for several checkpoints, in a few directories.
        let files = 3 * CHECKPOINT_EVERY + 100;
        for d in 0..4 {
            std::fs::create_dir(root.join(format!("d{d}"))).unwrap();
        }
        let path = |i: usize| root.join(format!("d{}/f{i:05}.txt", i % 4));
        for i in 0..files {
            std::fs::write(path(i), format!("{i}")).unwrap();
        }
        let (mut tree, _) = LiveTree::scan(&HashSpec::dir(root)).unwrap();
        assert_eq!(tree.files(), files);

        // Modified near the end, in the middle, at the very start; then one added, one
        // removed, and two at once.
        let edits: Vec<Box<dyn Fn() -> Vec<PathBuf>>> = vec![
            Box::new(|| {
                std::fs::write(path(files - 1), "last").unwrap();
                vec![path(files - 1)]
            }),
            Box::new(|| {
                std::fs::write(path(files / 2), "middle").unwrap();
                vec![path(files / 2)]
            }),
            Box::new(|| {
                std::fs::write(path(0), "first").unwrap();
                vec![path(0)]
            }),
            Box::new(|| {
                std::fs::write(root.join("d1/new.txt"), "new").unwrap();
                vec![root.join("d1/new.txt")]
            }),
            Box::new(|| {
                std::fs::remove_file(path(7)).unwrap();
                vec![path(7)]
            }),
            Box::new(|| {
                std::fs::write(path(9), "nine").unwrap();
                std::fs::write(path(5000), "five thousand").unwrap();
                vec![path(5000), path(9)]
            }),
        ];
        let mut ids = vec![tree.id()];
        for edit in edits {
            let paths = edit();
            let change = tree.apply(&paths).unwrap();
            assert!(!change.changed.is_empty());
            assert_eq!(tree.id(), fresh_id(root));
            ids.push(tree.id());
        }
        ids.dedup();
        assert_eq!(ids.len(), 7, "every edit changed the id");
    }
}

#[cfg(test)]
mod random_edits {
    use super::*;

    /// Every entry's path and digest, and every directory, of a tree.
    type Listing = (Vec<(Vec<u8>, u128)>, Vec<Vec<u8>>);

    fn listing(tree: &LiveTree) -> Listing {
        let mut entries = Vec::new();
        tree.entries.for_each_from(0, &tree.dirs, |_, e| {
            entries.push((e.path.to_vec(), e.digest))
        });
        let mut dirs: Vec<Vec<u8>> = tree.dirs.paths().collect();
        dirs.sort();
        (entries, dirs)
    }

    /// Random creations, edits, removals and renames of files and whole directories, each
    /// applied with the paths a watcher names: after each, the tree held is the one a fresh
    /// scan finds (entries, directories, id), whatever slots were freed and taken again.
    #[test]
    fn the_tree_after_random_edits_is_the_tree_of_a_fresh_scan() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let names = ["a", "b", "a.b", "a0", "src", "lib", "x-y", "z"];
        let mut dirs: Vec<PathBuf> = vec![root.clone()];
        for i in 0..40 {
            let parent = dirs[next(dirs.len())].clone();
            let d = parent.join(format!("{}{i}", names[next(names.len())]));
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("f.txt"), format!("{i}")).unwrap();
            dirs.push(d);
        }
        let (mut tree, _) = LiveTree::scan(&HashSpec::dir(&root)).unwrap();
        for round in 0..300 {
            let live: Vec<PathBuf> = dirs.iter().filter(|d| d.is_dir()).cloned().collect();
            let dir = live[next(live.len())].clone();
            let named: Vec<PathBuf> = match next(6) {
                0 | 1 => {
                    let f = dir.join(names[next(names.len())]);
                    if f.is_dir() {
                        continue;
                    }
                    std::fs::write(&f, format!("{round}")).unwrap();
                    vec![f]
                }
                2 => {
                    let d = dir.join(format!("{}{round}", names[next(names.len())]));
                    std::fs::create_dir(&d).unwrap();
                    std::fs::write(d.join("g"), "g").unwrap();
                    std::fs::create_dir(d.join("sub")).unwrap();
                    std::fs::write(d.join("sub/h"), "h").unwrap();
                    dirs.push(d.join("sub"));
                    dirs.push(d.clone());
                    vec![d]
                }
                3 if dir != root => {
                    std::fs::remove_dir_all(&dir).unwrap();
                    vec![dir]
                }
                4 if dir != root => {
                    let to = live[next(live.len())].join(format!("moved{round}"));
                    if to.starts_with(&dir) {
                        continue;
                    }
                    std::fs::rename(&dir, &to).unwrap();
                    dirs.push(to.clone());
                    vec![dir, to]
                }
                _ => {
                    let Some(f) = std::fs::read_dir(&dir)
                        .unwrap()
                        .map(|e| e.unwrap().path())
                        .find(|p| p.is_file())
                    else {
                        continue;
                    };
                    std::fs::remove_file(&f).unwrap();
                    vec![f]
                }
            };
            tree.apply(&named).unwrap();
            let (fresh, _) = LiveTree::scan(&HashSpec::dir(&root)).unwrap();
            assert!(
                listing(&tree) == listing(&fresh),
                "round {round}: {named:?}"
            );
            assert_eq!(tree.id(), fresh.id(), "round {round}");
        }
    }
}
