"""``python -m riskpo_train [options]`` trains; ``python -m riskpo_train compare RUN...``
compares finished runs. Installed as the ``riskpo-train`` command."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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


if __name__ == "__main__":
    sys.exit(main())
