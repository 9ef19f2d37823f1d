"""PyTorch Vision Transformer, in the reading order and with the names of the seed repo (jeonsworld/ViT-pytorch).

Embeddings -> Attention, Mlp -> Block -> Encoder -> VisionTransformerModel (the seed's `Transformer`)
-> VisionTransformerForImageClassification (the seed's `VisionTransformer`).

The module attribute names are a contract: they are the state-dict keys on the Hub, in the converter and in the seed
repo's `*_checkpoint.bin` files. For the classifier (i = 0 .. num_hidden_layers - 1):

    transformer.embeddings.cls_token                            (1, 1, D)     absent when classifier="gap"
    transformer.embeddings.position_embeddings                  (1, N + 1, D) N patches (+1 for the class token)
    transformer.embeddings.patch_embeddings.{weight,bias}       (D, C, P, P), (D,)
    transformer.encoder.layer.{i}.attention_norm.{weight,bias}  (D,)
    transformer.encoder.layer.{i}.attn.{query,key,value,out}.{weight,bias}
    transformer.encoder.layer.{i}.ffn_norm.{weight,bias}        (D,)
    transformer.encoder.layer.{i}.ffn.fc1.{weight,bias}         (M, D), (M,)
    transformer.encoder.layer.{i}.ffn.fc2.{weight,bias}         (D, M), (D,)
    transformer.encoder.encoder_norm.{weight,bias}              (D,)
    pre_logits.{weight,bias}                                    (R, D), (R,)  only with representation_size=R
    head.{weight,bias}                                          (num_labels, R or D)

`VisionTransformerModel` has the same keys without the `transformer.` prefix. A hybrid (`resnet_num_layers` set) adds
its ResNet under `transformer.embeddings.hybrid_model.{root,body}` (key table in `modeling_resnet.py`), and its
`patch_embeddings` (D, C', P, P) cut the ResNet's C'-channel feature map instead of the image.
"""

import os
from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_hf_vit import IMAGE_MEAN, IMAGE_STD, VisionTransformerConfig, _as_pair
from .modeling_resnet import PreActBottleneck, ResNetV2


