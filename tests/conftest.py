"""Shared fixtures: the tiny configuration every test builds on (the odd MLP width catches transposed weights)."""

import pytest
import torch

import hf_vit


TINY = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    num_labels=10,
)


def tiny_config(**overrides) -> hf_vit.VisionTransformerConfig:
    return hf_vit.VisionTransformerConfig(**{**TINY, **overrides})


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (fresh models have a zero head and class token, which hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def in_process(monkeypatch):
    """Run finetune.main in this process with one thread, and leave accelerate's singletons as they were."""
    from test_finetune import finetune

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield finetune.main
    torch.set_num_threads(threads)
    reset_accelerate_state()


def reset_accelerate_state() -> None:
    """Forget the Accelerator a script made in this process, as a new command would start without one."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def verified(lines: list[str]) -> tuple[float, float]:
    """(float64 difference, saved-dtype drift) from a conversion's log lines: the float64 one must be at least 100x
    under the tolerance (a correct mapping agrees to rounding), the drift is only reported."""
    import re

    from hf_vit.verification import MAPPING_TOLERANCE

    line = next(line for line in lines if line.startswith("verification: "))
    mapping, drift = (float(value) for value in re.findall(r"(?:max diff|within) (\S+) of", line))
    assert mapping * 100 <= MAPPING_TOLERANCE, line
    return mapping, drift
