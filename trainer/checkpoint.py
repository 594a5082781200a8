"""Checkpoints that resume exactly: written atomically, the last K kept, loaded without running pickled code.

Layout of ``<run dir>/checkpoints/``: ``step-000123.pt`` per save (the newest ``keep`` are kept) and
``last.pt``, a hard link to (or copy of) the newest. A reader tries ``last.pt`` and then the step files,
newest first, skipping any that is truncated or corrupt, so a crash (even SIGKILL) mid-save never
leaves a run unable to resume.

FSDP runs (``trainer.parallel=fsdp``) write sharded checkpoints through torch.distributed.checkpoint
(DCP) instead: a directory ``step-000123/`` per save holding each rank's shards of the model, optimizer
and averaged model (``__R_0.distcp``, DCP's ``.metadata``), ``state.pt`` (progress, scheduler, the model
config, the optimizer's non-tensor state) and ``rng-R.pt`` (rank R's RNG states). Every rank writes into
``step-000123.tmp/``; after a barrier rank 0 renames it into place, so a save killed midway leaves no
step directory. The newest ``keep`` directories are kept; the newest whose files are all present and
complete is resumed from. Nothing is unpickled freely: ``state.pt`` and ``rng-R.pt`` load with
weights_only, DCP's ``.metadata`` with an unpickler that admits only DCP's own metadata classes, and a
checkpoint holding non-tensor DCP entries (which DCP would unpickle) is refused.

Resuming on another world size works: DCP reshards the model, optimizer and averaged-model state on
load. The data position is converted (the batches consumed so far, ``batch_index * old world size``,
divided by the new one), but batches are sharded by rank, so the data order (which batches make up each
step, and a few batches around the resume point) differs from an uninterrupted run; ranks beyond the old
world size keep their freshly seeded RNG state. With the same world size a resumed run continues exactly.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from trainer.distributed import all_reduce
from trainer.files import atomic_write, storage_error

STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
STEP_DIR = re.compile(r"^step-(\d+)$")  # FSDP: one DCP directory per save


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and why."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would run code when unpickled: never skipped silently."""


def _atomic_write(state: dict, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the renames themselves durable
    finally:
        os.close(fd)


def step_files(checkpoint_dir: Path) -> list[Path]:
    """``step-*.pt`` files, newest (highest step) first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _load_weights_only(path: Path):
    """torch.load with weights_only: a pickle that would run code is refused (UnsafeCheckpointError), never executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "allowed global" in str(error) or "Unsupported global" in str(error):  # not mere corruption
            raise UnsafeCheckpointError(f"refusing checkpoint {path}: it holds objects other than tensors and "
                                        f"plain containers, which could run code when loaded ({first_line})") from error
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(error).__name__}: {first_line})") from error


def read_checkpoint(path: Path) -> dict:
    """The saved state, or a CheckpointError: unreadable/corrupt, or holding more than tensors and
    plain containers (weights_only: a pickle that would run code is refused, never executed)."""
    state = _load_weights_only(path)
    if not isinstance(state, dict) or not {"model", "progress", "model_config"} <= state.keys():
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint of this repository")
    return state


def latest_checkpoint(checkpoint_dir: Path, report=print) -> tuple[Path, dict] | None:
    """The newest readable checkpoint, reporting (one line each) any newer one that is corrupt.
    None when there is none; a CheckpointError when some exist but none is readable, or one is unsafe."""
    candidates = [checkpoint_dir / "last.pt"] if (checkpoint_dir / "last.pt").exists() else []
    candidates += step_files(checkpoint_dir)
    problems = []
    for path in candidates:
        try:
            return path, read_checkpoint(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as error:
            report(f"warning: skipping {error}")
            problems.append(path.name)
    if problems:
        raise CheckpointError(f"no readable checkpoint in {checkpoint_dir} (tried {', '.join(problems)}); "
                              "use trainer.resume=never or another run directory")
    if step_dirs(checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir} holds only sharded checkpoints (step-NNNNNN/ directories) of an "
                              "FSDP run: resume with trainer.parallel=fsdp under torchrun, or use trainer.resume=never")
    return None


def _check_optim_config(saved: dict | None, path: Path, current: dict, saved_groups: list, groups: list) -> None:
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


