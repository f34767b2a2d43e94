"""Score generation runs with reward models and compare two runs prompt by prompt.

    diffusion-dpo compare --a gen/dpo --b gen/base --reward pickscore --reward aesthetic --output-dir cmp/

Two runs made by `generate` from the same prompts and seeds hold, for every (prompt p, seed s),
an image of model A and one of model B started from the same noise. For each reward r:

    a_p = mean_s r(A's image of (p, s), p)          b_p = the same for B      (prompt = the unit)
    w_p = 1 if a_p > b_p,  0.5 if a_p == b_p,  0 otherwise
    win rate of A over B = (1/P) * sum_p w_p

    95% CI: percentile bootstrap over prompts: resample P prompts with replacement, n_boot times
            (seeded numpy), recompute the win rate; the 2.5th and 97.5th percentiles.
    p-value: two-sided exact sign test on the n = wins + losses untied prompts, k = wins:
             p = min(1, 2 * sum_{i <= min(k, n-k)} C(n, i) / 2^n)   (p = 1 when n = 0)

    effect size: d_p = a_p - b_p; mean difference mean_p d_p with its paired-bootstrap 95% CI (prompts
                 resampled, as for the win rate), and the paired standardized effect
                 d_z = mean_p d_p / sd_p d_p (sample sd; None when it is 0 or there is one prompt), which
                 says how large the gain is, where the win rate says only how often

    per image: w_ps = 1 if r(A's image of (p, s)) > r(B's image of (p, s)), 0.5 if equal, 0 otherwise;
               image win rate = (1/N) * sum_{p,s} w_ps over the N paired images. Its 95% CI resamples
               prompts (each with all its seeds: a cluster bootstrap), for the same reason as below.

Which number is the paper's: Diffusion-DPO's human evaluation (and its PickScore/HPS win rates) compares ONE
image per prompt and model, i.e. the per-image win rate at one seed (per image and per prompt coincide there).
With several seeds the per-image rate is that protocol averaged over seeds; the per-prompt rate saturates near
1.0 once a model improves nearly every prompt a little, so read it with the mean difference and d_z beside it.

Seeds are averaged before comparing because the prompts, not the images, are the independent
units: two images of one prompt share the prompt's difficulty, so counting them separately would
make the interval too narrow.

Outputs of `compare`: compare.json, compare.md (a Markdown table), scores.png (the score
distributions of A and B per reward) and grid.png (A | B at the first seed for a few prompts
spread over the prompt set, each labelled with its scores under the first reward).

Per-image scores are cached in the run directory as `scores_<reward>.jsonl` (one line per image:
file, the sha256 of its bytes, score), so comparing a run against several others scores it once. A line is
used only while its hash matches the image's current bytes (a regenerated or swapped image is scored again; a
run unpacked from elsewhere keeps its mtimes, so they prove nothing); lines in any other form are ignored.

A run is untrusted input: every manifest `file` must resolve (symlinks followed) to a regular file inside the
run's own images/ folder, or `load_run` refuses the run; its images are decoded by `images.load_rgb`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from diffusion_dpo.errors import UserError
from diffusion_dpo.evaluation.generate import IMAGE_DIR, MANIFEST, RUN_FILE
from diffusion_dpo.data.images import load_rgb

PROTOCOL = ("The paper's protocol (one image per prompt and model, judged pairwise) is the per-image win rate at "
            "one seed; over several seeds, image_win_rate averages it. win_rate counts prompts (seeds averaged), which "
            "saturates near 1 once most prompts improve a little: read mean_diff and its interval beside it.")
SCORE_CHUNK = 256  # images held in memory at once while scoring
GRID_PROMPTS = 8


# ---------------------------------------------------------------- runs

def load_run(run_dir: str | Path) -> list[dict]:
    """The manifest rows of a generation run, one per (prompt_index, seed), sorted by that key;
    every row's image file is checked to exist as a regular file inside the run's images/ folder."""
    run_dir = Path(run_dir)
    manifest = run_dir / MANIFEST
    if not manifest.is_file():
        raise UserError(f"run '{run_dir}': no {MANIFEST} (not a directory written by 'diffusion-dpo generate')")
    rows: dict[tuple[int, int], dict] = {}
    lines = manifest.read_text(encoding="utf-8").splitlines()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = (int(row["prompt_index"]), int(row["seed"]))
            if not isinstance(row["prompt"], str) or not isinstance(row["file"], str):
                raise TypeError
        except json.JSONDecodeError:
            if line_no == len(lines):
                continue  # a torn last line from a killed `generate`: its image is redone on resume
            raise UserError(f"run '{run_dir}': {MANIFEST} line {line_no}: not valid JSON") from None
        except (KeyError, TypeError, ValueError):
            raise UserError(f"run '{run_dir}': {MANIFEST} line {line_no}: needs prompt, prompt_index, seed "
                            "and file") from None
        _check_image_path(run_dir, row["file"], line_no)
        rows[key] = row  # a repeated key (an image regenerated by hand-editing) keeps the last line
    if not rows:
        raise UserError(f"run '{run_dir}': {MANIFEST} lists no images")
    return [rows[k] for k in sorted(rows)]


def _check_image_path(run_dir: Path, file: str, line_no: int) -> None:
    """A manifest's `file` must name a regular file inside the run's images/ folder once symlinks are followed:
    a manifest from elsewhere cannot make the tools read (or publish in pairs) a file outside its run."""
    where = f"run '{run_dir}': {MANIFEST} line {line_no}: image {file!r}"
    try:
        images = run_dir.resolve() / IMAGE_DIR  # images/ itself may not be a link out of the run either
        target = (run_dir / file).resolve()
        inside = target != images and target.is_relative_to(images)
        exists = (run_dir / file).exists()
    except (OSError, RuntimeError, ValueError):  # a NUL byte, a symlink loop
        inside = exists = False
    if not inside:
        raise UserError(f"{where} is not inside the run's {IMAGE_DIR}/ folder (symlinks followed); a manifest may "
                        f"only name the run's own images")
    if not exists:
        raise UserError(f"{where} not found")
    if not target.is_file():
        raise UserError(f"{where} is not a regular file")


def check_paired(rows_a: list[dict], rows_b: list[dict], name_a: str = "A", name_b: str = "B") -> None:
    """Both runs must hold the same (prompt_index, seed) images of the same prompts; else name the first difference."""
    a = {(r["prompt_index"], r["seed"]): r["prompt"] for r in rows_a}
    b = {(r["prompt_index"], r["seed"]): r["prompt"] for r in rows_b}
    for key in sorted(set(a) | set(b)):
        if key not in b or key not in a:
            have, lack = (name_a, name_b) if key not in b else (name_b, name_a)
            prompt = a.get(key, b.get(key))
            raise UserError(f"runs differ: {have} has prompt {key[0]} ({prompt!r}) seed {key[1]}, {lack} does not; "
                            "generate both from the same prompts and seeds")
        if a[key] != b[key]:
            raise UserError(f"runs differ: prompt {key[0]} is {a[key]!r} in {name_a} but {b[key]!r} in {name_b}")


# ---------------------------------------------------------------- rewards and scores

@dataclass
class RewardSpec:
    """A reward as the user wrote it: one name ('pickscore', 'pkg.mod:fn') or a weighted sum
    ('pickscore=1,aesthetic=0.5', scored as sum_k w_k * r_k); from Python also a function
    `fn(images, prompts) -> N scores`, named by its __name__ (never cached: it has no identity on disk)."""

    label: str
    terms: list[tuple[str, float]]
    function: Optional[Callable] = None


def parse_rewards(specs: Sequence[str | Callable], paths: Optional[dict[str, str]] = None) -> list[RewardSpec]:
    """Validate reward specs and `paths` ({reward name: weights path}) before any model loads."""
    from diffusion_dpo.evaluation.rewards import REWARDS, parse_weighted
    from diffusion_dpo.evaluation.rewards.custom import is_import_path

    if not specs:
        raise UserError("name at least one reward (e.g. --reward pickscore)")
    out = [RewardSpec(spec, parse_weighted(spec)) if isinstance(spec, str) else
           RewardSpec(_function_name(spec), [(_function_name(spec), 1.0)], spec) for spec in specs]
    functions = {s.label for s in out if s.function is not None}
    names = {name for s in out for name, _ in s.terms}
    for name in sorted(names - functions):
        if name not in REWARDS and not is_import_path(name):
            raise UserError(f"unknown reward '{name}'; choose one of {', '.join(sorted(REWARDS))}, "
                            "or 'package.module:function' for your own")
    for name in (paths or {}):
        if name not in names:
            raise UserError(f"a weights path is given for reward '{name}', which is not among the rewards "
                            f"({', '.join(sorted(names))})")
    if len({s.label for s in out}) != len(out):
        raise UserError(f"a reward is named twice: {', '.join(specs)}")
    return out


def _function_name(fn: Callable) -> str:
    if not callable(fn):
        raise UserError(f"a reward must be a name, an import path or a function, got {type(fn).__name__}")
    return getattr(fn, "__name__", type(fn).__name__)


def _cache_file(run_dir: Path, name: str, path: Optional[str], commits: Optional[dict[str, str]] = None) -> Path:
    """scores_<name>[_<hash>].jsonl, the hash of the weights path and the hub commits the reward was read at:
    another checkpoint of a reward, or another commit of its hub repo, gets its own cache."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    identity = ([str(Path(path).expanduser().resolve())] if path is not None else []) + \
        [f"{k}@{v}" for k, v in sorted((commits or {}).items())]
    if identity:
        slug += "_" + hashlib.sha1("\n".join(identity).encode()).hexdigest()[:8]
    return run_dir / f"scores_{slug}.jsonl"


