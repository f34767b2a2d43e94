"""Tests for diffusion_dpo.data.pairs: sources, validation errors, winner-first order, augmentation, order."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.items import PairSampler, PreferenceDataset, collate_pairs
from diffusion_dpo.data.pairs import load_preference_pairs
from diffusion_dpo.models import PromptTokenizer
from diffusion_dpo.errors import UserError
from diffusion_dpo.testing.tiny_data import build_tiny_pickapic
from pickapic_fixtures import (BLUE, GARBAGE, GREEN, RED, cmyk_jpeg, exif_rotated_jpeg, gradient, gray_png, i16_png,
                               make_tokenizer, palette_png, rgba_png, row, solid, truncated_jpeg, write_pickapic)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    """Keep the Arrow cache that Dataset.from_parquet writes out of the user's home."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def dcfg(path, **kw) -> DataConfig:
    base = dict(path=str(path), resolution=16, num_workers=0, proportion_empty_prompts=0.0, random_flip=False)
    return DataConfig(**{**base, **kw})


def load_error(cfg: DataConfig) -> str:
    with pytest.raises(UserError) as info:
        load_preference_pairs(cfg)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def mean_rgb(pixels: torch.Tensor) -> list[float]:
    """(3, R, R) in [-1, 1] -> mean per channel in [0, 255]."""
    return [float((pixels[c].mean() + 1) * 127.5) for c in range(3)]


def is_colour(pixels: torch.Tensor, colour, tol: float = 8.0) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(mean_rgb(pixels), colour))


# ---------------------------------------------------------------- sources, winner first


def test_parquet_file_winner_first_and_labels(tmp_path, tok):
    f = write_pickapic(tmp_path / "d.parquet", [
        row("jpg_0 wins", jpg_0=solid(RED), jpg_1=solid(BLUE), label_0=1.0),
        row("jpg_1 wins", jpg_0=solid(RED), jpg_1=solid(BLUE), label_0=0.0),
        row("", jpg_0=solid(GREEN), jpg_1=solid(RED), label_0=1),  # "" is a valid prompt
    ])
    pairs = load_preference_pairs(dcfg(f))
    assert len(pairs) == 3 and pairs.num_ties_dropped == 0 and pairs.num_bad_skipped == 0
    assert pairs.summary() == f"{f}: 3 rows, 3 pairs used, 0 ties dropped, 0 bad rows skipped"
    caption, win, lose, label = pairs.get(1)
    assert (caption, win, lose, label) == ("jpg_1 wins", solid(BLUE), solid(RED), 1.0)
    ds = PreferenceDataset(pairs, dcfg(f), ids(tok))
    expected = [(RED, BLUE), (BLUE, RED), (GREEN, RED)]
    for i, (winner, loser) in enumerate(expected):
        item = ds[(i, 0)]
        assert is_colour(item["pixel_values"][0], winner) and is_colour(item["pixel_values"][1], loser)
        assert item["label"] == 1.0
    assert ds[(2, 0)]["prompt"] == "" and pairs.where(1) == f"{f} row 1"


def test_parquet_dir_two_shards_in_order_with_per_file_row_names(tmp_path):
    d = tmp_path / "pick"
    write_pickapic(d / "train-00000-of-00002.parquet", [row(f"c{i}") for i in range(3)])
    write_pickapic(d / "train-00001-of-00002.parquet", [row(f"c{i}") for i in range(3, 6)])
    pairs = load_preference_pairs(dcfg(d))
    assert [pairs.get(i)[0] for i in range(len(pairs))] == [f"c{i}" for i in range(6)]
    assert pairs.where(4) == f"{d}/train-00001-of-00002.parquet row 1"
    write_pickapic(d / "train-00001-of-00002.parquet", [row("x"), row("y", label_0=0.7, label_1=0.3)])
    msg = load_error(dcfg(d))
    assert msg == f"{d}/train-00001-of-00002.parquet row 1: label_0 is 0.7, expected 0, 0.5 or 1"


def test_parquet_dir_prefers_files_of_the_split(tmp_path):
    d = tmp_path / "hub_layout"
    write_pickapic(d / "data" / "train-00000-of-00001.parquet", [row("train")])
    write_pickapic(d / "data" / "validation-00000-of-00001.parquet", [row("validation")])
    write_pickapic(d / "data" / "validation_unique-00000-of-00001.parquet", [row("validation_unique")])
    write_pickapic(d / "test" / "0000.parquet", [row("test")])
    captions = lambda split: [p[0] for p in map(load_preference_pairs(dcfg(d, split=split)).get, range(1))]  # noqa
    assert captions("train") == ["train"]
    assert captions("validation") == ["validation"]
    assert captions("test") == ["test"]
    assert len(load_preference_pairs(dcfg(d, split="nomatch"))) == 4  # no split names: every file


@pytest.mark.parametrize("image_feature", [False, True])
def test_save_to_disk_dataset(tmp_path, image_feature):
    import datasets

    ds = datasets.Dataset.from_list([row("a", label_0=0.0), row("b", label_0=1.0)])
    if image_feature:  # stored as {"bytes", "path"} structs and decoded to PIL by default: we keep bytes
        ds = ds.cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    pairs = load_preference_pairs(dcfg(tmp_path / "saved"))
    assert pairs.get(0)[1:] == (solid(BLUE), solid(RED), 1.0)
    assert pairs.get(1)[1:] == (solid(RED), solid(BLUE), 1.0)
    assert pairs.where(1) == f"{tmp_path / 'saved'} row 1"


def test_save_to_disk_datasetdict_split_and_missing_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([row("tr")]),
                               "test": datasets.Dataset.from_list([row("te1"), row("te2", label_0=0.5, label_1=0.5)])})
    dd.save_to_disk(str(tmp_path / "dd"))
    pairs = load_preference_pairs(dcfg(tmp_path / "dd", split="test"))
    assert len(pairs) == 1 and pairs.get(0)[0] == "te1" and pairs.num_ties_dropped == 1
    msg = load_error(dcfg(tmp_path / "dd", split="validation"))
    assert "split 'validation' not found" in msg and "available splits: train, test" in msg


