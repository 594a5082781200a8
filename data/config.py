"""Turning what a caller passes as `data` options (a schema, a DictConfig, a dict) into a schema."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional, TypeVar

from .corpus import DataError

logger = logging.getLogger(__name__)

Schema = TypeVar("Schema")


def as_config(cfg: Any, schema: type[Schema]) -> Schema:
    """`cfg` as an instance of the dataclass `schema`; unknown keys are logged and ignored."""
    if isinstance(cfg, schema):
        return cfg
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # omegaconf is optional for plain-dict callers
        pass
    if not isinstance(cfg, dict):
        raise DataError(f"expected {schema.__name__}, a DictConfig or a dict, "
                        f"got {type(cfg).__name__}")
    names = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        logger.warning("ignoring unknown data config keys: %s", ", ".join(unknown))
    return schema(**{k: v for k, v in cfg.items() if k in names})


def resolve_path(path: Optional[str]) -> Optional[str]:
    """Expand ~ and, inside a Hydra job (which may chdir), anchor relative paths at the
    directory the command was launched from."""
    if path is None:
        return None
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        try:
            from hydra.core.hydra_config import HydraConfig
            from hydra.utils import to_absolute_path

            if HydraConfig.initialized():
                path = to_absolute_path(path)
        except ImportError:
            pass
    return path
