"""examples/finetune.py: a real run on the offline digits, kill -9 + resume, 2 processes, data, checkpoints, Hub, card.

One training run (module fixture `trained`) is shared by the accuracy, results, card, picture and pipeline tests and
is the uninterrupted reference of the resume and the 2-process tests. Subprocesses run with one thread each: on the
shared 2-core test machines a small matmul ran 40x slower with 2 threads than with 1 (OpenMP threads wait on each other).
"""

import importlib.util
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import hf_vit
from hf_vit_examples import augmentation, cli, data, models, report, run_folder
from hf_vit_examples.training_log import TrainingLog


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune.py"
# 16 tokens of width 128: fits 2 CPU cores, and learns the digits to >0.9 in 400 steps of 64 images (~30 s).
TINY = "image_size=8,patch_size=2,hidden_size=128,num_hidden_layers=2,num_attention_heads=4,intermediate_size=256"
RUN = [
    "--config_name", "ViT-Ti_16", "--config_overrides", TINY,
    "--learning_rate", "0.1", "--total_batch_size", "64", "--max_train_steps", "400", "--num_warmup_steps", "40",
    "--eval_steps", "100", "--checkpointing_steps", "50", "--crop_scale", "0.8", "1", "--seed", "0",
]  # fmt: skip
# In-process runs: a few steps of a smaller model, enough to exercise data, model and output paths.
QUICK = [
    "--config_name", "ViT-Ti_16",
    "--config_overrides", "image_size=8,patch_size=4,hidden_size=32,num_hidden_layers=1,num_attention_heads=4,"
    "intermediate_size=37",
    "--total_batch_size", "16", "--max_train_steps", "3", "--num_warmup_steps", "1", "--eval_steps", "3",
    "--dataloader_num_workers", "0",  # persistent workers of a finished in-process run take 30 s to shut down at gc
]  # fmt: skip


def load_finetune():
    spec = importlib.util.spec_from_file_location("finetune", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


finetune = load_finetune()
# The normalisation of hf_vit's models, from their image processor, as the script applies it after augmenting.
NORMALIZE = models.Normalize(hf_vit.image_processor_for(hf_vit.VisionTransformerConfig()))


def environment(home: Path) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(home),
    }


