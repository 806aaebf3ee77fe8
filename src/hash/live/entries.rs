//! The entries of a watched tree, sorted by path, in as little memory as they fit: a watch holds
//! them for hours, and on a 100k-file tree a boxed path and a padded entry each (128 bytes a
//! file) were a third of the process.

use crate::hash::arena::{Arena, Span};
use crate::hash::{Entry, EntryRef, Kind};

/// One entry: its path, followed by a symlink's target, is a string of the shared arena.
#[derive(Clone, Copy)]
struct Slim {
    digest: [u64; 2],
    /// The path and, for a symlink, its target.
    span: Span,
    target_len: u32,
    kind: Kind,
}

impl Slim {
    fn path_len(&self) -> usize {
        self.span.len() - self.target_len as usize
    }
}

/// Entries kept sorted by path in one vector: the id is recomputed after every change, and a
/// contiguous pass over 100k entries is several times faster than walking a tree map's nodes.
/// Changes cost a binary search and a move of the tail (about a millisecond for 100k).
#[derive(Default)]
pub(super) struct SortedEntries {
    slims: Vec<Slim>,
    arena: Arena,
}

impl SortedEntries {
    pub(super) fn from_unsorted(mut v: Vec<Entry>) -> SortedEntries {
        v.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        let bytes = v
            .iter()
            .map(|e| e.path.len() + e.target.as_ref().map_or(0, |t| t.len()))
            .sum();
        let mut out = SortedEntries {
            slims: Vec::with_capacity(v.len()),
            arena: Arena::with_capacity(bytes),
        };
        for e in v {
            let slim = out.store(e.as_ref());
            out.slims.push(slim);
        }
        out
    }

    fn view(&self, s: &Slim) -> EntryRef<'_> {
        let (path, target) = self.arena.get(s.span).split_at(s.path_len());
        EntryRef {
            path,
            kind: s.kind,
            target: (s.kind == Kind::Symlink).then_some(target),
            digest: u128::from(s.digest[0]) | u128::from(s.digest[1]) << 64,
        }
    }

    fn path(&self, s: &Slim) -> &[u8] {
        &self.arena.get(s.span)[..s.path_len()]
    }

    /// Puts `e`'s path and target in the arena.
    fn store(&mut self, e: EntryRef) -> Slim {
        let target = e.target.unwrap_or_default();
        Slim {
            digest: [e.digest as u64, (e.digest >> 64) as u64],
            span: self.arena.push(&[e.path, target]),
            target_len: target.len() as u32,
            kind: e.kind,
        }
    }

    fn find(&self, path: &[u8]) -> Result<usize, usize> {
        self.slims.binary_search_by(|s| self.path(s).cmp(path))
    }

    /// Where the entry of `path` is, or would be.
    pub(super) fn position(&self, path: &[u8]) -> usize {
        self.find(path).unwrap_or_else(|i| i)
    }

    /// The entries from index `from` on.
    pub(super) fn iter_from(&self, from: usize) -> impl Iterator<Item = EntryRef<'_>> {
        self.slims[from.min(self.slims.len())..]
            .iter()
            .map(|s| self.view(s))
    }

    pub(super) fn get(&self, path: &[u8]) -> Option<EntryRef<'_>> {
        self.find(path).ok().map(|i| self.view(&self.slims[i]))
    }

    /// Adds `e`, replacing the entry of the same path.
    pub(super) fn insert(&mut self, e: &Entry) {
        let slim = self.store(e.as_ref());
        match self.find(&e.path) {
            Ok(i) => {
                self.arena.free(self.slims[i].span);
                self.slims[i] = slim;
            }
            Err(i) => self.slims.insert(i, slim),
        }
        self.compact_if_wasteful();
    }

    /// Removes the entry of `path`; whether there was one.
    pub(super) fn remove(&mut self, path: &[u8]) -> bool {
        let Ok(i) = self.find(path) else {
            return false;
        };
        let gone = self.slims.remove(i);
        self.arena.free(gone.span);
        self.compact_if_wasteful();
        true
    }

    /// Removes every entry whose path starts with `prefix`; returns their paths.
    pub(super) fn remove_below(&mut self, prefix: &[u8]) -> Vec<Box<[u8]>> {
        let start = self.slims.partition_point(|s| self.path(s) < prefix);
        let end = start + self.slims[start..].partition_point(|s| self.path(s).starts_with(prefix));
        let gone: Vec<Box<[u8]>> = self.slims[start..end]
            .iter()
            .map(|s| self.path(s).into())
            .collect();
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

    pub(super) fn iter(&self) -> impl ExactSizeIterator<Item = EntryRef<'_>> {
        self.slims.iter().map(|s| self.view(s))
    }

    pub(super) fn paths(&self) -> impl Iterator<Item = &[u8]> {
        self.slims.iter().map(|s| self.path(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn paths(s: &SortedEntries) -> Vec<String> {
        s.paths()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect()
    }

    #[test]
    fn keeps_path_order_and_every_field() {
        let big = u128::MAX - 5;
        let mut s = SortedEntries::from_unsorted(vec![
            entry("b", 2),
            link("a/l", "../b"),
            entry("a.txt", big),
        ]);
        assert_eq!(paths(&s), ["a.txt", "a/l", "b"]);
        assert_eq!(s.get(b"a.txt"), Some(entry("a.txt", big).as_ref()));
        assert_eq!(s.get(b"a/l"), Some(link("a/l", "../b").as_ref()));
        s.insert(&entry("a/m", 3));
        s.insert(&entry("b", 9));
        assert_eq!(paths(&s), ["a.txt", "a/l", "a/m", "b"]);
        assert_eq!(s.get(b"b").map(|e| e.digest), Some(9));
        assert!(s.remove(b"a.txt"));
        assert!(!s.remove(b"a.txt"));
        assert_eq!(
            s.remove_below(b"a/"),
            vec![b"a/l"[..].into(), b"a/m"[..].into()]
        );
        assert_eq!(paths(&s), ["b"]);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn compacts_what_removals_leave_behind() {
        let name = |i: usize| format!("dir/{i:06}-some-longer-file-name.js");
        let mut s = SortedEntries::from_unsorted((0..2000).map(|i| entry(&name(i), 1)).collect());
        let full = s.arena.size();
        for round in 0..5u128 {
            for i in 0..2000 {
                s.insert(&entry(&name(i), round));
            }
        }
        assert!(
            s.arena.size() <= 2 * full + 4096,
            "{} vs {full}",
            s.arena.size()
        );
        for i in (0..2000).step_by(2) {
            assert!(s.remove(name(i).as_bytes()));
        }
        assert!(s.arena.size() <= full + 4096);
        assert_eq!(s.len(), 1000);
        for (n, e) in s.iter().enumerate() {
            assert_eq!(e.path, name(2 * n + 1).as_bytes());
            assert_eq!(e.digest, 4);
        }
    }
}
