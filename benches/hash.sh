#!/usr/bin/env bash
# Benchmark of `pmesh-dev hash` against the tools a user would compare it with.
#
#   benches/hash.sh                       # RUNS=5, tree in /tmp/pmesh-bench-tree
#   RUNS=9 BENCH_DIR=/some/where benches/hash.sh
#   PMESH_BIN=/path/to/pmesh-dev benches/hash.sh   # measure that binary instead of building
#   benches/hash.sh deep                  # the deep tree of benches/watch.sh deep ($DEEP_DIR)
#   REAL_DIR=/path/to/checkout benches/hash.sh real  # a real repository's git checkout, as it is
#
# It builds pmesh-dev in release, makes (once; reused afterwards) a generated JS-monorepo-like
# git repository of ~110k files in ~45k directories with nested .gitignore files and ignored
# node_modules/dist trees (its manifest, pmesh.toml, is in it), and prints, as medians of $RUNS
# interleaved runs:
#   cold `pmesh-dev hash`  (no digest cache)    vs  git ls-files -z | xargs -0 -P<cores> xxhsum -H2
#     of the service: .pmesh/ removed first,        (run with -q, which only silences the progress
#     so the digest cache is written                line xxhsum writes to stderr for big files)
#     and of the directory (`hash DIR`: default
#     settings, no cache read or written)
#   warm `pmesh-dev hash`  (cache, no change)   vs  git status --porcelain
#   peak RSS of both pmesh-dev runs (also per hashed file), and the --stats breakdown of where
#   the time goes (load the cache, walk+stat+read, sort+id, save the cache, total; the rest of
#   the wall time is outside the hash: process start, manifest, output, freeing the result, exit).
# The OS page cache is warm for every tool (nothing is dropped between runs): "cold" means
# "without pmesh-dev's digest cache", not "from disk".
# `deep` measures the same on the tree of `benches/watch.sh deep` instead: about 2 files a
# directory, $DEEP_DIRS (52000) directories, in $DEEP_DIR (/tmp/pmesh-bench-deep; generated once
# by make_deep_tree in common.sh). `real` measures the git checkout $REAL_DIR as it is, at its
# commit (cloned from $REAL_SRC first if that is set and $REAL_DIR does not exist yet): the team
# benchmarks on at least one real public repository, not only on generated trees. For both, the
# manifest is outside the tree (a service whose root is the tree, so nothing is added to it), and
# .pmesh/ (the digest cache) is hidden from git through .git/info/exclude unless the tree's own
# rules hide it; the commit measured and the tree's shape (files git tracks, the directories
# holding them, path depth and length) are printed with the figures. The README's real-tree
# figures are of babel/babel at 1da3cfa1a25503c7ecba7304f8738933e6d16dca ("Enable
# `no-useless-computed-key` rule (#18179)"; 27,674 files in 13,024 directories):
# `git clone -q <a clone of babel/babel> /tmp/pmesh-bench-babel`, then
# `REAL_DIR=/tmp/pmesh-bench-babel benches/hash.sh real`. Any other checkout works the same.
# It is a benchmark, not a test: it always exits 0 once it got to measuring.
set -euo pipefail
export LC_ALL=C

RUNS=${RUNS:-5}
BENCH_DIR=${BENCH_DIR:-/tmp/pmesh-bench-tree}
MODE=${1:-}
case $MODE in
    "" | deep | real) ;;
    *) printf 'usage: %s [deep|real]\n' "$0" >&2; exit 2 ;;
esac
CORES=$(nproc)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MARKER_NAME=pmesh-bench-tree-v1 # lives in .git/, so neither git nor pmesh-dev sees it

. "$REPO/benches/common.sh"

# --- tools -----------------------------------------------------------------------------------
need=()
command -v xxhsum >/dev/null || need+=(xxhash)
[ -x /usr/bin/time ] || need+=(time)
command -v python3 >/dev/null || need+=(python3)
install_missing "${need[@]}"

# --- pmesh-dev --------------------------------------------------------------------------------
pick_pmesh

GIT_HOME=$(mktemp -d)
trap 'rm -rf "$GIT_HOME"' EXIT
isolate_git "$GIT_HOME"

