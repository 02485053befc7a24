"""
Measured speed, memory and scaling of a POLARIS training step. Every row comes from this run.

    python bench.py                     # CPU: 10-20 minutes on 2 cores; writes bench.md
    python bench.py --out=bench_gpu.md  # on a GPU machine the CUDA rows run too
    python bench.py --only=8 --out=bench_trl.md  # sections by number (--only=2,8): TRL's took 12 minutes

Rows:
1. log-probabilities of one sequence at the real vocabulary (248,320) on a small-hidden
   Qwen3.5 model, forward + backward: rollout.py's chunked path against the naive full
   logits -> log_softmax, peak memory added (CPU: peak RSS of a subprocess per variant, the
   naive one under an address-space limit so that running out is reported, not suffered;
   GPU: max_memory_allocated) and time. Targets: at most 1/8 of naive memory, 1.3x its time.
2. judge throughput: 64 requests to a local judge with 200 ms added latency on 16 workers,
   against the ideal ceil(64 / 16) x 0.2 s. Target: efficiency >= 0.8.
3. a tiny training step (config/tiny.py): seconds per phase and their shares, tokens/s.
4. scaling: the tiny step at requested lengths of 125-1,000 words (max_new_tokens scaled),
   seconds per phase, and the fitted exponent of time against length.
5. CUDA only: one micro-batch of a 9B-architecture model (random bf16 weights) on 8,192 tokens,
   and generation of 10 x 1,024 tokens (a rank's two groups of 5) against the bandwidth limit.
6. throughput: generation tokens/s by batch size with generate() and with rollout.sample (its
   per-row sampler inside generate); train tokens/s by micro_batch_tokens; the relative error of
   12 micro-batches' gradients summed in bf16 and in fp32 against fp64; the per-rank memory plan
   of the 9B on 4 ranks before (bf16 gradient replica) and after (fp32 shards, optim.py).
7. the run viewer (eval.py --task=rollouts, its own process) on a generated paper-sized run, a
   150 MB rollouts.jsonl (160 steps x 48 stories of ~20k characters with 16 scores and the judge's
   reply): the first page's time (indexing the file by byte offset and rendering the latest
   step), a chosen step's, and the process's peak resident memory (VmHWM) against the file's size.
   Target: seconds, and well below the file.
8. when trl is installed: the tiny step against TRL's GRPOTrainer on the same workload (the tiny
   model, 2 prompts x 6 stories of up to 96 tokens, no reference, fp32, one forward/backward of
   12), in alternating rounds of polaris, TRL rewarded by polaris's local judge over HTTP (as
   train.py reaches it), and TRL with a free in-process reward. Target: <= 0.7x with the judge.
"""
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import socket
import time

import numpy as np
import torch

from configurator import configure

out = "bench.md"
logprob_tokens = 8192  # the sequence length of row 1
logprob_compare_tokens = 4096  # where the naive path still fits in a CPU's memory, for the ratios
vocab = 248320
chunk = 1024
naive_limit_gb = 20.0  # address-space limit for the naive variant on the CPU
judge_requests, judge_workers, judge_latency = 64, 16, 0.2
scaling_words = [125, 250, 500, 1000]
tokens_per_word = 2.0  # max_new_tokens = words x this, for the tiny tokenizer
gen_batches = [1, 5, 10, 20]
train_budgets = [512, 1024, 2048, 4096, 8192]
peer_rounds, peer_steps = 3, 5  # TRL vs polaris: alternating rounds of this many steps (the first is warm-up)
only = ""  # the sections to run, e.g. '8' or '2,8' (the docstring's numbers); '' runs them all
worker = ""  # internal: 'chunked:8192' runs one log-prob variant in this process, 'trl:judge:5' TRL; prints JSON
c = configure(globals())
sections = [x.strip() for x in only.split(",") if x.strip()]
if any(x not in list("12345678") for x in sections):
    sys.exit(f"error: --only={only}: sections are numbers 1-8 separated by commas, e.g. --only=8 (bench.py's docstring)")
ROOT = os.path.dirname(os.path.abspath(__file__))
device = "cuda" if torch.cuda.is_available() else "cpu"

# -----------------------------------------------------------------------------
# 1. log-probability memory and time


def small_model(vocab_size, hidden=64, layers=1, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, Qwen3_5TextConfig
    cfg = Qwen3_5TextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, layer_types=["full_attention"] * layers)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)


