"""examples/evaluate.py: a model evaluated without training, on the offline digits — pipeline-equal predictions, the
original preprocessings, few-shot as big_vision computes it, the same numbers on 1 and 2 processes, the card, and one
line for each bad input.

The model is a tiny hf_vit with random weights everywhere (a fresh model's zero head would tie every class), saved with
the digits' labels: no training needed, and every prediction is a real argmax.
"""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import randomize_, reset_accelerate_state, tiny_config
from huggingface_hub import ModelCard
from test_finetune import environment, free_port

import hf_vit
from hf_vit_examples import cli, fewshot, models, preprocessing, report, run_folder
from hf_vit_examples.data import load_digits_dataset


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "evaluate.py"
DIGITS = [str(digit) for digit in range(10)]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def load_evaluate():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)  # not "evaluate": the library's name
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate_script = load_evaluate()


def save_model(folder: Path, labels: list[str] = DIGITS, seed: int = 0, **overrides) -> Path:
    config = tiny_config(image_size=8, patch_size=2, num_labels=len(labels), **overrides)
    config.id2label, config.label2id = dict(enumerate(labels)), {label: i for i, label in enumerate(labels)}
    model = randomize_(hf_vit.VisionTransformerForImageClassification(config), seed=seed)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("model") / "tiny-digits")


