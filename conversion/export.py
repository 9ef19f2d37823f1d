"""`export_npz()`: an hf_vit folder -> a vit_jax or big_vision `.npz`, verified before it is put in place.

The conversion read backwards, one function per step: check OUTPUT -> read the folder's config (refusing what no
original layout computes) -> load the weights strictly (float64: exact) -> the architecture from the config -> each
checkpoint key from its hf_vit tensor through the inverse of its rule's transform (`conversion.keys.unconvert`, the
family's own table) -> write a temporary file beside OUTPUT -> read it back with the converter's reader, detect it as
the converter would, and run the NumPy reference of the Flax model on it: it must give the PyTorch model's logits in
float64 (`hf_vit.verification`) -> rename into place. A failure leaves nothing behind.
"""

import json
import os
from pathlib import Path

import numpy as np

from .checkpoint import Architecture, Checkpoint, one_line
from .errors import ConversionError
from .families import Family, big_vision, find_family, hybrid, vit_jax
from .keys import unconvert
from .output_folder import fresh_partial
from .reference import flax_vit_forward


LAYOUTS = {"vit_jax": vit_jax.FAMILY, "big_vision": big_vision.FAMILY}
EXPORT_DTYPES = ("float32", "float16")  # what NumPy stores and JAX reads as is (NumPy has no bfloat16)
GELUS = {"gelu_pytorch_tanh": "tanh", "gelu": "exact"}  # hidden_act -> the reference's GELU
CLS, POSEMB = "transformer.embeddings.cls_token", "transformer.embeddings.position_embeddings"


