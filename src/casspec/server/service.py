"""CompletionService: one served engine behind the HTTP routes (queueing, waiting, responses, SSE)."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .errors import map_error
from .http import APIError, SSEResponse, short, sse
from .worker import GenRequest, Job, JobTimeoutError, Metrics, QueueFullError, Worker

MODEL_ALIAS = "casspec"


class _Disconnected(Exception):
    """The client went away while its request waited or ran."""


class _Timeout(Exception):
    """The request ran past its deadline."""


@dataclass(frozen=True)
class ServerConfig:
    method: str = "casspec"
    max_queue: int = 32  # waiting requests besides the running one (more -> 429)
    max_tokens_limit: int = 2048  # largest max_tokens accepted
    request_timeout: float = 300.0  # seconds per request, queueing included


def usage(stats: Any) -> dict:
    p, c = int(stats.prompt_tokens), int(stats.new_tokens)
    cached = int(getattr(stats, "cached_tokens", 0) or 0)  # prompt tokens served from the prefix cache
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached}}


def extension(result: Any, job: Job) -> dict:
    """The `casspec` field of a response: how the answer was decoded."""
    s = result.stats
    return {
        "method": s.method,
        "mean_accepted_length": s.mean_accepted_length,
        "tokens_per_s": s.tokens_per_s,
        "new_tokens": s.new_tokens,
        "wall_time_s": s.wall_time,
        "prefill_time_s": s.prefill_time,
        "target_forwards": s.target_forwards,
        "queue_time_s": job.queue_time,
        "drafters": {n: {"proposed": d.proposed, "accepted": d.accepted, "acceptance": d.acceptance,
                         "forwards": d.forwards} for n, d in (s.drafters or {}).items()},
    }


def finish_reason(stats: Any) -> str:
    return "length" if stats.finish_reason == "length" else "stop"


class CompletionService:
    """Runs validated requests through the FIFO worker and shapes OpenAI responses."""

    def __init__(self, engine: Any, cfg: ServerConfig, scheduler: Worker, metrics: Metrics) -> None:
        self.engine, self.cfg, self.scheduler, self.metrics = engine, cfg, scheduler, metrics
        self.methods = tuple(getattr(engine, "methods", ()) or ())
        self.model_name = str(getattr(engine, "name", MODEL_ALIAS))
        self.context = int(getattr(engine, "context_length", 0) or 0)
        self.vocab_size = getattr(getattr(engine, "runner", None), "vocab_size", None)  # token-id prompts' bound
        self.created = int(time.time())

    # ---- checks ----------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model_name, MODEL_ALIAS):
            raise APIError(404, f"The model '{short(name, 100)}' does not exist. This server serves "
                                f"'{self.model_name}' (alias '{MODEL_ALIAS}').", param="model", code="model_not_found")

    def check_size(self, n_chars: int, chat: bool) -> None:
        """Refuse absurdly long prompts before they reach (and occupy) the tokenizer in the worker."""
        if self.context and n_chars > 64 * self.context:
            raise APIError(400, f"The prompt is {n_chars} characters, far beyond the model's context of "
                                f"{self.context} tokens.", param="messages" if chat else "prompt",
                           code="context_length_exceeded")

    def require_chat_template(self) -> None:
        if not getattr(self.engine, "has_chat_template", False):
            raise APIError(400, f"The model '{self.model_name}' has no chat template, so chat completions are "
                                "unavailable; use /v1/completions with a raw prompt.", param="messages",
                           code="no_chat_template")

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "casspec",
                "casspec": {"method": self.cfg.method, "methods": list(self.methods), "aliases": [MODEL_ALIAS],
                            "context_length": getattr(self.engine, "context_length", None),
                            "has_chat_template": bool(getattr(self.engine, "has_chat_template", False))}}

    # ---- running a request -----------------------------------------------------------------------------
    async def run(self, request: Request, body: Any, gen: GenRequest, chat: bool) -> Response:
        """Queue the generation, then answer with one JSON body or an SSE stream."""
        job = self._submit(gen)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())
        first = await self._next_item(job, request, chat, "queued or generating")
        if first is None:
            return Response(status_code=499)
        if first[0] == "error":
            self.release(job, "error")
            raise self._error(first[1], chat)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._stream_events(job, first, chat, rid, now, include_usage)
            return SSEResponse(events, on_close=lambda: self.release(job, "done" if job.finished else "disconnect"))
        item = first
        try:
            while item[0] == "chunk":
                following = await self._next_item(job, request, chat, "generating")
                if following is None:
                    return Response(status_code=499)
                item = following
        finally:
            job.finished = True
            self.release(job, "done")
        if item[0] == "error":
            raise self._error(item[1], chat)
        return JSONResponse(self._completion_body(item[1], job, chat, rid, now))

    async def run_many(self, request: Request, body: Any, gens: list[GenRequest]) -> Response:
        """Several completions prompts at once (they run side by side): choice i answers prompt i."""
        jobs: list[Job] = []
        try:
            for gen in gens:
                jobs.append(self._submit(gen))
        except APIError:
            for job in jobs:
                self.release(job, "error")
            raise
        rid, now = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def close() -> None:
                for job in jobs:
                    self.release(job, "done" if job.finished else "disconnect")
            return SSEResponse(self._stream_many(jobs, rid, now, include_usage), on_close=close)
        results = []
        try:
            for job in jobs:
                item = await self._next_item(job, request, False, "queued or generating")
                while item is not None and item[0] == "chunk":
                    item = await self._next_item(job, request, False, "generating")
                if item is None:
                    return Response(status_code=499)
                job.finished = True
                if item[0] == "error":
                    raise self._error(item[1], False)
                results.append(item[1])
        finally:
            for job in jobs:
                self.release(job, "done" if job.finished else "error")
        choices = [self._completion_body(r, job, False, rid, now, index=i)["choices"][0]
                   for i, (r, job) in enumerate(zip(results, jobs))]
        return JSONResponse({"id": rid, "object": "text_completion", "created": now, "model": self.model_name,
                             "choices": choices, "usage": _sum_usage(results),
                             "casspec": [extension(r, job) for r, job in zip(results, jobs)]})

    async def _stream_many(self, jobs: list[Job], rid: str, now: int, include_usage: bool) -> AsyncIterator[str]:
        """The choices' events one prompt after another (all run meanwhile), then usage and [DONE]."""
        results: list = []
        for i, job in enumerate(jobs):
            try:
                first = await self._wait_item(job, None)
            except _Timeout:
                first = ("error", JobTimeoutError("queued or generating"))
            async for event in self._stream_events(job, first, False, rid, now, False, index=i, results=results,
                                                   done=False):
                yield event
            if len(results) < i + 1:  # this choice failed: its error event and [DONE] ended the stream
                for other in jobs[i + 1:]:
                    self.release(other, "error")
                return
        if include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": now, "model": self.model_name,
                       "choices": [], "usage": _sum_usage(results)})
        yield "data: [DONE]\n\n"

    def _submit(self, gen: GenRequest) -> Job:
        job = Job(gen, asyncio.get_running_loop(), self.cfg.request_timeout)
        try:
            self.scheduler.submit(job)
        except QueueFullError as exc:
            self.metrics.bump("rejected_queue_full")
            raise APIError(429, f"The server is busy: {exc.args[0]} requests are already waiting (max_queue="
                                f"{self.cfg.max_queue}). Retry later.", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        return job

    def _completion_body(self, result: Any, job: Job, chat: bool, rid: str, now: int, index: int = 0) -> dict:
        fr = finish_reason(result.stats)
        lps = openai_logprobs(result.logprobs, chat, job.req.logprobs)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": lps,
                      "finish_reason": fr}
        else:
            choice = {"index": index, "text": result.text, "logprobs": lps, "finish_reason": fr}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
                "model": self.model_name, "choices": [choice], "usage": usage(result.stats),
                "casspec": extension(result, job)}

    def _error(self, exc: BaseException, chat: bool) -> APIError:
        return map_error(exc, chat, self.cfg.request_timeout)

    def release(self, job: Job, reason: str) -> None:
        """Stop the worker generating for `job` (if it still is) and count why."""
        unfinished = self.scheduler.abandon(job)
        if unfinished and reason == "disconnect":
            self.metrics.bump("cancelled")
        elif reason == "timeout":
            self.metrics.bump("timeouts")

    async def _wait_item(self, job: Job, request: Request | None) -> tuple:
        while True:
            remaining = job.deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout()
            item = await job.next(min(remaining, 0.25))
            now = time.monotonic()
            if request is not None and now - job.checked >= 0.25:  # poll even while chunks keep coming
                job.checked = now
                if await request.is_disconnected():
                    raise _Disconnected()
            if item is not None:
                return item

    async def _next_item(self, job: Job, request: Request, chat: bool, phase: str) -> tuple | None:
        """The job's next item; None once the client is gone. Disconnects, timeouts and cancellation
        release the job (the worker stops generating for it) before returning or raising."""
        try:
            return await self._wait_item(job, request)
        except _Disconnected:
            self.release(job, "disconnect")
            return None
        except _Timeout:
            self.release(job, "timeout")
            raise self._error(JobTimeoutError(phase), chat) from None
        except BaseException:
            self.release(job, "disconnect")
            raise

    async def _stream_events(self, job: Job, item: tuple, chat: bool, rid: str, now: int, include_usage: bool,
                             index: int = 0, results: list | None = None, done: bool = True) -> AsyncIterator[str]:
        """SSE events: a role chunk (chat), text chunks, a final chunk with finish_reason, [DONE].
        Several prompts: choice `index`; its result is appended to `results`; `done`: end with [DONE]."""
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": now,
                "model": self.model_name}
        if chat:
            yield sse({**base, "choices": [_choice(chat, "", None, role=True)]})
        offset = 0  # text_offset of the next token: token texts so far (as the non-streamed answer counts them;
        # the streamed text may lag behind, held back while a stop string or a UTF-8 character may be forming)
        while True:
            kind, payload = item
            if kind == "chunk":
                if payload.text or payload.logprobs:
                    lps = openai_logprobs(payload.logprobs, chat, job.req.logprobs, offset)
                    yield sse({**base, "choices": [_choice(chat, payload.text, None, logprobs=lps, index=index)]})
                    offset += sum(len(t.text) for t in payload.logprobs or ())
            elif kind == "done":
                job.finished = True
                yield sse({**base, "choices": [_choice(chat, None, finish_reason(payload.stats), index=index)],
                           "casspec": extension(payload, job)})
                if results is not None:
                    results.append(payload)
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage(payload.stats)})
                if done:
                    yield "data: [DONE]\n\n"
                return
            else:
                job.finished = True
                yield sse(self._error(payload, chat).body())
                yield "data: [DONE]\n\n"
                return
            try:
                item = await self._wait_item(job, None)
            except _Timeout:
                job.finished = True
                self.release(job, "timeout")
                yield sse(self._error(JobTimeoutError("while streaming"), chat).body())
                yield "data: [DONE]\n\n"
                return