def _images(tmp_path: Path) -> Path:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "red.png").write_bytes(solid(RED))
    (tmp_path / "imgs" / "blue.png").write_bytes(solid(BLUE, size=(32, 48)))
    (tmp_path / "imgs" / "bad.png").write_bytes(GARBAGE)
    return tmp_path


def test_jsonl_local_format(tmp_path):
    _images(tmp_path)
    lines = [json.dumps({"prompt": "p1", "chosen": "imgs/red.png", "rejected": "imgs/blue.png",
                         "chosen_score": 0.9, "rejected_score": 1}),
             "",
             json.dumps({"prompt": "p2", "chosen": str(tmp_path / "imgs" / "blue.png"), "rejected": "imgs/red.png"}),
             json.dumps({"prompt": "odd\u2028separator", "chosen": "imgs/red.png", "rejected": "imgs/blue.png"},
                        ensure_ascii=False)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    pairs = load_preference_pairs(dcfg(tmp_path / "data.jsonl"))
    assert len(pairs) == 3 and pairs.get(2)[0] == "odd\u2028separator"
    prompt, win, lose, label = pairs.get(0)
    assert (prompt, Path(win).name, Path(lose).name, label) == ("p1", "red.png", "blue.png", 1.0)
    assert Path(pairs.get(1)[1]).name == "blue.png" and pairs.where(1).endswith("data.jsonl line 3")
    item = PreferenceDataset(pairs, dcfg(tmp_path / "data.jsonl"), ids(make_tokenizer()))[(1, 3)]
    assert item["original_sizes"].tolist() == [[48, 32], [32, 40]]


def test_csv_local_format(tmp_path):
    _images(tmp_path)
    (tmp_path / "d.csv").write_text('prompt,chosen,rejected,chosen_score\n"a, quoted",imgs/blue.png,imgs/red.png,\n'
                                    ',imgs/red.png,imgs/blue.png,2.5\n"two\nlines",imgs/red.png,imgs/blue.png,\n')
    pairs = load_preference_pairs(dcfg(tmp_path / "d.csv"))
    assert [pairs.get(i)[0] for i in range(3)] == ["a, quoted", "", "two\nlines"]
    assert pairs.where(1).endswith("d.csv line 3")
    assert Path(pairs.get(0)[1]).name == "blue.png"


def test_json_array_local_format(tmp_path):
    _images(tmp_path)
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "p", "chosen": "imgs/red.png", "rejected": "imgs/blue.png"},
                                                 {"prompt": "q", "chosen": "imgs/red.png"}]))
    assert load_error(dcfg(tmp_path / "d.json")).endswith("d.json item 1: missing key(s) rejected")


