"""`python -m teachers list`: registered teacher models (params, multiply-adds, embedding dim, input size) and the
knowledge caches shipped in teachers/zoo (which `--teacher NAME` uses with no weights on the machine)."""
from __future__ import annotations

from facekd.io import cli_main
from facekd.models import list_main


@cli_main
def main(argv: list[str] | None = None) -> int:
    from teachers.cache import format_zoo_table, zoo_table

    return list_main("teacher", argv, prog="python -m teachers",
                     extra=("caches", "Shipped knowledge caches (teachers/zoo; `--teacher NAME` uses them, no weights needed)",
                            zoo_table, format_zoo_table))


if __name__ == "__main__":
    raise SystemExit(main())
