"""``sparsecraft train RECIPE.yaml``: the built-in sparse-training experiments from the shell."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """examples:
  sparsecraft train examples/train.yaml
  sparsecraft train examples/train.yaml --out runs/rigl90 --set method=rigl --set sparsity=0.9
  sparsecraft train examples/train.yaml --no-resume     # start over even if a checkpoint exists
"""


def _assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set needs KEY=VALUE, got '{text}'")
    return key, value


def register(sub) -> dict:
    p = sub.add_parser(
        "train", help="train a built-in model on a built-in data set with a sparse-training method",
        description="Train with static masks, GMP, IMP, SET, RigL or N:M recipes; checkpoints "
                    "every checkpoint_every steps into --out and resumes from them.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="YAML file with the TrainRecipe fields (optionally under 'train:')")
    p.add_argument("--out", default=None, help="folder for checkpoints, model and report (default: from the recipe's 'out', else train_out)")
    p.add_argument("--set", dest="overrides", type=_assignment, action="append", default=[],
                   metavar="KEY=VALUE", help="override a recipe field (YAML value syntax)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    return {"train": _cmd_train}


def _cmd_train(args) -> int:
    from pathlib import Path

    import yaml

    from ..errors import ConfigError
    from .runner import TrainRecipe, run_training

    path = Path(args.recipe)
    if not path.is_file():
        raise ConfigError(f"recipe file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe '{path}' is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{path}' must be a mapping")
    out = args.out or data.pop("out", None) or "train_out"
    fields = dict(data.get("train", data))
    fields.pop("out", None)
    for key, value in args.overrides:
        fields[key] = yaml.safe_load(value)
    recipe = TrainRecipe.from_dict(fields)
    result = run_training(recipe, out, resume=not args.no_resume, progress=not args.quiet)
    summary = {k: result[k] for k in ("test_accuracy", "sparsity", "step", "train_seconds") if k in result}
    sys.stdout.write(
        f"trained {recipe.model} on {recipe.data} with {recipe.method}: test accuracy "
        f"{result['test_accuracy']:.4f}, sparsity {result['sparsity']:.4f}, {result['step']} steps in "
        f"{result['train_seconds']:.1f} s; model, checkpoint and report in {out}\n"
    )
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0
