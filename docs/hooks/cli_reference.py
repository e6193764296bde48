"""MkDocs hook: the command-line reference, generated from the argparse parsers."""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

MARKER = "<!-- cli-reference -->"
ROOT = Path(__file__).resolve().parents[2]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _block(title: str, parser: argparse.ArgumentParser) -> str:
    return f"## `{title}`\n\n```text\n{parser.format_help().rstrip()}\n```\n"


def cli_markdown() -> str:
    """The reference: ``mediar-ray --help``, each sub-command's help, the job's help."""
    from mediar_ray.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width: fix it
    parser = build_parser()
    parts = [_block("mediar-ray", parser)]
    parts += [_block(f"mediar-ray {name}", sub) for name, sub in _subcommands(parser).items()]
    spec = importlib.util.spec_from_file_location("job_slides", ROOT / "jobs/segment_slides.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    job_parser = job.build_parser()
    job_parser.prog = "python jobs/segment_slides.py"
    parts.append(_block("python jobs/segment_slides.py (ray job submit)", job_parser))
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001
    """Replace the marker of ``reference/cli.md`` with the generated reference."""
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_markdown())
    return markdown
