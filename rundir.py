"""
What a training run writes to its folder, out_dir, and reads back: run.lock (one run per out_dir),
run.json (the run's id, its first start's settings, an entry per start), metrics.jsonl (a row a
step, over every rank: docs/training.md), rollouts.jsonl (a row a story), references.jsonl (each
human reference's text once), evals.jsonl (a row per held-out prompt and evaluated step); and
the lines a person reads: the step line, the closing line, the next commands. Only the master
writes; train.py gathers what the ranks computed. Checkpoints are checkpoint.py's.
"""
import atexit
import json
import math
import os
import random
import shutil
import socket
import threading
import time

import jsonl
import rubric

LOGS = ("metrics.jsonl", "rollouts.jsonl", "evals.jsonl")  # rows with a step: trimmed on resume

# -----------------------------------------------------------------------------
# the lock: one run per out_dir (and one annotation page per annotator's file)


def holder(path, stale_s):
    """(what the lock at `path` holds, whether its holder is alive): a process that runs on this
    host, or one on another host that refreshed the lock within stale_s. ({}, False) when there is
    no lock, or none this code wrote ([], null, a pid no process can have: half-written or foreign)."""
    try:
        held, age = json.load(open(path)), time.time() - os.path.getmtime(path)
    except (OSError, ValueError):
        return {}, False
    if not isinstance(held, dict) or not (isinstance(held.get("pid"), int) and 0 < held["pid"] < 2 ** 22):
        return {}, False
    if held.get("host") != socket.gethostname():
        return held, age < stale_s  # another host's: alive while it refreshes the lock
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return held, False
    except PermissionError:
        pass  # another user's process
    return held, True


def take_lock(path, stale_s):
    """The lock file at `path` names its holder (pid, host, since when), is refreshed every
    stale_s / 4 seconds while the holder lives and removed at its exit. A lock whose process is
    gone from this host, unrefreshed for stale_s (a holder on another host, as after a requeue),
    or not one this code wrote, is taken over, and that is said. Raises ValueError when it is held
    or cannot be written. Returns the function that releases it."""
    me = dict(pid=os.getpid(), host=socket.gethostname(), since=time.strftime("%Y-%m-%d %H:%M:%S"))
    for _ in range(2):
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY), "w") as f:
                json.dump(me, f)
            break
        except FileExistsError:
            pass
        except OSError as e:  # a full disk, a read-only folder
            if os.path.exists(path) and not os.path.getsize(path):
                os.remove(path)
            raise ValueError(f"cannot write {path}: {e.strerror}") from None
        held, alive = holder(path, stale_s)
        alive = alive and held != me and held.get("pid") != me["pid"]  # not this process's own
        age = time.time() - os.path.getmtime(path) if os.path.exists(path) else math.inf
        if alive and age < stale_s:
            raise ValueError(f"{path} is in use by pid {held['pid']} on {held.get('host')} since {held.get('since')} "
                             f"(refreshed {age:.0f} s ago, taken over after {stale_s:g} s): wait for it, stop it, or use "
                             "another folder")
        print(f"taking over {path}" + (": it holds no lock this code wrote" if not held else
              f" from pid {held['pid']} on {held.get('host')}: " + ("not running" if held.get("host") == me["host"]
                                                                     and not alive else f"not refreshed for {age:.0f} s")))
        if os.path.exists(path):
            os.remove(path)
    else:
        raise ValueError(f"another run took {path} at the same moment")

    def release():
        try:
            if json.load(open(path)) == me:
                os.remove(path)
        except (OSError, ValueError):
            pass  # taken over: not ours to remove

    def refresh():
        while True:
            time.sleep(stale_s / 4)
            try:
                os.utime(path)
            except OSError:
                return
    atexit.register(release)
    threading.Thread(target=refresh, daemon=True).start()
    return release

# -----------------------------------------------------------------------------
# run.json, and the logs made ready for a start or a resume


