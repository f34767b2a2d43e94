"""Unpaired feedback and Diffusion-KTO: the formats, the split of pairs, the loss by hand, training on every path."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ALL_FAMILIES, tiny_family
from diffusion_dpo.config import DataConfig
from diffusion_dpo.errors import UserError
from diffusion_dpo.training.losses import get_loss, kto_loss
from diffusion_dpo.training import Trainer, train
from diffusion_dpo.data.unpaired import load_feedback
from test_training import make_cfg, read_metrics


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic

    return build_tiny_pickapic(tmp_path_factory.mktemp("data") / "pickapic", num_pairs=12, seed=5)


# ---------------------------------------------------------------- the loss by hand

def test_kto_hand_computed():
    model = torch.tensor([0.10, 0.30, 0.20, 0.25], dtype=torch.float64)
    ref = torch.tensor([0.20, 0.20, 0.20, 0.20], dtype=torch.float64)
    label = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    g = [0.10, -0.10, 0.0, -0.05]  # ref - model
    z0 = max(0.0, sum(g) / 4)  # -0.0125 -> 0
    beta = 10.0
    want = [1 - 1 / (1 + math.exp(-s * beta * (gi - z0))) for s, gi in zip((1, 1, -1, -1), g)]
    out = kto_loss(model, None, ref, None, beta=beta, label=label)
    torch.testing.assert_close(out.loss, torch.tensor(want, dtype=torch.float64))
    # by hand: inside = s·β·(g - z0) = 10·0.1, 10·(-0.1), -10·0, -10·(-0.05) = 1, -1, 0, 0.5, and 1 - σ(x) = σ(-x):
    #   σ(-1) = 1/(1 + e) = 1/3.7182818285 = 0.2689414214;  σ(1) = 1 - 0.2689414214 = 0.7310585786;  σ(0) = 0.5;
    #   σ(-0.5) = 1/(1 + e^0.5) = 1/2.6487212707 = 0.3775406688
    assert out.loss.tolist() == pytest.approx([0.2689414214, 0.7310585786, 0.5, 0.3775406688], rel=1e-9)
    assert out.inside.tolist() == pytest.approx([1.0, -1.0, 0.0, 0.5], abs=1e-12)
    # a positive mean reward becomes the reference point; the weights scale each side
    model2 = model - 0.1  # every g grows by 0.1: z0 = 0.0875
    out2 = kto_loss(model2, None, ref, None, beta=beta, label=label, weight_desirable=2.0, weight_undesirable=0.5)
    g2, z2 = [x + 0.1 for x in g], sum(x + 0.1 for x in g) / 4
    want2 = [w * (1 - 1 / (1 + math.exp(-s * beta * (gi - z2))))
             for w, s, gi in zip((2, 2, 0.5, 0.5), (1, 1, -1, -1), g2)]
    torch.testing.assert_close(out2.loss, torch.tensor(want2, dtype=torch.float64))
    # by hand: g = 0.2, 0, 0.1, 0.05, z0 = 0.35/4 = 0.0875; inside = 10·0.1125, 10·(-0.0875), -10·0.0125, -10·(-0.0375)
    #   = 1.125, -0.875, -0.125, 0.375; loss = λ_y·σ(-inside):
    #   2·1/(1 + e^1.125) = 2/4.0802168489 = 0.4901700263;  2·1/(1 + e^-0.875) = 2/1.4168620197 = 1.4115700557;
    #   0.5·1/(1 + e^-0.125) = 0.5/1.8824969026 = 0.2656046867; 0.5·1/(1 + e^0.375) = 0.5/2.4549914146 = 0.2036667000
    assert out2.loss.tolist() == pytest.approx([0.4901700263, 1.4115700557, 0.2656046867, 0.2036667000], rel=1e-9)
    # z0 is averaged across processes by the given mean, and carries no gradient
    seen = []
    kto_loss(model, None, ref, None, beta=beta, label=label, batch_mean=lambda t: seen.append(t) or t * 0 + 1.0)
    assert len(seen) == 1 and not seen[0].requires_grad


def test_kto_at_initialisation_is_half_and_pushes_the_right_way():
    e = torch.rand(6, requires_grad=True)
    label = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    out = kto_loss(e, None, e.detach().clone(), None, beta=1000.0, label=label)
    torch.testing.assert_close(out.loss, torch.full((6,), 0.5))
    out.loss.sum().backward()
    assert torch.all(e.grad[label == 1] > 0) and torch.all(e.grad[label == 0] < 0)  # lower the good, raise the bad
    spec = get_loss("kto")
    assert spec.unpaired and spec.needs_reference and not spec.pairwise


# ---------------------------------------------------------------- formats

def _pair_rows(pairs_dir):
    rows = []
    for f in sorted(pairs_dir.glob("*.parquet")):
        t = pq.read_table(f, columns=["caption", "jpg_0", "jpg_1", "label_0"]).to_pylist()
        rows += t
    return rows


@pytest.fixture(scope="module")
def unpaired_files(tmp_path_factory, tiny_data):
    """The tiny pairs' images as native unpaired data: parquet, JSONL and CSV (images as files beside them)."""
    root = tmp_path_factory.mktemp("unpaired")
    (root / "img").mkdir()
    records = []
    for i, row in enumerate(_pair_rows(tiny_data)):
        for k in (0, 1):
            name = f"img/{i}-{k}.png"
            (root / name).write_bytes(row[f"jpg_{k}"])
            records.append({"prompt": row["caption"], "image": name, "bytes": row[f"jpg_{k}"],
                            "label": int(i % 3 != 0) if k == 0 else int(i % 2 == 0)})
    pq.write_table(pa.table({"prompt": [r["prompt"] for r in records], "image": [r["bytes"] for r in records],
                             "label": [bool(r["label"]) for r in records]}), root / "items.parquet")
    with (root / "items.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps({"prompt": r["prompt"], "image": r["image"], "label": r["label"]}) + "\n")
    with (root / "items.csv").open("w") as f:
        f.write("prompt,image,label\n" + "".join(f"\"{r['prompt']}\",{r['image']},{'true' if r['label'] else 'false'}\n"
                                                 for r in records))
    return root, [float(r["label"]) for r in records]


@pytest.mark.parametrize("name", ["items.parquet", "items.jsonl", "items.csv"])
def test_native_unpaired_formats_load_alike(unpaired_files, name):
    root, labels = unpaired_files
    items = load_feedback(DataConfig(path=str(root / name), num_workers=0))
    assert items.images_per_item == 1 and len(items) == len(labels)
    assert items.labels.tolist() == labels
    caption, (src,), label = items.images(3)
    assert label == labels[3] and isinstance(caption, str)
    assert "unpaired items used" in items.summary()


def test_pairs_split_into_winners_and_losers(tiny_data):
    pairs = load_feedback(DataConfig(path=str(tiny_data), num_workers=0))
    items = load_feedback(DataConfig(path=str(tiny_data), num_workers=0, unpaired=True))
    assert len(items) == 2 * len(pairs) and items.labels.tolist() == [1.0, 0.0] * len(pairs)
    for i in range(len(pairs)):
        caption, win, lose, _ = pairs.get(i)
        assert items.images(2 * i)[:2] == (caption, (win,)) and items.images(2 * i + 1)[:2] == (caption, (lose,))
    assert f"{pairs.num_ties_dropped} ties dropped" in items.summary()


def test_bad_unpaired_input_is_one_line(tmp_path, unpaired_files, tiny_data, tiny_sd):
    root, _ = unpaired_files
    lines = (root / "items.jsonl").read_text().splitlines()
    cases = {
        "label.jsonl": (lines[0] + "\n" + lines[1].replace('"label": 1', '"label": 2').replace('"label": 0', '"label": 2'),
                        "line 2: label must be 1 or 0"),
        "noimage.jsonl": ('{"prompt": "a", "label": 1}\n', r"line 1: missing key\(s\) image"),
        "missing.jsonl": ('{"prompt": "a", "image": "nope.png", "label": 1}\n', "line 1: image file 'nope.png' not found"),
    }
    for name, (text, message) in cases.items():
        (root / name).write_text(text)
        with pytest.raises(UserError, match=message):
            load_feedback(DataConfig(path=str(root / name), num_workers=0))
    table = pq.read_table(root / "items.parquet")
    pq.write_table(table.set_column(2, "label", pa.array([0.5] + [1.0] * (table.num_rows - 1))), tmp_path / "x.parquet")
    with pytest.raises(UserError, match=r"x.parquet row 0: label is 0.5, expected 1 or 0"):
        load_feedback(DataConfig(path=str(tmp_path / "x.parquet"), num_workers=0))
    with pytest.raises(UserError, match="already holds unpaired items"):
        load_feedback(DataConfig(path=str(root / "items.jsonl"), num_workers=0, unpaired=True))
    with pytest.raises(UserError, match="loss.name kto trains on unpaired items .* set data.unpaired=true"):
        Trainer(make_cfg(tmp_path / "a", tiny_sd, tiny_data, loss__name="kto"))
    with pytest.raises(UserError, match="loss.name dpo trains on pairs .* use loss.name kto"):
        Trainer(make_cfg(tmp_path / "b", tiny_sd, root / "items.jsonl"))


# ---------------------------------------------------------------- training

# each family's LoRA rank here (0: a full fine-tune), and its shortest text length (None: no setting)
KTO = {"sd": (0, None), "sdxl": (4, None), "sd3": (4, 8), "flux": (0, 8), "zimage": (4, 64), "flux2-klein": (0, 64),
       "flux2": (4, 64), "qwenimage": (4, 256)}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_kto_trains_one_image_per_item(request, tmp_path, tiny_data, family):
    """Split pairs, every family, LoRA and full: the model (and reference) run on B images, not 2B; step 1 (θ = ref)
    is exactly 1/2; the loser slots are null; the weights move."""
    rank, length = KTO[family]
    extra = {} if length is None else {"model__max_sequence_length": length}
    trainer = Trainer(make_cfg(tmp_path, tiny_family(request, family), tiny_data, loss__name="kto",
                               loss__beta=1000, data__unpaired="true", lora__rank=rank, optim__lr="1e-3", **extra))
    assert trainer.num_pairs == 2 * len(load_feedback(DataConfig(path=str(tiny_data), num_workers=0)))
    seen = []
    model = trainer.accelerator.unwrap_model(trainer.denoiser)
    model.register_forward_hook(lambda module, args, kwargs, out: seen.append(
        len(args[0] if args else kwargs.get("hidden_states", kwargs.get("x")))), with_kwargs=True)  # Z-Image: x, a list
    trainer.run()
    assert seen and all(n == 2 for n in seen), seen  # data.batch_size 2 items: 2 images per forward
    metrics = read_metrics(tmp_path)
    assert metrics[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert metrics[0]["model_mse_l"] is None and metrics[0]["ref_mse_l"] is None
    assert metrics[-1]["loss"] != pytest.approx(0.5, abs=1e-7)


def test_kto_from_the_cache_with_a_precomputed_reference_equals_the_live_run(tmp_path, tiny_sd, unpaired_files):
    root, _ = unpaired_files
    common = dict(loss__name="kto", loss__beta=1000, optim__lr="0.1", optim__adam_epsilon="1.0",
                  optim__weight_decay="0", train__max_steps=2, data__proportion_empty_prompts="0.5")
    train(make_cfg(tmp_path / "live", tiny_sd, root / "items.csv", **common))
    cached = dict(common, cache__dir=tmp_path / "cache", cache__auto="true",
                  cache__reference_file=tmp_path / "ref.safetensors")
    train(make_cfg(tmp_path / "pre", tiny_sd, root / "items.csv", cache__reference="precomputed", **cached))
    live, pre = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "pre")
    for key in ("ref_mse_w", "model_mse_w", "loss"):
        assert [m[key] for m in live] == pytest.approx([m[key] for m in pre], rel=1e-4), key
    from safetensors.torch import load_file

    assert load_file(tmp_path / "ref.safetensors")["ref_mse"].shape[1] == 1  # one error per item
    with pytest.raises(UserError, match="trains on pairs"):  # the unpaired cache does not serve a pair loss
        Trainer(make_cfg(tmp_path / "dpo", tiny_sd, root / "items.csv", **dict(cached, loss__name="dpo")))


def test_kto_resumes_exactly(tmp_path, tiny_sd, tiny_data):
    """Killed after step 3 (checkpoint at 2), resumed: bitwise the straight run (the batch-mean z0 included)."""
    from test_training import straight_and_resumed, unet_weights

    common = dict(loss__name="kto", data__unpaired="true", train__max_steps=5, train__checkpointing_steps=2,
                  data__batch_size=3, data__proportion_empty_prompts=0.5)
    straight, resumed = straight_and_resumed(tmp_path, tiny_sd, tiny_data, **common)
    a, b = unet_weights(straight), unet_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in read_metrics(tmp_path / "a")] == [m["loss"] for m in read_metrics(tmp_path / "b")]