@pytest.fixture
def evaluate(monkeypatch):
    """evaluate.main in this process with one thread, accelerate's singletons reset after each call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def main(argv):
        try:
            return evaluate_script.main(argv)
        finally:  # each call is a fresh command: its own Accelerator (bf16 or not)
            reset_accelerate_state()

    yield main
    torch.set_num_threads(threads)


def run(args: list[str], home: Path, launcher: list[str] | None = None):
    command = (launcher or [sys.executable]) + [str(SCRIPT), *args]
    return subprocess.run(command, env=environment(home), capture_output=True, text=True, timeout=300)


def results_of(folder: Path) -> dict:
    return json.loads((folder / "eval_results.json").read_text())


# ---- the default preprocessing is the pipeline's


def test_predictions_are_those_of_the_pipeline_image_by_image(model_dir, evaluate, tmp_path, monkeypatch):
    from transformers import pipeline

    drawn, plot = {}, report.plot_confusion_matrix

    def record(references, predictions, labels, title, path):
        drawn.update(references=references, predictions=predictions, labels=labels)
        return plot(references, predictions, labels, title, path)

    monkeypatch.setattr(report, "plot_confusion_matrix", record)
    results = evaluate(["--model_name_or_path", str(model_dir), "--per_device_eval_batch_size", "64",
                        "--output_dir", str(tmp_path / "out")])  # fmt: skip
    test = load_digits_dataset()["test"]
    classify = pipeline("image-classification", model=str(model_dir))
    answers = [classify(image, top_k=10) for image in test["image"]]  # one image at a time
    top1 = np.array([int(answer[0]["label"]) for answer in answers])
    assert drawn["labels"] == DIGITS and np.array_equal(drawn["references"], test["label"])
    np.testing.assert_array_equal(drawn["predictions"], top1)
    assert 0.05 < results["eval_accuracy"] < 0.5  # random weights: far from 1, and not one class for all
    truth = np.array(test["label"])
    assert results["eval_accuracy"] == pytest.approx(np.mean(top1 == truth), abs=1e-12)
    top5 = [str(label) in [a["label"] for a in answer[:5]] for answer, label in zip(answers, truth, strict=True)]
    assert results["eval_top5_accuracy"] == pytest.approx(np.mean(top5), abs=1e-12)
    scores = [
        {a["label"]: a["score"] for a in answer}[str(label)] for answer, label in zip(answers, truth, strict=True)
    ]
    assert results["eval_loss"] == pytest.approx(-np.mean(np.log(scores)), rel=1e-5)
    for digit in DIGITS:
        assert results["eval_per_class_accuracy"][digit] == pytest.approx(
            np.mean(top1[truth == int(digit)] == int(digit))
        )
    assert (
        results["eval_samples"] == 360 and results["eval_split"] == "test" and results["preprocessing"] == "processor"
    )
    assert results["model"]["name"] == str(model_dir) and results["model"]["kind"] == "pretrained"
    with PIL.Image.open(tmp_path / "out" / "confusion_matrix.png") as image:
        assert image.size == (600, 600)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["confusion_matrix.png", "eval_results.json"]


# ---- the original preprocessings


def tf_resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """tf.image.resize(method="bilinear", antialias=False) as TensorFlow's kernel computes it: half-pixel centres,
    lower = max(floor(x), 0), upper = min(ceil(x), size - 1), lerp = x - floor(x)."""

    def weights(out_size, in_size):
        x = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
        lower = np.maximum(np.floor(x), 0).astype(int)
        upper = np.minimum(np.ceil(x), in_size - 1).astype(int)
        return lower, upper, x - np.floor(x)

    (top, bottom, dy), (left, right, dx) = weights(height, image.shape[0]), weights(width, image.shape[1])
    dy, dx = dy[:, None, None], dx[None, :, None]
    rows_top = image[top][:, left] + (image[top][:, right] - image[top][:, left]) * dx
    rows_bottom = image[bottom][:, left] + (image[bottom][:, right] - image[bottom][:, left]) * dx
    return rows_top + (rows_bottom - rows_top) * dy


@pytest.mark.parametrize("size", [(8, 8), (16, 12), (3, 5)])
def test_vit_jax_preprocessing_is_tensorflows_bilinear_resize_without_antialiasing(size):
    pixels = np.random.default_rng(0).integers(0, 256, (7, 10, 3), dtype=np.uint8)
    processor = hf_vit.image_processor_for(tiny_config(image_size=8, patch_size=2))
    preprocess = preprocessing.make_preprocess("vit_jax", processor, size)
    result = preprocess([PIL.Image.fromarray(pixels)])
    expected = (tf_resize_bilinear(pixels.astype(np.float64), *size) - 127.5) / 127.5  # vit_jax's value range
    assert result.shape == (1, 3, *size)
    np.testing.assert_allclose(result[0].permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "image_size, crop_pct, source, resized, box",
    [
        (8, 0.875, (10, 14), (9, 12), (0, 2, 8, 10)),  # floor(8 / 0.875) = 9; top round(4 / 2) = 2
        (224, 0.9, (300, 400), (248, 330), (12, 53, 236, 277)),  # floor(248.9) = 248, not 249; 330 = int(248 * 4 / 3)
        (224, 1.0, (500, 224), (500, 224), (138, 0, 362, 224)),  # crop_pct 1: the shorter side is the size
    ],
)
def test_crop_preprocessing_is_timms_resize_and_centre_crop(image_size, crop_pct, source, resized, box, monkeypatch):
    pixels = np.random.default_rng(1).integers(0, 256, (source[1], source[0], 3), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels)
    expected = np.asarray(image.resize(resized, PIL.Image.Resampling.BICUBIC).crop(box), dtype=np.float32)
    processor = hf_vit.image_processor_for(tiny_config(image_size=8, patch_size=2))
    result = preprocessing.make_preprocess("crop", processor, (image_size, image_size), crop_pct)([image])
    np.testing.assert_allclose(result[0].permute(1, 2, 0).numpy(), (expected / 255 - 0.5) / 0.5, rtol=0, atol=1e-6)


def test_each_preprocessing_is_recorded_and_changes_the_pixels(model_dir, evaluate, tmp_path):
    numbers = {}
    for name, extra in (("processor", []), ("vit_jax", []), ("crop", ["--crop_pct", "0.875"])):
        args = ["--model_name_or_path", str(model_dir), "--preprocessing", name, *extra]
        results = evaluate([*args, "--output_dir", str(tmp_path / name)])
        numbers[results["preprocessing"]] = results["eval_loss"]
    assert list(numbers) == ["processor", "vit_jax", "crop (crop_pct 0.875)"]
    assert len(set(numbers.values())) == 3  # three different inputs to the same model


# ---- few-shot


def ridge_by_lstsq(x, y, l2):
    """The ridge solution as an ordinary least-squares problem: [X; sqrt(l2) I] w = [Y; 0]."""
    stacked = np.concatenate([x, np.sqrt(l2) * np.eye(x.shape[1])])
    targets = np.concatenate([y, np.zeros((x.shape[1], y.shape[1]))])
    return np.linalg.lstsq(stacked, targets, rcond=None)[0]


def big_vision_accuracy(x, y, x_test, y_test, num_classes, l2):
    """fewshot_lsr.py's _precompute_cache + _eig_fewshot_acc_fn, in float32 NumPy: the eigendecomposition route."""
    x, x_test = x.astype(np.float32), x_test.astype(np.float32)
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5
    x = np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)
    y = 2.0 * np.eye(num_classes, dtype=np.float32)[y] - 1.0
    if x.shape[0] >= x.shape[1]:
        eigs, q = np.linalg.eigh(x.T @ x)
        rhs, lhs = q.T @ (x.T @ y), q
    else:
        eigs, q = np.linalg.eigh(x @ x.T)
        rhs, lhs = q.T @ y, x.T @ q
    w = (lhs * (1.0 / (eigs + l2)).reshape(1, -1)) @ rhs
    x_test = np.pad((x_test - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)
    return float(np.mean((x_test @ w).argmax(1) == y_test))


@pytest.mark.parametrize("points, l2", [(60, 2.0**10), (8, 1.0)])  # more points than dimensions (primal), fewer (dual)
def test_ridge_accuracy_is_big_visions_and_the_least_squares_solution(points, l2):
    rng = np.random.default_rng(points)
    centres = rng.normal(size=(4, 16)) * 2
    y, y_test = rng.integers(0, 4, points), rng.integers(0, 4, 400)
    x, x_test = centres[y] + rng.normal(size=(points, 16)), centres[y_test] + rng.normal(size=(400, 16))
    accuracy = fewshot.ridge_accuracy(x, y, x_test, y_test, 4, l2_reg=l2)
    assert accuracy == big_vision_accuracy(x, y, x_test, y_test, 4, l2)
    assert 0.4 < accuracy <= 1
    # the weights are the ridge solution: recompute them from the design matrix
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5
    design = np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)
    weights = ridge_by_lstsq(design, 2.0 * np.eye(4)[y] - 1.0, l2)
    test_design = np.pad((x_test - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)
    assert accuracy == np.mean((test_design @ weights).argmax(1) == y_test)


def test_shots_are_drawn_per_class_nested_and_deterministic_for_a_seed():
    labels = np.repeat(np.arange(3), 20)[np.random.default_rng(0).permutation(60)]
    one, five = fewshot.shot_indices(labels, 3, 1, seed=0), fewshot.shot_indices(labels, 3, 5, seed=0)
    assert np.bincount(labels[five], minlength=3).tolist() == [5, 5, 5] and set(one) <= set(five)
    assert np.array_equal(five, fewshot.shot_indices(labels, 3, 5, seed=0))
    assert not np.array_equal(five, fewshot.shot_indices(labels, 3, 5, seed=1))
    # big_vision: one generator per seed, each class's indices permuted in class order
    rng = np.random.default_rng(0)
    expected = [rng.permutation(np.where(labels == c)[0])[:5] for c in range(3)]
    assert np.array_equal(five, np.concatenate(expected))


def test_fewshot_on_the_digits_is_deterministic_and_averages_the_seeds(model_dir, evaluate, tmp_path):
    args = ["--model_name_or_path", str(model_dir), "--fewshot", "1", "5", "10"]
    first = evaluate([*args, "--output_dir", str(tmp_path / "a")])
    again = evaluate([*args, "--output_dir", str(tmp_path / "b")])
    other = evaluate([*args, "--seed", "3", "--output_dir", str(tmp_path / "c")])
    assert first["fewshot_accuracy"] == again["fewshot_accuracy"] and first["fewshot_seeds"] == [0, 1, 2]
    assert other["fewshot_accuracy"] != first["fewshot_accuracy"] and other["fewshot_seeds"] == [3, 4, 5]
    for shots in (1, 5, 10):
        assert first["fewshot_accuracy"][shots] == pytest.approx(np.mean(first["fewshot_per_seed"][shots]))
    assert 0.1 < first["fewshot_accuracy"][1] < first["fewshot_accuracy"][10] < 1  # random features: above chance
    written = results_of(tmp_path / "a")
    assert written["fewshot_accuracy"] == {str(k): v for k, v in first["fewshot_accuracy"].items()}
    assert written["fewshot_train_samples"] == 1437 and written["fewshot_l2_reg"] == 1024


def test_the_representation_is_the_heads_input_pre_logits_included(tmp_path, evaluate):
    # A model with pre_logits: the features are tanh(pre_logits(pooled)), the representation_size wide.
    folder = save_model(tmp_path / "with-pre-logits", representation_size=24)
    model = hf_vit.VisionTransformerForImageClassification.from_pretrained(folder)
    pixel_values = torch.randn(3, 3, 8, 8)
    from hf_vit_examples.metrics import classification_head

    seen = []
    classification_head(model).register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    with torch.inference_mode():
        model(pixel_values=pixel_values)
        pooled = model.transformer(pixel_values).pooler_output
        expected = torch.tanh(model.pre_logits(pooled))
    assert seen[0].shape == (3, 24)
    torch.testing.assert_close(seen[0], expected)
    results = evaluate(["--model_name_or_path", str(folder), "--fewshot", "2", "--output_dir", str(tmp_path / "out")])
    assert 0 < results["fewshot_accuracy"][2] <= 1


# ---- several processes, bf16


def test_one_and_two_processes_give_the_same_numbers(model_dir, tmp_path):
    # 50 images a batch: 360 test images are 8 batches (the last one short, padded on the second process), 1437 train
    # images 29 (an odd count: the second process gets a padded extra batch); gather_for_metrics drops the padding.
    args = ["--model_name_or_path", str(model_dir), "--fewshot", "1", "5", "--per_device_eval_batch_size", "50"]
    one = run([*args, "--output_dir", str(tmp_path / "one")], tmp_path / "home")
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]  # fmt: skip
    two = run([*args, "--output_dir", str(tmp_path / "two")], tmp_path / "home", launcher=launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    assert re.search(r"evaluating: 100%.*1797/1797.*img/s", one.stderr)  # the progress bar counts every process
    assert re.search(r"evaluating: 100%.*1797/1797.*img/s", two.stderr)
    one, two = results_of(tmp_path / "one"), results_of(tmp_path / "two")
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    for key in ("eval_accuracy", "eval_top5_accuracy", "eval_per_class_accuracy", "eval_samples", "fewshot_accuracy"):
        assert one[key] == two[key], key
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6)


