"""Publish a run's final/ (a pipeline directory or LoRA weights, with its model card) to the Hugging Face hub.

    diffusion-dpo push runs/sdxl-dpo --repo-id me/sdxl-dpo [--private]
    train --train.push_to_hub me/sdxl-dpo        (checked before training, pushed after final/ is written)

Everything that can be known before an upload is checked first, each in one line: the run has a final/, the repo
id is well formed, the hub is not switched off (HF_HUB_OFFLINE), a token is there (`hf auth login` or HF_TOKEN).
The files go up in one commit, so a failed push leaves the repository as it was. The card's usage example names
the repository instead of the local directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from diffusion_dpo.errors import UserError


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


def push_run(run: str | Path, repo_id: str, private: bool = False, token: Optional[str] = None) -> str:
    """Upload RUN_DIR/final to `repo_id` (created if needed) in one commit; return the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    final = final_dir(run)
    token = check_can_push(repo_id, token)
    local_name = Path(run).resolve().name if final != Path(run) else final.resolve().parent.name
    operations = []
    for file in sorted(p for p in final.rglob("*") if p.is_file()):
        rel = file.relative_to(final).as_posix()
        if rel == "README.md":  # the card's example loads the repository, not the local run directory
            text = file.read_text(encoding="utf-8")
            text = text.replace(f'"{local_name}"', f'"{repo_id}"').replace(f"# {local_name}\n", f"# {repo_id}\n", 1)
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