def _read_cache(file: Path) -> dict[str, tuple[str, float]]:
    """file -> (sha256 of its bytes, score); unreadable lines (a torn last line, the old file + mtime form) are
    ignored and rescored."""
    cache: dict[str, tuple[str, float]] = {}
    if file.is_file():
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                digest, score = row["sha256"], float(row["score"])
                if isinstance(row["file"], str) and isinstance(digest, str) and math.isfinite(score):
                    cache[row["file"]] = (digest, score)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return cache


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def score_images(run_dir: Path, rows: list[dict], reward, cache_file: Optional[Path]) -> np.ndarray:
    """Scores (N,) of the run's images under one loaded `Reward`, reusing and extending the cache."""
    scores, todo = _cached_scores(run_dir, rows, cache_file)
    for start in range(0, len(todo), SCORE_CHUNK):
        lines = _score_chunk(run_dir, rows, reward, todo[start:start + SCORE_CHUNK])
        for (i, _), line in zip(todo[start:start + SCORE_CHUNK], lines):
            scores[i] = json.loads(line)["score"]
        if cache_file is not None:
            with open(cache_file, "a", encoding="utf-8") as f:
                f.write("".join(lines))
    return scores


def _cached_scores(run_dir: Path, rows: list[dict], cache_file: Optional[Path]
                   ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """(scores (N,) with NaN where the cache has none, [(row, sha256 of its image)] still to score)."""
    cache = _read_cache(cache_file) if cache_file is not None else {}
    scores = np.full(len(rows), np.nan)
    todo = []
    for i, row in enumerate(rows):
        digest = _sha256(run_dir / row["file"]) if cache_file is not None else ""
        hit = cache.get(row["file"])
        if hit is not None and hit[0] == digest:  # other bytes (a regenerated image, a forged line): scored again
            scores[i] = hit[1]
        else:
            todo.append((i, digest))
    return scores, todo


def _score_chunk(run_dir: Path, rows: list[dict], reward, chunk: list[tuple[int, str]]) -> list[str]:
    """The cache lines ({"file", "sha256", "score"}) of the rows of `chunk`, scored in one call of `reward`."""
    images = [run_image(run_dir, rows[i]["file"]) for i, _ in chunk]
    values = reward(images, [rows[i]["prompt"] for i, _ in chunk]).numpy()
    lines = []
    for (i, digest), value in zip(chunk, values):
        if not np.isfinite(value):  # NaN would silently count as a loss for both runs
            raise UserError(f"reward '{reward.name}' gave {value} for image '{rows[i]['file']}' of run '{run_dir}'")
        lines.append(json.dumps({"file": rows[i]["file"], "sha256": digest, "score": float(value)}) + "\n")
    return lines


def run_image(run_dir: Path, file: str) -> Image.Image:
    """A run's image (a row of `load_run`, so inside its images/) decoded by the project's safe decoder."""
    try:
        return load_rgb(run_dir / file)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, UserError) as exc:  # not a usable image
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"run '{run_dir}': image '{file}' cannot be read ({first})") from None


