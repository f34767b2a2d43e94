"""Console quiet: library chatter (progress bars while saving and loading, deprecation notes, optional-backend
notices) kept out of our commands' output, so that what a user reads is ours. Every command (and the demo's worker
processes) calls these; nothing here imports the rest of the package."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Library chatter (progress bars while saving, deprecation notes, optional-backend notices) hides our output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # hub download bars stay (real checkpoints take minutes); datasets' cache-building bar does not
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # diffusers -> huggingface_hub
    # bitsandbytes (imported by peft whenever installed) warns on every CPU with AVX512-bf16 that an optional
    # 4-bit kernel package is missing; 8-bit AdamW does not use it
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # ...and, where the `kernels` package is installed, tries to fetch that kernel from the hub, which offline
    # logs "Skipping publisher trust check ..." on stderr, before our own one-line errors
    logging.getLogger("kernels").setLevel(logging.ERROR)
    # torchao (imported by peft whenever installed) logs that its CUDA-only kernel libraries fail to load on a CPU
    logging.getLogger("torchao").setLevel(logging.ERROR)
    # ...and registers enums with torch's pytree, which warns that it need not
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def quiet_progress_bars() -> None:
    """diffusers', transformers' and datasets' per-save/per-load bars ("Writing model shards", "Loading
    weights", "Generating train split") say nothing useful here; hub download bars are kept."""
    import datasets
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()  # "Generating train split" (the env var only works before the import)