def _sum_usage(results: list) -> dict:
    """The usage of several choices together."""
    total: dict[str, Any] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
             "prompt_tokens_details": {"cached_tokens": 0}}
    for r in results:
        u = usage(r.stats)
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            total[key] += u[key]
        total["prompt_tokens_details"]["cached_tokens"] += u["prompt_tokens_details"]["cached_tokens"]
    return total


def _choice(chat: bool, text: str | None, fr: str | None, role: bool = False, logprobs: dict | None = None,
            index: int = 0) -> dict:
    """One streamed choice: a chat delta or a completion text piece."""
    if not chat:
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": fr}
    delta = {} if text is None else {"content": text}
    if role:
        delta["role"] = "assistant"
    return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": fr}


def openai_logprobs(lps: list | None, chat: bool, asked: int | None, offset: int = 0) -> dict | None:
    """TokenLogprobs in OpenAI's shape: chat {"content": [...]}, completions {"tokens", "token_logprobs", ...}.

    An EOS token is left out, as the text leaves it out (OpenAI lists no end-of-text token either); `bytes`
    are the token's own (a token holding part of a UTF-8 character has those bytes, not U+FFFD's), set on
    each TokenLogprob by the worker (worker.TokenBytes)."""
    if lps is None or asked is None:
        return None
    lps = [t for t in lps if not getattr(t, "eos", False)]
    if chat:
        def entry(text: str, lp: float, raw: bytes | None) -> dict:
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8") if raw is None else raw)}
        content = []
        for t in lps:
            top_bytes = getattr(t, "top_bytes", None) or [None] * len(t.top)
            content.append({**entry(t.text, t.logprob, getattr(t, "bytes", None)),
                            "top_logprobs": [entry(s, lp, b) for s, (_, lp), b in zip(t.top_text, t.top, top_bytes)]})
        return {"content": content, "refusal": None}
    offsets = []
    for t in lps:
        offsets.append(offset)
        offset += len(t.text)
    tops = []
    for t in lps:  # keyed by text: where two alternatives read the same (byte tokens), keep the likelier
        top: dict[str, float] = {}
        for s, (_, lp) in zip(t.top_text, t.top):
            top.setdefault(s, lp)
        tops.append(top)
    return {"tokens": [t.text for t in lps], "token_logprobs": [t.logprob for t in lps], "top_logprobs": tops,
            "text_offset": offsets}
