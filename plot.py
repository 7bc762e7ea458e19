"""Redraw Figure 1 of Wu & He, Group Normalization (ECCV 2018) from results.csv, and the
figures of the paper's other studies.

    python plot.py [--results results.csv] [--out plot.png] [--metric median_last5_error]
                   [--label TEXT]
    python plot.py --curves [--models-dir models] [--out curves.png] [--label TEXT]
    python plot.py --study norms --results results/norms/results.csv --out results/norms/plot.png
                                              # Figure 4 (curves) and Table 1, a line per norm
    python plot.py --study groups --results results/groups/results.csv --out results/groups/plot.png
                                              # Table 3: error against G and against C / G
    python plot.py --study workers --results results/workers/results.csv \
                   --out results/workers/plot.png
                                              # BN against N: W fixed, or the step fixed

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

--study norms draws the curves of the run records beside the results' models (the
`model` column: a study's runs may live in another profile's folder), or of --models-dir.
--study norms and --study groups also print their table (markdown) on stdout, with the
paper's ImageNet numbers beside it. train.py's profiles (norms, groups, workers, and their
-quick variants) make the results these read; sweep.py draws them after a whole grid.

plot.py never trains or evaluates: it only reads files. Both PNGs are written
atomically (runfiles.atomic_write: a temporary file in the same folder, then a rename).
"""
import argparse
import json
import re
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from gnrepro import recipe, runfiles  # noqa: E402

# Columns plot.py needs from results.csv (reproduce.py writes these and more).
TEXT_COLUMNS = ["norm"]
NUMERIC_COLUMNS = ["groups", "batch_size", "workers", "seed", "epochs",
                   "test_error", "median_last5_error"]
OPTIONAL_NUMBERS = ["groups", "channels_per_group"]   # may be blank (in: no fixed G)
METRICS = {"median_last5_error": "median test error of the final 5 epochs",
           "test_error": "test error of the final model"}
BATCH_SIZES = [32, 16, 8, 4, 2]  # the paper's x axis, images per worker
RULES = {"first": "first worker's", "mean": "mean over workers"}   # BN's moving statistics
STYLE = {"bn": dict(color="#1f5fa8", marker="o", name="BN"),
         "gn": dict(color="#c0282d", marker="s", name="GN")}

# The paper's Table 2 (ResNet-50 on ImageNet, 8 workers, median error of the
# final 5 epochs, %), drawn in the second panel.
PAPER_IMAGENET = {"bn": [23.6, 23.7, 24.8, 27.3, 34.7],
                  "gn": [24.1, 24.2, 24.0, 24.2, 24.1]}

# The paper's Table 1 (ResNet-50 on ImageNet, 32 images per GPU, validation error %) and
# Table 3 (the same, by number of groups G and by channels per group; only the values of
# G and C / G that ResNet-20's narrowest layers, 16 channels, allow are drawn here).
PAPER_TABLE1 = {"BN": 23.6, "LN": 25.3, "IN": 28.4, "GN": 24.1}
PAPER_TABLE3_GROUPS = {64: 24.6, 32: 24.1, 16: 24.6, 8: 24.4, 4: 24.6, 2: 24.7, 1: 25.3}
PAPER_TABLE3_CHANNELS = {64: 24.4, 32: 24.5, 16: 24.2, 8: 24.3, 4: 24.8, 2: 25.6, 1: 28.4}


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
    if "channels_per_group" not in df.columns:   # results.csv before the groups study
        df["channels_per_group"] = ""
    if "moving_statistics" not in df.columns:    # before BN's rule could be chosen: the mean
        df["moving_statistics"] = np.where((df["norm"].str.strip().str.lower() == "bn")
                                           & (df["workers"].astype(str) != "1"), "mean", "")
    for col in dict.fromkeys(NUMERIC_COLUMNS + OPTIONAL_NUMBERS
                             + [c for c in METRICS if c in df.columns]):
        values = pd.to_numeric(df[col], errors="coerce")
        blank = (df[col].str.strip() == "") if col in OPTIONAL_NUMBERS else False
        bad = (values.isna() | ~np.isfinite(values.astype(float))) & ~blank
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
            text += f", {int(row.workers)} worker{'s' if row.workers > 1 else ''}"
        if ("moving_statistics" in df.columns
                and df.loc[df.norm == row.norm, "moving_statistics"].nunique() > 1):
            text += f", moving statistics: {RULES.get(row.moving_statistics, 'n/a')}"
        return text
    return [label(row) for row in df.itertuples()]


