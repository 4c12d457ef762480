"""The ``fastcal`` command (also ``python -m fastcal``): ``fastcal demo``, ``fastcal study``,
``fastcal export``."""
import argparse
import sys

from . import export
from .apps import demo, study
from .apps.demo.report import FiguresUnavailable


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fastcal", description="Label calibration for semantic segmentation "
                                                               "under domain shift.")
    commands = top.add_subparsers(dest="command", required=True, metavar="command")
    for name, module, summary in (
            ("demo", demo, "train a small model on synthetic source scenes, calibrate it on a shifted "
                           "target, score both (about 2.5 minutes on 2 CPU cores, most of it training)"),
            ("study", study, "the paper's open questions (confidence weighting, how many images, a "
                             "drifting stream, failure modes, the temperature, label-free signals) with plots (about "
                             "two minutes on 2 CPU cores)"),
            ("export", export, "a saved calibrator as an ONNX head (softmax, a matrix product, argmax) to "
                               "append to a deployed model's graph")):
        sub = commands.add_parser(name, help=summary, description=summary)
        module.add_arguments(sub)
        sub.set_defaults(run=module.main)
    return top


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except FiguresUnavailable as error:
        print(f"fastcal {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
