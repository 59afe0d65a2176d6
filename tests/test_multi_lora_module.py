"""lrk.nn.MultiLoRALinear and apply_multi_lora: per-token and per-sequence
adapters vs one-adapter references, fused slices, load / unload, PEFT adapters
(save_pretrained directories, safetensors files, rank/alpha patterns, rsLoRA)
against PEFT's own mixed-adapter batches, torch.compile, CUDA graphs, bad input."""
import copy
import math

import pytest
import torch
from torch import nn

import lrk
import lrk.multi_lora_ops  # noqa: F401  (registers the fakes)
from lrk.nn.multi_lora import MultiLoRABatch, MultiLoRALinear, apply_multi_lora, read_peft_adapter
from lrk.reference_multi_lora import lora_linear
from conftest import DEVICES, DEVICES_NO_EMU
from helpers import assert_close


def _adapter(r, K, N, dtype=torch.float32, device="cpu", gen=None):
    a = torch.randn(r, K, generator=gen) / math.sqrt(K)
    b = torch.randn(N, r, generator=gen) / math.sqrt(r)
    return a.to(dtype).to(device), b.to(dtype).to(device)


def _base(K, N, dtype, device, gen):
    base = nn.Linear(K, N)
    with torch.no_grad():
        base.weight.copy_(torch.randn(N, K, generator=gen) / math.sqrt(K))
        base.bias.copy_(torch.randn(N, generator=gen) * 0.1)
    return base.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_and_per_sequence(device, dtype):
    g = torch.Generator().manual_seed(0)
    K, N = 40, 24
    layer = MultiLoRALinear(_base(K, N, dtype, device, g), max_adapters=4, r_max=8)
    adapters = {"a": (_adapter(2, K, N, dtype, device, g), 0.5), "b": (_adapter(8, K, N, dtype, device, g), 2.0),
                "c": (_adapter(5, K, N, dtype, device, g), 1.0)}
    slots = {name: layer.load_adapter(name, a, b, s) for name, ((a, b), s) in adapters.items()}
    assert sorted(slots.values()) == [0, 1, 2] and layer.adapters == slots

    def expected(x_rows, names):
        rows = []
        for x_i, name in zip(x_rows, names):
            w, bias = layer.base.weight.double().cpu(), layer.base.bias.double().cpu()
            if name is None:
                rows.append(lora_linear(x_i.double().cpu(), w, bias, None, None, 0.0))
            else:
                (a, b), s = adapters[name]
                rows.append(lora_linear(x_i.double().cpu(), w, bias, a.double().cpu(), b.double().cpu(), s))
        return torch.stack(rows)

    names = ["a", None, "c", "b", "b", None, "a"]
    x = torch.randn(len(names), K, generator=g).to(dtype).to(device)
    with torch.no_grad():
        y = layer(x, [-1 if n is None else slots[n] for n in names])
    assert_close(y, expected(x, names), dtype, "per token")

    seq_names = ["c", None, "a"]
    x3 = torch.randn(3, 5, K, generator=g).to(dtype).to(device)
    with torch.inference_mode():
        y3 = layer(x3, torch.tensor([-1 if n is None else slots[n] for n in seq_names], device=device))
        y3_host = layer(x3, [-1 if n is None else slots[n] for n in seq_names])
    for i, name in enumerate(seq_names):
        assert_close(y3[i], expected(x3[i], [name] * 5), dtype, f"sequence {i}")
    assert torch.equal(y3, y3_host)

    # No ids: the base layer alone.
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_slices_and_unload(device):
    g = torch.Generator().manual_seed(1)
    K, sizes = 16, [12, 6, 6]
    base = _base(K, sum(sizes), torch.float32, device, g)
    layer = MultiLoRALinear(base, max_adapters=3, r_max=6, slices=sizes)
    (aq, bq), (av, bv) = _adapter(4, K, 12, device=device, gen=g), _adapter(6, K, 6, device=device, gen=g)
    slot = layer.load_adapter("qv", [aq, None, av], [bq, None, bv], scale=1.5)  # k untouched, ranks 4 and 6
    x = torch.randn(4, K, generator=g).to(device)
    with torch.no_grad():
        y = layer(x, [slot, -1, slot, slot])
        y_base = base(x)
    delta = torch.cat([1.5 * (x @ aq.t()) @ bq.t(), torch.zeros(4, 6, device=device), 1.5 * (x @ av.t()) @ bv.t()], 1)
    expected = y_base + delta
    expected[1] = y_base[1]
    assert_close(y, expected.double(), torch.float32, "fused")
    assert layer.unload_adapter("qv") == slot
    with pytest.raises(ValueError, match=f"adapter_ids: slot {slot} at position 0 holds no adapter"):
        layer(x, [slot, -1, -1, -1])
    if device == "cuda":
        with torch.no_grad():  # device ids are not read back: an empty slot adds nothing
            torch.testing.assert_close(layer(x, torch.full((4,), slot, device=device)), y_base)


