"""`openmm-stable compare before=DIR after=DIR --out DIR`: tables and plots of simulate runs."""
from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="compare `simulate` output folders (table; survival, h(r) or RDF, and "
                                               "VACF plots)")
    p.add_argument("runs", nargs="+", help="LABEL=FOLDER for each simulate output folder")
    p.add_argument("--out", required=True, help="folder for comparison.txt/.json and the plots")
    p.set_defaults(func=run)


def run(args) -> int:
    from openmm_stable.errors import InputError
    from openmm_stable.report import compare_runs

    runs = {}
    for item in args.runs:
        label, sep, folder = item.partition("=")
        if not sep:
            label, folder = Path(item).name, item
        if label in runs:
            raise InputError(f"label {label!r} given twice; name the runs LABEL=FOLDER")
        runs[label] = Path(folder)  # compare_runs reads (and checks) every metrics.json before writing anything
    print(compare_runs(runs, args.out))
    names = [n for n in ("survival.png", "hr.png", "rdf.png", "vacf.png") if (Path(args.out) / n).exists()]
    print("plots: " + ", ".join(f"{args.out}/{name}" for name in names))
    return 0
