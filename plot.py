"""Redraw Figure 1 of Wu & He, Group Normalization (ECCV 2018) from results.csv.

    python plot.py [--results results.csv] [--out plot.png] [--metric median_last5_error]
                   [--label TEXT]
    python plot.py --curves [--models-dir models] [--out curves.png] [--label TEXT]

The first form writes plot.png: error (%) against the batch size per worker
(log2 axis, 32 -> 2 left to right as in the paper), one line per normalization,
the mean over seeds with its spread (min-max for 1-2 seeds, mean +/- std for 3
or more) as a band, and the BN - GN gap printed at each batch size. A second
panel shows the paper's own ImageNet numbers (Table 2, ResNet-50) drawn the same
way. The title says which data, scale, profile, date and commit produced the
points (from results.csv's provenance columns, plus --label).

The second form writes curves.png: test error per epoch, one line per batch
size, one panel per normalization (like the paper's Figure 5). It reads the
per-epoch history from the run records models/NAME.json that train.py writes
(the same numbers as the TensorBoard logs under logs/NAME, without needing
TensorBoard to read them).

plot.py never trains or evaluates: it only reads files. Both PNGs are written
atomically (a temporary file in the same folder, then os.replace).
"""
import argparse
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# Columns plot.py needs from results.csv (reproduce.py writes these and more).
TEXT_COLUMNS = ["norm"]
NUMERIC_COLUMNS = ["groups", "batch_size", "workers", "seed", "epochs",
                   "test_error", "median_last5_error"]
METRICS = {"median_last5_error": "median test error of the final 5 epochs",
           "test_error": "test error of the final model"}
BATCH_SIZES = [32, 16, 8, 4, 2]  # the paper's x axis, images per worker
STYLE = {"bn": dict(color="#1f5fa8", marker="o", name="BN"),
         "gn": dict(color="#c0282d", marker="s", name="GN")}

# The paper's Table 2 (ResNet-50 on ImageNet, 8 workers, median error of the
# final 5 epochs, %), drawn in the second panel.
PAPER_IMAGENET = {"bn": [23.6, 23.7, 24.8, 27.3, 34.7],
                  "gn": [24.1, 24.2, 24.0, 24.2, 24.1]}


class ResultsError(Exception):
    """results.csv (or a run record) is missing or malformed; the message names the file."""


# ---------------------------------------------------------------- reading

