"""Evaluate every trained model under models/ on the CIFAR-10 test set into results.csv.

    python reproduce.py [--models-dir models] [--out results.csv] [--data-dir DIR]
    python reproduce.py --profile norms [--out results/norms/results.csv]   # a profile's runs
    python reproduce.py --check             # re-evaluate; compare with results.csv, write nothing

--profile P evaluates P's folder (recipe.profile_paths: models/P/) and the runs P shares with
another profile, where that one keeps them (recipe.provider: e.g. the norms study's BN and GN
at N = 32 are Figure 1's, in models/): each configuration is trained once, read by all.

For each models/NAME.keras (models/checkpoints/ is ignored) it reads the run record
models/NAME.json beside it, loads the model with safe_mode=True, prepares the same
data the run used (cifar10.prepare_data: the normalisation mean depends on the
training subset) and evaluates it with train.evaluate, the very function the run
used for its own final evaluation, so the test error is the run's.

results.csv has one row per model, sorted by norm, batch size (descending), seed:

    norm, groups, channels_per_group, batch_size, workers, moving_statistics, seed, epochs,
    test_error, test_loss, median_last5_error, params, model, evaluated   <- (errors in %)
    train_images, test_images, profile, data_source, data_checksum, git_commit, date,
    trained_on

evaluated says where a row's test_error and test_loss come from: "model", this script's
evaluation of the saved model; or "record", for a finished run whose run record is in the
folder but whose model is not (it was not kept): the run's own final evaluation, carried from
its record and never re-evaluated. The command names such runs, and how to train them again.
moving_statistics is BN's rule at W > 1 (first worker's or the workers' mean; blank for
other runs); a record from before the rule could be chosen says mean.

norm is bn, gn, ln or in; groups is G where it is the same in every layer (gn; ln: 1),
channels_per_group is C / G where that is (gn with --channels-per-group; in: 1).

median_last5_error is the paper's statistic (median test error of the final 5
epochs), taken from the run's history; the last columns are provenance from the
run record (date: the day the run finished; trained_on: the machine of each stretch of
training, e.g. 'NVIDIA H200 0-96; AMD EPYC 9B14 96-100', the epochs done at its ends). Numbers are written as a person reads
them: errors to 2 decimals, the loss to 4 (the reproduced error is compared with
the run record's before rounding). The file is written atomically. A model that
cannot be read, or has no run record, is named, the others are still evaluated,
the bad ones are listed at the end and the exit status is 1.

--check re-evaluates the same way but writes nothing: it compares each row with the one for
the same model in --out (the committed results.csv, on a fresh clone) and exits 0 only if
both hold the same models, every test error agrees within DISAGREE (0.05 points) and every
other column but the provenance's date is equal; otherwise it names each row that differs and
exits 1.
"""
import argparse
import datetime
import io
import json
import sys
from dataclasses import replace
from pathlib import Path

from gnrepro import recipe   # (no Keras: --help needs no backend)
from gnrepro import startup  # (before Keras: its start-up chatter off)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", help="where train.py wrote NAME.keras (default: models)")
    p.add_argument("--profile", choices=list(recipe.PROFILES),
                   help="a profile's runs: its folder (models/P/) and the runs it shares with "
                        "other profiles, where they keep them (default out: results/P/results.csv)")
    p.add_argument("--out", help="the CSV to write (default: results.csv, or results/P/results.csv)")
    p.add_argument("--data-dir", default=None,
                   help="CIFAR-10 folder, as for train.py (default: train.py's default)")
    p.add_argument("--check", action="store_true",
                   help="write nothing: compare the re-evaluation with --out's rows (the same "
                        "models, test error within 0.05 points, the rest equal); exit 1 if "
                        "any row differs")
    args = p.parse_args(argv)
    if args.profile and args.models_dir:
        p.error("give --profile (its folder and the runs it shares) or --models-dir, not both")
    own = recipe.profile_paths(args.profile or "default")
    args.models_dir = args.models_dir or own["models_dir"]
    args.out = args.out or own["results"]
    return args


if __name__ == "__main__":
    _ARGS = parse_args()   # before Keras starts: --help and a bad argument start no backend

with startup.quiet():
    import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import layer  # noqa: E402,F401  (registers the normalization layers for loading)
from gnrepro import cifar10  # noqa: E402
from gnrepro import runfiles  # noqa: E402
import train  # noqa: E402

COLUMNS = ["norm", "groups", "channels_per_group", "batch_size", "workers", "moving_statistics",
           "seed", "epochs", "test_error", "test_loss", "median_last5_error", "params", "model",
           "evaluated"]
PROVENANCE = ["train_images", "test_images", "profile", "data_source", "data_checksum",
              "git_commit", "date", "trained_on"]
