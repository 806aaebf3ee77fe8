//! The entries of a watched tree, sorted by path, in as little memory as they fit: a watch holds
//! them for hours, and on a 100k-file tree a boxed path and a padded entry each (128 bytes a
//! file) were a third of the process. An entry names its directory by its slot in [`Dirs`] and
//! keeps only its own name: 32 bytes and the name, where its whole path was ~80 bytes on a deep
//! tree.

use super::dirs::{Cursor, Dirs, NO_PARENT, split};
use crate::hash::arena::{Arena, Span};
use crate::hash::{Entry, EntryRef, Kind};

/// One entry: its name, followed by a symlink's target, is a string of the shared arena.
#[derive(Clone, Copy)]
struct Slim {
    digest: [u64; 2],
    /// The name and, for a symlink, its target.
    span: Span,
    /// The directory's slot, or [`NO_PARENT`] with the whole path as the name.
    dir: u32,
    name_len: u16,
    kind: Kind,
}

/// Entries kept sorted by path in one vector: the id is recomputed after every change, and a
/// contiguous pass over 100k entries is several times faster than walking a tree map's nodes.
/// Changes cost a binary search and a move of the tail (about a millisecond for 100k). Every
/// method that needs paths takes the [`Dirs`] the entries were stored with.
#[derive(Default)]
pub(super) struct SortedEntries {
    slims: Vec<Slim>,
    arena: Arena,
}

impl SortedEntries {
    /// The entries of `v` (whose directories are all in `dirs`, or kept whole).
    pub(super) fn from_sorted(v: &[Entry], dirs: &Dirs) -> SortedEntries {
        let bytes = v
            .iter()
            .map(|e| split(&e.path).1.len() + e.target.as_ref().map_or(0, |t| t.len()))
            .sum();
        let mut out = SortedEntries {
            slims: Vec::with_capacity(v.len()),
            arena: Arena::with_capacity(bytes),
        };
        let mut last: Option<(&[u8], u32)> = None;
        for e in v {
            let parent = split(&e.path).0;
            let dir = match last {
                Some((p, id)) if p == parent => id,
                _ => dirs.id(parent).unwrap_or(NO_PARENT),
            };
            last = Some((parent, dir));
            let slim = out.store(e.as_ref(), dir);
            out.slims.push(slim);
        }
        out
    }

