"""Make the PEFT fixtures of the LoRA parity tests: adapters saved by peft on the tiny models
of tests/fixtures/hf/, and what peft computes with them.

Writes one directory per case under tests/fixtures/peft/ (gpt2, llama, qwen2, gpt2-bias-all,
qwen2-modules-to-save, llama-tied-embeddings), each an adapter directory that
`PeftModel.from_pretrained(base, dir)` loads (adapter_config.json,
adapter_model.safetensors, as `save_pretrained` writes them) plus:

- expected.json: `loss`, the causal LM loss on the ids of tests/fixtures/hf/<base model>/
  expected.safetensors (labels = ids, mean over the predicted tokens), and `keys`, the keys
  peft saved;
- expected.safetensors: `grad.<key>`, the gradient of that loss for every saved tensor (the
  adapter weights, the biases `bias` trains, the modules of `modules_to_save`), and
  `merged.<name>`, the weights (and biases) of the adapted modules and every trained tensor
  after `merge_and_unload()` (the others are the base's).

The adapters' weights are drawn at random with a fixed seed (peft's initialisation sets B to
zero, which would make every gradient of A zero and the loss the base model's); in the cases
marked `perturb`, every other trained tensor (biases, saved modules) gets random noise added
too, so a loader that missed one of them would compute another loss. The model is in eval
mode, so dropout is off. What each fixture covers:

- gpt2: Conv1D weights (`fan_in_fan_out`), the fused `c_attn` split into q, k and v, and
  `c_fc`, with `bias: lora_only`;
- llama: `q_proj` and `v_proj` of grouped-query attention, names matched as suffixes;
- qwen2: a regular expression (`.*\\.(k|o)_proj`), rank-stabilised scaling (`use_rslora`);
- gpt2-bias-all (base gpt2): `bias: all`, which trains every parameter named `*.bias`, the
  LayerNorms' included, saved under their own names (`<module>.base_layer.bias` for an adapted
  module), and `modules_to_save: ["wpe"]`, the position embedding (gpt2 ties its head to
  `wte`, so neither of those can be saved alone), saved as `transformer.wpe.weight`;
- qwen2-modules-to-save (base qwen2): `modules_to_save: ["lm_head", "model.norm"]`, the
  untied head and the final norm trained in full and saved under their own names, with
  `bias: all` on the q/k/v biases (q and v adapted, k not);
- llama-tied-embeddings (base llama, whose head is its embedding matrix):
  `modules_to_save: ["embed_tokens"]` with `ensure_weight_tying=True`, so the one trained
  matrix serves both, saved twice (`model.embed_tokens.weight` and `lm_head.weight`; its
  gradient is recorded under the first).

Run from the repository root, in a virtual environment with exactly these versions:

    python -m venv /tmp/peft-venv
    /tmp/peft-venv/bin/pip install torch==2.15.0 transformers==5.25.0 tokenizers==0.23.3 \
        safetensors==0.8.0 peft==0.21.2 numpy
    /tmp/peft-venv/bin/python tests/interop/make_peft_fixtures.py

The output is deterministic for these versions on a CPU; the tests need no Python.
"""

import json
import os
import shutil
import sys

# peft keeps `target_modules` as a set and saves it in the set's order, which follows Python's
# string hashing; this seed gives the committed files' order.
HASH_SEED = "3"
if os.environ.get("PYTHONHASHSEED") != HASH_SEED:
    os.execve(sys.executable, [sys.executable, *sys.argv],
              {**os.environ, "PYTHONHASHSEED": HASH_SEED})

PINNED = {
    "torch": "2.15.0",
    "transformers": "5.25.0",
    "safetensors": "0.8.0",
    "peft": "0.21.2",
}

import peft  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

HF = os.path.join("tests", "fixtures", "hf")
OUT = os.path.join("tests", "fixtures", "peft")