def aggregate(df, metric="median_last5_error"):
    """One row per (series, batch size): the mean over seeds and its spread.

    Columns: series, norm, batch_size, n (seeds), mean, low, high, spread, where
    spread is 'min-max' for 1-2 seeds and 'std' (low/high = mean -/+ std) for 3+.
    """
    if "series" not in df.columns:   # (a study may name its lines itself)
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
    """{batch_size: BN mean - GN mean} where there is one GN line and one BN line; of two BN
    lines that differ only in their moving statistics, the first worker's (the paper's rule)."""
    bn, gn = (agg[agg.norm == n] for n in ("bn", "gn"))
    first = bn[bn.series.str.endswith(f"moving statistics: {RULES['first']}")]
    if bn.series.nunique() > 1 and first.series.nunique() == 1:
        bn = first
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
    keys = ["norm", "groups", "channels_per_group", "workers", "batch_size"]
    seeds = df.groupby([k for k in keys if k in df.columns], dropna=False).seed.nunique()
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
    if "trained_on" in df.columns:
        parts.append(machines(df["trained_on"]))
    return ", ".join(p for p in parts if p)


def machines(trained_on):
    """'trained on A, B' from results.csv's trained_on cells ('A 0-96; B 96-100'), with
    '(partly on machines not recorded)' where a run's record has training of unknown origin."""
    names = {stretch.rsplit(" ", 1)[0] if stretch[-1:].isdigit() else stretch
             for cell in trained_on.dropna().astype(str) for stretch in cell.split("; ") if cell}
    known = sorted(names - {"unrecorded"})
    if not names:
        return ""
    return ("trained on " + ", ".join(known) if known else "trained on machines not recorded") \
        + (" (partly on machines not recorded)" if known and "unrecorded" in names else "")


# ---------------------------------------------------------------- drawing

def _wrapped(text, width=150):
    return "\n".join(textwrap.wrap(text, width))


def save_atomic(fig, out):
    """savefig to a temporary file beside out, then rename it into place; close the figure."""
    try:
        runfiles.atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    finally:
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
    seen = {}   # a second line of the same norm (another W or G): dashed, open markers
    for series, g in agg.groupby("series", sort=False):
        norm = g.norm.iloc[0]
        style = STYLE.get(norm, dict(color=None, marker="^"))
        again = seen.setdefault(norm, 0)
        seen[norm] += 1
        line, = ax.plot(g.batch_size, g["mean"], marker=style["marker"], color=style["color"],
                        lw=1.8, ms=6, label=series, ls=("-", "--", ":", "-.")[again % 4],
                        mfc="white" if again else None)
        spread = (g.high > g.low).any()
        if spread and len(g) > 1:
            ax.fill_between(g.batch_size, g.low, g.high, color=line.get_color(), alpha=0.18, lw=0)
        elif spread:   # one point: a band has no width, so an error bar
            ax.errorbar(g.batch_size, g["mean"], yerr=[g["mean"] - g.low, g.high - g["mean"]],
                        fmt="none", ecolor=line.get_color(), elinewidth=1.2, capsize=3)
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
    return "band (or bar): " + "; ".join("min-max over 2 seeds" if k == "min-max"
                                         else "mean \u00b1 std over 3 or more" for k in kinds)


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
                           f"{spread_note(agg)}; numbers at the bottom: BN \u2212 GN of the means, "
                           f"in points"
                           + (f" (BN: {RULES['first']} moving statistics)"
                              if agg[agg.norm == "bn"].series.nunique() > 1 and gaps(agg) else "")
                           + missing_note(df)))
    fig.text(0.5, 0.94, subtitle,
             ha="center", va="top", fontsize=8.5, color="0.25", linespacing=1.4)
    fig.tight_layout()
    fig.subplots_adjust(top=0.88 - 0.04 * (subtitle.count("\n") + 1))   # room for the subtitle
    save_atomic(fig, out)
    return agg


# ---------------------------------------------------------------- curves

def records_of(df, results):
    """The run records NAME.json beside the models of the results' rows (their `model`
    column, relative to the working folder or to the results file's)."""
    if "model" not in df.columns:
        raise ResultsError(f"{results}: no model column to find the run records by; give "
                           f"--models-dir where they are")
    paths = []
    for model in [m for m in df["model"].astype(str) if m]:
        path = Path(model).with_suffix(".json")
        if not path.is_file() and (Path(results).parent / path).is_file():
            path = Path(results).parent / path
        if not path.is_file():
            raise ResultsError(f"{results}: no run record {path} beside the model {model} of "
                               f"its rows; give --models-dir where the run records are")
        paths.append(path)
    return read_records(None, paths)


