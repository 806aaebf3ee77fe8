//! The directories of a watched tree, with the ignore rules in force in each, found by path.
//! Paths live in one arena (see [`crate::hash::arena`]), and the table holds a span, the
//! path's hash and the rules: 24 bytes a directory.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;

use crate::hash::arena::{Arena, Span};
use crate::hash::rules::Level;

struct Dir {
    hash: u64,
    span: Span,
    level: Arc<Level>,
}

#[derive(Default)]
pub(super) struct Dirs {
    table: HashTable<Dir>,
    arena: Arena,
}

fn hash(path: &[u8]) -> u64 {
    let mut h = FxBuildHasher.build_hasher();
    h.write(path);
    h.finish()
}

impl Dirs {
    pub(super) fn from_vec(v: Vec<(Box<[u8]>, Arc<Level>)>) -> Dirs {
        let mut out = Dirs {
            table: HashTable::with_capacity(v.len()),
            arena: Arena::with_capacity(v.iter().map(|(p, _)| p.len()).sum()),
        };
        for (path, level) in v {
            out.insert(&path, level);
        }
        out
    }

    fn find(&self, path: &[u8]) -> Option<&Dir> {
        self.table
            .find(hash(path), |d| self.arena.get(d.span) == path)
    }

    /// The rules in force in the directory `path`, if it takes part.
    pub(super) fn get(&self, path: &[u8]) -> Option<&Arc<Level>> {
        self.find(path).map(|d| &d.level)
    }

    pub(super) fn contains(&self, path: &[u8]) -> bool {
        self.find(path).is_some()
    }

    /// Adds the directory `path`, or changes its rules.
    pub(super) fn insert(&mut self, path: &[u8], level: Arc<Level>) {
        let h = hash(path);
        let arena = &self.arena;
        match self.table.find_entry(h, |d| arena.get(d.span) == path) {
            Ok(mut e) => e.get_mut().level = level,
            Err(_) => {
                let span = self.arena.push(&[path]);
                self.table.insert_unique(
                    h,
                    Dir {
                        hash: h,
                        span,
                        level,
                    },
                    |d| d.hash,
                );
            }
        }
    }

    /// Removes the directory `path`; whether it was there.
    pub(super) fn remove(&mut self, path: &[u8]) -> bool {
        let arena = &self.arena;
        let Ok(e) = self
            .table
            .find_entry(hash(path), |d| arena.get(d.span) == path)
        else {
            return false;
        };
        let (gone, _) = e.remove();
        self.arena.free(gone.span);
        self.compact_if_wasteful();
        true
    }

    /// Removes every directory whose path starts with `prefix`; returns their paths.
    pub(super) fn remove_below(&mut self, prefix: &[u8]) -> Vec<Box<[u8]>> {
        let mut gone = Vec::new();
        let arena = &mut self.arena;
        self.table.retain(|d| {
            let path = arena.get(d.span);
            if !path.starts_with(prefix) {
                return true;
            }
            gone.push(path.into());
            arena.free(d.span);
            false
        });
        self.compact_if_wasteful();
        gone
    }

    fn compact_if_wasteful(&mut self) {
        if self.arena.wasteful() {
            self.arena
                .compact(self.table.iter_mut().map(|d| &mut d.span));
        }
    }

    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    /// Every directory's path, in no particular order.
    pub(super) fn paths(&self) -> impl ExactSizeIterator<Item = &[u8]> {
        self.table.iter().map(|d| self.arena.get(d.span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn finds_removes_and_compacts() {
        let level = Level::top(Path::new("/r"), Path::new("/r"), &[]);
        let name = |i: usize| format!("packages/p{i:04}/src");
        let mut d = Dirs::from_vec(
            (0..3000)
                .map(|i| (name(i).into_bytes().into(), level.clone()))
                .collect(),
        );
        assert_eq!(d.len(), 3000);
        assert!(d.contains(name(42).as_bytes()));
        assert!(d.get(b"packages/p9999/src").is_none());
        assert!(d.remove(name(42).as_bytes()));
        assert!(!d.remove(name(42).as_bytes()));
        let mut gone = d.remove_below(b"packages/p1");
        gone.sort();
        assert_eq!(gone.len(), 1000);
        assert_eq!(&*gone[0], b"packages/p1000/src");
        for i in (0..3000).filter(|i| *i != 42 && !(1000..2000).contains(i)) {
            assert!(d.contains(name(i).as_bytes()), "{i}");
        }
        for i in 2000..3000 {
            assert!(d.remove(name(i).as_bytes()));
        }
        // Two thirds freed: the arena was compacted along the way, and lookups still work.
        assert!(d.arena.size() < 2 * 999 * name(0).len());
        assert_eq!(d.len(), 999);
        assert!(d.contains(name(999).as_bytes()));
        assert_eq!(d.paths().count(), 999);
    }
}