# --- the tree ---------------------------------------------------------------------------------
generate_tree() {
    local dir=$1
    python3 - "$dir" <<'PY'
import os, random, sys

root = sys.argv[1]
rng = random.Random(20240611)

# Text that looks like source, reused as the body of every file (each file gets its own
# header and offset, so no two files are alike).
words = ("const let function return import export from default async await if else for "
         "while switch case break new this props state useState useEffect render component "
         "string number boolean undefined null true false => ( ) { } [ ] ; , . = + - * / < > "
         "type interface extends implements class public private readonly value data item "
         "items index key id name user error result response request options config").split()
lines, total = [], 0
while total < 6 << 20:
    n = rng.randint(0, 12)
    line = "  " * rng.randint(0, 4) + " ".join(rng.choice(words) for _ in range(n)) + "\n"
    lines.append(line)
    total += len(line)
TEXT = "".join(lines).encode()
TL = len(TEXT)

def body(size, header):
    h = header.encode()
    n = max(0, size - len(h))
    off = rng.randrange(TL)
    out = TEXT[off:off + n]
    while len(out) < n:
        out += TEXT[: n - len(out)]
    return h + out

def src_size():
    r = rng.random()
    if r < 0.003:                       # a few larger files (bundles, fixtures, images)
        return int(rng.uniform(50e3, 1e6) if rng.random() < 0.5 else 10 ** rng.uniform(4.7, 6))
    return int(10 ** rng.uniform(2.3, 4.3))   # 200 B .. 20 KB, log-uniform

files = 0
dirs = 0
def mkdir(p):
    global dirs
    os.makedirs(p, exist_ok=True)
    dirs += 1
def write(p, data, mode=None):
    global files
    with open(p, "wb") as f:
        f.write(data)
    if mode:
        os.chmod(p, mode)
    files += 1
def text(p, size=None):
    rel = os.path.relpath(p, root)
    write(p, body(size or src_size(), "// %s\n" % rel))
ignored = 0
def itext(p, size=None):   # a file the ignore rules exclude
    global ignored
    text(p, size)
    ignored += 1

DIRWORDS = ("components utils hooks lib api services models views pages routes store reducers "
            "actions selectors helpers types constants config styles assets icons i18n locales "
            "middleware core common shared internal features widgets layouts forms tables charts "
            "auth admin settings profile dashboard billing search editor modals __tests__ "
            "__mocks__ fixtures adapters plugins schemas validators graphql queries mutations "
            "workers server client").split()
ADJ = "User Account Order Invoice Product Cart Search Filter Date Time Modal Side Top Nav Data Grid List Item Card Form Input Select Toggle Chart Map File Image Video Audio Chat Message Team Project Task Report Event Billing Plan Token Session Theme Layout Page Panel Tab Menu Button Badge Avatar Tooltip Popover Toast".split()
NOUN = "View Card Row List Item Panel Header Footer Body Dialog Editor Picker Viewer Table Field Group Section Wizard Step Summary Detail Preview Provider Context Store Service Client Hook Utils".split()
EXTS = [(".ts", 30), (".tsx", 25), (".js", 8), (".test.ts", 10), (".test.tsx", 6), (".css", 5),
        (".scss", 3), (".json", 4), (".md", 3), (".svg", 3), (".snap", 2), (".d.ts", 1)]
EXT_NAMES = [e for e, _ in EXTS]
EXT_W = [w for _, w in EXTS]

os.makedirs(root, exist_ok=True)
write(os.path.join(root, ".gitignore"),
      b"# generated monorepo\nnode_modules/\ndist/\n*.log\n!keep.log\n.pmesh/\ncoverage/\n")
write(os.path.join(root, "package.json"), b'{"name": "bench-monorepo", "private": true, "workspaces": ["packages/*", "apps/*"]}\n')
text(os.path.join(root, "README.md"), 4000)
text(os.path.join(root, "tsconfig.json"), 900)
write(os.path.join(root, ".env"), b"API_URL=http://localhost:8080\n")
mkdir(os.path.join(root, "fixtures"))
text(os.path.join(root, "fixtures", "large-data.json"), 6 << 20)   # exercises the streamed read
text(os.path.join(root, "fixtures", "medium-data.json"), 3 << 20)
mkdir(os.path.join(root, "scripts"))
for i in range(12):
    text(os.path.join(root, "scripts", "task-%02d.sh" % i), 1500)
    os.chmod(os.path.join(root, "scripts", "task-%02d.sh" % i), 0o755)
write(os.path.join(root, "scripts", "release notes – ünïcode.md"), b"# notes\n")
write(os.path.join(root, "scripts", "-leading-dash.txt"), b"dash\n")

# Packages and apps, each a tree grown at random.
pkgs = ["packages/pkg-%03d" % i for i in range(150)] + ["apps/app-%02d" % i for i in range(10)]
mkdir(os.path.join(root, "packages")); mkdir(os.path.join(root, "apps"))
TRACKED_DIRS = 41500
per_pkg = TRACKED_DIRS // len(pkgs)
tracked_dirs = []   # absolute paths of directories that hold tracked source files
for pi, pkg in enumerate(pkgs):
    base = os.path.join(root, pkg)
    mkdir(base)
    write(os.path.join(base, "package.json"), ('{"name": "@bench/%s", "version": "1.0.%d"}\n' % (os.path.basename(pkg), pi)).encode())
    text(os.path.join(base, "README.md"))
    text(os.path.join(base, "tsconfig.json"), 600)
    write(os.path.join(base, ".env"), ("PKG=%d\n" % pi).encode())
    write(os.path.join(base, ".eslintrc.json"), b'{"extends": "../../.eslintrc.json"}\n')
    if pi % 3 == 0:   # package-level ignore file with a negation
        write(os.path.join(base, ".gitignore"), b"build/\n*.tmp\n!keep.tmp\n")
        mkdir(os.path.join(base, "build"))
        for j in range(rng.randint(10, 30)):
            itext(os.path.join(base, "build", "out-%d.js" % j))
        itext(os.path.join(base, "scratch.tmp"), 300)
        text(os.path.join(base, "keep.tmp"), 300)
    if pi % 2 == 0:   # ignored build output
        d = os.path.join(base, "dist"); mkdir(d); mkdir(os.path.join(d, "chunks"))
        for j in range(rng.randint(8, 20)):
            itext(os.path.join(d, "index-%d.js" % j))
            itext(os.path.join(d, "chunks", "c%d.js" % j))
    if pi % 5 == 0:   # package-local node_modules (ignored by the root .gitignore)
        for j in range(rng.randint(3, 8)):
            d = os.path.join(base, "node_modules", "dep-%d" % j, "lib"); os.makedirs(d); dirs += 2
            for k in range(rng.randint(3, 10)):
                itext(os.path.join(d, "m%d.js" % k))
    if pi % 4 == 0:
        itext(os.path.join(base, "debug.log"), 2000)   # ignored
        text(os.path.join(base, "keep.log"), 500)     # tracked through the negation
    # The source tree: grow directories under src/ and test/ by picking a random parent.
    tree = []
    for top in ("src", "test"):
        p = os.path.join(base, top); mkdir(p); tree.append(p)
    children = {}
    while len(tree) < per_pkg:
        parent = rng.choice(tree)
        used = children.setdefault(parent, set())
        name = rng.choice(DIRWORDS) if rng.random() < 0.5 else rng.choice(ADJ) + rng.choice(NOUN)
        if name in used:
            continue
        used.add(name)
        p = os.path.join(parent, name); mkdir(p); tree.append(p)
    tracked_dirs.extend(tree)

# Deeper ignore files in some source directories.
for d in rng.sample(tracked_dirs, 400):
    write(os.path.join(d, ".gitignore"), b"__generated__/\n*.gen.ts\n!keep.gen.ts\n")
    g = os.path.join(d, "__generated__"); mkdir(g)
    for j in range(rng.randint(2, 6)):
        itext(os.path.join(g, "schema-%d.ts" % j))
    itext(os.path.join(d, "api.gen.ts"))
    text(os.path.join(d, "keep.gen.ts"))

# Source files spread unevenly over the directories (many with 0-3, some with dozens).
SRC_FILES = 100500 - 360 - (files - ignored)   # 360: keep.log and icon.png below
weights = [rng.expovariate(1.0) ** 2 for _ in tracked_dirs]
names_in = {}
for d in rng.choices(tracked_dirs, weights, k=SRC_FILES):
    used = names_in.setdefault(d, set())
    while True:
        stem = rng.choice(ADJ) + rng.choice(NOUN)
        name = stem + rng.choices(EXT_NAMES, EXT_W)[0]
        if name not in used:
            break
    used.add(name)
    text(os.path.join(d, name))
for d in rng.sample(tracked_dirs, 60):
    text(os.path.join(d, "keep.log"), 400)       # tracked through the root negation
    itext(os.path.join(d, "trace.log"), 4000)     # ignored
for d in rng.sample(tracked_dirs, 300):
    write(os.path.join(d, "icon.png"), rng.randbytes(rng.randint(500, 30000)))

# The root node_modules: many small files in many directories, never hashed.
nm = os.path.join(root, "node_modules"); mkdir(nm); mkdir(os.path.join(nm, ".bin"))
mkdir(os.path.join(nm, "@bench"))
for i in range(420):
    p = os.path.join(nm, "lib-%03d" % i); mkdir(p)
    write(os.path.join(p, "package.json"), ('{"name": "lib-%03d"}\n' % i).encode()); ignored += 1
    itext(os.path.join(p, "index.js"))
    for sub in range(rng.randint(1, 5)):
        s = os.path.join(p, "lib" if sub == 0 else "lib/sub%d" % sub); mkdir(s)
        for k in range(rng.randint(2, 6)):
            itext(os.path.join(s, "f%d.js" % k))
    if i % 7 == 0:
        os.symlink("../lib-%03d/index.js" % i, os.path.join(nm, ".bin", "lib-%03d" % i))
for pkg in pkgs[:40]:
    os.symlink(os.path.join("..", "..", pkg), os.path.join(nm, "@bench", os.path.basename(pkg)))

print("generated %d files (%d of them ignored) in ~%d directories" % (files, ignored, dirs), file=sys.stderr)
PY
}

