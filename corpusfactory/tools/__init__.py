"""The roof's tools: the demo, the benchmarks, the process stack the demo and tests
start, and the run report. They may import the kernel, the engines and every stage;
no stage imports them (``make check`` enforces that).
"""