def _check_model_config(saved: dict, path: Path, current: dict) -> None:
    mismatched = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if mismatched:
        details = ", ".join(f"model.{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in mismatched)
        raise CheckpointError(f"checkpoint {path} was written for another model ({details}); "
                              "use trainer.resume=never or another run directory")


def _restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


# --- sharded (FSDP) checkpoints through torch.distributed.checkpoint ---------------------------------

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


def _read_metadata(path: Path):
    """DCP's metadata of checkpoint directory ``path``, unpickled without running code."""
    try:
        with open(path / ".metadata", "rb") as f:
            return _MetadataUnpickler(f).load()
    except _ForbiddenGlobal as error:
        raise UnsafeCheckpointError(f"refusing checkpoint {path}: its .metadata names {error}, which could run "
                                    "code when loaded") from error
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} is unreadable (.metadata: {type(error).__name__}: {error})") from error


def _safe_reader(path: Path):
    """DCP's file reader, with the metadata read by the restricted unpickler (DCP's own uses pickle.load)."""
    from torch.distributed.checkpoint import FileSystemReader  # imported here: it costs seconds
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = _read_metadata(Path(self.path))
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def step_dirs(checkpoint_dir: Path) -> list[Path]:
    """``step-*/`` checkpoint directories, newest (highest step) first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def _split(tree: dict) -> tuple[dict, dict]:
    """(tensor leaves, other leaves) of a nested dict, each with the same nesting: DCP saves the
    first (sharded), ``state.pt`` the second, so DCP never has to unpickle anything."""
    tensors, rest = {}, {}
    for key, value in tree.items():
        if isinstance(value, dict):
            tensors[key], rest[key] = _split(value)
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            rest[key] = value
    return tensors, rest


def _merge(tensors: dict, rest: dict) -> dict:
    merged = dict(tensors)
    for key, value in rest.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def _sharded_state(model, optimizer, averaged) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if averaged is not None:
        state["averaged"] = get_model_state_dict(averaged)
    return state


def read_sharded_state(path: Path, rank: int) -> dict:
    """The non-tensor state of checkpoint directory ``path`` (with ``rng``: this rank's RNG states, None
    beyond the saved world size), after checking that DCP's metadata is safe and every shard file it
    names is present and long enough. A CheckpointError names what is wrong."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    state = _load_weights_only(path / "state.pt")
    if not isinstance(state, dict) or not {"progress", "model_config", "world_size", "non_tensor"} <= state.keys():
        raise CheckpointError(f"checkpoint {path} is not a sharded training checkpoint of this repository")
    state["rng"] = _load_weights_only(path / f"rng-{rank}.pt") if rank < state["world_size"] else None
    metadata = _read_metadata(path)
    pickled = [fqn for fqn, entry in metadata.state_dict_metadata.items() if isinstance(entry, BytesStorageMetadata)]
    if pickled:
        raise UnsafeCheckpointError(f"refusing checkpoint {path}: entries {', '.join(pickled[:3])} are pickled "
                                    "objects, which could run code when loaded")
    needed: dict[str, int] = {}
    for item in metadata.storage_data.values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, length in sorted(needed.items()):
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size is None or size < length:
            raise CheckpointError(f"checkpoint {path} is incomplete ({name} " +
                                  ("is missing)" if size is None else f"has {size} of {length} bytes)"))
    return state




