"""Publish a run's final/ (a pipeline directory or LoRA weights, with its model card) to the Hugging Face hub.

    diffusion-dpo push runs/sdxl-dpo --repo-id me/sdxl-dpo [--public]
    train --train.push_to_hub me/sdxl-dpo        (checked before training, pushed after final/ is written)

A new repository is private unless asked otherwise (`--public`, `train.hub_private false`); an existing one keeps
its visibility.

Everything that can be known before an upload is checked first, each in one line: the run has a final/, the repo
id is well formed, the hub is not switched off (HF_HUB_OFFLINE), a token is there (`hf auth login` or HF_TOKEN).
The files go up in one commit, so a failed push leaves the repository as it was. Only final/'s own files go up (a
link out of it is refused). The card's usage example names the repository instead of the local directory, and a local
path the run's config.yaml names (a card written by an older version printed them) appears as its basename only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from diffusion_dpo.errors import UserError
from diffusion_dpo.training.model_card import basename, is_local

PATH_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".safetensors")  # never at the end of a hub id


def final_dir(run: str | Path) -> Path:
    """RUN_DIR/final, or RUN_DIR itself when it is already a final/ (a pipeline or LoRA weights)."""
    run = Path(run)
    for candidate in (run / "final", run):
        if (candidate / "model_index.json").is_file() or (candidate / "pytorch_lora_weights.safetensors").is_file():
            return candidate
    raise UserError(f"push: {run} holds no final/ (a pipeline or pytorch_lora_weights.safetensors); "
                    "finish the run first (--train.resume latest)")


def check_can_push(repo_id: str, token: Optional[str] = None) -> str:
    """The token to push with, after checking the repo id, that the hub is reachable in principle, and the token."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"push: repo id '{repo_id}' is not valid ({str(exc).splitlines()[0]})") from None
    if "/" not in repo_id:
        raise UserError(f"push: repo id '{repo_id}' needs its owner: 'user/{repo_id}' or 'org/{repo_id}'")
    if constants.HF_HUB_OFFLINE:
        raise UserError("push: the Hugging Face hub is switched off here (HF_HUB_OFFLINE=1); unset it to push")
    token = token or get_token()
    if not token:
        raise UserError("push: no Hugging Face token; log in with `hf auth login` or set HF_TOKEN")
    return token


def push_run(run: str | Path, repo_id: str, private: bool = True, token: Optional[str] = None) -> str:
    """Upload RUN_DIR/final to `repo_id` (created if needed, private unless `private` is False) in one commit;
    return the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    final = final_dir(run)
    token = check_can_push(repo_id, token)
    local_name = Path(run).resolve().name if final != Path(run) else final.resolve().parent.name
    root = final.resolve()
    operations = []
    for file in sorted(p for p in final.rglob("*") if p.is_file()):
        rel = file.relative_to(final).as_posix()
        if not file.resolve().is_relative_to(root):
            raise UserError(f"push: {file} links to {file.resolve()}, outside {final}; only final/'s own files are "
                            "uploaded")
        if rel == "README.md":
            text = card_for_hub(file.read_text(encoding="utf-8"), final, local_name, repo_id)
            operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=text.encode("utf-8")))
        else:
            operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(file)))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations, commit_message="Upload a diffusion-dpo run", repo_type="model")
    except Exception as exc:  # noqa: BLE001 - network, permission, quota: the hub's own message, in one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"push: uploading to '{repo_id}' failed: {first}") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


def card_for_hub(text: str, final: Path, local_name: str, repo_id: str) -> str:
    """final/README.md as published: its example loads the repository, not the local run directory, and every
    local path named by the run's config.yaml (or the run directory itself) appears as its basename."""
    text = text.replace(f"# {local_name}\n", f"# {repo_id}\n", 1)
    text = text.replace(f'load_lora_weights("{local_name}")', f'load_lora_weights("{repo_id}")')
    if (final / "model_index.json").is_file():  # a pipeline: from_pretrained loads the run itself
        text = text.replace(f'from_pretrained("{local_name}")', f'from_pretrained("{repo_id}")')
    for path in _local_paths(final):
        text = text.replace(path, basename(path))
    return text


def _local_paths(final: Path) -> list[str]:
    """The local paths a card of this run may name, longest first: the run directory, and the model, data and
    output paths in its config.yaml."""
    import yaml

    found = [str(final.parent), str(final.parent.resolve()), str(final.parent.absolute())]
    try:
        raw = yaml.safe_load((final.parent / "config.yaml").read_text(encoding="utf-8"))
        model, data, lora = (raw.get(k) or {} for k in ("model", "data", "lora"))
        found += [model.get("pretrained"), model.get("vae"), model.get("reference"), data.get("path"),
                  lora.get("init_from"), raw.get("output_dir")]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):  # no config.yaml: the directory only
        pass
    return sorted({p for p in found if isinstance(p, str) and ("/" in p or "\\" in p) and is_local(p, PATH_SUFFIXES)},
                  key=len, reverse=True)
