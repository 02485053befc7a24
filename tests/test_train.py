"""train.py runs as a subprocess (it executes on import), on the tiny model and the local judge."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # same kernels in 1 and 2 process runs
FAST = ["--max_new_tokens=24", "--eval_interval=0"]  # short stories; the held-out evaluation off


def train(out, *args, nproc=1, check=True, timeout=300):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1
           else [sys.executable]) + ["train.py", "config/tiny.py", f"--out_dir={out}", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def weights(ckpt):
    return load_file(os.path.join(ckpt, "model.safetensors"))


def test_two_steps_write_a_loadable_checkpoint(tmp_path):
    p = train(tmp_path, "--max_steps=2", *FAST)
    assert "step 2/2 | reward" in p.stdout and "done: 2 steps; the final checkpoint is" in p.stdout, "a line a step, a last"
    assert all(len(l) <= 120 for l in p.stdout.splitlines() if l.startswith("step ")), "step lines fit a terminal"
    metrics = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert len(metrics) == 2 and all(m["judge_failures"] == 0 for m in metrics), "metrics.jsonl has every step"
    for m in metrics:  # what HRI does, step by step
        assert m["loss_on"] + m["loss_off"] == pytest.approx(m["loss"]) and m["loss_off"] < 0 < m["loss_on"], m
        assert 1 <= m["ref_rank"] <= 6 and 0 <= m["ref_adv_neg"] <= 1 and not math.isnan(m["ref_adv"]), m
        assert 6.0 < m["entropy"] < math.log(1028) + 1e-3, "a random model's entropy is near log(vocabulary)"
    rolls = [json.loads(l) for l in open(tmp_path / "rollouts.jsonl")]
    assert len(rolls) == 2 * 2 * 6 and sum(r["is_ref"] for r in rolls) == 4, "every story of every group is logged"
    assert all(len(r["scores"]) == 16 for r in rolls), "with its 16 scores"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt_000002")
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt_000002")
    assert model.config.model_type == "qwen3_5_text" and tok.chat_template, "a save_pretrained folder"
    saved = weights(tmp_path / "ckpt_000002")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items() if k in saved), "weights load back"
    assert not torch.equal(saved["lm_head.weight"], weights(tmp_path / "base")["lm_head.weight"]), "training moved them"


@pytest.mark.parametrize("args, env, message", [
    (["--learning_rat=1e-3"], {}, "unknown key 'learning_rat' (did you mean learning_rate"),
    (["--repetition_penalty=1.05", "--presence_penalty=0.5"], {}, "never both at once"),
    (["--batch_groups=3"], {"WORLD_SIZE": "2"}, "batch_groups=3 does not divide over 2 ranks"),
    (["--judge_url=http://127.0.0.1:9/v1", "--judge_key_env=POLARIS_NO_SUCH_KEY"], {}, "POLARIS_NO_SUCH_KEY is not set"),
    (["--train_data=data/nope.jsonl"], {}, "train_data: [Errno 2] No such file or directory: 'data/nope.jsonl'"),
    (["--loss_norm=mean"], {}, "loss_norm='mean' must be one of"),
    (["--resume=True"], {}, "no checkpoint in"),
    (["--learning_rate=-0.01", "--save_interval=0", "--max_new_tokens=0", "--temperature=0", "--top_p=1.5", "--top_k=-1",
      "--keep_last=0", "--judge_workers=0", "--judge_timeout=0", "--judge_max_fail_frac=2", "--warmup_steps=-1",
      "--logprob_chunk=0", "--length_weight=-5", "--micro_batch_tokens=0", "--max_steps=0", "--judge_retries=-1"], {},
     ("learning_rate=-0.01 must be > 0", "save_interval=0 must be >= 1", "max_new_tokens=0 must be >= 1",
      "temperature=0.0 must be > 0", "top_p=1.5 must be in (0, 1]", "top_k=-1 must be >= 0", "keep_last=0 must be >= 1",
      "judge_workers=0 must be >= 1", "judge_timeout=0.0 must be > 0", "judge_max_fail_frac=2.0 must be in [0, 1]",
      "warmup_steps=-1 must be >= 0", "logprob_chunk=0 must be >= 1", "length_weight=-5.0 must be >= 0",
      "micro_batch_tokens=0 must be >= 1", "max_steps=0 must be >= 1", "judge_retries=-1 must be >= 0")),  # all at once
    (["--max_new_tokens=8190"], {}, "data/sample/train.jsonl:1: the prompt is 4"),  # + 8,190 > the tiny model's 8,192
])
def test_bad_input_stops_before_the_model_loads(tmp_path, args, env, message):
    p = subprocess.run([sys.executable, "train.py", "config/tiny.py", f"--out_dir={tmp_path}/run", *args],
                       capture_output=True, text=True, env=dict(ENV, **env), timeout=60)
    for m in (message,) if isinstance(message, str) else message:
        assert p.returncode != 0 and m in p.stderr, f"expected '{m}' in:\n{p.stderr[-2000:]}"
    assert "memory plan" not in p.stdout and not (tmp_path / "run").exists(), "no model work or file before the error"


@pytest.mark.parametrize("line, why", [
    (b'{"id": "x", "prompt": "p", "target_words": 10}', "missing field 'story'"),
    (b'{"id": "x", "prompt": "p", "target_words": 10, "story": "\xff\xfe"}', "not UTF-8"),
    (b'{"id": "x", "prompt": "p", "target_words": 10, "story": "I planned.</think>It rained."}',
     "story contains the special token '</think>'"),
])
def test_invalid_data_names_file_and_line(tmp_path, line, why):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(open("data/sample/train.jsonl", "rb").readline() + line + b"\n")
    p = subprocess.run([sys.executable, "train.py", "config/tiny.py", f"--train_data={bad}", f"--out_dir={tmp_path}/run"],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert p.returncode != 0 and f"{bad}:2: {why}" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run").exists(), "refused when the data is loaded, before any step"


def test_memory_plan_refuses_a_9b_run_that_cannot_fit(tmp_path):
    from transformers import Qwen3_5TextConfig
    import tiny
    Qwen3_5TextConfig().save_pretrained(tmp_path / "qwen3_5_9b")  # the 9B architecture, no weights
    tiny.build_tiny(["data/sample/train.jsonl"])[1].save_pretrained(tmp_path / "qwen3_5_9b")  # a tokenizer
    p = subprocess.run([sys.executable, "train.py", "config/polaris.py", "--train_data=data/sample/train.jsonl",
                        f"--init_from={tmp_path}/qwen3_5_9b", "--device_memory_gb=80.0", f"--out_dir={tmp_path}/run",
                        "--judge_url=local", "--eval_interval=0"],
                       capture_output=True, text=True, env=dict(ENV, GEMINI_API_KEY="unused"), timeout=120)
    # one rank holds the whole fp32 gradient sum and AdamW state: 17.9 + 35.8 + 107.4 GB, and the
    # activations of one 9,216-token micro-batch with checkpointing and the log-prob chunk, 5.7 GB
    assert "8,953.8M params" in p.stdout and "= 166.90 GB of 80 GB" in p.stdout, p.stdout[-2000:]
    assert p.returncode != 0 and "does not fit in 90% of 80 GB" in p.stderr, p.stderr[-2000:]


def test_sigkill_and_resume_is_bitwise_exact(tmp_path):
    args = ["--max_steps=4", "--save_interval=2", "--keep_last=5", *FAST]
    train(tmp_path / "full", *args)
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", "config/tiny.py", f"--out_dir={run}", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 240
    while not (run / "ckpt_000002").exists() and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run must still be going when it is killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "ckpt_000004").exists(), "killed before the end"
    for name in ("metrics.jsonl", "rollouts.jsonl"):  # as if the kill came during an append
        with open(run / name, "a") as f:
            f.write('{"step": 4, "rew')
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = tmp_path / "other.jsonl"
    other.write_text(open("data/sample/train.jsonl").read().replace("ferry", "barge"))
    p = train(run, *args, "--resume=True", "--batch_groups=4", "--seed=7", "--group_size=5", f"--train_data={other}",
              check=False)  # every setting that decides the batch, changed at once: each is named
    for named in ("batch_groups 2 -> 4", "seed 1337 -> 7", "group_size 6 -> 5", "train_data_sha256"):
        assert p.returncode != 0 and named in p.stderr and "memory plan" not in p.stdout, p.stderr[-2000:]
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}, "a refused resume changes nothing"
    train(run, *args, "--resume=True")
    full, resumed = weights(tmp_path / "full/ckpt_000004"), weights(run / "ckpt_000004")
    assert all(torch.equal(full[k], resumed[k]) for k in full), "resumed parameters must be bitwise equal"
    steps = [json.loads(l)["step"] for l in open(run / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4], f"each step logged once after resume, counted from 1: {steps}"
    # a cut file in the newest checkpoint: named, with the complete one to continue from
    with open(run / "ckpt_000004/model.safetensors", "r+b") as f:
        f.truncate(1000)
    p = train(run, *args, "--resume=auto", check=False)
    assert p.returncode != 0 and f"{run}/ckpt_000004/model.safetensors is truncated" in p.stderr, p.stderr[-2000:]
    assert f"--resume_from={run}/ckpt_000002" in p.stderr, "says which earlier checkpoint is complete"
    # as the error advises, with keep_last=1 and a stop after step 3: the damaged ckpt_000004 and the rows after
    # step 2 are moved aside, never kept in place of a good checkpoint, and the good ones are not pruned
    p = train(run, *args, f"--resume_from={run}/ckpt_000002", "--keep_last=1", "--max_steps=3")
    aside = [d for d in run.iterdir() if d.name.startswith("abandoned_")]
    assert len(aside) == 1 and f"moved to {aside[0]}" in p.stdout, p.stdout[-2000:]
    assert sorted(d.name for d in aside[0].iterdir()) == ["ckpt_000004", "metrics.jsonl", "rollouts.jsonl"], "kept aside"
    assert [json.loads(l)["step"] for l in open(aside[0] / "metrics.jsonl")] == [3, 4], "the rows after step 2, aside"
    assert sorted(d.name for d in run.glob("ckpt_*")) == ["ckpt_000003"], "the newest complete checkpoint kept"
    p = train(run, *args, "--resume=auto", "--keep_last=1")  # and the run continues from its own newest
    assert f"resuming from {run}/ckpt_000003 (step 3 of 4)" in p.stdout, p.stdout[-2000:]
    resumed = weights(run / "ckpt_000004")
    assert all(torch.equal(full[k], resumed[k]) for k in full), "resumed from the named checkpoint, bitwise"
    assert [json.loads(l)["step"] for l in open(run / "metrics.jsonl")] == [1, 2, 3, 4], "each step once"


def test_reward_rises_in_a_minute(tmp_path):
    train(tmp_path, "--max_steps=30", "--max_new_tokens=64")
    r = [m["reward"] for m in map(json.loads, open(tmp_path / "metrics.jsonl")) if "reward" in m]  # not step 0's evaluation
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    # measured: -49.2 over the first five steps and -27.3 over the last five (seed 1337)
    assert last > first + 8, f"mean reward should rise by more than 8: first five {first:.1f}, last five {last:.1f}"


def test_a_used_out_dir_is_refused_unchanged(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "reward": 1.0}\n')
    p = subprocess.run([sys.executable, "train.py", "config/tiny.py", f"--out_dir={tmp_path}"],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert p.returncode != 0 and "use --resume=auto to continue it, or another out_dir" in p.stderr, p.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"] and "memory plan" not in p.stdout, "nothing written"
    # resume='auto' with logs but no checkpoint (killed before its first save): a new run, the old logs set aside
    p = train(tmp_path, "--resume=auto", "--max_steps=1", *FAST)
    aside = [d for d in os.listdir(tmp_path) if d.startswith("abandoned_")]
    assert len(aside) == 1 and open(tmp_path / aside[0] / "metrics.jsonl").read() == '{"step": 0, "reward": 1.0}\n', \
        "the old logs kept aside, whole"
    assert [json.loads(l)["reward"] != 1.0 for l in open(tmp_path / "metrics.jsonl")] == [True], "never mixed"
    # a setting that changes what the run computes may change on resume: said, and kept beside the first start's
    p = train(tmp_path, "--resume=auto", "--max_steps=2", "--learning_rate=0.5", *FAST)
    assert "changed on resume: max_steps 1 -> 2; learning_rate 0.01 -> 0.5" in p.stdout, p.stdout[-2000:]
    run = json.load(open(tmp_path / "run.json"))
    assert run["config"]["learning_rate"] == 0.01 and [s["changed"] for s in run["starts"]] == [
        {}, {"learning_rate": [0.01, 0.5], "max_steps": [1, 2]}], run["starts"]


def test_named_badly_at_start(tmp_path):
    """Each ends in one line naming the setting, file or line, before any model work or file."""
    (tmp_path / "a_file").write_text("")
    (tmp_path / "raises.py").write_text("max_steps = 3\nlearning_rate = 1 / 0\n")
    for args, message in (([f"--out_dir={tmp_path}/a_file"], f"out_dir={tmp_path}/a_file is a file, not a folder"),
                          (["--out_dir="], "out_dir is empty: name the run's folder"),
                          ([os.fsencode(f"--out_dir={tmp_path}/") + b"\xff\xfe"], "is not valid UTF-8"),
                          ([f"{tmp_path}/raises.py"], f"{tmp_path}/raises.py:2: ZeroDivisionError: division by zero")):
        p = subprocess.run([sys.executable, "train.py", "config/tiny.py", *args], capture_output=True, text=True,
                           env=ENV, timeout=60)
        assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, f"{args}: {p.stderr[-1500:]}"
        assert "memory plan" not in p.stdout, "refused before any model work"
    assert sorted(os.listdir(tmp_path)) == ["a_file", "raises.py"], "nothing written"


def test_a_missing_data_file_is_named_before_anything_asks_the_hub(tmp_path):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading
    asked = []

    class Hub(BaseHTTPRequestHandler):  # stands in for huggingface.co: records what reaches it
        def do_GET(self):
            asked.append(self.path)
            self.send_error(503)
        do_HEAD = do_GET

        def log_message(self, *a):
            pass
    hub = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    env = dict(ENV, HF_ENDPOINT=f"http://127.0.0.1:{hub.server_address[1]}", GEMINI_API_KEY="x", OPENAI_API_KEY="x")
    try:
        p = subprocess.run([sys.executable, "train.py", "config/polaris.py", f"--out_dir={tmp_path}/run"],
                           capture_output=True, text=True, env=env, timeout=120)
    finally:
        hub.shutdown()
    assert p.returncode != 0 and "train_data: [Errno 2] No such file or directory: 'data/polaris/train.jsonl'" in p.stderr, \
        p.stderr[-2000:]
    assert not asked, f"the hub was asked before the missing file was named: {asked[:3]}"


def test_a_lock_file_this_code_did_not_write_is_taken_over(tmp_path, capsys):
    import rundir
    for held in ("[]", "null", '{"pid": 1234567890123456789012345678901234567890, "host": "h"}', '{"pid": "x"}'):
        (tmp_path / "run.lock").write_text(held)
        release = rundir.take_lock(str(tmp_path / "run.lock"), 120.0)
        assert json.load(open(tmp_path / "run.lock"))["pid"] == os.getpid(), f"{held}: taken over"
        assert f"taking over {tmp_path}/run.lock: it holds no lock this code wrote" in capsys.readouterr().out, held
        release()


def test_a_story_without_spaces_is_refused_within_seconds_and_a_signal_ends_the_start(tmp_path):
    rows = [json.loads(l) for l in open("data/sample/train.jsonl")]
    rows[4]["story"] = "ab" * 1_000_000  # one 2 MB 'word': the tiny tokenizer once trained on it for hours
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "train.py", "config/tiny.py", f"--train_data={tmp_path}/train.jsonl", f"--out_dir={tmp_path}/r"]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode != 0 and f"{tmp_path}/train.jsonl:5: the prompt and its reference story are" in p.stderr, \
        p.stderr[-2000:]
    assert time.time() - t0 < 60, f"refused by path:line in {time.time() - t0:.0f} s, not hours"
    for sig in (signal.SIGTERM, signal.SIGINT):  # while starting (the tokenizer learns): the run ends at once
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        time.sleep(3)
        proc.send_signal(sig)
        t0 = time.time()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and time.time() - t0 < 10, f"{sig.name}: ended {time.time() - t0:.0f} s later"
        assert f"stopped by {sig.name} while starting" in err and "Traceback" not in err, err[-2000:]
        assert not os.path.exists(f"{tmp_path}/r/run.lock"), "its lock released"


def fault_server(script):
    from test_judge import FaultServer
    return FaultServer(script)


@pytest.mark.parametrize("code", [401, 404])
def test_a_judge_that_rejects_the_key_stops_the_run(tmp_path, code):
    # the probe before the model loads and step 1 are answered, then every request is refused: the run
    # stops in step 2, before its update, naming the status and the URL; step 1 is checkpointed (save_interval
    # is 20) and the printed command continues the run once the judge answers again
    s = fault_server([("reply", None)] * 13 + [("status", code, {})] * 100)
    secret = "sk-secret-123456"
    env = dict(ENV, POLARIS_TEST_KEY=secret)
    try:
        p = subprocess.run([sys.executable, "train.py", "config/tiny.py", f"--out_dir={tmp_path}", f"--judge_url={s.url}",
                            "--judge_key_env=POLARIS_TEST_KEY", "--max_steps=3", *FAST], capture_output=True, text=True,
                           env=env, timeout=120)
        assert p.returncode != 0 and f"HTTP {code} from {s.url}/chat/completions" in p.stderr, p.stderr[-2000:]
        assert "step 2: a judge failure that no retry can fix" in p.stderr, p.stderr[-2000:]
        assert secret not in p.stdout + p.stderr, "the key is never printed"
        assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [1], "step 2 never updated"
        assert sorted(c.name for c in tmp_path.glob("ckpt_*")) == ["ckpt_000001"], "the completed step is saved"
        again = p.stderr.split("continue with:\n", 1)[1].strip().splitlines()[0]
        assert again.startswith("python train.py config/tiny.py") and again.endswith("--resume=auto"), again
        s.script.clear()  # the judge answers again: the printed command, as printed, finishes the run
        p = subprocess.run(again, shell=True, capture_output=True, text=True, env=env, timeout=120)
    finally:
        s.close()
    assert p.returncode == 0 and f"resuming from {tmp_path}/ckpt_000001" in p.stdout, p.stderr[-2000:]
    assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [1, 2, 3], "each step once"
    s = fault_server([("status", 401, {})])
    try:
        p = subprocess.run([sys.executable, "train.py", "config/tiny.py", f"--out_dir={tmp_path}/early",
                            f"--judge_url={s.url}"], capture_output=True, text=True, env=ENV, timeout=120)
    finally:
        s.close()
    assert p.returncode != 0 and "the judge cannot be used: HTTP 401" in p.stderr, p.stderr[-2000:]
    assert "memory plan" in p.stdout and not (tmp_path / "early/base").exists(), "stopped before the weights load"


def test_a_step_with_too_many_judge_failures_stops_the_run(tmp_path):
    s = fault_server([("reply", None)] + [("status", 503, {})] * 100)
    try:
        p = subprocess.run([sys.executable, "train.py", "config/tiny.py", f"--out_dir={tmp_path}", f"--judge_url={s.url}",
                            "--judge_retries=0", *FAST], capture_output=True, text=True, env=ENV, timeout=120)
    finally:
        s.close()
    assert p.returncode != 0 and "12 of 12 stories could not be scored (judge_max_fail_frac=0.5)" in p.stderr, \
        p.stderr[-2000:]
    assert "12 x HTTP 503; gave up after 1 attempts" in p.stderr, "the reasons, counted"
    assert not (tmp_path / "metrics.jsonl").exists(), "stopped before the update"


def test_reference_metrics_and_shaping(tmp_path):
    # a fixed reward below every story puts the reference last with a negative advantage
    p = train(tmp_path / "low", "--max_steps=1", "--ref_reward=-500", *FAST)
    m = json.loads(open(tmp_path / "low/metrics.jsonl").readline())
    assert m["ref_rank"] == 6 and m["ref_adv_neg"] == 1 and m["ref_adv"] < 0, m
    # shaping changes only the references' part of the loss: -A p / (p + gamma) instead of -A (ratio 1)
    train(tmp_path / "shaped", "--max_steps=1", "--ref_shaping_gamma=0.1", *FAST)
    plain = json.loads(open(tmp_path / "low/metrics.jsonl").readline())
    shaped = json.loads(open(tmp_path / "shaped/metrics.jsonl").readline())
    assert shaped["ref_adv"] > 0 and -shaped["loss_off"] < shaped["ref_adv"] * 0.1, \
        "a random model gives each human token p ~ 1/V << gamma: f(p) ~ p / gamma, a small loss"
    assert shaped["reward"] == plain["reward"], "rollouts unchanged"
    train(tmp_path / "none", "--max_steps=1", "--n_ref=0", *FAST)
    m = json.loads(open(tmp_path / "none/metrics.jsonl").readline())
    assert all(math.isnan(m[k]) for k in ("ref_adv", "ref_adv_neg", "ref_rank", "loss_off")) and m["loss"] == m["loss_on"], m
