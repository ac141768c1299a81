"""The quote guard (decode.constrain: quotes): code the answer writes on a line of its own is copied from the
evidence, never invented; prose, ending a line and citing after code stay free."""
from __future__ import annotations

import random

import pytest
import torch

from stages.common.grounding.constraints import GroundingProcessor, token_texts
from stages.common.grounding.quoteguard import STARTED, QuoteGuard, normal
from stages.common.grounding.quotes import check_code, code_like
from stages.common.types import Evidence, PackedWindow

EVIDENCE = Evidence([PackedWindow("kettle.py", 1, 9, (
    "def boil_water(litres, salt=None):\n"
    '    """Boil the given litres of water until the kettle whistles."""\n'
    "    temperature = 100\n"
    "    if salt:\n"
    "        temperature += salt.raise_by\n"
    "    return litres * temperature\n"))], 0)
LINES = [line for w in EVIDENCE.windows for line in w.text.splitlines()]
# what a small model writes when it "quotes" code it was not shown (from real answers, s24 eval)
INVENTED = ["def boil_tea(cups):", '"""Boil the water for tea."""', "return cups * 2", "temperature = 90",
            "if salt is None:", "@cached", "from kettle import boil", "import kettle", "boil_water(3)",
            "class Kettle:", "for cup in cups:", "raise ValueError('cold')", "self.temperature = 100"]


def test_every_line_called_code_has_a_prefix_the_guard_watches():
    """The guard starts watching a line once STARTED matches it; every line `code_like` calls code (what the check
    after decoding counts) matches STARTED, so no code line can slip past the guard unwatched."""
    from pathlib import Path

    corpus = INVENTED + LINES
    for source in sorted(Path(__file__).resolve().parents[1].joinpath("stages").rglob("*.py"))[:40]:
        corpus += source.read_text(encoding="utf-8").splitlines()
    code = [line for line in corpus if code_like(line)]
    assert len(code) > 500
    assert [line for line in code if not STARTED.match(normal(line, ending=True))] == []
    for prose in ["The function boils water.", "It returns the litres.", "`boil_water` [kettle.py:1-9]",
                  "Here's an example:", "Returns the temperature"]:
        assert not STARTED.match(normal(prose)), prose


def test_allowed_lines_are_prefixes_of_evidence_lines(default_tokenizer):
    guard = QuoteGuard(token_texts(default_tokenizer), LINES, cites=True)
    assert guard.valid("def boil_wa") and guard.valid("    def   boil_water(litres,") and guard.valid("def ")
    assert not guard.valid("def boil_tea") and not guard.valid('"""Boil the tea')
    assert guard.valid("The kettle boils water") and guard.valid("`boil_water` [kettle.py:1-9]")
    # a citation after quoted code, complete or being opened (the citation slot completes it), is not part of it
    assert guard.valid("temperature = 100 [kettle.py:1-9]") and guard.valid("temperature = 100 [")
    assert not guard.valid("temperature = 90 [kettle.py:1-9]") and not guard.valid("temperature = 100 [x")
    assert not guard.valid("temperature = 100 [kettle.py:1-9] + 1")
    # but not inside one: a quoted line interleaved with citations reads as neither
    assert not guard.valid('"""Boil the [kettle.py:1-9] given') and not guard.valid("def boil_water( [")
    assert guard.valid("temperature = 100 [kettle.py:1-9] [kettle.py:1-9]", ending=True)
    # without citation slots a "[" is text like any other
    assert not QuoteGuard(token_texts(default_tokenizer), LINES).valid("temperature = 100 [")
    # a line held to the evidence ends only as a whole evidence line (no fragment per line: `e`, `for`, `except`)
    assert guard.valid("    return litres * temperature  ", ending=True) and not guard.valid("return litres", ending=True)
    assert guard.valid("It returns", ending=True) and guard.valid("return litres")