def export_npz(
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    layout: str = "vit_jax",
    dtype: str = "float32",
    overwrite: bool = False,
    verify_images: int = 2,
    log=print,
) -> Path:
    """
    Write an hf_vit folder as an original `.npz`: the file `vit_jax.checkpoint.load` or big_vision's loader reads.

    Args:
        model_dir: a folder saved by `hf-vit-convert`, hf_vit's fine-tuning or `save_pretrained` (any resolution,
            "token" or "gap", pre_logits, a fine-tuned head, an R+ViT hybrid of vit_jax's numerics).
        output: the `.npz` file to write; its folder must exist; an existing file only with `overwrite`.
        layout: `"vit_jax"` (2020 names, position embeddings with the class token's row, hybrids' GroupNorms
            (1, 1, 1, C) as in the official files) or `"big_vision"` (`params/` prefix, Linen names, `pos_embedding`
            added before the class token: the class token's row is added to `cls`, which computes the same).
        dtype: `"float32"` (as Google's files) or `"float16"`.
        verify_images: how many random inputs the float64 check uses.
        log: where progress lines go (`None` for silence).

    A feature extractor (no head) gets an empty head, kernel (K, 0): vit_jax's `load_pretrained` replaces the head
    and needs the key, and `hf-vit-convert` reads a head without classes as a feature extractor again.

    Returns the path written. Raises `ConversionError` with a one-line message on bad input.

    Example:

    ```python
    >>> import tempfile
    >>> from conversion import convert, export_npz
    >>> from conversion.testing import write_random_npz
    >>> work = tempfile.mkdtemp()
    >>> folder = convert(write_random_npz(f"{work}/tiny.npz"), f"{work}/tiny-hf", log=None)
    >>> export_npz(folder, f"{work}/back.npz", log=None).name
    'back.npz'
    ```
    """
    import torch

    from hf_vit.verification import MAPPING_TOLERANCE, VerificationError, check_mapping

    say = log or (lambda line: None)
    if layout not in LAYOUTS:
        raise ConversionError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}.")
    if dtype not in EXPORT_DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}.")
    if isinstance(verify_images, bool) or not isinstance(verify_images, int) or verify_images < 1:
        raise ConversionError(f"verify_images must be a positive integer, got {verify_images!r}.")
    output = Path(output).expanduser().absolute()
    check_output_file(output, overwrite)
    model_dir = Path(model_dir).expanduser()
    config = read_config(model_dir)
    arch = architecture_of(config)
    if arch.stem and layout == "big_vision":
        raise ConversionError(
            f"{model_dir} is an R+ViT hybrid, and big_vision's ViT has no ResNet stem: export it in the vit_jax layout "
            "(the default)."
        )
    family = hybrid.FAMILY if arch.stem else LAYOUTS[layout]
    say(f"{model_dir}: {arch.describe()}")
    model = load_model(model_dir)
    with torch.no_grad():  # the weights as they will be written (float16: rounded once, here)
        for tensor in model.state_dict().values():
            tensor.copy_(tensor.to(getattr(torch, dtype)))
    arrays = npz_arrays(model, arch, layout, dtype)
    temporary = write_temporary(output, arrays)
    try:
        difference, gelu_difference = verify_export(temporary, family, model, arch, config, verify_images)
        say(
            f"verification: the NumPy Flax reference run on the written arrays gives the PyTorch model's logits to "
            f"{difference:.1e} of their scale in float64 (tolerance {MAPPING_TOLERANCE:.0e})"
        )
        try:
            check_mapping(difference, f"The {layout} .npz")
        except VerificationError as error:
            raise ConversionError(f"Verification failed: {error}") from None
        if gelu_difference is not None:
            say(
                "note: this model uses exact GELU (hidden_act 'gelu', as the seed repo); vit_jax and big_vision compute "
                f"the tanh approximation, which moves its logits by {gelu_difference:.1e} of their scale"
            )
        if output.exists() and not overwrite:  # appeared while exporting
            raise ConversionError(f"OUTPUT {output} exists: pass --overwrite to replace it.")
        os.replace(temporary, output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    say(f"wrote {output}: {len(arrays)} arrays in the {family.name.removesuffix(' .npz')} layout, {dtype}")
    return output


# --- checks before anything is read ---------------------------------------------------------------------------------


def check_output_file(output: Path, overwrite: bool) -> None:
    """OUTPUT can be written (or replaced); touches nothing."""
    if output.is_dir():
        raise ConversionError(f"OUTPUT {output} is a directory: pass a file name such as {output / 'model.npz'}.")
    if output.exists() and not overwrite:
        raise ConversionError(f"OUTPUT {output} exists: pass --overwrite to replace it.")
    if not output.parent.is_dir():
        raise ConversionError(f"Cannot write OUTPUT {output}: the folder {output.parent} does not exist.")
    if not os.access(output.parent, os.W_OK | os.X_OK):
        raise ConversionError(f"Cannot write OUTPUT {output}: {output.parent} is not writable.")


def read_config(model_dir: Path):
    """The folder's `VisionTransformerConfig`, refusing what the original Flax models do not compute."""
    from hf_vit import VisionTransformerConfig

    if not model_dir.is_dir():
        raise ConversionError(f"MODEL_DIR {model_dir} is not a folder: pass an hf_vit model folder.")
    file = model_dir / "config.json"
    try:
        fields = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{model_dir} has no config.json: it is not a Hugging Face model folder.") from None
    except (OSError, ValueError) as error:
        raise ConversionError(f"{file} is not readable JSON ({one_line(error)}).") from None
    found = fields.get("model_type") if isinstance(fields, dict) else None
    if found != "hf_vit":
        hint = (
            " (stock transformers ViT: convert the original checkpoint with hf-vit-convert)" if found == "vit" else ""
        )
        raise ConversionError(
            f"{model_dir} is not an hf_vit model: its config.json has model_type {found!r}, expected 'hf_vit'{hint}."
        )
    try:
        config = VisionTransformerConfig.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as error:
        raise ConversionError(f"{file}: {one_line(error)}") from None
    if config.resnet_num_layers is not None and config.resnet_flavour == "seed":
        raise ConversionError(
            f"{model_dir} is a seed-repo hybrid (resnet_flavour 'seed'): its ResNet computes with the seed's "
            "numerics (symmetric padding, an unpadded max-pool, another weight standardisation and gn_proj), which "
            "vit_jax's ResNet does not, so no .npz gives its logits; it has no vit_jax equivalent to export."
        )
    if config.hidden_act not in GELUS:
        raise ConversionError(
            f"{model_dir} uses hidden_act {config.hidden_act!r}; the original models compute GELU (tanh approximation, "
            "'gelu_pytorch_tanh'), which only a model with that or exact 'gelu' approximates."
        )
    if config.layer_norm_eps != 1e-6:
        raise ConversionError(
            f"{model_dir} has layer_norm_eps {config.layer_norm_eps}; Flax's LayerNorm, which reads the .npz, uses "
            "1e-6, so its logits would differ."
        )
    if not config.qkv_bias:
        raise ConversionError(f"{model_dir} has no query/key/value biases (qkv_bias false); the original models do.")
    return config


def architecture_of(config) -> Architecture:
    """What the folder's config says, as the detectors would read it off the checkpoint's tensors."""
    from hf_vit.configuration_hf_vit import _as_pair

    stem, stride, stem_channels, extra = "", 1, None, ()
    if config.resnet_num_layers is not None:
        layers, width = tuple(config.resnet_num_layers), round(64 * config.resnet_width_factor)
        stride, stem_channels = hybrid.resnet_geometry(layers, width)
        stem = hybrid.stem_description(layers, width)
        extra = (("resnet_num_layers", layers), ("resnet_width_factor", config.resnet_width_factor))
    return Architecture(
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_dim=config.intermediate_size,
        patch_size=_as_pair(config.patch_size),
        num_channels=config.num_channels,
        grid=tuple(config.grid_size),
        num_classes=config.num_labels,
        classifier=config.classifier,
        representation_size=config.representation_size,
        stem=stem,
        stem_stride=stride,
        stem_channels=stem_channels,
        extra_config=extra,
    )


def load_model(model_dir: Path):
    """The folder's classifier in float64 (upcasting the saved weights is exact), loaded strictly."""
    import torch

    from hf_vit import VisionTransformerForImageClassification

    from .converter import quiet_progress_bars

    try:
        with quiet_progress_bars():
            model, info = VisionTransformerForImageClassification.from_pretrained(
                model_dir, dtype=torch.float64, output_loading_info=True
            )
    except (OSError, ValueError, RuntimeError) as error:
        raise ConversionError(f"Cannot load the weights of {model_dir} ({one_line(error)}).") from None
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ConversionError(f"{model_dir} does not load strictly as an hf_vit classifier: {problems}.")
    return model.eval()


# --- the arrays -----------------------------------------------------------------------------------------------------


def fold_class_position(state: dict[str, np.ndarray]) -> None:
    """
    big_vision adds `pos_embedding` to the patch tokens only, before it prepends the class token: the class token's
    position-embedding row goes into `cls` itself (cls + row, then a zero row), which computes the same tokens.
    """
    state[CLS] = state[CLS] + state[POSEMB][:, :1]
    state[POSEMB] = np.concatenate([np.zeros_like(state[POSEMB][:, :1]), state[POSEMB][:, 1:]], axis=1)


def npz_arrays(model, arch: Architecture, layout: str, dtype: str) -> dict[str, np.ndarray]:
    """The checkpoint's arrays by their keys in `layout`, from the model's tensors, in `dtype`."""
    state = {key: tensor.numpy().astype(np.float32) for key, tensor in model.state_dict().items()}
    if "head.weight" not in state:  # a feature extractor: the empty head (0 classes), see export_npz
        head_in = arch.representation_size or arch.hidden_size
        state["head.weight"], state["head.bias"] = np.zeros((0, head_in), np.float32), np.zeros((0,), np.float32)
    if layout == "big_vision" and arch.classifier == "token":
        fold_class_position(state)
    table = LAYOUTS[layout].table
    if arch.stem:  # the official hybrid files' GroupNorms are (1, 1, 1, C); vit_jax's loader squeezes them
        table = hybrid.stem_table(arch, legacy_group_norms=True) + table
    arrays = unconvert(state, table, arch)
    arrays = {key: array.astype(dtype) for key, array in arrays.items()}
    if dtype == "float16":
        for key, array in arrays.items():
            if not np.isfinite(array).all():
                raise ConversionError(
                    f"{key!r} has values beyond float16's range (65504): export float32 instead; nothing was written."
                )
    prefix = "params/" if layout == "big_vision" else ""  # big_vision's own files; its loader reads either
    return {prefix + key: array for key, array in arrays.items()}


def write_temporary(output: Path, arrays: dict[str, np.ndarray]) -> Path:
    """The `.npz` in a new file beside OUTPUT (same file system, so the final rename is atomic)."""
    temporary = fresh_partial(output)
    try:
        with open(temporary, "xb") as file:
            np.savez(file, **arrays)  # a file object: np.savez would append ".npz" to a name without it
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ConversionError(f"Writing {output} failed: {error.strerror or error}; nothing was written.") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


# --- verification -------------------------------------------------------------------------------------------------


def verify_export(path: Path, family: Family, model, arch: Architecture, config, num_images: int):
    """
    Read `path` back as `hf-vit-convert` would (its reader, its family detection, its detector) and run the NumPy
    reference of the Flax model on it against `model` (float64, holding the written values): (the largest relative
    difference of the logits and head input, and for an exact-GELU model what the tanh GELU of the originals changes).
    """
    import torch

    from hf_vit.verification import largest_difference, model_outputs, verification_images

    checkpoint = Checkpoint(path)
    try:
        found = find_family(checkpoint)
        if found is not family:  # the table and the family's detector disagree: a bug, not bad input
            raise AssertionError(f"the exported file reads as a {found.name}, not a {family.name}")
        detected = family.detect(checkpoint, arch.image_size, None)
        images = verification_images(num_images, *arch.image_size, channels=arch.num_channels)
        outputs = model_outputs(model, images, torch.float64)
        inputs = (
            images if family.reference_stem is None else family.reference_stem(checkpoint, detected, images, "float32")
        )

        def reference(gelu):
            features, logits = flax_vit_forward(
                family.reference_params(checkpoint, detected),
                detected,
                inputs,
                gelu=gelu,
                new_head_classes=0 if detected.num_classes == 0 else None,
            )
            return {"logits": logits, "head input": features}

        gelu = GELUS[config.hidden_act]
        difference = largest_difference(outputs, reference(gelu))
        gelu_difference = None if gelu == "tanh" else largest_difference(outputs, reference("tanh"))
        return difference, gelu_difference
    finally:
        checkpoint.close()


__all__ = ["EXPORT_DTYPES", "LAYOUTS", "architecture_of", "export_npz", "fold_class_position"]