def read_results(path, metric="median_last5_error"):
    """results.csv -> DataFrame, checked: the columns exist and hold numbers."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: no such file (make it with `python reproduce.py`)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ResultsError(f"{path}: the file is empty (make it with `python reproduce.py`)")
    except pd.errors.ParserError as e:
        raise ResultsError(f"{path}: not a readable CSV file ({e})")
    missing = [c for c in TEXT_COLUMNS + NUMERIC_COLUMNS + [metric] if c not in df.columns]
    if missing:
        raise ResultsError(f"{path}: missing column(s) {', '.join(missing)} "
                           f"(has: {', '.join(df.columns)})")
    if df.empty:
        raise ResultsError(f"{path}: no rows, only the header (no models were evaluated?)")
    return check_values(df, path)


def check_values(df, path):
    """Convert the numeric columns; name the first bad cell by column and line."""
    for col in dict.fromkeys(NUMERIC_COLUMNS + [c for c in METRICS if c in df.columns]):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() | ~np.isfinite(values.astype(float))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ResultsError(f"{path}: column {col!r} has a non-numeric value "
                               f"{df[col].iloc[i]!r} on line {i + 2}")
        df[col] = values
    df["norm"] = df["norm"].str.strip().str.lower()
    if (df["norm"] == "").any():
        i = int(np.flatnonzero(df["norm"] == "")[0])
        raise ResultsError(f"{path}: column 'norm' is empty on line {i + 2}")
    if (df["batch_size"] <= 0).any():
        i = int(np.flatnonzero(df["batch_size"] <= 0)[0])
        raise ResultsError(f"{path}: column 'batch_size' must be positive, "
                           f"got {df['batch_size'].iloc[i]!r} on line {i + 2}")
    return df


# ---------------------------------------------------------------- aggregation

def series_labels(df):
    """Legend label of each row: 'BN', 'GN', plus G or workers only where they vary."""
    def label(row):
        text = STYLE.get(row.norm, {}).get("name", row.norm.upper())
        if df.loc[df.norm == row.norm, "groups"].nunique() > 1:
            text += f" (G={int(row.groups)})"
        if df["workers"].nunique() > 1:
            text += f", {int(row.workers)} workers"
        return text
    return [label(row) for row in df.itertuples()]


def aggregate(df, metric="median_last5_error"):
    """One row per (series, batch size): the mean over seeds and its spread.

    Columns: series, norm, batch_size, n (seeds), mean, low, high, spread, where
    spread is 'min-max' for 1-2 seeds and 'std' (low/high = mean -/+ std) for 3+.
    """
    df = df.assign(series=series_labels(df))
    rows = []
    for (series, norm, bs), g in df.groupby(["series", "norm", "batch_size"], sort=False):
        x = g[metric].to_numpy(float)
        mean = float(x.mean())
        if len(x) >= 3:
            std = float(x.std(ddof=1))
            low, high, spread = mean - std, mean + std, "std"
        else:
            low, high, spread = float(x.min()), float(x.max()), "min-max"
        rows.append(dict(series=series, norm=norm, batch_size=int(bs), n=len(x),
                         mean=mean, low=low, high=high, spread=spread))
    agg = pd.DataFrame(rows)
    return agg.sort_values(["norm", "series", "batch_size"],
                           ascending=[True, True, False], ignore_index=True)


def gaps(agg):
    """{batch_size: BN mean - GN mean} where there is exactly one BN and one GN line."""
    bn, gn = (agg[agg.norm == n] for n in ("bn", "gn"))
    if bn.series.nunique() != 1 or gn.series.nunique() != 1:
        return {}
    both = bn.merge(gn, on="batch_size", suffixes=("_bn", "_gn"))
    return {int(r.batch_size): float(r.mean_bn - r.mean_gn) for r in both.itertuples()}


def paper_results():
    """The paper's Table 2 in results.csv's shape, so it goes through aggregate()."""
    return pd.DataFrame([dict(norm=n, groups=32 if n == "gn" else 0, batch_size=bs,
                              workers=8, seed=0, median_last5_error=err)
                         for n, errs in PAPER_IMAGENET.items()
                         for bs, err in zip(BATCH_SIZES, errs)])


# ---------------------------------------------------------------- provenance

def span(values, fmt="{:,}", sep="-"):
    """'5,000' if all equal, '1,000-5,000' if they differ."""
    vals = sorted(set(values))
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(vals[0])}{sep}{fmt.format(vals[-1])}"


def provenance(df, label=None, unit="point"):
    """One line saying what produced the points: data, scale, profile, date, commit.

    Uses results.csv's optional provenance columns where present (train_images,
    test_images, profile, date, data_checksum, git_commit); label goes first.
    """
    parts = [label] if label else []
    for col, what in (("train_images", "training images"), ("test_images", "test images")):
        if col in df.columns:
            imgs = pd.to_numeric(df[col], errors="coerce").dropna().astype(int)
            if len(imgs):
                parts.append(f"{span(imgs)} {what}")
    parts.append(f"{span(df['epochs'].astype(int))} epochs")
    if "profile" in df.columns:
        profiles = sorted(set(df["profile"].astype(str)) - {""})
        if profiles:
            parts.append(" / ".join(profiles) + " profile")
    seeds = df.groupby(["norm", "groups", "workers", "batch_size"]).seed.nunique()
    parts.append(f"{span(seeds)} seed{'s' if seeds.max() > 1 else ''} per {unit}")
    if "date" in df.columns:
        dates = sorted(set(df["date"].astype(str)) - {""})
        if dates:
            parts.append(span(dates, "{}", " to "))
    if "data_checksum" in df.columns:
        sums = sorted({c[:8] for c in df["data_checksum"].astype(str) if c})
        if sums:
            parts.append("data sha256 " + ", ".join(sums))
    if "git_commit" in df.columns:
        commits = sorted({c[:7] + ("-dirty" if c.endswith("-dirty") else "")
                          for c in df["git_commit"].astype(str) if c})
        if commits:
            parts.append("commit " + ", ".join(commits))
    return ", ".join(p for p in parts if p)


# ---------------------------------------------------------------- drawing

def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _wrapped(text, width=150):
    return "\n".join(textwrap.wrap(text, width))


def save_atomic(fig, out):
    """savefig to a temporary file beside out, then os.replace it into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png.tmp", dir=out.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes it private; a figure is for everyone
    try:
        fig.savefig(tmp, format="png", dpi=150)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        plt.close(fig)


