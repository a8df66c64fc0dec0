"""Draw the learning curves of the recorded results grids, from the per-epoch log kept with each run
(results/<grid>/<run>.metrics.jsonl, written by tools/reproduce.py):

    docs/img/<grid>-acc.png     test accuracy of each method's deployed model per epoch, mean
                                over seeds, light band = min-max over seeds; baseline dashed black
    docs/img/<grid>-losses.png  one panel per method: each logged loss term per epoch (mean over
                                seeds, log scale), and the ramp-up weight w(e) where one is logged
    docs/img/<grid>-internals.png  what happens inside each method, measured on the test set every
                                epoch (the 'int/...' entries; docs/tutorial.md, section 9): DML's peer agreement,
                                ONE's gate, OKDDip's attention (last epoch) and its entropy, PCL's gap
                                between each peer and its temporal mean, FFSD's attention-map distance

    python tools/plot.py                # every grid in results/ with per-epoch logs (make plot)
    python tools/plot.py --grids tiny --out docs/img

Your own runs instead (each a training run's --out folder, finished or not): one curve per run,
written as runs-acc.png, runs-losses.png (and runs-internals.png) into --out (default: the folder holding the first run):

    python tools/plot.py runs/lab1/baseline runs/lab1/dml     # -> runs/lab1/runs-acc.png, ...

Needs matplotlib, an optional extra used by nothing else here: pip install -r requirements-plot.txt.
Reading and averaging the logs (load_curves, band) does not need it.
"""
import argparse
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["baseline", "dml", "one", "okddip", "pcl", "ffsd"]
NOT_LOSSES = {"epoch", "lr", "sec", "images", "images_per_s", "w"}  # logged, but not loss terms


def fail(msg):
    raise SystemExit(f"error: {msg}")


def load_curves(results_dir, grids=None):
    """{grid: {label: {'method', 'arch', 'data', 'deployed', 'seeds': [...], 'rows': [[epoch rows]
    per seed], 'synthetic'}}} for every recorded run that has a per-epoch log. label = the method,
    plus arch / data / epochs where a grid holds several."""
    out = {}
    names = sorted(os.listdir(results_dir)) if os.path.isdir(results_dir) else []
    for grid in names:
        d = os.path.join(results_dir, grid)
        if not os.path.isdir(d) or (grids and grid not in grids):
            continue
        groups = {}
        for name in sorted(os.listdir(d)):
            log = os.path.join(d, name[:-len(".json")] + ".metrics.jsonl")
            if not name.endswith(".json") or not os.path.isfile(log):
                continue
            with open(os.path.join(d, name)) as f:
                r = json.load(f)
            with open(log) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            key = (r["method"], r["arch"], r["data"], r["epochs"])
            g = groups.setdefault(key, dict(method=r["method"], arch=r["arch"], data=r["data"],
                                             seeds=[], rows=[], deployed=r["deployed"],
                                             synthetic=r.get("synthetic", False)))
            g["seeds"].append(r["seed"])
            g["rows"].append(rows)
        if not groups:
            continue
        several = {k: len({key[i] for key in groups}) > 1
                   for i, k in ((1, "arch"), (2, "data"), (3, "epochs"))}
        labelled = {}
        for key in sorted(groups, key=lambda k: (ORDER.index(k[0]) if k[0] in ORDER else 99, k)):
            extra = [str(v) for v, k in zip(key[1:], ("arch", "data", "epochs")) if several[k]]
            labelled[" ".join([key[0], *extra])] = groups[key]
        out[grid] = labelled
    return out


