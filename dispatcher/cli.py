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
from typing import TYPE_CHECKING, Any

import orjson
import yaml

from dispatcher.errors import DispatcherError
from dispatcher.settings import Settings, load_settings

if TYPE_CHECKING:
    from dispatcher.render import Renderer

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
    send_cmd.add_argument("--sample", metavar="NAME", help="a sample from preview.yaml")
    render_cmd = command("render", render, "print what would be sent, without sending")
    render_cmd.add_argument("template", metavar="NAME")
    render_cmd.add_argument("--context", type=Path, metavar="FILE", help="YAML or JSON context")
    render_cmd.add_argument("--sample", metavar="NAME", help="a sample from preview.yaml")
    render_cmd.add_argument("--to", default="recipient@example.com", metavar="ADDR")
    render_cmd.add_argument("--format", choices=["eml", "html", "text"], default="eml")
    status_cmd = command("status", status, "spool counts, oldest waiting request, recent failures")
    status_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    command("check", check, "validate settings; compile and render every template sample")
    preview_cmd = command("preview", preview, "the template preview web UI on 127.0.0.1")
    preview_cmd.add_argument("--port", type=int, default=8025, help="default: 8025")
    dev_cmd = command("dev", dev, "daemon + capture SMTP server (smtp.port) + preview UI")
    dev_cmd.add_argument("--port", type=int, default=8025, help="the UI's port; default: 8025")
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
    from dispatcher.render import Renderer

    renderer = Renderer(settings.templates.dir, settings.mail.from_)
    context, sample = _template_context(renderer, args)
    request_id, frame = build_frame(args.template, to=args.to, context=context)
    sender = Client(settings)
    try:
        handed_over = sender.send(frame, request_id)
    finally:
        sender.close()
    if not handed_over:
        return 1
    if sample and not args.sample:
        print(f"no --context: sent with sample {sample!r} of {args.template}", file=sys.stderr)
    print(request_id)
    return 0


def render(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher.render import Renderer

    renderer = Renderer(settings.templates.dir, settings.mail.from_)
    context, _ = _template_context(renderer, args)
    if args.format == "eml":
        sys.stdout.buffer.write(renderer.render_example(args.template, context, args.to).data)
        return 0
    parts = renderer.render_parts(args.template, context)
    if args.format == "html" and parts.html is None:
        raise UsageError(f"{args.template}: has no body.html; try --format text")
    print(parts.text if args.format == "text" else parts.html)
    return 0


def _template_context(
    renderer: "Renderer", args: argparse.Namespace
) -> tuple[dict[str, Any], str | None]:
    """The context and the sample it came from: `--sample` from preview.yaml overlaid with
    `--context`; with neither, the `default` sample, so that `dispatcher send welcome --to
    me@example.com` under `dispatcher dev` shows a real mail rather than an undefined name."""
    context = _read_context(args.context)
    sample = args.sample
    if sample is None and args.context is None and renderer.has_template(args.template):
        sample = "default" if "default" in renderer.samples(args.template) else None
    if sample is None:
        return context, None
    samples = renderer.samples(args.template)
    if sample not in samples:
        known = ", ".join(samples) or "none"
        raise UsageError(f"{args.template}: no sample {sample!r} (samples: {known})")
    return {**samples[sample], **context}, sample


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
    from dispatcher.render import Renderer, check_templates

    renderer = Renderer(settings.templates.dir, settings.mail.from_)
    report = check_templates(renderer)
    if not report.templates:
        raise UsageError(f"no templates in {settings.templates.dir}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    for failure in report.failures:
        print(failure)
    failures = len(report.failures)
    print(
        f"checked {report.templates} templates: {failures} failures"
        if failures
        else f"ok: settings and {report.templates} templates"
    )
    return 1 if failures else 0


def preview(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher.preview import serve_preview

    serve_preview(settings, args.port)
    return 0


def dev(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher.devserver import develop

    # aiosmtpd logs every SMTP command at INFO; the capture's own line says what matters.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    asyncio.run(develop(settings, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
