"""The adapter's structure: which blocks each connection spans, which blocks carry injected LoRA, and the
history of events. Pure bookkeeping with no tensors, so it is JSON-able, saved with every checkpoint, and
the merge/inject decisions (SPEC §4, §5) can be read and tested on their own.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

FIELDS = ("num_blocks", "spans", "owners", "injected", "events")


class StructureError(ValueError):
    """A structure (spans, owners, injected blocks, events) is inconsistent; the message names the field."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        text = repr(value)
        raise StructureError(f"structure field {name}={text[:200]}{'...' if len(text) > 200 else ''} is invalid: expected {expected}.")


@dataclass
class Structure:
    """Spans `[first_block, last_block]` in block order, the parameter slot each span reads (`owners`),
    the injected block indices and the event history."""

    num_blocks: int
    spans: list[list[int]] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    injected: list[int] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def initial(cls, num_blocks: int) -> "Structure":
        """One single-block connection per block, each reading its own slot."""
        return cls(num_blocks, [[i, i] for i in range(num_blocks)], list(range(num_blocks)))

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(
            {"num_blocks": self.num_blocks, "spans": self.spans, "owners": self.owners,
             "injected": self.injected, "events": self.events}
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Structure":
        """A checked copy of `data` (e.g. read from an adapter file): every field is validated, and bounds come
        before anything is built from them, so no value can make validation itself slow or crash."""
        if not isinstance(data, dict):
            raise StructureError(f"a LoR2C structure is a JSON object, got a {type(data).__name__}.")
        unknown = set(data) - set(FIELDS)
        missing = {"num_blocks", "spans", "owners"} - set(data)
        if unknown or missing:
            raise StructureError(f"structure fields: unknown {sorted(unknown)}, missing {sorted(missing)}; expected {list(FIELDS)}.")
        structure = cls(**copy.deepcopy(data))
        structure.validate()
        return structure

    def validate(self) -> None:
        """Spans are ordered and disjoint, each reads a slot of one of its own blocks (what merges keep), and
        with the injected blocks they cover every block exactly once; events are well formed."""
        L = self.num_blocks
        _require(_is_int(L) and L >= 1, "num_blocks", L, "a positive integer")
        _require(isinstance(self.spans, list) and all(isinstance(sp, list) and len(sp) == 2 and all(_is_int(b) for b in sp)
                                                      for sp in self.spans), "spans", self.spans, "a list of [first, last] integer pairs")
        _require(isinstance(self.owners, list) and all(_is_int(o) for o in self.owners), "owners", self.owners, "a list of integers")
        _require(isinstance(self.injected, list) and all(_is_int(b) for b in self.injected), "injected", self.injected, "a list of integers")
        _require(len(self.owners) == len(self.spans), "owners", self.owners, f"one slot per span ({len(self.spans)} spans)")
        for k, (s, e) in enumerate(self.spans):
            _require(0 <= s <= e < L, f"spans[{k}]", [s, e], f"0 <= first <= last < {L}")
            _require(k == 0 or s > self.spans[k - 1][1], f"spans[{k}]", [s, e], f"to start after spans[{k - 1}] (spans in block order)")
            _require(s <= self.owners[k] <= e, f"owners[{k}]", self.owners[k], f"a slot of the span's own blocks {s}..{e} (merges keep one of them)")
        _require(all(0 <= b < L for b in self.injected) and self.injected == sorted(set(self.injected)), "injected",
                 self.injected, f"distinct block indices in [0, {L}) in increasing order")
        pieces = sorted([(s, e) for s, e in self.spans] + [(b, b) for b in self.injected])
        covered = all(piece[0] == (pieces[i - 1][1] + 1 if i else 0) for i, piece in enumerate(pieces))
        _require(covered and bool(pieces) and pieces[-1][1] == L - 1, "spans", self.spans,
                 f"with injected {self.injected}, to cover blocks 0..{L - 1} exactly once")
        self._validate_events()

    def _validate_events(self) -> None:
        _require(isinstance(self.events, list) and all(isinstance(e, dict) for e in self.events), "events", self.events,
                 "a list of event records")
        # M <= L - 1 and N <= L with M + N <= L: no schedule records more (skipped events included).
        _require(len(self.events) <= self.num_blocks, "events", f"{len(self.events)} records",
                 f"at most {self.num_blocks}, one per block")
        for i, event in enumerate(self.events):
            where = f"events[{i}]"
            _require(event.get("kind") in ("merge", "inject"), f"{where}.kind", event.get("kind"), "'merge' or 'inject'")
            _require(isinstance(event.get("skipped", False), bool), f"{where}.skipped", event.get("skipped"), "true or false")
            _require(event.get("step") is None or _is_int(event["step"]) and event["step"] >= 0, f"{where}.step",
                     event.get("step"), "null or an integer >= 0")
            _require(event.get("epoch") is None or _is_finite(event["epoch"]), f"{where}.epoch", event.get("epoch"), "null or a finite number")
            blocks, scores = event.get("blocks", []), event.get("scores", [])
            _require(isinstance(blocks, list) and all(_is_int(b) and 0 <= b < self.num_blocks for b in blocks),
                     f"{where}.blocks", blocks, f"block indices in [0, {self.num_blocks})")
            _require(isinstance(scores, list) and all(_is_finite(x) for x in scores), f"{where}.scores", scores, "finite numbers")
            _require(event.get("skipped", False) or bool(blocks), f"{where}.blocks", blocks, "the blocks of a performed event")
        injects = sum(1 for e in self.events if e["kind"] == "inject" and not e.get("skipped"))
        merges = sum(1 for e in self.events if e["kind"] == "merge" and not e.get("skipped"))
        _require(injects <= len(self.injected), "events", f"{injects} injects", f"at most the {len(self.injected)} injected blocks")
        _require(merges <= self.num_blocks - len(self.spans) - len(self.injected), "events", f"{merges} merges",
                 f"at most the {self.num_blocks - len(self.spans) - len(self.injected)} merges the spans show")

    def check_replay(self) -> None:
        """The events, replayed from one connection per block, produce exactly these spans, owners and injected
        blocks: a saved structure that its own event records could not have produced is refused."""
        s = Structure.initial(self.num_blocks)
        for i, event in enumerate(self.events):
            where, kind = f"events[{i}]", event["kind"]
            if event.get("skipped"):
                left = s.merge_candidates() if kind == "merge" else s.inject_candidates()
                _require(not left, f"{where}.skipped", True, f"only when no {kind} candidate is left (spans then: {s.spans})")
                continue
            if kind == "merge":
                merged, kept = event.get("merged"), event.get("kept_slot")
                k = next((k for k in s.merge_candidates() if merged == [s.spans[k], s.spans[k + 1]]), None)
                _require(k is not None, f"{where}.merged", merged, f"two adjacent spans of the structure before it ({s.spans})")
                _require(_is_int(kept) and kept in (s.owners[k], s.owners[k + 1]), f"{where}.kept_slot", kept,
                         f"the slot of one of the merged spans ({s.owners[k]} or {s.owners[k + 1]})")
                _require(event["blocks"] == s.merge(k, kept), f"{where}.blocks", event["blocks"], f"the merged span {s.spans[k]}")
            else:
                blocks = event["blocks"]
                k = next((k for k in s.inject_candidates() if blocks == [s.spans[k][0]]), None)
                _require(k is not None, f"{where}.blocks", blocks, f"one block of a single-block span before it ({s.spans})")
                s.inject(k)
        for name in ("spans", "owners", "injected"):
            _require(getattr(self, name) == getattr(s, name), name, getattr(self, name),
                     f"{getattr(s, name)}, what the events replayed produce")

    def count(self, kind: str) -> int:
        return sum(1 for e in self.events if e["kind"] == kind)

    # --- decisions -------------------------------------------------------------------------------------

    def merge_candidates(self) -> list[int]:
        """Indices k such that spans k and k+1 are adjacent (no injected block between them)."""
        return [k for k in range(len(self.spans) - 1) if self.spans[k][1] + 1 == self.spans[k + 1][0]]

    def inject_candidates(self) -> list[int]:
        """Indices of single-block (never merged) spans."""
        return [k for k, (s, e) in enumerate(self.spans) if s == e]

    def choose_merge(self, sfs: Sequence[float], rho: Sequence[float], criterion: str, keep: str) -> Optional[tuple[int, int]]:
        """(k, kept_slot): merge spans k and k+1, keeping the parameters of `kept_slot`; None if no pair exists.

        `sfs`/`rho` are aligned with `spans`. criterion 'paper' = min summed SFS, 'official' = min summed rho;
        keep 'paper' = span with the higher SFS, 'official' = the lower block's span. Ties go to the lower block.
        """
        candidates = self.merge_candidates()
        if not candidates:
            return None
        score = sfs if criterion == "paper" else rho
        k = min(candidates, key=lambda c: (score[c] + score[c + 1], c))
        if keep == "paper":
            kept = k if sfs[k] >= sfs[k + 1] else k + 1
        else:
            kept = k
        return k, self.owners[kept]

    def choose_inject(self, sfs: Sequence[float]) -> Optional[int]:
        """Index of the single-block span with the lowest SFS (ties: lower block); None if there is none."""
        candidates = self.inject_candidates()
        if not candidates:
            return None
        return min(candidates, key=lambda c: (sfs[c], c))

    # --- changes ---------------------------------------------------------------------------------------

    def merge(self, k: int, kept_slot: int) -> list[int]:
        """Fuse spans k and k+1 into one span reading `kept_slot`; return the new span."""
        new_span = [self.spans[k][0], self.spans[k + 1][1]]
        self.spans[k : k + 2] = [new_span]
        self.owners[k : k + 2] = [kept_slot]
        return new_span

    def inject(self, k: int) -> int:
        """Remove single-block span k and mark its block injected; return the block."""
        block = self.spans[k][0]
        del self.spans[k], self.owners[k]
        self.injected = sorted(self.injected + [block])
        return block
