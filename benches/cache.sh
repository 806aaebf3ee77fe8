#!/usr/bin/env bash
# Benchmark of the team's build cache (issue 14): `watch` start to serving from the cache vs
# building, and the unpack rate vs plain `tar -x`.
#
#   benches/cache.sh                      # RUNS=5 UNPACK_RUNS=15 BUILD_S=3 MB=64
#   RUNS=9 BUILD_S=5 MB=200 benches/cache.sh
#
# It builds pmesh-dev in release and starts a WebDAV store (Debian's nginx, DAV module, on a
# free loopback port). The project: one service whose build sleeps $BUILD_S seconds (a build
# that takes seconds) and writes ~$MB MB of artifacts in 400 files (half random bytes, half
# text: what builds hold), and whose run is `python3 -m http.server` on the build, health a TCP
# connect. One checkout fills the cache with `build --push`. Then, $RUNS times interleaved,
# a fresh checkout with an empty local state (no archive, no .run, no .pmesh) runs
# `watch --json` until the `live` event:
#   from the cache   the manifest's [cache] points at the store: `fetched`, then `live`
#   building         the same manifest without [cache]: the steps run, then `live`
# and prints the medians. Then the unpack rate, in MB/s of unpacked artifacts:
#   pmesh-dev        the `fetched` event's time (download over loopback, digest, safe unpack,
#                    verify, adopt) for a one-shot `build`
#   ... from file:// the same, from a file:// copy of the store: the unpack without the network
#   tar -x           `tar -I zstd -xf` of the same payload from a local file
# each the median of $UNPACK_RUNS (default 3 x $RUNS), the three interleaved.
# It is a benchmark, not a test: it always exits 0 once it got to measuring.
set -euo pipefail
export LC_ALL=C

RUNS=${RUNS:-5}
UNPACK_RUNS=${UNPACK_RUNS:-$((RUNS * 3))}
BUILD_S=${BUILD_S:-3}
MB=${MB:-64}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$REPO/benches/common.sh"

# --- tools -----------------------------------------------------------------------------------
need=()
command -v python3 >/dev/null || need+=(python3)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || need+=(nginx)
command -v zstd >/dev/null || need+=(zstd)
install_missing "${need[@]}"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

pick_pmesh

WORK=$(mktemp -d)
NGINX_PID=
cleanup() {
    [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null && wait "$NGINX_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- the store ---------------------------------------------------------------------------------
DAV_PORT=$(free_port)
mkdir -p "$WORK/dav/data"
user=
[ "$(id -u)" -eq 0 ] && user="user root;"
cat >"$WORK/dav/nginx.conf" <<EOF
$user
daemon off;
worker_processes 1;
pid $WORK/dav/nginx.pid;
error_log $WORK/dav/error.log;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $WORK/dav/body;
    proxy_temp_path $WORK/dav/proxy;
    fastcgi_temp_path $WORK/dav/fastcgi;
    uwsgi_temp_path $WORK/dav/uwsgi;
    scgi_temp_path $WORK/dav/scgi;
    client_max_body_size 0;
    server {
        listen 127.0.0.1:$DAV_PORT;
        root $WORK/dav/data;
        location / {
            dav_methods PUT DELETE MKCOL;
            create_full_put_path on;
        }
    }
}
EOF
"$NGINX" -e "$WORK/dav/error.log" -p "$WORK/dav" -c "$WORK/dav/nginx.conf" &
NGINX_PID=$!
for _ in $(seq 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $DAV_PORT), 1)" 2>/dev/null && break
    sleep 0.1
done
URL="http://127.0.0.1:$DAV_PORT/cache"

