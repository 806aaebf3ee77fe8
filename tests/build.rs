//! `build`, `builds` and `rollback`: archives, the `.run` flip, reuse, retention, failures,
//! interruption and crash safety.

use std::fs;
use std::time::Duration;

use crate::util::*;

fn live_id(t: &Tmp, rel: &str) -> String {
    t.read(&format!("{rel}/.run/.buildid")).trim().to_owned()
}

fn hash_id(t: &Tmp, svc: &str) -> String {
    t.run(&["hash", svc]).ok().stdout().trim().to_owned()
}

#[test]
fn build_archives_flips_run_and_is_then_up_to_date() {
    let t = Tmp::new();
    one_service(
        &t,
        &[
            "cp index.txt \"$PMESH_BUILD_DIR/\"",
            "echo \"$PMESH_SERVICE $PMESH_BUILD_ID $GREETING\" > \"$PMESH_BUILD_DIR/env.txt\"",
        ],
        "env = { GREETING = \"hi\" }",
    );
    t.write("app/index.txt", "one\n");
    let run = t.run(&["build", "--json"]).ok();
    let events = run.json_lines();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert!(kinds.contains(&"build_started"), "{kinds:?}");
    let finished = events
        .iter()
        .find(|e| e["event"] == "build_finished")
        .expect("a build_finished event");
    assert_eq!(finished["ok"], true);
    assert_eq!(finished["service"], "app");
    assert!(finished["ts"].as_str().is_some_and(|s| s.ends_with('Z')));
    assert!(finished["duration_ms"].is_u64());
    let archive = finished["archive"]
        .as_str()
        .expect("archive name")
        .to_owned();

    let root = t.join("app");
    assert_eq!(run_target(&root).as_deref(), Some(archive.as_str()));
    assert_eq!(archives(&root), vec![archive.clone()]);
    assert!(!root.join(".build").exists(), ".build must be gone");
    let id = hash_id(&t, "app");
    assert_eq!(
        live_id(&t, "app"),
        id,
        ".run/.buildid must be the tree's id"
    );
    assert_eq!(finished["id"], id.as_str());
    assert_eq!(t.read("app/.run/index.txt"), "one\n");
    assert_eq!(t.read("app/.run/env.txt"), format!("app {id} hi\n"));

    // Nothing changed: nothing is built.
    let again = t.run(&["build", "--json"]).ok().json_lines();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0]["event"], "up_to_date");
    assert_eq!(archives(&root), vec![archive.clone()]);

    // --force builds anyway, and the new archive replaces the one with its id: retention
    // counts distinct builds.
    t.run(&["build", "--force"]).ok();
    let now = archives(&root);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0], archive);
    assert_eq!(run_target(&root), Some(now[0].clone()));
}

#[test]
fn editing_the_recipe_rebuilds() {
    let t = Tmp::new();
    one_service(&t, &["true"], "");
    t.write("app/a.txt", "a");
    t.run(&["build"]).ok();
    let first = live_id(&t, "app");
    one_service(&t, &["true", "true"], "");
    t.run(&["build"]).ok();
    assert_ne!(live_id(&t, "app"), first);
}

#[test]
fn a_failed_step_leaves_run_and_archives_untouched() {
    let t = Tmp::new();
    one_service(&t, &["cp a.txt \"$PMESH_BUILD_DIR/\""], "");
    t.write("app/a.txt", "good");
    t.run(&["build"]).ok();
    let root = t.join("app");
    let good = run_target(&root).expect("live");

    one_service(
        &t,
        &[
            "cp a.txt \"$PMESH_BUILD_DIR/\"",
            "echo compiling; echo 'error: x is broken' >&2; exit 3",
            "echo never",
        ],
        "",
    );
    let run = t.run(&["build"]).expect_code(1);
    let out = run.stdout() + &run.stderr();
    for needle in [
        "app",
        "step 2 of 3",
        "exit status 3",
        "error: x is broken",
        "compiling",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    assert!(
        !out.contains("never"),
        "a failed step stops the build:\n{out}"
    );
    assert!(!root.join(".build").exists(), ".build must be removed");
    assert_eq!(run_target(&root), Some(good.clone()));
    assert_eq!(archives(&root), vec![good]);
    assert_eq!(t.read("app/.run/a.txt"), "good");

    let json = t.run(&["build", "--json"]).expect_code(1).json_lines();
    let fin = json
        .iter()
        .find(|e| e["event"] == "build_finished")
        .expect("build_finished");
    assert_eq!(fin["ok"], false);
    assert!(fin["archive"].is_null());
}

#[test]
fn an_archive_with_the_same_id_is_reused_without_building() {
    let t = Tmp::new();
    one_service(&t, &["cp a.txt \"$PMESH_BUILD_DIR/\""], "");
    t.write("app/a.txt", "v1");
    t.run(&["build"]).ok();
    let root = t.join("app");
    let v1 = run_target(&root).expect("live");
    t.write("app/a.txt", "v2");
    t.run(&["build"]).ok();
    assert_ne!(run_target(&root), Some(v1.clone()));

    t.write("app/a.txt", "v1");
    let events = t.run(&["build", "--json"]).ok().json_lines();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds, vec!["reused"], "{events:?}");
    assert_eq!(run_target(&root), Some(v1));
    assert_eq!(archives(&root).len(), 2);
    assert_eq!(t.read("app/.run/a.txt"), "v1");
}

