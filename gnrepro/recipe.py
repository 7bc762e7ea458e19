"""The recipe, the grids of the studies, a run's Config and train.py's command line: what a
run is, in plain Python (no Keras, no NumPy), so that the runners (gnrepro/sweep.py, train.sh)
and `train.py --grid` or `--help` need no backend.

    from gnrepro import recipe
    recipe.grid("quick")                      # the quick profile's runs, as Config
    p, args = recipe.parse_args(["--task", "3"]); recipe.resolve(p, args)

One block of named defaults (the recipe, the studies, the scales, the profiles) is the one
source of truth: train.py, train.sh, the tests and the docs read it; nothing copies it.
"""
import argparse
import math
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path


# ---------------------------------------------------------------------------
# The recipe (Wu & He 2018, Sec. 6.1, on He et al. 2015, Sec. 4.2) and the sweep grid.
# train.sh, the tests and the README read these; nothing copies them.
EPOCHS = 100                # training epochs
LR_PER_32 = 0.1             # learning rate for 32 images per worker, linear in N: 0.1 * N / 32,
                            #   whatever the number of workers W (the paper's rule at W = 8);
                            #   a run may fix its rate instead (Config.learning_rate)
LR_DROPS = (30, 60, 90)     # epochs (of EPOCHS) after which the learning rate is divided by 10;
LR_DROP_FACTOR = 0.1        #   scaled proportionally when --epochs is not 100
# The schedules, as (epochs of a full-length run, epochs after which the rate drops): the GN
# paper's, and He et al.'s CIFAR-10 schedule (64k iterations of 128 images, /10 at 32k and
# 48k) in whole epochs of the 390 steps that 50,000 images make at 128: 164 epochs = 63,960
# iterations, /10 after epochs 82 (31,980) and 123 (47,970). Whole epochs, so that every
# epoch is evaluated and the paper's statistic (the final 5) means the same in both.
SCHEDULES = {"paper": (EPOCHS, LR_DROPS), "he": (164, (82, 123))}
MOMENTUM = 0.9              # SGD momentum
WEIGHT_DECAY = 1e-4         # on every weight, gamma and beta included (coupled, as in Caffe/Torch)
GROUPS = 8                  # GN groups: half the smallest width (16 channels)
BN_MOMENTUM = 0.9           # BN moving-average momentum (torch's 0.1 in Keras' convention)
EPSILON = 1e-5              # BN and GN epsilon, as in the paper's implementation and torch
EVAL_BATCH_SIZE = 1000      # evaluation batch (inference mode, so it does not change the result)
IMAGES_PER_EXECUTION = 64   # images per compiled call of fit: small batches run several steps
IMAGES_PER_SCAN = 8192      # images per compiled call of the JAX scan loop (--loop scan): few
                            #   calls per epoch, so a GPU is not bound by per-call dispatch
THREADS = 1                 # intra-op threads per process (TensorFlow, XLA on CPU, torch) (0: one per core): on a CPU,
                            #   small batches are op-overhead bound, and one thread halves their
                            #   CPU time per image (python bench.py train); more cores serve
                            #   more runs at once (train.sh's array tasks). Fixed, so that a
                            #   result does not depend on the machine's core count.

NORMS = ("bn", "gn", "ln", "in")  # ln: GN with one group (layer.GroupNormalization(groups=1)),
                                  #   in: one channel per group (groups=-1, instance norm)
BATCH_SIZES = (32, 16, 8, 4, 2)   # images per worker, Figure 1's x axis
SEEDS = (1, 2, 3)                 # three seeds, so the figure can show the spread
WORKERS = 8                       # workers W of the default sweep, the paper's 8 GPUs: a step
                                  #   takes W * N images, BN normalizes each N on its own
GROUP_COUNTS = (1, 2, 4, 8, 16)        # Table 3, top: G (at most 16, the narrowest width)
CHANNELS_PER_GROUP = (1, 2, 4, 8, 16)  # Table 3, bottom: C / G fixed in every layer

MOVING_STATISTICS = ("first", "mean")  # BN's moving statistics at W > 1: the first worker's
                                       #   (the paper's code; the default) or the workers' mean
                                       #   (layer.MOVING_STATISTICS, which needs Keras)
STATISTIC_EPOCHS = 20       # a run this long or longer is reported by the paper's statistic
                            #   (median of the final 5 epochs), a shorter one by its final error

