"""fleetllm's built-in default model: a small Llama trained on the Python standard library."""

from __future__ import annotations

import logging
from pathlib import Path

from fleetllm.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent


def default_model_path() -> str:
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise ModelLoadError(
            f"no model was named and the built-in default model is missing from "
            f"{DEFAULT_MODEL_DIR}; pass model=DIR (--model DIR)"
        )
    logger.info("no model named: using fleetllm's built-in default model (%s)",
                DEFAULT_MODEL_DIR)
    return str(DEFAULT_MODEL_DIR)
