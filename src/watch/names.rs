//! Directories named by their parent and their own name, as the watchers keep them: a path
//! costs its last component, not the whole of it (on a JS-monorepo tree of 52k directories the
//! names average 6 bytes, the paths 53). A directory whose parent is not kept (outside the base,
//! below one that is polled, or the base itself) keeps its whole path instead: relative to the
//! base, absolute outside it, empty for the base.
//!
//! Finding a directory by its path is a scan of the names for a few lookups, or an index built
//! for the call for many: the engine adds and removes a few directories at a time, and an index
//! kept for good would cost more than the names.

use std::hash::{BuildHasher, Hasher};

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;

/// Where a directory's parent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Parent {
    /// Nowhere: the name is the whole path.
    None,
    Slot(usize),
    /// Kept, but not found: the directory cannot be named (never so, barring a bug).
    Lost,
}

/// Directories in slots, each with its name and its parent.
pub(super) trait Nodes {
    /// How many slots there are, gone directories kept to name others included.
    fn slots(&self) -> usize;
    /// The name of slot `i`, or its whole path when it has no parent.
    fn name(&self, i: usize) -> &[u8];
    fn parent(&self, i: usize) -> Parent;
    /// Whether slot `i` is watched or polled (not only kept to name others).
    fn live(&self, i: usize) -> bool;
}

/// More parents than this means a cycle (a bug): no path is that deep.
const MAX_DEPTH: usize = 4096;
/// Lookups past which an index is worth building.
const SCAN_MAX: usize = 16;

/// Makes room for `additional` more in `v`, by an eighth of it at least rather than doubling
/// it: the watchers' vectors are big and long-lived, and their slack is memory held.
pub(super) fn grow<T>(v: &mut Vec<T>, additional: usize) {
    if v.capacity() - v.len() < additional {
        v.reserve_exact(additional.max(v.len() / 8));
    }
}

/// Where the parent of `path` (relative, or absolute) is to be found: `None` for the base and
/// for absolute paths (kept whole).
pub(super) fn parent_path(path: &[u8]) -> Option<&[u8]> {
    if path.is_empty() || path[0] == b'/' {
        return None;
    }
    Some(match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[..i],
        None => b"",
    })
}

