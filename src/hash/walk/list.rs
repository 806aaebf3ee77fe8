//! A directory's listing: the cached one when it still holds, else one read now.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use super::{DirOut, Ignores, Listing, Loc, Place, Walker, join_rel};
use crate::hash::cache::{DirListing, DirRecord, EntryType, StatKey};
use crate::hash::entry::{Found, found, now_ns};
use crate::hash::files;
use crate::hash::rules::{IGNORE_FILES, Level, always_excluded};

impl Walker<'_> {
    /// The listing of the directory `rel`: the cached one when the directory's stat and the
    /// rules in force there are unchanged, else one read now (opening the directory if it
    /// was not); with where its entries are found, those rules and the digests of the
    /// directory's ignore files.
    pub(super) fn listing<'r>(
        &self,
        place: Place,
        key: StatKey,
        rel: &[u8],
        parent: &Arc<Level>,
        old: Option<&'r DirRecord>,
        out: &mut DirOut,
    ) -> Option<(Listing<'r>, Loc, Arc<Level>, Ignores)> {
        if let Some(rec) = old.filter(|r| r.valid_for(&key) && r.is_well_formed()) {
            let loc = match &place {
                Place::Opened(l) | Place::Through(l) => l,
            };
            let ignores = self.ignore_files(loc, rel, rec.ignore_files(), old, out);
            let level = self.level(parent, rel, &ignores);
            if level.fingerprint == rec.rules() {
                out.counts.dirs_from_cache += 1;
                return Some((Listing::Cached(rec), loc.clone(), level, ignores));
            }
        }
        let (loc, key) = match place {
            Place::Opened(loc) => (loc, key),
            Place::Through(anc) => {
                let opened = files::open_dir(anc.fd(), anc.name(rel), false)
                    .and_then(|fd| Ok((files::stat(&fd)?, fd)));
                match opened {
                    Ok((key, fd)) => (Loc::own(fd, rel), key),
                    Err(e) => {
                        out.fail(self.abs(rel), e);
                        return None;
                    }
                }
            }
        };
        // Listing begins now: what the directory's stat says is older than what is read.
        let taken_ns = now_ns();
        out.counts.dirs_listed += 1;
        // A directory's size tells roughly how many entries it has; most have few, and
        // allocations of up to 1 KiB are the cheap ones.
        let room = (key.size as usize / 64).clamp(8, 4096);
        let mut l = DirListing::with_capacity(key, taken_ns, room);
        let mut present = [false; 2];
        let mut error = None;
        // The rules match absolute paths: the directory's, then each name in turn.
        let mut abs = Vec::with_capacity(self.root.as_os_str().len() + rel.len() + 256);
        abs.extend_from_slice(self.abs(rel).as_os_str().as_bytes());
        let fd = loc.fd();
        let listed = files::list(
            fd,
            Path::new(std::ffi::OsStr::from_bytes(&abs)),
            |name, ty| {
                if always_excluded(name) {
                    return;
                }
                // The file system does not say what it is: ask.
                let ty = match ty {
                    Some(ty) => ty,
                    None => match files::stat_at(fd, name) {
                        Ok(k) => k.entry_type(),
                        Err(e) if files::is_gone(&e) => return,
                        Err(e) => {
                            error.get_or_insert(e);
                            return;
                        }
                    },
                };
                if ty == EntryType::File
                    && let Some(i) = IGNORE_FILES.iter().position(|f| f.as_bytes() == name)
                {
                    present[i] = true;
                }
                l.push(name, ty, None);
            },
        );
        if let Some(e) = listed.err().or(error) {
            out.fail(self.abs(rel), e);
            return None;
        }
        let ignores = self.ignore_files(&loc, rel, present, old, out);
        let level = self.level(parent, rel, &ignores);
        l.rules = level.fingerprint;
        l.ignore_files = present;
        abs.push(b'/');
        let dir_len = abs.len();
        l.retain(|name, ty| {
            if self.excluded.iter().any(|(d, n)| d == rel && n == name) {
                return false;
            }
            abs.truncate(dir_len);
            abs.extend_from_slice(name);
            let path = Path::new(std::ffi::OsStr::from_bytes(&abs));
            !level.is_ignored(path, ty == EntryType::Dir)
        });
        l.sort();
        Some((Listing::Fresh(l), loc, level, ignores))
    }

    /// Digests of the directory's ignore files, through the cache like any file.
    pub(super) fn ignore_files(
        &self,
        loc: &Loc,
        rel: &[u8],
        present: [bool; 2],
        old: Option<&DirRecord>,
        out: &mut DirOut,
    ) -> Ignores {
        let mut ignores = [None; 2];
        for (i, name) in IGNORE_FILES.iter().enumerate() {
            if !present[i] {
                continue;
            }
            let path = join_rel(rel, name.as_bytes());
            let before = old.and_then(|o| o.ignore_records()[i]);
            match found(
                loc.fd(),
                loc.name(&path),
                Some(EntryType::File),
                before.as_ref(),
            ) {
                Ok(Found::Regular(d)) => ignores[i] = Some(d),
                Ok(_) => {}
                Err(e) => out.fail(self.abs(&path), e),
            }
        }
        ignores
    }

    /// The rules in force in the directory `rel`.
    pub(super) fn level(&self, parent: &Arc<Level>, rel: &[u8], ignores: &Ignores) -> Arc<Level> {
        let digests = ignores.map(|d| d.map(|d| d.digest));
        if digests == [None, None] {
            return parent.clone();
        }
        Level::child(parent, self.abs(rel), digests)
    }
}
