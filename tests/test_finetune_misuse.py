"""examples/finetune.py under misuse: a run owns its folder, errors are one line through `accelerate launch`, bad input
is found before anything is written, and Ctrl-C says how to resume."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import PIL.Image
import pytest
from safetensors import SafetensorError
from test_finetune import QUICK, ROOT, RUN, SCRIPT, environment, finetune, free_port, run_script

from hf_vit_examples import cli, models, report, run_folder


ACCELERATE = str(Path(sys.executable).parent / "accelerate")
# What the README's commands pass: every launcher default given, so accelerate prints no warning of its own.
SINGLE = [ACCELERATE, "launch", "-q", "--num_processes", "1", "--num_machines", "1", "--cpu"]
SINGLE += ["--mixed_precision", "no", "--dynamo_backend", "no"]


def two_processes() -> list[str]:
    return [ACCELERATE, "launch", "-q", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]  # fmt: skip


def quick(output: Path, *extra: str) -> list[str]:
    return [*QUICK, "--output_dir", str(output), *extra]


# ---- a run owns its output folder


@pytest.fixture
def earlier_run(in_process, tmp_path):
    """A finished run of 6 steps with checkpoints at steps 4 and 5 (the last 2 of every step)."""
    output = tmp_path / "earlier"
    in_process(quick(output, "--max_train_steps", "6", "--checkpointing_steps", "1"))
    assert [f.name for f in run_folder.checkpoint_folders(output)] == ["step_000004", "step_000005"]
    return output


def test_a_folder_with_another_runs_checkpoints_is_refused_and_latest_does_not_resume_it(
    earlier_run, in_process, tmp_path
):
    reused = tmp_path / "reused"
    shutil.copytree(earlier_run / "checkpoints", reused / "checkpoints")  # the issue's `cp -r runA/checkpoints runH/`
    args = quick(reused, "--max_train_steps", "3", "--checkpointing_steps", "1")
    with pytest.raises(run_folder.RunFolderError, match=r"holds the checkpoints of a run up to step 5:"):
        in_process(args)
    # Resuming them under other arguments names what differs; before, it resumed at step 5 of a 3-step run.
    with pytest.raises(run_folder.RunFolderError, match=r"--max_train_steps 6 -> 3"):
        in_process([*args, "--resume_from_checkpoint", "latest"])
    assert sorted(p.name for p in reused.iterdir()) == ["checkpoints"]  # untouched
    assert [f.name for f in run_folder.checkpoint_folders(reused)] == ["step_000004", "step_000005"]


def test_checkpoints_without_a_run_record_are_not_resumed(earlier_run, in_process, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(earlier_run / "checkpoints", legacy / "checkpoints")
    state_file = legacy / "checkpoints" / "step_000005" / "training_state.json"
    state = json.loads(state_file.read_text())
    del state["run"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(run_folder.RunFolderError, match="has no run record"):
        in_process(quick(legacy, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"))


def test_running_again_into_a_finished_run_says_it_is_finished(earlier_run, in_process):
    # It said "the checkpoints of another run" and advised resuming them, which would train steps 6.. again.
    message = "holds a finished run: its model, and checkpoints up to step 5: pass --overwrite_output_dir to replace"
    with pytest.raises(run_folder.RunFolderError, match=message):
        in_process(quick(earlier_run))


def test_a_folder_holding_a_model_is_not_overwritten_without_being_told(earlier_run, in_process):
    (earlier_run / "checkpoints").rename(earlier_run.parent / "moved")
    before = (earlier_run / "model.safetensors").read_bytes()
    with pytest.raises(
        run_folder.RunFolderError, match="already holds a model: pass --overwrite_output_dir to replace it"
    ):
        in_process(quick(earlier_run))
    assert (earlier_run / "model.safetensors").read_bytes() == before


def test_overwrite_output_dir_really_starts_clean(earlier_run, in_process):
    (earlier_run / "notes.txt").write_text("another run's notes")
    results = in_process(quick(earlier_run, "--max_train_steps", "2", "--overwrite_output_dir"))
    assert results["train_steps"] == 2
    assert not (earlier_run / "notes.txt").exists() and run_folder.checkpoint_folders(earlier_run) == []
    run = json.loads((earlier_run / "run.json").read_text())
    assert run["arguments"]["max_train_steps"] == 2 and set(run["data"]) == {"train", "test"}


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_overwrite_that_fails_before_training_leaves_the_old_run_as_it_was(earlier_run, in_process):
    # It used to empty the folder first: a model that could not be built cost the run that was there.
    before = contents(earlier_run)
    overrides = QUICK[QUICK.index("--config_overrides") + 1].replace("hidden_size=32", "hidden_size=30")
    args = quick(earlier_run, "--overwrite_output_dir", "--config_overrides", overrides)
    with pytest.raises(cli.UsageError, match=r"cannot build the model: hidden_size \(30\) must be divisible") as error:
        in_process(args)
    assert not str(error.value).endswith("..")
    assert contents(earlier_run) == before and sorted(p.name for p in earlier_run.iterdir() if p.name[0] == ".") == []


def test_a_folder_an_overwrite_was_killed_in_says_where_the_old_run_is(earlier_run, in_process):
    run_folder.start_run_folder(earlier_run, "overwrite")  # then SIGKILL: keep_run_folder or undo_run_folder never ran
    (set_aside,) = earlier_run.iterdir()
    with pytest.raises(run_folder.RunFolderError, match=rf"holds {set_aside.name}, what an interrupted --overwrite"):
        in_process(quick(earlier_run))


def test_an_overwrite_failing_on_one_process_only_leaves_the_old_run_as_it_was(earlier_run, tmp_path):
    # Rank 0 had set up and deleted the old contents while rank 1 was still failing to load the checkpoint.
    checkpoint = tmp_path / "step_000005"
    shutil.copytree(run_folder.checkpoint_folders(earlier_run)[-1], checkpoint)
    target = tmp_path / "target"
    shutil.copytree(earlier_run, target)
    before = contents(target)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import accelerate\n"
        "    def load_state(self, *args, **kwargs):\n"
        "        raise RuntimeError('rank 1 cannot read the checkpoint')\n"
        "    accelerate.Accelerator.load_state = load_state\n"
    )
    args = quick(
        target, "--max_train_steps", "6", "--overwrite_output_dir", "--resume_from_checkpoint", str(checkpoint)
    )
    env = environment(tmp_path / "home")
    env["PYTHONPATH"] = os.pathsep.join([str(hooks), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [*two_processes(), str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0 and "rank 1 cannot read the checkpoint" in result.stderr, result.stderr[-3000:]
    assert contents(target) == before


def test_a_resume_that_fails_changes_nothing_and_the_right_command_still_resumes(earlier_run, in_process, tmp_path):
    (earlier_run / "model.safetensors").unlink()
    before = contents(earlier_run)
    args = quick(earlier_run, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    # Past the checkpoint's step: refused, and (before) run.json already said --max_train_steps 3.
    wrong = [*args[:-4], "--max_train_steps", "3", *args[-2:], "--allow_changed_arguments"]
    with pytest.raises(cli.UsageError, match="is at step 5, not before --max_train_steps 3: raise"):
        in_process(wrong)
    assert contents(earlier_run) == before
    # A checkpoint of another model: one line saying what does not fit, and no folder left behind.
    overrides = QUICK[QUICK.index("--config_overrides") + 1].replace("hidden_size=32", "hidden_size=16")
    other = quick(tmp_path / "other", "--max_train_steps", "6", "--config_overrides", overrides)
    checkpoint = str(run_folder.checkpoint_folders(earlier_run)[-1])
    with pytest.raises(cli.UsageError, match=r"does not fit the model this command builds \(size mismatch for"):
        in_process([*other, "--resume_from_checkpoint", checkpoint, "--allow_changed_arguments"])
    assert not (tmp_path / "other").exists()
    assert in_process(args)["train_steps"] == 6


def test_resuming_with_other_hyper_parameters_is_refused_by_name_or_recorded_when_allowed(earlier_run, in_process):
    (earlier_run / "model.safetensors").unlink()
    args = quick(earlier_run, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    with pytest.raises(run_folder.RunFolderError, match=r"--total_batch_size 16 -> 8; --learning_rate 0.03 -> 0.5"):
        in_process([*args, "--learning_rate", "0.5", "--total_batch_size", "8"])
    # Not run-defining: how the batch is split, workers, logging, checkpoint cadence.
    in_process([*args, "--per_device_train_batch_size", "8", "--checkpointing_steps", "3"])
    results = in_process([*args, "--learning_rate", "0.5", "--allow_changed_arguments"])
    assert results["train_steps"] == 6
    card = (earlier_run / "README.md").read_text()
    assert "resumed with changed run-defining arguments" in card and "at step 5: --learning_rate 0.03 -> 0.5" in card
    assert "| learning_rate | 0.5 |" in card


def test_resuming_with_another_optimizer_is_refused_even_when_changes_are_allowed(earlier_run, in_process):
    """The checkpoint holds SGD's momentum buffers: AdamW loaded them and crashed at its first step (KeyError 'step')."""
    (earlier_run / "model.safetensors").unlink()
    before = contents(earlier_run)
    args = quick(earlier_run, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    with pytest.raises(
        run_folder.RunFolderError, match=r"trained with --optimizer sgd, this command asks for --optimizer adamw"
    ):
        in_process([*args, "--optimizer", "adamw", "--allow_changed_arguments"])
    assert contents(earlier_run) == before


class FakeAccelerator:
    """What save_checkpoint uses of an Accelerator: one process, save_state writes a file."""

    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_text("weights")


def test_pruning_never_deletes_the_checkpoint_it_just_wrote(tmp_path):
    # Checkpoints of later steps (a rewound run; before, another run's) used to outrank the new one: keep-last-2
    # of [20, 80, 100] deleted step 20 as soon as it was written.
    for step in (80, 100):
        (tmp_path / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000010.partial").mkdir()  # a save killed halfway
    final = run_folder.save_checkpoint(FakeAccelerator(), tmp_path, 20, {"completed_steps": 20}, keep=2)
    assert final.is_dir() and run_folder.checkpoint_folders(tmp_path) == [final]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000020"]
    for step in (30, 40):
        run_folder.save_checkpoint(FakeAccelerator(), tmp_path, step, {"completed_steps": step}, keep=2)
    assert [f.name for f in run_folder.checkpoint_folders(tmp_path)] == ["step_000030", "step_000040"]


def test_two_processes_write_complete_checkpoints_and_no_partials(tmp_path):
    # The main process renamed step_N.partial to step_N while rank 1 was still writing its random_states_1.pkl: rank 1
    # then recreated the .partial folder (never pruned) or crashed on the vanished one, and the checkpoint lacked it.
    output = tmp_path / "out"
    args = quick(output, "--max_train_steps", "50", "--checkpointing_steps", "1", "--eval_steps", "50")
    result = run_script([*args, "--checkpoints_total_limit", "0"], tmp_path / "home", launcher=two_processes())
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == [f"step_{s:06d}" for s in range(1, 50)]
    for checkpoint in run_folder.checkpoint_folders(output):
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}, checkpoint


class FullDisk(FakeAccelerator):
    """save_state runs out of space halfway, as safetensors (the model) or torch.save (the optimizer) reports it."""

    def __init__(self, error: Exception):
        self.error = error

    def save_state(self, folder):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_text("half the weigh")
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        SafetensorError("I/O error: No space left on device (os error 28)"),
        RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3"),
    ],
)
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_complete_one(tmp_path, error):
    # It was a traceback (SafetensorError, torch's RuntimeError), and the .partial folder stayed.
    run_folder.save_checkpoint(FakeAccelerator(), tmp_path, 10, {"completed_steps": 10}, keep=2)
    with pytest.raises(
        run_folder.RunFolderError, match=r"cannot write the checkpoint of step 20 into .*checkpoints"
    ) as e:
        run_folder.save_checkpoint(FullDisk(error), tmp_path, 20, {"completed_steps": 20}, keep=2)
    assert "the last complete checkpoint is " + str(tmp_path / "checkpoints" / "step_000010") in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000010"]