class Scorer:
    """Loads each reward model once and scores runs with it: {spec label: scores (N,)} per run."""

    def __init__(self, specs: Sequence[RewardSpec], paths: Optional[dict[str, str]] = None, device: str = "cpu",
                 batch_size: int = 16, cache: bool = True):
        from diffusion_dpo.evaluation.rewards import Reward, load_reward

        self.specs = list(specs)
        self.paths = dict(paths or {})
        self.cache = cache
        functions = {s.label: s.function for s in self.specs if s.function is not None}
        names = list(dict.fromkeys(name for s in self.specs for name, _ in s.terms))
        self.rewards = {n: Reward(n, functions[n], batch_size) if n in functions else
                        load_reward(n, self.paths.get(n), device=device, batch_size=batch_size) for n in names}
        self.cached = {n for n in names if cache and n not in functions}

    def __call__(self, run_dir: str | Path, rows: Optional[list[dict]] = None,
                 only: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
        """{spec label: scores (N,)} for the run's images; `only`: just these spec labels (their rewards only)."""
        run_dir = Path(run_dir)
        rows = load_run(run_dir) if rows is None else rows
        specs = [s for s in self.specs if only is None or s.label in only]
        names = {n for s in specs for n, _ in s.terms}
        per_name = {n: score_images(run_dir, rows, r, _cache_file(run_dir, n, self.paths.get(n), r.commits)
                                    if n in self.cached else None) for n, r in self.rewards.items() if n in names}
        # score = sum_k w_k * r_k, per image
        return {s.label: sum(w * per_name[n] for n, w in s.terms) for s in specs}

    def fill(self, state: object, run_dir: str | Path, only: Optional[Sequence[str]] = None) -> None:
        """Score the run's images that the cache files lack, each process its share (every process calls it, with
        the same rewards at the same commits); the main process appends every share to the caches, so that a
        `__call__` on it afterwards reads all the scores instead of computing them while the others wait.

        The main process lists what is missing (`processes.Share.of_missing`) in chunks of SCORE_CHUNK images;
        rewards passed as functions have no cache and are scored by `__call__` itself. One process: nothing to do."""
        from accelerate.utils import gather_object

        from diffusion_dpo.processes import Share

        share = Share(state)
        if share.count == 1:
            return
        run_dir = Path(run_dir)
        rows = share.all_do(lambda: load_run(run_dir))
        names = {n for s in self.specs if only is None or s.label in only for n, _ in s.terms}
        for name in sorted(names & self.cached):
            reward = self.rewards[name]
            cache_file = _cache_file(run_dir, name, self.paths.get(name), reward.commits)
            todo = share.main_does(lambda: _cached_scores(run_dir, rows, cache_file)[1])
            size = max(1, min(SCORE_CHUNK, math.ceil(len(todo) / share.count)))  # every process gets a part
            chunks = [todo[k:k + size] for k in range(0, len(todo), size)]
            mine = chunks[share.rank::share.count]
            lines = share.all_do(lambda: [line for chunk in mine for line in _score_chunk(run_dir, rows, reward, chunk)])
            lines = gather_object(lines)
            if share.is_main and lines:
                with open(cache_file, "a", encoding="utf-8") as f:
                    f.write("".join(lines))
            state.wait_for_everyone()


def score_run(run_dir: str | Path, rewards: Sequence[str | Callable], paths: Optional[dict[str, str]] = None,
              device: str = "cpu", batch_size: int = 16, cache: bool = True) -> dict[str, np.ndarray]:
    """Per-image scores of a run, {reward spec: (N,)} aligned with `load_run(run_dir)`."""
    rows = load_run(run_dir)  # a broken run fails before a reward model loads
    return Scorer(parse_rewards(rewards, paths), paths, device, batch_size, cache)(run_dir, rows)


def summarize(scores: np.ndarray) -> dict:
    """mean, sample std and count of per-image scores."""
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
            "n": int(len(scores))}


