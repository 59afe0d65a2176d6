"""GaLoreAdamW with 2 CPU processes (gloo): FSDP2 (row-sharded DTensor
parameters) and DDP trajectories against a single-process run, and the
communication pattern of a sharded step (an all-reduce of r x n, no gather of G).

One spawn runs every case, to pay the process start-up once.
"""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD = 2
STEPS = 5

FSDP_CASES = [  # every projector, with and without Fira, int4, rotation and lazy refresh
    dict(proj_type="svd"),
    dict(proj_type="rsvd", power_iters=1),
    dict(proj_type="svd", proj_bits=4, quant_group_size=4),
    dict(proj_type="rsvd", fira=True, moment_update="rotate"),
    dict(proj_type="dct", fira=True),
    dict(proj_type="random", moment_update="rotate", lazy_refresh=True, queue_size=1, cos_threshold=0.0),
]
# Refreshes of these never gather G (dct only when its projection is on the right).
NO_GATHER_OF_G = {"rsvd", "random"}


def _model(seed=0):
    torch.manual_seed(seed)
    # Weights: [9, 12] left projection with uneven row shards (5 + 4), [20, 9] right
    # projection (10 + 10), [3, 20] left (2 + 1); biases get AdamW.
    return torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.Tanh(), torch.nn.Linear(9, 20), torch.nn.Tanh(),
                               torch.nn.Linear(20, 3)).double()


def _groups(model, case):
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    return [{"params": rest}, {"params": mats, "rank": 2, "update_proj_gap": 2, "scale": 0.5, "oversample": 3,
                               **case}]


def _batch(step, rank=0, n=8):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(n, 12, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)


def _single_process(case, batches):
    from lrk.optim import GaLoreAdamW
    model = _model()
    opt = GaLoreAdamW(_groups(model, case), lr=0.02, weight_decay=0.01)
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _fsdp_case(case, rank, calls):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lrk.optim import GaLoreAdamW
    mesh = init_device_mesh("cpu", (WORLD,))
    model = _model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = GaLoreAdamW(_groups(model, case), lr=0.02, weight_decay=0.01)
    batches = [_batch(s) for s in range(STEPS)]  # the same batch on both ranks: FSDP's averaged grad is the full one
    calls.clear()
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    full = [p.full_tensor().detach() for p in model.parameters()]
    expected = _single_process(case, batches)
    sharded = [type(p).__name__ == "DTensor" and p.placements[0].is_shard() for p in model.parameters()]
    return {"errors": [_rel(a, b) for a, b in zip(full, expected)], "all_sharded": all(sharded),
            "calls": list(calls)}


def _ddp_case(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lrk.optim import GaLoreAdamW
    case = dict(proj_type="rsvd", fira=True)
    model = DDP(_model())
    opt = GaLoreAdamW(_groups(model.module, case), lr=0.02, weight_decay=0.01)
    for s in range(STEPS):  # each rank its own half of the batch; DDP averages the gradients
        x, y = _batch(s, rank)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    params = [p.detach().clone() for p in model.module.parameters()]
    gathered = []
    for p in params:
        parts = [torch.empty_like(p) for _ in range(WORLD)]
        dist.all_gather(parts, p)
        gathered.append(max(_rel(parts[i], parts[0]) for i in range(WORLD)))
    full_batches = []
    for s in range(STEPS):
        xs, ys = zip(*(_batch(s, r) for r in range(WORLD)))
        full_batches.append((torch.cat(xs), torch.cat(ys)))
    expected = _single_process(case, full_batches)
    return {"errors": [_rel(a, b) for a, b in zip(params, expected)], "rank_spread": gathered}


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    import lrk  # noqa: F401
    import lrk.galore_ops  # noqa: F401
    from lrk.optim import _galore_sharded as sh

    # Record the sharded path's collectives: (kind, shape).
    calls = []
    real_gather, real_reduce = sh.gather_rows, sh.all_reduce

    def gather_rows(local, shard):
        calls.append(("gather", tuple(local.shape)))
        return real_gather(local, shard)

    def all_reduce(t, shard):
        calls.append(("all_reduce", tuple(t.shape)))
        return real_reduce(t, shard)

    sh.gather_rows, sh.all_reduce = gather_rows, all_reduce
    results = {"fsdp": [_fsdp_case(case, rank, calls) for case in FSDP_CASES], "ddp": _ddp_case(rank)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("galore_dist")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [json.load(open(out / f"rank{r}.json")) for r in range(WORLD)]


@pytest.mark.parametrize("index", range(len(FSDP_CASES)),
                         ids=["-".join(f"{k}={v}" for k, v in c.items()) for c in FSDP_CASES])
def test_fsdp2_matches_single_process(distributed_results, index):
    case = FSDP_CASES[index]
    for rank_results in distributed_results:
        res = rank_results["fsdp"][index]
        assert res["all_sharded"], "fully_shard did not shard every parameter"
        assert max(res["errors"]) < 1e-9, f"{case}: relative errors {res['errors']}"


@pytest.mark.parametrize("index", range(len(FSDP_CASES)),
                         ids=["-".join(f"{k}={v}" for k, v in c.items()) for c in FSDP_CASES])
def test_sharded_step_never_gathers_the_gradient(distributed_results, index):
    case = FSDP_CASES[index]
    calls = [tuple(c) for c in distributed_results[0]["fsdp"][index]["calls"]]
    reduces = [tuple(shape) for kind, shape in calls if kind == "all_reduce"]
    # The left-projected weights [9, 12] and [3, 20]: each step all-reduces R = P^T G, [rank, n].
    assert reduces.count((2, 12)) >= STEPS and reduces.count((2, 20)) >= STEPS
    gathers = [tuple(shape) for kind, shape in calls if kind == "gather"]
    if case["proj_type"] in NO_GATHER_OF_G:
        # Gathered operands are tall-skinny [rows, rank + oversample] factors, never G's rows.
        assert all(shape[1] <= 5 for shape in gathers), gathers
    else:
        # svd and left-dct gather G at refreshes only (every update_proj_gap = 2 steps).
        refreshes = -(-STEPS // 2)
        assert len(gathers) <= 3 * refreshes, gathers


def test_ddp_matches_single_process(distributed_results):
    for rank_results in distributed_results:
        res = rank_results["ddp"]
        assert max(res["rank_spread"]) == 0.0, "ranks diverged"
        assert max(res["errors"]) < 1e-9, res["errors"]
