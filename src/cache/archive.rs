//! A build directory as tar + zstd, and back again, refusing anything that could write outside
//! the directory it is unpacked into.
//!
//! Unpacking trusts nothing in the archive: each path must be relative with no `..`, no entry
//! may be written through a symlink, a symlink's target must stay inside the archive, only
//! regular files, directories and symlinks are taken (no devices, fifos or hard links), and the
//! total size is bounded. Packing applies the same rules, so whatever this machine pushes,
//! another one accepts.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Entries beyond this many are refused, whatever their size: a bound on the work an archive
/// of empty files can cause.
const MAX_ENTRIES: u64 = 1_000_000;

/// What the tar stream may hold beyond its files' bytes: headers, padding, long names.
const TAR_OVERHEAD: u64 = 256 << 20;

/// A reader that fails once more than `left` bytes came through it.
struct Bounded<R> {
    inner: R,
    left: u64,
    max_size: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        match self.left.checked_sub(n as u64) {
            Some(l) => self.left = l,
            None => {
                return Err(io::Error::other(ArchiveError::TooLarge(self.max_size)));
            }
        }
        Ok(n)
    }
}

/// Why an archive was refused or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("`{0}` is an absolute path or leaves the archive")]
    UnsafePath(String),
    #[error("symlink `{path}` points outside the archive (to `{target}`)")]
    EscapingLink { path: String, target: String },
    #[error("`{path}` is a {kind}: only files, directories and symlinks are taken")]
    Kind { path: String, kind: &'static str },
    #[error("`{0}` would be written through a symlink or over another entry")]
    Clash(String),
    #[error("more than {0} bytes unpacked: the cache's max_size")]
    TooLarge(u64),
    #[error("more than {MAX_ENTRIES} entries")]
    TooMany,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Packs `dir` (an archived build) as a tar stream compressed with zstd into `out`, entries in
/// a stable order. Refuses what an unpacker would refuse.
pub fn pack(dir: &Path, out: impl Write, max_size: u64) -> Result<(), ArchiveError> {
    let enc = zstd::Encoder::new(out, 3)?;
    let mut tar = tar::Builder::new(enc);
    tar.mode(tar::HeaderMode::Deterministic);
    let mut total = 0u64;
    let mut count = 0u64;
    pack_dir(
        &mut tar,
        dir,
        Path::new(""),
        &mut total,
        &mut count,
        max_size,
    )?;
    let enc = tar.into_inner()?;
    enc.finish()?.flush()?;
    Ok(())
}

fn pack_dir<W: Write>(
    tar: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
    total: &mut u64,
    count: &mut u64,
    max_size: u64,
) -> Result<(), ArchiveError> {
    let mut names: Vec<_> = fs::read_dir(root.join(rel))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path)?;
        *count += 1;
        if *count > MAX_ENTRIES {
            return Err(ArchiveError::TooMany);
        }
        let shown = || rel.display().to_string();
        let mut h = tar::Header::new_gnu();
        h.set_mode(meta.permissions().mode() & 0o777);
        let ft = meta.file_type();
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            tar.append_data(&mut h, &rel, io::empty())?;
            pack_dir(tar, root, &rel, total, count, max_size)?;
        } else if ft.is_file() {
            *total += meta.len();
            if *total > max_size {
                return Err(ArchiveError::TooLarge(max_size));
            }
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(meta.len());
            tar.append_data(&mut h, &rel, File::open(&path)?)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&path)?;
            if !link_stays_inside(&rel, &target) {
                return Err(ArchiveError::EscapingLink {
                    path: shown(),
                    target: target.display().to_string(),
                });
            }
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            tar.append_link(&mut h, &rel, &target)?;
        } else {
            return Err(ArchiveError::Kind {
                path: shown(),
                kind: "special file",
            });
        }
    }
    Ok(())
}

