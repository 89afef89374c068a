"""Remote run and profile over TVM RPC on devices of this machine (bench/rpc_devices.py).

A tracker, one x86-64 RPC server and two aarch64 ones under qemu-aarch64 (the sysroot of
bench/setup_qemu_aarch64.sh) on 127.0.0.1, started and stopped by the module fixture (no
process left: checked by pid). Skipped, with the reason, without qemu, the sysroot or the
aarch64 cross compiler.
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
from npu_helpers import cosine, image, rel_l2, small_cnn

import runtime
from bench.rpc_devices import DeviceFarm, free_port, qemu_available
from runtime.remote import DeviceError, NoDeviceError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    why = qemu_available() or (None if shutil.which("aarch64-linux-gnu-g++") else
                               "aarch64-linux-gnu-g++ not installed")
    if why:
        pytest.skip(why)
    f = DeviceFarm(log_dir=tmp_path_factory.mktemp("rpc-logs"))
    try:
        f.add_server("x86", "x86_64")
        f.add_server("kirin990", "aarch64")
        f.add_server("kirin990", "aarch64")
        f.wait_ready({"x86": 1, "kirin990": 2}, timeout=900)
        yield f
    finally:
        f.stop()                     # raises if a process of the farm is still alive
        assert f.live_pids() == []


@pytest.fixture(scope="module")
def kirin(tmp_path_factory):
    from compiler import compile

    out = tmp_path_factory.mktemp("kirin")
    m = compile(small_cnn(), target="kirin990", progress=False)
    info = m.export_device(out / "dev")
    return m, m.save(out / "host.npkg"), out / "dev" / info["cpu"]["package"]


def test_x86_device_outputs_identical_to_local(farm, kirin):
    _, host_pkg, _ = kirin
    x = image()
    local = runtime.load(host_pkg).run(x)
    remote = runtime.connect(farm.tracker, "x86", timeout=60).load(host_pkg)
    got = remote.run(x)
    for a, b in zip(got, local, strict=True):
        np.testing.assert_array_equal(a, b)
    prof = remote.profile(x, repeat=3)
    print(prof.table(), file=sys.stderr)
    assert len(prof.steps) == len(remote.steps) and all(s.median_ms > 0 for s in prof.steps)


def test_aarch64_device_package_matches_host_simulation(farm, kirin):
    m, _, dev_pkg = kirin
    x = image()
    session = runtime.connect(farm.tracker, "kirin990", timeout=120)
    remote = session.load(dev_pkg)
    for y, y_host in zip(remote.run(x), m.run(x), strict=True):
        print(f"aarch64 device vs host simulation: rel L2 {rel_l2(y, y_host):.2e}, "
              f"cosine {cosine(y, y_host):.7f}", file=sys.stderr)
        assert rel_l2(y, y_host) < 2e-3
    prof = remote.profile(x, repeat=2)
    print("per-kernel device times (qemu-aarch64, not A76 speed):\n" + prof.table(),
          file=sys.stderr)
    assert [s.kernel for s in prof.steps] == [s.kernel for s in remote.steps]


def test_mobilenet_v2_kirin990_on_the_aarch64_device(farm, mobilenet_model, tmp_path):
    """The acceptance model: MobileNetV2's kirin990 CPU library on the qemu-aarch64 device."""
    import time

    import torch

    from compiler import compile

    model, x = mobilenet_model
    t0 = time.perf_counter()
    m = compile(model, example_inputs=(torch.from_numpy(x),), target="kirin990",
                progress=False)
    info = m.export_device(tmp_path / "dev")
    t1 = time.perf_counter()
    remote = runtime.connect(farm.tracker, "kirin990", timeout=120).load(
        tmp_path / "dev" / info["cpu"]["package"])
    name = m.input_names[0]
    (y,) = remote.run({name: x})
    (y_host,) = m.run({name: x})
    print(f"MobileNetV2 {list(x.shape)} kirin990: compile + export {t1 - t0:.0f} s; aarch64 "
          f"device vs host simulation: max |diff| {np.abs(y - y_host).max():.3e}, rel L2 "
          f"{rel_l2(y, y_host):.2e}", file=sys.stderr)
    np.testing.assert_array_equal(y, y_host)
    prof = remote.profile({name: x}, repeat=1)
    print("MobileNetV2 per-kernel device times, slowest 10 (qemu-aarch64 on a loaded x86 "
          "host: not A76 speed):\n" + prof.table(top=10), file=sys.stderr)
    assert len(prof.steps) == len(remote.steps)


def test_kill_a_server_during_a_batch_then_none_left(farm, kirin):
    m, _, dev_pkg = kirin
    xs = [image(seed=s) for s in range(4)]
    remote = runtime.connect(farm.tracker, "kirin990", timeout=30, retries=2).load(dev_pkg)
    outs = [remote.run(xs[0])]
    (victim,) = farm.serving_this_process()
    farm.kill_server(victim)
    outs += remote.run_batch(xs[1:])        # completes on the other aarch64 server
    assert remote.devices_used == 2 and len(remote.failures) == 1
    for x, ys in zip(xs, outs, strict=True):
        for y, y_host in zip(ys, m.run(x), strict=True):
            assert rel_l2(y, y_host) < 2e-3
    (last,) = farm.serving_this_process()
    farm.kill_server(last)
    remote.session.timeout = 3     # no device will come: wait 3 s, not 30
    with pytest.raises(DeviceError, match="no free device with key 'kirin990'"):
        remote.run(xs[0])


def test_tampered_package_is_refused_before_upload(farm, kirin, tmp_path):
    import shutil as sh

    from runtime.errors import IntegrityError

    _, _, dev_pkg = kirin
    bad = tmp_path / "bad.npkg"
    sh.copytree(dev_pkg, bad)
    data = bytearray((bad / "kernels.so").read_bytes())
    data[-1] ^= 0xFF
    (bad / "kernels.so").write_bytes(bytes(data))
    session = runtime.connect(farm.tracker, "x86", timeout=5)
    with pytest.raises(IntegrityError, match="kernels.so does not match its sha256"):
        session.load(bad)
    assert session.queue()["free"] == 1      # no device was taken


def test_npucc_run_remote_cli(farm, kirin, tmp_path, capsys):
    from compiler.cli import main

    _, host_pkg, _ = kirin
    x = image()["x"]
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(host_pkg), "--input", f"x={tmp_path / 'x.npy'}", "--remote",
                 farm.tracker, "--key", "x86", "--profile", "--save-outputs",
                 str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "median of" in out
    local = runtime.load(host_pkg).run({"x": x})
    saved = sorted((tmp_path / "out").glob("*.npy"))
    assert len(saved) == len(local)


def test_no_free_device_and_no_tracker_errors(farm, kirin):
    _, host_pkg, _ = kirin
    with pytest.raises(NoDeviceError, match="knows no device of that key"):
        runtime.connect(farm.tracker, "rk3588", timeout=2).load(host_pkg).run(image())
    held = runtime.connect(farm.tracker, "x86", timeout=60).load(host_pkg)
    held.run(image())    # holds the only x86 device
    with pytest.raises(NoDeviceError, match=r"all 1 device\(s\) of that key are busy"):
        runtime.connect(farm.tracker, "x86", timeout=2).load(host_pkg).run(image())
    with pytest.raises(NoDeviceError, match="no RPC tracker answers"):
        runtime.connect(f"127.0.0.1:{free_port()}", "x86", timeout=2)
