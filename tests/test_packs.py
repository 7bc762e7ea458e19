"""Packs: runs that differ only in seed, trained together in one compiled program on JAX
(backends.ScanLoop over K stacked Keras states, train.train), against solo runs.

    KERAS_BACKEND=jax .venv-backends/bin/python -m pytest -q tests/test_packs.py

JAX only (`make test-backends` runs it; under TensorFlow and PyTorch it skips). What it shows,
on the tiny fixture, for BN with W = 2 workers of N = 2 and for GN at N = 4:

- each member starts from exactly its solo run's initial weights and trains on exactly its
  solo run's batches (bit for bit);
- one packed step from the same states and batches equals the K solo steps to float rounding;
- over a whole tiny run each member's recorded errors stay as close to its solo twin's as
  the seeds are to one another (training amplifies rounding: weights cannot be compared);
- a pack is deterministic: run twice, or stopped by SIGUSR1 mid-epoch and resumed, it ends
  bit for bit the same;
- a pack whose members stand at different points (one finished, one checkpointed, one
  not started) trains just what is missing; one whose checkpoint is bad starts over, set
  aside, and the others lose nothing;
- without the scan loop the seeds train one after another, said in one line;
- packs through sweep.py and through train.sh on the SLURM test cluster (tests/slurm; skipped
  without SLURM, failed in CI) write the files of solo runs;
- --bfloat16 keeps the weights, the normalization statistics and the loss in float32.
"""
import json
import os
import shutil
import signal
import types

import numpy as np
import pytest

from conftest import REPO, assert_same_arrays, loop_acting_in_call  # noqa: F401  (REPO: sys.path)

import keras  # noqa: E402
from gnrepro import backends  # noqa: E402
from gnrepro import cifar10  # noqa: E402
import train  # noqa: E402
from gnrepro import loops, recipe, signals  # noqa: E402

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax",
                                reason="packs are JAX's (make test-backends runs this file)")

SEEDS = (1, 2, 3)
# BN with W = 2 workers of N = 2 (per-worker statistics), GN at N = 4 (per image).
KINDS = {"bn": dict(norm="bn", batch_size=2, workers=2), "gn": dict(norm="gn", batch_size=4)}
IMAGES = 40   # 10 steps an epoch; calls of 3 steps (loops.scan_loop: 3, 3, 3, 1) where a
              #   test sets recipe.IMAGES_PER_SCAN = 12


