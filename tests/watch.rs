//! `watch`: real file changes against the real binary. Every edit leads to exactly one build of
//! the newest tree; ignored files, same-content saves and touches lead to none.

use std::fs;
use std::time::{Duration, Instant};

use crate::util::*;

/// A service `app` whose build copies its source tree (minus pmesh-dev's own paths).
fn copying_service(t: &Tmp, extra: &str) {
    one_service(
        t,
        &[
            "tar cf - --exclude=./.pmesh --exclude='./.build*' --exclude=./.run . | tar xf - -C \"$PMESH_BUILD_DIR\"",
        ],
        extra,
    );
    t.write("app/src/main.txt", "main v1\n");
    t.write("app/.gitignore", "*.log\n/out/\n");
}

fn builds_in(events: &[serde_json::Value]) -> usize {
    events
        .iter()
        .filter(|e| e["event"] == "build_started")
        .count()
}

fn changed_of(e: &serde_json::Value) -> Vec<String> {
    e["changed"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn edits_build_once_and_ignored_or_unchanged_files_do_not(watcher: &str) {
    let t = Tmp::new();
    copying_service(&t, "debounce = \"50ms\"\nignore = [\"*.tmp\"]");
    let mut w = Watch::start(&t, &["--watcher", watcher], &[], &["app"]);
    let first = w.next_build("app");
    assert_eq!(first["ok"], true);
    let root = t.join("app");
    assert_eq!(run_target(&root).as_deref(), first["archive"].as_str());

    // An edit: one build, naming the path, and .run moves.
    t.write("app/src/main.txt", "main v2\n");
    let started = w
        .wait_for(10.0, |e| e["event"] == "build_started")
        .expect("build_started");
    assert_eq!(changed_of(&started), vec!["src/main.txt"]);
    let done = w.next_build("app");
    assert_eq!(run_target(&root).as_deref(), done["archive"].as_str());
    assert_eq!(t.read("app/.run/src/main.txt"), "main v2\n");

    // Ignored by .gitignore, by a directory pattern, by the manifest: nothing.
    t.write("app/debug.log", "x");
    t.write("app/out/gen.txt", "x");
    t.write("app/scratch.tmp", "x");
    // The same content saved again, and a touch: nothing.
    t.write("app/src/main.txt", "main v2\n");
    let now = filetime_now();
    set_mtime(&t.join("app/src/main.txt"), now);
    let quiet = w.quiet_for(1.0);
    assert_eq!(builds_in(&quiet), 0, "{quiet:#?}");

    // A burst of writes is one build of the last content.
    for i in 0..20 {
        t.write("app/src/main.txt", &format!("burst {i}\n"));
        std::thread::sleep(Duration::from_millis(5));
    }
    w.next_build("app");
    let after = w.quiet_for(0.8);
    assert_eq!(builds_in(&after), 0, "one build per burst: {after:#?}");
    let burst: Vec<_> = w
        .seen
        .iter()
        .filter(|e| e["event"] == "build_started")
        .collect();
    assert_eq!(burst.len(), 3, "initial, edit, burst: {:#?}", w.seen);
    assert_eq!(t.read("app/.run/src/main.txt"), "burst 19\n");
    assert_eq!(w.interrupt(), Some(0));
}

fn filetime_now() -> std::time::SystemTime {
    std::time::SystemTime::now()
}

fn set_mtime(path: &std::path::Path, t: std::time::SystemTime) {
    let f = fs::File::options().write(true).open(path).expect("open");
    f.set_modified(t).expect("set mtime");
}

fn atomic_saves_new_directories_deletes_and_renames_are_seen(watcher: &str) {
    let t = Tmp::new();
    copying_service(&t, "");
    let mut w = Watch::start(&t, &["--watcher", watcher], &[], &["app"]);
    w.next_build("app");

    // An editor's atomic save: write a temporary file, rename it over the target.
    t.write("app/src/.main.txt.swp", "saved atomically\n");
    fs::rename(t.join("app/src/.main.txt.swp"), t.join("app/src/main.txt")).expect("rename");
    let s = w
        .wait_for(10.0, |e| e["event"] == "build_started")
        .expect("build");
    assert_eq!(changed_of(&s), vec!["src/main.txt"]);
    w.next_build("app");
    assert_eq!(t.read("app/.run/src/main.txt"), "saved atomically\n");

    // The same with a pause before the rename, so that the temporary file is read while the
    // debounce runs: it came and went, and is no part of what changed.
    t.write("app/src/main.txt.tmp-sed", "saved slowly\n");
    std::thread::sleep(Duration::from_millis(20));
    fs::rename(
        t.join("app/src/main.txt.tmp-sed"),
        t.join("app/src/main.txt"),
    )
    .expect("rename");
    let s = w
        .wait_for(10.0, |e| e["event"] == "build_started")
        .expect("build");
    assert_eq!(changed_of(&s), vec!["src/main.txt"]);
    w.next_build("app");
    assert_eq!(t.read("app/.run/src/main.txt"), "saved slowly\n");

    // A new nested directory with a file, created at once.
    t.write("app/src/a/b/c/deep.txt", "deep\n");
    let s = w
        .wait_for(10.0, |e| e["event"] == "build_started")
        .expect("build");
    assert!(
        changed_of(&s).contains(&"src/a/b/c/deep.txt".to_owned()),
        "{s}"
    );
    w.next_build("app");
    // Its directories are watched now.
    t.write("app/src/a/b/c/deep.txt", "deeper\n");
    w.next_build("app");
    assert_eq!(t.read("app/.run/src/a/b/c/deep.txt"), "deeper\n");

    // A directory renamed: its files move, and the new place is watched.
    fs::rename(t.join("app/src/a"), t.join("app/src/z")).expect("rename dir");
    let s = w
        .wait_for(10.0, |e| e["event"] == "build_started")
        .expect("build");
    let changed = changed_of(&s);
    assert!(
        changed.contains(&"src/a/b/c/deep.txt".to_owned())
            && changed.contains(&"src/z/b/c/deep.txt".to_owned()),
        "{changed:?}"
    );
    w.next_build("app");
    t.write("app/src/z/b/c/deep.txt", "moved and edited\n");
    w.next_build("app");
    assert_eq!(t.read("app/.run/src/z/b/c/deep.txt"), "moved and edited\n");
    assert!(!t.join("app/.run/src/a").exists());

    // A file deleted, then a whole directory.
    fs::remove_file(t.join("app/src/main.txt")).expect("rm");
    w.next_build("app");
    assert!(!t.join("app/.run/src/main.txt").exists());
    fs::remove_dir_all(t.join("app/src/z")).expect("rm -r");
    w.next_build("app");
    assert!(!t.join("app/.run/src/z").exists());
    assert_eq!(
        fs::read_to_string(root_id(&t)).expect("buildid").trim(),
        t.run(&["hash", "app"]).ok().stdout().trim(),
        "the live id is the tree's id"
    );
    assert_eq!(w.interrupt(), Some(0));
}

fn root_id(t: &Tmp) -> std::path::PathBuf {
    t.join("app/.run/.buildid")
}

/// The paths `hash app --list` shows.
fn hashed_paths(t: &Tmp) -> Vec<String> {
    t.run(&["hash", "app", "--list"])
        .ok()
        .stdout()
        .lines()
        .filter_map(|l| l.split_once("  ").map(|(_, p)| p.to_owned()))
        .collect()
}

fn editing_gitignore_reloads_the_rules(watcher: &str) {
    let t = Tmp::new();
    copying_service(&t, "");
    t.write("app/notes.md", "notes\n");
    let mut w = Watch::start(&t, &["--watcher", watcher], &[], &["app"]);
    w.next_build("app");
    assert!(hashed_paths(&t).contains(&"notes.md".to_owned()));

    t.write("app/.gitignore", "*.log\n/out/\nnotes.md\n");
    let done = w.next_build("app");
    assert!(!hashed_paths(&t).contains(&"notes.md".to_owned()));
    assert_eq!(
        done["id"].as_str(),
        Some(t.run(&["hash", "app"]).ok().stdout().trim())
    );
    t.write("app/notes.md", "edited but ignored\n");
    let quiet = w.quiet_for(1.0);
    assert_eq!(builds_in(&quiet), 0, "{quiet:#?}");

    // Un-ignoring brings it back.
    t.write("app/.gitignore", "*.log\n/out/\n");
    let done = w.next_build("app");
    assert_eq!(
        done["id"].as_str(),
        Some(t.run(&["hash", "app"]).ok().stdout().trim())
    );
    assert_eq!(t.read("app/.run/notes.md"), "edited but ignored\n");
    assert_eq!(w.interrupt(), Some(0));
}

fn a_change_during_a_slow_build_cancels_it_and_builds_the_newest_tree(watcher: &str) {
    let t = Tmp::new();
    let marker = format!("pmesh-slow-{}", std::process::id());
    one_service(
        &t,
        &[
            "cp v.txt \"$PMESH_BUILD_DIR/\"",
            &format!("if grep -q slow v.txt; then sleep 30; fi # {marker}"),
        ],
        "",
    );
    t.write("app/v.txt", "fast 1\n");
    let mut w = Watch::start(&t, &["--watcher", watcher], &[], &["app"]);
    w.next_build("app");
    let root = t.join("app");

    t.write_atomic("app/v.txt", "slow\n");
    let slow = w
        .wait_for(10.0, |e| e["event"] == "build_started")
        .expect("the slow build starts");
    assert!(
        wait_for(10.0, || process_alive(&marker)),
        "the slow step runs"
    );
    t.write("app/v.txt", "fast 2\n");
    let cancelled = w
        .wait_for(15.0, |e| e["event"] == "cancelled")
        .unwrap_or_else(|| panic!("the slow build is cancelled: {:#?}", w.seen));
    assert_eq!(cancelled["id"], slow["id"]);
    assert!(
        wait_for(5.0, || !process_alive(&marker)),
        "the cancelled build's processes are gone"
    );
    let done = w.next_build("app");
    assert_eq!(done["ok"], true);
    assert_eq!(t.read("app/.run/v.txt"), "fast 2\n");
    // The cancelled build was never archived.
    for a in archives(&root) {
        let id = fs::read_to_string(root.join(&a).join(".buildid")).expect("buildid");
        assert_ne!(
            id.trim(),
            slow["id"].as_str().unwrap_or(""),
            "{a} is the stale build"
        );
    }
    assert!(!root.join(".build").exists());
    assert_eq!(w.interrupt(), Some(0));
}

fn a_build_ending_while_an_unchanged_save_is_debounced_still_leads_to_the_newest_build(
    watcher: &str,
) {
    // A stale build that takes 2 s to die (it ignores SIGTERM), and an unchanged save whose
    // quiet period is open when it does: the decision its end asked for must still be made.
    let t = Tmp::new();
    let marker = format!("pmesh-stubborn-{}", std::process::id());
    one_service(
        &t,
        &[
            "cp v.txt \"$PMESH_BUILD_DIR/\"",
            &format!("if grep -q slow v.txt; then trap '' TERM; sleep 30; fi # {marker}"),
        ],
        "debounce = \"1s\"",
    );
    t.write("app/v.txt", "fast 1\n");
    t.write("app/other.txt", "same\n");
    let mut w = Watch::start(&t, &["--watcher", watcher], &[], &["app"]);
    w.next_build("app");

    t.write("app/v.txt", "slow\n");
    w.wait_for(10.0, |e| e["event"] == "build_started")
        .expect("the slow build starts");
    assert!(
        wait_for(10.0, || process_alive(&marker)),
        "the slow step runs"
    );
    t.write("app/v.txt", "fast 2\n");
    let edited = Instant::now();
    // The cancel is sent when the 1 s quiet period ends, SIGKILL follows 2 s later: rewrite
    // a file unchanged so that its quiet period spans that moment.
    std::thread::sleep(Duration::from_millis(2500).saturating_sub(edited.elapsed()));
    t.write("app/other.txt", "same\n");
    let started = w
        .wait_for(8.0, |e| {
            e["event"] == "build_started" && changed_of(e).contains(&"v.txt".to_owned())
        })
        .unwrap_or_else(|| panic!("the newest tree was not built: {:#?}", kinds(&w.seen)));
    assert_eq!(started["service"], "app");
    let done = w.next_build("app");
    assert_eq!(done["ok"], true);
    assert_eq!(t.read("app/.run/v.txt"), "fast 2\n");
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn a_failed_build_keeps_the_live_one_and_the_next_edit_tries_again() {
    let t = Tmp::new();
    one_service(
        &t,
        &["cp v.txt \"$PMESH_BUILD_DIR/\"; ! grep -q broken v.txt"],
        "",
    );
    t.write("app/v.txt", "good\n");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    w.next_build("app");
    let root = t.join("app");
    let good = run_target(&root);

    t.write("app/v.txt", "broken\n");
    let failed = w.next_build("app");
    assert_eq!(failed["ok"], false);
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("exit status 1")),
        "{failed}"
    );
    assert_eq!(run_target(&root), good);
    assert_eq!(t.read("app/.run/v.txt"), "good\n");

    t.write("app/v.txt", "fixed\n");
    let ok = w.next_build("app");
    assert_eq!(ok["ok"], true);
    assert_eq!(t.read("app/.run/v.txt"), "fixed\n");
    assert_eq!(w.interrupt(), Some(0));
}

fn lost_events_lead_to_a_rescan_that_still_sees_the_edit(watcher: &str) {
    let t = Tmp::new();
    copying_service(&t, "");
    let mut w = Watch::start(
        &t,
        &["--watcher", watcher],
        &[("PMESH_DEV_TEST_OVERFLOW", "1")],
        &["app"],
    );
    w.next_build("app");
    t.write("app/src/main.txt", "seen through a rescan\n");
    w.wait_for(10.0, |e| e["event"] == "rescan")
        .expect("a rescan");
    w.next_build("app");
    assert_eq!(t.read("app/.run/src/main.txt"), "seen through a rescan\n");
    assert_eq!(w.interrupt(), Some(0));
}

/// Past the watch limit the shallowest directories keep their watches and the rest is polled;
/// an edit under either builds.
fn past_the_watch_limit_the_rest_is_polled_and_edits_under_both_build(watcher: &str) {
    let t = Tmp::new();
    copying_service(&t, "");
    t.write("app/src/more/x.txt", "x\n");
    let args = ["--watcher", watcher];
    let mut w = Watch::start(&t, &args, &[("PMESH_DEV_TEST_MAX_WATCHES", "2")], &["app"]);
    let watching = w
        .seen
        .iter()
        .find(|e| e["event"] == "watching")
        .cloned()
        .expect("watching");
    assert_eq!(
        watching["mode"],
        if watcher == "native" {
            "native"
        } else {
            "inotify"
        }
    );
    assert_eq!(watching["dirs"], 3, "{watching}");
    // app/src/more (the manifest is the session's to watch, not the engine's).
    assert_eq!(watching["polled_dirs"], 1, "{watching}");
    assert!(
        watching["poll_interval_ms"]
            .as_u64()
            .is_some_and(|ms| ms >= 1000),
        "{watching}"
    );
    // Said as the watches are added, so it may come just after `watching`.
    let warning = match w.seen.iter().find(|e| e["event"] == "warning") {
        Some(e) => e.clone(),
        None => (w.wait_for(5.0, |e| e["event"] == "warning")).expect("a warning"),
    };
    let msg = warning["message"].as_str().unwrap_or("");
    assert!(msg.contains("sysctl fs.inotify.max_user_watches="), "{msg}");
    assert!(msg.contains("2 watched directories, 1 polled"), "{msg}");
    w.next_build("app");

    // Watched: seen at once (well within the poll interval).
    let t0 = Instant::now();
    t.write("app/src/main.txt", "watched\n");
    w.next_build("app");
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(t.read("app/.run/src/main.txt"), "watched\n");

    // Polled: seen within a pass or two.
    t.write("app/src/more/x.txt", "polled\n");
    w.next_build("app");
    assert_eq!(t.read("app/.run/src/more/x.txt"), "polled\n");
    // A new file and a new directory in a polled directory.
    t.write("app/src/more/deeper/y.txt", "new\n");
    w.next_build("app");
    assert_eq!(t.read("app/.run/src/more/deeper/y.txt"), "new\n");
    assert_eq!(w.interrupt(), Some(0));
}

/// A directory renamed over another (empty) one: the tree reads the directory named again
/// instead of keeping what the old one held, and edits inside it build.
fn a_directory_renamed_into_the_place_of_another_is_read_again(watcher: &str) {
    let t = Tmp::new();
    copying_service(&t, "");
    t.write("app/d/.keep", "");
    fs::remove_file(t.join("app/d/.keep")).expect("empty d");
    t.write("app/staging/sub/x.txt", "x1\n");
    let mut w = Watch::start(&t, &["--watcher", watcher], &[], &["app"]);
    w.next_build("app");
    // rename(2) replaces an empty directory.
    fs::rename(t.join("app/staging"), t.join("app/d")).expect("rename over d");
    w.next_build("app");
    assert_eq!(t.read("app/.run/d/sub/x.txt"), "x1\n");
    assert!(!t.join("app/.run/staging").exists());
    // Its subdirectory is watched under its new path.
    t.write("app/d/sub/x.txt", "x2\n");
    w.next_build("app");
    assert_eq!(t.read("app/.run/d/sub/x.txt"), "x2\n");
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn poll_mode_sees_edits_new_directories_and_deletes() {
    let t = Tmp::new();
    copying_service(&t, "");
    let mut w = Watch::start(&t, &["--poll"], &[], &["app"]);
    let watching = (w.seen.iter())
        .find(|e| e["event"] == "watching")
        .cloned()
        .expect("watching");
    assert_eq!(watching["mode"], "poll");
    assert_eq!(watching["polled_dirs"], 2, "{watching}");
    assert_eq!(watching["dirs"], 2, "{watching}");
    w.next_build("app");
    t.write("app/src/main.txt", "polled\n");
    w.next_build("app");
    assert_eq!(t.read("app/.run/src/main.txt"), "polled\n");
    t.write("app/src/new/n.txt", "new\n");
    w.next_build("app");
    assert_eq!(t.read("app/.run/src/new/n.txt"), "new\n");
    // Polled as soon as it is found: an edit inside it builds too.
    t.write("app/src/new/n.txt", "newer\n");
    w.next_build("app");
    assert_eq!(t.read("app/.run/src/new/n.txt"), "newer\n");
    fs::remove_dir_all(t.join("app/src/new")).expect("remove");
    w.next_build("app");
    assert!(!t.join("app/.run/src/new").exists());
    // Nothing changed: no build, however many passes.
    let quiet = w.quiet_for(2.5);
    assert_eq!(builds_in(&quiet), 0, "{quiet:#?}");
    assert_eq!(w.interrupt(), Some(0));
}

fn two_services_build_independently(watcher: &str) {
    let t = Tmp::new();
    copy_fixtures(t.path());
    // The demo's fixed ports could be taken on this machine; serve on free ones.
    let toml = t
        .read("pmesh.toml")
        .replace("listen = 8081", &format!("listen = {}", free_port()))
        .replace("listen = 8082", &format!("listen = {}", free_port()));
    t.write("pmesh.toml", &toml);
    let mut w = Watch::start(&t, &["--watcher", watcher], &[], &["site", "api"]);
    for svc in ["site", "api"] {
        let done = |e: &serde_json::Value| e["event"] == "build_finished" && e["service"] == svc;
        if !w.seen.iter().any(done) {
            w.next_build(svc);
        }
    }
    t.write("api/lib/greet.js", "module.exports = (n) => `hey ${n}`;\n");
    let s = w
        .wait_for(10.0, |e| e["event"] == "build_started")
        .expect("a build");
    assert_eq!(s["service"], "api");
    w.next_build("api");
    let quiet = w.quiet_for(0.8);
    assert!(
        !w.seen.iter().any(|e| e["service"] == "site"
            && e["event"] == "build_started"
            && !changed_of(e).is_empty()),
        "site did not change: {quiet:#?}"
    );
    // Editing the manifest without changing a service applies it and touches nothing.
    let toml = t.read("pmesh.toml");
    t.write("pmesh.toml", &format!("{toml}\n# edited\n"));
    let applied = w
        .wait_for(10.0, |e| e["event"] == "manifest_applied")
        .unwrap_or_else(|| panic!("not applied: {:#?}", w.seen));
    assert_eq!(applied["changed"], serde_json::json!([]), "{applied}");
    assert_eq!(applied["added"], serde_json::json!([]), "{applied}");
    assert_eq!(w.interrupt(), Some(0));
}

fn a_build_that_writes_into_its_own_tree_is_stopped_with_advice(watcher: &str) {
    let t = Tmp::new();
    one_service(
        &t,
        &["date +%s%N > stamp.txt; cp stamp.txt \"$PMESH_BUILD_DIR/\""],
        "",
    );
    let mut w = Watch::start(&t, &["--watcher", watcher], &[], &["app"]);
    let looped = w
        .wait_for(30.0, |e| e["event"] == "loop_detected")
        .unwrap_or_else(|| panic!("no loop_detected: {:#?}", w.seen));
    let paths = looped["paths"].to_string();
    assert!(paths.contains("stamp.txt"), "{looped}");
    assert!(
        looped["patterns"].to_string().contains("/stamp.txt"),
        "{looped}"
    );
    let quiet = w.quiet_for(1.0);
    assert_eq!(builds_in(&quiet), 0, "rebuilding stopped: {quiet:#?}");
    assert!(builds_in(&w.seen) <= 5, "{:#?}", kinds(&w.seen));
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn sigint_during_a_build_exits_0_and_leaves_nothing_running() {
    let t = Tmp::new();
    let marker = format!("pmesh-wint-{}", std::process::id());
    one_service(&t, &[&format!("sleep 30 # {marker}")], "");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    w.wait_for(10.0, |e| e["event"] == "build_started")
        .expect("the build starts");
    assert!(wait_for(10.0, || process_alive(&marker)));
    assert_eq!(w.interrupt(), Some(0));
    assert!(
        wait_for(5.0, || !process_alive(&marker)),
        "the step is gone"
    );
    assert!(!t.join("app/.build").exists());
}

/// Each of these runs against inotify and against notify's own inotify backend, the portable
/// path (FSEvents and ReadDirectoryChangesW go through the same code).
macro_rules! each_watcher {
    ($($name:ident),* $(,)?) => {
        mod inotify {
            $(#[test]
            fn $name() {
                super::$name("inotify")
            })*
        }
        mod native {
            $(#[test]
            fn $name() {
                super::$name("native")
            })*
        }
    };
}

each_watcher!(
    edits_build_once_and_ignored_or_unchanged_files_do_not,
    atomic_saves_new_directories_deletes_and_renames_are_seen,
    editing_gitignore_reloads_the_rules,
    a_change_during_a_slow_build_cancels_it_and_builds_the_newest_tree,
    a_build_ending_while_an_unchanged_save_is_debounced_still_leads_to_the_newest_build,
    lost_events_lead_to_a_rescan_that_still_sees_the_edit,
    two_services_build_independently,
    a_build_that_writes_into_its_own_tree_is_stopped_with_advice,
    past_the_watch_limit_the_rest_is_polled_and_edits_under_both_build,
    a_directory_renamed_into_the_place_of_another_is_read_again,
);