def resample_position_embeddings(
    position_embeddings: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """
    Resample the patch rows of `position_embeddings` (1, prefix + gh * gw, D) from `old_grid` to `new_grid`.

    Reproduces vit_jax `checkpoint.interpolate_posembed` and the seed's `load_from`: the class-token row is kept and
    the grid goes through `scipy.ndimage.zoom(order=1)`, i.e. linear interpolation that maps corner to corner
    (`align_corners=True`). Computed in float32, or float64 for float64 input (the converter's exact resampling).
    """
    if tuple(old_grid) == tuple(new_grid):
        return position_embeddings
    prefix, grid = position_embeddings[:, :num_prefix_tokens], position_embeddings[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    compute_dtype = torch.promote_types(grid.dtype, torch.float32)
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).to(compute_dtype)  # (1, D, gh, gw)
    grid = nn.functional.interpolate(grid, size=tuple(new_grid), mode="bilinear", align_corners=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(position_embeddings.dtype)
    return torch.cat((prefix, grid), dim=1)


# oneDNN's fused linear, the kernel inductor's CPU weight freezing emits: the bias (and GELU) run in the matmul's
# epilogue, which saves the bias copy of `addmm` and, on AVX-512, a separate GELU pass (ATen's CPU tanh is slow). It has
# no backward, so it only serves inference; `(name, algorithm)` of the post-op for each `hidden_act` it can fuse.
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
# Private ops: a torch build without them (this file also runs as remote code on other versions) takes the plain path.
_ONEDNN_BF16 = _ONEDNN_LINEAR is not None and bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", bool)())
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16) if _ONEDNN_BF16 else (torch.float32,)
_ONEDNN_ACTIVATIONS = {"gelu_pytorch_tanh": ("gelu", "tanh"), "gelu": ("gelu", "none")}
# oneDNN's AVX2 kernels apply an eltwise post-op slowly: ViT-B's fc1 at batch 8 takes 54 ms plain and 74 ms with the
# GELU fused, while ATen's GELU on the output takes 9 ms. So the activation is fused only where the CPU has AVX-512.
_ONEDNN_FUSES_ACTIVATION = "AVX512" in torch.backends.cpu.get_cpu_capability()


def _onednn_serves(layer: nn.Linear, hidden_states: torch.Tensor) -> bool:
    """Whether `linear` may bypass `layer.forward`: a plain, unhooked nn.Linear on CPU, no gradients, no autocast."""
    return (
        _ONEDNN_LINEAR is not None
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()  # a compiled graph gets the same fusion from inductor
        and hidden_states.device.type == "cpu"
        and hidden_states.dtype in _ONEDNN_DTYPES
        and layer.weight.dtype == hidden_states.dtype
        and not torch.is_autocast_enabled("cpu")
        and type(layer) is nn.Linear  # not a LoRA or quantized subclass
        and not (layer._forward_hooks or layer._forward_pre_hooks or "forward" in vars(layer))
    )


def linear(layer: nn.Module, hidden_states: torch.Tensor, act_fn=None, post_op=None) -> torch.Tensor:
    """`act_fn(layer(hidden_states))`: one oneDNN call where `_onednn_serves` (or the layer is a `FrozenLinear`), with
    `act_fn` as its `post_op` where that is fast."""
    fuse = post_op is not None and _ONEDNN_FUSES_ACTIVATION
    if type(layer) is FrozenLinear:
        hidden_states = layer(hidden_states, post_op if fuse else None)
    elif _onednn_serves(layer, hidden_states):
        attr, algorithm = post_op if fuse else ("none", "")
        hidden_states = _ONEDNN_LINEAR(hidden_states, layer.weight, layer.bias, attr, [], algorithm)
    else:
        fuse = False
        hidden_states = layer(hidden_states)
    return hidden_states if act_fn is None or fuse else act_fn(hidden_states)


_FROZEN = "This model was frozen for CPU inference: "
_NO_LOADING = f"{_FROZEN}load the weights into an unfrozen model and call freeze_for_cpu_inference() on it again."


class FrozenLinear(nn.Module):
    """
    An inference-only `nn.Linear` whose weight exists only as oneDNN's pre-packed copy (`freeze_for_cpu_inference`).

    Pre-packing saves the reorder oneDNN otherwise does on every call. The packed tensor is the only copy of the
    weight, so nothing can change one without the other (a cache beside `nn.Linear.weight` would go stale after a
    `weight.data.copy_()`, which no version counter sees). `state_dict()` gives the plain weight back, exactly.
    """

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        weight = layer.weight.detach()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, None), persistent=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, post_op: tuple[str, str] | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() or hidden_states.dtype != self.packed_weight.dtype or hidden_states.is_cuda:
            raise RuntimeError(
                f"This model was frozen for CPU inference ({self.packed_weight.dtype} weights, no gradients) and got "
                f"a {hidden_states.dtype} input on {hidden_states.device} with gradients "
                f"{'on' if torch.is_grad_enabled() else 'off'}: run it under torch.inference_mode() in its dtype, or "
                "load the model again to train it."
            )
        attr, algorithm = post_op or ("none", "")
        return _ONEDNN_LINEAR(hidden_states, self.packed_weight, self.bias, attr, [], algorithm)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.packed_weight.to_dense()  # the nn.Linear key, so checkpoints load
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        # nn.Module would load the bias and report "weight" as unexpected, which strict=False ignores: the old packed
        # weight with the new bias, silently wrong logits.
        raise RuntimeError(_NO_LOADING)

    def check_cast(self, fn) -> None:
        """Raise if `fn` (what `.to()`, `.half()`... apply to each tensor) would change the packed weight's dtype or
        device: oneDNN's packed tensors cannot be cast (a cryptic error, halfway through the model). Casts that change
        nothing (`.to("cpu")`, `.float()` of a float32 model) pass."""
        probe = fn(torch.empty(0, dtype=self.packed_weight.dtype))
        if probe.dtype != self.packed_weight.dtype or probe.device != self.packed_weight.device:
            raise RuntimeError(
                f"{_FROZEN}cast it before freezing ({self.packed_weight.dtype} on {self.packed_weight.device} now), "
                "or load it again and cast that."
            )

    def _apply(self, fn, recurse=True):
        self.check_cast(fn)
        return super()._apply(fn, recurse)

    def __deepcopy__(self, memo):
        # Packed (mkldnn) tensors cannot be deep-copied; say so, rather than torch's error about MkldnnCPU.
        raise RuntimeError(f"{_FROZEN}deepcopy it before freezing, and freeze the copy.")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embeddings(nn.Module):
    """Patch embeddings (a Conv2d with stride = kernel = patch), the class token and the position embeddings; for a
    hybrid, the patches are cut from the feature map of a ResNet (`hybrid_model`, the identity for a plain ViT)."""

    def __init__(self, config: VisionTransformerConfig):
        super().__init__()
        self.num_channels = config.num_channels
        self.patch_size = _as_pair(config.patch_size)
        self.image_size = _as_pair(config.image_size)
        self.grid_size = config.grid_size
        self.feature_map_size = config.feature_map_size
        self.num_prefix_tokens = 1 if config.classifier == "token" else 0
        num_patches = self.grid_size[0] * self.grid_size[1]

        self.hybrid_model = ResNetV2(config) if config.resnet_num_layers is not None else nn.Identity()
        in_channels = getattr(self.hybrid_model, "out_channels", config.num_channels)
        self.patch_embeddings = nn.Conv2d(
            in_channels, config.hidden_size, kernel_size=self.patch_size, stride=self.patch_size
        )
        # The "gap" classifier averages the patch tokens, so it has no class token (as in vit_jax).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if self.num_prefix_tokens else None
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, num_patches + self.num_prefix_tokens, config.hidden_size)
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def grid_for(self, height: int, width: int, interpolate_pos_encoding: bool) -> tuple[int, int]:
        """The patch grid of an input of `height` x `width`, or a ValueError naming the sizes that don't fit."""
        expected = self.image_size
        if (height, width) == expected:
            return self.grid_size
        if not interpolate_pos_encoding:
            raise ValueError(
                f"Input image size ({height}x{width}) doesn't match the model ({expected[0]}x{expected[1]}): resize "
                "the images, or pass interpolate_pos_encoding=True to resample the position embeddings."
            )
        feature = self.feature_map_size(height, width)  # (height, width) itself for a plain ViT
        if min(feature) <= 0 or feature[0] % self.patch_size[0] or feature[1] % self.patch_size[1]:
            what = "" if feature == (height, width) else f"'s ResNet feature map ({feature[0]}x{feature[1]})"
            raise ValueError(
                f"Input image size ({height}x{width}){what} must be divisible by the patch size "
                f"({self.patch_size[0]}x{self.patch_size[1]}) to interpolate the position embeddings."
            )
        return feature[0] // self.patch_size[0], feature[1] // self.patch_size[1]

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(
                f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}: torch.from_numpy(...), or "
                "the image processor with return_tensors='pt'."
            )
        if not pixel_values.is_floating_point():  # raw 0..255 pixels would be classified, confidently and wrongly
            raise ValueError(
                f"pixel_values are {pixel_values.dtype}: the model takes float images normalised as the image processor "
                "does (to [-1, 1]); pass the images through it (AutoImageProcessor.from_pretrained(folder))."
            )
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must have 4 dimensions (batch, channels, height, width), got shape "
                f"{tuple(pixel_values.shape)}."
            )
        batch_size, num_channels, height, width = pixel_values.shape
        if batch_size == 0:  # transformers' attention functions can't reshape an empty batch
            raise ValueError(f"pixel_values hold no images (shape {tuple(pixel_values.shape)}): pass at least one.")
        if num_channels != self.num_channels:
            raise ValueError(
                f"Expected {self.num_channels} channels in pixel_values but got {num_channels} "
                f"(shape {tuple(pixel_values.shape)}); pixel_values are (batch, channels, height, width)."
            )
        grid = self.grid_for(height, width, interpolate_pos_encoding)

        pixel_values = pixel_values.to(self.patch_embeddings.weight.dtype)
        embeddings = self.patch_embeddings(self.hybrid_model(pixel_values)).flatten(2).transpose(1, 2)  # (B, N, D)
        if self.cls_token is not None:
            embeddings = torch.cat((self.cls_token.expand(batch_size, -1, -1), embeddings), dim=1)  # (B, 1 + N, D)
        position_embeddings = resample_position_embeddings(
            self.position_embeddings, self.grid_size, grid, self.num_prefix_tokens
        )
        return self.dropout(embeddings + position_embeddings)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d)) v, returning the attention probabilities too. Inputs (B, H, S, d)."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, S, S)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    # Softmax accumulates half and bfloat16 inputs in float32 inside the kernel: an explicit upcast would only add two
    # copies of the (B, H, S, S) scores (and doubled their time in bf16 on CPU).
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2)  # (B, S, H, d)
    return attn_output, attn_weights


