# shellcheck shell=bash
# Shared by the benchmark scripts (sourced, not run): logging, installing missing tools, and
# the pmesh-dev binary to measure. Expects REPO to be set.

log() { printf '%s\n' "$*" >&2; }

# install_missing PACKAGE...: installs Debian packages (the caller lists only missing ones).
install_missing() {
    [ $# -gt 0 ] || return 0
    log "installing $*"
    local sudo=
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# Sets PMESH: $PMESH_BIN when given (another build, to compare), else a fresh release build.
pick_pmesh() {
    # shellcheck disable=SC2034 # PMESH is for the caller
    if [ -n "${PMESH_BIN:-}" ]; then
        PMESH=$(realpath "$PMESH_BIN")
    else
        log "building pmesh-dev (release)"
        (cd "$REPO" && cargo build --release --quiet)
        PMESH="$REPO/target/release/pmesh-dev"
    fi
}

# isolate_git DIR: global and system git configuration must not matter (excludes, hooks,
# fsmonitor, ...) to git, the baseline: HOME becomes DIR, a scratch directory.
isolate_git() {
    export HOME="$1" GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null
    unset XDG_CONFIG_HOME GIT_DIR GIT_WORK_TREE GIT_INDEX_FILE
}

# --- the trees besides benches/hash.sh's own ---------------------------------------------------
# make_deep_tree DIR NDIRS: generates (once; reused while its marker is in .git) a git repository
# of a JS monorepo's shape in DIR: about 2 files a directory, NDIRS directories, packages of
# nested directories 2 or 3 children wide. It is generated beside DIR and renamed once
# committed, so an interrupted run never leaves half a tree under the name; a DIR that holds
# something else (a checkout of your own: that is the `real` mode) is never removed.
make_deep_tree() {
    local dir=$1 ndirs=$2
    local marker="$dir/.git/pmesh-bench-deep-v1-$ndirs" part="$dir.pmesh-bench-partial"
    [ -e "$marker" ] && return 0
    if [ -e "$dir" ] && [ -n "$(ls -A "$dir")" ] &&
        ! compgen -G "$dir/.git/pmesh-bench-deep-v1-*" >/dev/null; then
        log "error: $dir is not a deep tree made by these scripts; set DEEP_DIR elsewhere" \
            "(to measure a checkout of your own: REAL_DIR=$dir ... real)"
        exit 2
    fi
    log "generating the deep tree in $dir ($ndirs directories, about 2 files each)"
    rm -rf "$part"
    python3 - "$part" "$ndirs" <<'PY'
import os, random, sys
root, want = sys.argv[1], int(sys.argv[2])
rng = random.Random(52)
NAMES = ("components utils hooks lib api services models views pages routes store helpers types "
         "constants config styles assets icons locales core common shared internal features "
         "widgets layouts forms tables charts auth admin settings __tests__ fixtures").split()
os.makedirs(root)
with open(os.path.join(root, ".gitignore"), "w") as f:
    f.write("node_modules/\ndist/\n*.log\n.pmesh/\n")
dirs, files = 1, 0
def fill(d):
    global files
    for i in range(rng.choice((1, 2, 2, 2, 3))):
        ext = rng.choice((".ts", ".tsx", ".js", ".json", ".css"))
        with open(os.path.join(d, "f%d%s" % (i, ext)), "w") as f:
            f.write("// %s\n" % os.path.relpath(d, root) + "x" * rng.randint(100, 3000) + "\n")
        files += 1
# Packages of nested directories, breadth first within each, 2 or 3 children a directory.
pkg = 0
while dirs < want:
    top = os.path.join(root, "packages", "pkg-%04d" % pkg, "src")
    os.makedirs(top)
    dirs += 3 if pkg == 0 else 2
    fill(top)
    level, size = [top], rng.randint(60, 200)
    while level and size > 0 and dirs < want:
        nxt = []
        for d in level:
            for name in rng.sample(NAMES, rng.choice((2, 2, 3))):
                if size <= 0 or dirs >= want:
                    break
                c = os.path.join(d, name)
                os.mkdir(c)
                fill(c)
                nxt.append(c)
                dirs += 1
                size -= 1
        level = nxt
    pkg += 1
print("generated %d directories, %d files" % (dirs, files), file=sys.stderr)
PY
    git -C "$part" init -q
    git -C "$part" add -A
    git -C "$part" -c user.name=bench -c user.email=bench@localhost commit -qm "deep tree"
    git -C "$part" config gc.auto 0
    touch "$part/.git/pmesh-bench-deep-v1-$ndirs"
    rm -rf "$dir"
    mv "$part" "$dir"
}

# use_real_tree: checks that $REAL_DIR is the top of a git work tree (any checkout of a real
# repository; the README's figures are of babel/babel) and makes it absolute. With $REAL_SRC set
# (a repository to clone: a path or a URL git can reach) and no $REAL_DIR yet, clones it first.
# The checkout is measured as it is, at the commit it has: nothing is generated or committed.
use_real_tree() {
    if [ -z "${REAL_DIR:-}" ]; then
        log "error: set REAL_DIR to a git checkout, e.g. REAL_DIR=/tmp/pmesh-bench-babel" \
            "(with REAL_SRC=<a clone of babel/babel> to make it by git clone)"
        exit 2
    fi
    if [ ! -e "$REAL_DIR" ] && [ -n "${REAL_SRC:-}" ]; then
        log "cloning $REAL_SRC into $REAL_DIR"
        git clone -q "$REAL_SRC" "$REAL_DIR"
    fi
    local top
    top=$(git -C "$REAL_DIR" rev-parse --show-toplevel 2>/dev/null) || top=
    if [ -z "$top" ] || [ "$top" != "$(realpath "$REAL_DIR")" ]; then
        log "error: $REAL_DIR is not the top of a git work tree"
        exit 2
    fi
    REAL_DIR=$top
    if [ -n "$(git -C "$REAL_DIR" status --porcelain | head -1)" ]; then
        log "warning: $REAL_DIR is not clean for git; git status, the baseline, is slower on it:"
        git -C "$REAL_DIR" status --porcelain | head -5 >&2
    fi
}

# pick_tree MODE: sets TREE to the tree a `deep` or `real` run measures (generating the deep
# tree once, checking the real checkout) and hides pmesh-dev's files in it from git.
pick_tree() {
    if [ "$1" = deep ]; then
        TREE=${DEEP_DIR:-/tmp/pmesh-bench-deep}
        make_deep_tree "$TREE" "${DEEP_DIRS:-52000}"
    else
        use_real_tree
        TREE=$REAL_DIR
    fi
    hide_from_git "$TREE"
}

# hide_from_git DIR: pmesh-dev keeps .run, .build and its .build-* archives in a service's root
# and its digest cache in .pmesh/ there. They are hidden from git through .git/info/exclude (the
# tree's own .gitignore is left alone), so that git status, the baseline, sees the clean tree it
# saw before and the checkout shows no trace of the benchmark; .pmesh/ only if the tree's rules
# do not hide it already.
hide_from_git() {
    local dir=$1 exclude p
    local pats=(/.run '/.run.tmp-*' /.build '/.build-*')
    git -C "$dir" check-ignore -q .pmesh/digests || pats+=(/.pmesh/)
    exclude=$(git -C "$dir" rev-parse --git-path info/exclude)
    case $exclude in /*) ;; *) exclude="$dir/$exclude" ;; esac
    mkdir -p "$(dirname "$exclude")"
    for p in "${pats[@]}"; do
        grep -qxF -- "$p" "$exclude" 2>/dev/null || printf '%s\n' "$p" >>"$exclude"
    done
}

# tree_facts DIR: what the tree is, in a few indented lines for a report: the commit measured,
# the files git tracks and the directories holding them (the ratio the targets are set at), the
# depth and length of their paths, the ignore files, and what is on disk.
tree_facts() {
    local dir=$1 commit state
    commit=$(git -C "$dir" rev-parse --short HEAD)
    state=clean
    [ -z "$(git -C "$dir" status --porcelain | head -1)" ] || state="not clean"
    echo "  commit $commit (git rev-parse --short HEAD), $state for git status"
    git -C "$dir" -c core.quotePath=false ls-files -s | awk -F'\t' '
        {split($1, m, " "); mode[m[1]]++; p = $2; n++
         c = split(p, part, "/"); depth += c; if (c > maxd) maxd = c
         len += length(p); if (length(p) > maxl) maxl = length(p)
         if (part[c] == ".gitignore" || part[c] == ".ignore") ign++
         d = ""; for (i = 1; i < c; i++) {d = d "/" part[i]; if (!(d in dirs)) {dirs[d]; nd++}}}
        END {nd++   # the root
             printf "  git tracks %d files (%d executable, %d symlinks, %d submodules) in %d directories (root included): %.2f files a directory\n",
                 n, mode["100755"], mode["120000"], mode["160000"], nd, n / nd
             printf "  tracked paths: %.1f components on average (max %d), %.0f bytes on average (max %d); %d .gitignore/.ignore files\n",
                 depth / n, maxd, len / n, maxl, ign}'
    echo "  tracked files that the ignore rules match (git ls-files -ci --exclude-standard):" \
        "$(git -C "$dir" ls-files -ci --exclude-standard | wc -l)"
    echo "  on disk (outside .git and pmesh-dev's own): $(find "$dir" -name .git -prune -o -name .pmesh -prune \
        -o -name '.build*' -prune -o -name '.run*' -prune -o ! -type d -print | wc -l) files," \
        "$(find "$dir" -name .git -prune -o -name .pmesh -prune -o -name '.build*' -prune \
            -o -name '.run*' -prune -o -type d -print | wc -l) directories (root included)"
}