# name: (base model under tests/fixtures/hf/, perturb the trained tensors that are not
# adapters, LoraConfig options)
CASES = {
    "gpt2": ("gpt2", False, dict(r=4, lora_alpha=8, lora_dropout=0.1,
                                 target_modules=["c_attn", "c_fc"], bias="lora_only",
                                 fan_in_fan_out=True)),
    "llama": ("llama", False, dict(r=4, lora_alpha=16, lora_dropout=0.05,
                                   target_modules=["q_proj", "v_proj"])),
    "qwen2": ("qwen2", False, dict(r=8, lora_alpha=8, target_modules=r".*\.(k|o)_proj",
                                   use_rslora=True)),
    "gpt2-bias-all": ("gpt2", True, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                         bias="all", modules_to_save=["wpe"],
                                         fan_in_fan_out=True)),
    "qwen2-modules-to-save": ("qwen2", True, dict(r=4, lora_alpha=8,
                                                  target_modules=["q_proj", "v_proj"],
                                                  bias="all",
                                                  modules_to_save=["lm_head", "model.norm"])),
    "llama-tied-embeddings": ("llama", True, dict(r=4, lora_alpha=8,
                                                  target_modules=["q_proj", "v_proj"],
                                                  modules_to_save=["embed_tokens"],
                                                  ensure_weight_tying=True)),
}


def check_versions():
    found = {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "peft": peft.__version__,
    }
    wrong = {k: v for k, v in found.items() if v != PINNED[k]}
    if wrong:
        sys.exit(f"make_peft_fixtures.py pins {PINNED}; found {wrong}")


def make(name, base_name, perturb, options):
    torch.manual_seed(1234)
    base = AutoModelForCausalLM.from_pretrained(os.path.join(HF, base_name))
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **options))
    with torch.no_grad():
        for key, param in sorted(model.named_parameters()):
            if "lora_" in key:
                param.copy_(torch.randn(param.shape) * 0.05)
            elif perturb and param.requires_grad:
                param.add_(torch.randn(param.shape) * 0.05)
    model.eval()
    ids = load_file(os.path.join(HF, base_name, "expected.safetensors"))["ids"].long()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()

    out = os.path.join(OUT, name)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    grads = {}
    for key, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # A module of modules_to_save is saved under its own name.
        saved_key = key.replace(".modules_to_save.default", "").replace(".default", "")
        if saved_key not in saved:
            sys.exit(f"{name}: trainable {key} is not among the saved keys {sorted(saved)}")
        grads[f"grad.{saved_key}"] = param.grad.detach().clone()
    # A tied matrix is one parameter saved under each of its names.
    copies = {k for k in saved if f"grad.{k}" not in grads}
    for key in copies:
        if not any(torch.equal(saved[key], saved[g[len("grad."):]]) for g in grads):
            sys.exit(f"{name}: {key} is saved but neither trainable nor a copy of a trained tensor")
    adapted = {k[len("base_model.model."):].split(".lora_A")[0] for k in saved if ".lora_A" in k}
    merged = model.merge_and_unload()
    tensors = dict(grads)
    for key, value in merged.state_dict().items():
        if f"base_model.model.{key}" in copies:
            continue
        if key.rsplit(".", 1)[0] in adapted or f"base_model.model.{key}" in saved:
            tensors[f"merged.{key}"] = value.detach().clone().contiguous()
    save_file(tensors, os.path.join(out, "expected.safetensors"))
    expected = {"loss": loss.item(), "keys": sorted(saved)}
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2)
        f.write("\n")
    # save_pretrained writes a model card that names the local path; the fixture needs none.
    readme = os.path.join(out, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    print(f"{name}: loss {loss.item():.6f}, {len(saved)} adapter tensors")


def main():
    check_versions()
    os.makedirs(OUT, exist_ok=True)
    for name, (base_name, perturb, options) in CASES.items():
        make(name, base_name, perturb, options)


if __name__ == "__main__":
    main()
