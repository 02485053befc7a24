import math

import pytest
import torch

import preflight
import rollout
import tiny as tiny_model

DATA = ["data/sample/train.jsonl", "data/sample/heldout.jsonl"]


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model.build_tiny(DATA, seed=0)
    return model, tok


def test_group_advantages_hand_computed():
    R = torch.tensor([1.0, 2, 3, 4, 5, 6], dtype=torch.float64)
    A, flat = rollout.group_advantages(R)
    std = math.sqrt(sum((r - 3.5) ** 2 for r in range(1, 7)) / 6)
    assert torch.allclose(A, (R - 3.5) / (std + 1e-4)) and not flat, "(R - mean) / (std + eps), population std"
    A, _ = rollout.group_advantages(R, "none")
    assert torch.allclose(A, R - 3.5), "scale_rewards='none' is R - mean"
    A, flat = rollout.group_advantages(torch.tensor([1.0, math.nan, 3.0], dtype=torch.float64))
    assert A[1] == 0 and torch.allclose(A[[0, 2]], torch.tensor([-1.0, 1.0], dtype=torch.float64) / (1 + 1e-4)), \
        "a NaN reward is left out of mean and std and gets advantage 0"
    A, flat = rollout.group_advantages(torch.tensor([5.0, 5.0, 5.0]))
    assert flat and torch.all(A == 0), "a zero-std group carries no signal"


def story(prompt_ids, completion_ids):
    return rollout.Story(prompt_ids, completion_ids, [1] * len(completion_ids), text="")


def _batch():
    torch.manual_seed(0)
    logp = torch.randn(3, 5, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.float64)
    adv = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    return logp, mask, adv


@pytest.mark.parametrize("norm, denom", [("token", 9.0), ("seq", 3.0), ("constant", 3.0 * 8)])
def test_loss_normalisations_and_ratio_one_gradient(norm, denom):
    logp, mask, adv = _batch()
    loss = rollout.grpo_loss(logp, logp.detach(), adv, mask, denom, loss_norm=norm).sum()
    per_seq = -(adv[:, None] * mask).sum(1)  # ratio is 1: each token contributes -A
    expected = (per_seq / mask.sum(1)).sum() / denom if norm == "seq" else per_seq.sum() / denom
    assert torch.allclose(loss, expected), f"{norm}: {loss.item()} != {expected.item()}"
    loss.backward()
    scale = mask.sum(1, keepdim=True) if norm == "seq" else 1.0
    assert torch.allclose(logp.grad, -adv[:, None] * mask / scale / denom), "gradient must be -A * grad(log p)"


def test_policy_shaping_gradient_matches_luffy():
    logp, mask, adv = _batch()
    logp = (logp.detach() - 2).requires_grad_()  # p = exp(logp) spread over (0, 1)
    shaped, gamma = torch.tensor([False, True, True]), 0.1
    per_seq = rollout.grpo_loss(logp, logp.detach(), adv, mask, 9.0, is_ref=shaped, gamma=gamma)
    per_seq.sum().backward()
    p = logp.detach().exp()
    expect = -adv[:, None] * mask / 9.0  # -A * grad log p for the sampled story
    expect[1:] = (-adv[:, None] * gamma * p / (p + gamma) ** 2 * mask / 9.0)[1:]  # shaped references
    assert torch.allclose(logp.grad, expect), "gradient of -A p/(p+gamma) is -A gamma p/(p+gamma)^2 grad log p"
    assert torch.allclose(per_seq[1:], (-adv[:, None] * p / (p + gamma) * mask).sum(1)[1:] / 9.0), "the shaped loss value"
    weight = gamma * p / (p + gamma) ** 2
    assert weight.max() <= 1 / (4 * gamma) + 1e-9 and weight[p > 0.5].max() < 0.25, "bounded, and small for likely tokens"


def test_clipping_acts_only_off_policy():
    logp, mask, adv = _batch()
    old = logp.detach() - 0.5  # ratio e^0.5 = 1.65 > 1 + 0.28 for every token
    loss = rollout.grpo_loss(logp, old, adv, mask, 9.0, clip=(0.2, 0.28)).sum()
    loss.backward()
    assert torch.all(logp.grad[adv > 0] == 0), "positive advantage past 1 + clip_high: clipped, no gradient"
    assert torch.all(logp.grad[1][mask[1] > 0] != 0), "negative advantage is not clipped above"


