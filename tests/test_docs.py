"""The README and docs/*.md stay true to the code: every config key they name exists, every relative
link and #anchor resolves, and every docs page is in the README's page index."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from flame.config import Config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SECTIONS = {
    f.name: {g.name for g in dataclasses.fields(f.default_factory())} for f in dataclasses.fields(Config)
}
SECTION_RE = "|".join(sorted(SECTIONS))

# `--section.key` anywhere (prose, code spans, fenced code): any section name counts, so a made-up
# section is caught too.
FLAG = re.compile(r"(?<![\w-])--([a-z_]+)\.([a-z_0-9]+)")
# section.key with a known section, not part of a longer dotted name (flame.data.tokenizer.X,
# cfg.model.name) nor a path (bench/data.py); a sentence's final dot is fine.
DOTTED = re.compile(rf"(?<![\w./$-])({SECTION_RE})\.([a-z_][a-z_0-9]*)(?![\w(]|\.\w)")
# section.<suffix> is a file name (model.safetensors), not a key
FILE_SUFFIXES = {"py", "json", "jsonl", "toml", "txt", "md", "png", "html", "safetensors", "bin", "pt"}
# named on purpose although they are not keys
NOT_KEYS = {
    "section.key",  # the placeholder of `--section.key value`
    "optim.lrr",  # the misspelt key in the example of an unknown-option error
}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _fenced(lines: list[str]) -> list[bool]:
    """For each line: whether it is inside (or opens/closes) a fenced code block."""
    inside, out = False, []
    for ln in lines:
        fence = ln.lstrip().startswith("```")
        out.append(inside or fence)
        if fence:
            inside = not inside
    return out


def _unknown(section: str, key: str) -> bool:
    return f"{section}.{key}" not in NOT_KEYS and key not in SECTIONS.get(section, ())


def _keys_in(line: str) -> set[tuple[str, str]]:
    """The (section, key) pairs a line names."""
    hits = {(m.group(1), m.group(2)) for m in FLAG.finditer(line)}
    hits |= {(m.group(1), m.group(2)) for m in DOTTED.finditer(line) if m.group(2) not in FILE_SUFFIXES}
    return hits


def test_key_scanner():
    line = (
        "`--optim.lrx 3`, `data.varlenx`, eval.intervl. torch.distributed, cfg.model.name, "
        "`flame.data.tokenizer.PROBE_TEXT`, `model.safetensors`, bench/data.py, --rdzv-id x, "
        "trainer.step, `model.loss`"
    )
    assert _keys_in(line) == {("optim", "lrx"), ("data", "varlenx"), ("eval", "intervl"), ("model", "loss")}
    assert [k for k in sorted(_keys_in(line)) if _unknown(*k)] == [
        ("data", "varlenx"),
        ("eval", "intervl"),
        ("optim", "lrx"),
    ]
    assert _keys_in("--made_up.key") == {("made_up", "key")} and _unknown("made_up", "key")


def test_every_named_config_key_exists():
    assert {"model", "data", "train", "optim", "checkpoint", "log", "eval", "parallel"} <= set(SECTIONS)
    problems, found = [], 0
    for page in PAGES:
        for no, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            hits = _keys_in(line)
            found += len(hits)
            for section, key in sorted(hits):
                if _unknown(section, key):
                    problems.append(f"{_rel(page)}:{no}: unknown config key {section}.{key}")
    assert not problems, "\n".join(problems)
    assert found > 50  # the patterns still see the keys the guides name


def _toml_blocks(text: str):
    """(first line number, source) of every ```toml block."""
    lines, block, start = text.splitlines(), None, 0
    for no, ln in enumerate(lines, 1):
        if block is None and ln.strip() == "```toml":
            block, start = [], no + 1
        elif block is not None and ln.strip() == "```":
            yield start, "\n".join(block)
            block = None
        elif block is not None:
            block.append(ln)


