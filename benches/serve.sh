#!/usr/bin/env bash
# Benchmark of serving through `pmesh-dev watch`: the proxy under load during swaps, the proxy
# against the same backend direct, and edit-to-serve time against its floor.
#
#   benches/serve.sh                              # the defaults below
#   SWAPS=12 LOAD_S=15 CMP_S=10 EDITS=20 benches/serve.sh
#   SERVICE_EXTRA='reload = false' benches/serve.sh   # more keys for the service (an A/B)
#
# It builds pmesh-dev in release, installs wrk (Debian's package) if missing, and sets up a
# service in a temporary directory: fixtures/testsrv/server.js (node) built by copying it and
# version.txt into $PMESH_BUILD_DIR, run with `exec node "$PMESH_RUN_DIR/server.js"`, health
# `GET /healthz`, debounce $DEBOUNCE_MS, behind the proxy on a free loopback port. Then, with
# `pmesh-dev watch --json` running (every number is measured in the same run):
#   floor   a fresh `node server.js` started directly, time until /healthz answers (median of
#           $NODE_RUNS starts before the edits and one after each edit, polled every 2 ms)
#   (c)     edit-to-serve over $EDITS edits: from just before writing version.txt to the first GET
#           through the proxy (polled every ~2 ms) that returns the new version, against the
#           floor = debounce + that build's duration_ms (build_finished) + the node start above
#   (b)     wrk -t$THREADS -c$CONNS -d${CMP_S}s --latency against the backend direct (the `port` of
#           the `live` event) and through the proxy, no swaps, alternated D P P D: throughput
#           ratio and p50 latency added. With NGINX=1 (the default; installed if missing) the
#           same backend through nginx too (one worker, upstream keep-alive, the same
#           forwarded header), as a reference for what a mature proxy gets on this machine:
#           order D P N N P D
#   (a)     wrk -t$THREADS -c$CONNS -d${LOAD_S}s --latency through the proxy while version.txt is
#           edited about every second and each swap's `live` is waited for (at least $SWAPS
#           swaps wanted): requests, failed requests (non-2xx/3xx + socket errors), p50/p99,
#           throughput
# All traffic goes to 127.0.0.1. Every process started is stopped on exit; pmesh-dev gets
# SIGINT and must exit 0 with no instance left behind.
# It is a benchmark, not a test: it always exits 0 once it got to measuring.
set -euo pipefail
export LC_ALL=C

SWAPS=${SWAPS:-8}
LOAD_S=${LOAD_S:-12}
CMP_S=${CMP_S:-8}
EDITS=${EDITS:-10}
NODE_RUNS=${NODE_RUNS:-3}
THREADS=${THREADS:-2}
CONNS=${CONNS:-32}
DEBOUNCE_MS=${DEBOUNCE_MS:-50}
CORES=$(nproc)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

. "$REPO/benches/common.sh"

# --- tools -----------------------------------------------------------------------------------
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v node >/dev/null || need+=(nodejs)
command -v python3 >/dev/null || need+=(python3)
NGINX=${NGINX:-1}
[ "$NGINX" = 1 ] && ! command -v nginx >/dev/null && ! [ -x /usr/sbin/nginx ] && need+=(nginx-light)
install_missing "${need[@]}"
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
[ "$NGINX" = 1 ] && [ -x "$NGINX_BIN" ] || NGINX_BIN=

# --- pmesh-dev --------------------------------------------------------------------------------
pick_pmesh

