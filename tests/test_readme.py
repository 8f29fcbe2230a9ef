"""The README and the user guides stay what a first hour needs: a README short enough to read,
with a contents list that works; every relative link in it and in the guides reaching a file
and a heading that exist (GitHub's anchors); the Quickstart's test command the one CI runs;
no internal issue talk in text written for users."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDES = [ROOT / "docs" / name for name in ("node-operator.md", "federation-operator.md", "researcher.md",
                                            "deployment.md")]
USER_DOCS = [README, *GUIDES]
MAX_README_LINES = 250

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")


def prose(text: str) -> str:
    """`text` without fenced code blocks (their lines blanked, so line numbers stay)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return "\n".join(lines)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (links as their text, no emphasis or
    code marks), lowercase, every character but letters, digits, `_`, `-` and spaces dropped,
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    """The targets of the inline links in a markdown file's prose (not in code)."""
    text = INLINE_CODE.sub("``", prose(path.read_text(encoding="utf-8")))
    return LINK.findall(text)


def section(text: str, title: str) -> str:
    """The body of the `## title` section of a markdown text."""
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no '## {title}' section"
    return match.group(1)


def test_the_readme_fits_the_first_hour():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"


def test_the_readme_contents_list_links_every_section_and_nothing_else():
    text = README.read_text(encoding="utf-8")
    entries = re.findall(r"^\s*[-*]\s+\[[^\]]+\]\(#([^)]+)\)\s*$", section(text, "Contents"), re.M)
    assert entries, "the Contents section lists no '- [Title](#anchor)' entries"
    headings = anchors(README)
    assert not [e for e in entries if e not in headings], f"contents entries with no heading: {entries}"
    sections = [slug(h) for h in re.findall(r"^## (.+?)\s*$", prose(text), re.M)]
    missing = [s for s in sections if s != "contents" and s not in entries]
    assert not missing, f"sections the contents list leaves out: {missing}"


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_heading(doc):
    broken = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        file = (doc.parent / path_part).resolve() if path_part else doc
        if not file.exists():
            broken.append(f"{target} (no file {file.relative_to(ROOT) if ROOT in file.parents else file})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.relative_to(ROOT)})")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {broken}"


def test_the_quickstart_test_command_is_the_one_ci_runs():
    blocks = re.findall(r"^```bash\n(.*?)^```", section(README.read_text(encoding="utf-8"), "Quickstart"), re.M | re.S)
    assert len(blocks) >= 2, "the Quickstart should show two commands: a first run and the tests"
    readme_command = blocks[1].strip()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    marker = next(i for i, line in enumerate(ci) if "README Quickstart, second command, verbatim" in line)
    assert ci[marker + 1].strip() == readme_command


def test_the_install_section_says_how_to_get_the_cpu_and_the_cuda_wheel():
    install = section(README.read_text(encoding="utf-8"), "Install")
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in install
    assert "CUDA" in install


def test_the_readme_quotes_no_timing_of_its_own():
    """Times and accuracies live in the reports generated from committed records (with their
    machine); the README links to them instead of quoting figures that drift apart."""
    text = prose(README.read_text(encoding="utf-8"))
    durations = re.findall(r"\b\d+(?:[.,]\d+)?\s*(?:s|sec|seconds?|min|minutes?|h|hours?)\b", text)
    accuracies = re.findall(r"accuracy (?:of )?\d", text)
    assert not durations and not accuracies, (durations, accuracies)


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_user_docs_do_not_talk_about_internal_issues(doc):
    text = doc.read_text(encoding="utf-8")
    found = re.findall(r"issue\s*#?\d+|the issue", text, re.I)
    assert not found, f"{doc.relative_to(ROOT)} mentions {found}"


def test_the_slug_rules():
    assert slug("Auditing the privacy your node actually got: `fedtune audit`") == \
        "auditing-the-privacy-your-node-actually-got-fedtune-audit"
    assert slug("4. Join with a SuperNode (each hospital)") == "4-join-with-a-supernode-each-hospital"
    assert slug("Through Flower's own CLI: `flwr run simulations/flwr_app`") == \
        "through-flowers-own-cli-flwr-run-simulationsflwr_app"