/// The last component of `path`.
pub(super) fn last(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

/// Appends the path of slot `i` to `out`; false (and `out` as it was) if it cannot be named.
pub(super) fn path(t: &impl Nodes, i: usize, out: &mut Vec<u8>) -> bool {
    // Measured first, then written from the end: no allocation but `out`'s.
    let (mut len, mut links) = (0, 0);
    let mut at = i;
    loop {
        let name = t.name(at);
        len += name.len();
        match t.parent(at) {
            Parent::None => {
                // The base's children are named without a separator.
                if name.is_empty() && links > 0 {
                    links -= 1;
                }
                break;
            }
            Parent::Slot(p) if links < MAX_DEPTH => {
                links += 1;
                at = p;
            }
            _ => return false,
        }
    }
    let start = out.len();
    out.resize(start + len + links, 0);
    write(t, i, &mut out[start..]);
    true
}

/// Writes the path of `i`, which fills `out` exactly.
fn write(t: &impl Nodes, i: usize, out: &mut [u8]) {
    let mut end = out.len();
    let mut at = i;
    loop {
        let name = t.name(at);
        out[end - name.len()..end].copy_from_slice(name);
        end -= name.len();
        match t.parent(at) {
            Parent::Slot(p) if end > 0 => {
                end -= 1;
                out[end] = b'/';
                at = p;
            }
            _ => return,
        }
    }
}

/// Whether slot `i` is named `path`.
pub(super) fn is_at(t: &impl Nodes, i: usize, path: &[u8]) -> bool {
    let mut rest = path;
    let mut at = i;
    for _ in 0..MAX_DEPTH {
        let name = t.name(at);
        match t.parent(at) {
            Parent::None => return rest == name,
            Parent::Lost => return false,
            Parent::Slot(p) => {
                let Some(head) = rest.strip_suffix(name) else {
                    return false;
                };
                rest = match head.strip_suffix(b"/") {
                    Some(h) if !h.is_empty() => h,
                    // Only the base's children have nothing before their name.
                    None if head.is_empty() => head,
                    _ => return false,
                };
                at = p;
            }
        }
    }
    false
}

/// A hash of a path that its parent's hash and its name give too.
fn hash_path(path: &[u8]) -> u64 {
    if path.is_empty() {
        return SEED;
    }
    path.split(|&b| b == b'/').fold(SEED, mix)
}

const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix(h: u64, name: &[u8]) -> u64 {
    let mut s = FxBuildHasher.build_hasher();
    s.write_u64(h);
    s.write(name);
    // 0 and 1 mean "not computed" and "cannot be named" in an index.
    s.finish().max(2)
}

/// Finds directories by path, for the length of one call that does not change the slots.
pub(super) struct Finder {
    index: Option<Index>,
}

struct Index {
    /// Live slots, by the hash of their path.
    table: HashTable<u32>,
    /// The hash of every slot's path.
    hashes: Vec<u64>,
}

impl Finder {
    /// A finder for about `lookups` lookups in `t`.
    pub(super) fn new(t: &impl Nodes, lookups: usize) -> Finder {
        let index = (lookups > SCAN_MAX && t.slots() > SCAN_MAX).then(|| Index::of(t));
        Finder { index }
    }

    /// Calls `f` with each live slot named `path`.
    pub(super) fn find_all(&self, t: &impl Nodes, path: &[u8], mut f: impl FnMut(usize)) {
        match &self.index {
            Some(ix) => {
                let h = hash_path(path);
                for &i in ix.table.iter_hash(h) {
                    let i = i as usize;
                    if ix.hashes[i] == h && is_at(t, i, path) {
                        f(i);
                    }
                }
            }
            None => {
                let name = last(path);
                for i in 0..t.slots() {
                    if !t.live(i) {
                        continue;
                    }
                    let n = t.name(i);
                    // The name is the last component, or the whole path without a parent.
                    if (n == name || n == path) && is_at(t, i, path) {
                        f(i);
                    }
                }
            }
        }
    }

    /// A live slot named `path`.
    pub(super) fn find(&self, t: &impl Nodes, path: &[u8]) -> Option<usize> {
        let mut found = None;
        self.find_all(t, path, |i| {
            found.get_or_insert(i);
        });
        found
    }
}

impl Index {
    fn of(t: &impl Nodes) -> Index {
        let n = t.slots();
        let mut hashes = vec![0u64; n];
        let mut chain = Vec::new();
        for i in 0..n {
            // Up to a slot whose hash is known, or to the top, then down.
            chain.clear();
            let mut at = i;
            let mut h = loop {
                if hashes[at] != 0 {
                    break hashes[at];
                }
                match t.parent(at) {
                    Parent::None => {
                        hashes[at] = hash_path(t.name(at));
                        break hashes[at];
                    }
                    Parent::Slot(p) if chain.len() < MAX_DEPTH => {
                        chain.push(at);
                        at = p;
                    }
                    _ => {
                        chain.push(at);
                        break 1;
                    }
                }
            };
            for &c in chain.iter().rev() {
                if h != 1 {
                    h = mix(h, t.name(c));
                }
                hashes[c] = h;
            }
        }
        let live = (0..n).filter(|&i| t.live(i) && hashes[i] != 1);
        let mut table = HashTable::with_capacity(live.clone().count());
        for i in live {
            table.insert_unique(hashes[i], i as u32, |&j| hashes[j as usize]);
        }
        Index { table, hashes }
    }
}

/// Where the parent of a directory being added is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Found {
    /// Not kept: the directory keeps its whole path.
    None,
    /// Among the directories being added, at this position.
    Added(usize),
    /// Kept already, in this slot.
    Slot(usize),
}

