"""Loading checkpoints without running pickled code, and refusing ones that do not fit the run.

``torch.load`` runs with ``weights_only`` (tensors and plain containers), DCP's ``.metadata`` is read by
an unpickler that admits only DCP's own metadata classes, and a checkpoint written for another model or
optimizer setting is refused with a message that names the difference.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and why."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would run code when unpickled: never skipped silently."""


def load_weights_only(path: Path):
    """torch.load with weights_only: a pickle that would run code is refused (UnsafeCheckpointError), never executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "allowed global" in str(error) or "Unsupported global" in str(error):  # not mere corruption
            raise UnsafeCheckpointError(f"refusing checkpoint {path}: it holds objects other than tensors and "
                                        f"plain containers, which could run code when loaded ({first_line})") from error
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(error).__name__}: {first_line})") from error


def check_optim_config(saved: dict | None, path: Path, current: dict, saved_groups: list, groups: list) -> None:
    """Resuming restores the checkpoint's optimizer state and hyperparameters: another optimizer (or other
    values, which would be silently replaced by the saved ones) is refused. ``fused`` only picks a kernel."""
    if saved is None:  # written before the optimizer config was saved: compare the param-group fields
        if saved_groups and groups and set(saved_groups[0]) != set(groups[0]):
            raise CheckpointError(f"checkpoint {path} was written by another optimizer (its parameter groups hold "
                                  f"{', '.join(sorted(set(saved_groups[0]) - {'params'}))}); "
                                  "use trainer.resume=never or another run directory")
        return
    mismatched = sorted(k for k in saved.keys() | current.keys() if k != "fused" and saved.get(k) != current.get(k))
    if mismatched:
        details = ", ".join(f"optim.{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in mismatched)
        raise CheckpointError(f"checkpoint {path} was written with another optimizer setting ({details}); "
                              "use the checkpoint's values, trainer.resume=never or another run directory")


# What the parameters' shapes (and heads: their meaning) follow; trainer.init_from needs these to match. Dropout
# and label smoothing may change for fine-tuning, and max_positions sizes a table of fixed sinusoids, not a parameter.
MODEL_SHAPE_KEYS = ("name", "d_model", "d_ff", "heads", "encoder_layers", "decoder_layers", "pre_norm")


def check_model_config(saved: dict, path: Path, current: dict, keys=None,
                       advice: str = "use trainer.resume=never or another run directory") -> None:
    """Resuming needs every ``model`` value equal; ``keys`` names fewer (``MODEL_SHAPE_KEYS``)."""
    keys = saved.keys() | current.keys() if keys is None else keys
    mismatched = sorted(k for k in keys if saved.get(k) != current.get(k))
    if mismatched:
        details = ", ".join(f"model.{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in mismatched)
        raise CheckpointError(f"checkpoint {path} was written for another model ({details}); {advice}")


# What DCP's `.metadata` pickle may name: its own metadata classes, sizes, dtypes (below), layouts, paths.
_METADATA_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *((module, name) for module in ("pathlib", "pathlib._local") for name in ("PosixPath", "WindowsPath")),
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise _ForbiddenGlobal(f"{module}.{name}")


def read_metadata(path: Path):
    """DCP's metadata of checkpoint directory ``path``, unpickled without running code."""
    try:
        with open(path / ".metadata", "rb") as f:
            return _MetadataUnpickler(f).load()
    except _ForbiddenGlobal as error:
        raise UnsafeCheckpointError(f"refusing checkpoint {path}: its .metadata names {error}, which could run "
                                    "code when loaded") from error
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} is unreadable (.metadata: {type(error).__name__}: {error})") from error


def safe_reader(path: Path):
    """DCP's file reader, with the metadata read by the restricted unpickler (DCP's own uses pickle.load)."""
    from torch.distributed.checkpoint import FileSystemReader  # imported here: it costs seconds
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_metadata(Path(self.path))
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)
