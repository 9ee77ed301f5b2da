"""UniPC on a device without torch.linalg.solve (MPS before torch 2.7): its corrector's small
solve runs on the CPU, and the steps equal stock UniPC's.

The device is simulated on the CPU by a torch function mode: every tensor counts as "on the
device" except those explicitly moved to the CPU (.cpu() or .to("cpu")), and a solve on the
device raises what MPS raises."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_BASE
from diffusers import UniPCMultistepScheduler
from torch.overrides import TorchFunctionMode

from pasd_cli.engine.schedulers import PortableUniPCScheduler, has_linalg_solve

MPS_MESSAGE = (
    "The operator 'aten::_linalg_solve_ex.result' is not currently implemented for the MPS device. "
    "If you want this op to be added in priority during the prototype phase of this feature, please comment"
)
STEPS = 6


def _moves_to_cpu(func, args, kwargs) -> bool:
    if func is torch.Tensor.cpu:
        return True
    if func is not torch.Tensor.to:
        return False
    targets = [*args[1:], kwargs.get("device")]
    return any(isinstance(t, (str, torch.device)) and torch.device(t).type == "cpu" for t in targets)


class DeviceWithoutSolve(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.on_cpu: list[torch.Tensor] = []
        self.solves_on_cpu = 0

    def _is_on_cpu(self, tensor) -> bool:
        return any(tensor is moved for moved in self.on_cpu)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.linalg.solve:
            if not all(self._is_on_cpu(a) for a in args[:2]):
                raise NotImplementedError(MPS_MESSAGE)
            self.solves_on_cpu += 1
        result = func(*args, **kwargs)
        if _moves_to_cpu(func, args, kwargs):
            result = result.clone()  # a distinct tensor: the copy on the CPU
            self.on_cpu.append(result)
        return result


@pytest.fixture
def fresh_probe():
    has_linalg_solve.cache_clear()
    yield
    has_linalg_solve.cache_clear()  # later tests see the real CPU again


def _config() -> dict:
    return json.loads((TINY_BASE / "scheduler" / "scheduler_config.json").read_text())


def _denoise(scheduler_class, steps: int = STEPS) -> torch.Tensor:
    """`steps` UniPC steps with a fixed stand-in for the network."""
    scheduler = scheduler_class.from_config(_config())
    scheduler.set_timesteps(steps, device="cpu")
    generator = torch.Generator("cpu").manual_seed(3)
    latents = torch.randn((1, 4, 8, 8), generator=generator)
    noise = torch.randn((1, 4, 8, 8), generator=generator)
    for t in scheduler.timesteps:
        eps = 0.5 * noise + 0.1 * latents.tanh()
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def test_the_simulated_device_fails_stock_unipc_at_step_3(fresh_probe):
    assert _config().get("solver_order", 2) == 2
    with DeviceWithoutSolve():
        assert not has_linalg_solve("cpu")
        _denoise(UniPCMultistepScheduler, steps=2)  # the first two steps need no solve
        with pytest.raises(NotImplementedError, match="not currently implemented for the MPS device"):
            _denoise(UniPCMultistepScheduler, steps=3)


def test_unipc_solves_on_the_cpu_where_the_device_lacks_the_op(fresh_probe):
    expected = _denoise(UniPCMultistepScheduler)
    with DeviceWithoutSolve() as device:
        latents = _denoise(PortableUniPCScheduler)
    # One corrector solve per step from the third on, each on tensors moved to the CPU.
    assert device.solves_on_cpu == STEPS - 2
    assert torch.equal(latents, expected)


def test_unipc_leaves_a_device_with_the_op_alone(fresh_probe):
    assert has_linalg_solve("cpu")
    scheduler = PortableUniPCScheduler.from_config(_config())
    scheduler.set_timesteps(STEPS, device="cpu")
    assert not scheduler._solve_on_cpu
    assert torch.equal(_denoise(PortableUniPCScheduler), _denoise(UniPCMultistepScheduler))


def test_the_pipeline_samples_with_the_portable_unipc(tiny_pipeline):
    assert isinstance(tiny_pipeline.new_scheduler(20), PortableUniPCScheduler)
