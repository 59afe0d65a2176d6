"""Shared test helpers: tolerances, relative error, output poisoning."""
import torch

# ||out - ref|| / ||ref|| bounds by dtype (architecture.md).
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 5e-3,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out64.shape == ref64.shape, (out64.shape, ref64.shape)
    if not torch.isfinite(out64).all():
        return float("inf")  # NaN never passes
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close(out, ref, dtype, what="", factor=1.0):
    err = rel_err(out, ref)
    tol = TOLERANCE[dtype] * factor
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


def poison_cuda_allocator(device="cuda", nbytes=1 << 28):
    """Fill the caching allocator's free blocks with NaN so that an op output that
    is not fully written shows up as NaN instead of stale zeros."""
    if torch.device(device).type != "cuda":
        return
    blocks = []
    for size in (nbytes, nbytes // 16, nbytes // 256):
        t = torch.empty(size // 4, dtype=torch.float32, device=device)
        t.fill_(float("nan"))
        blocks.append(t)
    del blocks
