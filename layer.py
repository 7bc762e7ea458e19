"""The normalization layers of the reproduction, for Keras 3: GroupNormalization (Wu & He,
ECCV 2018, eq. 1-2 and Figure 3) and WorkerBatchNormalization (the paper's BatchNorm on W
workers that each normalize their own N images).

    from layer import GroupNormalization
    x = GroupNormalization(groups=8)(x)          # NHWC feature maps, 8 groups
    x = GroupNormalization(groups=8, axis=1)(x)  # channels-first
    x = GroupNormalization(groups=1)(x)          # LayerNorm over (H, W, C)
    x = GroupNormalization(groups=-1)(x)         # InstanceNorm: one channel per group
    x = WorkerBatchNormalization(workers=8)(x)   # BN statistics per eighth of the batch
                                                 # (moving averages: the first eighth's)
    gn_model = replace_batchnorm(bn_model, groups=32)   # a copy, GroupNorm in each BN's place

Written with `keras.ops` only, so it runs under the TensorFlow, JAX and PyTorch
backends. For each sample and each group of C/G channels it takes the mean and the
biased variance over the spatial axes and the group's channels, then
`y = gamma * (x - mean) / sqrt(var + epsilon) + beta` with gamma, beta per channel.
`groups=-1` is instance norm (one channel per group), `groups=1` is layer norm.

Numerics: statistics in float32 (float64 for float64 inputs) whatever the compute
dtype, output in the compute dtype; a corrected two-pass mean and variance, and the
mean subtracted before scaling, so a large common offset does not cancel. The
backward pass is written out (ops.custom_gradient). Registered as
`groupnorm>GroupNormalization`: a saved `.keras` model loads after `import layer`.
Run `python bench.py layer` for its speed against Keras' GroupNorm and BatchNorm.
"""
import math

import keras
import numpy as np
from keras import constraints, initializers, ops, regularizers


def _check_groups(groups):
    # bool is an int subclass; groups=True is a typo, not "one group".
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise ValueError(f"groups must be an int (or -1 for instance norm), "
                         f"got groups={groups!r} of type {type(groups).__name__}")
    if groups == 0 or groups < -1:
        raise ValueError(f"groups must be a positive int or -1 (one group per channel), "
                         f"got groups={groups}")


def _resolve_groups(groups, channels):
    """The number of groups for `channels` channels, or a ValueError naming both."""
    if groups == -1:
        return channels
    if groups > channels:
        raise ValueError(f"groups={groups} is more than the {channels} channels "
                         f"of the input: use at most {channels} groups")
    if channels % groups:
        raise ValueError(f"groups={groups} does not divide the {channels} channels "
                         f"of the input: choose a divisor of {channels}")
    return groups


def _resolve_axis(axis, shape):
    """The non-negative channel axis of an input of this shape, or a ValueError."""
    rank = len(shape)
    if not -rank <= axis < rank:
        raise ValueError(f"axis={axis} is out of range for an input of rank {rank} "
                         f"(shape {tuple(shape)}): use 1..{rank - 1} or -1..-{rank - 1}")
    axis %= rank
    if axis == 0:
        raise ValueError(f"axis={axis} is the batch axis of the input of shape "
                         f"{tuple(shape)}: GroupNorm normalizes each sample on its own")
    if shape[axis] is None:
        raise ValueError(f"axis={axis} of the input of shape {tuple(shape)} has an "
                         f"undefined channel count (None): the layer needs it to make "
                         f"gamma and beta")
    return axis


def _view_plan(input_shape, axis):
    """How the statistics see an input: which axes they keep and reduce.

    The input is viewed as (N, P, C, Q), P the product of the axes before the
    channels and Q of those after, with P or Q left out where it is 1 (so NHWC
    becomes (N, H*W, C)). Statistics are taken per channel over P and Q first, then
    averaged over the channels of each group on the small (N, C) result: BatchNorm's
    reduction pattern, several times faster on a CPU than reducing a
    (N, H*W, G, C/G) view over axes (1, 3).

    Returns (keep P, keep Q), the axes to reduce, and the per-channel shape
    (without N) that statistics, gamma and beta broadcast in.
    """
    keep = tuple(not all(d == 1 for d in dims)  # None (unknown) is not 1
                 for dims in (input_shape[1:axis], input_shape[axis + 1:]))
    channel = 1 + keep[0]
    view_rank = channel + 1 + keep[1]
    reduce = tuple(i for i in range(1, view_rank) if i != channel)
    per_channel = tuple(input_shape[axis] if i == channel else 1 for i in range(1, view_rank))
    return keep, reduce, per_channel


