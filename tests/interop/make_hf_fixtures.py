"""Make the Hugging Face fixtures of the parity tests: tiny random models saved by transformers.

Writes tests/fixtures/hf/{gpt2,llama,qwen2}/, each a directory that
`AutoModelForCausalLM.from_pretrained` loads (config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json), plus expected.safetensors with what
transformers computes on fixed inputs, and expected.json with the same in small form:

- `ids` ([2, 24], u32): the inputs; `logits` ([2, 24, vocab], f32): the model's logits on them;
- `loss`: transformers' causal LM loss with labels = ids (mean over the 2 * 23 predicted tokens);
- `prompt` (8 ids) and `greedy` (the 32 tokens greedy decoding adds to it, no early stop).

The models are small (2 layers, width 64) and their weights random, drawn with a fixed seed and
then perturbed away from transformers' initialisation so that every parameter matters (biases
and norm weights are not left at zero and one). What each fixture covers:

- gpt2: GPT2LMHeadModel (Conv1D layouts, tied head, learned positions);
- llama: LlamaForCausalLM with grouped-query attention (4 query heads, 2 key/value heads),
  tied embeddings and llama3 rope scaling whose original context (16) is shorter than the inputs;
- qwen2: Qwen2ForCausalLM with q/k/v biases, 4 query heads sharing 1 key/value head, untied.

Run from the repository root, in a virtual environment with exactly these versions:

    python -m venv /tmp/hf-venv
    /tmp/hf-venv/bin/pip install torch==2.15.0 transformers==5.25.0 tokenizers==0.23.3 \
        safetensors==0.8.0 numpy
    /tmp/hf-venv/bin/python tests/interop/make_hf_fixtures.py

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
    "safetensors": "0.8.0",
}

import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

OUT = os.path.join("tests", "fixtures", "hf")
VOCAB = 320
EOT = "<|endoftext|>"

# The text the tokenizer learns from: a little Python, like the code codex-ml trains on.
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "while True:\n    line = input()\n    if not line:\n        break\n",
] * 4


def check_versions():
    found = {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }
    wrong = {k: v for k, v in found.items() if v != PINNED[k]}
    if wrong:
        sys.exit(f"versions differ from the pinned ones {PINNED}: {wrong}")


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT
    )


def perturb(model, seed):
    """Random weights, norms around one, biases non-zero: every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or name.split(".")[-2].startswith("ln_"):
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * noise)
                else:
                    p.copy_(0.1 * noise)
            else:
                p.copy_(0.08 * noise)


def record(model, tokenizer, name, seed):
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    prompt = torch.randint(0, vocab, (1, 8), generator=g)
    with torch.no_grad():
        generated = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=32,
            min_new_tokens=32,
            pad_token_id=tokenizer.eos_token_id,
        )
    greedy = generated[0, 8:].tolist()
    assert len(greedy) == 32
    d = os.path.join(OUT, name)
    save_file(
        {"ids": ids.to(torch.int32).contiguous(), "logits": out.logits.float().contiguous()},
        os.path.join(d, "expected.safetensors"),
    )
    expected = {
        "versions": PINNED,
        "loss": out.loss.item(),
        "prompt": prompt[0].tolist(),
        "greedy": greedy,
    }
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2)
        f.write("\n")


def save(model, tokenizer, name, seed):
    perturb(model, seed)
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    record(model, tokenizer, name, seed)


def main():
    check_versions()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    tokenizer = make_tokenizer()
    eot = tokenizer.convert_tokens_to_ids(EOT)
    special = dict(bos_token_id=eot, eos_token_id=eot)

    gpt2 = GPT2Config(
        vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4, **special
    )
    save(GPT2LMHeadModel(gpt2), tokenizer, "gpt2", 1)

    llama = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        **special,
    )
    save(LlamaForCausalLM(llama), tokenizer, "llama", 2)

    qwen2 = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=100000.0,
        tie_word_embeddings=False,
        **special,
    )
    save(Qwen2ForCausalLM(qwen2), tokenizer, "qwen2", 3)


if __name__ == "__main__":
    main()