def read_records(models_dir, paths=None):
    """Run records models/*.json (not checkpoints/) that have a per-epoch history (or the
    records at paths)."""
    models_dir = Path(models_dir) if models_dir is not None else Path(".")
    paths = sorted(models_dir.glob("*.json")) if paths is None else paths
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
            train_errors = [float(h.get("train_error", "nan")) for h in history]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ResultsError(f"{path}: not a run record with a per-epoch history "
                               f"({type(e).__name__}: {e})")
        if epochs:
            data = rec.get("data") or {}
            records.append(dict(config, name=rec.get("name", path.stem), history=epochs,
                                moving_statistics=recipe.moving_statistics_of(config) or "",
                                train_history=train_errors,
                                data_checksum=data.get("checksum", ""),
                                train_images=data.get("train_images", config.get("train_images")),
                                git_commit=rec.get("git_commit", "")))
    if not records:
        raise ResultsError(f"{models_dir}: the run records have no epochs yet")
    return records


def curves(records):
    """Long table: norm, workers, moving_statistics (BN's rule at W > 1, else ''), batch_size,
    epoch, test_error (mean over seeds), n."""
    rows = [dict(norm=r["norm"].lower(), workers=int(r["workers"]),
                 moving_statistics=r.get("moving_statistics") or "",
                 batch_size=int(r["batch_size"]), seed=r["seed"], epoch=e, test_error=err)
            for r in records for e, err in r["history"]]
    df = pd.DataFrame(rows)
    out = (df.groupby(["norm", "workers", "moving_statistics", "batch_size", "epoch"])
             .test_error.agg(["mean", "size"]).reset_index()
             .rename(columns={"mean": "test_error", "size": "n"}))
    return out.sort_values(["norm", "workers", "moving_statistics", "batch_size", "epoch"],
                           ascending=[True, True, True, False, True], ignore_index=True)


