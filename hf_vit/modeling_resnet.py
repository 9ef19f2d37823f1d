"""The ResNet stem of the R+ViT hybrids: vit_jax `models_resnet.py`, in the names of the seed's `modeling_resnet.py`.

A bottleneck ResNet with GroupNorm and weight-standardised convolutions ("BiT" ResNet v2 layers, post-activation
units) whose feature map goes into the ViT's patch embedding. Its keys under `transformer.embeddings.hybrid_model`,
for width w = 64 x resnet_width_factor and stage b = 1, 2, ... (mid = w * 2^(b-1) channels, out = 4 * mid):

    root.conv.weight                             (w, 3, 7, 7)      vit_jax conv_root, stride 2, no bias
    root.gn.{weight,bias}                        (w,)              vit_jax gn_root
    body.block{b}.unit{u}.conv1.weight           (mid, in, 1, 1)
    body.block{b}.unit{u}.gn1.{weight,bias}      (mid,)
    body.block{b}.unit{u}.conv2.weight           (mid, mid, 3, 3)  stride 2 in unit1 of blocks 2, 3, ...
    body.block{b}.unit{u}.gn2.{weight,bias}      (mid,)
    body.block{b}.unit{u}.conv3.weight           (out, mid, 1, 1)
    body.block{b}.unit{u}.gn3.{weight,bias}      (out,)
    body.block{b}.unit1.downsample.weight        (out, in, 1, 1)   vit_jax conv_proj: unit1 of every stage only
    body.block{b}.unit1.gn_proj.{weight,bias}    (out,)

Numerics (`config.resnet_flavour`): "vit_jax" is the original Flax model, TF "SAME" padding computed from each input's
size (asymmetric for stride 2 on even sizes), kernels standardised as (w - mean) / (std + 1e-5), GroupNorm with 32
groups and epsilon 1e-6. "seed" reproduces the seed's port, which its fine-tuned hybrids need: symmetric padding (3
on the root conv, 1 on the 3x3 convs), an unpadded max-pool, (w - mean) / sqrt(var + 1e-5), and
gn_proj = GroupNorm(C, C) with epsilon 1e-5.
"""

from collections import OrderedDict

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_hf_vit import VisionTransformerConfig


GROUP_NORM_GROUPS = 32
GROUP_NORM_EPS = 1e-6  # flax.linen.GroupNorm default
WEIGHT_STANDARDIZATION_EPS = 1e-5  # vit_jax StdConv


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one axis: out = ceil(size / stride); the odd pixel goes after."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(hidden_states: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad (B, C, H, W) for a "SAME" `kernel` x `kernel` window of `stride`, computed from this input's size."""
    top, bottom = same_padding(hidden_states.shape[-2], kernel, stride)
    left, right = same_padding(hidden_states.shape[-1], kernel, stride)
    if top == bottom == left == right == 0:  # every 1x1 conv: no copy
        return hidden_states
    return nn.functional.pad(hidden_states, (left, right, top, bottom), value=value)


class StdConv2d(nn.Conv2d):
    """Conv2d without bias whose kernel is standardised per output channel over (in, H, W) at every call."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, flavour="vit_jax"):
        symmetric = kernel_size // 2 if flavour == "seed" else 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=symmetric, bias=False)
        self.same_padding = flavour == "vit_jax"

    def standardized_weight(self) -> torch.Tensor:
        # In float32 at least: a bf16 mean and std of 4,608 values would lose the kernel's detail.
        weight = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        variance, mean = torch.var_mean(weight, dim=(1, 2, 3), keepdim=True, correction=0)  # population statistics
        if self.same_padding:  # vit_jax: the epsilon is added to the standard deviation
            weight = (weight - mean) / (variance.sqrt() + WEIGHT_STANDARDIZATION_EPS)
        else:  # the seed: to the variance
            weight = (weight - mean) / torch.sqrt(variance + WEIGHT_STANDARDIZATION_EPS)
        return weight.to(self.weight.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.same_padding:
            hidden_states = pad_same(hidden_states, self.kernel_size[0], self.stride[0])
        return nn.functional.conv2d(hidden_states, self.standardized_weight(), None, self.stride, self.padding)


class MaxPool2dSame(nn.Module):
    """3x3 stride-2 max-pool with TF "SAME" padding (flax `nn.max_pool(padding="SAME")` pads with -inf)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = pad_same(hidden_states, 3, 2, value=float("-inf"))
        return nn.functional.max_pool2d(hidden_states, kernel_size=3, stride=2)


