"""What the top-level scripts (train.py, reproduce.py, plot.py, bench.py) stand on.

    recipe     the recipe, the grids of the studies, Config, the command line (no Keras)
    signals    stopping a run or a sweep cleanly on SIGUSR1/SIGTERM/SIGINT
    startup    the libraries' start-up lines silenced
    cifar10    finding, downloading, reading and feeding CIFAR-10 (python -m gnrepro.cifar10)
    runfiles   a run's files: paths, atomic writes, checkpoints, locks, provenance
    backends   what differs between TensorFlow, JAX and PyTorch; JAX's fused training loop
    loops      one epoch of training: through model.fit, or through JAX's scan loop
    sweep      the local runner of a profile's grid (python train.py --profile P)

Importing the package imports none of them.
"""
