//! The parallel tree walk: list directories (or reuse their cached listings), stat every
//! entry, and read only the files whose cached digest cannot be trusted.

use std::cell::RefCell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use xxhash_rust::xxh3::{Xxh3, xxh3_128};

use super::cache::{DigestCache, DirRecord, EntryType, FileRecord, StatKey};
use super::rules::{IGNORE_FILES, Level, always_excluded};
use super::{Entry, HashError, Kind};

/// Counters that show where a hash spent its effort.
#[derive(Debug, Default)]
pub struct Stats {
    pub dirs_listed: AtomicU64,
    pub dirs_from_cache: AtomicU64,
    pub files_read: AtomicU64,
    pub files_from_cache: AtomicU64,
    pub bytes_read: AtomicU64,
}

/// What one walk found.
pub struct WalkOutput {
    /// Entries in no particular order.
    pub entries: Vec<Entry>,
    /// Every directory that takes part (relative path) with the rules in force in it.
    pub dirs: Vec<(Box<[u8]>, Arc<Level>)>,
    /// Everything worth caching for the next walk.
    pub cache: DigestCache,
    pub warnings: Vec<String>,
}

#[derive(Default)]
struct Collected {
    entries: Vec<Entry>,
    dirs: Vec<(Box<[u8]>, Arc<Level>)>,
    cache: DigestCache,
    warnings: Vec<String>,
    error: Option<HashError>,
}

impl Collected {
    fn absorb(&mut self, other: Collected) {
        self.entries.extend(other.entries);
        self.dirs.extend(other.dirs);
        self.cache.files.extend(other.cache.files);
        self.cache.dirs.extend(other.cache.dirs);
        self.warnings.extend(other.warnings);
        if self.error.is_none() {
            self.error = other.error;
        }
    }
}

pub struct Walker<'a> {
    pub root: &'a Path,
    pub old: &'a DigestCache,
    /// Absolute paths that never take part (the manifest itself).
    pub exclude: &'a [PathBuf],
    pub stats: &'a Stats,
    out: Mutex<Collected>,
}

/// Wall-clock nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
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

/// A directory's filtered entries: names and what they are.
type Listing = Vec<(Box<[u8]>, EntryType)>;

