"""Start, watch and stop vLLM servers (any long-running subprocess) without leaving orphans.

A server runs in its own session and process group (start_new_session), so the terminal's
Ctrl-C reaches only us: we forward SIGINT/SIGTERM to vLLM's API server, which shuts its engine
core and workers down itself, then kill whatever is left in the group. Readiness is vLLM's
GET /health answering 200. bench/tune reuse Server; `arm-int4 serve` uses serve_foreground.
"""

import errno
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from typing import Optional

from .errors import PreflightError, RunError, UsageError
from .launch import Plan

__all__ = ["Server", "serve_foreground", "check_port", "can_set_affinity", "process_env", "group_pids",
           "http_get"]


def check_port(host: str, port: int) -> None:
    """Refuse early, in one line, when host:port cannot be bound (vLLM would fail after ~20 s)."""
    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port} is not a TCP port: use 1-65535")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise PreflightError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as vLLM's own listening socket does
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PreflightError(f"port {port} on {host} is already in use: stop the server holding it "
                                     "or pass --port N") from None
            raise PreflightError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def can_set_affinity() -> bool:
    """Whether this process may call sched_setaffinity (containers may forbid it): re-applies the
    current mask, so nothing changes when it is allowed."""
    if not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(0, os.sched_getaffinity(0))
    except OSError:
        return False
    return True


def process_env(plan: Plan, base: Optional[dict] = None) -> dict:
    """The caller's environment with the plan's on top; an existing LD_PRELOAD is kept after ours."""
    env = dict(os.environ if base is None else base)
    for k, v in plan.env.items():
        if k == "LD_PRELOAD" and env.get(k) and v not in env[k].split(":"):
            v = f"{v}:{env[k]}"
        env[k] = v
    return env


def group_pids(pgid: int) -> list:
    """Live processes (not zombies) whose process group is pgid, read from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp ...
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _probe_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def http_get(host: str, port: int, path: str, timeout: float = 2.0) -> tuple:
    """(status, body) with http.client: no proxy variables apply to a local server."""
    conn = http.client.HTTPConnection(_probe_host(host), port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _term_with_parent() -> None:
    """In the child before exec: SIGTERM it if we die, even by SIGKILL (Linux PR_SET_PDEATHSIG).
    The kernel ties this to the thread that forked: start servers from a long-lived thread."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Server:
    """One vLLM server process group. `with Server(plan, log=path) as s: s.wait_ready()`.

    log: a file path for stdout+stderr (bench), or None to inherit ours (serve)."""

    def __init__(self, plan: Plan, *, log: Optional[str] = None, env: Optional[dict] = None,
                 reap_grace: float = 5.0):
        self.plan, self.log, self.proc, self._log_file = plan, log, None, None
        self.reap_grace = reap_grace  # s for the engine core/workers to exit after the API server
        self.env = process_env(plan, env)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def start(self) -> "Server":
        out = None
        if self.log:
            self._log_file = out = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen(list(self.plan.argv), env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT if out else None,
                                         start_new_session=True,  # own session + group: pgid == pid
                                         preexec_fn=_term_with_parent)
        except OSError as exc:
            raise RunError(f"cannot start {self.plan.argv[0]}: {exc.strerror}") from None
        return self

    def ready(self) -> bool:
        try:
            return http_get(self.plan.host, self.plan.port, "/health")[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 600.0, poll: float = 0.5) -> float:
        """Seconds until /health answered 200; RunError if vLLM exits first or time runs out."""
        t0 = time.monotonic()
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise RunError(f"vLLM exited with code {rc} before it was ready{self._log_hint()}")
            if self.ready():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise RunError(f"vLLM was not ready after {timeout:.0f} s (no 200 from /health on "
                               f"{self.plan.base_url}){self._log_hint()}")
            time.sleep(poll)

    def _log_hint(self) -> str:
        if not self.log:
            return " (its log is above)"
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                tail = [line.strip() for line in deque(f, 200) if line.strip()]
        except OSError:
            return ""
        errors = [line for line in tail if "Error" in line or "error" in line]
        return f": {(errors or tail or ['(empty log)'])[-1][:300]} (log: {self.log})"

    def send_signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, sig: int = signal.SIGTERM, grace: float = 30.0) -> Optional[int]:
        """Ask the API server to shut down (it stops its engine and workers), wait up to `grace`
        s, then SIGKILL whatever is left in the process group. Idempotent."""
        if self.proc is None:
            return None
        self.send_signal(sig)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self._reap_group()
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode

    def _reap_group(self) -> None:
        pgid, wait = self.proc.pid, self.reap_grace
        if self.proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        # the engine core and workers notice their parent is gone and exit; give them `wait` s
        deadline = time.monotonic() + wait
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_pids(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 5  # orphans are reaped by init (or a subreaper)
            while group_pids(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_foreground(plan: Plan, *, ready_timeout: Optional[float] = None, out=None) -> int:
    """Run the server until it exits or we get SIGINT/SIGTERM (forwarded; a second one kills).

    Returns 128+signal after a requested stop, 0 if vLLM exited cleanly by itself; a vLLM failure
    raises RunError (its own log lines are above on the terminal)."""
    out = out or sys.stderr
    server = Server(plan)
    got = []

    def forward(signum, _frame):
        got.append(signum)
        if len(got) == 1:
            print(f"arm-int4 serve: {signal.Signals(signum).name}: stopping vLLM (again to kill)", file=out,
                  flush=True)
            server.send_signal(signum)
        elif server.pid is not None:
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        t0, announced = time.monotonic(), False
        while server.proc.poll() is None:
            if not announced and not got and server.ready():
                announced = True
                print(f"arm-int4 serve: ready in {time.monotonic() - t0:.0f} s: {plan.base_url}/v1 "
                      f"(model {plan.served_model_name!r}); Ctrl-C stops it", file=out, flush=True)
            elif not announced and ready_timeout and time.monotonic() - t0 > ready_timeout:
                server.stop()
                raise RunError(f"vLLM was not ready after {ready_timeout:.0f} s")
            time.sleep(0.5)
        rc = server.proc.returncode
    finally:
        server.stop()  # no-op signal if it already exited; always clears the group
        for s, h in old.items():
            signal.signal(s, h)
    if got:
        return 128 + got[0]
    if rc:
        raise RunError(f"vLLM exited with code {rc} (its log is above)")
    return 0
