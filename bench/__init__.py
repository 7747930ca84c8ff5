"""Benchmarks of mixserve (`mixserve bench offline|serve|compare`, parsed in cli.py): the offline
engine's throughput against transformers (offline.py), load against a running OpenAI-compatible
server with TTFT / ITL / latency figures (serve.py over the seeded workloads of workloads.py), and
the whole comparison of every configuration and peer on one machine (compare.py, with report.py's
table and plots.py's PNGs); vllm_offline.py and vllm_client.py are plain scripts run by path with the
vLLM venv's python. Committed results live outside the package, in the repository's benchmarks/.
"""
