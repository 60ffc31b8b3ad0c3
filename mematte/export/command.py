"""``mematte export CKPT OUT``: everything that can be refused (format, options, output
location, the checkpoint itself) is, with exit status 2, before the export starts; the
file is written atomically."""

from __future__ import annotations

import argparse
import sys

from ..cli import EXIT_FAILED, EXIT_OK, EXPORT_FORMATS, UsageError


def export_format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    try:
        return EXPORT_FORMATS[args.output.suffix.lower()]
    except KeyError:
        raise UsageError(
            f"OUT {args.output}: cannot tell the format from the suffix "
            f"{args.output.suffix or '(none)'!r}; name it .onnx or .pt2, or pass --format"
        ) from None


def run_export(args: argparse.Namespace) -> int:
    fmt = export_format(args)
    if fmt == "torch" and (args.dtype != "float32" or args.opset is not None):
        raise UsageError("--dtype and --opset are ONNX options; the torch format exports the fp32 fast path")
    if fmt == "onnx":
        try:
            import onnx
        except ImportError:
            raise UsageError("the onnx format needs the onnx package: pip install 'mematte-kernels[export]'") from None

        from .onnx_graph import MIN_OPSET

        newest = onnx.defs.onnx_opset_version()
        if args.opset is not None and not MIN_OPSET <= args.opset <= newest:
            raise UsageError(f"--opset {args.opset}: must be from {MIN_OPSET} to {newest} (the installed onnx)")
    if not args.checkpoint.exists():
        raise UsageError(f"CKPT {args.checkpoint}: no such file")
    from ..commands import _check_output_file

    _check_output_file(args.output, "OUT")
    import torch

    from ..vitmatte import load_matting_model

    try:
        model = load_matting_model(args.checkpoint, max_tokens=args.max_tokens, backend="reference")
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UsageError(f"CKPT {args.checkpoint}: cannot load it: {e}") from None
    print(f"mematte export: {type(model).__name__}({model.variant}) -> {args.output} ({fmt})", file=sys.stderr)
    try:
        if fmt == "onnx":
            from . import export_onnx

            export_onnx(
                model, args.output, dtype=getattr(torch, args.dtype), opset=args.opset, max_tokens=args.max_tokens
            )
        else:
            from .torch_program import export_program

            export_program(model, args.output, max_tokens=args.max_tokens)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"mematte export: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"mematte export: wrote {args.output}", file=sys.stderr)
    return EXIT_OK