def plot_curves(records, out, label=None):
    """One panel per norm, one line per batch size (Figure 5 of the paper)."""
    table = curves(records)
    norms = list(dict.fromkeys(table.norm))
    width = max(5 * len(norms), 10)   # one panel (a control's runs): room for the titles
    fig, axes = plt.subplots(1, len(norms), figsize=(width, 4), sharey=True, squeeze=False)
    sizes = sorted(set(table.batch_size), reverse=True)
    colours = plt.cm.viridis(np.linspace(0, 0.85, len(sizes)))
    many_workers = table.workers.nunique() > 1
    for ax, norm in zip(axes[0], norms):
        panel = table[table.norm == norm]
        many_rules = panel.moving_statistics.nunique() > 1
        lines = panel.groupby(["workers", "moving_statistics", "batch_size"])
        for (workers, rule, bs), g in sorted(lines, key=lambda kv: (kv[0][:2], -kv[0][2])):
            name = f"{STYLE.get(norm, {}).get('name', norm.upper())}, {bs} img/worker"
            name += f", {workers} workers" if many_workers else ""
            name += f", moving statistics: {RULES.get(rule, rule)}" if many_rules else ""
            ax.plot(g.epoch, g.test_error, color=colours[sizes.index(bs)], lw=1.6,
                    ls="--" if (many_workers and workers > 1) or (many_rules and rule == "mean")
                    else "-", label=name)
        ax.set_title(STYLE.get(norm, {}).get("name", norm.upper()), fontsize=11)
        ax.set_xlabel("epoch")
        ax.grid(True, color="0.9", lw=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(frameon=False, fontsize=8)
    axes[0][0].set_ylabel("test error (%), mean over seeds")
    fig.suptitle("Training curves: test error per epoch, by batch size per worker",
                 fontsize=12, y=0.985)
    runs = pd.DataFrame(records).assign(norm=lambda d: d.norm.str.lower())
    fig.text(0.5, 0.93, _wrapped(f"{provenance(runs, label, 'line')}, {len(records)} runs",
                                 width=15 * width),
             ha="center", va="top", fontsize=8.5, color="0.25", linespacing=1.4)
    fig.tight_layout()
    fig.subplots_adjust(top=0.78)
    save_atomic(fig, out)
    return table


# ---------------------------------------------------------------- the studies

NORM_ORDER = ["bn", "ln", "in", "gn"]   # as in the paper's Table 1
STYLE |= {"ln": dict(color="#2e8b57", marker="^", name="LN"),
          "in": dict(color="#8a5cb8", marker="D", name="IN")}


def summary(values, sign=""):
    """'54.05' for one value; for two or more, the mean, the standard deviation over them and
    their number: '54.05 \u00b1 0.80 (n=3)'; '-' for none. sign="+" writes a difference's
    sign either way: '+1.48'."""
    x = np.asarray(values, float)
    if len(x) >= 2:
        return f"{x.mean():{sign}.2f} \u00b1 {x.std(ddof=1):.2f} (n={len(x)})"
    return f"{x.mean():{sign}.2f}" if len(x) else "-"


def study_table(df, metric, key, label, reference=None):
    """One row per value of `key` (a function of a results row): its error over seeds, and
    the difference of the means to `reference`'s row (else to the best row)."""
    df = df.assign(what=[key(r) for r in df.itertuples()]).dropna(subset=["what"])
    rows = [dict(what=w, seeds=len(g), error=summary(g[metric]), mean=float(g[metric].mean()))
            for w, g in df.groupby("what", sort=False)]
    table = pd.DataFrame(rows)
    base = (table.loc[table.what == reference, "mean"].iloc[0]
            if reference in set(table.what) else table["mean"].min())
    table["difference"] = [f"{m - base:+.2f}" for m in table["mean"]]
    return table.rename(columns={"what": label})


def markdown(table, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table[columns].values]
    return "\n".join(lines)


def draw_table(ax, table, columns, title):
    ax.axis("off")
    cells = ax.table(cellText=table[columns].values.tolist(), colLabels=columns,
                     loc="center", cellLoc="center")
    cells.auto_set_font_size(False)
    cells.set_fontsize(8.5)
    cells.auto_set_column_width(list(range(len(columns))))
    cells.scale(1, 1.4)
    ax.set_title(title, fontsize=10)


def finish_figure(fig, out, title, df, label, metric, extra="", top=0.86, per_line=0.04):
    """The title, the provenance subtitle (what produced the points, what they are), then
    the figure saved atomically."""
    fig.suptitle(title, fontsize=12, y=0.985)
    text = (_wrapped(provenance(df, label)) + "\n"
            + _wrapped(f"{METRICS.get(metric, metric)}, mean over seeds{extra}"))
    fig.text(0.5, 0.94, text, ha="center", va="top", fontsize=8.5, color="0.25", linespacing=1.4)
    fig.tight_layout()
    fig.subplots_adjust(top=top - per_line * (text.count("\n") + 1))
    save_atomic(fig, out)


def norm_name(norm):
    return STYLE.get(norm, {}).get("name", norm.upper())


def norms_table(df, metric):
    order = [n for n in NORM_ORDER if n in set(df.norm)] + sorted(set(df.norm) - set(NORM_ORDER))
    df = df.assign(norm=pd.Categorical(df.norm, order)).sort_values("norm")
    table = study_table(df, metric, lambda r: norm_name(r.norm), "norm", reference="BN")
    table["paper (ImageNet)"] = [PAPER_TABLE1.get(n, "") for n in table["norm"]]
    return table


def plot_norms(df, records, out, metric="median_last5_error", label=None):
    """The paper's Figure 4 (training and test error per epoch, a line per norm) and Table 1."""
    table = norms_table(df, metric)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), gridspec_kw=dict(width_ratios=[1, 1, 0.9]))
    runs = [r for r in records if r["norm"].lower() in set(df.norm)]
    for ax, key, name in ((axes[0], "train_history", "training error"),
                          (axes[1], "history", "test error")):
        for norm in [n for n in NORM_ORDER if any(r["norm"].lower() == n for r in runs)]:
            mine = [r for r in runs if r["norm"].lower() == norm]
            errors = [[e for _, e in r["history"]] if key == "history" else r[key] for r in mine]
            length = min(len(e) for e in errors)
            mean = np.mean([e[:length] for e in errors], axis=0)
            ax.plot(range(1, length + 1), mean, color=STYLE[norm]["color"], lw=1.6,
                    label=f"{norm_name(norm)} ({len(mine)} seed{'s' if len(mine) > 1 else ''})")
        ax.set_title(f"{name} per epoch", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{name} (%)")
        ax.grid(True, color="0.9", lw=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(frameon=False, fontsize=8.5)
    columns = ["norm", "seeds", "error", "difference", "paper (ImageNet)"]
    draw_table(axes[2], table, columns, "Table 1: error (%) at the final epochs; difference to BN")
    workers = span(df["workers"].astype(int))
    finish_figure(fig, out, f"Normalization methods at {span(df['batch_size'].astype(int))} "
                  f"images per worker, {workers} worker{'' if workers == '1' else 's'} (Figure 4 "
                  f"and Table 1 of the paper)", df, label, metric,
                  "; training error: during each epoch, augmented, as the paper's Figure 4; "
                  "paper: ResNet-50 on ImageNet")
    return table


def groups_tables(df, metric):
    """Table 3's two halves: by G (fixed groups) and by channels per group (C / G fixed)."""
    # reproduce.py writes LN as groups 1 and IN as channels_per_group 1, blank the other
    def by_groups(r):
        return int(r.groups) if r.norm in ("gn", "ln") and pd.isna(r.channels_per_group) else None

    def by_channels(r):
        return None if pd.isna(r.channels_per_group) else int(r.channels_per_group)
    out = {}
    for name, key, paper in (("groups G", by_groups, PAPER_TABLE3_GROUPS),
                             ("channels per group", by_channels, PAPER_TABLE3_CHANNELS)):
        rows = df.assign(k=[key(r) for r in df.itertuples()]).dropna(subset=["k"])
        rows = rows.sort_values("k", ascending=False)
        table = study_table(rows, metric, lambda r: int(r.k), name)
        table["paper (ImageNet)"] = [paper.get(int(k), "") for k in table[name]]
        out[name] = table
    return out


def plot_groups(df, out, metric="median_last5_error", label=None):
    """Table 3: error against the number of groups and against the channels per group."""
    tables = groups_tables(df, metric)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), gridspec_kw=dict(height_ratios=[1, 0.8]))
    for col, (name, table) in enumerate(tables.items()):
        ax = axes[0][col]
        if len(table):
            ks = table[name].astype(int).to_numpy()
            means = table["mean"].to_numpy()
            ax.plot(ks, means, marker="s", color=STYLE["gn"]["color"], lw=1.8)
            for k, m, e in zip(ks, means, table["error"]):
                ax.annotate(e.split(" ")[0], (k, m), xytext=(0, 6), textcoords="offset points",
                            ha="center", fontsize=7.5)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
            ax.minorticks_off()
            ax.invert_xaxis()
        ax.set_xlabel(name + (" (1 = LN)" if name == "groups G" else " (1 = IN)"))
        ax.set_ylabel("test error (%)")
        ax.grid(True, color="0.9", lw=0.8)
        ax.set_title(f"GN by {name}", fontsize=10)
        draw_table(axes[1][col], table, [name, "seeds", "error", "difference", "paper (ImageNet)"],
                   f"difference: to the best {name.split()[0]} setting")
    finish_figure(fig, out, f"Group division at {span(df['batch_size'].astype(int))} images per "
                  f"worker (Table 3 of the paper)", df, label, metric,
                  "; paper: ResNet-50 on ImageNet, whose narrowest layers have 64 channels "
                  "(here 16: G and C / G at most 16)", per_line=0.03)
    return tables


