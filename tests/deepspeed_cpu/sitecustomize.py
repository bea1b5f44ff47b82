"""Loaded (as Python's `sitecustomize`) only by the DeepSpeed-on-CPU test processes in test_ddp.py.

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
