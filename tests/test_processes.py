"""Several processes (issue 36): decisions made once, errors of any process raised on all, folders every process must
see, the process-group timeout, and resumes of multi-process runs, on the same layout and on another."""

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from diffusion_dpo.cli import main
from diffusion_dpo.data.items import PairSampler
from diffusion_dpo.training.checkpoint import TrainState
from diffusion_dpo.training.loop import continue_layout, layout_of, micro_batches
from test_cli import fast

pytestmark = pytest.mark.xdist_group("processes")  # one port, and two cores: never beside another

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- the helpers, on two real gloo processes

CASES = ("shared", "decide", "agree", "timeout", "split_check", "cache", "relabel", "score")


def _two_processes(rank: int, port: int, out: str) -> None:
    """One of two processes (torch.multiprocessing): runs every case of CASES, each in its folder out/<case>/, and
    writes what it saw to out/<case>/rank-<rank>.json. One process group for all: a spawn costs seconds here."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from diffusion_dpo.errors import UserError
    from diffusion_dpo.processes import agree, attempt, check_shared, decide_once, process_state

    state = process_state()  # the default timeout: train.process_group_timeout_minutes's
    for case in CASES:
        where = Path(out) / case
        seen: dict = {}
        try:
            if case == "shared":
                # process 1 is given another folder for output_dir: what a node-local path looks like from node 1
                folder = where / ("shared" if rank == 0 else "node-local")
                folder.mkdir(exist_ok=True)
                check_shared(state, {"cache.dir": where, "output_dir": folder})
            elif case == "decide":
                def decide():
                    raise UserError("train.resume: 'x' is not a checkpoint directory")
                decide_once(state, decide)
            elif case == "agree":
                def work():
                    if state.process_index == 1:
                        raise UserError("cache.dir 'c' holds no cache")
                    return "opened"
                agree(state, attempt(work))
            elif case == "timeout":
                from torch.distributed.distributed_c10d import _get_default_group

                backend = _get_default_group()._get_backend(torch.device("cpu"))
                seen["timeout_s"] = backend.options._timeout.total_seconds()
            elif case == "split_check":
                from diffusion_dpo.config import DataConfig
                from diffusion_dpo.data import images
                from diffusion_dpo.data.image_checks import shared_by
                from diffusion_dpo.data.pairs import load_preference_pairs

                decoded, real = [], images._check_rows
                images._check_rows = lambda rows, reader=None: decoded.extend(map(int, rows)) or real(rows, reader)
                cfg = DataConfig(path=str(where / "data.parquet"), num_workers=0, skip_bad_rows=True)
                with shared_by(state):
                    pairs = load_preference_pairs(cfg)
                seen.update(decoded=list(decoded), kept=pairs.row_index.tolist(), first_bad=pairs.first_bad)
                decoded.clear()
                with shared_by(state):  # a second start: remembered, nothing decoded
                    load_preference_pairs(cfg)
                seen["decoded_again"] = list(decoded)
                if rank == 1:  # a node whose cache folder holds no memory: the main process's is used
                    os.environ["DIFFUSION_DPO_CACHE"] = str(where / "node-1-cache")
                decoded.clear()
                with shared_by(state):
                    other = load_preference_pairs(cfg)
                seen.update(decoded_node_local=list(decoded), kept_node_local=other.row_index.tolist())
                images._check_rows = real
            elif case == "cache":
                seen.update(_cache_builds(state, where))
            elif case == "relabel":
                seen.update(_relabels(state, where))
            elif case == "score":
                seen.update(_scores(state, where))
            seen["error"] = None
        except UserError as exc:
            seen["error"] = str(exc)
        except Exception:  # noqa: BLE001 - anything else is the test's failure, reported to it
            seen["error"] = "crash: " + traceback.format_exc()
        (where / f"rank-{rank}.json").write_text(json.dumps(seen))
    torch.distributed.destroy_process_group()


def _cache_builds(state, where: Path) -> dict:
    """The cache and the precomputed reference built by both processes, each interrupted in its second chunk, then
    resumed by both ("two") or by process 0 alone ("one"); process 0 also builds both alone from the start
    ("alone"). Returns what each process encoded on the resumes."""
    from diffusion_dpo.cache import build
    from diffusion_dpo.cache.reference import precompute_reference
    from diffusion_dpo.cache.store import CachedPairs
    from diffusion_dpo.config import load_config

    paths = json.loads((where / "paths.json").read_text())
    rank = state.process_index

    def cfg(name: str):
        return load_config(None, {
            "output_dir": str(where / "run"), "model.pretrained": paths["model"], "data.path": paths["data"],
            "data.resolution": "32", "data.batch_size": "2", "data.num_workers": "0", "data.random_flip": "true",
            "data.proportion_empty_prompts": "0.5", "cache.dir": str(where / name), "cache.shard_pairs": "4",
            "cache.batch_size": "2", "cache.reference_file": str(where / f"{name}.reference.safetensors"),
            "train.max_steps": "8"})

    def make_cache(c, state):
        build.build_cache(c.model, c.data, c.cache, c.flow, "cpu", state=state)

    def make_reference(c, state):
        precompute_reference(c.model, c.lora, c.flow, c.data, c.train, c.cache, "cpu", state=state)

    def interrupted(make, name, cls, first):
        """`make` on both processes, each interrupted when it reaches an item past its first chunk."""
        real, done = cls.__getitem__, []

        def stop_after_first_chunk(self, key):
            done.append(key)
            if len(done) > first:
                raise KeyboardInterrupt
            return real(self, key)

        cls.__getitem__ = stop_after_first_chunk
        try:
            make(cfg(name), state)
        except KeyboardInterrupt:
            pass
        finally:
            cls.__getitem__ = real
        state.wait_for_everyone()

    def counted(make, c, cls, state):
        real, done = cls.__getitem__, []
        cls.__getitem__ = lambda self, key: done.append(key if isinstance(key, int) else list(key)) or real(self, key)
        try:
            make(c, state)
        finally:
            cls.__getitem__ = real
        return done

    seen = {}
    for name in ("two", "one"):
        interrupted(make_cache, name, build._ImagesToEncode, 4)  # images are encoded in chunks of 4
        interrupted(lambda c, s: make_cache(c, s) or make_reference(c, s), name + "-ref", CachedPairs, 4)
    seen["cache_two"] = counted(make_cache, cfg("two"), build._ImagesToEncode, state)
    seen["reference_two"] = counted(make_reference, cfg("two-ref"), CachedPairs, state)
    if rank == 0:
        seen["cache_one"] = counted(make_cache, cfg("one"), build._ImagesToEncode, None)
        seen["reference_one"] = counted(make_reference, cfg("one-ref"), CachedPairs, None)
        make_cache(cfg("alone"), None)
        make_reference(cfg("alone"), None)
    state.wait_for_everyone()
    return seen


def _relabels(state, where: Path) -> dict:
    """The two-shard data set relabelled by both processes ("two"), then by process 0 alone ("one"): which shards
    each process scored."""
    import sys

    from diffusion_dpo.evaluation import relabel as module

    sys.path.insert(0, str(where))  # the reward module
    real, scored = module._relabel_table, []
    module._relabel_table = lambda table, name, *a: scored.append(Path(name).name) or real(table, name, *a)
    try:
        module.relabel(where / "in", "redness_reward:score", where / "two", state=state)
        seen = {"scored": list(scored)}
        if state.process_index == 0:
            module.relabel(where / "in", "redness_reward:score", where / "one")
    finally:
        module._relabel_table = real
    state.wait_for_everyone()
    return seen


def _scores(state, where: Path) -> dict:
    """A run of 10 images scored by both processes (`Scorer.fill`), then read by the main process: which images each
    process scored, what the main process scored afterwards, and the scores against one process's own."""
    import sys

    from diffusion_dpo.evaluation import compare as module

    sys.path.insert(0, str(where))  # the reward module
    real, scored = module._score_chunk, []
    module._score_chunk = lambda run, rows, reward, chunk: (scored.extend(rows[i]["file"] for i, _ in chunk)
                                                            or real(run, rows, reward, chunk))
    try:
        specs = module.parse_rewards(["redness_reward:score"])
        scorer = module.Scorer(specs)
        scorer.fill(state, where / "run")
        seen = {"scored": list(scored)}
        if state.process_index == 0:
            scored.clear()
            seen["scores"] = scorer(where / "run")["redness_reward:score"].tolist()
            seen["scored_after"] = list(scored)
            alone = module.Scorer(specs, cache=False)(where / "run")["redness_reward:score"]
            seen["alone"] = alone.tolist()
    finally:
        module._score_chunk = real
    state.wait_for_everyone()
    return seen


