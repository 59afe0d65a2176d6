"""lrk's CUDA kernels, run on the CPU by the emulator of the CUDA execution model.

The emulated library (``scripts/build_emulated.sh``, see ``csrc/emu/README.md``)
compiles every portable ``.cu`` source as C++ against the emulator: the same
kernels and launchers, every block and thread run on fibers, shared memory
poisoned per block. Its ops live in the ``lrk_emu`` namespace and take CPU
tensors. Inside :class:`EmulatedCUDA`, every ``torch.ops.lrk`` call on CPU
tensors that has a CUDA kernel runs that kernel emulated instead of the CPU
kernel, so the whole Python layer (autograd, modules, optimizers) exercises the
CUDA code::

    import lrk.emulated as emu
    emu.load()
    emu.set_schedule("shuffled", seed=3)
    with emu.EmulatedCUDA():
        y = lrk.lora_fused(x, w, None, a, b, 2.0, 0.1, 0)   # CUDA kernels, emulated

The emulated libraries are test artifacts, not part of a wheel: they are looked
up in ``$LRK_EMU_LIBRARY_DIR`` (``scripts/test.sh`` builds them into
``build/emu-lib``), else in this package's folder.

An emulated pass is not a GPU run: timing, the overlap of asynchronous copies,
the memory model across blocks and the Hopper (TMA/wgmma) kernels are not
emulated.
"""
from __future__ import annotations

import functools
import os
import pathlib
import sysconfig

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_NAMES = {False: "_C_emu", True: "_C_emu_asan"}
_loaded: dict[str, bool] = {}
ORDERS = ("forward", "reverse", "shuffled")


def library_dir() -> pathlib.Path:
    """Where the emulated libraries are: $LRK_EMU_LIBRARY_DIR (the test scripts build
    them outside the package, since they are test artifacts and no part of a wheel),
    else this package's folder (a source-tree build)."""
    given = os.environ.get("LRK_EMU_LIBRARY_DIR")
    return pathlib.Path(given).resolve() if given else pathlib.Path(__file__).resolve().parent


def library_path(sanitized: bool = False) -> pathlib.Path:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return library_dir() / (_NAMES[sanitized] + suffix)


def _built_for(sanitized: bool) -> str:
    stamp = library_path(sanitized).parent / (_NAMES[sanitized] + ".torch-version")
    return stamp.read_text().strip() if stamp.exists() else ""


def available(sanitized: bool = False) -> bool:
    """Whether the emulated library (plain or sanitized) has been built, for this torch."""
    return library_path(sanitized).exists() and _built_for(sanitized) == torch.__version__


def load(sanitized: bool = False) -> None:
    """Loads the emulated library once. The plain and the sanitized one define the
    same namespace, so a process loads one of them."""
    name = _NAMES[sanitized]
    if _loaded.get(name):
        return
    other = _NAMES[not sanitized]
    if _loaded.get(other):
        raise RuntimeError(f"lrk.emulated: {other} is already loaded in this process; load one emulated library only")
    path = library_path(sanitized)
    if not available(sanitized):
        raise RuntimeError(f"lrk.emulated: {path} is not built for torch {torch.__version__}; run "
                           "scripts/build_emulated.sh" + (" --sanitize" if sanitized else "") +
                           " (it writes to $LRK_EMU_LIBRARY_DIR, else python/lrk)")
    torch.ops.load_library(str(path))
    _loaded[name] = True


def set_schedule(order: str, seed: int = 0) -> None:
    """Thread and block order of the following emulated launches: ``forward``,
    ``reverse`` or ``shuffled`` (from ``seed``)."""
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
    torch.ops.lrk_emu.emu_set_schedule(order, int(seed))


def counters() -> dict:
    """Emulated kernel launches, blocks and fiber switches since the library loaded."""
    launches, blocks, switches = torch.ops.lrk_emu.emu_counters()
    return {"launches": launches, "blocks": blocks, "switches": switches}


@functools.lru_cache(maxsize=None)
def _emulated_overload(name: str, overload: str):
    """lrk_emu's counterpart of lrk::name.overload when it has a CUDA kernel, else None."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lrk_emu::{name}", "CPU"):
        return None
    packet = getattr(torch.ops.lrk_emu, name)
    return getattr(packet, overload or "default")


_CPU_KEYSET = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


class EmulatedCUDA(TorchDispatchMode):
    """lrk ops with a CUDA kernel run it emulated; lrk ops without one (composites
    that call other lrk ops, CPU-only ops) run their CPU kernel with this mode
    still active, so the lrk ops they call are redirected too."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "lrk":
            return func(*args, **kwargs)
        emulated = _emulated_overload(func._schema.name.split("::", 1)[1], func._overloadname)
        if emulated is not None:
            return emulated(*args, **kwargs)
        with self:
            return func.redispatch(_CPU_KEYSET, *args, **kwargs)
