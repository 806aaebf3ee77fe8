//! The manifest applied while watching, and start order between services.
use crate::util::*;

use crate::util::get_root as get;

/// A service table for the test server, `name` at `name/`, answering `version <name>-N`.
fn service(t: &Tmp, name: &str, port: u16, extra: &str) -> String {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/testsrv/server.js");
    std::fs::create_dir_all(t.join(name)).expect("mkdir");
    std::fs::copy(src, t.join(&format!("{name}/server.js"))).expect("copy");
    if !t.join(&format!("{name}/version.txt")).exists() {
        t.write(&format!("{name}/version.txt"), &format!("{name}-1\n"));
    }
    format!(
        "[services.{name}]\nbuild = [\"cp server.js version.txt \\\"$PMESH_BUILD_DIR/\\\"\"]\n\
         run = \"exec node \\\"$PMESH_RUN_DIR/server.js\\\"\"\nlisten = {port}\nhealth = \"GET /healthz\"\n{extra}\n"
    )
}

/// The first event matching `pred` seen from `from` on, waiting for it if needed.
fn wait_from(
    w: &mut Watch,
    from: usize,
    mut pred: impl FnMut(&serde_json::Value) -> bool,
    what: &str,
) -> serde_json::Value {
    if let Some(e) = w.seen[from.min(w.seen.len())..].iter().find(|e| pred(e)) {
        return e.clone();
    }
    w.wait_for(30.0, pred)
        .unwrap_or_else(|| panic!("{what}: {:#?}", w.seen))
}

fn wait(
    w: &mut Watch,
    pred: impl FnMut(&serde_json::Value) -> bool,
    what: &str,
) -> serde_json::Value {
    w.wait_for(30.0, pred)
        .unwrap_or_else(|| panic!("{what}: {:#?}", w.seen))
}