# ---------------------------------------------------------------- statistics

@dataclass
class WinRate:
    """A over B on one reward, with prompts as the unit (see the module docstring for the formulas)."""

    win_rate: float
    ci_low: float
    ci_high: float
    p_value: float
    wins: int
    ties: int
    losses: int
    n_prompts: int
    mean_a: float
    mean_b: float
    image_win_rate: float  # per (prompt, seed) image, same initial noise for A and B (see the module docstring)
    image_ci_low: float
    image_ci_high: float
    n_images: int
    mean_diff: float  # mean over prompts of a_p - b_p
    mean_diff_ci_low: float  # its paired bootstrap 95% CI over prompts
    mean_diff_ci_high: float
    effect_size: Optional[float]  # d_z = mean_diff / sd of a_p - b_p (None when undefined)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial (sign) test of k = wins out of n = wins + losses against p = 1/2."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2.0 * tail / 2 ** n)  # integer sum, one division: exact for any n


def bootstrap_ci(per_prompt: np.ndarray, n_boot: int = 10000, seed: int = 0, level: float = 0.95,
                 weights: Optional[np.ndarray] = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `per_prompt` (P,), resampling prompts with replacement;
    with `weights` (P,), of the weighted mean sum(w x) / sum(w) (a prompt's image count, for per-image rates)."""
    rng = np.random.default_rng(seed)
    p = len(per_prompt)
    w = np.ones(p) if weights is None else np.asarray(weights, dtype=np.float64)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // max(p, 1))  # bounded memory: 10k x 50k prompts would be 4 GB at once
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        pick = rng.integers(0, p, size=(stop - start, p))
        means[start:stop] = (per_prompt[pick] * w[pick]).sum(axis=1) / w[pick].sum(axis=1)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def per_prompt_means(scores: np.ndarray, prompt_ids: Sequence) -> np.ndarray:
    """Mean score per prompt (over its seeds), prompts in order of first appearance."""
    _, first, inverse = np.unique(np.asarray(prompt_ids), return_index=True, return_inverse=True)
    sums = np.bincount(inverse, weights=np.asarray(scores, dtype=np.float64))
    means = sums / np.bincount(inverse)
    return means[np.argsort(first)]


def per_prompt_counts(prompt_ids: Sequence) -> np.ndarray:
    """Images per prompt, prompts in order of first appearance (as per_prompt_means)."""
    _, first, counts = np.unique(np.asarray(prompt_ids), return_index=True, return_counts=True)
    return counts[np.argsort(first)].astype(np.float64)


def paired_win_rate(a_scores: Sequence[float], b_scores: Sequence[float], prompt_ids: Sequence,
                    n_boot: int = 10000, seed: int = 0) -> WinRate:
    """Win rate of A over B with its bootstrap CI and sign-test p-value; image i of A pairs with image i of B."""
    a, b = np.asarray(a_scores, dtype=np.float64), np.asarray(b_scores, dtype=np.float64)
    if not (len(a) == len(b) == len(prompt_ids)) or len(a) == 0:
        raise ValueError(f"need equally many A scores, B scores and prompt ids (>0), got {len(a)}, {len(b)}, "
                         f"{len(prompt_ids)}")
    pa, pb = per_prompt_means(a, prompt_ids), per_prompt_means(b, prompt_ids)
    w = np.where(pa > pb, 1.0, np.where(pa == pb, 0.5, 0.0))  # (P,)
    wins, losses = int((pa > pb).sum()), int((pa < pb).sum())
    low, high = bootstrap_ci(w, n_boot, seed)
    w_image = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))  # (N,)
    counts = per_prompt_counts(prompt_ids)
    image_low, image_high = bootstrap_ci(per_prompt_means(w_image, prompt_ids), n_boot, seed, weights=counts)
    d = pa - pb  # (P,)
    sd = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    diff_low, diff_high = bootstrap_ci(d, n_boot, seed)
    return WinRate(win_rate=float(w.mean()), ci_low=low, ci_high=high, p_value=sign_test(wins, losses), wins=wins,
                   ties=len(w) - wins - losses, losses=losses, n_prompts=len(w), mean_a=float(a.mean()),
                   mean_b=float(b.mean()), image_win_rate=float(w_image.mean()), image_ci_low=image_low,
                   image_ci_high=image_high, n_images=len(w_image), mean_diff=float(d.mean()),
                   mean_diff_ci_low=diff_low, mean_diff_ci_high=diff_high,
                   effect_size=float(d.mean()) / sd if sd > 0 else None)