make_tree() {
    local dir=$BENCH_DIR
    if [ -f "$dir/.git/$MARKER_NAME" ]; then
        log "reusing the tree in $dir"
        return
    fi
    if [ -e "$dir" ]; then
        if [ -f "$dir/.pmesh-bench-partial" ] || [ -f "$dir/.git/pmesh-bench-partial" ] ||
            [ -z "$(ls -A "$dir")" ]; then
            rm -rf "$dir"
        else
            log "error: $dir exists and is not a tree made by this script; set BENCH_DIR elsewhere"
            exit 2
        fi
    fi
    mkdir -p "$dir"
    : >"$dir/.pmesh-bench-partial"
    local t0=$EPOCHREALTIME
    log "generating the tree in $dir"
    generate_tree "$dir"
    write_manifest
    log "committing it to git (once)"
    git -C "$dir" init -q -b main
    git -C "$dir" config user.name "pmesh bench"
    git -C "$dir" config user.email "bench@pmesh.invalid"
    no_auto_gc "$dir"
    mv "$dir/.pmesh-bench-partial" "$dir/.git/pmesh-bench-partial" # out of git's and pmesh's sight
    git -C "$dir" -c core.looseCompression=1 add -A
    git -C "$dir" commit -q -m "generated tree"
    mv "$dir/.git/pmesh-bench-partial" "$dir/.git/$MARKER_NAME"
    sync # so that writeback of the new tree does not run during the measurements
    log "tree ready in $(ms_since "$t0") ms"
}

