"""Publishing a run: every check before any upload, one commit, the card naming the repository."""

import pytest

from diffusion_dpo.cli import main
from diffusion_dpo.errors import UserError
from diffusion_dpo.push import check_can_push, push_run


def _run(tmp_path):
    final = tmp_path / "my-run" / "final"
    (final / "unet").mkdir(parents=True)
    (final / "model_index.json").write_text("{}")
    (final / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"w")
    (final / "README.md").write_text('# my-run\n\npipe = StableDiffusionPipeline.from_pretrained("my-run")\n')
    return tmp_path / "my-run"


def test_push_fails_in_one_line_before_any_upload(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda *a, **k: calls.append("create"))
    run = _run(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["push", str(run), "--repo-id", "me/model"]) == 2
    assert capsys.readouterr().err.strip() == ("diffusion-dpo: error: push: the Hugging Face hub is switched off here "
                                               "(HF_HUB_OFFLINE=1); unset it to push")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["push", str(run), "--repo-id", "me/model"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    for repo, message in [("no-owner", "needs its owner"), ("bad id!", "is not valid")]:
        with pytest.raises(UserError, match=message):
            check_can_push(repo, token="t")
    with pytest.raises(UserError, match="holds no final/"):
        push_run(tmp_path, "me/model", token="t")
    assert calls == []  # nothing reached the hub


def test_push_uploads_final_in_one_commit_with_the_card_naming_the_repo(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    seen = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **k: seen.setdefault("repo", (repo_id, k["private"])))

    class Info:
        commit_url = "https://huggingface.co/me/model/commit/abc"

    def create_commit(self, repo_id, operations, **k):
        seen["files"] = {op.path_in_repo: op.path_or_fileobj for op in operations}
        return Info()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    assert push_run(_run(tmp_path), "me/model", private=True, token="t") == Info.commit_url
    assert seen["repo"] == ("me/model", True)
    assert sorted(seen["files"]) == ["README.md", "model_index.json", "unet/diffusion_pytorch_model.safetensors"]
    card = seen["files"]["README.md"].decode()
    assert card.startswith("# me/model\n") and 'from_pretrained("me/model")' in card


def test_train_push_to_hub_is_checked_before_training(tmp_path, tiny_sd, monkeypatch):
    from huggingface_hub import constants

    from diffusion_dpo.training import Trainer
    from test_training import make_cfg

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="push: the Hugging Face hub is switched off"):
        Trainer(make_cfg(tmp_path / "run", tiny_sd, tmp_path / "no-data-needed", train__push_to_hub="me/model"))
    assert not (tmp_path / "run").exists()


def _fake_hub(monkeypatch) -> dict:
    """HfApi's create_repo/create_commit replaced: what they were given lands in the returned dict."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    seen = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **k: seen.__setitem__("repo", (repo_id, k["private"])))

    def create_commit(self, repo_id, operations, **k):
        seen["files"] = {op.path_in_repo: op.path_or_fileobj for op in operations}
        return None

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    return seen


def test_push_is_private_unless_public(tmp_path, monkeypatch, capsys):
    seen = _fake_hub(monkeypatch)
    run = _run(tmp_path)
    push_run(run, "me/model", token="t")
    assert seen["repo"] == ("me/model", True)
    assert main(["push", str(run), "--repo-id", "me/model", "--token", "t"]) == 0
    assert seen["repo"] == ("me/model", True)
    assert main(["push", str(run), "--repo-id", "me/model", "--token", "t", "--public"]) == 0
    assert seen["repo"] == ("me/model", False)
    assert "pushed: https://huggingface.co/me/model" in capsys.readouterr().out


@pytest.mark.parametrize("rank", [0, 4])
def test_pushed_card_names_no_local_path(tmp_path, monkeypatch, rank):
    from diffusion_dpo.config import load_config, to_yaml
    from diffusion_dpo.training.model_card import RunFacts, write_card

    seen = _fake_hub(monkeypatch)
    model, data = tmp_path / "models" / "tiny-sd", tmp_path / "pairs" / "train.parquet"
    model.mkdir(parents=True)
    data.parent.mkdir()
    data.write_bytes(b"")
    run = tmp_path / "my-run"
    cfg = load_config(None, {"output_dir": str(run), "model.pretrained": str(model), "data.path": str(data),
                             "lora.rank": str(rank)})
    final = run / "final"
    final.mkdir(parents=True)
    (final / ("pytorch_lora_weights.safetensors" if rank else "model_index.json")).write_bytes(b"{}")
    facts = RunFacts("Stable Diffusion", ("stable-diffusion",), "StableDiffusionPipeline", pairs=8, steps=2,
                     skipped_steps=0, pairs_per_step=2, lr=1e-4)
    card = write_card(final, cfg, facts).read_text()
    for local in (str(tmp_path), str(data.parent), str(model)):
        assert local not in card, local
    assert "`tiny-sd`" in card and "`train.parquet`" in card  # basenames only
    assert "base_model" not in card  # a local base model is no hub id: left out of the metadata
    push_run(run, "me/model", token="t")
    pushed = seen["files"]["README.md"].decode()
    assert str(tmp_path) not in pushed and str(data.parent) not in pushed
    loads = 'pipe.load_lora_weights("me/model")' if rank else 'from_pretrained("me/model")'
    assert loads in pushed and pushed.startswith("---\n")
    if rank:
        assert 'from_pretrained("tiny-sd")' in pushed
    # a card written before cards named basenames only: the paths in the run's config.yaml are cut to basenames
    (run / "config.yaml").write_text(to_yaml(cfg))
    (final / "README.md").write_text(f"# my-run\n\nA LoRA of `{model}` on `{data}`, written to {run}.\n"
                                     f'pipe = StableDiffusionPipeline.from_pretrained("{model}")\n')
    push_run(run, "me/model", token="t")
    pushed = seen["files"]["README.md"].decode()
    assert str(tmp_path) not in pushed and str(data.parent) not in pushed
    assert "A LoRA of `tiny-sd` on `train.parquet`, written to my-run." in pushed


def test_push_refuses_a_link_out_of_final(tmp_path, monkeypatch):
    seen = _fake_hub(monkeypatch)
    run = _run(tmp_path)
    (tmp_path / "secret.txt").write_text("token")
    (run / "final" / "notes.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(UserError, match=r"push: .*notes.txt links to .*secret.txt, outside .*final") as err:
        push_run(run, "me/model", token="t")
    assert "\n" not in str(err.value) and seen == {}


def test_train_time_push_uses_hub_private(tmp_path, tiny_sd, monkeypatch):
    import huggingface_hub

    from diffusion_dpo import push
    from diffusion_dpo.config import TrainConfig
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic
    from diffusion_dpo.training import Trainer
    from test_training import make_cfg

    assert TrainConfig().hub_private is True
    _fake_hub(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "t")
    pushes = []
    monkeypatch.setattr(push, "push_run", lambda run, repo_id, **k: pushes.append((repo_id, k)) or "url")
    data = build_tiny_pickapic(tmp_path / "data", num_pairs=4)
    Trainer(make_cfg(tmp_path / "run", tiny_sd, data, train__max_steps=1, lora__rank=2,
                     train__push_to_hub="me/model", train__hub_private="false")).run()
    assert pushes == [("me/model", {"private": False})]