def test_hub_id_offline_and_missing_local_path(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub (offline mode is enabled)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    msg = load_error(dcfg("someone/pickapic"))
    assert msg == ("data.path 'someone/pickapic' is not a local file or directory and could not be loaded from "
                   "the hub: Couldn't reach the Hub (offline mode is enabled)")
    assert load_error(dcfg(tmp_path / "nope.parquet")) == f"data.path '{tmp_path / 'nope.parquet'}' not found"


def test_tiny_pickapic_builder(tmp_path):
    import pyarrow.parquet as pq

    out = build_tiny_pickapic(tmp_path / "tiny", num_pairs=40, seed=3)
    files = sorted(out.glob("*.parquet"))
    assert [f.name for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    table = pq.read_table(files[0])
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "are_different", "has_label", "best_image_uid",
            "image_0_uid", "image_1_uid", "image_0_url", "image_1_url", "model_0", "model_1", "ranking_id",
            "user_id", "num_example_per_prompt", "created_at"} == set(table.column_names)
    pairs = load_preference_pairs(dcfg(out))
    assert len(pairs) + pairs.num_ties_dropped == 40 and pairs.num_ties_dropped > 0
    assert 0 < pairs.winner_is_1.sum() < len(pairs)
    again = build_tiny_pickapic(tmp_path / "again", num_pairs=40, seed=3)
    assert pq.read_table(again / files[1].name).equals(pq.read_table(files[1]))


# ---------------------------------------------------------------- ties


def test_ties_dropped_and_counted_or_kept_with_half_label(tmp_path):
    f = write_pickapic(tmp_path / "t.parquet", [row(label_0=1.0), row(label_0=0.5), row(label_0=0.0),
                                                 row(label_0=0.5000000001, label_1=0.5)])
    pairs = load_preference_pairs(dcfg(f))
    assert len(pairs) == 2 and pairs.num_ties_dropped == 2 and "2 ties dropped" in pairs.summary()
    kept = load_preference_pairs(dcfg(f, keep_ties=True))
    assert [kept.get(i)[3] for i in range(4)] == [1.0, 0.5, 1.0, 0.5] and kept.num_ties_dropped == 0


# ---------------------------------------------------------------- augmentation


def _columns(pixels: torch.Tensor, channel: int) -> np.ndarray:
    """Decode `gradient` pixels back to the source column index of each output column."""
    return np.round((pixels[channel, 0].numpy() + 1) * 127.5 / 4).astype(int)


def test_same_flip_and_crop_for_both_images_and_reproducible(tmp_path, tok):
    f = write_pickapic(tmp_path / "g.parquet", [row(jpg_0=gradient(channel=0), jpg_1=gradient(channel=1))])
    cfg = dcfg(f, random_crop=True, random_flip=True)
    ds = PreferenceDataset(load_preference_pairs(cfg), cfg, ids(tok))
    seen = set()
    for seed in range(40):
        item = ds[(0, seed)]
        (top_w, left_w), (top_l, left_l) = item["crop_top_lefts"].tolist()
        assert (top_w, left_w) == (top_l, left_l) and top_w == 0
        cols_w, cols_l = _columns(item["pixel_values"][0], 0), _columns(item["pixel_values"][1], 1)
        assert np.array_equal(cols_w, cols_l)
        flipped = cols_w[0] > cols_w[-1]
        # The recorded left is the crop's left edge in the (flipped, if so) resized image.
        expected = 63 - left_w - np.arange(16) if flipped else left_w + np.arange(16)
        assert np.array_equal(cols_w, expected)
        seen.add((bool(flipped), left_w))
        again = ds[(0, seed)]
        assert all(torch.equal(item[k], again[k]) for k in ("pixel_values", "crop_top_lefts", "input_ids"))
    assert len(seen) > 10 and {flip for flip, _ in seen} == {False, True}


def test_original_sizes_and_center_crop_offsets(tmp_path, tok):
    f = write_pickapic(tmp_path / "s.parquet", [row(jpg_0=solid(RED, (64, 32)), jpg_1=solid(BLUE, (20, 40)))])
    cfg = dcfg(f)
    item = PreferenceDataset(load_preference_pairs(cfg), cfg, ids(tok))[(0, 0)]
    assert item["original_sizes"].tolist() == [[32, 64], [40, 20]]  # (height, width) before resizing
    # resized to 32x16 (w x h) -> left (32-16)/2 = 8; 16x32 -> top 8
    assert item["crop_top_lefts"].tolist() == [[0, 8], [8, 0]]
    assert item["pixel_values"].shape == (2, 3, 16, 16) and item["pixel_values"].dtype == torch.float32


def test_caption_dropout_rate(tmp_path, tok):
    f = write_pickapic(tmp_path / "c.parquet", [row("a cat", jpg_0=solid(RED, (16, 16)), jpg_1=solid(BLUE, (16, 16)))])
    pairs = load_preference_pairs(dcfg(f))
    empty_ids = tok("", padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids[0]

    def dropped(p: float, n: int) -> list[bool]:
        ds = PreferenceDataset(pairs, dcfg(f, proportion_empty_prompts=p), ids(tok))
        items = [ds[(0, s)] for s in range(n)]
        assert all(torch.equal(it["input_ids"], empty_ids) == (it["prompt"] == "") for it in items)
        return [it["prompt"] == "" for it in items]

    assert not any(dropped(0.0, 50)) and all(dropped(1.0, 50))
    assert 0.2 <= np.mean(dropped(0.3, 300)) <= 0.4


def test_odd_images_become_rgb_in_unit_range(tmp_path, tok):
    odd = {"gray": gray_png(), "rgba": rgba_png(), "palette_transparent": palette_png(),
           "palette": palette_png(transparent=False), "i16": i16_png(), "cmyk": cmyk_jpeg(),
           "exif": exif_rotated_jpeg(), "odd_size": solid(GREEN, (17, 9))}
    f = write_pickapic(tmp_path / "odd.parquet", [row(name, jpg_0=img) for name, img in odd.items()])
    cfg = dcfg(f)
    pairs = load_preference_pairs(cfg)  # every image decodes in validation
    ds = PreferenceDataset(pairs, cfg, ids(tok))
    items = {pairs.get(i)[0]: ds[(i, 0)] for i in range(len(pairs))}
    for name, item in items.items():
        px = item["pixel_values"]
        assert px.shape == (2, 3, 16, 16) and px.dtype == torch.float32, name
        assert px.min() >= -1 and px.max() <= 1, name
    w = {name: item["pixel_values"][0] for name, item in items.items()}
    assert torch.equal(w["gray"][0], w["gray"][1]) and torch.equal(w["gray"][0], w["gray"][2])
    assert w["rgba"][:, :, -1].min() > 0.95  # transparent right half -> white
    assert w["rgba"][0, :, 0].min() > 0.95 and w["rgba"][1, :, 0].max() < -0.95  # opaque red left half
    assert w["palette_transparent"][:, :, 0].min() > 0.95  # transparent index -> white
    assert w["palette"][:, :, 0].max() < -0.95  # index 0 is black when not transparent
    assert w["i16"][:, :, 0].min() > 0.95 and w["i16"][:, :, -1].max() < -0.95  # 65535 -> 255, 0 -> 0
    assert is_colour(w["cmyk"], RED, tol=25)
    assert items["exif"]["original_sizes"][0].tolist() == [40, 20]  # displayed (h, w) after EXIF rotation
    assert items["odd_size"]["original_sizes"][0].tolist() == [9, 17]


def ids(*tokenizers):
    """The prompt tokenizer of a family with these tokenizers, each padded to its model_max_length."""
    return PromptTokenizer(tokenizers, tuple(t.model_max_length for t in tokenizers))


def test_collate_shapes_sd_and_sdxl(tmp_path):
    f = write_pickapic(tmp_path / "b.parquet", [row(f"p{i}", label_0=float(i % 2)) for i in range(3)])
    cfg = dcfg(f)
    pairs = load_preference_pairs(cfg)
    sd = collate_pairs([PreferenceDataset(pairs, cfg, ids(make_tokenizer()))[(i, i)] for i in range(3)])
    assert sd["pixel_values"].shape == (3, 2, 3, 16, 16) and sd["input_ids"].shape == (3, 16)
    assert sd["original_sizes"].shape == (3, 2, 2) and sd["crop_top_lefts"].shape == (3, 2, 2)
    assert sd["label"].dtype == torch.float32 and sd["label"].shape == (3,) and "input_ids_2" not in sd
    assert sd["prompt"] == ["p0", "p1", "p2"] and sd["input_ids"].dtype == torch.long
    xl_ds = PreferenceDataset(pairs, cfg, ids(make_tokenizer(), make_tokenizer(12)))
    xl = collate_pairs([xl_ds[(i, i)] for i in range(3)])
    assert xl["input_ids"].shape == (3, 16) and xl["input_ids_2"].shape == (3, 12)


# ---------------------------------------------------------------- order


def test_pair_sampler_determinism_permutation_epochs_and_start():
    a, b = PairSampler(50, seed=7), PairSampler(50, seed=7)
    keys = list(a)
    assert keys == list(b) and len(a) == 50
    assert sorted(i for i, _ in keys) == list(range(50))
    assert len({s for _, s in keys}) == 50  # a fresh augmentation seed per position
    a.set_epoch(1)
    epoch1 = list(a)
    assert [i for i, _ in epoch1] != [i for i, _ in keys] and sorted(i for i, _ in epoch1) == list(range(50))
    a.set_epoch(1, start=13)
    assert list(a) == epoch1[13:] and len(a) == 37
    assert [i for i, _ in PairSampler(50, seed=8)] != [i for i, _ in keys]
    assert [i for i, _ in PairSampler(5, seed=7, shuffle=False)] == list(range(5))
    with pytest.raises(ValueError):
        a.set_epoch(0, start=51)


def test_dataloader_with_two_workers_matches_in_process_items(tmp_path, tok):
    out = build_tiny_pickapic(tmp_path / "tiny", num_pairs=16, seed=1, tie_fraction=0.0)
    cfg = dcfg(out, random_crop=True, random_flip=True, proportion_empty_prompts=0.5)
    ds = PreferenceDataset(load_preference_pairs(cfg), cfg, ids(tok, make_tokenizer(12)))
    sampler = PairSampler(len(ds), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=collate_pairs, num_workers=2)
    batches = list(loader)
    assert len(batches) == 4 and batches[0]["pixel_values"].shape == (4, 2, 3, 16, 16)
    expected = collate_pairs([ds[k] for k in list(sampler)[4:8]])
    for key in ("pixel_values", "original_sizes", "crop_top_lefts", "input_ids", "input_ids_2", "label"):
        assert torch.equal(batches[1][key], expected[key]), key
    assert batches[1]["prompt"] == expected["prompt"]


# ---------------------------------------------------------------- bad data: one line, file, row, problem


@pytest.mark.parametrize("bad_row, problem", [
    (row(jpg_1=truncated_jpeg()), "jpg_1 cannot be decoded as an image (image file is truncated"),
    (row(jpg_0=GARBAGE), "jpg_0 cannot be decoded as an image (cannot identify image file)"),
    (row(label_0=0.7, label_1=0.3), "label_0 is 0.7, expected 0, 0.5 or 1"),
    (row(label_0=math.nan, label_1=0.5), "label_0 is null or NaN"),
    (row(label_0=None), "label_0 is null or NaN"),
    (row(caption=None), "caption is null"),
    (row(jpg_0=b""), "jpg_0 is null or empty"),
    (row(label_0=1.0, label_1=0.5), "label_1 is 0.5 but label_0 is 1 (label_1 must be 1 - label_0)"),
], ids=["truncated", "garbage", "label", "nan", "null_label", "null_caption", "empty_image", "label_1"])
def test_bad_parquet_rows_name_file_row_and_problem(tmp_path, bad_row, problem):
    f = write_pickapic(tmp_path / "bad.parquet", [row(), row(label_0=0.0), bad_row, row()])
    msg = load_error(dcfg(f))
    assert msg.startswith(f"{f} row 2: {problem}"), msg


def test_missing_column_names_file_and_lists_columns(tmp_path):
    f = write_pickapic(tmp_path / "nolabel.parquet", [row()], drop=("label_0", "jpg_1"))
    msg = load_error(dcfg(f))
    assert msg.startswith(f"{f}: missing column(s) jpg_1, label_0; columns present: are_different,")
    assert "label_1" in msg
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    assert load_error(dcfg(broken)).startswith(f"{broken}: not a readable parquet file (")


def test_empty_and_all_ties(tmp_path):
    empty = write_pickapic(tmp_path / "empty.parquet", [])
    assert load_error(dcfg(empty)) == f"{empty} has no usable pairs: 0 rows"
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert load_error(dcfg(tmp_path / "empty.jsonl")).endswith("empty.jsonl has no usable pairs: 0 rows")
    ties = write_pickapic(tmp_path / "ties.parquet", [row(label_0=0.5)] * 3)
    assert load_error(dcfg(ties)) == (f"{ties}: all 3 pairs are ties (label 0.5); "
                                      "set data.keep_ties=true to use them")
    assert len(load_preference_pairs(dcfg(ties, keep_ties=True))) == 3


def test_first_bad_image_in_row_order_with_a_process_pool(tmp_path):
    rows = [row(f"r{i}") for i in range(40)]
    rows[33], rows[35] = row(jpg_0=truncated_jpeg()), row(jpg_1=GARBAGE)
    f = write_pickapic(tmp_path / "many.parquet", rows)
    msg = load_error(dcfg(f, num_workers=2))
    assert msg.startswith(f"{f} row 33: jpg_0 cannot be decoded as an image (image file is truncated")
    pairs = load_preference_pairs(dcfg(f, num_workers=2, skip_bad_rows=True))
    assert len(pairs) == 38 and pairs.num_bad_skipped == 2


@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "p", "chosen": "imgs/missing.png", "rejected": "imgs/red.png"}',
     "image file 'imgs/missing.png' not found"),
    ('{"prompt": "p", "chosen": "imgs/red.png", "rejected": ', "invalid JSON ("),
    ('["p", "imgs/red.png", "imgs/blue.png"]', "expected a JSON object, got list"),
    ('{"prompt": "p", "chosen": "imgs/red.png"}', "missing key(s) rejected"),
    ('{"prompt": 3, "chosen": "imgs/red.png", "rejected": "imgs/blue.png"}', "prompt must be a string, got int"),
    ('{"prompt": "p", "chosen": "imgs/red.png", "rejected": "imgs/blue.png", "chosen_score": "high"}',
     "chosen_score must be a number, got 'high'"),
    ('{"prompt": "p", "chosen": "imgs/bad.png", "rejected": "imgs/blue.png"}',
     "chosen image 'imgs/bad.png' cannot be decoded as an image (cannot identify image file)"),
], ids=["missing_file", "malformed", "not_object", "missing_key", "prompt_type", "score", "undecodable"])
def test_bad_jsonl_lines_name_file_line_and_problem(tmp_path, line, problem):
    _images(tmp_path)
    good = '{"prompt": "ok", "chosen": "imgs/red.png", "rejected": "imgs/blue.png"}'
    (tmp_path / "data.jsonl").write_text(f"{good}\n\n{line}\n{good}\n")
    msg = load_error(dcfg(tmp_path / "data.jsonl"))
    assert msg == f"{tmp_path / 'data.jsonl'} line 3: {problem}" or \
        (problem.endswith("(") and msg.startswith(f"{tmp_path / 'data.jsonl'} line 3: {problem}")), msg


