"""The evaluation subcommands of `diffusion-dpo`: generate, score, compare.

    diffusion-dpo generate --model sd15/ --lora runs/lora/final --prompts PartiPrompts.tsv --limit 200 \\
        --seeds 0 1 --output-dir gen/lora --steps 30 --guidance-scale 7.5 --device cuda --dtype float16
    accelerate launch --num_processes 8 -m diffusion_dpo generate ...   # the same images, 8 GPUs sharing the batches
    diffusion-dpo score --run gen/lora --reward pickscore --reward aesthetic
    diffusion-dpo compare --a gen/lora --b gen/base --reward pickscore --reward hpsv2 \\
        --reward-path hpsv2=weights/HPS_v2.1_compressed.pt --output-dir cmp/lora_vs_base

Reward syntax (score, compare): `--reward SPEC`, repeatable, one result per SPEC, where SPEC is a
built-in name (pickscore, clip, aesthetic, hpsv2, imagereward), your own `package.module:function`,
or a weighted sum `pickscore=1,aesthetic=0.5`. Where a reward's weights live is said separately,
`--reward-path NAME=PATH` (repeatable), because paths may contain ':' and ',' themselves.

`cli/app.py` wires this in with `register(sub, _Parser)` and by merging `COMMANDS` into its dispatch.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from diffusion_dpo.errors import UserError

_REWARD_HELP = ("reward to score with; repeat for several: a built-in name (pickscore, clip, aesthetic, hpsv2, "
                "imagereward), 'package.module:function', or a weighted sum 'pickscore=1,aesthetic=0.5'")
_PATH_HELP = "where reward NAME's weights are (local dir/file or hub id), e.g. hpsv2=HPS_v2.1.pt; repeatable"


def register(subparsers: argparse._SubParsersAction, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add the generate, score and compare subcommands to `subparsers`.

    `parser_class` is the CLI's one-line-error parser; the subcommand parsers must be of that class,
    which `subparsers` guarantees when it was created with `parser_class=` (checked here).
    """
    if getattr(subparsers, "_parser_class", parser_class) is not parser_class:
        raise TypeError("create the subparsers with add_subparsers(parser_class=...) of the same class")
    from diffusion_dpo.evaluation.generate import SCHEDULERS
    from diffusion_dpo.evaluation.prompts import KINDS

    gen = subparsers.add_parser(
        "generate", help="images for a prompt set x seeds from one model (+ LoRA), with a manifest",
        description="Generate an image per (prompt, seed). The initial noise depends only on the seed, so runs of "
                    "different models with the same prompts and seeds compare on equal terms. Re-running into "
                    "the same --output-dir resumes: existing images are kept.")
    gen.add_argument("--model", required=True,
                     help="diffusers pipeline directory or hub id (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1, Z-Image, "
                          "FLUX.2 [klein] and [dev], Qwen-Image)")
    gen.add_argument("--lora", help="LoRA weights: a directory with pytorch_lora_weights.safetensors or a file")
    gen.add_argument("--prompts", required=True, metavar="FILE",
                     help="prompt set: .txt (one per line), PartiPrompts .tsv, HPSv2 .json (or a dir of them), "
                          "Pick-a-Pic .parquet / shard dir / save_to_disk dir (unique captions)")
    gen.add_argument("--prompt-kind", default="auto", choices=("auto",) + KINDS, help="[default: by suffix]")
    gen.add_argument("--prompt-split", help="Pick-a-Pic split/shard name, e.g. validation_unique")
    gen.add_argument("--limit", type=int, help="use the first N prompts")
    gen.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds, one image each [default: 0]")
    gen.add_argument("--output-dir", required=True, help="run directory (images/, manifest.jsonl, run.json)")
    gen.add_argument("--revision", help="hub revision of --model (branch, tag or commit), pinned to its commit in "
                                        "run.json for the whole run, resumes included [default: main]")
    gen.add_argument("--steps", type=int, default=30, help="sampling steps [default: 30]")
    gen.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance [default: 7.5]")
    gen.add_argument("--max-sequence-length", type=int, metavar="N",
                     help="text tokens (SD3, FLUX.1: T5; Z-Image, FLUX.2, Qwen-Image: the LLM): the "
                          "model.max_sequence_length it was trained at [default: the pipeline's: 256 for SD3, 512 for "
                          "the others (FLUX.1-schnell takes at most 256)]")
    gen.add_argument("--height", type=int, help="[default: the model's native size]")
    gen.add_argument("--width", type=int, help="[default: the model's native size]")
    gen.add_argument("--batch-size", type=int, default=4, help="images per forward pass [default: 4]")
    gen.add_argument("--scheduler", help=f"sampler: {', '.join(SCHEDULERS)} or a diffusers scheduler class "
                                         "[default: the model's own]")
    gen.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... [default: cuda if available; under "
                                                      "`accelerate launch`, each process its own GPU]")
    gen.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                     help="model weights dtype (float16 on a GPU halves memory) [default: float32]")

    score = subparsers.add_parser("score", help="score one generation run with reward models",
                                  description="Score every image of a run; per-image scores are cached in the "
                                              "run directory (scores_<reward>.jsonl), a summary is written to "
                                              "RUN/scores.json.")
    score.add_argument("--run", required=True, help="a directory written by 'generate'")
    _add_reward_flags(score)

    cmp = subparsers.add_parser(
        "compare", help="paired win rates of run A over run B per reward, with CIs, plots and a sample grid",
        description="Win rate of A over B per prompt (seeds averaged, ties 0.5), a 95% paired-bootstrap CI over "
                    "prompts and a sign-test p-value, per reward. Writes compare.json, compare.md, scores.png "
                    "and grid.png to --output-dir. Both runs must hold the same prompts and seeds.")
    cmp.add_argument("--a", required=True, help="run A (e.g. the fine-tuned model)")
    cmp.add_argument("--b", required=True, help="run B (e.g. the base model)")
    cmp.add_argument("--output-dir", required=True, help="where the report goes")
    cmp.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples [default: 10000]")
    cmp.add_argument("--seed", type=int, default=0, help="bootstrap seed [default: 0]")
    cmp.add_argument("--grid-prompts", type=int, default=8, help="prompts shown in grid.png [default: 8]")
    _add_reward_flags(cmp)

    rel = subparsers.add_parser(
        "relabel", help="replace preference labels by a reward model's (AI feedback)",
        description="Score both images of every pair with a reward (or a weighted sum) and write the data set "
                    "again with the reward's labels: Pick-a-Pic parquet -> parquet shards of the same schema "
                    "(+ ai_score_0/ai_score_1), JSONL/CSV -> pairs.jsonl. Resumable shard by shard; reports "
                    "how often the reward agrees with the original labels. Under `accelerate launch` every "
                    "process scores its share of the shards on its own GPU.")
    # the same flags as train's data section (--data.path, --data.split, --data.image_root); --data is kept
    rel.add_argument("--data.path", "--data", dest="data", required=True, metavar="PATH",
                     help="Pick-a-Pic parquet file or directory, a datasets.save_to_disk directory, a hub dataset id "
                          "(online), or a JSONL/CSV file")
    rel.add_argument("--data.split", "--split", dest="split", default="train",
                     help="split of a save_to_disk DatasetDict or hub data set [default: train]")
    rel.add_argument("--data.image_root", dest="image_root", metavar="DIR",
                     help="the folder a JSONL/CSV set's image paths must lie in [default: the data file's folder]")
    rel.add_argument("--output-dir", required=True, help="where the relabelled data set is written")
    rel.add_argument("--margin", type=float, default=0.0,
                     help="score differences up to this are ties (0.5/0.5) [default: 0]")
    rel.add_argument("--drop-ties", action="store_true", help="drop tied pairs instead of labelling them 0.5/0.5")
    _add_reward_flags(rel, several=False)


