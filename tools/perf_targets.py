#!/usr/bin/env python
"""Check benchmark results against the performance targets and print the markdown table.

    python tools/perf_targets.py OUT                 # OUT/*.json and OUT/rows.tsv of perf_suite.sh
    python tools/perf_targets.py OUT/gpu_*.json      # or result files

Rows are matched by file name (``gpu_backbone_fast.json`` -> ``backbone_fast``); the targets,
their rows and checks are in ``convmae_det/benchmark/targets.py``. Exit code 0 whatever the
statuses (2 on bad arguments); ``--strict`` exits 1 unless every target is PASS.
"""

import argparse
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_targets():
    # by file path: the module needs the standard library only, and importing the package would
    # import torch and detectron2 (seconds), which printing a table does not need
    path = os.path.join(ROOT, "convmae_det", "benchmark", "targets.py")
    spec = importlib.util.spec_from_file_location("convmae_det_perf_targets", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building classes
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="result folder(s) or JSON files")
    parser.add_argument("--title", default=None, help="a line printed above the table")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless every target passes")
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not os.path.exists(p)]
    if missing:
        parser.error(f"not found: {', '.join(missing)}")
    targets = _load_targets()
    results = targets.load_results(args.paths)
    status = {}
    for folder in {p if os.path.isdir(p) else os.path.dirname(p) or "." for p in args.paths}:
        status.update(targets.load_row_status(os.path.join(folder, "rows.tsv")))
    evaluations = targets.evaluate(results, status)
    if args.title:
        print(args.title + "\n")
    print(targets.markdown_table(evaluations, results))
    if args.strict and any(ev.status != "PASS" or ev.differs for ev in evaluations):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