def test_bad_csv_rows(tmp_path):
    _images(tmp_path)
    f = tmp_path / "d.csv"
    f.write_text("prompt,chosen,rejected\nok,imgs/red.png,imgs/blue.png\nx,imgs/missing.png,imgs/red.png\n")
    assert load_error(dcfg(f)) == f"{f} line 3: image file 'imgs/missing.png' not found"
    f.write_text("prompt,chosen\nok,imgs/red.png\n")
    assert load_error(dcfg(f)) == f"{f}: missing column(s) rejected; columns present: prompt, chosen"


def test_skip_bad_rows_counts_and_keeps_good_pairs(tmp_path):
    f = write_pickapic(tmp_path / "mixed.parquet", [
        row("good0"), row(label_0=math.nan, label_1=0.5), row(label_0=0.5), row(jpg_1=GARBAGE),
        row("good1", label_0=0.0), row(jpg_0=truncated_jpeg()), row(caption=None)])
    pairs = load_preference_pairs(dcfg(f, skip_bad_rows=True))
    assert [pairs.get(i)[0] for i in range(len(pairs))] == ["good0", "good1"]
    assert pairs.num_bad_skipped == 4 and pairs.num_ties_dropped == 1
    assert pairs.summary() == (f"{f}: 7 rows, 2 pairs used, 1 ties dropped, 4 bad rows skipped "
                               f"(first: {f} row 1: label_0 is null or NaN)")
    _images(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "chosen": "imgs/red.png", "rejected": "imgs/blue.png"}\n'
                                      "not json\n"
                                      '{"prompt": "b", "chosen": "imgs/bad.png", "rejected": "imgs/blue.png"}\n')
    local = load_preference_pairs(dcfg(tmp_path / "d.jsonl", skip_bad_rows=True))
    assert len(local) == 1 and local.num_bad_skipped == 2 and "line 2: invalid JSON" in local.summary()
    all_bad = write_pickapic(tmp_path / "allbad.parquet", [row(jpg_0=GARBAGE)] * 2)
    assert "has no usable pairs: 2 rows, 0 ties dropped, 2 bad rows skipped (first:" in \
        load_error(dcfg(all_bad, skip_bad_rows=True))


