"""``casspec chat``: interactive terminal chat with streamed output and per-turn speed stats.

Keeps the conversation history (sent through the model's chat template each turn). Commands:
``/reset`` (forget the history), ``/exit`` or ``/quit``, ``/help``; Ctrl-D (EOF) exits; Ctrl-C stops
the current reply (or exits at the prompt). Works with a piped, non-tty stdin too:

    printf 'Hello\\n/reset\\nWhat is 2+2?\\n' | casspec chat --max-new-tokens 64
"""
from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape

from casspec.config import SAMPLING_RULES, SamplingConfig
from casspec.runtime import heap

HELP = "commands: /reset (clear history), /exit (or Ctrl-D), /help"


class ChatSession:
    """Conversation state + one streamed generation per turn."""

    def __init__(self, engine: Any, method: str = "casspec", max_new_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, system: str | None = None, *, top_k: int = 0,
                 min_p: float = 0.0, sampling_rule: str = "gumbel"):
        self.engine, self.method = engine, method
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.top_k, self.min_p, self.sampling_rule = top_k, min_p, sampling_rule
        self.system = system
        self.use_template = bool(getattr(engine, "has_chat_template", False))
        self.history: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt(self) -> tuple[Any, list[str] | None]:
        if self.use_template:
            return list(self.history), None
        # no chat template: a plain transcript continued by the model, cut at the next user line
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in self.history]
        return "\n".join(lines) + "\nAssistant:", ["\nUser:"]

    def turn(self, text: str, on_text: Callable[[str], None], cancel: threading.Event | None = None):
        """Send one user message; stream the reply through ``on_text``; return the GenerationResult.

        On an error the user message is taken back out of the history and the error re-raised; on
        Ctrl-C (KeyboardInterrupt) the partial reply is kept and None returned.
        """
        self.history.append({"role": "user", "content": text})
        prompt, stop = self._prompt()
        parts: list[str] = []
        result = None
        gen = self.engine.iter_generate(prompt, self.method, max_new_tokens=self.max_new_tokens,
                                        temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                        min_p=self.min_p, seed=self.seed, sampling_rule=self.sampling_rule,
                                        stop=stop, chat=self.use_template, cancel=cancel)
        try:
            for chunk in gen:
                if chunk.text:
                    parts.append(chunk.text)
                    on_text(chunk.text)
                if chunk.result is not None:
                    result = chunk.result
        except KeyboardInterrupt:
            pass
        except BaseException:
            self.history.pop()
            raise
        finally:
            gen.close()
        reply = result.text if result is not None else "".join(parts)
        self.history.append({"role": "assistant", "content": reply.strip() if not self.use_template else reply})
        return result


def format_stats(result: Any) -> str:
    s = result.stats
    return (f"{s.new_tokens} tokens · {s.tokens_per_s:.1f} tok/s · mean accepted length "
            f"{s.mean_accepted_length:.2f} · {s.wall_time:.2f} s · {s.method} · {s.finish_reason}")


def run_chat(session: ChatSession, stdin: TextIO | None = None, console: Console | None = None) -> int:
    """The read-eval-print loop; returns the exit status."""
    stdin = stdin or sys.stdin
    console = console or Console(highlight=False, emoji=False)
    interactive = stdin.isatty() and console.is_terminal
    name = getattr(session.engine, "name", "model")
    console.print(f"[bold]casspec chat[/bold] · {escape(name)} · method {escape(session.method)} · {HELP}")
    if not session.use_template:
        console.print("[yellow]note: this model has no chat template; using a plain User:/Assistant: transcript[/]")

    while True:
        try:
            if interactive:
                line = console.input("[bold green]you ›[/] ")
            else:
                line = stdin.readline()
                if not line:
                    raise EOFError
                line = line.rstrip("\r\n")
                console.print(f"[bold green]you ›[/] {escape(line)}")
        except EOFError:
            console.print()
            return 0
        except KeyboardInterrupt:
            console.print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd = text.split()[0].lower()
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/reset":
                session.reset()
                console.print("[dim]history cleared[/dim]")
            elif cmd == "/help":
                console.print(f"[dim]{HELP}[/dim]")
            else:
                console.print(f"[yellow]unknown command {escape(cmd)}[/] · {HELP}")
            continue
        console.print("[bold cyan]assistant ›[/] ", end="")
        try:
            result = session.turn(text, lambda t: console.print(t, end="", markup=False, highlight=False,
                                                                emoji=False, soft_wrap=True))
        except ValueError as exc:  # casspec's request errors (e.g. the history outgrew the context)
            console.print()
            console.print(f"[red]error:[/] {escape(str(exc))} (try /reset)")
            continue
        console.print()
        if result is None:
            console.print("[dim](interrupted)[/dim]")
        else:
            console.print(f"[dim]{escape(format_stats(result))}[/dim]")


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model name (smollm2, gemma3-270m), HF dir or .gguf (default: casspec's default)")
    p.add_argument("--method", default="casspec", help="decoding method (default: casspec)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="tokens per reply at most (default: 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="keep tokens with p >= min_p * p_max (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed: the same tokens for every method")
    p.add_argument("--sampling-rule", choices=SAMPLING_RULES, default="gumbel",
                   help="how drafts are verified when sampling: gumbel (seed-stable, default) or rejection")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--tiny-engine", default=None, metavar="FAMILY", help=argparse.SUPPRESS)  # tests


def add_parser(subparsers) -> None:
    """Register ``chat`` on an argparse subparsers object."""
    p = subparsers.add_parser("chat", help="interactive terminal chat with streaming and speed stats",
                              description="Chat with a model in the terminal (streamed, with per-turn speed stats).")
    configure_parser(p)
    p.set_defaults(func=chat)


def chat(args: argparse.Namespace) -> int:
    err = Console(stderr=True, highlight=False)
    if args.max_new_tokens < 1:
        err.print("error: --max-new-tokens must be >= 1")
        return 2
    try:  # bad sampling settings: refused before the model loads, not at every turn
        SamplingConfig(args.temperature, args.top_p, args.top_k, args.seed, args.min_p, args.sampling_rule)
    except ValueError as exc:
        err.print(f"error: {exc}")
        return 2
    with err.status("loading model..."):
        if args.tiny_engine:
            from casspec.testing import tiny_engine

            engine = tiny_engine(args.tiny_engine)
        else:
            import casspec

            engine = casspec.load(args.model)
            heap.settle()
    methods = tuple(getattr(engine, "methods", ()) or ())
    if methods and args.method not in methods:
        err.print(f"error: unknown method {args.method!r}; choose one of {', '.join(methods)}")
        return 2
    session = ChatSession(engine, args.method, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                          args.system, top_k=args.top_k, min_p=args.min_p, sampling_rule=args.sampling_rule)
    return run_chat(session)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m casspec.chat", description="casspec interactive chat")
    configure_parser(parser)
    return chat(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