CONFIG_KEYS = ["norm", "groups", "batch_size", "workers", "seed", "epochs"]
DISAGREE = 0.05   # percentage points: warn if the reproduced error differs more from the record's
DECIMALS = {"test_error": 2, "median_last5_error": 2,   # % (10,000 test images: 0.01 % steps)
            "test_loss": 4}                            # nats
TOLERANCE = {"test_error": DISAGREE,                   # --check: what may differ, and by how much
             "test_loss": 10.0 ** -DECIMALS["test_loss"]}


class RunError(Exception):
    """A model or its run record cannot be used; the message names the file."""


class DataError(Exception):
    """CIFAR-10 cannot be found or read: no model can be evaluated."""


def find_models(models_dir):
    """The final models models_dir/NAME.keras, sorted (not the checkpoints/ subfolder)."""
    return sorted(p for p in Path(models_dir).glob("*.keras") if p.is_file())


def shared_models(profile):
    """The models of the runs that profile P shares with other profiles, where they are: the
    final models of every other profile at P's scale whose run is one of P's study (any seed)."""
    study, scale = recipe.PROFILES[profile]
    found = []
    for other, (_, at) in recipe.PROFILES.items():
        if other == profile or at != scale:
            continue
        for path in find_models(recipe.profile_paths(other)["models_dir"]):
            try:
                run = read_record(path)["config"].get("run") or {}
                cfg = recipe.stored_config(run)   # a run of any version, as it ran
            except (RunError, TypeError, ValueError):
                continue   # not a run of this study (or unreadable: its own profile says so)
            if replace(cfg, profile=profile) in recipe.grid(profile, [cfg.seed]):
                found.append(path)
    return found


