"""init_ray: a local head that fails to come up is torn down and started again; a local head's
environment reaches its workers and leaves the caller's as it was."""

import os

import ray

from mixserve.cluster import ray_start


def test_a_local_head_that_times_out_is_restarted(monkeypatch):
    # The first real ray.init gets no time to wait for the GCS port (as on a loaded machine);
    # the environment is then repaired, so only a retry can succeed.
    monkeypatch.setenv("RAY_gcs_server_port_wait_time_s", "0")
    real_init, calls = ray.init, []

    def first_start_times_out(*args, **kwargs):
        calls.append(kwargs)
        try:
            return real_init(*args, **kwargs)
        finally:
            monkeypatch.delenv("RAY_gcs_server_port_wait_time_s", raising=False)

    monkeypatch.setattr(ray, "init", first_start_times_out)
    try:
        ray_start.init_ray(num_cpus=1, log_to_driver=False)
        assert len(calls) == 2
        assert ray.get(ray.put("alive")) == "alive"
    finally:
        ray.shutdown()


def test_a_local_heads_environment_reaches_its_workers_and_is_then_undone(monkeypatch):
    monkeypatch.setenv("MIXSERVE_TEST_KEPT", "the caller's")
    monkeypatch.delenv("MIXSERVE_TEST_HEAD", raising=False)

    @ray.remote(num_cpus=0)
    def seen():
        return os.environ.get("MIXSERVE_TEST_HEAD"), os.environ.get("MIXSERVE_TEST_KEPT")

    try:
        ray_start.init_ray(num_cpus=1, log_to_driver=False,
                           head_env={"MIXSERVE_TEST_HEAD": "set", "MIXSERVE_TEST_KEPT": "overridden"})
        assert "MIXSERVE_TEST_HEAD" not in os.environ and os.environ["MIXSERVE_TEST_KEPT"] == "the caller's"
        assert ray.get(seen.remote()) == ("set", "the caller's")
    finally:
        ray.shutdown()