def workers_arms(df):
    """The workers study's two lines: W fixed (the most common W: Figure 1's 8, the step
    shrinking with N) and the step fixed (the most common W N: 256 images, W = 256 / N). The
    run where they meet (N = 32, W = 8) is on both."""
    step = df["workers"] * df["batch_size"]
    w, images = int(df["workers"].mode().iloc[0]), int(step.mode().iloc[0])
    return pd.concat([
        df[df["workers"] == w].assign(series=f"BN, W = {w} workers: step of {w}N (Figure 1)"),
        df[step == images].assign(series=f"BN, step of {images} images: W = {images}/N")],
        ignore_index=True)


def plot_workers(df, out, metric="median_last5_error", label=None):
    """BN's error against N, W fixed or the step fixed: does its degradation follow the N
    images each worker normalizes, or the step?"""
    agg = aggregate(workers_arms(df), metric)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.3))
    draw_panel(left, agg, "CIFAR-10, ResNet-20 (this reproduction)", "test error (%)")
    draw_panel(right, aggregate(paper_results()), "ImageNet, ResNet-50, 8 workers (paper, Table 2)",
               "validation error (%)")
    finish_figure(fig, out, "Batch size per worker or per step: BN with W workers of N images",
                  df, label, metric, f"; {spread_note(agg)}; both lines: the same rate per "
                  f"image (0.1 per 256), BN statistics over each worker's N" + missing_note(df),
                  top=0.88)
    return agg


def plot_bnstats(df, out, metric="median_last5_error", label=None):
    """BN's error against N with its moving statistics from the first worker's images or from
    the mean over the workers: a line per rule."""
    df = df.assign(series=[f"BN, moving statistics: {RULES.get(r, r)}"
                           for r in df["moving_statistics"]])
    agg = aggregate(df, metric)
    fig, ax = plt.subplots(figsize=(10, 4.3))
    draw_panel(ax, agg, f"CIFAR-10, ResNet-20, {span(df['workers'].astype(int))} workers",
               "test error (%)")
    finish_figure(fig, out, "BN's moving statistics: the first worker's, or the workers' mean",
                  df, label, metric, f"; {spread_note(agg)}; inference uses the moving "
                  f"statistics; training normalizes each worker's N images on their own",
                  top=0.86, per_line=0.05)
    return agg


