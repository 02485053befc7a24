"""
Everything between the model and the loss, as plain functions: a group's stories (sampled, and
the teacher-forced human reference), collation, chunked log-probs, advantages, the GRPO loss.
Training sequences are prompt + completion, right-padded (generation left-pads its prompts); a
(B, T-1) `mask` says which next-token predictions are trained, built from lengths, never from
token ids (pad may equal eos).
Derivations: docs/code.md.
"""
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, StoppingCriteria

# -----------------------------------------------------------------------------
# a story of a group


@dataclass
class Story:
    """One member of a group: a sampled story, or the human reference (is_ref)."""
    prompt_ids: list
    completion_ids: list  # through the end-of-turn token, or max_new_tokens long when truncated
    mask: list  # per completion token: 1 if trained
    text: str  # what the judge reads: the answer after the thinking
    is_ref: bool = False
    thinking: str = ""
    truncated: bool = False  # hit max_new_tokens
    in_thinking: bool = False  # ...before the story began: an empty story
    sample_logp: list = None  # each sampled token's log-prob under the distribution it came from
    judgement: dict = None  # judge.py's result: reward, sq, ratio (words / target), scores, error
    adv: float = 0.0


def render_prompt(tok, prompt, enable_thinking):
    """The user turn plus the assistant's generation prompt, as token ids."""
    text = tok.apply_chat_template([dict(role="user", content=prompt)], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=enable_thinking)
    return tok(text, add_special_tokens=False).input_ids


def eos_ids(model, tok):
    """Every token id that ends generation (Qwen lists both <|im_end|> and <|endoftext|>)."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted(set(ids) | {tok.eos_token_id})


def reference_story(tok, row, enable_thinking, eos, mask_think=True):
    """HRI: the human story of `row` as a member of its group: the tokens the policy would emit
    after its generation prompt to write it, through the end-of-turn token (the conversation's
    rendering minus the generation prompt's). mask_think: its empty thinking block untrained."""
    story = row["story"].strip()  # templates may trim the answer; the human story must be in it
    user = [dict(role="user", content=row["prompt"])]
    head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True,
                                   enable_thinking=enable_thinking)
    full = tok.apply_chat_template(user + [dict(role="assistant", content=story)], tokenize=False,
                                   enable_thinking=enable_thinking)
    answer = full[len(head):] if full.startswith(head) else ""
    at = answer.find(story)
    ends = [(answer.find(e, at + len(story)), e) for e in (tok.decode([i]) for i in eos)]
    ends = [(pos, e) for pos, e in ends if pos >= 0]
    if at < 0 or not ends:
        raise ValueError("the chat template does not render the story as the answer to its prompt")
    pos, end = min(ends)
    cut = pos + len(end)  # the model never emits the newline the template puts after it
    pre = tok(answer[:at], add_special_tokens=False).input_ids  # Qwen: "<think>\n\n</think>\n\n"
    body = tok(answer[at:cut], add_special_tokens=False).input_ids
    mask = [int(not mask_think)] * len(pre) + [1] * len(body)
    head_ids = tok(head, add_special_tokens=False).input_ids
    return Story(head_ids, pre + body, mask, text=row["story"], is_ref=True)

# -----------------------------------------------------------------------------
# sampling a group


class PresencePenalty(LogitsProcessor):
    """Subtract `penalty` from the logit of each token already generated, as vLLM and OpenAI do."""

    def __init__(self, penalty, prompt_len):
        self.penalty, self.prompt_len = penalty, prompt_len

    def __call__(self, input_ids, scores):
        new = input_ids[:, self.prompt_len:]
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, new, True)
        return scores - self.penalty * seen.to(scores.dtype)


def split_thinking(text, enable_thinking, truncated):
    """-> (thinking, story, truncated_in_thinking): the story follows </think>; with thinking on
    and no </think>, all is thinking."""
    if "</think>" in text:
        thinking, story = text.split("</think>", 1)
        return thinking.replace("<think>", "").strip(), story.strip(), False
    if enable_thinking:
        return text.replace("<think>", "").strip(), "", truncated
    return "", text.strip(), False


