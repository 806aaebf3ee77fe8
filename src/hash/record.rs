//! The stored record of one directory: the form in which the digest cache keeps, loads and
//! saves it, and in which a walk reads it.

use std::cmp::Ordering;
use std::sync::Arc;

use super::cache::{EntryType, FileRecord, StatKey};
use super::listing::{DirListing, tree_order};
use super::mapped::Stored;

/// One entry of a directory record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot<'r> {
    pub name: &'r [u8],
    pub ty: EntryType,
    /// For a regular file, the digest record it had when last read.
    pub file: Option<FileRecord>,
}

/// The stored record of one directory: its listing, already filtered by the ignore rules,
/// with the digest records of its files; see [`DirListing`] for the fields.
///
/// Layout (little-endian): record length (u32, itself included), path (u32 length, bytes),
/// stat key, taken_ns (i64), rules (u128), flags (u8: ignore files present, bits 0-1; their
/// digest records follow, bits 2-3), entry count (u32), then per entry a tag (u8: type, 0x80
/// if a digest record follows), the name (u16 length, bytes) and the digest record.
#[derive(Clone)]
pub struct DirRecord(Bytes);

#[derive(Clone)]
enum Bytes {
    /// Part of the loaded cache file.
    InFile {
        file: Arc<Stored>,
        at: u32,
        len: u32,
    },
    /// Made since.
    Own(Box<[u8]>),
}

/// Where the path starts, after the record's length and the path's.
const PATH_AT: usize = 8;
const KEY_LEN: usize = 36;
const RECORD_LEN: usize = KEY_LEN + 8 + 16;
/// The fixed part after the path: key, taken_ns, rules, flags.
const HEAD_LEN: usize = KEY_LEN + 8 + 16 + 1;

impl PartialEq for DirRecord {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for DirRecord {}

impl std::fmt::Debug for DirRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirRecord")
            .field("path", &String::from_utf8_lossy(self.path()))
            .field("key", &self.key())
            .field("entries", &self.len())
            .finish()
    }
}

impl DirRecord {
    /// The record in stored form.
    pub fn bytes(&self) -> &[u8] {
        match &self.0 {
            Bytes::InFile { file, at, len } => &file[*at as usize..(*at + *len) as usize],
            Bytes::Own(b) => b,
        }
    }

    fn path_len(&self) -> usize {
        let b = self.bytes();
        u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize
    }

    /// The directory's path relative to the root.
    pub fn path(&self) -> &[u8] {
        &self.bytes()[PATH_AT..PATH_AT + self.path_len()]
    }

    /// The fixed fields after the path.
    fn head(&self) -> Reader<'_> {
        Reader(&self.bytes()[PATH_AT + self.path_len()..])
    }

    /// The directory's stat when it was listed.
    pub fn key(&self) -> StatKey {
        self.head().key().unwrap_or_default()
    }

    /// When the listing was taken (wall-clock nanoseconds).
    pub fn taken_ns(&self) -> i64 {
        let mut r = self.head();
        r.take(KEY_LEN);
        r.u64().unwrap_or(0) as i64
    }

    /// The fingerprint of the ignore rules the listing was filtered with.
    pub fn rules(&self) -> u128 {
        let mut r = self.head();
        r.take(KEY_LEN + 8);
        r.u128().unwrap_or(0)
    }

    fn flags(&self) -> u8 {
        self.head().0[HEAD_LEN - 1]
    }

    /// Which ignore files the directory holds (see `rules::IGNORE_FILES`).
    pub fn ignore_files(&self) -> [bool; 2] {
        let f = self.flags();
        [f & 1 != 0, f & 2 != 0]
    }

    /// The digest records of the ignore files.
    pub fn ignore_records(&self) -> [Option<FileRecord>; 2] {
        let f = self.flags();
        let mut r = self.head();
        r.take(HEAD_LEN);
        let mut out = [None; 2];
        for (i, o) in out.iter_mut().enumerate() {
            if f & (4 << i) != 0 {
                *o = r.record();
            }
        }
        out
    }

    /// Whether this listing can be trusted for a directory whose stat is now `key`.
    pub fn valid_for(&self, key: &StatKey) -> bool {
        let k = self.key();
        k == *key && key.safely_older_than(self.taken_ns())
    }

    /// The entries, in tree order.
    pub fn slots(&self) -> Slots<'_> {
        let flags = self.flags();
        let mut r = self.head();
        r.take(HEAD_LEN + RECORD_LEN * ((flags >> 2 & 1) + (flags >> 3 & 1)) as usize);
        let left = r.u32().unwrap_or(0);
        Slots { r, left }
    }

    pub fn len(&self) -> usize {
        self.slots().left as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the record can be used: every entry readable, a real name (never `..` or a
    /// path: the walk opens names relative to their directory), unique and in tree order
    /// (or the walk would emit paths twice or out of order). Only a record made by something
    /// else than this program can fail this.
    pub fn is_well_formed(&self) -> bool {
        let mut slots = self.slots();
        let n = slots.left;
        let mut prev: Option<Slot> = None;
        let mut seen = 0;
        for s in slots.by_ref() {
            let ok = !s.name.is_empty()
                && s.name != b"."
                && s.name != b".."
                && !s.name.iter().any(|&b| b == b'/' || b == 0)
                && prev.is_none_or(|p| {
                    tree_order(
                        p.name,
                        p.ty == EntryType::Dir,
                        s.name,
                        s.ty == EntryType::Dir,
                    ) == Ordering::Less
                });
            if !ok {
                return false;
            }
            prev = Some(s);
            seen += 1;
        }
        seen == n && slots.r.0.is_empty()
    }
}

/// The entries of a [`DirRecord`].
pub struct Slots<'r> {
    r: Reader<'r>,
    left: u32,
}