# ---------------------------------------------------------------- compare

def compare(run_a: str | Path, run_b: str | Path, rewards: Sequence[str | Callable], out_dir: str | Path,
            paths: Optional[dict[str, str]] = None, device: str = "cpu", batch_size: int = 16,
            n_boot: int = 10000, seed: int = 0, grid_prompts: int = GRID_PROMPTS, cache: bool = True,
            scorer: Optional[Scorer] = None) -> dict:
    """Score both runs and write compare.json, compare.md, scores.png and grid.png into `out_dir`. `scorer`: reward
    models already loaded (for `rewards`), so that many comparisons load them once."""
    run_a, run_b, out_dir = Path(run_a), Path(run_b), Path(out_dir)
    rows_a, rows_b = load_run(run_a), load_run(run_b)  # sorted by (prompt_index, seed): aligned if paired
    check_paired(rows_a, rows_b, f"A ({run_a})", f"B ({run_b})")
    specs = parse_rewards(rewards, paths)
    scorer = scorer if scorer is not None else Scorer(specs, paths, device, batch_size, cache)
    labels = [s.label for s in specs]
    scores_a, scores_b = scorer(run_a, rows_a, labels), scorer(run_b, rows_b, labels)
    prompt_ids = [r["prompt_index"] for r in rows_a]
    results = {s.label: paired_win_rate(scores_a[s.label], scores_b[s.label], prompt_ids, n_boot, seed)
               for s in specs}
    report = {
        "a": {"run": str(run_a), **_run_info(run_a)},
        "b": {"run": str(run_b), **_run_info(run_b)},
        "n_prompts": len(set(prompt_ids)), "n_images": len(rows_a),
        "seeds": sorted({r["seed"] for r in rows_a}), "bootstrap": {"n": n_boot, "seed": seed, "level": 0.95},
        "grid_reward": specs[0].label,
        "protocol": PROTOCOL,
        "reward_commits": {n: r.commits for n, r in scorer.rewards.items() if r.commits},  # hub weights' commits
        "rewards": {label: {**asdict(r), "std_a": summarize(scores_a[label])["std"],
                            "std_b": summarize(scores_b[label])["std"]} for label, r in results.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "compare.md").write_text(markdown_table(report))
    plot_scores({s.label: (scores_a[s.label], scores_b[s.label]) for s in specs}, results).save(out_dir / "scores.png")
    first = specs[0].label
    sample_grid(run_a, run_b, rows_a, rows_b, scores_a[first], scores_b[first], grid_prompts).save(out_dir / "grid.png")
    return report


def _run_info(run_dir: Path) -> dict:
    """The model/LoRA/sampler settings from run.json (empty when the file is missing)."""
    file = run_dir / RUN_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def _model_name(info: dict) -> str:
    model = info.get("model") or info["run"]
    return model + (f" + {info['lora']}" if info.get("lora") else "")


def _effect(d: Optional[float]) -> str:
    return "-" if d is None else f"{d:.2f}"


def markdown_table(report: dict) -> str:
    """The comparison as a Markdown table, one row per reward."""
    lines = [f"# A vs B: {report['n_prompts']} prompts x {len(report['seeds'])} seeds", "",
             f"- A: `{report['a']['run']}` ({_model_name(report['a'])})",
             f"- B: `{report['b']['run']}` ({_model_name(report['b'])})", "",
             "Win rate of A over B per prompt (seeds averaged, ties count 0.5); 95% CI from a paired bootstrap "
             "over prompts; p from a two-sided sign test on untied prompts.", "",
             "Per image: the share of (prompt, seed) images where A's beats B's from the same noise; its CI "
             "resamples prompts with all their seeds.", "",
             "Effect: the mean per-prompt score difference A - B with its paired-bootstrap 95% CI, and d_z, that "
             "difference over its standard deviation.", "", report.get("protocol", PROTOCOL), "",
             "| reward | win rate A | 95% CI | p (sign test) | wins / ties / losses | per image | 95% CI | "
             "mean A | mean B | mean A - B [95% CI] | d_z |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in report["rewards"].items():
        lines.append(f"| {label} | {r['win_rate']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
                     f"{r['p_value']:.3g} | {r['wins']} / {r['ties']} / {r['losses']} | "
                     f"{r['image_win_rate']:.3f} | [{r['image_ci_low']:.3f}, {r['image_ci_high']:.3f}] | "
                     f"{r['mean_a']:.5g} | {r['mean_b']:.5g} | {r['mean_diff']:.4g} "
                     f"[{r['mean_diff_ci_low']:.4g}, {r['mean_diff_ci_high']:.4g}] | {_effect(r['effect_size'])} |")
    lines += ["", f"scores.png: score distributions; grid.png: A | B at the first seed, captions "
                  f"'A vs B' under {report['grid_reward']}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- pictures (PIL only)

_A_COLOUR, _B_COLOUR = "#1f77b4", "#ff7f0e"  # matplotlib's first two colours


def plot_scores(scores: dict[str, tuple[np.ndarray, np.ndarray]], results: dict[str, WinRate],
                bins: int = 20) -> Image.Image:
    """One panel per reward: overlaid histograms of A's and B's per-image scores, dashed lines at the means."""
    from diffusion_dpo.evaluation.plots import figure_image, pyplot

    plt = pyplot()
    fig, axes = plt.subplots(len(scores), 1, figsize=(6.0, 2.6 * len(scores)), squeeze=False)
    for ax, (label, (a, b)) in zip(axes[:, 0], scores.items()):
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        if hi - lo < 1e-12:  # all equal: a unit-wide window around the value
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        r = results[label]
        for values, colour, name, mean in ((a, _A_COLOUR, "A", r.mean_a), (b, _B_COLOUR, "B", r.mean_b)):
            ax.hist(values, bins=edges, color=colour, alpha=0.45, edgecolor=colour, label=f"{name} mean {mean:.5g}")
            ax.axvline(float(values.mean()), color=colour, linestyle="--", linewidth=1.5)
        ax.set_title(f"{label}: win rate A {r.win_rate:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}], p={r.p_value:.3g}",
                     fontsize=10)
        ax.set_ylabel("images")
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return figure_image(fig)


def sample_grid(run_a: Path, run_b: Path, rows_a: list[dict], rows_b: list[dict], scores_a: np.ndarray,
                scores_b: np.ndarray, n: int = GRID_PROMPTS) -> Image.Image:
    """A | B at each prompt's first seed for up to `n` prompts spread evenly over the prompt set
    (not the biggest differences: an even spread shows typical pairs); captions 'score A vs score B: prompt'."""
    from diffusion_dpo.evaluation.grids import compose_grid

    first_seed = {}
    for i, row in enumerate(rows_a):
        first_seed.setdefault(row["prompt_index"], i)  # rows are sorted by (prompt_index, seed)
    picks = list(first_seed.values())
    picks = [picks[j] for j in sorted(set(np.linspace(0, len(picks) - 1, min(n, len(picks))).round().astype(int)))]

    first = [[run_image(run_a, rows_a[i]["file"])] for i in picks]
    size = first[0][0].size
    second = [[run_image(run_b, rows_b[i]["file"]).resize(size)] for i in picks]  # B drawn at A's size if they differ
    columns = {f"A: {run_a.name}"[:24]: first, f"B: {run_b.name}"[:24]: second}
    # the caption is cut to the grid's width, so the scores go first
    captions = [f"{scores_a[i]:.4g} vs {scores_b[i]:.4g}: {rows_a[i]['prompt']}" for i in picks]
    return compose_grid(columns, captions)
