"""The paper-scale profiles as a user starts them, through their last stage: a sweep of the
default profile (Figure 1) started by `python train.py --profile default` and by
`bash train.sh` without SLURM, at tiny size, through reproduce.py and plot.py; and the paths
that only the paper scale takes, where a None stands for "the paper's value" (the full
schedule, every image of the data).

The sweep through train.py also checks the whole output for TensorFlow's start-up lines: a
sweep is quiet in every process it starts, unless the user set TF_CPP_MIN_LOG_LEVEL."""
import subprocess
import sys

import pandas as pd
import pytest

from conftest import CHATTER, REPO, user_env, write_cifar_fixture
from gnrepro import recipe, sweep

# Two entries of the default grid (bn at N = 32 and 16), one epoch, on every image of a tiny
# copy (no --train-images: the paper scale's None), one worker so that 200 images make steps.
SMALL = ["--tasks", "0 1", "--epochs", "1", "--workers", "1"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_cifar_fixture(tmp_path_factory.mktemp("paper-data"), n_train=200, n_test=100)


def files(root):
    return ["--models-dir", root / "models", "--logs-dir", root / "logs",
            "--results", root / "results.csv", "--plot", root / "plot.png"]


LAUNCHERS = {
    "python train.py --profile default": lambda: [sys.executable, REPO / "train.py",
                                                  "--profile", "default"],
    "bash train.sh": lambda: ["bash", REPO / "train.sh", "--profile", "default"],
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.slow
def test_a_paper_scale_sweep_ends_with_its_results_and_figures(launcher, tiny_data, tmp_path):
    result = subprocess.run([*map(str, [*LAUNCHERS[launcher](), *SMALL, "--data-dir", tiny_data,
                                         *files(tmp_path)])],
                            cwd=tmp_path, env=user_env(PYTHON=sys.executable),
                            capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    table = pd.read_csv(tmp_path / "results.csv")
    assert sorted(table["model"].map(lambda m: m.rsplit("/", 1)[1])) == [
        "bn_b16_s1.keras", "bn_b32_s1.keras"]
    assert (table["train_images"] == 200).all() and (table["epochs"] == 1).all()
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    if launcher.startswith("python"):   # the quiet sweep: no process printed a start-up line
        assert not CHATTER.search(out), out


@pytest.mark.parametrize("profile", list(recipe.PROFILES))
def test_every_profile_has_its_report_and_its_statistic(profile):
    """The figures the sweep draws once a grid has finished: the paper's statistic (the median
    of the final 5 epochs) at the paper's scale, whose epochs are the schedule's (None), the
    final error where a run has fewer than 20 epochs."""
    paths = recipe.profile_paths(profile)
    commands = sweep.figures(profile, paths)
    assert commands and all("--out" in c for c in commands)
    short = recipe.base_config(profile).epochs < recipe.STATISTIC_EPOCHS
    assert all(("--metric" in c) == (short and "--curves" not in c) for c in commands)
    assert (recipe.PROFILES[profile][1] == "quick") == short


def test_the_paper_scale_takes_the_schedules_length_and_every_image():
    for profile, epochs in (("default", 100), ("he", 164)):
        cfg = recipe.grid(profile)[0]
        assert (cfg.epochs, cfg.train_images, cfg.test_images) == (epochs, None, None)
    # --schedule at the paper's scale: the new schedule's full length, not the old one's
    cfg = recipe.resolve(*recipe.parse_args(["--norm", "bn", "--batch-size", "32",
                                              "--schedule", "he"]))
    assert (cfg.epochs, cfg.lr_drops) == (164, [82, 123])
    # at laptop scale the scale's 5 epochs stay
    cfg = recipe.resolve(*recipe.parse_args(["--profile", "quick", "--norm", "bn",
                                              "--batch-size", "32", "--schedule", "he"]))
    assert (cfg.epochs, cfg.lr_drops) == (5, [2, 4])