/// The path of an entry made safe: relative, `.` dropped, and never `..`, a root or a prefix.
/// `None` for the archive's root itself.
fn safe_path(raw: &Path) -> Result<Option<PathBuf>, ArchiveError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(ArchiveError::UnsafePath(raw.display().to_string()));
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Whether a symlink at `rel` (relative to the archive's root) pointing to `target` stays
/// inside the archive. Its `..`s must all lead (`../../lib/x`) and be fewer than its depth:
/// they then climb real directories (unpacking never writes through a link), and what follows
/// only descends, through links that obey the same rule. A `..` after a name could climb out of
/// wherever a link among those names leads (`s -> .` makes `s/s/..` the parent of the root).
fn link_stays_inside(rel: &Path, target: &Path) -> bool {
    let mut depth = rel.components().count().saturating_sub(1);
    let mut descended = false;
    for c in target.components() {
        match c {
            Component::Normal(_) => descended = true,
            Component::CurDir => {}
            Component::ParentDir if !descended => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    !target.as_os_str().is_empty()
}

/// What unpacking wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unpacked {
    pub files: u64,
    pub bytes: u64,
}

/// Unpacks a zstd-compressed tar stream into `dest`, an empty directory, under the rules in
/// this module's comment. On an error `dest` holds a partial tree: the caller removes it.
pub fn unpack(input: impl Read, dest: &Path, max_size: u64) -> Result<Unpacked, ArchiveError> {
    unpack_tar(decompress(input, max_size)?, dest, max_size)
}

/// The tar stream inside zstd-compressed `input`, failing past `max_size` and the tar
/// overhead: the tar reader holds long names and pax headers in memory whatever their size,
/// so bounding the decompressed stream bounds them (and any zstd bomb) too.
pub fn decompress(input: impl Read, max_size: u64) -> io::Result<impl Read> {
    Ok(Bounded {
        inner: zstd::Decoder::new(input)?,
        left: max_size.saturating_add(TAR_OVERHEAD),
        max_size,
    })
}

/// [`unpack`] of a tar stream that is already decompressed.
pub fn unpack_tar(input: impl Read, dest: &Path, max_size: u64) -> Result<Unpacked, ArchiveError> {
    let mut archive = tar::Archive::new(input);
    let mut out = Unpacked::default();
    let mut count = 0u64;
    // Directories this unpack made or checked: a path below one of them is never reached
    // through a symlink, since an entry can never replace a directory.
    let mut dirs: HashSet<PathBuf> = HashSet::new();
    let mut buf = vec![0u8; 256 * 1024];
    for entry in archive.entries()? {
        let mut entry = entry?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(ArchiveError::TooMany);
        }
        let raw = entry.path()?.into_owned();
        let kind = entry.header().entry_type();
        let Some(rel) = safe_path(&raw)? else {
            if kind.is_dir() {
                continue;
            }
            return Err(ArchiveError::UnsafePath(raw.display().to_string()));
        };
        let shown = || rel.display().to_string();
        let parent = rel.parent().unwrap_or(Path::new(""));
        ensure_dirs(dest, parent, &mut dirs)?;
        let path = dest.join(&rel);
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => return Err(ArchiveError::Clash(shown())),
                    Err(_) => fs::create_dir(&path)?,
                }
                dirs.insert(rel);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                if out.bytes.saturating_add(size) > max_size {
                    return Err(ArchiveError::TooLarge(max_size));
                }
                // create_new: never over an entry written before, nor through a link.
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode | 0o600)
                    .open(&path)
                    .map_err(|e| match e.kind() {
                        io::ErrorKind::AlreadyExists => ArchiveError::Clash(shown()),
                        _ => ArchiveError::Io(e),
                    })?;
                let mut written = 0u64;
                loop {
                    let n = entry.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    f.write_all(&buf[..n])?;
                    written += n as u64;
                }
                if written != size {
                    return Err(ArchiveError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("`{}` is cut short", shown()),
                    )));
                }
                out.bytes += size;
                out.files += 1;
                if mode & 0o600 != 0o600 {
                    f.set_permissions(fs::Permissions::from_mode(mode))?;
                }
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()?
                    .ok_or_else(|| ArchiveError::UnsafePath(shown()))?
                    .into_owned();
                if !link_stays_inside(&rel, &target) {
                    return Err(ArchiveError::EscapingLink {
                        path: shown(),
                        target: target.display().to_string(),
                    });
                }
                std::os::unix::fs::symlink(&target, &path).map_err(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => ArchiveError::Clash(shown()),
                    _ => ArchiveError::Io(e),
                })?;
                out.files += 1;
            }
            other => {
                return Err(ArchiveError::Kind {
                    path: shown(),
                    kind: kind_name(other),
                });
            }
        }
    }
    Ok(out)
}

