"""fastdistil's benchmarks: the pytest-benchmark suites (test_bench_*.py: the triple loss, the fused projection +
loss, the training step against the original distiller, inference size and latency, and the GPU kernels), the
helpers they share (memory and bandwidth probes, contention and machine facts, the distiller port, the
matrix-product floor), and the one report that turns their results/ JSON and the evaluation outputs into
results/REPORT.md (`python -m bench.report`; its prose in report_templates/). A package so that the suites and
tests/ import these helpers as bench.<module>, from the repository root, without touching sys.path.
"""