class RowSampler(LogitsProcessor):
    """The last logits processor: draws each row's token from softmax(scores) with the row's own
    generator (a story depends on its seed, not its batch, up to a batched forward's rounding) and
    leaves only it for generate() to
    pick; records its log-prob under that distribution for the loss's importance weights."""

    def __init__(self, seeds, device):
        self.gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.logps = []  # one (B,) tensor per decoding step

    def __call__(self, input_ids, scores):
        logp = scores.float().log_softmax(-1)
        pick = torch.cat([torch.multinomial(p, 1, generator=g)
                          for p, g in zip(logp.exp(), self.gens)])
        self.logps.append(logp.gather(1, pick[:, None])[:, 0].cpu())
        return torch.full_like(scores, -float("inf")).scatter_(1, pick[:, None], 0.0)


class OnFinish(StoppingCriteria):
    """on_eos(b, completion_ids) at the decoding step batch row b emits its first eos (to the judge
    while longer ones decode), on_step() after each; stops generation only when should_stop()."""

    def __init__(self, eos, prompt_len, on_eos, on_step=None, should_stop=None):
        self.eos, self.prompt_len, self.on_eos, self.seen = eos, prompt_len, on_eos, None
        self.on_step, self.should_stop = on_step, should_stop

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.isin(input_ids[:, -1], torch.tensor(self.eos, device=input_ids.device))
        if self.seen is None:
            self.seen = torch.zeros_like(done)
        for b in (done & ~self.seen).nonzero()[:, 0].tolist():
            self.on_eos(b, input_ids[b, self.prompt_len:].tolist())
        self.seen |= done  # rows already finished are padded with pad, which may be an eos id
        if self.on_step:
            self.on_step()
        return torch.full_like(done, bool(self.should_stop and self.should_stop()))


