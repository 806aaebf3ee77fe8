//! The directories of a watched tree, with the ignore rules in force in each, found by path.
//!
//! A directory is kept as its parent's slot and its own name, not its whole path: on a deep
//! tree (a JS monorepo has about two files a directory, eight levels down) whole paths were
//! most of the table. A slot is 24 bytes, its name is in one arena (see
//! [`crate::hash::arena`]), and an index by the hash of the whole path finds it; paths are put
//! together again by walking up the parents, and [`Cursor`] does that for a run of directories
//! in path order at the cost of the steps that differ. Slots are reused once freed, so the
//! entries that name a directory by its slot ([`super::entries`]) must go with it.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;

use crate::hash::arena::{Arena, Span};
use crate::hash::rules::Level;
#[cfg(doc)]
use crate::hash::walk::WalkOutput;

/// The parent of the root, and of a directory whose parent does not take part (kept with its
/// whole path as its name, which never happens with a walk's output but costs nothing to allow).
pub(super) const NO_PARENT: u32 = u32::MAX;

struct Dir {
    name: Span,
    parent: u32,
    /// How many slots name this one as their parent.
    children: u32,
    /// `None` for a free slot.
    level: Option<Arc<Level>>,
}

#[derive(Default)]
pub(super) struct Dirs {
    slots: Vec<Dir>,
    free: Vec<u32>,
    /// Slots by the hash of their whole path.
    index: HashTable<u32>,
    names: Arena,
    len: usize,
}

fn hash(path: &[u8]) -> u64 {
    let mut h = FxBuildHasher.build_hasher();
    h.write(path);
    h.finish()
}

/// `path` split into its parent directory and its name.
pub(super) fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

impl Dirs {
    /// Directories in any order (a test's).
    #[cfg(test)]
    pub(super) fn from_vec(mut v: Vec<(Box<[u8]>, Arc<Level>)>) -> Dirs {
        // Parents sort before their children, so each finds its parent in place.
        v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut out = Dirs::default();
        for (path, level) in v {
            out.insert(&path, level);
        }
        out
    }

    /// The directories of a walk (see [`WalkOutput::dirs`]), parents before children, each
    /// with its parent's position.
    pub(super) fn from_walk(v: Vec<(Box<[u8]>, Arc<Level>, u32)>) -> Dirs {
        let mut out = Dirs {
            slots: Vec::with_capacity(v.len()),
            index: HashTable::with_capacity(v.len()),
            names: Arena::with_capacity(v.iter().map(|(p, ..)| split(p).1.len()).sum()),
            ..Dirs::default()
        };
        // The slot each position went to.
        let mut slot_of = Vec::with_capacity(v.len());
        for (path, level, up) in v {
            let parent = slot_of.get(up as usize).copied();
            slot_of.push(out.insert_under(&path, level, parent));
        }
        out
    }

    fn dir(&self, id: u32) -> &Dir {
        &self.slots[id as usize]
    }

    /// Whether slot `id` holds the directory `path`.
    fn is(&self, mut id: u32, path: &[u8]) -> bool {
        let mut rest = path;
        loop {
            let d = self.dir(id);
            let name = self.names.get(d.name);
            if d.parent == NO_PARENT {
                return rest == name;
            }
            let Some(head) = rest.strip_suffix(name) else {
                return false;
            };
            let parent = self.dir(d.parent);
            if parent.parent == NO_PARENT && parent.name.len() == 0 {
                // Below the root, whose path is empty.
                return head.is_empty();
            }
            let Some(head) = head.strip_suffix(b"/") else {
                return false;
            };
            rest = head;
            id = d.parent;
        }
    }

    /// The slot of the directory `path`, if it takes part.
    pub(super) fn id(&self, path: &[u8]) -> Option<u32> {
        self.index.find(hash(path), |&i| self.is(i, path)).copied()
    }

    /// The rules in force in the directory `path`, if it takes part.
    pub(super) fn get(&self, path: &[u8]) -> Option<&Arc<Level>> {
        self.id(path).and_then(|i| self.dir(i).level.as_ref())
    }

    pub(super) fn contains(&self, path: &[u8]) -> bool {
        self.id(path).is_some()
    }

