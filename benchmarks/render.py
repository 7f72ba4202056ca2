"""`Renderer.render()` beside the stdlib `EmailMessage` builder it replaced, in the same run.

Run from the repository root, in the project's venv:

    python benchmarks/render.py [--renders 3000] [--rounds 5] [--profile 20] [--dkim]

For the `welcome` template with its `default` sample, without and with one 20 KB attachment,
prints best-of-rounds microseconds per call of:

- `render_parts()`: Jinja (subject, HTML, text) and CSS inlining, the floor any builder adds to;
- `render()`: the parts plus the whole message as bytes (`dispatcher.mime`, the header scan);
- the stdlib: the same parts built as an `EmailMessage` and flattened (`as_bytes`), and the same
  plus the parse-back header check the old `render()` ran (against CVE-2024-6923). The old builder
  lives here, not in the package, so the comparison can be re-run.

With `--dkim`, also `render()` followed by the DKIM signature the daemon adds (`signed()`), for
each algorithm, with a key made for the run.

`--profile N` also runs cProfile over both whole renders (old and new) and prints the N
functions with the most own time in each.
"""

import argparse
import base64
import cProfile
import email.message
import email.policy
import email.utils
import hashlib
import pstats
import random
import sys
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sandbox import best_us  # noqa: E402
from dispatcher.address import Address  # noqa: E402
from dispatcher.compose import Parts, ascii_addr_spec  # noqa: E402
from dispatcher.render import Renderer  # noqa: E402
from dispatcher.wire import Request, validate  # noqa: E402

POLICY = email.policy.SMTP.clone(cte_type="7bit")  # what the stdlib builder used
TO = "Ada Lovelace <ada@example.com>"


def stdlib_message(
    renderer: Renderer, request: Request, parts: Parts
) -> tuple[EmailMessage, bytes]:
    """The message as the stdlib builder of `render()` up to this change wrote it."""
    sender = request.sender or renderer.mail_from
    message_id = f"<{request.id}@{sender.addr_spec.rpartition('@')[2]}>"
    msg = EmailMessage(policy=POLICY)
    msg["From"] = _header_address(sender)
    msg["To"] = [_header_address(a) for a in request.to]
    if request.cc:
        msg["Cc"] = [_header_address(a) for a in request.cc]
    msg["Subject"] = parts.subject
    msg["Date"] = email.utils.format_datetime(datetime.now(UTC))
    msg["Message-ID"] = message_id
    msg["MIME-Version"] = "1.0"
    for name, value in request.headers.items():
        msg[name] = value
    msg.set_content(parts.text)
    if parts.html is not None:
        msg.add_alternative(parts.html, subtype="html")
    for attachment in request.attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        msg.add_attachment(
            attachment.content, maintype=maintype, subtype=subtype, filename=attachment.filename
        )
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]
    seed = hashlib.sha256(message_id.encode()).hexdigest()[:32]
    for index, part in enumerate(p for p in msg.walk() if p.is_multipart()):
        part.set_boundary(f"=_{seed}.{index}")
    return msg, msg.as_bytes(policy=POLICY)


def stdlib_checked(renderer: Renderer, request: Request, parts: Parts) -> bytes:
    """The stdlib build and flatten, then the old `_check_headers`: parse the header block back
    and compare its field names, Subject and addresses with what was set."""
    msg, data = stdlib_message(renderer, request, parts)
    parsed = BytesHeaderParser(policy=email.policy.default).parsebytes(data)
    same = Counter(n.lower() for n in parsed) == Counter(n.lower() for n in msg)
    same = same and str(parsed["Subject"]) == str(msg["Subject"])
    for name in ("From", "To", "Cc", "Reply-To"):
        same = same and _addr_specs(parsed, name) == _addr_specs(msg, name)
    if not same:
        raise AssertionError("header check failed")
    return data


def _addr_specs(msg: email.message.Message, name: str) -> list[str]:
    header = msg[name]
    return [a.addr_spec for a in getattr(header, "addresses", ())] if header is not None else []


