"""`brushwork serve` and `brushwork watermark check`."""

import importlib.util
import ipaddress
import socket
from pathlib import Path
from typing import Annotated, Optional

import typer

from brushwork.errors import BrushworkError

PRECISIONS = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def loopback_hosts(host: str, extra: list[str]) -> tuple[str, ...]:
    """The Host names a loopback server answers to (DNS rebinding sends another)."""
    return tuple(dict.fromkeys(["localhost", "127.0.0.1", "[::1]", url_host(host), *extra]))


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise BrushworkError(f"cannot listen on {host}:{port} ({error.strerror}); is another server running "
                                 "there? pick another --port") from None


def serve(
    model: Annotated[Optional[Path], typer.Option(help="Model folder, SD .safetensors file or shipped model name (shapes, shapes-gan, emoji).", show_default="shapes")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs --api-key or --insecure.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7860,
    api_key: Annotated[Optional[list[str]], typer.Option(envvar="BRUSHWORK_API_KEY", help="Require 'Authorization: Bearer KEY' on every API call; repeat it (or separate keys by spaces in the variable) for one key per client: a job belongs to the key that submitted it.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow a non-loopback address without an API key.")] = False,
    no_watermark: Annotated[bool, typer.Option("--no-watermark", help="Do not put the invisible watermark in images.")] = False,
    blocklist: Annotated[Optional[Path], typer.Option(help="File of words or phrases (one a line) that prompts may not contain.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N or mps.", show_default="best available")] = None,
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16.")] = "auto",
    max_queue: Annotated[int, typer.Option(help="Jobs that may wait; more are answered 429.")] = 32,
    max_batch: Annotated[int, typer.Option(help="Images sampled together in one batch.")] = 8,
    timeout: Annotated[float, typer.Option(help="Seconds a job may take from submission, queue included.")] = 300.0,
    max_size: Annotated[Optional[int], typer.Option(help="Largest width or height a request may ask for.", show_default="twice the model's size")] = None,
    max_cost: Annotated[Optional[int], typer.Option(help="Work a request may ask for, in pixel-steps: width x height x steps x images x best_of.", show_default="1200 image-steps at the model's size")] = None,
    max_body: Annotated[int, typer.Option(help="Bytes a request body may hold; more are answered 413.")] = 1_000_000,
    allowed_host: Annotated[Optional[list[str]], typer.Option(help="A Host name a loopback server answers to besides localhost, 127.0.0.1 and [::1] (repeatable); other names get 400.")] = None,
    public_url: Annotated[Optional[str], typer.Option(help="Base of the image URLs the OpenAI API returns.", show_default="http://HOST:PORT on loopback, else the address the request came to")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow .ckpt/.pt pickle model files (weights only).")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="Compile the model for batch sizes 1, 2, 4, ... up to --max-batch before serving (2-3 minutes a size the first time, then loaded from the cache in a second): about 2.5-3x faster sampling on a CPU with bf16.")] = False,
) -> None:
    """Serve the model over HTTP: a web page at /, brushwork's API, and OpenAI- and AUTOMATIC1111-compatible APIs."""
    import torch

    from brushwork.generation.loading import quiet_libraries
    from brushwork.generation.auto import BrushworkPipeline
    from brushwork.serve.app import create_app
    from brushwork.serve.common import Blocklist, ServeConfig
    from brushwork.serve.jobs import compiled_batch_sizes, warm_up

    if not is_loopback(host) and not api_key and not insecure:
        raise BrushworkError(f"--host {host} lets other machines connect; give --api-key KEY (or set "
                             "BRUSHWORK_API_KEY), or --insecure to serve without one")
    api_key = [key.strip() for key in api_key or []]
    if not all(api_key):
        raise BrushworkError("--api-key is empty")
    if precision not in PRECISIONS:
        raise BrushworkError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    for name, value in (("--max-queue", max_queue), ("--max-batch", max_batch), ("--timeout", timeout),
                        ("--max-size", 1 if max_size is None else max_size),
                        ("--max-cost", 1 if max_cost is None else max_cost), ("--max-body", max_body)):
        if value <= 0:
            raise BrushworkError(f"{name} must be positive, got {value}")
    config = ServeConfig(api_keys=tuple(api_key), watermark=not no_watermark, max_queue=max_queue, max_batch=max_batch,
                         timeout=timeout, blocklist=Blocklist.from_file(blocklist) if blocklist else None,
                         max_side=max_size, max_cost=max_cost, max_body=max_body,
                         allowed_hosts=loopback_hosts(host, allowed_host or []) if is_loopback(host) else None,
                         public_url=public_url or (f"http://{url_host(host)}:{port}" if is_loopback(host) else None))
    _check_port_free(host, port)

    quiet_libraries()
    dtype = getattr(torch, PRECISIONS[precision]) if PRECISIONS[precision] else None
    pipe = BrushworkPipeline.from_pretrained(model, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                             compile=compile)
    if compile:
        sizes = compiled_batch_sizes(max_batch)
        typer.echo(f"Compiling {pipe.name} for batch sizes {', '.join(map(str, sizes))} "
                   "(minutes each the first time, then loaded from the cache)", err=True)
        warm_up(pipe, sizes, config.default_guidance)
    app = create_app(pipe, config)
    if not is_loopback(host) and not api_key:
        typer.echo(f"Warning: serving on {host} without an API key (--insecure): anyone who can reach it can use it",
                   err=True)
    service = app.state.service
    if not any(importlib.util.find_spec(name) for name in ("websockets", "wsproto")):
        typer.echo("Warning: no WebSocket library is installed, so live mode (/v1/live) cannot connect: "
                   "pip install websockets", err=True)
    typer.echo(f"Serving {pipe.name} ({pipe.default_size}x{pipe.default_size}, {pipe.device}) at http://{host}:{port}/ "
               f"- sides up to {service.max_side} px, {service.max_cost:,} pixel-steps a request "
               f"- watermark {'on' if config.watermark else 'off'}, API key {'required' if api_key else 'not required'}",
               err=True)
    run_server(app, host, port, config.shutdown_grace)


def make_server(app, host: str, port: int, shutdown_grace: float, log_level: str = "info"):
    """A uvicorn server for the app. On SIGINT/SIGTERM the scheduler stops taking jobs at once, cancels the
    queued ones and gives the running batch `shutdown_grace` seconds, so waiting clients get their answer
    before uvicorn closes the connections. A request's headers must arrive within HEADER_SECONDS, an idle
    keep-alive connection is closed after 5 s."""
    import uvicorn

    from brushwork.serve.connections import H11_MAX_HEAD_BYTES, HeaderDeadline

    scheduler = app.state.service.scheduler

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            scheduler.begin_shutdown(shutdown_grace)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(shutdown_grace) + 5, timeout_keep_alive=5,
                            http=HeaderDeadline, h11_max_incomplete_event_size=H11_MAX_HEAD_BYTES)
    return Server(config)


def run_server(app, host: str, port: int, shutdown_grace: float) -> None:
    make_server(app, host, port, shutdown_grace).run()


def watermark_check(
    image: Annotated[Path, typer.Argument(help="PNG (or other image) to check.", show_default=False)],
) -> None:
    """Say whether an image carries brushwork's invisible watermark (exit code 1 if not)."""
    import PIL.Image

    from brushwork.watermark import detect

    if not image.is_file():
        raise BrushworkError(f"image not found: {image}")
    try:
        with PIL.Image.open(image) as opened:
            reading = detect(opened)
    except (OSError, SyntaxError, ValueError) as error:
        raise BrushworkError(f"{image} is not a readable image: {error}") from None
    if reading.total == 0:
        raise BrushworkError(f"{image} is smaller than 8x8 pixels; too small to carry a watermark")
    summary = (f"{reading.matching} of {reading.total} marks agree; chance in an unmarked image "
               f"{reading.false_positive:.1e}")
    if reading.found:
        typer.echo(f"{image}: brushwork watermark found ({summary})")
    else:
        typer.echo(f"{image}: no brushwork watermark ({summary})")
        raise typer.Exit(1)


watermark_app = typer.Typer(help="The invisible watermark in generated images.", no_args_is_help=True)
watermark_app.command("check")(watermark_check)
