"""lrk.integrations.peft: PEFT models routed through lrk give PEFT's outputs and
gradients, in PEFT's own parameters, with unchanged save_pretrained output;
unsupported layers stay on PEFT's path; call-time fallbacks; restore."""
import copy
import json
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from lrk import reference as ref  # noqa: E402
from lrk.integrations import peft as lrk_peft  # noqa: E402
from lrk.nn import lora as lrk_lora  # noqa: E402
from helpers import assert_close  # noqa: E402

HAS_DORA = hasattr(torch.ops.lrk, "dora_fused")
DORA_SKIP = pytest.mark.skipif(not HAS_DORA, reason="this lrk build has no dora_fused yet")
DORA = [pytest.param(False, id="lora"), pytest.param(True, id="dora", marks=DORA_SKIP)]

IN, HID, OUT = 37, 29, 11


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(IN, HID)
        self.v_proj = nn.Linear(HID, IN, bias=False)
        self.head = nn.Linear(IN, OUT)

    def forward(self, x):
        h = nn.functional.gelu(self.q_proj(x))
        return self.head(self.v_proj(h) + x)


def _peft_model(model, use_dora=False, lora_dropout=0.0, target_modules=("q_proj", "v_proj", "head")):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules), lora_dropout=lora_dropout,
                     use_dora=use_dora)
    pm = get_peft_model(model, cfg)
    with torch.no_grad():  # a non-zero adapter, and a magnitude away from its init
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.7, 1.3))
    return pm


