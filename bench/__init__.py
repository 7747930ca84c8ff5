"""Benchmarks of mixserve (`mixserve bench offline|serve`, parsed in cli.py): the offline engine's
throughput against transformers (offline.py), and load against a running OpenAI-compatible server
with TTFT / ITL / latency figures (serve.py over the seeded workloads of workloads.py, its JSON and
PNG files written by result_files.py). The benchmark lab that compares every configuration and peer
on one machine, and the soak, are not part of the package: they live in the repository's
tools/benchmarks/ and use these modules; their committed results are in benchmarks/.
"""