def test_toml_examples_use_real_keys():
    problems, blocks = [], 0
    for page in PAGES:
        for start, src in _toml_blocks(page.read_text(encoding="utf-8")):
            blocks += 1
            try:
                data = tomllib.loads(src)
            except tomllib.TOMLDecodeError as e:
                problems.append(f"{_rel(page)}:{start}: the TOML example does not parse: {e}")
                continue
            for section, table in data.items():
                if section not in SECTIONS:
                    problems.append(f"{_rel(page)}:{start}: unknown config section [{section}]")
                    continue
                for key in table:
                    if _unknown(section, key):
                        problems.append(f"{_rel(page)}:{start}: unknown config key {section}.{key}")
    assert not problems, "\n".join(problems)
    assert blocks >= 2


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lowercase, punctuation removed, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"[`*]|(?<!\w)_|_(?!\w)", "", text)  # code and emphasis markers
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    seen: dict[str, int] = {}
    for ln, fenced in zip(lines, _fenced(lines)):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", ln)
        if m and not fenced:
            a = _anchor(m.group(1))
            n = seen.get(a, 0)
            seen[a] = n + 1
            if n:
                seen[f"{a}-{n}"] = 1
    return set(seen)


def test_anchor_rule():
    assert _anchor("`flame report`: a run you can look at") == "flame-report-a-run-you-can-look-at"
    assert _anchor("Trainer overhead — `python bench/trainer_overhead.py`") == (
        "trainer-overhead--python-benchtrainer_overheadpy"
    )
    assert _anchor("Your own model (`pkg.module:function`)") == "your-own-model-pkgmodulefunction"


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _links(path: Path):
    """(line number, target) of every relative link outside code."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for no, (ln, fenced) in enumerate(zip(lines, _fenced(lines)), 1):
        if fenced:
            continue
        for m in LINK.finditer(re.sub(r"`[^`]*`(?!\])", "", ln)):
            target = m.group(1)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                yield no, target


def _link_problems(page: Path, root: Path = ROOT) -> tuple[int, list[str]]:
    """How many relative links a page has, and what is wrong with them."""
    problems, seen = [], 0
    for no, target in _links(page):
        seen += 1
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page.resolve()
        where = f"{page.relative_to(root)}:{no}: {target}"
        if root != dest and root not in dest.parents:
            problems.append(f"{where}: outside the repository")
        elif not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    return seen, problems


def test_relative_links_resolve():
    seen, problems = 0, []
    for page in PAGES:
        n, p = _link_problems(page)
        seen, problems = seen + n, problems + p
    assert not problems, "\n".join(problems)
    assert seen >= len(PAGES)


def test_link_checker(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## `flame check`: a resume\n\n## Two words\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md) [ok](docs/a.md#flame-check-a-resume) [ok](#r) `[code](nowhere.md)`\n"
        "[bad](docs/b.md) [bad](docs/a.md#two_words) [bad](#nope) [web](https://example.com/x)\n"
        "```\n[code](nowhere.md)\n```\n# R\n"
    )
    seen, problems = _link_problems((tmp_path / "README.md").resolve(), tmp_path.resolve())
    assert seen == 6
    assert [p.split(": ", 2)[1] for p in problems] == ["docs/b.md", "docs/a.md#two_words", "#nope"]


def test_readme_indexes_every_docs_page():
    linked = {
        (ROOT / t.partition("#")[0]).resolve() for _, t in _links(ROOT / "README.md") if t.startswith("docs/")
    }
    missing = [_rel(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: p.name)
def test_docs_page_has_title_and_summary(page):
    lines = page.read_text(encoding="utf-8").splitlines()
    assert lines and lines[0].startswith("# "), f"{_rel(page)}: the first line is not a '# Title'"
    rest = [ln for ln in lines[1:] if ln.strip()]
    assert rest and not rest[0].startswith(("#", "```", "|", "-")), (
        f"{_rel(page)}: the title is not followed by a one-line summary"
    )


REPO_PATH = re.compile(r"(?<![\w./-])((?:bench|tests|examples|configs|scripts|src|docs|\.ci)/[\w./-]*[\w/])")


_GENERATED = {"bench/out"}


def test_named_repository_paths_exist():
    """`bench/mfu.py`, `tests/zoo.py`, `configs/fla-gla.toml`, ... in code spans are files of this repository."""
    problems, seen = [], 0
    for page in PAGES:
        for no, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for span in re.findall(r"`([^`]+)`", line):
                for path in REPO_PATH.findall(span):
                    seen += 1
                    if path.rstrip("/") in _GENERATED:
                        continue  # written by the scripts, ignored by git: absent from a clean clone
                    if not (ROOT / path).exists():
                        problems.append(f"{_rel(page)}:{no}: {path}: no such file in the repository")
    assert not problems, "\n".join(problems)
    assert seen >= 10
