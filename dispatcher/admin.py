"""Queue administration for people: what `status` and `inspect` print, and what AGE means.

The spool does the work (`Spool.inspect`, `retry`, `purge`); this module only turns its
answers into text an operator reads at 3 a.m., and parses what the operator types.
"""

import re
import time
from typing import Any

import orjson

from dispatcher.wire import PRIORITIES

AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_age(text: str) -> float:
    """Seconds from `7d`, `12h`, `30m` or `90s`; a ValueError that says so for anything else."""
    match = _AGE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"--older-than: expected a number and a unit (s, m, h or d) such as 7d or 12h,"
            f" got {text!r}"
        )
    return float(match[1]) * AGE_UNITS[match[2]]


def duration(seconds: float) -> str:
    """`45s`, `12m 05s`, `3h 20m`, `2d 4h`: two units are all a person needs."""
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def timestamp(when: float | None) -> str:
    if when is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def status_table(report: dict[str, Any], at: float) -> str:
    """`dispatcher status` for people, from the report `--json` prints: counts by state, the
    oldest wait, the relays as the daemons last saw them, recent failures, refused overflow
    files, the daemons. `at` is when the report was made."""
    lines = [f"spool {report['spool']}", "", f"{'state':<10}{'requests':>10}"]
    if report["write_problem"] is not None:  # first: it explains everything below
        lines[1:1] = [
            "",
            f"WARNING: {report['write_problem']}: the daemon cannot accept requests"
            " (clients keep them)",
        ]
    for state, n in report["counts"].items():
        note = "  (frames refused at intake)" if state == "rejected" else ""
        lines.append(f"{state:<10}{n:>10}{note}")
    lines.append("")
    oldest = report["oldest_waiting_seconds"]
    lines.append(
        f"oldest waiting request: {'nothing waits' if oldest is None else duration(oldest)}"
    )
    lines += _relay_lines(report["relays"])
    if report["recent_failures"]:
        lines += ["", "recent failures:"]
    for failure in report["recent_failures"]:
        lines.append(
            f"  {timestamp(failure['at'])}  {failure['state']:<8}  {failure['id'] or '-':<32}"
            f"  {failure['template'] or '-'}  {failure['reason']}"
        )
    if report["overflow_refused"]:
        lines += [
            "",
            f"{report['overflow_refused']} overflow files refused (not sealed by an allowed key),"
            f" kept in {report['overflow_refused_dir']}",
        ]
    return "\n".join([*lines, "", *_daemon_lines(report["daemons"], at)])


def _relay_lines(relays: list[dict[str, Any]]) -> list[str]:
    """Each relay's state, naming whose view it is when several daemons recorded theirs."""
    lines = ["", "relays:"] if relays else []
    several = len({relay["daemon"] for relay in relays}) > 1
    for relay in relays:
        state = relay["state"]
        if state == "down":
            state += f" since {timestamp(relay['since'])}: {relay['reason']}"
        seen_by = f"  (seen by {relay['daemon']})" if several else ""
        lines.append(f"  {relay['relay']:<32}  {state}{seen_by}")
    return lines


def _daemon_lines(daemons: list[dict[str, Any]], at: float) -> list[str]:
    """The daemons that beat on the spool: alive while their last beat is under `spool.lease`
    old (they beat every third of one), as the lease ends their claims then."""
    lines = [f"daemons: {sum(d['alive'] for d in daemons)} alive"]
    for daemon in daemons:
        state = "alive" if daemon["alive"] else "silent"
        lines.append(
            f"  {daemon['owner']:<40}  {state:<6}  last heartbeat"
            f" {duration(at - daemon['last_heartbeat'])} ago,"
            f" started {timestamp(daemon['started_at'])}"
        )
    return lines


def tag_table(spool: str, tag: str, counts: dict[str, int], templates: list[str]) -> str:
    """`dispatcher status --tag NAME`: requests per state that carry the tag."""
    lines = [f"spool {spool}", f"tag {tag}", "", f"{'state':<10}{'requests':>10}"]
    lines += [f"{state:<10}{n:>10}" for state, n in counts.items()]
    if templates:
        lines += ["", f"counted with every request of: {', '.join(templates)} (template.yaml)"]
    return "\n".join(lines)


def inspect_report(report: dict[str, Any], at: float) -> str:
    """`dispatcher inspect ID`: the request, every attempt with its reply, the message."""
    names = {number: name for name, number in PRIORITIES.items()}
    state = report["state"] + (" (possibly delivered twice)" if report["maybe_duplicate"] else "")
    lines = [
        f"request      {report['id']}",
        f"state        {state}",
        f"template     {report['template']}",
        f"priority     {names.get(report['priority'], report['priority'])}",
        f"created      {timestamp(report['created_at'])} ({duration(at - report['created_at'])}"
        " ago)",
        f"updated      {timestamp(report['updated_at'])}",
    ]
    if report["state"] in ("queued", "retry"):
        lines.append(f"next attempt {timestamp(report['next_attempt_at'])}")
    if report["recipients"] is not None:
        lines.append(f"to deliver   {', '.join(report['recipients']) or '-'}")
    if report["delivered"]:
        lines.append(f"delivered    {', '.join(report['delivered'])}")
    for recipient, reply in report["refused"].items():
        lines.append(f"refused      {recipient}: {reply}")
    if report["last_reply"]:
        lines.append(f"last reply   {report['last_reply']}")
    if report["request"].get("tags"):
        lines.append(f"tags         {', '.join(report['request']['tags'])}")
    if report["request"].get("metadata"):
        lines.append(f"metadata     {orjson.dumps(report['request']['metadata']).decode()}")
    lines += ["", f"attempts ({len(report['attempt_log'])}):"]
    for attempt in report["attempt_log"]:
        took = attempt["finished_at"] and f"{attempt['finished_at'] - attempt['started_at']:.2f} s"
        lines.append(
            f"  #{attempt['number']}  {timestamp(attempt['started_at'])}  {took or 'unfinished'}"
            f"  {attempt['outcome'] or '-'}  code {attempt['code'] or '-'}"
            f"  {attempt['reply'] or ''}"
        )
    request = orjson.dumps(report["request"], option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    lines += ["", "request as received:", request.decode(), ""]
    if report["message"] is None:
        lines.append("message: not rendered yet (rendered at the first attempt)")
    else:
        lines += [
            f"message as sent ({len(report['message'])} bytes, every attempt sends these):",
            report["message"].decode("utf-8", "replace"),
        ]
    return "\n".join(lines)
