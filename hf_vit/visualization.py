"""Attention maps of a Vision Transformer: attention rollout (Abnar & Zuidema, 2020) and the last layer's attention.

Rollout follows the seed repo's `visualize_attention_map.ipynb` (jeonsworld/ViT-pytorch): per layer, fuse the heads,
add the identity for the residual connection, renormalise the rows and multiply through the layers; the map is the
class token's row over the patches. `head_fusion` and `discard_ratio` are the options of jacobgil/vit-explain.

Only NumPy and PyTorch are needed; `plot_attention` imports matplotlib when it is called.
"""

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .configuration_hf_vit import _as_pair


HEAD_FUSIONS = ("mean", "max", "min")
METHODS = ("rollout", "last_layer")

# Figure of `plot_attention`: three square panels over a caption of up to five lines, in inches at FIGURE_DPI.
PANEL_INCHES = 3.0
CAPTION_INCHES = 1.1
FIGURE_DPI = 100


def _check_options(head_fusion: str, discard_ratio: float) -> None:
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}.")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}.")


def _stack(attentions: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """(layers, batch, heads, S, S) in float32 on the CPU, from a model's `outputs.attentions`."""
    if attentions is None or len(attentions) == 0 or any(layer is None for layer in attentions):
        raise ValueError(
            "No attention probabilities: run the model with output_attentions=True (hf_vit returns them with sdpa "
            "too; other models may need attn_implementation='eager')."
        )
    stacked = torch.stack([torch.as_tensor(layer) for layer in attentions]).detach().float().cpu()
    if stacked.ndim != 5 or stacked.shape[-1] != stacked.shape[-2]:
        raise ValueError(
            f"Expected one (batch, heads, tokens, tokens) tensor per layer, got shape {tuple(stacked.shape[1:])}."
        )
    return stacked


def _layout(num_tokens: int, grid_size: tuple[int, int] | None) -> tuple[tuple[int, int], int]:
    """The patch grid and the number of prefix tokens (class token...) of a sequence of `num_tokens`."""
    if grid_size is None:
        # A square grid, with a class token when that fits (S = 1 + n^2), else without (classifier="gap").
        for prefix in (1, 0):
            side = int(round((num_tokens - prefix) ** 0.5))
            if side > 0 and side * side == num_tokens - prefix:
                return (side, side), prefix
        raise ValueError(f"{num_tokens} tokens do not form a square grid of patches: pass grid_size=(rows, columns).")
    rows, columns = int(grid_size[0]), int(grid_size[1])
    prefix = num_tokens - rows * columns
    if prefix < 0:
        raise ValueError(f"grid_size {rows}x{columns} has more patches than the {num_tokens} tokens of the attention.")
    return (rows, columns), prefix


def fuse_heads(
    attention: torch.Tensor, *, head_fusion: str = "mean", discard_ratio: float = 0.0, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """
    One layer's attention (batch, heads, S, S) fused over the heads to (batch, S, S).

    With `discard_ratio` > 0 the lowest that fraction of the fused weights is set to zero, except the columns of
    the prefix tokens (the attention *to* the class token), which are always kept.
    """
    _check_options(head_fusion, discard_ratio)
    fused = {"mean": torch.mean, "max": torch.amax, "min": torch.amin}[head_fusion](attention, dim=1)  # (B, S, S)
    if discard_ratio == 0.0:
        return fused
    batch_size, num_tokens, _ = fused.shape
    protected = torch.zeros(num_tokens, num_tokens, dtype=torch.bool)
    protected[:, :num_prefix_tokens] = True
    num_discarded = int((num_tokens * num_tokens - int(protected.sum())) * discard_ratio)
    ranking = fused.masked_fill(protected, float("inf")).reshape(batch_size, -1)
    lowest = ranking.topk(num_discarded, dim=-1, largest=False).indices
    return fused.reshape(batch_size, -1).scatter(-1, lowest, 0.0).reshape(fused.shape)


def rollout_matrices(
    attentions: Sequence[torch.Tensor] | torch.Tensor,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """
    The rolled-out attention after each layer, (layers, batch, S, S); every matrix is row-stochastic.

    Layer l contributes A_l = rownorm(fuse_heads(attention_l) + I), and the result after layer l is A_l @ ... @ A_1.
    """
    stacked = _stack(attentions)
    identity = torch.eye(stacked.shape[-1])
    joint, result = None, []
    for attention in stacked:
        fused = fuse_heads(
            attention, head_fusion=head_fusion, discard_ratio=discard_ratio, num_prefix_tokens=num_prefix_tokens
        )
        augmented = fused + identity  # the residual connection carries the token itself
        augmented = augmented / augmented.sum(dim=-1, keepdim=True)
        joint = augmented if joint is None else augmented @ joint
        result.append(joint)
    return torch.stack(result)


def _read_out(matrix: torch.Tensor, grid: tuple[int, int], prefix: int) -> np.ndarray:
    """(batch, S, S) -> (batch, rows, columns): the class token's row over the patches, or without a class token
    (classifier="gap", whose output is the mean of the patch tokens) the mean of the patch rows."""
    patches = matrix[:, 0, prefix:] if prefix else matrix[:, prefix:, prefix:].mean(dim=1)
    return patches.reshape(-1, *grid).numpy()


def attention_rollout(
    attentions: Sequence[torch.Tensor] | torch.Tensor,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    grid_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """
    Attention rollout of a model's `outputs.attentions`, as a (batch, rows, columns) array of non-negative weights.

    Args:
        attentions: one (batch, heads, S, S) tensor per layer, from `model(..., output_attentions=True)`.
        head_fusion: how the heads of a layer are combined: `"mean"` (the seed's notebook), `"max"` or `"min"`.
        discard_ratio: fraction of the lowest fused weights set to zero in each layer, in [0, 1); the attention to
            the class token is never discarded.
        grid_size: (rows, columns) of patches. Without it the grid is taken to be square, with a class token when
            S - 1 is a square, else without one: pass it for any other input size. The tokens before the patches
            (the class token) are S - rows * columns.

    Returns the class token's row of the rolled-out attention over the patches (without a class token, the mean of
    the patch rows). The values are a share of the class token's attention: divide by `.max()` to display them.

    Example:

    ```python
    >>> import torch
    >>> from hf_vit.visualization import attention_rollout
    >>> attentions = [torch.softmax(torch.randn(1, 4, 17, 17), dim=-1) for _ in range(2)]  # 2 layers, 4x4 patches
    >>> attention_rollout(attentions, discard_ratio=0.5).shape
    (1, 4, 4)
    ```
    """
    stacked = _stack(attentions)
    grid, prefix = _layout(stacked.shape[-1], grid_size)
    joint = rollout_matrices(stacked, head_fusion=head_fusion, discard_ratio=discard_ratio, num_prefix_tokens=prefix)
    return _read_out(joint[-1], grid, prefix)


def last_layer_attention(
    attentions: Sequence[torch.Tensor] | torch.Tensor,
    *,
    head_fusion: str = "mean",
    grid_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """The last layer's attention of the class token over the patches, fused over the heads: (batch, rows, columns).

    Arguments as in `attention_rollout`; without a class token the mean of the patch rows."""
    stacked = _stack(attentions)
    grid, prefix = _layout(stacked.shape[-1], grid_size)
    return _read_out(fuse_heads(stacked[-1], head_fusion=head_fusion, num_prefix_tokens=prefix), grid, prefix)


def pixel_values_for(
    model: torch.nn.Module,
    image: Image.Image,
    *,
    image_processor=None,
    image_size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """The (1, 3, H, W) input of `model` for a PIL image: `image_processor` (default: `image_processor_for(config)`),
    resizing to `image_size` (height, width) instead of the processor's size when given."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a PIL.Image.Image, got {type(image).__name__}.")
    if image_processor is None:
        from .modeling_hf_vit import image_processor_for

        image_processor = image_processor_for(model.config)
    size = {}
    if image_size is not None:
        height, width = _as_pair(image_size)  # an int is a square
        if min(height, width) < 1:
            raise ValueError(f"image_size must be positive (height, width), got {image_size}.")
        size = {"size": {"height": height, "width": width}}
    return image_processor(image.convert("RGB"), return_tensors="pt", **size)["pixel_values"]


def map_from_attentions(
    attentions: Sequence[torch.Tensor] | torch.Tensor,
    *,
    grid_size: tuple[int, int],
    method: str = "rollout",
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> np.ndarray:
    """`attention_rollout` or `last_layer_attention` by name (`method`), (batch, rows, columns)."""
    if method == "rollout":
        return attention_rollout(attentions, head_fusion=head_fusion, discard_ratio=discard_ratio, grid_size=grid_size)
    if method == "last_layer":
        _check_options(head_fusion, discard_ratio)
        if discard_ratio:
            raise ValueError(f"discard_ratio applies to method='rollout' only, got {discard_ratio} with 'last_layer'.")
        return last_layer_attention(attentions, head_fusion=head_fusion, grid_size=grid_size)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")


def grid_of(model: torch.nn.Module, pixel_values: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of patches the model makes of `pixel_values`: of the ResNet's feature map for a hybrid."""
    config = model.config
    size = (pixel_values.shape[-2], pixel_values.shape[-1])
    if hasattr(config, "feature_map_size"):  # hf_vit's config, also when loaded as remote code
        size = config.feature_map_size(*size)
    patch = _as_pair(config.patch_size)
    return size[0] // patch[0], size[1] // patch[1]


@torch.no_grad()
def attention_map(
    model: torch.nn.Module,
    image: Image.Image,
    *,
    method: str = "rollout",
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    image_processor=None,
    image_size: int | tuple[int, int] | None = None,
) -> np.ndarray:
    """
    Where `model` looks in `image`: a (rows, columns) array over the patch grid, non-negative.

    Args:
        model: an hf_vit model (`VisionTransformerForImageClassification` or `VisionTransformerModel`), or any
            model whose forward takes `output_attentions` and `interpolate_pos_encoding`.
        image: a PIL image, converted to RGB.
        method: `"rollout"` (attention rollout through all layers) or `"last_layer"` (the class token's attention
            in the last layer).
        head_fusion, discard_ratio: as in `attention_rollout`.
        image_processor: the preprocessing; default `hf_vit.image_processor_for(model.config)`, or pass
            `AutoImageProcessor.from_pretrained(folder)` for a saved model.
        image_size: (height, width), or one int for a square, to run the model at instead of the processor's size:
            any multiple of the patch size (for a hybrid: any size whose ResNet feature map is one); the position
            embeddings are interpolated.

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_vit import VisionTransformerConfig, VisionTransformerForImageClassification
    >>> from hf_vit.visualization import attention_map
    >>> config = VisionTransformerConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
    ...                                  num_attention_heads=4, intermediate_size=37, num_labels=10)
    >>> model = VisionTransformerForImageClassification(config).eval()
    >>> attention_map(model, Image.new("RGB", (64, 48)), image_size=(48, 64)).shape
    (6, 8)
    ```
    """
    pixel_values = pixel_values_for(model, image, image_processor=image_processor, image_size=image_size)
    pixel_values = pixel_values.to(next(model.parameters()).device)
    outputs = model(pixel_values, output_attentions=True, interpolate_pos_encoding=True)
    return map_from_attentions(
        outputs.attentions,
        grid_size=grid_of(model, pixel_values),
        method=method,
        head_fusion=head_fusion,
        discard_ratio=discard_ratio,
    )[0]


def upsample(attention: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (rows, columns) map resized bilinearly to `size` (height, width) and scaled to [0, 1]."""
    grid = torch.as_tensor(attention, dtype=torch.float32)[None, None]
    resized = torch.nn.functional.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
    resized = resized - resized.min()
    return (resized / resized.max() if resized.max() > 0 else resized).numpy()


def plot_attention(
    image: Image.Image,
    attention: np.ndarray,
    *,
    title: str = "attention",
    caption: str = "",
    colormap: str = "jet",
):
    """
    A matplotlib `Figure` with the image, the map and their overlay side by side, `caption` (up to five lines)
    underneath; save it with `figure.savefig(path)`. Its size is fixed (see PANEL_INCHES, CAPTION_INCHES, FIGURE_DPI).
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    heat = colormaps[colormap](upsample(attention, rgb.shape[:2]))[..., :3]
    height = PANEL_INCHES + CAPTION_INCHES
    figure = Figure(figsize=(3 * PANEL_INCHES, height), dpi=FIGURE_DPI)
    panels = [
        (rgb, f"image {rgb.shape[1]}x{rgb.shape[0]}", {}),
        (attention, f"{title} ({attention.shape[0]}x{attention.shape[1]} patches)", {"cmap": colormap}),
        (0.5 * rgb + 0.5 * heat, "overlay", {}),
    ]
    for index, (picture, name, options) in enumerate(panels):
        axes = figure.add_axes((index / 3 + 0.01, CAPTION_INCHES / height, 1 / 3 - 0.02, 0.9 * PANEL_INCHES / height))
        extent = (0, rgb.shape[1], rgb.shape[0], 0)  # the map covers the image whatever its grid
        axes.imshow(np.clip(picture, 0, None), extent=extent, interpolation="nearest", **options)
        axes.set_title(name, fontsize=9)
        axes.set_axis_off()
    figure.text(
        0.5,
        (CAPTION_INCHES - 0.05) / height,
        caption,
        ha="center",
        va="top",
        multialignment="left",
        fontsize=9,
        family="monospace",
    )
    return figure


__all__ = [
    "attention_map",
    "attention_rollout",
    "fuse_heads",
    "grid_of",
    "last_layer_attention",
    "map_from_attentions",
    "pixel_values_for",
    "plot_attention",
    "rollout_matrices",
    "upsample",
]