def test_kl_term_is_zero_at_the_reference_and_positive_elsewhere():
    logp, mask, adv = _batch()
    base = rollout.grpo_loss(logp, logp.detach(), adv, mask, 9.0).sum()
    same = rollout.grpo_loss(logp, logp.detach(), adv, mask, 9.0, kl_logp=logp.detach(), kl_coef=0.1).sum()
    moved = rollout.grpo_loss(logp, logp.detach(), adv, mask, 9.0, kl_logp=logp.detach() - 1, kl_coef=0.1).sum()
    assert torch.allclose(base, same) and moved > base, "k3 KL: 0 at the reference, positive away from it"


def test_chunked_logprobs_equal_naive_with_gradients():
    torch.manual_seed(0)
    N, H, V = 37, 16, 301
    h = torch.randn(N, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    t = torch.randint(0, V, (N,))
    w = torch.randn(N)  # a random downstream weighting, so every gradient path is exercised
    naive = (h @ W.T / 0.7).log_softmax(-1).gather(1, t[:, None])[:, 0]
    gh, gW = torch.autograd.grad((naive * w).sum(), (h, W))
    chunked, ent = rollout.ChunkedLogProb.apply(h, W, t, 0.7, 8)
    ch, cW = torch.autograd.grad((chunked * w).sum(), (h, W))
    assert torch.allclose(chunked, naive, atol=1e-5), "values differ"
    p = (h @ W.T / 0.7).softmax(-1)
    assert torch.allclose(ent, -(p * p.log()).sum(-1), atol=1e-5) and not ent.requires_grad, "entropy at temperature"
    assert torch.allclose(ch, gh, atol=1e-5) and torch.allclose(cW, gW, atol=1e-5), "gradients differ"


def test_token_logprobs_on_the_model_and_padding_invariance(tiny):
    model, tok = tiny
    torch.manual_seed(1)
    a, b = torch.randint(5, len(tok), (23,)).tolist(), torch.randint(5, len(tok), (40,)).tolist()
    ids, attn, lm, _ = rollout.collate([story(a[:5], a[5:]), story(b[:5], b[5:])], tok.pad_token_id)
    lp, _ = rollout.token_logprobs(model, ids, attn, lm, temperature=0.8, chunk=7)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / 0.8
    naive = logits.log_softmax(-1).gather(2, ids[:, 1:, None])[..., 0] * lm
    assert torch.allclose(lp, naive, atol=1e-5), "chunked log-probs differ from the full logits"
    g1 = torch.autograd.grad(lp.sum(), model.lm_head.weight, retain_graph=True)[0]
    g2 = torch.autograd.grad(naive.sum(), model.lm_head.weight)[0]
    assert torch.allclose(g1, g2, atol=1e-5), "LM-head gradients differ"
    ids1, attn1, lm1, _ = rollout.collate([story(a[:5], a[5:])], tok.pad_token_id)
    alone = rollout.token_logprobs(model, ids1, attn1, lm1)[0]
    batched = rollout.token_logprobs(model, ids, attn, lm)[0][:1, : alone.shape[1]]
    assert torch.allclose(alone, batched, atol=1e-5), "right padding changed a sequence's log-probs"
    assert lm[0, 4:22].all() and not lm[0, :4].any() and not lm[0, 22:].any(), "loss mask covers the completion only"


@pytest.mark.parametrize("thinking", [True, False])
def test_reference_tokens_match_the_template(tiny, thinking):
    model, tok = tiny
    prompt, story = "Write a 20-word story about a ferry.", "The ferry left at dawn.\n\nNobody waved, and she did not look back."
    eos = rollout.eos_ids(model, tok)
    ref = rollout.reference_story(tok, dict(prompt=prompt, story=story), thinking, eos)
    p, a, mask = ref.prompt_ids, ref.completion_ids, ref.mask
    assert p == rollout.render_prompt(tok, prompt, thinking), "the reference follows the policy's own prompt"
    rendered = tok.apply_chat_template([dict(role="user", content=prompt), dict(role="assistant", content=story)],
                                       tokenize=False, enable_thinking=False)
    assert tok.decode(p + a) == rendered[: rendered.rindex("<|im_end|>") + len("<|im_end|>")], \
        "prompt + reference must be the template's rendering of the conversation, thinking block empty"
    assert tok.decode([t for t, m in zip(a, mask) if m]) == story + "<|im_end|>", "mask covers exactly story + EOS"
    assert a[-1] in eos and len(mask) == len(a), "the reference ends with the end-of-turn token"
    unmasked = rollout.reference_story(tok, dict(prompt=prompt, story=story), thinking, eos, mask_think=False).mask
    assert all(unmasked), "ref_mask_think=False trains the whole answer"


def test_split_thinking():
    assert rollout.split_thinking("plan it\n</think>\n\nThe story.", True, False) == ("plan it", "The story.", False)
    assert rollout.split_thinking("still planning", True, True) == ("still planning", "", True), \
        "truncated inside thinking: empty story, marked"
    assert rollout.split_thinking("The story.", False, True) == ("", "The story.", False), "thinking off: all story"


def test_presence_penalty_and_both_penalties():
    proc = rollout.PresencePenalty(1.5, prompt_len=2)
    scores = proc(torch.tensor([[3, 4, 5, 5]]), torch.zeros(1, 8))
    assert scores[0].tolist() == [0, 0, 0, 0, 0, -1.5, 0, 0], "only generated tokens are penalised, once"
    with pytest.raises(ValueError, match="never both"):
        preflight.check_sampling(1.05, 0.5)


def test_sample_stops_at_eos_and_marks_truncation(tiny):
    model, tok = tiny
    prompt_ids = rollout.render_prompt(tok, "Write a story.", False)
    [samples] = rollout.sample(model, tok, [prompt_ids], [0], n=4, eos=list(range(8, len(tok), 2)), max_new_tokens=16,
                                enable_thinking=False)
    for s in samples:  # half the vocabulary ends generation: every sample stops within a few tokens
        ids = s.completion_ids
        assert not s.truncated and ids[-1] % 2 == 0 and ids[-1] >= 8, "ends with the eos it stopped at"
        assert not any(t >= 8 and t % 2 == 0 for t in ids[:-1]), "nothing after the first eos"
    [samples] = rollout.sample(model, tok, [prompt_ids], [0], n=3, eos=[tok.eos_token_id], max_new_tokens=12,
                                enable_thinking=True)
    for s in samples:
        assert s.truncated == (tok.eos_token_id not in s.completion_ids) and len(s.completion_ids) <= 12
        if s.truncated and "</think>" not in tok.decode(s.completion_ids):
            assert s.text == "" and s.in_thinking, "truncated while thinking: empty story"


def test_a_batch_samples_each_prompt_as_alone_and_reports_each_end(tiny):
    model, tok = tiny
    prompts = [rollout.render_prompt(tok, p, False) for p in ("Write a story.", "Write a 300-word story about salt.")]
    assert len(prompts[0]) != len(prompts[1]), "prompts of different lengths: the short one is left-padded"
    eos = list(range(8, len(tok), 7))  # one token in seven ends a story: stories of many lengths
    ended = []
    batch = rollout.sample(model, tok, prompts, [11, 12], n=3, eos=eos, max_new_tokens=30, temperature=0.9, top_p=0.95,
                           top_k=50, on_story=lambda i, j, s: ended.append((i, j)))
    alone = [rollout.sample(model, tok, [p], [sd], n=3, eos=eos, max_new_tokens=30, temperature=0.9, top_p=0.95,
                            top_k=50)[0] for p, sd in zip(prompts, (11, 12))]
    ids = lambda groups: [[s.completion_ids for s in g] for g in groups]
    assert ids(batch) == ids(alone), "a story depends on its prompt and seed, not on the batch around it"
    assert sorted(ended) == [(i, j) for i in range(2) for j in range(3)], "every story reported once when it ends"
    assert len({len(s.completion_ids) for g in batch for s in g}) > 1, "of different lengths"


def test_row_sampler_draws_from_generates_distribution(tiny):
    # The first token of 1,500 samples from our sampler and from generate(do_sample=True), each
    # against the exact distribution: softmax of the logits at temperature 0.7, cut to the top 4
    # tokens and then to top-p 0.9. The LM head is scaled so that the logits are far from uniform
    # and the test can tell temperatures apart.
    import copy
    model, tok = tiny
    model = copy.deepcopy(model)
    model.lm_head.weight.data *= 40
    p = rollout.render_prompt(tok, "Write a story.", False)
    n, T = 1500, 0.7

    def exact(temp):
        with torch.no_grad():
            z = model(input_ids=torch.tensor([p])).logits[0, -1].double() / temp
        keep = z >= z.topk(4).values[-1]
        q = torch.where(keep, z, -torch.inf).softmax(-1)
        s, order = q.sort(descending=True)
        drop = order[s.cumsum(0) - s > 0.9]  # top-p keeps the smallest set whose mass reaches 0.9
        q[drop] = 0
        return q / q.sum()
    [ours] = rollout.sample(model, tok, [p], [5], n=n, eos=[0], max_new_tokens=1, temperature=T, top_p=0.9, top_k=4)
    x = torch.tensor([p] * n)
    torch.manual_seed(5)
    ref = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, max_new_tokens=1,
                         temperature=T, top_p=0.9, top_k=4, pad_token_id=tok.pad_token_id)[:, -1]
    emp = lambda ids: torch.bincount(torch.as_tensor(ids), minlength=len(tok)).double() / n
    tv = lambda a, b: 0.5 * (a - b).abs().sum().item()
    q = exact(T)
    assert tv(exact(1.5), q) > 0.1, "the test can tell temperature 0.7 from 1.5"
    assert tv(emp(ref), q) < 0.06, f"generate vs the exact distribution: {tv(emp(ref), q):.3f}"
    assert tv(emp([s.completion_ids[0] for s in ours]), q) < 0.06, "our sampler vs the exact distribution"


