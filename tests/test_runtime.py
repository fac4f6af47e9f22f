"""Device choice, the mixed-precision policy and its float32 islands, and the accelerator paths of
training (resume, warp, torchrun), emulated on the CPU: the 'meta' device stands in for a GPU."""

from __future__ import annotations

import datetime

import numpy as np
import pytest
import torch
from _training_data import tiny_config, write_kernel_datalist

from revgan_med.networks import build_generator
from revgan_med.networks.registration import warp
from revgan_med.runtime import amp_dtype, float32_island, needs_grad_scaler, resolve_device


def test_resolve_device_accepts_device_strings_and_refuses_missing_ones(monkeypatch):
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="CUDA is not available") as err:
            resolve_device(name)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("banana")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 1)  # torchrun ranks spread
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="only 2 CUDA"):
        resolve_device("cuda:2")


def test_infer_cli_names_an_unavailable_device_in_one_line(tmp_path, capsys):
    from revgan_med.cli import main

    (tmp_path / "in.nii").write_bytes(b"")  # exists: the device is what fails (before any reading)
    code = main(["infer", "--checkpoint", str(tmp_path / "x.pt"), "--input", str(tmp_path / "in.nii"),
                 "--output", str(tmp_path / "out.nii"), "--device", "cuda:1"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and "cuda:1" in err and "CUDA is not available" in err and "\n" not in err


@pytest.mark.parametrize(("capability", "expected"), [((7, 0), torch.float16), ((8, 0), torch.bfloat16)])
def test_bf16_only_where_native(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts here
    dtype = amp_dtype(torch.device("cuda", 0))
    assert dtype == expected and needs_grad_scaler(dtype) == (expected == torch.float16)
    assert amp_dtype(torch.device("cpu")) == torch.bfloat16
    assert amp_dtype(torch.device("cuda", 0), amp=False) is None


def test_float32_island_turns_autocast_and_tf32_off_and_restores_them():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with float32_island("cpu"):
            assert (a @ a).dtype == torch.float32
            assert conv.fp32_precision == matmul.fp32_precision == "ieee"
        assert (a @ a).dtype == torch.bfloat16
    assert (conv.fp32_precision, matmul.fp32_precision) == before


@pytest.mark.parametrize("name", ["rev_srcnn3d", "resnet3d"])
def test_identity_and_linear_paths_stay_float32_under_autocast(name):
    """Body zero (residual start): under bf16 autocast the output must equal float32 bit for bit."""
    torch.manual_seed(0)
    g = build_generator(name, in_channels=1, out_channels=1, width=4, depth=1, residual=True,
                        linear_kernel=[3, 3, 1]).eval()  # fmt: skip
    with torch.no_grad():
        g.lin_y.weight.normal_(0, 0.3)
        g.lin_y.bias.fill_(0.01)
    x = torch.rand(1, 1, 12, 12, 8) * 2 - 1
    with torch.no_grad():
        reference = g(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = g(x)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, reference)


def test_warp_grid_is_float32_under_low_precision_fields():
    """A bf16 grid holds coordinates 64–127 to 0.5 voxel; the warp must not."""
    ramp = torch.arange(128.0).view(1, 1, 128, 1, 1).expand(1, 1, 128, 2, 2).contiguous()
    field = torch.zeros(1, 3, 128, 2, 2, dtype=torch.bfloat16)
    field[:, 0] = 0.3
    shift = float(field[0, 0, 0, 0, 0])  # 0.30078125 in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = warp(ramp, field)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out[0, 0, 64:127, 0, 0].numpy(), np.arange(64, 127) + shift, atol=1e-4)


def test_warp_follows_the_device_of_each_call():
    image, field = torch.rand(1, 1, 6, 6, 6), torch.zeros(1, 3, 6, 6, 6)
    torch.testing.assert_close(warp(image, field), image)
    assert warp(image.to("meta"), field.to("meta")).device.type == "meta"  # not the first call's grid
    torch.testing.assert_close(warp(image, field), image)


@pytest.mark.filterwarnings("ignore:for .*meta parameter")
def test_resume_loads_to_the_cpu_and_moves_only_model_and_optimiser_state(tmp_path):
    """The objective and optimisers live on 'meta' (standing in for a GPU): their state must follow
    them, while RNG states and image pools stay CPU tensors."""
    from revgan_med.checkpoints import load_checkpoint
    from revgan_med.data.transforms import intensity_for_task
    from revgan_med.tasks import TaskSpec
    from revgan_med.training.distributed import DistributedContext
    from revgan_med.training.loop import _Checkpointer, build_optimisers, build_training_objective, train

    config = tiny_config(write_kernel_datalist(tmp_path / "data"), "objective=unpaired", "train.steps=2")
    last = train(config, tmp_path / "run")
    saved = load_checkpoint(last)
    objective = build_training_objective(config).to("meta")
    optimizers, schedulers = build_optimisers(objective, config)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    intensity = intensity_for_task(config.task, config.data.window)
    spec = TaskSpec.from_config(config)
    checkpointer = _Checkpointer(config, spec, objective, optimizers, schedulers, scaler, intensity)
    np.random.seed(123)
    state = checkpointer.restore(last, DistributedContext(0, 1, 0, torch.device("meta")))
    assert state.step == 2
    assert np.array_equal(np.random.get_state()[1], saved["rng"]["numpy"]["keys"].numpy().astype(np.uint32))
    pool = objective.pool_x.images
    assert pool and all(image.device.type == "cpu" for image in pool)
    moments = [s["exp_avg"] for opt in optimizers.values() for s in opt.state.values()]
    assert moments and all(m.device.type == "meta" for m in moments)


def test_torchrun_group_gets_the_configured_timeout_and_backend(monkeypatch):
    import torch.distributed as dist

    from revgan_med.training.distributed import init_distributed

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    context = init_distributed("cpu", timeout_s=42.0)
    assert context.rank == 1 and context.owns_group
    assert calls == [{"backend": "gloo", "timeout": datetime.timedelta(seconds=42)}]
    init_distributed("cpu", timeout_s=5.0, backend="nccl")
    assert calls[-1]["backend"] == "nccl"


def test_ranks_cache_equal_shares_of_the_cases():
    from revgan_med.data.datasets import shard_cases

    cases = [{"id": i} for i in range(5)]
    shares = [shard_cases(cases, rank, 2) for rank in range(2)]
    assert [[c["id"] for c in s] for s in shares] == [[0, 2, 4], [1, 3, 0]]
    assert shard_cases(cases[:1], 1, 3) == cases[:1]  # fewer cases than ranks: every rank has one


def test_persistent_loader_workers_see_the_new_epoch(tmp_path):
    from torch.utils.data import DataLoader

    from revgan_med.data.datasets import PatchDataset, load_datalist

    datalist = write_kernel_datalist(tmp_path, cases=2, shape=(20, 20, 20))
    dataset = PatchDataset(load_datalist(datalist, "training"), task="ct-kernel", intensity_or_window="nlst",
                           patch_size=(8, 8, 8), samples_per_volume=2, foreground_fraction=0.0,
                           factors=(1, 1, 1), upsample="nearest")  # fmt: skip
    loader = DataLoader(dataset, batch_size=2, num_workers=1, persistent_workers=True)
    seen = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        seen.append(torch.cat([b["image"] for b in loader]))
    for epoch in range(2):
        dataset.set_epoch(epoch)
        expected = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        assert torch.equal(seen[epoch], expected)
    assert not torch.equal(seen[0], seen[1])


def test_train_takes_timeout_and_backend_from_the_config(tmp_path, monkeypatch):
    from revgan_med.training import loop

    seen = {}

    def joined(device, **kwargs):
        seen.update(device=device, **kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(loop, "init_distributed", joined)
    config = tiny_config(tmp_path / "datalist.json", "train.dist_timeout_s=7", "train.dist_backend=gloo")
    with pytest.raises(RuntimeError, match="stop here"):
        loop.train(config, tmp_path / "run")
    assert seen == {"device": "cpu", "timeout_s": 7.0, "backend": "gloo"}