def test_max_pairs_scans_only_what_it_needs(tmp_path):
    rows = [row(f"r{i}") for i in range(10)]
    rows[1], rows[8] = row("garbage", jpg_0=GARBAGE), row(label_0=0.3, label_1=0.7)
    f = write_pickapic(tmp_path / "m.parquet", rows)
    with pytest.raises(UserError, match="row 1: jpg_0 cannot be decoded"):
        load_preference_pairs(dcfg(f, max_pairs=3))
    pairs = load_preference_pairs(dcfg(f, max_pairs=3, skip_bad_rows=True))
    assert [pairs.get(i)[0] for i in range(3)] == ["r0", "r2", "r3"] and pairs.num_bad_skipped == 1
    assert pairs.summary().endswith(f"(data.max_pairs reached at {f} row 3)")
    assert len(load_preference_pairs(dcfg(f, max_pairs=5, image_check="lazy"))) == 5  # row 8 never reached


def test_lazy_image_check_replaces_a_broken_pair_by_the_next_and_counts_it(tmp_path, tok):
    """data.image_check lazy decodes nothing before training; the loader replaces a pair whose image does not decode
    by the next pair (with the asked-for seed's draws) and counts it. With every pair broken, the asked-for pair's
    error is raised (in one line)."""
    f = write_pickapic(tmp_path / "late.parquet", [row("first"), row("second", jpg_1=GARBAGE), row("third")])
    cfg = dcfg(f, image_check="lazy")
    ds = PreferenceDataset(load_preference_pairs(cfg), cfg, ids(tok))
    replaced, next_pair = ds[(1, 5)], ds[(2, 5)]
    assert replaced["bad_pairs_skipped"] == 1 and ds[(0, 5)]["bad_pairs_skipped"] == 0
    assert torch.equal(replaced["pixel_values"], next_pair["pixel_values"]) and replaced["prompt"] == "third"
    broken = write_pickapic(tmp_path / "all.parquet", [row(jpg_0=GARBAGE), row(jpg_1=GARBAGE)])
    ds = PreferenceDataset(load_preference_pairs(dcfg(broken, image_check="lazy")), dcfg(broken, image_check="lazy"),
                           ids(tok))
    with pytest.raises(UserError, match=r"all.parquet row 1: image cannot be decoded \(cannot identify image file\)"):
        ds[(1, 0)]


def test_a_packed_batch_unpacks_to_the_plain_batch():
    """Workers hand a batch over as one buffer (one file descriptor instead of one per tensor); the views it
    unpacks to are the plain batch's tensors, whatever their dtypes, shapes and byte alignments."""
    from diffusion_dpo.data.items import collate_packed, unpack_batch

    g = torch.Generator().manual_seed(0)
    examples = [{"a": torch.randn(3, 5, generator=g), "b": torch.randint(0, 9, (7,), generator=g),
                 "c": torch.randn(3, generator=g).half(), "d": torch.tensor([True, False, True]),
                 "e": torch.zeros(0, 2), "label": 1.0, "sample_seed": 11 + i, "prompt": f"p{i}"} for i in range(3)]
    plain = collate_pairs(examples)
    packed = collate_packed(examples)
    assert [k for k, v in packed.items() if isinstance(v, torch.Tensor)] == ["_packed"]
    unpacked = unpack_batch(packed)
    assert unpacked.keys() == plain.keys() and unpacked["prompt"] == plain["prompt"]
    for key, value in plain.items():
        if isinstance(value, torch.Tensor):
            assert unpacked[key].dtype == value.dtype and torch.equal(unpacked[key], value), key
    assert unpack_batch(plain) is plain


# ---------------------------------------------------------------- in-memory datasets (the Python API)


