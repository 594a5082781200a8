"""Sharded checkpoints (FSDP) through torch.distributed.checkpoint (DCP): a directory ``step-NNNNNN/``
per save that every rank writes its shards into (the layout: ``trainer.checkpoint``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from trainer.checkpoint.common import (Contents, restore_rng, rng_state, save_file, step_dirs, step_files,
                                       sync_dir)
from trainer.checkpoint.safe_load import (CheckpointError, UnsafeCheckpointError, check_model_config,
                                          check_optim_config, load_weights_only, read_metadata, safe_reader)
from trainer.distributed import all_reduce, is_dtensor, is_main_process, rank as this_rank


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

    state = load_weights_only(path / "state.pt")
    if not isinstance(state, dict) or not {"progress", "model_config", "world_size", "non_tensor"} <= state.keys():
        raise CheckpointError(f"checkpoint {path} is not a sharded training checkpoint of this repository")
    state["rng"] = load_weights_only(path / f"rng-{rank}.pt") if rank < state["world_size"] else None
    metadata = read_metadata(path)
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


class ShardedBackend:
    """Saves and restores ``contents`` as DCP directories under ``directory``; every rank calls each method."""

    def __init__(self, directory: Path, contents: Contents, keep: int, report: Callable[[str], None]):
        self.directory, self.contents, self.keep, self.report = directory, contents, keep, report

    def path(self, step: int) -> Path:
        return self.directory / f"step-{step:06d}"

    def save(self, progress: dict) -> Path:
        """Writes ``step-NNNNNN/`` (see the module docstring) and removes directories beyond the newest
        ``keep``. Refuses non-finite parameters on every rank alike."""
        import torch.distributed.checkpoint as dcp

        c = self.contents
        rank, world_size, main = this_rank(), dist.get_world_size(), is_main_process()
        state = _sharded_state(c.model, c.optimizer, c.averaged)
        names = [name for name, tensor in state["model"].items() if tensor.is_floating_point()]
        local = [t.to_local() if is_dtensor(t) else t for t in (state["model"][name] for name in names)]
        bad = all_reduce([float(not torch.isfinite(t).all()) for t in local], dist.ReduceOp.MAX)  # each rank its shards
        if any(bad):
            raise CheckpointError(f"refusing to checkpoint step {progress['step']}: parameter "
                                  f"{names[bad.index(1.0)]} is not finite")
        tensors, rest = _split(state)
        final = self.directory / f"step-{progress['step']:06d}"
        tmp = final.with_name(final.name + ".tmp")
        if main:
            for stale in self.directory.glob("step-*.tmp"):  # left by saves that were killed
                shutil.rmtree(stale)
            tmp.mkdir(parents=True)
        dist.barrier()
        save_file(rng_state(), tmp / f"rng-{rank}.pt")
        dcp.save(tensors, checkpoint_id=tmp)  # returns on every rank once all shards and .metadata are written
        if main:
            saved = {"progress": dict(progress), "scheduler": c.scheduler.state_dict(), "world_size": world_size,
                     "model_config": c.model_config, "optim_config": c.optim_config, "non_tensor": rest}
            save_file(saved, tmp / "state.pt")
        dist.barrier()
        if main:
            if final.exists():  # a corrupt one of the same step, from before the resume
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in step_dirs(self.directory)[max(self.keep, 1):]:
                shutil.rmtree(old)
            sync_dir(self.directory)
        dist.barrier()
        return final

    def load(self) -> Optional[tuple[Path, dict]]:
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
            state = read_sharded_state(path, this_rank())
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

        c = self.contents
        check_model_config(state["model_config"], path, c.model_config)
        check_optim_config(state.get("optim_config"), path, c.optim_config, [], [])
        averaged = c.averaged if "averaged" in state["non_tensor"] else None
        live = _sharded_state(c.model, c.optimizer, averaged)
        tensors, _ = _split(live)
        try:
            dcp.load(tensors, storage_reader=safe_reader(path))
        except Exception as error:  # raised on every rank: DCP gathers the failures
            lines = str(error).strip().splitlines()
            raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer or is corrupt "
                                  f"({type(error).__name__}: {lines[-1] if lines else ''})") from error
        loaded = _merge(tensors, state["non_tensor"])
        set_state_dict(c.model, c.optimizer, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optimizer"])
        if "averaged" in live:
            set_model_state_dict(averaged, loaded["averaged"])
        c.scheduler.load_state_dict(state["scheduler"])
        if state["rng"] is not None:
            restore_rng(state["rng"])
        progress = state["progress"]
        progress["batch_index"] = progress["batch_index"] * state["world_size"] // dist.get_world_size()
        return progress
