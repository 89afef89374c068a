"""Devices on this machine: a TVM RPC tracker and RPC servers on 127.0.0.1.

``DeviceFarm`` starts ``python -m tvm.exec.rpc_tracker`` and, per requested key, RPC servers
(``python -m tvm.exec.rpc_server --tracker ... --key ...``): native x86-64 ones with this
Python, and aarch64 ones under ``qemu-aarch64 -cpu cortex-a76`` with the aarch64 Python + TVM
runtime sysroot that bench/setup_qemu_aarch64.sh builds (~/.cache/npucc-qemu or
$NPUCC_QEMU_DIR). Everything binds to 127.0.0.1 on free ports; every process is started in its
own process group and ``stop()`` ends those groups and checks by pid that none is left.

    with DeviceFarm() as farm:
        farm.add_server("x86", arch="x86_64")
        farm.add_server("kirin990", arch="aarch64")
        farm.wait_ready({"x86": 1, "kirin990": 1})
        session = runtime.connect(farm.tracker, "kirin990")

Run as a script it starts a tracker, one x86-64 and one aarch64 server, prints the tracker's
queue and stops them. qemu start-up is slow (tens of seconds to import TVM's runtime under
emulation; minutes on a loaded machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["DeviceFarm", "QEMU_DIR", "qemu_available", "free_port"]

QEMU_DIR = Path(os.environ.get("NPUCC_QEMU_DIR", Path.home() / ".cache" / "npucc-qemu"))
HOST = "127.0.0.1"


def qemu_available() -> str | None:
    """None when aarch64 servers can run here, else why not."""
    if shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 not installed (apt-get install qemu-user)"
    if not (QEMU_DIR / "READY").is_file():
        return (f"no aarch64 Python sysroot at {QEMU_DIR}: run bench/setup_qemu_aarch64.sh")
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# TVM's RPC server loop (``tvm.rpc.server``) for the aarch64 servers. Under qemu-user on
# this machine a Python thread never starts and a forked child segfaults, so ``python -m
# tvm.exec.rpc_server`` (a popen_worker child, a listening thread, one forked process per
# session) cannot run there: the listen loop runs in the main thread and each session is served
# in the server process itself (its multiprocessing.Process replaced by an in-process call).
# Consequence: no session timeout is enforced by these servers, and a crash in a kernel ends
# the server (to the client: a device that disappeared).
_QEMU_SERVER = """
import os, socket, sys, types
from tvm.rpc import server as S
host, port, tracker, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
class InProcess:
    def __init__(self, target, args):
        self.target, self.args, self.pid, self.exitcode = target, args, os.getpid(), None
    def start(self):
        try:
            self.target(*self.args)
            self.exitcode = 0
            self.args[0].detach()   # the RPC loop closed the fd; _serving closes it again
        except Exception as e:  # the session ended badly; keep serving
            print("session failed:", e, flush=True)
            self.exitcode = 0
    def join(self, timeout=None):
        pass
    def is_alive(self):
        return False