def _pair(pm):
    """(PEFT's model, an accelerated deep copy, the accelerated names)."""
    fast = copy.deepcopy(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer here is supported: no warning
        names = lrk_peft.accelerate(fast)
    return pm, fast, names


def _assert_same_grads(slow, fast, extra=()):
    slow_params = dict(slow.named_parameters())
    trainable = [n for n, p in fast.named_parameters() if p.requires_grad]
    assert trainable
    for n in trainable:
        g_fast, g_slow = dict(fast.named_parameters())[n].grad, slow_params[n].grad
        assert g_fast is not None and g_slow is not None, n
        assert_close(g_fast, g_slow, torch.float32, f"grad {n}")
    for what, a, b in extra:
        assert_close(a, b, torch.float32, what)


@pytest.fixture
def count_fast_calls(monkeypatch):
    """Counts calls that took lrk's path (the integration calls lrk.nn.lora.adapter_forward)."""
    calls = []
    original = lrk_lora.adapter_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(lrk_lora, "adapter_forward", spy)
    return calls


@pytest.mark.parametrize("use_dora", DORA)
def test_outputs_and_grads_match_peft(use_dora, count_fast_calls):
    slow, fast, names = _pair(_peft_model(_Tiny(), use_dora))
    assert names == [f"base_model.model.{n}" for n in ("q_proj", "v_proj", "head")]
    x = torch.randn(3, 5, IN)
    xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_slow, y_fast = slow(xs), fast(xf)
    assert len(count_fast_calls) == 3
    assert_close(y_fast, y_slow, torch.float32, "y")
    gy = torch.randn_like(y_slow)
    y_slow.backward(gy)
    y_fast.backward(gy)
    _assert_same_grads(slow, fast, extra=[("grad x", xf.grad, xs.grad)])
    # PEFT's parameters are the ones that learn (no copies): the names carry the adapter.
    trainable = {n for n, p in fast.named_parameters() if p.requires_grad}
    expected = {f"base_model.model.{m}.{k}.default.weight" for m in ("q_proj", "v_proj", "head")
                for k in ("lora_A", "lora_B") + (("lora_magnitude_vector",) if use_dora else ())}
    assert trainable == expected


@pytest.mark.parametrize("use_dora", DORA)
def test_save_pretrained_unchanged(use_dora, tmp_path):
    from safetensors.torch import load_file

    slow, fast, _ = _pair(_peft_model(_Tiny(), use_dora))

    def saved(model, sub):
        model.save_pretrained(tmp_path / sub)
        return load_file(tmp_path / sub / "adapter_model.safetensors")

    a, b = saved(slow, "slow"), saved(fast, "fast")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # One SGD step on each: the saved adapters still agree.
    x = torch.randn(6, IN)
    for model in (slow, fast):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(x).square().mean().backward()
        opt.step()
    a, b = saved(slow, "slow_step"), saved(fast, "fast_step")
    assert a.keys() == b.keys()
    for k in a:
        assert_close(b[k], a[k], torch.float32, k)
    configs = []
    for sub in ("slow", "fast"):
        with open(tmp_path / sub / "adapter_config.json") as f:
            config = json.load(f)
        config["target_modules"] = sorted(config["target_modules"])  # a set in PEFT: any order
        configs.append(config)
    assert configs[0] == configs[1]


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(36, 9)

    def forward(self, ids):
        h = self.conv(self.emb(ids).unsqueeze(1))  # [b, 3, t, 12]
        return self.fc(h.permute(0, 2, 1, 3).flatten(2))  # [b, t, 36]


@pytest.mark.parametrize("use_dora", DORA)
def test_unsupported_layers_stay_on_peft_path(use_dora, count_fast_calls):
    slow = _peft_model(_Mixed(), use_dora, target_modules=("emb", "conv", "fc"))
    fast = copy.deepcopy(slow)
    with pytest.warns(UserWarning) as record:
        names = lrk_peft.accelerate(fast)
    messages = [str(w.message) for w in record if "lrk.integrations.peft" in str(w.message)]
    assert len(messages) == 1
    assert "base_model.model.emb (layer type Embedding)" in messages[0]
    assert "base_model.model.conv (layer type Conv2d)" in messages[0]
    assert names == ["base_model.model.fc"]
    assert "forward" not in fast.base_model.model.emb.__dict__
    assert "forward" not in fast.base_model.model.conv.__dict__
    ids = torch.randint(0, 50, (2, 7))
    y_slow, y_fast = slow(ids), fast(ids)
    assert len(count_fast_calls) == 1
    assert_close(y_fast, y_slow, torch.float32, "y")
    gy = torch.randn_like(y_slow)
    y_slow.backward(gy)
    y_fast.backward(gy)
    _assert_same_grads(slow, fast)


def test_fan_in_fan_out_conv1d_is_left_alone():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(nn.Linear(IN, HID), nn.ReLU())
    model.add_module("c_attn", Conv1D(HID, HID))  # GPT-2's layer: weight [in, out]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own fan_in_fan_out notice
        pm = get_peft_model(model, LoraConfig(r=2, target_modules=["0", "c_attn"], fan_in_fan_out=True))
    with pytest.warns(UserWarning, match=r"base_model\.model\.c_attn \(base layer type Conv1D\)"):
        names = lrk_peft.accelerate(pm)
    assert names == ["base_model.model.0"]  # nn.Linear: PEFT turned fan_in_fan_out off for it


@pytest.mark.parametrize("use_dora", DORA)
def test_restore(use_dora, count_fast_calls):
    slow, fast, names = _pair(_peft_model(_Tiny(), use_dora))
    x = torch.randn(4, IN)
    assert lrk_peft.accelerate(fast) == names  # idempotent
    assert lrk_peft.restore(fast) == names
    assert lrk_peft.restore(fast) == []
    for module in fast.modules():
        assert not lrk_peft.is_accelerated(module)
        assert "forward" not in module.__dict__
    assert_close(fast(x), slow(x), torch.float32, "y after restore")
    assert count_fast_calls == []
    lrk_peft.accelerate(fast)
    fast(x)
    assert len(count_fast_calls) == 3


@pytest.mark.parametrize("use_dora", DORA)
def test_call_time_fallbacks(use_dora, count_fast_calls):
    slow, fast, _ = _pair(_peft_model(_Tiny(), use_dora))
    x = torch.randn(4, IN)
    y_ref = slow(x).detach()
    count_fast_calls.clear()

    # Merged adapters: PEFT's forward (the base layer alone).
    fast.merge_adapter()
    assert_close(fast(x), y_ref, torch.float32, "merged")
    assert count_fast_calls == []
    fast.unmerge_adapter()
    assert_close(fast(x), y_ref, torch.float32, "unmerged")
    assert len(count_fast_calls) == 3
    count_fast_calls.clear()

    # Disabled adapters: the base model.
    with fast.disable_adapter():
        with slow.disable_adapter():
            assert_close(fast(x), slow(x), torch.float32, "disabled")
    assert count_fast_calls == []

    # Mixed-adapter batches (adapter_names) reach the layers as kwargs. PEFT
    # refuses them with DoRA; the fallback must raise the same way. (Called on a
    # layer: PeftModel leaves its adapter_names hooks behind when forward raises.)
    names = ["default", "__base__", "default", "__base__"]
    slow.eval()  # PEFT takes adapter_names in eval mode only
    fast.eval()
    if use_dora:
        with pytest.raises(ValueError, match="DoRA"):
            fast.base_model.model.q_proj(x, adapter_names=names)
    else:
        assert_close(fast(x, adapter_names=names), slow(x, adapter_names=names), torch.float32, "adapter_names")
    assert count_fast_calls == []

    # Two active adapters at once.
    for model in (slow, fast):
        torch.manual_seed(3)
        model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "head"],
                                              use_dora=use_dora, init_lora_weights=False))
        model.base_model.set_adapter(["default", "other"])
    assert_close(fast(x), slow(x), torch.float32, "two adapters")
    assert count_fast_calls == []

    # Back to one adapter (one added after accelerate()): lrk's path again.
    for model in (slow, fast):
        model.base_model.set_adapter("other")
    assert_close(fast(x), slow(x), torch.float32, "adapter added later")
    assert len(count_fast_calls) == 2  # q_proj and head have "other"; v_proj has none active


