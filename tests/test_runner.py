"""arm_int4.runner without vLLM: a stub server stands in for vLLM's API server.

Run: .venv/bin/python -m pytest tests/test_runner.py -q
The stub answers GET /health with 200 and starts a child that ignores SIGTERM (as a stuck engine
core might), so stop() has to clean the whole process group.
"""

import dataclasses
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from arm_int4 import runner
from arm_int4.errors import PreflightError, RunError, UsageError
from arm_int4.launch import EngineArgs, EngineSpec

STUB = textwrap.dedent("""
    import http.server, signal, subprocess, sys, time
    delay, port = float(sys.argv[1]), int(sys.argv[2])
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    print("child", child.pid, flush=True)
    if delay < 0:
        print("RuntimeError: the stub failed on purpose", flush=True)
        sys.exit(3)
    time.sleep(delay)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    srv = http.server.HTTPServer(("127.0.0.1", port), H)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    srv.serve_forever()
""")


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _StubSpec(EngineSpec):
    """An EngineSpec whose server command is the stub above: the runner's process handling, not vLLM."""

    def to_server_argv(self) -> tuple:
        return (self.python, *self.user_args)


def _plan(tmp_path, delay, port):
    script = tmp_path / "stub.py"
    script.write_text(STUB)
    return _StubSpec(
        model_dir=str(tmp_path),
        served_model_name="stub",
        host="127.0.0.1",
        port=port,
        python=sys.executable,
        env={"STUB": "1"},
        engine=EngineArgs("bfloat16", 1, None, 1, 1, None, False),
        user_args=(str(script), str(delay), str(port)),
        user_kwargs={},
        decisions=(),
        ranks=1,
        bind_lists=(),
        threads_per_rank=None,
        dtype="bfloat16",
        kv_cache_gib=1,
    )


def _child_pid(log):
    for _ in range(100):
        for line in log.read_text().splitlines():
            if line.startswith("child "):
                return int(line.split()[1])
        time.sleep(0.05)
    raise AssertionError(log.read_text())


def test_server_ready_then_stop_leaves_no_process(tmp_path):
    port, log = _port(), tmp_path / "stub.log"
    with runner.Server(_plan(tmp_path, 0.5, port), log=str(log), reap_grace=0.5) as server:
        assert server.env["STUB"] == "1"
        assert server.wait_ready(timeout=30, poll=0.1) >= 0.4
        assert os.getpgid(server.pid) == server.pid  # its own process group
        child = _child_pid(log)
        assert runner.http_get("127.0.0.1", port, "/health")[0] == 200
    assert server.proc.returncode == 0
    assert not runner.group_pids(server.pid)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    runner.check_port("127.0.0.1", port)  # free again
    with pytest.raises(UsageError, match="not a TCP port"):
        runner.check_port("127.0.0.1", 0)


def test_exit_before_ready_is_a_run_error_naming_the_log_line(tmp_path):
    log = tmp_path / "stub.log"
    server = runner.Server(_plan(tmp_path, -1, _port()), log=str(log), reap_grace=0.5).start()
    with pytest.raises(RunError, match=r"exited with code 3 before it was ready: RuntimeError: the stub failed"):
        server.wait_ready(timeout=30, poll=0.1)
    server.stop()
    assert not runner.group_pids(server.pid)


def test_ready_timeout_stops_the_group(tmp_path):
    server = runner.Server(_plan(tmp_path, 60, _port()), log=str(tmp_path / "stub.log"), reap_grace=0.5).start()
    with pytest.raises(RunError, match="not ready after 1 s"):
        server.wait_ready(timeout=1, poll=0.1)
    assert server.proc.poll() is not None and not runner.group_pids(server.pid)


def test_check_port_refuses_a_port_in_use_in_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PreflightError, match=f"port {port} on 127.0.0.1 is already in use") as e:
            runner.check_port("127.0.0.1", port)
    assert "\n" not in str(e.value)


def test_process_env_keeps_an_existing_ld_preload(tmp_path):
    plan = _plan(tmp_path, 0, 1)
    plan = dataclasses.replace(plan, env={"LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4", "A": "1"})
    env = runner.process_env(plan, {"LD_PRELOAD": "/lib/other.so", "PATH": "/bin"})
    assert env == {"LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4:/lib/other.so", "A": "1", "PATH": "/bin"}


def test_can_set_affinity_tells_whether_the_kernel_lets_us(monkeypatch):
    # this box (and CI) lets a process re-apply its own mask: the plans bind CPUs here
    assert runner.can_set_affinity() is True

    def forbidden(pid, cpus):
        raise PermissionError(1, "Operation not permitted")  # what seccomp/cgroup policies return

    monkeypatch.setattr(runner.os, "sched_setaffinity", forbidden)
    assert runner.can_set_affinity() is False


def test_group_pids_without_a_listable_proc(monkeypatch):
    """Under qemu-user with a partial rootfs /proc, psutil lists no pid (pids()[0] raises IndexError):
    the group is then probed with signal 0 (seen in the Arm lane's `arm-int4 eval`)."""
    import subprocess as sp

    child = sp.Popen(["sleep", "30"], start_new_session=True)
    try:

        def broken(*a, **k):
            raise IndexError("list index out of range")

        monkeypatch.setattr(runner.psutil, "process_iter", broken)
        assert runner.group_pids(child.pid) == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert runner.group_pids(child.pid) == []


def test_peak_rss_is_the_process_own_not_its_forking_parent():
    """A CLI started from a big parent (pytest after vLLM tests: ~2 GiB) must report its own peak:
    ru_maxrss carries the parent's pre-exec image into the child (CI reported 2118 MiB for a 3 MiB
    model), VmHWM starts again at exec. The parent here holds 1 GiB; the child, a bare interpreter,
    peaks at ~14 MiB (bound 200 MiB: imports vary by Python build)."""
    import arm_int4.workers.worker_io as wio

    child = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(Path(wio.__file__).parent)!r})
        from worker_io import peak_rss_bytes
        print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """)
    parent = textwrap.dedent(f"""
        import subprocess, sys
        big = bytearray(2**30)
        big[::4096] = b"x" * (2**30 // 4096)  # touched: resident
        print(subprocess.run([sys.executable, "-c", {child!r}], capture_output=True, text=True, check=True).stdout)
    """)
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout.split()
    ours, maxrss = int(out[0]), int(out[1])
    assert maxrss > 2**30  # the defect: the kernel's counter includes the parent's 1 GiB
    assert ours < 200 * 2**20, ours