S.multiprocessing = types.SimpleNamespace(Process=InProcess)
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind((host, port))
sock.listen(1)
th, tp = tracker.rsplit(":", 1)
S._listen_loop(sock, port, key, (th, int(tp)), None, host)
"""


def _qemu_command() -> tuple[list[str], dict[str, str]]:
    sysroot = QEMU_DIR / "sysroot"
    libs = [sysroot / "usr/aarch64-linux-gnu/lib", sysroot / "lib/aarch64-linux-gnu",
            sysroot / "usr/lib/aarch64-linux-gnu"]
    # OPENBLAS/OMP threads 1: numpy's thread start-up under qemu spins for minutes otherwise;
    # no PYTHONDONTWRITEBYTECODE: byte-compiling TVM under emulation at every start is slow
    env = {"PATH": os.environ.get("PATH", ""), "TVM_USE_RUNTIME_LIB": "1",
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "TVM_NUM_THREADS": "1",
           "PYTHONPATH": str(QEMU_DIR / "site"), "LD_LIBRARY_PATH": ":".join(map(str, libs))}
    cmd = ["qemu-aarch64", "-L", str(sysroot), "-cpu", "cortex-a76",
           str(sysroot / "usr/bin/python3.11")]
    return cmd, env


class DeviceFarm:
    """A tracker and RPC servers on 127.0.0.1; a context manager that stops them all."""

    def __init__(self, log_dir: str | os.PathLike | None = None):
        self.port = free_port()
        self.tracker = f"{HOST}:{self.port}"
        self.servers: dict[int, tuple[str, str, subprocess.Popen]] = {}   # pid -> key, arch
        self.ports: dict[int, int] = {}   # server pid -> its RPC port
        self._log_dir = Path(log_dir) if log_dir else None
        self._procs: list[subprocess.Popen] = []
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["TVM_NUM_THREADS"] = "1"
        self._tracker = self._start([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host",
                                     HOST, "--port", str(self.port), "--port-end",
                                     str(self.port + 1), "--silent"], env, "tracker")

    def _start(self, cmd: list[str], env: dict[str, str], name: str) -> subprocess.Popen:
        out = (open(self._log_dir / f"{name}.log", "ab") if self._log_dir  # noqa: SIM115
               else subprocess.DEVNULL)
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs.append(p)
        return p

    def add_server(self, key: str, arch: str = "x86_64") -> int:
        """Start one RPC server for ``key`` (``arch`` x86_64: this Python; aarch64: under
        qemu); returns its pid (``kill_server`` takes it)."""
        port = free_port()
        if arch == "aarch64":
            why = qemu_available()
            if why:
                raise RuntimeError(why)
            cmd, env = _qemu_command()
            cmd = [*cmd, "-c", _QEMU_SERVER, HOST, str(port), self.tracker, key]
        elif arch == "x86_64":
            cmd = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", HOST, "--port",
                   str(port), "--port-end", str(port + 1), "--tracker", self.tracker, "--key",
                   key, "--custom-addr", HOST, "--silent"]
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            env["TVM_NUM_THREADS"] = "1"
        else:
            raise ValueError(f"arch {arch!r}: x86_64 or aarch64")
        p = self._start(cmd, env, f"server-{key}-{port}")
        self.servers[p.pid] = (key, arch, p)
        self.ports[p.pid] = port
        return p.pid

    def serving_this_process(self) -> list[int]:
        """Pids of the servers this process holds an RPC session with (by its TCP
        connections to their ports)."""
        import psutil

        peers = {c.raddr.port for c in psutil.Process().net_connections("tcp")
                 if c.raddr and c.raddr.ip == HOST and c.status == "ESTABLISHED"}
        return [pid for pid, port in self.ports.items() if port in peers and
                pid in self.servers]

    def queue(self) -> dict:
        """The tracker's summary (``queue_info``: free/pending per key, ``server_info``)."""
        from tvm import rpc

        t = rpc.connect_tracker(HOST, self.port)
        try:
            return t.summary()
        finally:
            t.close()

    def wait_ready(self, want: dict[str, int], timeout: float = 600.0) -> None:
        """Wait until the tracker lists ``want[key]`` free servers per key."""
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            for pid, (key, _, p) in self.servers.items():
                if p.poll() is not None:
                    raise RuntimeError(f"RPC server {pid} ({key}) exited with {p.returncode}")
            try:
                last = self.queue()
            except (OSError, RuntimeError):
                time.sleep(1.0)
                continue
            qi = last.get("queue_info", {})
            if all(qi.get(k, {}).get("free", 0) >= n for k, n in want.items()):
                return
            time.sleep(1.0)
        raise TimeoutError(f"servers not ready after {timeout:.0f} s: want {want}, tracker "
                           f"says {last}")

    def kill_server(self, pid: int, sig: int = signal.SIGKILL) -> None:
        """End server ``pid`` and its session processes (its process group) at once."""
        _, _, p = self.servers.pop(pid)
        _kill_group(p, sig)

    def live_pids(self) -> list[int]:
        """Pids of every process still alive in the groups this farm started."""
        groups = {p.pid for p in self._procs}
        alive = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            state, pgid = fields[0], int(fields[2])
            if pgid in groups and state != "Z":
                alive.append(int(entry.name))
        return alive

    def stop(self) -> None:
        """Stop every server and the tracker; raise if a process of theirs is still alive."""
        for p in reversed(self._procs):
            _kill_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while self.live_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in self._procs:
            _kill_group(p, signal.SIGKILL)
        left = self.live_pids()
        if left:
            raise RuntimeError(f"processes left after stop: {left}")
        self.servers.clear()

    def __enter__(self) -> DeviceFarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)   # the group we created: the server and its session children
    except ProcessLookupError:
        pass
    if sig == signal.SIGKILL or p.poll() is not None:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def main() -> None:
    # a SIGTERM (timeout, CI) unwinds through the with-block, which stops every server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.perf_counter()
    with DeviceFarm() as farm:
        farm.add_server("x86", "x86_64")
        why = qemu_available()
        want = {"x86": 1}
        if why is None:
            farm.add_server("kirin990", "aarch64")
            want["kirin990"] = 1
        else:
            print(f"no aarch64 server: {why}")
        farm.wait_ready(want)
        print(f"tracker {farm.tracker}: ready after {time.perf_counter() - t0:.1f} s")
        print(farm.queue())
    print("stopped; no process left")


if __name__ == "__main__":
    main()
