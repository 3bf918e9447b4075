"""``python -m hra_diffusion.demo_world build OUT``: train the demo world from nothing (about 75 minutes on 2 CPU
cores; ``--quick`` checks the chain in a minute)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import HelpFormatter
from ..synthetic import write_control_dataset
from .build import CONTROL_SEED, BuildConfig, build, control_samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hra_diffusion.demo_world",
                                     formatter_class=HelpFormatter,
                                     description="Build the demo world: its pipeline, scorers, subjects and "
                                     "control adapter.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train everything from nothing into OUT (continues an interrupted build)",
                       formatter_class=HelpFormatter)
    b.add_argument("out", type=Path)
    b.add_argument("--quick", action="store_true", help="a few steps per stage: checks the chain, draws nothing")
    c = sub.add_parser("control-data", help="world pictures with captions for the control trainer (--control_type "
                       "canny computes their edge maps)", formatter_class=HelpFormatter)
    c.add_argument("out", type=Path)
    c.add_argument("--n", type=int, default=2000, help="number of pictures")
    c.add_argument("--seed", type=int, default=CONTROL_SEED, help="world seed (the base model was trained on seed 0)")
    args = parser.parse_args(argv)
    if args.command == "build":
        print(build(args.out, BuildConfig.quick() if args.quick else BuildConfig()))
    else:
        try:
            print(write_control_dataset(args.out, control_samples(args.n, args.seed)))
        except FileExistsError as err:
            parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
