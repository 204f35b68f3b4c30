"""`ddpm-seg report`: collect finished runs' metrics.json into a table laid out like the paper's.

Runs live in <root>/<dataset>/<method folder>[/<steps_blocks>]/seed_<N>/metrics.json (train-interpreter
writes metrics.json last, so its presence marks a finished run). Rows are methods, columns datasets,
and each cell is the mIoU in percent as mean ± sample std over seeds, with the number of seeds.
Writes <out>.md and <out>.csv.
"""

import argparse
import csv
import os
import statistics

from ..files import atomic_path, check_writable, read_json_object

# The paper's column order and headers; datasets it does not have (e.g. demo) follow, sorted.
PAPER_DATASETS = {
    "bedroom_28": "Bedroom-28",
    "ffhq_34": "FFHQ-34",
    "cat_15": "Cat-15",
    "horse_21": "Horse-21",
    "celeba_19": "CelebA-19",
    "ade_bedroom_30": "ADE-Bedroom-30",
}


def _check_metrics(path: str, metrics: dict) -> None:
    expected = {"miou": ((int, float), "a number"), "seed": (int, "an integer"),
                "model_type": (str, "a string"), "random_init": (bool, "true or false")}
    for key, (kind, words) in expected.items():
        value = metrics.get(key)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"{path}: {key!r} must be {words}, got {value!r}")
    if not 0 <= metrics["miou"] <= 1:
        raise ValueError(f"{path}: 'miou' must be a fraction in [0, 1], got {metrics['miou']!r}")


def collect_runs(root: str) -> list:
    """Every metrics.json under `root`, each as {"dataset", "config", "path", **metrics}."""
    runs = []
    for folder, _, files in sorted(os.walk(root)):
        if "metrics.json" not in files:
            continue
        path = os.path.join(folder, "metrics.json")
        parts = os.path.relpath(folder, root).split(os.sep)
        if len(parts) < 3:
            raise ValueError(f"{path}: expected <root>/<dataset>/<method>[/<steps_blocks>]/seed_<N>/metrics.json")
        metrics = read_json_object(path, "run metrics")
        _check_metrics(path, metrics)
        # config: the method folder and any steps/blocks folder, which tell configurations of one method apart
        runs.append(dict(metrics, dataset=parts[0], config="/".join(parts[1:-1]), path=path))
    return runs


def summarize(runs: list) -> list:
    """One entry per (method row, dataset) in table order: mIoU % mean, sample std (None for one seed), seeds."""
    def base_label(run):
        return run["model_type"] + (" + random init" if run["random_init"] else "")

    configs = {}
    for run in runs:
        configs.setdefault(base_label(run), set()).add(run["config"])
    groups = {}
    for run in runs:
        label = base_label(run)
        if len(configs[label]) > 1:  # several configurations of one method: name each row by its folder
            label = f"{label} ({run['config']})"
        groups.setdefault((label, run["dataset"]), []).append(run)
    order = dataset_order({dataset for _, dataset in groups})
    cells = []
    for (method, dataset), group in sorted(groups.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))):
        values = [100 * run["miou"] for run in group]
        cells.append({
            "method": method,
            "dataset": dataset,
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values),
            "seeds": sorted(run["seed"] for run in group),
        })
    return cells


def dataset_order(datasets) -> list:
    paper = [d for d in PAPER_DATASETS if d in datasets]
    return paper + sorted(set(datasets) - set(paper))


def format_cell(cell: dict) -> str:
    if cell["std"] is None:
        return f"{cell['mean']:.1f} ({cell['n']})"
    return f"{cell['mean']:.1f} ± {cell['std']:.1f} ({cell['n']})"


def format_markdown(cells: list) -> str:
    datasets = dataset_order({c["dataset"] for c in cells})
    methods = sorted({c["method"] for c in cells})
    by_key = {(c["method"], c["dataset"]): c for c in cells}
    lines = [
        "mIoU (%): mean ± sample std over seeds (number of seeds)",
        "",
        "| Method | " + " | ".join(PAPER_DATASETS.get(d, d) for d in datasets) + " |",
        "|:--" * (len(datasets) + 1) + "|",
    ]
    for method in methods:
        row = [format_cell(by_key[method, d]) if (method, d) in by_key else "--" for d in datasets]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_report(root: str, out: str) -> tuple:
    """Write <out>.md and <out>.csv from the runs under `root`; returns their paths."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} is not a folder of runs (expected e.g. pixel_classifiers/)")
    check_writable(os.path.dirname(os.path.abspath(out)))
    cells = summarize(collect_runs(root))
    if not cells:
        raise FileNotFoundError(f"no finished runs (metrics.json) under {root}")
    md_path, csv_path = out + ".md", out + ".csv"
    with atomic_path(md_path) as tmp, open(tmp, "w") as f:
        f.write(format_markdown(cells))
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "dataset", "miou_mean", "miou_std", "n_seeds", "seeds"])
        for c in cells:
            std = "" if c["std"] is None else f"{c['std']:.4f}"
            seeds = " ".join(str(s) for s in c["seeds"])
            writer.writerow([c["method"], c["dataset"], f"{c['mean']:.4f}", std, c["n"], seeds])
    return md_path, csv_path


def main(argv):
    parser = argparse.ArgumentParser(prog="ddpm-seg report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder of runs, e.g. pixel_classifiers/")
    parser.add_argument("--out", default=None, help="output path without extension (default: <root>/report)")
    args = parser.parse_args(argv)
    md_path, csv_path = write_report(args.root, args.out or os.path.join(args.root, "report"))
    with open(md_path) as f:
        print(f.read(), end="")
    print(f"wrote {md_path} and {csv_path}")
    return 0
