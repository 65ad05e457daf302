"""Structured outputs: JSON schemas, json_object, regex, choice and EBNF grammars hold on a
random model (only the token masks make its outputs valid), through preemption and with
tensor parallel workers; bad specs fail before anything is queued."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from fleetllm import SamplingParams, StructuredOutputsParams
from tests.helpers import kv_block_bytes, make_llm, random_prompts, token_prompts

PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Héllo wörld", "class Point:"]


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": False}


_INT = {"type": "integer", "minimum": 0, "maximum": 99}
_POINT = _obj({"x": _INT, "y": _INT})
SCHEMAS = [
    _obj({"name": {"type": "string", "maxLength": 8}, "age": _INT}),
    _obj({"color": {"enum": ["red", "green", "blue"]}}),
    _obj({"flag": {"type": "boolean"}, "nothing": {"type": "null"}}),
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
     "minItems": 1, "maxItems": 4},
    _obj({"user": _obj({"id": {"type": "integer", "minimum": 1, "maximum": 1000},
                        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                 "maxItems": 3}})}),
    _obj({"x": {"type": "number", "minimum": -10.5, "maximum": 10.5}}),
    _obj({"version": {"const": "v1"}, "n": _INT}),
    _obj({"a": _INT, "b": {"type": "boolean"}, "c": {"enum": [1, 2]}}, required=["a"]),
    {"type": "array", "items": _POINT, "maxItems": 3},
    _obj({"value": {"anyOf": [_INT, {"enum": ["none"]}]}}),
    _obj({"code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}}),
    {"enum": [1, 2, 3, 5, 8, "many"]},
    _obj({"s": {"type": "string", "minLength": 2, "maxLength": 4}}),
    {"type": "array", "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
     "maxItems": 2},
    _obj({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}),
    {"$defs": {"pt": _POINT}, **_obj({"a": {"$ref": "#/$defs/pt"},
                                      "b": {"$ref": "#/$defs/pt"}})},
    _obj({"n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}}),
    {"type": "array", "prefixItems": [_INT, {"enum": ["a", "b"]}], "items": False,
     "minItems": 2},
    {"anyOf": [_obj({"kind": {"const": "circle"}, "r": _INT}),
               _obj({"kind": {"const": "square"}, "side": _INT})]},
    _obj({"a": _obj({"b": _obj({"c": {"type": ["boolean", "null"]}})})}),
]


def json_params(schema: dict, seed: int, **kw) -> SamplingParams:
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=200, structured_outputs=so,
                          **kw)


def assert_valid_json(outs, schemas) -> None:
    for out, schema in zip(outs, schemas):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (c.text, schema)
        jsonschema.validate(json.loads(c.text), schema)


@pytest.fixture(scope="module")
def llm(llama_dir):
    engine = make_llm(llama_dir)
    yield engine
    engine.shutdown()


def test_json_schemas(llm):
    """20 schemas, two seeds each, in one batch: every output parses and validates."""
    schemas = SCHEMAS * 2
    params = [json_params(s, seed=i) for i, s in enumerate(schemas)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(schemas))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert_valid_json(outs, schemas)
    # The outputs are sampled, not fixed by the grammar: seeds give different texts.
    assert len({o.outputs[0].text for o in outs}) > len(SCHEMAS)


def test_json_with_free_whitespace(llm):
    """JSON with whitespace allowed between tokens (the default) still validates; a bias
    against this vocabulary's whitespace-only tokens keeps the random model brief."""
    tok = llm.tokenizer.tokenizer
    spaces = [i for t, i in tok.get_vocab().items()
              if not tok.decode([i]).strip() and tok.decode([i])]
    schemas = SCHEMAS[:4]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=300,
                             logit_bias={t: -5.0 for t in spaces},
                             structured_outputs=StructuredOutputsParams(json=s))
              for i, s in enumerate(schemas)]
    assert_valid_json(llm.generate(PROMPTS, params, use_tqdm=False), schemas)