    /// Appends the path of slot `id` to `out`.
    pub(super) fn path_into(&self, id: u32, out: &mut Vec<u8>) {
        let start = out.len();
        let mut i = id;
        // Names from the bottom up, each reversed, then the whole reversed once.
        loop {
            let d = self.dir(i);
            let name = self.names.get(d.name);
            out.extend(name.iter().rev());
            if d.parent == NO_PARENT {
                break;
            }
            i = d.parent;
            let p = self.dir(i);
            if p.parent == NO_PARENT && p.name.len() == 0 {
                break;
            }
            out.push(b'/');
        }
        out[start..].reverse();
    }

    pub(super) fn path(&self, id: u32) -> Vec<u8> {
        let mut out = Vec::new();
        self.path_into(id, &mut out);
        out
    }

    /// Adds the directory `path`, or changes its rules; its slot.
    pub(super) fn insert(&mut self, path: &[u8], level: Arc<Level>) -> u32 {
        self.insert_under(path, level, None)
    }

    /// [`Dirs::insert`], where the slot of the parent, if known, is `parent`.
    fn insert_under(&mut self, path: &[u8], level: Arc<Level>, parent: Option<u32>) -> u32 {
        let h = hash(path);
        if let Some(&i) = self.index.find(h, |&i| self.is(i, path)) {
            self.slots[i as usize].level = Some(level);
            return i;
        }
        let (parent_path, name) = split(path);
        let (parent, name) = match parent.or_else(|| self.id(parent_path)) {
            Some(p) if !path.is_empty() => (p, name),
            _ => (NO_PARENT, path),
        };
        let dir = Dir {
            name: self.names.push(&[name]),
            parent,
            children: 0,
            level: Some(level),
        };
        let id = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = dir;
                i
            }
            None => {
                self.slots.push(dir);
                u32::try_from(self.slots.len() - 1).expect("fewer than 4 billion directories")
            }
        };
        if parent != NO_PARENT {
            self.slots[parent as usize].children += 1;
        }
        self.len += 1;
        let Dirs {
            slots,
            index,
            names,
            ..
        } = self;
        index.insert_unique(h, id, |&i| hash(&path_of(slots, names, i)));
        id
    }

    /// Frees slot `id`, which no other slot names as its parent.
    fn free_slot(&mut self, id: u32) {
        let h = hash(&self.path(id));
        if let Ok(e) = self.index.find_entry(h, |&i| i == id) {
            e.remove();
        }
        let d = &mut self.slots[id as usize];
        d.level = None;
        let (parent, name) = (d.parent, d.name);
        self.names.free(name);
        if parent != NO_PARENT {
            self.slots[parent as usize].children -= 1;
        }
        self.free.push(id);
        self.len -= 1;
    }

    /// Whether slot `id` is below slot `top` (not `top` itself).
    fn is_below(&self, mut id: u32, top: u32) -> bool {
        loop {
            id = self.dir(id).parent;
            if id == NO_PARENT {
                return false;
            }
            if id == top {
                return true;
            }
        }
    }

    /// Removes every directory below `path`, and `path` itself if `with_top`; returns the
    /// paths of those removed.
    fn remove_tree(&mut self, path: &[u8], with_top: bool) -> Vec<Box<[u8]>> {
        let Some(top) = self.id(path) else {
            return Vec::new();
        };
        let mut gone: Vec<u32> = Vec::new();
        if self.dir(top).children > 0 {
            gone = (0..self.slots.len() as u32)
                .filter(|&i| self.dir(i).level.is_some() && self.is_below(i, top))
                .collect();
        }
        if with_top {
            gone.push(top);
        }
        let paths: Vec<Box<[u8]>> = gone.iter().map(|&i| self.path(i).into()).collect();
        // Deepest first, so that each is freed with no child left.
        let mut by_depth: Vec<(usize, u32)> = gone
            .iter()
            .zip(&paths)
            .map(|(&i, p)| (p.iter().filter(|&&b| b == b'/').count(), i))
            .collect();
        by_depth.sort_unstable_by(|a, b| b.cmp(a));
        for (_, i) in by_depth {
            self.free_slot(i);
        }
        self.compact_if_wasteful();
        paths
    }

    /// Removes the directory `path` and every directory below it; returns their paths (none if
    /// `path` did not take part).
    pub(super) fn remove(&mut self, path: &[u8]) -> Vec<Box<[u8]>> {
        self.remove_tree(path, true)
    }

    /// Removes every directory below `path`, keeping `path`; returns their paths.
    pub(super) fn remove_below(&mut self, path: &[u8]) -> Vec<Box<[u8]>> {
        self.remove_tree(path, false)
    }

    fn compact_if_wasteful(&mut self) {
        if self.names.wasteful() {
            let live = self.slots.iter_mut().filter(|d| d.level.is_some());
            self.names.compact(live.map(|d| &mut d.name));
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Every directory's path, in no particular order.
    pub(super) fn paths(&self) -> impl ExactSizeIterator<Item = Vec<u8>> + '_ {
        let live = (0..self.slots.len() as u32).filter(|&i| self.dir(i).level.is_some());
        Counted {
            inner: live.map(|i| self.path(i)),
            left: self.len,
        }
    }
}

