"""python -m openai_api --triton-url HOST:8001 --port 9000 [--served-model-name maverick]"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from openai_api.app import create_app

    p = argparse.ArgumentParser(prog="python -m openai_api", description=__doc__)
    p.add_argument("--triton-url", default="localhost:8001", help="Triton's gRPC address (host:port)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--served-model-name", default="maverick", help="the model id clients must name")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    app = create_app(args.triton_url, args.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
