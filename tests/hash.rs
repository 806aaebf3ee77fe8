//! `pmesh-dev hash`: which files make up a tree (checked against git itself), what the build id
//! depends on and what it must not depend on, the digest cache, and odd files.

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::util::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Writes `content` to `root/rel` (a byte path, so that names need not be UTF-8).
fn put(root: &Path, rel: impl AsRef<[u8]>, content: &[u8]) -> PathBuf {
    let p = root.join(OsStr::from_bytes(rel.as_ref()));
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).expect("create parent");
    }
    fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    p
}

fn link(root: &Path, rel: &str, target: &str) {
    let p = root.join(rel);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).expect("create parent");
    }
    let _ = fs::remove_file(&p);
    symlink(target, &p).unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

fn set_mtime(p: &Path, t: SystemTime) {
    fs::File::options()
        .write(true)
        .open(p)
        .and_then(|f| f.set_modified(t))
        .unwrap_or_else(|e| panic!("set mtime of {}: {e}", p.display()));
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// Paths for messages, one per line.
fn show(paths: &[Vec<u8>]) -> String {
    paths
        .iter()
        .map(|p| format!("  {}", String::from_utf8_lossy(p)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Panics with what is missing and what is extra unless `actual == expected`.
fn assert_same_paths(actual: &[Vec<u8>], expected: &[Vec<u8>], what: &str) {
    if actual == expected {
        return;
    }
    let missing: Vec<Vec<u8>> = expected
        .iter()
        .filter(|p| !actual.contains(p))
        .cloned()
        .collect();
    let extra: Vec<Vec<u8>> = actual
        .iter()
        .filter(|p| !expected.contains(p))
        .cloned()
        .collect();
    panic!(
        "{what}: file sets differ\n--- expected ({}):\n{}\n--- actual ({}):\n{}\n--- missing from actual:\n{}\n--- extra in actual:\n{}",
        expected.len(),
        show(expected),
        actual.len(),
        show(actual),
        show(&missing),
        show(&extra),
    );
}

/// Parses `hash --list` output, checking its format: `<32 lowercase hex>  <path>` per line,
/// sorted by path bytes, nothing else.
fn parse_list(stdout: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    if stdout.is_empty() {
        return out;
    }
    assert!(
        stdout.ends_with(b"\n"),
        "--list output must end with a newline: {:?}",
        String::from_utf8_lossy(stdout)
    );
    for line in stdout[..stdout.len() - 1].split(|b| *b == b'\n') {
        let ok = line.len() > 34
            && line[..32]
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
            && &line[32..34] == b"  ";
        assert!(
            ok,
            "bad --list line (want `<32 hex>  <path>`): {:?}",
            String::from_utf8_lossy(line)
        );
        out.push((
            String::from_utf8(line[..32].to_vec()).unwrap(),
            line[34..].to_vec(),
        ));
    }
    let paths: Vec<&Vec<u8>> = out.iter().map(|(_, p)| p).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        paths, sorted,
        "--list must be sorted by path bytes without duplicates"
    );
    out
}

/// `pmesh-dev hash ARGS --list`, parsed.
fn list(t: &Tmp, args: &[&str]) -> Vec<(String, Vec<u8>)> {
    let mut a = vec!["hash"];
    a.extend_from_slice(args);
    a.push("--list");
    let r = t.run(&a).ok();
    parse_list(&r.0.stdout)
}

fn list_paths(t: &Tmp, args: &[&str]) -> Vec<Vec<u8>> {
    list(t, args).into_iter().map(|(_, p)| p).collect()
}

/// The id `pmesh-dev hash ARGS` prints, checked to be 32 lowercase hex digits.
fn id(t: &Tmp, args: &[&str]) -> String {
    let mut a = vec!["hash"];
    a.extend_from_slice(args);
    let r = t.run(&a).ok();
    let out = r.stdout();
    let id = out.trim_end_matches('\n');
    assert!(
        id.len() == 32
            && id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "`pmesh-dev {}` should print one 32-hex id, got {out:?}\n--- stderr\n{}",
        a.join(" "),
        r.stderr()
    );
    id.to_owned()
}

/// The id of `service` (whose root is `root`) computed without any digest cache: the cache
/// file is moved aside inside `.pmesh/` (never hashed) and put back afterwards, so a warm
/// cache stays warm.
fn cold_id(t: &Tmp, root: &Path, service: &str) -> String {
    let cache = root.join(".pmesh/digests");
    let saved = root.join(".pmesh/saved-digests-for-test");
    let had = cache.is_file();
    if had {
        fs::rename(&cache, &saved).expect("move cache away");
    }
    let id = id(t, &[service]);
    if had {
        fs::rename(&saved, &cache).expect("put cache back");
    } else {
        let _ = fs::remove_file(&cache);
    }
    id
}

/// Whether a relative path goes through a name pmesh-dev always leaves out.
fn always_excluded(path: &[u8]) -> bool {
    path.split(|b| *b == b'/').any(|c| {
        matches!(c, b".git" | b".build" | b".run" | b".pmesh") || c.starts_with(b".build-")
    })
}

/// Runs `cmd`, killing it and failing the test if it takes longer than `secs`.
fn run_with_timeout(mut cmd: Command, secs: u64) -> Run {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn pmesh-dev");
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        b
    });
    let e = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = e.join().unwrap_or_default();
            panic!(
                "{cmd:?} did not finish within {secs} s (killed)\n--- stderr\n{}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run(Output {
        status,
        stdout: o.join().unwrap_or_default(),
        stderr: e.join().unwrap_or_default(),
    })
}

/// Copies a tree, keeping symlinks as symlinks and permissions; skips anything else.
fn copy_tree(src: &Path, dest: &Path) {
    fs::create_dir_all(dest).expect("create dest");
    for e in fs::read_dir(src).expect("list").flatten() {
        let from = e.path();
        let to = dest.join(e.file_name());
        let ft = e.file_type().expect("file type");
        if ft.is_symlink() {
            symlink(fs::read_link(&from).unwrap(), &to).expect("copy symlink");
        } else if ft.is_dir() {
            copy_tree(&from, &to);
        } else if ft.is_file() {
            fs::copy(&from, &to).expect("copy file");
        }
    }
}

