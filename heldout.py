"""
Held-out evaluation during training (train.py's eval_interval): at step 0, every eval_interval
steps and at the last step, the policy writes one story per held-out prompt with the evaluation's
sampling, and an evaluation judge of its own scores it (eval_judge_*, each the training judge's
setting where None; the paper's is GPT-5.4, its training judge Gemini 3 Flash). A policy that
learns to please its training judge shows a rising reward and a flat held-out SQ; one that writes
better shows both rising (docs/training.md). With the same seed at every evaluation, a step's
stories are those `eval.py --task=generate --prompts=EVAL_DATA` draws from its checkpoint with the
same sampling and max_new_tokens.

Ranks share the prompts as they share groups (strided). Nothing here touches the training's
numbers: each story is drawn from its own seeded generator (the same seed at every step, so that
two steps differ by the policy alone, not by the draw), and the judge is a client of its own.
"""
import json
import math
import os
import time

import torch.distributed as dist

import checkpoint
import rollout
import rubric
from configurator import check_ranges
from eval import BUCKETS, bucket
import judge_http
from judge_http import DEFAULTS, RANGES

EVAL_SAMPLING = dict(temperature=0.6, top_p=0.95, top_k=20, repetition_penalty=1.0, presence_penalty=0.0)  # eval.py's
# the evaluation judge's settings: train.py's eval_judge_url, eval_judge_model, ..., None = the training judge's
JUDGE_KEYS = [k for k in DEFAULTS if k.startswith("judge_") and k not in ("judge_cache", "judge_max_fail_frac")]


def judge_settings(c):
    """The evaluation judge's settings: each eval_judge_* that is set, else the training judge's,
    typed and ranged like the training judge's (an error names the eval_ key)."""
    out = {}
    for k in JUDGE_KEYS:
        v, like = c[f"eval_{k}"], c[k]
        if v is not None and type(v) is not type(like) and not (type(like) is float and type(v) is int):
            raise ValueError(f"eval_{k}={v!r} must be {type(like).__name__} like {k}={like!r}, or None (the same)")
        out[k] = like if v is None else type(like)(v)
    check_ranges({f"eval_{k}": v for k, v in out.items()}, {f"eval_{k}": r for k, r in RANGES.items() if k in out})
    return dict(out, length_weight=c["length_weight"])


def judge(c, cache_dir):
    """The evaluation judge's client, or None when eval_interval is 0."""
    import judge as judge_lib
    return judge_lib.judge_from_config(judge_settings(c), cache_dir=cache_dir) if c["eval_interval"] else None


def due(step, eval_interval, max_steps):
    return bool(eval_interval) and (step % eval_interval == 0 or step == max_steps)


def missing(out_dir, step, eval_interval, max_steps, rows, rank=0, world=1):
    """Every rank together: whether the evaluation of `step` is due at the start of a run and not
    in evals.jsonl (step 0's, or one a stop signal cut short). The master decides, after it has
    moved an abandoned run's logs aside, and tells the others."""
    if not due(step, eval_interval, max_steps):
        return False
    ids, path = set(), os.path.join(out_dir, "evals.jsonl")
    for line in open(path, encoding="utf-8") if rank == 0 and os.path.exists(path) else []:
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a half-written last line
        ids |= {r["id"]} if r["step"] == step else set()
    answer = [not ids >= {r["id"] for r in rows}]
    if world > 1:
        dist.broadcast_object_list(answer, src=0)
    return answer[0]


def evaluate(model, tok, rows, judge, step, out_dir, seed, eos, max_new_tokens, enable_thinking, batch, rank=0, world=1,
             stop=()):
    """Every rank together: this rank's held-out prompts (rows r, r + world, ...), decoded `batch`
    at a time, each story to the judge as it ends. Returns the step's held-out metrics (alike on
    every rank), with evals.jsonl appended by the master; None when a stop signal (a name in the
    list `stop`) on any rank cut it short: then nothing is written, and the next start does it again."""
    t0, mine, pending = time.time(), list(range(rank, len(rows), world)), []
    model.eval()
    for ks in (mine[i:i + batch] for i in range(0, len(mine), batch)):
        if stop:
            break

        def to_judge(b, _, story, ks=ks):
            if not stop:
                pending.append((ks[b], story, judge.submit(rows[ks[b]]["prompt"], rows[ks[b]]["target_words"], story.text)))
        rollout.sample(model, tok, [rollout.render_prompt(tok, rows[k]["prompt"], enable_thinking) for k in ks],
                       seeds=[seed + k for k in ks], n=1, eos=eos, max_new_tokens=max_new_tokens,
                       enable_thinking=enable_thinking, on_done=to_judge, should_stop=lambda: bool(stop), **EVAL_SAMPLING)
    done = [(k, s.text, rubric.count_words(s.thinking), s.truncated, f.result()) for k, s, f in pending] \
        if judge_http.wait([f for _, _, f in pending], stop) else None  # what the master writes, not the token ids
    parts = [done]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, done)
    if any(p is None for p in parts):
        return None
    results = sorted((r for p in parts for r in p), key=lambda r: r[0])
    records = [dict(step=step, id=rows[k]["id"], prompt=rows[k]["prompt"], target_words=rows[k]["target_words"],
                    story=text, thinking_words=thinking, truncated=truncated, judge_reply=j["reply"],
                    **{key: j[key] for key in ("sq", "ratio", "scores", "error")})
               for k, text, thinking, truncated, j in results]
    m = dict(heldout_sq=_mean(r["sq"] for r in records), heldout_length_ratio=_mean(r["ratio"] for r in records),
             heldout_n=sum(not math.isnan(r["sq"]) for r in records), t_eval=time.time() - t0,
             eval_judge_cost=sum(r[-1]["cost"] for r in results))
    buckets = [b for b, _ in BUCKETS if any(bucket(r["target_words"]) == b for r in records)]
    for b in buckets if len(buckets) > 1 else []:  # ID 1-4k -> heldout_sq_id, near OOD 4-8k -> heldout_sq_near, ...
        these = [r for r in records if bucket(r["target_words"]) == b]
        key = b.split()[0].lower()
        m.update({f"heldout_sq_{key}": _mean(r["sq"] for r in these),
                  f"heldout_n_{key}": sum(not math.isnan(r["sq"]) for r in these),
                  f"heldout_length_ratio_{key}": _mean(r["ratio"] for r in these)})
    if rank == 0:
        with open(os.path.join(out_dir, "evals.jsonl"), "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))  # one write: the step's rows together
    return m


def _mean(values):
    v = [x for x in values if not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


def log(out_dir, step, max_steps, m, master, wandb=None):
    """A step's evaluation alone, when no training step comes with it (step 0, or one redone
    after a resume): its own row of metrics.jsonl and its own line."""
    if master:
        print(f"step {step}/{max_steps}{checkpoint.heldout_line(m)} | len {m['heldout_length_ratio']:.2f} | "
              f"${m['eval_judge_cost']:.2f} | {m['t_eval']:.0f}s", flush=True)
        with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(dict(m, step=step)) + "\n")
        if wandb:
            wandb.log(m, step=step)


def summary(out_dir):
    """'; held-out SQ a at step i -> b at step j' from metrics.jsonl, for the run's closing line."""
    path = os.path.join(out_dir, "metrics.jsonl")
    held = [r for r in map(json.loads, open(path)) if "heldout_sq" in r] if os.path.exists(path) else []
    ends = [f"{r['heldout_sq']:.1f} at step {r['step']}" for r in (held[:1] + held[-1:] if len(held) > 1 else held)]
    return f"; held-out SQ {' -> '.join(ends)} (evals.jsonl)" if held else ""
