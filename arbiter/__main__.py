"""``python -m arbiter`` and the ``arbiter`` console script."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the command line; without the ``cli`` extra, say how to install it and exit 2."""
    try:
        from .cli import main as cli_main
    except ImportError as exc:
        print(
            f"arbiter: the command line needs the cli extra ({exc.name} is missing): "
            "pip install 'gpu-arbiter[cli]'",
            file=sys.stderr,
        )
        return 2
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
