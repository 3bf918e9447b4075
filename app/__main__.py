"""``python -m app`` / ``hra-studio``: parse the command line, build the Studio, serve the page."""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
from pathlib import Path
from typing import Any

from hra_diffusion.cli import HelpFormatter


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="hra-studio", description="HRA Studio: train and use HRA adapters.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: the whole network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--data-dir", type=Path, default=Path("hra_data"), help="jobs, adapters, models, uploads")
    parser.add_argument(
        "--base-model",
        help="a Stable Diffusion 1.x/2.x, SDXL, SD3/3.5 or FLUX.1 hub id or local diffusers folder; default: the demo "
        "world (a small model trained on toy pictures, in assets/)",
    )
    parser.add_argument(
        "--auth",
        metavar="USER:PASSWORD",
        default=os.environ.get("HRA_STUDIO_AUTH"),
        help="require this login (default: $HRA_STUDIO_AUTH); needed whenever the page is reachable by others",
    )
    args = parser.parse_args(argv)
    if importlib.util.find_spec("gradio") is None:  # the console script comes with the library alone too
        parser.exit(1, 'hra-studio: the app needs gradio: pip install "hra-studio[app]"\n')
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not (user and sep and password):
            parser.error("--auth takes USER:PASSWORD")
        auth = (user, password)
    elif args.share or args.host not in ("127.0.0.1", "localhost", "::1"):
        where = "a public share link" if args.share else args.host
        print(f"WARNING: the page is reachable beyond this computer ({where}) and has no login: anyone who reaches "
              "it can train, read and delete adapters. Add --auth USER:PASSWORD.", file=sys.stderr)
    data_dir = args.data_dir.absolute()
    # Before gradio is imported: no analytics calls, and uploads and served copies stay inside the data folder.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(data_dir / "gradio")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(data_dir / "gradio" / "examples")

    from .host import MAX_ADAPTER_BYTES
    from .lock import DataDirBusyError
    from .studio import Studio
    from .ui import build

    try:
        studio = Studio(data_dir, args.base_model)
    except DataDirBusyError as err:
        parser.exit(2, f"hra-studio: {err}\n")
    # `kill` gets the same clean exit as Ctrl-C: a running trainer saves a checkpoint, its job becomes resumable.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        build(studio).queue().launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            auth=auth,
            allowed_paths=[str(data_dir), *([str(studio.world.subjects)] if studio.world else [])],
            max_file_size=MAX_ADAPTER_BYTES,  # gradio's one limit, for every upload; photos: app.photos' limits
            ssr_mode=False,
            show_error=True,
            run_history=False,
            footer_links=["api"],
        )
    finally:
        studio.close()


if __name__ == "__main__":
    main()