@torch.no_grad()
def sample(model, tok, prompts, seeds, n, eos, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
           repetition_penalty=1.0, presence_penalty=0.0, enable_thinking=True, on_story=None,
           on_step=None, should_stop=None):
    """n Stories for each prompt (token id lists), all in one generate() call over left-padded
    prompts; story j of prompt i is drawn with seed seeds[i] * 1000 + j. on_story(i, j, story) is
    called the step it ends (and after generate() for the truncated ones); on_step() after every
    decoding step; should_stop() True ends generation early, the unfinished stories truncated."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    P = max(map(len, prompts))  # the prompts' length, left-padded
    batch = [p for p in prompts for _ in range(n)]  # batch row b: story b % n of prompt b // n
    x = torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in batch], device=model.device)
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in batch], device=model.device)
    # the order generate() uses when it samples: penalties, temperature, top-k, top-p; then our draw
    procs = [PresencePenalty(presence_penalty, P)] if presence_penalty else []
    procs += [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
    procs += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    sampler = RowSampler([seeds[b // n] * 1000 + b % n for b in range(len(batch))], model.device)
    stories = [None] * len(batch)

    def finish(b, ids):
        end = next((i for i, t in enumerate(ids) if t in eos), None)  # 1st eos; None: truncated
        ids = ids[: end + 1] if end is not None else ids[:max_new_tokens]
        text = tok.decode(ids[:-1] if end is not None else ids, skip_special_tokens=False)
        thinking, story, in_thinking = split_thinking(text, enable_thinking, end is None)
        logps = torch.stack(sampler.logps[:len(ids)])[:, b].tolist()
        stories[b] = Story(batch[b], ids, [1] * len(ids), text=story, thinking=thinking,
                           truncated=end is None, in_thinking=in_thinking, sample_logp=logps)
        if on_story:
            on_story(b // n, b % n, stories[b])

    watch = OnFinish(eos, P, finish, on_step=on_step, should_stop=should_stop)
    out = model.generate(input_ids=x, attention_mask=attn, do_sample=False,
                         max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                         logits_processor=procs + [sampler], eos_token_id=eos,
                         pad_token_id=tok.pad_token_id, stopping_criteria=[watch])
    for b, ids in enumerate(out[:, P:].tolist()):
        if stories[b] is None:  # truncated at max_new_tokens
            finish(b, ids)
    return [stories[i * n:(i + 1) * n] for i in range(len(prompts))]

# -----------------------------------------------------------------------------
# collation and log-probabilities


def collate(stories, pad_id):
    """Stories -> input_ids, attention_mask (B, T), and over next-token targets (B, T-1): the mask,
    1 where a story's completion mask is 1, and each sampled token's log-prob under the
    distribution it was drawn from (NaN elsewhere: the reference's tokens were not sampled)."""
    T = max(len(s.prompt_ids) + len(s.completion_ids) for s in stories)
    ids = torch.full((len(stories), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(stories), T, dtype=torch.long)
    mask = torch.zeros(len(stories), T - 1)
    sample_logp = torch.full((len(stories), T - 1), float("nan"))
    for b, s in enumerate(stories):
        p, n = len(s.prompt_ids), len(s.prompt_ids) + len(s.completion_ids)
        ids[b, :n] = torch.tensor(s.prompt_ids + s.completion_ids)
        attn[b, :n] = 1
        mask[b, p - 1: n - 1] = torch.tensor(s.mask, dtype=torch.float)  # target at t: ids[t + 1]
        if s.sample_logp:
            sample_logp[b, p - 1: p - 1 + len(s.sample_logp)] = torch.tensor(s.sample_logp)
    return ids, attn, mask, sample_logp


def _softmax_(x):
    """Row-wise softmax that overwrites x and returns logsumexp(x): one (c, V) buffer, no copy."""
    mx = x.max(-1, keepdim=True).values
    total = x.sub_(mx).exp_().sum(-1, keepdim=True)
    x.div_(total)
    return (total.log_() + mx)[:, 0]


class ChunkedLogProb(torch.autograd.Function):
    """log softmax(h @ W.T / temperature)[target] and the entropy for N rows, `chunk` rows at a
    time, the logits recomputed in backward: one chunk x V buffer, not several N x V (8 GB each)."""

    @staticmethod
    def forward(ctx, h, W, targets, temperature, chunk):  # h (N, H), W (V, H), targets (N,)
        out = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
        ent = torch.empty_like(out)
        for i in range(0, h.shape[0], chunk):
            logits = (h[i:i + chunk] @ W.T).float().div_(temperature)  # (c, V)
            target = logits.gather(1, targets[i:i + chunk, None])[:, 0]
            out[i:i + chunk] = target - _softmax_(logits)  # logits now holds the probabilities p
            for j in range(0, len(logits), 128):  # -p log p, 128 rows at a time: no 2nd buffer
                e = torch.special.entr(logits[j:j + 128]).sum(-1)
                ent[i + j:i + j + len(e)] = e
            del logits  # free it before the next chunk's matmul, or two buffers coexist
        ctx.save_for_backward(h, W, targets)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, g, _):  # g (N,); the entropy has no gradient
        h, W, targets = ctx.saved_tensors
        gh, gW = torch.zeros_like(h), torch.zeros_like(W)
        for i in range(0, h.shape[0], ctx.chunk):
            c = slice(i, i + ctx.chunk)
            hc, tc, gc = h[c], targets[c], g[c] / ctx.temperature
            gl = (hc @ W.T).float().div_(ctx.temperature)  # (c, V), recomputed
            _softmax_(gl)
            gl.mul_(-gc[:, None])  # g (onehot - p) / temperature, in place
            gl[torch.arange(len(tc), device=gl.device), tc] += gc
            gl = gl.to(h.dtype)
            gh[i:i + ctx.chunk] = gl @ W
            gW.addmm_(gl.T, hc)  # accumulated in W's dtype
            del gl
        return gh, gW, None, None, None


def token_logprobs(model, input_ids, attention_mask, mask, temperature=1.0, chunk=1024):
    """(B, T-1) log-probs and entropies of each next token where mask is set, at the sampling
    temperature (the policy that acted), never building the full (B, T, V) logits."""
    h = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # B, T, H
    sel = mask.bool()
    logp, ent = ChunkedLogProb.apply(h[:, :-1][sel], model.get_output_embeddings().weight,
                                     input_ids[:, 1:][sel], temperature, chunk)
    zeros = torch.zeros(mask.shape, device=h.device, dtype=torch.float32)
    return zeros.masked_scatter(sel, logp), zeros.masked_scatter(sel, ent)

# -----------------------------------------------------------------------------
# advantages and loss


def group_advantages(R, scale_rewards="group", eps=1e-4):
    """R (G,) -> (A (G,), zero_std): (R - mean) / (std + eps), or R - mean (scale_rewards='none');
    a NaN reward (the judge failed) is left out and gets 0; zero_std: the group has no signal."""
    ok = ~torch.isnan(R)
    A = torch.zeros_like(R)
    if ok.sum() < 2:
        return A, True
    r = R[ok]
    std = r.std(unbiased=False)  # population std, as in TRL
    A[ok] = r - r.mean()
    if scale_rewards == "group":  # the paper's; scale_rewards='none' leaves R - mean (Dr. GRPO)
        A[ok] = A[ok] / (std + eps)
    return A, bool(std < eps)


def grpo_loss(logp, old_logp, adv, mask, normaliser, is_weight=None, loss_norm="token", clip=None,
              is_ref=None, gamma=0.0, kl_logp=None, kl_coef=0.0):
    """The policy-gradient loss per sequence (B,): -A pi / pi_old per trained token, summed and
    divided by `normaliser`, the trained tokens of the whole batch over every rank (the token
    mean). logp, old_logp, mask (B, T-1), adv (B,). On-policy old_logp is logp detached: the
    ratio is 1 and its gradient is grad log p. is_weight: each sampled token's truncated importance
    weight (the sampler's mismatch). The options after the line are off in both configs."""
    a = adv[:, None]
    policy_ratio = torch.exp(logp - old_logp)  # (B, T-1): pi / pi_old
    w = 1.0 if is_weight is None else is_weight
    per_tok = -a * policy_ratio * w
    # --- options neither config uses, each line tagged with its setting
    if clip is not None:  # num_iterations > 1: a reused batch, PPO's clipped ratio
        clipped = policy_ratio.clamp(1 - clip[0], 1 + clip[1])  # num_iterations
        per_tok = torch.max(per_tok, -a * clipped * w)  # num_iterations
    if gamma:  # ref_shaping_gamma: LUFFY's -A p / (p + gamma) on the references' tokens
        p = torch.exp(logp)  # ref_shaping_gamma
        per_tok = torch.where(is_ref[:, None], -a * p / (p + gamma), per_tok)  # ref_shaping_gamma
    if kl_coef:  # kl_coef: a k3 estimate of KL(pi || pi_init), always >= 0
        d = kl_logp - logp  # kl_coef
        per_tok = per_tok + kl_coef * (torch.exp(d) - d - 1)  # kl_coef
    per_seq = (per_tok * mask).sum(1)
    if loss_norm == "seq":  # loss_norm='seq': every story alike (GRPO's mean per sequence)
        per_seq = per_seq / mask.sum(1).clamp(min=1)  # loss_norm='seq'
    return per_seq / normaliser


def micro_batches(lengths, budget):
    """Indices grouped into micro-batches of at most `budget` padded tokens (count x longest),
    sorted by length so that little is padding; a sequence longer than the budget goes alone."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    out = [[]]
    for i in order:
        if out[-1] and (len(out[-1]) + 1) * lengths[i] > budget:
            out.append([])
        out[-1].append(i)
    return out