def test_json_schema_as_text_and_grammar_cache(llm):
    manager = llm.engine_core.scheduler.structured
    schema = _obj({"k": {"enum": ["p", "q"]}, "v": _INT})
    before = manager.num_compiled
    outs = llm.generate(PROMPTS, [json_params(schema, seed=i) for i in range(4)],
                        use_tqdm=False)
    text = json.dumps(schema, indent=2)  # the same schema, spelled differently
    outs += llm.generate(PROMPTS[:1], SamplingParams(
        temperature=1.0, seed=9, max_tokens=100, structured_outputs=StructuredOutputsParams(
            json=text, disable_any_whitespace=True)), use_tqdm=False)
    assert_valid_json(outs, [schema] * 5)
    assert manager.num_compiled == before + 1  # compiled once for all five requests


def test_json_object(llm):
    quote_close = [llm.tokenizer.encode(c, add_special_tokens=False)[0] for c in '"}]']
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=300,
                             logit_bias={t: 4.0 for t in quote_close},
                             structured_outputs=StructuredOutputsParams(
                                 json_object=True, disable_any_whitespace=True))
              for i in range(6)]
    for out in llm.generate(PROMPTS + PROMPTS[:2], params, use_tqdm=False):
        c = out.outputs[0]
        assert c.finish_reason == "stop"
        assert isinstance(json.loads(c.text), dict), c.text


@pytest.mark.parametrize("pattern", [r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)", r"\d{3}-\d{4}",
                                     r"(yes|no)!{1,3}", r"[A-F0-9]{8}"])
def test_regex(llm, pattern):
    so = StructuredOutputsParams(regex=pattern)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=64, structured_outputs=so)
              for i in range(4)]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for out in outs:
        assert re.fullmatch(pattern, out.outputs[0].text), out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop"


def test_choice(llm):
    choices = ["positive", "negative", "neutral", 'a "quoted" one', "ünïcode ✓"]
    so = StructuredOutputsParams(choice=choices)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=32, structured_outputs=so)
              for i in range(12)]
    texts = [o.outputs[0].text for o in llm.generate(PROMPTS * 3, params, use_tqdm=False)]
    assert set(texts) <= set(choices)
    assert len(set(texts)) > 1


def test_ebnf_grammar(llm):
    grammar = 'root ::= expr\nexpr ::= term (("+" | "-") term){0,3}\nterm ::= [1-9] [0-9]{0,2}'
    so = StructuredOutputsParams(grammar=grammar)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=64, structured_outputs=so)
              for i in range(4)]
    for out in llm.generate(PROMPTS, params, use_tqdm=False):
        assert re.fullmatch(r"[1-9][0-9]{0,2}([+-][1-9][0-9]{0,2}){0,3}", out.outputs[0].text)


def test_grammar_end_stops_even_with_ignore_eos(llm):
    """EOS is allowed only once the grammar may end; then the request is complete."""
    so = StructuredOutputsParams(choice=["alpha", "beta"])
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, seed=3, max_tokens=50,
                                                  ignore_eos=True, structured_outputs=so),
                       use_tqdm=False)[0].outputs[0]
    assert out.text in ("alpha", "beta") and out.finish_reason == "stop"
    assert out.token_ids[-1] in llm.config.model_config.eos_token_ids


def test_greedy_structured_matches_allowed_argmax(llm, llama_dir):
    """Greedy under a mask is the argmax over the allowed tokens of the raw logits."""
    from tests.helpers import hf_logprobs

    so = StructuredOutputsParams(regex=r"[0-9]{4}")
    prompt = llm.tokenizer.encode(PROMPTS[1])
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=8,
                                                  structured_outputs=so),
                       use_tqdm=False)[0].outputs[0]
    digits = torch.tensor([llm.tokenizer.tokenizer.token_to_id(str(d)) for d in range(10)])
    want = []
    for _ in range(4):
        lp = hf_logprobs(llama_dir, prompt + want)[-1]
        want.append(int(digits[lp[digits].argmax()]))
    assert out.token_ids[:4] == want and out.text.isdigit()