def test_sampled_tokens_carry_their_log_prob_under_the_sampling_distribution(tiny):
    model, tok = tiny
    p = rollout.render_prompt(tok, "Write a story.", False)
    eos = [tok.eos_token_id]

    def policy(samples, T):  # the raw policy's log-probs of the sampled tokens at temperature T, as the loss sees them
        ids, attn, mask, _ = rollout.collate([story(p, s.completion_ids) for s in samples],
                                          tok.pad_token_id)
        with torch.no_grad():
            logp = rollout.token_logprobs(model, ids, attn, mask, T)[0]
        return [logp[b, len(p) - 1:len(p) - 1 + len(s.completion_ids)] for b, s in enumerate(samples)]
    [plain] = rollout.sample(model, tok, [p], [3], n=3, eos=eos, max_new_tokens=12, temperature=0.7)
    for s, lp in zip(plain, policy(plain, 0.7)):
        assert len(s.sample_logp) == len(s.completion_ids), "one log-prob per sampled token"
        assert torch.allclose(torch.tensor(s.sample_logp), lp, atol=1e-4), "plain sampling: the policy's own"
    [cut] = rollout.sample(model, tok, [p], [3], n=3, eos=eos, max_new_tokens=12, temperature=0.7, top_k=20,
                           presence_penalty=1.0)
    gaps = torch.cat([torch.tensor(s.sample_logp) - lp for s, lp in zip(cut, policy(cut, 0.7))])
    assert gaps.abs().max() > 0.1, "top-k and the penalty change the distribution the tokens were drawn from"


