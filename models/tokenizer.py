"""A Hugging Face tokenizer from a local folder: never downloaded, errors that name the folder."""

from __future__ import annotations

import os


def check_folder(folder: str, key: str) -> None:
    """ValueError naming `key` and the folder unless it is one (what a config can check before
    loading anything)."""
    if not os.path.isdir(folder):
        raise ValueError(f"{key} {folder!r} is not a folder (a local Hugging Face tokenizer; "
                         f"nothing is downloaded)")


def load_tokenizer(folder: str, key: str = "data.tokenizer"):
    """The tokenizer saved in `folder` (AutoTokenizer, local files only); ValueError naming
    `key` and the folder when it is not a folder or transformers is missing."""
    check_folder(folder, key)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(f"{key} = {folder!r} needs the transformers package") from None
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)
