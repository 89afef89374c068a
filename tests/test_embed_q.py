"""``embed_wq`` (targets/kernels/embed_q.py): rows of a group-wise int4/3/2 table against
numpy, and one packed table shared with ``dense_wq`` (the tied output projection)."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.errors import OpError
from compiler.ir.ops.quant_weight import pack_bits
from tests.kernel_harness import Case, build_cases, check_cases, run_cases

rng = np.random.default_rng(3)


def table(v: int, d: int, bits: int, g: int, asym: bool):
    """A random table quantized by the LLM quantizer: (operands, the f32 rows numpy gives)."""
    from compiler.llm.quantize import quantize_asym
    from passes.quantization.gptq import quantize_rtn

    w = rng.standard_normal((v, d)).astype(np.float32)
    if asym:
        q, s, c = quantize_asym(w, g, bits)
    else:
        (q, s), c = quantize_rtn(w, bits, g), None
    # numpy's own dequantization, written out here (not the op's reference)
    deq = q.astype(np.float32).reshape(v, d // g, g) * s.astype(np.float32)[..., None]
    if c is not None:
        deq = deq + c.astype(np.float32)[..., None]
    ops = [pack_bits(q, bits), s] + ([c] if c is not None else [])
    return ops, deq.reshape(v, d)


@pytest.mark.parametrize("bits,g,asym,v", [(4, 32, False, 77), (4, 64, False, 64),
                                           (4, 32, True, 40), (3, 32, True, 50),
                                           (3, 64, True, 33), (2, 64, True, 70)])
def test_embed_wq_rows_match_numpy(tmp_path, bits, g, asym, v):
    d = 192
    ops, deq = table(v, d, bits, g, asym)
    ids = np.array([0, v - 1, 5, 31, 32, 5, v // 2], np.int32)
    case = Case("embed_wq", [ids, *ops], {"bits": bits, "group_size": g, "asym": asym},
                consts=tuple(range(1, len(ops) + 1)))
    (got,), = run_cases([case], tmp_path)
    np.testing.assert_allclose(got, deq[ids], rtol=1e-6, atol=1e-6)
    check_cases([case], tmp_path / "ref")     # and the op's reference agrees


def test_tied_table_packed_once(tmp_path):
    """The gather and the output projection pack the three arrays identically (one copy in
    a package), and the projection over them is x @ deq^T."""
    ops, deq = table(100, 128, 4, 32, False)
    ids = np.array([3, 99], np.int32)
    x = rng.standard_normal((1, 128)).astype(np.float32)
    cases = [Case("embed_wq", [ids, *ops], {"bits": 4, "group_size": 32}, consts=(1, 2)),
             Case("dense_wq", [x, *ops], {"bits": 4, "group_size": 32}, consts=(1, 2))]
    _, calls = build_cases(cases, tmp_path)
    for a, b in zip(calls[0][1][1:3], calls[1][1][1:3], strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    got = run_cases(cases, tmp_path / "run")
    np.testing.assert_allclose(got[0][0], deq[ids], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1][0], x @ deq.T, rtol=1e-4, atol=1e-4)


def test_embed_wq_refuses_bad_operands():
    from compiler.ir.registry import get_op
    from compiler.ir.types import TensorType

    op = get_op("embed_wq")
    ids, wq = TensorType((4,), "i32"), TensorType((10, 48), "u8")
    sc = TensorType((10, 3), "f16")
    assert op.infer([ids, wq, sc], op.normalize_attrs({"bits": 4, "group_size": 32})) == \
        [TensorType((4, 96), "f32")]
    with pytest.raises(OpError, match="asymmetric only"):
        op.infer([ids, wq, sc], op.normalize_attrs({"bits": 2, "group_size": 64}))
    with pytest.raises(OpError, match="scales must be f16\\[10,2\\]"):
        op.infer([ids, wq, TensorType((10, 2), "f32")],
                 op.normalize_attrs({"bits": 4, "group_size": 48}))
    with pytest.raises(OpError, match="outside"):
        op.reference([np.array([10], np.int32), np.zeros((10, 48), np.uint8),
                      np.ones((10, 3), np.float16)],
                     op.normalize_attrs({"bits": 4, "group_size": 32}))