thread_local! {
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Files up to this size are read whole; larger ones are streamed.
const WHOLE_READ_LIMIT: u64 = 4 << 20;

fn digest_open_file(f: &mut File, size: u64) -> io::Result<u128> {
    if size <= WHOLE_READ_LIMIT {
        BUF.with(|b| {
            let mut b = b.borrow_mut();
            b.clear();
            f.read_to_end(&mut b)?;
            Ok(xxh3_128(&b))
        })
    } else {
        let mut h = Xxh3::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => h.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(h.digest128())
    }
}

/// What reading a file gave.
enum Read_ {
    /// The digest and the stat it belongs to; `stable` is false when the file kept changing
    /// while it was read, so the digest must not be cached.
    Digest {
        digest: u128,
        key: StatKey,
        stable: bool,
    },
    /// It is no longer a regular file.
    NotRegular,
}

fn read_digest(abs: &Path) -> io::Result<Read_> {
    let mut last = None;
    for _ in 0..3 {
        // O_NONBLOCK: a FIFO swapped in after the stat must never block the walk.
        let mut f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(abs)?;
        let before = f.metadata()?;
        if !before.is_file() {
            return Ok(Read_::NotRegular);
        }
        let before_key = StatKey::of(&before);
        let digest = digest_open_file(&mut f, before.size())?;
        let after = StatKey::of(&f.metadata()?);
        if after == before_key {
            return Ok(Read_::Digest {
                digest,
                key: before_key,
                stable: true,
            });
        }
        last = Some((digest, after));
    }
    let (digest, key) = last.unwrap_or_default();
    Ok(Read_::Digest {
        digest,
        key,
        stable: false,
    })
}

impl<'a> Walker<'a> {
    pub fn new(
        root: &'a Path,
        old: &'a DigestCache,
        exclude: &'a [PathBuf],
        stats: &'a Stats,
    ) -> Self {
        Walker {
            root,
            old,
            exclude,
            stats,
            out: Mutex::new(Collected::default()),
        }
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
        let meta = fs::symlink_metadata(&abs).map_err(|source| HashError::Read {
            path: abs.clone(),
            error: source,
        })?;
        let key = StatKey::of(&meta);
        rayon::scope(|s| {
            self.visit_dir(s, rel, abs, key, parent);
        });
        let out = self.out.into_inner().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = out.error {
            return Err(e);
        }
        Ok(WalkOutput {
            entries: out.entries,
            dirs: out.dirs,
            cache: out.cache,
            warnings: out.warnings,
        })
    }

    fn visit_dir<'s>(
        &'s self,
        scope: &rayon::Scope<'s>,
        rel: Vec<u8>,
        abs: PathBuf,
        key: StatKey,
        parent: Arc<Level>,
    ) {
        let mut local = Collected::default();
        let taken_ns = now_ns();
        let cached = self
            .old
            .dirs
            .get(rel.as_slice())
            .filter(|d| d.valid_for(&key));
        let mut ignore_files = Vec::new();
        let listing = match cached {
            Some(rec) => {
                let digests = self.ignore_digests(
                    &rel,
                    &abs,
                    rec.ignore_files,
                    &mut ignore_files,
                    &mut local,
                );
                let level = Level::child(&parent, abs.clone(), digests);
                if level.fingerprint == rec.rules {
                    self.stats.dirs_from_cache.fetch_add(1, Ordering::Relaxed);
                    local.cache.dirs.insert(rel.clone().into(), rec.clone());
                    Ok((level, rec.entries.clone()))
                } else {
                    self.list(
                        &rel,
                        &abs,
                        key,
                        taken_ns,
                        &parent,
                        &mut ignore_files,
                        &mut local,
                    )
                }
            }
            None => self.list(
                &rel,
                &abs,
                key,
                taken_ns,
                &parent,
                &mut ignore_files,
                &mut local,
            ),
        };
        let (level, entries) = match listing {
            Ok(l) => l,
            Err(source) => {
                local.error = Some(HashError::Read {
                    path: abs,
                    error: source,
                });
                self.merge(local);
                return;
            }
        };
        local.dirs.push((rel.as_slice().into(), level.clone()));
        for (name, ty) in entries {
            let child_rel = join_rel(&rel, &name);
            let child_abs = abs.join(std::ffi::OsStr::from_bytes(&name));
            if ty == EntryType::Other {
                local.warnings.push(format!(
                    "skipped {}: not a regular file, directory or symlink",
                    child_abs.display()
                ));
                continue;
            }
            if let Some((_, rec)) = ignore_files.iter().find(|(n, _)| **n == *name) {
                // An ignore file, already digested for the rules.
                local.entries.push(Entry {
                    kind: kind_of_mode(rec.key.mode),
                    size: rec.key.size,
                    digest: rec.digest,
                    target: None,
                    path: child_rel.into(),
                });
                continue;
            }
            let meta = match fs::symlink_metadata(&child_abs) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    local.error.get_or_insert(HashError::Read {
                        path: child_abs,
                        error: source,
                    });
                    continue;
                }
            };
            if meta.is_dir() {
                let level = level.clone();
                let k = StatKey::of(&meta);
                scope.spawn(move |s| self.visit_dir(s, child_rel, child_abs, k, level));
            } else {
                self.file(child_rel, &child_abs, &meta, &mut local);
            }
        }
        self.merge(local);
    }

    fn merge(&self, local: Collected) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        out.absorb(local);
    }

    /// Digests of the directory's ignore files (through the cache like any file), which are
    /// also kept in `done` so that the entries loop does not read them again.
    fn ignore_digests(
        &self,
        rel: &[u8],
        abs: &Path,
        present: [bool; 2],
        done: &mut Vec<(Box<[u8]>, FileRecord)>,
        local: &mut Collected,
    ) -> [Option<u128>; 2] {
        let mut digests = [None; 2];
        for (i, name) in IGNORE_FILES.iter().enumerate() {
            if !present[i] {
                continue;
            }
            let child_abs = abs.join(name);
            let meta = match fs::symlink_metadata(&child_abs) {
                Ok(m) if m.is_file() => m,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    local.error.get_or_insert(HashError::Read {
                        path: child_abs,
                        error: source,
                    });
                    continue;
                }
            };
            let child_rel = join_rel(rel, name.as_bytes());
            if let Some((rec, stable)) = self.regular(&child_rel, &child_abs, &meta, local) {
                digests[i] = Some(rec.digest);
                done.push((name.as_bytes().into(), rec));
                if stable {
                    local.cache.files.insert(child_rel.into(), rec);
                }
            }
        }
        digests
    }

    /// Lists `abs` afresh, filtering it with the rules in force there.
    #[allow(clippy::too_many_arguments)]
    fn list(
        &self,
        rel: &[u8],
        abs: &Path,
        key: StatKey,
        taken_ns: i64,
        parent: &Arc<Level>,
        ignore_files: &mut Vec<(Box<[u8]>, FileRecord)>,
        local: &mut Collected,
    ) -> io::Result<(Arc<Level>, Listing)> {
        self.stats.dirs_listed.fetch_add(1, Ordering::Relaxed);
        let mut raw = Vec::new();
        let mut present = [false; 2];
        for e in fs::read_dir(abs)? {
            let e = e?;
            let name = e.file_name();
            let name = name.as_bytes();
            if always_excluded(name) {
                continue;
            }
            let ft = match e.file_type() {
                Ok(ft) => ft,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            let ty = if ft.is_dir() {
                EntryType::Dir
            } else if ft.is_file() {
                EntryType::File
            } else if ft.is_symlink() {
                EntryType::Symlink
            } else {
                EntryType::Other
            };
            if ty == EntryType::File
                && let Some(i) = IGNORE_FILES.iter().position(|f| f.as_bytes() == name)
            {
                present[i] = true;
            }
            raw.push((Box::<[u8]>::from(name), ty));
        }
        ignore_files.clear();
        let digests = self.ignore_digests(rel, abs, present, ignore_files, local);
        let level = Level::child(parent, abs.to_path_buf(), digests);
        let mut entries = Vec::with_capacity(raw.len());
        for (name, ty) in raw {
            let child = abs.join(std::ffi::OsStr::from_bytes(&name));
            if self.exclude.contains(&child) || level.is_ignored(&child, ty == EntryType::Dir) {
                continue;
            }
            entries.push((name, ty));
        }
        entries.sort_unstable();
        local.cache.dirs.insert(
            rel.into(),
            DirRecord {
                key,
                taken_ns,
                rules: level.fingerprint,
                ignore_files: present,
                entries: entries.clone(),
            },
        );
        Ok((level, entries))
    }

    /// The digest record of the regular file `abs` (whose stat is `meta`), from the cache
    /// when it can be trusted, else read; `false` when it changed while being read.
    fn regular(
        &self,
        rel: &[u8],
        abs: &Path,
        meta: &fs::Metadata,
        local: &mut Collected,
    ) -> Option<(FileRecord, bool)> {
        let key = StatKey::of(meta);
        if let Some(rec) = self.old.files.get(rel)
            && rec.digest_for(&key).is_some()
        {
            self.stats.files_from_cache.fetch_add(1, Ordering::Relaxed);
            return Some((*rec, true));
        }
        let taken_ns = now_ns();
        match read_digest(abs) {
            Ok(Read_::Digest {
                digest,
                key,
                stable,
            }) => {
                self.stats.files_read.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes_read.fetch_add(key.size, Ordering::Relaxed);
                Some((
                    FileRecord {
                        key,
                        taken_ns,
                        digest,
                    },
                    stable,
                ))
            }
            Ok(Read_::NotRegular) => {
                local.warnings.push(format!(
                    "skipped {}: not a regular file, directory or symlink",
                    abs.display()
                ));
                None
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => {
                local.error.get_or_insert(HashError::Read {
                    path: abs.to_path_buf(),
                    error: source,
                });
                None
            }
        }
    }

    /// Digests one file or symlink whose stat is `meta`, recording its entry and cache record.
    fn file(&self, rel: Vec<u8>, abs: &Path, meta: &fs::Metadata, local: &mut Collected) {
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = match fs::read_link(abs) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(source) => {
                    local.error.get_or_insert(HashError::Read {
                        path: abs.to_path_buf(),
                        error: source,
                    });
                    return;
                }
            };
            let target: Box<[u8]> = target.as_os_str().as_bytes().into();
            local.entries.push(Entry {
                digest: xxh3_128(&target),
                size: target.len() as u64,
                kind: Kind::Symlink,
                target: Some(target),
                path: rel.into(),
            });
            return;
        }
        if !ft.is_file() {
            local.warnings.push(format!(
                "skipped {}: not a regular file, directory or symlink",
                abs.display()
            ));
            return;
        }
        let Some((rec, stable)) = self.regular(&rel, abs, meta, local) else {
            return;
        };
        local.entries.push(Entry {
            kind: kind_of_mode(rec.key.mode),
            size: rec.key.size,
            digest: rec.digest,
            target: None,
            path: rel.as_slice().into(),
        });
        if stable {
            local.cache.files.insert(rel.into(), rec);
        }
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
    let mut local = Collected::default();
    w.file(rel.to_vec(), abs, meta, &mut local);
    if let Some(e) = local.error {
        return Err(e);
    }
    Ok(Fresh {
        record: local.cache.files.remove(rel),
        entry: local.entries.pop(),
        warnings: local.warnings,
    })
}

/// Regular or executable, the way git tells them apart: by the owner's execute bit.
pub fn kind_of_mode(mode: u32) -> Kind {
    if mode & 0o100 != 0 {
        Kind::Executable
    } else {
        Kind::Regular
    }
}
