"""Building a checkpoint's components by the classes its model_index.json names (diffusers and transformers only),
and the one exception to that: a transformers processor in a tokenizer slot (FLUX.2 [dev]'s PixtralProcessor) loads
as its tokenizer alone. Used by the loader (models/loading.py), final/ (models/family.py) and `generate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from diffusion_dpo.errors import UserError


def library_class(entry: list, what: str) -> type:
    """The class a model_index entry names, only from diffusers or transformers."""
    import diffusers
    import transformers

    library, name = entry
    module = {"diffusers": diffusers, "transformers": transformers}.get(library)
    if module is None or not hasattr(module, name):
        raise UserError(f"model_index.json: {what} is {library}.{name}; only diffusers/transformers classes load")
    return getattr(module, name)


def load_tokenizer(index: dict, role: str, pretrained: str, revision: Optional[str]) -> Any:
    """The tokenizer in folder `role`, of the class model_index.json names. A processor there (FLUX.2 [dev]'s
    PixtralProcessor) loads as its tokenizer alone, from the same folder's tokenizer.json and chat template: text
    prompts never reach its image processor, whose transformers class needs torchvision, and the pipeline calls
    `apply_chat_template` on it, which a tokenizer answers as the processor does for text (models/llm.py)."""
    import transformers

    cls = library_class(index[role], role)
    if role in processor_slots(index):  # by name: without torchvision transformers hands a placeholder class
        cls = transformers.PreTrainedTokenizerFast
    # trust_remote_code=False: no auto_map in a checkpoint's config may bring code, nor ask on the terminal
    return cls.from_pretrained(pretrained, subfolder=role, trust_remote_code=False, revision=revision)


def processor_slots(index: dict) -> list[str]:
    """The model_index.json tokenizer folders that hold a transformers processor (FLUX.2 [dev]'s tokenizer/; not
    SD 1.x's feature_extractor, a CLIPImageProcessor that no job loads)."""
    return [k for k, v in index.items() if k.startswith("tokenizer") and isinstance(v, list) and len(v) == 2
            and v[0] == "transformers" and str(v[1]).endswith("Processor")]


def load_pipeline_class(pipeline_class: Any, pretrained: str, index: dict, revision: Optional[str] = None,
                        **kwargs: Any) -> Any:
    """`pipeline_class.from_pretrained(pretrained, revision=revision, **kwargs)` with each processor slot loaded as
    its tokenizer (see `load_tokenizer`): diffusers would otherwise build the processor (FLUX.2 [dev]'s needs
    torchvision) and refuses a tokenizer passed in its place, so the slot is loaded empty and then filled."""
    tokenizers = {role: load_tokenizer(index, role, pretrained, revision) for role in processor_slots(index)
                  if role not in kwargs}
    pipe = pipeline_class.from_pretrained(pretrained, revision=revision, **{role: None for role in tokenizers},
                                          **kwargs)
    for role, tokenizer in tokenizers.items():
        setattr(pipe, role, tokenizer)
    return pipe


def restore_processor_folders(index: dict, pretrained: str, revision: Optional[str], out: Path) -> None:
    """After `save_pretrained` of a pipeline whose processor slots were loaded as tokenizers: put each slot's
    original folder (processor and image-processor configs with the tokenizer's files) and its model_index.json
    entry back, so the saved pipeline names the same classes as the checkpoint it came from."""
    import shutil

    slots = processor_slots(index)
    if not slots:
        return
    source = Path(pretrained).expanduser()
    if not source.exists():
        from huggingface_hub import snapshot_download

        source = Path(snapshot_download(pretrained, revision=revision, allow_patterns=[f"{r}/*" for r in slots]))
    saved = json.loads((out / "model_index.json").read_text())
    for role in slots:
        shutil.rmtree(out / role, ignore_errors=True)
        shutil.copytree(source / role, out / role)
        saved[role] = index[role]
    (out / "model_index.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
