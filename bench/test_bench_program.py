"""The training program end to end on the CPU: wall time of the default digits job (3 epochs, the teacher
cached beforehand), one run alone and several at once. This row replaces the wall-time assertion the test
suite used to make: speed is recorded here, never asserted. The "3-parallel" row shows what the thread choice
of fastsnn.training.setup.set_threads (one intra-op thread for digits on the CPU) buys on a small machine;
`OMP_NUM_THREADS=<cores> pytest bench/test_bench_program.py --benchmark-only` gives the same rows with
PyTorch's default thread count, for comparison."""
import os
import subprocess
import sys
import tempfile

import pytest

EPOCHS = 3


def _env(cache):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTSNN_CACHE"] = cache
    return env


def _start(cache, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "fastsnn.train", "--epochs", str(EPOCHS), "--out", out, "--quiet",
                             "--no-tensorboard", *extra], env=_env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def cache():
    with tempfile.TemporaryDirectory() as folder:
        proc = _start(folder, os.path.join(folder, "warm"), "--epochs", "1")  # trains and caches the teacher
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-2000:]
        yield folder


@pytest.mark.parametrize("processes", [1, 3], ids=["alone", "3-parallel"])
def test_digits_run(benchmark, cache, processes):
    counter = iter(range(10**6))

    def run():
        n = next(counter)
        procs = [_start(cache, os.path.join(cache, f"run-{processes}-{n}-{i}")) for i in range(processes)]
        for proc in procs:
            _, err = proc.communicate(timeout=1800)
            assert proc.returncode == 0, err[-2000:]

    benchmark.extra_info.update(epochs=EPOCHS, processes=processes, cpu_count=os.cpu_count(),
                                omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
    benchmark.pedantic(run, rounds=2, iterations=1)
