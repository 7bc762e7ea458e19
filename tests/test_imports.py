"""What users import is free of side effects: `import layer` and `from train import
build_resnet20, build_resnet`, in a fresh interpreter, change no environment variable,
install no signal handler, start no thread, and load none of the run's machinery (data,
checkpoints, signals, the loops, the sweep, the start-up silencer): only Keras, NumPy, the
layer, the recipe and what the builder needs (gnrepro.backends). Saved models keep loading:
the layers' registered names are the ones older models carry."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, user_env

PROBE = """
import json, os, signal, sys, threading
sys.path.insert(0, sys.argv[1])
def state():
    return {"env": dict(os.environ),
            "signals": {s.name: repr(signal.getsignal(s))
                        for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)},
            "threads": threading.active_count(),
            "modules": sorted(m for m in sys.modules
                              if m in ("layer", "train", "reproduce", "plot", "bench")
                              or m.split(".")[0] == "gnrepro")}
import keras, numpy   # what the two imports may load: Keras and NumPy themselves
before = state()
exec(sys.argv[2])
after = state()
print(json.dumps({"before": before, "after": after}))
"""

IMPORTS = {"the layer": "import layer",
           "the builder": "from train import build_resnet20, build_resnet"}   # (imports layer)


@pytest.mark.parametrize("what", IMPORTS)
def test_importing_the_layer_and_the_builder_changes_nothing(what):
    result = subprocess.run([sys.executable, "-c", PROBE, str(REPO), IMPORTS[what]],
                            env=user_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.splitlines()[-1])
    before, after = seen["before"], seen["after"]
    assert after["env"] == before["env"], {k: after["env"].get(k) for k in
                                           set(after["env"]) ^ set(before["env"])}
    assert after["signals"] == before["signals"]
    assert after["threads"] == before["threads"] == 1
    allowed = {"layer", "train", "gnrepro", "gnrepro.recipe", "gnrepro.backends"}
    assert set(after["modules"]) <= allowed, sorted(set(after["modules"]) - allowed)
    if "train" in IMPORTS[what]:
        assert {"train", "gnrepro.recipe"} <= set(after["modules"])


def test_the_registered_names_are_those_saved_models_carry():
    import keras
    import layer
    assert keras.saving.get_registered_name(layer.GroupNormalization) == \
        "groupnorm>GroupNormalization"
    assert keras.saving.get_registered_name(layer.WorkerBatchNormalization) == \
        "train>WorkerBatchNormalization"


def test_the_recipe_names_the_layers_rules():
    """recipe.py (no Keras) spells BN's moving-statistics rules as layer.py does."""
    import layer
    from gnrepro import recipe
    assert recipe.MOVING_STATISTICS == layer.MOVING_STATISTICS
