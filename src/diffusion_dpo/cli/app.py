"""`diffusion-dpo <command>`: parse, call the library, print. User mistakes end in one line, exit 2.

Every config field is a `--section.key VALUE` flag generated from the config dataclasses, so the
help text lives once, beside the field.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from diffusion_dpo.console import quiet_libraries, quiet_progress_bars
from diffusion_dpo.errors import UserError

if TYPE_CHECKING:  # imported where used, like the rest of this module's dependencies
    from diffusion_dpo.config import Config

PROG = "diffusion-dpo"


def alternate_spelling(option: str) -> Optional[str]:
    """`--output-dir` <-> `--output_dir` (and `--train.max_steps` <-> `--train.max-steps`): the other spelling of a
    long option, None when it has none. Every option is accepted both ways; --help documents the first."""
    if not option.startswith("--"):
        return None
    body = option[2:]
    other = body.replace("_", "-") if "_" in body else body.replace("-", "_")
    return None if other == body else "--" + other


def _add_spelled(add: Any, names: tuple, kwargs: dict) -> argparse.Action:
    """`add(*names, **kwargs)` with each long option's alternate spelling added as a hidden alias."""
    aliases = [a for a in (alternate_spelling(n) for n in names if isinstance(n, str)) if a and a not in names]
    if aliases and "dest" not in kwargs:  # the dest argparse would derive from the documented spelling
        kwargs["dest"] = next(n for n in names if n.startswith("--"))[2:].replace("-", "_")
    action = add(*names, *aliases, **kwargs)
    action.spelling_aliases = tuple(aliases)
    return action


class _HelpFormatter(argparse.HelpFormatter):
    """--help shows each option once, as documented; its alternate spelling works but is not listed."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        aliases = getattr(action, "spelling_aliases", ())
        if not aliases:
            return super()._format_action_invocation(action)
        shown = copy.copy(action)
        shown.option_strings = [s for s in action.option_strings if s not in aliases]
        return super()._format_action_invocation(shown)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line (no usage dump), exit 2; refuses abbreviated options
    (`--lora.r` is not `--lora.rank`) and accepts `-` and `_` alike inside an option's name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names: Any, **kwargs: Any) -> argparse.Action:  # type: ignore[override]
        return _add_spelled(super().add_argument, names, kwargs)

    def add_argument_group(self, *args: Any, **kwargs: Any) -> argparse._ArgumentGroup:
        group = super().add_argument_group(*args, **kwargs)
        plain = group.add_argument
        group.add_argument = lambda *names, **kw: _add_spelled(plain, names, kw)  # type: ignore[method-assign]
        return group

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog[len(PROG):].strip()
        for action in self._actions:  # "required: --output-dir/--output_dir" names the documented spelling only
            aliases = getattr(action, "spelling_aliases", ())
            if aliases:
                documented = "/".join(o for o in action.option_strings if o not in aliases)
                message = message.replace("/".join(action.option_strings), documented)
        raise UserError(f"{command + ': ' if command else ''}{message}{self._suggestion(message)} (see --help)")

    def _suggestion(self, message: str) -> str:
        """For an unknown option: the option it abbreviates or resembles (abbreviations are refused, not guessed)."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        unknown = next((t.split("=", 1)[0] for t in message.split(":", 1)[1].split() if t.startswith("--")), None)
        if unknown is None:
            return ""
        known = [o for o, a in self._option_string_actions.items()
                 if o.startswith("--") and o not in getattr(a, "spelling_aliases", ())]
        longer = sorted(o for o in known if o.startswith(unknown))
        close = longer[:1] or difflib.get_close_matches(unknown, known, n=1)
        return f"; did you mean {close[0]}? (options are spelled out in full)" if close else ""


def _type_name(field: dataclasses.Field) -> str:
    """A metavar from the field's annotation: INT, FLOAT, STR, BOOL, LIST[STR], ..."""
    t = str(field.type)
    if t.startswith("Optional[") and t.endswith("]"):
        t = t[len("Optional["):-1]
    return t.upper()


def _add_config_flags(parser: argparse.ArgumentParser, iterate: bool = False) -> None:
    """A --section.key flag per config field; the iterate section only for `iterate` (it means nothing elsewhere)."""
    from diffusion_dpo.config import iter_fields

    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in iter_fields():
        section = name.split(".")[0] if "." in name else "run"
        if section == "iterate" and not iterate:
            continue
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} (config section '{section}')")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        is_bool = _type_name(f) == "BOOL"
        groups[section].add_argument(
            f"--{name}", dest=name, metavar=_type_name(f), default=argparse.SUPPRESS,
            nargs="?" if is_bool else None, const="true" if is_bool else None,
            help=f"{f.metadata.get('help', '')} [default: {default}]".replace("%", "%%"))