def batch_axis(ax, sizes):
    """log2 x axis running from the largest batch (left) to the smallest (right)."""
    sizes = sorted(set(sizes) | set(BATCH_SIZES), reverse=True)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlim(sizes[0] * 1.25, sizes[-1] / 1.25)  # inverted: 32 on the left
    ax.set_xlabel("batch size (images per worker)")
    ax.grid(True, which="major", color="0.9", lw=0.8)
    ax.set_axisbelow(True)


def draw_panel(ax, agg, title, ylabel):
    """Lines with markers, the spread as a band, and the BN - GN gap per batch size."""
    for series, g in agg.groupby("series", sort=False):
        style = STYLE.get(g.norm.iloc[0], dict(color=None, marker="^"))
        line, = ax.plot(g.batch_size, g["mean"], marker=style["marker"], color=style["color"],
                        lw=1.8, ms=6, label=series)
        if (g.high > g.low).any():
            ax.fill_between(g.batch_size, g.low, g.high, color=line.get_color(), alpha=0.18, lw=0)
    batch_axis(ax, agg.batch_size)
    box = dict(boxstyle="round,pad=0.15", fc="white", ec="none")
    for bs, gap in gaps(agg).items():
        ax.annotate(f"{gap:+.1f}".replace("-", "\u2212"), (bs, 0), xycoords=("data", "axes fraction"),
                    xytext=(0, 4), textcoords="offset points", ha="center", va="bottom",
                    fontsize=8, color="0.2", bbox=box)
    if gaps(agg):
        ax.annotate("BN \u2212 GN", (0, 0), xycoords="axes fraction", xytext=(4, 17),
                    textcoords="offset points", fontsize=7.5, color="0.35", bbox=box)
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo - 0.16 * (hi - lo), hi)  # room for the gap row
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, loc="best")


def spread_note(agg):
    """What the band shows, for the subtitle."""
    kinds = sorted(set(agg.loc[agg.n > 1, "spread"]))
    if not kinds:
        return "no band: one seed per point"
    return "band: " + " / ".join("min-max over seeds" if k == "min-max" else "mean \u00b1 std"
                                 for k in kinds)


def missing_note(df):
    """'; no runs yet: BN at 8, 4, 2' for the paper's batch sizes that have no point."""
    missing = []
    for norm in sorted(set(df["norm"])):
        have = set(df.loc[df["norm"] == norm, "batch_size"].astype(int))
        lacking = [str(b) for b in BATCH_SIZES if b not in have]
        if lacking:
            missing.append(f"{STYLE.get(norm, {}).get('name', norm)} at {', '.join(lacking)}")
    return f"; no runs yet: {'; '.join(missing)}" if missing else ""


def plot_figure1(df, out, metric="median_last5_error", label=None):
    """Two panels: this reproduction (CIFAR-10) and the paper's ImageNet Table 2."""
    agg = aggregate(df, metric)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.3))
    # Which setting the points show: W workers of N images per step (train.py --workers).
    workers = span(df["workers"].astype(int))
    plural = "" if workers == "1" else "s"
    draw_panel(left, agg, f"CIFAR-10, ResNet-20, {workers} worker{plural} (this reproduction)",
               "test error (%)")
    draw_panel(right, aggregate(paper_results()), "ImageNet, ResNet-50, 8 workers (paper, Table 2)",
               "validation error (%)")
    fig.suptitle("Group Normalization, Figure 1: error against batch size per worker",
                 fontsize=12, y=0.985)
    subtitle = (_wrapped(provenance(df, label)) + "\n"
                + _wrapped(f"points: {METRICS.get(metric, metric)}, mean over seeds; "
                           f"{spread_note(agg)}; numbers at the bottom: BN \u2212 GN in points"
                           + missing_note(df)))
    fig.text(0.5, 0.94, subtitle,
             ha="center", va="top", fontsize=8.5, color="0.25", linespacing=1.4)
    fig.tight_layout()
    fig.subplots_adjust(top=0.88 - 0.04 * (subtitle.count("\n") + 1))   # room for the subtitle
    save_atomic(fig, out)
    return agg


# ---------------------------------------------------------------- curves

