"""Tests of layer.replace_batchnorm: BatchNorm -> GroupNorm in any Functional or Sequential model.

    python -m pytest -q tests/test_convert.py                       # TensorFlow
    KERAS_BACKEND=jax python -m pytest -q tests/test_convert.py     # JAX

Oracle: the same model built by hand with GroupNormalization and given the same weights
(drawn here, not read from the converted model). No tensorflow import: the JAX run happens in
a venv without it.
"""
import keras
import numpy as np
import pytest

import layer  # noqa: F401  registers the layers, so a saved model loads
from layer import GroupNormalization, WorkerBatchNormalization, replace_batchnorm

GROUPS = 4
SHAPE = (8, 8, 3)   # one image


def bn(name, **kwargs):
    return keras.layers.BatchNormalization(name=name, **kwargs)


def gn(name, epsilon=1e-3, **kwargs):   # 1e-3: Keras' BN default, which the conversion keeps
    return GroupNormalization(groups=GROUPS, name=name, epsilon=epsilon, **kwargs)


def block(norm, name, width, **norm_kwargs):
    """Conv -> norm -> ReLU, as a list of layers."""
    return [keras.layers.Conv2D(width, 3, padding="same", name=f"{name}_conv"),
            norm(f"{name}_norm", **norm_kwargs), keras.layers.ReLU(name=f"{name}_relu")]


def chain(layers, x):
    for each in layers:
        x = each(x)
    return x


def build(kind, norm):
    """A small CNN with the normalization `norm` (bn or gn), as a Functional or Sequential
    model, or nested: a Functional and a Sequential model used as layers of a Functional one.
    The same names whatever the norm. The second block has no beta and its own epsilon."""
    head = [keras.layers.GlobalAveragePooling2D(name="pool"), keras.layers.Dense(3, name="dense")]
    if kind == "sequential":
        return keras.Sequential([keras.Input(SHAPE), *block(norm, "a", 8),
                                 *block(norm, "b", 16, center=False, epsilon=1e-4), *head],
                                name="seq")
    inputs = keras.Input(SHAPE)
    if kind == "functional":
        x = chain(block(norm, "a", 8), inputs)
        x = chain(block(norm, "b", 16, center=False, epsilon=1e-4), x)
        return keras.Model(inputs, chain(head, x), name="func")
    inner_in = keras.Input(SHAPE)
    inner = keras.Model(inner_in, chain(block(norm, "a", 8), inner_in), name="inner")
    inner_seq = keras.Sequential([keras.Input((8, 8, 8)),
                                  *block(norm, "b", 16, center=False, epsilon=1e-4)],
                                 name="inner_seq")
    x = norm("top_norm")(inner_seq(inner(inputs)))
    return keras.Model(inputs, chain(head, x), name="outer")


def walk(model):
    """Every layer of the model and of the models inside it, depth first."""
    for each in model.layers:
        yield each
        if isinstance(each, keras.Model):
            yield from walk(each)


def count(model, cls):
    return sum(isinstance(each, cls) for each in walk(model))


def random_weights(model, seed=0):
    """{(layer name, weight name): random array} for every weight; variances positive."""
    rng = np.random.default_rng(seed)
    return {(each.name, w.name): (np.abs(rng.normal(size=w.shape)) + 0.5
                                  if w.name == "moving_variance" else rng.normal(size=w.shape))
            for each in walk(model) for w in each.weights}


def set_weights(model, values):
    for each in walk(model):
        for w in each.weights:
            w.assign(values[(each.name, w.name)].astype("float32"))


def images(n=4, seed=1):
    return np.random.default_rng(seed).normal(size=(n, *SHAPE)).astype("float32")


def numpy(t):
    return np.asarray(keras.ops.convert_to_numpy(t))


