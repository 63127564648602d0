"""The docs cannot drift from the tree: every path and ``module.name`` that docs/ARCHITECTURE.md names exists, and
every relative link in README.md and docs/*.md points at a file that is there. Read from source text (no imports),
so the check takes milliseconds."""

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "adapad_jax"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
# A name whose first part is one of these is another library's (jax.make_array_from_process_local_data, ...).
EXTERNAL = {"jax", "flax", "optax", "orbax", "numpy", "np", "os", "peft", "transformers", "torch", "nn", "lax",
            "huggingface_hub", "glibc", "tensorboardX", "wandb", "datasets", "ml_collections", "safetensors",
            "module", "deberta"}  # module.clone: a Flax module instance; deberta.encoder...: a transformers path
# `train.batch_size` and the like are config fields: checked against the schema, adapad_jax/config/schema.py.
CONFIG_SECTIONS = {"adapter", "checkpoint", "mesh", "train", "data", "optim", "logging", "model", "stop"}
# What follows the dot of a file name, not an attribute: ranks.png, config.json, ...
FILE_SUFFIXES = {"py", "json", "jsonl", "md", "png", "pb", "gz", "lock", "safetensors", "toml", "txt", "sh", "bin",
                 "model", "tsv", "csv", "orbax", "yaml", "cfg"}
TOP_DIRS = ("adapad_jax/", "configs/", "launch/", "tests/", "docs/", "tools/", ".ci/")
REF = re.compile(r"(?<![\w./-])((?:[a-z_]\w*/)*[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)\b")
PATH = re.compile(r"(?<![\w.-])((?:\.\./)*(?:[\w.-]+/)+[\w.-]*|[\w-]+\.py)(?![\w/-])")


def code_spans(text: str) -> list[str]:
    """Inline `code` spans and fenced blocks of a Markdown text: where the doc names code and files."""
    fenced = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return fenced + inline


def tree_entries(text: str) -> list[tuple[str, str]]:
    """(path, description) of every entry of the first fenced block (the layout tree), parents from indentation."""
    block = re.search(r"```[^\n]*\n(.*?)```", text, flags=re.S).group(1)
    stack: list[tuple[int, str]] = []
    entries = []
    for line in block.splitlines():
        match = re.match(r"( *)([\w.-]+(?:/|\.py))(?=\s|$)(.*)", line)
        if not match:
            continue
        indent, name, rest = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "".join(parent for _, parent in stack) + name
        entries.append((path, rest))
        if name.endswith("/"):
            stack.append((indent, name))
    return entries


def resolve_path(name: str) -> Path | None:
    """The file or folder a doc's path names: from the repo root, else from the package (``training/step.py``)."""
    for base in (ROOT, PACKAGE):
        candidate = base / name
        if candidate.exists():
            return candidate
    return None


def file_anywhere(name: str) -> bool:
    """Whether a bare file name (``slot_adam.py``, placed by the tree) is some file of the project's folders."""
    return any(next((ROOT / top).rglob(name), None) for top in TOP_DIRS)


@cache
def module_files(module: str) -> list[Path]:
    """Source files that ``module`` (``step``, ``training/step``, ``adapad_jax.training.step``) can name."""
    parts = module.replace("adapad_jax.", "").replace(".", "/").strip("/")
    exact = [p for p in (PACKAGE / f"{parts}.py", PACKAGE / parts / "__init__.py") if p.is_file()]
    if exact:
        return exact
    return sorted(PACKAGE.rglob(f"{parts.split('/')[-1]}.py")) + sorted(PACKAGE.rglob(f"{parts}/__init__.py"))


def defines(path: Path, name: str) -> bool:
    """Whether ``path`` defines ``name`` at any level: def, class, assignment, import (a package's re-export)."""
    pattern = (rf"^\s*(?:async\s+def|def|class)\s+{name}\b|^\s*{name}\s*[:=]"
               rf"|^\s*from\s+\S+\s+import\s+(?:[^#\n(]*|\([^)]*)\b{name}\b")
    return re.search(pattern, path.read_text(), flags=re.M) is not None


def class_defines(name: str, member: str) -> bool:
    """Whether some class ``name`` in the package has ``member`` (a method or attribute in its body)."""
    for path in PACKAGE.rglob("*.py"):
        body = re.search(rf"^class {name}\b.*?(?=^\S|\Z)", path.read_text(), flags=re.M | re.S)
        if body and re.search(rf"^\s+(?:def\s+{member}\b|{member}\s*[:=])", body.group(0), flags=re.M):
            return True
    return False


