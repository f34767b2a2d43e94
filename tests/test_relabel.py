"""AI-feedback relabelling: a reward that prefers a known property flips exactly the pairs it should."""

import json
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from diffusion_dpo.cli import main
from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.pairs import load_preference_pairs
from diffusion_dpo.errors import UserError
from diffusion_dpo.evaluation.relabel import new_labels, relabel
from pickapic_fixtures import BLUE, RED, row, solid, write_pickapic

REWARD = "redness_reward:score"
REDNESS = ("import numpy as np\n"
           "def score(images, prompts):\n"
           "    return [float(np.asarray(im, dtype=np.float32)[..., 0].mean()\n"
           "                  - np.asarray(im, dtype=np.float32)[..., 2].mean()) for im in images]\n")


@pytest.fixture(autouse=True)
def redness_reward(tmp_path, monkeypatch):
    """A reward that prefers red: mean(R) - mean(B)."""
    (tmp_path / "redness_reward.py").write_text(REDNESS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("redness_reward", None)


def _data(tmp_path):
    rows = [
        row("a", jpg_0=solid(RED), jpg_1=solid(BLUE), label_0=1.0),   # people agree with the reward
        row("b", jpg_0=solid(RED), jpg_1=solid(BLUE), label_0=0.0),   # people chose blue: flipped
        row("c", jpg_0=solid(BLUE), jpg_1=solid(RED), label_0=1.0),   # people chose blue: flipped
        row("d", jpg_0=solid(BLUE), jpg_1=solid(RED), label_0=0.0),   # agree
        row("e", jpg_0=solid(RED), jpg_1=solid(RED), label_0=1.0),    # the reward cannot tell: a tie
        row("f", jpg_0=solid(RED), jpg_1=solid(BLUE), label_0=0.5),   # a human tie the reward decides
    ]
    write_pickapic(tmp_path / "in" / "train-00000.parquet", rows[:3])
    write_pickapic(tmp_path / "in" / "train-00001.parquet", rows[3:])
    return tmp_path / "in"


def test_new_labels_hand_computed():
    labels = new_labels(np.array([1.0, 0.0, 0.5, 2.0]), np.array([0.0, 1.0, 0.45, 2.0]), margin=0.1)
    assert labels.tolist() == [1.0, 0.0, 0.5, 0.5]


def test_relabel_flips_exactly_the_pairs_it_should(tmp_path):
    report = relabel(_data(tmp_path), REWARD, tmp_path / "out", batch_size=2)
    tables = [pq.read_table(tmp_path / "out" / f"train-0000{i}.parquet") for i in (0, 1)]
    labels = sum((t.column("label_0").to_pylist() for t in tables), [])
    assert labels == [1.0, 1.0, 0.0, 0.0, 0.5, 1.0]  # red always wins; the red-red pair is a tie
    assert sum((t.column("label_1").to_pylist() for t in tables), []) == [0.0, 0.0, 1.0, 1.0, 0.5, 0.0]
    best = sum((t.column("best_image_uid").to_pylist() for t in tables), [])
    assert best[1] == "u0" and best[2] == "u1"  # follows the new winner
    assert set(tables[0].column_names) >= set(pq.read_table(tmp_path / "in" / "train-00000.parquet").column_names)
    assert report["rows"] == 6 and report["decided"] == 5 and report["ties"] == 1 and report["dropped"] == 0
    assert report["compared"] == 4 and report["agree"] == 2 and report["agreement"] == 0.5
    # the result is training data: winner-first pairs, the tie dropped as usual
    pairs = load_preference_pairs(DataConfig(path=str(tmp_path / "out"), num_workers=0))
    assert len(pairs) == 5 and pairs.num_ties_dropped == 1


def test_drop_ties_margin_and_resume(tmp_path):
    data = _data(tmp_path)
    out = tmp_path / "out"
    report = relabel(data, REWARD, out, margin=1e9, drop_ties=True)  # everything is a tie
    assert report["ties"] == 6 and report["dropped"] == 6
    first = (out / "train-00000.parquet").stat().st_mtime_ns
    again = relabel(data, REWARD, out, margin=1e9, drop_ties=True)  # finished shards are not redone
    assert (out / "train-00000.parquet").stat().st_mtime_ns == first and again["rows"] == 6
    (out / "train-00001.stats.json").unlink()  # as if killed before the second shard finished
    assert relabel(data, REWARD, out, margin=1e9, drop_ties=True)["rows"] == 6
    assert (out / "train-00000.parquet").stat().st_mtime_ns == first
    with pytest.raises(UserError, match="other settings \\(margin\\)"):
        relabel(data, REWARD, out, margin=0.0, drop_ties=True)


def test_local_jsonl(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), RED).save(tmp_path / "imgs" / "red.png")
    Image.new("RGB", (8, 8), BLUE).save(tmp_path / "imgs" / "blue.png")
    (tmp_path / "d.jsonl").write_text(
        '{"prompt": "p", "chosen": "imgs/blue.png", "rejected": "imgs/red.png"}\n'
        '{"prompt": "q", "chosen": "imgs/red.png", "rejected": "imgs/blue.png"}\n'
        '{"prompt": "r", "chosen": "imgs/red.png", "rejected": "imgs/red.png"}\n')
    report = relabel(tmp_path / "d.jsonl", REWARD, tmp_path / "out")
    lines = [json.loads(x) for x in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    # self-contained: the images are hard links under out/images/, named relative to out/
    red = (tmp_path / "imgs" / "red.png").read_bytes()
    assert [(tmp_path / "out" / x["chosen"]).read_bytes() for x in lines] == [red, red]
    assert all(x[k].startswith("images/") for x in lines for k in ("chosen", "rejected"))
    assert (tmp_path / "out" / lines[0]["chosen"]).stat().st_ino == (tmp_path / "imgs" / "red.png").stat().st_ino
    assert report["dropped"] == 1 and report["agreement"] == 0.5
    out = str(tmp_path / "out" / "pairs.jsonl")  # trains as it is, with no data.image_root
    assert len(load_preference_pairs(DataConfig(path=out, num_workers=0))) == 2


def test_relabel_reads_images_under_the_data_rules(tmp_path):
    import pyarrow as pa

    from pickapic_fixtures import GREEN
    from diffusion_dpo.testing.tiny_data import SCHEMA

    secret = tmp_path / "secret.png"
    secret.write_bytes(solid(GREEN))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([pa.field("jpg_1", image) if f.name == "jpg_1" else f for f in SCHEMA])
    rows = [row("a", jpg_1={"bytes": solid(BLUE), "path": None}), row("b", jpg_1={"bytes": None, "path": str(secret)})]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "in" / "cells.parquet")
    with pytest.raises(UserError, match=r"cells.parquet row 1: jpg_1 holds a file path, not image bytes"):
        relabel(tmp_path / "in", REWARD, tmp_path / "out")
    (tmp_path / "d" / "imgs").mkdir(parents=True)
    (tmp_path / "d" / "imgs" / "red.png").write_bytes(solid(RED))
    (tmp_path / "d" / "d.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "imgs/red.png",
                                                        "rejected": str(secret)}) + "\n")
    with pytest.raises(UserError, match=r"d.jsonl line 1: image '.*secret.png' lies outside"):
        relabel(tmp_path / "d" / "d.jsonl", REWARD, tmp_path / "out2")
    assert relabel(tmp_path / "d" / "d.jsonl", REWARD, tmp_path / "out3", image_root=str(tmp_path))["rows"] == 1


