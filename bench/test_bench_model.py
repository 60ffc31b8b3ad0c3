"""The whole model, image + trimap -> alpha, one image: the fast path (backend "auto") in
each precision against the published computation (reference backend, fp32), and a
ViTMatte-style configuration of the same model (every token global, no token cap).

Routers are calibrated to send 25 % of the tokens to global attention, the same weights
for every configuration of a size. Latency, megapixels per second, peak memory (CUDA max
allocated on GPU; on CPU the peak RSS of a fresh process that loads the model and runs one
forward) and the share each router routed. Fast cases timed in process (all on GPU, below
2048² on CPU) are first checked against the fp32 reference's alpha.

With ``--bench-baseline REV``, each fast case is followed by ``fast@<commit>``: the same
case run by that commit's own worker (its code, built in a cache), on the CPU, one run in
a fresh process at every size.
"""

import pytest
import torch

import harness
from worker import load_model


def pytest_generate_tests(metafunc):
    if "model_case" in metafunc.fixturenames:
        cases = harness.model_cases(metafunc.config.stash[harness.SETTINGS])
        metafunc.parametrize("model_case", cases, ids=[c.id for c in cases])


def test_model(model_case, settings, data, record, request):
    case, device = model_case, settings.device
    reason = harness.model_unavailable(case, device)
    if reason:
        pytest.skip(reason)
    weights = data.weights_path(case.variant, case.size, case.fraction)
    common = dict(
        kind="model",
        group=case.group,
        case=case.id,
        impl=case.impl,
        variant=case.variant,
        size=case.size.id,
        tokens=case.size.tokens,
        dtype=harness.DTYPE_NAMES[case.dtype],
        max_tokens=case.max_tokens,
        requested_fraction=case.fraction,
        megapixels=case.size.pixels / 1e6,
    )

    if case.baseline:
        # An older commit's code runs only through its own worker, whatever the size; where
        # the fast row is timed in process, it is compared with the fast case's worker run.
        result = _worker(case, weights, data, request.getfixturevalue("baseline_tree"))
        timer = "one run in a fresh process"
        if settings.in_process(case.size):
            timer += " (fast row: in process; compared with its fresh-process run)"
        record(**common, **_fresh_process(result, timer), baseline_rev=settings.baseline)
        return

    if not settings.in_process(case.size):
        # One run in a fresh process gives the latency, the peak RSS and the alpha.
        alpha_path = data.directory / f"alpha-{case.id}.pt"
        result = _worker(case, weights, data, alpha_path=alpha_path)
        outputs = torch.load(alpha_path)
        alpha_path.unlink()
        accuracy = _against_reference(case, data, outputs["alpha"], outputs["decisions"])
        record(**common, **_fresh_process(result, "one run in a fresh process"), **accuracy)
        return

    model = load_model(weights, device, case.dtype, case.backend, case.max_tokens)
    image, trimap = data.inputs(case.size)
    forward = torch.inference_mode()(lambda: model({"image": image, "trimap": trimap}))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with harness.skip_on_oom():
        (outputs, _, decisions), first_s = harness.run_once(forward, device)
    alpha = outputs["phas"].float().cpu()
    if case.impl == "fast":
        _run_reference(case, data, device)
    accuracy = _against_reference(case, data, alpha, [d.cpu() for d in decisions])

    with harness.skip_on_oom():
        timing = harness.measure(
            request, settings, forward, first_s, target_s=6.0, rounds=(2, 5),
            group=case.group, extra={"impl": case.impl, "dtype": common["dtype"]},
        )  # fmt: skip
    if device.type == "cuda":
        memory = {"peak_mem_bytes": torch.cuda.max_memory_allocated(device), "mem_kind": "CUDA max allocated"}
    else:
        result = _worker(case, weights, data)
        memory = {
            "peak_mem_bytes": result["peak_rss_bytes"],
            "loaded_rss_bytes": result["loaded_rss_bytes"],
            "mem_kind": "peak RSS of a fresh process",
            "fresh_process_time_s": result["latency_s"],
        }
    record(
        **common,
        backend=model.backend if case.impl == "reference" else harness.fast_table(device).name,
        time_s=timing.median_s,
        min_s=timing.min_s,
        mean_s=timing.mean_s,
        rounds=timing.rounds,
        timer=timing.timer,
        **memory,
        routed=harness.routed_ratios(decisions),
        **accuracy,
    )


def _against_reference(case, data, alpha: torch.Tensor, decisions: list) -> dict:
    """A reference case's alpha and decisions kept for the fast cases of its size; a fast
    case's mean |alpha - reference fp32| (checked) and share of routing decisions equal to
    the reference's, where the reference ran in this session."""
    key = (case.variant, case.size)
    if case.impl == "reference":
        data.reference_alpha[key], data.reference_decisions[key] = alpha, decisions
        return {}
    if case.impl != "fast" or key not in data.reference_alpha:
        return {}
    error = float((alpha - data.reference_alpha[key]).abs().mean())
    tolerance = harness.ALPHA_ATOL[case.dtype]
    assert error <= tolerance, f"{case.id}: mean |alpha - reference fp32| = {error:.2e} > {tolerance:.0e}"
    expected = data.reference_decisions.get(key)
    agreement = None
    if expected:
        agreement = sum(float((a == b).float().sum()) for a, b in zip(decisions, expected)) / sum(
            d.numel() for d in expected
        )
    return {"alpha_mean_abs_error": error, "decisions_agreement": agreement}


def _worker(case, weights, data, tree=harness.ROOT, alpha_path=None) -> dict:
    try:
        return harness.run_worker(case, weights, data.inputs_path(case.size), tree=tree, alpha_path=alpha_path)
    except MemoryError as e:
        pytest.skip(str(e))


def _fresh_process(result: dict, timer: str) -> dict:
    """The record fields of one worker run: its latency and peak RSS."""
    return dict(
        backend=result["backend"],
        time_s=result["latency_s"],
        rounds=1,
        timer=timer,
        peak_mem_bytes=result["peak_rss_bytes"],
        loaded_rss_bytes=result["loaded_rss_bytes"],
        mem_kind="peak RSS of a fresh process",
        routed=result["routed"],
    )


def _run_reference(case, data, device) -> None:
    """Run the fp32 reference of this size in process where its case did not run (a -k
    selection) and it can run here, for :func:`_against_reference`."""
    key = (case.variant, case.size)
    if key not in data.reference_alpha:
        ref = harness.ModelCase(case.variant, case.size, torch.float32, "reference")
        if harness.model_unavailable(ref, device):
            return
        weights = data.weights_path(case.variant, case.size, ref.fraction)
        model = load_model(weights, device, ref.dtype, ref.backend, ref.max_tokens)
        image, trimap = data.inputs(case.size)
        with torch.inference_mode():
            outputs, _, decisions = model({"image": image, "trimap": trimap})
        _against_reference(ref, data, outputs["phas"].float().cpu(), [d.cpu() for d in decisions])