def read_records(models_dir):
    """Run records models/*.json (not checkpoints/) that have a per-epoch history."""
    models_dir = Path(models_dir)
    paths = sorted(models_dir.glob("*.json"))
    if not paths:
        raise ResultsError(f"{models_dir}: no run records (NAME.json); train some first "
                           f"with `python train.py` (see the README)")
    records = []
    for path in paths:
        try:
            rec = json.loads(path.read_text())
            config, history = rec["config"], rec["history"]
            for key in ("norm", "groups", "batch_size", "workers", "seed", "epochs"):
                config[key]
            epochs = [(int(h["epoch"]), float(h["test_error"])) for h in history]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ResultsError(f"{path}: not a run record with a per-epoch history "
                               f"({type(e).__name__}: {e})")
        if epochs:
            data = rec.get("data") or {}
            records.append(dict(config, name=rec.get("name", path.stem), history=epochs,
                                data_checksum=data.get("checksum", ""),
                                train_images=data.get("train_images", config.get("train_images")),
                                git_commit=rec.get("git_commit", "")))
    if not records:
        raise ResultsError(f"{models_dir}: the run records have no epochs yet")
    return records


def curves(records):
    """Long table: norm, workers, batch_size, epoch, test_error (mean over seeds), n."""
    rows = [dict(norm=r["norm"].lower(), workers=int(r["workers"]),
                 batch_size=int(r["batch_size"]), seed=r["seed"], epoch=e, test_error=err)
            for r in records for e, err in r["history"]]
    df = pd.DataFrame(rows)
    out = (df.groupby(["norm", "workers", "batch_size", "epoch"])
             .test_error.agg(["mean", "size"]).reset_index()
             .rename(columns={"mean": "test_error", "size": "n"}))
    return out.sort_values(["norm", "workers", "batch_size", "epoch"],
                           ascending=[True, True, False, True], ignore_index=True)


def plot_curves(records, out, label=None):
    """One panel per norm, one line per batch size (Figure 5 of the paper)."""
    table = curves(records)
    norms = list(dict.fromkeys(table.norm))
    fig, axes = plt.subplots(1, len(norms), figsize=(5 * len(norms), 4), sharey=True,
                             squeeze=False)
    sizes = sorted(set(table.batch_size), reverse=True)
    colours = plt.cm.viridis(np.linspace(0, 0.85, len(sizes)))
    many_workers = table.workers.nunique() > 1
    for ax, norm in zip(axes[0], norms):
        lines = table[table.norm == norm].groupby(["workers", "batch_size"])
        for (workers, bs), g in sorted(lines, key=lambda kv: (kv[0][0], -kv[0][1])):
            name = f"{STYLE.get(norm, {}).get('name', norm.upper())}, {bs} img/worker"
            ax.plot(g.epoch, g.test_error, color=colours[sizes.index(bs)], lw=1.6,
                    ls="--" if many_workers and workers > 1 else "-",
                    label=name + (f", {workers} workers" if many_workers else ""))
        ax.set_title(STYLE.get(norm, {}).get("name", norm.upper()), fontsize=11)
        ax.set_xlabel("epoch")
        ax.grid(True, color="0.9", lw=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(frameon=False, fontsize=8)
    axes[0][0].set_ylabel("test error (%), mean over seeds")
    fig.suptitle("Training curves: test error per epoch, by batch size per worker",
                 fontsize=12, y=0.985)
    runs = pd.DataFrame(records).assign(norm=lambda d: d.norm.str.lower())
    fig.text(0.5, 0.93, _wrapped(f"{provenance(runs, label, 'line')}, {len(records)} runs"),
             ha="center", va="top", fontsize=8.5, color="0.25", linespacing=1.4)
    fig.tight_layout()
    fig.subplots_adjust(top=0.78)
    save_atomic(fig, out)
    return table


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="results.csv", help="written by reproduce.py")
    p.add_argument("--out", help="the PNG to write (plot.png, or curves.png with --curves)")
    p.add_argument("--metric", default="median_last5_error", choices=sorted(METRICS),
                   help="the error to plot (default: the paper's statistic)")
    p.add_argument("--label", help="text put first in the figure's provenance line")
    p.add_argument("--curves", action="store_true",
                   help="draw the training curves from the run records instead")
    p.add_argument("--models-dir", default="models", help="run records for --curves")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.curves:
            out = args.out or "curves.png"
            plot_curves(read_records(args.models_dir), out, args.label)
        else:
            out = args.out or "plot.png"
            plot_figure1(read_results(args.results, args.metric), out, args.metric, args.label)
    except ResultsError as e:
        print(f"plot.py: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
