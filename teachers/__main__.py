"""`python -m teachers list`: registered teacher models with params, multiply-adds, embedding dim, input size."""
from __future__ import annotations

from facekd.io import cli_main
from facekd.models import list_main


@cli_main
def main(argv: list[str] | None = None) -> int:
    return list_main("teacher", argv, prog="python -m teachers")


if __name__ == "__main__":
    raise SystemExit(main())
