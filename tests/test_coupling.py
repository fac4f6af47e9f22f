"""The reversible core: coupling algebra, memory-saving vs plain parity, and the MemCNN failure cases."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
from torch import nn

from revgan_med.benchmarks._memory_probe import saved_activation_bytes
from revgan_med.networks import AdditiveCoupling, ReversibleSequence, init_weights
from revgan_med.networks.generators import Branch

C, S = 8, 8  # channels, spatial side


def make_core(depth: int, memory_saving: bool = True, seed: int = 0) -> ReversibleSequence:
    torch.manual_seed(seed)
    core = ReversibleSequence((AdditiveCoupling(Branch(C // 2), Branch(C // 2)) for _ in range(depth)),
                              memory_saving=memory_saving)
    init_weights(core, zero_last=False)
    with torch.no_grad():
        for m in core.modules():
            if isinstance(m, nn.Conv3d):
                m.bias.normal_(0.0, 0.1)
    return core


def pair(depth: int) -> tuple[ReversibleSequence, ReversibleSequence]:
    saving = make_core(depth, True)
    plain = make_core(depth, False, seed=1)
    plain.load_state_dict(saving.state_dict())
    return saving, plain


def grads(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters()])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_coupling_matches_equation_8():
    f, g = nn.Conv3d(2, 2, 3, padding=1), nn.Conv3d(2, 2, 1)
    block = AdditiveCoupling(f, g)
    x = torch.randn(2, 4, 5, 6, 7)
    with torch.no_grad():
        y = block(x)
        y1 = x[:, :2] + f(x[:, 2:])
        y2 = x[:, 2:] + g(y1)
        torch.testing.assert_close(y, torch.cat([y1, y2], 1))
        torch.testing.assert_close(block.inverse(y), x, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="even number of channels"):
        block(torch.randn(1, 3, 4, 4, 4))


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_core_inverts_with_random_weights(direction):
    core = make_core(16)
    x = torch.randn(2, C, S, S, S)
    there, back = (core.forward, core.inverse) if direction == "forward" else (core.inverse, core.forward)
    with torch.no_grad():
        y = there(x)
        assert (y - x).abs().max() > 0.1  # the blocks are far from the identity
        assert (back(y) - x).abs().max() < 1e-4


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_memory_saving_matches_plain(direction):
    saving, plain = pair(4)
    assert saving.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, C, S, S, S)
    weight = torch.randn_like(x)
    out = []
    for core in (saving, plain):
        leaf = x.clone().requires_grad_()
        y = getattr(core, direction)(leaf)
        (y * weight).sum().backward()
        out.append((y.detach(), leaf.grad, grads(core)))
    torch.testing.assert_close(out[0][0], out[1][0], atol=1e-6, rtol=0)
    assert rel(out[0][1], out[1][1]) < 1e-4
    assert rel(out[0][2], out[1][2]) < 1e-4


class OnlyInvertible(nn.Module):
    """A block without `reverse_step`: exercises the generic invert-then-recompute backward."""

    def __init__(self, block: AdditiveCoupling) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)

    def inverse(self, y):
        return self.block.inverse(y)


def test_generic_blocks_match_plain():
    saving, plain = pair(3)
    generic = ReversibleSequence([OnlyInvertible(copy.deepcopy(b)) for b in saving.blocks])
    x = torch.randn(1, C, S, S, S)
    results = []
    for core in (generic, plain):
        leaf = x.clone().requires_grad_()
        (core.inverse(core(leaf) ** 2) ** 2).sum().backward()  # forward and inverse in one graph
        results.append((leaf.grad, grads(core)))
    assert rel(results[0][0], results[1][0]) < 1e-4
    assert rel(results[0][1], results[1][1]) < 1e-4


def test_kept_activations_do_not_grow_with_depth():
    x = torch.randn(1, C, 16, 16, 16, requires_grad=True)
    kept = {}
    for saving in (True, False):
        for depth in (2, 8):
            core = make_core(depth, saving)
            params = list(core.parameters())
            _, kept[saving, depth] = saved_activation_bytes(lambda c=core: c(x), exclude=params)
    one = x.numel() * 4
    assert kept[True, 2] == kept[True, 8] == one  # only the sequence output
    assert kept[False, 8] >= 3.5 * kept[False, 2]


@pytest.mark.parametrize("case", ["relu_input", "skip", "input_used_after"])
def test_input_from_relu_and_reused(case):
    saving, plain = pair(3)
    a = torch.randn(1, C, S, S, S)
    results = []
    for core in (saving, plain):
        leaf = a.clone().requires_grad_()
        x = torch.relu(leaf)  # ReLU saves its output, which is the core input
        if case == "relu_input":
            loss = core(x).square().sum()
        elif case == "skip":
            loss = (core(x) + x).square().sum()
        else:
            y = core(x)
            loss = y.square().sum() + (x * 3.0).sum()
        loss.backward()
        results.append((leaf.grad, grads(core)))
    assert rel(results[0][0], results[1][0]) < 1e-4
    assert rel(results[0][1], results[1][1]) < 1e-4


def test_autocast_bfloat16_runs_branches_in_bfloat16_in_forward_and_backward():
    saving, plain = pair(2)
    seen = []
    conv = saving.blocks[0].f[0]
    hook = conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(1, C, S, S, S)
    results = []
    for core in (saving, plain):
        leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = core(leaf)
        y.float().square().sum().backward()
        results.append((y.detach().float(), leaf.grad, grads(core)))
    hook.remove()
    assert seen == [torch.bfloat16, torch.bfloat16]  # forward, then the recomputation in backward
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=0)
    assert rel(results[0][1], results[1][1]) < 2e-2
    assert rel(results[0][2], results[1][2]) < 2e-2


@pytest.mark.parametrize("mode", ["no_grad", "eval_input_without_grad"])
def test_input_untouched_without_input_grad(mode):
    core = make_core(3)
    x = torch.randn(1, C, S, S, S)
    reference, version = x.clone(), x._version
    if mode == "no_grad":
        core.eval()
        with torch.no_grad():
            y = core(x)
        assert not y.requires_grad
    else:  # grad mode, parameters need grads, input does not
        y = core(x)
        y.sum().backward()
        assert all(p.grad is not None for p in core.parameters())
    assert x._version == version
    assert torch.equal(x, reference)
    with torch.no_grad():
        torch.testing.assert_close(core.inverse(y.detach()), reference, atol=1e-5, rtol=0)


def test_several_backward_calls():
    saving, plain = pair(2)
    x1, x2 = torch.randn(1, C, S, S, S), torch.randn(1, C, S, S, S)
    for core in (saving, plain):
        y1, y2 = core(x1), core(x2)
        y2.square().sum().backward()  # separate forwards, backward in any order
        y1.square().sum().backward(retain_graph=True)
        y1.square().sum().backward()  # the same graph twice
    assert rel(grads(saving), grads(plain)) < 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, results) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from revgan_med.training.distributed import init_distributed, shutdown_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    context = init_distributed("cpu")  # gloo, and a group that ends with shutdown_distributed
    try:
        model = DistributedDataParallel(make_core(2))
        x = torch.randn(1, C, 6, 6, 6, generator=torch.Generator().manual_seed(rank))
        model(torch.relu(x)).square().sum().backward()
        results[rank] = grads(model.module)
    finally:
        shutdown_distributed(context)


@pytest.mark.slow
def test_ddp_gloo_averages_memory_saving_gradients():
    ctx = torch.multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), results), nprocs=2)
        ddp = dict(results)
    expected = []
    for rank in range(2):  # the average of single-process plain-autograd gradients
        plain = make_core(2, memory_saving=False)
        x = torch.randn(1, C, 6, 6, 6, generator=torch.Generator().manual_seed(rank))
        plain(torch.relu(x)).square().sum().backward()
        expected.append(grads(plain))
    mean = (expected[0] + expected[1]) / 2
    torch.testing.assert_close(ddp[0], ddp[1])
    assert rel(ddp[0], mean) < 1e-4
