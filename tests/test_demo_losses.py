"""`demo --losses`: each loss trained on the same crowd pairs in its own process and compared with the base."""

import json

import pytest

from diffusion_dpo.cli import main


def test_loss_demo_trains_each_loss_on_the_same_pairs_and_reports_them(tmp_path, capsys):
    out, cache = tmp_path / "losses", tmp_path / "cache"
    code = main(["demo", "--size", "tiny", "--losses", "kto,mapo", "--output-dir", str(out), "--cache-dir", str(cache)])
    assert code == 0
    for name in ("base/model_index.json", "kto/model_index.json", "mapo/model_index.json", "losses.json", "losses.md",
                 "loss_win_rates.png", "eval_prompts.jsonl", "train/kto/train.log"):
        assert (out / name).is_file(), name
    report = json.loads((out / "losses.json").read_text())
    assert report["losses"] == ["kto", "mapo"]
    # only the objective (and what it needs to see the same data) differs: KTO splits the pairs into twice the items
    kto, mapo = report["settings"]["kto"], report["settings"]["mapo"]
    assert kto["unpaired"] and not mapo["unpaired"] and kto["steps"] == mapo["steps"] and kto["lr"] == mapo["lr"]
    assert kto["batch_items"] == 2 * mapo["batch_items"] and mapo["beta"] == 0.1
    t = report["training"]
    assert t["kto"]["images_per_step"] == t["mapo"]["images_per_step"] == 4  # the same images per optimizer step
    assert t["kto"]["reference_model"] and not t["mapo"]["reference_model"]  # MaPO holds one denoiser
    for loss in ("kto", "mapo"):
        assert t[loss]["steps"] == 2 and t[loss]["step_s"] > 0 and t[loss]["peak_memory_mib"] > 0
        for setting in ("demo", "defaults"):
            for judge in ("judge", "ai", "crowd"):
                r = report["win_rates_vs_base"][setting][judge][loss]
                assert 0 <= r["image_ci_low"] <= r["image_win_rate"] <= r["image_ci_high"] <= 1
                assert r["n_images"] == 40 and r["mean_diff_ci_low"] <= r["mean_diff"] <= r["mean_diff_ci_high"]
            assert report["diversity"][setting]["ratio_to_base"][loss] > 0
            assert 0 <= report["failure_share"][setting][loss] <= 1
    md = (out / "losses.md").read_text()
    assert "| kto | 0." in md and "| mapo | 0.1 |" in md and "peak memory" in md
    printed = capsys.readouterr().out
    assert "demo sampling: kto vs base" in printed and "losses.md" in printed


@pytest.mark.parametrize("losses, message", [("dpo,nope", "nope"), ("dpo,dpo", "named twice"), (",", "at least one")])
def test_a_bad_loss_list_is_one_line(tmp_path, capsys, losses, message):
    assert main(["demo", "--size", "tiny", "--losses", losses, "--output-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "d").exists()
