"""Paired comparison of finished runs on the same verification pairs: `python -m results.compare RUN RUN [...]`.

Each RUN is a run directory holding `metrics.json` with the per-pair decisions of its final evaluation (`distill.run`
students, `results.study` runs: `runs/NAME/VARIANT/seedS`, `runs/NAME/student`), optionally labelled `LABEL=DIR`.
The first run is the reference: every other run gets its accuracy, the difference in points, the discordant pairs
(reference right and this run wrong, and the other way round) and the exact McNemar p-value on the pairs both were
evaluated on. Runs trained with different teachers but the same seed, data order and budget are compared this way
(`results.study` does it within one study, against no KD); a difference is claimed only where p is small.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from evaluate.metrics import decode_pair_correct, mcnemar_exact, paired_discordance
from facekd.io import FacekdError, cli_main, read_json


def load_run(spec: str) -> tuple[str, dict[str, Any]]:
    """(label, {set name: metrics}) of `LABEL=DIR` or `DIR` (label: the path below runs/, else the path)."""
    label, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
    folder = Path(path)
    metrics_path = folder / "metrics.json" if folder.is_dir() else folder
    if not metrics_path.is_file():
        raise FacekdError(f"{spec}: no metrics.json there (a finished distill.run or results.study run directory)")
    val = read_json(metrics_path, "run metrics").get("val") or {}
    if not label:
        parts = folder.parts
        label = "/".join(parts[parts.index("runs") + 1:]) if "runs" in parts else str(folder)
    return label, val


def compare(runs: list[tuple[str, dict[str, Any]]], set_name: str | None = None) -> list[dict[str, Any]]:
    """One row per run on the chosen set (default: the one set all runs share, if exactly one), the first run
    being the reference: accuracy, points vs the reference, discordant pairs (b: reference right only, c: this run
    right only), exact McNemar p."""
    if len(runs) < 2:
        raise FacekdError("give at least two runs: the reference first")
    shared = set.intersection(*(set(val) for _, val in runs))
    if set_name is None:
        if len(shared) != 1:
            raise FacekdError(f"the runs share the sets {sorted(shared) or 'none'}: choose one with --set")
        set_name = next(iter(shared))
    elif set_name not in shared:
        raise FacekdError(f"--set {set_name}: not evaluated by every run (shared: {sorted(shared) or 'none'})")
    decisions = []
    for label, val in runs:
        text = val[set_name].get("pair_correct")
        if not text:
            raise FacekdError(f"{label}: its metrics.json has no per-pair decisions for {set_name} (re-evaluate it, "
                              "e.g. results.study --adopt)")
        decisions.append(decode_pair_correct(text))
    ref_label, ref_val = runs[0]
    rows = []
    for i, ((label, val), correct) in enumerate(zip(runs, decisions)):
        acc = float(val[set_name]["accuracy"])
        row = {"run": label, "set": set_name, "pairs": int(correct.size), "accuracy": acc}
        if i:
            b, c = paired_discordance([decisions[0]], [correct])
            row.update(vs=ref_label, points=round(100 * (acc - float(ref_val[set_name]["accuracy"])), 4),
                       ref_only_right=b, only_this_right=c, mcnemar_p=mcnemar_exact(b, c))
        rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    width = max(len(r["run"]) for r in rows)
    head = (f"{'run':<{width}}  {'accuracy %':>10}  {'vs ref pts':>10}  {'ref only right':>14}  "
            f"{'this only right':>15}  McNemar p")
    lines = [f"{rows[0]['set']}, {rows[0]['pairs']} pairs; reference: {rows[0]['run']}", head, "-" * len(head)]
    for r in rows:
        if "vs" not in r:
            lines.append(f"{r['run']:<{width}}  {100 * r['accuracy']:>10.2f}  {'reference':>10}")
            continue
        lines.append(f"{r['run']:<{width}}  {100 * r['accuracy']:>10.2f}  {r['points']:>+10.2f}  "
                     f"{r['ref_only_right']:>14}  {r['only_this_right']:>15}  {r['mcnemar_p']:.2g}")
    return "\n".join(lines)


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m results.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("runs", nargs="+", metavar="RUN", help="[LABEL=]DIR of a finished run; the first is the reference")
    p.add_argument("--set", dest="set_name", help="verification set (default: the one set every run evaluated)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    rows = compare([load_run(spec) for spec in args.runs], args.set_name)
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
