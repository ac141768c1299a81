"""Bench rows of memory: one answer's peak RSS against its floor and against plain transformers."""
from __future__ import annotations

from collections.abc import Sequence

from bench.harness import PROGRAM_80, fresh_python, row

# a fresh process with every import an answer makes, then its RSS: the floor's first part (ours and the peer alike)
_FRESH_PROCESS = """
import json, sys
from pipeline.engine.execute import peak_rss_mb
def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) / 1024 for l in status if l.startswith("VmRSS:"))
import torch, transformers, numpy, networkx
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama import modeling_llama
from pipeline import api
from pipeline.engine import resources
import stages.model, stages.decode, stages.mix, stages.index, stages.pack, stages.select, stages.scaffold
imports = rss_mb()
"""


_RSS_CODE = _FRESH_PROCESS + """
_, result = api.run(["program_root={root}", "prompt=How are config groups composed?", "decode.max_new_tokens=64", *{extra!r}])
lm = resources.values("model")[-1]
from stages.common.generation.precision import weight_bytes
nodes = [(t.node, t.peak_rss_mb) for t in result.trace if t.status == "ok"]
prompt = result.output("leadsim", "prompt") or result.output("scaffold", "prompt")
print(json.dumps({{"peak": peak_rss_mb(), "imports": imports, "weights": weight_bytes(lm.model) / 2**20, "nodes": nodes,
                  "ids": prompt.ids, "folder": lm.model.config._name_or_path, "dtype": str(lm.model.dtype)}}))
"""


# the peer: plain transformers in a fresh process, the same imports, the same weights file and the same prompt's token
# ids, greedy `generate` of as many tokens: what any answer of this prompt by this model costs, with nothing of ours
_RSS_PEER_CODE = _FRESH_PROCESS + """
tokenizer = AutoTokenizer.from_pretrained({folder!r})
model = AutoModelForCausalLM.from_pretrained({folder!r}, dtype=getattr(torch, {dtype!r}.split(".")[-1])).eval()
ids = torch.tensor([{ids!r}])
with torch.no_grad():
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=64,
                   min_new_tokens=64, pad_token_id=tokenizer.pad_token_id)
print(json.dumps({{"peak": peak_rss_mb(), "imports": imports}}))
"""


def peak_rss(extra: Sequence[str] = ()) -> list[dict]:
    """Peak RSS of one answer in a fresh process vs its floor: the interpreter with every import done plus the weights."""
    got = fresh_python(_RSS_CODE.format(root=str(PROGRAM_80), extra=list(extra)))
    floor = got["imports"] + got["weights"]
    ratio = got["peak"] / floor
    rises, last = [], got["imports"]
    for node, peak in got["nodes"]:  # where the peak grew, node by node
        if peak - last >= 5:
            rises.append(f"{node} +{peak - last:.0f}")
        last = max(last, peak)
    label = " ".join(extra) or "default config"
    rows = [row(f"peak RSS of one answer vs (interpreter with imports + weights), {label}", got["peak"], floor, ratio,
                "<= 1.25", ratio <= 1.25, "MiB",
                f"fresh process; imports {got['imports']:.0f} MiB, weights {got['weights']:.0f} MiB; peak grew at: "
                f"{', '.join(rises) or 'nowhere'} (MiB)")]
    if not extra:  # the peer: the same prompt answered by plain transformers (tokenizer, weights, generate)
        peer = fresh_python(_RSS_PEER_CODE.format(folder=got["folder"], dtype=got["dtype"], ids=got["ids"]))
        rows.append(row("peak RSS of one answer vs plain transformers generate of the same prompt and weights, default "
                        "config", got["peak"], peer["peak"], got["peak"] / peer["peak"], "report", True, "MiB",
                        f"fresh processes; the peer (tokenizer, model, generate of 64 tokens after the {len(got['ids'])}"
                        f"-token prompt) peaks at {peer['peak'] / floor:.3f}x the floor"))
    return rows


def peak_rss_rows() -> list[dict]:
    # the default (bfloat16, merge in place), the float32 + hooks default before it, bfloat16 with hooks, and llama.cpp
    # decoding (its mapped GGUF comes on top of the transformers weights, which are still loaded: not in the floor)
    rows = [*peak_rss(), *peak_rss(["model.dtype=float32", "mix.mode=hooks"]), *peak_rss(["mix.mode=hooks"])]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return rows  # without the engines extra there is no llama.cpp row to measure
    return rows + peak_rss(["synth=none", "decode.engine=llamacpp"])
