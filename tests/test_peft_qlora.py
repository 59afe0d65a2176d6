"""lrk.integrations.peft.accelerate on PEFT's QLoRA / QDoRA layers: a small model of
bitsandbytes Linear4bit layers quantized on the CPU (NF4 / FP4, double-quantized
absmax as BitsAndBytesConfig(bnb_4bit_use_double_quant=True) stores it), wrapped
by PEFT; outputs, gradients and a 5-step training run against PEFT's own path,
save_pretrained's state unchanged, and a swapped quant state caught."""
import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402

from lrk.integrations import peft as lrk_peft  # noqa: E402


class TinyQuantizedModel(nn.Module):
    def __init__(self, quant_type, double_quant):
        super().__init__()
        kw = dict(compute_dtype=torch.float32, compress_statistics=double_quant, quant_type=quant_type)
        # in_features multiples of the blocksize: bitsandbytes' native CPU dequantization
        # (its forward here) misreads blocks that span rows, which its own quantizer
        # writes (e.g. 70 x 48); lrk's kernels read the layout the quantizer writes
        # (test_linear_4bit covers blocks spanning rows).
        self.q_proj = bnb.nn.Linear4bit(64, 96, bias=True, **kw)
        self.v_proj = bnb.nn.Linear4bit(96 + 32, 70, bias=False, **kw)
        self.head = nn.Linear(70, 5)

    def forward(self, x):
        h = torch.tanh(self.q_proj(x))
        return self.head(torch.tanh(self.v_proj(torch.cat([h, h[..., :32]], dim=-1))))


def make_model(quant_type="nf4", double_quant=True, use_dora=False, dropout=0.0, flagged_4bit=True):
    torch.manual_seed(0)
    model = TinyQuantizedModel(quant_type, double_quant).to("cpu")  # bitsandbytes quantizes on the move
    assert model.q_proj.weight.bnb_quantized
    # transformers flags a BitsAndBytesConfig(load_in_4bit=True) model so; PEFT then wraps
    # the layers in its lora.bnb.Linear4bit (in its plain Linear otherwise).
    model.is_loaded_in_4bit = flagged_4bit
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=dropout,
                        use_dora=use_dora, init_lora_weights=False)
    return get_peft_model(model, config)


def adapter_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def run_steps(model, steps, x, target):
    opt = torch.optim.AdamW(adapter_params(model).values(), lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
@pytest.mark.parametrize("quant_type,double_quant,flagged", [("nf4", True, True), ("fp4", False, False)])
def test_outputs_gradients_and_training_match_peft(use_dora, quant_type, double_quant, flagged):
    model = make_model(quant_type, double_quant, use_dora, flagged_4bit=flagged)
    layer_type = type(model.base_model.model.q_proj).__module__
    assert layer_type == ("peft.tuners.lora.bnb" if flagged else "peft.tuners.lora.layer")
    x, target = torch.randn(2, 7, 64), torch.randn(2, 7, 5)
    initial = {n: p.detach().clone() for n, p in adapter_params(model).items()}
    state_before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}

    # PEFT's own path: output, gradients, 5 AdamW steps.
    y_peft = model(x)
    y_peft.square().sum().backward()
    grads_peft = {n: p.grad.clone() for n, p in adapter_params(model).items()}
    model.zero_grad()
    losses_peft = run_steps(model, 5, x, target)
    final_peft = {n: p.detach().clone() for n, p in adapter_params(model).items()}

    model.zero_grad()
    with torch.no_grad():
        for n, p in adapter_params(model).items():
            p.copy_(initial[n])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both layers must take lrk's path
        names = lrk_peft.accelerate(model)
    assert sorted(names) == ["base_model.model.q_proj", "base_model.model.v_proj"]
    y = model(x)
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    for n, p in adapter_params(model).items():
        torch.testing.assert_close(p.grad, grads_peft[n], rtol=1e-4, atol=1e-5, msg=f"grad {n}")
    model.zero_grad()
    losses = run_steps(model, 5, x, target)
    assert losses == pytest.approx(losses_peft, rel=1e-4)
    for n, p in adapter_params(model).items():
        torch.testing.assert_close(p.detach(), final_peft[n], rtol=1e-4, atol=1e-5, msg=f"trained {n}")

    # PEFT's parameters were the ones trained: the saved adapter has the same keys,
    # shapes and dtypes as before (values moved by training).
    state_after = get_peft_model_state_dict(model)
    assert state_after.keys() == state_before.keys()
    for k in state_before:
        assert state_after[k].shape == state_before[k].shape and state_after[k].dtype == state_before[k].dtype
    assert lrk_peft.restore(model) == names


def test_dropout_in_training_runs_on_lrk_and_eval_matches():
    model = make_model(dropout=0.3)
    x = torch.randn(4, 64)
    model.eval()
    y_peft = model(x)
    lrk_peft.accelerate(model)
    torch.testing.assert_close(model(x), y_peft, rtol=1e-5, atol=1e-5)
    model.train()
    assert not torch.equal(model(x), model(x))  # a fresh Philox mask per call


def test_quant_state_of_another_layer_is_caught():
    """The quant state is read on every call: another layer's (another shape) is
    refused with an error naming the mismatch, not used silently."""
    model = make_model()
    lrk_peft.accelerate(model)
    x = torch.randn(3, 64)
    model(x)
    q = model.base_model.model.q_proj.base_layer
    v = model.base_model.model.v_proj.base_layer
    q.weight.quant_state, saved = v.weight.quant_state, q.weight.quant_state
    with pytest.raises(RuntimeError, match="packed|absmax|x: expected shape|lora"):
        model(x)
    q.weight.quant_state = saved
    model(x)


def test_dora_norm_cache_follows_the_quant_state():
    model = make_model(use_dora=True)
    lrk_peft.accelerate(model)
    layer = model.base_model.model.q_proj
    x = torch.randn(3, 64)
    y1 = model(x)
    key1 = layer.__dict__["_lrk_sq_norm"][0]
    layer.base_layer.weight.quant_state.absmax = layer.base_layer.weight.quant_state.absmax.clone()
    model(x)
    assert layer.__dict__["_lrk_sq_norm"][0] != key1
    torch.testing.assert_close(model(x), y1)
