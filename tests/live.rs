//! What is live, and who says so: cancels that do not wait for nothing, retention that never
//! deletes what an instance runs from, status that follows the tree back, the live build served
//! at start, backoff for a build that cannot start, forced rebuilds, `build` over the socket
//! returning once the swap is done, and instances reading their own archive.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::util::*;

/// A service `app` running the test server (fixtures/testsrv), its build copying these files.
fn test_service(t: &Tmp, port: u16, extra: &str) {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/testsrv/server.js");
    std::fs::create_dir_all(t.join("app")).expect("mkdir");
    std::fs::copy(src, t.join("app/server.js")).expect("copy server");
    t.write("app/version.txt", "v1\n");
    t.write("app/mode.txt", "ok\n");
    t.write("app/ready_after.txt", "0\n");
    t.write(
        "pmesh.toml",
        &format!(
            r#"[services.app]
build = ["cp server.js version.txt mode.txt ready_after.txt \"$PMESH_BUILD_DIR/\""]
run = "exec node \"$PMESH_RUN_DIR/server.js\""
listen = {port}
health = "GET /healthz"
{extra}
"#
        ),
    );
}

/// `GET path` with a fresh connection: (status, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = (out.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = (out.split_once("\r\n\r\n"))
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn wait_event(w: &mut Watch, event: &str) -> serde_json::Value {
    w.wait_for(30.0, |e| e["event"] == event)
        .unwrap_or_else(|| panic!("no {event} event: {:#?}", w.seen))
}

