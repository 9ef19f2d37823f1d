"""The model card (README.md with YAML front matter) written beside every converted checkpoint."""

from dataclasses import dataclass, field


CITATION_BIBTEX = """@inproceedings{dosovitskiy2021an,
  title     = {An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale},
  author    = {Alexey Dosovitskiy and Lucas Beyer and Alexander Kolesnikov and Dirk Weissenborn and Xiaohua Zhai and
               Thomas Unterthiner and Mostafa Dehghani and Matthias Minderer and Georg Heigold and Sylvain Gelly and
               Jakob Uszkoreit and Neil Houlsby},
  booktitle = {International Conference on Learning Representations},
  year      = {2021},
  url       = {https://arxiv.org/abs/2010.11929}
}"""

AUGREG_CITATION_BIBTEX = """@article{steiner2021augreg,
  title   = {How to train your ViT? Data, Augmentation, and Regularization in Vision Transformers},
  author  = {Andreas Steiner and Alexander Kolesnikov and Xiaohua Zhai and Ross Wightman and Jakob Uszkoreit and
             Lucas Beyer},
  journal = {Transactions on Machine Learning Research},
  year    = {2022},
  url     = {https://arxiv.org/abs/2106.10270}
}"""

_AUGREG_FIELDS = {
    "model": "model",
    "pretrain_dataset": "pre-training data",
    "epochs": "pre-training epochs",
    "lr": "pre-training learning rate",
    "aug": "augmentation (RandAugment / Mixup level)",
    "wd": "weight decay",
    "dropout": "dropout",
    "stochastic_depth": "stochastic depth",
    "finetune_dataset": "fine-tuning data",
    "finetune_steps": "fine-tuning steps",
    "finetune_lr": "fine-tuning learning rate",
    "finetune_resolution": "fine-tuning resolution",
}


@dataclass
class CardInfo:
    """What the card says; filled by `conversion.convert()`."""

    title: str
    source_name: str
    source_url: str | None
    source_sha256: str
    export: str  # "hf_vit" or "transformers-vit"
    architecture: str  # Architecture.describe() of the converted model
    image_size: tuple[int, int]
    source_image_size: tuple[int, int]
    num_parameters: int
    num_labels: int
    new_head: bool
    feature_extractor: bool  # the checkpoint's head was all zeros: saved without one
    stock_vit_model: bool  # saved as transformers' ViTModel (a feature extractor, pre_logits its pooler)
    pre_logits: str  # "kept", "dropped" or "none"
    dtype: str
    hidden_act: str
    datasets: list[str] = field(default_factory=list)
    augreg: dict | None = None
    verification: str | None = None  # one line, None with --no-verify
    seed_checkpoint: bool = False
    training_step: int | None = None  # a vit_jax training checkpoint (flax msgpack): the step it was saved at
    repo_id: str = "path/to/folder"  # what the loading snippets load: the Hub repo, else the folder


def _yaml_list(name: str, values: list[str]) -> list[str]:
    return [f"{name}:"] + [f"- {value}" for value in values] if values else []