# ---- everything is checked before anything is written


def write_images(root: Path, broken: tuple[str, ...] = ()) -> Path:
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for index in range(6):
            PIL.Image.new("RGB", (9, 7), (index * 40, 0, 0)).save(root / label / f"{index}.png")
    for name in broken:
        (root / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config_overrides", "hiden_size=64"], r"'hiden_size' is not a field .* \(did you mean 'hidden_size'\?\)"),
        (["--config_name", "ViT-B_61"], r"not a .* known variant \(did you mean 'ViT-B_16'.*known: ViT-Ti_16"),
        (["--model_name_or_path", "imagenet21k/ViT-B_61"], r"known official checkpoint name \(did you mean"),
        (["--model_name_or_path", "ViT-X_16"], r"known official checkpoint name"),
        (["--model_name_or_path", "missing/model.npz"], r"missing/model.npz: no such file"),
        (["--per_device_train_batch_size", "12"], r"must equal per_device_train_batch_size \(12\)"),
        (["--dataset_name", "{tmp}/nowhere"], r"cannot load dataset"),
        (["--train_dir", "{tmp}/nowhere"], r"--train_dir .*/nowhere is not a folder: give a folder of images"),
        (
            ["--train_dir", "{images}"],
            r"dataset '.*/images' has no test or validation split \(it has train\): pass --validation_split",
        ),
        (["--config_overrides", "num_labels=5"], r"num_labels is set from the dataset's classes: leave it out"),
        (
            ["--overwrite_output_dir", "--resume_from_checkpoint", "{tmp}/out/checkpoints/step_000002"],
            r"--overwrite_output_dir replaces what .*out holds: it can't resume from a checkpoint in it",
        ),
        (["--train_dir", "{images}", "--image_column_name", "picture"], r"no image column named 'picture'"),
        (["--train_dir", "{broken}", "--validation_split_percentage", "20"], r"2 of 14 images cannot be decoded"),
        (["--total_batch_size", "4096", "--per_device_train_batch_size", "4096"], r"fewer than one batch"),
        (["--model_name_or_path", "{npz}", "--image_size", "12"], r"cannot build the model"),
        (["--crop_scale", "0.5", "0.2"], r"--crop_scale MIN MAX needs"),
        (["--learning_rate", "fast"], r"invalid float value"),
        (["--learning_rate", "-0.03"], r"--learning_rate must be positive, got -0.03\.$"),  # was SGD's traceback
        (["--per_device_eval_batch_size", "0"], r"must be positive"),  # was a DataLoader traceback
        (["--dataloader_num_workers", "-1"], r"--dataloader_num_workers must not be negative"),
        (["--with_tracking", "--report_to", "tensorbord"], r"not a tracker accelerate knows \(did you mean 'tensorb"),
        (["--output_dir", "{file}/out"], r"is a file, not a folder"),
        (["--output_dir", "/sys/hf_vit_test/out"], r"is not writable"),  # read-only even for root
    ],
)
def test_bad_input_is_one_error_and_leaves_no_folder(in_process, tmp_path, extra, message):
    from conversion.testing import write_random_npz

    places = {"tmp": tmp_path, "file": tmp_path / "a_file", "images": tmp_path / "images", "npz": tmp_path / "v.npz"}
    places["broken"] = tmp_path / "broken"
    (tmp_path / "a_file").write_text("not a folder")
    write_images(places["images"])
    write_images(places["broken"], broken=("dog/broken.png", "cat/truncated.png"))
    write_random_npz(places["npz"], num_classes=7)  # patch 8: 12 px is not a multiple
    output = tmp_path / "out"
    args = quick(output, *(word.format(**places) for word in extra))
    with pytest.raises((cli.UsageError, run_folder.RunFolderError), match=message) as error:
        in_process(args)
    assert "\n" not in str(error.value)
    assert not output.exists()
    if "broken" in extra[1]:  # every unreadable image at once, by name
        assert "dog/broken.png" in str(error.value) and "cat/truncated.png" in str(error.value)