def tempted_walk(tok, processor, sample: bool, seed: int) -> str:
    """A stand-in model writing lines: each line it sets out to spell one of the invented lines or the evidence's
    (pieces of it boosted, noise on every logit); off its target (masked), it favours the evidence's tokens and the
    line's end. Greedy or sampled."""
    rng = random.Random(seed)
    texts = token_texts(tok)
    evidence_tokens = sorted({i for line in LINES for i in tok(line, add_special_tokens=False)["input_ids"]})
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    ids, written, target = [0], "", ""
    for _ in range(400):
        line = written.rsplit("\n", 1)[-1]
        if not line:
            target = rng.choice(INVENTED + LINES) + rng.choice(["", " [kettle.py:1-9]"])
        scores = torch.randn(1, len(tok), generator=torch.Generator().manual_seed(rng.randint(0, 2**31)))
        rest = target[len(line):] if target.startswith(line) else None
        if rest:
            for i, text in enumerate(texts):
                if text and rest.startswith(text):
                    scores[0, i] += 10.0 + len(text)
        else:
            scores[0, evidence_tokens] += 5.0
            scores[0, newline] += 8.0 if rest is None else 30.0
        out = processor(torch.tensor([ids]), scores.clone())
        assert torch.isfinite(out).any()
        if sample:
            probs = torch.softmax(out[0], dim=-1)
            token = int(torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(rng.randint(0, 2**31))))
        else:
            token = int(out[0].argmax())
        ids.append(token)
        written += texts[token]
    return written


@pytest.mark.parametrize("sample", [False, True])
def test_guarded_decoding_writes_no_code_the_evidence_does_not_hold(default_tokenizer, sample):
    tok = default_tokenizer
    unguarded = check_code(tempted_walk(tok, lambda ids, scores: scores, sample, 3), EVIDENCE)
    assert len(unguarded.unverified) > 5, unguarded  # the temptation works without the guard
    guard = QuoteGuard(token_texts(tok), LINES, greedy=not sample)
    text = tempted_walk(tok, GroundingProcessor(tok, 1, {}, quotes=guard), sample, 3)
    if not sample:  # greedy keeps one token a step: the one a guard checking all k would have made the likeliest
        assert text == tempted_walk(tok, GroundingProcessor(tok, 1, {}, quotes=QuoteGuard(token_texts(tok), LINES)),
                                    False, 3)
    check = check_code(text, EVIDENCE)
    assert len(check.lines) > 5 and check.unverified == [], (check.texts, text)
    assert guard.steered > 0


def test_a_model_set_on_an_invented_signature_quotes_the_evidence_instead(default_tokenizer):
    """Greedy, with logits that spell `def boil_tea(cups):` (an invented signature) and favour, less, the evidence's
    tokens: unguarded it writes the invention; guarded, the line it writes is one the evidence holds."""
    tok = default_tokenizer
    texts = token_texts(tok)
    evidence_tokens = sorted({i for line in LINES for i in tok(line, add_special_tokens=False)["input_ids"]})
    target = "\ndef boil_tea(cups):\n"

    def write(processor) -> str:
        written = ""
        for _ in range(40):
            scores = torch.zeros(1, len(tok))
            scores[0, evidence_tokens] = 5.0
            rest = target[len(written):] if target.startswith(written) else ""
            for i, text in enumerate(texts):
                if text and rest.startswith(text):
                    scores[0, i] = 10.0 + len(text)
            token = int(processor(torch.tensor([[0] + tok(written, add_special_tokens=False)["input_ids"]]),
                                  scores)[0].argmax()) if processor else int(scores[0].argmax())
            written += texts[token]
            if written.count("\n") >= 2:
                break
        return written

    assert "def boil_tea(cups):" in write(None)
    guard = QuoteGuard(texts, LINES)
    quoted = write(GroundingProcessor(tok, 1, {}, quotes=guard))
    line = quoted.strip().splitlines()[0]
    assert line.startswith("def boil_") and code_like(line) and check_code(quoted, EVIDENCE).unverified == [], quoted