def render_model_card(info: CardInfo) -> str:
    """README.md text: front matter for the Hub, then what the model is, how to load it, how it was checked."""
    task = "image-feature-extraction" if info.feature_extractor else "image-classification"
    tags = ["vision", task, "vit", "hf_vit"] + (["augreg"] if info.augreg else [])
    front = ["---", "license: apache-2.0", "library_name: transformers", f"pipeline_tag: {task}"]
    front += _yaml_list("tags", tags) + _yaml_list("datasets", info.datasets)
    if info.source_url:
        front.append(f"source_url: {info.source_url}")
    front += [f"source_file: {info.source_name}", f"source_sha256: {info.source_sha256}", "---", ""]

    height, width = info.image_size
    source_h, source_w = info.source_image_size
    resolution = f"{height}x{width}"
    if info.image_size != info.source_image_size:
        resolution += f" (position embeddings resampled from {source_h}x{source_w} as vit_jax does)"
    origin = (
        "a checkpoint fine-tuned with the seed repo (jeonsworld/ViT-pytorch), whose exact GELU it keeps"
        if info.seed_checkpoint
        else f"a training checkpoint of vit_jax's train.py (flax msgpack, step {info.training_step}; its optimizer "
        "state is not converted)"
        if info.training_step is not None
        else "Google's original Flax checkpoint (google-research/vision_transformer)"
    )
    gelu = "exact (erf)" if info.hidden_act == "gelu" else "tanh approximation, as in the original Flax model"
    lines = [
        f"# {info.title}",
        "",
        f'The Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021), converted to Hugging '
        f"Face safetensors by hf_vit's `hf-vit-convert` from `{info.source_name}`, {origin}.",
        "",
        f"- Architecture: {info.architecture}",
        f"- Resolution: {resolution}; inputs are RGB scaled to [-1, 1] (mean = std = 0.5)",
        f"- Parameters: {info.num_parameters:,}",
        *([f"- Training step: {info.training_step}"] if info.training_step is not None else []),
        "- Classifier: none: a feature extractor (see below)"
        if info.feature_extractor
        else f"- Classifier: {info.num_labels} classes"
        + (" (new head, zero-initialised for fine-tuning)" if info.new_head else ""),
        f"- pre_logits: {info.pre_logits}",
        f"- Weights: {info.dtype}; GELU: {gelu} (`{info.hidden_act}`); LayerNorm epsilon 1e-6",
        "- Source: "
        + (f"{info.source_url}" if info.source_url else info.source_name)
        + f" (sha256 `{info.source_sha256}`)",
        "",
    ]
    if info.feature_extractor:
        lines += [
            "## Why there is no classifier",
            "",
            "The head of this checkpoint is all zeros: Google zeroed the ImageNet-21k heads of these files before "
            "releasing them, so it would output 0 for every class. The model is saved without it, for "
            "`image-feature-extraction`: "
            + (
                "`AutoModel` loads transformers' `ViTModel`, whose `pooler_output` is the features the head would have "
                "read (pre_logits, Linear + tanh of the class token, saved as its pooler) and whose `last_hidden_state` "
                'and `pipeline("image-feature-extraction")` give every token after the encoder\'s final LayerNorm. '
                if info.stock_vit_model
                else "with `AutoModelForImageClassification`, `logits` are the features the head would have read "
                + ("(after pre_logits, Linear + tanh)" if info.pre_logits == "kept" else "(the pooled token)")
                + '; `AutoModel` and `pipeline("image-feature-extraction")` give every token after the encoder\'s '
                "final LayerNorm. "
            )
            + "Convert again with `--num-labels N` for a new zero-initialised classifier to fine-tune.",
            "",
        ]
    lines += [
        "## How to load",
        "",
    ]
    if info.export == "transformers-vit":
        stock_class = "ViTModel" if info.stock_vit_model else "ViTForImageClassification"
        lines += [
            f"This folder is for stock `transformers.{stock_class}`; no remote code is needed:",
            "",
            "```python",
            "from transformers import pipeline",
            f'pipe = pipeline("{task}", model="{info.repo_id}")',
            "```",
        ]
    else:
        lines += [
            "With hf_vit installed (`import hf_vit` registers the model with the Auto classes):",
            "",
            "```python",
            "import hf_vit",
            "from transformers import AutoModelForImageClassification, pipeline",
            f'model = AutoModelForImageClassification.from_pretrained("{info.repo_id}")',
            f'pipe = pipeline("{task}", model="{info.repo_id}")',
            "```",
            "",
            "Without hf_vit, the modeling code shipped in this folder is used:",
            "",
            "```python",
            "from transformers import AutoModelForImageClassification",
            f'model = AutoModelForImageClassification.from_pretrained("{info.repo_id}", trust_remote_code=True)',
            "```",
        ]
    if info.augreg:
        lines += ["", "## Training hyper-parameters (from the augreg file name)", ""]
        lines += [f"- {_AUGREG_FIELDS.get(k, k)}: {v}" for k, v in info.augreg.items()]
    lines += ["", "## Verification", ""]
    lines.append(
        info.verification
        or "Not verified (converted with --no-verify): compare its logits with the original before relying on it."
    )
    lines += ["", "## Citation", "", "```bibtex", CITATION_BIBTEX, "```"]
    if info.augreg:
        lines += ["", "```bibtex", AUGREG_CITATION_BIBTEX, "```"]
    return "\n".join(front + lines) + "\n"


__all__ = ["AUGREG_CITATION_BIBTEX", "CITATION_BIBTEX", "CardInfo", "render_model_card"]
