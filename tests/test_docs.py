"""The README and docs/: every relative link (and #anchor) resolves, and CI finds the README's commands."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(doc):
    bad = []
    for target in LINK.findall(_prose(doc.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no such heading")
    assert not bad, f"{doc.name}: " + "; ".join(bad)


def test_ci_finds_the_readmes_install_run_and_test_commands():
    # the same extraction .ci/run uses: the first fenced block after each marker line
    blocks = {}
    for name in ("install", "run", "test"):
        awk = (f'$0=="<!-- ci:{name} -->"{{f=1;next}} f&&/^```/{{if(c){{exit}}else{{c=1;next}}}} f&&c{{print}}')
        blocks[name] = subprocess.run(["awk", awk, str(ROOT / "README.md")], capture_output=True, text=True,
                                      check=True).stdout.strip()
    assert blocks == {"install": "./install.sh",
                      "run": 'localkv generate "What is the capital of France?" --max-tokens 32',
                      "test": "python -m pytest -q"}