def test_importance_weights_scale_the_sampled_tokens_gradient():
    logp, mask, adv = _batch()
    w = torch.tensor([[2.0, 0.5, 1.0, 1.0, 1.0], [1.0] * 5, [1.0, 0.25, 1.0, 1.0, 1.0]], dtype=torch.float64)
    rollout.grpo_loss(logp, logp.detach(), adv, mask, 9.0, is_weight=w).sum().backward()
    assert torch.allclose(logp.grad, -adv[:, None] * w * mask / 9.0), "the gradient is -w A grad log p, w detached"


def test_micro_batches_by_token_budget():
    lengths = [100, 900, 120, 300, 5000, 310]
    mbs = rollout.micro_batches(lengths, 1000)
    assert sorted(i for mb in mbs for i in mb) == list(range(6)), "every sequence once"
    for mb in mbs:
        assert len(mb) * max(lengths[i] for i in mb) <= 1000 or len(mb) == 1, f"{mb}: padded tokens within the budget"
    assert [sorted(mb) for mb in mbs] == [[0, 2, 3], [5], [1], [4]], "sorted by length, packed greedily; 5000 alone"


def test_memory_plan_for_the_paper_run():
    plan = preflight.memory_plan(9e9, 4, 2)
    assert plan["weights"] == 18e9 and plan["grads"] == 9e9 and plan["optimizer"] == 27e9, \
        "bf16 weights 18 GB + a quarter of the fp32 gradient sum 9 GB + a quarter of 9B x 12 bytes"
    frozen = preflight.memory_plan(9.4e9, 4, 2, n_trainable=9e9)
    assert frozen["weights"] == 18.8e9 and frozen["grads"] == 9e9 and frozen["optimizer"] == 27e9, \
        "a frozen vision tower counts as weights only"
