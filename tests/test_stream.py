"""data.streaming: a streamed data set is read as training goes, each process its shards, and resumes exactly."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.stream import StreamedPairs, open_stream, row_pair
from diffusion_dpo.errors import UserError
from diffusion_dpo.training import Trainer, train
from diffusion_dpo.training.loop import StreamBatches
from pickapic_fixtures import GARBAGE, row, write_pickapic
from test_training import make_cfg, read_metrics, straight_and_resumed


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic

    return build_tiny_pickapic(tmp_path_factory.mktemp("data") / "pickapic", num_pairs=40, num_shards=4, seed=3)


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    """4 shards of 10 rows, each caption its own (r0 .. r39), every 7th row a tie."""
    root = tmp_path_factory.mktemp("named")
    for k in range(4):
        write_pickapic(root / f"train-{k:05d}-of-00004.parquet",
                       [row(f"r{i}", label_0=0.5 if i % 7 == 3 else float(i % 2)) for i in range(10 * k, 10 * k + 10)])
    return root


def _tokenize(prompts):
    return {"input_ids": torch.tensor([[len(p)] for p in prompts])}


def _captions(items) -> list[str]:
    return [i["prompt"] for i in items]


def _stream(cfg: DataConfig, rank: int = 0, world: int = 1, seed: int = 0) -> StreamedPairs:
    return StreamedPairs(open_stream(cfg, rank, world), cfg, _tokenize, seed, rank)


def _usable_captions(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(path.glob("*.parquet")), columns=["caption", "label_0"]) if path.is_dir() \
        else pq.read_table(path, columns=["caption", "label_0"])
    return sorted(c for c, l in zip(table.column("caption").to_pylist(), table.column("label_0").to_pylist())
                  if l != 0.5)


def test_an_epoch_visits_every_decided_pair_once_in_a_seeded_order(named):
    cfg = DataConfig(path=str(named), resolution=32, shuffle_buffer=7, proportion_empty_prompts=0.0)
    usable = _usable_captions(named)
    items = iter(_stream(cfg))
    epoch0 = [next(items) for _ in range(len(usable))]
    assert {i["stream_epoch"] for i in epoch0} == {0} and next(items)["stream_epoch"] == 1
    assert sorted(_captions(epoch0)) == usable  # ties dropped, every other row once
    again = iter(_stream(cfg))
    assert _captions(epoch0) == _captions(next(again) for _ in usable)  # the same seed: the same order
    other = iter(_stream(cfg, seed=1))
    assert _captions(epoch0) != _captions(next(other) for _ in usable)  # rows permuted by the seed
    winner_first = [i for i in epoch0 if i["label"] == 1.0]
    assert len(winner_first) == len(usable)


def test_processes_read_disjoint_shards_that_make_up_the_whole(named):
    cfg = DataConfig(path=str(named), resolution=32, shuffle_buffer=5, proportion_empty_prompts=0.0)
    parts = []
    for rank in (0, 1):
        source = open_stream(cfg, rank, 2)
        assert source.num_shards == 4 and "each of 2 processes reads 2" in source.summary()
        items, seen = iter(StreamedPairs(source, cfg, _tokenize, 0, rank)), []
        while (item := next(items))["stream_epoch"] == 0:
            seen.append(item["prompt"])
        parts.append(seen)
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == _usable_captions(named)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_state_continues_at_the_same_item(shards, workers):
    """StatefulDataLoader's state, as JSON, mid-block and across an epoch's end: the rest of the stream is equal."""
    cfg = DataConfig(path=str(shards), resolution=32, shuffle_buffer=6, batch_size=3, num_workers=workers)

    def batches(state=None):
        return StreamBatches(_stream(cfg), cfg, False, state)

    straight = batches()
    seen = [next(straight) for _ in range(22)]  # 66 items: past the first epoch (36 pairs)
    first = batches()
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # what loader_state.json holds
    first.close()
    resumed = batches(state)
    rest = [next(resumed) for _ in range(15)]
    assert [(e, b["sample_seed"].tolist()) for e, b in seen[7:]] == [(e, b["sample_seed"].tolist()) for e, b in rest]
    assert all(torch.equal(a[1]["pixel_values"], b[1]["pixel_values"]) for a, b in zip(seen[7:], rest))
    assert {e for e, _ in rest} == {0, 1}


def test_bad_rows_are_skipped_and_counted_ties_kept_when_asked(tmp_path):
    rows = [row(f"p{i}") for i in range(6)]
    rows[1] = row("garbage", jpg_1=GARBAGE)
    rows[2] = row(None)
    rows[3] = row("bad label", label_0=0.3, label_1=0.7)
    rows[4] = row("tie", label_0=0.5)
    data = write_pickapic(tmp_path / "d.parquet", rows)
    cfg = DataConfig(path=str(data), resolution=32, shuffle_buffer=100, random_flip=False,
                     proportion_empty_prompts=0.0)
    items = iter(_stream(cfg))
    epoch = [next(items) for _ in range(3)]  # the bad rows after an epoch's last pair count with the next pair
    assert sorted(_captions(epoch[:2])) == ["p0", "p5"] and epoch[2]["stream_epoch"] == 1
    assert sum(i["bad_pairs_skipped"] for i in epoch) == 3
    with_ties = iter(_stream(DataConfig(**{**vars(cfg), "keep_ties": True})))
    epoch = [next(with_ties) for _ in range(3)]
    assert sorted((i["prompt"], i["label"]) for i in epoch) == [("p0", 1.0), ("p5", 1.0), ("tie", 0.5)]
    red = torch.tensor([1.0, -1.0, -1.0])  # rows' jpg_0 is red and won (label_0 1): the winner comes first
    assert torch.allclose(epoch[0]["pixel_values"][0, :, 0, 0], red)


def test_a_row_is_checked_as_the_up_front_check_does():
    caption, win, lose, label = row_pair(row("c", jpg_0=b"A", jpg_1=b"B", label_0=0.0))
    assert (caption, win, lose, label) == ("c", b"B", b"A", 1.0)
    for bad, says in [(row("c", label_0=1.0, label_1=1.0), "label_1 is 1.0 but label_0 is 1"),
                      (row("c", label_0=None), "label_0 is null"),
                      (row("c", jpg_0={"bytes": None, "path": "/etc/passwd"}), "jpg_0 holds a file path")]:
        with pytest.raises(ValueError, match=says):
            row_pair(bad)


def _unet(path: Path) -> dict:
    return load_file(path / "unet" / "diffusion_pytorch_model.safetensors")


def test_a_streamed_data_set_trains_and_resumes_exactly(tmp_path, tiny_sd, shards):
    """Killed after step 3 (checkpoint at 2, mid-block, loader workers reading ahead), resumed: bitwise equal."""
    common = dict(train__max_steps=5, train__checkpointing_steps=2, data__streaming="true", data__shuffle_buffer=5,
                  data__batch_size=3, data__num_workers=2)
    straight, resumed = straight_and_resumed(tmp_path, tiny_sd, shards, **common)
    a, b = _unet(straight), _unet(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]
    states = json.loads((tmp_path / "b" / "checkpoint-2" / "loader_state.json").read_text())
    assert len(states) == 1 and "_snapshot" in states[0]
    assert "(streamed" in (straight / "README.md").read_text()


def test_a_streamed_resume_refuses_another_layout_in_one_line(tmp_path, tiny_sd, shards):
    common = dict(train__max_steps=2, train__checkpointing_steps=1, data__streaming="true", data__shuffle_buffer=5)
    train(make_cfg(tmp_path / "s", tiny_sd, shards, **common))
    with pytest.raises(UserError, match=r"streamed with batch_size 2 \(now 3\)"):
        Trainer(make_cfg(tmp_path / "s", tiny_sd, shards, train__resume=str(tmp_path / "s" / "checkpoint-1"),
                         **{**common, "data__batch_size": 3})).run()
    with pytest.raises(UserError, match="resume it with data.streaming true"):
        Trainer(make_cfg(tmp_path / "s", tiny_sd, shards, train__resume=str(tmp_path / "s" / "checkpoint-1"),
                         train__max_steps=2)).run()
    train(make_cfg(tmp_path / "m", tiny_sd, shards, train__max_steps=2, train__checkpointing_steps=1))
    with pytest.raises(UserError, match="not written by a streamed run"):
        Trainer(make_cfg(tmp_path / "m", tiny_sd, shards, train__resume=str(tmp_path / "m" / "checkpoint-1"),
                         **common)).run()


@pytest.mark.parametrize("setting, says", [
    ({"cache.dir": "c"}, "cannot feed a cache"),
    ({"data.max_pairs": "4"}, "cannot take data.max_pairs"),
    ({"loss.name": "kto"}, "unpaired items"),
    ({"data.shuffle_buffer": "0"}, "data.shuffle_buffer must be >= 1"),
])
def test_streaming_refuses_what_needs_the_whole_data_set(tmp_path, shards, setting, says):
    from diffusion_dpo.config import load_config

    with pytest.raises(UserError, match=says):
        load_config(None, {"model.pretrained": "m", "data.path": str(shards), "data.streaming": "true", **setting})


def test_streaming_takes_parquet_or_a_hub_id_only(tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("{}\n")
    with pytest.raises(UserError, match="is not parquet"):
        open_stream(DataConfig(path=str(jsonl)), 0, 1)
    with pytest.raises(UserError, match="does not exist"):
        open_stream(DataConfig(path=str(tmp_path / "missing" / "x.parquet")), 0, 1)
    broken = write_pickapic(tmp_path / "b.parquet", [row("a")], drop=("label_0",))
    with pytest.raises(UserError, match="missing column"):
        open_stream(DataConfig(path=str(broken)), 0, 1)


def test_a_hub_id_is_streamed_at_its_pinned_commit_each_process_its_shards(named, monkeypatch):
    """A hub id goes to datasets.load_dataset(id, split, revision, streaming=True) (here answered by the local shards,
    as the hub would serve them), then split_dataset_by_node: each of 2 processes its own 2 of the 4 shards."""
    import datasets

    calls = []
    real = datasets.load_dataset

    def load(path, *args, **kwargs):
        calls.append((path, kwargs))
        return real("parquet", data_files={"train": sorted(str(f) for f in named.glob("*.parquet"))},
                    split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", load)
    cfg = DataConfig(path="yuvalkirstain/pickapic_v2", revision="0123abc", resolution=32, shuffle_buffer=5,
                     proportion_empty_prompts=0.0)
    seen = []
    for rank in (0, 1):
        source = open_stream(cfg, rank, 2)
        items, part = iter(StreamedPairs(source, cfg, _tokenize, 0, rank)), []
        while (item := next(items))["stream_epoch"] == 0:
            part.append(item["prompt"])
        seen.append(part)
    assert calls == [("yuvalkirstain/pickapic_v2", {"split": "train", "revision": "0123abc", "streaming": True})] * 2
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == _usable_captions(named)