class Attention(nn.Module):
    """Multi-head self-attention with separate query, key, value and output projections."""

    def __init__(self, config: VisionTransformerConfig):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.attention_dropout = config.attention_probs_dropout_prob

        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        # The original applies the block's dropout rate here; the seed repo uses the attention rate instead.
        self.proj_dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = linear(self.query, hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, S, d)
        key = linear(self.key, hidden_states).view(hidden_shape).transpose(1, 2)
        value = linear(self.value, hidden_states).view(hidden_shape).transpose(1, 2)

        # Fused kernels (sdpa, flash, flex) return no probabilities: compute them when they are asked for.
        attention_interface: Callable = eager_attention_forward
        if not kwargs.get("output_attentions"):  # (this call is also what lets `set_attn_implementation` work)
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = linear(self.out, attn_output.reshape(*input_shape, -1))
        return self.proj_dropout(attn_output), attn_weights


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (vit_jax MlpBlock)."""

    def __init__(self, config: VisionTransformerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act_fn = ACT2FN[config.hidden_act]
        self.act_post_op = _ONEDNN_ACTIVATIONS.get(config.hidden_act)  # None: oneDNN cannot fuse this activation
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(linear(self.fc1, hidden_states, self.act_fn, self.act_post_op))
        return self.dropout(linear(self.fc2, hidden_states))


class Block(GradientCheckpointingLayer):
    """Pre-LayerNorm encoder block: x + Attention(LN(x)), then x + Mlp(LN(x))."""

    def __init__(self, config: VisionTransformerConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = Mlp(config)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        attention_output, _ = self.attn(self.attention_norm(hidden_states), **kwargs)
        hidden_states = hidden_states + attention_output
        return hidden_states + self.ffn(self.ffn_norm(hidden_states))


class Encoder(nn.Module):
    """`num_hidden_layers` blocks, then the final LayerNorm."""

    def __init__(self, config: VisionTransformerConfig):
        super().__init__()
        self.layer = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        for block in self.layer:
            hidden_states = block(hidden_states, **kwargs)
        return self.encoder_norm(hidden_states)


def image_processor_for(config: VisionTransformerConfig) -> ViTImageProcessorPil:
    """The preprocessing of the original models: RGB, resize to `image_size`, scale to [-1, 1]."""
    height, width = _as_pair(config.image_size)
    return ViTImageProcessorPil(
        size={"height": height, "width": width},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )


class VisionTransformerPreTrainedModel(PreTrainedModel):
    config_class = VisionTransformerConfig
    config: VisionTransformerConfig
    base_model_prefix = "transformer"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Embeddings", "Block"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": Block, "attentions": Attention}

    def _init_weights(self, module: nn.Module) -> None:
        """Fresh weights: truncated normal projections, zero biases, unit LayerNorms, zero class token and head; a
        ResNet unit's last GroupNorm starts at zero, as in vit_jax (each unit starts as its residual)."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if module is getattr(self, "head", None) and isinstance(module, nn.Linear):
            # vit_jax initialises the head to zero, and so does the paper's fine-tuning.
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Embeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            if module.cls_token is not None:
                init.zeros_(module.cls_token)
            # After its children (the GroupNorms got unit scales). Not on the units themselves: modules without
            # parameters of their own are skipped for remote code.
            for unit in module.hybrid_model.modules():
                if isinstance(unit, PreActBottleneck):
                    init.zeros_(unit.gn3.weight)

    def freeze_for_cpu_inference(self) -> "VisionTransformerPreTrainedModel":
        r"""
        Pre-pack every `nn.Linear` weight for oneDNN, in place, for CPU inference: the same logits, faster.

        The plain forward already runs each Linear as one oneDNN call, but oneDNN then reorders the weight into its
        blocked layout on every call; a frozen model keeps only the reordered copy (about the same memory, no second
        copy to go stale). Measured on a Zen 4 (AVX512-BF16, no AMX): ViT-B/16's linears 6-10 % faster in bf16, 3-5 %
        in fp32, as fast as OpenVINO's (benchmarks/RESULTS.md); +15 % at bf16 batch 1 on an AMX Xeon. It serves every
        CPU oneDNN runs the dtype on: fp32 anywhere (AVX2, AVX-512, AMX), bf16 with AVX512-BF16 or AMX.

        Afterwards the model is inference only: a forward with gradients, in another dtype or on a GPU raises;
        `state_dict()` and `save_pretrained` still give the plain weights; loading weights into it, casting it to another
        dtype or device and `copy.deepcopy` raise (load, cast or copy the model before freezing it). Call it after
        `.to(dtype)` and `.eval()`.

        Example:

        ```python
        >>> import torch
        >>> from hf_vit import VisionTransformerConfig, VisionTransformerForImageClassification
        >>> config = VisionTransformerConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
        ...                                  num_attention_heads=4, intermediate_size=37, num_labels=10)
        >>> model = VisionTransformerForImageClassification(config).eval().freeze_for_cpu_inference()
        >>> with torch.inference_mode():
        ...     model(torch.randn(2, 3, 32, 32)).logits.shape
        torch.Size([2, 10])
        ```
        """
        dtype, device = self.dtype, self.device
        if _ONEDNN_LINEAR is None or device.type != "cpu" or dtype not in _ONEDNN_DTYPES:
            dtypes = " or ".join(map(str, _ONEDNN_DTYPES))
            no_onednn = "" if _ONEDNN_LINEAR else " and torch has no oneDNN"
            raise ValueError(
                f"freeze_for_cpu_inference packs weights for oneDNN on CPU, in {dtypes} on this machine; the model is "
                f"{dtype} on {device}{no_onednn}."
            )
        for module in list(self.modules()):
            for name, child in module.named_children():
                # Only plain, unhooked Linears: LoRA or quantized subclasses and hooked layers keep their forward.
                if type(child) is nn.Linear and not (child._forward_hooks or child._forward_pre_hooks):
                    setattr(module, name, FrozenLinear(child))
        return self.eval()

    def _apply(self, fn, recurse=True):
        # Check every FrozenLinear before casting anything: nn.Module casts children in order, so one refused deep in
        # the model would leave the modules before it cast.
        if recurse:
            for module in self.modules():
                if type(module) is FrozenLinear:
                    module.check_cast(fn)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        # Runs before the children load: refuse here, so the modules before the first FrozenLinear keep their weights.
        if any(type(module) is FrozenLinear for module in self.modules()):
            raise RuntimeError(_NO_LOADING)
        super()._load_from_state_dict(*args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Save as transformers does, plus the `preprocessor_config.json` the image-classification pipeline reads."""
        if kwargs.get("is_main_process", True):
            image_processor_for(self.config).save_pretrained(save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)


class VisionTransformerModel(VisionTransformerPreTrainedModel):
    """The seed's `Transformer`: embeddings and encoder, returning the tokens and the pooled token."""

    def __init__(self, config: VisionTransformerConfig):
        super().__init__(config)
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values: `(batch, channels, height, width)`, normalised as the image processor does.
            interpolate_pos_encoding: resample the position embeddings to another resolution (any height and width
                divisible by the patch size).
            output_attentions / output_hidden_states: return the attention probabilities of every layer (also with
                sdpa, by computing them explicitly) / the input of every block and the output of the last one.

        Returns a `BaseModelOutputWithPooling`: `last_hidden_state` after `encoder_norm`, `pooler_output` the class
        token (classifier="token") or the mean of the patch tokens (classifier="gap").
        """
        kwargs.setdefault("output_attentions", self.config.output_attentions)
        embedding_output = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        sequence_output = self.encoder(embedding_output, **kwargs)  # (B, S, D)
        if self.config.classifier == "token":
            pooled_output = sequence_output[:, 0]
        else:
            pooled_output = sequence_output.mean(dim=1)
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled_output)


class VisionTransformerForImageClassification(VisionTransformerPreTrainedModel):
    """The seed's `VisionTransformer`: the base model under `transformer`, optional `pre_logits`, then `head`."""

    def __init__(self, config: VisionTransformerConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = VisionTransformerModel(config)
        representation_size = config.representation_size
        self.pre_logits = nn.Linear(config.hidden_size, representation_size) if representation_size else nn.Identity()
        self.pre_logits_act = nn.Tanh() if representation_size else nn.Identity()
        head_in = representation_size or config.hidden_size
        self.head = nn.Linear(head_in, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> ImageClassifierOutput:
        r"""
        Args:
            pixel_values: `(batch, channels, height, width)`, normalised as the image processor does.
            labels: class indices `(batch,)` for single-label classification, multi-hot floats `(batch, num_labels)`
                for multi-label, or floats for regression (`config.problem_type`, inferred as transformers does).
            interpolate_pos_encoding, output_attentions, output_hidden_states: as in `VisionTransformerModel`.

        Example:

        ```python
        >>> import torch
        >>> from hf_vit import VisionTransformerConfig, VisionTransformerForImageClassification
        >>> config = VisionTransformerConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
        ...                                  num_attention_heads=4, intermediate_size=37, num_labels=10)
        >>> model = VisionTransformerForImageClassification(config)
        >>> model(torch.randn(2, 3, 32, 32), labels=torch.tensor([3, 7])).logits.shape
        torch.Size([2, 10])
        ```
        """
        outputs = self.transformer(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        logits = self.head(self.pre_logits_act(self.pre_logits(outputs.pooler_output)))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "FrozenLinear",
    "VisionTransformerPreTrainedModel",
    "VisionTransformerModel",
    "VisionTransformerForImageClassification",
    "image_processor_for",
    "resample_position_embeddings",
]
