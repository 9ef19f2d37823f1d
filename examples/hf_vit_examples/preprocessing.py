"""The evaluation preprocessings: the model folder's own image processor, or one of the original recipes; each is a
function from RGB PIL images to normalised `pixel_values` (B, 3, H, W), run on the loader's workers.

- `processor` (default): the image processor saved with the model (`AutoImageProcessor.from_pretrained(folder)`),
  called exactly as `pipeline("image-classification")` calls it; for hf_vit folders (and transformers' ViT ones) a
  resize of the whole image to the model's size with PIL's bilinear filter, antialiased when it shrinks.
- `vit_jax`: vit_jax's evaluation pipeline (`input_pipeline.py`: `tf.image.resize(im, [size, size])`, then
  `(im - 127.5) / 127.5`): bilinear with half-pixel centres and no antialiasing, on the float image, no crop;
  `torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False, antialias=False)` computes the same.
- `crop`: timm's evaluation transform (`transforms_imagenet_eval`): the shorter side resized to
  `floor(size / crop_pct)` with PIL's bicubic filter, then the central `size` crop (torchvision's `Resize` and
  `CenterCrop` rounding); `--crop_pct` 0.875 by default (timm's ViT configs use 0.9 at 224 px and 1.0 at 384 px).

All three normalise with the image processor's mean and standard deviation (0.5 for every hf_vit folder: the [-1, 1]
range of the original models), so they differ only in how the pixels are resampled and cropped.
"""

import math

import numpy as np
import PIL.Image
import torch

from .cli import UsageError


PREPROCESSING = ("processor", "vit_jax", "crop")


def add_preprocessing_arguments(group) -> None:
    group.add_argument(
        "--preprocessing",
        choices=PREPROCESSING,
        default="processor",
        help="processor: the model's own image processor (what pipeline() does); vit_jax: the original evaluation "
        "resize (bilinear, no antialiasing, no crop); crop: timm's resize to size / crop_pct (bicubic), centre crop.",
    )
    group.add_argument("--crop_pct", type=float, default=0.875, help="The crop's share of the resized image (crop).")


def describe(name: str, crop_pct: float) -> str:
    return f"crop (crop_pct {crop_pct})" if name == "crop" else name


def make_preprocess(name: str, processor, image_size: tuple[int, int], crop_pct: float = 0.875):
    """A function: list of RGB PIL images -> (B, 3, H, W) float32 pixel_values."""
    if name == "processor":
        return lambda images: processor(images=images, return_tensors="pt")["pixel_values"]
    height, width = image_size
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, -1, 1, 1)

    def normalise(pixels: torch.Tensor) -> torch.Tensor:  # values 0..255, as the image processor rescales them
        return (pixels * getattr(processor, "rescale_factor", 1 / 255) - mean) / std

    def as_tensor(image: PIL.Image.Image) -> torch.Tensor:  # (3, H, W) float32
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)

    if name == "vit_jax":

        def vit_jax(images):
            resized = [
                torch.nn.functional.interpolate(
                    as_tensor(image)[None], size=(height, width), mode="bilinear", align_corners=False, antialias=False
                )
                for image in images
            ]
            return normalise(torch.cat(resized))

        return vit_jax
    if name == "crop":
        if not 0 < crop_pct <= 1:
            raise UsageError(f"--crop_pct must be in (0, 1], got {crop_pct}.")

        def crop(images):
            cropped = []
            for image in images:
                if height == width:  # Resize(int): the shorter side to floor(size / crop_pct), the aspect kept
                    short, long = sorted(image.size)
                    scaled = (math.floor(height / crop_pct), int(math.floor(height / crop_pct) * long / short))
                    new_width, new_height = scaled if image.width <= image.height else scaled[::-1]
                else:  # Resize((h, w)) as timm does for a non-square size: both sides, the aspect not kept
                    new_width, new_height = math.floor(width / crop_pct), math.floor(height / crop_pct)
                image = image.resize((new_width, new_height), PIL.Image.Resampling.BICUBIC)
                top, left = round((new_height - height) / 2), round((new_width - width) / 2)
                cropped.append(as_tensor(image.crop((left, top, left + width, top + height))))
            return normalise(torch.stack(cropped))

        return crop
    raise UsageError(f"--preprocessing must be one of {', '.join(PREPROCESSING)}, got {name!r}.")