def read_record(model_path):
    """The run record NAME.json beside NAME.keras, checked for what results.csv needs."""
    path = Path(model_path).with_suffix(".json")
    if not path.is_file():
        raise RunError(f"{model_path}: no run record {path.name} beside it "
                       f"(was the run interrupted, or the file copied without it?)")
    try:
        record = json.loads(path.read_text())
        config = record["config"]
        missing = [k for k in CONFIG_KEYS if k not in config]
        errors = [float(h["test_error"]) for h in record["history"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path}: not a readable run record ({type(e).__name__}: {e})")
    if missing:
        raise RunError(f"{path}: the run record's config lacks {', '.join(missing)}")
    if record.get("status") != "finished":
        raise RunError(f"{path}: the run record's status is {record.get('status')!r}, "
                       f"not 'finished'")
    if not errors:
        raise RunError(f"{path}: the run record has no per-epoch history")
    return record


median_last5 = train.median_last5   # the paper's statistic, as the run computes it


def load_model(path):
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as e:  # Keras raises many kinds (ValueError, OSError, zipfile errors...)
        raise RunError(f"{path}: cannot load the model ({type(e).__name__}: {e})")


def records_without_models(models_dir):
    """The run records models_dir/NAME.json of finished runs whose model NAME.keras is not
    there (not kept, or not committed): results.csv can only carry their own evaluation."""
    found = []
    for path in sorted(Path(models_dir).glob("*.json")):
        if path.with_suffix(".keras").exists():
            continue
        try:
            read_record(path.with_suffix(".keras"))
        except RunError:
            continue   # not a finished run's record
        found.append(path)
    return found


def record_row(record_path):
    """results.csv's row of a run whose model is missing: its record's own final evaluation
    (the same test set, on the machine that trained it), marked evaluated=record."""
    model_path = Path(record_path).with_suffix(".keras")
    record = read_record(model_path)
    return make_row(record, model_path, record["test_loss"], record["test_error"],
                    record["params"], evaluated="record")


def say_not_evaluated(kept):
    """What this command cannot regenerate, and why, on stderr."""
    commands = []
    for path in kept:
        run = json.loads(path.read_text())["config"]
        commands.append(f"  {path.stem}: python train.py --norm {run['norm']} --batch-size "
                        f"{run['batch_size']} --workers {run['workers']} --seed {run['seed']}")
    print(f"reproduce.py: note: {len(kept)} run(s) have a run record but no saved model (the "
          f"model was not kept): their rows come from the runs' own final evaluation, marked "
          f"evaluated=record, and are not re-evaluated here. To re-evaluate them, train them "
          f"again (today's recipe; it replaces the record):\n" + "\n".join(commands),
          file=sys.stderr)


def count_params(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


class DataCache:
    """cifar10.prepare_data once per distinct (train_images, test_images) of the runs."""

    def __init__(self, data_dir):
        self.data_dir, self.cache = data_dir, {}

    def get(self, config):
        """The run's Data; raises DataError if CIFAR-10 cannot be found or read."""
        # config["run"] holds the arguments the run gave prepare_data (None = all images);
        # the top-level counts are what they resolved to.
        run = config.get("run") or config
        key = (run.get("train_images"), run.get("test_images"))
        if key not in self.cache:
            try:
                self.cache[key] = cifar10.prepare_data(self.data_dir, train_images=key[0],
                                                     test_images=key[1])
            except (OSError, ValueError) as e:
                raise DataError(f"cannot prepare the test data (--data-dir "
                                f"{self.data_dir or 'default'}): {e}") from e
        return self.cache[key]


def make_row(record, model_path, test_loss, test_error, params, evaluated="model"):
    """One row of results.csv: the required columns, then provenance; numbers rounded to
    DECIMALS (so 57.49999999999999 is written 57.5). evaluated: "model" (this script
    evaluated the saved model) or "record" (the run's own final evaluation, from its record:
    the model was not kept)."""
    config, data = record["config"], record.get("data") or {}
    row = {k: config[k] for k in CONFIG_KEYS}
    row.update(groups_of(config))
    row.update(norm=str(config["norm"]).lower(), test_error=float(test_error),
               test_loss=float(test_loss), median_last5_error=median_last5(record["history"]),
               params=int(params), model=str(model_path), evaluated=evaluated,
               moving_statistics=recipe.moving_statistics_of(config))
    row.update({k: round(row[k], d) for k, d in DECIMALS.items()})
    row.update(train_images=data.get("train_images", config.get("train_images")),
               test_images=data.get("test_images", config.get("test_images")),
               profile=config.get("profile", ""), data_source=data.get("source", ""),
               data_checksum=data.get("checksum", ""), git_commit=record.get("git_commit", ""),
               date=run_date(record, model_path), trained_on=trained_on(record))
    return row


def trained_on(record):
    """Where the run trained, from its record's segments: 'MACHINE A-B' per stretch, A and B
    the epochs done at its start and end ('unrecorded' for training from before records
    kept segments); a record without segments: its machine, else GPU or CPU."""
    segments = record.get("segments")
    if not segments:
        return record.get("machine") or ("GPU" if record.get("gpus") else "CPU")
    stretches = []   # [machine, first epoch, last epoch], consecutive ones on one machine merged
    for s in segments:
        machine = s.get("machine", "unrecorded") if s.get("recorded", True) else "unrecorded"
        if stretches and stretches[-1][0] == machine and stretches[-1][2] == s["start"][0]:
            stretches[-1][2] = s["end"][0]
        else:
            stretches.append([machine, s["start"][0], s["end"][0]])
    return "; ".join(f"{m} {a}-{b}" for m, a, b in stretches)


def groups_of(config):
    """groups and channels_per_group as the run used them: G fixed (gn; ln: 1), or C / G
    fixed (gn with channels_per_group; in: 1), the other one empty; bn keeps its config's."""
    norm, cpg = str(config["norm"]).lower(), config.get("channels_per_group")
    if norm == "ln":
        return {"groups": 1, "channels_per_group": None}
    if norm == "in":
        return {"groups": None, "channels_per_group": 1}
    if norm == "gn" and cpg:
        return {"groups": None, "channels_per_group": cpg}
    return {"groups": config["groups"], "channels_per_group": None}


def run_date(record, model_path):
    """YYYY-MM-DD the run finished (its record's finished_at, else the model file's date)."""
    finished = str(record.get("finished_at", ""))
    if len(finished) >= 10:
        return finished[:10]
    mtime = Path(model_path).stat().st_mtime
    return datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc).strftime("%Y-%m-%d")


def check_agreement(record, model_path, data, test_error, params):
    """Warn (stderr) where the reproduction and the run record disagree."""
    recorded = (record.get("data") or {}).get("checksum")
    if recorded and recorded != data.checksum:
        warn(f"{model_path}: the data's checksum {data.checksum} differs from the run "
             f"record's {recorded}: evaluated on different data than the run used")
    if "test_error" in record and abs(record["test_error"] - test_error) > DISAGREE:
        warn(f"{model_path}: test error {test_error:.2f}% differs from the run "
             f"record's {record['test_error']:.2f}%")
    if "params" in record and record["params"] != params:
        warn(f"{model_path}: {params} trainable parameters, the run record says "
             f"{record['params']}")


def evaluate_one(model_path, cache):
    """results.csv's row for one model; raises RunError naming the file if it cannot."""
    record = read_record(model_path)
    model = load_model(model_path)
    data = cache.get(record["config"])
    test_loss, test_error = train.evaluate(model, data)
    params = count_params(model)
    check_agreement(record, model_path, data, test_error, params)   # before make_row rounds
    return make_row(record, model_path, test_loss, test_error, params)


def results_table(rows):
    """The rows as results.csv's table: required columns first, sorted."""
    df = pd.DataFrame(rows, columns=COLUMNS + PROVENANCE)
    df = df.astype({"groups": "Int64", "channels_per_group": "Int64"})   # blank, not 8.0
    return df.sort_values(["norm", "batch_size", "seed", "workers", "groups", "channels_per_group"],
                          ascending=[True, False, True, True, True, True], ignore_index=True)


def write_csv(df, out):
    """Write atomically (runfiles.atomic_write)."""
    runfiles.atomic_write(out, lambda tmp: df.to_csv(tmp, index=False))


def compare(new, old):
    """What differs between a re-evaluation (new) and results.csv's table (old), one line per
    row, by model: a model in one only, a test error off by more than DISAGREE points (the
    loss by more than its rounding), or any other column but the date (a saved model's file
    time on a fresh clone) not equal."""
    new, old = (df.astype(str).set_index("model") for df in (new, old))
    problems = [f"{m}: in the re-evaluation, not in the file"
                for m in new.index.difference(old.index)]
    problems += [f"{m}: in the file, not re-evaluated" for m in old.index.difference(new.index)]
    exact = [c for c in new.columns if c not in (*TOLERANCE, "date")]
    for model in new.index.intersection(old.index):
        a, b = new.loc[model], old.loc[model]
        problems += [f"{model}: {c} {a[c]}, the file's {b[c]}" for c, bound in TOLERANCE.items()
                     if abs(float(a[c]) - float(b[c])) > bound + 1e-9]
        problems += [f"{model}: {c} {a.get(c)!r}, the file's {b.get(c)!r}"
                     for c in exact if a.get(c) != b.get(c)]
    return problems


def check(rows, out):
    """--check: 0 if the re-evaluated rows agree with the file out, else 1 (2: no such file)."""
    try:
        old = pd.read_csv(out, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        print(f"reproduce.py: error: --check: cannot read {out} ({type(e).__name__}: {e}); "
              f"run `python reproduce.py --out {out}` to write it", file=sys.stderr)
        return 2
    text = results_table(rows).to_csv(index=False)   # as write_csv would write it
    new = pd.read_csv(io.StringIO(text), keep_default_na=False)
    problems = compare(new, old)
    if problems:
        print(f"reproduce.py: --check: {len(problems)} difference(s) from {out}:\n"
              + "\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 1
    print(f"--check: all {len(new)} row(s) of {out} reproduced (test error within "
          f"{DISAGREE} points, every other column but the date equal)")
    return 0


def warn(message):
    print(f"reproduce.py: warning: {message}", file=sys.stderr)


def main(argv=None, args=None):
    args = args or parse_args(argv)
    startup.no_retracing_warning()   # one predict function per model: TensorFlow's false alarm
    paths = find_models(args.models_dir)
    if args.profile:
        paths += [p for p in shared_models(args.profile) if p not in paths]
    kept = records_without_models(args.models_dir)
    if not paths and not kept:
        where = "does not exist" if not Path(args.models_dir).is_dir() else "has no models"
        print(f"reproduce.py: {args.models_dir} {where} (NAME.keras). Train some first: "
              f"`python train.py --profile quick` (the whole grid at laptop scale) or "
              f"`python train.py --norm gn --batch-size 32 --seed 1` (one run).", file=sys.stderr)
        return 1
    rows = [record_row(path) for path in kept]
    if kept:
        say_not_evaluated(kept)
    cache, bad = DataCache(args.data_dir), []
    for i, path in enumerate(paths, 1):
        try:
            rows.append(evaluate_one(path, cache))
            print(f"[{i}/{len(paths)}] {path}: test error {rows[-1]['test_error']:.2f}%")
        except RunError as e:
            print(f"reproduce.py: error: {e}", file=sys.stderr)
            bad.append(path)
        except DataError as e:
            print(f"reproduce.py: error: {e}\nnothing written", file=sys.stderr)
            return 2
        keras.backend.clear_session()   # free each model's graph before the next
    if args.check:
        code = check(rows, args.out)
        return 1 if bad and code == 0 else code
    if rows:
        write_csv(results_table(rows), args.out)
        print(f"wrote {args.out}: {len(rows) - len(kept)} model(s) evaluated"
              + (f", {len(kept)} run(s) from their records (evaluated=record)" if kept else ""))
    if bad:
        print(f"reproduce.py: {len(bad)} of {len(paths)} model(s) could not be evaluated "
              f"(not in {args.out}):\n" + "\n".join(f"  {p}" for p in bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(args=_ARGS))