def test_in_memory_dataset_in_both_schemas(tmp_path):
    import datasets
    from PIL import Image

    from diffusion_dpo.data.pairs import pairs_from_memory

    picka = datasets.Dataset.from_list([row("a", label_0=0.0), row("b", label_0=1.0), row("t", label_0=0.5,
                                                                                           label_1=0.5)])
    pairs = pairs_from_memory(picka, dcfg(""))
    assert len(pairs) == 2 and pairs.num_ties_dropped == 1
    assert pairs.get(0)[1:] == (solid(BLUE), solid(RED), 1.0)  # jpg_1 won: winner first
    # prompt / chosen / rejected with PIL images, with bytes and with paths (relative to the working directory)
    red_png = tmp_path / "red.png"
    red_png.write_bytes(solid(RED))
    pil = [Image.new("RGB", (16, 16), "red"), Image.new("RGB", (16, 16), "blue")]
    by_image = datasets.Dataset.from_dict({"prompt": ["p"], "chosen": [pil[0]], "rejected": [pil[1]]},
                                          features=datasets.Features({"prompt": datasets.Value("string"),
                                                                      "chosen": datasets.Image(),
                                                                      "rejected": datasets.Image()}))
    by_bytes = datasets.Dataset.from_dict({"prompt": ["p"], "chosen": [solid(RED)], "rejected": [solid(BLUE)]})
    by_path = datasets.Dataset.from_dict({"prompt": ["p"], "chosen": [str(red_png)], "rejected": [str(red_png)]})
    for ds in (by_image, by_bytes, by_path):  # paths must lie in the working directory or data.image_root
        pairs = pairs_from_memory(ds, dcfg("", image_root=str(tmp_path) if ds is by_path else None))
        caption, win, lose, label = pairs.get(0)
        assert caption == "p" and label == 1.0 and win is not None and lose is not None
    with pytest.raises(UserError, match=r"^in-memory dataset row 0: image '.*red.png' lies outside "):
        pairs_from_memory(by_path, dcfg(""))
    item = PreferenceDataset(pairs_from_memory(by_bytes, dcfg("")), dcfg(""), make_tokenizer())[(0, 0)]
    assert is_colour(item["pixel_values"][0], RED) and is_colour(item["pixel_values"][1], BLUE)
    # a bad row is named like a file's
    bad = datasets.Dataset.from_dict({"prompt": ["p", "q"], "chosen": [solid(RED), GARBAGE],
                                      "rejected": [solid(BLUE), solid(BLUE)]})
    with pytest.raises(UserError, match=r"^in-memory dataset row 1: chosen cannot be decoded as an image"):
        pairs_from_memory(bad, dcfg(""))  # named by the user's column, not Pick-a-Pic's jpg_0
    skipped = pairs_from_memory(bad, dcfg("", skip_bad_rows=True))
    assert len(skipped) == 1 and skipped.num_bad_skipped == 1 and "row 1: chosen cannot be decoded" in skipped.summary()
    with pytest.raises(UserError, match="split 'train' not found"):
        pairs_from_memory(datasets.DatasetDict({"test": picka}), dcfg(""))
    with pytest.raises(UserError, match="expected a datasets.Dataset, got list"):
        pairs_from_memory([1, 2], dcfg(""))


# ---------------------------------------------------------------- untrusted data stays inert (DESIGN.md §7)

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"


def forged_png(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (CRC fixed): only the header says it is big."""
    import struct
    import zlib

    data = bytearray(solid(RED, size=(4, 4)))
    ihdr = 8  # after the signature: length (4), b"IHDR" (4), width, height, ...
    assert data[ihdr + 4:ihdr + 8] == b"IHDR"
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    data[ihdr + 21:ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(data[ihdr + 4:ihdr + 21])))
    return bytes(data)


def table_with_path_cells(path: Path, rows: list[dict]) -> Path:
    """Pick-a-Pic rows whose jpg_0 column holds datasets' {bytes, path} image structs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffusion_dpo.testing.tiny_data import SCHEMA

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([pa.field("jpg_0", image) if f.name == "jpg_0" else f for f in SCHEMA])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_a_table_image_cell_holding_only_a_path_is_a_bad_row(tmp_path):
    secret = tmp_path / "elsewhere" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(solid(GREEN))
    f = table_with_path_cells(tmp_path / "p.parquet", [
        row("bytes and a path", jpg_0={"bytes": solid(RED), "path": "red.png"}),
        row("only a path", jpg_0={"bytes": None, "path": str(secret)}),
        row("bytes", jpg_0={"bytes": solid(RED), "path": None}),
    ])
    assert load_error(dcfg(f)) == (f"{f} row 1: jpg_0 holds a file path, not image bytes (table data must carry "
                                   "the encoded image)")
    pairs = load_preference_pairs(dcfg(f, skip_bad_rows=True))
    assert [pairs.get(i)[0] for i in range(len(pairs))] == ["bytes and a path", "bytes"]
    assert pairs.num_bad_skipped == 1 and pairs.get(0)[1] == solid(RED)


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """data/ (data.jsonl's folder, with imgs/red.png, imgs/blue.png) and a valid image outside it, also as ~/x.png
    and behind the symlink data/imgs/link.png."""
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    (tmp_path / "data" / "imgs" / "red.png").write_bytes(solid(RED))
    (tmp_path / "data" / "imgs" / "blue.png").write_bytes(solid(BLUE))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "x.png").write_bytes(solid(GREEN))
    (tmp_path / "data" / "imgs" / "link.png").symlink_to(tmp_path / "home" / "x.png")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.mark.parametrize("value", ["ABS", "../home/x.png", "imgs/link.png", "imgs/../../home/x.png"],
                         ids=["absolute", "dotdot", "symlink", "inner_dotdot"])
def test_local_image_paths_must_stay_in_the_data_folder(outside, value):
    value = str(outside / "home" / "x.png") if value == "ABS" else value
    f = outside / "data" / "d.jsonl"
    good = '{"prompt": "ok", "chosen": "imgs/red.png", "rejected": "imgs/blue.png"}'
    f.write_text(good + "\n" + json.dumps({"prompt": "p", "chosen": "imgs/red.png", "rejected": value}) + "\n")
    root = (outside / "data").resolve()
    assert load_error(dcfg(f)) == (f"{f} line 2: image '{value}' lies outside {root} "
                                   "(set data.image_root to allow another folder)")
    skipped = load_preference_pairs(dcfg(f, skip_bad_rows=True))
    assert len(skipped) == 1 and skipped.num_bad_skipped == 1
    pairs = load_preference_pairs(dcfg(f, image_root=str(outside)))  # a root that holds both folders
    assert len(pairs) == 2 and Path(pairs.get(1)[2]) == (outside / "home" / "x.png").resolve()