class Checkpointer:
    """Saves and restores one run's model, optimizer, schedule, averaged model, RNG and ``TrainState``-like
    progress under ``directory``: single files written by rank 0 (one process, DDP) or, with ``sharded``
    (FSDP), DCP directories every rank writes its shards into. It owns when to save: every ``interval``
    steps, and after ``minutes`` of wall time since the last save."""

    def __init__(self, directory: Path, cfg, model, optimizer, scheduler, averaged=None, *, sharded: bool = False,
                 is_main: bool = True, keep: int = 3, interval: Optional[int] = None,
                 minutes: Optional[float] = None, report: Callable[[str], None] = print):
        self.directory, self.sharded, self.is_main = directory, sharded, is_main
        self.model, self.optimizer, self.scheduler, self.averaged = model, optimizer, scheduler, averaged
        self.model_config = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
        self.optim_config = OmegaConf.to_container(cfg.optim, resolve=True, enum_to_str=True) if "optim" in cfg else {}
        self.keep, self.interval, self.minutes = keep, interval, minutes
        self.report = report if is_main else (lambda line: None)
        self.saved_step, self.saved_time = -1, time.time()

    def due(self, step: int) -> bool:
        return (self.interval is not None and step % self.interval == 0) or (
            self.minutes is not None and time.time() - self.saved_time > 60 * self.minutes)

    def latest(self, step: int) -> Path:
        """Where the save of ``step`` is (what a resume reads first)."""
        return self.directory / (f"step-{step:06d}" if self.sharded else "last.pt")

    def save(self, progress: dict) -> None:
        """Save at ``progress["step"]`` unless that step is already saved. Sharded: every rank calls this."""
        if progress["step"] != self.saved_step:
            if self.sharded:
                self._save_sharded(progress)
            elif self.is_main:
                self._save_file(progress)
        self.saved_step, self.saved_time = progress["step"], time.time()

    def load(self) -> Optional[tuple[Path, dict]]:
        """Restore the newest usable checkpoint in place: (its path, the saved progress), or None when there
        is none. Sharded: every rank calls this."""
        found = self._load_sharded() if self.sharded else self._load_file()
        if found is not None:
            self.saved_step = found[1]["step"]
        return found

    # single files -------------------------------------------------------------------------------------
    def _save_file(self, progress: dict) -> Path:
        """``step-NNNNNN.pt`` (temporary file, fsync, rename) and ``last.pt`` (link renamed into place); step
        files beyond the newest ``keep`` are removed. Refuses non-finite parameters, so a diverged state
        never replaces a good checkpoint."""
        for name, tensor in self.model.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(f"refusing to checkpoint step {progress['step']}: parameter {name} is not finite")
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "averaged": self.averaged.state_dict() if self.averaged is not None else None,
            "progress": dict(progress),
            "rng": _rng_state(),
            "model_config": self.model_config,
            "optim_config": self.optim_config,
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise storage_error(self.directory, error) from error
        for stale in self.directory.glob("step-*.pt.tmp"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
        path = self.directory / f"step-{progress['step']:06d}.pt"
        _atomic_write(state, path)
        last, link = self.directory / "last.pt", self.directory / "last.pt.tmp"
        link.unlink(missing_ok=True)
        try:
            try:
                os.link(path, link)
            except OSError:  # file systems without hard links
                shutil.copyfile(path, link)
            os.replace(link, last)
        except OSError as error:  # the step file is complete: a resume finds it without last.pt
            link.unlink(missing_ok=True)
            raise storage_error(last, error) from error
        for old in step_files(self.directory)[max(self.keep, 1):]:
            old.unlink(missing_ok=True)
        _sync_dir(self.directory)
        return path

    def _load_file(self) -> Optional[tuple[Path, dict]]:
        found = latest_checkpoint(self.directory, report=self.report)
        if found is None:
            return None
        path, state = found
        self.restore(state, path)
        return path, state["progress"]

    def restore(self, state: dict, path: Path) -> None:
        """Restore a single-file checkpoint's ``state`` (from ``read_checkpoint(path)``) in place."""
        _check_model_config(state["model_config"], path, self.model_config)
        _check_optim_config(state.get("optim_config"), path, self.optim_config,
                            state["optimizer"]["param_groups"], self.optimizer.state_dict()["param_groups"])
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, RuntimeError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer ({first_line})") from error
        if self.averaged is not None and state["averaged"] is not None:
            self.averaged.load_state_dict(state["averaged"])
        _restore_rng(state["rng"])

    # sharded directories (FSDP, torch.distributed.checkpoint) -------------------------------------------
    def _save_sharded(self, progress: dict) -> Path:
        """Writes ``step-NNNNNN/`` (see the module docstring) and removes directories beyond the newest
        ``keep``. Refuses non-finite parameters on every rank alike."""
        import torch.distributed.checkpoint as dcp

        rank, world_size = dist.get_rank(), dist.get_world_size()
        state = _sharded_state(self.model, self.optimizer, self.averaged)
        names = [name for name, tensor in state["model"].items() if tensor.is_floating_point()]
        local = [t.to_local() if hasattr(t, "to_local") else t for t in (state["model"][name] for name in names)]
        bad = all_reduce([float(not torch.isfinite(t).all()) for t in local], dist.ReduceOp.MAX)  # each rank its shards
        if any(bad):
            raise CheckpointError(f"refusing to checkpoint step {progress['step']}: parameter "
                                  f"{names[bad.index(1.0)]} is not finite")
        tensors, rest = _split(state)
        final = self.directory / f"step-{progress['step']:06d}"
        tmp = final.with_name(final.name + ".tmp")
        if rank == 0:
            for stale in self.directory.glob("step-*.tmp"):  # left by saves that were killed
                shutil.rmtree(stale)
            tmp.mkdir(parents=True)
        dist.barrier()
        _atomic_write(_rng_state(), tmp / f"rng-{rank}.pt")
        dcp.save(tensors, checkpoint_id=tmp)  # returns on every rank once all shards and .metadata are written
        if rank == 0:
            _atomic_write({"progress": dict(progress), "scheduler": self.scheduler.state_dict(),
                           "world_size": world_size, "model_config": self.model_config,
                           "optim_config": self.optim_config, "non_tensor": rest},
                          tmp / "state.pt")
        dist.barrier()
        if rank == 0:
            if final.exists():  # a corrupt one of the same step, from before the resume
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in step_dirs(self.directory)[max(self.keep, 1):]:
                shutil.rmtree(old)
            _sync_dir(self.directory)
        dist.barrier()
        return final

    def _load_sharded(self) -> Optional[tuple[Path, dict]]:
        """The newest complete ``step-NNNNNN/``, resharded by DCP if the world size changed. The ranks agree
        on which directory to use; any CheckpointError is raised on every rank."""
        candidates = step_dirs(self.directory)
        if not candidates and step_files(self.directory):
            raise CheckpointError(f"{self.directory} holds single-file checkpoints (step-NNNNNN.pt) of a 1-process "
                                  "or DDP run, not sharded ones: resume without trainer.parallel=fsdp, or use "
                                  "trainer.resume=never")
        problems = []
        for path in candidates:
            state = self._agreed_sharded_state(path)
            if state is None:
                problems.append(path.name)
                continue
            return path, self._restore_sharded(path, state)
        if problems:
            raise CheckpointError(f"no readable checkpoint in {self.directory} (tried {', '.join(problems)}); "
                                  "use trainer.resume=never or another run directory")
        return None

    def _agreed_sharded_state(self, path: Path) -> Optional[dict]:
        """This rank's ``read_sharded_state(path)``, or None (reported) when it is unreadable on any rank."""
        problem, unsafe = None, False
        try:
            state = read_sharded_state(path, dist.get_rank())
        except CheckpointError as error:
            problem, unsafe = error, isinstance(error, UnsafeCheckpointError)
        worst = all_reduce([float(problem is not None) + float(unsafe)], dist.ReduceOp.MAX)[0]
        if worst == 2:  # never skipped in favour of an older one
            raise problem if unsafe else UnsafeCheckpointError(f"refusing checkpoint {path}: unsafe on another rank")
        if worst == 1:
            self.report(f"warning: skipping {problem or f'checkpoint {path}: unreadable on another rank'}")
            return None
        return state

    def _restore_sharded(self, path: Path, state: dict) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        _check_model_config(state["model_config"], path, self.model_config)
        _check_optim_config(state.get("optim_config"), path, self.optim_config, [], [])
        averaged = self.averaged if "averaged" in state["non_tensor"] else None
        live = _sharded_state(self.model, self.optimizer, averaged)
        tensors, _ = _split(live)
        try:
            dcp.load(tensors, storage_reader=_safe_reader(path))
        except Exception as error:  # raised on every rank: DCP gathers the failures
            lines = str(error).strip().splitlines()
            raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer or is corrupt "
                                  f"({type(error).__name__}: {lines[-1] if lines else ''})") from error
        loaded = _merge(tensors, state["non_tensor"])
        set_state_dict(self.model, self.optimizer, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optimizer"])
        if "averaged" in live:
            set_model_state_dict(averaged, loaded["averaged"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["rng"] is not None:
            _restore_rng(state["rng"])
        progress = state["progress"]
        progress["batch_index"] = progress["batch_index"] * state["world_size"] // dist.get_world_size()
        return progress
