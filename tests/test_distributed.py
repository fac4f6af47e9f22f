from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _training_data import tiny_config, write_kernel_datalist
from pytest import approx

from revgan_med.checkpoints import load_checkpoint
from revgan_med.data.transforms import intensity_for_task
from revgan_med.training.distributed import (
    DistributedContext,
    ResumableDistributedSampler,
    average_gradients,
    broadcast_module,
    init_distributed,
    shutdown_distributed,
)
from revgan_med.training.loop import build_training_objective, train, train_step
from revgan_med.training.validation import ValidationSet

WORLD = 2


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _worker(rank: int, port: int, datalist: str, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))  # fmt: skip
    torch.set_num_threads(1)
    context = init_distributed("cpu")
    assert context.owns_group and dist.get_backend() == "gloo" and context.rank == rank

    # gradients become the mean over the ranks
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), float(rank + 1))
    average_gradients([p], context)
    assert torch.equal(p.grad, torch.full((3,), 1.5))

    # differently initialised ranks on different data stay identical after broadcast + averaged steps
    config = tiny_config(datalist)
    torch.manual_seed(100 + rank)
    objective = build_training_objective(config)
    broadcast_module(objective, context)
    optimizers = {
        r: torch.optim.Adam(m.parameters(), lr=1e-3) for r, m in objective.modules_by_role().items()
    }
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(2):
        batch = {k: torch.rand(1, 1, 24, 24, 24) * 2 - 1 for k in ("image", "target")}
        train_step(objective, batch, optimizers=optimizers, scaler=scaler, amp_dtype=None, context=context)
    for role, module in objective.modules_by_role().items():
        mine = _flat(module)
        gathered = [torch.empty_like(mine) for _ in range(WORLD)]
        dist.all_gather(gathered, mine)
        assert torch.equal(gathered[0], gathered[1]), f"{role} parameters differ across ranks"

    # validation shared out: rank 0 predicts cases 0 and 2, rank 1 case 1; every rank gets the means over
    # all three that one process computes alone
    three = tiny_config(str(Path(datalist).with_name("three_validation.json")))
    intensity = intensity_for_task("ct-kernel", "nlst")
    shared = ValidationSet.from_config(three, intensity, context)
    alone = ValidationSet.from_config(three, intensity)
    assert [c["name"] for c in shared.cases] == [c["name"] for c in alone.cases][rank::WORLD]
    generator, cpu = objective.generator, context.device
    assert shared.evaluate(generator, device=cpu) == approx(alone.evaluate(generator, device=cpu))

    # the whole training loop under the group (one validation case: rank 1's share is empty); rank 0
    # writes, the group stays for its owner
    train(config, run_dir)
    assert dist.is_initialized() and _gloo_threads()
    shutdown_distributed(context)
    # nothing holds the group past its end (torch.distributed.nn's default arguments, imported by the first
    # optimiser step, once did): its threads stop now, not in the interpreter's exit, where they aborted
    assert not _gloo_threads()


def _gloo_threads() -> list[str]:
    """Names of this process's gloo threads (Linux: /proc lists every native thread)."""
    tasks = Path("/proc/self/task")
    return [n for t in tasks.iterdir() if "gloo" in (n := (t / "comm").read_text().strip())]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_keep_identical_parameters_and_train(tmp_path):
    datalist = write_kernel_datalist(tmp_path / "data")
    entries = json.loads(datalist.read_text())
    entries["validation"] = entries["training"] + entries["validation"]
    (tmp_path / "data" / "three_validation.json").write_text(json.dumps(entries))
    run = tmp_path / "run"
    mp.spawn(_worker, args=(_free_port(), str(datalist), str(run)), nprocs=WORLD, join=True)
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    assert payload["step"] == 6
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert [row[0] for row in rows] == ["0", "1", "2", "3", "4", "5", "6"]  # by rank 0 (0: before training)
    validated = [row[0] for row in rows if row[1]]
    assert validated == ["0", "3", "6"] and (run / "checkpoints" / "best.pt").is_file()


def test_sampler_shards_without_overlap_and_resumes_mid_epoch():
    data = list(range(10))
    shares = []
    for rank in range(2):
        context = DistributedContext(rank, 2, rank, torch.device("cpu"))
        sampler = ResumableDistributedSampler(data, context=context, seed=3)
        sampler.set_epoch(4)
        full = list(sampler)
        sampler.set_epoch(4, start=2)
        assert list(sampler) == full[2:] and len(sampler) == len(full) - 2
        shares.append(full)
    assert sorted(shares[0] + shares[1]) == data
