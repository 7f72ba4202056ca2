"""The `dispatcher` command. Its body only wires settings, logging and the modules together.

A user mistake (missing file, bad key, unknown template, bad address) prints one line to
stderr and exits 2; a failure of the thing asked for (a template that fails `check`, a request
`retry` could not re-queue) exits 1. A request no daemon took is kept in the overflow folder,
not failed: `send` says so on stderr and exits 0; if that folder cannot be written, it exits 1.
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

from dispatcher import logline
from dispatcher.errors import DispatcherError, NotFound, UsageError
from dispatcher.settings import Settings, load_settings

if TYPE_CHECKING:
    from dispatcher.render import Renderer
    from dispatcher.spool import Reader, Spool

log = logging.getLogger("dispatcher")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.settings)
        logline.configure(args.log_level or settings.log.level)
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
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default: log.level from the settings (INFO)",
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
    send_cmd.add_argument("--locale", help="e.g. de-AT (default: the sample's, else the default)")
    render_cmd = command("render", render, "print what would be sent, without sending")
    render_cmd.add_argument("template", metavar="NAME")
    render_cmd.add_argument("--context", type=Path, metavar="FILE", help="YAML or JSON context")
    render_cmd.add_argument("--sample", metavar="NAME", help="a sample from preview.yaml")
    render_cmd.add_argument("--to", default="recipient@example.com", metavar="ADDR")
    render_cmd.add_argument("--format", choices=["eml", "html", "text"], default="eml")
    render_cmd.add_argument(
        "--locale", help="e.g. de-AT; default: the sample's, else templates.locale"
    )
    status_cmd = command("status", status, "spool counts, oldest waiting request, recent failures")
    status_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    status_cmd.add_argument("--tag", metavar="NAME", help="count only requests with this tag")
    check_cmd = command(
        "check", check, "validate settings; compile and render every template sample"
    )
    check_cmd.add_argument(
        "--relays",
        action="store_true",
        help="instead: open a session to each relay (TLS, EHLO, login), sending nothing",
    )
    inspect_cmd = command("inspect", inspect, "a request, its attempts and its rendered message")
    inspect_cmd.add_argument("id", metavar="ID")
    inspect_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    retry_cmd = command("retry", retry, "make waiting or dead requests due now")
    retry_what = retry_cmd.add_mutually_exclusive_group(required=True)
    retry_what.add_argument("ids", nargs="*", default=[], metavar="ID")
    retry_what.add_argument("--dead", action="store_true", help="every dead request")
    purge_cmd = command("purge", purge, "delete sent or dead requests from the spool")
    purge_what = purge_cmd.add_mutually_exclusive_group(required=True)
    purge_what.add_argument("--dead", action="store_const", dest="state", const="dead")
    purge_what.add_argument("--sent", action="store_const", dest="state", const="sent")
    purge_cmd.add_argument(
        "--older-than", metavar="AGE", help="only those that became sent or dead AGE ago (7d, 12h)"
    )
    preview_cmd = command("preview", preview, "the template preview web UI on 127.0.0.1")
    preview_cmd.add_argument("--port", type=int, default=8025, help="default: 8025")
    dev_cmd = command("dev", dev, "daemon + capture SMTP server (smtp.port) + preview UI")
    dev_cmd.add_argument("--port", type=int, default=8025, help="the UI's port; default: 8025")
    keygen_cmd = command(
        "keygen", keygen, "write a CURVE key pair (NAME.key, NAME.key_secret), or with --dkim"
        " a DKIM key for selector NAME (NAME.dkim.key, NAME.dkim.txt) and print its DNS record"
    )  # fmt: skip
    keygen_cmd.add_argument("name", metavar="NAME")
    keygen_cmd.add_argument("--dir", type=Path, default=Path("keys"), help="default: ./keys")
    keygen_cmd.add_argument("--dkim", action="store_true", help="a DKIM signing key")
    keygen_cmd.add_argument(
        "--algorithm",
        choices=["rsa-sha256", "ed25519-sha256"],
        help="with --dkim; default: dkim.algorithm, else rsa-sha256",
    )
    return parser


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

    # The daemon logs a line per mail: its records skip what the format never shows (the
    # logging HOWTO's "Optimization": the caller's file and line, the thread, the process).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    asyncio.run(serve(settings))
    return 0


def send(settings: Settings, args: argparse.Namespace) -> int:
    """Enqueue one request and wait for its receipt; without one it is spilled, not lost."""
    from dispatcher.client import Client
    from dispatcher.render import split_sample

    renderer = _renderer(settings)
    context, sample = _template_context(renderer, args)
    context, locale, timezone = split_sample(context)
    with Client(settings) as client:
        request_id = client.enqueue_email(
            args.template,
            to=args.to,
            context=context,
            locale=args.locale or locale,
            timezone=timezone,
        )
        acknowledged = client.flush(2 * settings.client.ack_timeout)
        unsaved = client.unsaved
    if sample and not args.sample:
        print(f"no --context: sent with sample {sample!r} of {args.template}", file=sys.stderr)
    print(request_id)
    if unsaved:
        print(
            f"dispatcher: no daemon acknowledged {request_id}, and it could not be kept in"
            f" {settings.client.overflow_dir} (see the errors above)",
            file=sys.stderr,
        )
        return 1
    if not acknowledged:
        print(
            f"dispatcher: no daemon acknowledged {request_id}; it is kept in"
            f" {settings.client.overflow_dir} and sent when a daemon reads that folder",
            file=sys.stderr,
        )
    return 0


def render(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher.render import split_sample

    renderer = _renderer(settings)
    context, _ = _template_context(renderer, args)
    if args.format == "eml":
        message = renderer.render_example(args.template, context, args.to, args.locale)
        sys.stdout.buffer.write(message.data)
        return 0
    context, locale, timezone = split_sample(context)
    parts = renderer.render_parts(
        args.template, context, locale=args.locale or locale, timezone=timezone
    )
    if args.format == "html" and parts.html is None:
        raise UsageError(f"{args.template}: has no body.html; try --format text")
    print(parts.text if args.format == "text" else parts.html)
    return 0


def _renderer(settings: Settings) -> "Renderer":
    from dispatcher.render import Renderer

    return Renderer(settings.templates.dir, settings.mail.from_, locale=settings.templates.locale)


def _template_context(
    renderer: "Renderer", args: argparse.Namespace
) -> tuple[dict[str, Any], str | None]:
    """The context and the sample it came from: `--sample` from preview.yaml overlaid with
    `--context`; with neither, the `default` sample, so that `dispatcher send welcome --to
    me@example.com` under `dispatcher dev` shows a real mail rather than an undefined name."""
    if not renderer.has_template(args.template):
        known = ", ".join(renderer.template_names()) or "none"
        raise NotFound(f"unknown template {args.template!r} (templates: {known})")
    context = _read_context(args.context)
    sample = args.sample
    if sample is None and args.context is None:
        sample = "default" if "default" in renderer.samples(args.template) else None
    if sample is None:
        return context, None
    samples = renderer.samples(args.template)
    if sample not in samples:
        known = ", ".join(samples) or "none"
        raise NotFound(f"{args.template}: no sample {sample!r} (samples: {known})")
    return {**samples[sample], **context}, sample


def _open_reader(settings: Settings) -> "Reader":
    """For reports: never takes the write lock, so it neither waits for nor stalls a daemon."""
    from dispatcher.spool import open_reader

    return open_reader(settings.spool)


def _open_spool(settings: Settings) -> "Spool":
    """For administration, which writes: `retry` and `purge`."""
    from dispatcher.spool import open_reader, open_spool

    open_reader(settings.spool).close()  # a missing spool is an error, not a new empty one
    return open_spool(settings.spool, owner=f"admin pid {os.getpid()}")


def status(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher import overflow
    from dispatcher.admin import status_table

    if args.tag is not None:
        return tag_status(settings, args)

    with _open_reader(settings) as spool:
        counts, oldest, failures = spool.counts(), spool.oldest_waiting(), spool.recent_failures()
        relays, problem, daemons = spool.relays(), spool.write_problem(), spool.daemons()
    at = time.time()
    lease = settings.spool.lease  # a daemon that beat within it still holds its claims
    report = {
        "counts": counts,
        "oldest_waiting_seconds": None if oldest is None else round(at - oldest, 1),
        "recent_failures": failures,
        "relays": relays,
        "spool": settings.spool.where(),
        "overflow_refused": overflow.refused_count(settings.client.overflow_dir),
        "overflow_refused_dir": str(settings.client.overflow_dir / overflow.REFUSED),
        "write_problem": problem,
        "daemons": [{**d, "alive": at - d["last_heartbeat"] <= lease} for d in daemons],
    }
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print(status_table(report, at))
    return 0


def tag_status(settings: Settings, args: argparse.Namespace) -> int:
    """`status --tag NAME`: requests per state with the tag, their own or their template's."""
    from dispatcher.admin import tag_table

    templates = _renderer(settings).tagged(args.tag)
    with _open_reader(settings) as spool:
        counts = spool.tag_counts(args.tag, templates)
    if args.json:
        report = {"tag": args.tag, "counts": counts, "templates": templates}
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print(tag_table(settings.spool.where(), args.tag, counts, templates))
    return 0


