"""Auto classes, saved folders, remote code in a fresh Python without hf_vit, and the image-classification pipeline."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import TINY, randomize_, tiny_config
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline

import hf_vit
from hf_vit import VisionTransformerForImageClassification, VisionTransformerModel


LABELS = [f"digit {i}" for i in range(10)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random tiny classifier saved with save_pretrained, with inputs and logits beside it."""
    folder = tmp_path_factory.mktemp("tiny-vit")
    config = tiny_config(id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)})
    model = randomize_(VisionTransformerForImageClassification(config)).eval()
    model.save_pretrained(folder)
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.save({"pixel_values": pixel_values, "logits": model(pixel_values).logits}, folder.parent / "io.pt")
    return folder


def test_import_registers_the_auto_classes():
    config = AutoConfig.for_model("hf_vit", **TINY)
    assert type(AutoModel.from_config(config)) is VisionTransformerModel
    assert type(AutoModelForImageClassification.from_config(config)) is VisionTransformerForImageClassification


def test_saved_folder_has_weights_config_code_and_preprocessor(saved):
    assert sorted(os.listdir(saved)) == [
        "config.json",
        "configuration_hf_vit.py",
        "model.safetensors",
        "modeling_hf_vit.py",
        "modeling_resnet.py",  # imported by modeling_hf_vit.py (the hybrids' ResNet), so copied beside it
        "preprocessor_config.json",
    ]
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "hf_vit"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_hf_vit.VisionTransformerConfig",
        "AutoModel": "modeling_hf_vit.VisionTransformerModel",
        "AutoModelForImageClassification": "modeling_hf_vit.VisionTransformerForImageClassification",
    }
    assert config["layer_norm_eps"] == 1e-6 and config["hidden_act"] == "gelu_pytorch_tanh"
    processor = json.loads((saved / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "ViTImageProcessor"
    assert processor["size"] == {"height": 32, "width": 32}
    assert processor["image_mean"] == processor["image_std"] == [0.5, 0.5, 0.5]
    assert processor["rescale_factor"] == pytest.approx(1 / 255) and processor["do_normalize"]
    # The code files are the package's own, copied flat.
    assert (saved / "modeling_hf_vit.py").read_text() == open(hf_vit.modeling_hf_vit.__file__).read()
    assert (saved / "modeling_resnet.py").read_text() == open(hf_vit.modeling_resnet.__file__).read()


def test_base_model_folder_is_complete_too(tmp_path):
    VisionTransformerModel(tiny_config()).save_pretrained(tmp_path)
    assert {"modeling_hf_vit.py", "configuration_hf_vit.py", "preprocessor_config.json"} <= set(os.listdir(tmp_path))
    assert len(json.loads((tmp_path / "config.json").read_text())["auto_map"]) == 3


def test_round_trip_in_process(saved):
    io = torch.load(saved.parent / "io.pt")
    model = AutoModelForImageClassification.from_pretrained(saved).eval()
    assert type(model) is VisionTransformerForImageClassification
    assert model.config.id2label[3] == "digit 3"
    with torch.no_grad():
        torch.testing.assert_close(model(io["pixel_values"]).logits, io["logits"], atol=0, rtol=0)
    base = AutoModel.from_pretrained(saved)
    assert type(base) is VisionTransformerModel


def test_bfloat16_load_casts_inputs(saved):
    io = torch.load(saved.parent / "io.pt")
    model = AutoModelForImageClassification.from_pretrained(saved, dtype=torch.bfloat16).eval()
    assert model.head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(io["pixel_values"]).logits.float()  # float32 pixels are cast to the weights' dtype
    assert (logits - io["logits"]).abs().max() <= 0.05 * io["logits"].abs().max()


FRESH_PYTHON = """
import json
import sys
sys.modules["hf_vit"] = None  # `import hf_vit` now raises ImportError: only the folder's own code can load it
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, pipeline
from PIL import Image
try:
    import hf_vit
    raise SystemExit("hf_vit should not be importable here")
except ImportError:
    pass
folder, io = sys.argv[1], torch.load(sys.argv[2])
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
for obj in (config, model, base):
    assert type(obj).__module__.startswith("transformers_modules."), type(obj).__module__
with torch.no_grad():
    torch.testing.assert_close(model(io["pixel_values"]).logits, io["logits"], atol=0, rtol=0)
    assert base(io["pixel_values"]).pooler_output.shape == (2, 32)
classify = pipeline("image-classification", model=folder, trust_remote_code=True)
print(json.dumps([type(model).__name__, type(base).__name__, classify(Image.new("RGB", (40, 30), "white"))[0]["label"]]))
"""


def test_fresh_python_without_hf_vit_loads_with_trust_remote_code(saved, tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FRESH_PYTHON), str(saved), str(saved.parent / "io.pt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    name, base_name, label = json.loads(result.stdout.strip().splitlines()[-1])
    assert (name, base_name) == ("VisionTransformerForImageClassification", "VisionTransformerModel")
    assert label in LABELS


def test_pipeline_on_a_pil_image_needs_no_extra_argument(saved):
    classify = pipeline("image-classification", model=str(saved))
    assert type(classify.model) is VisionTransformerForImageClassification
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    predictions = classify(image)
    assert len(predictions) == 5
    assert all(p["label"] in LABELS for p in predictions)
    assert sorted((p["score"] for p in predictions), reverse=True) == [p["score"] for p in predictions]
    assert len(classify(image.convert("L"))) == 5  # grayscale is converted to RGB


def test_image_processor_scales_to_minus_one_one(saved):
    processor = AutoImageProcessor.from_pretrained(saved)
    image = Image.fromarray(np.full((32, 32, 3), (0, 255, 51), dtype=np.uint8))
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pixel_values[0, :, 0, 0], torch.tensor([-1.0, 1.0, 51 / 255 * 2 - 1]))
