"""What the server promises its clients: honest status codes, the API key, exact logprob bytes, and an
OpenAPI schema that states what it accepts (schema-valid requests are accepted)."""
from __future__ import annotations

import re
import sys

import httpx
import pytest

from casspec.errors import ContextOverflowError, GenerationError, InvalidRequestError
from casspec.server import create_app, resolve_api_key
from casspec.server.errors import map_error
from casspec.server.schemas import NONBLANK
from casspec.server.service import openai_logprobs
from casspec.server.tokens import TokenBytes
from casspec.testing import tiny_engine, tiny_tokenizer
from casspec.verify.logprobs import TokenLogprob
from helpers import FakeEngine, ThreadServer


# -- honest errors -------------------------------------------------------------------------------------------
def test_only_casspec_request_errors_are_400():
    assert map_error(InvalidRequestError("temperature must be >= 0"), False, 1).status == 400
    assert map_error(ContextOverflowError("too long"), True, 1).status == 400
    internal = map_error(ValueError("shape mismatch in layer 3 (secret detail)"), False, 1)
    assert internal.status == 500 and "secret" not in internal.message and internal.type == "server_error"
    assert map_error(IndexError("index out of range in self"), False, 1).status == 500
    failed = map_error(GenerationError("the model produced NaN"), False, 1)
    assert failed.status == 500 and "NaN" in failed.message and failed.code == "generation_failed"


class ValueErrorEngine(FakeEngine):
    """A library bug surfacing as a plain ValueError inside generation."""

    def iter_generate(self, prompt, method="casspec", **kw):
        if "boom" in self.key(prompt):
            raise ValueError("internal invariant broken: kv slots 17 != 18")
        return super().iter_generate(prompt, method, **kw)


def test_internal_value_error_is_a_500_without_its_message():
    app = create_app(ValueErrorEngine())
    with ThreadServer(app) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "boom", "max_tokens": 3}, timeout=30)
        assert r.status_code == 500 and "invariant" not in r.text, r.text
        assert httpx.post(srv.url + "/v1/completions", json={"prompt": "fine", "max_tokens": 3},
                          timeout=30).status_code == 200
        assert httpx.get(srv.url + "/metrics").json()["generation"]["errors"] == 1


# -- the API key ---------------------------------------------------------------------------------------------
def test_api_key_from_flag_file_or_env(tmp_path):
    from argparse import Namespace

    key_file = tmp_path / "key"
    key_file.write_text("s3cret-ключ\nignored second line\n", encoding="utf-8")
    assert resolve_api_key(Namespace(api_key="a", api_key_file=None), {"CASSPEC_API_KEY": "env"}) == "a"
    assert resolve_api_key(Namespace(api_key=None, api_key_file=str(key_file)), {}) == "s3cret-ключ"
    assert resolve_api_key(Namespace(api_key=None, api_key_file=None), {"CASSPEC_API_KEY": "env"}) == "env"
    assert resolve_api_key(Namespace(api_key=None, api_key_file=None), {}) is None
    with pytest.raises(ValueError, match="not both"):
        resolve_api_key(Namespace(api_key="a", api_key_file=str(key_file)), {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="no key"):
        resolve_api_key(Namespace(api_key=None, api_key_file=str(tmp_path / "empty")), {})
    with pytest.raises(ValueError, match="cannot read"):
        resolve_api_key(Namespace(api_key=None, api_key_file=str(tmp_path / "missing")), {})


def test_non_ascii_api_key_matches_byte_exactly():
    key = "clé-ü-ключ"
    app = create_app(FakeEngine(), api_key=key)
    with ThreadServer(app) as srv:
        def models(header: bytes) -> int:
            return httpx.get(srv.url + "/v1/models", headers={"Authorization": header}).status_code

        assert models(b"Bearer " + key.encode("utf-8")) == 200
        assert models(b"bearer " + key.encode("utf-8")) == 200
        assert models(b"Bearer " + key.encode("latin-1", "replace")) == 401
        assert models(b"Bearer " + key.encode("utf-8")[:-1]) == 401
        assert models(b"Bearer x") == 401 and models(b"Basic " + key.encode("utf-8")) == 401
        assert httpx.get(srv.url + "/health").status_code == 200


# -- logprob bytes -------------------------------------------------------------------------------------------
def test_token_bytes_of_byte_level_tokens_are_exact():
    tok = tiny_tokenizer()
    tb = TokenBytes(tok, eos_ids={tok.eos_token_id})
    assert tb.kind == "bytelevel"
    text = "naïve €5 ✓"
    ids = tok(text, add_special_tokens=False).input_ids
    assert b"".join(tb(i) for i in ids) == text.encode("utf-8")
    partial = [i for i in ids if tok.decode([i]) == "\ufffd"]
    assert partial and all(len(tb(i)) == 1 and tb(i)[0] >= 0x80 for i in partial)


def test_token_bytes_of_sentencepiece_byte_fallback():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "\u2581hi": 257, "hi": 258, "\u2581": 259}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    tb = TokenBytes(fast)
    assert tb.kind == "sentencepiece"
    assert tb(257) == b" hi" and tb(1 + 0xE2) == b"\xe2" and tb(259) == b" "