def test_tilde_is_not_expanded_and_image_root_must_be_a_folder(outside):
    f = outside / "data" / "d.csv"
    f.write_text("prompt,chosen,rejected\nok,imgs/red.png,imgs/blue.png\np,~/x.png,imgs/red.png\n")
    assert load_error(dcfg(f)) == f"{f} line 3: image file '~/x.png' not found"  # not $HOME/x.png
    assert load_error(dcfg(f, image_root=str(outside / "nowhere"))) == \
        f"data.image_root '{outside / 'nowhere'}' is not a directory"


def test_only_common_image_formats_are_opened(tmp_path):
    from PIL import UnidentifiedImageError

    from diffusion_dpo.data.images import open_image, verify_image

    with pytest.raises(UnidentifiedImageError):
        open_image(EPS)  # PIL alone would open it (and hand it to Ghostscript to decode)
    assert verify_image(EPS) == "cannot identify image file"
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP"):
        assert verify_image(solid(RED, fmt=fmt)) is None, fmt
    _images(tmp_path)
    for name in ("ps.eps", "ps.png"):
        (tmp_path / "imgs" / name).write_bytes(EPS)
        (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "p", "chosen": f"imgs/{name}",
                                                      "rejected": "imgs/red.png"}) + "\n")
        assert load_error(dcfg(tmp_path / "d.jsonl")) == (f"{tmp_path / 'd.jsonl'} line 1: chosen image "
                                                          f"'imgs/{name}' cannot be decoded as an image "
                                                          "(cannot identify image file)")
    f = write_pickapic(tmp_path / "eps.parquet", [row(), row(jpg_1=EPS)])
    assert load_error(dcfg(f)) == f"{f} row 1: jpg_1 cannot be decoded as an image (cannot identify image file)"


def test_images_above_the_pixel_limit_are_refused_from_their_header(tmp_path, tok, monkeypatch):
    from diffusion_dpo.data import images
    from diffusion_dpo.data.images import ImageTooLarge, load_rgb

    big = forged_png(9000, 9000)  # 81 M pixels: under PIL's own limit, over ours; never decoded
    f = write_pickapic(tmp_path / "big.parquet", [row(), row(jpg_0=big)])
    assert load_error(dcfg(f)) == (f"{f} row 1: jpg_0 cannot be decoded as an image (image is 9000 x 9000 = "
                                   f"81000000 pixels, more than the {64 * 2**20} allowed)")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageTooLarge, match=r"^image is 40 x 32 = 1280 pixels, more than the 1000 allowed$"):
        load_rgb(solid(RED))  # solid() is 40 x 32
    assert load_rgb(solid(RED, size=(25, 40))).size == (25, 40)  # 1000 pixels: allowed
    normal = write_pickapic(tmp_path / "normal.parquet", [row(), row(jpg_1=solid(BLUE, size=(40, 32)))])
    assert load_error(dcfg(normal)) == (f"{normal} row 0: jpg_0 cannot be decoded as an image (image is 40 x 32 = "
                                        "1280 pixels, more than the 1000 allowed)")
    cfg = dcfg(normal, image_check="lazy")  # found when the item is read
    ds = PreferenceDataset(load_preference_pairs(cfg), cfg, ids(tok))
    with pytest.raises(UserError, match=r"normal.parquet row 0: image cannot be decoded \(image is 40 x 32 = 1280"):
        ds[(0, 0)]


def test_high_depth_grayscale_converts_as_before_without_float64_copies():
    import tracemalloc

    from diffusion_dpo.data.images import _high_depth_to_uint8, load_rgb

    def before(arr: np.ndarray, mode: str) -> np.ndarray:  # the float64 conversion this replaced
        arr = arr.astype(np.float64)
        scale = (255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0) if mode == "F" else 255.0 / 65535.0
        return np.clip(np.nan_to_num(arr * scale), 0, 255).round().astype(np.uint8)

    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    assert np.array_equal(_high_depth_to_uint8(every, "I;16"), before(every, "I;16"))
    assert np.array_equal(_high_depth_to_uint8(every.astype(">u2"), "I;16B"), before(every, "I;16B"))
    wide = np.array([[-70000, -1, 0, 128, 129, 385, 32896, 65406, 65407, 65535, 65536, 2**31 - 1]], np.int32)
    assert np.array_equal(_high_depth_to_uint8(wide, "I"), before(wide, "I"))
    for floats in (np.linspace(0, 1, 1001, dtype=np.float32), np.linspace(-10, 300, 3101, dtype=np.float32),
                   np.array([0.0, np.nan, np.inf, -np.inf, 0.5, 1.0], np.float32)):
        # float32 arithmetic may round an exact .5 (0.3 * 255 = 76.5) the other way: at most 1 level, rarely
        diff = _high_depth_to_uint8(floats[None], "F").astype(int) - before(floats[None], "F")
        assert np.abs(diff).max() <= 1 and np.mean(diff != 0) < 0.01
    # a decoded 16-bit PNG: the same 8-bit values as before
    png = load_rgb(i16_png())
    assert np.asarray(png)[:, :12].min() == 255 and np.asarray(png)[:, 12:].max() == 0
    # peak memory: a few bytes per pixel (the float64 version held several 8-byte copies)
    big = np.random.default_rng(0).integers(0, 65536, (1024, 1024), dtype=np.uint16)
    for arr, mode in ((big, "I;16"), (big.astype(np.int32), "I"), (big.astype(np.float32) / 65535, "F")):
        tracemalloc.start()
        _high_depth_to_uint8(arr, mode)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= 6 * arr.size, (mode, peak / arr.size)


# ---------------------------------------------------------------- the image check, remembered (issue 36)

def _counting_decodes(monkeypatch) -> list[int]:
    """Record the rows each image check decodes."""
    from diffusion_dpo.data import images

    decoded: list[int] = []
    real = images._check_rows

    def counting(rows, reader=None):
        decoded.extend(int(r) for r in rows)
        return real(rows, reader)
    monkeypatch.setattr(images, "_check_rows", counting)
    return decoded


