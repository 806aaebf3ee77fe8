//! Ignore rules: which entries of a directory take part in the tree.
//!
//! The files hashed are those git would not ignore if the ignore root (the manifest's
//! directory) were the root of a fresh repository: `.gitignore` and `.ignore` files from there
//! down, deeper files overriding shallower ones and `.ignore` overriding `.gitignore` at the
//! same level. Global excludes and `.git/info/exclude` are never read. A few names never count
//! whatever the files say, so that a build can never trigger itself.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ignore::Match;
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use rustc_hash::FxHashMap;
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
    /// The content digests of the directory's own [`IGNORE_FILES`] that exist.
    digests: [Option<u128>; 2],
    /// A digest of every rule in force here, used to tell whether a cached listing is still
    /// filtered the same way.
    pub fingerprint: u128,
    /// The compiled matchers of this directory's own files, built only when needed.
    compiled: OnceLock<Vec<Arc<Gitignore>>>,
    shared: Arc<Shared>,
}

/// What every level of a walk shares.
struct Shared {
    /// The manifest's extra patterns, and the service root they are relative to.
    extra: Option<(Gitignore, PathBuf)>,
    /// Matchers by ignore file name and content: a tree often holds many copies of the same
    /// ignore file, and a matcher does not depend on where its file is (see [`below`]).
    compiled: Mutex<FxHashMap<(usize, u128), Arc<Gitignore>>>,
}

/// `path` relative to `dir`, if it is below it. Matchers are built with `.` as their root
/// and given paths relative to their own directory: the same match as with the directory as
/// root and an absolute path, without comparing the two at every call.
fn below<'p>(path: &'p [u8], dir: &[u8]) -> Option<&'p [u8]> {
    let rest = path.strip_prefix(dir)?;
    if !dir.ends_with(b"/") && !rest.starts_with(b"/") {
        return None;
    }
    let start = rest.iter().position(|&b| b != b'/')?;
    Some(&rest[start..])
}

fn as_path(b: &[u8]) -> &Path {
    Path::new(std::ffi::OsStr::from_bytes(b))
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
            let mut b = GitignoreBuilder::new(".");
            for p in extra {
                h.update(p.as_bytes());
                h.update(b"\0");
                // Patterns were checked when the manifest was loaded.
                let _ = b.add_line(None, p);
            }
            b.build().ok().map(|gi| (gi, root.to_path_buf()))
        };
        let base = Arc::new(Level {
            dir: root.to_path_buf(),
            parent: None,
            digests: [None; 2],
            fingerprint: h.digest128(),
            compiled: OnceLock::from(Vec::new()),
            shared: Arc::new(Shared {
                extra: extra_gi,
                compiled: Mutex::default(),
            }),
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
        if digests == [None, None] {
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
            digests,
            fingerprint,
            compiled: OnceLock::new(),
            shared: parent.shared.clone(),
        })
    }

    fn matchers(&self) -> &[Arc<Gitignore>] {
        self.compiled.get_or_init(|| {
            let mut out = Vec::new();
            for (i, name) in IGNORE_FILES.iter().enumerate() {
                let Some(digest) = self.digests[i] else {
                    continue;
                };
                let key = (i, digest);
                let shared = || {
                    self.shared
                        .compiled
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                };
                if let Some(gi) = shared().get(&key) {
                    out.push(gi.clone());
                    continue;
                }
                let path = self.dir.join(name);
                let Ok(bytes) = std::fs::read(&path) else {
                    continue;
                };
                let Some(gi) = compile(&bytes, &path).map(Arc::new) else {
                    continue;
                };
                // Shared only if it is the content that was digested (it may have changed
                // since).
                if xxhash_rust::xxh3::xxh3_128(&bytes) == digest {
                    shared().insert(key, gi.clone());
                }
                out.push(gi);
            }
            out
        })
    }

    /// Whether `path` (absolute, inside this level's directory) is ignored.
    pub fn is_ignored(&self, path: &Path, is_dir: bool) -> bool {
        let bytes = path.as_os_str().as_bytes();
        let rel_to =
            |dir: &Path| as_path(below(bytes, dir.as_os_str().as_bytes()).unwrap_or(bytes));
        if let Some((gi, root)) = &self.shared.extra
            && gi.matched(rel_to(root), is_dir).is_ignore()
        {
            // The manifest's own patterns win over any negation in the ignore files.
            return true;
        }
        let mut level = Some(self);
        while let Some(l) = level {
            let matchers = l.matchers();
            if !matchers.is_empty() {
                let rel = rel_to(&l.dir);
                for gi in matchers {
                    match gi.matched(rel, is_dir) {
                        Match::Ignore(_) => return true,
                        Match::Whitelist(_) => return false,
                        Match::None => {}
                    }
                }
            }
            level = l.parent.as_deref();
        }
        false
    }
}