def test_bf16_autocast_is_recorded_and_close_to_float32(model_dir, evaluate, tmp_path):
    args = ["--model_name_or_path", str(model_dir), "--fewshot", "5"]
    fp32 = evaluate([*args, "--output_dir", str(tmp_path / "fp32")])
    bf16 = evaluate([*args, "--bf16", "--output_dir", str(tmp_path / "bf16")])
    assert (fp32["mixed_precision"], bf16["mixed_precision"]) == ("no", "bf16")
    assert bf16["eval_loss"] != fp32["eval_loss"]  # really computed in bfloat16
    assert abs(bf16["eval_accuracy"] - fp32["eval_accuracy"]) <= 0.02
    assert bf16["eval_loss"] == pytest.approx(fp32["eval_loss"], rel=0.02)


# ---- models: converted, feature extractors, labels


def test_an_original_npz_is_converted_with_its_own_head_and_nothing_of_it_stays(evaluate, tmp_path):
    from conversion.testing import write_random_npz

    npz = write_random_npz(tmp_path / "ViT-tiny.npz", num_classes=10)  # 32 px, labels LABEL_0..9
    args = ["--model_name_or_path", str(npz), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(cli.UsageError, match=r"labels \('LABEL_0', .*don't cover the dataset's: '0', '1'"):
        evaluate(args)
    assert not (tmp_path / "out").exists()
    results = evaluate([*args, "--label_mapping", "index", "--fewshot", "1"])
    assert results["model"]["kind"] == "converted" and results["image_size"] == [32, 32]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["confusion_matrix.png", "eval_results.json"]


def test_a_feature_extractor_gives_fewshot_only(evaluate, tmp_path):
    from conversion.testing import write_random_npz

    npz = write_random_npz(tmp_path / "ViT-21k-like.npz", num_classes=10, representation_size=24)
    folder = tmp_path / "extractor"
    from conversion import convert

    convert(npz, folder, num_labels=None, log=None)
    config = json.loads((folder / "config.json").read_text())
    if config.get("num_labels", len(config.get("id2label", {}))) != 0:
        # a random head is not all zeros: zero it as Google did, and convert again
        arrays = dict(np.load(npz))
        arrays = {k: np.zeros_like(v) if k.startswith("head/") else v for k, v in arrays.items()}
        np.savez(npz, **arrays)
        convert(npz, folder, overwrite=True, log=None)
    with pytest.raises(cli.UsageError, match="has no classification head .*pass --fewshot"):
        evaluate(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "refused")])
    results = evaluate(["--model_name_or_path", str(folder), "--fewshot", "3", "--output_dir", str(tmp_path / "out")])
    assert results["eval_accuracy"] is None and results["eval_loss"] is None
    assert 0 < results["fewshot_accuracy"][3] <= 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval_results.json"]


