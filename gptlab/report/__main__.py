"""`python -m gptlab.report PATH`: print and write the report of a sweep, a run or an outputs directory."""

from __future__ import annotations

import argparse

from gptlab.run.job import run
from gptlab.report import report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gptlab.report",
        description="Table of a sweep's jobs by the optimised metric, with report.md, report.csv and plots "
        "written into the sweep directory. An outputs directory: one report per sweep (and runs/) under it.",
    )
    parser.add_argument("path", help="a sweep directory, a run directory or an outputs directory")
    parser.add_argument("--no-write", action="store_true", help="only print the tables")
    parser.add_argument("--metric", action="append", default=[],
                        help="a logged metric whose final and best values the groups' statistics show (first: the "
                        "one compared and plotted), beside val/loss and val/bpb; repeatable")
    parser.add_argument("--baseline", help="the group the others are compared with: its name or overrides, e.g. "
                        "'model.pos=learned' (default: the group of the first job)")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # files only, also without a display
    run(lambda: show(args.path, write=not args.no_write, metrics=args.metric, baseline=args.baseline), run_dir=None)


def show(path: str, write: bool, metrics: list[str] | None = None, baseline: str | None = None) -> None:
    for i, rep in enumerate(report(path, write=write, metrics=metrics, baseline=baseline)):
        print(("\n" if i else "") + f"{rep.group}: {len(rep.jobs)} jobs, by {rep.jobs[0].metric} (best first)")
        print(rep.table)
        for note in rep.notes:
            print(f"note: {note}")
        if rep.files:
            print("wrote " + ", ".join(p.name for p in rep.files) + f" in {rep.group}")


if __name__ == "__main__":
    main()
