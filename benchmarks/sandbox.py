"""Jinja's SandboxedEnvironment beside the plain Environment, on the shipped templates.

Run from the repository root, in the project's venv:

    python benchmarks/sandbox.py [--renders 5000] [--rounds 5]

For every shipped template and its `default` sample, renders subject, HTML and text parts with
both environments (same loader, autoescape and undefined settings as `dispatcher.render`) and
prints the best-of-rounds microseconds per template render of each, their ratio, and, as the
yardstick the difference has to be judged against, a full `Renderer.render()` (Jinja plus the
MIME build and flatten) of the same request.
"""

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jinja2
import jinja2.sandbox

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dispatcher.render import Renderer, template_environment  # noqa: E402
from dispatcher.wire import validate  # noqa: E402

TEMPLATES = ROOT / "templates"


def environment(cls: type[jinja2.Environment]) -> jinja2.Environment:
    return template_environment(TEMPLATES, auto_reload=False, kind=cls)


def best_us(works: dict[str, Callable[[], object]], renders: int, rounds: int) -> dict[str, float]:
    """Best of `rounds` of `renders` calls each, in microseconds per call; the candidates take
    turns in every round, so a busy moment of the machine does not favour one of them."""
    best = dict.fromkeys(works, float("inf"))
    for work in works.values():
        work()  # compile and cache first
    for _ in range(rounds):
        for label, work in works.items():
            start = time.perf_counter()
            for _ in range(renders):
                work()
            best[label] = min(best[label], time.perf_counter() - start)
    return {label: seconds / renders * 1e6 for label, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renders", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    renderer = Renderer(TEMPLATES, "Example <noreply@example.com>")
    for name in renderer.template_names():
        context = renderer.samples(name)["default"]
        parts = ("subject.txt", "body.html", "body.txt")
        files = [f"{name}/{f}" for f in parts if (TEMPLATES / name / f).is_file()]
        works: dict[str, Callable[[], object]] = {}
        for cls in (jinja2.Environment, jinja2.sandbox.SandboxedEnvironment):
            templates = [environment(cls).get_template(f) for f in files]
            works[cls.__name__] = lambda ts=templates, c=context: [t.render(c) for t in ts]
        timings = best_us(works, args.renders, args.rounds)
        request = validate({"v": 1, "template": name, "to": "a@example.com", "context": context})
        full = best_us({"full": lambda r=request: renderer.render(r)}, args.renders // 10, 3)[
            "full"
        ]
        plain, sandboxed = timings["Environment"], timings["SandboxedEnvironment"]
        print(
            f"{name:<16} plain {plain:7.1f} us  sandboxed {sandboxed:7.1f} us"
            f"  (x{sandboxed / plain:.2f}, +{sandboxed - plain:.1f} us)"
            f"  full render+MIME {full:7.1f} us: sandbox adds {(sandboxed - plain) / full:.1%}"
        )


if __name__ == "__main__":
    main()