@pytest.fixture(autouse=True, scope="module")
def compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache for this module: the same program (a solo run's,
    a pack's) compiles once, whichever ScanLoop asks for it."""
    if keras.backend.backend() != "jax":
        yield
        return
    import jax
    folder = str(tmp_path_factory.mktemp("jax_cache"))
    saved = {k: getattr(jax.config, k) for k in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes")}
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for k, v in saved.items():
        jax.config.update(k, v)


def config(kind, seed=1, epochs=2, images=IMAGES):
    return recipe.Config(seed=seed, epochs=epochs, train_images=images, test_images=20,
                        **KINDS[kind])


def compiled_models(kind, seeds=SEEDS, images=IMAGES):
    """A freshly initialised, compiled model per seed, as train._start makes a run's."""
    out = []
    for seed in seeds:
        cfg = config(kind, seed, images=images)
        keras.utils.set_random_seed(seed)
        model = train.build_model(cfg)
        train.compile_model(model, cfg, cifar10.steps_per_epoch(images, cfg.batch_size * cfg.workers))
        out.append(model)
    return out


def npz_arrays(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files if k != "state"}, json.loads(str(z["state"]))


def record(folder, name):
    return json.loads((folder / f"{name}.json").read_text())


def never():
    return types.SimpleNamespace(requested=None)


# --- where a member starts, what it trains on ----------------------------------------------

@pytest.mark.parametrize("kind", ["bn", "gn"])
def test_each_member_starts_from_its_solo_initial_weights(cifar_dir, tmp_path, kind):
    # A stop asked for before the first step: each run checkpoints its initial state, untrained.
    cfgs = [config(kind, s) for s in SEEDS]
    stop = types.SimpleNamespace(requested="test")
    assert train.train(cfgs, cifar_dir, tmp_path / "pack", tmp_path / "logs", stop=stop,
                            loop="scan") == signals.PREEMPTED
    for cfg in cfgs:
        assert train.train(cfg, cifar_dir, tmp_path / cfg.name, tmp_path / "logs", stop=stop,
                           loop="scan") == signals.PREEMPTED
        packed, state = npz_arrays(tmp_path / "pack" / "checkpoints" / f"{cfg.name}.npz")
        solo, _ = npz_arrays(tmp_path / cfg.name / "checkpoints" / f"{cfg.name}.npz")
        assert packed.keys() == solo.keys() and len(packed) > 100
        for key in packed:
            assert packed[key].tobytes() == solo[key].tobytes(), (cfg.name, key)
        assert (state["epoch"], state["step"]) == (0, 0)
        assert state["packed_with"] == sorted(c.name for c in cfgs if c != cfg)
    first = npz_arrays(tmp_path / "pack" / "checkpoints" / f"{cfgs[0].name}.npz")[0]
    second = npz_arrays(tmp_path / "pack" / "checkpoints" / f"{cfgs[1].name}.npz")[0]
    assert not np.array_equal(first["w0"], second["w0"]), "the seeds initialise differently"


class Recording(backends.ScanLoop):
    """A ScanLoop that keeps the draws of every compiled call it makes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, call = [], self._call

        def recorded(state, draws):
            self.calls.append([np.asarray(d) for d in draws])
            return call(state, draws)
        self._call = recorded


@pytest.mark.parametrize("kind", ["bn", "gn"])
def test_each_member_trains_on_its_solo_batches_byte_for_byte(cifar_dir, kind):
    import jax
    cfg = config(kind)
    batch = cfg.batch_size * cfg.workers
    data = cifar10.prepare_data(cifar_dir, IMAGES)
    loop = Recording(compiled_models(kind), data.padded, data.y_train, batch, 3)
    images = jax.jit(loop._images)
    for epoch, start in ((0, 0), (1, 4)):   # a whole epoch, and one resumed at step 4
        draws = [cifar10.epoch_draws(IMAGES, s, epoch) for s in SEEDS]
        loop.calls.clear()
        done, logs = loop.run(draws, start, 10)
        assert done == 10 and len(logs) == len(SEEDS)
        assert [len(c[0]) for c in loop.calls] == ([3, 3, 3, 1] if start == 0 else [3, 3])
        for k, seed in enumerate(SEEDS):
            solo = cifar10.TrainBatches(data.padded, data.y_train, batch, seed, epoch)
            steps = [tuple(d[i, k] for d in call) for call in loop.calls for i in range(len(call[0]))]
            assert len(steps) == 10 - start
            for i, (index, rows, cols, flips) in enumerate(steps, start):
                x = np.asarray(images(index, rows, cols, flips))
                want_x, want_y = solo[i]
                assert x.dtype == want_x.dtype and x.tobytes() == want_x.tobytes(), (seed, i)
                assert np.array_equal(np.asarray(loop.labels[index]), want_y)


# --- one step, a pack against its members alone ----------------------------------------

@pytest.mark.parametrize("kind", ["bn", "gn"])
def test_one_packed_step_equals_the_solo_steps(cifar_dir, kind):
    cfg = config(kind)
    batch = cfg.batch_size * cfg.workers
    data = cifar10.prepare_data(cifar_dir, IMAGES)
    pack, solos = compiled_models(kind), compiled_models(kind)   # the same initial states
    draws = [cifar10.epoch_draws(IMAGES, s, 0) for s in SEEDS]
    _, pack_logs = backends.ScanLoop(pack, data.padded, data.y_train, batch, 1).run(draws, 0, 1)
    identical, worst = 0, 0.0
    for k, model in enumerate(solos):
        before = [np.array(w) for w in model.get_weights()]
        _, logs = backends.ScanLoop(model, data.padded, data.y_train, batch, 1).run(draws[k], 0, 1)
        assert logs == pytest.approx(pack_logs[k], rel=1e-5)
        pairs = [*zip(model.weights, pack[k].weights),
                 *zip(model.optimizer.variables, pack[k].optimizer.variables)]
        for solo_v, pack_v in pairs:   # weights, moving statistics, momenta, the step count
            a, b = np.asarray(solo_v), np.asarray(pack_v)
            identical += a.tobytes() == b.tobytes()
            scale = max(float(np.abs(a).max()), 1e-3)
            worst = max(worst, float(np.abs(a - b).max()) / scale)
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * scale, err_msg=solo_v.path)
        moved = max(np.abs(w - b).max() for w, b in zip(model.get_weights(), before))
        assert moved > 1e-4, "the step changed the weights"
    print(f"{kind}: {identical} of {len(pairs) * len(SEEDS)} arrays bit-identical, "
          f"worst difference {worst:.1e} of the array's largest value")


# --- whole runs: the pack, twice, stopped and resumed; the solo runs -------------------------

def stopping_loop(at_call):
    """backends.ScanLoop that sends this process SIGUSR1 during its at_call-th compiled call
    (the run's StopOnSignal catches it; the loop stops at the end of that call)."""
    return loop_acting_in_call(at_call, lambda: os.kill(os.getpid(), signal.SIGUSR1))


@pytest.fixture(scope="module")
def runs(cifar_dir, tmp_path_factory):
    """BN (W = 2, N = 2), 2 epochs of 40 images, seeds 1-3: the pack, the pack again, the pack
    stopped by SIGUSR1 in epoch 2 and resumed (its checkpoints kept), and each seed alone."""
    root = tmp_path_factory.mktemp("packs")
    cfgs = [config("bn", s) for s in SEEDS]
    patch = pytest.MonkeyPatch()
    patch.setattr(loops, "IMAGES_PER_SCAN", 12)   # calls of 3 steps of 4 images

    def run(folder, cfgs, stop=None):
        return train.train(cfgs, cifar_dir, root / folder, root / folder / "logs", stop=stop,
                                loop="scan")
    try:
        assert run("pack", cfgs, never()) == 0
        assert run("again", cfgs, never()) == 0
        with pytest.MonkeyPatch.context() as p:
            p.setattr(backends, "ScanLoop", stopping_loop(at_call=6))   # epoch 2's 2nd call
            assert run("stopped", cfgs) == signals.PREEMPTED
        shutil.copytree(root / "stopped", root / "midway")
        assert run("stopped", cfgs) == 0
        for cfg in cfgs:
            assert run("solo", [cfg], never()) == 0
    finally:
        patch.undo()
    return types.SimpleNamespace(root=root, cfgs=cfgs, names=[c.name for c in cfgs])


def test_a_pack_run_twice_ends_bit_for_bit_the_same(runs):
    for name in runs.names:
        assert_same_arrays(runs.root / "pack" / f"{name}.keras", runs.root / "again" / f"{name}.keras")
        a, b = record(runs.root / "pack", name), record(runs.root / "again", name)
        assert [e["test_loss"] for e in a["history"]] == [e["test_loss"] for e in b["history"]]


def test_a_pack_stopped_by_sigusr1_mid_epoch_resumes_bit_for_bit(runs):
    for name in runs.names:
        _, state = npz_arrays(runs.root / "midway" / "checkpoints" / f"{name}.npz")
        assert (state["epoch"], state["step"]) == (1, 6), "stopped after epoch 2's second call"
        assert_same_arrays(runs.root / "pack" / f"{name}.keras", runs.root / "stopped" / f"{name}.keras")
        rec = record(runs.root / "stopped", name)
        assert rec["resumed"] == 1 and rec["loop"] == "scan"
        assert [e["test_error"] for e in rec["history"]] == \
            [e["test_error"] for e in record(runs.root / "pack", name)["history"]]
    assert not list((runs.root / "stopped" / "checkpoints").iterdir()), "removed when finished"


def test_members_write_the_files_of_their_solo_runs(runs):
    def files(folder):   # TensorBoard's event files are named by time, host and process
        return sorted(str(p.relative_to(folder).parent / "events") if "tfevents" in p.name
                      else str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files(runs.root / "pack") == files(runs.root / "solo")
    for name in runs.names:
        packed, solo = record(runs.root / "pack", name), record(runs.root / "solo", name)
        assert packed["packed_with"] == [n for n in runs.names if n != name]
        assert solo["packed_with"] == [] and packed["step_options"] == solo["step_options"]
        assert packed["config"] == solo["config"] and packed["loop"] == solo["loop"] == "scan"
        assert packed.keys() == solo.keys()


def test_whole_runs_stay_within_the_seed_spread_of_their_solo_twins(runs):
    """Whole runs cannot be compared weight for weight (training amplifies rounding): the
    members' test losses against their solo twins', beside the spread over seeds."""
    def losses(folder):
        return np.array([[e["test_loss"] for e in record(runs.root / folder, n)["history"]]
                         for n in runs.names])
    pack, solo = losses("pack"), losses("solo")
    gap = np.abs(pack - solo).max()
    spread = (solo.max(axis=0) - solo.min(axis=0)).min()   # the seeds' closest epoch
    print(f"test loss: pack vs solo at most {gap:.2e}, seed spread at least {spread:.2e}")
    assert spread > 0.01 and gap < spread / 10


def test_members_at_different_points_train_just_what_is_missing(runs, cifar_dir, tmp_path, capsys):
    s1, s2, s3 = runs.names
    folder = tmp_path / "models"
    (folder / "checkpoints").mkdir(parents=True)
    for suffix in (".keras", ".json"):   # seed 1 finished (alone); seed 3 not started
        shutil.copy(runs.root / "solo" / f"{s1}{suffix}", folder / f"{s1}{suffix}")
    shutil.copy(runs.root / "midway" / "checkpoints" / f"{s2}.npz", folder / "checkpoints")
    finished = (folder / f"{s1}.keras").stat().st_mtime_ns
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as p:
        p.setattr(loops, "IMAGES_PER_SCAN", 12)
        assert train.train(runs.cfgs, cifar_dir, folder, tmp_path / "logs", stop=never(),
                                loop="scan") == 0
    out = capsys.readouterr().out
    assert f"{s1}: already finished" in out and f"{s2}: resuming at epoch 2, step 6" in out
    assert "stand at 2 different points" in out and "pack of" not in out
    assert (folder / f"{s1}.keras").stat().st_mtime_ns == finished, "the finished run untouched"
    assert [e["epoch"] for e in record(folder, s2)["history"]] == [1, 2]
    assert record(folder, s2)["resumed"] == 1 and record(folder, s2)["packed_with"] == [s1, s3]
    # seed 3 trained alone, from the start: the solo run's program, bit for bit
    assert_same_arrays(runs.root / "solo" / f"{s3}.keras", folder / f"{s3}.keras")
    assert not list((folder / "checkpoints").iterdir())


def test_a_pack_with_one_bad_checkpoint_loses_nothing_of_the_others(runs, cifar_dir, tmp_path,
                                                                    capsys):
    """Seeds 1 and 2 checkpointed mid-epoch 2 by the pack, seed 2's truncated: it is set aside
    (NAME.npz.bad, named) and starts over; seed 1 resumes where it stood."""
    s1, s2 = runs.names[:2]
    folder = tmp_path / "models"
    shutil.copytree(runs.root / "midway" / "checkpoints", folder / "checkpoints")
    (folder / "checkpoints" / f"{runs.names[2]}.npz").unlink()
    bad = folder / "checkpoints" / f"{s2}.npz"
    bad.write_bytes(bad.read_bytes()[:1000])
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as p:
        p.setattr(loops, "IMAGES_PER_SCAN", 12)
        assert train.train(runs.cfgs[:2], cifar_dir, folder, tmp_path / "logs", stop=never(),
                                loop="scan") == 0
    captured = capsys.readouterr()
    assert f"{s2}: checkpoint {bad} " in captured.err and f"moved to {bad}.bad" in captured.err
    assert f"{s1}: resuming at epoch 2, step 6" in captured.out
    assert record(folder, s1)["resumed"] == 1 and record(folder, s2)["resumed"] == 0
    assert [e["epoch"] for e in record(folder, s1)["history"]] == [1, 2]
    # seed 2 trained alone from the start: the solo run's program, bit for bit
    assert_same_arrays(runs.root / "solo" / f"{s2}.keras", folder / f"{s2}.keras")
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [f"{s2}.npz.bad"]


def test_without_the_scan_loop_the_seeds_train_one_after_another(cifar_dir, tmp_path, capsys):
    cfgs = [config("gn", s, epochs=1, images=20) for s in (1, 2)]
    assert train.train(cfgs, cifar_dir, tmp_path, tmp_path / "logs", stop=never(),
                            loop="fit") == 0
    out = capsys.readouterr().out
    assert ("2 runs (gn_b4_s1, gn_b4_s2): one after another (packs need JAX's scan loop: "
            "KERAS_BACKEND=jax, --loop scan)") in out
    for cfg in cfgs:
        rec = record(tmp_path, cfg.name)
        assert rec["packed_with"] == [] and rec["loop"] == "fit"


def test_a_pack_refuses_runs_that_differ_in_more_than_seed():
    with pytest.raises(ValueError, match="a pack's runs differ in their seeds only; got "
                                         "bn_b2_w2_s1, gn_b4_s2"):
        recipe.check_pack([config("bn", 1), config("gn", 2)])
    with pytest.raises(ValueError, match="differ in their seeds only"):
        recipe.check_pack([config("bn", 1), config("bn", 1)])


# --- packs through sweep.py and SLURM: the files of solo runs ------------------------------

def tree_files(folder):
    """A run folder's files, TensorBoard's event files (named by time, host, process) as one."""
    return sorted(str(p.relative_to(folder).parent / "events") if "tfevents" in p.name
                  else str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_the_sweep_queue_packs_the_seeds_of_each_entry_the_longest_first():
    from gnrepro import sweep
    queue = sweep.queue("default", tasks=[0, 4, 10, 14, 24, 9])
    assert [names for _, names in queue] == [["bn_b2_w8_s1", "bn_b2_w8_s2", "bn_b2_w8_s3"],
                                             ["gn_b2_w8_s1"], ["bn_b32_w8_s1", "bn_b32_w8_s2"]]
    assert [args for args, _ in queue] == [["--task", "4", "--seeds", "1 2 3", "--pack"],
                                           ["--task", "9", "--seeds", "1", "--pack"],
                                           ["--task", "0", "--seeds", "1 2", "--pack"]]
    seeds_23 = sweep.queue("default", tasks=[14, 24])   # seeds 2 and 3: their own grid's entry 4
    assert seeds_23 == [(["--task", "4", "--seeds", "2 3", "--pack"], ["bn_b2_w8_s2", "bn_b2_w8_s3"])]
    alone = sweep.queue("default", tasks=[0, 10, 4], pack=False)
    assert alone == [(["--task", "4"], ["bn_b2_w8_s1"]), (["--task", "0"], ["bn_b32_w8_s1"]),
                     (["--task", "10"], ["bn_b32_w8_s2"])]
    # packs only up to N = 2 (gpu.sh's PACK_MAX_N): N = 32's seeds each alone
    small = sweep.queue("default", tasks=[0, 10, 4, 14, 6], pack_max_n=2)
    assert small == [(["--task", "4", "--seeds", "1 2", "--pack"], ["bn_b2_w8_s1", "bn_b2_w8_s2"]),
                     (["--task", "6"], ["gn_b16_w8_s1"]), (["--task", "0"], ["bn_b32_w8_s1"]),
                     (["--task", "10"], ["bn_b32_w8_s2"])]


def test_print_queue_is_gpu_shs_list_of_processes(capsys):
    from gnrepro import sweep
    sweep.print_queue("default", "", "0 10 20 4 14", "1", "", "2")
    assert capsys.readouterr().out.splitlines() == [
        "4 1,2 bn_b2_w8_s1 bn_b2_w8_s2", "0 - bn_b32_w8_s1", "10 - bn_b32_w8_s2",
        "20 - bn_b32_w8_s3"]
    sweep.print_queue("default", "", "0 10", "1", "")   # without the limit: one pack
    assert capsys.readouterr().out.splitlines() == ["0 1,2 bn_b32_w8_s1 bn_b32_w8_s2"]


def sweep_command(cifar_dir, root, *extra):
    import sys
    return [sys.executable, "-u", "-m", "gnrepro.sweep", "--profile", "quick", "--seeds", "1 2", "--tasks",
            "0 10", "--epochs", "1", "--train-images", "40", "--test-images", "20", "--loop",
            "scan", "--data-dir", str(cifar_dir), "--models-dir", str(root / "models"),
            "--logs-dir", str(root / "logs"), "--results", str(root / "results.csv"),
            "--plot", str(root / "plot.png"), *extra]


def test_packs_through_sweep_py_write_the_files_of_solo_runs(cifar_dir, tmp_path):
    import subprocess
    out = {}
    for kind, extra in (("pack", []), ("solo", ["--no-pack"])):
        result = subprocess.run(sweep_command(cifar_dir, tmp_path / kind, *extra), cwd=REPO,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        out[kind] = result.stdout
    assert "profile quick: 2 runs in 1 packs (one process each" in out["pack"]
    assert "pack of 2: bn_b32_s1, bn_b32_s2 in one compiled program" in out["pack"]
    assert "profile quick: 2 runs, " in out["solo"] and "pack of" not in out["solo"]
    assert tree_files(tmp_path / "pack") == tree_files(tmp_path / "solo")
    assert {"models/bn_b32_s1.keras", "models/bn_b32_s2.json", "results.csv"} <= \
        set(tree_files(tmp_path / "pack"))
    for name, other in (("bn_b32_s1", "bn_b32_s2"), ("bn_b32_s2", "bn_b32_s1")):
        packed, solo = (record(tmp_path / k / "models", name) for k in ("pack", "solo"))
        assert packed["packed_with"] == [other] and solo["packed_with"] == []
        assert packed["config"] == solo["config"]


def test_packs_through_the_slurm_test_cluster_write_the_files_of_solo_runs(cifar_dir, tmp_path):
    """sbatch --array=0,10 train.sh under KERAS_BACKEND=jax: task 0 trains seeds 1 and 2 as a
    pack, task 10 (seed 2) has nothing to do; with PACK=0 each trains its own; same files."""
    import test_slurm
    gone = test_slurm.cluster.missing()
    test_slurm.need(not gone, f"SLURM is not installed ({', '.join(gone)} missing): "
                              f"bash .ci/install-slurm.sh")
    test_slurm.need(os.geteuid() == 0, "the test cluster's daemons run as root")
    root = tmp_path / "cluster"
    root.mkdir()
    environment = test_slurm.cluster.start(root)
    try:
        env = {**test_slurm.run_env(), "SLURM_CONF": environment["SLURM_CONF"],
               "PATH": environment["PATH"], "KERAS_BACKEND": "jax"}
        slurm = (root, env)
        for kind, pack in (("pack", "1"), ("solo", "0")):
            folder = tmp_path / kind
            (folder / "logs").mkdir(parents=True)
            args = sweep_command(cifar_dir, folder)[4:]   # (less python -u -m gnrepro.sweep)
            args = [a for a in args if a not in ("--tasks", "0 10", "--results", "--plot")
                    and not a.endswith((".csv", ".png"))]
            job = test_slurm.sbatch({**env, "PACK": pack}, folder, "--array=0,10",
                                    test_slurm.TRAIN_SH, *args)
            test_slurm.wait_for(job, slurm, timeout=600)
            assert test_slurm.task_states(job, env) == {0: ("COMPLETED", "0:0", 0),
                                                        10: ("COMPLETED", "0:0", 0)}
            idle = (folder / "logs" / f"slurm-{job}_10.out").read_text()
            assert ("trains in the pack of entry 0" in idle) == (pack == "1"), idle
        files = [f for f in tree_files(tmp_path / "pack") if "slurm-" not in f]
        assert files == [f for f in tree_files(tmp_path / "solo") if "slurm-" not in f]
        assert "models/bn_b32_s2.keras" in files
        assert record(tmp_path / "pack" / "models", "bn_b32_s2")["packed_with"] == ["bn_b32_s1"]
    finally:
        test_slurm.cluster.stop(root)


# --- the step's cost options ----------------------------------------------------------------

def reductions(jaxpr):
    """(primitive name, input dtype) of every reduction in a jaxpr, sub-jaxprs included."""
    from jax import extend
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("reduce_") or eqn.primitive.name == "dot_general":
            out.append((eqn.primitive.name, str(eqn.invars[0].aval.dtype)))
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(sub, extend.core.ClosedJaxpr):
                    out += reductions(sub.jaxpr)
                elif isinstance(sub, extend.core.Jaxpr):
                    out += reductions(sub)
    return out


@pytest.mark.parametrize("kind", ["bn", "gn"])
def test_bfloat16_keeps_statistics_weights_and_loss_in_float32(cifar_dir, kind):
    import dataclasses
    import jax
    import jax.numpy as jnp
    cfg = dataclasses.replace(config(kind), bfloat16=True)
    keras.utils.set_random_seed(1)
    model = train.build_model(cfg)
    train.compile_model(model, cfg, 10)
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    norms = [l for l in model.layers if "norm" in l.name]
    assert convs and all(l.compute_dtype == "bfloat16" for l in convs)
    assert all(v.dtype == "float32" for v in model.weights), "weights and moving statistics"
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 16)), jnp.bfloat16)
    for norm in norms[:1]:   # the stem's: 16 channels
        import inspect
        trainable = [v.value for v in norm.trainable_variables]
        frozen = [v.value for v in norm.non_trainable_variables]
        mode = {"training": True} if "training" in inspect.signature(norm.call).parameters else {}

        def call(t, f, x):
            return norm.stateless_call(t, f, x, **mode)
        found = reductions(jax.make_jaxpr(call)(trainable, frozen, x).jaxpr)
        assert found and {dtype for _, dtype in found} == {"float32"}, found   # the statistics
        out, updated = jax.eval_shape(call, trainable, frozen, x)
        assert out.dtype == jnp.bfloat16 and all(u.dtype == jnp.float32 for u in updated)
    data = cifar10.prepare_data(cifar_dir, IMAGES)
    loop = backends.ScanLoop(model, data.padded, data.y_train, cfg.batch_size * cfg.workers, 1)
    state = backends._member(loop.state(), 0)   # the model's own state, unstacked
    batch = data.padded[:4, 4:-4, 4:-4], data.y_train[:4]
    loss, (unscaled, logits, *_) = jax.eval_shape(
        lambda s, x, y: model.compute_loss_and_updates(s[0], s[1], s[3], x, y, None, training=True,
                                                   optimizer_variables=s[2]),
        state, *batch)
    assert loss.dtype == unscaled.dtype == logits.dtype == jnp.float32
    _, logs = loop.run(cifar10.epoch_draws(IMAGES, 1, 0), 0, 2)
    assert np.isfinite(logs["loss"])
    assert all(np.asarray(v).dtype == np.float32 for v in model.weights)


def test_pack_command_line_errors(capsys):
    from gnrepro import sweep
    with pytest.raises(SystemExit) as e:
        train.main(["--norm", "bn", "--batch-size", "2", "--seed", "2", "--pack"])
    assert e.value.code == 2
    assert ("--pack trains the run with each seed of --seeds; give --seeds, not --seed 2"
            in capsys.readouterr().err)
    with pytest.raises(SystemExit) as e:
        sweep.main(["--profile", "quick", "--pack"])
    assert e.value.code == 2 and "a sweep packs its grid's entries itself" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train.main(["--norm", "bn", "--batch-size", "2", "--unroll", "0"])
    assert e.value.code == 2 and "--unroll must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train.main(["--norm", "bn", "--batch-size", "2", "--bfloat16", "--mixed-precision"])
    assert e.value.code == 2 and "not both" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown step options \['unrol'\]"):
        loops.step_options({"unrol": 2})