def test_a_tracker_that_is_not_installed_is_refused_instead_of_logging_nowhere(tmp_path):
    missing = next((name for name in ("wandb", "mlflow", "aim") if importlib.util.find_spec(name) is None), None)
    if missing is None:
        pytest.skip("wandb, mlflow and aim are all installed here")
    args = quick(tmp_path / "out", "--with_tracking", "--report_to", missing)
    with pytest.raises(cli.UsageError, match=f"--report_to {missing}: the {missing} package is not installed"):
        finetune.parse_args(args)


def test_unknown_names_fail_before_any_hub_lookup(monkeypatch, tmp_path):
    def no_hub(*args, **kwargs):
        raise AssertionError("went to the Hub")

    monkeypatch.setattr(finetune.transformers.AutoConfig, "from_pretrained", no_hub)
    args = finetune.parse_args(["--model_name_or_path", "ViT-L_61", "--output_dir", str(tmp_path)])
    with pytest.raises(cli.UsageError, match=r"did you mean 'ViT-L_16'"):
        models.check_model_names(args)
    for name in ("google/vit-base-patch16-224", "ViT-B_16", "imagenet21k+imagenet2012/ViT-L_16"):  # Hub id, official
        models.check_model_names(finetune.parse_args(["--model_name_or_path", name, "--output_dir", str(tmp_path)]))


