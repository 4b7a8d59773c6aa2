"""Peak memory of Llama.from_pretrained against the size of the model it builds.

A random Llama (about 540 MB in fp32) is saved in Hugging Face's sharded safetensors layout, then loaded in a fresh
process, so that the peak resident set size (VmHWM) measures the load alone. A loader that held a second full copy
would print a ratio near 2; ours reads one tensor at a time straight into its parameter. transformers'
from_pretrained is measured the same way for reference.
    python benchmarks/bench_load_memory.py
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[3])
def hwm():  # peak resident set size so far, bytes
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
import apt_min.llama, transformers
# warm up before the baseline (imports, meta-device kernels: ~150 MB once per process) so only the load is measured
tiny = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
            num_key_value_heads=1)
with torch.device("meta"):
    apt_min.llama.Llama(apt_min.llama.LlamaConfig(**tiny))
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny))
before = hwm()
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[2]]
if sys.argv[1] == "ours":
    model = apt_min.llama.Llama.from_pretrained(sys.argv[4], dtype=dtype)
else:
    model = transformers.LlamaForCausalLM.from_pretrained(sys.argv[4], dtype=dtype)
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"peak": hwm() - before, "size": size}))
"""


def measure(who, dtype, folder):
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", CHILD, who, dtype, root, folder], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    from common import save_random_hf_llama

    with tempfile.TemporaryDirectory() as folder:
        save_random_hf_llama(folder, hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048,
                             max_shard_size="200MB")
        shards = sorted(p.name for p in Path(folder).glob("*.safetensors"))
        print(f"checkpoint: {len(shards)} safetensors shards, fp32")
        for dtype in ("fp32", "bf16"):
            for who in ("ours", "transformers"):
                r = measure(who, dtype, folder)
                print(f"{who:>12} -> {dtype}: model {r['size'] / 2**20:.0f} MiB, peak RSS growth "
                      f"{r['peak'] / 2**20:.0f} MiB, ratio {r['peak'] / r['size']:.2f}")


if __name__ == "__main__":
    main()
