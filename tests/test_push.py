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