/// Makes `dest/rel` and its parents as real directories; refuses a path that meets anything
/// else on the way (a symlink planted by an earlier entry above all).
fn ensure_dirs(dest: &Path, rel: &Path, known: &mut HashSet<PathBuf>) -> Result<(), ArchiveError> {
    if rel.as_os_str().is_empty() || known.contains(rel) {
        return Ok(());
    }
    if let Some(parent) = rel.parent() {
        ensure_dirs(dest, parent, known)?;
    }
    let path = dest.join(rel);
    match fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(ArchiveError::Clash(rel.display().to_string())),
        Err(_) => fs::create_dir(&path)?,
    }
    known.insert(rel.to_path_buf());
    Ok(())
}

fn kind_name(t: tar::EntryType) -> &'static str {
    match t {
        tar::EntryType::Link => "hard link",
        tar::EntryType::Char => "character device",
        tar::EntryType::Block => "block device",
        tar::EntryType::Fifo => "fifo",
        _ => "special entry",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_judged_from_where_they_sit() {
        assert!(link_stays_inside(Path::new("a"), Path::new("b")));
        assert!(link_stays_inside(Path::new("d/a"), Path::new("../b")));
        assert!(!link_stays_inside(Path::new("a"), Path::new("../b")));
        assert!(!link_stays_inside(Path::new("d/a"), Path::new("../../b")));
        assert!(!link_stays_inside(Path::new("a"), Path::new("/etc/passwd")));
        assert!(link_stays_inside(
            Path::new("d/e/a"),
            Path::new("../../b/c")
        ));
        // Regression: `s -> .` and `t -> s/s/..` would reach the root's parent.
        assert!(!link_stays_inside(Path::new("t"), Path::new("s/s/..")));
        assert!(!link_stays_inside(
            Path::new("d/e/a"),
            Path::new("../x/../../b")
        ));
        assert!(!link_stays_inside(Path::new("a"), Path::new("")));
    }

    #[test]
    fn paths_never_leave_the_root() {
        assert_eq!(
            safe_path(Path::new("./a/./b")).unwrap(),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(safe_path(Path::new("./")).unwrap(), None);
        assert!(safe_path(Path::new("a/../../b")).is_err());
        assert!(safe_path(Path::new("/etc/passwd")).is_err());
    }

    #[test]
    fn round_trip_keeps_files_modes_and_links() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("bin/sub")).unwrap();
        fs::write(src.path().join("bin/run"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(
            src.path().join("bin/run"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        fs::write(src.path().join(".buildid"), b"x\n").unwrap();
        std::os::unix::fs::symlink("../run", src.path().join("bin/sub/link")).unwrap();
        let mut packed = Vec::new();
        pack(src.path(), &mut packed, 1 << 20).unwrap();
        let dest = tempfile::tempdir().unwrap();
        let got = unpack(&packed[..], dest.path(), 1 << 20).unwrap();
        assert_eq!(got.files, 3);
        assert_eq!(
            fs::read(dest.path().join("bin/sub/link")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        let mode = fs::metadata(dest.path().join("bin/run"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(matches!(
            unpack(&packed[..], tempfile::tempdir().unwrap().path(), 10),
            Err(ArchiveError::TooLarge(10))
        ));
    }

    #[test]
    fn packing_refuses_a_link_that_escapes() {
        let src = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.path().join("p")).unwrap();
        let err = pack(src.path(), io::sink(), 1 << 20).unwrap_err();
        assert!(matches!(err, ArchiveError::EscapingLink { .. }), "{err}");
    }
}
