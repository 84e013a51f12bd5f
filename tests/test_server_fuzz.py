"""Property-based fuzzing against the published OpenAPI schema (openapi.py): schemathesis strategies and
hypothesis; valid and invalid requests never get a 5xx."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from casspec.server import create_app
from helpers import sse_events


@pytest.fixture(scope="module")
def fuzz_schema():
    from casspec.testing import tiny_engine

    app = create_app(tiny_engine(), max_queue=4, max_tokens_limit=2, request_timeout=30)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.phases.update(phases=["examples", "fuzzing"])
    return schema


FUZZ_OPS = [("/v1/completions", "POST", "positive"), ("/v1/completions", "POST", "negative"),
            ("/v1/chat/completions", "POST", "positive"), ("/v1/chat/completions", "POST", "negative"),
            ("/v1/models/{model_id}", "GET", "positive"), ("/metrics", "GET", "positive")]


@pytest.mark.parametrize("path,method,mode", FUZZ_OPS)
def test_fuzz_openapi_never_5xx(fuzz_schema, path, method, mode):
    """Schema-driven fuzzing (schemathesis strategies + hypothesis): valid and invalid requests never get a 5xx."""
    strategy = fuzz_schema[path][method].as_strategy(schemathesis.GenerationMode(mode))
    n = {"GET": 10, "positive": 20}.get(method, {"positive": 20}.get(mode, 30))

    @given(case=strategy)
    @settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case):
        response = case.call()
        assert response.status_code < 500, (case.path, case.body, response.status_code, response.text[:500])
        if response.status_code >= 400 and response.status_code != 405:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()


def test_fuzz_generation_params_reach_engine_without_5xx(fuzz_schema):
    """Hypothesis over *valid-shaped* generation requests (unicode prompts, stops, sampling, seeds, stream)."""
    from fastapi.testclient import TestClient
    from hypothesis import strategies as st

    client = TestClient(fuzz_schema.app)
    seen = set()

    @given(prompt=st.text(min_size=1, max_size=30), chat=st.booleans(), stream=st.booleans(),
           stop=st.none() | st.lists(st.text(min_size=1, max_size=3), max_size=2),
           temperature=st.sampled_from([0.0, 0.5, 2.0]), top_p=st.floats(0.01, 1.0), top_k=st.integers(-1, 400),
           seed=st.integers(-(2**63), 2**64 - 1), max_tokens=st.integers(1, 2))
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(prompt, chat, stream, stop, temperature, top_p, top_k, seed, max_tokens):
        body = dict(stop=stop, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_tokens=max_tokens,
                    stream=stream)
        if chat:
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}], **body})
        else:
            r = client.post("/v1/completions", json={"prompt": prompt, **body})
        assert r.status_code in (200, 400), (body, prompt, r.status_code, r.text[:300])
        if r.status_code == 400:
            assert r.json()["error"]["code"] in ("empty_prompt", "empty_content", "context_length_exceeded"), r.text
        elif stream:
            events = sse_events(r.text.splitlines())
            assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), r.text[:300]
        seen.add(r.status_code)

    check()
    assert 200 in seen