/// The pid in the test server's answer.
fn pid(answer: &str) -> String {
    answer
        .split("pid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("")
        .to_owned()
}

#[test]
fn editing_the_manifest_while_watching_adds_removes_and_restarts_only_what_changed() {
    let t = Tmp::new();
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let a = service(&t, "a", pa, "");
    let b = service(&t, "b", pb, "");
    t.write("pmesh.toml", &format!("{a}\n{b}"));
    let mut w = Watch::start(&t, &[], &[], &["a", "b"]);
    wait_from(
        &mut w,
        0,
        |e| e["event"] == "live" && e["service"] == "a",
        "a live",
    );
    wait_from(
        &mut w,
        0,
        |e| e["event"] == "live" && e["service"] == "b",
        "b live",
    );
    let first = get(pb);
    assert!(first.contains("version b-1"), "{first}");
    let b_pid = pid(&first);

    // An error: located, and nothing changes.
    t.write("pmesh.toml", &format!("{a}\n{b}\nlisen = 3\n"));
    let err = wait(
        &mut w,
        |e| e["event"] == "manifest_error",
        "the error is shown",
    );
    let msg = err["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("pmesh.toml:") && msg.contains("lisen"),
        "{msg}"
    );
    assert!(get(pa).contains("version a-1") && pid(&get(pb)) == b_pid);

    // c added, a removed, b's recipe changed (an env var).
    let c = service(&t, "c", pc, "");
    let b2 = b.replace(
        "health = \"GET /healthz\"",
        "health = \"GET /healthz\"\nenv = { X = \"2\" }",
    );
    t.write("pmesh.toml", &format!("{b2}\n{c}"));
    let mark = w.seen.len();
    let applied = wait(&mut w, |e| e["event"] == "manifest_applied", "applied");
    assert_eq!(applied["added"], serde_json::json!(["c"]), "{applied}");
    assert_eq!(applied["removed"], serde_json::json!(["a"]), "{applied}");
    assert_eq!(applied["changed"], serde_json::json!(["b"]), "{applied}");
    wait_from(
        &mut w,
        mark,
        |e| e["event"] == "live" && e["service"] == "c",
        "c live",
    );
    assert!(get(pc).contains("version c-1"));
    assert!(
        wait_for(10.0, || get(pa).is_empty()),
        "a's proxy is gone: {}",
        get(pa)
    );
    // b was rebuilt (its recipe is part of its id) and serves again.
    wait_from(
        &mut w,
        mark,
        |e| e["event"] == "build_finished" && e["service"] == "b",
        "b rebuilt",
    );
    assert!(wait_for(10.0, || {
        let now = get(pb);
        now.contains("version b-1") && pid(&now) != b_pid
    }));

    // A changed `listen` moves the proxy.
    let pb2 = free_port();
    t.write(
        "pmesh.toml",
        &format!("{}\n{c}", b2.replace(&pb.to_string(), &pb2.to_string())),
    );
    wait(
        &mut w,
        |e| e["event"] == "manifest_applied" && e["changed"] == serde_json::json!(["b"]),
        "b moved",
    );
    assert!(
        wait_for(20.0, || get(pb2).contains("version b-1")),
        "b on its new port"
    );
    assert!(get(pb).is_empty(), "not on the old one");
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn a_service_starts_once_what_it_depends_on_is_live_and_is_not_restarted_by_its_rebuilds() {
    let t = Tmp::new();
    let (papi, pweb) = (free_port(), free_port());
    // The API takes a while to become healthy.
    t.write("api/ready_after.txt", "1500\n");
    let api = service(&t, "api", papi, "").replace(
        "cp server.js version.txt",
        "cp server.js version.txt ready_after.txt",
    );
    let web = service(&t, "web", pweb, "depends_on = [\"api\"]");
    t.write("pmesh.toml", &format!("{web}\n{api}"));
    let mut w = Watch::start(&t, &[], &[], &["api", "web"]);
    let waiting = wait_from(&mut w, 0, |e| e["event"] == "waiting", "web waits");
    assert_eq!(waiting["service"], "web");
    assert_eq!(waiting["for"], serde_json::json!(["api"]));
    wait_from(
        &mut w,
        0,
        |e| e["event"] == "live" && e["service"] == "web",
        "web live",
    );
    let order: Vec<String> = (w.seen.iter())
        .filter(|e| e["event"] == "live")
        .filter_map(|e| e["service"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(order, vec!["api", "web"], "api went live first");
    let web_pid = pid(&get(pweb));
    // A rebuild of api does not restart web.
    t.write("api/ready_after.txt", "0\n");
    t.write("api/version.txt", "api-2\n");
    wait(
        &mut w,
        |e| e["event"] == "live" && e["service"] == "api",
        "api rebuilt",
    );
    assert!(get(papi).contains("version api-2"));
    assert_eq!(pid(&get(pweb)), web_pid, "web kept its instance");
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn an_unknown_dependency_or_a_cycle_is_a_located_error() {
    let t = Tmp::new();
    for s in ["a", "b"] {
        std::fs::create_dir_all(t.join(s)).expect("mkdir");
    }
    t.write(
        "pmesh.toml",
        "[services.a]\nrun = \"true\"\ndepends_on = [\"nope\"]\n",
    );
    let r = t.run(&["watch", "--json"]).expect_code(2);
    assert!(
        r.stderr().contains("pmesh.toml:3:15") && r.stderr().contains("`nope`"),
        "{}",
        r.stderr()
    );
    t.write(
        "pmesh.toml",
        "[services.a]\nrun = \"true\"\ndepends_on = [\"b\"]\n\n[services.b]\nrun = \"true\"\ndepends_on = [\"a\"]\n",
    );
    let r = t.run(&["build"]).expect_code(2);
    assert!(
        r.stderr().contains("pmesh.toml:3:") && r.stderr().contains("a -> b -> a"),
        "{}",
        r.stderr()
    );
}
