"""The memory planner: hand-checked cases and hypothesis properties on random graphs."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.errors import PlanError
from runtime.memory_pool import ALIGN, ORDERINGS, MemoryPlan, PlanStep, PlanTensor, plan_memory


def _chain(n: int, size: int = 1000):
    tensors = [PlanTensor("x", size, "input")]
    tensors += [PlanTensor(f"t{i}", size, "output" if i == n - 1 else "intermediate")
                for i in range(n)]
    steps = [PlanStep(("x" if i == 0 else f"t{i - 1}",), (f"t{i}",)) for i in range(n)]
    return tensors, steps


def test_chain_reuses_two_buffers():
    plan = plan_memory(*_chain(6))
    plan.check()
    assert plan.arena_bytes == plan.lower_bound_bytes == 2 * 1024
    assert plan.naive_bytes == 7 * 1024
    assert plan.lifetimes["x"] == (-1, 0) and plan.lifetimes["t5"] == (5, 6)


def test_chain_in_place_uses_one_buffer():
    tensors, steps = _chain(6)
    plan = plan_memory(tensors, steps, elementwise_steps=range(6))
    plan.check()
    assert plan.arena_bytes == plan.lower_bound_bytes == 1024
    assert len({plan.offsets[t.name] for t in tensors}) == 1
    assert plan.inplace[0] == (0, "x", "t0")


def test_in_place_needs_a_dying_operand_of_the_same_size():
    tensors = [PlanTensor("x", 256, "input"), PlanTensor("a", 256, "intermediate"),
               PlanTensor("b", 256, "intermediate"), PlanTensor("c", 128, "intermediate"),
               PlanTensor("y", 256, "output")]
    steps = [PlanStep(("x",), ("a",)),          # 0
             PlanStep(("a",), ("b",)),          # 1: a still read at step 3 -> not in place
             PlanStep(("b",), ("c",)),          # 2: size differs -> not in place
             PlanStep(("a", "c", "b"), ("y",))]  # 3: a dies here, same size -> in place
    plan = plan_memory(tensors, steps, elementwise_steps=[1, 2, 3])
    plan.check()
    assert plan.inplace == [(3, "a", "y")]


def test_outputs_and_weights_are_never_overwritten():
    tensors = [PlanTensor("x", 64, "input"), PlanTensor("w", 64, "weight"),
               PlanTensor("h", 64, "output"), PlanTensor("y", 64, "output")]
    steps = [PlanStep(("x", "w"), ("h",)), PlanStep(("h", "w"), ("y",))]
    plan = plan_memory(tensors, steps, elementwise_steps=[0, 1])
    plan.check()
    assert plan.inplace == [(0, "x", "h")]
    assert "w" not in plan.offsets
    assert plan.offsets["h"] != plan.offsets["y"]


def test_input_returned_as_output_stays_live():
    tensors = [PlanTensor("x", 64, "input"), PlanTensor("y", 64, "output")]
    plan = plan_memory(tensors, [PlanStep(("x",), ("y",))], [0], inputs_also_outputs={"x"})
    assert plan.inplace == [] and plan.lifetimes["x"] == (-1, 1)


def test_errors_name_the_tensor():
    with pytest.raises(PlanError, match="reads 'a' before any step writes it"):
        plan_memory([PlanTensor("a", 4, "intermediate")], [PlanStep(("a",), ())])
    with pytest.raises(PlanError, match="'b', which is not in the tensor table"):
        plan_memory([], [PlanStep((), ("b",))])
    with pytest.raises(PlanError, match="already written"):
        plan_memory([PlanTensor("a", 4, "intermediate")], [PlanStep((), ("a",))] * 2)
    with pytest.raises(PlanError, match="graph output 'y' is written by no step"):
        plan_memory([PlanTensor("y", 4, "output")], [])


def test_check_catches_overlap():
    plan = plan_memory(*_chain(3))
    bad = MemoryPlan(**{**vars(plan), "offsets": {**plan.offsets, "t1": plan.offsets["t0"]}})
    with pytest.raises(PlanError, match="overlap"):
        bad.check()


@st.composite
def graphs(draw):
    """A random DAG in execution order: each step reads 0-3 earlier tensors and writes 1-2."""
    n_inputs = draw(st.integers(1, 3))
    size = st.one_of(st.integers(0, 5000), st.sampled_from([64, 128, 1024, 4096]))
    tensors = [PlanTensor(f"in{i}", draw(size), "input") for i in range(n_inputs)]
    weights = [PlanTensor(f"w{i}", draw(size), "weight") for i in range(draw(st.integers(0, 2)))]
    tensors += weights
    avail = [t.name for t in tensors]
    steps, produced = [], []
    nbytes = {t.name: t.nbytes for t in tensors}
    for i in range(draw(st.integers(0, 40))):
        reads = draw(st.lists(st.sampled_from(avail), min_size=0, max_size=3))
        writes = []
        for j in range(draw(st.integers(1, 2))):
            name = f"s{i}_{j}"
            same = reads and nbytes[reads[0]] and draw(st.booleans())
            nb = nbytes[reads[0]] if same else draw(size)
            tensors.append(PlanTensor(name, nb, "intermediate"))
            nbytes[name] = nb
            writes.append(name)
        steps.append(PlanStep(tuple(reads), tuple(writes)))
        avail += writes
        produced += writes
    outs = set(draw(st.lists(st.sampled_from(produced), max_size=3))) if produced else set()
    tensors = [PlanTensor(t.name, t.nbytes, "output") if t.name in outs else t for t in tensors]
    elementwise = draw(st.sets(st.integers(0, max(0, len(steps) - 1)))) if steps else set()
    return tensors, steps, elementwise


def _independent_check(tensors, steps, elementwise, plan):
    """Recompute lifetimes from scratch and check the plan against them."""
    n = len(steps)
    kind = {t.name: t.kind for t in tensors}
    first = {t.name: -1 for t in tensors if t.kind == "input"}
    last = dict(first)
    for i, s in enumerate(steps):
        for r in s.reads:
            if kind[r] != "weight":
                last[r] = i
        for w in s.writes:
            first[w] = last[w] = i
    for t in tensors:
        if t.kind == "output":
            last[t.name] = n
    size = {t.name: -(-t.nbytes // ALIGN) * ALIGN for t in tensors}
    assert set(plan.offsets) == set(first)
    pairs = {frozenset((a, r)) for _, a, r in plan.inplace}
    for i, a, r in plan.inplace:
        assert i in elementwise and a in steps[i].reads and r in steps[i].writes
        assert last[a] == i and kind[a] not in ("output", "weight")
        assert size[a] == size[r]
    for a in first:
        assert plan.offsets[a] % ALIGN == 0
        assert plan.offsets[a] + size[a] <= plan.arena_bytes
        for b in first:
            if a >= b or not size[a] or not size[b] or frozenset((a, b)) in pairs:
                continue
            if first[a] <= last[b] and first[b] <= last[a]:  # live at the same time
                oa, ob = plan.offsets[a], plan.offsets[b]
                assert oa + size[a] <= ob or ob + size[b] <= oa, (a, b)
    # the bound: the largest live set (in-place pairs counted once)
    peak = 0
    for t in range(-1, n + 1):
        total = sum(size[x] for x in first if first[x] <= t <= last[x])
        total -= sum(size[a] for _, a, r in plan.inplace if t == last[a] == first[r])
        peak = max(peak, total)
    assert plan.lower_bound_bytes == peak
    assert plan.naive_bytes == sum(size[x] for x in first)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_plan_properties(g):
    tensors, steps, elementwise = g
    plan = plan_memory(tensors, steps, elementwise)
    plan.check()
    _independent_check(tensors, steps, elementwise, plan)
    assert plan.lower_bound_bytes <= plan.arena_bytes <= plan.naive_bytes
    every = plan_memory(tensors, steps, elementwise, stop_at_bound=False)
    assert sorted(every.tried) == sorted(ORDERINGS)
    for name in ORDERINGS:
        assert every.tried[name] >= plan.arena_bytes
    # stopping at the lower bound gives the plan trying every ordering gives
    assert (plan.arena_bytes, plan.ordering, plan.offsets) == \
        (every.arena_bytes, every.ordering, every.offsets)
    assert len(plan.tried) == len(ORDERINGS) or plan.arena_bytes == plan.lower_bound_bytes


@settings(max_examples=40, deadline=None)
@given(graphs(), st.sampled_from(sorted(ORDERINGS)))
def test_every_ordering_is_sound(g, ordering):
    tensors, steps, elementwise = g
    plan = plan_memory(tensors, steps, elementwise, orderings=[ordering])
    plan.check()
    _independent_check(tensors, steps, elementwise, plan)