def test_load_errors():
    g = torch.Generator().manual_seed(2)
    layer = MultiLoRALinear(nn.Linear(8, 6), max_adapters=2, r_max=4)
    a, b = _adapter(4, 8, 6, gen=g)
    with pytest.raises(ValueError, match="rank 5 is above r_max = 4"):
        layer.load_adapter("big", *_adapter(5, 8, 6, gen=g), scale=1.0)
    with pytest.raises(ValueError, match=r"lora_a\[0\]: expected shape \[r, 8\]"):
        layer.load_adapter("x", a[:, :7], b, scale=1.0)
    with pytest.raises(ValueError, match=r"lora_b\[0\]: expected shape \[6, 4\]"):
        layer.load_adapter("x", a, b[:5], scale=1.0)
    with pytest.raises(ValueError, match="scale: expected a finite number"):
        layer.load_adapter("x", a, b, scale=float("nan"))
    layer.load_adapter("one", a, b, 1.0)
    layer.load_adapter("two", a, b, 1.0)
    with pytest.raises(RuntimeError, match="all 2 adapter slots are in use"):
        layer.load_adapter("three", a, b, 1.0)
    assert layer.load_adapter("one", a * 2, b, 1.0) == 0  # replacing keeps the slot
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="adapter_ids: id 2 at position 1 is out of range for a pool of 2"):
        layer(x, [0, 2, -1])
    with pytest.raises(ValueError, match=r"adapter_ids: expected 3 ids \(one per token\)"):
        with torch.no_grad():
            layer(x, [0, 1])
    with pytest.raises(RuntimeError, match="MultiLoRALinear is for inference"):
        layer(x.requires_grad_(), [0, 1, -1])
    with pytest.raises(KeyError, match="'nope' is not loaded"):
        layer.unload_adapter("nope")
    with pytest.raises(ValueError, match="slices: expected positive sizes summing to out_features = 6"):
        MultiLoRALinear(nn.Linear(8, 6), 2, 4, slices=[3, 2])


# ----------------------------------------------------------------------------- PEFT


class Tiny(nn.Module):
    """Attention-shaped projections, enough for PEFT to target by name."""

    def __init__(self, K=16, N=12):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(K, N), nn.Linear(K, N), nn.Linear(K, N)
        self.o_proj = nn.Linear(N, K)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(q * torch.sigmoid(k) + v)


class TinyFused(nn.Module):
    """The same network with one fused qkv projection."""

    def __init__(self, tiny: Tiny):
        super().__init__()
        n = tiny.q_proj.out_features
        self.n = n
        self.qkv_proj = nn.Linear(tiny.q_proj.in_features, 3 * n)
        with torch.no_grad():
            self.qkv_proj.weight.copy_(torch.cat([tiny.q_proj.weight, tiny.k_proj.weight, tiny.v_proj.weight]))
            self.qkv_proj.bias.copy_(torch.cat([tiny.q_proj.bias, tiny.k_proj.bias, tiny.v_proj.bias]))
        self.o_proj = tiny.o_proj

    def forward(self, x):
        q, k, v = self.qkv_proj(x).split(self.n, dim=-1)
        return self.o_proj(q * torch.sigmoid(k) + v)


