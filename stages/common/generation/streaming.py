"""The answer as it decodes, token by token, on the terminal the framework lends to a run.

The framework lends a console (``pipeline.engine.resources`` namespace ``console``) only to an interactive single run
or a chat; a multirun, a pipe, CI or the Python API gets none, and then no streamer is made and nothing extra is
printed. The stage-2 retry is announced before its tokens, so a reader knows why a second draft follows.
"""
from __future__ import annotations

from typing import Any

from pipeline.engine import resources

RETRY_BANNER = ("\n\n── retry (stage 2): the draft above failed the citation check; decoding again with a stronger "
                "scaffold and a boosted mix ──\n")
DRAFT_BANNER = "── draft (streamed as it decodes; what the checks change, if anything, follows) ──\n"


def console_streamer(tokenizer: Any, attempt: int = 1, prefill: str = "") -> Any | None:
    """A transformers streamer that writes to the lent console, or None when there is no console."""
    sink = resources.get("console", "stream")
    if sink is None:
        return None
    from transformers import TextStreamer

    stream = sink  # bound here: not None

    class ConsoleStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stream.write(text)

    sink.write(RETRY_BANNER if attempt > 1 else DRAFT_BANNER)
    if hasattr(sink, "new_draft"):  # the console keeps each attempt's text: the app shows only what checks changed
        sink.new_draft()
    if prefill:
        sink.write(prefill)
    return ConsoleStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
