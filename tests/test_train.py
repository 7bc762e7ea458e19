"""train.py: the ResNet-20 builder, the recipe and grid, and one resumable run end to end."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import pytest

from conftest import REPO, assert_same_arrays

import keras  # noqa: E402
import layer  # noqa: E402
from gnrepro import cifar10  # noqa: E402
from gnrepro import runfiles  # noqa: E402
import train  # noqa: E402
from gnrepro import backends, loops, recipe, signals  # noqa: E402


# --- the model -------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_resnet20_parameter_count(norm):
    model = train.build_resnet20(norm)
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 272_474


def _macs(model):
    """Multiply-adds per image of the convolutions and the dense layer (bias adds included)."""
    total = 0
    for lyr in model.layers:
        if isinstance(lyr, keras.layers.Conv2D):
            h, w, c_out = lyr.output.shape[1:]
            kh, kw, c_in, _ = lyr.kernel.shape
            total += h * w * c_out * kh * kw * c_in
        elif isinstance(lyr, keras.layers.Dense):
            total += int(np.prod(lyr.kernel.shape)) + lyr.units
    return total


def test_resnet20_multiply_adds_match_pycls():
    # pycls' complexity count for its CIFAR ResNet-20: 40,813,194 multiply-adds per image.
    assert _macs(train.build_resnet20("gn")) == 40_813_194


@pytest.mark.parametrize("norm, cls", [("bn", keras.layers.BatchNormalization),
                                       ("gn", layer.GroupNormalization)])
def test_resnet20_structure(norm, cls):
    model = train.build_resnet20(norm)
    norms = [l for l in model.layers if isinstance(l, (keras.layers.BatchNormalization,
                                                        layer.GroupNormalization))]
    # stem + 9 blocks x 2 + 2 projection shortcuts
    assert len(norms) == 21 and all(isinstance(l, cls) for l in norms)
    zero = sorted(l.name for l in norms if not np.any(l.gamma.numpy()))
    assert zero == sorted(f"stage{s}_block{b}_norm2" for s in (1, 2, 3) for b in (1, 2, 3))
    assert all(np.all(l.gamma.numpy() == 1) for l in norms if l.name not in zero)
    if norm == "gn":
        assert all(l.groups == 8 and l.epsilon == 1e-5 for l in norms)
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == 21 and not any(c.use_bias for c in convs)
    assert sum(c.kernel.shape[:2] == (1, 1) for c in convs) == 2
    # conv -> norm -> ReLU: every norm reads a conv; every non-final norm feeds a ReLU.
    for n in norms:
        assert isinstance(n._inbound_nodes[0].operation, cls)
        source = n._inbound_nodes[0].parent_nodes[0].operation
        assert isinstance(source, keras.layers.Conv2D), n.name
    assert model.output.shape[-1] == 10


def tails(w, std):
    """Fractions of w beyond 2.5 and 3 std: a normal's 1.24 % and 0.27 %; a normal truncated
    at 2 (rescaled) std, as Keras' HeNormal draws, has none beyond 2.28 std."""
    z = np.abs(np.ravel(w)) / std
    return float(np.mean(z > 2.5)), float(np.mean(z > 3))


def test_resnet20_he_init_is_untruncated_with_fan_in():
    keras.utils.set_random_seed(0)
    model = train.build_resnet20("bn")
    # std sqrt(2 / fan_in): 3x3x32 -> 64 has fan_in 288, fan_out 576 (0.083 against 0.059).
    kernel = model.get_layer("stage3_block1_conv1").kernel.numpy()
    assert np.std(kernel) == pytest.approx(np.sqrt(2 / 288), rel=0.03)
    # Untruncated: the tails of 36,864 weights (standard errors 0.06 % and 0.03 %).
    std = np.sqrt(2 / 576)
    beyond_2_5, beyond_3 = tails(model.get_layer("stage3_block2_conv1").kernel.numpy(), std)
    assert 0.0095 < beyond_2_5 < 0.0155 and 0.0015 < beyond_3 < 0.004
    # The same statistic on a truncated draw of the same std and shape fails these bounds.
    truncated = keras.initializers.HeNormal(seed=0)((3, 3, 64, 64))
    assert np.std(truncated) == pytest.approx(std, rel=0.03)
    assert tails(truncated, std) == (0.0, 0.0)


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_weight_decay_is_1e_4_times_w_on_every_trainable_weight(norm):
    """Each trainable weight w alone adds 0.5 * 1e-4 * sum(w^2) to model.losses (gradient
    1e-4 * w, the paper's decay): a weight without decay, or with another coefficient, fails."""
    model = train.build_resnet20(norm)
    for v in model.trainable_weights:
        v.assign(np.zeros(v.shape, "float32"))
    # Moving statistics (BN's moving_variance is 1) carry none.
    assert sum(float(loss) for loss in model.losses) == 0
    rng = np.random.default_rng(0)
    for v in model.trainable_weights:
        w = rng.normal(0, 1, v.shape).astype("float32")
        v.assign(w)
        assert sum(float(loss) for loss in model.losses) == \
            pytest.approx(0.5 * 1e-4 * np.sum(w.astype(np.float64) ** 2), rel=1e-5), v.path
        v.assign(np.zeros(v.shape, "float32"))


