"""lrk.nn.Linear4bit and LoRALinear over a 4-bit base (QLoRA / QDoRA): the same
outputs and gradients as LoRALinear over the dequantized weight, state dicts,
and what a 4-bit base refuses."""
import pytest
import torch
from torch import nn

import lrk
from lrk.nn import Linear4bit, LoRALinear
from conftest import DEVICES
from helpers import assert_close


def _pair(use_dora, double_quant, quant_type="nf4", bias=True):
    """(QLoRA layer, LoRALinear on an nn.Linear holding the dequantized weight), same adapter."""
    lin = nn.Linear(70, 33, bias=bias)
    q = LoRALinear.from_linear(lin, 4, quantize=quant_type, double_quant=double_quant, lora_alpha=8,
                               use_dora=use_dora, init_lora_weights=False)
    dense = nn.Linear(70, 33, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(q.base_layer.dequantize(torch.float32))
        if bias:
            dense.bias.copy_(lin.bias)
    ref = LoRALinear(dense, 4, lora_alpha=8, use_dora=use_dora, init_lora_weights=False)
    with torch.no_grad():
        ref.lora_A.copy_(q.lora_A)
        ref.lora_B.copy_(q.lora_B)
        if use_dora:
            ref.lora_magnitude_vector.copy_(q.lora_magnitude_vector)
    return q, ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_matches_lora_on_the_dequantized_weight(device, use_dora, double_quant):
    q, ref = _pair(use_dora, double_quant, "fp4" if double_quant else "nf4")
    q, ref = q.to(device), ref.to(device)
    if use_dora:  # the magnitude starts at ||W + s*B@A|| of the dequantized W
        assert_close(q.lora_magnitude_vector, ref._adapted_row_norm(), torch.float32, "magnitude init")
    x = torch.randn(3, 5, 70, device=device)
    y, y_ref = q(x), ref(x)
    assert_close(y, y_ref, torch.float32, "y")
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    for name in ("lora_A", "lora_B") + (("lora_magnitude_vector",) if use_dora else ()):
        assert_close(getattr(q, name).grad, getattr(ref, name).grad, torch.float32, f"grad {name}")
    assert q.base_layer.bias.grad is None and not q.base_layer.bias.requires_grad
    params = {n for n, p in q.named_parameters() if p.requires_grad}
    assert params == {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if use_dora else set())


def test_base_alone_bf16_and_state_dict_round_trip():
    lin = nn.Linear(64, 48).bfloat16()
    base = Linear4bit.from_linear(lin, "nf4", 64, double_quant=True)
    assert base.compute_dtype == torch.bfloat16 and base.packed.dtype == torch.uint8
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    y = base(x)
    assert y.dtype == torch.bfloat16
    assert_close(y, x.double() @ base.dequantize(torch.float64).t() + lin.bias.double(), torch.bfloat16, "base y")
    layer = LoRALinear(base, 4, init_lora_weights=False, use_dora=True)
    clone = LoRALinear(Linear4bit.from_linear(nn.Linear(64, 48).bfloat16(), "nf4", 64, double_quant=True), 4,
                       use_dora=True)
    clone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
    assert {"base_layer.packed", "base_layer.absmax", "base_layer.absmax2", "base_layer.code2",
            "base_layer.code"} <= set(layer.state_dict())


def test_dropout_trains_and_eval_is_deterministic():
    q, _ = _pair(use_dora=False, double_quant=False)
    q.lora_dropout = 0.5
    x = torch.randn(16, 70)
    q.train()
    assert not torch.equal(q(x), q(x))  # a fresh mask per call
    q.eval()
    torch.testing.assert_close(q(x), q(x), rtol=0, atol=0)


def test_merge_refused_and_bad_base():
    q, _ = _pair(use_dora=False, double_quant=False)
    with pytest.raises(ValueError, match="4-bit"):
        q.merge()
    with pytest.raises(ValueError, match="expected an nn.Linear, got Conv1d .or a 4-bit"):
        LoRALinear(nn.Conv1d(3, 3, 1), 1)
    with pytest.raises(ValueError, match="blocksize"):
        Linear4bit.from_linear(nn.Linear(64, 8), "nf4", 100)
