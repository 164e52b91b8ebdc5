"""The frozen T5 that ships inside the package: the quickstart's tiny T5 1.1 (``'quickstart'``).

``prompt_t5x/assets/quickstart_t5.msgpack`` (~1 MB, flax msgpack of the T5X-layout tree) and
``quickstart_t5.json`` (its ``T5Config`` and how it was made) were written by
``prompt-t5x quickstart --pretrain`` (``prompt_t5x.commands.quickstart``). Every command that takes
a frozen checkpoint accepts ``'quickstart'`` and reads it here.
"""

from __future__ import annotations

import json
import os

import jax
from flax import serialization

from prompt_t5x.model import t5

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
ASSET_PARAMS = os.path.join(ASSET_DIR, "quickstart_t5.msgpack")
ASSET_INFO = os.path.join(ASSET_DIR, "quickstart_t5.json")


def _require(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"quickstart model file missing: {path} (re-make it with "
                                "'prompt-t5x quickstart --pretrain')")


def load_config(info_path: str = ASSET_INFO) -> t5.T5Config:
    """The committed quickstart model's ``T5Config`` alone (its small JSON file)."""
    _require(info_path)
    with open(info_path) as f:
        return t5.T5Config.from_dict(json.load(f)["config"])


def load_asset(params_path: str = ASSET_PARAMS, info_path: str = ASSET_INFO):
    """(config, params) of the committed quickstart model."""
    _require(params_path)
    config = load_config(info_path)
    with open(params_path, "rb") as f:
        params = serialization.msgpack_restore(f.read())
    # One transfer of the whole tree: jnp.asarray leaf by leaf compiled a program per shape.
    return config, jax.device_put(params)