def prepare(out_dir, state, config, world_size, changed=None):
    """Before the first step: remove a checkpoint whose writer was killed, and for a new run in a
    folder with logs but no checkpoint (resume='auto' after a run killed before its first save)
    move the old logs aside, never mixing them with the new. Write run.json: the run's id, the
    settings of its first start, and one entry per start (its step, world size, the settings
    changed on resume); its presence says that the logs count steps from 1. Returns the run's id."""
    for tmp in (os.path.join(out_dir, d) for d in os.listdir(out_dir) if d.startswith(".tmp_ckpt_")):
        shutil.rmtree(tmp)
    logs = [f for f in LOGS + ("references.jsonl", "run.json") if os.path.exists(os.path.join(out_dir, f))]
    if not state and logs:
        aside = os.path.join(out_dir, f"abandoned_{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(aside)
        for f in logs:
            os.rename(os.path.join(out_dir, f), os.path.join(aside, f))
        print(f"{out_dir} held logs but no checkpoint: starting over, the old logs moved to {aside}")
    try:
        old = json.load(open(os.path.join(out_dir, "run.json"))) if state else {}
    except (OSError, ValueError):
        old = {}
    run_id = state.get("run_id") or f"{time.strftime('%Y%m%d%H%M%S')}{random.Random().randrange(16 ** 6):06x}"
    start = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), step=state.get("step", 0), world_size=world_size,
                 changed=changed or {})
    jsonl.write_json(os.path.join(out_dir, "run.json"), dict(run_id=run_id, config=old.get("config") or config,
                                                           starts=old.get("starts", []) + [start]))
    return run_id


def settings(out_dir):
    """The settings in force of the run in out_dir, from its run.json: the first start's, with each
    resume's changes; {} before run.json is written (or in a folder from before it)."""
    try:
        run = json.load(open(os.path.join(out_dir, "run.json")))
        config = dict(run["config"])
        for start in run.get("starts", []):
            config.update({k: now for k, (_, now) in start.get("changed", {}).items()})
        return config
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def trim_logs(out_dir, step, later):
    """Drop the rows of the logs written after the checkpoint of `step` (and a half-written last
    line): each written anew beside the old one, then swapped in. When the run continues from an
    older checkpoint than its newest (`later`: the checkpoints after it), nothing is dropped: those
    checkpoints and the rows after `step` are moved into out_dir/abandoned_TIME/, and that is said.
    A run folder from before run.json counted steps from 0: its rows are renumbered from 1 on the
    way. Raises OSError, with every file as it was, when a write fails (a full disk)."""
    paths = [p for p in (os.path.join(out_dir, n) for n in LOGS) if os.path.exists(p)]
    aside = os.path.join(out_dir, f"abandoned_{time.strftime('%Y%m%d-%H%M%S')}") if later else None
    shift = 0 if os.path.exists(os.path.join(out_dir, "run.json")) else 1
    try:
        for path in paths:
            with open(path, encoding="utf-8", errors="replace") as src, open(path + ".tmp", "w") as kept, \
                    open(path + ".later" if aside else os.devnull, "w") as rest:  # kept aside, or dropped
                for line in src:
                    try:
                        row = json.loads(line)
                        out = kept if row["step"] + shift <= step else rest
                        out.write(json.dumps(dict(row, step=row["step"] + shift)) + "\n" if shift else
                                  line if line.endswith("\n") else line + "\n")
                    except (ValueError, KeyError, TypeError):
                        pass  # the half-written last line of a run killed during the append
                for f in (kept, rest) if aside else (kept,):
                    f.flush()
                    os.fsync(f.fileno())
    except OSError as e:
        for tmp in (p + end for p in paths for end in (".tmp", ".later")):
            if os.path.exists(tmp):
                os.remove(tmp)
        raise OSError(f"cannot rewrite {path} to drop the rows after step {step}: {e.strerror}; the logs are "
                      "unchanged. Free some space and run the same command again") from None
    if aside:  # continuing from an older checkpoint: what came after it is kept, out of the run's way
        os.makedirs(aside)
        for p in later:
            os.rename(p, os.path.join(aside, os.path.basename(p)))
    for path in paths:
        if aside:
            os.rename(path + ".later", os.path.join(aside, os.path.basename(path)))
        os.replace(path + ".tmp", path)
    if aside:
        print(f"continuing from step {step}, older than the newest checkpoint: "
              f"{', '.join(os.path.basename(p) for p in later)} and the log rows after step {step} moved to {aside}")
    if shift:  # renumbered: prepare() writes run.json in full, this says so should the run stop before it
        with open(os.path.join(out_dir, "run.json"), "w") as f:
            json.dump({}, f)

# -----------------------------------------------------------------------------
# a step's metrics: this rank's sums (train.py reduces them over the ranks), then the means


