"""The README and docs/*.md as a newcomer uses them: every ```python block runs on CPU in a fresh namespace (all of
them in one child process, in a temporary folder) unless an HTML comment `<!-- no-run: why -->` right before it says
why it cannot run here — then it must still compile and use no undefined name; every ```bash block names programs
and repository files that exist; every relative link (and #anchor) points at something that exists."""
import builtins
import importlib.util
import json
import os
import re
import shlex
import subprocess
import symtable
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))
PER_BLOCK_SECONDS = 20  # a block is an example: a few seconds on CPU (tiny models, small sizes)
# The markdown parser is scripts/run_readme.py's, the script that runs the README's bash blocks (CI).
_spec = importlib.util.spec_from_file_location("run_readme", os.path.join(ROOT, "scripts", "run_readme.py"))
run_readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_readme)
NO_RUN = run_readme.NO_RUN


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


code_blocks = run_readme.code_blocks


BLOCKS = [b for p in DOCS for b in code_blocks(p)]
PYTHON = [b for b in BLOCKS if b[2] == "python"]
BASH = [b for b in BLOCKS if b[2] in ("bash", "sh", "shell")]


def _id(block):
    return f"{block[0]}:{block[1]}"


def undefined_names(code, filename="<block>"):
    """Names a block reads that nothing in it binds (imports, assignments, defs, parameters) and no builtin is."""
    top = symtable.symtable(code, filename, "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    used = set()

    def walk(table):
        for s in table.get_symbols():
            if not s.is_referenced():
                continue
            if table is top or (s.is_global() and not s.is_declared_global()):
                used.add(s.get_name())
        for child in table.get_children():
            walk(child)

    walk(top)
    return sorted(used - bound - set(dir(builtins)))


def test_undefined_names_checker():
    """The checker itself: it must see names read but never bound, at module level and inside functions."""
    assert undefined_names("y = f(x)\n") == ["f", "x"]
    assert undefined_names("import torch\ndef g(a):\n    return a + torch.ones(1) + c\nprint(g(1))\n") == ["c"]
    assert undefined_names("xs = [i * k for i in range(3)]\n") == ["k"]
    assert undefined_names("def f():\n    return 1\nclass C:\n    n = f()\nz = C.n\n") == []


def test_code_blocks_and_no_run_markers():
    md = ("text\n<!-- no-run: needs the SmolLM2 download -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
          "- item\n\n  ```bash\n  bash scripts/test.sh\n  ```\n")
    assert code_blocks("m.md", md) == [
        ("m.md", 3, "python", "x = 1\n", "needs the SmolLM2 download"), ("m.md", 7, "python", "y = 2\n", None),
        ("m.md", 12, "bash", "bash scripts/test.sh\n", None)]


def test_docs_have_code():
    assert len(PYTHON) >= 10 and len(BASH) >= 3, (len(PYTHON), len(BASH))
    assert any(b[0] == "README.md" for b in PYTHON)


@pytest.mark.parametrize("block", PYTHON, ids=_id)
def test_python_block_compiles_without_undefined_names(block):
    path, line, _, code, _ = block
    compile(code, f"{path}:{line}", "exec")
    assert undefined_names(code, path) == [], f"{path}:{line} reads names it never defines"


_DRIVER = r"""
import json, sys, time, traceback, warnings
warnings.simplefilter("ignore")
try:  # the heavy imports once, up front: a block's time limit is for its own work, not for loading the libraries
    import torch, transformers, peftcore
    transformers.LlamaForCausalLM, peftcore.apply_adapter
except BaseException:
    pass  # the blocks that need them then fail with the error
results = []
for name, code in json.load(sys.stdin):
    t = time.perf_counter()
    try:
        exec(compile(code, name, "exec"), {"__name__": "__main__"})
        err = None
    except BaseException:
        err = traceback.format_exc(limit=6)
    results.append((name, err, time.perf_counter() - t))
print("RESULTS" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def python_results(tmp_path_factory):
    runnable = [(_id(b), b[3]) for b in PYTHON if b[4] is None]
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(runnable), capture_output=True,
                          text=True, timeout=60 + PER_BLOCK_SECONDS * len(runnable),
                          cwd=tmp_path_factory.mktemp("docs"), env=env)
    out = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS")]
    assert proc.returncode == 0 and out, proc.stderr[-4000:]
    return {name: (err, secs) for name, err, secs in json.loads(out[-1][len("RESULTS"):])}


@pytest.mark.parametrize("block", [b for b in PYTHON if b[4] is None], ids=_id)
def test_python_block_runs(block, python_results):
    err, secs = python_results[_id(block)]
    assert err is None, f"{_id(block)} failed:\n{err}"
    assert secs < PER_BLOCK_SECONDS, f"{_id(block)} took {secs:.1f} s; an example should take a few seconds"


# Programs a bash block may call besides the repository's own files; paths the set-up or a run creates.
PROGRAMS = {"bash", "sh", "python", "python3", "python3.11", "pip", "export", "source", ".", "cd", "git", "pytest",
            ".venv/bin/python", ".venv/bin/pip"}
GENERATED = (".venv/", "build/", "dist", "bench/out", "examples/out", "OUTDIR")
REPO_PATH = re.compile(r"^(scripts|bench|examples|tests|csrc|python|docs)/|\.(py|sh)$")


def bash_commands(code):
    """The commands of a bash block: lists of words, split at ;, &&, ||, | and &, comments dropped."""
    code = re.sub(r"\\\n", " ", code)
    commands = []
    for line in code.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        lex.commenters = "#"
        cmd = []
        for tok in lex:
            if tok in (";", "&&", "||", "|", "&"):
                commands.append(cmd)
                cmd = []
            else:
                cmd.append(tok)
        commands.append(cmd)
    return [c for c in commands if c]


def test_bash_parser():
    assert bash_commands('A="1;2" bash x.sh --y z  # bash gone.sh\ncd a && pip install .\n') == [
        ["A=1;2", "bash", "x.sh", "--y", "z"], ["cd", "a"], ["pip", "install", "."]]


@pytest.mark.parametrize("block", BASH, ids=_id)
def test_bash_block_names_what_exists(block):
    path, line, _, code, _ = block
    _check_bash(f"{path}:{line}", code)


def _check_bash(where, code):
    for cmd in bash_commands(code):
        words = list(cmd)
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value before the program
            words.pop(0)
        if not words:
            continue
        prog = words[0]
        assert prog in PROGRAMS or os.path.isfile(os.path.join(ROOT, prog)), \
            f"{where}: '{prog}' is neither a known program nor a file of the repository"
        for w in words:
            if "$" in w or w.startswith(GENERATED) or not REPO_PATH.search(w):
                continue
            assert os.path.exists(os.path.join(ROOT, w)), f"{where}: '{w}' does not exist in the repository"


INLINE_COMMAND = re.compile(r"`((?:[A-Z_]+=\S+ )*(?:bash|python|\.venv/bin/python|pip) [^`]*)`")


@pytest.mark.parametrize("path", DOCS)
def test_inline_commands_name_what_exists(path):
    """Commands quoted in the prose (`bash scripts/bench.sh --device cuda`, `python bench/run.py ...`) too."""
    text = re.sub(r"```.*?```", "", _read(path), flags=re.S)
    commands = INLINE_COMMAND.findall(text)
    for command in commands:
        _check_bash(f"{path} (`{command}`)", command + "\n")


def _slug(heading):
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return h.replace(" ", "-")


def _anchors(path):
    text = re.sub(r"```.*?```", "", _read(path), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", DOCS)
def test_relative_links_exist(path):
    text = re.sub(r"```.*?```", "", _read(path), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        assert os.path.exists(os.path.join(ROOT, dest)), f"{path}: link '{target}': {dest} does not exist"
        if anchor and dest.endswith(".md"):
            assert anchor in _anchors(dest), f"{path}: link '{target}': no heading '#{anchor}' in {dest}"


def test_every_doc_is_linked_from_the_readme():
    linked = {os.path.normpath(t.partition("#")[0]) for t in LINK.findall(_read("README.md"))}
    assert set(DOCS[1:]) <= linked, sorted(set(DOCS[1:]) - linked)


def test_docs_speak_of_the_project_only():
    """No word of how the project was developed: the machines, their loans, what was carried to them."""
    words = re.compile(r"\b(lent|lend|borrow\w*|carr(y|ied)|sessions?)\b", re.I)
    for path in DOCS:
        hits = [m.group(0) for m in words.finditer(_read(path))]
        assert not hits, f"{path}: {hits}"


def test_bash_checker_refuses_what_does_not_exist():
    _check_bash("ok", "PEFTCORE_CUDA=OFF bash scripts/setup.sh && .venv/bin/python bench/run.py --out bench/out\n")
    for bad in ("python bench/missing.py\n", "bash scripts/nope.sh\n", "frobnicate --all\n"):
        with pytest.raises(AssertionError):
            _check_bash("bad", bad)


# The README's bash blocks run verbatim in CI (scripts/run_readme.py from .ci/run); the runner itself is tested here.
def test_ci_runs_every_readme_command():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert "scripts/run_readme.py" in ci
    blocks = run_readme.readme_shell_blocks(_read("README.md"))
    assert run_readme.holds_test_command(blocks)
    assert all(reason is None for *_, reason in blocks), "every README command runs in CI"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_readme.py"), "--list"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for _, line, _, code, _ in blocks:
        assert f"README.md:{line}:" in out.stdout
        for command in code.splitlines():
            if command.strip():
                assert f"$ {command}" in out.stdout


def _fake_checkout(tmp_path, readme):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "test.sh").write_text("mkdir -p out && echo tests ran > out/tests.txt\n")
    (tmp_path / "README.md").write_text(readme)
    (tmp_path / ".gitignore").write_text("out/\n")
    for cmd in (["init", "-q"], ["add", "-A"],
                ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x"]):
        subprocess.run(["git", *cmd], cwd=tmp_path, check=True, capture_output=True)
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_readme.py"), "--root", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("extra, error", [
    ("", None),
    ("```bash\nmkdir -p out && echo ok > out/ignored.txt\n```\n", None),
    ("<!-- no-run: a reason -->\n```bash\nfalse\n```\n", None),
    ("```bash\nfalse\necho not reached\n```\n", "exit status 1"),
    ("```bash\ntrue | false\n```\n", "exit status 1"),
    ("```bash\necho changed >> README.md\n```\n", "the checkout changed"),
    ("```bash\necho new > untracked.txt\n```\n", "the checkout changed"),
    ("```sh\nexit 3\n```\n", "exit status 3"),
])
def test_readme_runner_bites(tmp_path, extra, error):
    r = _fake_checkout(tmp_path, "# x\n\n```bash\nbash scripts/test.sh\n```\n\n" + extra)
    if error is None:
        assert r.returncode == 0, r.stdout + r.stderr
        assert (tmp_path / "out" / "tests.txt").read_text() == "tests ran\n"
        assert "not run (a reason)" in r.stdout or "no-run" not in extra
    else:
        assert r.returncode != 0 and error in r.stderr, r.stdout + r.stderr


def test_readme_runner_wants_the_test_command(tmp_path):
    r = _fake_checkout(tmp_path, "# x\n\n```bash\necho hi\n```\n")
    assert r.returncode != 0 and "bash scripts/test.sh" in r.stderr