def _group_norm(averaging, reduce, per_channel, epsilon):
    """GroupNorm of a (N, [P,] C, [Q]) view as f(x, gamma, beta), with its gradient.

    Statistics are per channel over the `reduce` axes, then `averaging` (the (C, C)
    block matrix of 1/(C/G)s) averages them over each group and repeats the result
    to the group's channels: one small matrix product instead of reshape-mean-repeat.
    """
    def per_channel_sum(t):  # (N, C)
        return ops.sum(t, axis=reduce) if reduce else t  # rank 2: nothing to reduce

    def spread(t):  # (N, C) -> broadcastable against the view
        return ops.reshape(t, (-1, *per_channel))

    def by_group(t, to_mean):  # (N, C) sums -> (N, C), each channel its group's mean
        # einsum, not matmul: Keras' torch matmul returns float32 for float64 inputs.
        return ops.einsum("nc,cd->nd", t, to_mean)

    @ops.custom_gradient
    def norm(x, gamma, beta):
        # Sums times averaging / count, not ops.mean: Keras' torch mean runs float64
        # in float32; and one matrix makes a group mean of per-channel sums.
        count = ops.cast(math.prod(ops.shape(x)[i] for i in reduce), x.dtype)  # per channel
        to_mean = averaging / count

        def group_mean(t):  # (N, C): per sample, the mean of t over each channel's group
            return by_group(per_channel_sum(t), to_mean)

        # Centre on the float32 mean, then correct: x - mean is exact near the mean,
        # so mean(centred) recovers the mean's rounding error (6e-4 std at a mean of
        # 1e4, std 1), and the variance is the corrected two-pass E[c^2] - E[c]^2
        # with E[c] tiny; never E[x^2] - E[x]^2, which cancels at a large mean.
        centred = x - spread(group_mean(x))
        shift = group_mean(centred)
        # relu clips rounding below 0 (ops.maximum(v, 0.0) is float32 under torch).
        variance = ops.relu(group_mean(ops.square(centred)) - ops.square(shift))
        inv_std = ops.rsqrt(variance + epsilon)
        factor = inv_std * gamma
        # (x - mean) * factor + beta as centred * factor + (beta - shift * factor):
        # the big tensor is scaled once and no large terms cancel, unlike
        # x * factor + (beta - mean * factor) at a large mean.
        y = centred * spread(factor) + spread(beta - shift * factor)

        def grad(*args, upstream=None):
            # The textbook GroupNorm backward, written out because autodiff of the
            # forward makes more passes over the big tensor (20% slower in
            # `bench.py layer` on a CPU; second derivatives are not supported):
            # dx = inv_std * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma,
            # means over each sample's group, xhat = (centred - shift) * inv_std.
            dy = args[0] if upstream is None else upstream  # torch passes upstream=
            sum_dy = per_channel_sum(dy)
            sum_dy_xhat = (per_channel_sum(dy * centred) - shift * sum_dy) * inv_std
            mean_g = by_group(sum_dy * gamma, to_mean)
            k = by_group(sum_dy_xhat * gamma, to_mean) * ops.square(inv_std)
            dx = dy * spread(factor) - (centred * spread(k) + spread(inv_std * mean_g - shift * k))
            return dx, ops.sum(sum_dy_xhat, axis=0), ops.sum(sum_dy, axis=0)
        return y, grad
    return norm


