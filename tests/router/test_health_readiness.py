"""/health answers 200 only once an LLM-server replica can serve: on a real Serve app whose replica
cannot be placed while another actor holds the CPUs it needs, then can."""

import threading
import time

import httpx
import ray
from ray import serve

from mixserve.cluster.app import build_app
from mixserve.cluster.serve_config import APP_NAME
from mixserve.cluster.serve_command import init_ray_for, serving_settings, wait_until_healthy
from mixserve.cluster.settings import ServeSettings
from mixserve.workers.ports import free_port


@ray.remote(num_cpus=2)
class CpuHolder:
    def ping(self) -> bool:
        return True


def test_health_is_503_starting_until_a_replica_runs_then_200(tiny_checkpoint):
    settings = ServeSettings(model=str(tiny_checkpoint), port=free_port(), dtype="float32", max_model_len=256,
                             kv_cache_bytes=16 << 20, replica_cpus=3.0, threads=1, warmup_s=0.0)
    init_ray_for(settings, num_cpus=4, log_to_driver=False)
    try:
        holder = CpuHolder.remote()
        assert ray.get(holder.ping.remote())  # 2 of the 4 CPUs held: the 3-CPU replica cannot be placed
        settings = serving_settings(settings)
        serve.start(proxy_location="Disabled")
        # serve.run returns once every replica runs: from a thread, as a user's client polls while it waits
        deploy = threading.Thread(target=serve.run, args=(build_app(settings),),
                                  kwargs={"name": APP_NAME, "route_prefix": "/"}, daemon=True)
        deploy.start()
        url = f"http://{settings.host}:{settings.port}"

        deadline = time.monotonic() + 120
        while True:  # the ingress comes up on its own and serves the port
            try:
                r = httpx.get(url + "/health", timeout=10)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the ingress never served the port"
                time.sleep(0.5)
        for _ in range(3):  # still 503 on later probes: nothing has answered
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "starting"
            time.sleep(1.0)
            r = httpx.get(url + "/health", timeout=10)
        assert r.status_code == 503
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 200  # the ingress itself answers

        ray.kill(holder)  # the CPUs free up: Serve places the replica
        started = time.monotonic()
        wait_until_healthy(url, timeout_s=180)
        # once /health said 200, a request is served at once, not held for a replica to start
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 3, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert time.monotonic() - t0 < 30, f"first request after /health 200 took {time.monotonic() - t0:.1f} s"
        assert time.monotonic() - started < 180
        deploy.join(timeout=60)
        assert not deploy.is_alive()
        assert httpx.get(url + "/health", timeout=10).status_code == 200
    finally:
        serve.shutdown()
        ray.shutdown()
