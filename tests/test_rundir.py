"""fastsnn.rundir: a folder holding a run is never started into unasked, and one run at a time holds it."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fastsnn import rundir

_HOLDER = textwrap.dedent("""
    import sys, time
    from fastsnn import rundir
    with rundir.RunLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_check_refuses_what_cannot_take_a_run(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in rundir.check(str(tmp_path / "file"), resuming=False, overwrite=False)
    problem = rundir.check(str(tmp_path / "file" / "run"), resuming=False, overwrite=False)
    assert "cannot be created or written" in problem
    assert rundir.check(str(tmp_path / "new" / "deeper"), resuming=False, overwrite=False) is None
    (tmp_path / "empty").mkdir()
    assert rundir.check(str(tmp_path / "empty"), resuming=False, overwrite=False) is None
    for name in rundir.RUN_FILES:
        run = tmp_path / f"run-{name}"
        run.mkdir()
        (run / name).write_text("")
        problem = rundir.check(str(run), resuming=False, overwrite=False)
        assert "already holds a run" in problem and "--resume" in problem and "--overwrite" in problem
        assert rundir.check(str(run), resuming=True, overwrite=False) is None
        assert rundir.check(str(run), resuming=False, overwrite=True) is None
    assert not (tmp_path / "new").exists()  # checking creates nothing


def _hold(folder):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("ending", ["exits", "killed"])
def test_one_run_holds_the_folder_until_it_ends(tmp_path, ending):
    proc = _hold(tmp_path)
    try:
        with pytest.raises(rundir.RunFolderError, match=rf"in use by another run \(pid {proc.pid}\)"):
            with rundir.RunLock(str(tmp_path)):
                pass
    finally:
        proc.send_signal(signal.SIGKILL if ending == "killed" else signal.SIGTERM)
        proc.wait()
    with rundir.RunLock(str(tmp_path)):  # the kernel released it however the holder ended
        assert (tmp_path / rundir.LOCK_NAME).read_text().strip() == str(os.getpid())


def test_a_waiting_lock_waits(tmp_path):
    proc = _hold(tmp_path)
    start = time.monotonic()
    subprocess.Popen(["sh", "-c", f"sleep 1; kill {proc.pid}"])
    with rundir.RunLock(str(tmp_path), wait=True):
        assert time.monotonic() - start > 0.5 and proc.wait() != 0
