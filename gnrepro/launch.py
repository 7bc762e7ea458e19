"""train.py's command line as far as it needs no Keras: what `python train.py ...` does before
it imports Keras, so that --help, --grid, a whole profile and a missing data set start no
backend.

    stop, run = launch.before_keras()   # train.py, run as a script: run = (args, cfg, paths)

A whole profile (--profile P alone) is handed over to the local runner, `python -m
gnrepro.sweep` (this process becomes it). Needs the standard library and recipe.py only, until
a run's data is looked for (cifar10.py, NumPy).
"""
import os
import signal
import sys
from dataclasses import asdict, replace
from pathlib import Path

from gnrepro import recipe, signals

REPO = Path(__file__).resolve().parent.parent


def before_keras(argv=None):
    """What train.py does as a script before it imports Keras: the stop handler installed
    (before NumPy), then before_backend, then Keras imported with its start-up lines off.
    (stop, (args, cfg, paths))."""
    stop = signals.StopOnSignal().__enter__()
    run = before_backend(argv, stop)
    from gnrepro import startup
    with startup.quiet():
        import keras  # noqa: F401
    return stop, run


def before_backend(argv=None, stop=None):
    """--help and --grid print and exit; a whole profile is handed over to the sweep
    (hand_over); a run whose data cannot be found says so, once, and exits with status 1 (a
    finished run needs none). Otherwise (args, cfg, paths) of the run asked for."""
    p, args = recipe.parse_args(argv)
    if args.grid:
        recipe.print_grid(args.profile or "default", args.seeds)
        sys.exit(0)
    if args.profile and all(getattr(args, k) is None for k in ("task", "norm", "batch_size", "seed")):
        hand_over(sys.argv[1:] if argv is None else argv, stop)
    if args.tasks is not None:
        p.error("--tasks selects entries of a whole profile's sweep: give --profile alone")
    if args.time_limit is not None:
        p.error("--time-limit stops a whole profile's sweep (--profile alone); a single run "
                "stops on SIGUSR1, e.g. timeout -s USR1 2h python train.py ...")
    if args.pack and args.seed is not None:
        p.error(f"--pack trains the run with each seed of --seeds; give --seeds, not --seed "
                f"{args.seed}")
    cfg = recipe.resolve(p, args)
    by = recipe.provider(cfg)
    if by != cfg.profile and args.models_dir is None and args.logs_dir is None:
        # One configuration, one run: where the profile that provides it keeps it.
        print(f"{cfg.name}: provided by profile {by}: its run, in "
              f"{recipe.profile_paths(by)['models_dir']}/", flush=True)
        cfg = replace(cfg, profile=by)
    paths = recipe.profile_paths(cfg.profile, args)
    require_data(args, recipe.pack_of(cfg, args.seeds, args.pack), paths)
    return args, cfg, paths


def require_data(args, cfgs, paths):
    """CIFAR-10 found (or fetched into the cache), or exit with one message, unless every run
    of cfgs has finished (reproduce.py, not the run, reads the data then)."""
    from gnrepro import cifar10, runfiles
    for cfg in cfgs:
        files = runfiles.Paths(paths["models_dir"], paths["logs_dir"], cfg.name)
        if args.force or not runfiles.finished_record(files, asdict(cfg), recipe.run_identity):
            cifar10.require(args.data_dir)
            return


def hand_over(argv, stop=None):
    """Become `python -m gnrepro.sweep ARGV`, the one local runner of a grid (an exec). The
    signals that the sweep handles are held (blocked, which exec keeps) until it has installed
    its handlers, so that one sent in between is not lost; one that came before (stop) exits
    with PREEMPTED at once."""
    if getattr(stop, "requested", None):
        print(f"stopped by {stop.requested} before the sweep started; run the same command again",
              flush=True)
        sys.exit(signals.PREEMPTED)
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, signals.SWEEP_SIGNALS)
    # -m finds gnrepro from any folder the command was given in
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.execve(sys.executable, [sys.executable, "-m", "gnrepro.sweep", *map(str, argv)],
              {**os.environ, "PYTHONPATH": path})
