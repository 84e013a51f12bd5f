"""`casspec` command line: generate, chat, bench, profile, serve."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from casspec.config import SAMPLING_RULES
from casspec.errors import CasspecError
from casspec.runtime import heap

# subcommands owned by other modules: module path -> its add_parser(subparsers)
_PLUGINS = ("casspec.bench.cli", "casspec.server.cli", "casspec.chat", "casspec.loadtest")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion, streaming to the terminal")
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--model", default=None, help='"smollm2" (default), "gemma3-270m", an HF dir, a .gguf or a hub id')
    p.add_argument("--method", default="casspec", help="ar | pld | self | casspec | ... (see `casspec methods`)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0, help="keep tokens with p >= min_p * p_max (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed: the same tokens for every method")
    p.add_argument("--sampling-rule", choices=SAMPLING_RULES, default="gumbel",
                   help="how drafts are verified when sampling: gumbel (seed-stable, default) or rejection")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help='print one JSON object {"text", "token_ids", "stats"}')
    add_drafts_arg(p)
    p.set_defaults(func=_generate)


def add_drafts_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafts", type=drafts, default=None, metavar="A,B,...",
                   help="draft levels DyTC chooses from, e.g. a8v,pld or lowbitv,pld (default: the measured best "
                        "for the device; names: `casspec.pool.DRAFTERS`)")


def drafts(text: str) -> tuple[str, ...]:
    """A comma-separated draft hierarchy, checked against the known levels before any model loads."""
    from casspec.pool import DRAFTERS

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in DRAFTERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown draft levels {unknown or [text]}; choose from {', '.join(DRAFTERS)}")
    return names


def _check_generate_args(args: argparse.Namespace) -> None:
    """Refuse bad arguments with the request's own messages before a model is loaded (seconds)."""
    from casspec.config import SamplingConfig
    from casspec.errors import InvalidRequestError
    from casspec.methods import METHODS

    if not args.prompt:
        raise InvalidRequestError("the prompt is empty")
    if args.max_new_tokens < 1:
        raise InvalidRequestError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.method not in METHODS:
        raise InvalidRequestError(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
    SamplingConfig(args.temperature, args.top_p, args.top_k, args.seed, args.min_p, args.sampling_rule)
    if args.stop is not None and not all(args.stop):
        raise InvalidRequestError("--stop needs a non-empty string")


def _generate(args: argparse.Namespace) -> int:
    import casspec

    _check_generate_args(args)
    engine = casspec.load(args.model, hierarchy=args.drafts)
    heap.settle()
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, min_p=args.min_p, seed=args.seed, sampling_rule=args.sampling_rule,
                  stop=args.stop, chat=args.chat)
    if args.json:
        out = engine.generate(args.prompt, args.method, **kwargs).to_dict()
        print(json.dumps({**out, "load_time": engine.load_seconds}))
        return 0
    result = None
    for chunk in engine.iter_generate(args.prompt, args.method, **kwargs):
        print(chunk.text, end="", flush=True)
        result = chunk.result or result
    assert result is not None, "iter_generate always ends with a chunk that carries the result"
    s = result.stats
    print(f"\n\n[{s.method}] {s.new_tokens} tokens in {s.wall_time:.2f}s: {s.tokens_per_s:.1f} tok/s, "
          f"mean accepted length {s.mean_accepted_length:.2f}, target forwards {s.target_forwards} "
          f"(model loaded in {engine.load_seconds:.1f}s)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casspec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ImportError as e:  # an optional extra is missing: the rest of the CLI still works
            print(f"casspec: {name} unavailable ({e})", file=sys.stderr)
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CasspecError as e:
        print(f"casspec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