# A run still in progress has no final.json naming its deployed model yet: each method's own.
DEPLOYED = {"baseline": "net", "dml": "peer1", "one": "branch1", "okddip": "leader", "pcl": "mt_peer1",
            "ffsd": "leader"}


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_runs(paths):
    """{label: group} as load_curves' groups, one per run folder (a training run's --out: config.json,
    metrics.jsonl, and final.json once finished). label = the folder's name (its path if two share it)."""
    groups = {}
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    for path, name in zip(paths, names):
        config = _read_json(os.path.join(path, "config.json"))
        log = os.path.join(path, "metrics.jsonl")
        if config is None or not os.path.isfile(log):
            fail(f"{path!r} is not a training run's folder (no config.json and metrics.jsonl: "
                 f"give the --out of a run that finished at least one epoch)")
        with open(log) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        final = _read_json(os.path.join(path, "final.json")) or {}
        deployed = final.get("deployed") or DEPLOYED.get(config["method"])
        if not rows or f"acc/{deployed}" not in rows[0]:
            fail(f"{path!r}: no epoch logged with the deployed model's accuracy (acc/{deployed})")
        data = config["dataset"]
        if data == "folder":
            data = f"folder {os.path.basename(os.path.normpath(config['data_dir']))}"
        groups[name if names.count(name) == 1 else path] = dict(
            method=config["method"], arch=config["arch"], data=data, seeds=[config["seed"]],
            rows=[rows], deployed=deployed, synthetic=config["dataset"] == "fake")
    return groups


def band(runs, column, index=(), ranked=False):
    """Per epoch over the seeds that logged `column` (element `index` of a logged list; ranked: of the
    list sorted from largest to smallest): (epochs, mean, min, max)."""
    by_epoch = {}
    for rows in runs:
        for row in rows:
            v = row.get(column)
            if ranked and isinstance(v, list):
                v = sorted(v, reverse=True)
            for i in index:
                v = v[i] if isinstance(v, list) and i < len(v) else None
            if isinstance(v, (int, float)) and math.isfinite(v):
                by_epoch.setdefault(row["epoch"], []).append(v)
    epochs = sorted(by_epoch)
    vals = [by_epoch[e] for e in epochs]
    return epochs, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def loss_terms(runs):
    """The loss terms a method logs, in logging order ('loss' = the total first)."""
    terms = []
    for rows in runs:
        for row in rows:
            for k in row:
                if k not in NOT_LOSSES and not k.startswith(("acc/", "int/")) and k not in terms:
                    terms.append(k)
    return terms


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        fail("plotting needs matplotlib, an optional extra: pip install -r requirements-plot.txt "
             "(or pip install matplotlib)")
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    return plt