class PreActBottleneck(GradientCheckpointingLayer):
    """
    The seed's name for vit_jax's `ResidualUnit`, which (in both) is a *post*-activation bottleneck:
    relu(residual + gn3(conv3(relu(gn2(conv2(relu(gn1(conv1(x))))))))), the residual projected when the shape changes.
    """

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int, stride: int, flavour: str):
        super().__init__()
        self.conv1 = StdConv2d(in_channels, mid_channels, 1, flavour=flavour)
        self.gn1 = nn.GroupNorm(GROUP_NORM_GROUPS, mid_channels, eps=GROUP_NORM_EPS)
        self.conv2 = StdConv2d(mid_channels, mid_channels, 3, stride=stride, flavour=flavour)
        self.gn2 = nn.GroupNorm(GROUP_NORM_GROUPS, mid_channels, eps=GROUP_NORM_EPS)
        self.conv3 = StdConv2d(mid_channels, out_channels, 1, flavour=flavour)
        self.gn3 = nn.GroupNorm(GROUP_NORM_GROUPS, out_channels, eps=GROUP_NORM_EPS)
        self.relu = nn.ReLU()
        self.downsample, self.gn_proj = nn.Identity(), nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = StdConv2d(in_channels, out_channels, 1, stride=stride, flavour=flavour)
            # The seed writes GroupNorm(C, C): one group per channel, PyTorch's epsilon.
            groups, eps = (out_channels, 1e-5) if flavour == "seed" else (GROUP_NORM_GROUPS, GROUP_NORM_EPS)
            self.gn_proj = nn.GroupNorm(groups, out_channels, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.gn_proj(self.downsample(hidden_states))
        y = self.relu(self.gn1(self.conv1(hidden_states)))
        y = self.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return self.relu(residual + y)


class ResNetV2(nn.Module):
    """The root (7x7 stride-2 conv, GroupNorm, ReLU, 3x3 stride-2 max-pool), then `resnet_num_layers` stages."""

    def __init__(self, config: VisionTransformerConfig):
        super().__init__()
        flavour, width = config.resnet_flavour, config.resnet_width
        pool = MaxPool2dSame() if flavour == "vit_jax" else nn.MaxPool2d(kernel_size=3, stride=2, padding=0)
        self.root = nn.Sequential(
            OrderedDict(
                conv=StdConv2d(config.num_channels, width, 7, stride=2, flavour=flavour),
                gn=nn.GroupNorm(GROUP_NORM_GROUPS, width, eps=GROUP_NORM_EPS),
                relu=nn.ReLU(),
                pool=pool,
            )
        )
        blocks, in_channels = OrderedDict(), width
        for index, num_units in enumerate(config.resnet_num_layers):
            mid_channels = width * 2**index
            units = OrderedDict()
            for unit in range(1, num_units + 1):
                stride = 2 if index > 0 and unit == 1 else 1
                units[f"unit{unit}"] = PreActBottleneck(in_channels, 4 * mid_channels, mid_channels, stride, flavour)
                in_channels = 4 * mid_channels
            blocks[f"block{index + 1}"] = nn.Sequential(units)
        self.body = nn.Sequential(blocks)  # empty (the identity) for the root alone
        self.out_channels = in_channels

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.body(self.root(pixel_values))  # (B, out_channels, H', W')


__all__ = ["MaxPool2dSame", "PreActBottleneck", "ResNetV2", "StdConv2d", "pad_same", "same_padding"]
