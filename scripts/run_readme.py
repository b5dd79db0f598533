"""Runs every ```bash block of README.md verbatim, in the order a reader meets them, in the repository root: the
quick start (the benchmark suite and the test command), the build by hand, the wheel and its check. Meant for a
fresh clone (CI runs it on its clean checkout: .ci/run); each block runs as one `bash -e -o pipefail` script (a
block's lines share its shell: `source .venv/bin/activate`, `export ...`). After each block the checkout must be as
clean as before (`git status --porcelain`): no command may modify tracked files or leave untracked ones outside the
ignored folders. A block right after an HTML comment `<!-- no-run: why -->` is not run; the reason is printed.

  python3.11 scripts/run_readme.py           # run them all
  python3.11 scripts/run_readme.py --list    # print the blocks that would run, run nothing

Only the standard library: it runs before any venv exists. tests/test_docs.py uses its parser.
"""
import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_RUN = re.compile(r"<!--\s*no-run:\s*(\S.*?)\s*-->")
SHELLS = ("bash", "sh", "shell")
# The README's test command: CI must run it, so the README must hold it in a block.
TEST_COMMAND = "bash scripts/test.sh"


def code_blocks(path, text=None):
    """(path, line, language, code, no-run reason or None) of every fenced block of a markdown file."""
    if text is None:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            text = f.read()
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = len(m.group(1)), m.group(2), i + 1
        j = start
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            j += 1
        code = "\n".join(l[indent:] for l in lines[start:j]) + "\n"
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        reason = NO_RUN.search(lines[k]) if k >= 0 else None
        out.append((path, start, lang, code, reason.group(1) if reason else None))
        i = j + 1
    return out


def readme_shell_blocks(text=None):
    return [b for b in code_blocks("README.md", text) if b[2] in SHELLS]


def holds_test_command(blocks):
    return any(line.split("#")[0].strip() == TEST_COMMAND for b in blocks if b[4] is None
               for line in b[3].splitlines())


def git_status(root):
    return subprocess.run(["git", "status", "--porcelain"], cwd=root, check=True, capture_output=True,
                          text=True).stdout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the blocks that would run, run nothing")
    ap.add_argument("--root", default=ROOT, help="the checkout whose README.md runs (default: this one)")
    args = ap.parse_args(argv)
    with open(os.path.join(args.root, "README.md"), encoding="utf-8") as f:
        blocks = readme_shell_blocks(f.read())
    if not holds_test_command(blocks):
        sys.exit(f"run_readme: README.md has no block running `{TEST_COMMAND}` (the test command CI must call)")
    for path, line, _, code, reason in blocks:
        head = f"[readme] {path}:{line}"
        if reason:
            print(f"{head}: not run ({reason})", flush=True)
            continue
        print(f"{head}:\n" + "".join(f"  $ {l}\n" for l in code.splitlines() if l.strip()), end="", flush=True)
        if args.list:
            continue
        before = git_status(args.root)
        t0 = time.perf_counter()
        rc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=args.root).returncode
        took = time.perf_counter() - t0
        if rc != 0:
            sys.exit(f"{head}: exit status {rc} after {took:.0f} s")
        after = git_status(args.root)
        if after != before:
            sys.exit(f"{head}: the checkout changed (git status --porcelain):\n{after}")
        print(f"{head}: ok, {took:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
