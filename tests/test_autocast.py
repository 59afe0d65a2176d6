"""Fused LoRA/DoRA under torch.autocast: inputs are cast once to the autocast
dtype (as nn.Linear is), the kernels keep their own fp32 accumulation, and
gradients come back to float32 parameters in float32."""
import pytest
import torch

import lrk
from lrk import reference as ref
from conftest import DEVICES
from helpers import assert_close, lora_inputs, reference_leaves


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_dora", [False, True])
def test_autocast_bf16_with_float32_parameters(device, use_dora):
    x, w, b, a, bb = lora_inputs((3, 11), 40, 24, 4, torch.float32, device)
    m = (torch.linalg.vector_norm(w.detach(), dim=1) * 1.1).requires_grad_() if use_dora else None
    with torch.autocast(device, dtype=torch.bfloat16):
        if use_dora:
            y = lrk.dora_fused(x, w, b, a, bb, m, 2.0, 0.0, 0)
        else:
            y = lrk.lora_fused(x, w, b, a, bb, 2.0, 0.0, 0)
    assert y.dtype == torch.bfloat16
    # Reference on the bf16-rounded inputs, in float64.
    rounded = [t.detach().to(torch.bfloat16) if t is not None else None for t in (x, w, b, a, bb)]
    leaf = reference_leaves(*rounded)
    y_ref = ref.dora_fused(*leaf, m.detach().double().cpu(), 2.0) if use_dora else ref.lora_fused(*leaf, 2.0)
    assert_close(y, y_ref, torch.bfloat16, "y")
    y.float().sum().backward()
    for name, t in (("x", x), ("lora_a", a), ("lora_b", bb)) + ((("magnitude", m),) if use_dora else ()):
        assert t.grad is not None and t.grad.dtype == torch.float32, name
        assert torch.isfinite(t.grad).all(), name


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_leaves_float64_alone(device):
    x, w, b, a, bb = lora_inputs((5,), 9, 7, 2, torch.float64, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = lrk.lora_fused(x, w, b, a, bb, 1.0)
    assert y.dtype == torch.float64
    assert_close(y, ref.lora_fused(*reference_leaves(x, w, b, a, bb), 1.0), torch.float64, "y")