# ---------------------------------------------------------------- untrusted data stays inert (DESIGN.md §7)

def test_unpaired_image_paths_stay_in_the_data_folder(tmp_path, monkeypatch):
    from pickapic_fixtures import BLUE, GREEN, RED, solid

    (tmp_path / "data" / "img").mkdir(parents=True)
    (tmp_path / "data" / "img" / "red.png").write_bytes(solid(RED))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "x.png").write_bytes(solid(GREEN))
    (tmp_path / "data" / "img" / "link.png").symlink_to(tmp_path / "home" / "x.png")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    f, root = tmp_path / "data" / "items.jsonl", (tmp_path / "data").resolve()
    good = json.dumps({"prompt": "ok", "image": "img/red.png", "label": 1})
    for value in (str(tmp_path / "home" / "x.png"), "../home/x.png", "img/link.png"):
        f.write_text(good + "\n" + json.dumps({"prompt": "p", "image": value, "label": 0}) + "\n")
        with pytest.raises(UserError) as info:
            load_feedback(DataConfig(path=str(f), num_workers=0))
        assert str(info.value) == (f"{f} line 2: image '{value}' lies outside {root} (set data.image_root to allow "
                                   "another folder)")
        items = load_feedback(DataConfig(path=str(f), num_workers=0, skip_bad_rows=True))
        assert len(items) == 1 and items.num_bad_skipped == 1
        items = load_feedback(DataConfig(path=str(f), num_workers=0, image_root=str(tmp_path)))
        assert len(items) == 2 and items.images(1)[1] == (str((tmp_path / "home" / "x.png").resolve()),)
    f.write_text(good + "\n" + json.dumps({"prompt": "p", "image": "~/x.png", "label": 0}) + "\n")
    with pytest.raises(UserError, match=r"^\S*items.jsonl line 2: image file '~/x.png' not found$"):
        load_feedback(DataConfig(path=str(f), num_workers=0))
    # table data: a cell holding only a path is a bad row, whatever the path
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": solid(BLUE), "path": None}, {"bytes": None, "path": str(tmp_path / "home" / "x.png")}]
    pq.write_table(pa.table({"prompt": ["a", "b"], "image": pa.array(cells, image), "label": [1, 0]}),
                   tmp_path / "cells.parquet")
    with pytest.raises(UserError) as info:
        load_feedback(DataConfig(path=str(tmp_path / "cells.parquet"), num_workers=0))
    assert str(info.value) == (f"{tmp_path / 'cells.parquet'} row 1: image holds a file path, not image bytes "
                               "(table data must carry the encoded image)")
    items = load_feedback(DataConfig(path=str(tmp_path / "cells.parquet"), num_workers=0, skip_bad_rows=True))
    assert len(items) == 1 and items.images(0)[1] == (solid(BLUE),)