/// Compiles the ignore file `path` whose content is `bytes`, the way
/// `GitignoreBuilder::add` reads a file: line by line (`\n` or `\r\n`), a UTF-8 byte order
/// mark dropped from the first line, lines that are not UTF-8 skipped, malformed patterns
/// skipped (as git does) while the rest of the file applies.
fn compile(bytes: &[u8], path: &Path) -> Option<Gitignore> {
    let mut b = GitignoreBuilder::new(".");
    let mut rest = bytes;
    let mut first = true;
    while !rest.is_empty() {
        let line = match rest.iter().position(|&c| c == b'\n') {
            Some(n) => {
                let line = &rest[..n];
                rest = &rest[n + 1..];
                line.strip_suffix(b"\r").unwrap_or(line)
            }
            None => std::mem::take(&mut rest),
        };
        if let Ok(line) = std::str::from_utf8(line) {
            let line = if first {
                line.trim_start_matches('\u{feff}')
            } else {
                line
            };
            let _ = b.add_line(Some(path.to_path_buf()), line);
        }
        first = false;
    }
    b.build().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_strips_whole_components_only() {
        assert_eq!(below(b"/a/b/c", b"/a/b"), Some(&b"c"[..]));
        assert_eq!(below(b"/a/b/c/d", b"/a/b/"), Some(&b"c/d"[..]));
        assert_eq!(below(b"/a/bc", b"/a/b"), None);
        assert_eq!(below(b"/a/b", b"/a/b"), None);
    }

    #[test]
    fn compiles_like_reading_the_file() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join(".gitignore");
        let content: &[u8] = b"\xef\xbb\xbf*.a\r\n\xff\xfe.b\n[z\n  *.c\n*.d\r";
        std::fs::write(&path, content).unwrap();
        let mut b = GitignoreBuilder::new(".");
        let _ = b.add(&path);
        let by_file = b.build().unwrap();
        let by_bytes = compile(content, &path).unwrap();
        for name in [
            "x.a",
            "x.b",
            ".b",
            "z",
            "  x.c",
            "x.c",
            "x.d",
            "x.d\r",
            "\u{feff}*.a",
        ] {
            assert_eq!(
                by_file.matched(name, false).is_ignore(),
                by_bytes.matched(name, false).is_ignore(),
                "{name:?}"
            );
        }
        assert_eq!(by_file.len(), by_bytes.len());
    }

    #[test]
    fn matching_below_a_level_is_as_with_absolute_roots() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("sub/deep")).unwrap();
        std::fs::write(root.join(".gitignore"), "*.log\n/anchored\nbuild/\n").unwrap();
        std::fs::write(root.join("sub/.gitignore"), "!keep.log\n/only-here\n").unwrap();
        let digest = |p: &Path| Some(xxhash_rust::xxh3::xxh3_128(&std::fs::read(p).unwrap()));
        let top = Level::top(root, root, &["*.tmp".to_owned()]);
        let l0 = Level::child(
            &top,
            root.to_path_buf(),
            [None, digest(&root.join(".gitignore"))],
        );
        let sub = root.join("sub");
        let l1 = Level::child(&l0, sub.clone(), [None, digest(&sub.join(".gitignore"))]);
        let cases: [(&Level, PathBuf, bool, bool); 9] = [
            (&l0, root.join("x.log"), false, true),
            (&l0, root.join("anchored"), false, true),
            (&l1, sub.join("anchored"), false, false),
            (&l0, root.join("build"), true, true),
            (&l0, root.join("build"), false, false),
            (&l1, sub.join("keep.log"), false, false),
            (&l1, sub.join("deep/x.log"), false, true),
            (&l1, sub.join("only-here"), false, true),
            (&l1, sub.join("a.tmp"), false, true),
        ];
        for (level, path, is_dir, want) in cases {
            assert_eq!(level.is_ignored(&path, is_dir), want, "{}", path.display());
        }
    }
}
