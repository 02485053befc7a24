"""Training from the hub's Qwen3.5-9B layout (a tiny offline copy, tests/tiny_hub.py): its chat
format, checkpoints in its own format, loading, resume and evaluation from them."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import rollout
from test_train import ENV, FAST, train
from tiny_hub import build_tiny_hub


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return build_tiny_hub(tmp_path_factory.mktemp("hub") / "Qwen3.5-9B")


@pytest.fixture(scope="module")
def tok(hub):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(hub)


def test_chat_template_renders_like_qwen35(tok):
    user = [dict(role="user", content="Write.")]
    render = lambda msgs, **k: tok.apply_chat_template(msgs, tokenize=False, **k)
    head = "<|im_start|>user\nWrite.<|im_end|>\n<|im_start|>assistant\n"
    assert render(user, add_generation_prompt=True, enable_thinking=True) == head + "<think>\n", \
        "thinking on: the generation prompt opens the thinking block"
    assert render(user, add_generation_prompt=True, enable_thinking=False) == head + "<think>\n\n</think>\n\n", \
        "thinking off: an empty, closed block"
    assert render(user + [dict(role="assistant", content="Story.")]) == head + "<think>\n\n</think>\n\nStory.<|im_end|>\n", \
        "an answer after the last user turn carries its (empty) thinking block"
    for answer in (dict(content="Plan.\n</think>\n\nStory."), dict(content="Story.", reasoning_content="Plan.")):
        assert render(user + [dict(role="assistant", **answer)]) == head + "<think>\nPlan.\n</think>\n\nStory.<|im_end|>\n", \
            "text before </think> (or reasoning_content) becomes the thinking block"
    earlier = user + [dict(role="assistant", content="Story.")] + user
    assert render(earlier).count("<think>") == 0, "answers before the last user turn carry no thinking block"


@pytest.mark.parametrize("thinking", [True, False])
def test_reference_tokens_with_the_qwen35_template(tok, thinking):
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    story = "The ferry left at dawn.\n\nNobody waved."
    ref = rollout.reference_story(tok, dict(prompt="Write a story.", story=story), thinking, eos)
    p, a, mask = ref.prompt_ids, ref.completion_ids, ref.mask
    assert tok.decode([t for t, m in zip(a, mask) if m]) == story + "<|im_end|>", "trained: the story and end of turn"
    assert tok.decode([t for t, m in zip(a, mask) if not m]) == ("\n</think>\n\n" if thinking else ""), \
        "masked: the empty thinking block the template puts before the story"


def test_special_tokens_of_the_tokenizer_in_use_are_refused(hub, tmp_path):
    bad = tmp_path / "bad.jsonl"
    row = json.loads(open("data/sample/train.jsonl").readline())
    bad.write_text(json.dumps(row) + "\n" + json.dumps(dict(row, id="v", story="A <|image_pad|> B")) + "\n")
    p = subprocess.run([sys.executable, "train.py", "config/tiny.py", f"--init_from={hub}", f"--train_data={bad}",
                        f"--out_dir={tmp_path}/run"], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode != 0 and f"{bad}:2: story contains the special token '<|image_pad|>'" in p.stderr, p.stderr[-2000:]


def tensors(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as sf:
                out.update({k: (f, sf.get_tensor(k)) for k in sf.keys()})
    return out


def test_checkpoints_in_the_base_format(hub, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3_5ForConditionalGeneration
    p = train(tmp_path, f"--init_from={hub}", "--max_steps=2", "--save_interval=1", *FAST)
    assert "0.1M frozen: weights only" in p.stdout, "the vision tower counts as weights only in the plan"
    ckpt = tmp_path / "ckpt_000002"
    base, new = tensors(hub), tensors(ckpt)
    assert base.keys() == new.keys(), "the same tensor names"
    for k, (f, t) in base.items():
        assert new[k][0] == f and new[k][1].dtype == t.dtype and new[k][1].shape == t.shape, f"{k}: shard, dtype, shape"
        if k.startswith(("model.visual.", "mtp.")):
            assert torch.equal(new[k][1], t), f"{k}: frozen and unknown tensors are the base's, byte for byte"
    assert not torch.equal(new["lm_head.weight"][1], base["lm_head.weight"][1]), "the language model was trained"
    for f in ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json"):
        assert (ckpt / f).read_bytes() == (hub / f).read_bytes(), f"{f} carried over unchanged"
    gen = json.load(open(ckpt / "generation_config.json"))
    assert gen["do_sample"] and (gen["temperature"], gen["top_p"], gen["top_k"]) == (0.6, 0.95, 20), gen
    assert gen["eos_token_id"] == json.load(open(hub / "generation_config.json"))["eos_token_id"], "both eos ids"
    model, info = Qwen3_5ForConditionalGeneration.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], f"loads with the base's class: {info}"
    text, info = AutoModelForCausalLM.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], f"and as a causal LM: {info}"
    shard = torch.load(ckpt / "optim_rank0.pt", weights_only=False)
    trainable = [n for n, _ in model.named_parameters() if not n.startswith("model.visual.")]
    assert len(shard["master"]) == len(trainable), "no optimizer state for the vision tower"
    # resume from it, and generate from it for evaluation
    train(tmp_path, f"--init_from={hub}", "--max_steps=3", "--save_interval=1", "--resume=True", *FAST)
    assert tensors(tmp_path / "ckpt_000003").keys() == base.keys(), "a resumed run writes the same format"
    # float32 training from a bf16 base: the checkpoint's weights are rounded to bf16, so resume takes
    # the weights from the fp32 masters; the resumed run is bitwise the uninterrupted one
    train(tmp_path / "full", f"--init_from={hub}", "--max_steps=3", *FAST)
    a, b = (torch.load(d / "ckpt_000003/optim_rank0.pt", weights_only=False)["master"] for d in (tmp_path, tmp_path / "full"))
    assert all(torch.equal(a[i], b[i]) for i in b), "resumed fp32 master weights equal the uninterrupted run's"
    last = [json.loads(open(d / "metrics.jsonl").readlines()[-1]) for d in (tmp_path, tmp_path / "full")]
    assert all(last[0][k] == last[1][k] for k in ("loss", "grad_norm", "reward", "entropy")), "and so does step 3"
    out = tmp_path / "gen.jsonl"
    p = subprocess.run([sys.executable, "eval.py", "--task=generate", f"--model={tmp_path}/ckpt_000003", f"--out={out}",
                        "--limit=2", "--max_new_tokens=8", "--enable_thinking=False"], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert p.returncode == 0 and len(open(out).readlines()) == 2, p.stderr[-2000:]
