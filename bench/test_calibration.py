"""Router calibration makes routing realistic without trained weights: after it, each
router sends the requested share of the tokens (±2 points) to global attention, on every
backend that runs the model here."""

import pytest

from mematte import FastMEMatte
from mematte_kernels import dispatch

import harness

SIZE = harness.Size(320, 256)  # 320 tokens; smoke-sized


@pytest.fixture(params=["reference", "auto"])
def model(request, settings, data):
    backend = request.param
    try:
        table = dispatch.resolve(backend, settings.device)
    except Exception as e:  # a backend still being wired raises at resolve
        pytest.skip(f"backend {backend!r} unavailable on {settings.device.type}: {e}")
    if backend == "auto" and table.name == "reference":
        pytest.skip(f"'auto' resolves to the reference tables on {settings.device.type}")
    model = FastMEMatte("vit_s", backend=backend).to(settings.device)
    model.load_state_dict(data.weights("vit_s"))
    return model


def routed(model, image, trimap) -> list[float]:
    return harness.routed_ratios(harness.route(model, image, trimap))


@pytest.mark.parametrize("fraction", [0.10, 0.25, 0.50])
def test_calibrated_fraction_on_every_router(model, data, fraction):
    image, trimap = data.inputs(SIZE)
    harness.calibrate_routers(model, image, trimap, fraction)
    ratios = routed(model, image, trimap)
    assert all(abs(r - fraction) <= 0.02 for r in ratios), f"asked {fraction:.0%}, routed {ratios}"


def test_route_all_sends_every_token(model, data):
    harness.route_all(model)
    assert routed(model, *data.inputs(SIZE)) == [1.0] * 4