def _save_peft_adapters(tmp_path):
    """Two adapters written by PEFT's save_pretrained, with random (non-zero) B."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    base = Tiny()
    configs = {
        "first": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "second": peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                  rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 4}, use_rslora=True),
    }
    model = peft.get_peft_model(copy.deepcopy(base), configs["first"], adapter_name="first")
    model.add_adapter("second", configs["second"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(str(tmp_path))  # adapters not named "default" go to tmp_path/<name>
    return model, base, {"first": tmp_path / "first", "second": tmp_path / "second"}


def test_peft_adapters_match_peft_mixed_batch(tmp_path):
    peft_model, base, dirs = _save_peft_adapters(tmp_path)
    peft_model.eval()
    model = Tiny()
    model.load_state_dict(base.state_dict())
    manager = apply_multi_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], max_adapters=4, r_max=8)
    assert manager.load_peft_adapter("first", dirs["first"]) == 0
    assert manager.load_peft_adapter("second", dirs["second"] / "adapter_model.safetensors") == 1
    assert manager.layers["k_proj"].adapters == {"second": 1}  # "first" does not touch k_proj

    x = torch.randn(4, 3, 16)
    names = ["second", "__base__", "first", "second"]
    with torch.no_grad():
        y_peft = peft_model(x, adapter_names=names)
        manager.set_batch([None if n == "__base__" else n for n in names], per_sequence=True)
        y = model(x)
        per_token = [manager.slot_of(n) if n != "__base__" else -1 for n in names for _ in range(3)]
        manager.set_batch(per_token)
        y_tok = model(x)
    assert_close(y, y_peft.double(), torch.float32, "per sequence vs PEFT mixed batch")
    assert_close(y_tok, y_peft.double(), torch.float32, "per token vs PEFT mixed batch")

    manager.unload_adapter("first")
    assert manager.adapters == {"second": 1}
    with pytest.raises(KeyError, match="'first' is not loaded"):
        manager.set_batch(["first"], per_sequence=True)
    assert manager.load_peft_adapter("again", dirs["first"]) == 0  # the freed slot


def test_peft_adapter_into_fused_layer(tmp_path):
    peft_model, base, dirs = _save_peft_adapters(tmp_path)
    peft_model.eval()
    fused = TinyFused(base)
    manager = apply_multi_lora(fused, ["qkv_proj", "o_proj"], max_adapters=2, r_max=8,
                               slices={"qkv_proj": {"q_proj": 12, "k_proj": 12, "v_proj": 12}})
    manager.load_peft_adapter("second", dirs["second"])  # q, k (rank 2), v, o
    manager.load_peft_adapter("first", dirs["first"])    # q and v only
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        manager.set_batch(["first", "second"], per_sequence=True)
        y = fused(x)
        y_peft = peft_model(x, adapter_names=["first", "second"])
    assert_close(y, y_peft.double(), torch.float32, "fused qkv vs PEFT")


def test_layer_loads_peft_file_and_state_dict(tmp_path):
    peft_model, base, dirs = _save_peft_adapters(tmp_path)
    layer = MultiLoRALinear(nn.Linear(16, 12), max_adapters=2, r_max=8)
    layer.base.load_state_dict(base.q_proj.state_dict())
    slot = layer.load_peft_adapter("second", dirs["second"] / "adapter_model.safetensors", "q_proj")
    state, config = read_peft_adapter(dirs["second"])
    slot2 = layer.load_peft_adapter("copy", state, "q_proj", config=config)
    x = torch.randn(3, 16)
    peft_layer = peft_model.base_model.model.q_proj
    a, b = peft_layer.lora_A["second"].weight, peft_layer.lora_B["second"].weight
    with torch.no_grad():
        y = layer(x, [slot, slot2, -1])
        ref = lora_linear(x, base.q_proj.weight, base.q_proj.bias, a, b, peft_layer.scaling["second"])
    assert_close(y[:2], ref[:2].double(), torch.float32, "q_proj")
    # A directory in the older format (adapter_model.bin) loads the same weights.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(state, bin_dir / "adapter_model.bin")
    (bin_dir / "adapter_config.json").write_text((dirs["second"] / "adapter_config.json").read_text())
    layer.unload_adapter("copy")
    slot3 = layer.load_peft_adapter("bin", bin_dir, "q_proj")
    with torch.no_grad():
        torch.testing.assert_close(layer(x, [slot3, slot, -1]), layer(x, [slot, slot, -1]))
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors or adapter_model.bin"):
        read_peft_adapter(tmp_path)
    with pytest.raises(ValueError, match="config: a PEFT config"):
        read_peft_adapter(state)
    with pytest.raises(ValueError, match=r"no weights for \['o_proj_missing'\]"):
        layer.load_peft_adapter("z", state, "o_proj_missing", config=config)
    with pytest.raises(ValueError, match="DoRA adapters"):
        layer.load_peft_adapter("z", state, "q_proj", config=dict(config, use_dora=True))


def test_manager_strict_about_unwrapped_modules(tmp_path):
    _, base, dirs = _save_peft_adapters(tmp_path)
    model = Tiny()
    manager = apply_multi_lora(model, ["q_proj"], max_adapters=2, r_max=8)
    with pytest.raises(ValueError, match="not MultiLoRALinear layers: .*v_proj"):
        manager.load_peft_adapter("first", dirs["first"])
    manager.load_peft_adapter("first", dirs["first"], strict=False)
    with pytest.raises(ValueError, match="no module of Tiny matches"):
        apply_multi_lora(Tiny(), ["nothing"], 2, 4)


# ----------------------------------------------------------------------------- compile and graphs


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    model = Tiny().to(device)
    manager = apply_multi_lora(model, ["q_proj", "v_proj", "o_proj"], max_adapters=3, r_max=4)
    for name in ("a", "b"):
        weights = {m: _adapter(4 if name == "a" else 3, layer.base.in_features, layer.base.out_features,
                               device=device, gen=g) for m, layer in manager.layers.items()}
        manager.load_adapter(name, weights, scale=0.7)
    x = torch.randn(3, 6, 16, generator=g).to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    with torch.no_grad():
        for ids in (["a", None, "b"], ["b", "b", "a"]):
            manager.set_batch(ids, per_sequence=True)
            torch.testing.assert_close(compiled(x), model(x))


def test_host_ids_inside_graph_capture_raise_a_clear_error(monkeypatch):
    """A host -> device copy of the ids is not allowed in CUDA-graph capture (and a
    replay would not see new ids): prepare says to pass device ids instead of
    failing inside the copy. Capture is simulated here; the CUDA test captures."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    for ids in ([0, 1, -1], torch.tensor([0, 1, -1])):
        with pytest.raises(RuntimeError, match="adapter_ids: host ids .* CUDA graph .* device tensor"):
            MultiLoRABatch.prepare(ids, torch.device("cuda"), 2)
        with pytest.raises(RuntimeError, match="adapter_ids: host ids"):
            MultiLoRABatch.prepare(ids, "cuda:0", 2)
    # CPU layers and device ids are not concerned.
    assert MultiLoRABatch.prepare([0, 1, -1], torch.device("cpu"), 2).adapter_ids.tolist() == [0, 1, -1]