@pytest.fixture(scope="module")
def two(tmp_path_factory, tiny_sd, tiny_data) -> dict[str, list[dict]]:
    """{case: [what process 0 saw, what process 1 saw]} of two real gloo processes."""
    import socket

    from pickapic_fixtures import GARBAGE, row, write_pickapic

    out = tmp_path_factory.mktemp("two")
    for case in CASES:
        (out / case).mkdir()
    (out / "cache" / "paths.json").write_text(json.dumps({"model": str(tiny_sd), "data": str(tiny_data)}))
    from test_relabel import REDNESS, _data

    (out / "relabel" / "redness_reward.py").write_text(REDNESS)
    _data(out / "relabel")
    from test_compare import fake_run

    (out / "score" / "redness_reward.py").write_text(REDNESS)
    run = fake_run(out / "score" / "run", {(i, s): 0 for i in range(5) for s in (0, 1)}, [f"p{i}" for i in range(5)])
    from PIL import Image

    for k, image in enumerate(sorted((run / "images").iterdir())):  # each its own redness
        Image.new("RGB", (8, 8), (25 * k, 0, 255 - 25 * k)).save(image)
    write_pickapic(out / "split_check" / "data.parquet",
                   [row(f"r{i}", jpg_1=GARBAGE if i == 7 else None) for i in range(10)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_two_processes, args=(port, str(out)), nprocs=2, join=True)
    seen = {case: [json.loads((out / case / f"rank-{r}.json").read_text()) for r in (0, 1)] for case in CASES}
    seen["folder"] = out
    return seen


def test_a_folder_one_process_does_not_see_is_named_on_every_process(two):
    seen = two["shared"]
    assert seen[0]["error"].startswith("output_dir '") and seen[0]["error"].split("'")[1].endswith("shared/shared")
    for s in seen:  # (each names its own path: the same on a cluster)
        assert "is not shared by all processes: process(es) 1 (" in s["error"]


def test_the_sentinels_are_removed(two, tmp_path_factory):
    assert not list(tmp_path_factory.getbasetemp().rglob(".diffusion_dpo_shared_*"))


def test_a_decision_and_its_error_reach_every_process(two):
    assert [s["error"] for s in two["decide"]] == ["train.resume: 'x' is not a checkpoint directory"] * 2


def test_an_error_on_one_process_stops_all(two):
    """Process 1 fails where process 0 succeeds: both raise it (process 0 would otherwise wait at the next barrier)."""
    assert [s["error"] for s in two["agree"]] == ["process 1: cache.dir 'c' holds no cache"] * 2


def test_the_process_group_waits_as_long_as_asked(two):
    """process_state's default: train.process_group_timeout_minutes's (120), not torch's (10 under NCCL)."""
    from diffusion_dpo.config import TrainConfig

    assert TrainConfig().process_group_timeout_minutes == 120
    assert [s["timeout_s"] for s in two["timeout"]] == [120 * 60] * 2


def test_the_image_check_is_split_over_the_processes(two):
    """Each of 2 processes decodes half of the rows; both end with every row's verdict (the bad row skipped by both)
    and a second start decodes nothing, also where process 1's cache folder is empty (a node-local one)."""
    seen = two["split_check"]
    assert [s["error"] for s in seen] == [None, None]
    assert sorted(seen[0]["decoded"] + seen[1]["decoded"]) == list(range(10))
    assert [len(s["decoded"]) for s in seen] == [5, 5]
    assert seen[0]["kept"] == seen[1]["kept"] == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert seen[0]["first_bad"] == seen[1]["first_bad"] and "row 7: jpg_1 cannot be decoded" in seen[0]["first_bad"]
    assert seen[0]["decoded_again"] == seen[1]["decoded_again"] == []
    # process 1 with an empty cache folder (another node's) still decodes nothing and keeps the same pairs
    assert seen[0]["decoded_node_local"] == seen[1]["decoded_node_local"] == []
    assert seen[0]["kept_node_local"] == seen[1]["kept_node_local"] == seen[0]["kept"]


def test_a_cache_and_its_reference_built_by_two_processes_resume_after_a_kill_on_two_or_on_one(two):
    """Each of two processes builds its share of the chunks; killed after one chunk each, the build (and then the
    precomputed reference) resumes on two processes or on one, encodes only what is missing, and writes the files of
    one process building alone from the start, bit for bit."""
    from safetensors import safe_open

    seen, folder = two["cache"], two["folder"] / "cache"
    assert [s["error"] for s in seen] == [None, None]
    alone = json.loads((folder / "alone" / "manifest.json").read_text())
    n = alone["num_images"]
    assert n > 8 and len(alone["image_files"]) > 2
    resumed = seen[0]["cache_two"] + seen[1]["cache_two"]  # image rows: 2 chunks of 4 were written before the kill
    assert len(set(resumed)) == len(resumed) == n - 8 and seen[0]["cache_two"] and seen[1]["cache_two"]
    assert len(seen[0]["cache_one"]) == n - 8 and "cache_one" not in seen[1]
    for name in ("two", "one"):
        made = json.loads((folder / name / "manifest.json").read_text())
        for key in ("identity", "num_pairs", "num_images", "pair_files", "text_files", "image_files"):
            assert made[key] == alone[key], (name, key)
        for f in alone["pair_files"] + alone["text_files"] + alone["image_files"]:
            assert (folder / name / f["file"]).read_bytes() == (folder / "alone" / f["file"]).read_bytes(), f
        assert not (folder / f"{name}.tmp").exists()
    # the reference: 16 pairs (8 steps x batch 2) in chunks of 4, one chunk each before the kill
    assert [len(s["reference_two"]) for s in seen] == [4, 4] and len(seen[0]["reference_one"]) == 8

    def table(path):
        with safe_open(str(path), framework="pt") as f:
            return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    meta, tensors = table(folder / "alone.reference.safetensors")
    assert tensors["ref_mse"].shape == (16, 2)
    for name in ("two-ref", "one-ref"):
        other_meta, other = table(folder / f"{name}.reference.safetensors")
        assert other_meta == meta and all(torch.equal(other[k], tensors[k]) for k in tensors), name
        assert not (folder / f"{name}.reference.safetensors.parts").exists()


def test_relabel_splits_the_shards_over_the_processes(two):
    """Each of two processes scores one of the two shards; the data set and report are those of one process."""
    seen, folder = two["relabel"], two["folder"] / "relabel"
    assert [s["error"] for s in seen] == [None, None]
    assert sorted(seen[0]["scored"] + seen[1]["scored"]) == ["train-00000.parquet", "train-00001.parquet"]
    assert len(seen[0]["scored"]) == len(seen[1]["scored"]) == 1
    for shard in ("train-00000.parquet", "train-00001.parquet"):
        assert pq.read_table(folder / "two" / shard).equals(pq.read_table(folder / "one" / shard)), shard
    reports = [json.loads((folder / run / "relabel_report.json").read_text()) for run in ("two", "one")]
    assert reports[0] == reports[1] and reports[0]["rows"] == 6


# ---------------------------------------------------------------- the data order under another layout

def test_iterate_scoring_is_split_over_the_processes(two):
    """Scorer.fill: each process scores its half of the images (none twice), the main process appends them to the
    cache and then reads every score from it (scores nothing itself), equal to one process's own scores."""
    seen = two["score"]
    assert all(s["error"] is None for s in seen), seen
    first, second = seen[0]["scored"], seen[1]["scored"]
    assert len(first) == len(second) == 5 and not set(first) & set(second)
    assert seen[0]["scored_after"] == [] and seen[0]["scores"] == seen[0]["alone"]


def test_another_layout_continues_at_the_same_pair():
    """A run of 1 process x batch 3 stopped after one micro-batch (3 pairs) continues on 2 processes x batch 2 at
    pair 3 of the same order: the processes' first micro-batches together are pairs 3..6, with the seeds the first
    run would have given them."""
    sampler = PairSampler(20, seed=7)
    order = sampler.order(0)
    state = TrainState(step=1, epoch=0, position=3, layout=layout_of(1, 3, 1))
    messages = []
    continue_layout(state, layout_of(2, 2, 1), messages.append)
    assert state.position == 3 and state.layout == layout_of(2, 2, 1)
    assert messages == ["train.resume: written by 1 process(es) x batch 3 x accumulation 1, continued by 2 process(es) "
                        "x batch 2 x accumulation 1: at pair 3 of epoch 0 in the same order"]
    data = type("Data", (), {"batch_size": 2, "num_workers": 0})()
    keys = []
    for rank in (0, 1):
        dataset = [(i, s) for i, s in zip(order, (sampler.sample_seed(0, p) for p in range(20)))]
        by_pair = {int(i): s for i, s in dataset}

        class Items(torch.utils.data.Dataset):
            def __len__(self):
                return 20

            def __getitem__(self, key):
                return {"pair": torch.tensor(key[0]), "label": 1.0, "sample_seed": key[1] & 0x7FFFFFFFFFFFFFFF}

        _, batch = next(micro_batches(Items(), PairSampler(20, seed=7), data, state, rank, 2, pin_memory=False))
        keys += batch["pair"].tolist()
        assert [by_pair[p] & 0x7FFFFFFFFFFFFFFF for p in batch["pair"].tolist()] == batch["sample_seed"].tolist()
    assert keys == [int(i) for i in order[3:7]]


def test_a_checkpoint_from_before_layouts_counted_micro_batches():
    state = TrainState(step=2, epoch=1, position=2)  # two global micro-batches of 2 processes x batch 4
    continue_layout(state, layout_of(2, 4, 1), lambda m: pytest.fail(m))
    assert state.position == 16 and state.layout == layout_of(2, 4, 1)


# ---------------------------------------------------------------- resumes of several processes (accelerate launch)

def _launch(*args: str) -> subprocess.CompletedProcess:
    # --multi_gpu is accelerate's name for its torch.distributed launcher; without GPUs it runs gloo on the CPU
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                           "diffusion_dpo", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic

    return build_tiny_pickapic(tmp_path_factory.mktemp("data") / "pickapic", num_pairs=16)


# eps = 1: Adam ~ SGD with momentum, so fp32 reduction-order noise is not amplified (see test_training)
SGD_LIKE = ["--optim.lr", "0.1", "--optim.adam_epsilon", "1.0", "--optim.weight_decay", "0",
            "--train.checkpointing_steps", "1", "--train.max_steps", "3"]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "final" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_a_one_process_run_resumes_on_two_and_a_two_process_run_on_two(tmp_path, tiny_sd, tiny_data):
    """A 1-process full fine-tune (batch 4) resumed from its checkpoint-1 on 2 processes (batch 2: the same 4 pairs
    per step) continues at its pair 4: steps 2 and 3 draw its pairs, it ends with its weights (up to the reduction
    order's float noise) and says so. That 2-process run, resumed from its own checkpoint-2 on 2 processes, ends with
    its weights bit for bit, having run only step 3. (Multi-process resumes crashed in _load_checkpoint before:
    safetensors refused the device "cpu:0".)"""
    one = tmp_path / "one"
    assert main(fast(one, tiny_sd, tiny_data, "--data.batch_size", "4", *SGD_LIKE)) == 0
    moved = tmp_path / "one-on-two"
    res = _launch(*fast(moved, tiny_sd, tiny_data, "--data.batch_size", "2", *SGD_LIKE,
                        "--train.resume", str(one / "checkpoint-1")))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("train.resume: written by 1 process(es) x batch 4 x accumulation 1, continued by 2 "
                            "process(es) x batch 2 x accumulation 1: at pair 4 of epoch 0 in the same order") == 1
    a, b = _weights(one), _weights(moved)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    # each step's errors depend on which pairs it drew: steps 2 and 3 drew the 1-process run's pairs
    one_m, moved_m = (_metrics(run)[-2:] for run in (one, moved))
    for key in ("model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l"):
        assert [m[key] for m in moved_m] == pytest.approx([m[key] for m in one_m], rel=1e-4), key
    state = json.loads((moved / "checkpoint-2" / "train_state.json").read_text())
    assert state["position"] == 8 and state["layout"] == layout_of(2, 2, 1)

    again = tmp_path / "two-on-two"
    res = _launch(*fast(again, tiny_sd, tiny_data, "--data.batch_size", "2", *SGD_LIKE,
                        "--train.resume", str(moved / "checkpoint-2")))
    assert res.returncode == 0, res.stderr[-3000:]
    assert [m["step"] for m in _metrics(again)] == [3] and "train.resume: written by" not in res.stdout
    a, b = _weights(moved), _weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_streamed_run_of_two_processes_resumes_exactly_and_only_on_two(tmp_path, tiny_sd, tiny_data, capsys):
    """data.streaming on 2 gloo processes (each its shard of 2): checkpoint-2's loader_state.json holds both
    processes' states; resumed on 2 it runs step 3 only and ends with the straight run's weights bit for bit; on 1
    process it is refused in one line before any step."""
    streamed = ["--data.streaming", "true", "--data.shuffle_buffer", "3", "--data.batch_size", "2", *SGD_LIKE]
    straight = tmp_path / "straight"
    res = _launch(*fast(straight, tiny_sd, tiny_data, *streamed))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "streamed, 2 shard(s), each of 2 processes reads 1" in res.stdout
    states = json.loads((straight / "checkpoint-2" / "loader_state.json").read_text())
    assert len(states) == 2 and states[0] != states[1]
    again = tmp_path / "again"
    res = _launch(*fast(again, tiny_sd, tiny_data, *streamed, "--train.resume", str(straight / "checkpoint-2")))
    assert res.returncode == 0, res.stderr[-3000:]
    assert [m["step"] for m in _metrics(again)] == [3]
    assert [m["loss"] for m in _metrics(again)] == [m["loss"] for m in _metrics(straight)][-1:]
    a, b = _weights(straight), _weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(fast(tmp_path / "one", tiny_sd, tiny_data, *streamed,
                     "--train.resume", str(straight / "checkpoint-2"))) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "streamed with processes 2 (now 1)" in err[0], err
