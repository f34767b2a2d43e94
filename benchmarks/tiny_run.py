"""What the one-process loop benchmarks share: the tiny model and data they run on, and the config built from it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

TINY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def tiny_run_parser(description: str) -> argparse.ArgumentParser:
    """--model, --data, --resolution, --max-sequence-length; a script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--max-sequence-length", type=int, default=None)
    return parser


def tiny_run_config(args: argparse.Namespace, **overrides: str) -> Any:
    """configs/tiny.yaml on the given model and data, the batch made in this process (`data.num_workers 0`)."""
    from diffusion_dpo.config import load_config

    values = {"model.pretrained": args.model, "data.path": args.data, "data.resolution": str(args.resolution),
              "data.num_workers": "0", **overrides}
    if args.max_sequence_length:
        values["model.max_sequence_length"] = str(args.max_sequence_length)
    return load_config(TINY_CONFIG, values)