# --- the service ------------------------------------------------------------------------------
WORK=$(mktemp -d)
cleanup() {
    # The driver stops what it started; this is for an interrupted run. Only the pids it wrote.
    local f pid
    for f in "$WORK"/wrk.pid "$WORK"/node.pid "$WORK"/nginx.pid "$WORK"/watch.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            if [ "$f" = "$WORK/watch.pid" ]; then kill -INT "$pid" 2>/dev/null || true; else kill "$pid" 2>/dev/null || true; fi
        fi
    done
    if [ -f "$WORK/watch.pid" ]; then
        pid=$(cat "$WORK/watch.pid")
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
mkdir -p "$WORK/app"
cp "$REPO/fixtures/testsrv/server.js" "$WORK/app/server.js"
echo v0 >"$WORK/app/version.txt"
echo ok >"$WORK/app/mode.txt"
cat >"$WORK/pmesh.toml" <<EOF
[services.app]
root = "app"
build = ["cp server.js version.txt mode.txt \"\$PMESH_BUILD_DIR/\""]
run = "exec node \"\$PMESH_RUN_DIR/server.js\""
listen = $PORT
health = "GET /healthz"
debounce = "${DEBOUNCE_MS}ms"
ready_timeout = "10s"
stop_timeout = "3s"
keep = 3
${SERVICE_EXTRA:-}
EOF

# ==============================================================================================
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
PMESH_BENCHES="$REPO/benches" python3 - "$PMESH" "$WORK" "$PORT" "$SWAPS" "$LOAD_S" "$CMP_S" "$EDITS" "$NODE_RUNS" "$THREADS" \
    "$CONNS" "$DEBOUNCE_MS" "$CORES" "$LOAD_BEFORE" "$NGINX_BIN" <<'PY' || true
import http.client, json, os, re, select, signal, socket, statistics, subprocess, sys, time

(pm, work, port, swaps, load_s, cmp_s, edits, node_runs, threads, conns, debounce_ms, cores,
 load_before, nginx_bin) = sys.argv[1:]
port, swaps, load_s, cmp_s, edits, node_runs = int(port), int(swaps), float(load_s), float(cmp_s), int(edits), int(node_runs)
debounce_ms = float(debounce_ms)
app = os.path.join(work, "app")
version_file = os.path.join(app, "version.txt")
now = time.monotonic
med = statistics.median

def log(*a):
    print(*a, file=sys.stderr, flush=True)

def write_pid(name, pid):
    with open(os.path.join(work, name + ".pid"), "w") as f:
        f.write("%d\n" % pid)

sys.path.insert(0, os.environ["PMESH_BENCHES"])
import events

class Watch(events.Watch):
    """`pmesh-dev watch --json` on the service, its pid written for the clean-up."""
    def __init__(self):
        super().__init__([pm, "watch", "--json", "--manifest", os.path.join(work, "pmesh.toml")],
                         work, os.path.join(work, "watch.stderr"))
        write_pid("watch", self.p.pid)

def get(conn_port, path="/", timeout=2.0):
    """One GET on a fresh connection: (status, body) or (None, None)."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", conn_port, timeout=timeout)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, body.decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return None, None

def write_version(v):
    with open(version_file, "w") as f:
        f.write(v + "\n")

def node_start_ms():
    """A fresh `node server.js` (as pmesh-dev runs it): ms from spawn to /healthz answering 200."""
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p_port = s.getsockname()[1]; s.close()
    env = dict(os.environ, PORT=str(p_port), HOST="127.0.0.1", PMESH_RUN_DIR=app)
    t0 = now()
    p = subprocess.Popen(["sh", "-c", 'exec node "$PMESH_RUN_DIR/server.js"'], env=env, cwd=app,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    write_pid("node", p.pid)
    try:
        while now() - t0 < 10:
            st, _ = get(p_port, "/healthz", timeout=0.5)
            if st == 200:
                return (now() - t0) * 1e3
            time.sleep(0.002)
        return float("nan")
    finally:
        p.terminate()
        p.wait()

UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
def dur_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    return float(m.group(1)) * UNIT[m.group(2)] if m else float("nan")

def wrk(target_port, seconds):
    return subprocess.Popen(["wrk", "-t%s" % threads, "-c%s" % conns, "-d%ds" % round(seconds),
                             "--latency", "http://127.0.0.1:%d/" % target_port],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

def wrk_result(p):
    out = p.stdout.read().decode(errors="replace")
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    r = {"raw": out, "cpu_s": ru.ru_utime + ru.ru_stime}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    r["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else 0.0
    for q in ("50", "75", "90", "99"):
        m = re.search(r"^\s+%s%%\s+(\S+)" % q, out, re.M)
        r["p" + q] = dur_ms(m.group(1)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["sock"] = tuple(map(int, m.groups())) if m else (0, 0, 0, 0)
    r["failed"] = r["non2xx"] + sum(r["sock"])
    return r

TICK = os.sysconf("SC_CLK_TCK")
def proc_cpu_s(pid):
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, ValueError):
        return 0.0

def machine_busy():
    """(busy, total) jiffies of all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:]))
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)

