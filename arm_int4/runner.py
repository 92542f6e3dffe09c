"""The one door for every process arm-int4 starts: vLLM servers and the worker scripts.

- run_worker(name, job, plan=...): one worker script (arm_int4/workers/NAME_worker.py) in a fresh
  process: job in (JSON file), one result out (JSON file, rewritten as it goes for progress), the
  log kept on failure, the whole process group reaped on any exit (Ctrl-C included). A worker that
  starts vLLM (ENGINE_WORKERS) must be given a launch.EngineSpec: its interpreter, environment and
  engine arguments all come from the plan, so the plan's guards (MoE refusal, dtype, CPU binding,
  KV sizing) hold for bench, tune, eval, lm-eval and the demo alike.
- Server / serve_foreground(plan): vLLM's OpenAI server from a plan (`arm-int4 serve`, bench --server
  tests). It runs in its own session and process group (start_new_session), so the terminal's
  Ctrl-C reaches only us: we forward SIGINT/SIGTERM to vLLM's API server, which shuts its engine
  core and workers down itself, then kill whatever is left in the group. Readiness is vLLM's
  GET /health answering 200.

Nothing else in arm_int4 calls subprocess.Popen (tests/test_layering.py checks).
"""

import errno
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Optional

import psutil

from . import workers
from .errors import PreflightError, RunError, UsageError
from .launch import EngineSpec
from .replicas import ReplicaSet, RouterSpec

__all__ = [
    "ENGINE_WORKERS",
    "KERNEL_LINE",
    "linear_kernels",
    "WorkerRun",
    "run_worker",
    "Server",
    "serve_foreground",
    "serve_replicas",
    "http_post",
    "check_port",
    "can_set_affinity",
    "process_env",
    "group_pids",
    "http_get",
    "log_tail",
]

# Workers that start a vLLM engine: run_worker refuses them without a launch.EngineSpec.
ENGINE_WORKERS = frozenset({"bench", "perplexity", "lmeval"})
# vLLM logs the kernel each layer type chose: "Using Dynamic4bitLinearKernel for CompressedTensorsW4A8Int",
# "Using CPUWNA16LinearKernel for CompressedTensorsWNA16" (vllm/model_executor/layers/quantization).
KERNEL_LINE = re.compile(r"Using (\w+Kernel) for (\w+)")


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
                raise PreflightError(
                    f"port {port} on {host} is already in use: stop the server holding it or pass --port N"
                ) from None
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


def process_env(plan: "EngineSpec | RouterSpec", base: Optional[dict] = None) -> dict:
    """The caller's environment with the plan's on top; an existing LD_PRELOAD is kept after ours."""
    env = dict(os.environ if base is None else base)
    for k, v in plan.env.items():
        if k == "LD_PRELOAD" and env.get(k) and v not in env[k].split(":"):
            v = f"{v}:{env[k]}"
        env[k] = v
    return env


