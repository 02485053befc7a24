"""Held-out evaluation during training: a second judge on its own port, what the run records, the
training's numbers untouched, 2 ranks sharing uneven prompts, and evaluations cut short redone."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from test_judge import FaultServer
from test_train import ENV, train

ARGS = ["--max_steps=3", "--eval_interval=2", "--save_interval=1", "--keep_last=5", "--max_new_tokens=24"]


def rows(path):
    return [json.loads(line) for line in open(path)]


def asked(server):
    """The prompts a judge was asked about, from its request log."""
    return [re.search(r"The writer was asked: (.*)", next(m["content"] for m in r["body"]["messages"]
                                                           if m["role"] == "user")).group(1) for r in server.requests]


def held_out_file(tmp_path, n=5):
    """n of the sample's held-out rows, some asking for 5,000 words: two requested-length buckets."""
    out = tmp_path / "heldout.jsonl"
    src = rows("data/sample/heldout.jsonl")[:n]
    for k, r in enumerate(src):
        if k % 2:
            r["prompt"] = r["prompt"].replace(f"{r['target_words']}-word", "5000-word")
            r["target_words"] = 5000
    out.write_text("".join(json.dumps(r) + "\n" for r in src))
    return out, src


def test_heldout_goes_to_the_evaluation_judge_and_changes_no_training_number(tmp_path):
    data, held = held_out_file(tmp_path)
    trainer, evaluator = FaultServer(), FaultServer()
    try:
        p = train(tmp_path / "on", *ARGS, f"--eval_data={data}", f"--judge_url={trainer.url}",
                  f"--eval_judge_url={evaluator.url}", "--eval_judge_model=the-evaluator", "--eval_judge_workers=3")
        two = train(tmp_path / "two", *ARGS, f"--eval_data={data}", f"--judge_url={trainer.url}",
                    f"--eval_judge_url={evaluator.url}", "--eval_judge_model=the-evaluator", nproc=2)
    finally:
        trainer.close()
        evaluator.close()
    train(tmp_path / "off", *ARGS, "--eval_interval=0")
    # the request logs: held-out stories to the evaluation judge only, rollouts to the training judge only
    prompts = {r["prompt"] for r in held}
    ev_asked, tr_asked = asked(evaluator), asked(trainer)
    # two runs x 5 prompts at steps 0, 2 and 3, and a probe per rank (a rank may find another's in the cache)
    assert 2 * 3 * 5 < len(ev_asked) <= 2 * 3 * 5 + 3, len(ev_asked)
    assert set(ev_asked) == prompts and all(r["body"]["model"] == "the-evaluator" for r in evaluator.requests)
    assert not prompts & set(tr_asked) and len(tr_asked) > 2 * 3 * 10, "the training judge: training stories only"
    # metrics.jsonl: held-out SQ at steps 0, 2 and 3, by bucket; step 0 a row of its own
    m = rows(tmp_path / "on/metrics.jsonl")
    assert [r["step"] for r in m] == [0, 1, 2, 3] and "reward" not in m[0], "step 0: the evaluation alone"
    for r in (m[0], m[2], m[3]):
        assert r["heldout_n"] == 5 and {r["heldout_n_id"], r["heldout_n_near"]} == {2, 3}, r
        assert -100 <= r["heldout_sq"] <= 100 and r["heldout_length_ratio"] > 0 and r["t_eval"] > 0, r
        assert "eval_judge_cost" in r and "heldout_sq_id" in r and "heldout_sq_near" in r
    assert "heldout_sq" not in m[1], "step 1 was not evaluated"
    lines = [line for line in p.stdout.splitlines() if line.startswith("step ")]
    assert lines[0].startswith("step 0/3 | heldout sq") and "heldout sq" in lines[2] and "heldout sq" not in lines[1]
    assert f"held-out SQ {m[0]['heldout_sq']:.1f} at step 0 -> {m[3]['heldout_sq']:.1f} at step 3" in p.stdout, p.stdout
    # evals.jsonl: one row per (step, prompt), each story with its scores and the judge's reply
    ev = rows(tmp_path / "on/evals.jsonl")
    assert sorted((r["step"], r["id"]) for r in ev) == sorted((s, r["id"]) for s in (0, 2, 3) for r in held)
    assert all(len(r["scores"]) == 16 and r["judge_reply"] and r["prompt"] in prompts for r in ev)
    # the training's numbers are those of the run without it
    on, off = load_file(tmp_path / "on/ckpt_000003/model.safetensors"), load_file(tmp_path / "off/ckpt_000003/model.safetensors")
    assert all(torch.equal(on[k], off[k]) for k in on), "evaluating changes no weight"
    keys = ("reward", "loss", "grad_norm", "entropy", "ref_nll")
    assert [{k: r[k] for k in keys} for r in m[1:]] == [{k: r[k] for k in keys} for r in rows(tmp_path / "off/metrics.jsonl")]
    # the stories eval.py draws from the checkpoint: the same seed per prompt, the same sampling
    again = tmp_path / "again.jsonl"
    g = subprocess.run([sys.executable, "eval.py", "--task=generate", f"--model={tmp_path}/on/ckpt_000003", f"--prompts={data}",
                        "--max_new_tokens=24", "--enable_thinking=False", f"--out={again}"], capture_output=True, text=True)
    assert g.returncode == 0, g.stderr[-2000:]
    assert {r["id"]: r["story"] for r in rows(again)} == {r["id"]: r["story"] for r in ev if r["step"] == 3}
    # 2 ranks share the 5 prompts (3 and 2): the same stories and scores as one process
    ev2 = rows(tmp_path / "two/evals.jsonl")
    same = lambda rs: sorted((r["step"], r["id"], r["story"], r["sq"]) for r in rs if r["step"] == 0)
    assert same(ev2) == same(ev), "step 0's stories depend on the prompt alone, not on the rank"
    assert [r["step"] for r in rows(tmp_path / "two/metrics.jsonl")] == [0, 1, 2, 3] and "heldout sq" in two.stdout