def test_relabel_cli_and_its_errors(tmp_path, capsys):
    data = _data(tmp_path)
    assert main(["relabel", "--data", str(data), "--reward", REWARD, "--output-dir", str(tmp_path / "o")]) == 0
    assert "agreement with the original labels: 0.500 of 4" in capsys.readouterr().out
    # train's spelling of the same flags (issue 35: one grammar): --data.path, --data.split
    assert main(["relabel", "--data.path", str(data), "--data.split", "train", "--reward", REWARD,
                 "--output-dir", str(tmp_path / "o")]) == 0
    assert "agreement with the original labels: 0.500 of 4" in capsys.readouterr().out
    for args, expected in [
        (["--reward", "nosuch"], "unknown reward 'nosuch'"),
        (["--data", str(tmp_path / "missing")], "not found"),
        (["--margin", "-1"], "--margin must be >= 0"),
    ]:
        base = {"--data": str(data), "--reward": REWARD, "--output-dir": str(tmp_path / "o2")}
        base.update(dict(zip(args[::2], args[1::2])))
        rc = main(["relabel", *sum(([k, v] for k, v in base.items()), [])])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and expected in err, err
        assert not (tmp_path / "o2").exists()  # nothing written for a bad command


def test_save_to_disk_input(tmp_path):
    import datasets

    data = _data(tmp_path)
    ds = datasets.Dataset.from_parquet([str(p) for p in sorted(data.glob("*.parquet"))],
                                       cache_dir=str(tmp_path / "cache"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    report = relabel(tmp_path / "saved", REWARD, tmp_path / "out")
    labels = pq.read_table(tmp_path / "out" / "train-00000.parquet").column("label_0").to_pylist()
    assert labels == [1.0, 1.0, 0.0, 0.0, 0.5, 1.0] and report["agreement"] == 0.5
    with pytest.raises(UserError, match="split 'test' not found"):
        relabel(tmp_path / "saved", REWARD, tmp_path / "out2", split="test")