    fn name<'a>(&'a self, s: &Slim) -> &'a [u8] {
        &self.arena.get(s.span)[..s.name_len as usize]
    }

    fn target<'a>(&'a self, s: &Slim) -> Option<&'a [u8]> {
        (s.kind == Kind::Symlink).then(|| &self.arena.get(s.span)[s.name_len as usize..])
    }

    fn digest(s: &Slim) -> u128 {
        u128::from(s.digest[0]) | u128::from(s.digest[1]) << 64
    }

    /// Appends the whole path of `s` to `out`.
    fn path_into(&self, s: &Slim, dirs: &Dirs, out: &mut Vec<u8>) {
        if s.dir != NO_PARENT {
            let start = out.len();
            dirs.path_into(s.dir, out);
            if out.len() > start {
                out.push(b'/');
            }
        }
        out.extend_from_slice(self.name(s));
    }

    /// Puts `e`'s name and target in the arena.
    fn store(&mut self, e: EntryRef, dir: u32) -> Slim {
        let name = if dir == NO_PARENT {
            e.path
        } else {
            split(e.path).1
        };
        let target = e.target.unwrap_or_default();
        Slim {
            digest: [e.digest as u64, (e.digest >> 64) as u64],
            span: self.arena.push(&[name, target]),
            dir,
            name_len: u16::try_from(name.len()).expect("a name of under 64 KiB"),
            kind: e.kind,
        }
    }

    /// Where the entry of `path` is, or would be.
    fn find(&self, path: &[u8], dirs: &Dirs) -> Result<usize, usize> {
        let mut buf = Vec::with_capacity(256);
        self.slims.binary_search_by(|s| {
            buf.clear();
            self.path_into(s, dirs, &mut buf);
            buf.as_slice().cmp(path)
        })
    }

    /// Where the entry of `path` is, or would be.
    pub(super) fn position(&self, path: &[u8], dirs: &Dirs) -> usize {
        self.find(path, dirs).unwrap_or_else(|i| i)
    }

    /// Calls `f` with the index and the entry of each entry from index `from` on, in order.
    pub(super) fn for_each_from(
        &self,
        from: usize,
        dirs: &Dirs,
        mut f: impl FnMut(usize, EntryRef<'_>),
    ) {
        let mut cursor = Cursor::default();
        for (i, s) in self.slims.iter().enumerate().skip(from) {
            let buf = cursor.prefix(dirs, s.dir);
            buf.extend_from_slice(self.name(s));
            f(
                i,
                EntryRef {
                    path: buf,
                    kind: s.kind,
                    target: self.target(s),
                    digest: Self::digest(s),
                },
            );
        }
    }

    /// The entry of `path`, if there is one.
    pub(super) fn get<'a>(&'a self, path: &'a [u8], dirs: &Dirs) -> Option<EntryRef<'a>> {
        let s = &self.slims[self.find(path, dirs).ok()?];
        Some(EntryRef {
            path,
            kind: s.kind,
            target: self.target(s),
            digest: Self::digest(s),
        })
    }

    /// Adds `e`, replacing the entry of the same path; its directory, if it has one, must be
    /// in `dirs`.
    pub(super) fn insert(&mut self, e: &Entry, dirs: &Dirs) {
        let dir = dirs.id(split(&e.path).0).unwrap_or(NO_PARENT);
        let slim = self.store(e.as_ref(), dir);
        match self.find(&e.path, dirs) {
            Ok(i) => {
                self.arena.free(self.slims[i].span);
                self.slims[i] = slim;
            }
            Err(i) => self.slims.insert(i, slim),
        }
        self.compact_if_wasteful();
    }

    /// Removes the entry of `path`; whether there was one.
    pub(super) fn remove(&mut self, path: &[u8], dirs: &Dirs) -> bool {
        let Ok(i) = self.find(path, dirs) else {
            return false;
        };
        let gone = self.slims.remove(i);
        self.arena.free(gone.span);
        self.compact_if_wasteful();
        true
    }

    /// Removes every entry whose path starts with `prefix`; returns their paths. Called before
    /// their directories leave `dirs`.
    pub(super) fn remove_below(&mut self, prefix: &[u8], dirs: &Dirs) -> Vec<Box<[u8]>> {
        let mut buf = Vec::with_capacity(256);
        let mut path = |s: &Slim| {
            buf.clear();
            self.path_into(s, dirs, &mut buf);
            buf.clone()
        };
        let start = self.slims.partition_point(|s| path(s).as_slice() < prefix);
        let end = start + self.slims[start..].partition_point(|s| path(s).starts_with(prefix));
        let mut gone = Vec::with_capacity(end - start);
        self.for_each_from(start, dirs, |i, e| {
            if i < end {
                gone.push(e.path.into());
            }
        });
        for s in self.slims.drain(start..end) {
            self.arena.free(s.span);
        }
        self.compact_if_wasteful();
        gone
    }

    fn compact_if_wasteful(&mut self) {
        if self.arena.wasteful() {
            self.arena
                .compact(self.slims.iter_mut().map(|s| &mut s.span));
        }
    }

    pub(super) fn len(&self) -> usize {
        self.slims.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::rules::Level;
    use std::path::Path;
    use std::sync::Arc;

    fn entry(path: &str, digest: u128) -> Entry {
        Entry {
            path: path.as_bytes().into(),
            kind: Kind::Regular,
            target: None,
            digest,
            size: 1,
        }
    }

    fn link(path: &str, target: &str) -> Entry {
        Entry {
            path: path.as_bytes().into(),
            kind: Kind::Symlink,
            target: Some(target.as_bytes().into()),
            digest: 7,
            size: 0,
        }
    }

    fn dirs(paths: &[&str]) -> Dirs {
        let level = Level::top(Path::new("/r"), Path::new("/r"), &[]);
        Dirs::from_vec(
            paths
                .iter()
                .map(|p| (p.as_bytes().into(), Arc::clone(&level)))
                .collect(),
        )
    }

    fn paths(s: &SortedEntries, d: &Dirs) -> Vec<String> {
        let mut out = Vec::new();
        s.for_each_from(0, d, |_, e| {
            out.push(String::from_utf8_lossy(e.path).into_owned())
        });
        out
    }

    fn sorted(mut v: Vec<Entry>) -> Vec<Entry> {
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v
    }

    #[test]
    fn keeps_path_order_and_every_field() {
        let d = dirs(&["", "a"]);
        let big = u128::MAX - 5;
        let mut s = SortedEntries::from_sorted(
            &sorted(vec![
                entry("b", 2),
                link("a/l", "../b"),
                entry("a.txt", big),
            ]),
            &d,
        );
        assert_eq!(paths(&s, &d), ["a.txt", "a/l", "b"]);
        assert_eq!(s.get(b"a.txt", &d), Some(entry("a.txt", big).as_ref()));
        assert_eq!(s.get(b"a/l", &d), Some(link("a/l", "../b").as_ref()));
        s.insert(&entry("a/m", 3), &d);
        s.insert(&entry("b", 9), &d);
        assert_eq!(paths(&s, &d), ["a.txt", "a/l", "a/m", "b"]);
        assert_eq!(s.get(b"b", &d).map(|e| e.digest), Some(9));
        assert!(s.remove(b"a.txt", &d));
        assert!(!s.remove(b"a.txt", &d));
        assert_eq!(
            s.remove_below(b"a/", &d),
            vec![b"a/l"[..].into(), b"a/m"[..].into()]
        );
        assert_eq!(paths(&s, &d), ["b"]);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn paths_interleave_across_directories_in_byte_order() {
        // "a/b.txt" < "a/b/c" < "a/b0": the entries of `a` are not in one run.
        let d = dirs(&["", "a", "a/b", "x"]);
        let all = sorted(vec![
            entry("a/b.txt", 1),
            entry("a/b/c", 2),
            entry("a/b0", 3),
            entry("a.b", 4),
            entry("x/y", 5),
            entry("a/b/d", 6),
        ]);
        let s = SortedEntries::from_sorted(&all, &d);
        let want: Vec<String> = all
            .iter()
            .map(|e| String::from_utf8_lossy(&e.path).into_owned())
            .collect();
        assert_eq!(paths(&s, &d), want);
        for (i, e) in all.iter().enumerate() {
            assert_eq!(s.position(&e.path, &d), i);
            assert_eq!(s.get(&e.path, &d), Some(e.as_ref()));
        }
        assert_eq!(s.position(b"a/b/cc", &d), 3);
        assert!(s.get(b"a/b", &d).is_none());
    }

    #[test]
    fn compacts_what_removals_leave_behind() {
        let d = dirs(&["", "dir"]);
        let name = |i: usize| format!("dir/{i:06}-some-longer-file-name.js");
        let all: Vec<Entry> = (0..2000).map(|i| entry(&name(i), 1)).collect();
        let mut s = SortedEntries::from_sorted(&all, &d);
        let full = s.arena.size();
        for round in 0..5u128 {
            for i in 0..2000 {
                s.insert(&entry(&name(i), round), &d);
            }
        }
        assert!(
            s.arena.size() <= 2 * full + 4096,
            "{} vs {full}",
            s.arena.size()
        );
        for i in (0..2000).step_by(2) {
            assert!(s.remove(name(i).as_bytes(), &d));
        }
        assert!(s.arena.size() <= full + 4096);
        assert_eq!(s.len(), 1000);
        let mut n = 0;
        s.for_each_from(0, &d, |_, e| {
            assert_eq!(e.path, name(2 * n + 1).as_bytes());
            assert_eq!(e.digest, 4);
            n += 1;
        });
    }
}