if worker.startswith("trl:"):  # the peer: TRL's GRPOTrainer on polaris's tiny model, config/tiny.py's settings
    import datasets
    import trl
    from transformers import TrainerCallback
    import judge as judge_lib
    import rubric
    import tiny as tiny_model
    _, reward_by, max_steps = worker.split(":")
    model, tok = tiny_model.build_tiny([os.path.join(ROOT, "data/sample/train.jsonl")], seed=1337)  # train.py's
    data = [json.loads(l) for l in open(os.path.join(ROOT, "data/sample/train.jsonl"))]
    ds = datasets.Dataset.from_list([dict(prompt=[dict(role="user", content=r["prompt"])], target_words=r["target_words"])
                                     for r in data])
    times, gen_tokens = [], []

    def reward(prompts, completions, completion_ids, target_words, **kw):
        gen_tokens.append(sum(len(ids) for ids in completion_ids))
        stories = [c[0]["content"] for c in completions]
        if reward_by == "free":  # in-process and next to nothing: the length ratio
            return [rubric.count_words(s) / t for s, t in zip(stories, target_words)]
        res, _ = judge_lib.score(judge, [dict(prompt=p[-1]["content"], target_words=t, story=s)
                                          for p, s, t in zip(prompts, stories, target_words)])
        return [r["reward"] for r in res]

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)
    with tempfile.TemporaryDirectory() as tmp:
        # the judge as train.py builds it from config/tiny.py: in-process on 127.0.0.1, 8 workers, a disk cache
        judge = judge_lib.Judge("local", "polaris-local", workers=8, cache_dir=os.path.join(tmp, "judge_cache"))
        # fp32 and no gradient checkpointing as config/tiny.py (TRL's defaults are bf16 and checkpointing);
        # 12 sequences a step, generated together and trained in one forward/backward
        cfg = trl.GRPOConfig(output_dir=tmp, per_device_train_batch_size=12, num_generations=6, max_completion_length=96,
                             temperature=1.0, top_p=1.0, top_k=0, learning_rate=1e-2, max_steps=int(max_steps),
                             bf16=False, gradient_checkpointing=False, report_to="none", use_cpu=True,
                             save_strategy="no", beta=0.0, seed=1337, chat_template_kwargs={"enable_thinking": False},
                             disable_tqdm=True)
        trl.GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                        callbacks=[Timer()]).train()
        judge.close()
    print(json.dumps(dict(step_s=times, gen_tokens=gen_tokens)))
    sys.exit(0)

if worker:  # one variant, alone in its process, so its peak memory is its own
    import rollout
    variant, T = worker.split(":")
    T = int(T)
    model = small_model(vocab)
    ids = torch.randint(0, vocab, (1, T), device=device)
    attn, lm = torch.ones_like(ids), torch.ones(1, T - 1, device=device)
    before = torch.cuda.memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    try:
        if variant == "chunked":
            logp = rollout.token_logprobs(model, ids, attn, lm, 1.0, chunk)[0]
        else:  # the naive path: the whole (T, V) logits, log_softmax, gather
            logp = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float().log_softmax(-1).gather(2, ids[:, 1:, None])[..., 0]
        logp.sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(dict(ok=True, seconds=seconds, peak_gb=(peak - before) / 1e9)))
    except (RuntimeError, MemoryError) as e:  # the address-space limit (CPU) or the GPU is full
        print(json.dumps(dict(ok=False, error="out of memory" if "alloc" in str(e) else str(e).splitlines()[0][:100])))
    sys.exit(0)


def logprob_run(variant, T):
    def limit():  # in the child before it starts: an allocation past this fails instead of swapping the machine
        if variant == "naive" and device == "cpu":
            resource.setrlimit(resource.RLIMIT_AS, (int(naive_limit_gb * 2**30),) * 2)
    p = subprocess.run([sys.executable, "bench.py", f"--worker={variant}:{T}", f"--chunk={chunk}", f"--vocab={vocab}"],
                       capture_output=True, text=True, cwd=ROOT, preexec_fn=limit)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    return json.loads(lines[-1]) if lines else dict(ok=False, error=(p.stderr.strip().splitlines() or ["crashed"])[-1][:120])


def want(section):
    return not sections or str(section) in sections


