"""bench/gpu.sh --dry-run: the GPU run's script rehearsed on the CPU (tiny sizes, interpreted kernels), so that
everything but the GPU itself has run before GPU time is spent. Minutes: marked slow."""
import json
import os
import subprocess

import pytest

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_writes_every_result_file(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTSNN_COMPILED")}
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    names = set(os.listdir(tmp_path))
    assert names == {"env.txt", "correctness.log", "bench.log", "cpu-dry-run.json", "cpu-dry-run.md", "summary.txt",
                     "memory"}
    assert "| spiking_resnet19 (32 px) | 4 |" in (tmp_path / "memory" / "memory.md").read_text()
    assert len(names) <= 8  # what the GPU machine can send back
    result = json.load(open(tmp_path / "cpu-dry-run.json"))
    ops = {r["op"] for r in result["rows"]}
    assert {"lif", "tser_loss", "host", "train_step", "saved_bytes"} <= ops
    paths = {(r["op"], r["provider"]): r["path"] for r in result["rows"] if "provider" in r}
    assert paths[("lif", "fastsnn")] == "triton-interpreter" and paths[("lif", "compile")] == "torch.compile"
    assert "DRY RUN" in proc.stdout and "fastsnn GPU run summary" in proc.stdout