#[test]
fn an_edit_during_a_build_cancels_it_as_soon_as_its_step_exits() {
    let t = Tmp::new();
    // The step exits at once on SIGTERM (a plain `sleep` under `sh`).
    one_service(&t, &["sh build.sh"], "");
    t.write(
        "app/build.sh",
        "if [ \"$(cat v.txt)\" = slow ]; then sleep 30; fi\ncp v.txt \"$PMESH_BUILD_DIR/\"\n",
    );
    t.write("app/v.txt", "one\n");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    w.next_build("app");
    t.write_atomic("app/v.txt", "slow\n");
    wait_event(&mut w, "build_started");
    std::thread::sleep(Duration::from_millis(200));
    let edited = Instant::now();
    t.write("app/v.txt", "two\n");
    wait_event(&mut w, "cancelled");
    let next = wait_event(&mut w, "build_started");
    let took = edited.elapsed();
    assert!(
        next["changed"].as_array().is_some_and(|c| !c.is_empty()),
        "{next}"
    );
    // CANCEL_GRACE is 2 s: a cancel that waited for it would take longer than this.
    assert!(
        took < Duration::from_millis(1500),
        "the cancel waited {took:?} for a step that had exited"
    );
    w.next_build("app");
    assert_eq!(t.read("app/.run/v.txt"), "two\n");
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn ctrl_c_during_a_one_shot_build_ends_it_at_once() {
    let t = Tmp::new();
    one_service(&t, &["sleep 30"], "");
    let mut b = Watch::spawn(&t, &["build", "--json"], &[]);
    b.wait_for(30.0, |e| e["event"] == "build_started")
        .expect("the build started");
    std::thread::sleep(Duration::from_millis(200));
    let asked = Instant::now();
    assert_eq!(b.interrupt(), Some(130));
    let took = asked.elapsed();
    assert!(took < Duration::from_millis(1500), "Ctrl-C took {took:?}");
    assert!(!t.join("app/.build").exists(), ".build is removed");
}

#[test]
fn retention_never_deletes_the_archive_of_an_instance_still_draining() {
    let t = Tmp::new();
    let port = free_port();
    // Old instances ignore SIGTERM: each drains for the whole stop_timeout.
    test_service(&t, port, "keep = 2\nstop_timeout = \"3s\"");
    t.write("app/mode.txt", "ignore-term\n");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    wait_event(&mut w, "live");
    for v in 2..=4 {
        t.write("app/version.txt", &format!("v{v}\n"));
        wait_event(&mut w, "live");
        assert!(get(port, "/").1.contains(&format!("version v{v}")));
    }
    // Once every old instance has stopped, retention catches up.
    let root = t.join("app");
    assert!(
        wait_for(20.0, || {
            let _ = w.quiet_for(0.2);
            archives(&root).len() == 2
        }),
        "two builds are kept in the end: {:?}",
        archives(&root)
    );
    // The last `pruned` is emitted just after its archive went: read it too.
    let removed = |seen: &[serde_json::Value]| {
        (seen.iter())
            .filter(|e| e["event"] == "pruned")
            .map(|e| e["removed"].as_array().map_or(0, Vec::len))
            .sum::<usize>()
    };
    if removed(&w.seen) < 2 {
        let _ = w.wait_for(5.0, |e| e["event"] == "pruned");
    }
    // Replay: an archive was never removed while an instance of it had not stopped.
    let mut running: Vec<String> = Vec::new();
    let mut pruned = 0;
    for e in &w.seen {
        let archive = e["archive"].as_str().unwrap_or("").to_owned();
        match e["event"].as_str() {
            Some("live") => running.push(archive),
            Some("stopped") => running.retain(|a| *a != archive),
            Some("pruned") => {
                for r in e["removed"].as_array().into_iter().flatten() {
                    pruned += 1;
                    let r = r.as_str().unwrap_or("");
                    assert!(
                        !running.iter().any(|a| a == r),
                        "{r} was pruned while its instance ran: {:#?}",
                        w.seen
                    );
                }
            }
            _ => {}
        }
    }
    assert_eq!(pruned, 2, "v1 and v2 were pruned: {:#?}", w.seen);
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn undoing_the_edit_of_a_failed_or_unhealthy_build_says_the_service_is_live_again() {
    let t = Tmp::new();
    let port = free_port();
    test_service(&t, port, "ready_timeout = \"2s\"");
    t.write(
        "pmesh.toml",
        &t.read("pmesh.toml").replace(
            "build = [",
            "build = [\"test \\\"$(cat version.txt)\\\" != broken\", ",
        ),
    );
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    let live = wait_event(&mut w, "live");
    let id = live["id"].as_str().expect("id").to_owned();

    t.write("app/version.txt", "broken\n");
    let failed = w.next_build("app");
    assert_eq!(failed["ok"], false);
    t.write("app/version.txt", "v1\n");
    let back = wait_event(&mut w, "up_to_date");
    assert_eq!(back["id"].as_str(), Some(id.as_str()));

    t.write("app/mode.txt", "unhealthy\n");
    wait_event(&mut w, "unhealthy");
    t.write("app/mode.txt", "ok\n");
    let back = wait_event(&mut w, "up_to_date");
    assert_eq!(back["id"].as_str(), Some(id.as_str()));
    assert!(
        !w.seen.iter().any(|e| e["event"] == "build_started"
            && e["id"].as_str() == Some(id.as_str())
            && e["ts"].as_str() > live["ts"].as_str()),
        "the live tree is not built again"
    );
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn watch_serves_the_live_build_at_once_while_the_changed_tree_builds() {
    let t = Tmp::new();
    let port = free_port();
    test_service(&t, port, "");
    t.write(
        "pmesh.toml",
        &t.read("pmesh.toml")
            .replace("build = [", "build = [\"sleep $(cat delay.txt)\", "),
    );
    t.write("app/delay.txt", "0\n");
    t.run(&["build"]).ok();
    t.write("app/delay.txt", "4\n");
    t.write("app/version.txt", "v2\n");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    let asked = Instant::now();
    let (status, body) = get(port, "/");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("version v1"),
        "the live build answers: {body}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "answered before the 4 s build could end ({:?})",
        asked.elapsed()
    );
    let finished = w.next_build("app");
    assert_eq!(finished["ok"], true);
    let live = w
        .wait_for(30.0, |e| {
            e["event"] == "live" && e["archive"] == finished["archive"]
        })
        .expect("the new build goes live");
    assert!(
        live["url"]
            .as_str()
            .is_some_and(|u| u.ends_with(&format!(":{port}")))
    );
    assert!(get(port, "/").1.contains("version v2"));
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn a_first_build_that_cannot_start_is_retried_with_backoff_not_in_a_loop() {
    let t = Tmp::new();
    let port = free_port();
    test_service(&t, port, "");
    t.write("app/mode.txt", "crash-at-start\n");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    let first = wait_event(&mut w, "unhealthy");
    assert!(
        first.get("back").is_none(),
        "nothing to go back to: {first}"
    );
    assert_eq!(first["retry_in_ms"], 100, "{first}");
    let later = w.quiet_for(2.5);
    let attempts = later
        .iter()
        .filter(|e| matches!(e["event"].as_str(), Some("crashed" | "unhealthy")))
        .count();
    // 100, 200, 400, 800 ms... : about four more in 2.5 s (not twenty).
    assert!(
        (2..=6).contains(&attempts),
        "{attempts} attempts in 2.5 s: {later:#?}"
    );
    let delays: Vec<u64> = later
        .iter()
        .filter_map(|e| e["restart_in_ms"].as_u64())
        .collect();
    assert!(
        delays.windows(2).all(|d| d[1] >= d[0]),
        "the delay grows: {delays:?}"
    );
    let (status, page) = get(port, "/");
    assert_eq!(status, 502, "{page}");
    // The fix goes live.
    t.write("app/mode.txt", "ok\n");
    wait_event(&mut w, "live");
    assert!(get(port, "/").1.contains("version v1"));
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn a_forced_rebuild_replaces_its_archive_so_rollback_reaches_the_previous_build() {
    let t = Tmp::new();
    let port = free_port();
    test_service(&t, port, "keep = 2");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    let v1 = wait_event(&mut w, "live");
    t.write_atomic("app/version.txt", "v2\n");
    let v2 = wait_event(&mut w, "live");
    t.run(&["build", "--force"]).ok();
    let forced = wait_event(&mut w, "live");
    assert_eq!(forced["id"], v2["id"]);
    let root = t.join("app");
    let v1_archive = v1["archive"].as_str().expect("archive").to_owned();
    let forced_archive = forced["archive"].as_str().expect("archive").to_owned();
    assert!(
        wait_for(10.0, || archives(&root)
            == vec![v1_archive.clone(), forced_archive.clone()]),
        "the forced build replaced v2, v1 is kept: {:?}",
        archives(&root)
    );
    t.run(&["rollback"]).ok();
    assert_eq!(run_target(&root), Some(v1_archive));
    assert!(
        get(port, "/").1.contains("version v1"),
        "rolled back to different code"
    );
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn build_sent_to_a_running_watch_returns_once_the_new_build_serves() {
    let t = Tmp::new();
    let port = free_port();
    test_service(&t, port, "");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    wait_event(&mut w, "live");
    // Builds from now on take most of a second to become healthy.
    t.write_atomic("app/ready_after.txt", "800\n");
    wait_event(&mut w, "live");
    t.write_atomic("app/version.txt", "v2\n");
    wait_event(&mut w, "build_started");
    let b = t.run(&["build"]).ok();
    let (_, body) = get(port, "/");
    assert!(
        body.contains("version v2"),
        "`build` returned before the swap: {body}\n{}",
        b.stdout()
    );
    // Nothing to build: it says so, as the one-shot command does.
    let again = t.run(&["build"]).ok();
    assert!(again.stdout().contains("up to date"), "{}", again.stdout());
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn an_old_instance_of_the_demo_keeps_serving_its_own_files_while_a_new_build_is_proven() {
    let t = Tmp::new();
    copy_fixtures(t.path());
    let port = free_port();
    let manifest = t.read("pmesh.toml").replace(
        "listen = 8081",
        &format!("listen = {port}\nhealth = \"GET /healthz.txt\"\nready_timeout = \"2s\""),
    );
    t.write("pmesh.toml", &manifest);
    t.write("site/src/healthz.txt", "ok\n");
    let mut w = Watch::start(&t, &["site"], &[], &["site"]);
    wait_event(&mut w, "live");
    let (_, v1) = get(port, "/");
    assert!(v1.contains("<html") || v1.contains("<!"), "{v1}");
    // The next build has no /healthz.txt: it is never healthy and is undone after 2 s.
    std::fs::remove_file(t.join("site/src/healthz.txt")).expect("rm");
    let index = t.read("site/src/index.html");
    t.write(
        "site/src/index.html",
        &index.replace("<body>", "<body>NEW BUILD"),
    );
    wait_event(&mut w, "build_finished");
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let (_, page) = get(port, "/");
        assert!(
            !page.contains("NEW BUILD"),
            "the old instance served the unproven build's files"
        );
    }
    wait_event(&mut w, "unhealthy");
    assert!(!get(port, "/").1.contains("NEW BUILD"));
    assert_eq!(w.interrupt(), Some(0));
}