def _add_reward_flags(parser: argparse.ArgumentParser, several: bool = True) -> None:
    """--reward (repeatable for score/compare, one spec for relabel), --reward-path, batch size, device."""
    if several:
        parser.add_argument("--reward", action="append", required=True, metavar="SPEC", help=_REWARD_HELP)
    else:
        parser.add_argument("--reward", required=True, metavar="SPEC", help="one reward or a weighted sum, e.g. "
                            "pickscore=1,aesthetic=0.5, or package.module:function")
    parser.add_argument("--reward-path", action="append", default=[], metavar="NAME=PATH", help=_PATH_HELP)
    parser.add_argument("--reward-batch-size", type=int, default=16, help="images per reward batch [default: 16]")
    parser.add_argument("--device", default="auto", help="device for the reward models [default: cuda if available]")
    if several:  # score/compare cache per-image scores in the run directory
        parser.add_argument("--no-cache", action="store_true", help="rescore instead of reusing scores_<reward>.jsonl")


def _reward_paths(items: list[str]) -> dict[str, str]:
    """['hpsv2=w.pt', ...] -> {'hpsv2': 'w.pt'} (split at the first '=': paths may hold '=' themselves)."""
    paths: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--reward-path '{item}': write NAME=PATH, e.g. hpsv2=HPS_v2.1_compressed.pt")
        if name.strip() in paths:
            raise UserError(f"--reward-path: two paths for reward '{name.strip()}'")
        paths[name.strip()] = path.strip()
    return paths


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _quiet() -> None:
    from diffusion_dpo.console import quiet_progress_bars

    quiet_progress_bars()