def step_sums(groups, tally, signals):
    """This rank's part of the step's metrics: [sum, count] for each mean (a NaN, a failed
    judgement, counts nowhere), plain sums for the totals, 'stop' among them (the rank's vote)."""
    rolls = [s for g in groups for s in g if not s.is_ref]
    refs = [s for g in groups for s in g if s.is_ref and not math.isnan(s.judgement["reward"])]
    stories = [s for g in groups for s in g]

    def pair(values):
        v = [x for x in values if not math.isnan(x)]
        return [sum(v), len(v)]
    means = dict(reward=pair(s.judgement["reward"] for s in rolls), ref_reward=pair(s.judgement["reward"] for s in refs),
                 sq=pair(s.judgement["sq"] for s in rolls), length_ratio=pair(s.judgement["ratio"] for s in rolls),
                 truncated=pair(s.truncated for s in rolls), truncated_in_thinking=pair(s.in_thinking for s in rolls),
                 ref_nll=[tally["ref_nll"], tally["ref_tok"]], entropy=[tally["ent_sum"], tally["ent_tok"]],
                 ref_adv=pair(s.adv for s in refs), ref_adv_neg=pair(float(s.adv < 0) for s in refs),
                 ref_rank=pair(1.0 + sum(s.judgement["reward"] > r.judgement["reward"] for s in g)  # 1: the best
                               for g in groups for r in g if r.is_ref and not math.isnan(r.judgement["reward"])),
                 is_ratio_mean=[tally["is_sum"], tally["is_tok"]] if tally["is_tok"] else [1.0, 1.0],
                 is_clipped_frac=[tally["is_clip"], tally["is_tok"]] if tally["is_tok"] else [0.0, 1.0])
    totals = dict(zero_std_groups=tally["zero_std"], idle_passes=tally["idle"], stop=len(signals),
                  judge_failures=sum(s.judgement["error"] is not None for s in stories),
                  judge_tokens=sum(s.judgement["tokens_in"] + s.judgement["tokens_out"] for s in stories),
                  judge_cost=sum(s.judgement["cost"] for s in stories), loss_on=tally["loss_on"], loss_off=tally["loss_off"],
                  gen_tokens=sum(len(s.completion_ids) for s in rolls), train_tokens=tally["train_tokens"],
                  **{k: tally[k] for k in TIMES})
    return means, totals


TIMES = ("t_generate", "t_judge_wait", "t_train", "t_sync", "t_checkpoint")


def step_metrics(step, means, totals, tally, world, has_refs):
    """The row of metrics.jsonl from the sums over every rank (means, totals, seconds a rank), and
    whether any rank was asked to stop."""
    m = {k: s / n if n else math.nan for k, (s, n) in means.items()}
    m.update(totals)
    halt = m.pop("stop") > 0
    m["loss"] = m["loss_on"] + m["loss_off"]
    if not has_refs:
        m["loss_off"] = math.nan  # no references: the loss is the sampled stories' alone
    for k in TIMES:
        m[k] /= world  # mean seconds per rank
    m.update(step=step, t_step=time.time() - tally["t0"], grad_norm=tally["grad_norm"], skipped=tally["skipped"],
             lr=tally["lr"], gen_tok_per_s=m["gen_tokens"] / max(m["t_generate"] * world, 1e-9),
             train_tok_per_s=m["train_tokens"] / max(m["t_train"] * world, 1e-9))
    return m, halt


def story_rows(step, ids, groups):
    """This rank's rows of rollouts.jsonl (a row a story, the group's prompt on its first, the
    judge's reply on each; a reference's text is not repeated) and its groups' human references."""
    records = [dict(step=step, group=gid, id=row["id"], **(dict(prompt=row["prompt"], target_words=row["target_words"])
                                                           if j == 0 else {}),
                    is_ref=s.is_ref, story=None if s.is_ref else s.text, thinking_words=rubric.count_words(s.thinking),
                    truncated=s.truncated, adv=s.adv, judge_reply=s.judgement["reply"],
                    **{k: s.judgement[k] for k in ("reward", "sq", "ratio", "scores", "error")})
               for (gid, row), g in zip(ids, groups) for j, s in enumerate(g)]
    references = [dict(id=row["id"], prompt=row["prompt"], target_words=row["target_words"], story=row["story"])
                  for (_, row), g in zip(ids, groups) if any(s.is_ref for s in g)]
    return records, references