/// Every regular file below `dir` (not following symlinks).
fn regular_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).expect("list").flatten() {
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            regular_files(&e.path(), out);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

/// How long the digest cache needs before it trusts a file (git's racy-timestamp rule with
/// pmesh-dev's two-second margin), plus slack.
const SETTLE: Duration = Duration::from_millis(2300);

// ---------------------------------------------------------------------------------------------
// The tree that is compared with git
// ---------------------------------------------------------------------------------------------

/// A tree with nested ignore files, negations, anchored and directory-only patterns, escapes,
/// character classes, `**`, symlinks and awkward names; plus pmesh-dev's own directories,
/// which no ignore file excludes (a negation even tries to re-include two of them).
fn gen_tree(root: &Path) {
    let gitignore = [
        "# a comment line",
        "*.log",
        "!keep.log",
        "/build",
        "tmp/",
        "*.o",
        "\\#literal.txt",
        "#hash.txt",
        "out/*",
        "!out/keep",
        "docs/*.md",
        "**/cache",
        "a/**/z.txt",
        "[Bb]ackup*",
        "?.swp",
        "*.TMP",
        "trailing.txt   ",
        "sp\\ ace\\ ",
        "ignored_dir/",
        "!ignored_dir/inside.txt",
        "-dash-ignored.txt",
        "linkdir/",
        "\\!bang.txt",
        "\\[abc\\].txt",
        "*.txt/",
        "",
        "!.pmesh/",
        "!.build/",
    ]
    .join("\n")
        + "\n";
    put(root, ".gitignore", gitignore.as_bytes());
    // A nested file: its negation re-includes what the parent ignores, its own patterns
    // apply below it, and `/anchored.dat` only next to it.
    put(
        root,
        "sub/.gitignore",
        b"!debug.log\n*.txt\n!important.txt\n/anchored.dat\n",
    );
    // Deeper still: re-includes what `sub/.gitignore` ignores.
    put(root, "sub/deep/.gitignore", b"!*.txt\n");
    // Negations and directories: `/*` then re-including one directory.
    put(root, "only/.gitignore", b"/*\n!/.gitignore\n!/kept/\n");

    let files: &[&[u8]] = &[
        b"keep.log",
        b"other.log",
        b"sub/deep/x.log",
        b"sub/deep/keep.log",
        b"build/out.bin",
        b"sub/build/out.bin",
        b"tmp/t.txt",
        b"sub/tmp/t.txt",
        b"other/tmp",
        b"a.o",
        b"sub/deep/b.o",
        b"#literal.txt",
        b"#hash.txt",
        b"out/a.txt",
        b"out/keep",
        b"docs/readme.md",
        b"docs/sub/readme.md",
        b"docs/guide.txt",
        b"x/cache/c.txt",
        b"cache/c2.txt",
        b"a/z.txt",
        b"a/b/c/z.txt",
        b"b/a/z.txt",
        b"Backup1",
        b"backup.txt",
        b"xbackup",
        b"q.swp",
        b"qq.swp",
        b"FILE.TMP",
        b"file.tmp",
        b"trailing.txt",
        b"sp ace ",
        b"sp ace",
        b"ignored_dir/inside.txt",
        b"-dash-ignored.txt",
        b"-rf.txt",
        b"--",
        b"with space.txt",
        "ünï cødé.txt".as_bytes(),
        "dir with space/ünï/ƒile.txt".as_bytes(),
        b"bad\xffname.txt",
        b"!bang.txt",
        b"[abc].txt",
        b"a.txt",
        b"dir.txt/f",
        b"star*.txt",
        b"q?.txt",
        b"back\\slash",
        b".env",
        b".hidden/dot.txt",
        b"sub/debug.log",
        b"sub/deep/debug.log",
        b"sub/a.txt",
        b"sub/important.txt",
        b"sub/deep/b.txt",
        b"sub/anchored.dat",
        b"sub/deep/anchored.dat",
        b"only-ignored/x.log",
        b"only/dropped.txt",
        b"only/kept/k.txt",
        b"only/gone/g.txt",
        // Byte order of whole paths differs from a per-directory sort by name.
        b"sort/a-b",
        b"sort/a.b",
        b"sort/a/b",
        b"sort/a0",
        b"sort/A",
        b"sort/\xc3\xa9",
        b"sort/z",
        // pmesh-dev's own names: git lists these, pmesh-dev must not.
        b".build/b",
        b".build-20240101T000000.000Z/.buildid",
        b".build-x/artifact",
        b".pmesh/digests",
        // Merely similar names are ordinary files.
        b".buildfoo",
        b".run.txt",
        b".pmeshrc",
    ];
    for (i, f) in files.iter().enumerate() {
        put(root, f, format!("content {i}\n").as_bytes());
    }
    put(root, "run.sh", b"#!/bin/sh\necho hi\n");
    chmod(&root.join("run.sh"), 0o755);
    put(root, "empty.txt", b"");
    fs::create_dir_all(root.join("empty-dir/nested")).unwrap();
    link(root, "link-to-file", "keep.log");
    link(root, "link-to-dir", "sub");
    link(root, "linkdir", "sub");
    link(root, "dangling", "does/not/exist");
    link(root, ".run", ".build-20240101T000000.000Z");
}

// ---------------------------------------------------------------------------------------------
// 1. The file set is git's
// ---------------------------------------------------------------------------------------------

#[test]
fn file_set_equals_git_ls_files_on_a_fresh_repo() {
    let t = Tmp::new();
    let repo = t.join("repo");
    gen_tree(&repo);

    let git_all = git_untracked_bytes(&repo, &t.join("empty-home"));
    // The test means something only if git does see pmesh-dev's own directories.
    for own in [
        &b".build/b"[..],
        b".build-x/artifact",
        b".pmesh/digests",
        b".run",
    ] {
        assert!(
            git_all.iter().any(|p| p == own),
            "git should list {}, which no ignore file excludes; git listed:\n{}",
            String::from_utf8_lossy(own),
            show(&git_all)
        );
    }
    let expected: Vec<Vec<u8>> = git_all
        .iter()
        .filter(|p| !always_excluded(p))
        .cloned()
        .collect();

    let entries = list(&t, &[s(&repo)]);
    let actual: Vec<Vec<u8>> = entries.iter().map(|(_, p)| p.clone()).collect();
    assert_same_paths(
        &actual,
        &expected,
        "`hash DIR --list` against `git ls-files --others --exclude-standard` minus .git, .build, .build-*, .run, .pmesh",
    );
    for p in &actual {
        assert!(
            !always_excluded(p),
            "{} must never be hashed",
            String::from_utf8_lossy(p)
        );
    }

    // Each regular file's digest is the xxh3-128 of its content.
    for (digest, p) in &entries {
        let abs = repo.join(OsStr::from_bytes(p));
        let meta = fs::symlink_metadata(&abs).unwrap();
        if meta.is_file() {
            let want = format!(
                "{:032x}",
                xxhash_rust::xxh3::xxh3_128(&fs::read(&abs).unwrap())
            );
            assert_eq!(
                digest,
                &want,
                "digest of {} should be the xxh3-128 of its content",
                String::from_utf8_lossy(p)
            );
        }
    }

    // The same tree without any `.git` gives the same list and the same id.
    let plain = t.join("plain");
    gen_tree(&plain);
    let plain_list = list_paths(&t, &[s(&plain)]);
    assert_same_paths(
        &plain_list,
        &actual,
        "a tree without .git against the same tree inside a git repository",
    );
    assert_eq!(
        id(&t, &[s(&plain)]),
        id(&t, &[s(&repo)]),
        "the .git directory must not change the id"
    );
}

#[test]
fn service_file_set_follows_ignore_files_above_the_service_root() {
    // The manifest's directory is the root of the ignore rules: patterns there (and in the
    // directories between it and the service root) apply to the service's files.
    let t = Tmp::new();
    let top = t.join("project");
    put(
        &top,
        ".gitignore",
        b"*.log\ngen/\n/svc/inner/secret.txt\n/top-only.txt\nsvc/inner/anch/\n*.dat\n",
    );
    put(&top, "svc/.gitignore", b"!keep.log\n/local.txt\n");
    put(&top, "svc/inner/.gitignore", b"!keep.dat\n");
    for f in [
        "svc/inner/a.log",
        "svc/inner/keep.log",
        "svc/inner/gen/x",
        "svc/inner/deep/gen/y",
        "svc/inner/secret.txt",
        "svc/inner/deep/secret.txt",
        "svc/inner/top-only.txt",
        "svc/inner/anch/f",
        "svc/inner/x/anch/f",
        "svc/inner/b.dat",
        "svc/inner/keep.dat",
        "svc/inner/local.txt",
        "svc/local.txt",
        "svc/inner/ok.txt",
        "svc/inner/.env",
    ] {
        put(&top, f, f.as_bytes());
    }
    put(
        &top,
        "pmesh.toml",
        b"[services.s]\nroot = \"svc/inner\"\nbuild = \"true\"\n",
    );
    let git: Vec<Vec<u8>> = git_untracked_bytes(&top, &t.join("empty-home"))
        .into_iter()
        .filter_map(|p| p.strip_prefix(b"svc/inner/".as_slice()).map(<[u8]>::to_vec))
        .collect();
    assert!(
        git.contains(&b"keep.log".to_vec()) && !git.contains(&b"a.log".to_vec()),
        "sanity: git should apply the top .gitignore below svc/inner: {}",
        show(&git)
    );
    let mut cmd = t.cmd(&["hash", "s", "--list"]);
    cmd.current_dir(&top);
    let r = Run(cmd.output().expect("run")).ok();
    let actual: Vec<Vec<u8>> = parse_list(&r.0.stdout)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_same_paths(
        &actual,
        &git,
        "`hash SERVICE --list` against git's list below the service root",
    );
}

#[test]
fn dot_ignore_files_apply_like_gitignore() {
    let t = Tmp::new();
    let d = t.join("d");
    put(&d, ".gitignore", b"*.log\n");
    put(&d, ".ignore", b"secret.txt\n");
    put(&d, "sub/.ignore", b"*.tmp\n");
    for f in ["a.txt", "secret.txt", "x.log", "sub/b.tmp", "sub/c.txt"] {
        put(&d, f, b"x");
    }
    let got = list_paths(&t, &[s(&d)]);
    let want: Vec<Vec<u8>> = [".gitignore", ".ignore", "a.txt", "sub/.ignore", "sub/c.txt"]
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    assert_same_paths(&got, &want, ".ignore files exclude like .gitignore");
}

// ---------------------------------------------------------------------------------------------
// 2. Stable across paths and mtimes
// ---------------------------------------------------------------------------------------------

#[test]
fn id_is_stable_across_paths_mtimes_and_permissions_other_than_exec() {
    let t = Tmp::new();
    let a = t.join("one");
    gen_tree(&a);
    let b = t.join("somewhere/else/entirely/two");
    copy_tree(&a, &b);
    // Different mtimes everywhere, and group/other permission bits that differ by umask.
    let mut files = Vec::new();
    regular_files(&b, &mut files);
    for (i, f) in files.iter().enumerate() {
        set_mtime(
            f,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + i as u64 * 7919),
        );
        let mode = fs::metadata(f).unwrap().permissions().mode() & 0o777;
        chmod(f, if mode & 0o100 != 0 { 0o700 } else { 0o600 });
    }

    let (ia, ib) = (id(&t, &[s(&a)]), id(&t, &[s(&b)]));
    assert_eq!(ia, ib, "same tree at another path with other mtimes");
    let ja = t.run(&["hash", s(&a), "--json"]).ok().json_lines();
    let jb = t.run(&["hash", s(&b), "--json"]).ok().json_lines();
    assert_eq!(ja, jb, "--json of the same tree");
    assert_eq!(
        list(&t, &[s(&a)]),
        list(&t, &[s(&b)]),
        "--list of the same tree"
    );

    // From another working directory, with a relative DIR, the id is the same too.
    let mut cmd = t.cmd(&["hash", "entirely/two"]);
    cmd.current_dir(t.join("somewhere/else"));
    let r = Run(cmd.output().unwrap()).ok();
    assert_eq!(r.stdout().trim(), ia, "relative DIR from another directory");

    // A service at another path: copy the whole project.
    let p1 = t.join("p1");
    put(
        &p1,
        "pmesh.toml",
        b"[services.app]\nbuild = [\"echo one\", \"echo two\"]\nenv = { A = \"1\" }\n",
    );
    copy_tree(&a, &p1.join("app"));
    let p2 = t.join("deeper/p2");
    copy_tree(&p1, &p2);
    let run_in = |dir: &Path| {
        let mut c = t.cmd(&["hash", "app"]);
        c.current_dir(dir);
        Run(c.output().unwrap()).ok().stdout()
    };
    let (s1, s2) = (run_in(&p1), run_in(&p2));
    assert_eq!(s1, s2, "a service's id at two paths");
    // And again with warm caches.
    assert_eq!(run_in(&p1), s1, "warm cache, first copy");
    assert_eq!(run_in(&p2), s2, "warm cache, second copy");
}

