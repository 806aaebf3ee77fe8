//! What each entry adds to a walk's output: its entry, the digest record to cache, the
//! paths that changed since the cache was written, warnings and errors.

use std::io;

use xxhash_rust::xxh3::xxh3_128;

use super::{DirOut, Ignores, Walker, join_rel};
use crate::hash::cache::{DirListing, DirRecord, EntryType, FileRecord, Slot};
use crate::hash::entry::{Found, kind_of_mode};
use crate::hash::rules::IGNORE_FILES;
use crate::hash::{Entry, Kind};

impl Walker<'_> {
    /// Records the entry at `path` as what it turned out to be; returns the digest record to
    /// cache for it.
    pub(super) fn add(
        &self,
        path: Vec<u8>,
        found: io::Result<Found>,
        before: Option<FileRecord>,
        out: &mut DirOut,
    ) -> Option<FileRecord> {
        let found = match found {
            Ok(f) => f,
            Err(e) => {
                out.fail(self.abs(&path), e);
                return None;
            }
        };
        match found {
            Found::Regular(d) => {
                if d.read {
                    out.counts.files_read += 1;
                    out.counts.bytes_read += d.key.size;
                    if self.track_changes && before.is_none_or(|b| b.digest != d.digest) {
                        out.changed.push(path.as_slice().into());
                    }
                } else {
                    out.counts.files_from_cache += 1;
                }
                out.entries.push(Entry {
                    path: path.into_boxed_slice(),
                    kind: kind_of_mode(d.key.mode),
                    target: None,
                    digest: d.digest,
                    size: d.key.size,
                });
                return d.record;
            }
            Found::Symlink(target) => out.entries.push(Entry {
                path: path.into_boxed_slice(),
                kind: Kind::Symlink,
                digest: xxh3_128(&target),
                size: target.len() as u64,
                target: Some(target),
            }),
            Found::Other => out.warnings.push(format!(
                "skipped {}: not a regular file, directory or symlink",
                self.abs(&path).display()
            )),
            Found::Dir | Found::Gone => {
                if self.track_changes && before.is_some() {
                    out.changed.push(path.into());
                }
            }
        }
        None
    }

    /// Notes as changed what the cache had in the directory `rel` (`before`), now replaced.
    pub(super) fn was(&self, rel: &[u8], before: Option<Slot>, out: &mut DirOut) {
        let Some(b) = before.filter(|_| self.track_changes) else {
            return;
        };
        let path = join_rel(rel, b.name);
        match b.ty {
            EntryType::Dir => self.old.files_below(&path, &mut out.changed),
            _ if b.file.is_some() => out.changed.push(path.into()),
            _ => {}
        }
    }

    /// Notes as changed what the cached listing `old` of `rel` had and `new` has not.
    pub(super) fn gone(
        &self,
        rel: &[u8],
        old: &DirRecord,
        new: &DirListing,
        ignores: &Ignores,
        out: &mut DirOut,
    ) {
        if !self.track_changes {
            return;
        }
        for slot in old.slots() {
            let name = slot.name;
            if new.find(name).is_none() && !IGNORE_FILES.iter().any(|f| f.as_bytes() == name) {
                self.was(rel, Some(slot), out);
            }
        }
        let old_ignores = old.ignore_records();
        for (i, f) in IGNORE_FILES.iter().enumerate() {
            if old_ignores[i].is_some() && ignores[i].is_none() {
                out.changed.push(join_rel(rel, f.as_bytes()).into());
            }
        }
    }
}
