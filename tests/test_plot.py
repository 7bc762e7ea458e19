"""plot.py on hand-made results.csv files and run records (no training needed):
the aggregation the figure shows, the figure's axes and provenance, the PNGs, and
every error message a user can trigger."""
import json
import struct

import matplotlib.pyplot as plt
import pandas as pd
import pytest

import plot

# bn/gn x batch sizes, with 3 seeds at 32, 2 at 8 and 1 at 2 (std band, min-max, none).
SEEDS = {32: (1, 2, 3), 8: (1, 2), 2: (1,)}
PROVENANCE = dict(train_images=5000, test_images=10000, profile="quick", data_source="cifar10",
                  data_checksum="c0ffee", git_commit="0123456789abcdef", date="2026-11-26")


def results(**overrides):
    rows = []
    for norm in ("bn", "gn"):
        for bs, seeds in SEEDS.items():
            for seed in seeds:
                err = (30 if norm == "bn" else 20) + 32 / bs + seed
                rows.append(dict(norm=norm, groups=8 if norm == "gn" else 0, batch_size=bs,
                                 workers=1, seed=seed, epochs=8, test_error=err + 0.5,
                                 test_loss=1.0, median_last5_error=err, params=272474,
                                 model=f"models/{norm}_b{bs}_s{seed}.keras", **PROVENANCE))
    return pd.DataFrame(rows).assign(**overrides)


@pytest.fixture
def csv(tmp_path):
    path = tmp_path / "results.csv"
    results().to_csv(path, index=False)
    return path