def _axes_style(ax):
    """Whole epochs on x; plain numbers (no 10^x labels) on a log y axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_yscale() == "log":
        lo, hi = ax.get_ylim()  # ticks at 1, 2, 5 x 10^k over a short range, 10^k over a long one
        subs = (1.0, 2.0, 5.0) if hi / lo < 1000 else (1.0,)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)


def _save(fig, path):
    tmp = path + ".tmp"
    # no version stamp in the file: the same logs give the same bytes
    fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def _subtitle(groups):
    g = next(iter(groups.values()))
    seeds = sorted({len(x["seeds"]) for x in groups.values()})
    data = g["data"]
    if g["synthetic"]:
        data = "synthetic data (a pipeline check, not a method comparison)"
    return f"{g['arch']}, {data}, {'/'.join(map(str, seeds))} seed(s)"


def plot_accuracy(plt, title, groups, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, g in groups.items():
        epochs, mean, lo, hi = band(g["rows"], f"acc/{g['deployed']}")
        base = g["method"] == "baseline"
        line, = ax.plot(epochs, mean, "--" if base else "-", color="black" if base else None,
                        lw=2 if base else 1.5, marker="o" if len(epochs) <= 20 else None, ms=3,
                        label=f"{label} ({g['deployed']})")
        if len(g["rows"]) > 1:
            ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.12, lw=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 % of the deployed model")
    several = any(len(g["rows"]) > 1 for g in groups.values())
    ax.set_title(title + ("\nmean over seeds, band = min-max" if several else ""), fontsize=9)
    _axes_style(ax)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _small_multiples(plt, n):
    """A figure of n small panels, three to a row."""
    cols = min(3, n)
    rows = math.ceil(n / cols)
    return plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)


def _finish_multiples(plt, fig, axes, n, title, what, path):
    """Blank the unused panels, title the figure 'grid X: what; arch, data, seeds', write it."""
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    name, _, rest = title.partition(": ")
    fig.suptitle(f"{name}: {what}; {rest}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_losses(plt, title, groups, path):
    fig, axes = _small_multiples(plt, len(groups))
    for ax, (label, g) in zip(axes.flat, groups.items()):
        for term in loss_terms(g["rows"]):
            epochs, mean, _, _ = band(g["rows"], term)
            if any(v > 0 for v in mean):
                total = term == "loss"
                ax.plot(epochs, mean, lw=2 if total else 1, color="black" if total else None,
                        label=term)
        ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        _axes_style(ax)
        top, epochs, w, _, _ = ax, *band(g["rows"], "w")
        if epochs:  # the ramp-up weight, on its own axis (drawn above: it holds the legend)
            top = ax.twinx()
            top.plot(epochs, w, ":", color="grey", label="w(e), right axis")
            top.set_ylim(0, 1.05)
            top.tick_params(labelsize=7)
        handles = ax.get_lines() + (top.get_lines() if top is not ax else [])
        top.legend(handles=handles, fontsize=6, ncol=2 if len(handles) > 6 else 1, loc="best",
                   framealpha=0.7)
    _finish_multiples(plt, fig, axes, len(groups), title, "loss terms per epoch (mean over seeds, log scale)",
                      path)


# What each internal is (the panel's title) and the label of one of its lines, formatted with the line's
# number (and the next one's); docs/tutorial.md, section 9 says more. RANKED: lists drawn sorted, largest
# first, because which element is largest differs from seed to seed (ONE's favourite branch).
INTERNALS = {
    "int/agreement": ("DML: peer pairs predicting the same class", "fraction of test images"),
    "int/gate": ("ONE: gate weights, largest first (mean over test images)", "rank {0}"),
    "int/attention": ("OKDDip: attention A[a, c], last epoch (row a: peer a's target)", ""),
    "int/attention_entropy": ("OKDDip: entropy of each attention row (nats; dotted: uniform rows)", "peer {0}"),
    "int/kl_mean_peer": ("PCL: KL(temporal mean j || peer j) on test images", "peer {0}"),
    "int/acc_gap_peer": ("PCL: temporal mean j's accuracy minus peer j's (points)", "peer {0}"),
    "int/attention_distance": ("FFSD: distance between consecutive students' attention maps", "students {0},{1}"),
}
RANKED = {"int/gate"}


def internal_panels(rows):
    """[(key, kind, lines)] of the internals in a run's rows, in logging order: kind 'lines' with lines =
    [(label, column, index)], or 'matrix' (a logged matrix: drawn at the last epoch). Scalars that differ
    only by a trailing number (int/acc_gap_peer1, 2, ...) share one panel."""
    panels = {}
    for row in rows:
        for k, v in row.items():
            if not k.startswith("int/"):
                continue
            stem = k.rstrip("0123456789")  # int/acc_gap_peer1 -> int/acc_gap_peer
            label = INTERNALS.get(stem, (k, "{0}"))[1]
            if stem != k:  # one line per numbered key
                panels.setdefault(stem, ("lines", {}))[1][k] = (label.format(k[len(stem):]), k, ())
            elif isinstance(v, list) and v and isinstance(v[0], list):
                panels.setdefault(k, ("matrix", {}))
            elif isinstance(v, list):  # one line per element
                lines = panels.setdefault(k, ("lines", {}))[1]
                for i in range(len(v)):
                    lines.setdefault(i, (label.format(i + 1, i + 2), k, (i,)))
            else:
                panels.setdefault(k, ("lines", {k: (label.format(k), k, ())}))
    return [(k, kind, list(lines.values())) for k, (kind, lines) in panels.items()]


def plot_internals(plt, title, groups, path):
    """One small panel per internal of each method (mean over seeds, band = min-max); a matrix as a heat
    map of its last epoch's mean. Returns False (nothing written) when no run logged any internal."""
    panels = [(label, g, *p) for label, g in groups.items() for p in internal_panels(r for rs in g["rows"]
                                                                                    for r in rs)]
    if not panels:
        return False
    fig, axes = _small_multiples(plt, len(panels))
    for ax, (label, g, key, kind, lines) in zip(axes.flat, panels):
        name = INTERNALS.get(key, (key,))[0]
        ax.set_title(f"{label}: {name.partition(': ')[2] or name}", fontsize=8)
        if kind == "matrix":
            last = [rs[-1][key] for rs in g["rows"] if rs and key in rs[-1]]
            if not last:  # logged once, not at the last epoch (a run resumed with other code)
                ax.axis("off")
                continue
            m = [[sum(s[a][c] for s in last) / len(last) for c in range(len(last[0][a]))]
                 for a in range(len(last[0]))]
            ax.imshow(m, vmin=0, vmax=1, cmap="Blues")
            for a, row in enumerate(m):
                for c, v in enumerate(row):
                    ax.text(c, a, f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if v > 0.6 else "black")
            ax.set_xticks(range(len(m)), [f"peer {c + 1}" for c in range(len(m))], fontsize=7)
            ax.set_yticks(range(len(m)), [f"peer {a + 1}" for a in range(len(m))], fontsize=7)
            ax.set_xlabel("key c", fontsize=8)
            continue
        for line_label, column, index in lines:
            epochs, mean, lo, hi = band(g["rows"], column, index, ranked=key in RANKED)
            line, = ax.plot(epochs, mean, lw=1.5, label=line_label)
            if len(g["rows"]) > 1:
                ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.12, lw=0)
        if key == "int/attention_entropy" and lines:  # uniform rows: log m, or log(m - 1) when the
            last = g["rows"][0][-1].get("int/attention") or [[1.0]]  # diagonal is masked (--exclude-self)
            ax.axhline(math.log(len(lines) - (max(row[a] for a, row in enumerate(last)) == 0)), ls=":",
                       color="grey")
        if key == "int/acc_gap_peer":
            ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        _axes_style(ax)
        ax.legend(fontsize=6, loc="best", framealpha=0.7)
    _finish_multiples(plt, fig, axes, len(panels), title, "inside each method, on the test set every epoch",
                      path)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="*", help="run folders (a run's --out) to draw instead of the grids")
    p.add_argument("--results", default=os.path.join(ROOT, "results"), help="the recorded grids")
    p.add_argument("--out", default=None, help="where the PNG files go (default: docs/img for the "
                                               "grids, the first run's parent folder for runs)")
    p.add_argument("--grids", default="",
                   help="comma-separated grids (default: every one with per-epoch logs)")
    opts = p.parse_args(argv)
    if opts.runs:
        if opts.grids:
            fail("give run folders or --grids, not both")
        return draw_runs(opts.runs, opts.out or os.path.dirname(os.path.normpath(opts.runs[0])) or ".")
    wanted = [g for g in opts.grids.split(",") if g]
    curves = load_curves(opts.results, wanted or None)
    missing = [g for g in wanted if g not in curves]
    if missing or not curves:
        fail(f"no per-epoch logs (<run>.metrics.jsonl) for grid(s) {', '.join(missing) or 'any'} "
             f"in {opts.results!r}; `python tools/reproduce.py run <grid>` records them")
    plt = _pyplot()
    out = opts.out or os.path.join(ROOT, "docs", "img")
    os.makedirs(out, exist_ok=True)
    written = []
    for grid, groups in curves.items():
        names = []
        for kind, draw in (("acc", plot_accuracy), ("losses", plot_losses), ("internals", plot_internals)):
            path = os.path.join(out, f"{grid}-{kind}.png")
            if draw(plt, f"grid {grid}: {_subtitle(groups)}", groups, path) is not False:
                written.append(path)
                names.append(os.path.basename(path))
        n = sum(len(g["seeds"]) for g in groups.values())
        print(f"grid {grid}: {len(groups)} method(s), {n} runs -> {', '.join(names)} in {out}", flush=True)
    return written


def draw_runs(paths, out):
    """runs-acc.png and runs-losses.png of the given run folders, in `out`."""
    groups = load_runs(paths)
    plt = _pyplot()
    os.makedirs(out, exist_ok=True)
    title = (f"runs: {', '.join(sorted({g['arch'] for g in groups.values()}))}, "
             f"{', '.join(sorted({g['data'] for g in groups.values()}))}")
    written = [os.path.join(out, f"runs-{kind}.png") for kind in ("acc", "losses", "internals")]
    plot_accuracy(plt, title, groups, written[0])
    plot_losses(plt, title, groups, written[1])
    if not plot_internals(plt, title, groups, written[2]):
        written.pop()
    print(f"{', '.join(groups)} -> {' '.join(written)}", flush=True)
    return written


if __name__ == "__main__":
    main()