/// The parent of each of `n` directories being added (`path(k)` of each, shallowest first)
/// that `kept(k)`: among those before it, else among the live slots of `t`. Calls
/// `found(k, where)` for each, in order.
pub(super) fn parents<'p>(
    t: &impl Nodes,
    n: usize,
    path: impl Fn(usize) -> &'p [u8],
    kept: impl Fn(usize) -> bool,
    mut found: impl FnMut(usize, Found),
) {
    let hash = |p: &[u8]| {
        let mut s = FxBuildHasher.build_hasher();
        s.write(p);
        s.finish()
    };
    let mut added: HashTable<u32> = HashTable::with_capacity(n);
    let mut finder = None;
    for k in (0..n).filter(|&k| kept(k)) {
        let p = path(k);
        let at = match parent_path(p) {
            None => Found::None,
            Some(pp) => match added.find(hash(pp), |&j| path(j as usize) == pp) {
                Some(&j) => Found::Added(j as usize),
                None if t.slots() == 0 => Found::None,
                None => finder
                    .get_or_insert_with(|| Finder::new(t, n - k))
                    .find(t, pp)
                    .map_or(Found::None, Found::Slot),
            },
        };
        found(k, at);
        added.insert_unique(hash(p), k as u32, |&j| hash(path(j as usize)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots as (parent, name, live).
    struct Flat(Vec<(Option<usize>, &'static str, bool)>);

    impl Nodes for Flat {
        fn slots(&self) -> usize {
            self.0.len()
        }
        fn name(&self, i: usize) -> &[u8] {
            self.0[i].1.as_bytes()
        }
        fn parent(&self, i: usize) -> Parent {
            match self.0[i].0 {
                Some(p) if p >= self.0.len() => Parent::Lost,
                Some(p) => Parent::Slot(p),
                None => Parent::None,
            }
        }
        fn live(&self, i: usize) -> bool {
            self.0[i].2
        }
    }

    fn path_of(t: &Flat, i: usize) -> Option<String> {
        let mut out = b"x".to_vec();
        path(t, i, &mut out).then(|| String::from_utf8(out[1..].to_vec()).unwrap())
    }

    fn tree() -> Flat {
        Flat(vec![
            (None, "", true),          // 0: the base
            (Some(0), "a", true),      // 1
            (Some(1), "b", false),     // 2: gone, naming 3
            (Some(2), "c", true),      // 3
            (None, "x/y", true),       // 4: its parent not kept
            (Some(4), "z", true),      // 5
            (None, "/out/side", true), // 6
            (Some(99), "lost", true),  // 7
            (Some(0), "a", true),      // 8: the same path as 1
            (Some(1), "bb", true),     // 9
        ])
    }

    #[test]
    fn paths_are_built_from_names_and_parents() {
        let t = tree();
        let want = [
            "",
            "a",
            "a/b",
            "a/b/c",
            "x/y",
            "x/y/z",
            "/out/side",
            "",
            "a",
            "a/bb",
        ];
        for (i, w) in want.iter().enumerate() {
            if i == 7 {
                assert_eq!(path_of(&t, i), None);
                continue;
            }
            assert_eq!(path_of(&t, i).as_deref(), Some(*w), "slot {i}");
            assert!(is_at(&t, i, w.as_bytes()), "slot {i}");
        }
        for wrong in ["/a", "a/", "b", "xa", "/a/b/c", "a/b/c/", "x", "y/z"] {
            assert!(
                (0..t.slots()).all(|i| !is_at(&t, i, wrong.as_bytes())),
                "{wrong}"
            );
        }
    }

    #[test]
    fn a_scan_and_an_index_find_the_same_live_slots() {
        let t = tree();
        let scan = Finder::new(&t, 1);
        let index = Finder {
            index: Some(Index::of(&t)),
        };
        for p in [
            "",
            "a",
            "a/b",
            "a/b/c",
            "x/y",
            "x/y/z",
            "/out/side",
            "a/bb",
            "q",
        ] {
            let mut a = Vec::new();
            scan.find_all(&t, p.as_bytes(), |i| a.push(i));
            let mut b = Vec::new();
            index.find_all(&t, p.as_bytes(), |i| b.push(i));
            b.sort_unstable();
            assert_eq!(a, b, "{p}");
        }
        assert_eq!(scan.find(&t, b"a/b/c"), Some(3));
        assert_eq!(scan.find(&t, b"a/b"), None, "gone");
        let mut both = Vec::new();
        scan.find_all(&t, b"a", |i| both.push(i));
        assert_eq!(both, [1, 8]);
    }

    #[test]
    fn parents_are_found_among_the_added_then_the_kept() {
        let t = tree();
        let added = ["", "a/b/c/d", "n", "n/m", "gone/g", "n/m/l", "/abs"];
        let mut got = Vec::new();
        parents(
            &t,
            added.len(),
            |k| added[k].as_bytes(),
            |k| k != 2,
            |k, f| got.push((k, f)),
        );
        assert_eq!(
            got,
            [
                (0, Found::None),
                (1, Found::Slot(3)),
                (3, Found::None),
                (4, Found::None),
                (5, Found::Added(3)),
                (6, Found::None),
            ]
        );
    }
}
