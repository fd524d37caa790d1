"""FSDP choices that only take effect on GPUs, checked where the choice is made (no GPU here; scripts/gpu-check
runs them on one)."""

from __future__ import annotations

import pytest
import torch

from ftlab.strategies import FSDP


@pytest.mark.parametrize("device,cpu_offload,backend", [
    ("cuda", True, "cuda:nccl,cpu:gloo"),  # offloaded gradients are host tensors: their norm's all-reduce needs gloo
    ("cuda", False, "nccl"),
    ("cpu", True, "gloo"),                 # offload is moot on CPU ranks
])
def test_process_group_backend_takes_host_collectives_under_offload(device, cpu_offload, backend):
    strategy = FSDP(cpu_offload=cpu_offload)
    strategy.parallel_devices = [torch.device(device, 0) if device == "cuda" else torch.device("cpu")]
    assert strategy._get_process_group_backend() == backend

