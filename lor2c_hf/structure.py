"""The adapter's structure: which blocks each connection spans, which blocks carry injected LoRA, and the
history of events. Pure bookkeeping with no tensors, so it is JSON-able, saved with every checkpoint, and
the merge/inject decisions (SPEC §4, §5) can be read and tested on their own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence


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
        structure = cls(**copy.deepcopy(data))
        structure.validate()
        return structure

    def validate(self) -> None:
        """Spans are disjoint, ordered, and with the injected blocks cover every block exactly once."""
        covered = sorted([b for s, e in self.spans for b in range(s, e + 1)] + list(self.injected))
        if covered != list(range(self.num_blocks)) or len(self.owners) != len(self.spans):
            raise ValueError(f"Inconsistent LoR2C structure: spans {self.spans}, injected {self.injected}, "
                             f"owners {self.owners} for {self.num_blocks} blocks.")

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
