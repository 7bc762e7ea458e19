"""The studies beyond Figure 1 as the paper's questions need them: He et al.'s recipe as a
control (profile he), the workers study with the step held at 256 images, and one run per
configuration across profiles (recipe.provider), found where it is by reproduce.py and plot.py.
The numbers below are written out by hand from the papers, not read from train.py."""
import json
import re
import subprocess
import sys
from dataclasses import replace

import pandas as pd
import pytest

import reproduce
import train
from gnrepro import recipe  # noqa: E402
from conftest import REPO


def run_train(*args):
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)


def test_grid_cli_prints_the_control_and_the_workers_study():
    he = run_train("--grid", "--profile", "he").stdout.splitlines()
    assert he == [
        "# 3 runs, profile he: study he (1 runs) x 3 seeds, scale paper",
        *(f"{s - 1} bn_b64_w2_lr0.1_he_s{s} --norm bn --batch-size 64 --workers 2 --seed {s} "
          f"--learning-rate 0.1 --schedule he" for s in (1, 2, 3))]
    workers = run_train("--grid", "--profile", "workers").stdout.splitlines()
    assert workers[0] == ("# 27 runs, profile workers: study workers (9 runs) x 3 seeds, scale "
                          "paper; 15 provided by another profile (trained there, once)")
    assert workers[1:10] == [
        "0 bn_b32_w8_s1 --norm bn --batch-size 32 --workers 8 --seed 1 # provided by default",
        "1 bn_b16_w8_s1 --norm bn --batch-size 16 --workers 8 --seed 1 # provided by default",
        "2 bn_b8_w8_s1 --norm bn --batch-size 8 --workers 8 --seed 1 # provided by default",
        "3 bn_b4_w8_s1 --norm bn --batch-size 4 --workers 8 --seed 1 # provided by default",
        "4 bn_b2_w8_s1 --norm bn --batch-size 2 --workers 8 --seed 1 # provided by default",
        "5 bn_b16_w16_lr0.1_s1 --norm bn --batch-size 16 --workers 16 --seed 1 --learning-rate 0.1",
        "6 bn_b8_w32_lr0.1_s1 --norm bn --batch-size 8 --workers 32 --seed 1 --learning-rate 0.1",
        "7 bn_b4_w64_lr0.1_s1 --norm bn --batch-size 4 --workers 64 --seed 1 --learning-rate 0.1",
        "8 bn_b2_w128_lr0.1_s1 --norm bn --batch-size 2 --workers 128 --seed 1 --learning-rate 0.1"]


def test_the_control_is_he_et_als_recipe_at_paper_scale():
    (cfg,) = recipe.grid("he", [1])
    assert (cfg.norm, cfg.batch_size, cfg.workers, cfg.lr, cfg.epochs) == ("bn", 64, 2, 0.1, 164)
    # 50,000 images in steps of 128: 390 steps an epoch (the last partial one dropped), so
    # the drops after epochs 82 and 123 come at iterations 31,980 and 47,970 of 63,960,
    # He et al.'s 32k, 48k and 64k within 0.1 %
    assert cfg.lr_drops == [82, 123] and 50_000 // 128 == 390
    assert [d * 390 for d in cfg.lr_drops] + [164 * 390] == [31_980, 47_970, 63_960]


def test_every_workers_run_is_a_step_of_256_images_at_0_1_or_figure_1s():
    runs = recipe.grid("workers", [1])
    fixed = [c for c in runs if c.workers != 8]
    assert [(c.batch_size, c.workers, c.lr) for c in fixed] == [
        (16, 16, 0.1), (8, 32, 0.1), (4, 64, 0.1), (2, 128, 0.1)]
    figure1 = [c for c in runs if c.workers == 8]
    assert [(c.batch_size, c.lr) for c in figure1] == [
        (32, 0.1), (16, 0.05), (8, 0.025), (4, 0.0125), (2, 0.00625)]
    # the same rate per image everywhere (0.1 per 256), and no run beyond 40,000 steps
    assert {c.lr / (c.batch_size * c.workers) for c in runs} == {0.1 / 256}
    assert max(50_000 // (c.batch_size * c.workers) * c.epochs for c in fixed) == 19_500


def tiny_run(cifar_dir, tmp_path, *args):
    result = run_train(*args, "--data-dir", cifar_dir, "--models-dir", tmp_path / "m",
                       "--logs-dir", tmp_path / "l")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "m").glob("*.json")]
    return record


