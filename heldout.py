"""
Held-out evaluation during training (eval_interval): at step 0, every eval_interval steps and at
the last, the policy writes a story per held-out prompt with the evaluation's sampling, and an
evaluation judge of its own (eval_judge_*) scores it. A policy pleasing its training judge shows a
rising reward and a flat held-out SQ (docs/training.md). The seed is the same at every evaluation:
a step's stories are those `eval.py --task=generate` draws from its checkpoint, and two steps
differ by the policy alone. Ranks share the prompts as they share groups; nothing here touches
the training's numbers.
"""
import math
import os
import time

import torch.distributed as dist

import judge
import jsonl
import rollout
import rubric
from configurator import check_ranges

EVAL_SAMPLING = dict(temperature=0.6, top_p=0.95, top_k=20, repetition_penalty=1.0, presence_penalty=0.0)  # eval.py's


def judge_settings(c):
    """The evaluation judge's settings: each eval_judge_* that is set, else the training judge's,
    typed and ranged like the training judge's (an error names the eval_ key)."""
    out = {}
    for k in judge.SETTINGS:  # train.py's eval_judge_url, eval_judge_model, ...
        v, like = c[f"eval_{k}"], c[k]
        if v is not None and type(v) is not type(like) and not (type(like) is float and type(v) is int):
            raise ValueError(f"eval_{k}={v!r} must be {type(like).__name__} like {k}={like!r}, or None (the same)")
        out[k] = like if v is None else type(like)(v)
    check_ranges({f"eval_{k}": v for k, v in out.items()}, {f"eval_{k}": r for k, r in judge.RANGES.items() if k in out})
    return dict(out, length_weight=c["length_weight"])


def client(c, cache_dir):
    """The evaluation judge's client, or None when eval_interval is 0."""
    if not c["eval_interval"]:
        return None
    return judge.from_config(judge_settings(c), cache_dir=cache_dir,
                             url_setting="judge_url" if c["eval_judge_url"] is None else "eval_judge_url")


def due(step, eval_interval, max_steps):
    return bool(eval_interval) and (step % eval_interval == 0 or step == max_steps)


def missing(out_dir, step, eval_interval, max_steps, rows, rank=0, world=1):
    """Every rank together: whether the evaluation of `step` is due at the start of a run and not
    in evals.jsonl (step 0's, or one a stop signal cut short). The master decides, after it has
    moved an abandoned run's logs aside, and tells the others."""
    if not due(step, eval_interval, max_steps):
        return False
    done = jsonl.read(os.path.join(out_dir, "evals.jsonl"), must_exist=False) if rank == 0 else []
    answer = [not {r["id"] for r in done if r["step"] == step} >= {r["id"] for r in rows}]
    if world > 1:
        dist.broadcast_object_list(answer, src=0)
    return answer[0]


def evaluate(model, tok, rows, client, step, out_dir, seed, eos, max_new_tokens, thinking, batch, rank=0,
             world=1, signals=()):
    """Every rank together: this rank's held-out prompts (rows r, r + world, ...), decoded `batch`
    at a time, each story to the evaluation judge (client) as it ends. Returns the step's held-out
    metrics (alike on every rank), with evals.jsonl appended by the master; None when a stop signal
    (a name in the list `signals`) on any rank cut it short: then nothing is written, and the next
    start does it again."""
    t0, mine, pending = time.time(), list(range(rank, len(rows), world)), []
    model.eval()
    for ks in (mine[i:i + batch] for i in range(0, len(mine), batch)):
        if signals:
            break

        def to_judge(b, _, story, ks=ks):
            if not signals:
                pending.append((ks[b], story, client.submit(rows[ks[b]]["prompt"], rows[ks[b]]["target_words"], story.text)))
        rollout.sample(model, tok, [rollout.render_prompt(tok, rows[k]["prompt"], thinking) for k in ks],
                       seeds=[seed + k for k in ks], n=1, eos=eos, max_new_tokens=max_new_tokens,
                       enable_thinking=thinking, on_story=to_judge, should_stop=lambda: bool(signals),
                       **EVAL_SAMPLING)
    done = [(k, s.text, rubric.count_words(s.thinking), s.truncated, f.result()) for k, s, f in pending] \
        if judge.wait([f for _, _, f in pending], signals) else None  # what the master writes, not the token ids
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
    buckets = [b for b, _ in rubric.BUCKETS if any(rubric.bucket(r["target_words"]) == b for r in records)]
    for b in buckets if len(buckets) > 1 else []:  # ID 1-4k -> heldout_sq_id, near OOD 4-8k -> heldout_sq_near, ...
        these = [r for r in records if rubric.bucket(r["target_words"]) == b]
        key = b.split()[0].lower()
        m.update({f"heldout_sq_{key}": _mean(r["sq"] for r in these),
                  f"heldout_n_{key}": sum(not math.isnan(r["sq"]) for r in these),
                  f"heldout_length_ratio_{key}": _mean(r["ratio"] for r in these)})
    if rank == 0:
        jsonl.append(os.path.join(out_dir, "evals.jsonl"), records)  # one write: the step's rows together
    return m


def _mean(values):
    v = [x for x in values if not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan
