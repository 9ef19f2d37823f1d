"""hf_vit: the Vision Transformer of "An Image is Worth 16x16 Words" as a Hugging Face model.

`import hf_vit` registers model_type "hf_vit" with AutoConfig, AutoModel and AutoModelForImageClassification.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_hf_vit import IMAGE_MEAN, IMAGE_STD, VARIANTS, VisionTransformerConfig
from .modeling_hf_vit import (
    VisionTransformerForImageClassification,
    VisionTransformerModel,
    VisionTransformerPreTrainedModel,
    image_processor_for,
)


__version__ = "0.1.0"

AutoConfig.register(VisionTransformerConfig.model_type, VisionTransformerConfig, exist_ok=True)
AutoModel.register(VisionTransformerConfig, VisionTransformerModel, exist_ok=True)
AutoModelForImageClassification.register(
    VisionTransformerConfig, VisionTransformerForImageClassification, exist_ok=True
)
# Saving a model (or config) also copies the code files beside it, so the folder loads with trust_remote_code=True.
VisionTransformerConfig.register_for_auto_class("AutoConfig")
VisionTransformerModel.register_for_auto_class("AutoModel")
VisionTransformerForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "VARIANTS",
    "VisionTransformerConfig",
    "VisionTransformerForImageClassification",
    "VisionTransformerModel",
    "VisionTransformerPreTrainedModel",
    "image_processor_for",
]
