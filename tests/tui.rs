//! The TUI end to end, in a real terminal (tmux): roll back with `j`, `r`, `y`, see `.run` move
//! and the proxy serve the old build, quit with `q`, find the terminal restored and nothing left.

use std::process::Command;
use std::time::Duration;

use crate::util::*;

/// A tmux server of its own, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Tmux {
            socket: format!("pmesh-test-{}-{n}", std::process::id()),
        }
    }

    fn cmd(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("run tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.cmd(&["capture-pane", "-p", "-t", "t"])
    }

    fn keys(&self, keys: &str) {
        self.cmd(&["send-keys", "-t", "t", keys]);
        std::thread::sleep(Duration::from_millis(150));
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

use crate::util::get_root as get;

/// A service `app` running the test server at `version.txt` v1, behind the proxy on `port`,
/// with `first_step` before its copy step (when given) and `extra` keys.
fn app(t: &Tmp, port: u16, first_step: &str, extra: &str) {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/testsrv/server.js");
    std::fs::create_dir_all(t.join("app")).expect("mkdir");
    std::fs::copy(src, t.join("app/server.js")).expect("copy");
    t.write("app/version.txt", "v1\n");
    t.write(
        "pmesh.toml",
        &format!(
            "[services.app]\nbuild = [{first_step}\"cp server.js version.txt \\\"$PMESH_BUILD_DIR/\\\"\"]\n\
             run = \"exec node \\\"$PMESH_RUN_DIR/server.js\\\"\"\nlisten = {port}\n\
             health = \"GET /healthz\"\n{extra}"
        ),
    );
}

impl Tmux {
    /// `pmesh-dev watch` in `t`, in a new `width`x30 session; its exit code is printed after.
    fn watch(t: &Tmp, width: u16) -> Tmux {
        let tmux = Tmux::new();
        let script = format!(
            "cd '{}' && '{}' watch; echo EXITED:$?; sleep 60",
            t.path().display(),
            bin()
        );
        let width = width.to_string();
        tmux.cmd(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            &width,
            "-y",
            "30",
            &script,
        ]);
        tmux
    }
}

#[test]
fn roll_back_from_the_tui_then_quit_restores_the_terminal() {
    let t = Tmp::new();
    let port = free_port();
    app(&t, port, "", "keep = 3\n");
    let tmux = Tmux::watch(&t, 100);
    assert!(
        wait_for(30.0, || get(port).contains("version v1")),
        "v1 is served: {}",
        tmux.screen()
    );
    let root = t.join("app");
    let v1 = run_target(&root).expect("live");
    t.write("app/version.txt", "v2\n");
    assert!(
        wait_for(30.0, || get(port).contains("version v2")),
        "v2 is served"
    );
    let v2 = run_target(&root).expect("live");
    assert_ne!(v1, v2);
    assert!(
        wait_for(10.0, || tmux.screen().contains(&v2[7..15])),
        "the builds pane lists the new build:\n{}",
        tmux.screen()
    );

    // The builds pane has focus and the live build is selected: move to the older one.
    tmux.keys("j");
    tmux.keys("r");
    assert!(
        wait_for(5.0, || tmux.screen().contains("back to")
            && tmux.screen().contains("y yes")),
        "a confirmation is asked:\n{}",
        tmux.screen()
    );
    tmux.keys("y");
    assert!(
        wait_for(30.0, || run_target(&root).as_deref() == Some(v1.as_str())),
        ".run went back to {v1}:\n{}",
        tmux.screen()
    );
    assert!(
        wait_for(30.0, || get(port).contains("version v1")),
        "the proxy serves the old build"
    );

    tmux.keys("q");
    assert!(
        wait_for(30.0, || tmux.screen().contains("EXITED:0")),
        "pmesh-dev quit with 0:\n{}",
        tmux.screen()
    );
    let alt = tmux.cmd(&["display-message", "-p", "-t", "t", "#{alternate_on}"]);
    assert_eq!(alt.trim(), "0", "the alternate screen was left");
    let cursor = tmux.cmd(&["display-message", "-p", "-t", "t", "#{cursor_flag}"]);
    assert_eq!(cursor.trim(), "1", "the cursor is shown again");
    let marker = t.path().to_string_lossy().into_owned();
    assert!(
        wait_for(10.0, || !process_alive(&format!("{marker}/app/.build-"))),
        "no instance is left"
    );
    assert!(get(port).is_empty(), "the proxy is gone");
}

#[test]
fn a_build_printing_a_flood_of_lines_still_leaves_the_screen_on_the_right_state() {
    let t = Tmp::new();
    let port = free_port();
    // Far more lines than any queue holds, as fast as `seq` prints them.
    app(&t, port, "\"seq 300000\", ", "");
    let tmux = Tmux::watch(&t, 120);
    assert!(
        wait_for(60.0, || get(port).contains("version v1")),
        "v1 is served: {}",
        tmux.screen()
    );
    let row = |screen: &str| {
        screen
            .lines()
            .find(|l| l.contains("app") && (l.contains("live") || l.contains("building")))
            .map(str::to_owned)
    };
    assert!(
        wait_for(20.0, || row(&tmux.screen())
            .is_some_and(|r| r.contains("live"))),
        "the services row says live:\n{}",
        tmux.screen()
    );
    tmux.keys("q");
    assert!(
        wait_for(30.0, || tmux.screen().contains("EXITED:0")),
        "pmesh-dev quit with 0:\n{}",
        tmux.screen()
    );
}
