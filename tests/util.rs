//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A fresh temporary directory that is removed when dropped.
pub struct Tmp {
    dir: tempfile::TempDir,
}

impl Default for Tmp {
    fn default() -> Self {
        Tmp::new()
    }
}

impl Tmp {
    pub fn new() -> Tmp {
        Tmp {
            dir: tempfile::tempdir().expect("create temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `rel` below the directory.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes `content` to `rel`, creating parent directories.
    pub fn write(&self, rel: &str, content: &str) -> PathBuf {
        let p = self.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).expect("create parent");
        }
        fs::write(&p, content).expect("write file");
        p
    }

    /// Writes `content` to `rel` in one rename, so that no watcher can see it half written
    /// (on a loaded machine a plain write's truncation can be built on its own).
    pub fn write_atomic(&self, rel: &str, content: &str) -> PathBuf {
        let p = self.join(rel);
        let tmp = self.join(&format!("{rel}.pmesh-test-tmp"));
        fs::write(&tmp, content).expect("write temp file");
        fs::rename(&tmp, &p).expect("rename over");
        p
    }

    pub fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    pub fn chmod(&self, rel: &str, mode: u32) {
        fs::set_permissions(self.join(rel), fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// A `pmesh-dev` command run in this directory, with a clean environment for colours.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .current_dir(self.path())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        c
    }

    /// Runs `pmesh-dev args` here and returns its output.
    pub fn run(&self, args: &[&str]) -> Run {
        Run(self.cmd(args).output().expect("run pmesh-dev"))
    }
}

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pmesh-dev")
}

/// A finished run of the binary.
pub struct Run(pub Output);

impl Run {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    /// Panics with both streams unless the exit code is `code`.
    pub fn expect_code(self, code: i32) -> Run {
        assert_eq!(
            self.code(),
            code,
            "expected exit {code}, got {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code(),
            self.stdout(),
            self.stderr()
        );
        self
    }
    pub fn ok(self) -> Run {
        self.expect_code(0)
    }
    /// The stdout lines parsed as JSON.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
            .collect()
    }
}

/// Where `.run` points, relative.
pub fn run_target(root: &Path) -> Option<String> {
    fs::read_link(root.join(".run"))
        .ok()
        .map(|t| t.to_string_lossy().into_owned())
}

/// Archive names in `root`, oldest first.
pub fn archives(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(root)
        .expect("list root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".build-"))
        .collect();
    v.sort();
    v
}

/// Asserts `.run` leads to a complete build: an archive whose `.buildid` is a valid id.
pub fn assert_run_sound(root: &Path) -> String {
    let target = run_target(root).expect(".run is a symlink");
    assert!(target.starts_with(".build-"), ".run -> {target}");
    let id = fs::read_to_string(root.join(".run/.buildid"))
        .unwrap_or_else(|e| panic!(".run -> {target} has no .buildid: {e}"));
    assert_eq!(id.trim().len(), 32, "bad .buildid {id:?}");
    target
}

/// Copies the bundled demo (`fixtures/`) into `dest`.
pub fn copy_fixtures(dest: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    copy_dir(&src, dest);
}

fn copy_dir(src: &Path, dest: &Path) {
    fs::create_dir_all(dest).expect("create dest");
    for e in fs::read_dir(src).expect("list fixtures").flatten() {
        let name = e.file_name();
        let n = name.to_string_lossy();
        if n.starts_with(".build") || n == ".run" || n == ".pmesh" {
            continue;
        }
        let to = dest.join(&name);
        if e.file_type().expect("file type").is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            fs::copy(e.path(), &to).expect("copy file");
        }
    }
}

/// A tiny manifest with one service `app` at `app/` and these build steps.
pub fn one_service(t: &Tmp, steps: &[&str], extra: &str) {
    let steps: Vec<String> = steps.iter().map(|s| format!("{s:?}")).collect();
    t.write(
        "pmesh.toml",
        &format!("[services.app]\nbuild = [{}]\n{extra}\n", steps.join(", ")),
    );
    fs::create_dir_all(t.join("app")).expect("create app");
}

/// Whether any process whose command line contains `marker` is alive.
pub fn process_alive(marker: &str) -> bool {
    let Ok(procs) = fs::read_dir("/proc") else {
        return false;
    };
    for p in procs.flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if let Ok(cmdline) = fs::read(p.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(marker) {
                // A zombie has finished; only living processes count.
                let stat = fs::read_to_string(p.path().join("stat")).unwrap_or_default();
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                if !state.starts_with('Z') {
                    return true;
                }
            }
        }
    }
    false
}