def _one_layer_ref(layer, x, p, seed, use_dora):
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b)]
    w, bias = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    s = layer.scaling["default"]
    if use_dora:
        m = layer.lora_magnitude_vector["default"].weight.detach().double().requires_grad_()
        leaves.append(m)
        g = m / torch.linalg.vector_norm(w + s * leaves[2] @ leaves[1], dim=1).detach()
        y = g * (leaves[0] @ w.t() + s * (ref.dropout(leaves[0], p, seed) @ leaves[1].t()) @ leaves[2].t()) + bias
    else:
        y = ref.lora_fused(leaves[0], w, bias, leaves[1], leaves[2], s, p, seed)
    return leaves, y


@pytest.mark.parametrize("use_dora", DORA)
def test_dropout_in_training(use_dora):
    """Training mode: lrk's dropout with a fresh seed per call from torch's generator
    (reproducible under torch.manual_seed); eval mode: no dropout, PEFT's result."""
    p = 0.25
    slow = _peft_model(nn.Sequential(nn.Linear(IN, HID)), use_dora, lora_dropout=p, target_modules=["0"])
    fast = copy.deepcopy(slow)
    lrk_peft.accelerate(fast)
    layer = fast.base_model.model[0]
    fast.train()
    x = torch.randn(6, IN, requires_grad=True)

    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, ()).item())
    torch.manual_seed(11)
    y = fast(x)
    torch.manual_seed(11)
    assert torch.equal(fast(x), y)
    assert not torch.allclose(fast(x), y)  # next call, next seed

    # Against the math, DoRA in the paper's form (dropout on the LoRA branch only).
    leaves, y_ref = _one_layer_ref(layer, x, p, seed, use_dora)
    assert_close(y, y_ref, torch.float32, "y")
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy.double())
    tensors = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    if use_dora:
        tensors.append(layer.lora_magnitude_vector["default"].weight)
    for t, leaf in zip(tensors, leaves):
        assert_close(t.grad, leaf.grad, torch.float32, "grad")

    fast.eval()
    slow.eval()
    assert_close(fast(x), slow(x), torch.float32, "eval y")


@pytest.mark.parametrize("use_dora", DORA)
def test_torch_compile_eval_fullgraph(use_dora):
    torch._dynamo.reset()
    slow, fast, _ = _pair(_peft_model(_Tiny(), use_dora, lora_dropout=0.1))
    slow.eval()
    fast.eval()
    compiled = torch.compile(fast.base_model.model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, IN)
    assert_close(compiled(x), slow(x), torch.float32, "compiled y")


@pytest.mark.parametrize("use_dora", DORA)
def test_autocast_bf16_with_fp32_adapters(use_dora):
    """A bf16 base with fp32 adapters (PEFT's default for half models) under autocast."""
    model = _Tiny().to(torch.bfloat16)
    slow = _peft_model(model, use_dora)
    assert slow.base_model.model.q_proj.lora_A["default"].weight.dtype == torch.float32
    fast = copy.deepcopy(slow)
    lrk_peft.accelerate(fast)
    x = torch.randn(4, IN, dtype=torch.bfloat16)
    outs = []
    for model in (slow, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().sum().backward()
        outs.append(y)
    assert outs[1].dtype == outs[0].dtype == torch.bfloat16
    assert_close(outs[1], outs[0], torch.bfloat16, "y")
    for (n, p_slow), p_fast in zip(slow.named_parameters(), fast.parameters()):
        if p_slow.requires_grad:
            assert p_fast.grad.dtype == torch.float32
            assert_close(p_fast.grad, p_slow.grad, torch.bfloat16, n, factor=2)


# ----------------------------------------------------------------------------- a real model


@pytest.mark.parametrize("use_dora", DORA)
def test_tiny_llama(use_dora, count_fast_calls):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=101)
    model = transformers.LlamaForCausalLM(cfg)
    slow = _peft_model(model, use_dora, target_modules=("q_proj", "v_proj", "up_proj"))
    slow, fast, names = _pair(slow)
    assert len(names) == 6 and all(n.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "up_proj") for n in names)
    ids = torch.randint(0, 101, (2, 9))
    out_slow = slow(input_ids=ids, labels=ids)
    out_fast = fast(input_ids=ids, labels=ids)
    assert len(count_fast_calls) == 6
    assert_close(out_fast.logits, out_slow.logits, torch.float32, "logits")
    out_slow.loss.backward()
    out_fast.loss.backward()
    _assert_same_grads(slow, fast)