@keras.saving.register_keras_serializable(package="groupnorm")
class GroupNormalization(keras.layers.Layer):
    """Group normalization over `groups` groups of channels along `axis`.

    Args:
        groups: number of groups G; must divide the channel count C. -1 means C
            groups (instance norm), 1 is layer norm. Default 32 (the paper's).
        axis: the channel axis, -1 (channels-last) or 1 (channels-first); not 0.
        epsilon: added to the variance; 1e-5 as in the paper and torch.nn.GroupNorm.
        center, scale: learn beta (shift) and gamma (scale), one per channel.
        beta_*/gamma_*: initializers, regularizers and constraints of the weights.
    """

    def __init__(self, groups=32, axis=-1, epsilon=1e-5, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None,
                 beta_constraint=None, gamma_constraint=None, **kwargs):
        _check_groups(groups)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"axis must be an int (the channel axis), got axis={axis!r}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be positive (it keeps a constant input "
                             f"finite), got epsilon={epsilon}")
        super().__init__(**kwargs)
        # Under mixed precision, keep float32 inputs float32: a float16 cast would
        # turn inputs above 65504 into inf before the statistics see them.
        self.autocast = False
        self.supports_masking = True
        self.groups, self.axis, self.epsilon = groups, axis, float(epsilon)
        self.center, self.scale = center, scale
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)

    def build(self, input_shape):
        self._axis = _resolve_axis(self.axis, input_shape)
        channels = input_shape[self._axis]
        self._groups = _resolve_groups(self.groups, channels)
        size = channels // self._groups
        self._averaging = np.kron(np.eye(self._groups), np.full((size, size), 1 / size))
        self._keep, self._reduce, self._per_channel = _view_plan(input_shape, self._axis)
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape),
                                                 axes={self._axis: channels})
        self.gamma = self.beta = None
        if self.scale:
            self.gamma = self.add_weight(
                shape=(channels,), name="gamma", initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer, constraint=self.gamma_constraint,
                autocast=False)
        if self.center:
            self.beta = self.add_weight(
                shape=(channels,), name="beta", initializer=self.beta_initializer,
                regularizer=self.beta_regularizer, constraint=self.beta_constraint,
                autocast=False)

    def call(self, inputs):
        shape, a = ops.shape(inputs), self._axis
        view = [-1, math.prod(shape[1:a]), shape[a], math.prod(shape[a + 1:])]
        view = [d for d, k in zip(view, (True, self._keep[0], True, self._keep[1])) if k]
        # Statistics in float32 (float64 stays float64): float16 overflows in x**2.
        float64 = keras.backend.standardize_dtype(inputs.dtype) == "float64"
        dtype = "float64" if float64 else "float32"
        x = ops.reshape(ops.cast(inputs, dtype), view)
        channels = inputs.shape[a]
        gamma = ops.cast(self.gamma, dtype) if self.scale else ops.ones((channels,), dtype)
        beta = ops.cast(self.beta, dtype) if self.center else ops.zeros((channels,), dtype)
        norm = _group_norm(ops.convert_to_tensor(self._averaging, dtype), self._reduce,
                           self._per_channel, self.epsilon)
        return ops.cast(ops.reshape(norm(x, gamma, beta), shape), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(),
                "groups": self.groups, "axis": self.axis, "epsilon": self.epsilon,
                "center": self.center, "scale": self.scale,
                "beta_initializer": initializers.serialize(self.beta_initializer),
                "gamma_initializer": initializers.serialize(self.gamma_initializer),
                "beta_regularizer": regularizers.serialize(self.beta_regularizer),
                "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
                "beta_constraint": constraints.serialize(self.beta_constraint),
                "gamma_constraint": constraints.serialize(self.gamma_constraint)}


MOVING_STATISTICS = ("first", "mean")   # WorkerBatchNormalization's rules, the default first


