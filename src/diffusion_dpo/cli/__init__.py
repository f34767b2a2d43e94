"""The command line, thin: parse (`app`: the parser and the training-side commands; `eval_commands`: generate, score,
compare, relabel), call the library, print one line on a user error. `diffusion-dpo` and `python -m diffusion_dpo`
run `main`."""

from diffusion_dpo.cli.app import build_parser, cli_reference, main

__all__ = ["build_parser", "cli_reference", "main"]
