"""The README and docs/*.md name only things that exist.

For every page (README.md and each docs/*.md, one test case each, so a failure names the page):

- every `python -m MODULE` (also `python -u -m ...`, `.venv/bin/python -m ...` and `accelerate launch ... -m
  MODULE`; `pipeline.train|export|pull` stands for pipeline.train, pipeline.export and pipeline.pull) names a
  module that can be found with the repository root on sys.path, and a package named there has a `__main__`;
  for the project's own commands, the `--options` written on the same line, and `python -m data_prep`'s
  subcommand, are ones the command's argument parser defines;
- every repository path named (`launch/...`, `scripts/...`, `configs/...`, `bench/...`, `tests/...`,
  `pipeline/...`, `data_prep/...`, `swin_common/...`, `docs/...`, `.ci/...`, globs included) exists;
- every run-config key named as `section.key=...` anywhere, or as `section.key` inside backticks, where
  section is a section of pipeline.config.RunConfig (train, data, model, ...), is a field of that section
  (nested keys walk the dataclass tree);
- every relative link (`[text](path#anchor)`, images too) points to an existing file and, when it has an
  anchor, to a heading of that Markdown file (GitHub's anchor rules).

And: every docs/*.md page is linked from README.md, the README stays short, and the checks find enough names
that they cannot pass by finding nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import re
import sys
import typing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.config import RunConfig  # noqa: E402

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 220  # the issue: "at most ~200 lines"; the rest lives in docs/

# ---------------------------------------------------------------- what the run config holds


def _config_keys(cls, prefix: str = "") -> tuple[set[str], set[str]]:
    """(every dotted key of the dataclass tree, the dotted names of its sections)."""
    keys: set[str] = set()
    sections: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.add(name)
        if dataclasses.is_dataclass(hints[f.name]):
            sections.add(name)
            sub_keys, sub_sections = _config_keys(hints[f.name], name + ".")
            keys |= sub_keys
            sections |= sub_sections
    return keys, sections


CONFIG_KEYS, CONFIG_SECTIONS = _config_keys(RunConfig)
TOP_SECTIONS = sorted(s for s in CONFIG_SECTIONS if "." not in s)

# ---------------------------------------------------------------- what the pages name

_IDENT = r"[A-Za-z_]\w*"
_MODULE = rf"{_IDENT}(?:\.{_IDENT})*(?:\|{_IDENT})*"
# python -m X, python -u -m X, .venv/bin/python -m X, $PYTHON -m X
PY_MODULE = re.compile(rf"(?<![\w-])(?:python3?|\$PYTHON|\$\{{PYTHON\}})(?:\s+-[A-Za-z]+)*\s+-m\s+({_MODULE})")
# accelerate launch [options, over continued lines] -m X
ACCELERATE_MODULE = re.compile(rf"\baccelerate launch\b(?:[^\n`]|\\\n)*?\s-m\s+({_MODULE})")
REPO_ROOTS = ("launch", "scripts", "configs", "bench", "tests", "pipeline", "data_prep", "swin_common", "docs", r"\.ci")
REPO_PATH = re.compile(rf"(?<![\w./~$-])((?:{'|'.join(REPO_ROOTS)})/[\w./*<>-]*)")
CONFIG_KEY = re.compile(rf"(?<![\w./$-])((?:{'|'.join(TOP_SECTIONS)})(?:\.{_IDENT})+)(=?)")
# `model.safetensors`, `data.json`: file names, not keys
FILE_SUFFIXES = {
    "json",
    "jsonl",
    "safetensors",
    "yaml",
    "yml",
    "txt",
    "npz",
    "pt",
    "png",
    "py",
    "sh",
    "tar",
    "idx",
    "md",
    "db",
}
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`([^`]+)`")


@dataclasses.dataclass
class Name:
    kind: str  # module | path | key | link | option (value: "MODULE --opt") | subcommand ("MODULE sub")
    value: str
    line: int


OPTION = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


def _command_tail(text: str, offset: int) -> str:
    """The rest of the command line that starts before `offset`: up to the end of its line (following `\\`
    continuations), a backtick, a `#` comment or a `)`."""
    out = []
    while True:
        end = text.find("\n", offset)
        line = text[offset:] if end < 0 else text[offset:end]
        cut = re.search(r"`|\s#|\)|;|&&", line)
        if cut:
            return "".join(out) + line[: cut.start()]
        if line.rstrip().endswith("\\") and end >= 0:
            out.append(line.rstrip()[:-1] + " ")
            offset = end + 1
            continue
        return "".join(out) + line


def _blank_fences(text: str) -> tuple[str, str]:
    """(the text with fenced code blocks blanked, the text with everything but them blanked); line breaks and
    offsets are kept, so an offset means the same line in all three."""
    prose, code = [], []
    in_fence = False
    for line in text.splitlines(keepends=True):
        blank = re.sub(r"[^\n]", " ", line)
        if FENCE.match(line):
            in_fence = not in_fence
            prose.append(blank)
            code.append(blank)
        elif in_fence:
            prose.append(blank)
            code.append(line)
        else:
            prose.append(line)
            code.append(blank)
    return "".join(prose), "".join(code)


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _expand_modules(spec: str) -> list[str]:
    """`pipeline.train|export|pull` -> pipeline.train, pipeline.export, pipeline.pull."""
    first, *others = spec.split("|")
    head = first.rpartition(".")[0]
    return [first] + [f"{head}.{o}" if head else o for o in others]


def _is_file_name(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in FILE_SUFFIXES


def extract(text: str) -> list[Name]:
    names: list[Name] = []
    prose, _ = _blank_fences(text)

    for pattern in (PY_MODULE, ACCELERATE_MODULE):
        for m in pattern.finditer(text):
            line = _line(text, m.start(1))
            modules = _expand_modules(m.group(1))
            names += [Name("module", mod, line) for mod in modules]
            if len(modules) == 1 and _own_module_sources(modules[0]):
                tail = _command_tail(text, m.end(1))
                sub = re.match(r"\s+([a-z]\w*)\b(?![./:-])", tail)
                if modules[0] == "data_prep" and sub:
                    names.append(Name("subcommand", f"data_prep {sub.group(1)}", line))
                names += [Name("option", f"{modules[0]} {o}", line) for o in OPTION.findall(tail)]

    for m in REPO_PATH.finditer(text):
        path = m.group(1).rstrip(".,:;")
        if "<" in path or ">" in path:  # a placeholder: configs/<fine-tune recipe>.yaml
            continue
        names.append(Name("path", path, _line(text, m.start(1))))

    # keys: `section.key=...` anywhere (commands in code blocks, overrides in prose) ...
    seen: set[int] = set()
    for m in CONFIG_KEY.finditer(text):
        if m.group(2) == "=" and not _is_file_name(m.group(1)):
            names.append(Name("key", m.group(1), _line(text, m.start(1))))
            seen.add(m.start(1))
    # ... and `section.key` inside inline code in the prose
    for span in INLINE_CODE.finditer(prose):
        for m in CONFIG_KEY.finditer(span.group(1)):
            start = span.start(1) + m.start(1)
            if start not in seen and not _is_file_name(m.group(1)):
                names.append(Name("key", m.group(1), _line(text, start)))

    for m in LINK.finditer(prose):
        names.append(Name("link", m.group(2), _line(text, m.start(2))))
    return names


# ---------------------------------------------------------------- does it exist


def _find_module(name: str):
    """The module's spec, or None. Project modules through importlib.util.find_spec (which imports their parent
    packages: cheap here); others by walking the import path without importing anything (finding
    deepspeed.launcher.launch must not import DeepSpeed)."""
    top = name.partition(".")[0]
    if (REPO / top).is_dir() or (REPO / f"{top}.py").is_file():
        try:
            return importlib.util.find_spec(name)
        except ModuleNotFoundError:
            return None
    path = None
    spec = None
    for part in name.split("."):
        if path is not None and not path:
            return None  # a module, not a package, has no submodules
        spec = importlib.machinery.PathFinder.find_spec(part, path)
        if spec is None:
            return None
        path = list(spec.submodule_search_locations or [])
    return spec


def module_problem(name: str) -> str | None:
    spec = _find_module(name)
    if spec is None:
        return f"`python -m {name}`: no module {name}"
    if spec.submodule_search_locations is not None and _find_module(name + ".__main__") is None:
        return f"`python -m {name}`: package {name} has no __main__"
    return None


def _own_module_sources(name: str) -> list[Path]:
    """The files whose argument parser a project command uses: the module, or a package's __main__ and cli;
    with swin_common/cli.py (--debug). Empty for a module outside the repository."""
    base = REPO / Path(*name.split("."))
    if base.with_suffix(".py").is_file():
        files = [base.with_suffix(".py")]
    elif base.is_dir():
        files = [f for f in (base / "__main__.py", base / "cli.py") if f.is_file()]
    else:
        return []
    return files + [REPO / "swin_common" / "cli.py"]


def _parser_strings(name: str) -> str:
    return "\n".join(f.read_text() for f in _own_module_sources(name))


def option_problem(value: str) -> str | None:
    module, option = value.split(" ")
    if option == "--help" or f'"{option}"' in _parser_strings(module):
        return None
    return f"`python -m {module}`: no option {option}"


def subcommand_problem(value: str) -> str | None:
    module, sub = value.split(" ")
    if re.search(rf'add_parser\(\s*"{re.escape(sub)}"', _parser_strings(module)):
        return None
    return f"`python -m {module}`: no subcommand {sub}"


def path_problem(path: str) -> str | None:
    if any(c in path for c in "*?["):
        return None if list(REPO.glob(path.rstrip("/"))) else f"{path}: matches nothing"
    return None if (REPO / path).exists() else f"{path}: no such file or folder"


def key_problem(key: str) -> str | None:
    if key in CONFIG_KEYS:
        return None
    section = key.split(".")[0]
    fields = sorted(k.split(".", 1)[1] for k in CONFIG_KEYS if k.startswith(section + ".") and k.count(".") == 1)
    return f"config key {key}: not in pipeline.config.RunConfig ({section} takes: {', '.join(fields)})"


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation other than - and _ dropped, spaces to -,
    a repeated one suffixed -1, -2, ..."""
    prose, _ = _blank_fences(markdown)
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for line in prose.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link keeps its text
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def link_problem(page: Path, target: str, text: str) -> str | None:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
        return None
    file_part, _, anchor = target.partition("#")
    dest = (page.parent / file_part).resolve() if file_part else page
    if not dest.exists():
        return f"link {target}: {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest} does not exist"
    if anchor:
        if dest.suffix != ".md":
            return f"link {target}: an anchor into a file that is not Markdown"
        if anchor not in github_anchors(text if dest == page else dest.read_text()):
            return f"link {target}: {dest.name} has no heading with the anchor #{anchor}"
    return None


