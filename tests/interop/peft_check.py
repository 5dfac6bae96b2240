"""Check `codex-ml export --adapter` against the real PEFT.

    python tests/interop/peft_check.py CODEX_ML WORK_DIR

Run from the repository root. Trains a short LoRA run in WORK_DIR, exports its adapter, loads
it with `PeftModel.from_pretrained(base, dir)` with every warning turned into an error (PEFT
only warns about adapter keys it cannot place, so a wrongly named adapter would otherwise load
as one that does nothing), checks that the adapter changes the model, and compares PEFT's loss
on a data file with `codex-ml eval RUN_DIR --data FILE` on the same windows (the file's ids and
the end-of-text id, cut into windows of the run's `seq_len`). Then exports the model with the
adapter merged (`export --merge`) and checks it equals PEFT's `merge_and_unload()` within
1e-6. Prints the losses and their relative difference; fails above 1e-4. Three runs:

- llama (tests/fixtures/hf/llama): r 8 on q/k/v/o, dropout on;
- qwen2 (tests/fixtures/hf/qwen2): r 4 on q/v, `bias: "all"` (q/k/v biases, two of them on
  adapted modules) and `modules_to_save: ["lm_head", "model.norm"]` (the untied head);
- llama-tied: r 4 on q/v and `modules_to_save: ["embed_tokens"]`, the embedding LLaMA's
  head is tied to (exported with `ensure_weight_tying`).

Versions checked with: torch 2.15.0, transformers 5.25.0, tokenizers 0.23.3, peft 0.21.2 (CPU).
"""

import json
import logging
import math
import os
import subprocess
import sys
import warnings

CONFIG = """(
    experiment: "peft-{model}",
    data: (train: [Text(paths: ["{root}/plugins/**/*.rs"])], val_fraction: 0.1),
    model: (from: "{root}/tests/fixtures/hf/{model}"),
    adapter: {adapter},
    optimizer: (name: "adamw", lr: 1e-2),
    train: (max_steps: 8, seq_len: 64, batch_size: 4, eval_every: 8, eval_batches: 2,
            checkpoint_every: 8),
)"""

# name: (fixture model, adapter section)
ADAPTERS = {
    "llama": ("llama", """(kind: "lora", r: 8, alpha: 16, dropout: 0.05,
              target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"])"""),
    "qwen2": ("qwen2", """(kind: "lora", r: 4, alpha: 8, target_modules: ["q_proj", "v_proj"],
              bias: "all", modules_to_save: ["lm_head", "model.norm"])"""),
    "llama-tied": ("llama", """(kind: "lora", r: 4, alpha: 8, target_modules: ["q_proj", "v_proj"],
              modules_to_save: ["embed_tokens"])"""),
}


class FailOnWarning(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            raise RuntimeError(f"warned: {record.getMessage()}")


def main():
    codex_ml, work = sys.argv[1:3]
    warnings.simplefilter("error")
    # transformers' own deprecation notices are not about the adapter.
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.logging.set_verbosity_warning()
    for name in ("transformers", "peft"):
        logger = logging.getLogger(name)
        logger.addHandler(FailOnWarning())
    for name, (model, adapter) in ADAPTERS.items():
        check(codex_ml, os.path.join(work, name), name, model, adapter)


def check(codex_ml, work, name, model_name, adapter):
    os.makedirs(work, exist_ok=True)
    root = os.getcwd()
    base_dir = os.path.join(root, "tests", "fixtures", "hf", model_name)
    data_file = os.path.join(root, "tests", "fixtures", "data", "code", "window.rs")
    config = os.path.join(work, "lora.ron")
    text = CONFIG.replace("{adapter}", adapter).replace("{model}", model_name)
    with open(config, "w", encoding="utf-8") as f:
        f.write(text.replace("{root}", root))
    run_dir = os.path.join(work, "run")
    adapter_dir = os.path.join(work, "adapter")
    merged_dir = os.path.join(work, "merged")
    subprocess.run([codex_ml, "run", config, "--run-dir", run_dir, "-q"], check=True)
    for flag, out in (("--adapter", adapter_dir), ("--merge", merged_dir)):
        subprocess.run(
            [codex_ml, "export", run_dir, out, flag, "-q"], check=True, stdout=subprocess.DEVNULL
        )
    evaluated = json.loads(
        subprocess.run(
            [codex_ml, "eval", run_dir, "--data", data_file, "--json", "-q"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )

    import torch
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    plain = AutoModelForCausalLM.from_pretrained(base_dir)
    plain.eval()

    raw = Tokenizer.from_file(os.path.join(base_dir, "tokenizer.json"))
    raw.encode_special_tokens = True
    with open(data_file, encoding="utf-8") as f:
        text = f.read()
    eot = 0
    stream = raw.encode(text, add_special_tokens=False).ids + [eot]
    seq_len = 64

    def loss_of(m):
        nll, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(stream) - 1, seq_len):
                window = stream[start : start + seq_len + 1]
                logits = m(input_ids=torch.tensor([window[:-1]])).logits[0].double()
                targets = torch.tensor(window[1:])
                nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
                count += len(targets)
        return nll / count, count

    theirs, count = loss_of(model)
    untouched, _ = loss_of(plain)
    ours = evaluated["loss"]
    rel = abs(ours - theirs) / abs(theirs)
    print(
        f"{name}: peft {__import__('peft').__version__}, tokens {count}: codex-ml eval {ours:.6f}, "
        f"PEFT {theirs:.6f}, relative {rel:.2e} (base model {untouched:.6f})"
    )
    if count != evaluated["tokens"]:
        raise RuntimeError(f"codex-ml counted {evaluated['tokens']} tokens, PEFT {count}")
    if abs(untouched - theirs) < 1e-6:
        raise RuntimeError("the adapter PEFT loaded does not change the model")
    if not math.isfinite(rel) or rel > 1e-4:
        raise RuntimeError("the losses differ")

    merged = model.merge_and_unload().state_dict()
    exported = AutoModelForCausalLM.from_pretrained(merged_dir).state_dict()
    worst = max((merged[k] - exported[k]).abs().max().item() for k in exported)
    print(f"{name}: merged weights: largest difference from merge_and_unload {worst:.2e}")
    if worst > 1e-6:
        raise RuntimeError("the merged export differs from PEFT's merge_and_unload")


if __name__ == "__main__":
    main()
