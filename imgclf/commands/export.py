"""imgclf export"""

from __future__ import annotations

import argparse
import sys

NAME = "export"
HELP = "export a bundle to ONNX, TorchScript, Core ML or TFLite (preprocessing inside)"
DESCRIPTION = (
    "Export a trained bundle for deployment. Every format takes the image already resized to "
    "the model's size as uint8 pixels (ONNX/TorchScript/TFLite: NHWC; Core ML: an image) and "
    "returns class probabilities (a multi-label bundle: one sigmoid per label, with the per-label "
    "thresholds in the metadata): scaling, mean/std and channel order are inside the model, and "
    "class names, input size, preprocessing and the bundle's sha256 are in its metadata. After "
    "exporting, the file is run on the check images (32 seeded random images, or --check) and "
    "compared with the bundle in PyTorch; the exit code is 1 if top-1 (multi-label: the predicted "
    "label set) differs on any image or a "
    "probability differs by more than 1e-4. Core ML is converted and inspected here but can only "
    "predict on Apple platforms. Formats: onnx (also writes <name>.optimized.onnx, the graph "
    "after onnxruntime's optimiser; `imgclf predict model.onnx IMG` runs it directly), "
    "torchscript (.pt), coreml (.mlpackage, needs `pip install 'imgclf[coreml]'`), tflite "
    "(needs `pip install 'imgclf[tflite]'`)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from imgclf.exporters.formats import FORMATS

    p.add_argument("bundle", help="bundle folder (a run's model/ folder, or the run folder)")
    p.add_argument("--format", "-f", choices=FORMATS, default="onnx", help="what to export to")
    p.add_argument(
        "--out",
        "-o",
        default=None,
        help="output file (or folder) [default: ./model.onnx, model.pt, model.mlpackage or model.tflite]",
    )
    p.add_argument(
        "--check",
        nargs="+",
        metavar="IMAGES",
        default=None,
        help="real images (files, folders, globs; first 200 used) for the parity check",
    )
    p.add_argument(
        "--no-optimized", action="store_true", help="ONNX: skip writing the onnxruntime-optimised graph"
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="ONNX: also write <name>.int8.onnx, statically quantized (SmallerVGGNet on an AVX512-VNNI "
        "CPU: 1.5-1.7x faster single-image latency, 1.2-1.3x batch throughput) and report its "
        "accuracy against float32 on held-out images",
    )
    p.add_argument(
        "--calibration",
        nargs="+",
        metavar="IMAGES",
        default=None,
        help="--int8: images to calibrate on (files, folders, globs; first 256 used) [default: the "
        "training run's own training images]",
    )


def run(args: argparse.Namespace) -> int:
    from imgclf.exporters.formats import export, images_for_check
    from imgclf.runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle, backend="torch")
    images = images_for_check(bundle, args.check) if args.check else None
    print(f"exporting {bundle.path} to {args.format} ...", file=sys.stderr, flush=True)
    cal = images_for_check(bundle, args.calibration, limit=256) if args.calibration else None
    res = export(
        bundle,
        args.format,
        args.out,
        check_images=images,
        optimized=not args.no_optimized,
        int8=args.int8,
        calibration=cal,
    )
    print(f"wrote {res.path}")
    for extra in res.extra:
        print(f"wrote {extra}")
    if res.note:
        print(f"note: {res.note}")
    if res.parity is None:
        print("parity: not checked (this format cannot run on this machine)")
        return 0
    src = "check images" if args.check else "random images"
    print(f"parity vs PyTorch on {res.parity.n} {src}: {res.parity}")
    if not res.parity.ok:
        print("imgclf export: error: the exported model does not match the bundle", file=sys.stderr)
        return 1
    if res.int8 is not None:
        print(f"int8: {res.int8}")
        drop = res.int8.drop()
        if drop is not None and drop > 0.01:
            what = "mAP" if res.int8.multi_label else "accuracy"
            print(
                f"imgclf export: error: int8 loses more than 1 point of {what}; deploy the float32 "
                f"{res.path.name} (or calibrate on more typical images with --calibration)",
                file=sys.stderr,
            )
            return 1
    return 0
