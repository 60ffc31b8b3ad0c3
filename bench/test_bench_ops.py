"""The routed-path ops, fast path against reference, one image at MEMatte-S/B token counts:
router scoring (all tokens; fp32 only, as the model runs its routers whatever its dtype),
gather + LayerNorm and scatter + residual (the routed rows), and varlen attention among the
routed tokens, with 10/25/50 % of the tokens routed.

The fast path is whatever ``dispatch.resolve("auto", device)`` gives; every fast case is
first checked against the reference output of the same inputs.
"""

import dataclasses

import pytest
import torch

import harness


def pytest_generate_tests(metafunc):
    if "op_case" in metafunc.fixturenames:
        cases = harness.op_cases(metafunc.config.stash[harness.SETTINGS])
        metafunc.parametrize("op_case", cases, ids=[c.id for c in cases])


def test_op(op_case, settings, data, record, request):
    case, device = op_case, settings.device
    fn, backend = harness.op_function(case, device)
    if fn is None:
        pytest.skip(backend)
    too_big = harness.fits(harness.op_peak_bytes(case), device)
    if too_big:
        pytest.skip(too_big)

    with harness.skip_on_oom():
        inputs = harness.op_inputs(case, data.weights(case.variant), device)
        call = lambda: fn(*inputs["args"])  # noqa: E731
        returned, first_s = harness.run_once(call, device)
    output = harness.op_output(inputs, returned)
    error = None
    if case.impl == "reference":
        # Kept for the fast case of this group, which comes next, when there is one.
        if harness.op_function(dataclasses.replace(case, impl="fast"), device)[0] is not None:
            data.reference_outputs[case.group] = output
    else:
        expected = data.reference_outputs.pop(case.group, None)
        if expected is None:
            ref = dataclasses.replace(case, impl="reference")
            ref_inputs = harness.op_inputs(ref, data.weights(case.variant), device)
            ref_fn = harness.op_function(ref, device)[0]
            expected = harness.op_output(ref_inputs, ref_fn(*ref_inputs["args"]))
        error = harness.relative_error(output, expected)
        assert error <= harness.OP_RTOL[case.dtype], f"{case.id}: relative error {error:.2e} vs reference"
        if case.op == "router":  # keep must be the strict margin test on the fast scores
            scores, keep = returned
            assert torch.equal(keep, scores[..., 0] > scores[..., 1])

    op = harness.OPS[case.op]
    dtype = harness.DTYPE_NAMES[case.dtype]
    with harness.skip_on_oom():
        timing = harness.measure(
            request, settings, call, first_s, target_s=0.5, rounds=(2, 100),
            group=case.group, extra={"impl": case.impl, "dtype": dtype},
        )  # fmt: skip
    record(
        kind="op",
        group=case.group,
        case=case.id,
        impl=case.impl,
        backend=backend,
        op=case.op,
        variant=case.variant,
        size=case.size.id,
        tokens=case.size.tokens,
        routed_tokens=case.routed,
        dtype=dtype,
        time_s=timing.median_s,
        min_s=timing.min_s,
        mean_s=timing.mean_s,
        rounds=timing.rounds,
        timer=timing.timer,
        flops=op.flops(case) if op.flops else None,
        bytes=op.bytes(case) if op.bytes else None,
        rel_error=error,
    )
