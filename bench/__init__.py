"""Benchmarks in the ann-benchmarks manner: recall/QPS sweeps, baselines, Pareto tables, plots.

Run from the command line as ``annlib-bench`` (see :mod:`annlib.bench.cli`), or from Python::

    from annlib.bench.runner import Settings, Workload, run_benchmark
    from annlib.datasets import load

    work = Workload.from_dataset(load("sift-128-euclidean-10k"), k=10)
    result = run_benchmark(["bruteforce", "hnswlib"], work, Settings(threads=1))

Modules: ``measures`` (recall@k, timing), ``adapters`` (one per algorithm), ``grids`` (parameter
grids and ``--config`` files), ``runner`` (the sweep), ``pareto`` (frontiers, QPS at recall),
``flops`` (exact search vs. a plain matmul), ``plot``, ``report`` (JSON and tables),
``environment`` (versions, BLAS kernel, thread limits), ``cli``.
"""