# Registered as train>WorkerBatchNormalization, the name that models saved when it lived in
# train.py carry, so that they still load.
@keras.saving.register_keras_serializable(package="train")
class WorkerBatchNormalization(keras.layers.BatchNormalization):
    """BatchNorm as on `workers` workers that do not synchronize their statistics (the paper's
    BN: each of its 8 GPUs normalizes its own N images).

    Training: the batch is cut into `workers` equal consecutive slices, each normalized with
    its own mean and variance. The moving mean and variance (inference's statistics) are
    updated with `momentum` from the (biased, as Keras' BN) statistics of
    - moving_statistics="first" (the default): the first worker's slice alone, as the paper's
      code keeps them (tensorpack registers BN's moving averages in the first training
      tower only) and as unsynchronized multi-GPU BN does (each GPU its own average,
      evaluation one of them): an update sees N images;
    - moving_statistics="mean": the mean over the slices of the per-slice statistics, the
      average of what the workers' own moving averages would be (W * N images an update,
      less noisy by about sqrt(W); this layer's rule before it had a choice).
    On K devices (MirroredStrategy), each holding W / K slices: "first" keeps the first
    replica's update (its first slice is the batch's first), "mean" the mean of the K
    replicas' updates, which is the same update as on one device. Inference:
    BatchNormalization with the moving statistics, whatever the rule.
    """

    def __init__(self, workers, moving_statistics="first", **kwargs):
        if kwargs.get("axis", -1) != -1:
            raise ValueError(f"WorkerBatchNormalization normalizes the last axis (channels last), "
                             f"got axis={kwargs['axis']!r}")
        if moving_statistics not in MOVING_STATISTICS:
            raise ValueError(f"moving_statistics should be one of {MOVING_STATISTICS} (the first "
                             f"worker's statistics, or their mean over the workers), got "
                             f"{moving_statistics!r}")
        super().__init__(**kwargs)
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers should be a positive integer (1 = BatchNorm over the "
                             f"whole batch), got {workers!r}")
        self.workers, self.moving_statistics = workers, moving_statistics

    def add_weight(self, *args, **kwargs):
        # Keras' BN leaves aggregation "none": under MirroredStrategy the moving statistics
        # would then keep one replica's update and drop the others'; say which to keep.
        if not kwargs.get("trainable", True):
            kwargs["aggregation"] = ("only_first_replica" if self.moving_statistics == "first"
                                     else "mean")
        return super().add_weight(*args, **kwargs)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or self.workers == 1:
            return super().call(inputs, training=training, mask=mask)
        if mask is not None:
            raise ValueError(f"{self.name}: masks are not supported with several workers")
        batch = inputs.shape[0]
        if batch is not None and batch % self.workers:
            raise ValueError(f"{self.name}: a training batch of {batch} images cannot be cut "
                             f"into {self.workers} equal worker slices")
        ops = keras.ops
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))   # as Keras' BN
        slices = ops.reshape(x, (self.workers, -1, *x.shape[1:]))   # (W, N, H, W, C)
        axes = list(range(1, len(slices.shape) - 1))
        mean, variance = ops.moments(slices, axes=axes, keepdims=True)
        # ops.batch_normalization's own formula, written out: on JAX and PyTorch it reshapes
        # the statistics to the channel axis, and these are (W, 1, 1, 1, C).
        inv = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            inv = inv * ops.cast(self.gamma, x.dtype)
        shift = -mean * inv
        if self.center:
            shift = shift + ops.cast(self.beta, x.dtype)
        y = slices * inv + shift
        for moving, stat in ((self.moving_mean, mean), (self.moving_variance, variance)):
            stat = ops.reshape(stat, (self.workers, -1))
            stat = stat[0] if self.moving_statistics == "first" else ops.mean(stat, axis=0)
            moving.assign(moving * self.momentum + stat * (1.0 - self.momentum))
        return ops.cast(ops.reshape(y, ops.shape(x)), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "workers": self.workers,
                "moving_statistics": self.moving_statistics}


FALLBACKS = (None, "largest-divisor")   # replace_batchnorm's rules where groups does not divide


def _groups_for(bn, channels, groups, fallback):
    """The groups of the GroupNorm that replaces `bn` (`channels` channels), or a ValueError."""
    if groups == -1 or channels % groups == 0:
        return groups
    largest = max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)
    if fallback is None:
        raise ValueError(f"groups={groups} does not divide the {channels} channels of layer "
                         f"'{bn.name}': pass groups that divide every BatchNormalization's "
                         f"channels, or fallback='largest-divisor' (this layer would get "
                         f"{largest} groups)")
    return largest


def _group_norm_like(bn, groups, fallback):
    """A GroupNormalization in place of the built BatchNormalization `bn`, with its gamma and
    beta (values and trainability), axis, epsilon, name and dtype policy."""
    config = bn.get_config()
    channels = bn.moving_mean.shape[0]   # BN always has it; gamma and beta are optional
    keep = ("axis", "epsilon", "center", "scale", "trainable") + tuple(
        f"{w}_{part}" for w in ("beta", "gamma")
        for part in ("initializer", "regularizer", "constraint"))
    # Unbuilt: clone_model builds it on the BN's input, then _copy_weights sets the values.
    return GroupNormalization(groups=_groups_for(bn, channels, groups, fallback),
                              name=bn.name, dtype=bn.dtype_policy,
                              **{k: config[k] for k in keep})


