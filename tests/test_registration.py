"""Registration network, warping and the smoothness term (RegGAN building blocks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from revgan_med.networks.registration import RegistrationNet, smoothness_loss, warp


def _blob(size: int, centre: tuple[float, float, float], sigma: float = 3.0) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    c = torch.tensor(centre).view(3, 1, 1, 1)
    return torch.exp(-((grid - c) ** 2).sum(0) / (2 * sigma**2))[None, None]


def _linear_field(matrix: np.ndarray, size: int) -> torch.Tensor:
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij")).astype(np.float64)
    return torch.from_numpy(np.einsum("cd,dxyz->cxyz", matrix, grid)[None]).float()


def test_smoothness_zero_for_constant_field() -> None:
    field = torch.ones(2, 3, 8, 9, 10) * torch.tensor([1.5, -2.0, 0.25]).view(1, 3, 1, 1, 1)
    assert smoothness_loss(field).item() == 0.0


def test_smoothness_of_linear_field_is_hand_value() -> None:
    # T_c(p) = sum_d A[c, d] p_d: every spatial derivative is constant, dT_c/dp_d = A[c, d];
    # mean over 3 components x 3 directions of A[c, d]**2
    matrix = np.array([[0.1, -0.2, 0.0], [0.3, 0.05, 0.4], [-0.1, 0.0, 0.2]])
    expected = float((matrix**2).sum() / 9)
    assert smoothness_loss(_linear_field(matrix, 7)).item() == pytest.approx(expected, rel=1e-5)


def test_warp_by_integer_shift_moves_the_volume() -> None:
    image = torch.rand(1, 1, 10, 11, 12)
    field = torch.zeros(1, 3, 10, 11, 12)
    field[:, 1] = 2.0  # sample y at p + 2 along the second axis
    warped = warp(image, field)
    torch.testing.assert_close(warped[..., :, :9, :], image[..., :, 2:, :])


def test_registration_net_starts_at_identity_and_keeps_shape() -> None:
    torch.manual_seed(0)
    net = RegistrationNet(in_channels=1, width=4, levels=2)
    moving, fixed = torch.rand(2, 1, 13, 16, 10), torch.rand(2, 1, 13, 16, 10)  # not multiples of 4
    field = net(moving, fixed)
    assert field.shape == (2, 3, 13, 16, 10)
    assert field.abs().max().item() == 0.0
    field.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_registration_net_rejects_mismatched_inputs() -> None:
    net = RegistrationNet(width=4, levels=1)
    with pytest.raises(ValueError, match="moving and fixed"):
        net(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 6))
    with pytest.raises(ValueError, match="width"):
        RegistrationNet(width=0)


@pytest.mark.slow
def test_registration_recovers_known_translation() -> None:
    """Optimise R on a 24³ blob shifted by 2 voxels: the mean displacement in the blob ≈ −2 along x."""
    torch.manual_seed(0)
    moving = _blob(24, (10.0, 12.0, 12.0))
    fixed = _blob(24, (12.0, 12.0, 12.0))  # fixed(p) = moving(p - 2 e_x), so T = -2 e_x
    net = RegistrationNet(in_channels=1, width=8, levels=2)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        field = net(moving, fixed)
        loss = (warp(moving, field) - fixed).abs().mean() + 0.1 * smoothness_loss(field)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        field = net(moving, fixed)
        inside = fixed[0, 0] > 0.3
        mean = [field[0, c][inside].mean().item() for c in range(3)]
        before = (moving - fixed).abs().mean().item()
        after = (warp(moving, field) - fixed).abs().mean().item()
    assert mean[0] == pytest.approx(-2.0, abs=0.25)
    assert abs(mean[1]) < 0.25 and abs(mean[2]) < 0.25
    assert after < 0.2 * before