#[test]
fn retention_keeps_the_newest_and_never_the_live_one() {
    let t = Tmp::new();
    one_service(&t, &["cp a.txt \"$PMESH_BUILD_DIR/\""], "keep = 2");
    let root = t.join("app");
    let mut names = Vec::new();
    for i in 0..4 {
        t.write("app/a.txt", &format!("v{i}"));
        t.run(&["build"]).ok();
        names.push(run_target(&root).expect("live"));
    }
    assert_eq!(archives(&root), names[2..].to_vec());
    // Archive names sort in creation order.
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, names);

    // Reusing the oldest archive makes it live; retention must then delete another one.
    one_service(&t, &["cp a.txt \"$PMESH_BUILD_DIR/\""], "keep = 3");
    t.write("app/a.txt", "v4");
    t.run(&["build"]).ok();
    let all = archives(&root);
    assert_eq!(all.len(), 3, "{all:?}");
    one_service(&t, &["cp a.txt \"$PMESH_BUILD_DIR/\""], "keep = 2");
    t.write("app/a.txt", "v2");
    t.run(&["build"]).ok();
    assert_eq!(
        run_target(&root),
        Some(all[0].clone()),
        "the oldest was reused"
    );
    let now = archives(&root);
    assert_eq!(
        now,
        vec![all[0].clone(), all[2].clone()],
        "live kept, newest kept"
    );
}

#[test]
fn keep_one_keeps_only_the_live_build() {
    let t = Tmp::new();
    one_service(&t, &["cp a.txt \"$PMESH_BUILD_DIR/\""], "keep = 1");
    let root = t.join("app");
    for i in 0..3 {
        t.write("app/a.txt", &format!("v{i}"));
        t.run(&["build"]).ok();
    }
    assert_eq!(archives(&root), vec![run_target(&root).expect("live")]);
}

#[test]
fn rollback_defaults_to_the_previous_build_and_accepts_a_name() {
    let t = Tmp::new();
    one_service(&t, &["cp a.txt \"$PMESH_BUILD_DIR/\""], "keep = 3");
    let root = t.join("app");
    let mut names = Vec::new();
    for i in 0..3 {
        t.write("app/a.txt", &format!("v{i}"));
        t.run(&["build"]).ok();
        names.push(run_target(&root).expect("live"));
    }
    t.run(&["rollback"]).ok();
    assert_eq!(run_target(&root), Some(names[1].clone()));
    t.run(&["rollback", "app"]).ok();
    assert_eq!(run_target(&root), Some(names[0].clone()));
    // Nothing older: exit 1, nothing moves.
    let r = t.run(&["rollback"]).expect_code(1);
    assert!(r.stderr().contains("no older good build"), "{}", r.stderr());
    assert_eq!(run_target(&root), Some(names[0].clone()));
    // By name, forward again.
    t.run(&["rollback", "app", &names[2]]).ok();
    assert_eq!(run_target(&root), Some(names[2].clone()));
    t.run(&["rollback", &names[1]]).ok();
    assert_eq!(run_target(&root), Some(names[1].clone()));
    assert_eq!(t.read("app/.run/a.txt"), "v1");

    let builds = t.run(&["builds", "--json"]).ok().stdout();
    let list: serde_json::Value = serde_json::from_str(&builds).expect("builds --json");
    let list = list.as_array().expect("an array");
    assert_eq!(list.len(), 3);
    let listed: Vec<&str> = list.iter().filter_map(|b| b["name"].as_str()).collect();
    let mut newest_first = names.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first);
    for b in list {
        assert_eq!(b["live"], b["name"] == names[1].as_str());
        assert_eq!(b["status"], "ok");
        assert_eq!(b["id"].as_str().map(str::len), Some(32));
        assert!(b["created"].as_str().is_some_and(|c| c.starts_with("20")));
    }
    let table = t.run(&["builds"]).ok().stdout();
    let live_line = table
        .lines()
        .find(|l| l.contains(&names[1]))
        .expect("live row");
    assert!(live_line.starts_with('*'), "{table}");
}

#[test]
fn rollback_rejects_names_that_are_not_archives() {
    let t = Tmp::new();
    one_service(&t, &["true"], "");
    t.write("app/a.txt", "1");
    t.run(&["build"]).ok();
    t.write("app/a.txt", "2");
    t.run(&["build"]).ok();
    let root = t.join("app");
    let live = run_target(&root);
    fs::create_dir_all(t.join("app/src")).expect("mkdir");
    for bad in [
        "..",
        "/",
        "/tmp",
        "../app",
        ".build-nope",
        "src",
        ".run",
        ".build-x/../..",
    ] {
        let r = t.run(&["rollback", "app", bad]).expect_code(2);
        assert!(r.stderr().contains("app"), "{bad}: {}", r.stderr());
        assert_eq!(run_target(&root), live, "{bad} moved .run");
    }
}