# A background `git gc --auto` (100k loose objects trigger it) would run during the measurements.
no_auto_gc() {
    git -C "$1" config gc.auto 0
    git -C "$1" config maintenance.auto false
}

write_manifest() {
    local want
    want=$'[services.tree]\nroot = "."\nbuild = ["true"]\n'
    # Rewrite only when different, so a reused tree stays clean for git.
    if [ ! -f "$BENCH_DIR/pmesh.toml" ] || [ "$(cat "$BENCH_DIR/pmesh.toml")"$'\n' != "$want" ]; then
        printf '%s' "$want" >"$BENCH_DIR/pmesh.toml"
    fi
}

# --- timing helpers ---------------------------------------------------------------------------
us_now() { local t=${EPOCHREALTIME/./}; echo $((10#$t)); }
ms_since() { local t0=${1/./} t1=${EPOCHREALTIME/./}; echo $(((10#$t1 - 10#$t0) / 1000)); }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
fmt_ms() { awk -v u="$1" 'BEGIN {printf "%.1f ms", u/1000}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2fx", a/b; else print "n/a"}'; }
verdict() { awk -v a="$1" -v b="$2" -v lim="$3" 'BEGIN {print ((b > 0 && a/b <= lim) ? "met" : "MISSED")}'; }

# Median of each --stats phase over the lines of file $1.
PHASES="load walk+stat+read sort+id save total"
phase_medians() {
    awk -v phases="$PHASES" 'BEGIN {n = split(phases, want, " "); for (k = 1; k <= n; k++) ok[want[k]] = 1}
        {for (i = 1; i < NF; i++) if ($(i+1) ~ /ms[,;]?$/ && ($i in ok)) {v = $(i+1); sub(/ms.*/, "", v); print $i, v}}' "$1" |
        sort -k1,1 -k2,2n |
        awk -v phases="$PHASES" '{v[$1] = v[$1] " " $2; n[$1]++} END {
            k = split(phases, order, " ");
            for (j = 1; j <= k; j++) {p = order[j]; if (!n[p]) continue; split(substr(v[p], 2), a, " "); c = n[p];
                m = (c % 2) ? a[(c+1)/2] : (a[c/2] + a[c/2+1]) / 2;
                printf "%s%s %.1f ms", (j > 1 ? ", " : ""), p, m}
            print ""}'
}

# Median of the `total` phase (all of the hash, inside the process) over the lines of file
# $1, in microseconds.
total_median_us() {
    awk '{for (i = 1; i < NF; i++) if ($i == "total") {v = $(i+1); sub(/ms.*/, "", v); printf "%d\n", v * 1000}}' "$1" |
        sort -n | awk '{a[NR] = $1} END {if (NR) print (NR % 2) ? a[(NR+1)/2] : int((a[NR/2] + a[NR/2+1]) / 2)}'
}

# Runs "$@" (in the tree) and prints its wall time and the CPU time (user + system) of the
# processes it ran, in microseconds. Call it in $(...): the fresh subshell starts with zero
# child CPU time, and `times` reports what its children used.
time_us() {
    local t0 t1 cpu
    t0=$(us_now)
    "$@" >/dev/null
    t1=$(us_now)
    times >"$GIT_HOME/times"
    cpu=$(awk 'NR == 2 {t = 0; for (i = 1; i <= 2; i++) {split($i, a, /[ms]/); t += a[1] * 60 + a[2]}; printf "%d", t * 1e6}' "$GIT_HOME/times")
    echo "$((t1 - t0)) $cpu"
}
wall() { echo "${1% *}"; }
cpu() { echo "${1#* }"; }

# Every timed pmesh-dev run also appends its --stats line (stderr) to $STATS_LOG.
pm_hash() { "$PMESH" hash tree --manifest "$MANIFEST" --stats 2>>"$STATS_LOG"; }
pm_hash_dir() { "$PMESH" hash "$TREE" --stats 2>>"$STATS_LOG"; }
xxh_pipeline() { git ls-files -z | xargs -0 -P"$CORES" -n 1000 xxhsum -q -H2; }
# shellcheck disable=SC2317 # these run through time_us
git_status() { git status --porcelain; }

# ==============================================================================================
# TREE: what is hashed; MANIFEST: the manifest of its service `tree`; UNHASHED: the files git
# tracks that the service never hashes whatever the ignore rules say (its own manifest).
case $MODE in
    "")
        make_tree
        write_manifest
        no_auto_gc "$BENCH_DIR"
        TREE=$BENCH_DIR MANIFEST=$BENCH_DIR/pmesh.toml UNHASHED=1
        ;;
    deep | real)
        pick_tree "$MODE"
        MANIFEST=$GIT_HOME/pmesh.toml UNHASHED=0
        printf '[services.tree]\nroot = "%s"\nbuild = ["true"]\n' "$TREE" >"$MANIFEST"
        ;;
esac
cd "$TREE"

if [ -n "$(git status --porcelain | head -5)" ]; then
    log "warning: the tree is not clean for git; git status will be slower than on a clean repo:"
    git status --porcelain | head -5 >&2
fi

# Counts.
facts=
if [ -n "$MODE" ]; then
    facts=$(tree_facts "$TREE")
    log "$MODE tree $TREE:" "$facts"
fi
# Outside .git and what pmesh-dev keeps in a service root (.pmesh/; .run and .build-* after a watch).
total_files=$(find . -path ./.git -prune -o -path ./.pmesh -prune -o -path './.build*' -prune -o -path './.run*' -prune -o ! -type d -print | wc -l)
total_dirs=$(find . -path ./.git -prune -o -path ./.pmesh -prune -o -path './.build*' -prune -o -path './.run*' -prune -o -type d -print | wc -l)
git_files=$(git ls-files | wc -l)
# Tracked files that the ignore rules match: git hashes them (xxhsum gets them from ls-files),
# pmesh-dev never sees them. None in the generated trees; a real checkout may have some.
tracked_ignored=$(git ls-files -ci --exclude-standard | wc -l)
rm -rf .pmesh
pm_json=$("$PMESH" hash tree --manifest "$MANIFEST" --json)
pm_files=$(sed -E 's/.*"files": *([0-9]+).*/\1/' <<<"$pm_json")
pm_bytes=$(sed -E 's/.*"bytes": *([0-9]+).*/\1/' <<<"$pm_json")
tracked_ignore_files=$(git ls-files | grep -cE '(^|/)\.(git)?ignore$' || true)
log "tree: $total_files files (symlinks included) in $total_dirs directories (root included)"
log "pmesh-dev hashes $pm_files files ($pm_bytes bytes); git tracks $git_files ($UNHASHED never hashed: the manifest; $tracked_ignored that the ignore rules match; $tracked_ignore_files ignore files counted by both)"
expected=$((git_files - UNHASHED - tracked_ignored))
if [ "$pm_files" -ne "$expected" ]; then
    log "warning: pmesh-dev hashes $((pm_files - expected)) files more than git tracks less the $UNHASHED + $tracked_ignored above"
fi

# Correctness, cheaply: pmesh-dev's per-file digests are xxh3-128, as xxhsum -H2 prints them.
# Checked on the first, the middle and the last file pmesh-dev lists, and the largest (big ones
# are read streamed).
digest_check=ok
list=$("$PMESH" hash tree --manifest "$MANIFEST" --list)
n=$(wc -l <<<"$list")
largest=$(cut -c35- <<<"$list" | tr '\n' '\0' | xargs -0 stat -c '%s %n' -- | sort -n | tail -1 | cut -d' ' -f2-)
checked=0
for f in "$(sed -n 1p <<<"$list" | cut -c35-)" "$(sed -n "$(((n + 1) / 2))p" <<<"$list" | cut -c35-)" \
    "$(sed -n "${n}p" <<<"$list" | cut -c35-)" "$largest"; do
    want=$(xxhsum -q -H2 -- "$f" | awk '{print $1}')
    got=$(P=$f awk 'substr($0, 35) == ENVIRON["P"] {print $1}' <<<"$list")
    checked=$((checked + 1))
    if [ "$want" != "$got" ]; then
        digest_check="MISMATCH"
        log "digest mismatch for $f: pmesh-dev '${got:-<missing>}', xxhsum -H2 '$want'"
    fi
done
log "per-file digests vs xxhsum -H2 on $checked files (the largest: $largest): $digest_check"

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
# --- cold: no digest cache vs xxhsum over the same files --------------------------------------
log "cold: pmesh-dev hash of the service (.pmesh/ removed: the cache is written) and of the directory (no cache) vs git ls-files | xargs -P$CORES xxhsum -H2 ($RUNS runs each, interleaved; page cache warm)"
STATS_LOG=/dev/null
# Warms the page cache for all; xxhsum fails on a tracked path it cannot read (a submodule,
# a dangling symlink), and goes on with the rest.
rm -rf .pmesh; pm_hash >/dev/null; pm_hash_dir >/dev/null
xxh_pipeline >/dev/null 2>"$GIT_HOME/xxh.err" ||
    log "warning: the xxhsum pipeline failed on some paths: $(head -3 "$GIT_HOME/xxh.err")"
cold=(); dirh=(); xxh=()
cold_cpu=(); dirh_cpu=(); xxh_cpu=()
for ((i = 1; i <= RUNS; i++)); do
    rm -rf .pmesh
    STATS_LOG="$GIT_HOME/stats-cold"
    r=$(time_us pm_hash); cold+=("$(wall "$r")"); cold_cpu+=("$(cpu "$r")")
    STATS_LOG="$GIT_HOME/stats-dir"
    r=$(time_us pm_hash_dir); dirh+=("$(wall "$r")"); dirh_cpu+=("$(cpu "$r")")
    r=$(time_us xxh_pipeline 2>/dev/null); xxh+=("$(wall "$r")"); xxh_cpu+=("$(cpu "$r")")
    log "  run $i: pmesh-dev service $(fmt_ms "${cold[-1]}") (cpu $(fmt_ms "${cold_cpu[-1]}")), directory $(fmt_ms "${dirh[-1]}") (cpu $(fmt_ms "${dirh_cpu[-1]}")), xxhsum $(fmt_ms "${xxh[-1]}") (cpu $(fmt_ms "${xxh_cpu[-1]}"))"
done
rm -rf .pmesh
cold_stats=$(/usr/bin/time -f 'RSS %M' -o "$GIT_HOME/rss-cold" "$PMESH" hash tree --manifest "$MANIFEST" --stats 2>&1 >/dev/null)
rss_cold=$(awk '/^RSS/ {print $2}' "$GIT_HOME/rss-cold")

# --- warm: cache present, nothing changed, vs git status --------------------------------------
log "warm: filling the digest cache and git's index, then waiting out the 2 s racy window"
STATS_LOG=/dev/null
git status --porcelain >/dev/null
pm_hash >/dev/null
sleep 2.2
git status --porcelain >/dev/null
pm_hash >/dev/null
STATS_LOG="$GIT_HOME/stats-warm"
log "warm: pmesh-dev hash with its cache vs git status --porcelain ($RUNS runs each, interleaved)"
warm=(); gst=()
warm_cpu=(); gst_cpu=()
for ((i = 1; i <= RUNS; i++)); do
    r=$(time_us pm_hash); warm+=("$(wall "$r")"); warm_cpu+=("$(cpu "$r")")
    r=$(time_us git_status); gst+=("$(wall "$r")"); gst_cpu+=("$(cpu "$r")")
    log "  run $i: pmesh-dev $(fmt_ms "${warm[-1]}") (cpu $(fmt_ms "${warm_cpu[-1]}")), git status $(fmt_ms "${gst[-1]}") (cpu $(fmt_ms "${gst_cpu[-1]}"))"
done
warm_stats=$(/usr/bin/time -f 'RSS %M' -o "$GIT_HOME/rss-warm" "$PMESH" hash tree --manifest "$MANIFEST" --stats 2>&1 >/dev/null)
rss_warm=$(awk '/^RSS/ {print $2}' "$GIT_HOME/rss-warm")
if grep -qv 'files read 0 ' "$STATS_LOG"; then
    log "note: some warm runs still read files:"
    grep -v 'files read 0 ' "$STATS_LOG" >&2
fi

# --- table ------------------------------------------------------------------------------------
m_cold=$(median "${cold[@]}"); m_dir=$(median "${dirh[@]}"); m_xxh=$(median "${xxh[@]}")
m_warm=$(median "${warm[@]}"); m_gst=$(median "${gst[@]}")
rss_verdict=$(awk -v k="$rss_cold" -v w="$rss_warm" 'BEGIN {m = (k > w ? k : w); print (m < 150*1024 ? "met" : "MISSED")}')
mb() { awk -v k="$1" 'BEGIN {printf "%.1f MB", k/1024}'; }
per_file() { awk -v k="$1" -v n="$pm_files" 'BEGIN {if (n > 0) printf "%.0f B/file", k*1024/n}'; }
row() { printf '  %-28s %12s   %-34s %12s   %7s   %-8s %s\n' "$@"; }

echo
case $MODE in
    "") echo "pmesh-dev hash benchmark: $BENCH_DIR" ;;
    deep) echo "pmesh-dev hash benchmark on a generated deep tree: $TREE" ;;
    real) echo "pmesh-dev hash benchmark on a real tree: $TREE" ;;
esac
[ -z "$facts" ] || echo "$facts"
echo "  tree: $total_files files in $total_dirs dirs; hashed by pmesh-dev: $pm_files files, $pm_bytes bytes;"
echo "  tracked by git: $git_files ($UNHASHED never hashed: the manifest in the tree; $tracked_ignored that the ignore rules match; both include the $tracked_ignore_files ignore files)"
echo "  $CORES cores (load average before: $LOAD_BEFORE, after: $(cut -d' ' -f1-3 /proc/loadavg)), medians of $RUNS runs"
echo "  OS page cache warm for every run of every tool; cold = without pmesh-dev's digest cache"
echo "  per-file digests equal xxhsum -H2 (on $checked files): $digest_check"
echo
row "measure" "pmesh-dev" "baseline" "baseline" "ratio" "target" "verdict"
row "cold hash of the service" "$(fmt_ms "$m_cold")" "git ls-files|xargs -P$CORES xxhsum" "$(fmt_ms "$m_xxh")" \
    "$(ratio "$m_cold" "$m_xxh")" "<= 1.0x" "$(verdict "$m_cold" "$m_xxh" 1.0)"
row "  (cache written)" "" "" "" "" "" ""
row "cold hash DIR (no cache)" "$(fmt_ms "$m_dir")" "the same" "$(fmt_ms "$m_xxh")" \
    "$(ratio "$m_dir" "$m_xxh")" "" ""
row "warm hash (cache, no edit)" "$(fmt_ms "$m_warm")" "git status --porcelain" "$(fmt_ms "$m_gst")" \
    "$(ratio "$m_warm" "$m_gst")" "<= 0.6x" "$(verdict "$m_warm" "$m_gst" 0.6)"
row "peak RSS cold / warm" "$(mb "$rss_cold")" "(warm)" "$(mb "$rss_warm")" "" "< 150 MB" "$rss_verdict"
row "  per hashed file" "$(per_file "$rss_cold")" "(warm)" "$(per_file "$rss_warm")" "" "" ""
row "cpu (user+sys), cold" "$(fmt_ms "$(median "${cold_cpu[@]}")")" \
    "xxhsum pipeline" "$(fmt_ms "$(median "${xxh_cpu[@]}")")" "$(ratio "$(median "${cold_cpu[@]}")" "$(median "${xxh_cpu[@]}")")"
row "cpu (user+sys), cold DIR" "$(fmt_ms "$(median "${dirh_cpu[@]}")")" \
    "xxhsum pipeline" "$(fmt_ms "$(median "${xxh_cpu[@]}")")" "$(ratio "$(median "${dirh_cpu[@]}")" "$(median "${xxh_cpu[@]}")")"
row "cpu (user+sys), warm" "$(fmt_ms "$(median "${warm_cpu[@]}")")" \
    "git status" "$(fmt_ms "$(median "${gst_cpu[@]}")")" "$(ratio "$(median "${warm_cpu[@]}")" "$(median "${gst_cpu[@]}")")"
echo "  (CPU time is less sensitive than wall time to other load on the machine; the targets are on wall time)"
echo
echo "  where the time goes (pmesh-dev hash --stats):"
echo "    cold, medians of the timed runs: $(phase_medians "$GIT_HOME/stats-cold")"
echo "    cold DIR, medians of the timed runs: $(phase_medians "$GIT_HOME/stats-dir")"
echo "    warm, medians of the timed runs: $(phase_medians "$GIT_HOME/stats-warm")"
total_cold=$(total_median_us "$GIT_HOME/stats-cold")
total_warm=$(total_median_us "$GIT_HOME/stats-warm")
if [ -n "$total_cold" ] && [ -n "$total_warm" ]; then
    echo "    outside the hash (median wall - median total: process start, manifest, output, freeing"
    echo "      the result, exit): cold $(fmt_ms $((${m_cold%.*} - total_cold))), warm $(fmt_ms $((${m_warm%.*} - total_warm)))"
fi
echo "    cold, one run: $(grep -v '^RSS' <<<"$cold_stats")"
echo "    warm, one run: $(grep -v '^RSS' <<<"$warm_stats")"
echo "  all runs, wall us: cold ${cold[*]} | cold DIR ${dirh[*]} | xxhsum ${xxh[*]} | warm ${warm[*]} | git status ${gst[*]}"
exit 0