def _header_address(address: Address) -> HeaderAddress:
    return HeaderAddress(address.display_name, addr_spec=ascii_addr_spec(address.addr_spec))


def dkim_rows(context: dict[str, object], renders: int, rounds: int) -> None:
    """`render()` alone and with its DKIM signature, per algorithm, in the same rounds."""
    import tempfile

    from dispatcher.dkim import keygen
    from dispatcher.settings import DkimSettings

    request = validate({"v": 1, "template": "welcome", "to": TO, "context": context})
    with tempfile.TemporaryDirectory() as folder:
        works: dict[str, Callable[[], object]] = {}
        for algorithm in ("rsa-sha256", "ed25519-sha256"):
            key, _, _ = keygen(algorithm.partition("-")[0], Path(folder), algorithm)
            dkim = DkimSettings("example.com", "s1", key, algorithm)  # type: ignore[arg-type]
            signer = Renderer(ROOT / "templates", "Example <noreply@example.com>", dkim=dkim)
            works[algorithm] = lambda s=signer: s.signed(s.render(request))
        plain = Renderer(ROOT / "templates", "Example <noreply@example.com>")
        works["unsigned"] = lambda: plain.render(request)
        us = best_us(works, renders, rounds)
    print(f"\n{'µs per call, best of rounds':<28}{'render()':>10}{'+ rsa-sha256':>14}"
          f"{'+ ed25519':>12}")  # fmt: skip
    print(
        f"{'welcome':<28}{us['unsigned']:10.1f}{us['rsa-sha256']:14.1f}{us['ed25519-sha256']:12.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renders", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", type=int, default=0, metavar="N")
    parser.add_argument("--dkim", action="store_true", help="also render() + DKIM signature")
    args = parser.parse_args()
    renderer = Renderer(ROOT / "templates", "Example <noreply@example.com>")
    context = renderer.samples("welcome")["default"]
    data = base64.b64encode(random.Random(5).randbytes(20_000)).decode()
    pdf = {"filename": "invoice.pdf", "content_type": "application/pdf", "data": data}
    cases = {
        "welcome": {"v": 1, "template": "welcome", "to": TO, "context": context},
        "welcome + 20 KB file": {
            "v": 1,
            "template": "welcome",
            "to": TO,
            "context": context,
            "attachments": [pdf],
        },
    }
    print(f"{'µs per call, best of rounds':<28}{'parts':>8}{'render()':>10}{'MIME':>8}"
          f"{'stdlib':>9}{'+check':>9}{'speed-up':>10}")  # fmt: skip
    parts = renderer.render_parts("welcome", context)
    for label, fields in cases.items():
        request = validate(fields)
        works: dict[str, Callable[[], object]] = {
            "parts": lambda: renderer.render_parts("welcome", context),
            "render": lambda r=request: renderer.render(r),
            "stdlib": lambda r=request: stdlib_message(renderer, r, parts),
            "checked": lambda r=request: stdlib_checked(renderer, r, parts),
        }
        us = best_us(works, args.renders, args.rounds)
        mime = us["render"] - us["parts"]
        old_total = us["parts"] + us["checked"]
        print(
            f"{label:<28}{us['parts']:8.1f}{us['render']:10.1f}{mime:8.1f}"
            f"{us['stdlib']:9.1f}{us['checked']:9.1f}{old_total / us['render']:9.1f}x"
        )
    print(
        "MIME = render() - parts; stdlib = EmailMessage build + as_bytes of the same parts;"
        " +check = with the old parse-back check; speed-up = (parts + check) / render()"
    )
    if args.dkim:
        dkim_rows(context, args.renders, args.rounds)
    if args.profile:
        request = validate(cases["welcome"])

        def old_render() -> None:
            stdlib_checked(renderer, request, renderer.render_parts("welcome", context))

        for title, work in (("old: stdlib builder", old_render), ("new: render()", None)):
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(args.renders // 3):
                if work:
                    work()
                else:
                    renderer.render(request)
            profile.disable()
            print(f"\n== {title}: {args.renders // 3} renders, top {args.profile} by own time")
            pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