@pytest.mark.cuda
def test_cuda_graph_of_a_layer_with_device_and_host_ids():
    """Capture of layer(x, adapter_ids=<device tensor>) replays with the ids and x
    written before each replay, as eager computes them; host ids inside capture
    raise the clear error and leave the stream usable."""
    if not (torch.cuda.is_available() and lrk.has_cuda_kernels()):
        pytest.skip("needs a CUDA GPU and lrk built with CUDA")
    g = torch.Generator().manual_seed(6)
    K, N, tokens = 32, 24, 12
    layer = MultiLoRALinear(_base(K, N, torch.bfloat16, "cuda", g), max_adapters=3, r_max=8)
    adapters = {}
    for name, r in (("a", 8), ("b", 3)):
        adapters[name] = _adapter(r, K, N, torch.bfloat16, "cuda", g)
        layer.load_adapter(name, *adapters[name], scale=0.5)
    x = torch.zeros(tokens, K, dtype=torch.bfloat16, device="cuda")
    ids = torch.full((tokens,), -1, dtype=torch.int32, device="cuda")
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x, adapter_ids=ids)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_static = layer(x, adapter_ids=ids)
        for _ in range(3):
            x.copy_(torch.randn(tokens, K, generator=g).to(torch.bfloat16))
            host_ids = torch.randint(-1, 2, (tokens,), generator=g)
            ids.copy_(host_ids.to(torch.int32))
            graph.replay()
            y_eager = layer(x, adapter_ids=host_ids.tolist())
            assert_close(y_static, y_eager.double(), torch.bfloat16, "replay vs eager")
            w, bias = layer.base.weight.double().cpu(), layer.base.bias.double().cpu()
            rows = []
            for x_i, j in zip(x.double().cpu(), host_ids.tolist()):
                a, b = adapters["ab"[j]] if j >= 0 else (None, None)
                rows.append(lora_linear(x_i[None], w, bias, None if a is None else a.double().cpu(),
                                        None if b is None else b.double().cpu(), 0.5 if j >= 0 else 0.0)[0])
            assert_close(y_static, torch.stack(rows), torch.bfloat16, "replay vs reference")

        bad = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="adapter_ids: host ids .* device tensor"):
            with torch.cuda.graph(bad):
                layer(x, adapter_ids=[0] * tokens)
        assert not torch.cuda.is_current_stream_capturing()
        assert_close(layer(x, adapter_ids=host_ids.tolist()), y_eager.double(), torch.bfloat16, "eager after")


@pytest.mark.cuda
def test_cuda_graph_of_a_model():
    if not (torch.cuda.is_available() and lrk.has_cuda_kernels()):
        pytest.skip("needs a CUDA GPU and lrk built with CUDA")
    g = torch.Generator().manual_seed(5)
    model = Tiny().to("cuda", torch.bfloat16)
    manager = apply_multi_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], max_adapters=4, r_max=8)
    for name, r in (("a", 8), ("b", 2), ("c", 5)):
        weights = {m: _adapter(r, layer.base.in_features, layer.base.out_features, torch.bfloat16, "cuda", g)
                   for m, layer in manager.layers.items()}
        manager.load_adapter(name, weights, scale=0.5)
    batch, x = 16, torch.zeros(16, 16, dtype=torch.bfloat16, device="cuda")
    ids = torch.full((batch,), -1, dtype=torch.int32, device="cuda")  # static: updated in place
    manager.set_batch(MultiLoRABatch(ids))
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_static = model(x)
        for _ in range(3):
            x.copy_(torch.randn(batch, 16, generator=g).to(torch.bfloat16))
            ids.copy_(torch.randint(-1, 3, (batch,), generator=g).to(torch.int32))
            graph.replay()
            y_eager = model(x)
            assert_close(y_static, y_eager.double(), torch.bfloat16, "replay vs eager")