#[test]
fn json_reports_id_files_and_bytes() {
    let t = Tmp::new();
    let d = t.join("d");
    put(&d, "a.txt", b"hello");
    put(&d, "sub/b.bin", &[0u8; 1000]);
    put(&d, ".env", b"X=1\n");
    put(&d, "ignored.log", b"nope");
    put(&d, ".gitignore", b"*.log\n");
    let plain = id(&t, &[s(&d)]);
    let v = t.run(&["hash", s(&d), "--json"]).ok().json_lines();
    assert_eq!(v.len(), 1, "--json prints one line: {v:?}");
    let v = &v[0];
    let obj = v.as_object().expect("an object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["bytes", "files", "id"], "keys of {v}");
    assert_eq!(v["id"], plain.as_str(), "--json id vs plain id");
    assert_eq!(v["files"], 4, "a.txt, sub/b.bin, .env, .gitignore: {v}");
    assert_eq!(v["bytes"], 5 + 1000 + 4 + 6, "sum of the file sizes: {v}");
}

#[test]
fn large_files_are_digested_like_small_ones() {
    // Files above the whole-read limit are streamed; their digest must still be the xxh3-128
    // of the whole content.
    let t = Tmp::new();
    let d = t.join("d");
    let mut sizes = vec![0usize, 1, 4095, 4096, 65_537];
    sizes.extend([(4 << 20) - 1, 4 << 20, (4 << 20) + 1, (9 << 20) + 7]);
    for (i, n) in sizes.iter().enumerate() {
        let content: Vec<u8> = (0..*n).map(|j| (j * 31 + i) as u8).collect();
        put(&d, format!("f{i:02}"), &content);
    }
    let entries = list(&t, &[s(&d)]);
    assert_eq!(entries.len(), sizes.len(), "one entry per file");
    for (digest, p) in entries {
        let content = fs::read(d.join(OsStr::from_bytes(&p))).unwrap();
        assert_eq!(
            digest,
            format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&content)),
            "digest of {} ({} bytes)",
            String::from_utf8_lossy(&p),
            content.len()
        );
    }
}

