//! The control socket: `build`, `rollback` and `run` typed in another shell while `watch`
//! runs are carried out by the running watch.

use std::os::unix::fs::PermissionsExt;

use crate::util::*;

fn copy_step() -> &'static str {
    "cp v.txt \"$PMESH_BUILD_DIR/\""
}

#[test]
fn build_and_rollback_from_another_process_are_carried_out_by_the_watch() {
    let t = Tmp::new();
    one_service(&t, &[copy_step()], "keep = 4");
    t.write("app/v.txt", "one\n");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    w.next_build("app");
    let root = t.join("app");

    let sock = root.join(".pmesh/control.sock");
    let mode = std::fs::metadata(&sock)
        .expect("the socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    t.write("app/v.txt", "two\n");
    let second = w.next_build("app");
    let second_archive = second["archive"].as_str().expect("archive").to_owned();

    // `build --force` from a second process: the watch builds; both see it.
    let r = t.run(&["build", "--force", "--json"]).ok();
    let events = r.json_lines();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "build_finished" && e["ok"] == true),
        "the client shows the watch's events: {events:?}"
    );
    let forced = w.next_build("app");
    assert_eq!(forced["id"], second["id"], "the same tree, built again");
    assert_ne!(forced["archive"], second["archive"]);
    // The new archive replaces the one with its id once that one's instance is gone.
    let forced_archive = forced["archive"].as_str().expect("archive").to_owned();
    assert!(
        wait_for(10.0, || !root.join(&second_archive).exists()),
        "the older copy of the same build is deleted: {:?}",
        archives(&root)
    );
    let second_archive = forced_archive;

    // `rollback` (default: the previous good build) from a second process.
    let before = run_target(&root).expect("live");
    t.run(&["rollback"]).ok();
    let rolled = w
        .wait_for(10.0, |e| e["event"] == "rollback")
        .expect("the watch rolled back");
    assert_eq!(rolled["from"].as_str(), Some(before.as_str()));
    let now = run_target(&root).expect("live");
    assert_eq!(rolled["to"].as_str(), Some(now.as_str()));
    assert_ne!(now, before);

    // By name, and a bad name: exit 2, nothing moves.
    t.run(&["rollback", "app", &second_archive]).ok();
    assert_eq!(run_target(&root), Some(second_archive.clone()));
    let bad = t.run(&["rollback", "app", "../../etc"]).expect_code(2);
    assert!(bad.stderr().contains("no build named"), "{}", bad.stderr());
    assert_eq!(run_target(&root), Some(second_archive));

    // After a rollback to an older tree, the watch does not rebuild on its own...
    t.run(&["rollback"]).ok();
    let quiet = w.quiet_for(1.0);
    assert!(
        !quiet.iter().any(|e| e["event"] == "build_started"),
        "a rollback is not undone by a rebuild: {quiet:#?}"
    );
    assert_eq!(t.read("app/.run/v.txt"), "one\n");
    // ...until the tree changes.
    t.write("app/v.txt", "three\n");
    w.next_build("app");
    assert_eq!(t.read("app/.run/v.txt"), "three\n");

    // `run` while the watch serves: it says so and exits 0.
    let r = t.run(&["run"]);
    // This service has no `run` command, so `run` refuses it as a usage error.
    assert_eq!(r.code(), 2, "{}", r.stderr());
    assert_eq!(w.interrupt(), Some(0));
    assert!(!sock.exists(), "the socket is removed on exit");
}

#[test]
fn a_stale_socket_left_by_a_crashed_watch_is_replaced() {
    let t = Tmp::new();
    one_service(&t, &[copy_step()], "");
    t.write("app/v.txt", "one\n");
    std::fs::create_dir_all(t.join("app/.pmesh")).expect("mkdir");
    let sock = t.join("app/.pmesh/control.sock");
    // A socket file nobody listens on, as a killed watch leaves it.
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
    assert!(sock.exists());
    // With nobody listening, `build` works on its own.
    t.run(&["build"]).ok();
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    let r = t.run(&["build", "--force"]).ok();
    assert!(r.stdout().contains("built"), "{}", r.stdout());
    w.next_build("app");
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn a_failed_build_requested_over_the_socket_exits_1() {
    let t = Tmp::new();
    one_service(
        &t,
        &["cp v.txt \"$PMESH_BUILD_DIR/\"; ! grep -q broken v.txt"],
        "",
    );
    t.write("app/v.txt", "good\n");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    w.next_build("app");
    t.write("app/v.txt", "broken\n");
    w.next_build("app");
    let r = t.run(&["build", "--force"]).expect_code(1);
    assert!(r.stderr().contains("exit status 1"), "{}", r.stderr());
    assert_eq!(w.interrupt(), Some(0));
}
