"""Bad input that each family's own tests do not reach: a tensor on the wrong device
(checked where a GPU is present), and wrong dtypes or shapes for ops whose family
tests exercise them only through other ops. Every error must name the argument."""
import pytest
import torch

import lrk
from lrk import galore_ops as go
from lrk import kron_ops as ko
from lrk import multi_lora_ops as mlo
from lrk import quant_ops as qo
from lrk import sparse_ops as sp
from lrk import spectral_ops as so
from conftest import CUDA_SKIP


def _device_mix_cases():
    """(name of the argument moved to the other device, call taking a device map)."""
    def lora(dev):
        return lrk.lora_fused(torch.randn(4, 16, device=dev["x"]), torch.randn(8, 16, device=dev["weight"]), None,
                              torch.randn(2, 16, device=dev["lora_a"]), torch.randn(8, 2, device=dev["lora_b"]))

    def dora(dev):
        return lrk.dora_fused(torch.randn(4, 16, device=dev["x"]), torch.randn(8, 16, device=dev["weight"]), None,
                              torch.randn(2, 16, device=dev["lora_a"]), torch.randn(8, 2, device=dev["lora_b"]),
                              torch.ones(8, device=dev["magnitude"]))

    def kron(dev):
        return ko.kron_linear(torch.randn(4, 16, device=dev["x"]), torch.randn(2, 4, 4, device=dev["u"]),
                              torch.randn(2, 4, 4, device=dev["v"]))

    def shrink(dev):
        return mlo.multi_lora_shrink(torch.randn(4, 16, device=dev["x"]), [torch.randn(3, 4, 16, device=dev["lora_a"])],
                                     torch.tensor([4, 4, 4], device=dev["ranks"]),
                                     torch.tensor([0, 1, -1, 2], device=dev["adapter_ids"]))

    def sddmm(dev):
        return sp.sddmm_block(torch.randn(8, 32, device=dev["grad_y"]), torch.randn(8, 32, device=dev["x"]),
                              torch.tensor([[0, 0], [1, 1]], device=dev["block_indices"]), 16)

    def snella(dev):
        return sp.snella_linear(torch.randn(4, 16, device=dev["x"]), torch.randn(12, 16, device=dev["weight"]), None,
                                torch.randn(12, 4, device=dev["lora_a"]), torch.randn(16, 4, device=dev["lora_b"]),
                                torch.tensor([1.0], device=dev["kernel_params"]), "linear", 0.5)

    def linear_4bit(dev):
        return qo.linear_4bit(torch.randn(4, 16, device=dev["x"]), torch.zeros(64, dtype=torch.uint8, device=dev["packed"]),
                              torch.ones(2, device=dev["absmax"]), torch.randn(16, device=dev["code"]), 64, 8, 16)

    def qlora(dev):
        w = qo.Weight4bit(torch.zeros(64, dtype=torch.uint8, device=dev["packed"]), torch.ones(2, device=dev["absmax"]),
                          torch.randn(16, device=dev["code"]), 64, 8, 16)
        return qo.qdora_fused(torch.randn(4, 16, device=dev["x"]), w, None, torch.randn(2, 16, device=dev["lora_a"]),
                              torch.randn(8, 2, device=dev["lora_b"]), torch.ones(8, device=dev["magnitude"]))

    def dequantize_absmax(dev):
        return qo.dequantize_absmax(torch.zeros(4, dtype=torch.uint8, device=dev["absmax_q"]),
                                    torch.ones(1, device=dev["absmax2"]), torch.randn(256, device=dev["code2"]), 256, 0.0)

    def project(dev):
        return go.project(torch.randn(4, 6, device=dev["grad"]), torch.randn(4, 2, device=dev["proj"]), True)

    def sketch(dev):
        return so.sketch_update(torch.zeros(6, 3, device=dev["y"]), torch.zeros(4, 7, device=dev["z"]),
                                torch.randn(2, 6, device=dev["grad_out"]), torch.randn(2, 4, device=dev["x"]),
                                torch.randn(4, 3, device=dev["omega"]), torch.randn(6, 7, device=dev["psi"]))

    def gram(dev):
        return so.gram_sketch_update(torch.zeros(4, 2, device=dev["y"]), torch.randn(3, 4, device=dev["x"]),
                                     torch.randn(4, 2, device=dev["omega"]))

    def sketch_svd(dev):
        return so.sketch_svd(torch.randn(6, 3, device=dev["y"]), torch.randn(4, 7, device=dev["z"]),
                             torch.randn(6, 7, device=dev["psi"]), 2)

    def nystrom(dev):
        return so.nystrom_eigh(torch.randn(4, 2, device=dev["y"]), torch.randn(4, 2, device=dev["omega"]), 1)

    return [
        ("sketch_update", sketch, ["y", "z", "grad_out", "omega", "psi"]),
        ("gram_sketch_update", gram, ["y", "omega"]),
        ("sketch_svd", sketch_svd, ["z", "psi"]),
        ("nystrom_eigh", nystrom, ["omega"]),
        ("lora_fused", lora, ["weight", "lora_a", "lora_b"]),
        ("dora_fused", dora, ["magnitude"]),
        ("kron_linear", kron, ["u", "v"]),
        ("multi_lora_shrink", shrink, ["lora_a"]),
        ("sddmm_block", sddmm, ["x", "block_indices"]),
        ("snella_linear", snella, ["lora_a", "kernel_params"]),
        ("galore_project", project, ["proj"]),
        ("linear_4bit", linear_4bit, ["packed", "absmax", "code"]),
        ("qdora_fused", qlora, ["absmax", "lora_a", "lora_b", "magnitude"]),
        ("dequantize_absmax", dequantize_absmax, ["absmax2", "code2"]),
    ]


