"""The optimizers the example scripts offer: `OPTIMIZERS` maps each `--optimizer` name to the function that makes it
from the flags, `describe_optimizer` says what it is from the object itself (for the model card), so a new optimizer
is one entry in `OPTIMIZERS` and the card cannot describe another one than the run used."""

import argparse

import torch


def _fused(device: torch.device) -> bool | None:
    return True if device.type == "cuda" else None  # one kernel for all parameters on a GPU


# --optimizer name -> (args, parameters, device) -> the optimizer
OPTIMIZERS = {
    "sgd": lambda args, parameters, device: torch.optim.SGD(
        parameters, lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay, fused=_fused(device)
    ),
    "adamw": lambda args, parameters, device: torch.optim.AdamW(
        parameters, lr=args.learning_rate, weight_decay=args.weight_decay, fused=_fused(device)
    ),
}


def add_optimizer_arguments(group) -> None:
    group.add_argument(
        "--optimizer",
        choices=list(OPTIMIZERS),
        default="sgd",
        help="sgd: SGD with momentum, the paper's fine-tuning recipe; adamw: AdamW (betas 0.9, 0.999), as "
        "transformers' examples and most ViT fine-tuning recipes use, usually with --weight_decay 0.05 and a "
        "learning rate around 1e-4.",
    )
    group.add_argument("--learning_rate", type=float, default=0.03)
    group.add_argument("--momentum", type=float, default=0.9, help="SGD's momentum (--optimizer sgd).")
    group.add_argument(
        "--weight_decay",
        type=float,
        default=0.0,
        help="sgd: L2 penalty added to the gradient; adamw: decoupled weight decay (applied to every parameter).",
    )


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    return OPTIMIZERS[args.optimizer](args, model.parameters(), device)


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, object]:
    """The model card's rows for the optimizer, read from the object (an accelerate-wrapped one too)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    group = optimizer.param_groups[0]
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.SGD):
        name += f", momentum {group['momentum']}" + (", Nesterov" if group["nesterov"] else "")
    elif "betas" in group:
        name += f", betas {tuple(group['betas'])}, eps {group['eps']}"
    # initial_lr: set by the scheduler, the peak of the schedule (lr is the current step's)
    return {
        "optimizer": name,
        "learning_rate": group.get("initial_lr", group["lr"]),
        "weight_decay": group["weight_decay"],
    }


def apply_changed_arguments(args: argparse.Namespace, optimizer, lr_scheduler) -> None:
    """After a resume with --allow_changed_arguments: train with this command's optimizer hyper-parameters.

    A checkpoint's optimizer and scheduler states carry the values of the run that wrote them (load_state_dict
    restores each parameter group's lr, initial_lr, momentum, weight decay), which would silently keep the old ones."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    for group in optimizer.param_groups:
        group["initial_lr"], group["weight_decay"] = args.learning_rate, args.weight_decay
        if "momentum" in group:
            group["momentum"] = args.momentum
    scheduler.base_lrs = [args.learning_rate for _ in optimizer.param_groups]
    # transformers' schedulers are LambdaLR: the current lr is the new peak times the schedule's factor at this step
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = args.learning_rate * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
