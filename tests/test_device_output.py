"""kirin990 device outputs: the AArch64 kernel library in the saved package, export_device.

Skipped (with the reason) when the aarch64 cross compiler is not installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from npu_helpers import image, small_cnn

import runtime
from runtime.errors import IntegrityError

pytestmark = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-g++") is None,
    reason="aarch64-linux-gnu-g++ not installed (apt-get install g++-aarch64-linux-gnu)")


def _machine(path) -> str:
    """The ELF machine of a shared library, by readelf (else by the header bytes)."""
    if shutil.which("readelf"):
        out = subprocess.run(["readelf", "-h", str(path)], capture_output=True, text=True)
        return next(line.split(":", 1)[1].strip() for line in out.stdout.splitlines()
                    if "Machine:" in line)
    head = path.read_bytes()[:20]
    return {183: "AArch64", 62: "Advanced Micro Devices X86-64"}[int.from_bytes(head[18:20],
                                                                                  "little")]


@pytest.fixture(scope="module")
def kirin_model():
    from compiler import compile

    return compile(small_cnn(with_layer_norm=True), target="kirin990", progress=False)


def test_save_writes_the_aarch64_library(kirin_model, tmp_path):
    path = kirin_model.save(tmp_path / "m.npkg")
    dev = path / "device" / "kernels.aarch64.so"
    assert _machine(dev) == "AArch64"
    assert "x86-64" in _machine(path / "kernels.so").lower() or \
        "x86" in _machine(path / "kernels.so").lower()
    if shutil.which("file"):
        out = subprocess.run(["file", str(dev)], capture_output=True, text=True).stdout
        assert "ARM aarch64" in out and "shared object" in out
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert set(files) == {"kernels.so", "weights.safetensors", "device/kernels.aarch64.so"}
    assert files["device/kernels.aarch64.so"]["bytes"] == dev.stat().st_size
    # the package still runs here (host kernels) and matches the compiled model
    ex = runtime.load(path)
    x = image()
    for a, b in zip(ex.run(x), kirin_model.run(x), strict=True):
        np.testing.assert_array_equal(a, b)
    # the device library is hashed like the rest
    data = bytearray(dev.read_bytes())
    data[-1] ^= 0xFF
    dev.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="device/kernels.aarch64.so"):
        runtime.load(path)


def test_export_device(kirin_model, tmp_path):
    info = kirin_model.export_device(tmp_path / "dev")
    root = tmp_path / "dev"
    assert json.loads((root / "export.json").read_text()) == info
    pkg = root / info["cpu"]["package"]
    assert _machine(pkg / "kernels.so") == "AArch64"
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["target"]["arch"] == "aarch64"
    assert manifest["target"]["tvm"]["mcpu"] == "cortex-a76"
    assert "+fullfp16" in manifest["target"]["tvm"]["mattr"]
    # here (x86) the runtime refuses to run it
    with pytest.raises(runtime.ArchitectureError):
        runtime.load(pkg)
    regions = info["npu_regions"]
    assert regions and all((root / r["onnx"]).is_file() for r in regions)
    assert all("RANDOM" in r["calibration"] for r in regions)
    import onnx

    model = onnx.load(str(root / regions[0]["onnx"]))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
