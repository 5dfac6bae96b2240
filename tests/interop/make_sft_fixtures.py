"""Make the supervised fine-tuning fixtures: chat templates rendered by transformers.

Writes tests/fixtures/sft/:

- chatml/: a tiny random Qwen2ForCausalLM saved by transformers with a tokenizer that has
  ChatML's and LLaMA-3's special tokens and a ChatML chat template whose assistant turns are
  marked with {% generation %} (what `return_assistant_tokens_mask` needs); also the model of
  the example in configs/sft-chat.ron;
- llama3.jinja: a LLaMA-3-style template (bos_token, header tokens, `| trim`, no generation
  marks) for the same tokenizer;
- expected.json: what transformers computes with them on fixed examples:
  - for each template, `apply_chat_template` of a conversation: `text` and `ids` as written,
    and `prompt_text`/`prompt_ids` of the conversation without its last message with
    `add_generation_prompt=True`; for chatml also `assistant_masks`
    (`return_assistant_tokens_mask=True`);
  - `prompt_completion`: a prompt/completion pair of strings as TRL's SFTTrainer tokenizes it,
    `tokenizer(prompt)` and `tokenizer(prompt + completion + eos_token)`;
  - `conversational_prompt_completion`: a pair of message lists as TRL tokenizes it, the
    prompt with `add_generation_prompt=True` and the whole conversation.

Run from the repository root after make_hf_fixtures.py (its qwen2 tokenizer is the base), in a
virtual environment with exactly these versions:

    python -m venv /tmp/hf-venv
    /tmp/hf-venv/bin/pip install torch==2.15.0 transformers==5.25.0 tokenizers==0.23.3 \
        safetensors==0.8.0 jinja2 numpy
    /tmp/hf-venv/bin/python tests/interop/make_sft_fixtures.py

The output is deterministic for these versions on a CPU; the tests need no Python.
"""

import json
import os
import shutil
import sys

PINNED = {
    "torch": "2.15.0",
    "transformers": "5.25.0",
    "tokenizers": "0.23.3",
}

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

OUT = os.path.join("tests", "fixtures", "sft")
BASE = os.path.join("tests", "fixtures", "hf", "qwen2", "tokenizer.json")
SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

CHATML = """\
{%- for message in messages %}
{%- if message['role'] not in ['system', 'user', 'assistant'] %}
{{- raise_exception('unknown role: ' + message['role']) }}
{%- endif %}
{%- if loop.first and message['role'] != 'system' %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- if message['role'] == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- generation %}
{{- message['content'] | trim }}{{ '<|im_end|>' }}
{%- endgeneration %}
{{- '\\n' }}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3 = """\
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- if system_message %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CONVERSATION = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "  Add two numbers.  "},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b\n"},
    {"role": "user", "content": "And print it, héllo ✓"},
    {"role": "assistant", "content": "print(add(1, 2))  # ✓ héllo"},
]

PROMPT = "def fib(n):\n"
COMPLETION = "    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"

CONV_PROMPT = [{"role": "user", "content": "Loop to ten."}]
CONV_COMPLETION = [{"role": "assistant", "content": "for i in range(10):\n    print(i)"}]


def check_versions():
    found = {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    wrong = {k: v for k, v in found.items() if v != PINNED[k]}
    if wrong:
        sys.exit(f"versions differ from the pinned ones {PINNED}: {wrong}")


def rendered(tok, template, messages):
    whole = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    ids = tok.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True
    )["input_ids"]
    prompt = tok.apply_chat_template(
        messages[:-1], chat_template=template, tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tok.apply_chat_template(
        messages[:-1],
        chat_template=template,
        tokenize=True,
        add_generation_prompt=True,
        return_dict=True,
    )["input_ids"]
    return {"text": whole, "ids": ids, "prompt_text": prompt, "prompt_ids": prompt_ids}


def main():
    check_versions()
    d = os.path.join(OUT, "chatml")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=BASE,
        bos_token="<|begin_of_text|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIALS,
    )
    tok.chat_template = CHATML
    vocab = len(tok)
    torch.manual_seed(13)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(d)
    tok.save_pretrained(d)
    with open(os.path.join(OUT, "llama3.jinja"), "w") as f:
        f.write(LLAMA3)

    chatml = rendered(tok, CHATML, CONVERSATION)
    masked = tok.apply_chat_template(
        CONVERSATION,
        chat_template=CHATML,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert masked["input_ids"] == chatml["ids"]
    chatml["assistant_masks"] = masked["assistant_masks"]
    assert sum(chatml["assistant_masks"]) > 0
    llama3 = rendered(tok, LLAMA3, CONVERSATION)

    eos = tok.eos_token
    pc = {
        "prompt": PROMPT,
        "completion": COMPLETION,
        "prompt_ids": tok(PROMPT)["input_ids"],
        "ids": tok(PROMPT + COMPLETION + eos)["input_ids"],
    }
    cpc = {
        "prompt": CONV_PROMPT,
        "completion": CONV_COMPLETION,
        "prompt_ids": tok.apply_chat_template(
            CONV_PROMPT, tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"],
        "ids": tok.apply_chat_template(
            CONV_PROMPT + CONV_COMPLETION, tokenize=True, return_dict=True
        )["input_ids"],
    }
    expected = {
        "versions": PINNED,
        "conversation": CONVERSATION,
        "chatml": chatml,
        "llama3": llama3,
        "prompt_completion": pc,
        "conversational_prompt_completion": cpc,
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
