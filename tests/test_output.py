"""Detokenization and stop strings in the output processor, without a model."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetllm.engine.output import OutputProcessor
from fleetllm.engine.tokenizer import Tokenizer
from fleetllm.sampling_params import SamplingParams
from fleetllm.sched.output import EngineCoreOutput
from tests.conftest import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    d: Path = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return Tokenizer(str(d))


def _byte_tokens(tok: Tokenizer, text: str) -> list[int]:
    """One token per byte, so multi-byte characters are split across tokens."""

    ids = []
    for b in text.encode("utf-8"):
        ch = _BYTES_TO_UNICODE[b]
        tid = tok.tokenizer.token_to_id(ch)
        assert tid is not None, (b, ch)
        ids.append(tid)
    return ids


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte-to-unicode table, which ByteLevel uses.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTES_TO_UNICODE = _bytes_to_unicode()


def _feed(proc: OutputProcessor, req: str, ids: list[int], finish_last: bool = True):
    texts, finished = [], []
    for i, t in enumerate(ids):
        last = finish_last and i == len(ids) - 1
        done, abort = proc.process_outputs(
            [EngineCoreOutput(req, [t], finish_reason="length" if last else None)])
        finished += done
        child = proc.children.get(req)
        texts.append(child.output.text if child else (done[0].outputs[0].text if done else None))
        if abort:
            return texts, finished, abort
    return texts, finished, []


def test_never_emits_half_a_multibyte_character(tokenizer: Tokenizer) -> None:
    text = "aé日本✓b"
    ids = _byte_tokens(tokenizer, text)
    assert len(ids) == len(text.encode())
    proc = OutputProcessor(tokenizer)
    proc.add_request("r", ["r"], None, [1], SamplingParams(max_tokens=len(ids)))
    texts, finished, _ = _feed(proc, "r", ids)
    for partial in texts:
        assert "\ufffd" not in partial
        assert text.startswith(partial)
    assert finished[0].outputs[0].text == text
    assert finished[0].outputs[0].token_ids == ids


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_text_and_asks_engine_to_abort(tokenizer: Tokenizer,
                                                        include: bool) -> None:
    ids = _byte_tokens(tokenizer, "x = 1\nSTOP here")
    proc = OutputProcessor(tokenizer)
    params = SamplingParams(max_tokens=100, stop=["STOP"], include_stop_str_in_output=include)
    proc.add_request("r", ["r"], None, [1], params)
    _, finished, abort = _feed(proc, "r", ids, finish_last=False)
    assert abort == ["r"]
    out = finished[0].outputs[0]
    assert out.text == ("x = 1\nSTOP" if include else "x = 1\n")
    assert out.finish_reason == "stop" and out.stop_reason == "STOP"
    assert not proc.has_unfinished()


def test_n_copies_finish_together(tokenizer: Tokenizer) -> None:
    proc = OutputProcessor(tokenizer)
    proc.add_request("7", ["0_7", "1_7"], "p", [1], SamplingParams(n=2, max_tokens=1))
    done, _ = proc.process_outputs([EngineCoreOutput("0_7", [5], finish_reason="length")])
    assert done == []
    done, _ = proc.process_outputs([EngineCoreOutput("1_7", [6], finish_reason="length")])
    assert [o.index for o in done[0].outputs] == [0, 1]
    assert [o.token_ids for o in done[0].outputs] == [[5], [6]]
