"""Make the Hugging Face fixtures of the parity tests: tiny random models saved by transformers.

Writes tests/fixtures/hf/{gpt2,llama,qwen2}/, each a directory that
`AutoModelForCausalLM.from_pretrained` loads (config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json), plus expected.safetensors with what
transformers computes on fixed inputs, and expected.json with the same in small form:

- `ids` ([2, 24], u32): the inputs; `logits` ([2, 24, vocab], f32): the model's logits on them;
- `loss`: transformers' causal LM loss with labels = ids (mean over the 2 * 23 predicted tokens);
- `prompt` (8 ids) and `greedy` (the 32 tokens greedy decoding adds to it, no early stop);
- for llama and qwen2, `finetune`: the model trained by torch for 5 AdamW steps on
  `finetune/train.txt` (the settings in `finetune/settings.json`, which the codex-ml run of the
  test repeats), with the loss of each step, and `finetuned_logits` in expected.safetensors: the
  trained model's logits on `ids`.

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


def record(model, tokenizer, name, seed, tune):
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
    tensors = {"ids": ids.to(torch.int32).contiguous(), "logits": out.logits.float().contiguous()}
    expected = {
        "versions": PINNED,
        "loss": out.loss.item(),
        "prompt": prompt[0].tolist(),
        "greedy": greedy,
    }
    if tune:
        # Last: training changes the model's weights.
        expected["finetune"], tensors["finetuned_logits"] = finetune(model, tokenizer, ids)
    save_file(tensors, os.path.join(d, "expected.safetensors"))
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2)
        f.write("\n")


# Fine-tuning: what the codex-ml run of the parity test repeats. The text is cut as codex-ml cuts
# a stream: the document's ids and the end-of-text id, windows of SEQ_LEN + 1 tokens starting at
# multiples of SEQ_LEN, and one batch holding every window, so that the order codex-ml draws
# cannot matter. Weight decay applies to every parameter (codex-ml's `no_decay: []`).
FINETUNE = {
    "seq_len": 16,
    "steps": 5,
    "lr": 1e-3,
    "betas": [0.9, 0.95],
    "eps": 1e-8,
    "weight_decay": 0.1,
    "clip_norm": 1.0,
}
TRAIN_TEXT = (
    "def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n"
    "    return total / len(xs)\n\n\nclass Stack:\n    def __init__(self):\n"
    "        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n\n"
    "    def pop(self):\n        return self.items.pop()\n"
)
VAL_TEXT = "def square(x):\n    return x * x\n"


def write_finetune_data():
    d = os.path.join(OUT, "finetune")
    os.makedirs(d, exist_ok=True)
    for file, text in (("train.txt", TRAIN_TEXT), ("val.txt", VAL_TEXT)):
        with open(os.path.join(d, file), "w", newline="\n") as f:
            f.write(text)
    with open(os.path.join(d, "settings.json"), "w") as f:
        json.dump(FINETUNE, f, indent=2)
        f.write("\n")


def finetune(model, tokenizer, ids):
    """Train 5 steps as the codex-ml run of the test does; the losses and the logits on `ids`."""
    stream = tokenizer(TRAIN_TEXT)["input_ids"] + [tokenizer.convert_tokens_to_ids(EOT)]
    seq = FINETUNE["seq_len"]
    n = (len(stream) - 1) // seq
    batch = torch.tensor([stream[i * seq : i * seq + seq + 1] for i in range(n)])
    inputs, targets = batch[:, :-1], batch[:, 1:]
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=FINETUNE["lr"],
        betas=tuple(FINETUNE["betas"]),
        eps=FINETUNE["eps"],
        weight_decay=FINETUNE["weight_decay"],
    )
    model.train()
    losses = []
    for _ in range(FINETUNE["steps"]):
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), FINETUNE["clip_norm"])
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return {"windows": n, "losses": losses}, logits.float().contiguous()


def save(model, tokenizer, name, seed, tune=False):
    perturb(model, seed)
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    record(model, tokenizer, name, seed, tune)


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
    save(LlamaForCausalLM(llama), tokenizer, "llama", 2, tune=True)

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
    save(Qwen2ForCausalLM(qwen2), tokenizer, "qwen2", 3, tune=True)
    write_finetune_data()


if __name__ == "__main__":
    main()