impl<'r> Iterator for Slots<'r> {
    type Item = Slot<'r>;

    fn next(&mut self) -> Option<Slot<'r>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let tag = self.r.u8()?;
        let ty = EntryType::from_u8(tag & 0x7f)?;
        let n = usize::from(u16::from_le_bytes(self.r.array()?));
        let name = self.r.take(n)?;
        let file = if tag & 0x80 != 0 {
            Some(self.r.record()?)
        } else {
            None
        };
        Some(Slot { name, ty, file })
    }
}

/// Writes a record: what [`DirListing::record`] stores.
pub(super) fn encode_record(path: &[u8], l: &DirListing) -> DirRecord {
    let ignore_records = l.ignore_records.iter().flatten().count();
    let entries: usize = l
        .iter()
        .map(|s| 3 + s.name.len() + if s.file.is_some() { RECORD_LEN } else { 0 })
        .sum();
    let size = PATH_AT + path.len() + HEAD_LEN + ignore_records * RECORD_LEN + 4 + entries;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(size as u32).to_le_bytes());
    out.extend_from_slice(&(path.len() as u32).to_le_bytes());
    out.extend_from_slice(path);
    put_key(&mut out, &l.key);
    out.extend_from_slice(&l.taken_ns.to_le_bytes());
    out.extend_from_slice(&l.rules.to_le_bytes());
    let [p0, p1] = l.ignore_files.map(u8::from);
    let [r0, r1] = l.ignore_records.map(|r| u8::from(r.is_some()));
    out.push(p0 | p1 << 1 | r0 << 2 | r1 << 3);
    for r in l.ignore_records.iter().flatten() {
        put_record(&mut out, r);
    }
    out.extend_from_slice(&(l.len() as u32).to_le_bytes());
    for s in l.iter() {
        out.push(s.ty as u8 | u8::from(s.file.is_some()) << 7);
        out.extend_from_slice(&(s.name.len() as u16).to_le_bytes());
        out.extend_from_slice(s.name);
        if let Some(r) = &s.file {
            put_record(&mut out, r);
        }
    }
    debug_assert_eq!(out.len(), size);
    DirRecord(Bytes::Own(out.into_boxed_slice()))
}

pub(super) fn put_key(out: &mut Vec<u8>, k: &StatKey) {
    out.extend_from_slice(&k.size.to_le_bytes());
    out.extend_from_slice(&k.mtime_ns.to_le_bytes());
    out.extend_from_slice(&k.ctime_ns.to_le_bytes());
    out.extend_from_slice(&k.ino.to_le_bytes());
    out.extend_from_slice(&k.mode.to_le_bytes());
}

fn put_record(out: &mut Vec<u8>, r: &FileRecord) {
    put_key(out, &r.key);
    out.extend_from_slice(&r.taken_ns.to_le_bytes());
    out.extend_from_slice(&r.digest.to_le_bytes());
}

/// A bounds-checked reader over stored bytes.
pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    pub(super) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    pub(super) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub(super) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
    pub(super) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
    pub(super) fn u128(&mut self) -> Option<u128> {
        self.array().map(u128::from_le_bytes)
    }
    pub(super) fn key(&mut self) -> Option<StatKey> {
        Some(StatKey {
            size: self.u64()?,
            mtime_ns: self.u64()? as i64,
            ctime_ns: self.u64()? as i64,
            ino: self.u64()?,
            mode: self.u32()?,
        })
    }
    pub(super) fn record(&mut self) -> Option<FileRecord> {
        Some(FileRecord {
            key: self.key()?,
            taken_ns: self.u64()? as i64,
            digest: self.u128()?,
        })
    }
}

/// The record that starts at `at` in a loaded cache file, with its length; `None` if its
/// fixed fields do not fit (its entries are checked when used: [`DirRecord::is_well_formed`]).
pub(super) fn record_at(file: &Arc<Stored>, at: usize) -> Option<(DirRecord, usize)> {
    let bytes = file.get(at..)?;
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let rec = bytes.get(..len)?;
    let path_len = u32::from_le_bytes(rec.get(4..PATH_AT)?.try_into().ok()?) as usize;
    let flags = *rec.get(PATH_AT.checked_add(path_len)? + HEAD_LEN - 1)?;
    let ignore_records = usize::from((flags >> 2 & 1) + (flags >> 3 & 1));
    if rec.len() < PATH_AT + path_len + HEAD_LEN + RECORD_LEN * ignore_records + 4 {
        return None;
    }
    let at = u32::try_from(at).ok()?;
    let rec = DirRecord(Bytes::InFile {
        file: file.clone(),
        at,
        len: len as u32,
    });
    Some((rec, len))
}
