"""Studies and benchmarks: research run on the harness, apart from the harness itself.

Each module is a script (`python -m invbench.studies.<name>`) that writes a committed report
beside it: `guided_bench` (GUIDED.md), `perf` (PERF-cpu.md), `study_published` with its report
(STUDY-published-attacks.md, study/). They read the repository's data, so they run from a
checkout and are left out of the wheel (pyproject.toml lists the harness packages only).
"""