@pytest.mark.parametrize("kind", ["functional", "sequential", "nested"])
def test_converted_model_is_the_hand_built_groupnorm_model(kind):
    old, hand = build(kind, bn), build(kind, gn)
    values = random_weights(old)
    set_weights(old, values)
    set_weights(hand, values)   # the same arrays, less the moving statistics
    x = images()
    before = numpy(old(x, training=False))
    new = replace_batchnorm(old, groups=GROUPS)
    assert type(new) is type(old) and new.name == old.name
    assert [e.name for e in walk(new)] == [e.name for e in walk(old)]   # inputs' too
    assert [type(e) for e in walk(new)] == [type(e) for e in walk(hand)]
    norms = 3 if kind == "nested" else 2
    assert count(old, keras.layers.BatchNormalization) == count(new, GroupNormalization) == norms
    assert count(new, keras.layers.BatchNormalization) == 0
    np.testing.assert_allclose(numpy(new(x)), numpy(hand(x)), rtol=1e-6, atol=1e-6)
    assert not np.allclose(numpy(new(x)), before, atol=1e-2), "GN is not BN"
    np.testing.assert_array_equal(numpy(old(x, training=False)), before)   # old untouched
    new_weights = {id(w) for w in new.weights}
    assert not any(id(w) in new_weights for w in old.weights), "copies, not shared"


def test_kept_axis_epsilon_trainability_and_regularizers():
    inputs = keras.Input((6, 8))
    x = bn("first", axis=1, epsilon=1e-4, gamma_regularizer="l2")(inputs)
    x = bn("frozen", center=False, trainable=False)(x)
    x = bn("no_gamma", scale=False, beta_constraint="non_neg")(x)
    x = WorkerBatchNormalization(workers=2, name="worker")(x)
    new = replace_batchnorm(keras.Model(inputs, x), groups=2)
    configs = {e.name: e.get_config() for e in new.layers if isinstance(e, GroupNormalization)}
    assert len(configs) == 4 and count(new, keras.layers.BatchNormalization) == 0
    want = {"first": (2, 1, 1e-4, True, True, True), "frozen": (2, -1, 1e-3, False, True, False),
            "no_gamma": (2, -1, 1e-3, True, False, True), "worker": (2, -1, 1e-3, True, True, True)}
    got = {name: tuple(c[k] for k in ("groups", "axis", "epsilon", "center", "scale", "trainable"))
           for name, c in configs.items()}
    assert got == want
    assert configs["first"]["gamma_regularizer"]["class_name"] == "L2"
    assert configs["no_gamma"]["beta_constraint"]["class_name"] == "NonNeg"
    frozen = new.get_layer("frozen")
    assert frozen.beta is None and frozen.gamma is not None
    trainable = {id(w) for w in new.trainable_weights}
    assert id(frozen.gamma) not in trainable and id(new.get_layer("first").gamma) in trainable


def test_a_frozen_nested_model_stays_frozen():
    old = build("nested", bn)
    old.get_layer("inner").trainable = False
    new = replace_batchnorm(old, groups=GROUPS)
    inner = new.get_layer("inner")
    assert not inner.trainable and new.get_layer("inner_seq").trainable
    assert not inner.get_layer("a_norm").trainable   # as the frozen BN it replaced
    # inner_seq's conv 2 and GN 1 (no beta), top_norm 2, dense 2:
    assert len(new.trainable_weights) == len(old.trainable_weights) == 7
    trainable = {id(w) for w in new.trainable_weights}
    assert not any(id(w) in trainable for w in inner.weights)


def test_a_shared_batchnorm_becomes_one_shared_groupnorm():
    inputs = keras.Input((4, 4, 8))
    shared = bn("shared")
    x = keras.layers.Add(name="add")([shared(inputs), shared(keras.layers.ReLU()(inputs))])
    new = replace_batchnorm(keras.Model(inputs, x), groups=GROUPS)
    norm = new.get_layer("shared")
    assert isinstance(norm, GroupNormalization) and len(norm._inbound_nodes) == 2
    assert count(new, GroupNormalization) == 1 and len(new.weights) == 2


