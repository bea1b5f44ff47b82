"""Loaded (as Python's `sitecustomize`) only by the DeepSpeed-on-CPU test processes in test_ddp.py.

It also prints a marker line whenever DeepSpeed consolidates a whole model's ZeRO-3 weights (frozen base included), so
the test can check that saving an adapter does not.

DeepSpeed 0.19's CPU accelerator has no streams (`current_stream()` is None), yet ZeRO-3's
`zero_grad(set_to_none=True)` calls `grad.record_stream(current_stream())` on every gradient, which
PyTorch rejects for None. On a CPU tensor recording a stream means nothing, so None is ignored there.
"""

import torch

_record_stream = torch.Tensor.record_stream


def _record_stream_ignoring_none_on_cpu(self, stream):
    if stream is None and self.device.type == "cpu":
        return None
    return _record_stream(self, stream)


torch.Tensor.record_stream = _record_stream_ignoring_none_on_cpu


def _trace_consolidation() -> None:
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError:
        return
    consolidate = DeepSpeedEngine._zero3_consolidated_16bit_state_dict

    def traced(self, *args, **kwargs):
        if not kwargs.get("exclude_frozen_parameters"):  # with it, only the adapter's parameters are gathered
            print("[deepspeed-cpu-test] consolidated the full ZeRO-3 state dict", flush=True)
        return consolidate(self, *args, **kwargs)

    DeepSpeedEngine._zero3_consolidated_16bit_state_dict = traced


_trace_consolidation()
