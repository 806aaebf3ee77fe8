//! A directory's listing while it is made or changed: names with what they are and, for
//! regular files, their digest records. The walk fills one in when it lists a directory,
//! and [`DirListing::record`] turns it into the stored [`DirRecord`].

use std::cmp::Ordering;

use super::cache::{DirRecord, EntryType, FileRecord, Slot, StatKey};
use super::record::encode_record;

/// The order of names in a directory that makes the paths below it sort as bytes: a
/// directory's name compares as if followed by `/` (so `a.txt` < `a/` < `a0`), as in git.
pub fn tree_order(a: &[u8], a_dir: bool, b: &[u8], b_dir: bool) -> Ordering {
    let n = a.len().min(b.len());
    a[..n].cmp(&b[..n]).then_with(|| {
        let next = |s: &[u8], dir: bool| s.get(n).copied().or(dir.then_some(b'/'));
        next(a, a_dir).cmp(&next(b, b_dir))
    })
}

/// One entry: its name is `names[start..start + len]`, its digest record `files[file]`.
#[derive(Debug, Clone, Copy)]
struct Item {
    start: u32,
    len: u32,
    ty: EntryType,
    file: u32,
}

/// No digest record.
const NO_FILE: u32 = u32::MAX;

/// The fields of a [`DirRecord`], editable.
#[derive(Debug, Clone)]
pub struct DirListing {
    /// The directory's stat when listing began.
    pub key: StatKey,
    /// Wall-clock nanoseconds when listing began.
    pub taken_ns: i64,
    /// The fingerprint of the ignore rules the listing was filtered with.
    pub rules: u128,
    /// Which ignore files the directory holds (see `rules::IGNORE_FILES`).
    pub ignore_files: [bool; 2],
    /// Their digest records: kept apart from the entries because an ignore file applies
    /// even when its own rules leave it out of the tree.
    pub ignore_records: [Option<FileRecord>; 2],
    names: Vec<u8>,
    items: Vec<Item>,
    /// Kept apart so that an entry is small: most have no record while a listing is made.
    files: Vec<FileRecord>,
}

impl DirListing {
    /// An empty listing of a directory whose stat was `key` when listing began at `taken_ns`.
    pub fn new(key: StatKey, taken_ns: i64) -> DirListing {
        DirListing {
            key,
            taken_ns,
            rules: 0,
            ignore_files: [false; 2],
            ignore_records: [None; 2],
            names: Vec::new(),
            items: Vec::new(),
            files: Vec::new(),
        }
    }

    /// The listing a record holds; `None` if it is not well formed.
    pub fn of(rec: &DirRecord) -> Option<DirListing> {
        if !rec.is_well_formed() {
            return None;
        }
        let mut l = DirListing::new(rec.key(), rec.taken_ns());
        l.rules = rec.rules();
        l.ignore_files = rec.ignore_files();
        l.ignore_records = rec.ignore_records();
        l.items.reserve_exact(rec.len());
        for s in rec.slots() {
            l.push(s.name, s.ty, s.file);
        }
        Some(l)
    }

    /// An empty listing with room for about `n` entries.
    pub fn with_capacity(key: StatKey, taken_ns: i64, n: usize) -> DirListing {
        let mut l = DirListing::new(key, taken_ns);
        l.names.reserve(n * 12);
        l.items.reserve(n);
        l
    }

    /// The stored form, for the directory at `path`.
    pub fn record(&self, path: &[u8]) -> DirRecord {
        encode_record(path, self)
    }

    /// Stops trusting the listing (a zero stat matches no directory) but keeps the file
    /// records, each of which is still checked against its own file's stat.
    pub fn invalidate(&mut self) {
        self.key = StatKey::default();
    }

    /// Adds an entry; call [`DirListing::sort`] after the last one.
    pub fn push(&mut self, name: &[u8], ty: EntryType, file: Option<FileRecord>) {
        // A directory's names add up to far less than 4 GiB (each is at most NAME_MAX bytes).
        let start = self.names.len() as u32;
        self.names.extend_from_slice(name);
        self.items.push(Item {
            start,
            len: name.len() as u32,
            ty,
            file: NO_FILE,
        });
        if file.is_some() {
            self.set_file(self.items.len() - 1, file);
        }
    }

    fn name_of(&self, it: &Item) -> &[u8] {
        &self.names[it.start as usize..(it.start + it.len) as usize]
    }

    /// Puts the entries in tree order (see [`tree_order`]).
    pub fn sort(&mut self) {
        let names = &self.names;
        let name = |it: &Item| &names[it.start as usize..(it.start + it.len) as usize];
        self.items.sort_unstable_by(|a, b| {
            let (a_dir, b_dir) = (a.ty == EntryType::Dir, b.ty == EntryType::Dir);
            tree_order(name(a), a_dir, name(b), b_dir)
        });
    }

    /// Keeps the entries for which `keep(name, type)` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8], EntryType) -> bool) {
        // The names of dropped entries stay in the buffer: a listing lives briefly.
        let names = &self.names;
        self.items.retain(|it| {
            keep(
                &names[it.start as usize..(it.start + it.len) as usize],
                it.ty,
            )
        });
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Entry `i`.
    pub fn get(&self, i: usize) -> Slot<'_> {
        let it = &self.items[i];
        Slot {
            name: self.name_of(it),
            ty: it.ty,
            file: self.files.get(it.file as usize).copied(),
        }
    }

    /// The entries in order.
    pub fn iter(&self) -> impl Iterator<Item = Slot<'_>> {
        (0..self.items.len()).map(|i| self.get(i))
    }

    /// Sets the digest record of entry `i`.
    pub fn set_file(&mut self, i: usize, file: Option<FileRecord>) {
        let it = &mut self.items[i];
        match (file, self.files.get_mut(it.file as usize)) {
            (Some(f), Some(slot)) => *slot = f,
            (Some(f), None) => {
                it.file = self.files.len() as u32;
                self.files.push(f);
            }
            (None, _) => it.file = NO_FILE,
        }
    }

    /// The index of the entry called `name`, whatever it is; the entries must be sorted.
    pub fn find(&self, name: &[u8]) -> Option<usize> {
        [false, true].into_iter().find_map(|dir| {
            self.items
                .binary_search_by(|it| {
                    tree_order(self.name_of(it), it.ty == EntryType::Dir, name, dir)
                })
                .ok()
        })
    }
}
