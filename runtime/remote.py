"""Run a package on a remote device over TVM RPC (a tracker hands out devices by key).

    session = runtime.connect("127.0.0.1:9190", "kirin990", timeout=60)
    m = session.load("model.npkg")             # verified here, then uploaded
    (y,) = m.run({"x": x})
    print(m.profile({"x": x}).table())         # per-kernel times measured on the device

What happens, all through TVM's own RPC (``tvm.rpc``: tracker queue, upload, remote module,
remote tensors, ``time_evaluator``); there is no protocol of ours:

- ``load`` verifies the package on the client exactly as ``runtime.load`` does (every file's
  size and sha256, the signature when trusted keys are configured, the manifest schema and
  plan: ``package_load.read_verified`` + ``_verify.check_manifest``) and uploads exactly the
  verified bytes of its ``kernels.so``. That library must be the device's: a kirin990 device
  takes the device package ``CompiledModel.export_device`` writes (``device.npkg``, AArch64
  kernels with their own weights and plan); a host package runs on an x86-64 device.
- The package's plan runs on the device: weights packed like the local executor's
  (``executor.pack_weights``), the steps called in plan order with their argument tensors.
  Arena tensors: TVM kernels refuse a tensor with a nonzero ``byte_offset`` and an RPC tensor's
  data is a handle the client cannot offset, so the arena cannot be one remote buffer with
  views as it is locally; each arena offset of the plan gets one remote buffer (tensors the plan
  puts at the same offset share it, in-place pairs included).
- Device times: ``time_evaluator`` of each step's kernel on its bound arguments, run on the
  device (``Profile``, like ``Executor.profile``); ``total_ms`` is a whole run as the client
  sees it (RPC round trips included).
- Queueing: a request waits for a free device of the key for at most ``timeout`` seconds, then
  :class:`NoDeviceError` (saying how many devices of that key the tracker knows).
- A device that fails mid-run (its server died, the connection dropped) is given up and the
  run repeated on another device of the same key, at most ``retries`` times; then
  :class:`DeviceLostError` with the last error.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from . import _dtypes
from ._tvm import import_tvm
from .errors import InputError, PackageError, RuntimeError_
from .executor import Profile, StepTime, check_inputs, pack_weights

__all__ = ["connect", "RemoteSession", "RemoteModel", "DeviceError", "NoDeviceError",
           "DeviceLostError"]


class DeviceError(RuntimeError_):
    """A remote device could not be reached, found, or kept."""


class NoDeviceError(DeviceError):
    """No device of the key became free within the timeout (or no tracker answered)."""


class DeviceLostError(DeviceError):
    """Every device tried disappeared or failed during the run."""


def _split(tracker: str) -> tuple[str, int]:
    host, _, port = str(tracker).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"tracker {tracker!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def connect(tracker: str, key: str, timeout: float = 60.0, retries: int = 2) -> RemoteSession:
    """A session with the devices of ``key`` that the TVM RPC tracker ``tracker`` (HOST:PORT)
    hands out. ``timeout``: how long a request may wait in the tracker's queue for a free
    device (and how long to wait for the tracker itself); ``retries``: how many other devices a
    run may move to when its device disappears. Raises :class:`NoDeviceError` when no tracker
    answers at that address."""
    return RemoteSession(tracker, key, timeout=timeout, retries=retries)


class RemoteSession:
    """Devices of one key behind one tracker; see the module docstring."""

    def __init__(self, tracker: str, key: str, timeout: float = 60.0, retries: int = 2):
        self.tracker, self.key = tracker, key
        self.timeout, self.retries = float(timeout), int(retries)
        self._addr = _split(tracker)
        self._tvm = import_tvm()
        try:
            socket.create_connection(self._addr, timeout=min(self.timeout, 10.0)).close()
        except OSError as e:
            raise NoDeviceError(f"no RPC tracker answers at {tracker} ({e}); start one with "
                                f"python -m tvm.exec.rpc_tracker --host HOST --port PORT") from e

    def queue(self) -> dict[str, Any]:
        """The tracker's queue for this key: ``{"free": n, "pending": n, "servers": n}``."""
        from tvm import rpc

        t = rpc.connect_tracker(*self._addr)
        try:
            s = t.summary()
        finally:
            t.close()
        q = dict(s.get("queue_info", {}).get(self.key, {"free": 0, "pending": 0}))
        q["servers"] = sum(1 for i in s.get("server_info", []) if i.get("key") ==
                           f"server:{self.key}")
        return q

    def request(self) -> Any:
        """One device (a ``tvm.rpc.RPCSession``): waits in the tracker's queue at most
        ``timeout`` seconds, then :class:`NoDeviceError`."""
        from tvm import rpc

        tracker = rpc.connect_tracker(*self._addr)
        got: dict[str, Any] = {}

        def ask() -> None:
            try:
                got["session"] = tracker.request(self.key, max_retry=1)
            except Exception as e:  # noqa: BLE001  (reported by the waiting thread)
                got["error"] = e

        th = threading.Thread(target=ask, name="npucc-rpc-request", daemon=True)
        th.start()
        th.join(self.timeout)
        if th.is_alive():
            # end the pending request: shut the tracker connection down (close() alone does
            # not wake the thread blocked in recv); the tracker drops a closed connection's
            # pending request
            sock = getattr(tracker, "_sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            th.join(10)
            tracker.close()
            got.pop("session", None)
            q = self.queue()
            busy = (f"all {q['servers']} device(s) of that key are busy" if q["servers"]
                    else "the tracker knows no device of that key")
            raise NoDeviceError(f"no free device with key {self.key!r} at {self.tracker} within "
                                f"{self.timeout:g} s: {busy} (start an RPC server with "
                                f"--key {self.key}, or raise timeout=)")
        tracker.close()
        if "error" in got:
            raise NoDeviceError(f"the tracker at {self.tracker} gave no device with key "
                                f"{self.key!r}: {got['error']}") from got["error"]
        return got["session"]

    def load(self, path: str | Path, trusted_keys: Any = None) -> RemoteModel:
        """Verify the package at ``path`` here, then upload it to a device; see the module
        docstring for which library that must be."""
        from ._verify import check_manifest
        from .package import LIBRARY, WEIGHTS, Package
        from .package_load import read_verified

        manifest, blobs, _ = read_verified(path, trusted_keys)
        check_manifest(manifest, str(path))
        pkg = Package(manifest, Path(path) / LIBRARY, blobs[WEIGHTS], directory=path)
        return RemoteModel(self, pkg, blobs[LIBRARY])


class _Bound:
    """A package uploaded to one device: its module, tensors and bound calls."""

    def __init__(self, rpc_sess: Any, model: RemoteModel):
        tvm = model.session._tvm
        self.sess = rpc_sess
        name = f"npucc-{uuid.uuid4().hex[:12]}.so"
        rpc_sess.upload(bytearray(model.library), target=name)
        try:
            self.mod = rpc_sess.load_module(name)
        except Exception as e:
            raise PackageError(f"the device (key {model.session.key!r}) cannot load the "
                               f"package's kernels.so ({model.arch} library): {e}. A target "
                               f"whose CPU is not this machine's runs its device package "
                               f"(CompiledModel.export_device: device.npkg)") from e
        self.dev = dev = rpc_sess.cpu()
        tensors = model.package.tensors
        views: dict[str, Any] = {}
        for key, data in model.weights.items():
            buf = tvm.runtime.empty((data.nbytes,), "uint8", dev)
            buf.copyfrom(data)
            for t in tensors.values():
                if t["kind"] == "weight" and t["weight"] == key:
                    views[t["name"]] = _typed(buf, t)
        slots: dict[int, Any] = {}
        sizes: dict[int, int] = {}
        for t in tensors.values():
            if t["kind"] != "weight" and t.get("offset") is not None:
                sizes[t["offset"]] = max(sizes.get(t["offset"], 0), int(t["nbytes"]))
        for off, n in sizes.items():
            slots[off] = tvm.runtime.empty((max(n, 1),), "uint8", dev)
        for t in tensors.values():
            if t["kind"] != "weight" and t.get("offset") is not None:
                views[t["name"]] = _typed(slots[t["offset"]], t)
        self.device_bytes = sum(sizes.values())
        self.views = views
        self.funcs = {k: self.mod[k] for k in {s.kernel for s in model.steps}}
        self.calls = [(self.funcs[s.kernel], tuple(views[n] for n in (*s.inputs, *s.outputs)))
                      for s in model.steps]


def _typed(buf: Any, t: dict[str, Any]) -> Any:
    return buf._create_view(tuple(t["shape"]), _dtypes.tvm_dtype(t["dtype"]))


class RemoteModel:
    """A package running on a device of a :class:`RemoteSession` (moved to another device
    of the key when its device disappears)."""

    def __init__(self, session: RemoteSession, package: Any, library: bytes):
        self.session = session
        self.package = package
        self.library = library
        self.steps = package.steps
        m = package.manifest
        self.arch = m.get("target", {}).get("arch", "?")
        self._spec = [(t["name"], tuple(t["shape"]), _dtypes.numpy_dtype(t["dtype"]))
                      for t in m["inputs"]]
        self._outputs = [t["name"] for t in m["outputs"]]
        stored = package.weights()
        self.weights = pack_weights(stored, {t["weight"] for t in package.tensors.values()
                                             if t["kind"] == "weight"})
        self.devices_used = 0      # how many devices this model was uploaded to
        self.failures: list[str] = []
        self._bound: _Bound | None = None

    def _device(self) -> _Bound:
        if self._bound is None:
            self._bound = _Bound(self.session.request(), self)
            self.devices_used += 1
        return self._bound

    def _on_device(self, fn: Any) -> Any:
        """``fn(bound)`` on the current device; on a device failure, on the next one."""
        for _ in range(self.session.retries + 1):
            b = self._device()
            try:
                return fn(b)
            except (InputError, PackageError):
                raise
            except Exception as e:  # noqa: BLE001  (TVM's RPC errors: the device is gone)
                self.failures.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                self._bound = None   # drop the session: its server is gone or broken
        raise DeviceLostError(f"the run failed on {len(self.failures)} device(s) with key "
                              f"{self.session.key!r} at {self.session.tracker} (retries="
                              f"{self.session.retries}); last error: {self.failures[-1]}")

    @property
    def input_names(self) -> list[str]:
        return [n for n, _, _ in self._spec]

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, inputs: Any) -> list[np.ndarray]:
        """Run once on the device; outputs (numpy, graph order) like ``Executor.run``."""
        feeds = check_inputs(self._spec, inputs)

        def go(b: _Bound) -> list[np.ndarray]:
            for name, x in feeds:
                b.views[name].copyfrom(np.ascontiguousarray(x))
            for f, args in b.calls:
                f(*args)
            return [b.views[n].numpy() for n in self._outputs]

        return self._on_device(go)

    def run_batch(self, batch: list[Any]) -> list[list[np.ndarray]]:
        """``run`` for each item, in order (each item moved on if its device disappears)."""
        return [self.run(x) for x in batch]

    def profile(self, inputs: Any, repeat: int = 5) -> Profile:
        """Median device time of each step (``time_evaluator`` on the device) and the median
        wall time of a whole run seen from here (RPC included)."""
        feeds = check_inputs(self._spec, inputs)

        def go(b: _Bound) -> Profile:
            for name, x in feeds:
                b.views[name].copyfrom(np.ascontiguousarray(x))
            steps = []
            for j, (s, (_, args)) in enumerate(zip(self.steps, b.calls, strict=True)):
                ev = b.mod.time_evaluator(s.kernel, b.dev, number=1, repeat=repeat)
                res = ev(*args).results
                steps.append(StepTime(j, s.node, s.op, s.kernel,
                                      1e3 * statistics.median(res)))
            totals = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                for f, args in b.calls:
                    f(*args)
                b.views[self._outputs[0]].numpy()
                totals.append(time.perf_counter() - t0)
            return Profile(steps, 1e3 * statistics.median(totals),
                           sum(s.median_ms for s in steps), repeat)

        return self._on_device(go)

    def __repr__(self) -> str:
        return (f"<RemoteModel {self.session.key}@{self.session.tracker}: "
                f"{len(self.steps)} steps, {self.arch}>")
