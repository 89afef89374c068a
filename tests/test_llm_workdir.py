"""compile_llm's own temporary folder does not outlive what needs it."""

from __future__ import annotations

import gc
import tempfile

import numpy as np
import pytest

from compiler.llm import compile_llm
from runtime.llm import load as load_llm
from tests.llm_tiny import tiny_llama


def _ours(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("npucc-llm-"))


@pytest.mark.filterwarnings("ignore::runtime.UnverifiedPackageWarning")  # our own copy
def test_temporary_package_goes_with_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    m = compile_llm(tiny_llama(), max_context=16, chunk=4)
    assert len(_ours(tmp_path)) == 1              # the package lives there while m does
    saved = m.save(tmp_path / "kept.npkg")
    logits = m.logits([1, 2, 3])
    del m
    gc.collect()
    assert _ours(tmp_path) == []
    again = load_llm(saved)
    np.testing.assert_allclose(again.logits([1, 2, 3]), logits, rtol=1e-6, atol=1e-6)


def test_build_folders_go_at_once_when_the_package_is_written_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    m = compile_llm(tiny_llama(), max_context=16, chunk=4, output=tmp_path / "out.npkg")
    assert _ours(tmp_path) == []
    assert m.logits([5, 6]).shape[0] == 2