def problems(page: Path, text: str | None = None) -> list[str]:
    text = page.read_text() if text is None else text
    found = []
    for name in extract(text):
        check = {
            "module": module_problem,
            "path": path_problem,
            "key": key_problem,
            "option": option_problem,
            "subcommand": subcommand_problem,
        }.get(name.kind)
        problem = link_problem(page, name.value, text) if name.kind == "link" else check(name.value)
        if problem:
            found.append(f"{page.relative_to(REPO)}:{name.line}: {problem}")
    return found


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_page_names_only_what_exists(page):
    found = problems(page)
    assert not found, f"{len(found)} name(s) in {page.relative_to(REPO)} that do not exist:\n" + "\n".join(found)


def test_checks_find_enough_names():
    """Guards against a parser that finds nothing (and so passes): the pages name dozens of each kind."""
    counts: dict[str, set[str]] = {kind: set() for kind in ("module", "path", "key", "link", "option", "subcommand")}
    for page in PAGES:
        for name in extract(page.read_text()):
            counts[name.kind].add(name.value)
    minimum = {"module": 8, "path": 40, "key": 30, "link": 10, "option": 15, "subcommand": 4}
    for kind, least in minimum.items():
        assert len(counts[kind]) >= least, f"only {len(counts[kind])} distinct {kind}s found: {sorted(counts[kind])}"
    # the forms the pages use, each found at least once
    for module in (
        "pipeline.train",
        "pipeline.pull",
        "pipeline.predict",
        "pipeline.register",
        "pipeline.export",
        "pipeline.demo",
        "data_prep",
        "deepspeed.launcher.launch",
    ):
        assert module in counts["module"], module
    for key in (
        "train.zero_stage",
        "optim.base_lr",
        "checkpoint.resume",
        "tracking.enabled",
        "model.fused_attn",
        "data.shards",
        "schedule.decay",
        "eval.every_steps",
        "transfer.bias_tables",
    ):
        assert key in counts["key"], key
    for path in (
        "launch/pretrain_22k.sh",
        "launch/slurm/pretrain_22k.sbatch",
        "configs/swin_base_22k.yaml",
        "scripts/ensure_venv.sh",
    ):
        assert path in counts["path"], path