rows = []  # (what, measured, target or note)
t_start, load_start = time.time(), os.getloadavg()[0]  # the load says how shared the machine was
if want(1):
    print("1. log-probabilities ...", flush=True)
    res = {(v, T): logprob_run(v, T) for T in (logprob_tokens, logprob_compare_tokens) for v in ("chunked", "naive")}
    for (v, T), r in res.items():
        rows.append((f"log-probs {v}, T={T}, V={vocab}, fwd+bwd",
                     f"{r['peak_gb']:.2f} GB added, {r['seconds']:.1f} s" if r["ok"] else f"failed: {r['error']}",
                     f"chunk={chunk}" if v == "chunked" else (f"under a {naive_limit_gb:g} GiB address-space limit" if device == "cpu" else "")))
    for T in (logprob_tokens, logprob_compare_tokens):
        ch, nv = res["chunked", T], res["naive", T]
        if ch["ok"] and nv["ok"]:
            mem, tim = ch["peak_gb"] / nv["peak_gb"], ch["seconds"] / nv["seconds"]
            rows.append((f"chunked / naive at T={T}", f"memory {mem:.3f}, time {tim:.2f}",
                         f"target memory <= 0.125 ({'met' if mem <= 0.125 else 'MISSED'}), time <= 1.3 ({'met' if tim <= 1.3 else 'MISSED'})"))
        elif ch["ok"]:
            rows.append((f"chunked / naive at T={T}", "naive did not fit", f"chunked needed {ch['peak_gb']:.2f} GB"))

# -----------------------------------------------------------------------------
# 2. judge throughput against a local judge with added latency
if want(2):
    print("2. judge throughput ...", flush=True)
    import judge as judge_lib

    # the server runs in its own process, as a remote API would: in this one it would share the GIL
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "judge.py", "serve", f"--port={port}", f"--latency={judge_latency}"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    if not any("local judge at" in line for line in server.stdout):  # stops at its address line, or at EOF
        sys.exit("the local judge did not start")
    story = json.loads(open(os.path.join(ROOT, "data/sample/train.jsonl")).readline())
    client = judge_lib.Judge(f"http://127.0.0.1:{port}/v1", "bench", workers=judge_workers)
    judge_lib.score(client, [story])  # warm-up: the server loads its vocabulary on the first request
    t = time.perf_counter()
    results, used = judge_lib.score(client, [dict(story, story=story["story"] + f"\n\n{i}") for i in range(judge_requests)])
    wall = time.perf_counter() - t
    client.close()
    server.terminate()
    ideal = math.ceil(judge_requests / judge_workers) * judge_latency
    rows.append((f"judge: {judge_requests} requests, {judge_workers} workers, {judge_latency * 1000:.0f} ms latency",
                 f"{wall:.2f} s (ideal {ideal:.2f} s), efficiency {ideal / wall:.2f}, failures {used['failures']}",
                 f"target >= 0.8 ({'met' if ideal / wall >= 0.8 else 'MISSED'})"))

# -----------------------------------------------------------------------------
# 3. and 4. the tiny training step, and its scaling with the requested length
PHASES = ["t_generate", "t_judge_wait", "t_train", "t_sync", "t_checkpoint"]


