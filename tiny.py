"""
The tiny CPU model: a Qwen3.5-architecture model with random weights and a small byte-level BPE
tokenizer trained on the project's own stories, with a Qwen-style chat template. It runs the
paper run's code path on a laptop in minutes (config/tiny.py) and in the tests. Nothing is
downloaded.
"""
import json
import re

import torch

# Qwen3.5's chat format, as its published template renders a conversation: a user turn; an
# assistant turn after the last user turn with its thinking block (empty when there was none;
# text before </think> in the content is moved into it); the generation prompt, which ends in
# '<think>\n' with thinking on and in an empty, closed block with thinking off.
CHAT_TEMPLATE = """{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
{%- if m.role == 'assistant' %}
{%- set content = m.content %}
{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' %}
{%- if m.reasoning_content is not string and '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_user %}
{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
{%- else %}
{{- '<|im_start|>assistant\n' + content }}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- else %}
{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}
{%- else %}{{- '<think>\n' }}{%- endif %}
{%- endif %}"""


def tokenizer(data_files, vocab_size=1024):
    """A byte-level BPE trained on the prompts and stories of data_files, with a Qwen-style chat
    template and Qwen's special tokens. Nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    texts = []
    for path in data_files:
        for line in open(path, encoding="utf-8"):
            row = json.loads(line)
            texts += [row["prompt"], row["story"]]
    # BPE training time grows with the square of a word's length: a 2 MB story without a space
    # would train for hours. Words over 64 characters are learned from in 64-character pieces.
    texts = [re.sub(r"\S{65,}", lambda m: " ".join(re.findall(r"\S{1,64}", m[0])), t) for t in texts]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def config(tok, hidden=64, layers=4):
    """A tiny Qwen3.5-architecture config: 3 linear-attention layers to 1 full-attention layer, like the 9B."""
    from transformers import Qwen3_5TextConfig
    heads = max(1, hidden // 16)
    return Qwen3_5TextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=16,
        linear_num_key_heads=max(1, heads // 2), linear_num_value_heads=heads, linear_key_head_dim=16,
        linear_value_head_dim=16, max_position_embeddings=8192, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False)


def model(model_config, seed=0):
    """Random weights, the same for the same seed."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)


def build_tiny(data_files, vocab_size=1024, hidden=64, layers=4, seed=0):
    """The tiny model and its tokenizer (the tests' shortcut)."""
    tok = tokenizer(data_files, vocab_size)
    return model(config(tok, hidden, layers), seed), tok
