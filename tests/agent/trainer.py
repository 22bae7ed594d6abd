"""A trainer for tests/test_agent.py, run by ``ckptguard run`` (one per rank).

    trainer.py env OUT [EXIT_RANK CODE]   write the rank variables to OUT/rank-R.json, exit
                                          (rank EXIT_RANK exits with CODE, or kills itself
                                          if CODE is SIGKILL)
    trainer.py sleep OUT                  write OUT/ready-R.json (with its own pid and process
                                          group), then sleep
    trainer.py train OUT STORE [nocommit] torch.distributed (gloo, env://) steps; on a checkpoint
                                          request, save with coordinator="torch", then
                                          notify_committed (unless nocommit) and wait to be stopped
                                          (with nocommit, rank 1 ignores SIGTERM)

    trainer.py handoff OUT STORE [crash]  three async saves through a Checkpointer that hands its
                                          snapshots to the agent (the state changes after each
                                          snapshot); with crash: one save, then os._exit(7)
    trainer.py nodelocal OUT BASE         a save to BASE/shared, then two node-local saves
                                          (step-10, step-20) into BASE/NODE/store, NODE being
                                          CKPTGUARD_NODE; the agents protect them (--protect)
    trainer.py faults OUT STORE TIMEOUT N N async saves h0..h(N-1) like handoff, each with that
                                          timeout; every outcome, ok or error, goes to
                                          OUT/faults-R.json (tests/test_fault_matrix.py)

Every rank writes OUT/ready-R.json (its agent's pid) once it runs, and OUT/term-R when the agent
stops it with SIGTERM. The loop ends by itself after 25 s (exit 0) so that no test can hang.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def write(path: str, obj: object) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def env_mode(out: str, argv: list[str]) -> int:
    rank = os.environ["RANK"]
    info = {v: os.environ.get(v) for v in VARS}
    info["CKPTGUARD_AGENT"] = os.environ.get("CKPTGUARD_AGENT")
    info["launcher_vars"] = sorted(k for k in os.environ if k.startswith(("PMI_", "MPI_LOCAL")))
    write(os.path.join(out, f"rank-{rank}.json"), info)
    if argv and int(argv[0]) == int(rank):
        if argv[1] == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        return int(argv[1])
    return 0


def train_mode(out: str, store: str, commit: bool) -> int:
    import torch
    import torch.distributed as dist

    import ckptguard
    from ckptguard.agent import client

    rank = int(os.environ["RANK"])

    busy: list[int] = []  # while non-empty, a SIGTERM waits until the report is written

    def on_term(signum: int, frame: object) -> None:
        if busy:
            busy.append(signum)
            return
        open(os.path.join(out, f"term-{rank}"), "w").close()
        os._exit(128 + signum)

    stubborn = not commit and rank == 1
    signal.signal(signal.SIGTERM, signal.SIG_IGN if stubborn else on_term)
    seen: list[str] = []
    client.on_checkpoint_request(lambda req: seen.append(req.reason))
    dist.init_process_group("gloo", init_method="env://")
    write(os.path.join(out, f"ready-{rank}.json"), {"agent": os.getppid()})
    w = torch.zeros(16)
    t0 = time.monotonic()
    step = 0
    while time.monotonic() - t0 < 25:
        step += 1
        w += 1
        ckptguard.training_step(step)  # the agent knows the store once this rank commits
        flag = torch.tensor([int(ckptguard.checkpoint_requested())])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            break
        time.sleep(0.05)
    else:
        return 0
    busy.append(0)  # the agent may stop us as soon as save() has told it of the commit
    path = took = None
    if commit:  # save() notifies the agent itself; a second notice is harmless
        info = ckptguard.save({"w": w, "step": step}, f"{store}/step-{step}", coordinator="torch")
        path, took = info.path, client.notify_committed(info.path, step)
    req = client.checkpoint_request()
    report = {"step": step, "path": path, "notified": took, "callback": seen}
    report["reason"] = None if req is None else req.reason
    write(os.path.join(out, f"saved-{rank}.json"), report)
    busy.pop(0)  # one step: a SIGTERM from here on ends the process in its handler
    if busy:  # one came while the report was written
        on_term(busy[0], None)
    while time.monotonic() - t0 < 25:  # wait for the agent to stop us
        time.sleep(0.05)
    return 0


def handoff_state(rank: int, world: int) -> dict:
    import numpy as np
    import torch

    import ckptguard

    w = torch.arange(20, dtype=torch.float32).reshape(4, 5) + 100 * rank
    return {
        "w": ckptguard.Shard(w, (4 * world, 5), (4 * rank, 0)),
        "b": torch.arange(3.0).repeat(2).reshape(2, 3).t(),  # replicated, strided
        "np": np.arange(6, dtype=np.int16),
        "step": 0,
    }


def handoff_mode(out: str, store: str, crash: bool) -> int:
    import torch

    import ckptguard

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    st = handoff_state(rank, world)
    sealed = os.environ.get("TRAINER_ENCRYPT") or None  # a scope: every tensor encrypted
    with ckptguard.Checkpointer(store, overwrite=True, timeout=60, encrypt=sealed) as c:
        assert c.handoff is not None, "no handoff under the agent"
        if crash:
            import torch.distributed as dist

            dist.init_process_group("gloo", init_method="env://")
            c.save_async(st, "crash", step=1)  # returns once the agent has the snapshot
            dist.barrier()  # every rank has handed over (a rank that dies first stops the rest)
            os._exit(7)
        handles = []
        for i in range(3):
            st["step"] = i
            handles.append(c.save_async(st, f"h{i}", step=i))
            with torch.no_grad():
                st["w"].local.add_(1000)  # after the snapshot: must not reach the checkpoint
        infos = [h.result() for h in handles]
        handed = [h._handoff_id is not None for h in handles]
    report = {"names": [i.name for i in infos], "handed": handed}
    write(os.path.join(out, f"handoff-{rank}.json"), report)
    return 0


def faults_mode(out: str, store: str, timeout: float, n: int) -> int:
    """Hand over ``n`` saves; report each one's outcome (never raise: the report is the point)."""
    import torch

    import ckptguard

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    st = handoff_state(rank, world)
    saves: dict[str, dict] = {}
    with ckptguard.Checkpointer(store, overwrite=True, timeout=timeout) as c:
        handles = []
        for i in range(n):
            st["step"] = i
            handles.append(c.save_async(st, f"h{i}", step=i))
            with torch.no_grad():
                st["w"].local.add_(1000)  # after the snapshot: must not reach the checkpoint
        for h in handles:
            name = os.path.basename(h.path)
            try:
                info = h.result()
                saves[name] = {"ok": True, "warnings": list(info.warnings)}
            except Exception as e:
                saves[name] = {"ok": False, "type": type(e).__name__, "error": str(e)}
    write(os.path.join(out, f"faults-{rank}.json"), {"rank": rank, "saves": saves})
    return 0