/// The path of slot `id`, from the parts of a [`Dirs`] (for the index's rehash, which holds
/// the table mutably).
fn path_of(slots: &[Dir], names: &Arena, id: u32) -> Vec<u8> {
    let mut parts = Vec::new();
    let mut i = id;
    loop {
        let d = &slots[i as usize];
        parts.push(names.get(d.name));
        if d.parent == NO_PARENT {
            break;
        }
        i = d.parent;
    }
    let parts: Vec<&[u8]> = parts.into_iter().rev().filter(|p| !p.is_empty()).collect();
    parts.join(&b'/')
}

/// An iterator of a known length.
struct Counted<I> {
    inner: I,
    left: usize,
}

impl<I: Iterator> Iterator for Counted<I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        let item = self.inner.next()?;
        self.left -= 1;
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<I: Iterator> ExactSizeIterator for Counted<I> {}

/// Puts together the paths of directories met one after the other, redoing only the levels
/// that differ from the last one's: entries in path order meet their directories depth first.
#[derive(Default)]
pub(super) struct Cursor {
    buf: Vec<u8>,
    /// The slots of the path in `buf`, top first, each with the length of `buf` up to it.
    stack: Vec<(u32, usize)>,
    chain: Vec<u32>,
}

impl Cursor {
    /// The path of slot `id` (empty for [`NO_PARENT`]), followed by a `/` unless it is empty.
    pub(super) fn prefix(&mut self, dirs: &Dirs, id: u32) -> &mut Vec<u8> {
        if let Some(&(top, len)) = self.stack.last()
            && top == id
        {
            self.buf.truncate(len);
            if len > 0 {
                self.buf.push(b'/');
            }
            return &mut self.buf;
        }
        self.chain.clear();
        let mut x = id;
        loop {
            if x == NO_PARENT {
                self.stack.clear();
                break;
            }
            if let Some(at) = self.stack.iter().rposition(|&(d, _)| d == x) {
                self.stack.truncate(at + 1);
                break;
            }
            self.chain.push(x);
            x = dirs.dir(x).parent;
        }
        self.buf
            .truncate(self.stack.last().map_or(0, |&(_, len)| len));
        for &c in self.chain.iter().rev() {
            let name = dirs.names.get(dirs.dir(c).name);
            if !self.buf.is_empty() && !name.is_empty() {
                self.buf.push(b'/');
            }
            self.buf.extend_from_slice(name);
            self.stack.push((c, self.buf.len()));
        }
        if !self.buf.is_empty() {
            self.buf.push(b'/');
        }
        &mut self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn level() -> Arc<Level> {
        Level::top(Path::new("/r"), Path::new("/r"), &[])
    }

    #[test]
    fn finds_removes_and_compacts() {
        let name = |i: usize| format!("packages/p{i:04}/src");
        let mut v: Vec<(Box<[u8]>, Arc<Level>)> =
            vec![(b""[..].into(), level()), (b"packages"[..].into(), level())];
        for i in 0..3000 {
            v.push((format!("packages/p{i:04}").into_bytes().into(), level()));
            v.push((name(i).into_bytes().into(), level()));
        }
        let mut d = Dirs::from_vec(v);
        assert_eq!(d.len(), 6002);
        assert!(d.contains(name(42).as_bytes()));
        assert!(d.contains(b""));
        assert!(d.contains(b"packages"));
        assert!(!d.contains(b"packages/p0042/sr"));
        assert!(!d.contains(b"ackages/p0042/src"));
        assert!(d.get(b"packages/p9999/src").is_none());
        assert_eq!(
            d.path(d.id(name(7).as_bytes()).unwrap()),
            name(7).as_bytes()
        );
        let gone = d.remove(name(42).as_bytes());
        assert_eq!(gone, vec![name(42).into_bytes().into_boxed_slice()]);
        assert!(d.remove(name(42).as_bytes()).is_empty());
        assert!(d.contains(b"packages/p0042"));
        let mut gone = d.remove_below(b"packages/p1000");
        assert_eq!(gone, vec![name(1000).into_bytes().into_boxed_slice()]);
        gone = d.remove(b"packages/p1001");
        gone.sort();
        assert_eq!(gone.len(), 2);
        assert_eq!(&*gone[0], b"packages/p1001");
        for i in (0..3000).filter(|i| ![42, 1000, 1001].contains(i)) {
            assert!(d.contains(name(i).as_bytes()), "{i}");
        }
        for i in 2000..3000 {
            assert_eq!(d.remove(format!("packages/p{i:04}").as_bytes()).len(), 2);
        }
        assert_eq!(d.len(), 6002 - 1 - 1 - 2 - 2000);
        // Freed slots are taken again, and lookups still work after the names were compacted.
        d.insert(b"packages/p5000", level());
        d.insert(b"packages/p5000/src", level());
        assert!(d.contains(b"packages/p5000/src"));
        assert!(d.contains(name(999).as_bytes()));
        assert_eq!(d.slots.len(), 6002);
        let mut paths: Vec<Vec<u8>> = d.paths().collect();
        assert_eq!(paths.len(), d.len());
        paths.sort();
        assert_eq!(paths[0], b"");
        assert_eq!(paths[1], b"packages");
        // Everything below the root goes, the root stays.
        let below = d.len() - 1;
        assert_eq!(d.remove_below(b"").len(), below);
        assert_eq!(d.len(), 1);
        assert!(d.contains(b""));
    }

    #[test]
    fn a_directory_without_its_parent_keeps_its_whole_path() {
        let mut d = Dirs::default();
        d.insert(b"a/b", level());
        d.insert(b"a/b/c", level());
        assert!(d.contains(b"a/b/c"));
        assert_eq!(d.path(d.id(b"a/b/c").unwrap()), b"a/b/c");
        let mut c = Cursor::default();
        assert_eq!(c.prefix(&d, d.id(b"a/b/c").unwrap()).as_slice(), b"a/b/c/");
        assert_eq!(d.remove(b"a/b").len(), 2);
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn a_walk_s_directories_name_their_parents_by_position() {
        use crate::hash::walk::NO_DIR;
        // As a walk has them: parents first, siblings in any order, one met twice.
        let walked = [
            ("", NO_DIR),
            ("b", 0),
            ("a", 0),
            ("a/x", 2),
            ("b/y", 1),
            ("a/x/z", 3),
            ("a", 0),
        ];
        let d = Dirs::from_walk(
            walked
                .iter()
                .map(|&(p, up)| (p.as_bytes().into(), level(), up))
                .collect(),
        );
        assert_eq!(d.len(), 6);
        let mut paths: Vec<Vec<u8>> = d.paths().collect();
        paths.sort();
        let want: Vec<&[u8]> = vec![b"", b"a", b"a/x", b"a/x/z", b"b", b"b/y"];
        assert_eq!(paths, want);
        for p in ["a/x/z", "b/y", ""] {
            let id = d.id(p.as_bytes()).unwrap();
            assert_eq!(d.path(id), p.as_bytes());
        }
    }

    #[test]
    fn the_cursor_gives_each_directory_s_path() {
        let paths = ["", "a", "a/b", "a/b/c", "a/d", "e", "e/f/g", "e/f"];
        let d = Dirs::from_vec(
            paths
                .iter()
                .map(|p| (p.as_bytes().into(), level()))
                .collect(),
        );
        let mut c = Cursor::default();
        for order in [
            &["", "a", "a/b", "a/b/c", "a/d", "e", "e/f", "e/f/g"][..],
            &["e/f/g", "a/b/c", "", "a/d", "a/d", "a", "e/f"],
        ] {
            for p in order {
                let want = if p.is_empty() {
                    String::new()
                } else {
                    format!("{p}/")
                };
                let got = c.prefix(&d, d.id(p.as_bytes()).unwrap()).clone();
                assert_eq!(String::from_utf8(got).unwrap(), want);
            }
        }
        assert_eq!(c.prefix(&d, NO_PARENT).as_slice(), b"");
    }
}