def test_preempted_structured_requests_stay_valid(llm, llama_dir):
    """Requests preempted and recomputed keep their matchers as they were: outputs stay
    valid and equal to the unpreempted run (seeded)."""
    prompts = random_prompts((30, 64, 77, 100, 41, 90), seed=11)
    schemas = [SCHEMAS[i] for i in (0, 4, 8, 13, 15, 18)]
    params = [json_params(s, seed=50 + i) for i, s in enumerate(schemas)]
    want = llm.generate(token_prompts(prompts), params, use_tqdm=False)
    with make_llm(llama_dir, max_model_len=160,
                  kv_cache_memory_bytes=12 * kv_block_bytes()) as small:
        got = small.generate(token_prompts(prompts), params, use_tqdm=False)
        assert small.get_stats()["num_preemptions"] > 0
    assert_valid_json(got, schemas)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_tensor_parallel_mp(llama_dir):
    """The masks travel inside SchedulerOutput to worker processes; rank 0 samples."""
    schemas = [SCHEMAS[i] for i in (0, 4, 11, 18)]
    with make_llm(llama_dir, tensor_parallel_size=2,
                  distributed_executor_backend="mp") as engine:
        outs = engine.generate(PROMPTS, [json_params(s, seed=i) for i, s in enumerate(schemas)],
                               use_tqdm=False)
        regex = engine.generate(PROMPTS[0], SamplingParams(
            temperature=1.0, seed=1, max_tokens=32,
            structured_outputs=StructuredOutputsParams(regex=r"\d{3}-\d{4}")), use_tqdm=False)
    assert_valid_json(outs, schemas)
    assert re.fullmatch(r"\d{3}-\d{4}", regex[0].outputs[0].text)


# ---- errors, before anything is queued -----------------------------------------------------

@pytest.mark.parametrize("kw, words", [
    ({"json": {"type": "foo"}}, ["structured_outputs.json", "foo"]),
    ({"json": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}},
     ["structured_outputs.json", "missing"]),
    ({"regex": "(abc"}, ["structured_outputs.regex", "parenthesis"]),
    ({"grammar": "root ::= undefined_rule"}, ["structured_outputs.grammar", "undefined_rule"]),
])
def test_invalid_spec_raises_before_queueing(llm, kw, words):
    good = json_params(SCHEMAS[1], seed=0)
    bad = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(**kw))
    with pytest.raises(ValueError) as info:
        llm.generate(PROMPTS[:2], [good, bad], use_tqdm=False)
    for word in words:
        assert word in str(info.value)
    assert not llm.engine_core.has_unfinished_requests()


@pytest.mark.parametrize("kw", [{}, {"json": {}, "regex": "a"}, {"regex": "a", "choice": ["a"]},
                                {"json": "{not json"}, {"choice": []}])
def test_not_exactly_one_spec(kw):
    with pytest.raises(ValueError, match="structured_outputs"):
        StructuredOutputsParams(**kw)


def test_engines_that_cannot_run_structured_outputs(llama_dir):
    params = json_params(SCHEMAS[1], seed=0)
    with make_llm(llama_dir, skip_tokenizer_init=True) as engine:
        with pytest.raises(ValueError, match="skip_tokenizer_init"):
            engine.generate({"prompt_token_ids": [1, 2, 3]}, params, use_tqdm=False)
    with make_llm(llama_dir, async_scheduling=True) as engine:
        with pytest.raises(ValueError, match="async_scheduling"):
            engine.generate("hi", params, use_tqdm=False)


def test_bitmask_layout_matches_xgrammar():
    """The sampler masks exactly what xgrammar's own kernel does, for a bitmask on some rows
    and on every row; its torch unpacking (used on accelerators) agrees with numpy's."""
    import xgrammar as xgr

    from fleetllm.model.layers.sampler import (
        LogitsAdjustment,
        apply_logits_adjustment,
        disallowed_tokens,
        disallowed_tokens_torch,
    )

    vocab, rows = 300, 5
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (rows, (vocab + 31) // 32), generator=gen,
                            dtype=torch.int32)
    logits = torch.randn(rows, vocab, generator=gen)
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, bitmask, indices=[4, 0, 2])  # rows 1, 3 unmasked
    got = apply_logits_adjustment(logits.clone(), LogitsAdjustment(
        allowed_bitmask=bitmask[[4, 0, 2]], allowed_rows=torch.tensor([4, 0, 2])))
    assert torch.equal(got, want)
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, bitmask)
    got = apply_logits_adjustment(logits.clone(), LogitsAdjustment(allowed_bitmask=bitmask))
    assert torch.equal(got, want)
    assert torch.equal(disallowed_tokens_torch(bitmask, vocab), disallowed_tokens(bitmask, vocab))
