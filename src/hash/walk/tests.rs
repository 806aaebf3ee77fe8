//! A warm walk (through the cache) must always agree with a cold one.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::hash::cache::{CacheWriter, DigestCache, DirListing};
use crate::hash::{CACHE_FILE, CacheUse, Entry, HashSpec, TreeHash, hash_tree};

fn put(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, content).unwrap();
}

fn tree() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    put(r, ".gitignore", "*.log\nbuild/\n!keep.log\n");
    put(r, "a.txt", "a");
    put(r, "a/b.txt", "b");
    put(r, "a/x.log", "ignored");
    put(r, "a/keep.log", "kept");
    put(r, "a/build/out.js", "ignored");
    put(r, "a/deep/er/est/f.txt", "deep");
    put(r, "a/deep/.ignore", "*.tmp\n");
    put(r, "a/deep/t.tmp", "ignored");
    put(r, "b/c.txt", "c");
    put(r, "b/d/e.txt", "e");
    put(r, "run.sh", "#!/bin/sh\n");
    fs::set_permissions(r.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("a.txt", r.join("link")).unwrap();
    t
}

fn hash(root: &Path, cache: CacheUse) -> TreeHash {
    hash_tree(&HashSpec::dir(root), cache).unwrap()
}

fn paths(h: &TreeHash) -> Vec<(String, u128)> {
    h.entries
        .iter()
        .map(|e: &Entry| (String::from_utf8_lossy(&e.path).into_owned(), e.digest))
        .collect()
}

/// Pretends every record was taken far in the future, so that the racy rule trusts them all:
/// what a settled tree's cache looks like, without waiting for it.
fn settle(root: &Path) {
    let path = root.join(CACHE_FILE);
    let cache = DigestCache::load(&path);
    assert!(!cache.is_empty(), "a cache was written");
    let mut settled = DigestCache::default();
    for rec in cache.iter() {
        let rel = rec.path();
        let mut l = DirListing::of(rec).unwrap();
        l.taken_ns = i64::MAX / 2;
        for i in 0..l.len() {
            if let Some(mut f) = l.get(i).file {
                f.taken_ns = i64::MAX / 2;
                l.set_file(i, Some(f));
            }
        }
        for r in l.ignore_records.iter_mut().flatten() {
            r.taken_ns = i64::MAX / 2;
        }
        settled.insert(l.record(rel));
    }
    settled.save(&path).unwrap();
}

/// Hashes warm (after `change`) and cold, and checks they agree; returns the warm hash.
fn warm_after(root: &Path, change: impl FnOnce(&Path)) -> TreeHash {
    hash(root, CacheUse::Persist);
    settle(root);
    change(root);
    let warm = hash(root, CacheUse::Persist);
    let cold = hash(root, CacheUse::None);
    assert_eq!(paths(&warm), paths(&cold), "warm vs cold entries");
    assert_eq!(warm.id, cold.id);
    // And the cache it left agrees too.
    let again = hash(root, CacheUse::Persist);
    assert_eq!(again.id, cold.id, "the next warm hash");
    warm
}

#[test]
fn a_settled_tree_is_served_from_the_cache() {
    let t = tree();
    let h = warm_after(t.path(), |_| {});
    let s = &h.timings.stats;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    assert_eq!(get(&s.files_read), 0, "{}", h.timings);
    assert_eq!(get(&s.dirs_listed), 0, "{}", h.timings);
    assert!(h.changed.is_empty(), "{:?}", h.changed);
    let names: Vec<String> = paths(&h).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        names,
        [
            ".gitignore",
            "a.txt",
            "a/b.txt",
            "a/deep/.ignore",
            "a/deep/er/est/f.txt",
            "a/keep.log",
            "b/c.txt",
            "b/d/e.txt",
            "link",
            "run.sh"
        ]
    );
}