STEP_IMAGES = 256           # the workers study's fixed step: W * N = 256 images at a rate of 0.1,
                            #   the paper's step at N = 32, W = 8 (0.1 per 256 images)

# A study is the runs of one question, as Config fields (the rest from the scale). A run that
# two studies need is one configuration, trained once (see provider()).
STUDIES = {
    "figure1": [dict(norm=n, batch_size=b) for n in ("bn", "gn") for b in BATCH_SIZES],
    # He et al.'s own CIFAR-10 recipe on this code and data, a control of the absolute level:
    # 128 images a step on two workers (their two GPUs), a rate of 0.1, their schedule, BN.
    "he": [dict(norm="bn", batch_size=64, workers=2, learning_rate=0.1, schedule="he")],
    # Figure 4 and Table 1: the four normalizations at 32 images per worker.
    "norms": [dict(norm=n, batch_size=32) for n in NORMS],
    # BN's degradation: does it follow the N images each worker normalizes, or the step? Two
    # arms along N: Figure 1's (W = 8 workers, the step shrinks with N), and a step held at
    # STEP_IMAGES images and a rate of 0.1 (W = 256 / N workers, 195 steps an epoch at every N).
    # Both keep the rate per image at 0.1 / 256; they meet at N = 32, W = 8.
    "workers": [dict(norm="bn", batch_size=b, workers=WORKERS) for b in BATCH_SIZES]
               + [dict(norm="bn", batch_size=b, workers=STEP_IMAGES // b, learning_rate=0.1)
                  for b in BATCH_SIZES if STEP_IMAGES // b != WORKERS],
    # Table 3: GN with G groups, then with C / G channels per group (G = 1 is LN, C / G = 1 is
    # IN: the same model, so the same runs as the norms study's).
    "groups": [dict(norm="ln", batch_size=32) if g == 1 else dict(norm="gn", batch_size=32, groups=g)
               for g in GROUP_COUNTS]
              + [dict(norm="in", batch_size=32) if c == 1 else
                 dict(norm="gn", batch_size=32, channels_per_group=c) for c in CHANNELS_PER_GROUP],
    # BN's moving statistics at W = 8: from the first worker's N images (the paper's code) or
    # the mean over the 8 workers, where N is small enough for it to matter (laptop scale).
    "bnstats": [dict(norm="bn", batch_size=b, workers=WORKERS, moving_statistics=rule)
                for b in (4, 2) for rule in MOVING_STATISTICS],
}
# A scale: the paper's, or laptop scale (6,000 training images, 12 %, 5 epochs, 2,000 test
# images, all class-balanced). At laptop scale W = 1 (BN over the whole step, as earlier
# single-device reproductions) where a study does not set W: at W = 8 so few images make too
# few steps per epoch at N = 32 to learn much. epochs None: the full length of the run's
# schedule (SCHEDULES: 100, or He et al.'s 164).
SCALES = {
    "paper": dict(epochs=None, train_images=None, test_images=None, seeds=SEEDS, workers=WORKERS),
    "quick": dict(epochs=5, train_images=6000, test_images=2000, seeds=(1,), workers=1),
}
# A profile is a study at a scale; "default" is Figure 1 at the paper's scale. In this order a
# run belongs to the first profile that needs it (provider()). Minutes: the whole grid on
# 2 CPU cores, two runs at a time (this machine, `python sweep.py --profile P`).
PROFILES = {
    "default": ("figure1", "paper"),
    "quick": ("figure1", "quick"),              # about 16-30 minutes
    "he": ("he", "paper"),
    "he-quick": ("he", "quick"),                # about 2 minutes
    "norms": ("norms", "paper"),
    "norms-quick": ("norms", "quick"),          # about 8 minutes (BN and GN: the quick profile's)
    "workers": ("workers", "paper"),
    "workers-quick": ("workers", "quick"),      # about 20 minutes
    "groups": ("groups", "paper"),
    "groups-quick": ("groups", "quick"),        # about 14 minutes (G = 8, LN, IN: provided)
    "bnstats-quick": ("bnstats", "quick"),      # (the first worker's: workers-quick's runs)
}
STEP_OPTIONS = {"unroll": 1}   # the scan loop's defaults (backends.ScanLoop; bench.py step): how
                               #   a step runs, not what it computes (train.step_options)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    norm: str = "gn"
    batch_size: int = 32
    seed: int = 1
    epochs: int | None = None         # None: the full length of the schedule (100, or He's 164)
    groups: int = GROUPS              # GN's G (ln: 1, in: one per channel, whatever this says)
    workers: int = 1                  # W: a step takes W * batch_size images (see WORKERS)
    train_images: int | None = None   # class-balanced subset of the training set; None = all
    test_images: int | None = None    # class-balanced subset of the test set; None = all
    profile: str = "default"
    mixed_precision: bool = False     # mixed_float16 (GPU option; GN and BN keep float32 stats)
    channels_per_group: int | None = None   # GN: C / G fixed in every layer instead of G
    learning_rate: float | None = None      # a fixed rate instead of 0.1 * N / 32 (None: the rule)
    schedule: str = "paper"           # SCHEDULES: the GN paper's, or He et al.'s ("he")
    bfloat16: bool = False            # mixed_bfloat16: bf16 convolutions; float32 weights, BN/GN
                                      #   statistics, logits and loss; no loss scaling (GPU option)
    moving_statistics: str = "first"  # BN at W > 1: inference's statistics from the first
                                      #   worker's slice (the paper's code), or "mean" over the
                                      #   workers (layer.WorkerBatchNormalization)

    def __post_init__(self):
        # One configuration, one form: a fixed rate equal to the rule's is the rule (so the
        # workers study's N = 32, W = 8 run is Figure 1's), and epochs default to the schedule's.
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule should be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.learning_rate is not None and math.isclose(self.learning_rate, self.rule_lr):
            object.__setattr__(self, "learning_rate", None)
        if self.epochs is None:
            object.__setattr__(self, "epochs", SCHEDULES[self.schedule][0])
        if self.moving_statistics not in MOVING_STATISTICS:
            raise ValueError(f"moving_statistics should be one of {MOVING_STATISTICS}, got "
                             f"{self.moving_statistics!r}")
        if self.norm != "bn" or self.workers == 1:   # one slice (or none): the rules agree
            object.__setattr__(self, "moving_statistics", MOVING_STATISTICS[0])

    @property
    def name(self):
        """e.g. bn_b4_w8_s1; gn_g4_b32_s1 (G = 4), gn_c2_b32_s1 (2 channels per group);
        bn_b2_w128_lr0.1_s1 (a fixed rate), bn_b64_w2_lr0.1_he_s1 (He et al.'s schedule),
        bn_b2_w8_meanstats_s1 (BN's moving statistics from the mean over the workers)."""
        norm = self.norm
        if self.norm == "gn" and self.channels_per_group:
            norm += f"_c{self.channels_per_group}"
        elif self.norm == "gn" and self.groups != GROUPS:
            norm += f"_g{self.groups}"
        workers = f"_w{self.workers}" if self.workers > 1 else ""
        rate = f"_lr{self.learning_rate:g}" if self.learning_rate is not None else ""
        schedule = f"_{self.schedule}" if self.schedule != "paper" else ""
        stats = "_meanstats" if self.moving_statistics == "mean" else ""
        return f"{norm}_b{self.batch_size}{workers}{rate}{schedule}{stats}_s{self.seed}"

    @property
    def rule_lr(self):
        # Per worker: the paper's 0.1 * N / 32 at W = 8 (0.1 per 256 images, Goyal et al.'s
        # reference), earlier reproductions' at W = 1; along Figure 1's axis, for any fixed W,
        # the rate stays proportional to the step's W * N images (the linear scaling rule).
        return LR_PER_32 * self.batch_size / 32

    @property
    def lr(self):
        """The run's learning rate before the drops: learning_rate if fixed, else the rule."""
        return self.rule_lr if self.learning_rate is None else self.learning_rate

    @property
    def lr_drops(self):
        """The epochs after which the rate drops: the schedule's, scaled from its full length to
        self.epochs (see scaled_drops)."""
        full, drops = SCHEDULES[self.schedule]
        return scaled_drops(drops, full, self.epochs)


def scaled_drops(drops, full, epochs):
    """The drops of a full-length schedule (epochs after which the rate falls) scaled to
    `epochs`: strictly increasing, each phase at least one epoch long. k drops need k + 1
    epochs; a shorter run keeps its first epochs - 1 drops (1 epoch: none; 2: one, after
    epoch 1). E.g. (30, 60, 90) of 100: 100 -> 30, 60, 90; 5 -> 2, 3, 4; 3 -> 1, 2."""
    kept = drops[:max(0, min(len(drops), epochs - 1))]
    out = []
    for i, d in enumerate(kept):
        latest = epochs - (len(kept) - i)           # room for the drops after this one
        out.append(min(max(round(d * epochs / full), out[-1] + 1 if out else 1), latest))
    return out


# Stored configurations (a checkpoint's, a run record's): the values that the keys missing
# from one written before the key existed stand for, and the keys that are gone.
LEGACY = {"moving_statistics": "mean"}   # before the rule could be chosen: the mean over workers
REMOVED = ("jit_compile",)               # --jit-compile: Keras never used XLA for these runs


KEPT_FROM_START = ("moving_statistics",)   # a resumed run keeps these from its checkpoint


def stored_config(run):
    """The Config of a stored configuration (asdict(Config) as a checkpoint or a run record
    holds it, from any version of train.py): LEGACY values for missing keys, REMOVED ones
    dropped, canonical as every Config is."""
    fields = {k: v for k, v in run.items() if k not in REMOVED}
    return Config(**{**LEGACY, **fields})


def moving_statistics_of(config):
    """The rule of BN's moving statistics that trained a run, from its record's config (BN
    with W > 1 only; a record from before the rule could be chosen: LEGACY's), else None."""
    if str(config["norm"]).lower() != "bn" or int(config["workers"]) == 1:
        return None
    run = config.get("run")
    return stored_config(run).moving_statistics if run else LEGACY["moving_statistics"]


def run_identity(run):
    """What makes a stored configuration (a dict) the run of another one: its Config, less
    what a run keeps from its start (KEPT_FROM_START: the rule a checkpoint of an earlier
    version of train.py was trained with goes on; a finished run is the one that ran)."""
    return {k: v for k, v in asdict(stored_config(run)).items() if k not in KEPT_FROM_START}


def base_config(profile="default", seeds=None, **fields):
    """The Config of the profile's scale before a study sets its runs' fields (seed: the
    first one): what a single run (--norm ..., no --task) starts from; fields: a study's."""
    s = SCALES[PROFILES[profile][1]]
    scale = dict(epochs=s["epochs"], workers=s["workers"], train_images=s["train_images"],
                 test_images=s["test_images"], profile=profile, seed=(seeds or s["seeds"])[0])
    return Config(**(scale | fields))


def grid(profile="default", seeds=None):
    """The profile's runs, seed-major: all of seed 1's study in STUDIES order, then seed 2's...
    seeds: other seeds than the scale's (--seeds), e.g. a spread at laptop scale."""
    study, scale = PROFILES[profile]
    runs = [base_config(profile, **run, seed=seed)
            for seed in (seeds or SCALES[scale]["seeds"]) for run in STUDIES[study]]
    return list(dict.fromkeys(runs))   # a study may name one configuration twice (workers)


def provider(cfg):
    """The profile that trains cfg: the first of PROFILES at cfg's scale whose study has the
    same configuration (cfg's own profile if none before it). One configuration, one run:
    a study finds the runs it shares with another where that one keeps them."""
    scale = PROFILES[cfg.profile][1]
    for profile, (study, at) in PROFILES.items():
        if at == scale and replace(cfg, profile=profile) in grid(profile, [cfg.seed]):
            return profile
    return cfg.profile


def paper_runs():
    """Every paper-scale run the paper's questions need, each configuration once (the union
    of the paper-scale profiles' grids, each entry where its provider keeps it)."""
    runs = [c for p, (_, scale) in PROFILES.items() if scale == "paper" for c in grid(p)]
    return list(dict.fromkeys(replace(c, profile=provider(c)) for c in runs))


# ---------------------------------------------------------------------------
# Packs: the runs of one configuration with several seeds, trained in one process (one
# compiled program on JAX's scan loop; train.train, backends.ScanLoop).

def pack_of(cfg, seeds=None, pack=False):
    """The runs a command line asks for: cfg, or with --pack cfg with each of `seeds`
    (default: its scale's)."""
    if not pack:
        return [cfg]
    return [replace(cfg, seed=s) for s in seeds or SCALES[PROFILES[cfg.profile][1]]["seeds"]]


def check_pack(cfgs):
    """cfgs, checked to form a pack: distinct seeds, nothing else different."""
    rest = {replace(c, seed=0) for c in cfgs}
    if len(rest) > 1 or len({c.seed for c in cfgs}) < len(cfgs):
        raise ValueError(f"a pack's runs differ in their seeds only; got "
                         f"{', '.join(c.name for c in cfgs)}")
    return cfgs


def packs(entries, tasks):
    """tasks (indices of entries, a grid) grouped into packs, entries that differ only in
    seed, in the order of each pack's first task."""
    groups = {}
    for t in tasks:
        groups.setdefault(replace(entries[t], seed=0), []).append(t)
    return list(groups.values())


def pack_arguments(profile, entries, tasks):
    """train.py's arguments that run entries[tasks] (differing only in seed) as one pack:
    --task J --seeds S --pack, J in the grid of those seeds (train.py renumbers for --seeds)."""
    seeds = [entries[t].seed for t in tasks]
    task = grid(profile, seeds).index(entries[tasks[0]])
    return ["--task", str(task), "--seeds", " ".join(map(str, seeds)), "--pack"]


def profile_paths(profile, args=None):
    """Where a profile's files go: models/, logs/, results.csv, plot.png, curves.png for the
    paper's Figure 1; models/P/, logs/P/ and results/P/ (results.csv, plot.png, curves.png)
    for another profile P. args (the command line) may override each (None: the default)."""
    if profile == "default":
        paths = {"models_dir": "models", "logs_dir": "logs", "results": "results.csv",
                 "plot": "plot.png", "curves": "curves.png"}
    else:
        paths = {"models_dir": f"models/{profile}", "logs_dir": f"logs/{profile}",
                 **{k: f"results/{profile}/{k}.{ext}" for k, ext in
                    (("results", "csv"), ("plot", "png"), ("curves", "png"))}}
    for key in paths:
        if getattr(args, key, None) is not None:
            paths[key] = str(getattr(args, key))
    if getattr(args, "plot", None) is not None:   # --plot x/plot-a.png: x/curves-a.png beside it
        plot = Path(args.plot)
        paths["curves"] = str(plot.with_name(plot.name.replace("plot", "curves", 1)
                                             if "plot" in plot.name else f"{plot.stem}-curves.png"))
    return paths


def is_positive_int(value):
    """An int of at least 1, and not a bool (True is an int to Python, and a typo here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def require_positive(parser, args, names):
    """parser.error for the first of args' `names` that is given and not a positive integer."""
    for name in names:
        value = getattr(args, name)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None and not is_positive_int(v):
                parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {v}")


def require_threads(parser, threads):
    """parser.error unless --threads is 0 (one per core) or a positive integer."""
    if threads < 0:
        parser.error(f"--threads must be 0 (one per core) or a positive integer, got {threads}")


def check_groups(groups, what="groups"):
    """groups (or channels_per_group, named by `what`) should divide 16, 32 and 64."""
    if not is_positive_int(groups) or 16 % groups:
        raise ValueError(f"{what} should divide every stage's width (16, 32, 64), "
                         f"i.e. be 1, 2, 4, 8 or 16; got {groups!r}")


# ---------------------------------------------------------------------------
# Command line.

def _ints(text):
    """'0 3 5' or '0,3,5' -> [0, 3, 5] (argparse names the option if this raises)."""
    return [int(t) for t in text.replace(",", " ").split()]


DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def duration(text):
    """'2h30m', '90m', '45s', '1d12h' or '2:30:00' (H:MM:SS) -> seconds. A bare number is
    refused: SLURM reads it as minutes, `timeout` as seconds."""
    text = text.strip().lower()
    try:
        if ":" in text:
            h, m, sec = (int(x) for x in text.split(":"))
            if not (0 <= m < 60 and 0 <= sec < 60 and h >= 0):
                raise ValueError
            seconds = 3600 * h + 60 * m + sec
        else:
            seconds, number = 0, ""
            for c in text:
                if c.isdigit():
                    number += c
                elif c in DURATION_UNITS and number:
                    seconds, number = seconds + int(number) * DURATION_UNITS[c], ""
                else:
                    raise ValueError
            if number or not text:
                raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: give one with units, e.g. 2h30m, 90m, 5400s, or "
            f"H:MM:SS (2:30:00)") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the time limit must be longer than 0")
    return seconds


def format_duration(seconds):
    """3600 * 2 + 60 * 30 -> '2h30m' (whole minutes; seconds where there are any)."""
    h, rest = divmod(int(seconds), 3600)
    m, sec = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (sec, "s")) if v) or "0s"