# --- the project -------------------------------------------------------------------------------
SRC="$WORK/src"
mkdir -p "$SRC/app"
cat >"$SRC/app/gen.py" <<'EOF'
# Writes the build's artifacts: 400 files, half random bytes and half text.
import os, sys
out, total = sys.argv[1], int(sys.argv[2]) * 1000 * 1000
words = b"const value = require('module'); export function render(props) { return props; }\n"
each = total // 400
for i in range(400):
    d = os.path.join(out, "assets", "d%02d" % (i % 20))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%03d.bin" % i), "wb") as f:
        f.write(os.urandom(each) if i % 2 else (words * (each // len(words) + 1))[:each])
EOF
echo "cache bench" >"$SRC/app/index.html"
write_manifest() { # $1: the checkout, $2: "cache" or "", $3: the store's url (default $URL)
    local port
    port=$(free_port)
    {
        [ "$2" = cache ] && printf '[cache]\nurl = "%s"\n\n' "${3:-$URL}"
        cat <<EOF
[services.app]
build = ["sleep $BUILD_S", "python3 gen.py \"\$PMESH_BUILD_DIR\" $MB", "cp index.html \"\$PMESH_BUILD_DIR/\""]
run = "exec python3 -m http.server \"\$PORT\" --bind 127.0.0.1 --directory \"\$PMESH_RUN_DIR\""
listen = $port
EOF
    } >"$1/pmesh.toml"
}
checkout() { # $1: name, $2: "cache" or "", $3: the store's url: a fresh checkout, no local state
    rm -rf "${WORK:?}/$1"
    mkdir -p "$WORK/$1/app"
    cp "$SRC/app/gen.py" "$SRC/app/index.html" "$WORK/$1/app/"
    write_manifest "$WORK/$1" "$2" "${3:-}"
}

log "filling the cache (one build of ${BUILD_S}s + ${MB} MB, pushed)"
checkout filler cache
(cd "$WORK/filler" && "$PMESH" build --push --json >"$WORK/filler.json")
ARCHIVE_DIR=$(readlink -f "$WORK/filler/app/.run")
UNPACKED=$(du -sb --apparent-size "$ARCHIVE_DIR" | cut -f1)
OBJECT=$(find "$WORK/dav/data" -name '*.pmesh' | head -1)
OBJECT_BYTES=$(stat -c %s "$OBJECT")

# --- start to serving ------------------------------------------------------------------------
for i in $(seq "$RUNS"); do
    checkout "run-cache-$i" cache
    checkout "run-build-$i" ""
done
PMESH_BENCHES="$REPO/benches" python3 - "$PMESH" "$WORK" "$RUNS" <<'EOF'
import os, statistics, sys
sys.path.insert(0, os.environ["PMESH_BENCHES"])
from events import Watch
pmesh, work, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
times = {"cache": [], "build": []}
for i in range(1, runs + 1):
    for mode in ("cache", "build"):
        d = os.path.join(work, "run-%s-%d" % (mode, i))
        w = Watch([pmesh, "watch", "--json", "--no-tui"], d, d + ".err")
        t, ev = w.wait_for(lambda e: e.get("event") == "live", 120, "live")
        kinds = [e.get("event") for _, e in w.all]
        w.stop()
        want = "fetched" if mode == "cache" else "build_started"
        if want not in kinds:
            raise SystemExit("%s: no %s event: %s" % (d, want, kinds))
        times[mode].append((t - w.t0) * 1000)
c, b = statistics.median(times["cache"]), statistics.median(times["build"])
print("watch start to live, empty local state, median of %d:" % runs)
print("  from the cache  %7.0f ms   (%s)" % (c, ", ".join("%.0f" % x for x in times["cache"])))
print("  building        %7.0f ms   (%s)" % (b, ", ".join("%.0f" % x for x in times["build"])))
print("  ratio           %7.3fx" % (c / b))
EOF

# --- unpack rate -------------------------------------------------------------------------------
median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
# The same entry in a file:// store: the unpack without the network.
cp -r "$WORK/dav/data/cache" "$WORK/filestore"
fetch_ms=()
file_ms=()
fetched_ms() { # $1: checkout: the `fetched` event's duration_ms of a one-shot build there
    (cd "$1" && "$PMESH" build --json) |
        python3 -c 'import json, sys; print(next(e["duration_ms"] for e in map(json.loads, sys.stdin) if e["event"] == "fetched"))'
}
HEADER=$(head -n 2 "$OBJECT" | wc -c)
tail -c +"$((HEADER + 1))" "$OBJECT" >"$WORK/payload.tar.zst"
tar_ms=()
# Interleaved, so that whatever else the machine does weighs on all three alike.
for i in $(seq "$UNPACK_RUNS"); do
    checkout "unpack-$i" cache
    fetch_ms+=("$(fetched_ms "$WORK/unpack-$i")")
    rm -rf "${WORK:?}/unpack-$i"
    checkout "unpack-file-$i" cache "file://$WORK/filestore"
    file_ms+=("$(fetched_ms "$WORK/unpack-file-$i")")
    rm -rf "${WORK:?}/unpack-file-$i"
    mkdir -p "$WORK/tar-$i"
    t0=${EPOCHREALTIME/./}
    tar -I zstd -xf "$WORK/payload.tar.zst" -C "$WORK/tar-$i"
    t1=${EPOCHREALTIME/./}
    tar_ms+=("$(((10#$t1 - 10#$t0) / 1000))")
    rm -rf "${WORK:?}/tar-$i"
done
P=$(printf '%s\n' "${fetch_ms[@]}" | median)
F=$(printf '%s\n' "${file_ms[@]}" | median)
T=$(printf '%s\n' "${tar_ms[@]}" | median)
python3 - "$UNPACKED" "$OBJECT_BYTES" "$P" "$F" "$T" "${fetch_ms[*]}" "${file_ms[*]}" "${tar_ms[*]}" <<'EOF'
import sys
unpacked, obj, p, f, t = (int(x) for x in sys.argv[1:6])
rate = lambda ms: unpacked / 1e3 / max(ms, 1)
print("unpack, %.1f MB of artifacts in a %.1f MB entry, median of runs (MB/s of artifacts):"
      % (unpacked / 1e6, obj / 1e6))
print("  pmesh-dev fetch over WebDAV (download, digest, safe unpack, verify)  %5d ms  %6.1f MB/s  (%s)"
      % (p, rate(p), sys.argv[6]))
print("  pmesh-dev fetch from a file:// store (digest, safe unpack, verify)   %5d ms  %6.1f MB/s  (%s)"
      % (f, rate(f), sys.argv[7]))
print("  tar -I zstd -xf of the same payload, a local file                    %5d ms  %6.1f MB/s  (%s)"
      % (t, rate(t), sys.argv[8]))
print("  pmesh-dev rate / tar rate: %.2fx over WebDAV, %.2fx from a file" % (t / max(p, 1), t / max(f, 1)))
EOF
