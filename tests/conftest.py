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