def test_when_no_likely_token_is_allowed_only_the_evidence_continuations_are(default_tokenizer):
    tok = default_tokenizer
    tempting = tok(" tea", add_special_tokens=False)["input_ids"] + tok("tea", add_special_tokens=False)["input_ids"]
    guard = QuoteGuard(token_texts(tok), LINES, k=len(tempting))
    line = "    def boil_"
    scores = torch.zeros(len(tok))
    scores[tempting] = 50.0
    guard.apply(scores, line)
    allowed = torch.isfinite(scores).nonzero().flatten().tolist()
    assert allowed and all(guard.allows(line, t) for t in allowed)
    texts = token_texts(tok)
    assert any("water".startswith(texts[t]) and texts[t] for t in allowed)  # the evidence's next letters
    assert not any("\n" in texts[t] for t in allowed)  # "def boil_" is no whole line: it may not end here
    # the likeliest allowed token after the line is a piece of the evidence line
    best = int(scores.argmax())
    assert normal(line + texts[best]).startswith("def boil_") and guard.is_prefix(normal(line + texts[best]))


@pytest.mark.parametrize("before, allowed", [("`boil_water` [kettle.py:1-9] heat", True), ("text\nheat", False)])
def test_the_guard_goes_on_from_the_line_the_prompt_left_open(default_tokenizer, before, allowed):
    """After the lead (`name` [span]) the first generated tokens continue the lead's line: `heat =` there is prose,
    on a line of its own it would start code the evidence does not hold."""
    tok = default_tokenizer
    prompt = tok("Q?\n", add_special_tokens=False)["input_ids"]
    processor = GroundingProcessor(tok, len(prompt), {}, quotes=QuoteGuard(token_texts(tok), LINES), before=before)
    scores = torch.zeros(1, len(tok))
    target = tok(" =", add_special_tokens=False)["input_ids"]
    assert len(target) == 1
    scores[0, target[0]] = 30.0
    out = processor(torch.tensor([prompt]), scores.clone())
    assert (int(out[0].argmax()) == target[0]) is allowed


def test_lines_going_on_a_code_block_are_held_too(default_tokenizer):
    """After a quoted code line, an indented or bracket-closing line continues the block (as `quotes.code_blocks`
    reads it): it must be evidence too; an unindented prose line ends the block and is free."""
    guard = QuoteGuard(token_texts(default_tokenizer), LINES)
    block = guard.ends_block("def boil_water(litres, salt=None):", False)
    assert block and not guard.ends_block("", block) and not guard.ends_block("It boils.", block)
    assert guard.valid("    temperature = 1", block=block)  # starts as code anyway
    assert not guard.valid("    salt.raise_by{", block=block) and guard.valid("    salt.raise_by{", block=False)
    assert not guard.valid(")] + made_up", block=block) and guard.valid("It boils the water.", block=block)
    assert guard.valid("    if salt:", block=block) and guard.valid("    ", block=block)  # nothing written yet
    assert not guard.valid("    e", ending=True, block=block) and guard.valid("    e", ending=True, block=False)
    # the processor carries the block from line to line
    tok = default_tokenizer
    processor = GroundingProcessor(tok, 1, {}, quotes=guard)
    ids = [0] + tok("def boil_water(litres, salt=None):\n    ", add_special_tokens=False)["input_ids"]
    scores = torch.zeros(1, len(tok))
    invented = tok("pepper", add_special_tokens=False)["input_ids"][0]
    scores[0, invented] = 30.0
    assert int(processor(torch.tensor([ids]), scores.clone())[0].argmax()) != invented
    assert processor.rows[0].code_block


def test_decode_with_quotes_and_labels_on_the_tiny_model(tiny_lm, index_with_windows):
    """Through `Decode` and transformers' generate: the prompt carries the packed lines and the label spans, and
    what the sampled reply holds is neither unverified code nor a mislabelled citation."""
    from stages.common.grounding.labels import mislabels
    from stages.decode import Decode
    from stages.scaffold import BuildPrompt

    index, evidence = index_with_windows
    prompt = BuildPrompt(form="lead").run("Where is the kettle boiled?", evidence, tiny_lm, index)["prompt"]
    assert prompt.quotes and prompt.labels.get("boil_water")
    for seed in range(3):
        draft = Decode(do_sample=True, temperature=1.5, max_new_tokens=64, min_new_tokens=0, seed=seed,
                       constrain=["lead", "citations", "code", "prose", "quotes", "labels"]).run(tiny_lm, prompt)["draft"]
        assert check_code(draft.text, evidence).unverified == [] and mislabels(draft.text, index) == [], draft.text
