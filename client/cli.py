"""Command line: chat with the served model, or send a raw prompt.

    python -m client chat "Describe this picture." --image cat.png --stream
    python -m client chat "Hi" --system "Answer in French." --protocol http
    python -m client generate "Once upon a time" --max-tokens 32 --temperature 0

Tokens are printed as they arrive (with --stream), then a one-line summary on stderr: prompt and
generated tokens, time to first token, tokens/s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client.llm import GrpcClient, HttpClient, Result, ServerError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m client", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name, helptext in (("chat", "a user message, with the chat template"), ("generate", "a raw prompt")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("prompt")
        p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
        p.add_argument(
            "--url", help="server address (default localhost:8001 for gRPC, localhost:8000 for HTTP)"
        )
        p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
        p.add_argument("--max-tokens", type=int)
        p.add_argument("--temperature", type=float)
        p.add_argument("--top-p", type=float)
        p.add_argument("--top-k", type=int)
        p.add_argument("--seed", type=int)
        p.add_argument("--stop", action="append", dest="stop_words", help="a stop string (repeatable)")
        if name == "chat":
            p.add_argument("--system", help="system prompt")
            p.add_argument(
                "--image", action="append", type=Path, default=[], help="an image file (repeatable)"
            )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sampling = {
        k: getattr(args, k) for k in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop_words")
    }
    if args.command == "chat":
        images = [p.read_bytes() for p in args.image]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
        request = dict(messages=[{"role": "user", "content": content}], images=images, system=args.system)
    else:
        request = dict(text=args.prompt)
    client = (
        GrpcClient(args.url or "localhost:8001")
        if args.protocol == "grpc"
        else HttpClient(args.url or "localhost:8000")
    )
    result = Result()
    try:
        with client:
            if args.stream:
                import time

                result.start = time.monotonic()
                for chunk in client.stream(**request, **sampling):
                    result.add(chunk)
                    print(chunk.text, end="", flush=True)
            else:
                result = client.generate(**request, **sampling)
                print(result.text, end="")
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n[cancelled]", file=sys.stderr)
        return 130
    print()
    print(result.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
