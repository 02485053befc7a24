"""Faults of the disk and of the operator, tried on the tiny run: one run per out_dir, a full
disk during a checkpoint and during resume. The wire's faults are test_judge.py's."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from test_train import ENV, FAST, train


def start(out, *args):
    return subprocess.Popen([sys.executable, "train.py", "config/tiny.py", f"--out_dir={out}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for(path, proc, timeout=240):
    deadline = time.time() + timeout
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert os.path.exists(path), f"{path} never appeared"


def test_one_run_per_out_dir(tmp_path):
    first = start(tmp_path, "--max_steps=200", *FAST)
    wait_for(tmp_path / "metrics.jsonl", first)
    p = train(tmp_path, "--resume=auto", *FAST, check=False)
    assert p.returncode != 0 and f"is in use by pid {first.pid} on {socket.gethostname()} since" in p.stderr, \
        p.stderr[-2000:]
    assert first.poll() is None, "the first run goes on"
    first.send_signal(signal.SIGKILL)  # killed: its lock stays behind, naming a process that is gone
    first.wait()
    p = train(tmp_path, "--resume=auto", "--max_steps=1", *FAST)
    assert f"taking over {tmp_path}/run.lock from pid {first.pid}" in p.stdout and "not running" in p.stdout
    assert not (tmp_path / "run.lock").exists(), "released at the end of the run"
    # a holder on another host: taken over only once it has not refreshed the lock for lock_stale_s
    lock = dict(pid=1, host="elsewhere", since="2026-11-29 01:00:00")
    (tmp_path / "run.lock").write_text(json.dumps(lock))
    p = train(tmp_path, "--resume=auto", "--max_steps=1", "--lock_stale_s=60", *FAST, check=False)
    assert p.returncode != 0 and "in use by pid 1 on elsewhere since 2026-11-29 01:00:00" in p.stderr
    os.utime(tmp_path / "run.lock", (time.time() - 61, time.time() - 61))
    p = train(tmp_path, "--resume=auto", "--max_steps=1", "--lock_stale_s=60", *FAST)
    assert "from pid 1 on elsewhere: not refreshed for 6" in p.stdout, p.stdout[-2000:]


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("full-disk tests mount a 16 MB tmpfs, which needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here: full-disk tests skipped")
    yield disk
    subprocess.run(["umount", "-l", str(disk)])


def fill(disk, leave):
    """Fill the disk up, then free `leave` bytes."""
    with open(disk / "pad", "wb") as f:
        f.write(b"\0" * leave)
    try:
        with open(disk / "filler", "ab") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    except OSError:
        pass
    os.remove(disk / "pad")


def test_a_full_disk_in_a_checkpoint_and_in_resume(small_disk):
    run = small_disk / "run"
    proc = start(run, "--max_steps=4", "--save_interval=1", *FAST)
    wait_for(run / "ckpt_000001", proc)
    proc.send_signal(signal.SIGSTOP)
    fill(small_disk, 256 * 1024)  # room for a step's logs and judge cache, not for a checkpoint
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode != 0 and "the checkpoint could not be written" in err and "No space left on device" in err, \
        err[-2000:]
    assert f"The newest checkpoint is {run}/ckpt_000001" in err and "Traceback" not in err, err[-2000:]
    assert sorted(p.name for p in run.glob("*ckpt_*")) == ["ckpt_000001"], "no half-written checkpoint left"
    # resume on the still full disk: the logs must be rewritten to drop step 2's rows; refused, untouched
    os.remove(small_disk / "filler")
    fill(small_disk, 8 * 1024)
    before = {p: p.read_bytes() for p in run.glob("*.jsonl")}
    p = train(run, "--max_steps=4", "--save_interval=1", "--resume=auto", *FAST, check=False)
    assert p.returncode != 0 and "No space left on device; the logs are unchanged" in p.stderr, p.stderr[-2000:]
    assert before == {p: p.read_bytes() for p in run.glob("*.jsonl")} and not list(run.glob("*.tmp")), "untouched"
    os.remove(small_disk / "filler")
    train(run, "--max_steps=4", "--save_interval=1", "--keep_last=1", "--resume=auto", *FAST)  # 16 MB: one at a time
    assert [json.loads(l)["step"] for l in open(run / "metrics.jsonl")] == [1, 2, 3, 4], "then it continues"


def test_a_key_in_the_judge_url_works_and_is_never_stored(tmp_path):
    import torch
    from local_judge import serve_local
    server, url = serve_local()
    secret = "sk-in-the-url-123456"
    try:
        p = train(tmp_path, f"--judge_url={url}?key={secret}", "--max_steps=1", *FAST)
    finally:
        server.shutdown()
        server.server_close()
    assert "judge_url = " in p.stdout and "?key=***" in p.stdout, "the override line shows the URL, redacted"
    state = torch.load(tmp_path / "ckpt_000001/state.pt", weights_only=False)
    assert state["config"]["judge_url"] == f"{url}?key=***", state["config"]["judge_url"]
    leaks = [f for f in tmp_path.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]
    assert secret not in p.stdout + p.stderr and not leaks, f"the key reached {leaks}"