def test_labels_are_matched_by_name_in_any_order_or_mapped(model_dir, evaluate, tmp_path):
    reference = evaluate(["--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "reference")])
    # The same weights with the head's rows in another order and two classes more: matched by name, same numbers.
    model = hf_vit.VisionTransformerForImageClassification.from_pretrained(model_dir)
    order = [3, 7, 0, 9, 1, 5, 2, 8, 4, 6]
    names = ["cat", *[DIGITS[i] for i in order], "dog"]
    config = model.config
    config.id2label, config.label2id, config.num_labels = (
        dict(enumerate(names)),
        {n: i for i, n in enumerate(names)},
        12,
    )
    bigger = hf_vit.VisionTransformerForImageClassification(config)
    state = model.state_dict()
    with torch.no_grad():
        weight, bias = torch.full((12, state["head.weight"].shape[1]), 0.0), torch.full((12,), -1e4)
        weight[1:11], bias[1:11] = state["head.weight"][order], state["head.bias"][order]
        state["head.weight"], state["head.bias"] = weight, bias
    bigger.load_state_dict(state)
    bigger.save_pretrained(tmp_path / "shuffled")
    shuffled = evaluate(["--model_name_or_path", str(tmp_path / "shuffled"), "--output_dir", str(tmp_path / "s")])
    for key in ("eval_accuracy", "eval_top5_accuracy", "eval_per_class_accuracy"):
        assert shuffled[key] == reference[key], key
    assert shuffled["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)
    # Names that don't match: an error naming them, or an explicit mapping.
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    save_model(tmp_path / "words", labels=words)
    args = ["--model_name_or_path", str(tmp_path / "words")]
    with pytest.raises(cli.UsageError, match=r"'0', '1', '2', '3', '4', \.\.\. \(10 in all\) are not among them"):
        evaluate([*args, "--output_dir", str(tmp_path / "w0")])
    by_index = evaluate([*args, "--label_mapping", "index", "--output_dir", str(tmp_path / "w1")])
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps(dict(zip(DIGITS, words, strict=True))))
    by_name = evaluate([*args, "--label_mapping", str(mapping), "--output_dir", str(tmp_path / "w2")])
    assert by_index["eval_accuracy"] == by_name["eval_accuracy"] == reference["eval_accuracy"]  # same seed's weights


def test_match_labels_refuses_ambiguous_and_colliding_mappings():
    assert models.match_labels({0: "Cat ", 1: "dog"}, ["dog", "cat"]).tolist() == [1, 0]
    with pytest.raises(cli.UsageError, match="matches 2 of the model's classes"):
        models.match_labels({0: "crane", 1: "crane"}, ["crane"])
    with pytest.raises(cli.UsageError, match="same model class"):
        models.match_labels({0: "a", 1: "b"}, ["a", "b"], '{"b": "a"}')
    with pytest.raises(cli.UsageError, match="labels the dataset doesn't have: 'z'"):
        models.match_labels({0: "a"}, ["a"], '{"z": "a"}')


# ---- the model card


def test_update_card_adds_the_results_to_the_model_index_and_keeps_the_rest(model_dir, evaluate, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for path in model_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    text = "\n# tiny-digits\n\nA hand-written card: *keep me*.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- vision\n- mine\n---\n" + text)
    args = ["--model_name_or_path", str(folder), "--update_card", "--fewshot", "1", "5"]
    first = evaluate([*args, "--output_dir", str(tmp_path / "a")])
    evaluate([*args, "--preprocessing", "vit_jax", "--output_dir", str(tmp_path / "b")])
    evaluate([*args, "--output_dir", str(tmp_path / "c")])  # the same evaluation again: replaced, not repeated
    card = ModelCard.load(folder / "README.md")
    assert card.text == text and card.data.license == "mit" and card.data.tags == ["vision", "mine"]
    entries = {(e.metric_type, e.metric_config): e for e in card.data.eval_results}
    assert len(card.data.eval_results) == len(entries) == 8  # (top-1, top-5, 1-shot, 5-shot) x 2 preprocessings
    top1 = entries[("accuracy", "processor")]
    assert (top1.dataset_type, top1.dataset_split, top1.task_type) == ("digits", "test", "image-classification")
    assert top1.metric_value == round(first["eval_accuracy"], 4)
    assert entries[("5_shot_accuracy", "processor")].metric_value == round(first["fewshot_accuracy"][5], 4)
    assert ("accuracy", "vit_jax") in entries


# ---- bad input: one line, exit status 2, nothing written


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model_name_or_path", "./no/such/model"], r"--model_name_or_path ./no/such/model: no such file or folder"),
        (["--split", "tests"], r"has no split 'tests' \(did you mean 'test'\?\): choose from train, test"),
        (["--label_column_name", "klass"], r"no label column named 'klass'"),
        (
            ["--fewshot", "1", "200"],
            r"--fewshot 200 needs 200 training images of every class, but class '\d' has 1\d\d",
        ),
        (["--update_card", "--model_name_or_path", "me/some-model"], r"--update_card writes into the evaluated model"),
        (["--preprocessing", "crop", "--crop_pct", "1.5"], r"--crop_pct must be in \(0, 1\], got 1.5"),
        (["--dataloader_num_workers", "-1"], r"--dataloader_num_workers must not be negative, got -1"),
    ],
)
def test_bad_input_is_a_usage_error_before_anything_is_written(model_dir, evaluate, tmp_path, extra, message):
    with pytest.raises(cli.UsageError, match=message):
        evaluate(["--model_name_or_path", str(model_dir), *extra, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_card_update_that_would_fail_is_refused_before_the_evaluation(model_dir, evaluate, tmp_path):
    import shutil

    folder = Path(shutil.copytree(model_dir, tmp_path / "model"))
    (folder / "README.md").write_text("---\nlicense: [unclosed\n---\n\n# my model\n")
    with pytest.raises(
        cli.UsageError, match=r"--update_card: .*README.md is not a model card huggingface_hub can read"
    ):
        evaluate(["--model_name_or_path", str(folder), "--update_card", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_metric_added_to_metrics_is_in_eval_results(model_dir, evaluate, tmp_path, monkeypatch):
    from hf_vit_examples import metrics

    monkeypatch.setitem(metrics.METRICS, "accuracy_again", metrics.METRICS["accuracy"])
    results = evaluate(["--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "out")])
    assert results["eval_accuracy_again"] == results["eval_accuracy"]
    assert results_of(tmp_path / "out")["eval_accuracy_again"] == results["eval_accuracy"]


def test_an_output_folder_with_another_evaluation_is_refused(model_dir, evaluate, tmp_path):
    args = ["--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "out")]
    evaluate(args)
    written = results_of(tmp_path / "out")
    with pytest.raises(run_folder.RunFolderError, match=r"already holds another evaluation of .*tiny-digits on test"):
        evaluate([*args, "--preprocessing", "vit_jax"])
    assert results_of(tmp_path / "out") == written
    assert evaluate([*args, "--preprocessing", "vit_jax", "--overwrite_output_dir"])["preprocessing"] == "vit_jax"
    with pytest.raises(run_folder.RunFolderError, match=r"already holds a model: choose a new or empty folder"):
        evaluate(["--model_name_or_path", str(model_dir), "--output_dir", str(model_dir)])


@pytest.mark.parametrize("launcher", ["python", "accelerate launch -q"])
def test_bad_input_from_the_command_line_is_one_line_and_nothing_is_written(model_dir, tmp_path, launcher):
    single = [ACCELERATE, "launch", "-q", "--num_processes", "1", "--num_machines", "1", "--cpu", "--mixed_precision",
              "no", "--dynamo_backend", "no"]  # fmt: skip
    command = None if launcher == "python" else single
    words = save_model(tmp_path / "words", labels=[f"class {i}" for i in range(10)])
    result = run(
        ["--model_name_or_path", str(words), "--output_dir", str(tmp_path / "out")], tmp_path / "home", command
    )
    assert result.returncode == (2 if launcher == "python" else 1), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.rstrip().splitlines()[-1]
    assert last.startswith("evaluate.py: error: the model's 10 labels ('class 0', 'class 1'")
    assert [line for line in result.stderr.splitlines() if "error:" in line] == [last]
    assert not (tmp_path / "out").exists()