def _copy_weights(old, new):
    """Copies old's weights into its clone `new`; a BN into its GroupNorm: gamma and beta."""
    if isinstance(old, keras.layers.BatchNormalization):
        for name in ("gamma", "beta"):
            if getattr(old, name) is not None:
                getattr(new, name).assign(getattr(old, name))
    else:
        new.set_weights(old.get_weights())


def _call(layer, *args, **kwargs):
    """A clone's call in a Functional model: the BN's recorded call passes mask=, which
    GroupNormalization.call does not take (the mask still passes through it)."""
    if isinstance(layer, GroupNormalization):
        kwargs.pop("mask", None)
    return layer(*args, **kwargs)


def _inputs_like(model):
    """New inputs for a clone of the Functional `model`, named as its input layers:
    clone_model's own take the names of the input tensors ('keras_tensor_3')."""
    names = {id(each.output): each.name for each in model.layers
             if isinstance(each, keras.layers.InputLayer)}
    return keras.tree.map_structure(
        lambda x: keras.Input(batch_shape=x.shape, dtype=x.dtype, name=names.get(id(x), x.name)),
        model.input)


def _check_graph_model(model, what):
    """A ValueError unless `model` is a Functional (a keras.Function) or Sequential model,
    the kinds whose layers clone_model can see."""
    if not isinstance(model, keras.Model) or not isinstance(model, (keras.Sequential,
                                                                    keras.Function)):
        raise ValueError(f"{what} should be a Functional or Sequential keras.Model (their "
                         f"layers can be replaced), got {type(model).__name__}: a subclassed "
                         f"model has to swap its BatchNormalization layers in its own code")


def replace_batchnorm(model, groups=32, fallback=None):
    """A new model: `model` with each BatchNormalization layer replaced by GroupNormalization.

        import keras, layer
        gn_model = layer.replace_batchnorm(keras.applications.ResNet50(weights=None), groups=32)

    `model` is a built Functional or Sequential keras.Model; models used as layers inside it
    are converted too (a subclassed model, at any depth, raises a ValueError). Every
    keras.layers.BatchNormalization, subclasses included, is replaced: this repo's
    WorkerBatchNormalization too (GroupNorm does not depend on the batch, so its workers have
    nothing to split). Each GroupNorm keeps its BN's axis, epsilon (Keras' BN default is
    1e-3, not the paper's 1e-5), name, dtype policy, center/scale, gamma and beta (values,
    initializers, regularizers, constraints) and `trainable` (False freezes gamma and beta;
    there are no moving statistics left to use, and the BN's are dropped). Every other layer
    is a copy (keras.models.clone_model) with the old weights; the old model is untouched.

    groups: G for every layer, as GroupNormalization's (-1: one channel per group).
    fallback: where G does not divide a layer's channels C: None (the default) raises a
        ValueError naming the layer and C; "largest-divisor" gives that layer the largest
        divisor of C that is at most G (48 channels, G = 32: 24 groups).
    """
    _check_groups(groups)
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback should be one of {FALLBACKS} (raise, or the largest "
                         f"divisor of the channels up to groups), got fallback={fallback!r}")
    _check_graph_model(model, "model")
    if not model.built:
        raise ValueError(f"model '{model.name}' is not built (its weights do not exist yet): "
                         f"give it an Input or call it on a batch first")
    clones = {}   # id(old layer) -> (old, new), shared by the nested models' clones

    def clone(layer):
        if id(layer) not in clones:
            if isinstance(layer, keras.Model):
                _check_graph_model(layer, f"layer '{layer.name}'")
                # Sequential models take no call_function (their layers are not called).
                graph = {} if isinstance(layer, keras.Sequential) else {
                    "call_function": _call, "input_tensors": _inputs_like(layer)}
                new = keras.models.clone_model(layer, clone_function=clone, **graph)
                # clone_model makes Functional models trainable whatever the old one was.
                if not layer.trainable:
                    new.trainable = False
            elif isinstance(layer, keras.layers.BatchNormalization):
                new = _group_norm_like(layer, groups, fallback)
            else:
                new = layer.__class__.from_config(layer.get_config())
            clones[id(layer)] = (layer, new)
        return clones[id(layer)][1]

    new_model = clone(model)
    for old, new in clones.values():
        if not isinstance(old, keras.Model):
            _copy_weights(old, new)
    return new_model
