"""python -m openai_api --triton-url HOST:8001 --port 9000 [--served-model-name maverick]
[--allowed-image-hosts HOST,... [--allow-http-images]]"""

from __future__ import annotations

import argparse
import os

_YES = ("1", "true", "yes")


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from openai_api.app import create_app
    from openai_api.images import ImagePolicy

    p = argparse.ArgumentParser(prog="python -m openai_api", description=__doc__)
    p.add_argument("--triton-url", default="localhost:8001", help="Triton's gRPC address (host:port)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--served-model-name", default="maverick", help="the model id clients must name")
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--tokenizer", default=None, metavar="MODEL_DIR",
        help="the served checkpoint (its tokenizer.json names the tokens of `logprobs`); without it, "
        "requests for logprobs are refused",
    )  # fmt: skip
    # Remote image URLs (openai_api/images.py); each flag's default comes from the environment, so
    # that `make serve` and the images, which start this server, pass them on.
    env = os.environ.get
    p.add_argument(
        "--allowed-image-hosts", default=env("OPENAI_ALLOWED_IMAGE_HOSTS", ""), metavar="HOST,...",
        help="fetch image URLs from these exact hosts (names or IP addresses); none: data URLs only "
        "[$OPENAI_ALLOWED_IMAGE_HOSTS]",
    )  # fmt: skip
    p.add_argument(
        "--allow-http-images", action="store_true", default=env("OPENAI_ALLOW_HTTP_IMAGES", "") in _YES,
        help="fetch http:// image URLs too (default: https only) [$OPENAI_ALLOW_HTTP_IMAGES=1]",
    )  # fmt: skip
    p.add_argument(
        "--max-image-bytes", type=int, default=env("OPENAI_MAX_IMAGE_BYTES", str(20 * 2**20)),
        help="a fetched image larger than this is refused (default 20 MiB) [$OPENAI_MAX_IMAGE_BYTES]",
    )  # fmt: skip
    p.add_argument(
        "--image-fetch-timeout", type=float, default=env("OPENAI_IMAGE_FETCH_TIMEOUT", "10"),
        help="seconds for a whole fetch, redirects included (default 10) [$OPENAI_IMAGE_FETCH_TIMEOUT]",
    )  # fmt: skip
    args = p.parse_args(argv)
    try:
        hosts = ImagePolicy.parse_hosts(args.allowed_image_hosts)
    except ValueError as e:
        p.error(f"--allowed-image-hosts: {e}")
    if args.max_image_bytes < 1 or args.image_fetch_timeout <= 0:
        p.error("--max-image-bytes and --image-fetch-timeout must be positive")
    policy = ImagePolicy(hosts, args.allow_http_images, args.max_image_bytes, args.image_fetch_timeout)
    app = create_app(args.triton_url, args.served_model_name, policy if hosts else None, args.tokenizer)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
