"""The paper run on several ranks, on the tiny model with gloo: uneven micro-batches, restarts,
preemption, timeouts, several nodes and another world size. One uninterrupted 2-rank run and
its 1-process twin (session fixtures) are the yardsticks every test compares against."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from test_train import ENV, FAST, train

# 3 steps, a checkpoint after each. The budget of 3,740 tokens puts a group's 5 short stories and
# its ~600-token reference in one micro-batch when 6 x the reference fits, and in two when it
# does not: the two groups of every step differ there, so the ranks get 1 and 2 micro-batches.
ARGS = ["--max_steps=3", "--save_interval=1", "--keep_last=5", "--learning_rate=1e-4", "--warmup_steps=0",
        "--micro_batch_tokens=3740", *FAST]
SAME = ("reward", "sq", "ref_reward", "length_ratio", "loss", "loss_on", "loss_off", "ref_nll", "entropy", "grad_norm",
        "is_ratio_mean", "is_clipped_frac", "zero_std_groups")


def metrics(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def weights(ckpt):
    return load_file(os.path.join(ckpt, "model.safetensors"))


@pytest.fixture(scope="session")
def two(tmp_path_factory):
    run = tmp_path_factory.mktemp("two")
    train(run, *ARGS, nproc=2)
    return run


@pytest.fixture(scope="session")
def one(tmp_path_factory):
    run = tmp_path_factory.mktemp("one")
    train(run, *ARGS)
    return run


def assert_close(a, b, steps, lr=1e-4):
    """The 2-rank test's bounds: rewards equal (each story depends on its seed alone), the loss
    and NLL to 1e-5 and the gradient norm to 1e-4 (fp32 sums in another order), and parameters
    within 2 lr per step (Adam's step is at most ~lr whatever the noise in a gradient near 0)."""
    for ma, mb in zip(metrics(a), metrics(b)):
        for key, rel in (("reward", 1e-9), ("sq", 1e-9), ("loss", 1e-5), ("ref_nll", 1e-5), ("grad_norm", 1e-4)):
            assert ma[key] == pytest.approx(mb[key], rel=rel), f"step {ma['step']} {key}: {ma[key]} vs {mb[key]}"
    wa, wb = weights(os.path.join(a, f"ckpt_{steps:06d}")), weights(os.path.join(b, f"ckpt_{steps:06d}"))
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= 2 * lr * steps * (1 + 1e-3), f"parameters differ by {worst:.2e}, more than 2 lr a step"


def assert_same(a, b, steps):
    """Bitwise: the same ranks from the same state compute the same numbers."""
    got, want = metrics(a), metrics(b)
    assert [m["step"] for m in got] == list(range(1, steps + 1)), f"every step logged once: {[m['step'] for m in got]}"
    for g, w in zip(got, want):
        assert {k: g[k] for k in SAME} == {k: w[k] for k in SAME}, f"step {g['step']} differs"
    wa, wb = weights(os.path.join(a, f"ckpt_{steps:06d}")), weights(os.path.join(b, f"ckpt_{steps:06d}"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the final checkpoint is bitwise the uninterrupted run's"


def test_uneven_micro_batches_on_two_ranks_equal_one_process(two, one):
    m = metrics(two)
    assert all(r["idle_passes"] == 1 for r in m), f"one rank pads one pass a step: {[r['idle_passes'] for r in m]}"
    assert all(r["idle_passes"] == 0 for r in metrics(one)), "one process never pads"
    assert_close(two, one, 3)
    assert os.path.exists(two / "ckpt_000001/optim_rank1.pt"), "each rank saves its optimizer shard"


def children(pid):
    """{RANK: pid} of the worker processes a torchrun agent started."""
    out = {}
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                env = dict(kv.split("=", 1) for kv in open(f"/proc/{p}/environ").read().split("\0") if "=" in kv)
                out[int(env["RANK"])] = int(p)
        except (OSError, KeyError, ValueError):
            pass
    return out


def launch(run, *args, nproc=2, extra=(), env=ENV):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
           "train.py", "config/tiny.py", f"--out_dir={run}", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(path, proc, timeout=240):
    deadline = time.time() + timeout
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert os.path.exists(path), f"{path} never appeared"


def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_uninterrupted(two, tmp_path):
    run = tmp_path / "restarted"
    p = launch(run, *ARGS, "--resume=auto", extra=["--max-restarts=1"])
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in err, "restarts need the store per attempt"
    assert not (run / "metrics.jsonl").exists(), "refused before any step"
    proc = launch(run, *ARGS, "--resume=auto", extra=["--max-restarts=1"],
                  env=dict(ENV, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
    wait_for(run / "ckpt_000001", proc)
    ranks = children(proc.pid)
    for pid in ranks.values():
        os.kill(pid, signal.SIGSTOP)  # freeze both where they are, so that the kill lands mid-run
    finished = (run / "ckpt_000003").exists()
    os.kill(ranks[1], signal.SIGKILL)
    os.kill(ranks[0], signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert not finished, "the kill must come before the last step"
    assert proc.returncode == 0, err[-3000:]
    assert "a collective with the other ranks failed" in err and "Traceback" not in err.split("Restarting")[0], \
        "the survivor says why it stops, without a traceback"
    assert_same(run, two, 3)


def test_a_stuck_rank_ends_the_run_after_dist_timeout_naming_the_step(tmp_path):
    run = tmp_path / "stuck"
    proc = launch(run, "--max_steps=50", "--dist_timeout_s=10", *FAST)
    wait_for(run / "metrics.jsonl", proc)
    ranks = children(proc.pid)
    os.kill(ranks[1], signal.SIGSTOP)
    t0 = time.time()
    while os.path.exists(f"/proc/{ranks[0]}") and open(f"/proc/{ranks[0]}/stat").read().split()[2] != "Z" \
            and time.time() < t0 + 120:
        time.sleep(0.1)
    waited = time.time() - t0
    os.kill(ranks[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and waited < 60, f"rank 0 must give up after ~10 s, waited {waited:.0f} s"
    assert "a collective with the other ranks failed" in err and "dist_timeout_s=10" in err, err[-3000:]
    assert re.search(r"error: step \d+: a collective", err), "the error names the step"


def test_two_nodes_of_one_rank_equal_two_ranks_on_one_node(two, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "nodes"
    args = [a for a in ARGS if not a.startswith("--max_steps")] + ["--max_steps=1"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={n}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               "--rdzv_id=polaris-test", "train.py", "config/tiny.py", f"--out_dir={run}", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for n in (0, 1)]
    for n in nodes:
        out, err = n.communicate(timeout=300)
        assert n.returncode == 0, err[-3000:]
    got, want = metrics(run)[0], metrics(two)[0]
    assert {k: got[k] for k in SAME} == {k: want[k] for k in SAME}, "2 nodes x 1 rank = 1 node x 2 ranks"
    wa, wb = weights(run / "ckpt_000001"), weights(two / "ckpt_000001")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the same weights after the step"


def test_resume_on_another_world_size(two, tmp_path):
    run = tmp_path / "resized"
    shutil.copytree(two, run, ignore=shutil.ignore_patterns("ckpt_000002", "ckpt_000003"))
    resume = [a for a in ARGS if not a.startswith("--max_steps")] + ["--resume=auto"]
    train(run, *resume, "--max_steps=2")  # 2 ranks -> 1 process: the optimizer shards cut anew
    state = torch.load(run / "ckpt_000002/optim_rank0.pt", weights_only=False)
    assert len(state["master"]) == len(torch.load(two / "ckpt_000001/optim_rank0.pt", weights_only=False)["master"]) \
        + len(torch.load(two / "ckpt_000001/optim_rank1.pt", weights_only=False)["master"]), "one rank holds it all"
    train(run, *resume, "--max_steps=3", nproc=2)  # and back to 2 ranks
    assert [m["step"] for m in metrics(run)] == [1, 2, 3], "each step logged once"
    assert_close(run, two, 3)


def test_sigterm_in_the_judge_wait_checkpoints_and_the_same_command_continues(one, tmp_path):
    from test_judge import FaultServer
    # the probe and step 1 are answered, then the judge goes silent for a minute: the run must not wait for it
    slow_judge = FaultServer([("reply", None)] * 13 + [("sleep", 60)] * 12)
    run = tmp_path / "preempted"
    cmd = [sys.executable, "train.py", "config/tiny.py", f"--out_dir={run}", *ARGS, "--save_interval=10",
           "--resume=auto", f"--judge_url={slow_judge.url}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for(run / "metrics.jsonl", proc)
    seen, since = 0, time.time()
    while len(slow_judge.requests) <= 13 or time.time() < since + 1:  # step 2's stories all sent: the run waits
        if len(slow_judge.requests) != seen:
            seen, since = len(slow_judge.requests), time.time()
        time.sleep(0.01)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 10, f"ends within seconds, not after the judge's 60 s: " \
        f"{time.time() - t0:.1f} s"
    assert "SIGTERM while waiting for the judge" in err and "stopped by SIGTERM in step 2" in err, err[-2000:]
    assert "--resume=auto" in err and "Traceback" not in err, "how to continue, and no traceback"
    assert sorted(p.name for p in run.glob("*ckpt_*")) == ["ckpt_000001"], "step 1 checkpointed, nothing half-written"
    assert [m["step"] for m in metrics(run)] == [1], "the abandoned step is not logged"
    slow_judge.script.clear()  # the judge is back
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    slow_judge.close()
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same(run, one, 3)


def test_sigterm_while_generating_then_the_same_command_continues(tmp_path):
    args = ["--max_steps=2", "--max_new_tokens=300", "--resume=auto", "--eval_interval=0"]
    train(tmp_path / "full", *args)
    run = tmp_path / "preempted"
    cmd = [sys.executable, "train.py", "config/tiny.py", f"--out_dir={run}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for(run / "metrics.jsonl", proc)
    time.sleep(0.5)  # past step 1's checkpoint, well inside step 2's 300-token decode
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "SIGTERM while generating" in err, err[-2000:]
    assert (run / "ckpt_000001").exists() and not (run / "ckpt_000002").exists(), "the completed step is saved"
    assert subprocess.run(cmd, capture_output=True, env=ENV, timeout=300).returncode == 0
    m, w = metrics(run), metrics(tmp_path / "full")
    assert [r["step"] for r in m] == [1, 2] and all({k: a[k] for k in SAME} == {k: b[k] for k in SAME}
                                                     for a, b in zip(m, w)), "the same numbers as uninterrupted"
    wa, wb = weights(run / "ckpt_000002"), weights(tmp_path / "full/ckpt_000002")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the same weights"