def nodelocal_mode(out: str, base: str) -> int:
    """A save to a shared store, then two node-local saves, each into BASE/NODE/store (NODE:
    CKPTGUARD_NODE); then exit, leaving their protection to the agents (--protect)."""
    import torch.distributed as dist

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "dist"))
    from scenarios import local_state

    import ckptguard

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method="env://")
    store = os.path.join(base, os.environ["CKPTGUARD_NODE"], "store")
    state = local_state(rank, world)
    ckptguard.save(state, os.path.join(base, "shared", "step-0"), coordinator="torch")
    for step in (10, 20):
        path = os.path.join(store, f"step-{step}")
        ckptguard.save(state, path, node_local=True, coordinator="torch", step=step)
    write(os.path.join(out, f"saved-{rank}.json"), {"store": store})
    dist.destroy_process_group()
    return 0


def main() -> int:
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "env":
        return env_mode(out, sys.argv[3:])
    if mode == "sleep":
        me = {"agent": os.getppid(), "pid": os.getpid(), "pgid": os.getpgid(0)}
        write(os.path.join(out, f"ready-{os.environ['RANK']}.json"), me)
        time.sleep(25)
        return 0
    if mode == "faults":
        return faults_mode(out, sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
    if mode == "nodelocal":
        return nodelocal_mode(out, sys.argv[3])
    if mode == "handoff":
        return handoff_mode(out, sys.argv[3], crash=sys.argv[4:] == ["crash"])
    return train_mode(out, sys.argv[3], commit=sys.argv[4:] != ["nocommit"])


if __name__ == "__main__":
    sys.exit(main())
