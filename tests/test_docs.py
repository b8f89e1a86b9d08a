"""The docs stay true: links resolve, every setting is documented, and the commands marked to run work.

A fenced block right after `<!-- run -->` in README.md or docs/*.md is run as written against a real
server that has the demo brands (the quickstart's state): shell blocks with `bash -e -o pipefail`,
Python blocks with the venv's python, both in a folder that has `.venv` and `loras/` as a checkout
does. `localhost:8000` in a block becomes the test server's address. `<!-- run expect: A | B -->` also
asserts that A and B appear in the block's output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.config import PROJECT_ROOT, Settings

DOCS = sorted((PROJECT_ROOT / "docs").glob("*.md"))
ALL_PAGES = [PROJECT_ROOT / name for name in ("README.md", "ARCHITECTURE.md", "BENCHMARKS.md")] + DOCS
# The order the blocks run in: README's "Try it" makes base.png, which docs/formats.md reads back.
RUN_ORDER = ["README.md", "docs/http-api.md", "docs/formats.md", "docs/operations.md", "docs/training.md"]
README_MAX_LINES = 200
ADMIN_KEY = "docs-admin-key"

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
RUN_BLOCK = re.compile(
    r"^<!-- run(?: expect: (?P<expect>.*?))? -->\n```(?P<lang>bash|python)\n(?P<code>.*?)^```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


def prose(text: str) -> str:
    """The text without code (fenced blocks and inline code), where a `[x](y)` is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text(encoding="utf-8"))) if not re.match(r"[a-z]+:", t)]


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name} (has {sorted(anchors(resolved))})")
    return broken


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path):
    assert page.exists(), f"{page} is missing"
    broken = broken_links(page)
    assert not broken, f"{page.name} has broken links:\n" + "\n".join(broken)


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path: Path):
    (tmp_path / "b.md").write_text("# B\n\n## Uploads & removal\n\n```\n# not a heading\n```\n")
    (tmp_path / "a.md").write_text(
        "# The `GET /x` part\n\n[a](#the-get-x-part) [b](b.md#uploads--removal) [c](b.md#not-a-heading)\n"
        "[d](c.md) [e](#nope) `[f](g.md)` [h](https://example.com/x.md)\n"
    )
    assert relative_links(tmp_path / "a.md") == [
        "#the-get-x-part", "b.md#uploads--removal", "b.md#not-a-heading", "c.md", "#nope"]  # fmt: skip
    assert [line.split(":")[0] for line in broken_links(tmp_path / "a.md")] == ["b.md#not-a-heading", "c.md", "#nope"]


def test_readme_is_short_and_links_every_reference_page():
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    linked = {Path(t.partition("#")[0]).as_posix() for t in relative_links(PROJECT_ROOT / "README.md")}
    for page in DOCS:
        assert page.relative_to(PROJECT_ROOT).as_posix() in linked, f"README does not link {page.name}"
    assert "bash scripts/serve.sh" in readme and "bash scripts/test.sh" in readme


def setting_names() -> list[str]:
    return [name.upper() for name in Settings.model_fields]


def test_every_setting_is_documented_and_in_env_example():
    configuration = (PROJECT_ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    env_example = (PROJECT_ROOT / ".env.example").read_text(encoding="utf-8")
    missing_doc = [n for n in setting_names() if f"`{n}`" not in configuration]
    missing_env = [n for n in setting_names() if not re.search(rf"^(# ?)?{n}=", env_example, re.MULTILINE)]
    assert not missing_doc, f"not in docs/configuration.md: {missing_doc}"
    assert not missing_env, f"not in .env.example: {missing_env}"


def test_no_bare_python_or_placeholder_redirects_in_commands():
    """Commands use the venv's programs, and nothing a shell would read as a redirect (`<job_id>`)."""
    problems = []
    for page in ALL_PAGES:
        for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S):
            for line in block.splitlines():
                command = line.split("#", 1)[0]
                if command.lstrip().startswith("docker"):
                    continue  # inside the image, `python` is the image's own
                if re.search(r"(^|[\s;|&(])(python3?|pip|pytest|uvicorn)\s", command):
                    problems.append(f"{page.name}: bare command: {line.strip()}")
                if re.search(r"<[a-z_]+>", command):
                    problems.append(f"{page.name}: placeholder: {line.strip()}")
    assert not problems, "\n".join(problems)


# ---- the commands, run --------------------------------------------------------------------------


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    expect: list[str]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def runnable_blocks() -> list[Block]:
    blocks = []
    for name in RUN_ORDER:
        text = (PROJECT_ROOT / name).read_text(encoding="utf-8")
        for match in RUN_BLOCK.finditer(text):
            expect = [e.strip() for e in (match["expect"] or "").split(" | ") if e.strip()]
            line = text.count("\n", 0, match.start()) + 1
            blocks.append(Block(name, line, match["lang"], match["code"], expect))
    marked = sum(len(re.findall(r"^<!-- run", (PROJECT_ROOT / n).read_text(), re.M)) for n in RUN_ORDER)
    assert len(blocks) == marked, "a `<!-- run -->` marker is not followed by a ```bash or ```python block"
    return blocks


def test_the_pages_mark_their_commands_to_run():
    pages = {block.page for block in runnable_blocks()}
    assert pages == set(RUN_ORDER)


@pytest.mark.slow
def test_the_marked_commands_run_as_written(start_server, tmp_path: Path):
    from app.demo import write_demo_loras

    # A folder like a checkout after `bash scripts/serve.sh`: .venv, and loras/ with the demo brands.
    work = tmp_path / "checkout"
    write_demo_loras(work / "loras")
    (work / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    server = start_server(work_dir=work, ADMIN_API_KEY=ADMIN_KEY, BATCH_WAIT_MS="0")
    address = server.url.removeprefix("http://")

    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "ADMIN_API_KEY": ADMIN_KEY,  # the blocks send it as the reader's shell would
        "LORA_BASE_DIR": str(work / "loras"),  # the CLI training writes where the server reads
        "MODEL_CACHE_DIR": str(Settings.model_fields["model_cache_dir"].default),
        "DATA_DIR": str(work / "data"),
        "DEVICE": "cpu",
        "DTYPE": "float32",
    }
    for block in runnable_blocks():
        code = block.code.replace("localhost:8000", address).replace("127.0.0.1:8000", address)
        command = ["bash", "-e", "-o", "pipefail", "-c", code] if block.lang == "bash" else [
            str(work / ".venv" / "bin" / "python"), "-c", code]  # fmt: skip
        # timeout: a hang guard only; the slowest block (a training job) takes well under a minute.
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{block} failed ({done.returncode}):\n{code}\n---\n{output[-3000:]}"
        assert '"detail"' not in done.stdout, f"{block} got an error answer:\n{done.stdout[-3000:]}"
        for expected in block.expect:
            assert expected in output, f"{block}: {expected!r} not in its output:\n{output[-3000:]}"
