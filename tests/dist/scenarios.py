"""Distributed scenarios, run by tests/test_distributed.py under `mpiexec -n N` or as gloo ranks.

Usage: scenarios.py BACKEND SCENARIO STORE [ARGS...]; each rank writes its outcome to
STORE/../out/rank-R.json, which the test reads. Deterministic data: any rank can rebuild the
global tensors to check what it loaded.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

import numpy as np
import torch

import ckptguard
from ckptguard import Shard

ROWS, COLS = 18, 5


def global_state() -> dict:
    g = torch.Generator().manual_seed(7)
    return {
        "w": torch.randn(ROWS, COLS, generator=g),
        "emb": torch.randn(7, 3, generator=g).bfloat16(),
        "m": torch.randn(ROWS, COLS, generator=g),  # optimizer moment, sharded like w
        "bias": torch.arange(4.0),  # replicated
        "scalar": torch.tensor(3.0),  # replicated 0-d
    }


def bounds(n: int, world: int) -> list[tuple[int, int]]:
    """Uneven row split with an empty shard on the last rank when world > 2 (above 4 ranks:
    even pieces on the others)."""
    if world == 1:
        return [(0, n)]
    cuts = [0, 5, 6, 13, n][:world] if world <= 4 else [i * n // (world - 1) for i in range(world)]
    if world == 2:
        cuts = [0, 7]
    if world == 4:
        cuts = [0, 5, 6, n]  # rank 3 gets an empty shard
    cuts = cuts + [n] * (world + 1 - len(cuts))
    return [(cuts[i], cuts[i + 1]) for i in range(world)]


def local_state(rank: int, world: int) -> dict:
    full = global_state()
    a, b = bounds(ROWS, world)[rank]
    return {
        "model": {
            "w": Shard(full["w"][a:b].clone(), (ROWS, COLS), (a, 0)),
            "bias": full["bias"].clone(),
            "emb": full["emb"].clone(),
        },
        "optim": {
            "state": {
                0: {
                    "m": Shard(full["m"][a:b].clone(), (ROWS, COLS), (a, 0)),
                    "step": torch.tensor(5.0),
                }
            },
            "param_groups": [{"lr": 0.001, "betas": (0.9, 0.99)}],
        },
        "scalar": full["scalar"].clone(),
        "rank": rank,
        "np": np.arange(6, dtype=np.int32),
    }


def template(rank: int, world: int) -> dict:
    a, b = bounds(ROWS, world)[rank]
    return {
        "model": {
            "w": Shard(torch.zeros(b - a, COLS), (ROWS, COLS), (a, 0)),
            "bias": torch.zeros(4),
            "emb": torch.zeros(7, 3, dtype=torch.bfloat16),
        },
        "optim": {"state": {0: {"m": Shard(torch.zeros(b - a, COLS), (ROWS, COLS), (a, 0))}}},
    }


def check_loaded(out: dict, rank: int, world: int, saved_world: int) -> None:
    full = global_state()
    a, b = bounds(ROWS, world)[rank]
    assert torch.equal(out["model"]["w"].local, full["w"][a:b]), "w shard differs"
    assert torch.equal(out["optim"]["state"][0]["m"].local, full["m"][a:b]), "m shard differs"
    assert torch.equal(out["model"]["bias"], full["bias"])
    assert torch.equal(out["model"]["emb"], full["emb"])
    assert torch.equal(out["scalar"], full["scalar"])
    assert out["optim"]["param_groups"] == [{"lr": 0.001, "betas": (0.9, 0.99)}]
    assert out["rank"] == (rank if rank < saved_world else 0)
    assert np.array_equal(out["np"], np.arange(6, dtype=np.int32))


def setup(backend: str) -> tuple[int, int, str]:
    if backend == "mpi":
        from mpi4py import MPI

        return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size(), "mpi"
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), "torch"


def groups_at_exit(path: str) -> None:
    """Write how many process groups torch still holds once every other exit handler ran (this
    one is registered before ckptguard's), then end the process without torch's teardown."""
    import torch.distributed.distributed_c10d as c10d

    with open(path, "w") as f:
        json.dump({"groups": len(c10d._world.pg_map)}, f)
    os._exit(0)


def main() -> int:
    backend, scenario, store = sys.argv[1], sys.argv[2], sys.argv[3]
    rank, world, coord = setup(backend)
    outdir = os.path.join(os.path.dirname(store), "out")
    os.makedirs(outdir, exist_ok=True)
    if scenario == "exit":  # a save, then a normal exit: what ckptguard leaves to torch's teardown
        atexit.register(groups_at_exit, os.path.join(outdir, f"exit-{rank}.json"))
        scenario = "save"
    result: dict = {"rank": rank, "world": world}
    try:
        if scenario == "save":
            info = ckptguard.save(
                local_state(rank, world),
                os.path.join(store, sys.argv[4]),
                step=10,
                coordinator=coord,
                timeout=60,
                # a signed save: only the committer names the key, the other ranks need nothing
                sign_key=os.environ.get("SCENARIO_SIGN_KEY") if rank == 0 else None,
                encrypt=json.loads(os.environ.get("SCENARIO_ENCRYPT", "null")),
            )
            result.update(
                ok=True,
                name=info.name,
                uuid=info.uuid,
                tensors=info.tensors,
                files=info.files,
                raw=info.raw_bytes,
            )
        elif scenario == "load":
            saved_world = int(sys.argv[4])
            out = ckptguard.load(store, template=template(rank, world), coordinator=coord)
            check_loaded(out, rank, world, saved_world)
            full = ckptguard.load(store, coordinator=coord)  # no template: whole tensors
            assert torch.equal(full["model"]["w"], global_state()["w"])
            result.update(ok=True)
        elif scenario == "joint_load":  # every rank loads collectively: rank 0 reads metadata
            opened: list[str] = []
            sys.addaudithook(
                lambda ev, a: (
                    opened.append(os.path.basename(a[0]))
                    if ev == "open" and a and isinstance(a[0], str)
                    else None
                )
            )
            out = ckptguard.load(
                store, template=template(rank, world), coordinator=coord, collective=True
            )
            check_loaded(out, rank, world, int(sys.argv[4]))
            result.update(
                ok=True,
                manifest_opens=opened.count("MANIFEST.json"),
                index_opens=opened.count("index.parquet"),
                data_opens=sum(n.endswith(".ckg") for n in opened),
            )
        elif scenario == "fail":  # a failpoint set by the test makes one rank fail
            timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 60
            state = local_state(rank, world)
            compress = os.environ.get("CKPTGUARD_TEST_COMPRESS", "auto")
            if compress != "auto":  # a replica big and regular enough for any codec to pay
                state["z"] = torch.arange(1 << 16, dtype=torch.float32) % 7
            info = ckptguard.save(
                state,
                os.path.join(store, sys.argv[4]),
                coordinator=coord,
                timeout=timeout,
                overwrite=sys.argv[6:] == ["overwrite"],
                compress=compress,
                base=os.environ.get("CKPTGUARD_TEST_BASE") or None,
                encrypt=os.environ.get("CKPTGUARD_TEST_ENCRYPT") or None,
            )
            result.update(ok=True, name=info.name, uuid=info.uuid, warnings=list(info.warnings))
        elif scenario == "diverge":  # replicas that differ are an error on every rank
            st = local_state(rank, world)
            st["model"]["bias"] += rank
            ckptguard.save(st, os.path.join(store, sys.argv[4]), coordinator=coord, timeout=60)
            result.update(ok=True)
        elif scenario == "options":  # rank 2 names another checkpoint: every rank raises
            name = sys.argv[4] + ("-x" if rank == 2 else "")
            ckptguard.save(local_state(rank, world), os.path.join(store, name), coordinator=coord)
            result.update(ok=True)
        elif scenario in ("dtensor_save", "dtensor_load"):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Replicate, distribute_tensor
            from torch.distributed.tensor import Shard as DShard

            mesh = init_device_mesh("cpu", (world,))
            full = global_state()
            if scenario == "dtensor_save":
                st = {
                    "w": distribute_tensor(full["w"], mesh, [DShard(0)]),
                    "b": distribute_tensor(full["bias"], mesh, [Replicate()]),
                }
                ckptguard.save(st, os.path.join(store, sys.argv[4]), coordinator=coord)
            else:
                tmpl = {
                    "w": distribute_tensor(torch.zeros(ROWS, COLS), mesh, [DShard(1)]),
                    "b": distribute_tensor(torch.zeros(4), mesh, [Replicate()]),
                }
                out = ckptguard.load(store, template=tmpl, coordinator=coord)
                assert out["w"] is tmpl["w"], "template DTensor not filled in place"
                assert torch.equal(out["w"].full_tensor(), full["w"]), "DTensor w differs"
                assert torch.equal(out["b"].full_tensor(), full["bias"]), "DTensor b differs"
            result.update(ok=True)
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    except ckptguard.CheckpointError as e:
        result.update(
            ok=False, type=type(e).__name__, error=str(e), failed_rank=getattr(e, "rank", None)
        )
    except AssertionError as e:
        result.update(ok=False, type="AssertionError", error=str(e))
    with open(os.path.join(outdir, f"rank-{rank}.json"), "w") as f:
        json.dump(result, f)
    if backend == "torch":
        import torch.distributed as dist

        dist.barrier()  # no rank exits while another is still in a collective
        if sys.argv[2] == "exit":
            return 0 if result["ok"] else 3
        # Every rank is past the barrier and has written its outcome. Exit without tearing gloo
        # down: torch's teardown at exit sometimes aborts ("terminate called without an active
        # exception", once in CI, after a load that made no groups of ckptguard's).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if result["ok"] else 3)
    elif not result["ok"]:
        import time

        from mpi4py import MPI

        req, t0 = MPI.COMM_WORLD.Ibarrier(), time.monotonic()  # let the others write theirs
        while not req.Test() and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        MPI.COMM_WORLD.Abort(3)  # what a real job does: end every rank, stalled ones too
    return 0 if result["ok"] else 3


if __name__ == "__main__":
    sys.exit(main())