def inspect(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher.admin import inspect_report

    with _open_reader(settings) as spool:
        report = spool.inspect(args.id)
    if report is None:
        raise NotFound(f"no request {args.id!r} in {settings.spool.where()}")
    if args.json:
        message = report["message"]
        report["message"] = None if message is None else message.decode("utf-8", "replace")
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print(inspect_report(report, time.time()))
    return 0


def retry(settings: Settings, args: argparse.Namespace) -> int:
    with _open_spool(settings) as spool:
        requeued = spool.retry(None if args.dead else args.ids, time.time())
        missed = [i for i in args.ids if i not in requeued]
        states = {i: (spool.inspect(i) or {}).get("state") for i in missed}
    for request_id, state in states.items():
        reason = "no such request" if state is None else f"it is {state}"
        print(f"dispatcher: {request_id} not re-queued: {reason}", file=sys.stderr)
    print(f"re-queued {len(requeued)} request{'s' * (len(requeued) != 1)}")
    return 1 if missed else 0


def purge(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher.admin import parse_age

    try:
        older_than = None if args.older_than is None else parse_age(args.older_than)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    with _open_spool(settings) as spool:
        purged = spool.purge(args.state, older_than, time.time())
    print(f"purged {purged} {args.state} request{'s' * (purged != 1)}")
    return 0


def check(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher.render import Renderer, check_templates

    if args.relays:
        from dispatcher.transport import check_relays

        lines, failed = asyncio.run(check_relays(settings.smtp.relays))
        print("\n".join(lines))
        return 1 if failed else 0
    from dispatcher.transport import credential_warnings

    for warning in credential_warnings(settings.smtp):
        print(f"warning: {warning}")
    renderer = _renderer(settings)
    if settings.dkim is not None:
        Renderer(settings.templates.dir, settings.mail.from_, dkim=settings.dkim)  # reads the key
        print(f"dkim: key {settings.dkim.key_file} signs mail from {settings.dkim.domain}")
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


def keygen(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher.curve import keygen as write_key_pair

    if args.dkim:
        return dkim_keygen(settings, args)
    if args.algorithm:
        raise UsageError("keygen: --algorithm is for --dkim keys")

    public, secret = write_key_pair(args.name, args.dir)
    print(f"public key {public} (copy to the peer)\nsecret key {secret} (mode 0600, keep here)")
    return 0


def dkim_keygen(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher import dkim

    algorithm = args.algorithm or (settings.dkim.algorithm if settings.dkim else "rsa-sha256")
    secret, public, record = dkim.keygen(args.name, args.dir, algorithm)
    domain = settings.dkim.domain if settings.dkim else settings.mail.from_.rpartition("@")[2]
    print(f"secret key {secret} (mode 0600; dkim.key_file)\npublic key {public}")
    print(f"publish this DNS TXT record, then set dkim.selector: {args.name}:")
    print(dkim.dns_record(args.name, domain.rstrip(">").strip(), record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