def test_checker_reports_what_does_not_exist():
    """The checks fail where they should: each kind of wrong name is reported with its line."""
    text = "\n".join(
        [
            "Run `python -m pipeline.no_such_command` or",
            "```bash",
            "python -u -m pipeline.train|nonesuch --config configs/no_such_recipe.yaml train.no_such_key=3",
            "accelerate launch --multi_gpu \\",
            "    -m pipeline.nope",
            "```",
            "Set `optim.nonsense` and `data.shards`; see [here](no_such_page.md) and [there](#no-such-heading),",
            "`model.safetensors` is a file, `swin_common.redact` a module, `bash launch/missing.sh` a script.",
            "## A heading",
            "[fine](#a-heading) and `python -m data_prep`, `python -m pipeline.data.loader`.",
            "python -m data_prep shard --source S --out O --no-such-flag 3 --workers 2  # --not-this-one",
            "`python -m data_prep unshard X` and `python -m pipeline.export CKPT --out DIR --debug --help`",
        ]
    )
    found = problems(README, text)
    expected = [
        "README.md:1: `python -m pipeline.no_such_command`: no module pipeline.no_such_command",
        "README.md:3: `python -m pipeline.nonesuch`: no module pipeline.nonesuch",
        "README.md:5: `python -m pipeline.nope`: no module pipeline.nope",
        "README.md:3: configs/no_such_recipe.yaml: no such file or folder",
        "README.md:8: launch/missing.sh: no such file or folder",
        "README.md:3: config key train.no_such_key: not in pipeline.config.RunConfig",
        "README.md:7: config key optim.nonsense: not in pipeline.config.RunConfig",
        "README.md:7: link no_such_page.md: no_such_page.md does not exist",
        "README.md:7: link #no-such-heading: README.md has no heading with the anchor #no-such-heading",
        "README.md:11: `python -m data_prep`: no option --no-such-flag",
        "README.md:12: `python -m data_prep`: no subcommand unshard",
    ]
    assert len(found) == len(expected), "\n".join(found)
    for want in expected:
        assert any(f.startswith(want) for f in found), f"not reported: {want}\nreported:\n" + "\n".join(found)


def test_package_without_main_is_reported():
    assert module_problem("pipeline.data") == "`python -m pipeline.data`: package pipeline.data has no __main__"
    assert module_problem("data_prep") is None


def test_every_docs_page_is_linked_from_the_readme():
    assert DOCS, "no docs/*.md pages"
    linked = set()
    for name in extract(README.read_text()):
        if name.kind == "link" and not re.match(r"^[a-z][a-z0-9+.-]*:", name.value):
            file_part = name.value.partition("#")[0]
            if file_part:
                linked.add((README.parent / file_part).resolve())
    missing = [str(p.relative_to(REPO)) for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


def test_readme_stays_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move the details into a docs/ page and link it"
    )
