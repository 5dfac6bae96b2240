"""Make the PEFT fixtures of the LoRA parity tests: adapters saved by peft on the tiny models
of tests/fixtures/hf/, and what peft computes with them.

Writes tests/fixtures/peft/{gpt2,llama,qwen2}/, each an adapter directory that
`PeftModel.from_pretrained(base, dir)` loads (adapter_config.json,
adapter_model.safetensors, as `save_pretrained` writes them) plus:

- expected.json: `loss`, the causal LM loss on the ids of tests/fixtures/hf/<model>/
  expected.safetensors (labels = ids, mean over the predicted tokens), and `keys`, the keys
  peft saved;
- expected.safetensors: `grad.<key>`, the gradient of that loss for every saved tensor (the
  adapter weights, and the biases `bias` trains), and `merged.<name>`, the weights (and
  biases) of the adapted modules after `merge_and_unload()` (the others are the base's).

The adapters' weights are drawn at random with a fixed seed (peft's initialisation sets B to
zero, which would make every gradient of A zero and the loss the base model's). The model is
in eval mode, so dropout is off. What each fixture covers:

- gpt2: Conv1D weights (`fan_in_fan_out`), the fused `c_attn` split into q, k and v, and
  `c_fc`, with `bias: lora_only`;
- llama: `q_proj` and `v_proj` of grouped-query attention, names matched as suffixes;
- qwen2: a regular expression (`.*\\.(k|o)_proj`), rank-stabilised scaling (`use_rslora`).

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

CASES = {
    "gpt2": dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["c_attn", "c_fc"],
                 bias="lora_only", fan_in_fan_out=True),
    "llama": dict(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]),
    "qwen2": dict(r=8, lora_alpha=8, target_modules=r".*\.(k|o)_proj", use_rslora=True),
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


def make(name, options):
    torch.manual_seed(1234)
    base = AutoModelForCausalLM.from_pretrained(os.path.join(HF, name))
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **options))
    with torch.no_grad():
        for key, param in sorted(model.named_parameters()):
            if "lora_" in key:
                param.copy_(torch.randn(param.shape) * 0.05)
    model.eval()
    ids = load_file(os.path.join(HF, name, "expected.safetensors"))["ids"].long()
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
        saved_key = key.replace(".default", "")
        if saved_key not in saved:
            sys.exit(f"{name}: trainable {key} is not among the saved keys {sorted(saved)}")
        grads[f"grad.{saved_key}"] = param.grad.detach().clone()
    if len(grads) != len(saved):
        sys.exit(f"{name}: {len(saved)} tensors saved, {len(grads)} trainable")
    adapted = {k[len("base_model.model."):].split(".lora_A")[0] for k in saved if ".lora_A" in k}
    merged = model.merge_and_unload()
    tensors = dict(grads)
    for key, value in merged.state_dict().items():
        if key.rsplit(".", 1)[0] in adapted:
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
    for name, options in CASES.items():
        make(name, options)


if __name__ == "__main__":
    main()