def _cmd_generate(args: argparse.Namespace) -> int:
    from diffusion_dpo.evaluation.generate import generate_on_all
    from diffusion_dpo.processes import process_state
    from diffusion_dpo.evaluation.prompts import load_prompts

    _quiet()
    prompts = load_prompts(args.prompts, args.prompt_kind, args.limit, args.prompt_split)
    # under `accelerate launch -m diffusion_dpo generate` each process makes its share; auto: each its own GPU
    state = process_state()
    device = str(state.device) if args.device == "auto" else args.device
    manifest = generate_on_all(state, args.model, prompts, args.seeds, args.output_dir, lora=args.lora,
                               scheduler=args.scheduler, steps=args.steps, guidance_scale=args.guidance_scale,
                               height=args.height, width=args.width, max_sequence_length=args.max_sequence_length,
                               batch_size=args.batch_size, device=device, dtype=args.dtype, revision=args.revision)
    if state.is_main_process:
        print(f"{len(prompts)} prompts x {len(args.seeds)} seeds: {len(prompts) * len(args.seeds)} images in "
              f"{Path(args.output_dir)} (manifest: {manifest})")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    import json

    from diffusion_dpo.evaluation.compare import score_run, summarize

    _quiet()
    scores = score_run(args.run, args.reward, _reward_paths(args.reward_path), _device(args.device),
                       args.reward_batch_size, cache=not args.no_cache)
    summary = {label: summarize(values) for label, values in scores.items()}
    out = Path(args.run) / "scores.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    for label, s in summary.items():
        print(f"{label}: mean {s['mean']:.4g} (std {s['std']:.3g}, {s['n']} images)")
    print(f"wrote {out}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from diffusion_dpo.evaluation.compare import compare

    _quiet()
    if args.bootstrap < 1 or args.grid_prompts < 1:
        raise UserError("compare: --bootstrap and --grid-prompts must be positive")
    report = compare(args.a, args.b, args.reward, args.output_dir, _reward_paths(args.reward_path),
                     _device(args.device), args.reward_batch_size, args.bootstrap, args.seed, args.grid_prompts,
                     cache=not args.no_cache)
    for label, r in report["rewards"].items():
        print(f"{label}: win rate A {r['win_rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] per prompt, "
              f"{r['image_win_rate']:.3f} [{r['image_ci_low']:.3f}, {r['image_ci_high']:.3f}] per image, "
              f"p={r['p_value']:.3g}, mean A {r['mean_a']:.4g} vs B {r['mean_b']:.4g}"
              + ("" if r["effect_size"] is None else f", effect d_z {r['effect_size']:.2f}"))
    print(f"wrote {Path(args.output_dir) / 'compare.md'} (+ compare.json, scores.png, grid.png)")
    return 0




def _cmd_relabel(args: argparse.Namespace) -> int:
    from diffusion_dpo.evaluation.relabel import relabel
    from diffusion_dpo.processes import process_state

    _quiet()
    state = process_state()  # one process, or each of `accelerate launch`'s: every one scores its share of shards
    device = str(state.device) if args.device == "auto" else args.device
    report = relabel(args.data, args.reward, args.output_dir, paths=_reward_paths(args.reward_path),
                     device=device, batch_size=args.reward_batch_size, margin=args.margin,
                     drop_ties=args.drop_ties, split=args.split, image_root=args.image_root, state=state)
    if not state.is_main_process:
        return 0
    agreement = "n/a" if report["agreement"] is None else f"{report['agreement']:.3f} of {report['compared']}"
    print(f"relabelled {report['rows']} pairs: {report['decided']} decided, {report['ties']} ties "
          f"({report['dropped']} dropped); agreement with the original labels: {agreement}; "
          f"wrote {args.output_dir}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "generate": _cmd_generate,
    "score": _cmd_score,
    "compare": _cmd_compare,
    "relabel": _cmd_relabel,
}
