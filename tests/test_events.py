"""Merges and injects in the middle of a real training loop (plain torch AdamW + LR scheduler, SPEC §7).

After every event: each parameter the new structure reads trains (non-zero gradient, changes after an optimizer
step), each parameter it no longer reads stops (no gradient, value frozen), the optimizer keeps the same param
list and the same Adam state tensors for the survivors, and the LR schedule goes on as if nothing happened.
Which parameters are active is derived here from `model.structure`, independently of the library's plan.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

from lor2c_hf import LoR2CConfig, get_lor2c_model
from tiny_models import VOCAB, tiny_model

LR, WEIGHT_DECAY, TOTAL = 1e-2, 0.01, 100


def lr_factor(step: int) -> float:
    return 1.0 - step / TOTAL


class Run:
    """A LoR2C model trained by hand: AdamW over every trainable parameter, built once, and a linear schedule."""

    def __init__(self, arch: str, config: LoR2CConfig, num_layers: int = 6, head: str = "auto") -> None:
        self.model = get_lor2c_model(tiny_model(arch, head=head, num_layers=num_layers), config)
        self.model.train()
        self.is_cls = head == "cls" or (head == "auto" and arch in ("bert", "roberta"))
        self.params = dict((n, p) for n, p in self.model.named_parameters() if p.requires_grad)
        self.param_list = list(self.params.values())
        self.opt = torch.optim.AdamW(self.param_list, lr=LR, weight_decay=WEIGHT_DECAY)
        self.sched = LambdaLR(self.opt, lr_factor)
        self.steps = 0
        self.gen = torch.Generator().manual_seed(0)

    def step(self) -> dict[str, torch.Tensor | None]:
        """One forward/backward/AdamW/scheduler step; returns the gradients it applied."""
        ids = torch.randint(2, VOCAB, (4, 10), generator=self.gen)
        labels = (ids[:, 0] > VOCAB // 2).long() if self.is_cls else ids
        self.model(input_ids=ids, labels=labels).loss.backward()
        grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in self.params.items()}
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        return grads

    def values(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}

    def active_names(self) -> set[str]:
        """Adapter parameters the current structure reads, plus the task head (modules_to_save)."""
        s, share = self.model.structure, self.model.lor2c_config.share_a
        names = {f"lor2c.lora_B.{slot}" for slot in s["owners"]}
        names |= {"lor2c.lora_A.0"} if share else {f"lor2c.lora_A.{slot}" for slot in s["owners"]}
        for block in s["injected"]:
            names |= {n for n in self.params if n.startswith(f"lor2c_injected.blocks.{block}.")}
        names |= {n for n in self.params if n.startswith("model.")}
        return names


def check_after_event(run: Run, before_values: dict, before_state: dict, steps_before: int,
                      stopped: set[str], new_lora: set[str] = frozenset()) -> None:
    """Train two steps after an event and check every invariant of SPEC §7 / issue point 4."""
    active = run.active_names()
    assert stopped and not (stopped & active)
    grads = [run.step(), run.step()]
    after = run.values()

    for name in active:
        assert any(g[name] is not None and g[name].abs().sum() > 0 for g in grads), f"{name} got no gradient"
        assert not torch.equal(after[name], before_values[name]), f"{name} did not change"
    for name in new_lora:  # injected LoRA: B starts at zero, so A's first gradient is exactly zero, then not
        if name.endswith("lora_A.weight"):
            assert grads[0][name] is not None and grads[0][name].abs().sum() == 0, name
            assert grads[1][name].abs().sum() > 0, name
        else:
            assert grads[0][name].abs().sum() > 0, name
    for name in set(run.params) - active:
        assert all(g[name] is None for g in grads), f"inactive {name} got a gradient"
        assert torch.equal(after[name], before_values[name]), f"inactive {name} changed"

    # The optimizer: the same parameter objects, in the same order, as when it was built.
    assert len(run.opt.param_groups) == 1
    assert [id(p) for p in run.opt.param_groups[0]["params"]] == [id(p) for p in run.param_list]
    # Adam state of survivors: the same tensors, updated in place, step count continuing (not reset).
    for name, state in before_state.items():
        now = run.opt.state[run.params[name]]
        if name in active:
            assert now["exp_avg"] is state["exp_avg"] and now["exp_avg_sq"] is state["exp_avg_sq"], name
            assert float(now["step"]) == state["step"] + 2, name
        else:
            assert float(now["step"]) == state["step"], name
            assert torch.equal(now["exp_avg"], state["exp_avg_value"]), name
    # The LR schedule: untouched, still the linear lambda of the total step count.
    assert run.sched.last_epoch == steps_before + 2
    assert run.opt.param_groups[0]["lr"] == LR * lr_factor(steps_before + 2)


def snapshot(run: Run) -> tuple[dict, dict, int]:
    state = {}
    for name, p in run.params.items():
        if p in run.opt.state:
            s = run.opt.state[p]
            state[name] = {"exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"], "step": float(s["step"]),
                           "exp_avg_value": s["exp_avg"].clone()}
    return run.values(), state, run.steps


def slot_names(slot: int, share_a: bool = False) -> set[str]:
    return {f"lor2c.lora_B.{slot}"} | (set() if share_a else {f"lor2c.lora_A.{slot}"})


def test_merge_keeps_survivors_training_and_stops_the_retired_slot():
    run = Run("llama", LoR2CConfig(r=4, num_merges=2, lora_dropout=0.1))
    for _ in range(3):
        run.step()
    owners_before = run.model.structure["owners"]
    before = snapshot(run)
    record = run.model.apply_merge(step=run.steps)
    (retired,) = set(owners_before) - set(run.model.structure["owners"])
    assert record["kept_slot"] != retired and record["blocks"][1] > record["blocks"][0]
    check_after_event(run, *before, stopped=slot_names(retired))


def test_inject_activates_lora_and_stops_the_blocks_connection():
    run = Run("llama", LoR2CConfig(r=4, num_injects=2, lora_dropout=0.1))
    for _ in range(3):
        run.step()
    spans, owners = run.model.structure["spans"], run.model.structure["owners"]
    before = snapshot(run)
    block = run.model.apply_inject(step=run.steps)["blocks"][0]
    retired = owners[spans.index([block, block])]
    new_lora = {n for n in run.params if n.startswith(f"lor2c_injected.blocks.{block}.")}
    assert len(new_lora) == 4  # A and B on q_proj and v_proj
    assert not (new_lora & set(before[1])), "dormant LoRA must have no Adam state before its inject"
    check_after_event(run, *before, stopped=slot_names(retired), new_lora=new_lora)


def test_imlor2c_sequence_of_events_keeps_every_invariant():
    run = Run("llama", LoR2CConfig(r=4, num_merges=2, num_injects=2, lora_dropout=0.1), num_layers=8)
    run.step()
    for kind in ("merge", "inject", "merge", "inject"):
        s = run.model.structure
        before = snapshot(run)
        record = getattr(run.model, f"apply_{kind}")(step=run.steps)
        assert not record.get("skipped")
        retired = set(s["owners"]) - set(run.model.structure["owners"])
        block = record["blocks"][0]
        new_lora = {n for n in run.params if n.startswith(f"lor2c_injected.blocks.{block}.")} if kind == "inject" else set()
        check_after_event(run, *before, stopped=set().union(*(slot_names(r) for r in retired)), new_lora=new_lora)
    assert len(run.model.structure["spans"]) == 8 - 2 - 2


def test_sharelor2c_merge_keeps_the_shared_a_and_head_training():
    run = Run("bert", LoR2CConfig(r=4, share_a=True, num_merges=1, lora_dropout=0.1), head="cls")
    assert [n for n in run.params if n.startswith("lor2c.lora_A")] == ["lor2c.lora_A.0"]
    assert any(n.startswith("model.classifier.") for n in run.params)
    for _ in range(3):
        run.step()
    owners_before = run.model.structure["owners"]
    before = snapshot(run)
    run.model.apply_merge(step=run.steps)
    (retired,) = set(owners_before) - set(run.model.structure["owners"])
    assert "lor2c.lora_A.0" in run.active_names()
    check_after_event(run, *before, stopped=slot_names(retired, share_a=True))