def png_size(path):
    """(width, height) from the PNG header."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


# ------------------------------------------------------------------ aggregation

def test_aggregate_is_the_mean_and_spread_of_the_csv(csv):
    df = pd.read_csv(csv)
    agg = plot.aggregate(plot.read_results(csv)).set_index(["norm", "batch_size"])
    assert len(agg) == 6
    for (norm, bs), g in df.groupby(["norm", "batch_size"]):
        x = g.median_last5_error.to_numpy()
        row = agg.loc[(norm, bs)]
        assert row.n == len(x)
        assert row["mean"] == pytest.approx(x.mean())
        if len(x) >= 3:
            assert row.spread == "std"
            assert row.low == pytest.approx(x.mean() - x.std(ddof=1))
            assert row.high == pytest.approx(x.mean() + x.std(ddof=1))
        else:
            assert row.spread == "min-max"
            assert (row.low, row.high) == (pytest.approx(x.min()), pytest.approx(x.max()))


def test_aggregate_of_final_test_error(csv):
    agg = plot.aggregate(plot.read_results(csv, "test_error"), "test_error")
    assert agg.set_index(["norm", "batch_size"]).loc[("gn", 2), "mean"] == pytest.approx(37.5)


def test_gaps_are_bn_minus_gn():
    agg = plot.aggregate(results())
    assert plot.gaps(agg) == {32: pytest.approx(10), 8: pytest.approx(10), 2: pytest.approx(10)}


def test_no_gap_without_a_single_bn_and_gn_line():
    df = results()
    df.loc[(df.norm == "gn") & (df.seed == 2), "groups"] = 4   # two GN lines: G=4, G=8
    agg = plot.aggregate(df)
    assert set(agg.series) == {"BN", "GN (G=4)", "GN (G=8)"}
    assert plot.gaps(agg) == {}


def test_gap_of_two_bn_lines_is_the_first_workers():
    """BN with the first worker's moving statistics and with the mean over workers: the gap
    is the first worker's line (the paper's rule) minus GN."""
    df = results().assign(moving_statistics="first")
    df.loc[(df.norm == "bn") & (df.seed == 2), "moving_statistics"] = "mean"
    df.loc[(df.norm == "bn") & (df.seed == 2), "median_last5_error"] += 100
    agg = plot.aggregate(df)
    assert set(agg.series) == {"BN, moving statistics: first worker's",
                               "BN, moving statistics: mean over workers", "GN"}
    first = agg[agg.series.str.contains("first")].set_index("batch_size")["mean"]
    gn = agg[agg.norm == "gn"].set_index("batch_size")["mean"]
    assert plot.gaps(agg) == {bs: pytest.approx(first[bs] - gn[bs]) for bs in first.index}


def test_workers_named_only_when_they_vary():
    df = results()
    assert set(plot.aggregate(df).series) == {"BN", "GN"}
    df.loc[df.seed == 1, "workers"] = 8
    assert "BN, 8 workers" in set(plot.aggregate(df).series)


def test_paper_panel_is_table_2():
    agg = plot.aggregate(plot.paper_results()).set_index(["norm", "batch_size"])["mean"]
    assert [agg[("bn", b)] for b in (32, 16, 8, 4, 2)] == [23.6, 23.7, 24.8, 27.3, 34.7]
    assert [agg[("gn", b)] for b in (32, 16, 8, 4, 2)] == [24.1, 24.2, 24.0, 24.2, 24.1]
    assert plot.gaps(plot.aggregate(plot.paper_results()))[2] == pytest.approx(10.6)


# ------------------------------------------------------------------ the drawing

def test_plotted_lines_are_the_csv_means_on_a_reversed_log2_axis(csv):
    df = plot.read_results(csv)
    fig, ax = plt.subplots()
    plot.draw_panel(ax, plot.aggregate(df), "t", "y")
    lines = {line.get_label(): line for line in ax.get_lines()}
    for norm, name in (("bn", "BN"), ("gn", "GN")):
        means = df[df.norm == norm].groupby("batch_size").median_last5_error.mean()
        x, y = lines[name].get_data()
        assert dict(zip(x, y)) == pytest.approx(means.to_dict())
    left, right = ax.get_xlim()
    assert left > 32 and right < 2                      # 32 on the left, 2 on the right
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "16", "8", "4", "2"]
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("+10.0") == 3 and "BN \u2212 GN" in texts
    plt.close(fig)


def test_provenance_line():
    text = plot.provenance(results(), label="CIFAR-10 (JPEG copy)")
    assert text == ("CIFAR-10 (JPEG copy), 5,000 training images, 10,000 test images, 8 epochs, "
                    "quick profile, 1-3 seeds per point, 2026-11-26, data sha256 c0ffee, "
                    "commit 0123456")
    mixed = results(epochs=[8, 30] * 6, git_commit=["abcdef12-dirty"] * 11 + [""],
                    date=["2026-11-25"] * 6 + ["2026-11-27"] * 6)
    assert plot.provenance(mixed).endswith("8-30 epochs, quick profile, 1-3 seeds per point, "
                                           "2026-11-25 to 2026-11-27, data sha256 c0ffee, "
                                           "commit abcdef1-dirty")


def test_provenance_says_where_the_points_were_trained():
    df = results()
    df["trained_on"] = ["NVIDIA H200 0-100"] * 6 + ["unrecorded 0-7; AMD EPYC 9B14 7-100"] * 6
    assert plot.provenance(df).endswith(
        ", trained on AMD EPYC 9B14, NVIDIA H200 (partly on machines not recorded)")
    df["trained_on"] = ["CPU"] * 12   # (results.csv from records without segments)
    assert plot.provenance(df).endswith(", trained on CPU")
    df["trained_on"] = ["unrecorded 0-3; unrecorded 3-5"] * 12
    assert plot.provenance(df).endswith(", trained on machines not recorded")


def test_provenance_without_optional_columns():
    df = results().drop(columns=list(PROVENANCE))
    assert plot.provenance(df) == "8 epochs, 1-3 seeds per point"


def test_cli_writes_the_figure(csv, tmp_path, capsys):
    out = tmp_path / "fig" / "plot.png"
    assert plot.main(["--results", str(csv), "--out", str(out), "--label", "tiny"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert png_size(out) == (1500, 645)                 # 10 x 4.3 inches at 150 dpi
    assert out.stat().st_size > 20_000
    assert [p.name for p in out.parent.iterdir()] == ["plot.png"]   # no temporary left


def test_cli_replaces_an_existing_figure(csv, tmp_path):
    out = tmp_path / "plot.png"
    out.write_bytes(b"old")
    assert plot.main(["--results", str(csv), "--out", str(out)]) == 0
    assert png_size(out)[0] == 1500


# ------------------------------------------------------------------ results.csv errors

def write(tmp_path, text):
    path = tmp_path / "results.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "absent.csv", "no such file"),
    (lambda p: write(p, ""), "the file is empty"),
    (lambda p: write(p, ",".join(results().columns) + "\n"), "no rows, only the header"),
    (lambda p: write(p, results().drop(columns=["seed", "epochs"]).to_csv(index=False)),
     "missing column(s) seed, epochs"),
    (lambda p: write(p, results().astype({"test_error": object})
                     .assign(test_error=["oops"] + [1.0] * 11).to_csv(index=False)),
     "column 'test_error' has a non-numeric value 'oops' on line 2"),
    (lambda p: write(p, results().astype({"median_last5_error": object})
                     .assign(median_last5_error=[1.0] * 4 + [""] + [1.0] * 7)
                     .to_csv(index=False)),
     "column 'median_last5_error' has a non-numeric value '' on line 6"),
    (lambda p: write(p, results().assign(batch_size=0).to_csv(index=False)),
     "column 'batch_size' must be positive"),
    (lambda p: write(p, results().assign(norm=["bn"] * 11 + [" "]).to_csv(index=False)),
     "column 'norm' is empty on line 13"),
    (lambda p: write(p, 'norm,groups\n"bn,8\n'), "not a readable CSV file"),
])
def test_bad_results_csv_is_named_with_the_problem(tmp_path, capsys, make, message):
    path = make(tmp_path)
    out = tmp_path / "plot.png"
    assert plot.main(["--results", str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"plot.py: error: {path}: ")
    assert message in err
    assert not out.exists()


# ------------------------------------------------------------------ training curves

def write_record(folder, norm, bs, seed, errors, workers=1):
    name = f"{norm}_b{bs}_s{seed}"
    history = [dict(epoch=i + 1, lr=0.1, train_loss=1.0, train_error=e + 5, test_loss=1.0,
                    test_error=e, seconds=1.0) for i, e in enumerate(errors)]
    record = dict(name=name, status="finished", history=history,
                  config=dict(norm=norm, groups=8, batch_size=bs, workers=workers, seed=seed,
                              epochs=len(errors)))
    (folder / f"{name}.json").write_text(json.dumps(record))


@pytest.fixture
def models_dir(tmp_path):
    folder = tmp_path / "models"
    (folder / "checkpoints").mkdir(parents=True)
    write_record(folder, "bn", 32, 1, [60, 40, 30])
    write_record(folder, "bn", 32, 2, [50, 30, 20])
    write_record(folder, "bn", 2, 1, [80, 70, 65])
    write_record(folder, "gn", 2, 1, [70, 50, 35])
    (folder / "checkpoints" / "junk.json").write_text("{not json")   # must be ignored
    return folder


def test_curves_are_the_history_mean_over_seeds(models_dir):
    table = plot.curves(plot.read_records(models_dir))
    bn32 = table[(table.norm == "bn") & (table.batch_size == 32)]
    assert bn32.test_error.tolist() == [55, 35, 25] and bn32.n.tolist() == [2, 2, 2]
    assert table[table.norm == "gn"].test_error.tolist() == [70, 50, 35]
    assert table.batch_size.tolist()[:6] == [32, 32, 32, 2, 2, 2]


def test_curves_keep_bns_two_rules_apart(tmp_path, monkeypatch):
    """BN at W = 8 with the first worker's moving statistics and a record from before the rule
    could be chosen (the mean): two lines, each named by its rule, not one mean of both."""
    write_record(tmp_path, "bn", 16, 1, [60, 40], workers=8)       # no config.run: the mean
    record = json.loads((tmp_path / "bn_b16_s1.json").read_text())
    record["name"] = "bn_b16_s2"
    record["config"].update(seed=2, run=dict(record["config"], moving_statistics="first"))
    record["history"] = [dict(h, test_error=h["test_error"] - 20) for h in record["history"]]
    (tmp_path / "bn_b16_s2.json").write_text(json.dumps(record))
    table = plot.curves(plot.read_records(tmp_path))
    assert table.groupby("moving_statistics").test_error.apply(list).to_dict() == {
        "first": [40, 20], "mean": [60, 40]}
    saved = []
    monkeypatch.setattr(plot, "save_atomic", lambda fig, out: saved.append(fig))
    plot.plot_curves(plot.read_records(tmp_path), tmp_path / "curves.png")
    labels = [t.get_text() for t in saved[0].axes[0].get_legend().get_texts()]
    assert labels == ["BN, 16 img/worker, moving statistics: first worker's",
                      "BN, 16 img/worker, moving statistics: mean over workers"]


def test_cli_curves(models_dir, tmp_path):
    out = tmp_path / "curves.png"
    assert plot.main(["--curves", "--models-dir", str(models_dir), "--out", str(out)]) == 0
    assert png_size(out) == (1500, 600)                 # two panels, 5 x 4 inches each
    fig_lines = plot.curves(plot.read_records(models_dir)).groupby(["norm", "batch_size"])
    assert len(fig_lines) == 3


def test_curves_of_one_norm_keep_room_for_the_titles(tmp_path):
    write_record(tmp_path, "bn", 64, 1, [60, 50, 40], workers=2)   # a control's one run
    out = tmp_path / "curves.png"
    assert plot.main(["--curves", "--models-dir", str(tmp_path), "--out", str(out)]) == 0
    assert png_size(out) == (1500, 600)                 # one panel, still 10 x 4 inches


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no run records (NAME.json)"),
    (lambda d: (d / "bn_b8_s1.json").write_text("{oops"), "bn_b8_s1.json: not a run record"),
    (lambda d: (d / "bn_b8_s1.json").write_text('{"config": {"norm": "bn"}, "history": []}'),
     "bn_b8_s1.json: not a run record with a per-epoch history (KeyError: 'groups')"),
    (lambda d: (d / "bn_b8_s1.json").write_text(json.dumps(
        {"config": dict(norm="bn", groups=8, batch_size=8, workers=1, seed=1, epochs=2),
         "history": []})),
     "the run records have no epochs yet"),
])
def test_bad_run_records_are_named(tmp_path, capsys, setup, message):
    folder = tmp_path / "models"
    folder.mkdir()
    setup(folder)
    assert plot.main(["--curves", "--models-dir", str(folder),
                      "--out", str(tmp_path / "c.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("plot.py: error: ") and message in err


# ------------------------------------------------------------------ the other studies

def study_row(norm, seed, error, groups=8, channels_per_group="", batch_size=32, workers=1):
    return dict(norm=norm, groups=groups, channels_per_group=channels_per_group,
                batch_size=batch_size, workers=workers, seed=seed, epochs=3,
                test_error=error, test_loss=1.0, median_last5_error=error + 1, params=272474,
                model=f"m/{norm}.keras", **PROVENANCE)


@pytest.fixture
def norms_study(tmp_path):
    """Two seeds of the four norms: results.csv (from reproduce.py: ln's G 1, in's blank) and
    run records whose training and test errors differ per norm."""
    folder = tmp_path / "models"
    folder.mkdir()
    errors = {"bn": 30.0, "gn": 31.0, "ln": 33.0, "in": 36.0}
    rows = []
    for norm, err in errors.items():
        for seed in (1, 2):
            groups, cpg = {"ln": (1, ""), "in": ("", 1)}.get(norm, (8, ""))
            rows.append(study_row(norm, seed, err + seed, groups, cpg))
            write_record(folder, norm, 32, seed, [err + 20, err + 10, err + seed])
    path = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path, folder


def test_norms_table_is_table_1_with_the_differences_to_bn(norms_study):
    table = plot.norms_table(plot.read_results(norms_study[0], "test_error"), "test_error")
    assert table[["norm", "seeds", "error", "difference", "paper (ImageNet)"]].values.tolist() == [
        ["BN", 2, "31.50 \u00b1 0.71 (n=2)", "+0.00", 23.6],
        ["LN", 2, "34.50 \u00b1 0.71 (n=2)", "+3.00", 25.3],
        ["IN", 2, "37.50 \u00b1 0.71 (n=2)", "+6.00", 28.4],
        ["GN", 2, "32.50 \u00b1 0.71 (n=2)", "+1.00", 24.1]]


def test_cli_norms_draws_figure_4_and_prints_table_1(norms_study, tmp_path, capsys):
    out = tmp_path / "plot-norms.png"
    assert plot.main(["--study", "norms", "--results", str(norms_study[0]), "--models-dir",
                      str(norms_study[1]), "--out", str(out), "--metric", "test_error"]) == 0
    assert png_size(out) == (2250, 660)
    printed = capsys.readouterr().out
    assert "| IN | 2 | 37.50 \u00b1 0.71 (n=2) | +6.00 | 28.4 |" in printed


def test_norms_curves_are_the_mean_over_seeds(norms_study, monkeypatch):
    drawn = {}
    monkeypatch.setattr(plot, "save_atomic", lambda fig, out: drawn.update(
        {(ax.get_title(), line.get_label()): line.get_ydata().tolist()
         for ax in fig.axes for line in ax.get_lines()}))
    df = plot.read_results(norms_study[0])
    plot.plot_norms(df, plot.read_records(norms_study[1]), "x.png")
    assert drawn[("test error per epoch", "IN (2 seeds)")] == [56.0, 46.0, 37.5]
    assert drawn[("training error per epoch", "BN (2 seeds)")] == [55.0, 45.0, 36.5]


@pytest.fixture
def groups_csv(tmp_path):
    rows = [study_row("gn", 1, 40 + g, groups=g) for g in (1, 2, 4, 8, 16)]
    rows += [study_row("gn", 1, 50 - c, groups="", channels_per_group=c) for c in (1, 2, 4, 8, 16)]
    path = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_groups_tables_are_table_3s_halves(groups_csv):
    tables = plot.groups_tables(plot.read_results(groups_csv, "test_error"), "test_error")
    by_g, by_c = tables["groups G"], tables["channels per group"]
    assert by_g["groups G"].tolist() == [16, 8, 4, 2, 1]
    assert by_g["error"].tolist() == ["56.00", "48.00", "44.00", "42.00", "41.00"]
    assert by_g["difference"].tolist() == ["+15.00", "+7.00", "+3.00", "+1.00", "+0.00"]
    assert by_g["paper (ImageNet)"].tolist() == [24.6, 24.4, 24.6, 24.7, 25.3]
    assert by_c["channels per group"].tolist() == [16, 8, 4, 2, 1]
    assert by_c["error"].tolist() == ["34.00", "42.00", "46.00", "48.00", "49.00"]
    assert by_c["paper (ImageNet)"].tolist() == [24.2, 24.3, 24.8, 25.6, 28.4]


def test_ln_and_in_count_as_one_group_and_one_channel_per_group(tmp_path):
    rows = [study_row("ln", 1, 40, groups=1), study_row("in", 1, 45, groups="", channels_per_group=1),
            study_row("gn", 1, 42, groups=8)]
    path = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    tables = plot.groups_tables(plot.read_results(path), "median_last5_error")
    assert tables["groups G"][["groups G", "error"]].values.tolist() == [[8, "43.00"], [1, "41.00"]]
    assert tables["channels per group"][["channels per group", "error"]].values.tolist() == \
        [[1, "46.00"]]


def test_cli_groups_writes_the_figure_and_prints_both_tables(groups_csv, tmp_path, capsys):
    out = tmp_path / "plot-groups.png"
    assert plot.main(["--study", "groups", "--results", str(groups_csv), "--out", str(out)]) == 0
    assert png_size(out) == (1650, 1125)
    printed = capsys.readouterr().out
    assert "| groups G | seeds | error | difference | paper (ImageNet) |" in printed
    assert "| 1 | 1 | 50.00 | +15.00 | 28.4 |" in printed   # C / G = 1 (IN): 49 + 1 vs 34 + 1


def test_workers_study_draws_both_arms_through_their_common_run(tmp_path, monkeypatch):
    """W = 8 with the step shrinking (Figure 1's BN), and the step held at 256 images with
    W = 256 / N; the N = 32, W = 8 run is on both lines."""
    rows = [study_row("bn", 1, 10 + 32 / n, batch_size=n, workers=8) for n in (32, 16, 8, 4, 2)]
    rows += [study_row("bn", 1, 20 + 32 / n, batch_size=n, workers=256 // n) for n in (16, 8, 4, 2)]
    path = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    drawn = {}
    monkeypatch.setattr(plot, "save_atomic", lambda fig, out: drawn.update(
        {line.get_label(): (line.get_ydata().tolist(), line.get_linestyle())
         for line in fig.axes[0].get_lines()}))
    plot.plot_workers(plot.read_results(path, "test_error"), "x.png", "test_error")
    assert drawn["BN, W = 8 workers: step of 8N (Figure 1)"] == ([11.0, 12.0, 14.0, 18.0, 26.0], "-")
    assert drawn["BN, step of 256 images: W = 256/N"] == ([11.0, 22.0, 24.0, 28.0, 36.0], "--")
    assert plot.main(["--study", "workers", "--results", str(path), "--out",
                      str(tmp_path / "w.png")]) == 0


def test_a_point_alone_shows_its_seeds_spread_as_an_error_bar():
    """A line of one batch size has no band to draw (no width): its spread is an error bar;
    a line of several keeps its band."""
    df = results()
    df = df[(df.norm == "gn") | (df.batch_size == 32)]    # BN at N = 32 alone, seeds 1-2
    fig, ax = plt.subplots()
    agg = plot.aggregate(df)
    plot.draw_panel(ax, agg, "t", "y")
    bars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(bars) == 1
    (segments,) = bars[0].lines[2]
    bn = agg[agg.norm == "bn"].iloc[0]
    assert segments.get_segments()[0][:, 1].tolist() == [pytest.approx(bn.low), pytest.approx(bn.high)]
    assert len(ax.collections) == 2    # GN's band, and the error bar's line collection
    plt.close(fig)