@pytest.mark.slow
def test_a_tiny_control_run_records_he_et_als_rate_step_and_schedule(cifar_dir, tmp_path):
    # 260 of the fixture's images in steps of 128: 2 steps an epoch; 8 epochs, the drops
    # scaled from 82 and 123 of 164 to epochs 4 and 6
    record = tiny_run(cifar_dir, tmp_path, "--profile", "he", "--task", "0", "--epochs", "8",
                      "--train-images", "260", "--test-images", "100")
    config = record["config"]
    assert record["name"] == "bn_b64_w2_lr0.1_he_s1"
    assert (config["lr"], config["batch_size"], config["workers"], config["step_images"]) == \
        (0.1, 64, 2, 128)
    assert (config["schedule"], config["lr_drops"], config["steps_per_epoch"]) == ("he", [4, 6], 2)
    assert (config["lr_drop_steps"], config["steps"]) == ([8, 12], 16)
    assert [e["lr"] for e in record["history"]] == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)


@pytest.mark.slow
def test_a_tiny_workers_run_records_a_step_of_256_at_0_1(cifar_dir, tmp_path):
    # the fixture's 500 images make one step of 256 an epoch; 10 epochs, drops after 3, 6, 9
    record = tiny_run(cifar_dir, tmp_path, "--profile", "workers", "--task", "8", "--epochs", "10",
                      "--test-images", "100")
    config = record["config"]
    assert record["name"] == "bn_b2_w128_lr0.1_s1"
    assert (config["lr"], config["batch_size"], config["workers"], config["step_images"]) == \
        (0.1, 2, 128, 256)
    assert (config["schedule"], config["lr_drops"], config["steps"]) == ("paper", [3, 6, 9], 10)
    assert [e["lr"] for e in record["history"]] == pytest.approx(
        [0.1] * 3 + [0.01] * 3 + [0.001] * 3 + [0.0001])


# --- one run per configuration ---------------------------------------------------------

def test_the_paper_needs_72_runs_once_shared_and_the_docs_say_so():
    runs = recipe.paper_runs()
    assert len(runs) == len({c.name for c in runs}) == 72
    by = pd.Series([c.profile for c in runs]).value_counts().to_dict()
    assert by == {"default": 30, "workers": 12, "groups": 21, "norms": 6, "he": 3}
    unshared = sum(len(recipe.grid(p)) for p, (_, s) in recipe.PROFILES.items() if s == "paper")
    assert unshared == 30 + 3 + 12 + 27 + 30
    # every run is in its provider's grid, under the name it has in every grid that needs it
    for c in runs:
        assert c in recipe.grid(c.profile, [c.seed])
    studies = (REPO / "docs" / "studies.md").read_text()
    assert re.search(r"\b72 distinct paper-scale runs\b", studies) and re.search(r"\b102\b", studies)


def test_shared_runs_belong_to_the_first_profile_that_needs_them():
    norms = recipe.grid("norms-quick")
    assert [recipe.provider(c) for c in norms] == ["quick", "quick", "norms-quick", "norms-quick"]
    groups = {c.name: recipe.provider(c) for c in recipe.grid("groups", [2])}
    assert [n for n, p in groups.items() if p != "groups"] == [
        "ln_b32_w8_s2", "gn_b32_w8_s2", "in_b32_w8_s2"]
    assert {groups[n] for n in ("ln_b32_w8_s2", "in_b32_w8_s2")} == {"norms"}
    # another scale, or another configuration, is nobody else's
    assert recipe.provider(replace(norms[0], epochs=3)) == "norms-quick"