def cli_reference() -> str:
    """Every command with its own flags as Markdown (docs/cli.md embeds it; a test keeps them equal). The config
    flags (`--section.key`) of train, cache, bench and iterate are the config reference's, listed there once."""
    parser = build_parser()
    lines = []
    for name, command in parser.command_parsers.items():  # type: ignore[attr-defined]
        config_flags = any(a.dest.count(".") and a.dest.split(".")[0] in ("train", "model") for a in command._actions)
        lines += [f"### `{PROG} {name}`", "", (command.description or "").replace("\n", " ").strip(), ""]
        rows = []
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or (config_flags and "." in action.dest
                                                            and action.option_strings[0].count(".") == 1
                                                            and action.dest == action.option_strings[0][2:]):
                continue
            flags = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.metavar or action.dest}`"
            text = (action.help or "").replace("%%", "%").replace("|", "\\|").replace("\n", " ")
            rows.append(f"| {flags} | {text} |")
        if rows:
            lines += ["| flag | meaning |", "| --- | --- |", *rows, ""]
        if config_flags:
            lines += ["Plus every config key as `--section.key VALUE` ([config reference](config.md)).", ""]
    return "\n".join(lines).strip() + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Diffusion-DPO: align SD 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1, "
                                             "Z-Image, FLUX.2 [klein] and [dev] and Qwen-Image with preference pairs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    train = sub.add_parser(
        "train", help="fine-tune a model with Diffusion-DPO (or a relative: hinge, ipo, sft)",
        description="Train with Diffusion-DPO. Settings come from --config FILE (YAML) and are overridden by "
                    "--section.key VALUE flags; e.g. --data.batch_size 4 --lora.rank 8 --train.resume latest.")
    train.add_argument("--config", metavar="FILE", help="YAML config (see configs/)")
    _add_config_flags(train)

    iterate = sub.add_parser(
        "iterate", help="on-policy rounds: sample K per prompt, label with a reward, pair, train, evaluate; repeat",
        description="Align the model on its own samples, round after round: the policy generates K images per "
                    "training prompt, iterate.reward scores them, pairs are made by iterate.pairing, `train` continues "
                    "the policy against the previous round's (or the base's) reference, and `compare` measures the "
                    "round against the base and the round before on held-out prompts. Writes OUTPUT_DIR/round-<r>/ "
                    "and report.json, report.md, report.png; rerunning the same command resumes. Takes the same "
                    "--config FILE and --section.key VALUE flags as train, plus the iterate section.")
    iterate.add_argument("--config", metavar="FILE", help="YAML config (see configs/iterate_*.yaml)")
    _add_config_flags(iterate, iterate=True)

    bench = sub.add_parser(
        "bench", help="time the training step per mode (pairs/s, peak memory, step / compute floor)",
        description="For one config, train a few steps in each mode (each in its own process) and compare the step "
                    "time with the bare compute floor (the denoiser's forward+backward on the same 2B latents plus "
                    "the reference forward, timed between the steps), with peak memory and time inside the "
                    "VAE/text encoders. Config flags as for train.")
    bench.add_argument("--config", metavar="FILE", help="YAML config (see configs/)")
    bench.add_argument("--modes", nargs="+", default=None, metavar="MODE",
                       help="modes to run: live, live+cache, lora, lora+cache, precomputed (the default set), "
                            "mapo, mapo+cache (MaPO, reference-free)")
    bench.add_argument("--steps", type=int, default=10, help="timed optimizer steps per mode [default: 10]")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first, at least 1 [default: 3]")
    bench.add_argument("--floor-repeats", type=int, default=10, help="timed floor repetitions, spread over the timed steps [default: 10]")
    bench.add_argument("--lora-rank", type=int, default=8, help="LoRA rank for the lora mode [default: 8]")
    bench.add_argument("--peak-tflops", type=float, help="device peak for MFU [default: known GPUs' bf16 peak]")
    bench.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    bench.add_argument("--markdown", metavar="FILE", help="also write the table as markdown")
    _add_config_flags(bench)

    cache = sub.add_parser(
        "cache", help="pre-encode a data set (VAE posteriors, caption encodings) for fast training; optionally "
                      "precompute the reference model's errors",
        description="Encode every pair's images with the VAE and every caption with the text encoder(s) once, into "
                    "cache.dir; `train` with the same --cache.dir then never loads them. With --reference, also "
                    "compute the reference model's per-pair errors for exactly this training config (seed, steps, "
                    "batch, precision), so `train --cache.reference precomputed` loads no reference model. Under "
                    "`accelerate launch` every process encodes its share; a killed build resumes (on any number of "
                    "processes). Takes the same --config FILE and --section.key VALUE flags as train.")
    cache.add_argument("--config", metavar="FILE", help="YAML config (see configs/)")
    cache.add_argument("--reference", action="store_true",
                       help="also precompute the reference errors the training run with this config will need")
    cache.add_argument("--num-processes", type=int, default=1, metavar="N",
                       help="processes the training run will use (the reference errors cover data.batch_size x "
                            "accumulation x N pairs per step; not the processes that compute them) [default: 1]")
    _add_config_flags(cache)

    tiny = sub.add_parser(
        "make-tiny", help="build a tiny offline pipeline of every family and a tiny Pick-a-Pic-schema data set",
        description="Writes OUT/sd, OUT/sdxl, OUT/sd3 and OUT/flux (tiny random diffusers pipelines of each model "
                    "family, with locally made CLIP and T5 tokenizers) and OUT/pickapic (parquet shards in the "
                    "Pick-a-Pic v2 schema with a learnable preference). configs/tiny.yaml uses them.")
    tiny.add_argument("--output-dir", default="tiny", help="where to write them [default: tiny]")
    tiny.add_argument("--num-pairs", type=int, default=64, help="pairs in the data set [default: 64]")
    tiny.add_argument("--resolution", type=int, default=32, help="image resolution [default: 32]")
    tiny.add_argument("--seed", type=int, default=0, help="seed [default: 0]")
    tiny.add_argument("--sd15-width", type=int, metavar="W",
                      help="also write OUT/sd15: SD1.5's architecture with UNet width W (320 = the real size, random "
                           "weights), for `bench`; use with --resolution 256 or 512")
    tiny.add_argument("--shaped", choices=("sdxl", "sd35-medium", "flux-dev"),
                      help="also write OUT/<name>: that model's published transformer architecture (random weights), "
                           "its VAE, and text encoders of the real widths (one layer each), for `bench` and for "
                           "sizing the cache; use with --resolution 512 (SDXL: 1024)")
    tiny.add_argument("--depth", type=int, metavar="N", help="with --shaped: N transformer blocks (FLUX: N double- "
                                                             "and N single-stream; SDXL: N layers in its deepest "
                                                             "level) instead of the real count")
    demo = sub.add_parser(
        "demo", help="the whole method offline on a CPU: base model, preference data, training, a measured win",
        description="Build (or reuse from the cache) a small StableDiffusion3Pipeline trained by flow matching "
                    "(--family sd: a StableDiffusionPipeline with a UNet) on sklearn's handwritten "
                    "digits, sample preference pairs from it, label them by a hidden crowd and by an AI reward, "
                    "train Diffusion-DPO on each labelling and an SFT baseline, run on-policy rounds (iterate) from DPO-AI, and "
                    "evaluate all against the base on "
                    "held-out prompts and seeds with a judge fit on data nothing else saw, at the demo's sampling "
                    "settings and at the pipeline's default steps and guidance. Writes DIR/base, DIR/dpo, "
                    "DIR/dpo_ai, DIR/sft, DIR/dpo_online (pipeline directories), DIR/online (the rounds), DIR/eval_prompts.jsonl, "
                    "DIR/report.json, "
                    "DIR/report.md and PNGs. Minutes on 2 CPU cores (docs/demo.md gives measured times); the base is cached.")
    demo.add_argument("--output-dir", required=True, metavar="DIR", help="where everything is written (new, empty, "
                      "or an earlier demo's directory, which is started over)")
    demo.add_argument("--family", default="sd3", choices=("sd3", "sd"),
                      help="the base model: sd3 (SD3 architecture, Flow-DPO) or sd (UNet, Diffusion-DPO) "
                           "[default: sd3]")
    demo.add_argument("--size", default="full", choices=("full", "tiny"),
                      help="full: the documented run (docs/demo.md); tiny: a seconds-long run of the same code [default: full]")
    demo.add_argument("--cache-dir", metavar="DIR", help="where the base model is cached "
                      "[default: $XDG_CACHE_HOME/diffusion-dpo/demo or ~/.cache/diffusion-dpo/demo]")
    demo.add_argument("--rebuild", action="store_true", help="build the base model again even if it is cached")
    demo.add_argument("--losses", metavar="LIST", help="instead of the default demo: train each of these registry "
                      "losses (comma-separated, e.g. dpo,ipo,kto,mapo) on the same crowd pairs and report them side by "
                      "side against the base (win rate per image with intervals, mean gain, diversity, step time, "
                      "peak memory): DIR/losses.md, losses.json, loss_win_rates.png")
    push = sub.add_parser(
        "push", help="publish a run's final/ (pipeline or LoRA weights, with its model card) to the Hugging Face hub",
        description="Upload RUN_DIR/final to --repo-id in one commit (the repository is created if needed). Checks the "
                    "run, the repo id, that the hub is not switched off (HF_HUB_OFFLINE) and that a token is there "
                    "before any upload. A new repository is private unless --public.")
    push.add_argument("run", metavar="RUN_DIR", help="a training output_dir (or its final/)")
    push.add_argument("--repo-id", required=True, metavar="ID", help="hub repository, e.g. user/sdxl-dpo")
    push.add_argument("--public", action="store_true", help="create the repository as public [default: private; an "
                      "existing repository keeps its visibility]")
    push.add_argument("--token", help="Hugging Face token [default: the logged-in one, or HF_TOKEN]")
    from diffusion_dpo.cli.eval_commands import register as register_eval_commands

    register_eval_commands(sub, _Parser)  # generate, score, compare, relabel
    parser.command_parsers = dict(sub.choices)  # type: ignore[attr-defined]
    return parser


def _load_config(args: argparse.Namespace, iterate: bool = False) -> Config:
    """The config from --config FILE and the --section.key flags given."""
    from diffusion_dpo.config import iter_fields, load_config

    given = vars(args)
    return load_config(args.config, {name: given[name] for name, _ in iter_fields() if name in given},
                       iterate=iterate)


def _cmd_iterate(args: argparse.Namespace) -> int:
    quiet_progress_bars()
    cfg = _load_config(args, iterate=True)
    from diffusion_dpo.iterate import iterate

    report = iterate(cfg)
    if report:  # the main process
        h = report["heldout_reward"]
        for r in report["rounds"]:
            b, p = r["vs_base"][h], r["vs_previous"][h]
            print(f"round {r['round']}: vs base {b['image_win_rate']:.3f} [{b['image_ci_low']:.3f}, "
                  f"{b['image_ci_high']:.3f}], vs previous {p['image_win_rate']:.3f} ({h}, per image)")
        print(f"done: {Path(cfg.output_dir) / 'report.md'}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    quiet_progress_bars()
    cfg = _load_config(args)
    from diffusion_dpo.training.trainer import train

    final = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per process
        print(f"done: {final}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from diffusion_dpo.bench import DEFAULT_MODES, markdown, run_bench

    quiet_progress_bars()
    cfg = _load_config(args)
    if args.steps < 1 or args.warmup < 1 or args.floor_repeats < 1:  # the first step is never timed: it loads lazily
        raise UserError("bench: --steps, --warmup and --floor-repeats must be >= 1")
    rows = run_bench(cfg, args.modes or list(DEFAULT_MODES), lora_rank=args.lora_rank, steps=args.steps, warmup=args.warmup,
                     floor_repeats=args.floor_repeats, peak=args.peak_tflops,
                     progress=lambda s: print(s, file=sys.stderr, flush=True))
    table = markdown(rows)
    print(table, end="")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from diffusion_dpo.cache.build import build_cache
    from diffusion_dpo.processes import process_state

    quiet_progress_bars()
    cfg = _load_config(args)
    if not cfg.cache.dir:
        raise UserError("cache: --cache.dir is required (where to write the cache)")
    if args.num_processes < 1:
        raise UserError("cache: --num-processes must be >= 1")
    state = process_state(cfg.train.process_group_timeout_minutes)  # one process, or each of `accelerate launch`'s
    build_cache(cfg.model, cfg.data, cfg.cache, cfg.flow, state.device, state=state,
                mixed_precision=cfg.train.mixed_precision)
    if args.reference:
        from diffusion_dpo.cache.reference import precompute_reference

        path = precompute_reference(cfg.model, cfg.lora, cfg.flow, cfg.data, cfg.train, cfg.cache, state.device,
                                    num_processes=args.num_processes, state=state)
        if state.is_main_process:
            print(f"reference errors: {path}")
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from diffusion_dpo.models import FAMILIES
    from diffusion_dpo.testing.tiny import build_sd15_shaped_pipeline, build_shaped_pipeline, build_tiny_pipeline
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic

    quiet_progress_bars()
    out = Path(args.output_dir)
    written = [build_tiny_pipeline(out / family.name, kind=family.name, resolution=args.resolution, seed=args.seed)
               for family in FAMILIES]  # one per family, named as it is
    written.append(build_tiny_pickapic(out / "pickapic", num_pairs=args.num_pairs, resolution=args.resolution,
                                       seed=args.seed))
    if args.sd15_width is not None:
        try:
            written.append(build_sd15_shaped_pipeline(out / "sd15", width=args.sd15_width,
                                                      resolution=args.resolution, seed=args.seed))
        except ValueError as exc:
            raise UserError(f"make-tiny: {exc}") from None
    if args.shaped is not None:
        if args.depth is not None and args.depth < 1:
            raise UserError("make-tiny: --depth must be >= 1")
        written.append(build_shaped_pipeline(out / args.shaped, args.shaped, resolution=args.resolution,
                                             depth=args.depth, seed=args.seed))
    elif args.depth is not None:
        raise UserError("make-tiny: --depth needs --shaped")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from diffusion_dpo.push import push_run

    print(f"pushed: {push_run(args.run, args.repo_id, private=not args.public, token=args.token)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:  # the demo's digits and classifiers; not needed to train
        raise UserError("demo needs scikit-learn: pip install -e \".[demo]\" (or pip install scikit-learn)")
    from diffusion_dpo.demo.run import run_demo

    quiet_progress_bars()
    if args.losses is not None:
        return _demo_losses(args)
    report = run_demo(args.output_dir, size=args.size, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                      rebuild=args.rebuild, family=args.family)
    for setting, per_judge in report["win_rates_vs_base"].items():
        for model, r in per_judge["judge"].items():
            print(f"{setting} sampling: {model} vs base (held-out judge, {r['n_images']} images): win rate per image "
                  f"{r['image_win_rate']:.3f} [{r['image_ci_low']:.3f}, {r['image_ci_high']:.3f}]")
    print(f"done in {report['wall_time_s']['total']:.0f} s: {Path(args.output_dir) / 'report.md'}")
    return 0


def _demo_losses(args: argparse.Namespace) -> int:
    from diffusion_dpo.demo.losses import parse_losses, run_loss_demo

    losses = parse_losses(args.losses)
    report = run_loss_demo(args.output_dir, losses, size=args.size,
                           cache_dir=Path(args.cache_dir) if args.cache_dir else None, rebuild=args.rebuild,
                           family=args.family, log=lambda line: print(line, flush=True))
    for setting, per_judge in report["win_rates_vs_base"].items():
        for loss, r in per_judge["judge"].items():
            print(f"{setting} sampling: {loss} vs base (held-out judge, {r['n_images']} images): win rate per image "
                  f"{r['image_win_rate']:.3f} [{r['image_ci_low']:.3f}, {r['image_ci_high']:.3f}], mean diff "
                  f"{r['mean_diff']:+.3f}")
    print(f"done in {report['wall_time_s']['total']:.0f} s: {Path(args.output_dir) / 'losses.md'}")
    return 0


def _one_line(exc: UserError) -> str:
    """The error's message; a UserError re-raised by a DataLoader worker carries the worker's traceback,
    whose last line holds the original message."""
    text = str(exc).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split("UserError: ", 1)[-1]
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `diffusion-dpo` and `python -m diffusion_dpo`."""
    quiet_libraries()
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # reported by the command's own parser, which knows its options and can suggest one
            parser.command_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
        from diffusion_dpo.cli.eval_commands import COMMANDS as EVAL_COMMANDS

        return {"train": _cmd_train, "cache": _cmd_cache, "bench": _cmd_bench, "make-tiny": _cmd_make_tiny,
                "demo": _cmd_demo, "push": _cmd_push, "iterate": _cmd_iterate, **EVAL_COMMANDS}[args.command](args)
    except UserError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