DESCRIPTION = "ResNet-20 with BatchNorm, GroupNorm, LayerNorm or InstanceNorm on CIFAR-10: one run, or a profile's grid."
EXAMPLES = """\
examples:
  python train.py --norm gn --batch-size 32 --seed 1   # one run (paper scale: 100 epochs, W 8)
  python train.py --norm bn --batch-size 4 --workers 8 # 8 workers of 4 images per step
  python train.py --task 7 [--devices 2]               # entry 7 of the sweep grid (from 0)
  KERAS_BACKEND=jax python train.py ...                # any Keras backend: TensorFlow
                                                       # (default), JAX, PyTorch
  KERAS_BACKEND=jax python train.py --norm bn --batch-size 2 --seeds "1 2 3" --pack
                                                       # 3 seeds in one compiled program
  python train.py --grid [--profile quick]             # print a profile's grid
  python train.py --profile quick                      # every entry of a profile's grid,
                                                       # then reproduce.py and plot.py
"""


USAGE = """\
%(prog)s --norm NORM --batch-size N [--seed S] [options]  # one run
       %(prog)s --task I [--profile P] [options]                 # a grid entry
       %(prog)s --profile P [--time-limit T] [options]           # a whole profile
       %(prog)s --grid [--profile P]                             # print the grid"""