def test_chat_logprob_bytes_join_to_the_text_and_eos_is_left_out():
    lps = [TokenLogprob(1, -0.1, [(1, -0.1)], "\ufffd", ["\ufffd"]), TokenLogprob(2, -0.2, [], "\ufffd"),
           TokenLogprob(9, -0.3, [], "<|eos|>")]
    for lp, raw, eos in zip(lps, (b"\xc3", b"\xa9", b""), (False, False, True)):
        lp.bytes, lp.top_bytes, lp.eos = raw, [raw] * len(lp.top), eos
    chat = openai_logprobs(lps, True, 1)["content"]
    assert [e["bytes"] for e in chat] == [[0xC3], [0xA9]] and chat[0]["top_logprobs"][0]["bytes"] == [0xC3]
    assert bytes(b for e in chat for b in e["bytes"]).decode() == "é"
    assert openai_logprobs(lps, False, 1)["tokens"] == ["\ufffd", "\ufffd"]


@pytest.fixture(scope="module")
def tiny():
    app = create_app(tiny_engine(), max_tokens_limit=64, request_timeout=120)
    with ThreadServer(app) as srv:
        yield srv


def test_served_logprob_bytes_join_to_the_served_text(tiny):
    r = httpx.post(tiny.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Tell me about café ☕"}], "max_tokens": 32, "temperature": 0,
        "logprobs": True, "top_logprobs": 2}).json()
    content = r["choices"][0]["logprobs"]["content"]
    raw = bytes(b for e in content for b in e["bytes"])
    assert raw.decode("utf-8", "replace") == r["choices"][0]["message"]["content"]
    assert len(content) <= r["usage"]["completion_tokens"]


@pytest.mark.parametrize("endpoint,extra,param", [
    ("completions", {"stop": "s" * 1001}, "stop"),
    ("completions", {"stop": ["ok", "s" * 1001]}, "stop"),
    ("completions", {"logit_bias": {str(i): 1.0 for i in range(301)}}, "logit_bias"),
    ("chat/completions", {"tools": [{"type": "function"}] * 129}, "tools"),
])
def test_bounded_fields_get_a_400_naming_them(tiny, endpoint, extra, param):
    body = {"prompt": "hi"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{tiny.url}/v1/{endpoint}", json={**body, **extra}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith(param), r.text


# -- the schema says what the server accepts ------------------------------------------------------------------
def test_nonblank_pattern_agrees_with_str_strip():
    cls = NONBLANK
    for c in map(chr, range(0x3100)):
        assert bool(re.fullmatch(cls, c)) == (not c.isspace()), hex(ord(c))
    assert bool(re.fullmatch(cls, "\ufeff")) and not "\ufeff".isspace()
    assert sys.maxunicode > 0x3100


def test_schema_states_server_limits(tiny):
    s = httpx.get(tiny.url + "/openapi.json").json()["components"]["schemas"]
    comp, chat = s["CompletionRequest"]["properties"], s["ChatCompletionRequest"]["properties"]
    assert comp["max_tokens"]["maximum"] == 64 and chat["max_completion_tokens"]["maximum"] == 64
    assert comp["model"]["enum"] == ["tiny-llama", "casspec", None]
    assert any(o.get("pattern") == NONBLANK for o in comp["prompt"]["anyOf"])
    assert comp["n"]["anyOf"][0] == {"type": "integer", "const": 1}
    assert s["ChatCompletionRequest"]["then"]["properties"]["logprobs"] == {"const": True}
    assert s["ChatMessage"]["then"]["required"] == ["content"]
    assert 413 in [int(c) for c in httpx.get(tiny.url + "/openapi.json").json()["paths"]["/v1/completions"]["post"]
                   ["responses"]]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzz_schema_valid_requests_are_accepted(path):
    """Property-based (schemathesis): every request the published schema calls valid gets a 200, but for the
    limits no schema states: a prompt over the model's context in tokens (documented in schemas.py) and a
    busy server (429)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    app = create_app(tiny_engine(), max_queue=4, max_tokens_limit=2, request_timeout=30)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.phases.update(phases=["examples", "fuzzing"])
    strategy = schema[path]["POST"].as_strategy(schemathesis.GenerationMode.POSITIVE)
    seen = []

    @given(case=strategy)
    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case):
        response = case.call()
        seen.append(response.status_code)
        if response.status_code == 429 or (response.status_code == 400 and
                                           response.json()["error"]["code"] == "context_length_exceeded"):
            return  # busy (many prompts at once), or a limit in tokens: not a refusal of the request's shape
        assert response.status_code == 200, (case.body, response.status_code, response.text[:400])

    check()
    assert len(seen) >= 10