def test_trains_one_step_saves_and_loads(tmp_path):
    keras.utils.set_random_seed(3)
    new = replace_batchnorm(build("nested", bn), groups=GROUPS)
    new.compile(keras.optimizers.SGD(0.1),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    gamma = numpy(new.get_layer("inner").get_layer("a_norm").gamma)
    x, y = images(8), np.arange(8) % 3
    loss = new.train_on_batch(x, y)
    assert np.isfinite(loss)
    assert not np.allclose(numpy(new.get_layer("inner").get_layer("a_norm").gamma), gamma)
    new.save(tmp_path / "gn.keras")
    loaded = keras.models.load_model(tmp_path / "gn.keras")
    assert count(loaded, GroupNormalization) == 3
    np.testing.assert_array_equal(numpy(loaded(x)), numpy(new(x)))


def test_resnet50_every_batchnorm_replaced():
    old = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
    batchnorms = count(old, keras.layers.BatchNormalization)
    assert batchnorms == 53   # stem 1 + 16 blocks x 3 + 4 shortcut projections
    new = replace_batchnorm(old, groups=32)
    assert count(new, GroupNormalization) == batchnorms
    assert count(new, keras.layers.BatchNormalization) == 0
    assert len(new.layers) == len(old.layers)
    # 2 moving statistics of C channels dropped per BN, all else kept.
    dropped = sum(2 * e.moving_mean.shape[0] for e in walk(old)
                  if isinstance(e, keras.layers.BatchNormalization))
    assert new.count_params() == old.count_params() - dropped
    x = np.random.default_rng(5).normal(size=(2, 32, 32, 3)).astype("float32")
    assert new.predict(x, verbose=0).shape == (2, 10)


def width_48():
    inputs = keras.Input((4, 4, 48))
    return keras.Model(inputs, bn("n48")(inputs))


def test_groups_that_do_not_divide_the_channels_raise_or_fall_back():
    with pytest.raises(ValueError, match=r"groups=32 does not divide the 48 channels of layer "
                                         r"'n48'.*fallback='largest-divisor' \(this layer would "
                                         r"get 24 groups\)"):
        replace_batchnorm(width_48(), groups=32)
    new = replace_batchnorm(width_48(), groups=32, fallback="largest-divisor")
    assert new.get_layer("n48").get_config()["groups"] == 24
    assert replace_batchnorm(width_48(), groups=-1).get_layer("n48").get_config()["groups"] == -1


class Sub(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = bn("n")

    def call(self, x):
        return self.norm(x)


def subclassed():
    """A subclassed model with a BN, alone (built) and inside a Functional model."""
    alone, inputs = Sub(), keras.Input((4, 4, 8))
    alone(np.ones((1, 4, 4, 8), "float32"))
    return alone, keras.Model(inputs, Sub(name="sub")(inputs))


@pytest.mark.parametrize("make, kwargs, message", [
    (width_48, {"groups": 0}, r"groups must be a positive int or -1"),
    (width_48, {"groups": True}, r"groups must be an int"),
    (width_48, {"fallback": "nearest"}, r"fallback should be one of .*got fallback='nearest'"),
    (lambda: bn("alone"), {}, r"model should be a Functional or Sequential keras.Model .*got "
                              r"BatchNormalization"),
    (lambda: subclassed()[0], {}, r"model should be .* got Sub: a subclassed model"),
    (lambda: subclassed()[1], {}, r"layer 'sub' should be .* got Sub: a subclassed model"),
    (lambda: keras.Sequential([keras.layers.Dense(2), bn("n")], name="unbuilt"), {},
     r"model 'unbuilt' is not built"),
])
def test_errors(make, kwargs, message):
    with pytest.raises(ValueError, match=message):
        replace_batchnorm(make(), **kwargs)