@pytest.mark.parametrize("weight_decay", [0, None, 3e-4])
def test_weight_decay_is_the_builders_argument(weight_decay):
    """weight_decay=0 or None: no L2 term at all (for an optimizer that decays the weights
    itself); another value: that coefficient on every weight, gamma and beta included."""
    model = train.build_resnet20("gn", weight_decay=weight_decay)
    for v in model.trainable_weights:
        v.assign(np.ones(v.shape, "float32"))
    count = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert sum(float(loss) for loss in model.losses) == \
        pytest.approx(0.5 * (weight_decay or 0) * count, rel=1e-5)
    with pytest.raises(ValueError, match="weight_decay should be a number >= 0"):
        train.build_resnet20("gn", weight_decay=-1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(norm="xn"), "norm should be one of"),
    (dict(norm="gn", groups=3), "groups should divide"),
    (dict(norm="gn", groups=0), "groups should divide"),
    (dict(norm="gn", channels_per_group=3), "channels_per_group should divide"),
])
def test_builder_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train.build_resnet20(**kwargs)


def norm_layers(model):
    return [l for l in model.layers if isinstance(l, (keras.layers.BatchNormalization,
                                                       layer.GroupNormalization))]


@pytest.mark.parametrize("kwargs, groups", [
    (dict(norm="ln"), lambda c: 1),
    (dict(norm="in"), lambda c: -1),
    (dict(norm="gn", groups=2), lambda c: 2),
    (dict(norm="gn", channels_per_group=4), lambda c: c // 4),
    (dict(norm="gn", groups=2, channels_per_group=16), lambda c: c // 16),   # C / G wins
])
def test_ln_in_and_group_divisions_are_group_norm_per_layer(kwargs, groups):
    model = train.build_resnet20(**kwargs)
    norms = norm_layers(model)
    assert len(norms) == 21 and all(type(l) is layer.GroupNormalization for l in norms)
    assert [l.groups for l in norms] == [groups(l.gamma.shape[0]) for l in norms]
    assert sorted({l.gamma.shape[0] for l in norms}) == [16, 32, 64]
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 272_474


@pytest.mark.parametrize("norm, gn", [("ln", dict(groups=1)), ("in", dict(channels_per_group=1))])
def test_ln_and_in_are_the_ends_of_the_groups_study(norm, gn):
    """LN is GN with G = 1, IN is GN with C / G = 1: the same model, weight for weight (the
    laptop-scale studies trained them to the same error)."""
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    models = []
    for kwargs in (dict(norm=norm), dict(norm="gn", **gn)):
        keras.utils.set_random_seed(5)
        models.append(train.build_resnet20(**kwargs))
    a, b = models
    for u, v in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(a(x, training=True), b(x, training=True))


def grad_and_value(fn, x):
    import tensorflow as tf
    x = tf.constant(x)
    probe = tf.constant(np.random.default_rng(1).normal(size=x.shape).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
        loss = tf.reduce_sum(y * probe)   # a gradient that is not zero by symmetry
    return y.numpy(), tape.gradient(loss, x).numpy()


def builder_norm(norm, channels):
    """The builder's normalization layer for `channels` channels (not the zero-gamma one)."""
    model = train.build_resnet20(norm)
    return next(l for l in norm_layers(model) if l.gamma.shape[0] == channels
                and np.all(l.gamma.numpy() == 1))


def test_ln_equals_keras_layer_normalization_over_hwc():
    x = np.random.default_rng(0).normal(3, 2, size=(4, 8, 8, 32)).astype(np.float32)
    ours = grad_and_value(builder_norm("ln", 32), x)
    keras_ln = keras.layers.LayerNormalization(axis=(1, 2, 3), epsilon=recipe.EPSILON)
    theirs = grad_and_value(keras_ln, x)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_in_equals_instance_normalization_per_channel():
    import torch
    x = np.random.default_rng(0).normal(3, 2, size=(4, 8, 8, 16)).astype(np.float32)
    ours = grad_and_value(builder_norm("in", 16), x)
    probe = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)   # torch is NCHW
    yt = torch.nn.functional.instance_norm(xt, eps=recipe.EPSILON)
    (yt * torch.tensor(probe.transpose(0, 3, 1, 2))).sum().backward()
    theirs = (yt.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize("depth", [21, 4, "20"])
def test_depth_error(depth):
    with pytest.raises(ValueError, match=r"depth should be 6n\+2"):
        train.build_resnet(depth)


def test_deeper_resnet_builds():
    assert len([l for l in train.build_resnet(32).layers if isinstance(l, keras.layers.Add)]) == 15


# --- the recipe and the grid -------------------------------------------------------------

def test_learning_rate_rule_and_schedule():
    assert [recipe.Config(batch_size=n).lr for n in (32, 16, 2)] == [0.1, 0.05, 0.00625]
    assert recipe.Config(epochs=100).lr_drops == [30, 60, 90]
    assert recipe.Config(epochs=10).lr_drops == [3, 6, 9]
    cfg = recipe.Config(norm="bn", batch_size=8, epochs=10)
    model = train.build_resnet20("bn")
    train.compile_model(model, cfg, steps_per_epoch=5)
    sched = model.optimizer._learning_rate   # the PiecewiseConstantDecay schedule
    lr_at = [float(sched(step)) for step in (0, 14, 15, 29, 30, 44, 45)]
    np.testing.assert_allclose(lr_at, [0.025, 0.025, 0.0025, 0.0025, 0.00025, 0.00025, 0.000025])
    assert model.optimizer.momentum == 0.9


@pytest.mark.parametrize("epochs, paper, he", [
    (1, [], []), (2, [1], [1]), (3, [1, 2], [1, 2]), (4, [1, 2, 3], [2, 3]),
    (5, [2, 3, 4], [2, 4]), (30, [9, 18, 27], [15, 22]), (100, [30, 60, 90], [50, 75]),
    (164, [49, 98, 148], [82, 123])])
def test_scaled_drops_are_increasing_and_each_phase_lasts_an_epoch(epochs, paper, he):
    """Drops scaled to a shorter run stay strictly increasing, with at least one epoch in each
    phase; a run too short for all of them keeps its first epochs - 1 (2 epochs: one drop,
    after the first; the old rule gave [1, 1, 2], a fall of 100x after epoch 1)."""
    assert recipe.Config(epochs=epochs).lr_drops == paper
    assert recipe.Config(epochs=epochs, schedule="he").lr_drops == he
    for drops in (paper, he):
        assert all(a < b for a, b in zip([0, *drops], [*drops, epochs]))   # each phase >= 1


def test_a_two_epoch_run_falls_once_by_ten(cifar_dir, tmp_path):
    """python train.py --norm bn --batch-size 2 --epochs 2 ...: 0.1 * 2 / 32, then a tenth."""
    assert train.main(["--norm", "bn", "--batch-size", "2", "--workers", "8", "--epochs", "2",
                       "--train-images", "160", "--test-images", "100", "--data-dir",
                       str(cifar_dir), "--models-dir", str(tmp_path), "--logs-dir",
                       str(tmp_path / "logs")]) == 0
    record = json.loads((tmp_path / "bn_b2_w8_s1.json").read_text())
    assert record["config"]["lr_drops"] == [1]
    assert [e["lr"] for e in record["history"]] == pytest.approx([0.00625, 0.000625])
    assert record["config"]["moving_statistics"] == "first"


def test_grid_is_seed_major():
    entries = recipe.grid()
    assert len(entries) == 30 and len({c.name for c in entries}) == 30
    assert [c.name for c in entries[:10]] == [f"{n}_b{b}_w8_s1" for n in ("bn", "gn")
                                              for b in (32, 16, 8, 4, 2)]
    assert {c.seed for c in entries[10:20]} == {2} and all(c.epochs == 100 for c in entries)
    quick = recipe.grid("quick")
    assert len(quick) == 10 and all(c.profile == "quick" and c.train_images for c in quick)


def test_study_grids():
    names = {p: [c.name for c in recipe.grid(p)] for p in recipe.PROFILES}
    assert names["norms-quick"] == ["bn_b32_s1", "gn_b32_s1", "ln_b32_s1", "in_b32_s1"]
    assert names["norms"][:4] == ["bn_b32_w8_s1", "gn_b32_w8_s1", "ln_b32_w8_s1", "in_b32_w8_s1"]
    # G = 1 is LN and C / G = 1 is IN: the same model, named (and trained) as the norms study's
    assert names["groups-quick"] == ["ln_b32_s1"] + [f"gn_g{g}_b32_s1" for g in (2, 4)] + \
        ["gn_b32_s1", "gn_g16_b32_s1", "in_b32_s1"] + [f"gn_c{c}_b32_s1" for c in (2, 4, 8, 16)]
    assert names["workers-quick"] == [f"bn_b{n}_w8_s1" for n in (32, 16, 8, 4, 2)] + \
        ["bn_b16_w16_lr0.1_s1", "bn_b8_w32_lr0.1_s1", "bn_b4_w64_lr0.1_s1", "bn_b2_w128_lr0.1_s1"]
    assert names["he-quick"] == ["bn_b64_w2_lr0.1_he_s1"]
    assert [len(names[p]) for p in ("he", "norms", "groups", "workers")] == [3, 12, 30, 27]
    for p, entries in names.items():
        assert len(set(entries)) == len(entries), p
        study, scale = recipe.PROFILES[p]
        full = 164 if study == "he" else 100
        assert all(c.profile == p and c.epochs == (recipe.SCALES[scale]["epochs"] or full)
                   for c in recipe.grid(p))
    groups = recipe.grid("groups-quick")
    assert [(c.norm, c.groups, c.channels_per_group) for c in groups[3:7]] == \
        [("gn", 8, None), ("gn", 16, None), ("in", 8, None), ("gn", 8, 2)]


def test_grid_cli_names_each_entrys_group_division():
    out = run_train("--grid", "--profile", "groups-quick").stdout.splitlines()
    assert out[0] == ("# 10 runs, profile groups-quick: study groups (10 runs) x 1 seeds, scale "
                      "quick; 3 provided by another profile (trained there, once)")
    assert out[1] == "0 ln_b32_s1 --norm ln --batch-size 32 --workers 1 --seed 1 # provided by norms-quick"
    assert out[2] == "1 gn_g2_b32_s1 --norm gn --batch-size 32 --workers 1 --seed 1 --groups 2"
    assert out[-1] == ("9 gn_c16_b32_s1 --norm gn --batch-size 32 --workers 1 --seed 1 "
                       "--channels-per-group 16")


def test_channels_per_group_and_groups_on_the_command_line():
    def cfg(*args):
        return recipe.resolve(*recipe.parse_args(list(args)))
    assert cfg("--profile", "groups-quick", "--task", "6").name == "gn_c2_b32_s1"
    assert cfg("--profile", "groups-quick", "--task", "6", "--groups", "4").name == "gn_g4_b32_s1"
    assert cfg("--norm", "gn", "--batch-size", "8", "--channels-per-group", "4").name == \
        "gn_c4_b8_w8_s1"
    assert cfg("--norm", "ln", "--batch-size", "8", "--workers", "1").name == "ln_b8_s1"
    # a single run of a study's profile starts from its scale, not from the study's first run
    assert cfg("--profile", "groups", "--norm", "gn", "--batch-size", "32").name == "gn_b32_w8_s1"
    assert cfg("--profile", "workers", "--norm", "bn", "--batch-size", "4").workers == 8
    assert cfg("--profile", "groups-quick", "--task", "2", "--channels-per-group", "2").groups == 8
    assert cfg("--profile", "groups-quick", "--task", "1", "--channels-per-group", "2").name == \
        "gn_c2_b32_s1"


def test_records_and_checkpoints_from_before_channels_per_group_still_match(tmp_path):
    from gnrepro import runfiles
    cfg = recipe.Config(norm="gn", batch_size=8)
    old = {k: v for k, v in asdict(cfg).items()
           if k != "channels_per_group"}
    paths = runfiles.Paths(tmp_path, tmp_path, cfg.name)
    paths.model.write_text("a model")
    runfiles.write_json(paths.record, {"config": {"run": old}})
    current = asdict(cfg)
    assert runfiles.finished_record(paths, current, recipe.run_identity)
    with pytest.raises(SystemExit, match="was trained with another configuration"):
        runfiles.finished_record(paths, current)   # compared as stored: another one


def run_train(*args, **kwargs):
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, **kwargs)


def test_grid_cli_lists_the_grid():
    out = run_train("--grid").stdout.splitlines()
    assert out[0].startswith("# 30 runs")
    assert out[1] == "0 bn_b32_w8_s1 --norm bn --batch-size 32 --workers 8 --seed 1"
    assert out[-1] == "29 gn_b2_w8_s3 --norm gn --batch-size 2 --workers 8 --seed 3"


def test_task_selects_grid_entry_and_overrides():
    p, args = recipe.parse_args(["--task", "7", "--epochs", "2"])
    cfg = recipe.resolve(p, args)
    assert (cfg.norm, cfg.batch_size, cfg.seed, cfg.epochs) == ("gn", 8, 1, 2)


@pytest.mark.parametrize("args, message", [
    (["--task", "30"], "--task 30 is outside the default grid"),
    (["--norm", "gn"], "give --norm and --batch-size"),
    (["--norm", "gn", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--norm", "gn", "--batch-size", "8", "--groups", "5"], "--groups: groups should divide"),
    (["--norm", "gn", "--batch-size", "8", "--channels-per-group", "3"],
     "--channels-per-group: channels_per_group should divide"),
    (["--norm", "gn", "--batch-size", "8", "--groups", "2", "--channels-per-group", "2"],
     "give --groups or --channels-per-group, not both"),
    (["--norm", "xn", "--batch-size", "8"], "invalid choice: 'xn'"),
    (["--norm", "bn", "--batch-size", "8", "--channels-per-group", "2"],
     "--channels-per-group is GN's setting; this run's norm is bn"),
])
def test_cli_errors(args, message):
    result = run_train(*args)
    assert result.returncode == 2 and message in result.stderr


# --- one run end to end ----------------------------------------------------------------

RUN = ["--norm", "gn", "--batch-size", "4", "--workers", "1", "--seed", "3", "--epochs", "3"]


def run_args(cifar_dir, root, models="models"):
    return [*RUN, "--data-dir", cifar_dir, "--models-dir", root / models, "--logs-dir", root / "logs"]


@pytest.fixture(scope="module")
def reference(cifar_dir, tmp_path_factory):
    """An uninterrupted 3-epoch run on the tiny fixture."""
    root = tmp_path_factory.mktemp("reference")
    result = run_train(*run_args(cifar_dir, root))
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


def epochs_printed(stdout):
    return [l.split()[2] for l in stdout.splitlines() if l.split()[1:2] == ["epoch"]]


def weights(path):
    return keras.models.load_model(path).get_weights()


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)


def test_run_writes_model_record_and_one_line_per_epoch(reference, cifar_dir):
    root, result = reference
    assert epochs_printed(result.stdout) == ["1/3", "2/3", "3/3"]
    record = json.loads((root / "models" / "gn_b4_s3.json").read_text())
    history = record["history"]
    assert [e["epoch"] for e in history] == [1, 2, 3]
    assert [e["lr"] for e in history] == pytest.approx([0.0125, 0.00125, 0.000125])
    assert record["median_last5_error"] == pytest.approx(np.median([e["test_error"] for e in history]))
    assert record["test_error"] == history[-1]["test_error"]
    assert record["params"] == 272_474 and record["config"]["groups"] == 8
    assert record["config"]["train_images"] == 500 and record["data"]["test_images"] == 100
    from gnrepro import cifar10
    assert record["data"]["checksum"] == cifar10.checksum(*cifar10.load(cifar_dir))
    assert set(record["versions"]) >= {"python", "keras", "tensorflow", "numpy"}
    assert record["git_commit"] and record["images_per_second"] > 0
    (segment,) = record["segments"]   # one session: from the start to the end, where it ran
    assert (segment["start"], segment["end"], segment["loop"]) == ([0, 0], [3, 0], "fit")
    assert segment["machine"] == record["machine"] and segment["machine"]
    assert segment["git_commit"] == record["git_commit"]
    assert segment["versions"] == record["versions"] and segment["intra_op_threads"] == 1
    assert not list((root / "models").glob("checkpoints/*")), "the checkpoint is removed at the end"
    assert not list(root.rglob(".*.tmp*")), "no temporary file is left"


def test_recorded_lr_is_the_optimizers_rate_at_every_step_of_its_epoch(reference):
    """The record's lr (a formula in end_epoch) against the saved optimizer's own schedule
    (compile_model's PiecewiseConstantDecay), at the step counts each epoch's updates used:
    a boundary off by one step differs at the first or last step of an epoch."""
    root, _ = reference
    record = json.loads((root / "models" / "gn_b4_s3.json").read_text())
    optimizer = keras.models.load_model(root / "models" / "gn_b4_s3.keras").optimizer
    steps = 500 // 4   # training images / images per step
    assert int(optimizer.iterations) == 3 * steps
    for i, entry in enumerate(record["history"]):
        rates = []
        for step in range(i * steps, (i + 1) * steps):
            optimizer.iterations.assign(step)   # an update at step s uses the rate at s
            rates.append(float(optimizer.learning_rate))
        np.testing.assert_allclose(rates, entry["lr"], rtol=1e-6, err_msg=f"epoch {i + 1}")


def test_final_evaluation_matches_saved_model(reference, cifar_dir):
    root, _ = reference
    record = json.loads((root / "models" / "gn_b4_s3.json").read_text())
    model = keras.models.load_model(root / "models" / "gn_b4_s3.keras", safe_mode=True)
    loss, error = train.evaluate(model, cifar10.prepare_data(cifar_dir))
    assert (loss, error) == (pytest.approx(record["test_loss"], abs=1e-6), record["test_error"])


def test_tensorboard_scalars_are_readable(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    root, _ = reference
    events = EventAccumulator(str(root / "logs" / "gn_b4_s3"), size_guidance={"tensors": 0})
    events.Reload()
    record = json.loads((root / "models" / "gn_b4_s3.json").read_text())
    test_error = events.Tensors("test/error")
    assert [e.step for e in test_error] == [1, 2, 3]
    values = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in test_error]
    assert values == pytest.approx([h["test_error"] for h in record["history"]], rel=1e-6)
    assert {"train/loss", "train/error", "test/loss", "lr"} <= set(events.Tags()["tensors"])


@pytest.mark.slow
def test_same_arguments_give_same_weights(reference, cifar_dir, tmp_path):
    root, _ = reference
    assert run_train(*run_args(cifar_dir, tmp_path)).returncode == 0
    assert_same_weights(root / "models" / "gn_b4_s3.keras", tmp_path / "models" / "gn_b4_s3.keras")


def start_and_interrupt(args, sig):
    """Start a run, send sig about one second into epoch 2; return (exit status, output)."""
    proc = subprocess.Popen([sys.executable, "-u", "train.py", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in proc.stdout:
        output.append(line)
        if " epoch 1/3 " in line:
            time.sleep(1.0)
            proc.send_signal(sig)
            break
    output.append(proc.stdout.read())
    return proc.wait(timeout=120), "".join(output)


@pytest.mark.slow
def test_sigkill_in_epoch_2_then_resume_gives_same_weights(reference, cifar_dir, tmp_path):
    root, _ = reference
    code, out = start_and_interrupt(run_args(cifar_dir, tmp_path), signal.SIGKILL)
    assert code == -signal.SIGKILL and " epoch 2/3 " not in out
    assert not (tmp_path / "models" / "gn_b4_s3.keras").exists()
    resumed = run_train(*run_args(cifar_dir, tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch 2, step 0" in resumed.stdout
    assert_same_weights(root / "models" / "gn_b4_s3.keras", tmp_path / "models" / "gn_b4_s3.keras")
    record = json.loads((tmp_path / "models" / "gn_b4_s3.json").read_text())
    assert [e["epoch"] for e in record["history"]] == [1, 2, 3] and record["resumed"] == 1


@pytest.mark.slow
def test_sigusr1_checkpoints_mid_epoch_and_resumes_exactly(reference, cifar_dir, tmp_path):
    root, _ = reference
    code, out = start_and_interrupt(run_args(cifar_dir, tmp_path), signal.SIGUSR1)
    assert code == signals.PREEMPTED, out[-3000:]
    assert "received SIGUSR1" in out and "checkpointed at epoch 2, step " in out
    step = int(out.split("checkpointed at epoch 2, step ")[1].split()[0])
    assert 0 < step < 125
    resumed = run_train(*run_args(cifar_dir, tmp_path))
    assert f"resuming at epoch 2, step {step}" in resumed.stdout
    assert epochs_printed(resumed.stdout) == ["2/3", "3/3"]
    assert_same_weights(root / "models" / "gn_b4_s3.keras", tmp_path / "models" / "gn_b4_s3.keras")
    ref = json.loads((root / "models" / "gn_b4_s3.json").read_text())["history"]
    got = json.loads((tmp_path / "models" / "gn_b4_s3.json").read_text())["history"]
    for a, b in zip(ref, got):  # even the interrupted epoch's training metrics, bit for bit
        assert (a["train_loss"], a["train_error"]) == (b["train_loss"], b["train_error"])
        assert a["test_error"] == b["test_error"]
    first, second = json.loads((tmp_path / "models" / "gn_b4_s3.json").read_text())["segments"]
    assert (first["start"], first["end"]) == ([0, 0], [1, step])   # where the signal left it
    assert (second["start"], second["end"]) == ([1, step], [3, 0])
    assert first["started_at"] <= first["ended_at"] <= second["started_at"]


def test_finished_run_is_skipped_unless_forced(reference, cifar_dir):
    root, _ = reference
    model = root / "models" / "gn_b4_s3.keras"
    before = model.stat().st_mtime_ns
    again = run_train(*run_args(cifar_dir, root))
    assert again.returncode == 0 and "already finished" in again.stdout
    assert model.stat().st_mtime_ns == before


def test_finished_run_with_other_configuration_is_refused(reference, cifar_dir):
    root, _ = reference
    args = run_args(cifar_dir, root)
    args[args.index("--epochs") + 1] = "5"
    result = run_train(*args)
    assert result.returncode != 0 and "was trained with another configuration" in result.stderr


def test_git_commit_is_dirty_for_code_changes_not_for_what_runs_write(tmp_path):
    """A run's own outputs (its committed checkpoint, rewritten every epoch) leave the commit
    clean; a change to the code does not. (A repository of its own, with this runfiles.py.)"""
    repo = tmp_path / "repo"
    for name in ("gnrepro/__init__.py", "gnrepro/runfiles.py", "train.py", "models/README.md",
                 "logs/README.md"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes((REPO / name).read_bytes())
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    asked = [sys.executable, "-c", "from gnrepro import runfiles; print(runfiles.git_commit())"]

    def recorded():
        env = {k: v for k, v in os.environ.items() if k != "TRAIN_GIT_COMMIT"}
        env["PYTHONPATH"] = str(repo)   # its runfiles.py, asking about its own repository
        return subprocess.run(asked, cwd=repo, env=env, capture_output=True, text=True,
                              check=True).stdout.strip()
    (repo / "models" / "README.md").write_text("changed by a run\n")
    (repo / "logs" / "README.md").write_text("changed by a run\n")
    assert recorded() == commit
    with open(repo / "train.py", "a") as f:
        f.write("\n")
    assert recorded() == commit + "-dirty"


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "gn_b4_s3.json"
    runfiles.write_json(target, {"good": 1})

    def broken(tmp):
        tmp.write_text('{"half')
        raise OSError("disk full")
    with pytest.raises(OSError):
        runfiles.atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"good": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["gn_b4_s3.json"]


MALLOC = r'''
import ctypes, threading
import keras, numpy as np
from gnrepro import backends, loops
import train
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
libc.mallinfo2.restype = type("Mallinfo2", (ctypes.Structure,), {"_fields_": [
    (f, ctypes.c_size_t) for f in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
                                  "fordblks keepcost".split()]})

def mapped():
    """Whether glibc maps 28 MiB afresh (the IS_MMAPPED bit of the chunk's size word) rather
    than growing its heap, once the heap holds no free space that size (malloc_trim)."""
    libc.malloc_trim(0)
    p = libc.malloc(28 << 20)
    bit = ctypes.c_size_t.from_address(p - 8).value & 2
    libc.free(p)
    return bool(bit)

def kept():
    """Whether glibc keeps what threads free, once it has settled: three threads in turn take
    4 x 20 MiB, more than one of a thread's heaps (64 MiB) holds, and free it, which gives a
    heap's top back (M_TRIM_THRESHOLD) and deletes the heap past it (M_TOP_PAD) unless glibc
    keeps them. mallinfo2's arena: all arenas' heaps, in bytes; the first thread's is ignored
    (its arena is new)."""
    def allocate_and_free(sizes):
        blocks = [libc.malloc(20 << 20) for _ in range(4)]
        for p in blocks:
            ctypes.memset(p, 1, 20 << 20)
        sizes.append(libc.mallinfo2().arena)
        for p in reversed(blocks):
            libc.free(p)
        sizes.append(libc.mallinfo2().arena)
    rounds = []
    for _ in range(3):
        rounds.append([])
        thread = threading.Thread(target=allocate_and_free, args=(rounds[-1],))
        thread.start()
        thread.join()
    return all(freed >= grown for grown, freed in rounds[1:])

def fit():
    """Two steps of ResNet-20 fed as loops.fit_epoch feeds it (fit_input); its weights."""
    keras.utils.set_random_seed(0)
    model = train.build_resnet20("gn")
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(True))
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(8, 32, 32, 3)).astype("float32"), rng.integers(0, 10, 8))
               for _ in range(2)]
    model.fit(backends.fit_input(loops.Batches(batches)), verbose=0, shuffle=False)
    return model.get_weights()

backends.enable_determinism()
mapped()   # glibc raises its threshold past a freed mapping's size: 28 MiB is heap from now
before = mapped()
libc.mallopt(backends.M_TRIM_THRESHOLD, 4 << 20)   # about where a run's glibc has it by then
patched = fit()
after_fit = mapped()
undone = backends.undo_malloc_patch()
again = fit()
print(before, after_fit, undone, mapped(), kept(),
      all(np.array_equal(a, b) for a, b in zip(patched, again)))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_tensorflows_malloc_patch_is_undone_and_the_weights_are_the_same():
    """TensorFlow's first tf.data generator maps every tensor of 128 KiB or more afresh, for the
    rest of the process, and leaves glibc's trim threshold where it was. backends.
    undo_malloc_patch spends that patch, puts tensors back on the heap, has the heap keep what
    threads free (backends.keep_heap), and a fit computes the same weights, bit for bit,
    either way (a fresh process: the patch is once a process)."""
    result = subprocess.run([sys.executable, "-c", MALLOC], cwd=REPO, capture_output=True,
                            text=True, timeout=600,
                            env={k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "True", "True", "False", "True", "True"]


def random_batches(steps, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(batch, 32, 32, 3)).astype("float32"),
             rng.integers(0, 10, batch).astype("int32")) for _ in range(steps)]


def test_fit_input_is_the_same_batches_without_tf_data_autotuning():
    """What fit trains on under TensorFlow: the batches of the PyDataset, in order, byte for
    byte, with the shapes Keras gives them (batch axis None), as many as it has, and tf.data's
    autotuning off (its thread often held the end of an epoch until it next woke)."""
    batches = random_batches(3)
    fed = backends.fit_input(loops.Batches(batches))
    assert fed.options().autotune.enabled is False
    assert int(fed.cardinality()) == 3
    assert [tuple(s.shape) for s in fed.element_spec] == [(None, 32, 32, 3), (None,)]
    got = [(x.numpy(), y.numpy()) for x, y in fed]
    assert len(got) == 3
    for (x, y), (want_x, want_y) in zip(got, batches):
        assert x.dtype == want_x.dtype and x.tobytes() == want_x.tobytes()
        assert y.dtype == want_y.dtype and np.array_equal(y, want_y)
    empty = loops.Batches([])
    assert backends.fit_input(empty) is empty   # (Keras says what is wrong with it)


def test_fit_on_fit_input_trains_the_same_weights_as_on_the_pydataset():
    """BN, moving statistics included: three steps either way, bit for bit."""
    batches = random_batches(3)
    weights = []
    for feed in (loops.Batches, lambda b: backends.fit_input(loops.Batches(b))):
        keras.utils.set_random_seed(0)
        model = train.build_resnet20("bn", workers=2)
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(feed(batches), verbose=0, shuffle=False)
        weights.append(model.get_weights())
    assert int(model.optimizer.iterations.numpy()) == 3
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rows", [8, 10])   # batches all full (evaluate's case); one short
def test_predict_is_keras_predict_on_the_array_bit_for_bit(rows):
    """backends.predict (train.evaluate's) against model.predict of the NumPy array."""
    keras.utils.set_random_seed(0)
    model = train.build_resnet20("gn")
    x = np.random.default_rng(1).normal(size=(rows, 32, 32, 3)).astype("float32")
    got = backends.predict(model, x, 4)
    want = model.predict(x, batch_size=4, verbose=0)
    assert got.shape == (rows, 10)
    np.testing.assert_array_equal(got, want)


# --- real images -------------------------------------------------------------------------

@pytest.mark.slow
def test_learns_on_the_jpeg_copy_of_cifar10(jpeg_cifar_dir, tmp_path):
    """3 epochs of BN at batch 32 on 5,000 real images: well under chance (90 %) error."""
    result = run_train("--norm", "bn", "--batch-size", "32", "--workers", "1", "--epochs", "3",
                       "--train-images", "5000",
                       "--data-dir", jpeg_cifar_dir, "--models-dir", tmp_path / "m",
                       "--logs-dir", tmp_path / "l")
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    record = json.loads((tmp_path / "m" / "bn_b32_s1.json").read_text())
    assert record["test_error"] < 75


@pytest.mark.slow
def test_profile_runs_every_entry_then_reproduce_and_plot(cifar_dir, tmp_path):
    """The main job end to end (--profile quick, shrunk to 1 epoch on the tiny fixture)."""
    result = run_train("--profile", "quick", "--epochs", "1", "--train-images", "100",
                       "--test-images", "100", "--jobs", "2", "--data-dir", cifar_dir,
                       "--models-dir", tmp_path / "models", "--logs-dir", tmp_path / "logs",
                       "--results", tmp_path / "results.csv", "--plot", tmp_path / "plot.png")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "10 runs, 2 at a time" in result.stdout
    import pandas as pd
    table = pd.read_csv(tmp_path / "results.csv")
    names = sorted(os.path.basename(m) for m in table["model"])
    assert names == sorted(f"{c.name}.keras" for c in recipe.grid("quick"))
    assert set(table["epochs"]) == {1} and set(table["workers"]) == {1}
    assert (tmp_path / "plot.png").stat().st_size > 10_000 and (tmp_path / "curves.png").exists()


@pytest.mark.slow
def test_a_time_limited_sweep_stops_with_status_0_and_the_same_command_finishes(cifar_dir,
                                                                                tmp_path):
    """The CPU queue's command: --time-limit ends the call with every run resumable, and the
    same command (a longer limit) finishes the runs and writes the report."""
    args = ["--profile", "quick", "--tasks", "4 9", "--epochs", "6", "--train-images", "200",
            "--test-images", "100", "--jobs", "2", "--data-dir", cifar_dir,
            "--models-dir", tmp_path / "models", "--logs-dir", tmp_path / "logs",
            "--results", tmp_path / "results.csv", "--plot", tmp_path / "plot.png"]
    first = run_train(*args, "--time-limit", "15s")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = first.stdout.splitlines()[-1]
    assert summary.startswith("profile quick: time limit 15s reached: ") and \
        summary.endswith("; the same command resumes")
    assert not (tmp_path / "results.csv").exists()
    second = run_train(*args, "--time-limit", "30m")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    import pandas as pd
    assert sorted(pd.read_csv(tmp_path / "results.csv")["norm"]) == ["bn", "gn"]
    for name in ("bn_b2_s1", "gn_b2_s1"):
        record = json.loads((tmp_path / "models" / f"{name}.json").read_text())
        assert [e["epoch"] for e in record["history"]] == list(range(1, 7))
        if f"{name} 0->" in summary:   # stopped mid-run: two sessions, end to start
            first_part, rest = record["segments"]
            assert first_part["end"] == rest["start"] and rest["end"] == [6, 0]


# --- BN's moving statistics: the rule a run started with -------------------------------------

class AfterFirstCheckpoint:
    """A stop request that arrives with the first checkpoint in `folder`."""
    def __init__(self, folder):
        self.folder = folder

    requested = property(lambda self: bool(list(self.folder.glob("checkpoints/*.npz"))))


def bn_run(cifar_dir, root, *extra):
    return ["--norm", "bn", "--batch-size", "2", "--workers", "8", "--epochs", "2",
            "--train-images", "160", "--test-images", "100", "--data-dir", str(cifar_dir),
            "--models-dir", str(root), "--logs-dir", str(root / "logs"), *extra]


def test_the_record_names_the_commit_the_run_started_from(cifar_dir, tmp_path, monkeypatch):
    """A commit made while a run trains does not become the run's: its record names the
    commit its session loaded (the segment's), not HEAD at the end."""
    commits = iter(["started-here", "committed-meanwhile"])
    monkeypatch.setattr(runfiles, "git_commit", lambda: next(commits, "committed-meanwhile"))
    assert train.main(bn_run(cifar_dir, tmp_path)) == 0
    record = json.loads((tmp_path / "bn_b2_w8_s1.json").read_text())
    assert record["git_commit"] == record["segments"][-1]["git_commit"] == "started-here"


@pytest.mark.slow
def test_a_checkpoint_from_before_the_rule_resumes_with_the_mean_it_started_with(cifar_dir,
                                                                                 tmp_path, capsys):
    """A checkpoint written before the rule could be chosen (its state has no
    moving_statistics) was trained with the mean over the workers: the default command
    resumes it with that rule, to the weights of an uninterrupted run of that rule, and its
    record and results.csv say so."""
    whole = tmp_path / "whole"
    assert train.main(bn_run(cifar_dir, whole, "--moving-statistics", "mean")) == 0
    stopped = tmp_path / "stopped"
    args = bn_run(cifar_dir, stopped, "--moving-statistics", "mean")
    assert train.main(args, stop=AfterFirstCheckpoint(stopped)) == signals.PREEMPTED
    old = stopped / "checkpoints" / "bn_b2_w8_s1.npz"   # as the earlier train.py named it
    with np.load(stopped / "checkpoints" / "bn_b2_w8_meanstats_s1.npz") as z:
        arrays = {k: z[k] for k in z.files}
    state = json.loads(str(arrays["state"]))
    del state["config"]["moving_statistics"]
    stopped_at = state.pop("segments")[0]["end"]   # nor did it keep segments
    arrays["state"] = np.array(json.dumps(state))
    with open(old, "wb") as f:
        np.savez(f, **arrays)
    (stopped / "checkpoints" / "bn_b2_w8_meanstats_s1.npz").unlink()
    capsys.readouterr()
    assert train.main(bn_run(cifar_dir, stopped)) == 0   # today's default asks for "first"
    out = capsys.readouterr().out
    assert "bn_b2_w8_s1: its checkpoint was trained with moving statistics 'mean'" in out
    assert "resuming at epoch 2" in out
    record = json.loads((stopped / "bn_b2_w8_s1.json").read_text())
    assert record["config"]["moving_statistics"] == record["config"]["run"]["moving_statistics"] \
        == "mean"
    assert_same_arrays(stopped / "bn_b2_w8_s1.keras", whole / "bn_b2_w8_meanstats_s1.keras")
    before, after = record["segments"]   # where it trained before is not known
    assert before == {"start": [0, 0], "end": stopped_at, "recorded": False}
    assert after["start"] == stopped_at and after["end"] == [2, 0] and after["machine"]
    import pandas as pd
    import reproduce
    assert reproduce.main(["--models-dir", str(stopped), "--out", str(tmp_path / "r.csv"),
                           "--data-dir", str(cifar_dir)]) == 0
    assert pd.read_csv(tmp_path / "r.csv")["moving_statistics"].tolist() == ["mean"]


def test_each_rule_is_its_own_run():
    first = recipe.Config(norm="bn", batch_size=2, workers=8)
    mean = recipe.Config(norm="bn", batch_size=2, workers=8, moving_statistics="mean")
    assert (first.name, mean.name) == ("bn_b2_w8_s1", "bn_b2_w8_meanstats_s1") and first != mean
    # where there is one slice (W = 1) or no BN, the rules agree: one configuration
    assert recipe.Config(norm="bn", workers=1, moving_statistics="mean") == recipe.Config(norm="bn")
    assert recipe.Config(norm="gn", workers=8, moving_statistics="mean").name == "gn_b32_w8_s1"
    # a record of an earlier version (no such key, and --jit-compile's) is the mean's
    old = {k: v for k, v in asdict(mean).items() if k != "moving_statistics"} | {"jit_compile": False}
    assert recipe.stored_config(old) == mean
    assert recipe.run_identity(old) == recipe.run_identity(asdict(first))
    _, args = recipe.parse_args(["--norm", "bn", "--batch-size", "2", "--workers", "8",
                                 "--moving-statistics", "mean"])
    assert recipe.resolve(None, args) == mean
