"""Choosing a CPU op's implementation by measurement (:mod:`mematte_kernels.selection`), with
fake timings, so the logic is tested on any CPU: the fastest candidate wins whichever it is,
the choice is cached on disk per machine and read back without measuring, forcing works and
bad forcing is refused by name."""

import json
import logging
from dataclasses import replace

import pytest
import torch

from mematte_kernels import cpu_choices, dispatch, selection
from mematte_kernels.selection import Candidate, SelectedOp


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMATTE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(selection.FORCE_ENV, raising=False)
    return tmp_path / "cache"


def fake_timer(monkeypatch, ms: dict) -> list:
    """time_call answers ``ms[name]`` ms for a candidate function made by :func:`named`;
    returns the list of the names it was asked to time."""
    timed = []

    def fake(fn, args):
        timed.append(fn.__name__)
        return ms[fn.__name__] / 1e3

    monkeypatch.setattr(selection, "time_call", fake)
    return timed


def named(name):
    def fn(x, *rest):
        return x + 0

    fn.__name__ = name
    return fn


def make_op(*names, runs=None) -> SelectedOp:
    runs = runs or {}
    return SelectedOp("toy_op", [Candidate(n, named(n), runs.get(n, selection._always)) for n in names],
                      lambda dtype: (torch.zeros(4, dtype=dtype),))  # fmt: skip


@pytest.mark.parametrize("own_ms, sdpa_ms, expected", [
    pytest.param(2.0, 0.6, "sdpa", id="sdpa-faster"),
    pytest.param(0.6, 2.0, "own", id="own-faster"),
])  # fmt: skip
def test_routed_attention_takes_the_faster_of_own_kernel_and_sdpa(own_ms, sdpa_ms, expected, monkeypatch, caplog):
    """The real varlen_attention choice with its real probe; only the candidates' timings (and
    whether the AVX512-BF16 kernel can run here) are faked."""
    real = cpu_choices.selected()["varlen_attention"]
    op = SelectedOp(real.op, [replace(c, fn=named(c.name), runs=selection._always) for c in real.candidates if c.name in ("own", "sdpa")],
                    real.probe)  # fmt: skip
    fake_timer(monkeypatch, {"own": own_ms, "sdpa": sdpa_ms})
    with caplog.at_level(logging.INFO, logger="mematte_kernels"):
        assert op.choose(torch.bfloat16).name == expected
    assert f"cpu varlen_attention[bfloat16] -> {expected} (measured" in caplog.text


def test_choice_is_cached_per_machine_and_read_back_without_measuring(monkeypatch, cache_dir):
    op = make_op("a", "b")
    timed = fake_timer(monkeypatch, {"a": 5.0, "b": 1.0})
    assert op.choose(torch.float32).name == "b"
    assert set(timed) == {"a", "b"}
    stored = json.loads((cache_dir / selection.CACHE_FILE).read_text())
    entry = stored[selection.machine_key()]["toy_op/float32"]
    assert entry["choice"] == "b" and entry["ms"] == {"a": pytest.approx(5.0), "b": pytest.approx(1.0)}

    timed.clear()
    again = make_op("a", "b")  # a new process: nothing in memory
    assert again.choose(torch.float32).name == "b" and timed == []
    # Another dtype is another choice; another CPU (or torch, or thread count) another entry.
    again.choose(torch.bfloat16)
    assert timed
    timed.clear()
    monkeypatch.setattr(selection, "cpu_model", lambda: "Some Other CPU")
    assert make_op("a", "b").choose(torch.float32).name == "b" and timed


def test_choice_is_made_once_per_dtype_and_logged_once(monkeypatch, caplog):
    op = make_op("a", "b")
    timed = fake_timer(monkeypatch, {"a": 1.0, "b": 2.0})
    x = torch.ones(3)
    with caplog.at_level(logging.INFO, logger="mematte_kernels"):
        for _ in range(3):
            torch.testing.assert_close(op(x), x)
    assert caplog.text.count("cpu toy_op[float32] -> a") == 1
    assert len(timed) == 2 * selection.RUNS  # measured once, not per call


def test_a_much_slower_candidate_is_timed_once(monkeypatch):
    op = make_op("fast", "slow")
    timed = fake_timer(monkeypatch, {"fast": 1.0, "slow": 1.0 + 10 * selection.CUTOFF})
    assert op.choose(torch.float32).name == "fast"
    assert timed.count("fast") == selection.RUNS and timed.count("slow") == 1


def test_only_runnable_candidates_are_measured(monkeypatch, caplog):
    op = make_op("own", "sdpa", runs={"own": lambda dtype: dtype == torch.bfloat16})
    timed = fake_timer(monkeypatch, {"own": 1.0, "sdpa": 2.0})
    with caplog.at_level(logging.INFO, logger="mematte_kernels"):
        assert op.choose(torch.float32).name == "sdpa"
    assert timed == [] and "the only one that runs here" in caplog.text
    assert op.choose(torch.bfloat16).name == "own"


