"""The NDJSON events of a `pmesh-dev watch --json` process, for the benchmark scripts (which
import it from their heredocs through $PMESH_BENCHES)."""
import json
import os
import select
import signal
import subprocess
import time

now = time.monotonic


class Watch:
    """A `pmesh-dev watch --json` process and its events, each stamped when its line is read."""

    def __init__(self, argv, cwd, stderr_path):
        self.err = open(stderr_path, "ab")
        self.t0 = now()
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=self.err, cwd=cwd)
        self.fd = self.p.stdout.fileno()
        self.buf = b""
        self.lines = []  # read and not taken yet: (time read, event)
        self.all = []    # every event read: (time read, event)

    def last_events(self, n=15):
        return [(e.get("event"), e.get("reason") or e.get("line")) for _, e in self.all][-n:]

    def _fill(self, timeout):
        r, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not r:
            return False
        chunk = os.read(self.fd, 65536)
        t = now()
        if not chunk:
            raise RuntimeError("pmesh-dev exited (status %s; stderr in %s); its last events: %s"
                               % (self.p.poll(), self.err.name, self.last_events()))
        self.buf += chunk
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"event": "?", "raw": line.decode(errors="replace")}
            self.lines.append((t, ev))
            self.all.append((t, ev))
        return True

    def next(self, timeout):
        """The next event as (time read, event), or None after `timeout` seconds."""
        end = now() + timeout
        while not self.lines:
            if not self._fill(end - now()) and now() >= end:
                return None
        return self.lines.pop(0)

    def wait_for(self, pred, timeout, what):
        """The next (time read, event) whose event `pred` accepts; raises after `timeout`."""
        end = now() + timeout
        while True:
            item = self.next(end - now())
            if item is None:
                raise RuntimeError("no %s within %gs; last events: %s"
                                   % (what, timeout, self.last_events()))
            if pred(item[1]):
                return item

    def drain(self, quiet):
        """(time read, event) pairs until none came for `quiet` seconds."""
        out = []
        while True:
            item = self.next(quiet)
            if item is None:
                return out
            out.append(item)

    def stop(self, timeout=30):
        """SIGINT, then its exit status (killed if it takes longer than `timeout` seconds); the
        events written while stopping (`stopped`) are read too."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
        try:
            code = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            code = "killed after %d s" % timeout
        try:
            while self._fill(0.2):
                pass
        except RuntimeError:
            pass
        self.p.stdout.close()
        self.err.close()
        return code