def run_script(args: list[str], home: Path, launcher: list[str] | None = None, timeout: int = 300):
    command = (launcher or [sys.executable]) + [str(SCRIPT), *args]
    return subprocess.run(command, env=environment(home), capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The reference run: digits from scratch, 400 steps, checkpoints every 50."""
    work = tmp_path_factory.mktemp("finetune")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_script([*RUN, "--output_dir", str(work / "out")], work / "home")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert result.returncode == 0, result.stderr[-3000:]
    cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"dir": work / "out", "stdout": result.stdout, "cpu_seconds": cpu_seconds, "home": work / "home"}


# ---- the reference run


def test_digits_from_scratch_reach_085_test_accuracy_within_a_minute_of_cpu(trained):
    results = json.loads((trained["dir"] / "all_results.json").read_text())
    assert results["eval_accuracy"] >= 0.85, results
    assert trained["cpu_seconds"] < 60, trained["cpu_seconds"]
    assert re.search(r"^test accuracy: 0\.\d{4} \(360 images\)", trained["stdout"], flags=re.MULTILINE)


def test_all_results_say_which_split_produced_which_number(trained):
    results = json.loads((trained["dir"] / "all_results.json").read_text())
    assert results["eval_split"] == "test" and results["eval_samples"] == 360
    assert results["best_eval_split"] == "test" and results["selection_split"] is None
    assert results["train_steps"] == 400 and results["train_samples"] == 1437
    assert results["total_batch_size"] == 64 and results["num_processes"] == 1
    assert 0 <= results["best_eval_accuracy"] <= 1 and results["best_eval_step"] in (100, 200, 300, 400)
    assert results["epochs"] == pytest.approx(400 * 64 / 1437)
    assert results["train_runtime"] > 0 and np.isfinite(results["train_loss"])


def test_output_folder_loads_in_the_pipeline_with_the_reported_accuracy(trained):
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(trained["dir"]))
    test = data.load_digits_dataset()["test"]
    predictions = classify(list(test["image"]), top_k=1, batch_size=64)
    accuracy = np.mean([int(p[0]["label"]) == label for p, label in zip(predictions, test["label"], strict=True)])
    results = json.loads((trained["dir"] / "all_results.json").read_text())
    assert accuracy == pytest.approx(results["eval_accuracy"], abs=1 / 360)
    config = json.loads((trained["dir"] / "config.json").read_text())
    assert config["id2label"] == {str(i): str(i) for i in range(10)} and "auto_map" in config
    assert (trained["dir"] / "preprocessor_config.json").exists()
    assert not list(trained["dir"].glob("checkpoints/*.partial"))


def test_model_card_has_provenance_hyperparameters_results_and_splits(trained):
    card = ModelCard.load(trained["dir"] / "README.md")
    results = json.loads((trained["dir"] / "all_results.json").read_text())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-classification"
    (result,) = card.data.eval_results
    assert (result.metric_type, result.dataset_split) == ("accuracy", "test")
    assert result.metric_value == round(results["eval_accuracy"], 4)
    text = card.text
    assert "trained from scratch, config `ViT-Ti_16`" in text and TINY in text
    # It said "fine-tuned" for this model trained from scratch, and had no license.
    assert "trained from scratch for image classification" in text and "fine-tuned" not in text
    assert card.data.license == "apache-2.0"
    assert "scikit-learn's handwritten digits" in text and "1437 training images, 10 classes" in text
    assert f"**{results['eval_accuracy']:.4f}** | test | 360" in text
    assert f"{results['best_eval_accuracy']:.4f} | test | 360" in text
    assert "no checkpoint was picked by its score" in text
    for row in (
        "| optimizer | SGD, momentum 0.9 |",
        "| learning_rate | 0.1 |",
        "| weight_decay | 0.0 |",
        "| lr_scheduler_type | cosine |",
        "| num_warmup_steps | 40 |",
        "| max_train_steps | 400 |",
        "| total_batch_size | 64 |",
        "| max_grad_norm | 1.0 |",
        "| image_size | 8 |",
        "| crop_scale | [0.8, 1.0] |",
        "| normalisation | mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5] |",
        "| seed | 0 |",
    ):
        assert row in text, row
    assert re.search(r"Hardware: 1 process\(es\) on CPU .*Wall time: (\d+ s|\d+\.\d min)", text)
    assert "dosovitskiy" in text.lower() and "```bibtex" in text


def test_card_links_the_pictures_that_exist(trained):
    text = (trained["dir"] / "README.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == ["confusion_matrix.png", "training_curves.png"]
    for link in links:
        assert not link.startswith(("/", "http")) and (trained["dir"] / link).is_file()


@pytest.mark.parametrize("name, size", [("training_curves.png", (1500, 400)), ("confusion_matrix.png", (600, 600))])
def test_pictures_have_their_size_and_are_not_blank(trained, name, size):
    with PIL.Image.open(trained["dir"] / name) as image:
        assert image.size == size
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 5  # axes, curves, labels: far from a constant image


def test_confusion_matrix_has_the_class_names_on_both_axes(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    drawn, savefig = {}, Figure.savefig

    def record(figure, *args, **kwargs):
        drawn["x"] = [t.get_text() for t in figure.axes[0].get_xticklabels()]
        drawn["y"] = [t.get_text() for t in figure.axes[0].get_yticklabels()]
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    labels = ["cat", "dog", "bird"]
    report.plot_confusion_matrix(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1]), labels, "t", tmp_path / "c.png")
    assert drawn == {"x": labels, "y": labels}
    assert PIL.Image.open(tmp_path / "c.png").size == (600, 600)


# ---- resume and distribution


def test_sigkill_then_resume_latest_gives_bit_identical_weights(trained, tmp_path):
    output = tmp_path / "out"
    args = [*RUN, "--output_dir", str(output)]
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        env=environment(trained["home"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = output / "checkpoints" / "step_000050"
    deadline = time.time() + 240
    while not first.is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (output / "model.safetensors").exists()

    resumed = run_script([*args, "--resume_from_checkpoint", "latest"], trained["home"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step = int(re.search(r"Resumed from \S+step_(\d+) at step", resumed.stderr)[1])
    assert 50 <= step < 400 and step % 50 == 0
    reference, result = weights(trained["dir"]), weights(output)
    assert reference.keys() == result.keys()
    for key in reference:
        assert torch.equal(reference[key], result[key]), key
    assert json.loads((output / "all_results.json").read_text())["eval_accuracy"] == pytest.approx(
        json.loads((trained["dir"] / "all_results.json").read_text())["eval_accuracy"]
    )


def test_two_processes_keep_the_global_batch_and_the_schedule(trained, tmp_path):
    output = tmp_path / "out"
    # On a machine without GPUs `--multi_gpu` starts 2 CPU processes in one gloo group; accelerate 1.x's
    # `--cpu --num_processes 2` starts a single process unless given an MPI hostfile.
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--main_process_port", str(free_port())]  # not 29500: other test sessions may be using it
    # 2 processes x 16 images x 2 accumulation steps = the reference run's 64 images in one pass
    args = [*RUN, "--per_device_train_batch_size", "16", "--output_dir", str(output)]
    result = run_script(args, trained["home"], launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((output / "all_results.json").read_text())
    assert results["num_processes"] == 2 and results["total_batch_size"] == 64 and results["train_steps"] == 400
    card = (output / "README.md").read_text()
    assert "| per_device_train_batch_size | 16 |" in card and "| gradient_accumulation_steps | 2 |" in card
    # The card's command dropped the launcher's flags: "accelerate launch examples/finetune.py ...".
    assert f"accelerate launch --multi_gpu --num_processes 2 --main_process_port {launcher[-1]} {SCRIPT} " in card
    # Same learning rates; same images and augmentation in every step: the losses agree to float rounding until
    # SGD's chaos amplifies the rounding of a different reduction order (after ~100 steps here).
    one = json.loads((trained["dir"] / "checkpoints" / "step_000350" / "training_state.json").read_text())
    two = json.loads((output / "checkpoints" / "step_000350" / "training_state.json").read_text())
    assert one["history"]["lr"] == two["history"]["lr"]
    np.testing.assert_allclose(one["history"]["loss"][:50], two["history"]["loss"][:50], rtol=1e-4)
    reference = json.loads((trained["dir"] / "all_results.json").read_text())
    assert abs(results["eval_accuracy"] - reference["eval_accuracy"]) < 0.05


# ---- data


def save_cifar100_like(folder: Path) -> Path:
    """A save_to_disk DatasetDict laid out as CIFAR-100 on the Hub: `img`, `fine_label`, `coarse_label`."""
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=["apple", "bee", "castle"]),
            "coarse_label": datasets.ClassLabel(names=["fruit", "other"]),
        }
    )

    def split(count):
        labels = rng.integers(0, 3, count)
        images = [PIL.Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)) for _ in labels]  # grayscale
        return datasets.Dataset.from_dict(
            {"img": images, "fine_label": labels.tolist(), "coarse_label": (labels > 1).astype(int).tolist()},
            features=features,
        )

    datasets.DatasetDict(train=split(40), test=split(12)).save_to_disk(folder)
    return folder


def test_detects_img_and_fine_label_columns_of_a_saved_dataset(in_process, tmp_path):
    data = save_cifar100_like(tmp_path / "cifar100-like")
    results = in_process([*QUICK, "--dataset_name", str(data), "--output_dir", str(tmp_path / "out")])
    assert results["eval_split"] == "test" and results["eval_samples"] == 12 and results["train_samples"] == 40
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "apple", "1": "bee", "2": "castle"}


def test_the_card_of_a_saved_dataset_names_it_not_the_digits(in_process, tmp_path):
    # dataset_type was "digits" for any dataset without a slash in its name.
    data = save_cifar100_like(tmp_path / "cifar100-like")
    in_process([*QUICK, "--dataset_name", str(data), "--output_dir", str(tmp_path / "out")])
    card = ModelCard.load(tmp_path / "out" / "README.md")
    (result,) = card.data.eval_results
    assert result.dataset_type == "cifar100-like" and card.data.datasets is None  # not a Hub dataset
    assert f"local dataset `{data}`" in card.text


def test_a_hub_dataset_id_without_a_slash_is_a_hub_dataset_in_the_card(tmp_path):
    # "cifar10" (a legacy Hub id) was described as the digits.
    args = finetune.parse_args([*QUICK, "--dataset_name", "cifar10", "--output_dir", str(tmp_path)])
    source = data.DataSource.from_args(args)
    assert (source.kind, source.hub_id) == ("hub", "cifar10")
    assert report.dataset_description(source) == ("cifar10", "cifar10")
    args = finetune.parse_args([*QUICK, "--output_dir", str(tmp_path)])
    assert (
        data.DataSource.from_args(args).hub_id is None
        and report.dataset_description(data.DataSource.from_args(args))[0] == "digits"
    )


def test_plain_integer_labels_become_classes_in_every_split(in_process, tmp_path):
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(40)]
    features = datasets.Features({"image": datasets.Image(), "target": datasets.Value("int64")})
    columns = {"image": images, "target": [(2, 5, 9)[i % 3] for i in range(40)]}
    split = datasets.Dataset.from_dict(columns, features=features)
    datasets.DatasetDict(train=split, test=split.select(range(9))).save_to_disk(tmp_path / "ints")
    results = in_process([*QUICK, "--dataset_name", str(tmp_path / "ints"), "--output_dir", str(tmp_path / "out")])
    assert results["eval_samples"] == 9
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "2", "1": "5", "2": "9"}


def test_unknown_columns_are_listed(tmp_path):
    dataset = datasets.Dataset.from_dict({"picture_bytes": [b"x"], "y": [0]})
    with pytest.raises(cli.UsageError, match=r"no image column .*picture_bytes \(Value\), y \(Value\)"):
        data.detect_columns(dataset, None, None)
    with pytest.raises(cli.UsageError, match=r"no label column named 'klass'"):
        data.detect_columns(dataset, "picture_bytes", "klass")


def test_validation_split_percentage_keeps_the_test_split_for_the_end(in_process, tmp_path):
    args = [*QUICK, "--validation_split_percentage", "10", "--output_dir", str(tmp_path / "out")]
    results = in_process(args)
    assert results["eval_split"] == "test" and results["eval_samples"] == 360
    assert results["selection_split"] == "validation (held out from train)" and results["selection_samples"] == 144
    assert results["train_samples"] == 1437 - 144 and results["best_eval_split"] == results["selection_split"]
    text = (tmp_path / "out" / "README.md").read_text()
    assert "The test split was only used once, at the end" in text


def write_imagefolder(root: Path, corrupt: bool) -> Path:
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for index in range(6):
            PIL.Image.new("RGBA", (9, 7), (index * 40, 0, 0, 128)).save(root / label / f"{index}.png")
    if corrupt:
        (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.mark.parametrize("case", ["corrupt image", "empty folder"])
def test_bad_data_is_one_line_and_exit_status_2(tmp_path, case):
    train = write_imagefolder(tmp_path / "train", corrupt=True) if case == "corrupt image" else tmp_path / "empty"
    train.mkdir(exist_ok=True)
    # 10 training images in batches of 4 for 10 steps: every image is decoded, on a worker process.
    args = [*QUICK, "--train_dir", str(train), "--validation_split_percentage", "20", "--dataloader_num_workers", "1",
            "--total_batch_size", "4", "--max_train_steps", "10", "--eval_steps", "10"]  # fmt: skip
    command = [sys.executable, str(SCRIPT), *args, "--output_dir", str(tmp_path / "out")]
    # As bytes: text mode would turn the progress lines' carriage returns into line ends.
    result = subprocess.run(command, env=environment(tmp_path / "home"), capture_output=True, timeout=300)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("finetune.py: error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0])
    # What a terminal shows (each line as its last carriage return left it) is the error line alone: the progress
    # lines ("Generating train split", "decoding images") stayed above it.
    shown = [line.rsplit("\r", 1)[-1] for line in stderr.split("\n")]
    assert [line for line in shown if line.strip()] == errors, stderr
    if case == "corrupt image":
        assert "broken.png" in errors[0]
    else:
        assert str(train) in errors[0]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_an_empty_split_is_a_usage_error(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    empty = datasets.Dataset.from_dict({"image": [], "label": []}, features=features)
    args = finetune.parse_args([*QUICK, "--output_dir", str(tmp_path / "out")])
    with pytest.raises(cli.UsageError, match="the train split of 'digits' is empty"):
        data.prepare_splits(datasets.DatasetDict(train=empty, test=empty), args)
    one = datasets.Dataset.from_dict({"image": [PIL.Image.new("RGB", (4, 4))], "label": [0]}, features=features)
    with pytest.raises(cli.UsageError, match="the test split of 'digits' is empty"):
        data.prepare_splits(datasets.DatasetDict(train=one, test=empty), args)


def test_split_errors_name_the_image_folder_on_train_dir_runs(tmp_path):
    # They named --dataset_name's default: "the train split of 'digits' is empty" for a --train_dir run.
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    empty = datasets.Dataset.from_dict({"image": [], "label": []}, features=features)
    one = datasets.Dataset.from_dict({"image": [PIL.Image.new("RGB", (4, 4))], "label": [0]}, features=features)
    folder = write_imagefolder(tmp_path / "images", corrupt=False)
    args = finetune.parse_args([*QUICK, "--train_dir", str(folder), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(cli.UsageError, match=f"the train split of '{folder}' is empty"):
        data.prepare_splits(datasets.DatasetDict(train=empty, validation=empty), args)
    with pytest.raises(cli.UsageError, match=f"the validation split of '{folder}' is empty"):
        data.prepare_splits(datasets.DatasetDict(train=one, validation=empty), args)


def test_batch_sizes_that_do_not_multiply_to_the_total_are_refused(in_process, tmp_path):
    with pytest.raises(cli.UsageError, match=r"--total_batch_size 16 must equal .*\(12\)"):
        in_process([*QUICK, "--per_device_train_batch_size", "12", "--output_dir", str(tmp_path / "out")])


# ---- models, failure, Hub


def test_starts_from_a_random_checkpoint_in_the_original_npz_layout(in_process, tmp_path):
    from conversion.testing import write_random_npz

    npz = write_random_npz(tmp_path / "ViT-tiny.npz", num_classes=7)  # hidden 32, patch 8, 32 px, 7-way head
    output = tmp_path / "out"
    results = in_process(
        ["--model_name_or_path", str(npz), "--image_size", "16", "--total_batch_size", "16", "--max_train_steps", "2",
         "--num_warmup_steps", "1", "--eval_steps", "2", "--output_dir", str(output)]
    )  # fmt: skip
    assert results["train_steps"] == 2
    state = weights(output)
    assert state["head.weight"].shape == (10, 32)  # the digits' 10 classes, not the checkpoint's 7
    assert state["transformer.embeddings.position_embeddings"].shape == (1, 1 + 2 * 2, 32)  # resampled to 16 px
    text = (output / "README.md").read_text()
    assert "ViT-tiny.npz`, an original Flax checkpoint" in text and "resampled to 16 px" in text


def test_fine_tunes_an_hf_vit_folder_on_other_classes_with_ignore_mismatched_sizes(trained, in_process, tmp_path):
    data = save_cifar100_like(tmp_path / "cifar100-like")
    args = ["--model_name_or_path", str(trained["dir"]), "--dataset_name", str(data), "--total_batch_size", "8",
            "--max_train_steps", "2", "--num_warmup_steps", "0", "--eval_steps", "2", "--dataloader_num_workers", "0"]  # fmt: skip
    with pytest.raises(cli.UsageError, match="pass --ignore_mismatched_sizes"):
        in_process([*args, "--output_dir", str(tmp_path / "refused")])
    in_process([*args, "--ignore_mismatched_sizes", "--output_dir", str(tmp_path / "out")])
    state = weights(tmp_path / "out")
    assert state["head.weight"].shape == (3, 128)
    assert f"**Base model:** `{trained['dir']}`" in (tmp_path / "out" / "README.md").read_text()
    card = ModelCard.load(tmp_path / "out" / "README.md")
    # It had no license: the base model's is kept (a local folder is no Hub id: no base_model field).
    assert card.data.license == ModelCard.load(trained["dir"] / "README.md").data.license == "apache-2.0"
    assert card.data.base_model is None and "fine-tuned for image classification" in card.text


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(in_process, tmp_path, monkeypatch):
    crop, calls = augmentation.random_resized_crop, []

    def nan_from_the_fourth_step(*args, **kwargs):
        calls.append(1)
        pixel_values = crop(*args, **kwargs)
        return pixel_values * float("nan") if len(calls) >= 4 else pixel_values

    monkeypatch.setattr(augmentation, "random_resized_crop", nan_from_the_fourth_step)
    output = tmp_path / "out"
    args = [*QUICK, "--max_train_steps", "20", "--checkpointing_steps", "1", "--output_dir", str(output)]
    with pytest.raises(cli.NonFiniteLossError, match=r"loss became nan at step 4 .*step_000003") as error:
        in_process(args)
    assert "\n" not in str(error.value)
    assert [folder.name for folder in run_folder.checkpoint_folders(output)] == ["step_000002", "step_000003"]
    assert all(torch.isfinite(tensor).all() for tensor in weights(output / "checkpoints" / "step_000003").values())
    assert not (output / "model.safetensors").exists()


def test_a_card_fine_tuned_from_the_hub_has_base_model_license_and_datasets(tmp_path, monkeypatch):
    # A fine-tuned card had no license, and no datasets or base_model for ids without a slash.
    class BaseCard:
        data = type("Data", (), {"license": "mit"})()

    loaded = []
    monkeypatch.setattr(report.ModelCard, "load", lambda name: loaded.append(name) or BaseCard())
    run = report.RunDescription(
        provenance=models.Provenance("pretrained", "me/vit-base"),
        source=data.DataSource("hub", "cifar10"),
        labels=["cat", "dog"],
        train_samples=10,
        monitor_split="test",
        architecture="tiny",
        hyperparameters={"image_size": 32},
        hardware="a CPU",
        command="python examples/finetune.py",
        changes=[],
        eval_steps=1,
        hub_model_id=None,
    )
    results = {"eval_accuracy": 0.5, "eval_split": "test", "eval_samples": 4, "train_steps": 1, "best_eval_step": 1,
               "best_eval_accuracy": 0.5, "monitor_samples": 4, "train_runtime": 90.0, "train_samples_per_second": 1.0}  # fmt: skip
    report.write_model_card(tmp_path, run, results)
    monkeypatch.undo()  # the real ModelCard.load, to read what was written
    card = ModelCard.load(tmp_path / "README.md")
    assert loaded == ["me/vit-base"]
    assert (card.data.license, card.data.base_model, card.data.datasets) == ("mit", "me/vit-base", ["cifar10"])
    assert card.data.eval_results[0].dataset_type == "cifar10" and "Wall time: 1.5 min" in card.text


class HubRecorder:
    """Stands in for huggingface_hub.HfApi: records each call and what the folder held at upload time."""

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, {**kwargs, "folder_path": folder_path, "files": files}))


def test_push_to_hub_creates_the_repo_first_and_uploads_the_folder_without_checkpoints(
    in_process, tmp_path, monkeypatch
):
    HubRecorder.calls = []
    monkeypatch.setattr(report, "HfApi", HubRecorder)
    output = tmp_path / "vit-digits"
    in_process([*QUICK, "--checkpointing_steps", "1", "--push_to_hub", "--hub_model_id", "me/vit-digits",
                "--with_tracking", "--output_dir", str(output)])  # fmt: skip
    assert list(output.glob("finetune/events.out.tfevents.*"))  # --with_tracking: tensorboard
    (create, repo, create_kwargs), (upload, upload_repo, upload_kwargs) = HubRecorder.calls
    assert (create, repo, create_kwargs) == ("create_repo", "me/vit-digits", {"exist_ok": True})
    assert (upload, upload_repo) == ("upload_folder", "me/vit-digits")
    assert upload_kwargs["folder_path"] == str(output)
    assert {"README.md", "model.safetensors", "config.json", "preprocessor_config.json", "all_results.json",
            "training_curves.png", "confusion_matrix.png"} <= set(upload_kwargs["files"])  # fmt: skip
    assert "checkpoints/**" in upload_kwargs["ignore_patterns"]
    assert "accuracy" in upload_kwargs["commit_message"]


@pytest.mark.parametrize("name", ["multi_gpu", "multi_node", "fsdp", "deepspeed"])
def test_each_shipped_accelerate_config_launches_on_two_cpu_processes(name, tmp_path):
    if name == "deepspeed":
        pytest.skip(
            "DeepSpeed is not installed here (it builds CUDA ops and ZeRO needs NCCL): the file is parsed by "
            "test_accelerate_configs_load and launched by benchmarks/h200_check.sh on a GPU"
        )
    config = str(ROOT / "examples" / "accelerate_configs" / f"{name}.yaml")
    port = str(free_port())
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "-q", "--config_file", config]
    launch += ["--num_processes", "2", "--main_process_port", port]
    output = tmp_path / "out"
    args = [*QUICK, "--checkpointing_steps", "2", "--output_dir", str(output)]
    if name == "multi_node":  # two "machines" of one process each, on this host
        machines = [
            subprocess.Popen(
                [*launch, "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", str(SCRIPT), *args],
                env=environment(tmp_path / "home"),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in (0, 1)
        ]
        logs = [machine.communicate(timeout=300)[0] for machine in machines]
        assert [machine.returncode for machine in machines] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    else:
        result = run_script(args, tmp_path / "home", launcher=launch)
        assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((output / "all_results.json").read_text())
    assert results["num_processes"] == 2 and results["train_steps"] == 3
    # A run this short said "Wall time: 0.0 min".
    wall = re.search(r"Wall time: (\d+) s", (output / "README.md").read_text())
    assert wall and int(wall[1]) == round(results["train_runtime"]) > 0
    assert (output / "checkpoints" / "step_000002" / "training_state.json").is_file()
    assert weights(output)["head.weight"].shape == (10, 32)


@pytest.mark.parametrize("name", ["multi_gpu", "multi_node", "fsdp", "deepspeed_zero2"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "examples" / "accelerate_configs" / f"{name}.yaml"))
    assert config.num_processes >= 8 and config.compute_environment.value == "LOCAL_MACHINE"
    if name == "fsdp":  # the unit FSDP wraps must be the model's block class
        from hf_vit.modeling_hf_vit import Block, VisionTransformerPreTrainedModel

        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == Block.__name__
        assert Block.__name__ in VisionTransformerPreTrainedModel._no_split_modules
    if name == "deepspeed_zero2":
        json_file = ROOT / config.deepspeed_config["deepspeed_config_file"]
        assert json.loads(json_file.read_text())["zero_optimization"]["stage"] == 2


# ---- augmentation on the device


def test_crop_off_is_a_plain_bilinear_resize_and_normalise():
    pixels = torch.randint(0, 256, (3, 3, 8, 6), dtype=torch.uint8)
    uniforms = torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    crops = NORMALIZE(augmentation.random_resized_crop(pixels, uniforms, (16, 12), (1.0, 1.0), horizontal_flip=False))
    resized = torch.nn.functional.interpolate(pixels.float(), size=(16, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(crops, (resized / 255 - 0.5) / 0.5, rtol=0, atol=1e-5)
    assert hf_vit.IMAGE_MEAN == (0.5, 0.5, 0.5) and hf_vit.IMAGE_STD == (0.5, 0.5, 0.5)


def test_crop_takes_the_box_the_numbers_say_and_flips_it():
    pixels = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) % 251
    # area 1/4, aspect 1 (u1 = 0.5 is the middle of the log-ratio range), box at the bottom-right corner (u2 = u3 = 1)
    uniforms = torch.tensor([[0.0, 0.5, 1.0, 1.0, 0.9], [0.0, 0.5, 1.0, 1.0, 0.1]])
    crops = NORMALIZE(augmentation.random_resized_crop(pixels, uniforms, (4, 4), (0.25, 1.0), horizontal_flip=True))
    corner = (pixels[:, :, 4:, 4:] / 255 - 0.5) / 0.5  # a 4x4 box resized to 4x4 is the box itself
    torch.testing.assert_close(crops[0], corner[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(crops[1], corner[1].flip(-1), rtol=0, atol=1e-5)


def test_augmentation_numbers_depend_on_seed_and_step_only():
    first = augmentation.step_numbers(0, 7, 64, 5)
    assert torch.equal(first, augmentation.step_numbers(0, 7, 64, 5))
    assert not torch.equal(first, augmentation.step_numbers(0, 8, 64, 5))
    assert not torch.equal(first, augmentation.step_numbers(1, 7, 64, 5))


# ---- speed switches: same results


def test_in_memory_images_train_exactly_as_the_decoding_workers(in_process, tmp_path):
    # digits fit in memory: decoded once into a uint8 tensor; --no-decode_check takes the worker path instead
    args = [*QUICK, "--max_train_steps", "4"]
    in_process([*args, "--output_dir", str(tmp_path / "memory")])
    in_process([*args, "--no-decode_check", "--output_dir", str(tmp_path / "workers")])
    memory, workers = weights(tmp_path / "memory"), weights(tmp_path / "workers")
    for key in memory:
        assert torch.equal(memory[key], workers[key]), key


def test_losses_are_read_from_the_device_once_per_logging_interval(in_process, tmp_path, monkeypatch):
    reads, read_losses = [], TrainingLog.read_losses

    def counted(log):
        reads.append([step for step, _, _ in log.unlogged])
        return read_losses(log)

    monkeypatch.setattr(TrainingLog, "read_losses", counted)
    args = [*QUICK, "--max_train_steps", "25", "--logging_steps", "10", "--eval_steps", "20", "--checkpointing_steps",
            "100", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    results = in_process(args)
    assert reads == [list(range(1, 11)), list(range(11, 21)), list(range(21, 26))]
    assert results["train_steps"] == 25 and np.isfinite(results["train_loss"])


def test_torch_compile_gives_the_same_losses(in_process, tmp_path):
    args = [*QUICK, "--max_train_steps", "3", "--checkpointing_steps", "2", "--logging_steps", "1"]
    eager = in_process([*args, "--output_dir", str(tmp_path / "eager")])
    compiled = in_process([*args, "--torch_compile", "--output_dir", str(tmp_path / "compiled")])
    history = [
        json.loads((tmp_path / name / "checkpoints" / "step_000002" / "training_state.json").read_text())["history"]
        for name in ("eager", "compiled")
    ]
    np.testing.assert_allclose(history[0]["loss"], history[1]["loss"], rtol=0, atol=1e-5)
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], abs=1e-5)
    for key, tensor in weights(tmp_path / "eager").items():  # saved without torch.compile's _orig_mod prefix
        torch.testing.assert_close(weights(tmp_path / "compiled")[key], tensor, rtol=1e-4, atol=1e-5)


# ---- adaptation points: optimizer, augmentation


def test_adamw_with_weight_decay_trains_and_the_card_describes_it(in_process, tmp_path):
    output = tmp_path / "out"
    args = [*QUICK, "--optimizer", "adamw", "--learning_rate", "1e-3", "--weight_decay", "0.05"]
    results = in_process([*args, "--checkpointing_steps", "2", "--output_dir", str(output)])
    assert results["train_steps"] == 3 and np.isfinite(results["train_loss"])
    text = (output / "README.md").read_text()
    assert "| optimizer | AdamW, betas (0.9, 0.999), eps 1e-08 |" in text and "momentum" not in text
    assert "| learning_rate | 0.001 |" in text and "| weight_decay | 0.05 |" in text
    run = json.loads((output / "run.json").read_text())["arguments"]
    assert (run["optimizer"], run["weight_decay"]) == ("adamw", 0.05)
    optimizer_state = torch.load(output / "checkpoints" / "step_000002" / "optimizer.bin", weights_only=True)
    assert "exp_avg_sq" in optimizer_state["state"][0]  # really AdamW's state, not SGD's momentum buffer


class Brightness:
    """A plugged-in augmentation: one class, its flag, one random number per image."""

    numbers_per_image = 1
    seen = []

    @staticmethod
    def add_arguments(group):
        group.add_argument("--brightness", type=float, default=0.0)

    def __init__(self, args, image_size):
        self.brightness = args.brightness

    def __call__(self, pixels, numbers):
        self.seen.append((tuple(pixels.shape), tuple(numbers.shape)))
        return (pixels * (1 + self.brightness * (2 * numbers - 1)).view(-1, 1, 1, 1)).clamp(0, 255)


def test_an_augmentation_plugged_in_is_one_class_and_its_flag_is_run_defining(in_process, tmp_path, monkeypatch):
    monkeypatch.setattr(augmentation, "AUGMENTATIONS", [augmentation.RandomResizedCrop, Brightness])
    Brightness.seen = []
    output = tmp_path / "out"
    in_process([*QUICK, "--brightness", "0.2", "--output_dir", str(output)])
    assert Brightness.seen == [((16, 3, 8, 8), (16, 1))] * 3  # after the crop, at the model's size, every step
    assert json.loads((output / "run.json").read_text())["arguments"]["brightness"] == 0.2
    assert "| brightness | 0.2 |" in (output / "README.md").read_text()
    args = [*QUICK, "--brightness", "0.3", "--max_train_steps", "4", "--resume_from_checkpoint", "latest"]
    with pytest.raises(run_folder.RunFolderError, match=r"--brightness 0.2 -> 0.3"):
        in_process([*args, "--output_dir", str(output)])
