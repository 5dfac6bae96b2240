"""Check `codex-ml export` against the real transformers.

    python tests/interop/hf_export_check.py CODEX_ML WORK_DIR
    python tests/interop/hf_export_check.py CODEX_ML RUN_DIR DATA_FILE OUT_DIR

The first form trains two short runs in WORK_DIR, run from the repository root — a GPT-2 from
scratch on the repository's sources, and a fine-tune of the LLaMA fixture (grouped-query
attention, tied embeddings, llama3 rope scaling) — and checks each as the second form does.

The second form exports RUN_DIR's newest checkpoint to OUT_DIR (which must not exist), loads it with
`AutoModelForCausalLM` and `AutoTokenizer` with every warning turned into an error (Python
warnings and transformers' logged warnings alike: a missing or unexpected weight fails), and
compares transformers' loss on DATA_FILE with `codex-ml eval RUN_DIR --data DATA_FILE`, computed
on the same windows: the file's ids followed by the end-of-text id, cut into windows of the
run's `seq_len`, every next-token prediction counted once. Prints both losses and their
relative difference; fails above 1e-4.

Versions checked with: torch 2.15.0, transformers 5.25.0, tokenizers 0.23.3 (CPU).
"""

import json
import logging
import math
import os
import subprocess
import sys
import warnings


class FailOnWarning(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            raise RuntimeError(f"transformers warned: {record.getMessage()}")


RUNS = {
    "gpt2": """(
    experiment: "export-gpt2",
    data: (train: [Text(paths: ["{root}/host/src/**/*.rs"])], val_fraction: 0.1),
    tokenizer: (name: "bpe", params: (vocab_size: 512)),
    model: (name: "gpt2", params: (n_layer: 2, n_head: 2, n_embd: 64, n_positions: 64)),
    optimizer: (name: "adamw", lr: 2e-3),
    train: (max_steps: 20, seq_len: 64, batch_size: 8, eval_every: 20, eval_batches: 2,
            checkpoint_every: 20),
)""",
    "llama": """(
    experiment: "export-llama",
    data: (train: [Text(paths: ["{root}/plugins/**/*.rs"])], val_fraction: 0.1),
    model: (from: "{root}/tests/fixtures/hf/llama"),
    optimizer: (name: "adamw", lr: 1e-3),
    train: (max_steps: 5, seq_len: 64, batch_size: 4, eval_every: 5, eval_batches: 2,
            checkpoint_every: 5),
)""",
}


def main():
    if len(sys.argv) == 3:
        codex_ml, work = sys.argv[1:3]
        root = os.getcwd()
        data_file = os.path.join(root, "tests", "fixtures", "data", "code", "window.rs")
        for name, config in RUNS.items():
            path = os.path.join(work, f"{name}.ron")
            with open(path, "w", encoding="utf-8") as f:
                f.write(config.replace("{root}", root))
            run_dir = os.path.join(work, f"run-{name}")
            subprocess.run([codex_ml, "run", path, "--run-dir", run_dir, "-q"], check=True)
            print(f"{name}: ", end="", flush=True)
            check(codex_ml, run_dir, data_file, os.path.join(work, f"export-{name}"))
        return
    check(*sys.argv[1:5])


def check(codex_ml, run_dir, data_file, out_dir):
    subprocess.run(
        [codex_ml, "export", run_dir, out_dir, "-q"], check=True, stdout=subprocess.DEVNULL
    )
    evaluated = json.loads(
        subprocess.run(
            [codex_ml, "eval", run_dir, "--data", data_file, "--json", "-q"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )

    warnings.simplefilter("error")
    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_warning()
    logger = transformers.logging.get_logger()
    if not any(isinstance(h, FailOnWarning) for h in logger.handlers):
        logger.addHandler(FailOnWarning())

    model, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    for kind, names in info.items():
        if names:
            raise RuntimeError(f"{kind}: {names}")
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model.eval()

    # The ids codex-ml trains and evaluates on: special-token text stays text.
    raw = Tokenizer.from_file(f"{out_dir}/tokenizer.json")
    raw.encode_special_tokens = True
    with open(data_file, encoding="utf-8") as f:
        text = f.read()
    eot = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    stream = raw.encode(text, add_special_tokens=False).ids + [eot]
    with open(f"{run_dir}/config.ron", encoding="utf-8") as f:
        ron = f.read()
    seq_len = int(ron.split("seq_len:")[1].split(",")[0].strip())

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, seq_len):
            window = stream[start : start + seq_len + 1]
            ids = torch.tensor([window[:-1]])
            logits = model(input_ids=ids).logits[0].double()
            targets = torch.tensor(window[1:])
            nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += len(targets)
    ours = evaluated["loss"]
    theirs = nll / count
    rel = abs(ours - theirs) / abs(theirs)
    print(f"tokens {count}: codex-ml eval {ours:.6f}, transformers {theirs:.6f}, relative {rel:.2e}")
    if count != evaluated["tokens"]:
        raise RuntimeError(f"codex-ml counted {evaluated['tokens']} tokens, transformers {count}")
    if not math.isfinite(rel) or rel > 1e-4:
        raise RuntimeError("the losses differ")


if __name__ == "__main__":
    main()
