"""Hand-run benchmarks, not part of the test suite (pytest's testpaths is tests/).

    uv run python -m bench --scale cifar|food101n|1m   stage speed and memory against limits
                                                       measured in the same run; writes
                                                       bench/results/<scale>.json and the
                                                       tables in bench/README.md
    uv run python -m bench.report                      regenerate those tables
    uv run python -m bench.seeds --seeds 0 1 2         accuracy over seeds (bench/seeds.py)
"""