#[test]
fn changes_are_seen_through_the_cache() {
    type Change = (&'static str, fn(&Path), &'static [&'static str]);
    let cases: [Change; 10] = [
        (
            "same-size rewrite",
            |r| put(r, "a/b.txt", "B"),
            &["a/b.txt"],
        ),
        (
            "new file deep down",
            |r| put(r, "a/deep/er/new.txt", "n"),
            &["a/deep/er/new.txt"],
        ),
        (
            "removed file",
            |r| fs::remove_file(r.join("b/d/e.txt")).unwrap(),
            &["b/d/e.txt"],
        ),
        (
            "directory replaced by a file",
            |r| {
                fs::remove_dir_all(r.join("b/d")).unwrap();
                put(r, "b/d", "now a file");
            },
            &["b/d", "b/d/e.txt"],
        ),
        (
            "file replaced by a directory",
            |r| {
                fs::remove_file(r.join("a/b.txt")).unwrap();
                put(r, "a/b.txt/inner", "i");
            },
            &["a/b.txt", "a/b.txt/inner"],
        ),
        (
            "symlink retargeted",
            |r| {
                fs::remove_file(r.join("link")).unwrap();
                symlink("b", r.join("link")).unwrap();
            },
            &[],
        ),
        (
            "ignore file edited",
            |r| put(r, "a/deep/.ignore", "*.txt\n"),
            &["a/deep/.ignore", "a/deep/er/est/f.txt", "a/deep/t.tmp"],
        ),
        (
            "ignore file removed",
            |r| fs::remove_file(r.join("a/deep/.ignore")).unwrap(),
            &["a/deep/.ignore", "a/deep/t.tmp"],
        ),
        (
            "exec bit",
            |r| fs::set_permissions(r.join("a.txt"), fs::Permissions::from_mode(0o755)).unwrap(),
            // The same content: only the id tells.
            &[],
        ),
        (
            "renamed directory",
            |r| fs::rename(r.join("b"), r.join("c")).unwrap(),
            &["b/c.txt", "b/d/e.txt", "c/c.txt", "c/d/e.txt"],
        ),
    ];
    for (what, change, changed) in cases {
        let t = tree();
        let h = warm_after(t.path(), change);
        assert_eq!(h.changed, changed.to_vec(), "{what}");
    }
}

#[test]
fn records_written_during_the_walk_make_the_same_cache() {
    let t = tree();
    let root = t.path();
    let stats = Stats::default();
    let empty = DigestCache::default();
    let top = || Level::top(root, root, &[]);
    let out = Walker::new(root, &empty, &[], &stats).run(top()).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let path = elsewhere.path().join("written");
    let w = CacheWriter::create(&path).unwrap();
    let out2 = Walker::new(root, &empty, &[], &stats)
        .records(Records::Write(&w))
        .run(top())
        .unwrap();
    w.finish().unwrap();
    assert!(out2.cache.is_empty());
    let written = DigestCache::load(&path);
    assert_eq!(written.len(), out.cache.len());
    for a in out.cache.iter() {
        let b = written.get(a.path()).unwrap();
        // The same listings (the moments they were taken differ).
        let (a, b) = (DirListing::of(a).unwrap(), DirListing::of(b).unwrap());
        let names = |l: &DirListing| {
            l.iter()
                .map(|s| (s.name.to_vec(), s.ty))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&a), names(&b));
    }
}

#[test]
fn a_deep_tree_is_walked() {
    // Deeper than any stack or descriptor limit would allow if either grew with depth.
    let t = tempfile::tempdir().unwrap();
    let mut rel = String::new();
    for _ in 0..1500 {
        rel.push_str("d/");
    }
    put(t.path(), &format!("{rel}f.txt"), "deep");
    let h = warm_after(t.path(), |r| put(r, "d/d/g.txt", "g"));
    assert_eq!(h.entries.len(), 2);
}

#[test]
fn a_listing_wrong_about_types_still_gives_the_right_entries() {
    // What a race between listing and stat looks like: the (trusted) listing of the root
    // says `a` is a directory and `b` a file, the other way round.
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    put(r, "a", "a file");
    put(r, "a.txt", "x");
    put(r, "b/c.txt", "c");
    put(r, "b.txt", "y");
    hash(r, CacheUse::Persist);
    settle(r);
    let path = r.join(CACHE_FILE);
    let mut cache = DigestCache::load(&path);
    let l = DirListing::of(cache.get(b"").unwrap()).unwrap();
    let mut swapped = l.clone();
    swapped.retain(|_, _| false);
    for s in l.iter() {
        let ty = match s.name {
            b"a" => EntryType::Dir,
            b"b" => EntryType::File,
            _ => s.ty,
        };
        swapped.push(s.name, ty, s.file);
    }
    swapped.sort();
    cache.insert(swapped.record(b""));
    cache.save(&path).unwrap();
    let warm = hash(r, CacheUse::Persist);
    let cold = hash(r, CacheUse::None);
    assert_eq!(paths(&warm), paths(&cold));
    assert_eq!(warm.id, cold.id);
}