def test_an_evaluation_cut_short_is_redone_once(tmp_path):
    data, held = held_out_file(tmp_path, n=4)
    slow = FaultServer(latency=0.6)  # the evaluation judge: the run is stopped while it waits for it
    run = tmp_path / "run"
    args = [*ARGS, "--eval_interval=1", f"--eval_data={data}", f"--eval_judge_url={slow.url}", "--eval_judge_workers=2"]
    try:
        proc = subprocess.Popen([sys.executable, "train.py", "config/tiny.py", f"--out_dir={run}", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        deadline = time.time() + 240
        while len(slow.requests) < 1 + 4 + 1 and time.time() < deadline:  # the probe, step 0's 4, then step 1's first
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "SIGTERM while evaluating the held-out prompts" in err, err[-2000:]
        assert [r["step"] for r in rows(run / "metrics.jsonl")] == [0, 1], "step 1 is logged without its evaluation"
        assert "heldout_sq" not in rows(run / "metrics.jsonl")[1] and (run / "ckpt_000001").exists()
        assert {r["step"] for r in rows(run / "evals.jsonl")} == {0}, "nothing of the cut evaluation is written"
        p = train(run, *args, "--resume=auto")
    finally:
        slow.close()
    assert "step 1/3 | heldout sq" in p.stdout, "the next start redoes the evaluation of step 1 first"
    assert [r["step"] for r in rows(run / "metrics.jsonl")] == [0, 1, 1, 2, 3]
    assert sorted((r["step"], r["id"]) for r in rows(run / "evals.jsonl")) == \
        sorted((s, r["id"]) for s in range(4) for r in held), "each (step, prompt) once"
    # a crash after step 3's evaluation was written but before its checkpoint: resumed from step 2,
    # step 3 and its evaluation are done again, and still logged once
    shutil.rmtree(run / "ckpt_000003")
    train(run, *args, "--resume=auto", "--eval_judge_url=local")
    assert sorted((r["step"], r["id"]) for r in rows(run / "evals.jsonl")) == \
        sorted((s, r["id"]) for s in range(4) for r in held), "each (step, prompt) once after the crash too"
    assert [r["step"] for r in rows(run / "metrics.jsonl")] == [0, 1, 1, 2, 3]


def test_evaluation_settings_are_checked_before_any_model_work(tmp_path):
    trained = rows("data/sample/train.jsonl")[3]  # the same prompt but for case and a trailing space: not held out
    (tmp_path / "near.jsonl").write_text(json.dumps(dict(trained, id="new-id", prompt=trained["prompt"].upper() + " "))
                                         + "\n")
    for args, message in ((["--eval_interval=5", f"--eval_data={tmp_path}/near.jsonl"],
                           "eval_data: 1 of its rows are in train_data too (id 'new-id' first)"),
                          (["--eval_interval=5", "--eval_data="], "eval_interval=5 needs eval_data"),
                          (["--eval_interval=5", "--eval_data=data/sample/heldout.jsonl", "--eval_judge_workers='8'"],
                           "eval_judge_workers='8' must be int like judge_workers=8")):
        p = subprocess.run([sys.executable, "train.py", "config/tiny.py", f"--out_dir={tmp_path}/run", *args],
                           capture_output=True, text=True, env=ENV, timeout=60)
        assert p.returncode != 0 and message in p.stderr, f"{args}: {p.stderr[-1500:]}"
        assert "memory plan" not in p.stdout and not os.path.exists(tmp_path / "run"), "refused before the model"