def tiny_run(args, data=None):
    """Run train.py config/tiny.py in a subprocess; return its metrics rows."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "train.py", "config/tiny.py", f"--out_dir={tmp}/run", "--eval_interval=0", *args]
        if data:
            path = os.path.join(tmp, "data.jsonl")
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in data)
            cmd.append(f"--train_data={path}")
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if p.returncode:
            sys.exit(f"tiny run failed:\n{p.stderr[-2000:]}")
        return [json.loads(l) for l in open(f"{tmp}/run/metrics.jsonl")]


if want(3):
    print("3. tiny training step ...", flush=True)
    m = tiny_run(["--max_steps=4", "--save_interval=1"])[1:]  # the first step warms up; checkpoint every step
    mean = {k: float(np.mean([r[k] for r in m])) for k in PHASES + ["gen_tok_per_s", "train_tok_per_s"]}
    step_s = sum(mean[k] for k in PHASES)
    rows.append(("tiny step (2 groups x 6, 96 new tokens), mean of steps 2-4", f"{step_s:.2f} s per step", "config/tiny.py"))
    for k in PHASES:
        rows.append((f"  {k[2:].replace('_', ' ')}", f"{mean[k]:.3f} s ({100 * mean[k] / step_s:.0f}%)", ""))
    rows.append(("  tokens/s", f"generate {mean['gen_tok_per_s']:.0f}, train {mean['train_tok_per_s']:.0f}", ""))

if want(4):
    print("4. scaling with requested length ...", flush=True)
    base_rows = [json.loads(l) for l in open(os.path.join(ROOT, "data/sample/train.jsonl"))]
    times = {k: [] for k in PHASES[:4]}
    for words in scaling_words:
        data = [dict(r, target_words=words, prompt=r["prompt"].replace(f"{r['target_words']}-word", f"{words}-word")) for r in base_rows]
        m = tiny_run(["--max_steps=2", f"--max_new_tokens={int(words * tokens_per_word)}", "--save_interval=1000"], data)[1:]
        for k in times:
            times[k].append(float(np.mean([r[k] for r in m])))
        rows.append((f"  {words} words ({int(words * tokens_per_word)} new tokens)",
                     ", ".join(f"{k[2:].replace('_', ' ')} {times[k][-1]:.2f} s" for k in times), ""))
    for k, ts in times.items():
        if min(ts) > 0.01:
            slope = np.polyfit(np.log(scaling_words), np.log(ts), 1)[0]
            rows.append((f"  exponent of {k[2:].replace('_', ' ')} time vs length", f"{slope:.2f}",
                         "1 = linear in the generated tokens"))

# -----------------------------------------------------------------------------
# 5. CUDA only: the 9B architecture
if want(5) and device == "cuda":
    print("5. 9B-architecture micro-batch and generation ...", flush=True)
    import rollout
    from transformers import AutoModelForCausalLM, Qwen3_5TextConfig
    cfg = Qwen3_5TextConfig()  # transformers' defaults are the 9B architecture: hidden 4096, 32 layers, V 248,320
    torch.manual_seed(0)
    big = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).to("cuda")
    n = sum(p.numel() for p in big.parameters())
    big.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    big.train()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, cfg.vocab_size, (1, 8192), device="cuda")
    t = time.perf_counter()
    logp = rollout.token_logprobs(big, ids, torch.ones_like(ids), torch.ones(1, 8191, device="cuda"), 0.6, chunk)[0]
    (-logp.mean()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 1e9
    budget = 80 - 12 * n / 4 / 1e9  # an A100 80GB less the AdamW shard of 4 ranks
    rows.append(("9B micro-batch, 8,192 tokens, bf16, checkpointing, chunked log-probs",
                 f"peak {peak:.1f} GB (weights + grads + activations), {time.perf_counter() - t:.1f} s",
                 f"budget {budget:.1f} GB = 80 GB - AdamW shard {12 * n / 4 / 1e9:.1f} GB ({'fits' if peak <= budget else 'DOES NOT FIT'})"))
    big.zero_grad(set_to_none=True)
    big.eval()
    prompt = torch.randint(0, cfg.vocab_size, (10, 64), device="cuda")  # a rank's 2 groups of 5, in one batch
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        gen = big.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1024, min_new_tokens=1024,
                           do_sample=True, top_k=20, pad_token_id=0)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    name = torch.cuda.get_device_name()
    bandwidth = next((bw for key, bw in (("H200", 4.8e12), ("H100", 3.35e12), ("A100", 2.0e12)) if key in name), None)
    steps_limit = bandwidth / (2 * n) if bandwidth else math.nan  # each decode step reads every bf16 weight once
    rows.append((f"9B generation, 10 x 1,024 new tokens on {name}", f"{10 * 1024 / secs:.0f} tok/s ({1024 / secs:.1f} steps/s)",
                 f"bandwidth limit {steps_limit:.0f} steps/s: {1024 / secs / steps_limit:.0%} of it" if bandwidth else "unknown GPU bandwidth"))
elif want(5):
    rows.append(("9B micro-batch and generation rows", "skipped: no CUDA device", "run `python bench.py` on a GPU machine"))

# -----------------------------------------------------------------------------
# 6. throughput: batched generation, micro-batch budgets, fp32 accumulation, memory
if want(6):
    print("6. throughput ...", flush=True)
    import preflight
    import rollout
    import tiny as tiny_model
    from optim import ShardedAdamW
    tiny, tok = tiny_model.build_tiny([os.path.join(ROOT, "data/sample/train.jsonl")], seed=1337)
    tiny.to(device).eval()
    data = [json.loads(l) for l in open(os.path.join(ROOT, "data/sample/train.jsonl"))]
    prompt = rollout.render_prompt(tok, data[0]["prompt"], False)
    never = [len(tok)]  # an eos id no token has: every row decodes the full 96 tokens
    for b in gen_batches:
        x = torch.tensor([prompt] * b, device=device)
        tiny.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, max_new_tokens=4, pad_token_id=0)
        t = time.perf_counter()
        tiny.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, max_new_tokens=96, min_new_tokens=96,
                      top_k=None, pad_token_id=0)
        t_gen = time.perf_counter() - t
        t = time.perf_counter()
        rollout.sample(tiny, tok, [prompt], [0], n=b, eos=never, max_new_tokens=96, enable_thinking=False)
        t_ours = time.perf_counter() - t
        rows.append((f"tiny generation, batch {b}, 96 new tokens", f"generate {b * 96 / t_gen:.0f} tok/s, "
                     f"rollout.sample {b * 96 / t_ours:.0f} tok/s", "per-row seeds cost" if b == 1 else ""))
    # a tiny step's batch: 10 rollouts of 96 tokens and 2 human references
    seqs = [rollout.Story(prompt, torch.randint(5, len(tok), (96,)).tolist(), [1] * 96, text="") for _ in range(10)]
    seqs += [rollout.reference_story(tok, r, False, rollout.eos_ids(tiny, tok)) for r in data[:2]]
    tiny.train()
    opt = ShardedAdamW([p for p in tiny.parameters()])
    n_tokens = sum(len(s.prompt_ids) + len(s.completion_ids) for s in seqs)
    for budget in train_budgets:
        t = time.perf_counter()
        for _ in range(2):
            for mb in rollout.micro_batches([len(s.prompt_ids) + len(s.completion_ids) for s in seqs], budget):
                ids, attn, lm, _ = rollout.collate([seqs[i] for i in mb], tok.pad_token_id)
                logp, _ = rollout.token_logprobs(tiny, ids.to(device), attn.to(device), lm.to(device), 1.0, chunk)
                (-(logp * lm.to(device)).sum() / lm.sum()).backward()
            opt.zero_grad()
        secs = (time.perf_counter() - t) / 2
        n_mb = len(rollout.micro_batches([len(s.prompt_ids) + len(s.completion_ids) for s in seqs], budget))
        rows.append((f"tiny train pass, micro_batch_tokens={budget}", f"{n_tokens / secs:.0f} tok/s ({n_mb} micro-batches)",
                     "12 sequences: 10 x 96-token rollouts, 2 references"))
    # 12 micro-batch gradients that share a direction and whose advantages cancel, as a group's do
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(1_000_000, generator=g, dtype=torch.float64)
    adv = torch.randn(12, generator=g, dtype=torch.float64)
    adv -= adv.mean()
    grads = [a * (shared + 0.3 * torch.randn(1_000_000, generator=g, dtype=torch.float64)) for a in adv]
    exact = sum(grads)
    err = lambda x: ((x.double() - exact).norm() / exact.norm()).item()
    acc16, acc32 = torch.zeros(1_000_000, dtype=torch.bfloat16), torch.zeros(1_000_000, dtype=torch.float32)
    for x in grads:  # each micro-batch's gradient comes out of a bf16 backward: rounded once
        acc16 += x.to(torch.bfloat16)
        acc32 += x.to(torch.bfloat16).float()
    exact32 = sum(x.float() for x in grads)  # fp32 gradients summed in fp32: the accumulation's own error
    rows.append(("gradient sum of 12 micro-batches, relative error vs fp64",
                 f"bf16 sums {err(acc16):.2%}; fp32 sums of bf16 gradients {err(acc32):.2%}; fp32 sums of fp32 gradients "
                 f"{err(exact32):.4%}; one bf16 rounding of the exact sum {err(exact.to(torch.bfloat16)):.2%}",
                 "optim.py sums in fp32: what remains is each bf16 backward's own rounding, amplified where advantages cancel"))
    from transformers import AutoModelForCausalLM, Qwen3_5TextConfig
    with torch.device("meta"):  # the 9B architecture (transformers' defaults), counted without allocating it
        n9 = sum(p.numel() for p in AutoModelForCausalLM.from_config(Qwen3_5TextConfig()).parameters())
    before = n9 * 2 + n9 * 2 + 12 * n9 / 4
    after = preflight.memory_plan(n9, 4, 2, activations=preflight.activation_bytes(Qwen3_5TextConfig(), 9216, chunk, True, 2))
    rows.append(("9B memory plan per rank, 4 ranks", f"before {before / 1e9:.1f} GB (bf16 weights + bf16 gradient replica + "
                 f"AdamW shard); after {sum(after.values()) / 1e9:.1f} GB (" + " + ".join(f"{k} {v / 1e9:.1f}" for k, v in after.items())
                 + ")", "A100 80 GB"))

# -----------------------------------------------------------------------------
# 7. the run viewer on a paper-sized run
if want(7):
    print("7. the run viewer on a generated 150 MB run ...", flush=True)
    import rubric
    words = open(os.path.join(ROOT, "data/sample/train.jsonl")).read().split()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "run.json"), "w") as f:
            json.dump(dict(run_id="bench", config=dict(max_steps=160)), f)
        with open(os.path.join(tmp, "rollouts.jsonl"), "w") as f, open(os.path.join(tmp, "metrics.jsonl"), "w") as fm, \
                open(os.path.join(tmp, "references.jsonl"), "w") as fr:
            for step in range(1, 161):
                for g in range(8):
                    prompt = f"Write a 3000-word story about the bench's prompt {step}-{g}."
                    fr.write(json.dumps(dict(id=f"p{step}-{g}", prompt=prompt, target_words=3000, story=" ".join(words[:3000]))) + "\n")
                    for j in range(6):  # 5 stories of ~3,500 words, then the reference, whose text is in references.jsonl
                        story = None if j == 5 else " ".join(words[k % len(words)] for k in range(int(rng.integers(0, 9000)), 12000))[:rng.integers(19000, 23000)]
                        scores = {n: float(rng.integers(0, 11)) for n in rubric.NAMES}
                        f.write(json.dumps(dict(step=step, group=g, id=f"p{step}-{g}", **(dict(prompt=prompt, target_words=3000) if j == 0 else {}),
                                                is_ref=j == 5, story=story, thinking_words=900, truncated=False, adv=float(rng.normal()),
                                                judge_reply="Analysis: " + " ".join(words[:150]) + "\n" + "\n".join(f"{n}: {v:g}" for n, v in scores.items()),
                                                reward=float(rng.normal(30, 20)), sq=float(rng.normal(40, 15)), ratio=0.8, scores=scores, error=None)) + "\n")
                fm.write(json.dumps(dict(step=step, reward=30 + step / 10, ref_reward=55.0, sq=40 + step / 8, length_ratio=0.8,
                                         ref_adv=1.5, ref_rank=1.5, ref_nll=2.5, entropy=1.2)) + "\n")
        size = os.path.getsize(os.path.join(tmp, "rollouts.jsonl"))
        # the real command, in its own process: its first page, a chosen step, its peak resident memory
        t = time.perf_counter()
        viewer = subprocess.Popen([sys.executable, "eval.py", "--task=rollouts", f"--run={tmp}"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        url = next(line.split(" at ")[1].strip() for line in viewer.stdout if " at http" in line)
        t_up = time.perf_counter() - t
        import urllib.request
        t = time.perf_counter()
        first = urllib.request.urlopen(url, timeout=120).read()
        t_first = time.perf_counter() - t
        t = time.perf_counter()
        urllib.request.urlopen(url + "?step=80", timeout=120).read()
        t_step = time.perf_counter() - t
        peak = int(next(line.split()[1] for line in open(f"/proc/{viewer.pid}/status") if line.startswith("VmHWM"))) * 1024
        viewer.terminate()
        viewer.wait()
    rows.append((f"run viewer: rollouts.jsonl of {size / 1e6:.0f} MB (160 steps x 48 stories), `eval.py --task=rollouts`",
                 f"started in {t_up:.1f} s; first page {t_first:.2f} s (indexing the file, then the latest step: "
                 f"{len(first) / 1e6:.1f} MB of HTML), a chosen step {t_step:.2f} s; peak resident memory {peak / 1e6:.0f} MB, "
                 f"{peak / size:.2f} x the file", "target: seconds, memory well below the file"))

# -----------------------------------------------------------------------------
# 8. against TRL: the tiny step in TRL's GRPOTrainer, its reward from polaris's judge over HTTP, and free
if want(8):
    print("8. against TRL ...", flush=True)
    if importlib.util.find_spec("trl") is None:
        rows.append(("tiny step vs TRL GRPOTrainer", "skipped: trl is not installed",
                     "pip install trl, then python bench.py --only=8"))
    else:
        step_times, new_tokens = dict(polaris=[], judge=[], free=[]), dict(polaris=[], judge=[], free=[])
        for _ in range(peer_rounds):  # alternating: a shared machine's changing load falls on all three
            for reward_by in ("judge", "free"):
                p = subprocess.run([sys.executable, "bench.py", f"--worker=trl:{reward_by}:{peer_steps}"],
                                   capture_output=True, text=True, cwd=ROOT)
                lines = [l for l in p.stdout.splitlines() if l.startswith('{"step_s"')]
                if not lines:
                    sys.exit(f"the TRL peer failed:\n{p.stderr[-2000:]}")
                r = json.loads(lines[-1])
                step_times[reward_by] += r["step_s"][1:]  # the first step warms up
                new_tokens[reward_by] += r["gen_tokens"][1:]
            # no reference (TRL has none) and the 12 sequences in one forward/backward, as TRL trains them
            m = tiny_run(["--n_ref=0", "--micro_batch_tokens=4096", f"--max_steps={peer_steps}",
                          "--save_interval=1000"])[1:]
            step_times["polaris"] += [r["t_step"] for r in m]
            new_tokens["polaris"] += [r["gen_tokens"] for r in m]
        # each median with its middle half (25th-75th percentile) of steps: how noisy the machine was
        at = {k: "{:.2f} s ({:.2f}-{:.2f})".format(np.median(v), *np.percentile(v, [25, 75]))
              for k, v in step_times.items()}
        ratio = {k: np.median(step_times["polaris"]) / np.median(step_times[k]) for k in ("judge", "free")}
        rows.append(("tiny step vs TRL GRPOTrainer, both rewarded by polaris's judge over HTTP",
                     f"polaris {at['polaris']}, TRL {at['judge']} (medians and middle halves of "
                     f"{len(step_times['polaris'])} steps each, alternating): ratio {ratio['judge']:.2f}",
                     f"target <= 0.7 ({'met' if ratio['judge'] <= 0.7 else 'MISSED'}); "
                     "polaris judges each story as it ends, TRL all 12 after the last"))
        rows.append(("tiny step vs TRL GRPOTrainer with a free reward (in-process, no judge)",
                     f"polaris {at['polaris']} (judged as above), TRL {at['free']}: ratio {ratio['free']:.2f}",
                     "no target: TRL's floor on this workload, a reward that costs nothing"))
        names = dict(polaris="polaris", judge="TRL judged", free="TRL free")
        rows.append(("  the workload of both", "new tokens a step: " + ", ".join(
                     f"{names[k]} {np.mean(v):.0f}" for k, v in new_tokens.items()) + f" (of {12 * 96})",
                     "the tiny model (seed 1337), fp32, 2 prompts x 6 stories of up to 96 tokens at temperature 1, "
                     "no reference (--n_ref=0), one forward/backward of 12 (--micro_batch_tokens=4096), "
                     "no checkpointing, no KL, one update per batch"))

# -----------------------------------------------------------------------------
cpu = platform.processor() or platform.machine()
header = (f"# polaris bench\n\n{time.strftime('%Y-%m-%d')}, {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else f", {os.cpu_count()} cores, {cpu}")
          + f", torch {torch.__version__}"
          + (f", trl {importlib.metadata.version('trl')}" if want(8) and importlib.util.find_spec("trl") else "")
          + f", {time.time() - t_start:.0f} s in all, load average {load_start:.1f} at the start and "
          + f"{os.getloadavg()[0]:.1f} at the end. "
          + f"Command: `{' '.join(['python bench.py', *sys.argv[1:]])}`.\n\n")
table = "| what | measured | target / note |\n| --- | --- | --- |\n" + "\n".join(f"| {a} | {b} | {t} |" for a, b, t in rows)
print("\n" + table)
with open(out, "w") as f:
    f.write(header + table + "\n")
print(f"\nwrote {out}")