# ---- through the launcher: exit status and one line


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "finetune.py: error:" in line]


@pytest.mark.parametrize("launch", ["python", "accelerate", "accelerate, 2 processes"])
def test_an_error_is_one_line_through_each_launch_form(launch, tmp_path):
    launcher = {"python": None, "accelerate": SINGLE, "accelerate, 2 processes": two_processes()}[launch]
    args = quick(tmp_path / "out", "--config_overrides", "hiden_size=64")
    result = run_script(args, tmp_path / "home", launcher=launcher)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = "finetune.py: error: --config_overrides: 'hiden_size' is not a field of the model's config"
    assert error_lines(result.stderr)[0].startswith(line)
    if launch == "python":
        assert result.returncode == 2 and result.stderr.strip() == error_lines(result.stderr)[0]
    elif launch == "accelerate":  # accelerate's simple launcher turns any failure into 1
        assert result.returncode == 1 and result.stderr.strip() == error_lines(result.stderr)[0]
    else:  # printed once, by the main process; torchrun's summary then names it as the root cause (whether it
        # also lists rank 1 with the line, or as stopped by the agent, depends on which rank ends first)
        assert result.returncode == 1, result.stderr
        assert len([text for text in error_lines(result.stderr) if text.startswith("finetune.py")]) == 1
        root_cause = result.stderr[result.stderr.index("Root Cause") :]
        assert f"traceback : {line}" in root_cause
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_the_final_model_is_written_says_so_and_how_to_resume(in_process, tmp_path, monkeypatch):
    # It reached the top level as "interrupted before training started; nothing was trained."
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    plot = report.plot_training_curves
    monkeypatch.setattr(report, "plot_training_curves", ctrl_c)
    output = tmp_path / "out"
    with pytest.raises(cli.Interrupted, match="interrupted while writing the final model, after step 4 of 4; the"):
        in_process(quick(output, "--max_train_steps", "4", "--checkpointing_steps", "2"))
    monkeypatch.setattr(report, "plot_training_curves", plot)
    assert (
        in_process(quick(output, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"))["train_steps"] == 4
    )


@pytest.mark.parametrize("processes", [1, 2])
def test_ctrl_c_under_accelerate_launch_ends_with_one_line_saying_how_to_resume(processes, tmp_path):
    output = tmp_path / "out"
    launcher = SINGLE if processes == 1 else two_processes()
    process = subprocess.Popen(
        [*launcher, str(SCRIPT), *RUN, "--output_dir", str(output)],
        env=environment(tmp_path / "home"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    deadline = time.time() + 240
    while not (output / "checkpoints" / "step_000050").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends: every process of the group
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("finetune.py: interrupted at step ") and " of 400; the last checkpoint is " in last
    assert last.endswith("Continue with the same command and --resume_from_checkpoint latest.")
    checkpoint = Path(last.split("the last checkpoint is ")[1].split(". Continue")[0])
    assert checkpoint.is_dir() and checkpoint == run_folder.checkpoint_folders(output)[-1]


# ---- the install


def test_a_clone_named_hf_vit_does_not_shadow_the_package_from_its_parent_folder(tmp_path):
    # With a clone named hf_vit (the repository's name) in the current folder, `import hf_vit` found the clone as an
    # empty namespace package: the editable install's import hook ran after the current folder was searched.
    # pyproject.toml's package-dir makes the install a sys.path entry instead, searched before namespace packages win.
    (tmp_path / "hf_vit").symlink_to(ROOT, target_is_directory=True)  # the clone, seen from its parent folder
    code = (
        "import numpy as np, PIL.Image, hf_vit\n"
        "from transformers import pipeline\n"
        "config = hf_vit.VisionTransformerConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,"
        " num_attention_heads=4, intermediate_size=37, num_labels=3)\n"
        "hf_vit.VisionTransformerForImageClassification(config).save_pretrained('model')\n"
        "image = PIL.Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))\n"
        "print(hf_vit.__file__, len(pipeline('image-classification', model='model')(image)))\n"
    )
    env = {**environment(tmp_path / "home"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(ROOT / "hf_vit" / "__init__.py"), "3"]