#[test]
fn building_a_nested_service_does_not_change_the_outer_id() {
    // pmesh-dev's own names are left out at every depth, so building a service whose root is
    // inside another's never changes the outer one's id.
    let t = Tmp::new();
    t.write(
        "pmesh.toml",
        r#"[services.outer]
root = "."
build = "true"

[services.api]
build = "echo ok > \"$PMESH_BUILD_DIR/out\""
"#,
    );
    t.write("index.html", "hi\n");
    t.write("api/main.py", "print(1)\n");
    let before = id(&t, &["outer"]);
    t.run(&["build", "api"]).ok();
    assert_run_sound(&t.join("api"));
    t.run(&["build", "api", "--force"]).ok();
    assert_eq!(
        id(&t, &["outer"]),
        before,
        "api/.build-*, api/.run and api/.pmesh must not count for `outer`"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. What the id depends on
// ---------------------------------------------------------------------------------------------

/// Applies each change, expects the id to differ (or not), undoes it and expects the
/// original id back. `hash` is how the id is computed (a directory or a cached service).
fn check_sensitivity(root: &Path, outside: &Path, hash: &dyn Fn() -> String) {
    let base = hash();
    type Step<'a> = (&'a str, bool, Box<dyn Fn() + 'a>, Box<dyn Fn() + 'a>);
    let p = |rel: &str| root.join(rel);
    let steps: Vec<Step> = vec![
        (
            "same-size content change",
            true,
            Box::new(|| {
                fs::write(p("a.txt"), b"AAAA").unwrap();
            }),
            Box::new(|| fs::write(p("a.txt"), b"aaaa").unwrap()),
        ),
        (
            "appended byte",
            true,
            Box::new(|| fs::write(p("sub/b.txt"), b"bbbb!").unwrap()),
            Box::new(|| fs::write(p("sub/b.txt"), b"bbbb").unwrap()),
        ),
        (
            "exec bit set",
            true,
            Box::new(|| chmod(&p("a.txt"), 0o755)),
            Box::new(|| chmod(&p("a.txt"), 0o644)),
        ),
        (
            "exec bit cleared",
            true,
            Box::new(|| chmod(&p("tool.sh"), 0o644)),
            Box::new(|| chmod(&p("tool.sh"), 0o755)),
        ),
        (
            "symlink retargeted",
            true,
            Box::new(|| link(root, "ln", "sub/b.txt")),
            Box::new(|| link(root, "ln", "a.txt")),
        ),
        (
            "symlink replaced by a file holding its target",
            true,
            Box::new(|| {
                fs::remove_file(p("ln")).unwrap();
                fs::write(p("ln"), b"a.txt").unwrap();
            }),
            Box::new(|| link(root, "ln", "a.txt")),
        ),
        (
            "file renamed",
            true,
            Box::new(|| fs::rename(p("a.txt"), p("c.txt")).unwrap()),
            Box::new(|| fs::rename(p("c.txt"), p("a.txt")).unwrap()),
        ),
        (
            "file moved into a subdirectory",
            true,
            Box::new(|| fs::rename(p("a.txt"), p("sub/a.txt")).unwrap()),
            Box::new(|| fs::rename(p("sub/a.txt"), p("a.txt")).unwrap()),
        ),
        (
            "empty file added",
            true,
            Box::new(|| fs::write(p("sub/new"), b"").unwrap()),
            Box::new(|| fs::remove_file(p("sub/new")).unwrap()),
        ),
        (
            "file deleted",
            true,
            Box::new(|| fs::remove_file(p("sub/b.txt")).unwrap()),
            Box::new(|| fs::write(p("sub/b.txt"), b"bbbb").unwrap()),
        ),
        (
            ".env edited",
            true,
            Box::new(|| fs::write(p(".env"), b"KEY=2\n").unwrap()),
            Box::new(|| fs::write(p(".env"), b"KEY=1\n").unwrap()),
        ),
        (
            "content of a file outside the tree that a symlink points to",
            false,
            Box::new(|| fs::write(outside, b"changed outside, longer").unwrap()),
            Box::new(|| fs::write(outside, b"outside").unwrap()),
        ),
        (
            "empty directory added (directories are not entries)",
            false,
            Box::new(|| fs::create_dir_all(p("sub/empty/deeper")).unwrap()),
            Box::new(|| fs::remove_dir_all(p("sub/empty")).unwrap()),
        ),
        (
            "mtime changed",
            false,
            Box::new(|| set_mtime(&p("a.txt"), SystemTime::UNIX_EPOCH)),
            Box::new(|| set_mtime(&p("a.txt"), SystemTime::now())),
        ),
        (
            "read permission for others removed (only the exec bit counts)",
            false,
            Box::new(|| chmod(&p("a.txt"), 0o600)),
            Box::new(|| chmod(&p("a.txt"), 0o644)),
        ),
        (
            "file rewritten with the same content",
            false,
            Box::new(|| fs::write(p("a.txt"), b"aaaa").unwrap()),
            Box::new(|| {}),
        ),
    ];
    let mut seen = vec![(base.clone(), "the original tree")];
    for (what, changes, apply, undo) in &steps {
        apply();
        let changed = hash();
        if *changes {
            for (other, whose) in &seen {
                assert_ne!(
                    &changed, other,
                    "after `{what}` the id must differ from the id of {whose}"
                );
            }
            seen.push((changed, *what));
        } else {
            assert_eq!(changed, base, "`{what}` must not change the id");
        }
        undo();
        assert_eq!(
            hash(),
            base,
            "undoing `{what}` must give the original id back"
        );
    }
}

fn sensitivity_tree(root: &Path, outside: &Path) {
    put(root, "a.txt", b"aaaa");
    put(root, "sub/b.txt", b"bbbb");
    put(root, "tool.sh", b"#!/bin/sh\n");
    chmod(&root.join("tool.sh"), 0o755);
    put(root, ".env", b"KEY=1\n");
    fs::write(outside, b"outside").unwrap();
    link(root, "ln", "a.txt");
    link(root, "out", s(outside));
}

#[test]
fn id_is_sensitive_to_content_exec_bit_symlink_target_and_renames_of_a_directory() {
    let t = Tmp::new();
    let d = t.join("d");
    let outside = t.join("outside.txt");
    sensitivity_tree(&d, &outside);
    check_sensitivity(&d, &outside, &|| id(&t, &[s(&d)]));
}

#[test]
fn id_is_sensitive_to_the_same_changes_for_a_cached_service() {
    // The same changes, each hashed right after the previous hash with the digest cache
    // persisted under .pmesh: the cache must never hide a change.
    let t = Tmp::new();
    one_service(&t, &["true"], "");
    let outside = t.join("outside.txt");
    sensitivity_tree(&t.join("app"), &outside);
    check_sensitivity(&t.join("app"), &outside, &|| id(&t, &["app"]));
    assert!(
        t.join("app/.pmesh/digests").is_file(),
        "hashing a service persists its digest cache under .pmesh/"
    );
}

#[test]
fn symlinks_are_entries_and_never_followed() {
    let t = Tmp::new();
    let d = t.join("d");
    put(&d, "real/inner.txt", b"x");
    put(t.path(), "elsewhere/far.txt", b"far");
    link(&d, "to-dir", "real");
    link(&d, "to-outside-dir", s(&t.join("elsewhere")));
    link(&d, "dangling", "missing/file");
    link(&d, "loop", "loop");
    let got = list(&t, &[s(&d)]);
    let paths: Vec<Vec<u8>> = got.iter().map(|(_, p)| p.clone()).collect();
    let want: Vec<Vec<u8>> = [
        "dangling",
        "loop",
        "real/inner.txt",
        "to-dir",
        "to-outside-dir",
    ]
    .iter()
    .map(|p| p.as_bytes().to_vec())
    .collect();
    assert_same_paths(&paths, &want, "symlinks listed as entries, not followed");
    let before = id(&t, &[s(&d)]);
    put(t.path(), "elsewhere/far.txt", b"changed far away");
    put(t.path(), "elsewhere/new.txt", b"new");
    assert_eq!(
        id(&t, &[s(&d)]),
        before,
        "what a symlink points to outside the tree must not count"
    );
}

#[test]
fn recipe_is_part_of_a_services_id() {
    let t = Tmp::new();
    put(t.path(), "app/index.html", b"<h1>hi</h1>\n");
    let with = |body: &str| -> String {
        t.write("pmesh.toml", &format!("[services.app]\n{body}\n"));
        id(&t, &["app"])
    };
    let base = with("build = [\"echo one\", \"echo two\"]\nenv = { A = \"1\" }");
    let changing = [
        (
            "a step edited",
            "build = [\"echo one\", \"echo 2\"]\nenv = { A = \"1\" }",
        ),
        (
            "a step added",
            "build = [\"echo one\", \"echo two\", \"true\"]\nenv = { A = \"1\" }",
        ),
        (
            "steps reordered",
            "build = [\"echo two\", \"echo one\"]\nenv = { A = \"1\" }",
        ),
        (
            "two steps joined into one",
            "build = [\"echo oneecho two\"]\nenv = { A = \"1\" }",
        ),
        (
            "an env value changed",
            "build = [\"echo one\", \"echo two\"]\nenv = { A = \"2\" }",
        ),
        (
            "an env key renamed",
            "build = [\"echo one\", \"echo two\"]\nenv = { B = \"1\" }",
        ),
        (
            "an env variable added",
            "build = [\"echo one\", \"echo two\"]\nenv = { A = \"1\", B = \"\" }",
        ),
        ("the env removed", "build = [\"echo one\", \"echo two\"]"),
    ];
    let mut seen = vec![(base.clone(), "the original recipe")];
    for (what, body) in changing {
        let got = with(body);
        for (other, whose) in &seen {
            assert_ne!(
                &got, other,
                "with {what} the id must differ from that of {whose} (same tree)"
            );
        }
        seen.push((got, what));
    }
    // Keys that do not change what a build produces leave the id alone.
    let same = [
        (
            "a run command",
            "build = [\"echo one\", \"echo two\"]\nenv = { A = \"1\" }\nrun = \"python3 -m http.server\"",
        ),
        (
            "listen, health and timeouts",
            "build = [\"echo one\", \"echo two\"]\nenv = { A = \"1\" }\nlisten = 8080\nhealth = \"GET /\"\nready_timeout = \"5s\"\nstop_timeout = \"1s\"\ndebounce = \"10ms\"",
        ),
        (
            "keep",
            "build = [\"echo one\", \"echo two\"]\nenv = { A = \"1\" }\nkeep = 5",
        ),
        (
            "a comment and another service",
            "# a comment\nbuild = [\"echo one\", \"echo two\"]\nenv = { A = \"1\" }\n\n[services.other]\nroot = \".\"\nbuild = \"make\"",
        ),
    ];
    for (what, body) in same {
        assert_eq!(with(body), base, "adding {what} must not change the id");
    }
    // One step as a string or as a one-element list is the same recipe.
    assert_eq!(
        with("build = \"make all\""),
        with("build = [\"make all\"]"),
        "`build = \"x\"` and `build = [\"x\"]` are the same recipe"
    );
    // A service's id is not a plain directory's id: the recipe is mixed in.
    assert_ne!(
        with("build = \"make all\""),
        id(&t, &[s(&t.join("app"))]),
        "a service's id includes its recipe, a directory's does not"
    );
}

#[test]
fn manifest_inside_the_root_is_not_part_of_the_tree() {
    let t = Tmp::new();
    t.write(
        "pmesh.toml",
        "[services.app]\nroot = \".\"\nbuild = \"true\"\n",
    );
    t.write("index.html", "hi\n");
    let before = list_paths(&t, &["app"]);
    assert_eq!(
        before,
        vec![b"index.html".to_vec()],
        "entries of root = \".\""
    );
    let id1 = id(&t, &[]);
    t.write(
        "pmesh.toml",
        "# only a comment changed\n[services.app]\nroot = \".\"\nbuild = \"true\"\n",
    );
    assert_eq!(
        id(&t, &[]),
        id1,
        "a comment in the manifest must not change the id"
    );
}

#[test]
fn id_does_not_depend_on_how_the_manifest_path_is_spelled() {
    // With `root = "."` the manifest lies inside the tree and is left out of it; that must
    // hold however the manifest's path is spelled (a regression test: it once compared
    // non-canonical paths).
    let t = Tmp::new();
    t.write(
        "p/pmesh.toml",
        "[services.app]\nroot = \".\"\nbuild = \"true\"\n",
    );
    t.write("p/index.html", "hi\n");
    fs::create_dir_all(t.join("p/sub")).unwrap();
    symlink(t.join("p"), t.join("link")).unwrap();
    let mut c = t.cmd(&["hash"]);
    c.current_dir(t.join("p"));
    let want = Run(c.output().unwrap()).ok().stdout();
    for spelled in [
        "p/pmesh.toml",
        "./p/pmesh.toml",
        "p/sub/../pmesh.toml",
        "link/pmesh.toml",
    ] {
        let r = t.run(&["--manifest", spelled, "hash"]).ok();
        assert_eq!(
            r.stdout(),
            want,
            "`--manifest {spelled} hash` vs `hash` in p/; --list with that spelling:\n{}",
            t.run(&["--manifest", spelled, "hash", "--list"]).stdout()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Hidden files
// ---------------------------------------------------------------------------------------------

#[test]
fn hidden_files_count() {
    let t = Tmp::new();
    one_service(&t, &["true"], "");
    t.write("app/.env", "SECRET=1\n");
    t.write("app/.config/settings.json", "{}\n");
    t.write("app/main.js", "x\n");
    let paths = list_paths(&t, &["app"]);
    for hidden in [".env", ".config/settings.json"] {
        assert!(
            paths.contains(&hidden.as_bytes().to_vec()),
            "hidden file {hidden} must be hashed; --list:\n{}",
            show(&paths)
        );
    }
    let before = id(&t, &["app"]);
    t.write("app/.env", "SECRET=2\n");
    assert_ne!(id(&t, &["app"]), before, "editing .env must change the id");
}

// ---------------------------------------------------------------------------------------------
// 5. The manifest's ignore patterns
// ---------------------------------------------------------------------------------------------

#[test]
fn manifest_ignore_patterns_win_over_gitignore_negations() {
    let t = Tmp::new();
    one_service(
        &t,
        &["true"],
        "ignore = [\"*.log\", \"generated/\", \"/only-top.txt\", \"*.tmp\"]",
    );
    t.write("app/.gitignore", "!debug.log\n!*.tmp\n");
    t.write("app/sub/.gitignore", "!*.log\n");
    for f in [
        "app/main.c",
        "app/debug.log",
        "app/sub/other.log",
        "app/generated/out.c",
        "app/sub/generated/out.c",
        "app/only-top.txt",
        "app/sub/only-top.txt",
        "app/x.tmp",
    ] {
        t.write(f, f);
    }
    let got = list_paths(&t, &["app"]);
    let want: Vec<Vec<u8>> = [".gitignore", "main.c", "sub/.gitignore", "sub/only-top.txt"]
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    assert_same_paths(
        &got,
        &want,
        "the manifest's `ignore` excludes whatever the ignore files re-include",
    );
    // An ignored file's content does not count.
    let before = id(&t, &["app"]);
    t.write("app/debug.log", "more log lines\n");
    t.write("app/generated/out.c", "regenerated\n");
    assert_eq!(
        id(&t, &["app"]),
        before,
        "ignored files must not change the id"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Racy rewrites
// ---------------------------------------------------------------------------------------------

#[test]
fn racy_same_size_rewrites_right_after_hashing_are_seen() {
    let t = Tmp::new();
    one_service(&t, &["true"], "");
    let f = t.join("app/data.txt");
    t.write("app/other.txt", "other\n");
    let fixed = SystemTime::now() - Duration::from_secs(3600);
    let write = |content: &[u8]| {
        fs::write(&f, content).unwrap();
        // Restore the same mtime each time, as a fast editor or a build tool might leave it:
        // only the ctime (and the racy rule) can tell the versions apart.
        set_mtime(&f, fixed);
    };
    write(b"version-X");
    let id_x = cold_id(&t, &t.join("app"), "app");
    write(b"version-Y");
    let id_y = cold_id(&t, &t.join("app"), "app");
    assert_ne!(id_x, id_y, "different content must give different ids");

    for round in 0..15 {
        write(b"version-X");
        assert_eq!(
            id(&t, &["app"]),
            id_x,
            "round {round}: hashed right after a same-size rewrite to X"
        );
        write(b"version-Y");
        assert_eq!(
            id(&t, &["app"]),
            id_y,
            "round {round}: hashed right after a same-size rewrite to Y"
        );
    }

    // Once the cache trusts the file (its stat is old enough), a same-size rewrite that keeps
    // size, inode and mtime is still seen.
    std::thread::sleep(SETTLE);
    assert_eq!(id(&t, &["app"]), id_y, "settled, first hash");
    let (warm, read, from_cache) = stats(&t, "app");
    assert_eq!(warm, id_y, "settled, served from the cache");
    assert!(
        read == 0 && from_cache >= 2,
        "the settled files should come from the cache: {read} read, {from_cache} from cache"
    );
    write(b"version-X");
    assert_eq!(
        id(&t, &["app"]),
        id_x,
        "a same-size rewrite with the old mtime, after the cache trusted the file"
    );
}

/// A small ext4 file system with whole-second timestamps (128-byte inodes), loop-mounted
/// inside a temporary directory and unmounted when dropped.
struct CoarseFs {
    mnt: PathBuf,
}

impl CoarseFs {
    /// `None` when it cannot be made here (not root, no mkfs.ext4, no loop devices).
    fn new(t: &Tmp) -> Option<CoarseFs> {
        let img = t.join("coarse.img");
        let mnt = t.join("coarse");
        fs::create_dir_all(&mnt).ok()?;
        fs::File::create(&img).ok()?.set_len(32 << 20).ok()?;
        let quiet = |c: &mut Command| {
            c.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !quiet(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-I", "128"])
                .arg(&img),
        ) {
            return None;
        }
        if !quiet(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt),
        ) {
            return None;
        }
        let fs = CoarseFs { mnt };
        // Make sure timestamps really are whole seconds there.
        let probe = fs.mnt.join("probe");
        fs::write(&probe, b"x").ok()?;
        let m = fs::metadata(&probe).ok()?;
        use std::os::unix::fs::MetadataExt;
        if m.mtime_nsec() != 0 || m.ctime_nsec() != 0 {
            return None;
        }
        fs::remove_file(&probe).ok()?;
        Some(fs)
    }
}

impl Drop for CoarseFs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

#[test]
fn racy_rewrites_are_seen_on_a_file_system_with_whole_second_timestamps() {
    // On this kind of machine the kernel gives every write a distinct nanosecond timestamp, so
    // only a file system with coarse timestamps shows what git's racy-timestamp rule is for:
    // two same-size writes within one second leave size, mtime, ctime, inode and mode equal.
    let t = Tmp::new();
    let Some(cfs) = CoarseFs::new(&t) else {
        eprintln!(
            "SKIPPED: cannot loop-mount an ext4 image with whole-second timestamps here \
             (needs root, mkfs.ext4 and loop devices)"
        );
        return;
    };
    let root = cfs.mnt.join("app");
    put(
        &cfs.mnt,
        "pmesh.toml",
        b"[services.app]\nbuild = \"true\"\n",
    );
    put(&root, "other.txt", b"other\n");
    let f = root.join("data.txt");
    let hash = || -> String {
        let mut c = t.cmd(&["hash", "app"]);
        c.current_dir(&cfs.mnt);
        let out = Run(c.output().unwrap()).ok().stdout();
        out.trim().to_owned()
    };
    let cold = |content: &[u8]| -> String {
        fs::write(&f, content).unwrap();
        let _ = fs::remove_dir_all(root.join(".pmesh"));
        let id = hash();
        let _ = fs::remove_dir_all(root.join(".pmesh"));
        id
    };
    let (id_x, id_y) = (cold(b"version-X"), cold(b"version-Y"));
    assert_ne!(id_x, id_y, "different content, different ids");

    let stat = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(p).unwrap();
        (m.size(), m.mtime(), m.ctime(), m.ino())
    };
    // Rounds for a little over two seconds, so that hashes fall at every moment of a second.
    let (mut same_second, mut round) = (0, 0);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2200) {
        round += 1;
        fs::write(&f, b"version-X").unwrap();
        let before = stat(&f);
        assert_eq!(hash(), id_x, "round {round}: X");
        fs::write(&f, b"version-Y").unwrap();
        let after = stat(&f);
        assert_eq!(
            hash(),
            id_y,
            "round {round}: Y written right after X was hashed (stat {} the same)",
            if before == after { "exactly" } else { "not" }
        );
        if before == after {
            same_second += 1;
        }
    }
    assert!(
        same_second >= 10,
        "only {same_second} of {round} rounds rewrote the file within the same second; the \
         test proved little"
    );
    // A second later the stat is still the same as when X was last digested in that second.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(hash(), id_y, "one second later");

    // The same for directory listings: a file created in the second the directory was listed
    // leaves the directory's stat unchanged.
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_millis(1200) {
        n += 1;
        hash();
        let name = format!("new-{n}.txt");
        put(&root, &name, b"new");
        let mut c = t.cmd(&["hash", "app", "--list"]);
        c.current_dir(&cfs.mnt);
        let listed = parse_list(&Run(c.output().unwrap()).ok().0.stdout);
        assert!(
            listed.iter().any(|(_, p)| p == name.as_bytes()),
            "{name}, created right after a hash, must be listed"
        );
    }
    drop(cfs);
}

#[test]
fn concurrent_writes_never_leave_a_wrong_digest_in_the_cache() {
    // A file rewritten again and again while it is being hashed: every hash must succeed,
    // and once writing stops and the cache is trusted, the id must be the cold one.
    let t = Tmp::new();
    one_service(&t, &["true"], "");
    let f = t.join("app/big.bin");
    t.write("app/small.txt", "small\n");
    fs::write(&f, vec![b'a'; 2 << 20]).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (f, stop) = (f.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u8;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i = i.wrapping_add(1);
                let _ = fs::write(&f, vec![b'a' + i % 26; (2 << 20) + usize::from(i % 3)]);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        t.run(&["hash", "app"]).ok();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    std::thread::sleep(SETTLE);
    let warm = id(&t, &["app"]);
    let cold = cold_id(&t, &t.join("app"), "app");
    assert_eq!(warm, cold, "warm id after concurrent writes vs cold id");
    assert_eq!(id(&t, &["app"]), cold, "second warm id vs cold id");
}

// ---------------------------------------------------------------------------------------------
// 7. Warm cache, corrupt cache
// ---------------------------------------------------------------------------------------------

/// `(files read, files from cache)` from `hash --stats` on stderr.
fn stats(t: &Tmp, service: &str) -> (String, u64, u64) {
    let r = t.run(&["hash", service, "--stats"]).ok();
    let err = r.stderr();
    let num_after = |key: &str| -> u64 {
        let i = err
            .find(key)
            .unwrap_or_else(|| panic!("no `{key}` in --stats output: {err}"));
        err[i + key.len()..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after `{key}` in: {err}"))
    };
    let read = num_after("files read");
    let from_cache = err
        .rfind("from cache")
        .map(|i| {
            err[i + "from cache".len()..]
                .trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        })
        .unwrap_or(0);
    (r.stdout().trim().to_owned(), read, from_cache)
}

#[test]
fn warm_cache_matches_cold_and_a_bad_cache_is_ignored() {
    let t = Tmp::new();
    t.write("pmesh.toml", "[services.app]\nbuild = \"true\"\n");
    t.write(".gitignore", "*.log\n");
    for i in 0..40 {
        t.write(&format!("app/d{}/f{i}.txt", i % 5), &format!("file {i}\n"));
    }
    t.write("app/sub/x.log", "log\n");
    t.write("app/sub/a.txt", "a\n");
    t.write("app/d1/.gitignore", "*.skip\n");
    t.write("app/d1/x.skip", "skipped\n");
    let root = t.join("app");
    let cache = root.join(".pmesh/digests");
    std::thread::sleep(SETTLE);

    let cold = cold_id(&t, &root, "app");
    let (first, _, _) = stats(&t, "app");
    assert_eq!(first, cold, "first hash (writes the cache) vs cold");
    assert!(cache.is_file(), "the cache is written to .pmesh/digests");
    let (warm, read, from_cache) = stats(&t, "app");
    assert_eq!(warm, cold, "warm id vs cold id");
    assert!(
        from_cache >= 42 && read == 0,
        "a warm hash of a settled tree should read nothing and take its 42 digests from the cache; \
         got {read} read, {from_cache} from cache"
    );

    // A corrupt, truncated, empty, foreign or misplaced cache is ignored and rebuilt.
    let good = fs::read(&cache).unwrap();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x55;
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"this is not a digest cache at all".repeat(50)),
        ("truncated to half", good[..good.len() / 2].to_vec()),
        ("truncated by one byte", good[..good.len() - 1].to_vec()),
        ("empty", Vec::new()),
        ("one byte flipped", flipped),
        ("extended", [good.clone(), b"trailing".to_vec()].concat()),
    ];
    for (what, bytes) in bad {
        fs::write(&cache, &bytes).unwrap();
        let r = t.run(&["hash", "app"]);
        let r = r.expect_code(0);
        assert_eq!(r.stdout().trim(), cold, "id with a {what} cache");
        assert_eq!(
            id(&t, &["app"]),
            cold,
            "id after a {what} cache was rewritten"
        );
    }
    // A cache file that is a directory, or a .pmesh that is a file: still the right id.
    fs::remove_file(&cache).unwrap();
    fs::create_dir_all(cache.join("odd")).unwrap();
    assert_eq!(id(&t, &["app"]), cold, "cache path is a directory");
    fs::remove_dir_all(root.join(".pmesh")).unwrap();
    fs::write(root.join(".pmesh"), b"not a dir").unwrap();
    assert_eq!(id(&t, &["app"]), cold, ".pmesh is a file");
    fs::remove_file(root.join(".pmesh")).unwrap();

    // A foreign cache: the same paths in another tree with other contents.
    let other = t.join("other");
    put(&other, "pmesh.toml", b"[services.app]\nbuild = \"true\"\n");
    put(&other, ".gitignore", b"*.log\n");
    for i in 0..40 {
        put(
            &other,
            format!("app/d{}/f{i}.txt", i % 5),
            format!("FILE {i}\n").as_bytes(),
        );
    }
    put(&other, "app/sub/a.txt", b"A\n");
    let mut c = t.cmd(&["hash", "app"]);
    c.current_dir(&other);
    let other_id = Run(c.output().unwrap()).ok().stdout();
    assert_ne!(other_id.trim(), cold, "sanity: the other tree differs");
    fs::create_dir_all(root.join(".pmesh")).unwrap();
    fs::copy(other.join("app/.pmesh/digests"), &cache).unwrap();
    assert_eq!(
        id(&t, &["app"]),
        cold,
        "another tree's cache must not be trusted"
    );

    // Changes seen through a warm cache whose every entry is trusted.
    std::thread::sleep(SETTLE);
    id(&t, &["app"]);
    let warm_vs_cold = |what: &str| {
        let warm = id(&t, &["app"]);
        assert_eq!(warm, cold_id(&t, &root, "app"), "warm vs cold after {what}");
    };
    let listed = |p: &str| list_paths(&t, &["app"]).contains(&p.as_bytes().to_vec());

    // The listing of a directory whose own stat did not change is filtered again when an
    // ignore file above it changes...
    t.write(".gitignore", "*.log\n!x.log\n");
    warm_vs_cold("an edit of the .gitignore above the service root");
    assert!(
        listed("sub/x.log"),
        "sub/x.log is re-included by the top .gitignore"
    );
    // ...or one inside it, edited in place...
    t.write("app/d1/.gitignore", "");
    warm_vs_cold("an in-place edit of d1/.gitignore");
    assert!(listed("d1/x.skip"), "d1/x.skip is no longer ignored");
    // ...or when the manifest's ignore patterns change.
    t.write(
        "pmesh.toml",
        "[services.app]\nbuild = \"true\"\nignore = [\"a.txt\"]\n",
    );
    warm_vs_cold("a change of the manifest's ignore");
    assert!(
        !listed("sub/a.txt"),
        "sub/a.txt is excluded by the manifest's new pattern"
    );
    // Files and directories added, removed, renamed and replaced in settled directories.
    t.write("app/d3/new.txt", "new\n");
    warm_vs_cold("adding a file");
    fs::remove_file(root.join("d2/f7.txt")).unwrap();
    warm_vs_cold("deleting a file");
    fs::rename(root.join("d4"), root.join("d9")).unwrap();
    warm_vs_cold("renaming a directory");
    fs::remove_dir_all(root.join("d0")).unwrap();
    t.write("app/d0", "now a file\n");
    warm_vs_cold("replacing a directory with a file");
}

// ---------------------------------------------------------------------------------------------
// 8. FIFOs and sockets
// ---------------------------------------------------------------------------------------------

#[test]
fn fifo_and_socket_are_skipped_with_a_warning_and_never_opened() {
    let t = Tmp::new();
    one_service(&t, &["true"], "");
    t.write("app/a.txt", "a\n");
    let fifo = t.join("app/sub/pipe");
    fs::create_dir_all(fifo.parent().unwrap()).unwrap();
    let st = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(st.success(), "mkfifo failed");
    let sock = t.join("app/sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind a unix socket");

    let check = |r: Run, what: &str| -> Run {
        let r = r.expect_code(0);
        let err = r.stderr();
        for name in ["sub/pipe", "sock"] {
            assert!(
                err.lines()
                    .any(|l| l.contains("warning") && l.contains(name)),
                "{what}: expected a warning naming {name} on stderr, got:\n{err}"
            );
        }
        r
    };
    let dir = check(
        run_with_timeout(t.cmd(&["hash", s(&t.join("app")), "--list"]), 10),
        "hash DIR --list",
    );
    let paths: Vec<Vec<u8>> = parse_list(&dir.0.stdout)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(
        paths,
        vec![b"a.txt".to_vec()],
        "only the regular file is listed"
    );
    // As a service, with the cache written and then read (twice, in case a listing is cached).
    for i in 0..2 {
        check(
            run_with_timeout(t.cmd(&["hash", "app"]), 10),
            &format!("hash SERVICE, run {i}"),
        );
    }
    std::thread::sleep(SETTLE);
    for i in 0..2 {
        check(
            run_with_timeout(t.cmd(&["hash", "app"]), 10),
            &format!("hash SERVICE with a settled cache, run {i}"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 9. Unreadable files
// ---------------------------------------------------------------------------------------------

/// Runs `pmesh-dev args` as an unprivileged user when this process is privileged (root can
/// read a mode-000 file, so the test would prove nothing), or directly when it is not.
/// `None` when the test cannot be made meaningful here.
fn run_unprivileged(t: &Tmp, probe: &Path, args: &[&str]) -> Option<Run> {
    if fs::read(probe).is_err() {
        return Some(t.run(args));
    }
    // Privileged (root or CAP_DAC_OVERRIDE): drop to `nobody` if setpriv can.
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", bin()])
        .args(args)
        .current_dir(t.path())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    match c.output() {
        Ok(out) if !String::from_utf8_lossy(&out.stderr).contains("setpriv:") => Some(Run(out)),
        _ => None,
    }
}

#[test]
fn unreadable_file_or_directory_is_an_error_naming_it() {
    let t = Tmp::new();
    // `nobody` must be able to reach the tree.
    chmod(t.path(), 0o755);
    let d = t.join("d");
    put(&d, "ok.txt", b"fine");
    put(&d, ".gitignore", b"*.log\n");
    let secret = put(&d, "sub/secret.txt", b"secret");
    chmod(&d.join("sub"), 0o755);
    chmod(&secret, 0o000);

    let Some(r) = run_unprivileged(&t, &secret, &["hash", s(&d)]) else {
        eprintln!(
            "SKIPPED: running privileged (root reads mode-000 files) and setpriv cannot drop \
             to nobody here, so an unreadable file cannot be made"
        );
        return;
    };
    assert_ne!(
        r.code(),
        0,
        "an unreadable file must fail the hash\n--- stdout\n{}\n--- stderr\n{}",
        r.stdout(),
        r.stderr()
    );
    assert!(
        r.stderr().contains(s(&secret)),
        "the error must name {}; stderr:\n{}",
        secret.display(),
        r.stderr()
    );
    assert!(
        r.stdout().is_empty(),
        "no id on stdout when hashing failed: {}",
        r.stdout()
    );
    assert_eq!(
        r.stderr().matches("Permission denied").count(),
        1,
        "the cause is stated once: {}",
        r.stderr()
    );

    // An ignored unreadable file is never opened, so it is no error.
    chmod(&secret, 0o644);
    let ignored = put(&d, "sub/private.log", b"log");
    chmod(&ignored, 0o000);
    let r = run_unprivileged(&t, &ignored, &["hash", s(&d)]).expect("ran before");
    let r = r.ok();
    assert_eq!(r.stdout().trim().len(), 32, "an id: {}", r.stdout());

    // An unreadable directory.
    let locked = d.join("locked");
    put(&locked, "x.txt", b"x");
    chmod(&locked, 0o000);
    let r = run_unprivileged(&t, &ignored, &["hash", s(&d)]).expect("ran before");
    chmod(&locked, 0o755);
    assert_ne!(r.code(), 0, "an unreadable directory must fail the hash");
    assert!(
        r.stderr().contains(s(&locked)),
        "the error must name {}; stderr:\n{}",
        locked.display(),
        r.stderr()
    );
}

#[test]
fn read_errors_state_the_cause_once() {
    // A regression test: the OS error was once printed twice, as part of the message and
    // again as its source.
    let t = Tmp::new();
    let r = t
        .run(&["--manifest", "missing.toml", "hash"])
        .expect_code(2);
    let err = r.stderr();
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "the cause should appear once: {err}"
    );
}

// ---------------------------------------------------------------------------------------------
// 10. Output and usage
// ---------------------------------------------------------------------------------------------

#[test]
fn list_into_a_closed_pipe_ends_quietly() {
    let t = Tmp::new();
    let d = t.join("d");
    for i in 0..3000 {
        put(
            &d,
            format!(
                "dir{}/a-rather-long-file-name-to-fill-the-pipe-{i}.txt",
                i % 10
            ),
            b"x",
        );
    }
    let mut child = t
        .cmd(&["hash", s(&d), "--list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 40];
    out.read_exact(&mut first).expect("read the first line");
    drop(out); // like `| head -1`
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "hash --list hung on a closed pipe"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        !err.contains("panicked"),
        "no panic on a closed pipe: {err}"
    );
    assert!(
        status.code() == Some(0) || status.code().is_none(),
        "exit 0 (or death by SIGPIPE) on a closed pipe, got {status:?}; stderr: {err}"
    );
}

#[test]
fn list_has_one_line_per_entry_even_for_names_with_newlines() {
    let t = Tmp::new();
    let d = t.join("d");
    put(&d, "new\nline.txt", b"x");
    put(&d, "plain.txt", b"y");
    let json = t.run(&["hash", s(&d), "--json"]).ok().json_lines();
    let files = json[0]["files"].as_u64().unwrap() as usize;
    let out = t.run(&["hash", s(&d), "--list"]).ok().stdout();
    assert!(
        out.contains("  \"new\\nline.txt\"\n"),
        "C-quoted like git: {out}"
    );
    assert_eq!(
        out.lines().count(),
        files,
        "--list should print one line per entry ({files} entries, as --json says), like git \
         quoting such names; got:\n{out}"
    );
}

#[test]
fn hash_usage_errors_exit_2() {
    let t = Tmp::new();
    t.write("file.txt", "x");
    let r = t.run(&["hash", "no-such-dir"]).expect_code(2);
    assert!(
        r.stderr().contains("no-such-dir"),
        "the error names the target: {}",
        r.stderr()
    );
    t.run(&["hash", "file.txt"]).expect_code(2);
    t.run(&["hash", ".", "--list", "--json"]).expect_code(2);
    let r = t.run(&["hash", "."]).ok();
    assert_eq!(
        r.stdout().trim().len(),
        32,
        "an empty-ish directory hashes: {}",
        r.stdout()
    );
}

#[test]
fn hash_agrees_with_the_id_a_build_records() {
    let t = Tmp::new();
    one_service(&t, &["echo built > \"$PMESH_BUILD_DIR/out.txt\""], "");
    t.write("app/src.txt", "source\n");
    let before = id(&t, &["app"]);
    t.run(&["build", "app"]).ok();
    let target = assert_run_sound(&t.join("app"));
    let recorded = fs::read_to_string(t.join("app/.run/.buildid")).unwrap();
    assert_eq!(
        recorded.trim(),
        before,
        "{target}/.buildid vs `hash app` before the build"
    );
    assert_eq!(
        id(&t, &["app"]),
        before,
        "the build's own .build-*, .run and .pmesh must not change the id"
    );
}
