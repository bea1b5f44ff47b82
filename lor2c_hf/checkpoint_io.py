"""Trainer checkpoints that are never resumed half-written, and training arguments that never carry a token.

`Trainer` writes `checkpoint-N` in place, file by file; a process killed mid-save leaves a folder that looks
like a checkpoint. `CheckpointIOMixin` writes a manifest (`lor2c_checkpoint.json`: each file's size and
sha256) atomically once every file of a checkpoint is written, and only then rotates old checkpoints away.
Resuming accepts only a checkpoint whose manifest holds: `resume_from_checkpoint=True` skips incomplete ones
with a warning, an explicit path to one is refused with the reason.

`training_args.bin` is a pickle of `TrainingArguments`; `Trainer` writes it into every checkpoint and into the
folder `push_to_hub` uploads, Hub token included. The mixin makes the arguments pickle with `*_token` fields
blank (copies in memory keep them, so uploads still authenticate).
"""

from __future__ import annotations

import copy
import copyreg
import functools
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any, Optional

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .atomic import atomic_write_text

logger = logging.getLogger("lor2c_hf")
MANIFEST_NAME = "lor2c_checkpoint.json"
CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from (incomplete or damaged); nothing was loaded from it."""


# --- completeness manifest ---------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: str) -> list[str]:
    """Every file under `folder` (relative paths), the manifest and temporary files excepted."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST_NAME and not name.startswith(".tmp-"):
                found.append(rel)
    return sorted(found)


def mark_complete(folder: str) -> None:
    """Record every file of a fully written checkpoint (size, sha256) in its manifest, atomically."""
    files = {rel: {"size": os.path.getsize(os.path.join(folder, rel)), "sha256": _sha256(os.path.join(folder, rel))}
             for rel in _files(folder)}
    atomic_write_text(os.path.join(folder, MANIFEST_NAME), json.dumps({"files": files}, indent=1, sort_keys=True))


def checkpoint_problem(folder: str) -> Optional[str]:
    """Why `folder` is not a complete checkpoint, or None when its manifest holds for every file."""
    manifest_path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isdir(folder):
        return "no such folder"
    if not os.path.isfile(manifest_path):
        return (f"it has no {MANIFEST_NAME}: its save was interrupted (killed or out of disk) before every file was "
                "written, or it was not written by LoR2CTrainer")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST_NAME} is unreadable ({type(e).__name__}: {e})"
    for rel, expected in sorted(files.items()):
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != expected["size"]:
            return f"{rel} has {os.path.getsize(path)} bytes, {expected['size']} were written"
        if _sha256(path) != expected["sha256"]:
            return f"{rel} does not match the sha256 recorded when it was written (the file changed or is damaged)"
    return None


def checkpoints_newest_first(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    steps = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(steps, reverse=True)]


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest checkpoint in `output_dir` whose manifest holds; incomplete newer ones are skipped, warned about."""
    for folder in checkpoints_newest_first(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("[LoR2C] skipping incomplete checkpoint %s: %s", folder, problem)
    return None


def resolve_resume(resume_from_checkpoint: Any, output_dir: str) -> Any:
    """What `Trainer.train` should resume from: True -> the last complete checkpoint; a path -> itself, if complete."""
    if resume_from_checkpoint is True:
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise CheckpointError(f"resume_from_checkpoint=True: no complete checkpoint in {output_dir} "
                                  f"(expected a {PREFIX_CHECKPOINT_DIR}-N folder with a valid {MANIFEST_NAME}).")
        return found
    if isinstance(resume_from_checkpoint, (str, os.PathLike)):
        problem = checkpoint_problem(os.fspath(resume_from_checkpoint))
        if problem is not None:
            raise CheckpointError(f"resume_from_checkpoint={os.fspath(resume_from_checkpoint)!r} cannot be resumed: "
                                  f"{problem}. Resume from an earlier checkpoint, or pass resume_from_checkpoint=True to "
                                  "take the last complete one.")
    return resume_from_checkpoint


def prepare_folder(folder: str) -> None:
    """Before a checkpoint is (re)written: an incomplete leftover goes, a complete one loses its manifest first."""
    if not os.path.isdir(folder):
        return
    if checkpoint_problem(folder) is not None:
        shutil.rmtree(folder)
    else:
        os.remove(os.path.join(folder, MANIFEST_NAME))


# --- training arguments without the token ------------------------------------------------------------------


def _token_fields(state: dict[str, Any]) -> list[str]:
    return [k for k, v in state.items() if k.endswith("_token") and isinstance(v, str)]


@functools.lru_cache(maxsize=None)
def _token_free_class(cls: type) -> type:
    """`cls` whose instances pickle as plain `cls` with every `*_token` string set to None; copies keep them."""

    def __reduce_ex__(self, protocol):
        state = dict(self.__dict__)
        for key in _token_fields(state):
            state[key] = None
        return copyreg._reconstructor, (cls, object, None), state  # what pickle itself uses for plain classes

    def __copy__(self):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    return type(cls.__name__, (cls,), {"__reduce_ex__": __reduce_ex__, "__copy__": __copy__, "__deepcopy__": __deepcopy__,
                                       "__module__": cls.__module__, "_token_free": True})


def pickle_without_tokens(args: Any) -> Any:
    """Make `args` pickle (torch.save: `training_args.bin`) with its Hub token blank; returns `args`."""
    if not getattr(type(args), "_token_free", False):
        args.__class__ = _token_free_class(type(args))
    return args


class CheckpointIOMixin:
    """For a `Trainer` subclass: checkpoints marked complete before old ones rotate away, resumes only from
    complete ones, and `training_args.bin` without the Hub token."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pickle_without_tokens(self.args)

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        return super().train(resolve_resume(resume_from_checkpoint, self.args.output_dir), *args, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """`hub_strategy="checkpoint"` uploads the folder: by now every file is written, so it goes with its manifest."""
        if self.args.should_save:
            mark_complete(checkpoint_folder)
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            prepare_folder(folder)
        self.accelerator.wait_for_everyone()  # no rank writes its part into a folder being cleared
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotate only once this one is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's files (ZeRO shards) are in before the manifest
        if self.args.should_save:
            mark_complete(folder)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
