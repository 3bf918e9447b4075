"""``python -m app`` / ``hra-studio``: parse the command line, build the Studio, serve the page."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hra-studio", description="HRA Studio: train and use HRA adapters.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: the whole network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--data-dir", type=Path, default=Path("hra_data"), help="jobs, adapters, models, uploads")
    parser.add_argument(
        "--base-model",
        help="a Stable Diffusion 1.x/2.x hub id or local diffusers folder; default: a tiny demo model (draws noise)",
    )
    args = parser.parse_args(argv)
    data_dir = args.data_dir.absolute()
    # Before gradio is imported: no analytics calls, and uploads and served copies stay inside the data folder.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(data_dir / "gradio")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(data_dir / "gradio" / "examples")

    from .studio import MAX_ADAPTER_BYTES, Studio
    from .ui import build

    studio = Studio(data_dir, args.base_model)
    # `kill` gets the same clean exit as Ctrl-C: a running trainer saves a checkpoint, its job becomes resumable.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        build(studio).queue().launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            allowed_paths=[str(data_dir)],
            max_file_size=MAX_ADAPTER_BYTES,
            ssr_mode=False,
            show_error=True,
            run_history=False,
            footer_links=["api"],
        )
    finally:
        studio.close()


if __name__ == "__main__":
    main()