def reference_exists(ref: str) -> bool:
    """Whether ``module.name`` (or ``Class.member``) names something defined in the package."""
    module, _, name = ref.rpartition(".")
    as_path = ref.replace("adapad_jax.", "").replace(".", "/")
    if (PACKAGE / f"{as_path}.py").is_file() or (PACKAGE / as_path / "__init__.py").is_file():
        return True  # the name of a module (adapad_jax.train)
    if module in CONFIG_SECTIONS:
        schema = (PACKAGE / "config" / "schema.py").read_text()
        return re.search(rf"^\s*config\.{module}\.{name}\s*=", schema, flags=re.M) is not None
    if module == "adapad_jax" and (ROOT / name).is_dir():  # configs/ ships as adapad_jax.configs (package-dir)
        return True
    if module[:1].isupper():
        return class_defines(module, name)
    return any(defines(path, name) for path in module_files(module))


def doc_references(text: str) -> set[str]:
    """Every ``module.name`` the doc names in code, not counting file names and other libraries."""
    refs = set()
    for span in code_spans(text):
        for ref in REF.findall(span):
            head, tail = ref.split("/")[0].split(".")[0], ref.rsplit(".", 1)[1]
            if head in EXTERNAL or tail in FILE_SUFFIXES or ref.startswith(("self.", "config.", "cfg.")):
                continue
            refs.add(ref)
    return refs


def doc_paths(text: str) -> set[str]:
    """Every repository path the doc names in code: ``*.py`` files and paths under the project's folders."""
    paths = set()
    for span in code_spans(text):
        for path in PATH.findall(span):
            last = path.rstrip("/").rsplit("/", 1)[-1]
            if "." in last and last.rsplit(".", 1)[1] not in FILE_SUFFIXES:
                continue  # training/sharding.make_mesh: a reference, checked as one
            if path.endswith(".py") or path.startswith(TOP_DIRS + ("../",)) or resolve_path(path.split("/")[0] + "/"):
                paths.add(path.rstrip("/") if path.endswith("/") and path.count("/") > 1 else path)
    return paths


def test_architecture_tree_entries_exist():
    """Each entry of the layout tree is a file or folder of the repository."""
    entries = tree_entries(ARCHITECTURE.read_text())
    assert len(entries) > 40, "the layout tree was not parsed"
    missing = [path for path, _ in entries if resolve_path(path) is None]
    assert not missing, f"docs/ARCHITECTURE.md's tree names files that are not there: {missing}"


def test_architecture_tree_functions_live_in_their_file():
    """A ``name(...)`` call written beside a tree entry is defined in that entry's file."""
    wrong = []
    for path, description in tree_entries(ARCHITECTURE.read_text()):
        file = resolve_path(path)
        if file is None or not file.is_file():
            continue
        for name in re.findall(r"(?<![\w.])([a-z_]\w*)\(", description):
            if not defines(file, name):
                wrong.append(f"{name} in {path}")
    assert not wrong, f"docs/ARCHITECTURE.md places functions in files that do not define them: {wrong}"


def test_architecture_paths_exist():
    """Every path the text names (``training/recovery.py``, ``configs/``, ...) exists, and none leaves the repo."""
    text = ARCHITECTURE.read_text()
    paths = doc_paths(text)
    assert "adapters/slots.py" in paths and "launch/train.py" in paths, "the path parser lost known paths"
    outside = [path for path in paths if path.startswith("../") or path.startswith("/")]
    assert not outside, f"docs/ARCHITECTURE.md points outside the repository: {outside}"
    missing = sorted(path for path in paths
                     if resolve_path(path) is None and ("/" in path or not file_anywhere(path)))
    assert not missing, f"docs/ARCHITECTURE.md names paths that are not there: {missing}"


def test_architecture_references_exist():
    """Every ``module.function`` / ``Class.member`` the doc names is defined where it says."""
    refs = doc_references(ARCHITECTURE.read_text())
    assert {"validation.check_fields", "saved_run.restored_run"} <= refs, "the reference parser lost known names"
    missing = sorted(ref for ref in refs if not reference_exists(ref))
    assert not missing, f"docs/ARCHITECTURE.md names what the code does not define: {missing}"


def test_reference_checker_can_fail():
    """The checks above see a misplaced name and a missing file (so a pass means something)."""
    assert reference_exists("saved_run.restored_run") and not reference_exists("run.restored_run")
    assert reference_exists("errors.start_command") and not reference_exists("run.start_command")
    assert reference_exists("Trainer.state_shardings") and not reference_exists("Trainer.no_such_method")
    assert resolve_path("training/recovery.py") and resolve_path("training/no_such.py") is None
    assert reference_exists("adapter.r_max") and not reference_exists("adapter.no_such_field")


def anchors(doc: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
            for title in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path):
    """Every relative Markdown link (``[text](path)``, ``[text](path#heading)``) points at an existing file and
    heading."""
    links = re.findall(r"\]\(([^)\s]+)\)", doc.read_text())
    broken = []
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (doc.parent / path) if path else doc
        if not target.exists() or (anchor and target.suffix == ".md" and anchor not in anchors(target)):
            broken.append(link)
    assert not broken, f"{doc.name} links to files or headings that are not there: {broken}"