def parse_args(argv=None):
    """train.py's command line (the sweep's too): (parser, arguments), checked. The help leads
    with what a user runs; how it runs (files, devices, threads, speed) follows."""
    p = argparse.ArgumentParser(prog="train.py", usage=USAGE, description=DESCRIPTION,
                                epilog=EXAMPLES, add_help=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (_what_to_run, _one_run, _files, _how_to_run):
        add(p)
    args = p.parse_args(argv)
    _check(p, args)
    return p, args


def _what_to_run(p):
    what = p.add_argument_group("what to run")
    what.add_argument("--norm", choices=NORMS,
                      help="the normalization: bn, gn, ln (GN with one group) or in (one "
                           "channel per group)")
    what.add_argument("--batch-size", type=int, metavar="N", help="images per worker")
    what.add_argument("--seed", type=int, metavar="S",
                      help="the run's seed (default: the grid entry's; else the first of "
                           "--seeds, or 1)")
    what.add_argument("--profile", choices=list(PROFILES), metavar="P",
                      help=f"a study at a scale (default: Figure 1 at the paper's scale); alone, "
                           f"runs its whole grid, then reproduce.py and plot.py. One of "
                           f"{', '.join(PROFILES)} (-quick: the same study at laptop scale)")
    what.add_argument("--time-limit", type=duration, metavar="T",
                      help="(whole profile) stop this long after the start, e.g. 2h30m or "
                           "2:30:00: every running run checkpoints (as on SIGUSR1), and the "
                           "command exits 0 with a line saying each run's epochs; the same "
                           "command resumes (one run: timeout -s USR1 2h python train.py ...)")
    what.add_argument("--task", type=int, metavar="I",
                      help="run the I-th entry of the sweep grid (see --grid)")
    what.add_argument("--grid", action="store_true", help="print the sweep grid and exit")
    what.add_argument("--tasks", type=_ints, metavar="'I ...'",
                      help="(whole profile) only these grid entries, e.g. '0 3 5'")
    what.add_argument("--seeds", type=_ints, metavar="'S ...'",
                      help="the grid with these seeds instead of the profile's, e.g. '1 2 3' "
                           "(give it to --grid and --task alike: it renumbers the grid)")
    what.add_argument("--pack", action="store_true",
                      help="the run with each seed of --seeds (default: the profile's), in one "
                           "compiled program on JAX's scan loop (one after another elsewhere); "
                           "a member's files are its solo run's")
    what.add_argument("--no-pack", action="store_true",
                      help="(whole profile) every grid entry in a process of its own, no packs")


def _one_run(p):
    run = p.add_argument_group("more of a run's settings (override the profile's or the grid "
                               "entry's)")
    run.add_argument("--workers", type=int, metavar="W",
                     help=f"W workers of N images per step, BN statistics per worker "
                          f"(default: the profile's; {WORKERS} at the paper's scale)")
    run.add_argument("--epochs", type=int, metavar="E",
                     help=f"training epochs (default: the schedule's, {EPOCHS} for the paper's); "
                          f"the drops scale with it, each phase at least one epoch long: a run of "
                          f"E epochs keeps at most E - 1 drops, the first ones (2 epochs: one "
                          f"drop, after epoch 1)")
    run.add_argument("--learning-rate", type=float, metavar="LR",
                     help="a fixed learning rate before the drops, instead of 0.1 * N / 32")
    run.add_argument("--schedule", choices=list(SCHEDULES),
                     help="the GN paper's (100 epochs, /10 after 30, 60, 90; default) or He et "
                          "al.'s (164 epochs, /10 after 82 and 123)")
    run.add_argument("--moving-statistics", choices=MOVING_STATISTICS,
                     help="BN with W > 1 workers: inference's moving mean and variance from the "
                          "first worker's N images (default, as the paper's code) or from the "
                          "mean over the W workers")
    run.add_argument("--groups", type=int, metavar="G", help=f"GroupNorm groups (default {GROUPS})")
    run.add_argument("--channels-per-group", type=int, metavar="C",
                     help="GroupNorm with this many channels per group in every layer, instead "
                          "of a fixed number of groups")
    run.add_argument("--train-images", type=int, metavar="K",
                     help="class-balanced subset of K training images")
    run.add_argument("--test-images", type=int, metavar="K",
                     help="class-balanced subset of K test images")


def _files(p):
    io = p.add_argument_group("files")
    io.add_argument("--data-dir", metavar="DIR",
                    help="folder with cifar-10-batches-py/ or cifar-10-python.tar.gz (default: "
                         "$CIFAR10_DIR, else the Keras cache, downloading)")
    io.add_argument("--models-dir", metavar="DIR",
                    help="default: models/, or models/P/ for a profile P other than the paper's "
                         "Figure 1")
    io.add_argument("--logs-dir", metavar="DIR", help="default: logs/, or logs/P/")
    io.add_argument("--results", metavar="CSV",
                    help="(whole profile) results file (default: results.csv, or "
                         "results/P/results.csv)")
    io.add_argument("--plot", metavar="PNG",
                    help="(whole profile) figure file (default: plot.png, or results/P/plot.png; "
                         "curves.png beside it)")
    io.add_argument("--label", help="(whole profile) names the data, first in the figures' "
                                    "provenance line, e.g. 'CIFAR-10 (JPEG copy)'")


def _how_to_run(p):
    how = p.add_argument_group("how to run")
    how.add_argument("--devices", type=int, metavar="K",
                     help="K devices (GPUs): TensorFlow's MirroredStrategy or JAX's DataParallel, "
                          "each holding W / K workers: the same experiment (default: as many "
                          "visible GPUs as divide W)")
    how.add_argument("--force", action="store_true",
                     help="retrain a finished run, drop a checkpoint")
    how.add_argument("--loop", choices=("auto", "fit", "scan"), default="auto",
                     help="training loop: model.fit, or (JAX) several steps fused per compiled "
                          "call; auto: scan on JAX with a GPU, fit elsewhere")
    how.add_argument("--jobs", type=int, metavar="J",
                     help="(whole profile) runs at a time (default: one per core on a CPU, 1 "
                          "with a GPU)")
    how.add_argument("--threads", type=int, default=THREADS, metavar="T",
                     help=f"intra-op threads per process (TensorFlow, XLA on a CPU, torch), "
                          f"0 = one per core (default {THREADS}: on a CPU, small batches train "
                          f"fastest per core with one thread; run one process per core)")
    how.add_argument("-h", "--help", action="help", help="show this help message and exit")
    gpu = p.add_argument_group("speed options for GPUs (off by default; see python bench.py train)")
    gpu.add_argument("--mixed-precision", action="store_true",
                     help="mixed_float16: float16 convolutions, float32 weights, normalization "
                          "statistics and logits, loss scaling")
    gpu.add_argument("--bfloat16", action="store_true",
                     help="mixed_bfloat16: bfloat16 convolutions, float32 weights, normalization "
                          "statistics, logits and loss (no loss scaling)")
    gpu.add_argument("--unroll", type=int, metavar="U",
                     help=f"(scan loop) steps per iteration of the compiled loop, lax.scan's "
                          f"unroll (default {STEP_OPTIONS['unroll']}); recorded in the run record")


def _check(p, args):
    """What argparse cannot check itself, named by option (p.error exits with status 2)."""
    require_threads(p, args.threads)
    if args.seeds is not None and (not args.seeds or min(args.seeds) < 0
                                   or len(set(args.seeds)) < len(args.seeds)):
        p.error(f"--seeds should be distinct non-negative integers, got {args.seeds}")
    if args.groups is not None and args.channels_per_group is not None:
        p.error("give --groups or --channels-per-group, not both")
    if args.mixed_precision and args.bfloat16:
        p.error("give --mixed-precision (float16) or --bfloat16, not both")
    require_positive(p, args, ("batch_size", "workers", "devices", "epochs", "groups",
                               "channels_per_group", "train_images", "test_images", "jobs",
                               "unroll"))
    if args.learning_rate is not None and not args.learning_rate > 0:
        p.error(f"--learning-rate must be positive, got {args.learning_rate}")


def resolve(p, args):
    """The Config that the arguments ask for: grid entry or profile defaults, then overrides."""
    profile = args.profile or "default"
    entries = grid(profile, args.seeds)
    if args.task is not None:
        if not 0 <= args.task < len(entries):
            p.error(f"--task {args.task} is outside the {profile} grid (0-{len(entries) - 1}); "
                    f"see python train.py --grid --profile {profile}")
        cfg = entries[args.task]
    else:
        if args.norm is None or args.batch_size is None:
            p.error("give --norm and --batch-size (and --seed), or --task I, or --profile alone")
        cfg = base_config(profile, args.seeds)
    overrides = {k: getattr(args, k) for k in ("norm", "batch_size", "workers", "seed", "epochs",
                                               "groups", "channels_per_group", "train_images",
                                               "test_images", "learning_rate", "schedule",
                                               "moving_statistics")
                 if getattr(args, k) is not None}
    if args.schedule and args.epochs is None and SCALES[PROFILES[profile][1]]["epochs"] is None:
        overrides["epochs"] = None               # the new schedule's full length
    if args.groups is not None:
        overrides["channels_per_group"] = None   # G given: fixed groups, not a group size
    if args.channels_per_group is not None:
        overrides["groups"] = GROUPS             # C / G given: G is not the run's setting
    overrides |= {k: True for k in ("mixed_precision", "bfloat16")
                  if getattr(args, k)}
    cfg = replace(cfg, **overrides)
    if cfg.channels_per_group is not None and cfg.norm != "gn":
        p.error(f"--channels-per-group is GN's setting; this run's norm is {cfg.norm}")
    for name in ("groups", "channels_per_group"):
        try:
            if getattr(cfg, name) is not None:
                check_groups(getattr(cfg, name), name)
        except ValueError as e:
            p.error(f"--{name.replace('_', '-')}: {e}")
    if args.devices and cfg.workers % args.devices:
        p.error(f"--devices {args.devices} should divide the workers W = {cfg.workers} "
                f"(each device holds W / K workers)")
    return cfg


def print_grid(profile, seeds=None):
    """One line per entry: index, name, its arguments (train.sh and gpu.sh read the columns),
    and "# provided by Q" where an earlier profile Q trains the same configuration."""
    entries = grid(profile, seeds)
    study, scale = PROFILES[profile]
    providers = [provider(c) for c in entries]
    shared = sum(p != profile for p in providers)
    lines = [f"# {len(entries)} runs, profile {profile}: study {study} "
             f"({len(dict.fromkeys(replace(c, seed=1) for c in entries))} runs) x "
             f"{len(seeds or SCALES[scale]['seeds'])} seeds, scale {scale}"
             + (f"; {shared} provided by another profile (trained there, once)" if shared else "")]
    for i, (c, by) in enumerate(zip(entries, providers)):
        group = (f" --channels-per-group {c.channels_per_group}" if c.channels_per_group
                 else f" --groups {c.groups}" if c.norm == "gn" and c.groups != GROUPS else "")
        rate = f" --learning-rate {c.learning_rate:g}" if c.learning_rate is not None else ""
        schedule = f" --schedule {c.schedule}" if c.schedule != "paper" else ""
        schedule += " --moving-statistics mean" if c.moving_statistics == "mean" else ""
        mark = f" # provided by {by}" if by != profile else ""
        lines.append(f"{i} {c.name} --norm {c.norm} --batch-size {c.batch_size} "
                     f"--workers {c.workers} --seed {c.seed}{group}{rate}{schedule}{mark}")
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:   # (python train.py --grid | head): the reader has what it wanted;
        # what is left unwritten goes nowhere, at exit too, instead of a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())