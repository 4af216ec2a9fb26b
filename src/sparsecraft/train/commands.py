"""``sparsecraft train RECIPE.yaml``: the built-in sparse-training experiments from the shell."""

from __future__ import annotations

import argparse
import json

from ..cli_args import assignment_arg, write_line

EPILOG = """examples:
  sparsecraft train examples/train.yaml
  sparsecraft train examples/train.yaml --out train-gmp-95 --set method=gmp --set sparsity=0.95
  sparsecraft train examples/train.yaml --no-resume --overwrite   # start the run in --out over

--out continues the training run it holds (a checkpoint of the same recipe); it never
writes into a folder that holds anything else. Values of --set are YAML (pattern=2:4 is a string).
"""


def register(sub) -> dict:
    p = sub.add_parser(
        "train", help="train a built-in model on a built-in data set with a sparse-training method",
        description="Train with static masks, GMP, IMP, SET, RigL, N:M or Bayesian (vi, vd, ard, ssvi, turbo-vbi) recipes; checkpoints "
                    "every checkpoint_every steps into --out and resumes from them.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="YAML file with the TrainRecipe fields (optionally under 'train:')")
    p.add_argument("--out", default=None,
                   help="folder for checkpoints, model and report (default: the recipe's 'out', else train_out)")
    p.add_argument("--set", dest="overrides", type=assignment_arg, action="append", default=[],
                   metavar="KEY=VALUE", help="override a recipe field (YAML value syntax); repeatable")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if --out holds a checkpoint (with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --no-resume: replace the training run in --out")
    return {"train": cmd_train}


def _recipe_fields(args) -> tuple[dict, str]:
    """The recipe's fields with --set applied, and the output folder; nothing is built yet."""
    from collections.abc import Mapping

    from ..errors import ConfigError
    from ..yaml_io import load_yaml_file, parse_value

    data = load_yaml_file(args.recipe, "train recipe")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"train recipe '{args.recipe}' must be a mapping of fields, got {type(data).__name__}")
    fields = data["train"] if "train" in data else data
    if not isinstance(fields, Mapping):
        raise ConfigError(f"train recipe '{args.recipe}': 'train' must be a mapping of fields")
    fields = dict(fields)
    out = args.out or data.get("out") or fields.get("out") or "train_out"
    fields.pop("out", None)
    if not isinstance(out, str):
        raise ConfigError(f"train recipe '{args.recipe}': 'out' must be a string, got {out!r}")
    for key, value in args.overrides:
        fields[key] = parse_value(value, f"--set {key}")
    return fields, out


def cmd_train(args) -> int:
    from ..errors import config_fields
    from ..outputs import check_train_out, write_marker
    from ..yaml_io import check_types
    from .runner import TrainRecipe, run_training

    fields, out = _recipe_fields(args)
    check_types(TrainRecipe, config_fields(TrainRecipe, fields, "train recipe", "train recipe: unknown keys"),
                "train recipe")
    recipe = TrainRecipe.from_dict(fields)
    out_path = check_train_out(out, overwrite=args.overwrite, resume=not args.no_resume)
    result = run_training(recipe, out_path, resume=not args.no_resume, progress=not args.quiet)
    if out_path.is_dir():
        write_marker(out_path, "train")
    if not result.get("finished", True) or "test_accuracy" not in result:
        write_line(f"stopped {recipe.model} on {recipe.data} at step {result['step']}; run again to continue")
        return 0
    summary = {k: result[k] for k in ("test_accuracy", "sparsity", "step", "train_seconds") if k in result}
    write_line(
        f"trained {recipe.model} on {recipe.data} with {recipe.method}: test accuracy "
        f"{result['test_accuracy']:.4f}, sparsity {result['sparsity']:.4f}, {result['step']} steps in "
        f"{result['train_seconds']:.1f} s; model, checkpoint and report in {out}"
    )
    write_line(json.dumps(summary))
    return 0