def group_pids(pgid: int) -> list:
    """Live processes (not zombies) whose process group is pgid. Where /proc cannot be listed (qemu-user
    with a partial rootfs /proc: psutil finds no pid at all), [pgid] if the group still has a member
    (a signal-0 probe, zombies included), else []."""
    try:
        procs = list(psutil.process_iter(["status"]))
    except (IndexError, OSError, psutil.Error):
        return [pgid] if _group_exists(pgid) else []
    pids = []
    for p in procs:
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                pids.append(p.pid)
        except (OSError, psutil.Error):  # gone meanwhile, or not ours to ask
            continue
    return pids


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_group(pgid: int, grace: float = 5.0) -> None:
    """Give the group `grace` s to exit by itself (vLLM's engine core and workers follow their
    parent), then SIGKILL whatever is left and wait briefly for init to reap it."""
    deadline = time.monotonic() + grace
    while group_pids(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_pids(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)


def linear_kernels(log_text: str) -> list:
    """The linear kernels vLLM says it chose, from its log (sorted, each once)."""
    return sorted({m.group(1) for m in KERNEL_LINE.finditer(log_text)})


def log_tail(path, lines: int = 200) -> str:
    """The last error-looking line of a log (else its last line), at most 300 characters."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            tail = [line.strip() for line in deque(f, lines) if line.strip()]
    except OSError:
        return ""
    errors = [line for line in tail if "Error" in line or "error" in line]
    return (errors or tail or ["(empty log)"])[-1][:300]


def _probe_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _http(method: str, host: str, port: int, path: str, timeout: float) -> tuple:
    """(status, body) with http.client: no proxy variables apply to a local server."""
    conn = http.client.HTTPConnection(_probe_host(host), port, timeout=timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_get(host: str, port: int, path: str, timeout: float = 2.0) -> tuple:
    """(status, body) of a GET."""
    return _http("GET", host, port, path, timeout)


def http_post(host: str, port: int, path: str, timeout: float = 5.0) -> tuple:
    """(status, body) of an empty POST (the router's admin calls)."""
    return _http("POST", host, port, path, timeout)


def _term_with_parent() -> None:
    """In the child before exec: SIGTERM it if we die, even by SIGKILL (Linux PR_SET_PDEATHSIG).
    The kernel ties this to the thread that forked: start servers from a long-lived thread."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Server:
    """One server process group: vLLM's OpenAI server from an EngineSpec, or vllm-router from a RouterSpec.
    `with Server(plan, log=path) as s: s.wait_ready()`.

    log: a file path for stdout+stderr (bench), or None to inherit ours (serve)."""

    def __init__(
        self,
        plan: "EngineSpec | RouterSpec",
        *,
        log: Optional[str] = None,
        env: Optional[dict] = None,
        reap_grace: float = 5.0,
    ):
        self.plan, self.log = plan, log
        self.proc: Optional[subprocess.Popen] = None
        self._log_file: Optional[IO[bytes]] = None
        self.reap_grace = reap_grace  # s for the engine core/workers to exit after the API server
        self.env = process_env(plan, env)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    @property
    def process(self) -> subprocess.Popen:
        """The started server process (RuntimeError before start())."""
        if self.proc is None:
            raise RuntimeError("Server.start() has not been called")
        return self.proc

    def start(self) -> "Server":
        out = None
        if self.log:
            self._log_file = out = open(self.log, "ab")  # noqa: SIM115 (held while the server runs; closed in stop())
        try:
            self.proc = subprocess.Popen(
                list(self.plan.to_server_argv()),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                start_new_session=True,  # own session + group: pgid == pid
                preexec_fn=_term_with_parent,
            )
        except OSError as exc:
            raise RunError(f"cannot start {self.plan.python}: {exc.strerror}") from None
        return self

    @property
    def what(self) -> str:
        return "vllm-router" if isinstance(self.plan, RouterSpec) else "vLLM"

    def ready(self) -> bool:
        path = self.plan.health_path if isinstance(self.plan, RouterSpec) else "/health"
        try:
            return http_get(self.plan.host, self.plan.port, path)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 600.0, poll: float = 0.5) -> float:
        """Seconds until /health answered 200; RunError if vLLM exits first or time runs out."""
        t0 = time.monotonic()
        while True:
            rc = self.process.poll()
            if rc is not None:
                raise RunError(f"{self.what} exited with code {rc} before it was ready{self._log_hint()}")
            if self.ready():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise RunError(
                    f"vLLM was not ready after {timeout:.0f} s (no 200 from /health on "
                    f"{self.plan.base_url}){self._log_hint()}"
                )
            time.sleep(poll)

    def _log_hint(self) -> str:
        if not self.log:
            return " (its log is above)"
        return f": {log_tail(self.log)} (log: {self.log})"

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
        proc = self.process
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        reap_group(proc.pid, self.reap_grace)  # the engine core and workers follow their parent

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class WorkerRun:
    """What a worker left: its result (the JSON object it wrote, {} if none), exit code, log."""

    name: str
    result: dict
    returncode: Optional[int]
    log: Path  # kept when the run failed or a log path was given; removed otherwise
    error: Optional[str]  # None when the worker wrote {"ok": true} and exited 0
    linear_kernels: list  # what vLLM's log says it chose (engine workers), else []

    @property
    def ok(self) -> bool:
        return self.error is None

    def check(self, what: str) -> dict:
        """The result, or RunError "{what}: {error} (log: …)" in one line."""
        if self.error:
            raise RunError(f"{what}: {self.error} (log: {self.log})")
        return self.result


def run_worker(
    name: str,
    job: dict,
    *,
    plan: Optional[EngineSpec] = None,
    python: Optional[str] = None,
    env: Optional[dict] = None,
    log=None,
    on_update: Optional[Callable[[dict], None]] = None,
    cpus=None,
    poll: float = 0.5,
) -> WorkerRun:
    """Run arm_int4/workers/{name}_worker.py on `job` in a fresh process group and wait for it.

    plan: required for ENGINE_WORKERS (bench, perplexity, lmeval): the interpreter is plan.python,
    the environment is ours + plan.env, and job["engine_kwargs"] = plan.to_llm_kwargs() (the job
    may not set its own). Other workers (llmc, llamacpp) name their interpreter with `python`.
    env: extra variables on top (never over the plan's). log: a file for the worker's stdout+stderr
    (appended, kept); None = a temporary file kept only on failure. on_update: called with the
    result each time the worker rewrites it (progress). cpus: CPU ids to pin the worker to."""
    if name in ENGINE_WORKERS and plan is None:
        raise TypeError(
            f"worker {name!r} starts vLLM: it runs only from a launch.EngineSpec (runner.run_worker(plan=...))"
        )
    if plan is not None:
        if "engine_kwargs" in job:
            raise TypeError("job['engine_kwargs'] comes from the plan: put engine settings in the EngineRequest")
        job = {**job, "engine_kwargs": plan.to_llm_kwargs()}
        python = plan.python
        base = {**os.environ, **(env or {})}
        base.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")  # a slow fallback step is not a hang
        full_env = process_env(plan, base)
    else:
        full_env = {**os.environ, **(env or {})}
    python = python or sys.executable
    keep = log is not None
    if log is None:
        fd, log = tempfile.mkstemp(prefix=f"arm-int4-{name}-", suffix=".log")
        os.close(fd)
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"arm-int4-{name}-job-"))
    job_path, result_path = tmp / "job.json", tmp / "result.json"
    job_path.write_text(json.dumps(job))
    result: dict = {}
    seen = None

    def read_result() -> None:
        nonlocal result, seen
        try:
            text = result_path.read_text()
            if text != seen:
                result, seen = json.loads(text), text
                if on_update:
                    on_update(result)
        except (OSError, ValueError):
            pass

    def child_setup() -> None:
        _term_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)

    proc = None
    try:
        with open(log, "ab") as out:
            try:
                proc = subprocess.Popen(
                    [str(python), str(workers.path(name)), str(job_path), str(result_path)],
                    env=full_env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=child_setup,
                )
            except OSError as exc:
                raise RunError(f"cannot start {python}: {exc.strerror}") from None
            while proc.poll() is None:
                read_result()
                time.sleep(poll)
        read_result()
    finally:
        if proc is not None:
            if proc.poll() is None:  # Ctrl-C or an error on our side: nothing of it may outlive us
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            reap_group(proc.pid)
        shutil.rmtree(tmp, ignore_errors=True)
    error = None
    if proc.returncode != 0 or not result.get("ok"):
        error = result.get("error") or f"{name} worker exited with code {proc.returncode}: {log_tail(log)}"
    kernels = linear_kernels(log.read_text(encoding="utf-8", errors="replace")) if plan is not None else []
    if error is None and not keep:
        log.unlink(missing_ok=True)
    return WorkerRun(name=name, result=result, returncode=proc.returncode, log=log, error=error, linear_kernels=kernels)


def serve_foreground(plan: EngineSpec, *, ready_timeout: Optional[float] = None, out=None) -> int:
    """Run the server until it exits or we get SIGINT/SIGTERM (forwarded; a second one kills).

    Returns 128+signal after a requested stop, 0 if vLLM exited cleanly by itself; a vLLM failure
    raises RunError (its own log lines are above on the terminal)."""
    out = out or sys.stderr
    server = Server(plan)
    got = []

    def forward(signum, _frame):
        got.append(signum)
        if len(got) == 1:
            print(f"arm-int4 serve: {signal.Signals(signum).name}: stopping vLLM (again to kill)", file=out, flush=True)
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
        if plan.headless:  # a node of rank > 0: workers only, no HTTP server to ask
            announced = True
            print(
                f"arm-int4 serve: started as a worker node (pid {server.pid}): node 0's server answers once every "
                "node has joined; Ctrl-C stops this node",
                file=out,
                flush=True,
            )
        while server.process.poll() is None:
            if not announced and not got and server.ready():
                announced = True
                print(
                    f"arm-int4 serve: ready in {time.monotonic() - t0:.0f} s: {plan.base_url}/v1 "
                    f"(model {plan.served_model_name!r}); Ctrl-C stops it",
                    file=out,
                    flush=True,
                )
            elif not announced and ready_timeout and time.monotonic() - t0 > ready_timeout:
                server.stop()
                raise RunError(f"vLLM was not ready after {ready_timeout:.0f} s")
            time.sleep(0.5)
        rc = server.process.returncode
    finally:
        server.stop()  # no-op signal if it already exited; always clears the group
        for s, h in old.items():
            signal.signal(s, h)
    if got:
        return 128 + got[0]
    if rc:
        raise RunError(f"vLLM exited with code {rc} (its log is above)")
    return 0


def _stop_all(servers: list) -> None:
    """SIGTERM every server at once, then wait for each (Server.stop: grace, then SIGKILL its group)."""
    for s in servers:
        s.send_signal(signal.SIGTERM)
    for s in servers:
        s.stop()


def _worker_health(router: RouterSpec) -> dict:
    """{worker url: healthy} as the router sees it (GET /workers); {} when it does not answer."""
    try:
        status, body = http_get(router.host, router.port, "/workers")
        return {w["url"]: bool(w["is_healthy"]) for w in json.loads(body)["workers"]} if status == 200 else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def serve_replicas(rs: ReplicaSet, *, ready_timeout: float = 900.0, out=None, poll: float = 0.5) -> int:
    """Run a replica set until SIGINT/SIGTERM: every replica in its own process group, each ready (/health)
    before vllm-router starts in front of them. A replica that exits is reported in one line, its group
    reaped, and it is removed from the router (the others keep serving); a remote engine the router marks
    unhealthy (or healthy again) is reported in one line. A signal stops the router and every replica
    (a second one kills them); nothing is left behind. Returns 128+signal; RunError when a replica fails
    before it is ready, the router exits, or no engine is left."""
    out = out or sys.stderr
    say = lambda m: print(f"arm-int4 serve: {m}", file=out, flush=True)
    n = len(rs.replicas)
    replicas = [Server(spec) for spec in rs.replicas]
    router = Server(rs.router)
    everyone = [router, *replicas]
    got: list = []

    def forward(signum, _frame):
        got.append(signum)
        if len(got) == 1:
            say(f"{signal.Signals(signum).name}: stopping vllm-router and {n} replica(s) (again to kill)")
            for s in everyone:
                s.send_signal(signum)
        else:
            for s in everyone:
                if s.pid is not None:
                    try:
                        os.killpg(s.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    def name(k: int) -> str:
        return f"replica {k + 1} of {n} ({rs.replicas[k].base_url}, CPUs {rs.cpus[k]})"

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        t0 = time.monotonic()
        for s in replicas:
            s.start()
        pending = set(range(n))
        while pending and not got:
            for k in sorted(pending):
                rc = replicas[k].process.poll()
                if rc is not None:
                    raise RunError(f"{name(k)} exited with code {rc} before it was ready (its log is above)")
                if replicas[k].ready():
                    pending.discard(k)
                    say(f"{name(k)} ready in {time.monotonic() - t0:.0f} s")
            if pending and time.monotonic() - t0 > ready_timeout:
                raise RunError(f"{name(min(pending))} was not ready after {ready_timeout:.0f} s")
            time.sleep(poll)
        if not got:
            router.start()
        while not got and not router.ready():
            rc = router.process.poll()
            if rc is not None:
                raise RunError(f"vllm-router exited with code {rc} before it was ready (its log is above)")
            if time.monotonic() - t0 > ready_timeout:
                raise RunError(f"vllm-router was not ready after {ready_timeout:.0f} s: are the --upstream URLs up?")
            time.sleep(poll)
        if not got:
            model = repr(rs.replicas[0].served_model_name) if n else "of the upstreams"
            remote = f" and {len(rs.upstreams)} remote engine(s)" if rs.upstreams else ""
            say(
                f"ready in {time.monotonic() - t0:.0f} s: {rs.router.base_url}/v1 (model {model}) through "
                f"vllm-router over {n} replica(s){remote}; Ctrl-C stops all"
            )
        alive, seen, checked = set(range(n)), {u: True for u in rs.upstreams}, time.monotonic()
        while not got:
            rc = router.process.poll()
            if rc is not None:
                raise RunError(f"vllm-router exited with code {rc} (its log is above): stopping the replicas")
            for k in sorted(alive):
                rc = replicas[k].process.poll()
                if rc is None:
                    continue
                alive.discard(k)
                url = rs.replicas[k].base_url
                try:
                    removed = http_post(rs.router.host, rs.router.port, f"/remove_worker?url={url}")[0] == 200
                except OSError:
                    removed = False
                left = f"{len(alive)} local replica(s)" + (f" and {len(rs.upstreams)} remote" if rs.upstreams else "")
                say(
                    f"{name(k)} exited with code {rc}: "
                    + ("removed from the router" if removed else "the router drops it after its health checks")
                    + f"; {left} serve on"
                )
                replicas[k].stop()  # its engine core and workers go with it
            if not alive and not rs.upstreams and n:
                raise RunError("every replica has exited: stopping vllm-router")
            if rs.upstreams and time.monotonic() - checked > 5:
                checked = time.monotonic()
                health = _worker_health(rs.router)
                for u in rs.upstreams:
                    now = health.get(u.rstrip("/"), seen[u])
                    if now != seen[u]:
                        seen[u] = now
                        say(f"remote engine {u} is {'healthy again' if now else 'unhealthy: the router skips it'}")
            time.sleep(poll)
    finally:
        _stop_all(everyone)
        for sig, h in old.items():
            signal.signal(sig, h)
    return 128 + got[0]