# -----------------------------------------------------------------------------
# what the master writes and prints


def step_line(m, max_steps):
    """What a person watches; every other number is in metrics.jsonl (docs/training.md)."""
    return (f"step {m['step']}/{max_steps} | reward {m['reward']:.1f} (ref {m['ref_reward']:.1f}) | sq {m['sq']:.1f} | "
            f"len {m['length_ratio']:.2f} | entropy {m['entropy']:.2f} | gnorm {m['grad_norm']:.2f}"
            + (" SKIPPED" if m["skipped"] else "") + (f" | judge fail {m['judge_failures']:.0f}" if m["judge_failures"]
                                                      else "") + (heldout_line(m) if "heldout_sq" in m else "")
            + f" | ${m['judge_cost']:.2f} | {m['t_step']:.0f}s")


def heldout_line(m):
    return f" | heldout sq {m['heldout_sq']:.1f} (n {m['heldout_n']})"


def log_step(out_dir, m, records, references, max_steps, wandb=None):
    """The step line, then metrics.jsonl, rollouts.jsonl and the new human references appended."""
    print(step_line(m, max_steps), flush=True)
    jsonl.append(os.path.join(out_dir, "metrics.jsonl"), [m])
    jsonl.append(os.path.join(out_dir, "rollouts.jsonl"), records)
    new_references(out_dir, references)
    if wandb:
        wandb.log(m, step=m["step"])  # a wandb Run


def log_heldout(out_dir, step, max_steps, m, wandb=None):
    """A step's evaluation alone, when no training step comes with it (step 0, or one redone
    after a resume): its own row of metrics.jsonl and its own line."""
    print(f"step {step}/{max_steps}{heldout_line(m)} | len {m['heldout_length_ratio']:.2f} | "
          f"${m['eval_judge_cost']:.2f} | {m['t_eval']:.0f}s", flush=True)
    jsonl.append(os.path.join(out_dir, "metrics.jsonl"), [dict(m, step=step)])
    if wandb:
        wandb.log(m, step=step)


_written = {}  # out_dir -> the ids in its references.jsonl


def new_references(out_dir, references):
    """Append the human references that references.jsonl does not hold yet: each once per run."""
    path = os.path.join(out_dir, "references.jsonl")
    if out_dir not in _written:  # once a run: what is there, less a line half-written when a run was killed
        _written[out_dir] = {r["id"] for r in jsonl.read(path, must_exist=False, repair=True)}
    new = [r for r in {r["id"]: r for r in references}.values() if r["id"] not in _written[out_dir]]
    jsonl.append(path, new)
    _written[out_dir] |= {r["id"] for r in new}


def closing_lines(out_dir, max_steps, base, thinking, tiny, max_new_tokens):
    """'done: ...' with the first and last held-out SQ, and what to run next, as it can be copied:
    the final checkpoint's and its base's stories into out_dir's sibling eval/ folder, named for
    the run (a checkpoint tells generation whether it thinks; the base needs it said). The tiny
    run asks for no longer stories than it trained on, for 60 prompts."""
    final, name = f"{out_dir}/ckpt_{max_steps:06d}", os.path.basename(os.path.normpath(out_dir))
    held = [r for r in jsonl.read(f"{out_dir}/metrics.jsonl", must_exist=False) if "heldout_sq" in r]
    ends = " -> ".join(f"{r['heldout_sq']:.1f} at step {r['step']}" for r in held[:1] + held[1:][-1:])
    out = os.path.join(os.path.dirname(os.path.normpath(out_dir)), "eval", name)
    small = f" --max_new_tokens={max_new_tokens} --limit=60" if tiny else ""
    gen = "  python eval.py --task=generate --model={} --name={} --out={}.jsonl" + small
    return (f"done: {max_steps} steps" + (f"; held-out SQ {ends} (evals.jsonl)" if held else "")
            + f"; the final checkpoint is {final}\nnext: stories of the final checkpoint and of its "
            f"base for {'60' if tiny else 'the 180'} evaluation prompts (docs/evaluation.md):\n"
            + gen.format(final, name, out) + "\n" + gen.format(base, f"{name}-base", f"{out}-base")
            + ("" if thinking else " --enable_thinking=False"))