/// Waits up to `secs` for `cond`, polling.
pub fn wait_for(secs: f64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    cond()
}

/// A running `pmesh-dev watch --json`, its events collected as they come. Dropping it kills it.
pub struct Watch {
    pub child: std::process::Child,
    events: std::sync::mpsc::Receiver<serde_json::Value>,
    /// Every event received so far, in order.
    pub seen: Vec<serde_json::Value>,
}

impl Watch {
    /// Starts `pmesh-dev watch --json extra...` in `t` with `env`, and waits until every
    /// service named in `services` is watching.
    pub fn start(t: &Tmp, extra: &[&str], env: &[(&str, &str)], services: &[&str]) -> Watch {
        let mut args = vec!["watch", "--json"];
        args.extend_from_slice(extra);
        let mut w = Watch::spawn(t, &args, env);
        for s in services {
            let is_it = |e: &serde_json::Value| e["event"] == "watching" && e["service"] == *s;
            if !w.seen.iter().any(is_it) {
                w.wait_for(30.0, is_it)
                    .unwrap_or_else(|| panic!("{s} never started watching: {:#?}", w.seen));
            }
        }
        w
    }

    /// Starts `pmesh-dev args` (which must print JSON events) in `t` with `env`.
    pub fn spawn(t: &Tmp, args: &[&str], env: &[(&str, &str)]) -> Watch {
        let mut cmd = t.cmd(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Watch::spawn_cmd(cmd)
    }

    /// Starts `cmd` (a `pmesh-dev` command that prints JSON events).
    pub fn spawn_cmd(mut cmd: Command) -> Watch {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn pmesh-dev");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(e) => panic!("pmesh-dev printed a line that is not JSON: {line}: {e}"),
                }
            }
        });
        Watch {
            child,
            events: rx,
            seen: Vec::new(),
        }
    }

    /// Waits up to `secs` for an event matching `pred`, returning it.
    pub fn wait_for(
        &mut self,
        secs: f64,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) => {
                    self.seen.push(e.clone());
                    if pred(&e) {
                        return Some(e);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits for the next `build_finished` of `service` and returns it. Events consumed while
    /// waiting for other things are not looked at again; see [`Watch::seen`].
    pub fn next_build(&mut self, service: &str) -> serde_json::Value {
        self.wait_for(30.0, |e| {
            e["event"] == "build_finished" && e["service"] == service
        })
        .unwrap_or_else(|| panic!("no build of {service} finished: {:#?}", self.seen))
    }

    /// Collects events for `secs` and returns them.
    pub fn quiet_for(&mut self, secs: f64) -> Vec<serde_json::Value> {
        let start = self.seen.len();
        let _ = self.wait_for(secs, |_| false);
        self.seen[start..].to_vec()
    }

    /// Sends SIGINT and returns the exit code.
    pub fn interrupt(mut self) -> Option<i32> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .expect("SIGINT");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("watch did not exit within 20 s of SIGINT");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The names of the events in `events`.
pub fn kinds(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["event"].as_str().map(str::to_owned))
        .collect()
}

/// A free loopback port (bound, then released, for pmesh-dev to listen on).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `git ls-files --others --exclude-standard` in `dir`, a fresh repository, with no user or
/// system configuration (so no global excludes), sorted by bytes.
pub fn git_untracked_bytes(dir: &Path, home: &Path) -> Vec<Vec<u8>> {
    fs::create_dir_all(home).expect("create empty HOME");
    let git = |args: &[&str]| -> Output {
        let out = Command::new("git")
            .args(["-c", "core.excludesFile=/dev/null"])
            .args(args)
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", home)
            .env("XDG_CONFIG_HOME", home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .expect("run git (these tests need git installed)");
        assert!(
            out.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    git(&["init", "-q", "."]);
    let out = git(&["ls-files", "-z", "--others", "--exclude-standard"]);
    let mut paths: Vec<Vec<u8>> = out
        .stdout
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    paths.sort();
    paths
}

/// `GET /` on 127.0.0.1:`port` with a fresh connection: the whole raw answer, or "" when
/// nothing listens there.
pub fn get_root(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let _ = write!(s, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}
