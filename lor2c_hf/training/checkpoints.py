"""Checkpoint files: a manifest that says a checkpoint is complete, and training arguments without a token.

`Trainer` writes `checkpoint-N` in place, file by file; a process killed mid-save leaves a folder that looks
like a checkpoint. Once every file of a checkpoint is written, `LoR2CCallback.on_save` records each file's size
and sha256 in a manifest (`lor2c_checkpoint.json`, written atomically), and only then rotates old checkpoints
away. A checkpoint without a valid manifest is incomplete: when the next trainer is made, such a folder is set
aside (renamed `incomplete-checkpoint-N`), so `resume_from_checkpoint=True` takes the newest complete one; an
explicit path to one is refused by `load_adapter` with the reason.

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
from typing import Any, Optional

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

TRAINER_STATE_NAME = "trainer_state.json"  # what `Trainer` writes into every checkpoint

from ..adapter_files import AdapterLoadError, read_json
from ..atomic import atomic_write_text

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
        files = read_json(manifest_path, "a checkpoint manifest")["files"]
    except (AdapterLoadError, KeyError, TypeError) as e:
        return f"its {MANIFEST_NAME} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(files, dict) or TRAINER_STATE_NAME not in files:
        return f"its {MANIFEST_NAME} lists no {TRAINER_STATE_NAME}; a complete checkpoint lists every file Trainer wrote"
    root = os.path.realpath(folder)
    for rel, expected in sorted(files.items()):
        path = os.path.join(folder, rel)
        if os.path.isabs(rel) or os.path.commonpath([root, os.path.realpath(path)]) != root:
            return f"its {MANIFEST_NAME} names {rel!r}, which is outside the checkpoint folder"
        if not (isinstance(expected, dict) and isinstance(expected.get("size"), int) and isinstance(expected.get("sha256"), str)):
            return f"its {MANIFEST_NAME} entry for {rel!r} is {expected!r}; expected {{'size': bytes, 'sha256': hex digest}}"
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


INCOMPLETE_PREFIX = "incomplete-"


def is_trainer_checkpoint(folder: str) -> bool:
    """A `checkpoint-N` folder that `Trainer` wrote (it holds the trainer state), not a saved adapter."""
    return bool(CHECKPOINT_RE.match(os.path.basename(os.path.normpath(folder)))) and \
        os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME))


def set_aside_incomplete(output_dir: str) -> list[str]:
    """Rename every incomplete `checkpoint-N` in `output_dir` to `incomplete-checkpoint-N`, so that `Trainer`
    (`resume_from_checkpoint=True`, rotation) sees only complete checkpoints; returns the new paths."""
    moved = []
    for folder in checkpoints_newest_first(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            continue
        target = os.path.join(output_dir, INCOMPLETE_PREFIX + os.path.basename(folder))
        suffix = 1
        while os.path.exists(target):
            target, suffix = os.path.join(output_dir, f"{INCOMPLETE_PREFIX}{os.path.basename(folder)}.{suffix}"), suffix + 1
        os.replace(folder, target)
        logger.warning("[LoR2C] %s is incomplete (%s); set aside as %s, so resuming takes the newest complete checkpoint.",
                       folder, problem, target)
        moved.append(target)
    return moved


def refuse_incomplete(folder: str) -> None:
    """Raise `CheckpointError` when `folder` is a `Trainer` checkpoint that is not complete."""
    if is_trainer_checkpoint(folder):
        problem = checkpoint_problem(folder)
        if problem is not None:
            raise CheckpointError(f"{folder} cannot be resumed: {problem}. Resume from an earlier checkpoint, or pass "
                                  "resume_from_checkpoint=True to take the last complete one. Nothing was loaded.")


# --- training arguments without the token ------------------------------------------------------------------


HELD_LIMIT = "_lor2c_save_total_limit"


def _token_fields(state: dict[str, Any]) -> list[str]:
    return [k for k, v in state.items() if k.endswith("_token") and isinstance(v, str)]


@functools.lru_cache(maxsize=None)
def _token_free_class(cls: type) -> type:
    """`cls` whose instances pickle as plain `cls` with every `*_token` string set to None; copies keep them."""

    def __reduce_ex__(self, protocol):
        state = dict(self.__dict__)
        for key in _token_fields(state):
            state[key] = None
        if HELD_LIMIT in state:  # the user's save_total_limit, held by LoR2CCallback while it rotates
            state["save_total_limit"] = state.pop(HELD_LIMIT)
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
