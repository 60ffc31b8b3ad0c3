"""Reading official MEMatte checkpoints: detectron2 files (``{"model": state_dict}``), bare
state dicts, and ``.safetensors``. Nothing is ever downloaded.

Also accepted, as training code commonly saves them: ``{"state_dict": ...}`` wrappers and
the ``module.`` prefix of ``DataParallel`` / ``DistributedDataParallel`` models. Every
tensor is checked once for NaN and infinity: a checkpoint holding one is refused, naming
it, because it would give a wrong matte without any error.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping

import torch

from .backbone import GLOBAL_BLOCKS, VARIANTS

IGNORED_PREFIXES = ("teacher_backbone.",)  # the distillation teacher of training checkpoints
WRAPPERS = ("model", "state_dict")  # detectron2's and most training loops' checkpoint dicts
DATA_PARALLEL_PREFIX = "module."


def check_map_location(map_location: str | torch.device) -> torch.device:
    """``map_location`` as a device, refusing one that cannot work here."""
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"map_location {map_location!r} is not a device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"map_location {str(map_location)!r}: CUDA is not available here; load onto the CPU (map_location='cpu')"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"map_location {str(map_location)!r}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


def model_family(state_dict: Mapping[str, object]) -> str | None:
    """``"MEMatte"`` or ``"ViTMatte"`` when a state dict (upstream names) plainly holds one:
    routers or LTRM and no position tables in the global blocks, or the reverse (a
    training-time teacher aside); None for anything else, mixtures included."""
    mematte = any(k.startswith("backbone.routers.") or ".efficient_block." in k for k in state_dict)
    vitmatte = any(k.startswith(f"backbone.blocks.{i}.attn.rel_pos_") for i in GLOBAL_BLOCKS for k in state_dict)
    if mematte != vitmatte:
        return "MEMatte" if mematte else "ViTMatte"
    return None


def load_checkpoint_state_dict(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", keep_teacher: bool = False
) -> dict:
    """The state dict stored in ``path``, whatever of the accepted formats it is (the
    training teacher's ``teacher_backbone.*`` only with ``keep_teacher``)."""
    path = os.fspath(path)
    device = check_map_location(map_location)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist or is not a file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(path, device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path!r} is not a readable .safetensors checkpoint: {e}") from None
        return state_dict_of(obj, source=repr(path), keep_teacher=keep_teacher)
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a valid pickle of more than tensors
            raise ValueError(_unsafe_pickle_message(path, str(e))) from None
        raise ValueError(_not_a_checkpoint(path, e)) from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as e:
        raise ValueError(_not_a_checkpoint(path, e)) from None
    return state_dict_of(obj, source=repr(path), keep_teacher=keep_teacher)


def _not_a_checkpoint(path: str, error: BaseException) -> str:
    text = str(error).strip()
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\n", text)  # skip torch's advice around it
    if detail:
        reason = f"not a pickle of tensors ({detail.group(1).strip()})"
    elif os.path.getsize(path) == 0:
        reason = "the file is empty"
    else:
        reason = text.splitlines()[0] if text else type(error).__name__
    return f"{path!r} is not a PyTorch checkpoint (expected a detectron2 .pth, a state dict, or .safetensors): {reason}"


def _unsafe_pickle_message(path: str, torch_message: str) -> str:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", torch_message)
    what = f" (it stores a {found.group(1).rstrip('.,')} object)" if found else ""
    return (
        f"{path!r} holds Python objects besides tensors{what}, and loading those could run "
        "arbitrary code, so it is not loaded. Save just the weights from the environment "
        "that wrote it, e.g. torch.save(model.state_dict(), 'weights.pth'), or convert it to "
        ".safetensors."
    )


class CheckedStateDict(dict):
    """A state dict :func:`state_dict_of` has already unwrapped and checked, so that
    handing it on (loader to model class) does not read every weight again."""


def state_dict_of(obj: object, source: str = "checkpoint", keep_teacher: bool = False) -> dict:
    """The state dict inside a loaded checkpoint object.

    Unwraps ``{"model": ...}`` and ``{"state_dict": ...}``, strips a ``module.`` prefix
    that every key carries, drops ``teacher_backbone.*`` unless ``keep_teacher``, and refuses
    non-finite values.
    """
    if isinstance(obj, CheckedStateDict):
        return obj
    for _ in range(2):  # e.g. {"state_dict": {"model": ...}}
        if isinstance(obj, Mapping):
            inner = [obj[k] for k in WRAPPERS if isinstance(obj.get(k), Mapping)]
            if inner and not all(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner[0]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{source} does not hold a state dict (a mapping of parameter names to tensors, "
            f"or a checkpoint with one under 'model' or 'state_dict')"
        )
    keys = [str(k) for k in obj]
    if all(k.startswith(DATA_PARALLEL_PREFIX) for k in keys):
        obj = {k[len(DATA_PARALLEL_PREFIX) :]: v for k, v in obj.items()}
    ignored = () if keep_teacher else IGNORED_PREFIXES
    state_dict = CheckedStateDict((k, v) for k, v in obj.items() if not k.startswith(ignored))
    check_finite(state_dict, source)
    return state_dict


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Refuse NaN or infinite values, naming the first tensor that holds one.

    One pass over the weights, and one host sync whatever the device: the per-tensor
    flags are gathered and read at once.
    """
    names = [k for k, v in state_dict.items() if v.is_floating_point()]
    if not names:
        return
    by_device: dict[torch.device, list[str]] = {}
    for k in names:
        by_device.setdefault(state_dict[k].device, []).append(k)
    bad = []
    for keys in by_device.values():
        flags = torch.stack([torch.isfinite(state_dict[k]).all() for k in keys]).tolist()
        bad += [k for k, ok in zip(keys, flags) if not ok]
    if bad:
        first = min(bad, key=names.index)
        t = state_dict[first].detach()
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise ValueError(
            f"{source} holds non-finite weights: {first} has {nan} NaN and {inf} infinite "
            f"values of {t.numel()}"
            + (f" ({len(bad)} tensors in all)" if len(bad) > 1 else "")
            + "; the file is damaged or was saved after training diverged"
        )


def infer_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"vit_s"`` or ``"vit_b"`` from the embedding width of ``backbone.pos_embed``."""
    pos = state_dict.get("backbone.pos_embed")
    if pos is None:
        raise ValueError(
            "cannot tell the variant: the state dict has no 'backbone.pos_embed' (not a MEMatte checkpoint?)"
        )
    for name, (dim, _) in VARIANTS.items():
        if pos.shape[-1] == dim:
            return name
    known = ", ".join(f"{n} ({d})" for n, (d, _) in VARIANTS.items())
    raise ValueError(f"backbone.pos_embed has width {pos.shape[-1]}; known variants: {known}")


def is_vitmatte(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict (in upstream names) is ViTMatte's rather than MEMatte's: position
    tables in a global block, and no router or LTRM. Anything else is taken for MEMatte."""
    mematte_only = any(k.startswith("backbone.routers.") or ".efficient_block." in k for k in state_dict)
    vitmatte_only = any(f"backbone.blocks.{i}.attn.rel_pos_" in k for i in GLOBAL_BLOCKS for k in state_dict)
    return vitmatte_only and not mematte_only