#[test]
fn steps_and_env_reach_the_build() {
    let t = Tmp::new();
    one_service(
        &t,
        &["pwd > \"$PMESH_BUILD_DIR/pwd\"; echo \"$NODE_ENV\" > \"$PMESH_BUILD_DIR/env\""],
        "env = { NODE_ENV = \"development\" }",
    );
    t.run(&["build"]).ok();
    let root = t.join("app").canonicalize().expect("canonical");
    assert_eq!(t.read("app/.run/pwd").trim(), root.to_string_lossy());
    assert_eq!(t.read("app/.run/env").trim(), "development");
}

#[test]
fn two_services_build_and_prefix_their_output() {
    let t = Tmp::new();
    copy_fixtures(t.path());
    let run = t.run(&["build"]).ok();
    let out = run.stdout();
    assert!(out.contains("site") && out.contains("api"), "{out}");
    let site = assert_run_sound(&t.join("site"));
    assert_run_sound(&t.join("api"));
    let page = t.read(&format!("site/{site}/public/index.html"));
    assert!(
        page.contains(&live_id(&t, "site")),
        "the page carries the build id"
    );
    // Only the one named is built.
    t.write("site/src/style.css", "body{}");
    t.write("api/lib/greet.js", "module.exports = () => 'x';");
    let events = t.run(&["build", "site", "--json"]).ok().json_lines();
    assert!(events.iter().all(|e| e["service"] == "site"), "{events:?}");
}

#[test]
fn unknown_service_is_a_usage_error() {
    let t = Tmp::new();
    one_service(&t, &["true"], "");
    let r = t.run(&["build", "nope"]).expect_code(2);
    assert!(
        r.stderr().contains("nope") && r.stderr().contains("app"),
        "{}",
        r.stderr()
    );
}

#[test]
fn a_second_pmesh_dev_gets_a_clear_error_naming_the_holder() {
    let t = Tmp::new();
    one_service(&t, &["sleep 3"], "");
    let mut first = t.cmd(&["build"]).spawn().expect("spawn");
    assert!(
        wait_for(10.0, || t.join("app/.build").exists()),
        "the first build started"
    );
    let r = t.run(&["build", "--force"]).expect_code(1);
    let err = r.stderr();
    assert!(
        err.contains("in use") && err.contains(&format!("pid {}", first.id())),
        "{err}"
    );
    assert!(first.wait().expect("wait").success());
}

#[test]
fn ctrl_c_stops_the_steps_removes_build_and_exits_130() {
    let t = Tmp::new();
    let marker = format!("pmesh-int-{}", std::process::id());
    one_service(&t, &[&format!("sleep 30 # {marker}")], "");
    t.write("app/a.txt", "a");
    let mut child = t.cmd(&["build"]).spawn().expect("spawn");
    assert!(wait_for(10.0, || process_alive(&marker)), "the step runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130));
    assert!(!t.join("app/.build").exists(), ".build must be removed");
    assert!(run_target(&t.join("app")).is_none(), "nothing was archived");
    assert!(
        wait_for(5.0, || !process_alive(&marker)),
        "the step is gone"
    );
}

/// Regression guard for crash safety: kill -9 at random moments of a slow build must never
/// leave `.run` broken, and must never leave a build step running.
#[test]
fn kill_9_at_random_moments_never_breaks_run() {
    let t = Tmp::new();
    let marker = format!("pmesh-k9-{}", std::process::id());
    one_service(
        &t,
        &[
            &format!(
                "for i in 1 2 3 4 5; do echo $i > \"$PMESH_BUILD_DIR/f$i\"; sleep 0.02; done # {marker}"
            ),
            "sleep 0.05; cp a.txt \"$PMESH_BUILD_DIR/\"",
            "echo \"$PMESH_BUILD_ID\" > \"$PMESH_BUILD_DIR/stamp\"",
        ],
        "keep = 3",
    );
    let root = t.join("app");
    t.write("app/a.txt", "start");
    t.run(&["build"]).ok();
    // A fixed-seed LCG: the same moments every run, spread over the whole build.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..12 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let delay = Duration::from_millis(5 + (seed >> 33) % 300);
        t.write("app/a.txt", &format!("edit {i}"));
        let mut child = t.cmd(&["build"]).spawn().expect("spawn");
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        let target = assert_run_sound(&root);
        let id = fs::read_to_string(root.join(".run/.buildid")).expect("buildid");
        let stamp = fs::read_to_string(root.join(".run/stamp")).expect("a complete build");
        assert_eq!(
            stamp, id,
            "iteration {i} (killed after {delay:?}): {target} is incomplete"
        );
        assert!(
            wait_for(5.0, || !process_alive(&marker)),
            "iteration {i}: a build step outlived pmesh-dev"
        );
    }
    // The next run recovers on its own.
    t.run(&["build"]).ok();
    assert!(!root.join(".build").exists());
    assert_eq!(live_id(&t, "app"), hash_id(&t, "app"));
    assert_eq!(t.read("app/.run/a.txt"), "edit 11");
}
