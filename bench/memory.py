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
peak = peak_rss_mb()  # before anything below reads the model
lm = resources.values("model")[-1]
from stages.common.generation.precision import weight_bytes
nodes = [(t.node, t.peak_rss_mb) for t in result.trace if t.status == "ok"]
prompt = result.output("leadsim", "prompt") or result.output("scaffold", "prompt")
if lm.weights_loaded:  # decoded by transformers: its weights are the floor's second part
    weights, folder, dtype, engine = weight_bytes(lm.model) / 2**20, lm.model.config._name_or_path, str(lm.model.dtype), "transformers"
else:  # decoded by llama.cpp, which maps the GGUF: the file is the floor's second part
    weights, folder, dtype, engine = lm.gguf.stat().st_size / 2**20, str(lm.gguf), None, "llamacpp"
print(json.dumps({{"peak": peak, "imports": imports, "weights": weights, "nodes": nodes, "ids": prompt.ids,
                  "folder": folder, "dtype": dtype, "engine": engine}}))
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

# the peer of an answer llama.cpp decoded: llama-cpp-python's own Llama on the same GGUF (the context our engine
# takes), greedy tokens after the same ids
_RSS_LLAMA_PEER_CODE = _FRESH_PROCESS + """
from llama_cpp import Llama
llm = Llama(model_path={folder!r}, n_ctx=4096, n_threads=torch.get_num_threads(), verbose=False)
for n, _ in enumerate(llm.generate({ids!r}, top_k=1, temp=0.0), 1):
    if n == 64:
        break
print(json.dumps({{"peak": peak_rss_mb(), "imports": imports}}))
"""


def peak_rss(extra: Sequence[str] = (), peer: bool = False) -> list[dict]:
    """Peak RSS of one answer in a fresh process vs its floor: the interpreter with every import done plus the weights
    the decoding engine reads; ``peer``: also against the plain engine answering the same prompt."""
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
                f"fresh process; decoded by {got['engine']}; imports {got['imports']:.0f} MiB, weights "
                f"{got['weights']:.0f} MiB; peak grew at: {', '.join(rises) or 'nowhere'} (MiB)")]
    if peer:  # the same prompt answered by the plain engine (tokenizer, weights, generate)
        code = _RSS_LLAMA_PEER_CODE if got["engine"] == "llamacpp" else _RSS_PEER_CODE
        plain = fresh_python(code.format(folder=got["folder"], dtype=got["dtype"], ids=got["ids"]))
        name = "llama-cpp-python's Llama" if got["engine"] == "llamacpp" else "transformers generate"
        rows.append(row(f"peak RSS of one answer vs plain {name} of the same prompt and weights, {label}",
                        got["peak"], plain["peak"], got["peak"] / plain["peak"], "report", True, "MiB",
                        f"fresh processes; the peer (64 greedy tokens after the {len(got['ids'])}-token prompt) peaks "
                        f"at {plain['peak'] / floor:.3f}x the floor"))
    return rows


def peak_rss_rows() -> list[dict]:
    # the default (llama.cpp, no adapter; transformers where llama.cpp is not installed), then the adapter's answers
    # through transformers: bfloat16 merged in place, bfloat16 with hooks, float32 with hooks
    return [*peak_rss(peer=True), *peak_rss(["synth=hashed"], peer=True), *peak_rss(["synth=hashed", "mix.mode=hooks"]),
            *peak_rss(["synth=hashed", "model.dtype=float32", "mix.mode=hooks"])]
