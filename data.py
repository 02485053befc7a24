"""
The data: JSONL rows {"id", "prompt", "target_words", "story"} (data/prepare.py builds them;
docs/data.md). Every rule a row must meet lives here; a bad row is named as path:line with the
reason, before any model work. eval.py and `judge.py score` read generations by the same rules.
"""
import hashlib
import json
import re

import rubric

MAX_REF_WORDS = 4000  # the paper's references are at most 4,000 words
MAX_TARGET_WORDS = 100_000  # a novel: no model's context holds more; a larger request is a typo
# Qwen's chat-format tokens. A text holding one cannot be rendered faithfully: Qwen3.5's template
# moves whatever precedes </think> out of the answer, so such a story cannot be teacher-forced.
CHAT_MARKERS = ("<think>", "</think>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")


def row_problem(row, max_words=MAX_REF_WORDS, allow_empty=False, special_tokens=CHAT_MARKERS, story=True):
    """Why a row is bad, or None. story=False: a prompt row (id, prompt, target_words) alone."""
    if not isinstance(row, dict):
        return "not a JSON object"
    missing = [k for k in ("id", "prompt", "target_words") + ("story",) * story if k not in row]
    if missing:
        return "missing field " + ", ".join(repr(k) for k in missing)
    if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)) or row["id"] == "":
        return f"id must be a string or an integer, got {row['id']!r}"
    if not isinstance(row["prompt"], str) or rubric.is_blank(row["prompt"]):
        return "empty prompt"
    t = row["target_words"]
    if isinstance(t, bool) or not isinstance(t, int) or not 0 < t <= MAX_TARGET_WORDS:
        return f"target_words must be a positive integer up to {MAX_TARGET_WORDS}, got {t!r}"
    if not story:
        return None
    if not isinstance(row["story"], str):
        return "story must be a string"
    if not allow_empty and rubric.is_blank(row["story"]):
        return "empty story"
    if max_words and rubric.count_words(row["story"]) > max_words:
        return f"story has {rubric.count_words(row['story'])} words, over max_ref_words={max_words}"
    for field in ("prompt", "story"):
        token = next((t for t in special_tokens if t in row[field]), None)
        if token:
            return f"{field} contains the special token {token!r} of the chat format"
    return None


def load_rows(path, max_words=MAX_REF_WORDS, allow_empty=False, skip_bad=False, special_tokens=CHAT_MARKERS,
              check=None, warn=True):
    """Read and validate a JSONL file. Every bad row is named as path:line and reason; by default
    any bad row raises ValueError (skip_bad=True prints them and drops the rows). special_tokens:
    strings no prompt or story may contain (train.py adds its tokenizer's). check(row) -> a reason
    or None: the caller's own test of a valid row (train.py: its length in tokens)."""
    rows, bad, seen = [], [], set()
    with open(path, "rb") as f:  # bytes, so that a line that is not UTF-8 is named, not the file
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
            except UnicodeDecodeError as e:
                bad.append(f"{path}:{i}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})")
                continue
            except json.JSONDecodeError as e:
                bad.append(f"{path}:{i}: invalid JSON ({e.msg})")
                continue
            problem = row_problem(row, max_words, allow_empty, special_tokens) or (check and check(row))
            if problem is None and row["id"] in seen:
                problem = f"duplicate id {row['id']!r}"
            if problem:
                bad.append(f"{path}:{i}: {problem}")
                continue
            seen.add(row["id"])
            rows.append(row)
    if bad and not skip_bad:
        raise ValueError(f"{len(bad)} bad row(s) in {path}:\n  " + "\n  ".join(bad))
    for b in bad:
        print(f"skipping {b}")
    if not rows:
        raise ValueError(f"{path}: no usable rows")
    if warn:
        warn_uncounted(path, rows)
    return rows


def warn_uncounted(path, rows):
    """Once per file, not an error: count_words splits at spaces, so it undercounts text written
    without them (Chinese, Japanese, Thai: an 840-character story is one word) and the length
    score of such a story is wrong. Over 15 letters per word marks it; English averages 5."""
    odd = [r["id"] for r in rows if len(re.findall(r"[^\W_]", r["story"])) > 15 * max(1, rubric.count_words(r["story"]))]
    if odd:
        print(f"warning: {path}: {len(odd)} stories (id {odd[0]!r} first) average over 15 letters per word: "
              "count_words counts words by spaces, and undercounts text written without them (Chinese, Thai, ...)")


def same_prompt(text):
    """Prompts compared as a person reads them: a trailing space or a capital makes no other prompt."""
    return " ".join(text.split()).casefold()


def load(train_data, max_ref_words, eval_data=""):
    """The training rows and the held-out rows (eval_data, '' for none), with no tokenizer, so that
    a wrong path is named before anything waits on the network; a held-out row whose id or prompt
    is also a training row's is refused. Returns (rows, held-out rows, sha256 of the training file)."""
    key = "train_data"
    try:
        rows, eval_rows = load_rows(train_data, max_words=max_ref_words), []
        key = "eval_data"
        eval_rows = load_rows(eval_data, max_words=None) if eval_data else []
    except FileNotFoundError as e:
        raise ValueError(f"{key}: {e}") from None
    trained = {t["id"] for t in rows} | {same_prompt(t["prompt"]) for t in rows}
    seen = [r["id"] for r in eval_rows if r["id"] in trained or same_prompt(r["prompt"]) in trained]
    if seen:  # held out means never trained on
        raise ValueError(f"eval_data: {len(seen)} of its rows are in train_data too (id {seen[0]!r} first): held-out "
                         "prompts must not be trained on")
    return rows, eval_rows, hashlib.sha256(open(train_data, "rb").read()).hexdigest()


def check_tokens(tok, model_config, rows, eval_rows, paths, max_new_tokens, max_ref_words, with_ref, thinking):
    """The rows again, with the tokenizer in use: no special token of it in a prompt or story, and
    every prompt with max_new_tokens, and every prompt with its reference (with_ref), within the
    model's positions. paths: (train_data, eval_data). Returns the longest sequence a row makes."""
    import rollout
    longest, positions = 0, model_config.get_text_config().max_position_embeddings

    def too_long(row):
        nonlocal longest
        n = len(rollout.render_prompt(tok, row["prompt"], thinking))
        answer = [dict(role="user", content=row["prompt"]), dict(role="assistant", content=row["story"])]
        m = len(tok(tok.apply_chat_template(answer, tokenize=False, enable_thinking=thinking),
                    add_special_tokens=False).input_ids) if with_ref and row["story"] else 0
        longest = max(longest, n + max_new_tokens, m)
        if n + max_new_tokens > positions:
            return f"the prompt is {n:,} tokens: with max_new_tokens={max_new_tokens:,} more than the model's {positions:,}"
        if m > positions:
            return f"the prompt and its reference story are {m:,} tokens, more than the model's {positions:,}"
    specials = sorted(set(CHAT_MARKERS) | set(tok.all_special_tokens))
    load_rows(paths[0], max_words=max_ref_words, special_tokens=specials, check=too_long, warn=False)
    if eval_rows:  # only the held-out prompts: with max_new_tokens, they must fit too
        load_rows(paths[1], max_words=None, special_tokens=specials, warn=False,
                  check=lambda row: too_long(dict(row, story="")))
    return longest
