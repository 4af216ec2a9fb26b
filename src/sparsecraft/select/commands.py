"""``sparsecraft select``: QuickSelection on a table of numbers (.npy, .npz or .csv).

Light on imports on purpose: the CLI imports this module to build its parser.

  sparsecraft select --data X.csv --k 50 --out sel/     # sel/selected.npy, sel/selection.json
"""

from __future__ import annotations

import argparse

from ..cli_args import add_overwrite, check_output, int_arg, number_arg, write_line


def register(subparsers) -> dict:
    p = subparsers.add_parser(
        "select", help="unsupervised feature selection (QuickSelection: sparse denoising autoencoder + SET)",
        description="Select --k features of --data (rows = samples, columns = features) by the input-neuron "
                    "strength of a sparse denoising autoencoder trained with SET. Writes selected.npy (the "
                    "chosen columns) and selection.json (indices, importances, settings) to --out.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="FILE", help="samples x features (.npy, .npz, .csv)")
    p.add_argument("--k", type=int_arg("k"), required=True, help="number of features to select")
    p.add_argument("--hidden", type=int_arg("hidden"), default=1000, help="hidden neurons (default 1000)")
    p.add_argument("--epsilon", type=number_arg("epsilon", minimum=0.0, exclusive=True), default=13.0,
                   help="connections per layer = epsilon * (inputs + hidden) (default 13)")
    p.add_argument("--epochs", type=int_arg("epochs"), default=10, help="training epochs (default 10)")
    p.add_argument("--scale", choices=("standard", "minmax", "none"), default="standard",
                   help="feature scaling before training: standard (default), minmax onto [0, 1], none")
    p.add_argument("--seed", type=int_arg("seed", minimum=0), default=0, help="random seed")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for selected.npy and selection.json")
    add_overwrite(p)
    return {"select": run}


def run(args) -> int:
    import time

    from ..recovery.commands import _json, _load, _npy_bytes, _write
    from .quickselection import QuickSelection

    out = check_output(args.out, overwrite=args.overwrite, kind="folder")
    X, header = _load(args.data, "--data", real=True)
    if X.ndim != 2:
        from ..errors import FormatError

        raise FormatError(f"--data must be a 2-D table [samples, features], got shape {X.shape}")
    qs = QuickSelection(n_features_to_select=args.k, hidden=args.hidden, epsilon=args.epsilon,
                        epochs=args.epochs, scale=args.scale, random_state=args.seed)
    start = time.perf_counter()
    qs.fit(X)
    seconds = time.perf_counter() - start
    idx = qs.get_support(indices=True)
    result = {"selected": [int(i) for i in qs.ranking_[: args.k]],
              "names": [header[i] for i in qs.ranking_[: args.k]] if header else None,
              "importances": [float(v) for v in qs.feature_importances_], "connections": int(qs.n_connections_),
              "fit_seconds": seconds, "settings": qs.get_params()}
    _write(out, {"selected.npy": _npy_bytes(X[:, idx]), "selection.json": _json(result)}, "select")
    write_line(f"selected {args.k} of {X.shape[1]} features in {seconds:.1f} s "
               f"({qs.n_connections_} connections); wrote {out / 'selected.npy'} and {out / 'selection.json'}")
    return 0
