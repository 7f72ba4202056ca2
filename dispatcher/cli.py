"""The `dispatcher` command. Its body only wires settings, logging and the modules together.

A user mistake (missing file, bad key, unknown template, bad address) prints one line to
stderr and exits 2; a failure of the thing asked for (a template that fails `check`, a request
no daemon took) exits 1.
"""

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import yaml

from dispatcher.errors import DispatcherError
from dispatcher.settings import Settings, load_settings

log = logging.getLogger("dispatcher")


class UsageError(DispatcherError):
    """Raised for a command-line mistake that is not about settings."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = _parser().parse_args(argv)
    _configure_logging(args.log_level)
    try:
        settings = load_settings(args.settings)
        result: int = args.command(settings, args)
        return result
    except (DispatcherError, OSError) as exc:
        print(f"dispatcher: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dispatcher", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--settings",
        metavar="PATH",
        help="settings file (default: "
        "$DISPATCHER_SETTINGS, else ./settings.yaml, else built-in defaults)",
    )
    common.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[[Settings, argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(command=handler)
        return sub

    command("run", run, "run the daemon in the foreground (SIGTERM or Ctrl-C stops it)")
    send_cmd = command("send", send, "enqueue one email from the shell")
    send_cmd.add_argument("template", metavar="NAME")
    send_cmd.add_argument("--to", required=True, action="append", metavar="ADDR")
    send_cmd.add_argument("--context", type=Path, metavar="FILE", help="YAML or JSON context")
    render_cmd = command("render", render, "print what would be sent, without sending")
    render_cmd.add_argument("template", metavar="NAME")
    render_cmd.add_argument("--context", type=Path, metavar="FILE", help="YAML or JSON context")
    render_cmd.add_argument("--sample", metavar="NAME", help="a sample from preview.yaml")
    render_cmd.add_argument("--to", default="recipient@example.com", metavar="ADDR")
    render_cmd.add_argument("--format", choices=["eml", "html", "text"], default="eml")
    status_cmd = command("status", status, "spool counts, oldest waiting request, recent failures")
    status_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    command("check", check, "validate settings; compile and render every template sample")
    keygen_cmd = command("keygen", keygen, "write a CURVE key pair (NAME.key, NAME.key_secret)")
    keygen_cmd.add_argument("name", metavar="NAME")
    keygen_cmd.add_argument("--dir", type=Path, default=Path("keys"), help="default: ./keys")
    return parser


def _configure_logging(level: str) -> None:
    # Under systemd, journald stamps every line itself; a second timestamp is noise.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(level=level, format=f"{stamp}%(levelname)s %(name)s: %(message)s")


def _read_context(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"--context {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--context {path}: expected a mapping of names to values")
    return data


def run(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher.service import serve  # the daemon's imports are heavy; only `run` needs them

    asyncio.run(serve(settings))
    return 0


def send(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher.client import Client, build_frame

    request_id, frame = build_frame(args.template, to=args.to, context=_read_context(args.context))
    sender = Client(settings)
    try:
        handed_over = sender.send(frame, request_id)
    finally:
        sender.close()
    if not handed_over:
        return 1
    print(request_id)
    return 0


def render(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher import wire
    from dispatcher.render import Renderer

    renderer = Renderer(settings.templates.dir, settings.mail.from_)
    context = _read_context(args.context)
    if args.sample:
        samples = renderer.samples(args.template)
        if args.sample not in samples:
            known = ", ".join(samples) or "none"
            raise UsageError(f"{args.template}: no sample {args.sample!r} (samples: {known})")
        context = {**samples[args.sample], **context}
    request = wire.validate(
        {"v": wire.VERSION, "template": args.template, "to": args.to, "context": context}
    )
    if args.format == "eml":
        sys.stdout.buffer.write(renderer.render(request).data)
        return 0
    parts = renderer.render_parts(args.template, context)
    print(parts.text if args.format == "text" else parts.html or "")
    return 0


def status(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher.spool import Spool

    if not settings.spool.path.exists():
        raise UsageError(f"no spool at {settings.spool.path} (has the daemon ever run?)")
    with Spool(settings.spool.path) as spool:
        counts, oldest, failures = spool.counts(), spool.oldest_waiting(), spool.recent_failures()
    age = None if oldest is None else round(time.time() - oldest, 1)
    if args.json:
        report = {
            "counts": counts,
            "oldest_waiting_seconds": age,
            "recent_failures": failures,
            "spool": str(settings.spool.path),
        }
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"spool {settings.spool.path}")
    for state, n in counts.items():
        print(f"  {state:<9}{n:>9}")
    if age is not None:
        print(f"oldest waiting request: {age} s")
    if failures:
        print("recent failures:")
    for failure in failures:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(failure["at"]))
        print(f"  {when} {failure['state']:<8} {failure['id'] or '-'} {failure['reason']}")
    return 0


def check(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher.errors import TemplateError
    from dispatcher.render import Renderer
    from dispatcher.transport import credential_warnings

    for warning in credential_warnings(settings.smtp):
        print(f"warning: {warning}")
    renderer = Renderer(settings.templates.dir, settings.mail.from_)
    names = renderer.template_names()
    if not names:
        raise UsageError(f"no templates in {settings.templates.dir}")
    failures = 0
    for name in names:
        try:
            samples = renderer.samples(name)
        except TemplateError as exc:
            print(exc)
            failures += 1
            continue
        if not samples:
            print(f"warning: {name}: no samples in preview.yaml; rendered with an empty context")
        for sample, context in (samples or {"(empty)": {}}).items():
            try:
                renderer.render_parts(name, context)
            except TemplateError as exc:
                print(f"{exc} [template {name}, sample {sample}]")
                failures += 1
    print(
        f"checked {len(names)} templates: {failures} failures"
        if failures
        else f"ok: settings and {len(names)} templates"
    )
    return 1 if failures else 0


def keygen(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher.curve import keygen as write_key_pair

    public, secret = write_key_pair(args.name, args.dir)
    print(f"public key {public} (copy to the peer)\nsecret key {secret} (mode 0600, keep here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