# ---------------------------------------------------------------- the tables of the docs

REPO = Path(__file__).resolve().parent
# The earlier reproduction (BeFranke/GroupNorm: ResNet-20 on CIFAR-10, mean of 5 seeds, its
# README), drawn beside ours in README.md's table.
BEFRANKE = {"bn": [13.60, 13.60, 13.86, 15.23, 19.70], "gn": [14.05, 14.29, 14.23, 14.03, 14.21]}
BLOCK = re.compile(r"(<!-- table ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def table_metric(df):
    """The paper's statistic where the runs are long enough for it (20 epochs or more), else
    the final error (the sweep's figures choose the same way)."""
    return "median_last5_error" if df["epochs"].min() >= recipe.STATISTIC_EPOCHS else "test_error"


def by_batch_size(df, metric, sizes=BATCH_SIZES):
    """One cell per batch size: the metric over seeds (summary), '-' without a run."""
    return [summary(df.loc[df.batch_size == b, metric]) for b in sizes]


def paired_gap(a, b, metric, sizes=BATCH_SIZES):
    """a - b per batch size (two sets of runs): per seed where both ran, then over seeds
    (summary, signed); blank where no seed has both."""
    cells = []
    for n in sizes:
        x, y = (d[d.batch_size == n].set_index("seed")[metric] for d in (a, b))
        both = x.index.intersection(y.index)
        cells.append(summary(x[both] - y[both], sign="+") if len(both) else "")
    return cells


def row(label, cells):
    return "| " + " | ".join([label, *map(str, cells)]) + " |"


def data_line(df, metric):
    """What produced a table's numbers, from the results' own columns."""
    parts = [f"{METRICS[metric]} (%)", provenance(df, unit="cell")]
    rules = df.loc[(df.norm == "bn") & (df.workers > 1), "moving_statistics"]
    if len(rules):
        parts.append("BN's moving statistics: " + ", ".join(
            f"{RULES.get(r, r)} ({n} run{'s' if n > 1 else ''})"
            for r, n in rules.value_counts().sort_index().items()))
    if "evaluated" in df.columns and (df["evaluated"] == "record").any():
        parts.append(f"{int((df['evaluated'] == 'record').sum())} of {len(df)} rows from the "
                     f"runs' own final evaluation in their records (evaluated=record: the "
                     f"model files that results.csv names were not kept)")
    return "; ".join(parts) + "."


def figure1_table(df):
    """Figure 1 at the paper's scale against the paper's Table 2 and the earlier reproduction."""
    metric = table_metric(df)
    workers = span(df["workers"].astype(int))
    lines = [data_line(df, metric), "",
             row("images per worker N", BATCH_SIZES), "|---|" + "---:|" * len(BATCH_SIZES)]
    for norm in ("bn", "gn"):
        lines.append(row(f"**this reproduction**, {norm.upper()} (ResNet-20, W = {workers})",
                         by_batch_size(df[df.norm == norm], metric)))
    lines.append(row("BN \u2212 GN (per seed)",
                     paired_gap(df[df.norm == "bn"], df[df.norm == "gn"], metric)))
    lines += [row(f"[Wu & He](https://arxiv.org/abs/1803.08494), Table 2, {n.upper()} "
                  f"(ResNet-50, ImageNet, 8 workers)",
                  PAPER_IMAGENET[n]) for n in ("bn", "gn")]
    lines += [row(f"[BeFranke/GroupNorm](https://github.com/BeFranke/GroupNorm), {n.upper()} "
                  f"(ResNet-20, CIFAR-10, mean of 5 seeds)",
                  [f"{v:.2f}" for v in BEFRANKE[n]]) for n in ("bn", "gn")]
    return "\n".join(lines)


def listed(items):
    """'8, 4 and 2'; '2' for one item."""
    words = [str(x) for x in items]
    return " and ".join([", ".join(words[:-1]), words[-1]]) if len(words) > 1 else words[0]


def figure1_status(df):
    """The front page's status: how many of Figure 1's paper-scale runs are done (a row of
    results.csv at W = 8 and 100 epochs: BN and GN, each N, the profile's seeds) and which
    seeds each point has; what the paper's claim still lacks; which seeds have the whole
    curve."""
    paper = df[(df.workers == recipe.WORKERS) & (df.epochs == recipe.EPOCHS)
               & df.norm.isin(["bn", "gn"]) & df.batch_size.isin(BATCH_SIZES)
               & df.seed.isin(recipe.SEEDS)]
    done = {(r.norm, int(r.batch_size), int(r.seed)) for r in paper.itertuples()}
    total = 2 * len(BATCH_SIZES) * len(recipe.SEEDS)
    small = [n for n in BATCH_SIZES if n <= 8]
    bn_small = sorted({n for norm, n, _ in done if norm == "bn" and n in small}, reverse=True)
    claim = (f"BN's rise at {listed(small)} images per worker, the paper's claim, "
             + (f"has results at N = {listed(bn_small)}." if bn_small
                else "has no result yet."))
    whole = [s for s in recipe.SEEDS
             if all((norm, n, s) in done for norm in ("bn", "gn") for n in BATCH_SIZES)]
    if whole:
        claim += (f" Seed{'s' if len(whole) > 1 else ''} {listed(whole)} "
                  f"{'have' if len(whole) > 1 else 'has'} the whole curve: BN and GN at "
                  f"every N.")
    bn, gn = (paper[paper.norm == n] for n in ("bn", "gn"))
    per_seed = [(n, cell) for n, cell in zip(BATCH_SIZES, paired_gap(bn, gn, table_metric(df)))
                if cell]
    if per_seed:
        paper_gap = gaps(aggregate(paper_results()))
        claim += (" So far, BN \u2212 GN per seed, in points (below 0: GN is worse): "
                  + ", ".join(f"{cell} at N = {n} (the paper's {paper_gap[n]:+.1f})"
                              for n, cell in per_seed) + ".")
    lines = [f"**Status: {len(done)} of Figure 1's {total} paper-scale runs are done** (BN and "
             f"GN at {len(BATCH_SIZES)} batch sizes, {len(recipe.SEEDS)} seeds each). {claim}",
             "", row("seeds done", [f"N = {BATCH_SIZES[0]}", *BATCH_SIZES[1:]]),
             "|---|" + "---:|" * len(BATCH_SIZES)]
    for norm in ("bn", "gn"):
        lines.append(row(norm.upper(), [", ".join(str(s) for s in recipe.SEEDS
                                                  if (norm, n, s) in done) or "\u2013"
                                        for n in BATCH_SIZES]))
    return "\n".join(lines)


def quick_table(df):
    """The quick profile's Figure 1: BN and GN against N, and their gap per seed."""
    metric = table_metric(df)
    workers = span(df["workers"].astype(int))
    lines = [data_line(df, metric), "",
             row(f"images per worker N (W = {workers})", BATCH_SIZES),
             "|---|" + "---:|" * len(BATCH_SIZES)]
    lines += [row(n.upper(), by_batch_size(df[df.norm == n], metric)) for n in ("bn", "gn")]
    lines.append(row("BN \u2212 GN (per seed)",
                     paired_gap(df[df.norm == "bn"], df[df.norm == "gn"], metric)))
    return "\n".join(lines)


def control_table(df):
    """The control's runs: the final error and the median of the final 5 epochs."""
    lines = [data_line(df, "test_error"), "",
             "| run | seeds | final test error | median of the final 5 epochs |",
             "|---|---:|---:|---:|"]
    for (norm, n, w), g in df.groupby(["norm", "batch_size", "workers"], sort=False):
        lines.append(row(f"{norm.upper()}, W = {int(w)} workers of N = {int(n)}",
                         [len(g), summary(g["test_error"]), summary(g["median_last5_error"])]))
    return "\n".join(lines)


def norms_markdown(df):
    metric = table_metric(df)
    return data_line(df, metric) + "\n\n" + markdown(
        norms_table(df, metric), ["norm", "seeds", "error", "difference", "paper (ImageNet)"])


def groups_markdown(name):
    def table(df):
        metric = table_metric(df)
        return data_line(df, metric) + "\n\n" + markdown(
            groups_tables(df, metric)[name], [name, "seeds", "error", "difference",
                                              "paper (ImageNet)"])
    return table


def workers_table(df):
    """The workers study: BN against N, W fixed (Figure 1's arm) or the step fixed."""
    metric = table_metric(df)
    arms = workers_arms(df)
    lines = [data_line(df, metric), "", row("images per worker N", BATCH_SIZES),
             "|---|" + "---:|" * len(BATCH_SIZES)]
    lines += [row(arm, by_batch_size(g, metric)) for arm, g in arms.groupby("series", sort=False)]
    return "\n".join(lines)


def bnstats_table(df):
    """BN's moving statistics: the first worker's against the mean over the workers, per N."""
    metric = table_metric(df)
    sizes = sorted(set(df["batch_size"].astype(int)), reverse=True)
    first, mean = (df[df.moving_statistics == r] for r in ("first", "mean"))
    lines = [data_line(df, metric), "", row("images per worker N (W = 8)", sizes),
             "|---|" + "---:|" * len(sizes),
             row("moving statistics of the first worker (the paper's code; default)",
                 by_batch_size(first, metric, sizes)),
             row("moving statistics, mean over the 8 workers", by_batch_size(mean, metric, sizes))]
    lines.append(row("mean \u2212 first (per seed)", paired_gap(mean, first, metric, sizes)))
    return "\n".join(lines)


# name: (the results file, relative to the repository; the table's markdown from its rows)
TABLES = {
    "figure1-status": ("results.csv", figure1_status),
    "figure1": ("results.csv", figure1_table),
    "quick": ("results/quick/results.csv", quick_table),
    "he-quick": ("results/he-quick/results.csv", control_table),
    "norms-quick": ("results/norms-quick/results.csv", norms_markdown),
    "groups-quick-groups": ("results/groups-quick/results.csv", groups_markdown("groups G")),
    "groups-quick-channels": ("results/groups-quick/results.csv",
                              groups_markdown("channels per group")),
    "workers-quick": ("results/workers-quick/results.csv", workers_table),
    "bnstats-quick": ("results/bnstats-quick/results.csv", bnstats_table),
}


def table_text(name, root=REPO):
    """The markdown of table `name` (TABLES) from its results file, as the docs hold it."""
    if name not in TABLES:
        raise ResultsError(f"no table {name!r}: one of {', '.join(TABLES)}")
    path, make = TABLES[name]
    if not (Path(root) / path).is_file():
        return f"_No results yet: `{path}` does not exist._"
    return make(read_results(Path(root) / path, "test_error"))


def update_tables(root=REPO, check=False):
    """Rewrite every `<!-- table NAME -->...<!-- /table -->` block of README.md and docs/*.md
    with the table made from its results file; check: write nothing, return the files and
    tables that differ. Returns [(file, table name)] of the blocks that changed (or would)."""
    root = Path(root)
    changed = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        if not doc.exists():
            continue
        text = doc.read_text()

        def fill(m):
            body = "\n" + table_text(m.group(2), root) + "\n\n"
            if body != m.group(3):
                changed.append((str(doc.relative_to(root)), m.group(2)))
            return m.group(1) + body + m.group(4)
        new = BLOCK.sub(fill, text)
        if new != text and not check:
            runfiles.atomic_write(doc, lambda tmp: tmp.write_text(new))
    return changed


def tables_main(args):
    changed = update_tables(check=args.check)
    if args.check:
        for doc, name in changed:
            print(f"plot.py: {doc}: table {name} is not what its results file gives; run "
                  f"python plot.py --tables", file=sys.stderr)
        return 1 if changed else 0
    print(f"rewrote {len(changed)} table(s)" + "".join(f"\n  {d}: {n}" for d, n in changed))
    return 0


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
    p.add_argument("--models-dir",
                   help="run records for --curves (default: models) and --study norms (default: "
                        "beside the results' models)")
    p.add_argument("--tables", action="store_true",
                   help="rewrite the results tables of README.md and docs/*.md (the blocks "
                        "<!-- table NAME --> ... <!-- /table -->) from the results files")
    p.add_argument("--check", action="store_true",
                   help="with --tables: write nothing; exit 1 naming each table that differs")
    p.add_argument("--study", choices=("figure1", "norms", "groups", "workers", "bnstats"),
                   default="figure1",
                   help="which figure: Figure 1 (default); norms: Figure 4 and Table 1; groups: "
                        "Table 3; workers: error against N, a line per W (train.py --profile)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.tables:
            return tables_main(args)
        if args.curves:
            out = args.out or "curves.png"
            plot_curves(read_records(args.models_dir or "models"), out, args.label)
        else:
            out = args.out or "plot.png"
            df = read_results(args.results, args.metric)
            if args.study == "norms":
                records = (read_records(args.models_dir) if args.models_dir
                           else records_of(df, args.results))
                table = plot_norms(df, records, out, args.metric, args.label)
                print(markdown(table, ["norm", "seeds", "error", "difference", "paper (ImageNet)"]))
            elif args.study == "groups":
                for name, table in plot_groups(df, out, args.metric, args.label).items():
                    print(markdown(table, [name, "seeds", "error", "difference",
                                           "paper (ImageNet)"]) + "\n")
            elif args.study == "bnstats":
                plot_bnstats(df, out, args.metric, args.label)
            elif args.study == "workers":
                plot_workers(df, out, args.metric, args.label)
            else:
                plot_figure1(df, out, args.metric, args.label)
    except ResultsError as e:
        print(f"plot.py: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
