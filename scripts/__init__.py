"""
The commands, each run from the repository root as `python -m scripts.NAME` (no install step):
evaluate, generate, experiments, prepare, harness, bench, bench_sampler. This file makes
`scripts` a regular package, so that no installed package of the same name can shadow it.
"""