def test_a_repeated_start_decodes_nothing_and_a_changed_file_is_checked_again(tmp_path, monkeypatch):
    import os

    decoded = _counting_decodes(monkeypatch)
    good = write_pickapic(tmp_path / "a" / "train-0.parquet", [row(f"a{i}") for i in range(4)])
    bad = write_pickapic(tmp_path / "a" / "train-1.parquet", [row("b0"), row("b1", jpg_0=GARBAGE), row("b2")])
    cfg = dcfg(tmp_path / "a", skip_bad_rows=True)
    first = load_preference_pairs(cfg)
    assert sorted(decoded) == [0, 1, 2, 3, 4, 5, 6] and first.num_bad_skipped == 1
    decoded.clear()
    again = load_preference_pairs(cfg)  # the same files: the verdicts, bad row included, are remembered
    assert decoded == [] and list(again.row_index) == list(first.row_index) and again.num_bad_skipped == 1
    assert again.first_bad == first.first_bad
    with pytest.raises(UserError, match=r"train-1.parquet row 1: jpg_0 cannot be decoded"):
        load_preference_pairs(dcfg(tmp_path / "a"))  # remembered bad row: still one line, nothing decoded
    assert decoded == []
    # a rewritten file (new size or modification time) is checked again, the unchanged one is not
    write_pickapic(bad, [row("b0"), row("b1"), row("b2"), row("b3")])
    os.utime(bad, ns=(os.stat(bad).st_atime_ns, os.stat(bad).st_mtime_ns + 1))
    fixed = load_preference_pairs(dcfg(tmp_path / "a"))
    assert sorted(decoded) == [4, 5, 6, 7] and len(fixed) == 8
    # another pixel limit is another verdict: everything is checked again
    from diffusion_dpo.data import images

    decoded.clear()
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 10**9)
    load_preference_pairs(dcfg(tmp_path / "a"))
    assert sorted(decoded) == list(range(8))


def test_remembered_checks_of_local_files_follow_each_image(tmp_path, monkeypatch):
    import json as _json

    from pickapic_fixtures import solid

    decoded = _counting_decodes(monkeypatch)
    (tmp_path / "img").mkdir()
    for name, color in (("r", RED), ("b", BLUE), ("g", GREEN)):
        (tmp_path / "img" / f"{name}.png").write_bytes(solid(color))
    lines = [{"prompt": "p0", "chosen": "img/r.png", "rejected": "img/b.png"},
             {"prompt": "p1", "chosen": "img/g.png", "rejected": "img/b.png"}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(_json.dumps(x) + "\n" for x in lines))
    load_preference_pairs(dcfg(data))
    assert sorted(decoded) == [0, 1]
    decoded.clear()
    load_preference_pairs(dcfg(data))
    assert decoded == []
    (tmp_path / "img" / "g.png").write_bytes(GARBAGE)  # only the line that names it is checked again
    with pytest.raises(UserError, match=r"pairs.jsonl line 2: .*cannot be decoded"):
        load_preference_pairs(dcfg(data))
    assert decoded == [1]


# ---------------------------------------------------------------- parquet read in place (issue 36)

def test_local_parquet_is_read_in_place_without_a_datasets_cache(tmp_path, monkeypatch, tok):
    """No Arrow copy of the shards anywhere (datasets' cache stays empty); a pair's images come from its row group."""
    import datasets

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    rows = [row(f"r{i}", jpg_0=solid(GREEN) if i == 3 else None) for i in range(6)]
    f = write_pickapic(tmp_path / "d" / "train.parquet", rows)
    pairs = load_preference_pairs(dcfg(tmp_path / "d"))
    assert not cache.exists() or not any(cache.rglob("*"))
    caption, win, lose, label = pairs.get(3)
    assert caption == "r3" and win == solid(GREEN) and lose == solid(BLUE) and label == 1.0
    ds = PreferenceDataset(pairs, dcfg(f), ids(tok))
    assert ds[(3, 0)]["pixel_values"].shape == (2, 3, 16, 16)


def _grouped_parquet(path, groups: int, per_group: int):
    """A Pick-a-Pic parquet file of `groups` row groups of `per_group` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffusion_dpo.data.schema import SCHEMA

    rows = [row(f"r{i}") for i in range(groups * per_group)]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, row_group_size=per_group)
    return path


def test_the_order_keeps_to_windows_of_row_groups_and_is_one_permutation_when_they_fit(tmp_path):
    import numpy as np

    from diffusion_dpo.data.items import PairSampler, locality_of

    f = _grouped_parquet(tmp_path / "g.parquet", groups=6, per_group=4)
    pairs = load_preference_pairs(dcfg(f))
    table = pairs.rows
    assert list(table.group_starts) == [0, 4, 8, 12, 16, 20]
    fits = PairSampler(24, seed=3, locality=locality_of(pairs, 1024.0))
    assert list(fits.order(0)) == list(np.random.default_rng([3, 0, 0]).permutation(24))  # as without locality
    two_groups = 2 * int(table.group_bytes[0]) / 2**20  # a window holds two row groups
    local = PairSampler(24, seed=3, locality=locality_of(pairs, two_groups * 1.01))
    order = local.order(0)
    assert sorted(order) == list(range(24)) and list(order) == list(local.order(0))
    assert list(order) != list(local.order(1))
    windows = [set(table.group_of(order[k:k + 8]).tolist()) for k in range(0, 24, 8)]
    assert all(len(w) == 2 for w in windows) and set().union(*windows) == set(range(6))


def test_the_check_memory_keeps_verdicts_and_problems_across_reloads(tmp_path):
    """Verdicts as codes (0 fine, k the k-th distinct problem): a memory of fine rows only holds no problem texts, and
    one problem added later is read back under its row; a row checked again takes the new verdict."""
    import numpy as np

    from diffusion_dpo.data.image_checks import Memory

    path = tmp_path / "memory.npz"
    Memory(path).add(np.array([5, 3], np.uint64), ["", ""])
    fine = Memory(path)
    assert fine.problems == [] and fine.lookup(np.array([3, 5, 9], np.uint64)) == ["", "", None]
    fine.add(np.array([9, 3], np.uint64), ["jpg_0 cannot be decoded", ""])
    again = Memory(path)
    assert again.problems == ["jpg_0 cannot be decoded"]
    assert again.lookup(np.array([3, 5, 9], np.uint64)) == ["", "", "jpg_0 cannot be decoded"]
    again.add(np.array([9], np.uint64), [""])  # fixed and checked again
    assert Memory(path).lookup(np.array([9], np.uint64)) == [""]
