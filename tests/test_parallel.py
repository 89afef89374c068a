"""executor="ray" (compiler/parallel.py) gives exactly the serial results.

Head importance by output error on a small GPT-2 decoder (2 layers x 4 heads: 8 ablations) on
a 2-worker local Ray cluster, shut down afterwards. Skipped without ray (pip install
'npucc[distributed]').
"""

from __future__ import annotations

import operator
import sys
import time

import numpy as np
import pytest

from compiler.errors import NpuccError
from compiler.parallel import map_tasks
from tests.test_quant_mixed import two_branch

GPT2_SMALL = dict(vocab=128, n_layer=2, n_head=4, d_model=32, seq=16)   # head size 8
FUSE = "canonicalize,fuse-matmul-add,fuse-gemm,fold-batchnorm,fuse-conv-relu,fuse-dense-act"


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="pip install 'npucc[distributed]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
    assert not ray.is_initialized()


def test_map_tasks_order_and_errors(ray_cluster):
    # fn must be importable by the workers (a module-level function of an installed module)
    assert map_tasks(operator.sub, 10, [3, 1, 2], executor="ray") == [7, 9, 8]
    assert map_tasks(operator.sub, 10, [3, 1, 2]) == [7, 9, 8]
    with pytest.raises(NpuccError, match="executor 'dask' is not known; accepted: serial, ray"):
        map_tasks(operator.sub, 0, [1], executor="dask")


@pytest.mark.slow  # ~20-40 s: torch import + 2 x 8 ablations over 2 samples
def test_head_importance_ray_equals_serial(ray_cluster):
    import torch

    from compiler.frontends import from_torch
    from compiler.pass_base import PassContext
    from compiler.pass_manager import run_pipeline
    from examples.models import gpt2_decoder, gpt2_inputs
    from passes.pruning.heads import find_attention, head_importance

    torch.manual_seed(0)
    model = gpt2_decoder(**GPT2_SMALL)
    ids = gpt2_inputs(**GPT2_SMALL)
    g = run_pipeline(from_torch(model, (torch.from_numpy(ids),)), FUSE, ctx=PassContext())
    name = g.inputs[0].name
    rng = np.random.default_rng(0)
    samples = [{name: ids}, {name: rng.integers(0, 128, ids.shape).astype(ids.dtype)}]
    blocks = find_attention(g)
    t0 = time.perf_counter()
    serial = head_importance(g, blocks, "output-error", samples)
    t1 = time.perf_counter()
    par = head_importance(g, blocks, "output-error", samples, executor="ray")
    t2 = time.perf_counter()
    print(f"head importance, {sum(a.heads for a in blocks)} ablations: serial {t1 - t0:.2f} s, "
          f"ray (2 workers) {t2 - t1:.2f} s", file=sys.stderr)
    assert serial.keys() == par.keys()
    for i in serial:
        np.testing.assert_array_equal(serial[i], par[i])
        assert np.ptp(serial[i]) > 0     # the heads differ: the ranking means something
    rank = lambda imp: np.argsort(np.concatenate([imp[i] for i in sorted(imp)]))  # noqa: E731
    np.testing.assert_array_equal(rank(serial), rank(par))


def _mixed_plan(executor: str) -> dict:
    """The mixed-precision plan (per-layer SNR per candidate, choice) of a two-layer model."""
    from compiler.pass_base import PassContext
    from passes.quantization.insert import InsertQuantize, precision_text
    from passes.quantization.mixed import MIB, layer_bytes

    g, samples = two_branch()
    a, b = (next(n for n in g.nodes if n.name == k) for k in ("a", "b"))
    budget = layer_bytes(g, a, "w8", 128) + layer_bytes(g, b, "int4", 128) + 32
    ctx = PassContext(resources={"calib": samples})
    InsertQuantize(precision=precision_text("int4"), budget_mb=budget / MIB,
                   calibration="@calib", executor=executor).run(g, ctx)
    return ctx.options["mixed_plan"]


def test_mixed_precision_sensitivity_ray_equals_serial(ray_cluster):
    serial, par = _mixed_plan("serial"), _mixed_plan("ray")
    assert serial == par
    layers = {ly["name"]: ly for ly in serial["layers"]}
    assert layers["a"]["snr_db"]["int4"] < layers["b"]["snr_db"]["int4"]


def test_pruning_sensitivity_ray_equals_serial(ray_cluster):
    from passes.pruning.sensitivity import layer_sensitivity

    g, samples = two_branch()
    serial = layer_sensitivity(g, samples)
    par = layer_sensitivity(g, samples, executor="ray")
    assert serial == par and len(serial) == 2
    assert serial["a"]["errors"][0.9] > serial["b"]["errors"][0.9]