def test_a_provided_task_trains_in_its_providers_folder(monkeypatch, cifar_dir):
    seen = {}
    monkeypatch.setattr(train, "train", lambda cfgs, data, models, logs, *a, **k: seen.update(
        cfg=cfgs[0], models=models, logs=logs) or 0)
    data = ["--data-dir", str(cifar_dir)]
    assert train.main(["--profile", "norms", "--task", "5", *data]) == 0   # gn_b32_w8_s2
    assert (seen["cfg"].name, seen["cfg"].profile) == ("gn_b32_w8_s2", "default")
    assert (seen["models"], seen["logs"]) == ("models", "logs")
    assert train.main(["--profile", "norms", "--task", "6", *data]) == 0   # ln: the norms study's own
    assert (seen["cfg"].profile, seen["models"]) == ("norms", "models/norms")
    # the caller's own folders: that run there, nothing shared
    assert train.main(["--profile", "norms", "--task", "5", "--models-dir", "x", *data]) == 0
    assert (seen["cfg"].profile, seen["models"]) == ("norms", "x")


def test_old_records_and_checkpoints_still_match_their_configuration(tmp_path):
    from gnrepro import runfiles
    from dataclasses import asdict
    cfg = recipe.Config(norm="gn", batch_size=8, epochs=100)
    old = {k: v for k, v in asdict(cfg).items() if k not in ("learning_rate", "schedule")}
    paths = runfiles.Paths(tmp_path, tmp_path, cfg.name)
    paths.model.write_text("a model")
    runfiles.write_json(paths.record, {"config": {"run": old}})
    assert runfiles.finished_record(paths, asdict(cfg), recipe.run_identity)


def test_a_rate_equal_to_the_rule_is_the_rule():
    assert recipe.Config(batch_size=32, learning_rate=0.1) == recipe.Config(batch_size=32)
    assert recipe.Config(batch_size=16, learning_rate=0.1).name == "gn_b16_lr0.1_s1"
    with pytest.raises(ValueError, match="schedule should be one of"):
        recipe.Config(schedule="cosine")


def fake_run(folder, cfg):
    """A finished run's files as reproduce.py finds them (the model file is not read here)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{cfg.name}.keras").write_text("model")
    from dataclasses import asdict
    (folder / f"{cfg.name}.json").write_text(json.dumps(
        {"status": "finished", "config": {"run": asdict(cfg), **asdict(cfg)},
         "history": [{"test_error": 50.0}]}))


def test_reproduce_finds_a_profiles_shared_runs_where_they_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for cfg in recipe.grid("quick", [1, 2]) + recipe.grid("norms-quick", [1]):
        fake_run(tmp_path / recipe.profile_paths(recipe.provider(cfg))["models_dir"],
                 replace(cfg, profile=recipe.provider(cfg)))
    shared = sorted(str(p) for p in reproduce.shared_models("norms-quick"))
    assert shared == [f"models/quick/{n}_b32_s{s}.keras" for n in ("bn", "gn") for s in (1, 2)]
    own = [str(p) for p in reproduce.find_models("models/norms-quick")]
    assert own == ["models/norms-quick/in_b32_s1.keras", "models/norms-quick/ln_b32_s1.keras"]
    assert reproduce.shared_models("quick") == []   # Figure 1 shares nothing it needs


def test_reproduce_takes_a_profile_or_a_folder_not_both(capsys):
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--profile", "norms", "--models-dir", "x"])
    assert "give --profile" in capsys.readouterr().err
    args = reproduce.parse_args(["--profile", "norms-quick"])
    assert (args.models_dir, args.out) == ("models/norms-quick", "results/norms-quick/results.csv")
