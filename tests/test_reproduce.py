"""reproduce.py end to end on the tiny CIFAR-10 fixture: train two tiny models (BN and
GN) once, evaluate them into results.csv, plot it, and trigger every error path."""
import contextlib
import io
import json
import shutil
import struct
import subprocess
import sys
import types

import pandas as pd
import pytest

from conftest import CHATTER, REPO, user_env

import plot
import reproduce
import train

RUN = ["--batch-size", "8", "--workers", "1", "--seed", "1", "--epochs", "2", "--train-images", "200"]


def run_main(main, argv):
    """(exit status, stdout, stderr) of main(argv), captured (module fixtures can't use capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_dir):
    """models/ with bn_b8_s1 and gn_b8_s1: 2 epochs on 200 fixture images each."""
    root = tmp_path_factory.mktemp("runs")
    for norm in ("gn", "bn"):
        assert train.main(["--norm", norm, *RUN, "--data-dir", str(cifar_dir),
                           "--models-dir", str(root / "models"),
                           "--logs-dir", str(root / "logs")]) == 0
    return root / "models"


@pytest.fixture(scope="module")
def reproduced(trained, cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "results.csv"
    code, stdout, stderr = run_main(reproduce.main, ["--models-dir", str(trained), "--out",
                                                     str(out), "--data-dir", str(cifar_dir)])
    return code, stdout, stderr, out


def record(models, name):
    return json.loads((models / f"{name}.json").read_text())


def test_a_record_without_its_model_is_carried_and_marked(trained, cifar_dir, tmp_path):
    """A finished run whose model was not kept: its row comes from its own record, marked
    evaluated=record, the command says so and how to train it again; the other is evaluated.
    Without data at all, the record alone is still written."""
    folder = tmp_path / "models"
    shutil.copytree(trained, folder)
    (folder / "gn_b8_s1.keras").unlink()
    out = tmp_path / "results.csv"
    code, stdout, stderr = run_main(reproduce.main, ["--models-dir", str(folder), "--out",
                                                     str(out), "--data-dir", str(cifar_dir)])
    assert code == 0 and "1 model(s) evaluated, 1 run(s) from their records" in stdout
    assert "1 run(s) have a run record but no saved model" in stderr
    assert "gn_b8_s1: python train.py --norm gn --batch-size 8 --workers 1 --seed 1" in stderr
    df = pd.read_csv(out).set_index("norm")
    assert df.loc["gn", "evaluated"] == "record" and df.loc["bn", "evaluated"] == "model"
    gn = record(trained, "gn_b8_s1")
    assert df.loc["gn", "test_error"] == round(gn["test_error"], 2)
    (folder / "bn_b8_s1.keras").unlink()
    code, stdout, _ = run_main(reproduce.main, ["--models-dir", str(folder), "--out", str(out),
                                                "--data-dir", str(tmp_path / "no-data")])
    assert code == 0 and set(pd.read_csv(out)["evaluated"]) == {"record"}


# ------------------------------------------------------------------ the good path

def test_results_csv_rows_and_columns(reproduced, trained):
    code, stdout, _, out = reproduced
    assert code == 0 and f"wrote {out}: 2 model(s) evaluated" in stdout
    df = pd.read_csv(out)
    assert list(df.columns) == reproduce.COLUMNS + reproduce.PROVENANCE
    assert df.columns[:14].tolist() == ["norm", "groups", "channels_per_group", "batch_size",
                                        "workers", "moving_statistics", "seed", "epochs",
                                        "test_error", "test_loss", "median_last5_error", "params",
                                        "model", "evaluated"]
    assert df.moving_statistics.isna().all() and set(df.evaluated) == {"model"}   # W = 1
    assert df.channels_per_group.isna().all()   # blank: G is fixed
    assert df.norm.tolist() == ["bn", "gn"]
    assert df[["groups", "batch_size", "workers", "seed", "epochs"]].values.tolist() == \
        [[8, 8, 1, 1, 2]] * 2
    assert df.model.tolist() == [str(trained / "bn_b8_s1.keras"), str(trained / "gn_b8_s1.keras")]
    assert df.params.tolist() == [272_474, 272_474]   # ResNet-20, trainable (He et al.: 0.27M)
    assert df.train_images.tolist() == [200, 200] and df.test_images.tolist() == [100, 100]
    assert set(df.profile) == {"default"}
    assert not list(out.parent.glob("*.tmp"))
    # numbers as a person reads them: errors to 2 decimals, the loss to 4, no float noise
    text = pd.read_csv(out, dtype=str)
    for column, decimals in (("test_error", 2), ("median_last5_error", 2), ("test_loss", 4)):
        assert all(len(v.partition(".")[2]) <= decimals for v in text[column]), text[column]


def test_same_numbers_as_the_runs_own_evaluation(reproduced, trained):
    df = pd.read_csv(reproduced[3]).set_index("norm")
    for norm in ("bn", "gn"):
        rec = record(trained, f"{norm}_b8_s1")
        row = df.loc[norm]
        assert row.test_error == round(rec["test_error"], 2)
        assert row.test_loss == pytest.approx(rec["test_loss"], abs=5e-5)
        errors = [h["test_error"] for h in rec["history"]]   # 2 epochs: the median is the mean
        assert len(errors) == 2 and row.median_last5_error == round((errors[0] + errors[1]) / 2, 2)
        assert row.params == rec["params"]
        assert row.data_checksum == rec["data"]["checksum"]
        assert row.git_commit == rec["git_commit"]
        assert row.date == rec["finished_at"][:10]
        assert row.trained_on == f"{rec['machine']} 0-2" and rec["machine"]   # one session
    assert "warning" not in reproduced[2]


def test_trained_on_names_each_stretch_of_training_and_merges_one_machines():
    gpu, cpu = {"machine": "NVIDIA H200"}, {"machine": "AMD EPYC 9B14"}
    segments = [{"start": [0, 0], "end": [42, 84], "recorded": False},
                {"start": [42, 84], "end": [90, 56], **gpu},
                {"start": [90, 56], "end": [95, 0], **cpu}, {"start": [95, 0], "end": [100, 0], **cpu}]
    assert reproduce.trained_on({"segments": segments}) == \
        "unrecorded 0-42; NVIDIA H200 42-90; AMD EPYC 9B14 90-100"
    # records from before segments: the record's machine, else what its devices say
    assert reproduce.trained_on({"machine": "NVIDIA H200"}) == "NVIDIA H200"
    assert reproduce.trained_on({"gpus": ["cuda:0"]}) == "GPU"
    assert reproduce.trained_on({"gpus": []}) == "CPU"


def test_plot_of_the_reproduced_results(reproduced, tmp_path):
    out = tmp_path / "plot.png"
    assert plot.main(["--results", str(reproduced[3]), "--out", str(out)]) == 0
    width, height = struct.unpack(">II", out.read_bytes()[16:24])
    assert (width, height) == (1500, 645)
    csv = pd.read_csv(reproduced[3])
    agg = plot.aggregate(plot.read_results(reproduced[3]))
    assert agg[["norm", "batch_size", "n"]].values.tolist() == [["bn", 8, 1], ["gn", 8, 1]]
    assert agg["mean"].tolist() == csv.median_last5_error.tolist()
    assert plot.gaps(agg) == {8: pytest.approx(csv.median_last5_error[0]
                                               - csv.median_last5_error[1])}


def test_curves_from_the_run_records(trained, tmp_path):
    out = tmp_path / "curves.png"
    assert plot.main(["--curves", "--models-dir", str(trained), "--out", str(out)]) == 0
    table = plot.curves(plot.read_records(trained))
    assert table.epoch.tolist() == [1, 2, 1, 2]
    assert table.test_error.tolist() == [h["test_error"] for n in ("bn", "gn")
                                         for h in record(trained, f"{n}_b8_s1")["history"]]


def test_plot_needs_only_columns_that_reproduce_writes():
    assert set(plot.TEXT_COLUMNS + plot.NUMERIC_COLUMNS + list(plot.METRICS)) <= \
        set(reproduce.COLUMNS)


# ------------------------------------------------------------------ pieces

def test_median_last5():
    history = [{"test_error": e} for e in (90, 80, 5, 7, 3, 9, 4)]
    assert reproduce.median_last5(history) == 5          # of 5, 7, 3, 9, 4
    assert reproduce.median_last5(history[:6]) == 7      # of 80, 5, 7, 3, 9
    assert reproduce.median_last5(history[:4]) == 43.5   # of all four: (7 + 80) / 2
    assert reproduce.median_last5(history[:2]) == 85
    assert reproduce.median_last5(history[:1]) == 90


# A made-up history with float noise: the final five are 5.25, 7.5, 3, 9.75 and 4.5.
NOISY_HISTORY = [{"epoch": i + 1, "test_error": e} for i, e in
                 enumerate((90.0, 80.0, 5.250000000000001, 7.5, 3.0, 9.75, 4.499999999999999))]


@pytest.mark.parametrize("reproduced, recorded, warns, written", [
    (57.054, 57.0, True, 57.05),                # 0.054 apart: rounded first, 57.05 would not warn
    (57.49999999999999, 57.5, False, 57.5),
])
def test_agreement_checked_before_rounding(tmp_path, monkeypatch, capsys, reproduced, recorded,
                                           warns, written):
    path = tmp_path / "gn_b8_s1.keras"
    record = dict(status="finished", test_error=recorded, history=NOISY_HISTORY,
                  finished_at="2026-11-26T12:00:00+0000",
                  config=dict(norm="gn", groups=8, batch_size=8, workers=1, seed=1, epochs=7))
    path.with_suffix(".json").write_text(json.dumps(record))
    monkeypatch.setattr(reproduce, "load_model", lambda p: types.SimpleNamespace(trainable_weights=[]))
    monkeypatch.setattr(train, "evaluate", lambda model, data: (1.234567891, reproduced))
    cache = types.SimpleNamespace(get=lambda config: types.SimpleNamespace(checksum="c"))
    row = reproduce.evaluate_one(path, cache)
    assert (row["test_error"], row["test_loss"], row["median_last5_error"]) == (written, 1.2346, 5.25)
    assert ("differs from the run record's" in capsys.readouterr().err) == warns


def test_rows_sorted_by_norm_batch_size_descending_seed():
    rows = [dict(norm=n, batch_size=b, seed=s, workers=1, groups=8)
            for n in ("gn", "bn") for s in (2, 1) for b in (2, 32, 8)]
    df = reproduce.results_table(rows)
    assert list(zip(df.norm, df.batch_size, df.seed))[:7] == [
        ("bn", 32, 1), ("bn", 32, 2), ("bn", 8, 1), ("bn", 8, 2), ("bn", 2, 1), ("bn", 2, 2),
        ("gn", 32, 1)]


def test_data_prepared_once_per_training_subset(monkeypatch):
    calls = []
    monkeypatch.setattr(reproduce.cifar10, "prepare_data",
                        lambda d, train_images, test_images: calls.append(train_images) or d)
    cache = reproduce.DataCache("dir")
    for n in (200, 200, None, 200, None):
        assert cache.get({"run": {"train_images": n, "test_images": None}}) == "dir"
    assert calls == [200, None]


# ------------------------------------------------------------------ error paths

@pytest.fixture(scope="module")
def mixed(trained, cifar_dir, tmp_path_factory):
    """A models/ with one good model (whose record disagrees) and four bad ones."""
    models = tmp_path_factory.mktemp("mixed") / "models"
    (models / "checkpoints").mkdir(parents=True)
    shutil.copy(trained / "gn_b8_s1.keras", models / "gn_b8_s1.keras")
    rec = record(trained, "gn_b8_s1")
    rec["data"]["checksum"] = "f" * 64
    rec["test_error"] += 1
    rec["history"] = NOISY_HISTORY
    (models / "gn_b8_s1.json").write_text(json.dumps(rec))
    shutil.copy(trained / "bn_b8_s1.keras", models / "orphan.keras")          # no record
    (models / "corrupt.keras").write_bytes(b"not a zip file")                 # unreadable
    shutil.copy(trained / "bn_b8_s1.json", models / "corrupt.json")
    shutil.copy(trained / "bn_b8_s1.keras", models / "bn_b8_s2.keras")       # record not JSON
    (models / "bn_b8_s2.json").write_text("{truncated")
    shutil.copy(trained / "bn_b8_s1.keras", models / "bn_b8_s3.keras")       # unfinished run
    (models / "bn_b8_s3.json").write_text(json.dumps(dict(record(trained, "bn_b8_s1"),
                                                          status="running")))
    (models / "checkpoints" / "junk.keras").write_bytes(b"ignored")           # not a model
    out = models.parent / "results.csv"
    code, stdout, stderr = run_main(reproduce.main, ["--models-dir", str(models), "--out",
                                                     str(out), "--data-dir", str(cifar_dir)])
    return models, out, code, stdout, stderr


def test_bad_models_are_named_and_the_others_evaluated(mixed):
    models, out, code, stdout, stderr = mixed
    assert code == 1
    assert f"reproduce.py: error: {models / 'orphan.keras'}: no run record orphan.json" in stderr
    assert f"reproduce.py: error: {models / 'corrupt.keras'}: cannot load the model" in stderr
    assert f"reproduce.py: error: {models / 'bn_b8_s2.json'}: not a readable run record" in stderr
    assert (f"reproduce.py: error: {models / 'bn_b8_s3.json'}: the run record's status is "
            f"'running', not 'finished'") in stderr
    assert "junk" not in stderr + stdout
    assert pd.read_csv(out).model.tolist() == [str(models / "gn_b8_s1.keras")]


def test_median_is_taken_from_the_records_history(mixed):
    """The made-up history's median, by hand, as results.csv's text holds it."""
    _, out, _, _, _ = mixed
    assert pd.read_csv(out, dtype=str).median_last5_error.tolist() == ["5.25"]


def test_bad_models_are_listed_at_the_end(mixed):
    models, _, _, _, stderr = mixed
    tail = stderr[stderr.index("4 of 5 model(s) could not be evaluated"):].splitlines()[1:]
    assert [line.strip() for line in tail] == [
        str(models / n) for n in ("bn_b8_s2.keras", "bn_b8_s3.keras", "corrupt.keras",
                                  "orphan.keras")]


def test_disagreement_with_the_run_record_warns(mixed, trained):
    models, out, _, _, stderr = mixed
    model = models / "gn_b8_s1.keras"
    assert pd.read_csv(out).test_error[0] == round(record(trained, "gn_b8_s1")["test_error"], 2)
    assert f"reproduce.py: warning: {model}: the data's checksum" in stderr
    assert "differs from the run record's ffffffff" in stderr
    error = pd.read_csv(out).test_error[0]
    assert (f"reproduce.py: warning: {model}: test error {error:.2f}% differs from the run "
            f"record's {error + 1:.2f}%") in stderr


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "absent", "absent does not exist (NAME.keras)"),
    (lambda p: (p / "empty" / "checkpoints").mkdir(parents=True) or p / "empty",
     "empty has no models (NAME.keras)"),
])
def test_no_models_says_how_to_train_them(tmp_path, capsys, make, message):
    folder = make(tmp_path)
    out = tmp_path / "results.csv"
    assert reproduce.main(["--models-dir", str(folder), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and "python train.py --profile quick" in err
    assert not out.exists()


def test_missing_data_stops_with_a_clear_message(trained, tmp_path, capsys):
    out = tmp_path / "results.csv"
    code = reproduce.main(["--models-dir", str(trained), "--out", str(out),
                           "--data-dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot prepare the test data" in err and "CIFAR-10 not found" in err
    assert not out.exists()


def test_existing_results_are_replaced_whole(reproduced, trained, cifar_dir, tmp_path):
    out = tmp_path / "results.csv"
    out.write_text("stale\n")
    models = tmp_path / "models"
    models.mkdir()
    for suffix in (".keras", ".json"):
        shutil.copy(trained / f"bn_b8_s1{suffix}", models / f"bn_b8_s1{suffix}")
    code, _, _ = run_main(reproduce.main, ["--models-dir", str(models), "--out", str(out),
                                           "--data-dir", str(cifar_dir)])
    assert code == 0
    assert pd.read_csv(out).drop(columns="model").equals(
        pd.read_csv(reproduced[3]).drop(columns="model").iloc[:1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "results.csv"]


def test_check_compares_with_the_file_and_writes_nothing(reproduced, trained, cifar_dir,
                                                         tmp_path):
    """--check: the same rows within 0.05 points pass; a test error 0.06 off, another column
    changed, a row missing or an unreadable file fail, naming what differs; nothing is written."""
    out = tmp_path / "results.csv"
    good = pd.read_csv(reproduced[3], keep_default_na=False)
    gn = str(trained / "gn_b8_s1.keras")

    def check(df):
        if df is not None:
            df.to_csv(out, index=False)
        before = out.read_bytes() if out.exists() else None
        result = run_main(reproduce.main, ["--models-dir", str(trained), "--out", str(out),
                                           "--data-dir", str(cifar_dir), "--check"])
        assert (out.read_bytes() if out.exists() else None) == before
        return result

    code, stdout, _ = check(good)
    assert code == 0 and "--check: all 2 row(s)" in stdout
    near = good.copy()
    near.loc[near.norm == "gn", "test_error"] += 0.04
    near.loc[near.norm == "bn", "date"] = "1999-01-01"
    assert check(near)[0] == 0
    off = good.copy()
    off.loc[off.norm == "gn", "test_error"] += 0.06
    off.loc[off.norm == "bn", "median_last5_error"] += 1
    code, _, stderr = check(off)
    assert code == 1 and "2 difference(s)" in stderr
    assert f"  {gn}: test_error " in stderr
    assert f"{trained / 'bn_b8_s1.keras'}: median_last5_error " in stderr
    code, _, stderr = check(good[good.norm == "bn"])
    assert code == 1 and f"  {gn}: in the re-evaluation, not in the file" in stderr
    out.unlink()
    code, _, stderr = check(None)
    assert code == 2 and f"--check: cannot read {out}" in stderr and not out.exists()


def test_many_models_are_evaluated_without_a_library_line(trained, cifar_dir, tmp_path):
    """python reproduce.py as a user runs it, on 6 models (the two trained ones, 3 copies of
    each): each has its own predict function, so TensorFlow counts 6 traces of one Python
    function (its warning comes from the 5th: startup.no_retracing_warning); stderr is empty."""
    models = tmp_path / "models"
    models.mkdir()
    for norm in ("bn", "gn"):
        for seed in (1, 2, 3):
            for suffix in (".keras", ".json"):
                shutil.copy(trained / f"{norm}_b8_s1{suffix}",
                            models / f"{norm}_b8_s{seed}{suffix}")
    out = tmp_path / "results.csv"
    result = subprocess.run([sys.executable, "reproduce.py", "--models-dir", str(models), "--out",
                             str(out), "--data-dir", str(cifar_dir)], cwd=REPO,
                            env=user_env(KERAS_BACKEND="tensorflow"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote " in result.stdout and "6 model(s) evaluated" in result.stdout
    text = result.stdout + result.stderr
    assert "WARNING:tensorflow" not in text and "retracing" not in text, text[-3000:]
    assert not CHATTER.search(text) and result.stderr == "", result.stderr[-3000:]
    assert len(pd.read_csv(out)) == 6


@pytest.mark.parametrize("config, expected", [
    (dict(norm="bn", groups=8), (8, None)),
    (dict(norm="gn", groups=4, channels_per_group=None), (4, None)),
    (dict(norm="gn", groups=8), (8, None)),   # a record from before channels_per_group
    (dict(norm="gn", groups=8, channels_per_group=2), (None, 2)),
    (dict(norm="ln", groups=8), (1, None)),
    (dict(norm="in", groups=8), (None, 1)),
])
def test_groups_and_channels_per_group_are_what_the_run_used(config, expected):
    got = reproduce.groups_of(config)
    assert (got["groups"], got["channels_per_group"]) == expected


def test_blank_group_columns_stay_blank_and_sort():
    rows = [dict(norm=n, groups=g, channels_per_group=c, batch_size=32, workers=1, seed=1)
            for n, g, c in (("in", None, 1), ("gn", None, 2), ("gn", 4, None), ("ln", 1, None))]
    df = reproduce.results_table(rows)
    csv = df[["norm", "groups", "channels_per_group"]].to_csv(index=False).splitlines()
    assert csv == ["norm,groups,channels_per_group", "gn,4,", "gn,,2", "in,,1", "ln,1,"]