def test_forced_choice_wins_without_measuring(monkeypatch, caplog):
    monkeypatch.setenv(selection.FORCE_ENV, "toy_op=a, other_op=x")
    op = make_op("a", "b")
    timed = fake_timer(monkeypatch, {"a": 9.0, "b": 1.0})
    with caplog.at_level(logging.INFO, logger="mematte_kernels"):
        assert op.choose(torch.float32).name == "a"
    assert timed == [] and f"forced by {selection.FORCE_ENV}" in caplog.text


def test_forced_choice_that_cannot_run_a_dtype_leaves_it_to_measurement(monkeypatch):
    monkeypatch.setenv(selection.FORCE_ENV, "toy_op=own")
    op = make_op("own", "sdpa", runs={"own": lambda dtype: dtype == torch.bfloat16})
    fake_timer(monkeypatch, {"own": 1.0, "sdpa": 2.0})
    assert op.choose(torch.bfloat16).name == "own"
    assert op.choose(torch.float32).name == "sdpa"


@pytest.mark.parametrize("value, message", [
    pytest.param("no_such_op=sdpa", "no CPU op 'no_such_op'", id="unknown-op"),
    pytest.param("varlen_attention=magic", "varlen_attention has no candidate 'magic'", id="unknown-candidate"),
    pytest.param("varlen_attention", "expected op=candidate", id="no-equals"),
])  # fmt: skip
def test_bad_forcing_is_refused_when_the_backend_is_resolved(value, message, monkeypatch):
    monkeypatch.setenv(selection.FORCE_ENV, value)
    monkeypatch.delenv("MEMATTE_BACKEND", raising=False)
    with pytest.raises(ValueError, match=message):
        dispatch.resolve("cpu", "cpu")


def test_unreadable_cache_is_measured_again_and_rewritten(monkeypatch, cache_dir, caplog):
    cache_dir.mkdir()
    (cache_dir / selection.CACHE_FILE).write_text("{not json")
    op = make_op("a", "b")
    timed = fake_timer(monkeypatch, {"a": 1.0, "b": 2.0})
    with caplog.at_level(logging.WARNING, logger="mematte_kernels"):
        assert op.choose(torch.float32).name == "a"
    assert timed and "ignoring unreadable CPU kernel choices" in caplog.text
    assert (
        json.loads((cache_dir / selection.CACHE_FILE).read_text())[selection.machine_key()]["toy_op/float32"]["choice"]
        == "a"
    )


def test_cached_choice_no_longer_offered_is_measured_again(monkeypatch, cache_dir):
    selection.write_cache("toy_op/float32", {"choice": "retired", "ms": {"retired": 0.1}})
    op = make_op("a", "b")
    timed = fake_timer(monkeypatch, {"a": 3.0, "b": 2.0})
    assert op.choose(torch.float32).name == "b" and timed


def test_cache_without_a_newly_runnable_candidate_is_measured_again(monkeypatch, cache_dir):
    """A rebuilt extension brings a kernel the cached measurement never saw: it gets timed."""
    selection.write_cache("toy_op/float32", {"choice": "a", "ms": {"a": 3.0, "b": 2.0}})
    op = make_op("a", "b", "new")
    timed = fake_timer(monkeypatch, {"a": 3.0, "b": 2.0, "new": 0.5})
    assert op.choose(torch.float32).name == "new" and "new" in timed


def test_cache_entry_naming_no_candidate_is_measured_again(monkeypatch, cache_dir):
    """An entry whose timings match but whose choice is missing or foreign (edited by hand)."""
    for entry in ({"ms": {"a": 3.0, "b": 2.0}}, {"choice": "c", "ms": {"a": 3.0, "b": 2.0}}):
        selection.write_cache("toy_op/float32", entry)
        timed = fake_timer(monkeypatch, {"a": 3.0, "b": 2.0})
        assert make_op("a", "b").choose(torch.float32).name == "b" and timed


def test_unwritable_cache_costs_only_a_warning(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MEMATTE_CACHE_DIR", str(blocker / "cache"))  # a directory under a file
    op = make_op("a", "b")
    fake_timer(monkeypatch, {"a": 1.0, "b": 2.0})
    with caplog.at_level(logging.WARNING, logger="mematte_kernels"):
        assert op.choose(torch.float32).name == "a"
    assert "could not keep CPU kernel choices" in caplog.text


def test_no_runnable_candidate_is_an_error_naming_the_op():
    op = make_op("own", runs={"own": lambda dtype: False})
    with pytest.raises(ValueError, match="toy_op: no implementation runs float16"):
        op.choose(torch.float16)


def test_cpu_table_holds_the_selected_ops_and_training_their_differentiable_ones(monkeypatch):
    monkeypatch.delenv("MEMATTE_BACKEND", raising=False)
    choices = cpu_choices.selected()
    table = dispatch.resolve("cpu", "cpu")
    for field, op in choices.items():
        assert getattr(table, field) is op
    assert {"own", "sdpa"} <= {c.name for c in choices["varlen_attention"].candidates}
    training = dispatch.resolve("cpu", "cpu", training=True)
    for field, op in choices.items():
        expected = op.trainable or getattr(dispatch.REFERENCE, field)
        assert getattr(training, field) is expected and dispatch.has_backward(expected, "cpu")
