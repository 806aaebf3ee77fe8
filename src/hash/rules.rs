//! Ignore rules: which entries of a directory take part in the tree.
//!
//! The files hashed are those git would not ignore if the ignore root (the manifest's
//! directory) were the root of a fresh repository: `.gitignore` and `.ignore` files from there
//! down, deeper files overriding shallower ones and `.ignore` overriding `.gitignore` at the
//! same level. Global excludes and `.git/info/exclude` are never read. A few names never count
//! whatever the files say, so that a build can never trigger itself.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ignore::Match;
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use xxhash_rust::xxh3::Xxh3;

/// Ignore file names, in order of precedence within one directory.
pub const IGNORE_FILES: [&str; 2] = [".ignore", ".gitignore"];

/// Names that never take part in hashing or watching, at any depth.
pub fn always_excluded(name: &[u8]) -> bool {
    matches!(name, b".git" | b".build" | b".run" | b".pmesh")
        || name.starts_with(b".build-")
        || name.starts_with(b".run.tmp-")
}

/// The ignore rules in force in one directory: its own ignore files and its parent's rules.
pub struct Level {
    /// Absolute path of the directory.
    dir: PathBuf,
    parent: Option<Arc<Level>>,
    /// Which of [`IGNORE_FILES`] exist in `dir`.
    present: [bool; 2],
    /// A digest of every rule in force here, used to tell whether a cached listing is still
    /// filtered the same way.
    pub fingerprint: u128,
    /// The compiled matchers of this directory's own files, built only when needed.
    compiled: OnceLock<Vec<Gitignore>>,
    /// The manifest's extra patterns, shared by every level.
    extra: Option<Arc<Gitignore>>,
}

impl Level {
    /// The top level of a walk: the manifest's extra patterns (rooted at the service root) and
    /// the ignore files of the directories from `ignore_root` down to the service `root`.
    pub fn top(ignore_root: &Path, root: &Path, extra: &[String]) -> Arc<Level> {
        let mut h = Xxh3::new();
        h.update(b"pmesh-dev ignore v1\0");
        let extra_gi = if extra.is_empty() {
            None
        } else {
            let mut b = GitignoreBuilder::new(root);
            for p in extra {
                h.update(p.as_bytes());
                h.update(b"\0");
                // Patterns were checked when the manifest was loaded.
                let _ = b.add_line(None, p);
            }
            b.build().ok().map(Arc::new)
        };
        let base = Arc::new(Level {
            dir: root.to_path_buf(),
            parent: None,
            present: [false; 2],
            fingerprint: h.digest128(),
            compiled: OnceLock::from(Vec::new()),
            extra: extra_gi,
        });
        // Ancestors between the ignore root and the service root (exclusive) apply too.
        let mut chain = base;
        if let Ok(rel) = root.strip_prefix(ignore_root) {
            let mut dir = ignore_root.to_path_buf();
            let mut ancestors = vec![dir.clone()];
            let comps: Vec<_> = rel.components().collect();
            for c in comps.iter().take(comps.len().saturating_sub(1)) {
                dir.push(c);
                ancestors.push(dir.clone());
            }
            if comps.is_empty() {
                ancestors.clear();
            }
            for a in ancestors {
                let mut digests = [None; 2];
                for (i, f) in IGNORE_FILES.iter().enumerate() {
                    if let Ok(bytes) = std::fs::read(a.join(f)) {
                        digests[i] = Some(xxhash_rust::xxh3::xxh3_128(&bytes));
                    }
                }
                chain = Level::child(&chain, a, digests);
            }
        }
        chain
    }

    /// The rules of directory `dir` below `parent`; `digests` holds the content digests of
    /// its ignore files that exist.
    pub fn child(parent: &Arc<Level>, dir: PathBuf, digests: [Option<u128>; 2]) -> Arc<Level> {
        let present = [digests[0].is_some(), digests[1].is_some()];
        if present == [false, false] {
            // No rules of its own: the parent's rules are this directory's, and sharing them
            // keeps one small allocation per ignore file instead of one per directory.
            return parent.clone();
        }
        let fingerprint = {
            let mut h = Xxh3::new();
            h.update(&parent.fingerprint.to_le_bytes());
            for d in digests {
                h.update(&d.unwrap_or(0).to_le_bytes());
                h.update(&[u8::from(d.is_some())]);
            }
            h.digest128()
        };
        Arc::new(Level {
            dir,
            parent: Some(parent.clone()),
            present,
            fingerprint,
            compiled: OnceLock::new(),
            extra: parent.extra.clone(),
        })
    }

    fn matchers(&self) -> &[Gitignore] {
        self.compiled.get_or_init(|| {
            IGNORE_FILES
                .iter()
                .zip(self.present)
                .filter(|(_, p)| *p)
                .filter_map(|(name, _)| {
                    let mut b = GitignoreBuilder::new(&self.dir);
                    // A malformed line is skipped, as git does; the rest of the file applies.
                    let _ = b.add(self.dir.join(name));
                    b.build().ok()
                })
                .collect()
        })
    }

    /// Whether `path` (absolute, inside this level's directory) is ignored.
    pub fn is_ignored(&self, path: &Path, is_dir: bool) -> bool {
        if let Some(gi) = &self.extra
            && gi.matched(path, is_dir).is_ignore()
        {
            // The manifest's own patterns win over any negation in the ignore files.
            return true;
        }
        let mut level = Some(self);
        while let Some(l) = level {
            for gi in l.matchers() {
                match gi.matched(path, is_dir) {
                    Match::Ignore(_) => return true,
                    Match::Whitelist(_) => return false,
                    Match::None => {}
                }
            }
            level = l.parent.as_deref();
        }
        false
    }
}
