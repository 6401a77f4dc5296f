"""annlib's algorithm module for ann-benchmarks (copy this folder to ann_benchmarks/algorithms/annlib/).

``module.py`` holds the constructors the harness names in ``config.yml``; ``Dockerfile`` builds
the image the harness runs them in; README.md says how. Nothing is imported here, so the harness
can import the package before annlib is installed and report what is missing.
"""
