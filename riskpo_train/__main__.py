"""``python -m riskpo_train [options]`` trains; ``python -m riskpo_train compare RUN...``
compares finished runs. Installed as the ``riskpo-train`` command."""

from __future__ import annotations

import sys

# The modules of the `train` extra (pyproject.toml) the trainer imports, each
# where it is first needed, -> the distribution that provides it.
TRAIN_EXTRA_MODULES = {"transformers": "transformers", "tokenizers": "tokenizers", "tqdm": "tqdm",
                       "yaml": "pyyaml", "matplotlib": "matplotlib", "math_verify": "math-verify",
                       "pyarrow": "pyarrow"}
TRAIN_EXTRA_INSTALL = 'pip install "riskpo-kernels[train]"'


def missing_train_extra(exc: ImportError) -> str | None:
    """The one-line message for a module of the train extra that is not
    installed (a plain ``pip install riskpo-kernels``), else None."""
    name = (getattr(exc, "name", None) or "").partition(".")[0]
    if not isinstance(exc, ModuleNotFoundError) or name not in TRAIN_EXTRA_MODULES:
        return None
    return (f"the trainer needs {TRAIN_EXTRA_MODULES[name]} (no module named {name!r}), "
            f"one of its optional dependencies: {TRAIN_EXTRA_INSTALL}")


def _main(argv) -> int:
    if argv and argv[0] == "compare":
        from .compare import main as compare_main

        return compare_main(argv[1:])
    if argv and argv[0] == "train":
        argv = argv[1:]
    from .config import OptionError
    from .trainer import main as train_main

    try:
        return train_main(argv)
    except OptionError as exc:
        # One line naming the flag, argparse's parser.error style, not a traceback.
        print(f"riskpo-train: error: {exc}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except ModuleNotFoundError as exc:
        message = missing_train_extra(exc)
        if message is None:
            raise
        print(f"riskpo-train: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