def run_wrk(target_port, seconds, pids=()):
    """wrk against target_port; also the CPU that wrk and each of `pids` used meanwhile."""
    before = [proc_cpu_s(pid) for pid in pids]
    b0, t0 = machine_busy()
    p = wrk(target_port, seconds)
    write_pid("wrk", p.pid)
    r = wrk_result(p)
    b1, t1 = machine_busy()
    r["cpu"] = [proc_cpu_s(pid) - b for pid, b in zip(pids, before)]
    r["busy"] = (b1 - b0) / max(1, t1 - t0)
    return r

def start_nginx(backend):
    """nginx as a reverse proxy to the backend, set up as close to pmesh-dev's proxy as it goes:
    one worker process (pmesh-dev's HTTP proxy is one thread), HTTP/1.1 keep-alive upstream,
    X-Forwarded-For set, no access log. (process, port), or None if it does not start."""
    d = os.path.join(work, "nginx")
    os.makedirs(d, exist_ok=True)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    nport = s.getsockname()[1]
    s.close()
    with open(os.path.join(d, "nginx.conf"), "w") as f:
        f.write("""worker_processes 1;
daemon off;
master_process off;
pid %(d)s/nginx.pid;
error_log %(d)s/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %(d)s/body;
  proxy_temp_path %(d)s/proxy;
  upstream backend { server 127.0.0.1:%(b)d; keepalive 64; }
  server {
    listen 127.0.0.1:%(p)d;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $remote_addr;
    }
  }
}
""" % {"d": d, "b": backend, "p": nport})
    p = subprocess.Popen([nginx_bin, "-p", d, "-c", os.path.join(d, "nginx.conf")],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    write_pid("nginx", p.pid)
    for _ in range(100):
        if get(nport)[0] == 200:
            return p, nport
        if p.poll() is not None:
            break
        time.sleep(0.05)
    log("  nginx did not start; see %s/error.log" % d)
    p.kill()
    p.wait()
    return None

def instances_left():
    """Processes whose working directory or command line is in our temporary directory."""
    left = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cwd = os.readlink("/proc/%s/cwd" % pid)
            cmd = open("/proc/%s/cmdline" % pid, "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (cwd.startswith(app) or app in cmd) and "python3" not in cmd:
            left.append("%s %s" % (pid, cmd.strip()))
    return left

res = {}
w = None
try:
    w = Watch()
    t, live = w.wait_for(lambda e: e.get("event") == "live", 60, "the first `live`")
    log("live: build %s on backend port %s, proxy on %d" % (live["id"][:8], live["port"], port))
    st, body = get(port)
    log("  GET through the proxy: %s %s" % (st, (body or "").strip()))

    # --- floor: node's own start-to-healthy --------------------------------------------------
    node_ms = [node_start_ms() for _ in range(node_runs)]
    log("floor: node server.js start to /healthz 200: %s ms" % " ".join("%.1f" % x for x in node_ms))
    res["node_ms"] = node_ms

    # --- (c) edit-to-serve -------------------------------------------------------------------
    log("(c) edit-to-serve: %d edits of version.txt, polling the proxy every ~2 ms" % edits)
    e2s = []
    w.drain(0.5)
    conn = None
    for i in range(edits):
        v = "edit-%d-%d" % (os.getpid(), i)
        want = "version %s " % v
        t0 = now()
        write_version(v)
        served = None
        while now() - t0 < 15:
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/")
                r = conn.getresponse()
                body = r.read().decode(errors="replace")
                if r.status == 200 and body.startswith(want):
                    served = now()
                    break
            except (OSError, http.client.HTTPException):
                conn = None
            w._fill(0)
            time.sleep(0.002)
        if served is None:
            raise RuntimeError("version %s was not served within 15 s" % v)
        # This edit's events (all should be in by the time it is served).
        _, bs = w.wait_for(lambda e: e.get("event") == "build_started", 5, "build_started")
        bid = bs["id"]
        _, bf = w.wait_for(lambda e: e.get("event") == "build_finished" and e.get("id") == bid, 10, "build_finished")
        _, lv = w.wait_for(lambda e: e.get("event") == "live" and e.get("id") == bid, 10, "live")
        t_bs = next(t for t, e in reversed(w.all) if e.get("event") == "build_started" and e.get("id") == bid)
        t_bf = next(t for t, e in reversed(w.all) if e.get("event") == "build_finished" and e.get("id") == bid)
        t_lv = next(t for t, e in reversed(w.all) if e.get("event") == "live" and e.get("id") == bid)
        e2s.append(dict(total=(served - t0) * 1e3, build_ms=bf.get("duration_ms", 0),
                        to_started=(t_bs - t0) * 1e3, started_to_finished=(t_bf - t_bs) * 1e3,
                        finished_to_live=(t_lv - t_bf) * 1e3, live_to_served=(served - t_lv) * 1e3))
        d = e2s[-1]
        log("  edit %2d: served after %.1f ms (build_started +%.1f, build_finished +%.1f [duration_ms %s], live +%.1f, served +%.1f)"
            % (i + 1, d["total"], d["to_started"], d["started_to_finished"], d["build_ms"],
               d["finished_to_live"], d["live_to_served"]))
        # Let the old instance stop before the next edit.
        w.wait_for(lambda e: e.get("event") == "stopped", 10, "the old instance's `stopped`")
        w.drain(0.3)
        # One more direct node start per edit, so that the floor sees the same machine load.
        res["node_ms"].append(node_start_ms())
    if conn is not None:
        conn.close()
    res["e2s"] = e2s
    _, last_live = [(t, e) for t, e in w.all if e.get("event") == "live"][-1]
    backend = last_live["port"]

    # --- (b) direct vs proxy, no swaps -------------------------------------------------------
    log("(b) wrk -t%s -c%s -d%ds: backend direct (port %d) vs through the proxy (port %d), order D P P D"
        % (threads, conns, round(cmp_s), backend, port))
    st, body = get(backend)
    node_pid = int(body.split(" pid ")[1]) if st == 200 and " pid " in body else 0
    cmp = {"direct": [], "proxy": [], "nginx": []}
    order = ("direct", "proxy", "proxy", "direct")
    nginx = start_nginx(backend) if nginx_bin else None
    if nginx is not None:
        order = ("direct", "proxy", "nginx", "nginx", "proxy", "direct")
        log("  and through nginx (one worker, port %d)" % nginx[1])
    for which in order:
        target = {"direct": backend, "proxy": port}.get(which) or nginx[1]
        middle = nginx[0].pid if which == "nginx" else w.p.pid
        r = run_wrk(target, cmp_s, (node_pid, middle))
        cmp[which].append(r)
        n = max(1, r["requests"])
        log("  %-6s %8.0f req/s, p50 %.3f ms, p99 %.3f ms, failed %d; cpu per request: wrk %.1f us, node %.1f us, pmesh-dev %.1f us; cores busy %.0f%%"
            % (which, r["rps"], r["p50"], r["p99"], r["failed"], r["cpu_s"] / n * 1e6,
               r["cpu"][0] / n * 1e6, r["cpu"][1] / n * 1e6, r["busy"] * 100))
        time.sleep(0.5)
    if nginx is not None:
        nginx[0].terminate()
        nginx[0].wait()
    res["cmp"] = cmp
    if [e for _, e in w.drain(0.2) if e.get("event") in ("live", "crashed", "unhealthy")]:
        log("  warning: the instance changed during the comparison")

    # --- (a) load during swaps ---------------------------------------------------------------
    log("(a) wrk -t%s -c%s -d%ds --latency through the proxy while version.txt changes about every second"
        % (threads, conns, round(load_s)))
    w.drain(0.2)
    p = wrk(port, load_s)
    write_pid("wrk", p.pid)
    t_start = now()
    time.sleep(0.8)
    swap_times, unhealthy = [], 0
    i = 0
    while now() - t_start < load_s - 1.6:
        t0 = now()
        v = "swap-%d-%d" % (os.getpid(), i)
        write_version(v)
        _, bs = w.wait_for(lambda e: e.get("event") == "build_started", 10, "build_started")
        bid = bs["id"]
        _, ev = w.wait_for(lambda e: e.get("event") in ("live", "unhealthy") and e.get("id") == bid,
                           20, "live or unhealthy")
        if ev["event"] == "live":
            swap_times.append((now() - t0) * 1e3)
        else:
            unhealthy += 1
        i += 1
        rest = 1.0 - (now() - t0)
        if rest > 0:
            time.sleep(rest)
    load = wrk_result(p)
    last_version = v
    w.drain(0.5)
    st, body = get(port)
    serves_last = st == 200 and (body or "").startswith("version %s " % last_version)
    log("  %d swaps (edit to live under load: median %.0f ms), %d unhealthy; %d requests, %d failed, p50 %.3f ms, p99 %.3f ms, %.0f req/s"
        % (len(swap_times), med(swap_times) if swap_times else float("nan"), unhealthy,
           load["requests"], load["failed"], load["p50"], load["p99"], load["rps"]))
    log("  after the load, GET through the proxy: %s %s" % (st, (body or "").strip()))
    res.update(load=load, swap_times=swap_times, unhealthy=unhealthy, serves_last=serves_last)
except Exception as e:
    log("error: %s" % e)
finally:
    code = w.stop() if w is not None else None
    time.sleep(0.3)
    left = instances_left()
    res["exit"] = code
    res["left"] = left

if "load" not in res:
    if w is not None:
        log("pmesh-dev stderr: %s" % open(os.path.join(work, "watch.stderr")).read()[-2000:])
    sys.exit(0)

# --- table ------------------------------------------------------------------------------------
r = res
verdict = lambda ok: "met" if ok else "MISSED"
row = "  %-36s %16s   %-22s %16s   %-10s %s"
mean = lambda xs: sum(xs) / len(xs)
d_rps, p_rps = mean([x["rps"] for x in r["cmp"]["direct"]]), mean([x["rps"] for x in r["cmp"]["proxy"]])
d_p50, p_p50 = mean([x["p50"] for x in r["cmp"]["direct"]]), mean([x["p50"] for x in r["cmp"]["proxy"]])
d_p99, p_p99 = mean([x["p99"] for x in r["cmp"]["direct"]]), mean([x["p99"] for x in r["cmp"]["proxy"]])
cmp_failed = sum(x["failed"] for k in ("direct", "proxy", "nginx") for x in r["cmp"][k])
ratio = p_rps / d_rps if d_rps else 0.0
added = p_p50 - d_p50
node = med(r["node_ms"])
e2s = r["e2s"]
floors = [debounce_ms + d["build_ms"] + node for d in e2s]
extra = [d["total"] - f for d, f in zip(e2s, floors)]
L = r["load"]
sock = L["sock"]
print()
print("pmesh-dev serve benchmark: fixtures/testsrv/server.js (node %s) behind the proxy"
      % subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip())
print("  %s cores (load average before: %s, after: %s); wrk -t%s -c%s keep-alive, GET /"
      % (cores, load_before, " ".join(open("/proc/loadavg").read().split()[:3]), threads, conns))
print()
print(row % ("measure", "value", "baseline / detail", "", "target", "verdict"))
print(row % ("(a) load during swaps: swaps", "%d" % len(r["swap_times"]),
             "unhealthy", "%d" % r["unhealthy"], ">= 8", verdict(len(r["swap_times"]) >= 8)))
print(row % ("    requests", "%d" % L["requests"], "in", "%ds" % round(load_s), "", ""))
print(row % ("    failed requests", "%d" % L["failed"],
             "non-2xx %d, socket" % L["non2xx"], "c%d r%d w%d t%d" % sock, "0",
             verdict(L["failed"] == 0)))
print(row % ("    latency p50 / p99", "%.2f / %.2f ms" % (L["p50"], L["p99"]), "", "", "", ""))
print(row % ("    throughput", "%.0f req/s" % L["rps"], "edit to live, median",
             "%.0f ms" % med(r["swap_times"]), "", ""))
print(row % ("(b) throughput, proxy vs direct", "%.0f req/s" % p_rps, "direct",
             "%.0f req/s" % d_rps, ">= 0.8x", "%s (%.2fx)" % (verdict(ratio >= 0.8), ratio)))
if r["cmp"]["nginx"]:
    n_rps = mean([x["rps"] for x in r["cmp"]["nginx"]])
    print(row % ("    reference: nginx, 1 worker", "%.0f req/s" % n_rps, "vs direct",
                 "%.2fx" % (n_rps / d_rps if d_rps else 0), "", "pmesh-dev %.2fx nginx" % (p_rps / n_rps if n_rps else 0)))
print(row % ("    latency p50, proxy vs direct", "%.3f ms" % p_p50, "direct", "%.3f ms" % d_p50,
             "< +1 ms", "%s (+%.3f ms)" % (verdict(added < 1.0), added)))
print(row % ("    latency p99, proxy vs direct", "%.3f ms" % p_p99, "direct", "%.3f ms" % d_p99, "", ""))
print(row % ("(c) edit-to-serve, median of %d" % len(e2s), "%.1f ms" % med([d["total"] for d in e2s]),
             "floor, median", "%.1f ms" % med(floors), "", ""))
print(row % ("    above the floor, median", "%.1f ms" % med(extra), "max", "%.1f ms" % max(extra),
             "< 100 ms", verdict(med(extra) < 100)))
print()
print("  floor = debounce %.0f ms + build duration_ms (median %.0f ms) + node start-to-healthy (median %.1f ms of %d: %s)"
      % (debounce_ms, med([d["build_ms"] for d in e2s]), node, len(r["node_ms"]),
         " ".join("%.0f" % x for x in r["node_ms"])))
print("  edit-to-serve, medians: edit -> build_started %.1f ms -> build_finished %.1f ms -> live %.1f ms -> served %.1f ms"
      % tuple(med([d[k] for d in e2s]) for k in ("to_started", "started_to_finished", "finished_to_live", "live_to_served")))
def per_req(k, idx=None):
    xs = [(x["cpu_s"] if idx is None else x["cpu"][idx]) / max(1, x["requests"]) * 1e6 for x in r["cmp"][k]]
    return mean(xs)
print("  (b) CPU per request, us: direct: wrk %.1f + node %.1f = %.1f | proxy: wrk %.1f + node %.1f + pmesh-dev %.1f = %.1f; cores busy: direct %.0f%%, proxy %.0f%%"
      % (per_req("direct"), per_req("direct", 0), per_req("direct") + per_req("direct", 0),
         per_req("proxy"), per_req("proxy", 0), per_req("proxy", 1),
         per_req("proxy") + per_req("proxy", 0) + per_req("proxy", 1),
         100 * mean([x["busy"] for x in r["cmp"]["direct"]]), 100 * mean([x["busy"] for x in r["cmp"]["proxy"]])))
if r["cmp"]["nginx"]:
    print("  (b) CPU per request through nginx, us: wrk %.1f + node %.1f + nginx %.1f = %.1f"
          % (per_req("nginx"), per_req("nginx", 0), per_req("nginx", 1),
             per_req("nginx") + per_req("nginx", 0) + per_req("nginx", 1)))
print("  (b) each run, req/s: direct %s | proxy %s | nginx %s; failed requests in (b): %d"
      % (" ".join("%.0f" % x["rps"] for x in r["cmp"]["direct"]),
         " ".join("%.0f" % x["rps"] for x in r["cmp"]["proxy"]),
         " ".join("%.0f" % x["rps"] for x in r["cmp"]["nginx"]) or "-", cmp_failed))
print("  after the load the proxy serves the last version: %s; pmesh-dev exit status after SIGINT: %s; processes left: %d%s"
      % ("yes" if r["serves_last"] else "NO", r["exit"], len(r["left"]),
         (" (" + "; ".join(r["left"]) + ")") if r["left"] else ""))
PY
exit 0
