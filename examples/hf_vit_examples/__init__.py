"""What the example scripts share, one module per concern; the scripts (finetune.py, ...) read top to bottom.

- `cli`: errors as one line and their exit codes (2 bad input, 1 a failed run, 130 Ctrl-C), signals, torchrun's
  error file, transient progress lines, the run-defining argument groups.
- `data`: datasets (Hub, save_to_disk, image folders, scikit-learn's digits), splits, decoding, loaders.
- `models`: model names and config overrides checked offline, the model built, converted or loaded, its
  normalisation.
- `augmentation`: the training augmentations, one class each with its flags.
- `optimizer`: the optimizers, built and described by one function each.
- `metrics`: the evaluation metrics, one dict.
- `preprocessing`: the evaluation preprocessings (the model's image processor, vit_jax's, timm's crop).
- `fewshot`: big_vision's few-shot linear evaluation (closed-form ridge regression on the representation).
- `run_folder`: the output folder a run owns, its checkpoints, resume; an evaluation's output folder.
- `training_log`: progress bar, loss reads, the NaN stop, throughput, trackers, history.
- `report`: results, model card, plots, push to the Hub; an evaluation's results and card entries.

The package has a name of its own so that it can shadow nothing installed; a script finds it as any script finds
the modules beside it (its folder is the first entry of sys.path).
"""
