"""Training augmentations, batched on the device. Each is one class: its flags (`add_arguments`, which makes them
run-defining: recorded in run.json, compared on resume, shown in the model card), how many random numbers it uses per
image, and `__call__(pixels, numbers)`.

To add one, write its class here and list it in AUGMENTATIONS. Its random numbers are drawn by `step_numbers`, a
function of (seed, step) only, so that a resumed run and a run on any number of processes draw what an uninterrupted
single-process run draws.

    class ColorJitter:
        numbers_per_image = 1

        @staticmethod
        def add_arguments(group):
            group.add_argument("--brightness", type=float, default=0.0, help="Scale brightness by 1 +- this.")

        def __init__(self, args, image_size):
            self.brightness = args.brightness

        def __call__(self, pixels, numbers):  # float 0..255 (B, 3, H, W), numbers (B, 1) in [0, 1)
            factor = 1 + self.brightness * (2 * numbers[:, 0] - 1)
            return (pixels * factor.view(-1, 1, 1, 1)).clamp(0, 255)
"""

import argparse
import math

import torch
from torch.nn import functional as F


def random_resized_crop(
    pixels: torch.Tensor,
    uniforms: torch.Tensor,
    size: tuple[int, int],
    scale: tuple[float, float],
    horizontal_flip: bool,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Batched random-resized crop (+ flip) on the device, one bilinear resampling per image; float 0..255 out.

    torchvision's RandomResizedCrop: a box of `scale` x the image area with aspect ratio (w/h) log-uniform in `ratio`
    at a uniform position, resized to `size`. Here the box is continuous and clipped to the image instead of re-drawn
    (torchvision re-draws up to 10 times), and the crop is an affine `grid_sample`. `uniforms` (B, 5) in [0, 1) are
    the random numbers.
    """
    batch, _, height, width = pixels.shape
    u = uniforms.to(pixels.device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_ratio) * height / width  # w/h of the box in units of the image's own sides
    box_width = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the image width / height
    box_height = torch.sqrt(area / aspect).clamp(max=1.0)
    if scale == (1.0, 1.0):  # cropping off: the whole image, whatever its aspect ratio
        box_width, box_height = torch.ones_like(area), torch.ones_like(area)
    left, top = (1 - box_width) * u[:, 2], (1 - box_height) * u[:, 3]
    sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if horizontal_flip else torch.ones_like(area)
    theta = torch.zeros(batch, 2, 3, device=pixels.device)  # output [-1, 1] -> input [-1, 1] (affine_grid convention)
    theta[:, 0, 0] = box_width * sign
    theta[:, 0, 2] = 2 * left + box_width - 1
    theta[:, 1, 1] = box_height
    theta[:, 1, 2] = 2 * top + box_height - 1
    grid = F.affine_grid(theta, [batch, 3, *size], align_corners=False)
    return F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


class RandomResizedCrop:
    """The paper's (and the seed's) augmentation: random-resized crop to the model's size, optional horizontal flip.
    It comes first: it takes the images at their own size and makes them the model's."""

    numbers_per_image = 5

    @staticmethod
    def add_arguments(group) -> None:
        group.add_argument(
            "--crop_scale",
            type=float,
            nargs=2,
            default=(0.05, 1.0),
            metavar=("MIN", "MAX"),
            help="Area range of the random-resized crop; '1 1' turns cropping off.",
        )
        group.add_argument(
            "--horizontal_flip", action="store_true", help="Random horizontal flips (google's pipeline)."
        )

    @staticmethod
    def check_arguments(args: argparse.Namespace) -> str | None:
        """What is wrong with the flags, or None."""
        low, high = args.crop_scale
        if not 0 < low <= high <= 1:
            return f"--crop_scale MIN MAX needs 0 < MIN <= MAX <= 1, got {low} {high}."
        return None

    def __init__(self, args: argparse.Namespace, image_size: tuple[int, int]):
        self.image_size = image_size
        self.scale = tuple(args.crop_scale)
        self.horizontal_flip = args.horizontal_flip

    def __call__(self, pixels: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        return random_resized_crop(pixels, numbers, self.image_size, self.scale, self.horizontal_flip)


# Applied in this order to every training batch; evaluation batches are only resized.
AUGMENTATIONS = [RandomResizedCrop]


def add_augmentation_arguments(group) -> None:
    for augmentation in AUGMENTATIONS:
        augmentation.add_arguments(group)


def check_augmentation_arguments(args: argparse.Namespace) -> str | None:
    """The first thing wrong with an augmentation's flags, or None."""
    for augmentation in AUGMENTATIONS:
        if hasattr(augmentation, "check_arguments") and (problem := augmentation.check_arguments(args)):
            return problem
    return None


def step_numbers(seed: int, step: int, total_batch_size: int, numbers_per_image: int) -> torch.Tensor:
    """The augmentations' random numbers for every image of one optimizer step: a function of (seed, step) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand(total_batch_size, numbers_per_image, generator=generator)


class Augment:
    """Every augmentation of AUGMENTATIONS, applied to this process's share of one optimizer step's images.

    uint8 (B, 3, H, W) at the images' own size in, float 0..255 at the model's size out (normalised afterwards)."""

    def __init__(self, args: argparse.Namespace, image_size: tuple[int, int], accelerator, per_device_batch: int):
        self.augmentations = [augmentation(args, image_size) for augmentation in AUGMENTATIONS]
        self.seed, self.total_batch_size = args.seed, args.total_batch_size
        self.per_device_batch, self.accelerator = per_device_batch, accelerator
        self.step, self.numbers = None, None

    def __call__(self, pixels: torch.Tensor, step: int, micro_step: int) -> torch.Tensor:
        if step != self.step:  # one draw per optimizer step, for all its micro-batches and processes
            widths = [augmentation.numbers_per_image for augmentation in self.augmentations]
            numbers = step_numbers(self.seed, step, self.total_batch_size, sum(widths))
            if torch.cuda.is_available() and self.accelerator.device.type == "cuda":
                numbers = numbers.pin_memory().to(self.accelerator.device, non_blocking=True)  # no host sync
            self.step, self.numbers = step, numbers.split(widths, dim=1)
        # This process's images of this micro-batch, within the step's global batch.
        processes = self.accelerator.num_processes
        start = (micro_step * processes + self.accelerator.process_index) * self.per_device_batch
        for augmentation, numbers in zip(self.augmentations, self.numbers, strict=True):
            pixels = augmentation(pixels, numbers[start : start + len(pixels)])
        return pixels