CASES = [(op, fn, arg) for op, fn, args in _device_mix_cases() for arg in args]


@CUDA_SKIP
@pytest.mark.cuda
@pytest.mark.parametrize("op,fn,arg", CASES, ids=[f"{op}-{arg}" for op, _, arg in CASES])
def test_device_mix_names_the_argument(op, fn, arg):
    dev = {name: "cuda" for name in ("x", "weight", "lora_a", "lora_b", "magnitude", "u", "v", "ranks", "adapter_ids",
                                     "grad_y", "block_indices", "grad", "proj", "kernel_params", "packed", "absmax",
                                     "code", "absmax_q", "absmax2", "code2", "y", "z", "grad_out", "omega", "psi")}
    dev[arg] = "cpu"
    with pytest.raises(RuntimeError, match=arg):
        fn(dev)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: lrk.dora_weight_norm(torch.randn(8, 16), torch.randn(2, 15), torch.randn(8, 2), 1.0),
         "lora_a: expected size 16 in dim 1"),
        (lambda: lrk.dora_weight_norm(torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2, dtype=torch.float64), 1.0),
         "lora_b: expected dtype Float"),
        (lambda: lrk.dora_weight_norm(torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2), float("inf")),
         "scale: expected a finite number"),
        (lambda: lrk.dora_weight_norm(torch.ones(8, 16, dtype=torch.int32), torch.randn(2, 16), torch.randn(8, 2), 1.0),
         "weight: expected dtype float32"),
        (lambda: go.quantize_int4(torch.randn(4, 2, 3)), "proj"),
        (lambda: go.quantize_int4(torch.ones(4, 2, dtype=torch.int64)), "proj"),
        (lambda: go.philox_normal_(torch.zeros(4, dtype=torch.int64), 0), "out"),
        (lambda: sp.snell_delta(torch.randn(12, 4), torch.randn(16, 3), "linear", 0.5), "lora_b: expected size 4 in dim 1"),
        (lambda: sp.snell_delta(torch.randn(12, 4), torch.randn(16, 4), "linear", 1.5), "sparsity"),
        (lambda: torch.ops.lrk.weight_4bit_sq_norm(torch.zeros(64, dtype=torch.uint8), torch.ones(3),
                                                   torch.randn(16), 64, 8, 16), "absmax: expected shape \\[2\\]"),
        (lambda: qo.qlora_fused(torch.randn(4, 16), qo.Weight4bit(torch.zeros(64, dtype=torch.uint8), torch.ones(2),
                                                                  torch.randn(16), 64, 8, 16),
                                None, torch.randn(2, 16), torch.randn(9, 2)), "lora_b: expected size 8 in dim 0"),
        (lambda: so.truncated_svd(torch.randn(6, 4), 5), r"rank: expected 1 <= rank <= min\(a.shape\) = 4"),
        (lambda: so.truncated_svd(torch.randn(6, 4), 2, "svd"), "method"),
        (lambda: so.sketch_update(torch.zeros(6, 3), torch.zeros(4, 7), torch.randn(2, 6), torch.randn(2, 4),
                                  torch.randn(4, 2), torch.randn(6, 7)), "y: expected size 2 in dim 1"),
        (lambda: so.gram_sketch_update(torch.zeros(5, 2), torch.randn(3, 4), torch.randn(4, 2)),
         "y: expected size 4 in dim 0"),
        (lambda: so.sketch_svd(torch.randn(6, 3), torch.randn(4, 7), torch.randn(6, 7), 4), "rank"),
        (lambda: so.nystrom_eigh(torch.randn(4, 2), torch.randn(4, 2), 3), "rank"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
