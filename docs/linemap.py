"""Line ranges of top-level functions and classes, for the README's paper-to-code tables.

    python docs/linemap.py dreamfusion.py train export train/3 common.py:ObjectField
prints one `file:first-last` per name: from its `def`/`class` line to the last line of its body;
`train/3` is the block of train's loop that starts at its comment `# --- 3. ...` and ends before
the next `# --- ` comment (or the loop's last line).
    python docs/linemap.py --update README.md
rewrites every `file:first-last` `name` reference in README.md to the current lines.
tests/test_readme.py checks that every such reference is current, so the tables cannot silently go
stale: after editing a script, run the --update command.
"""
import ast
import os
import re
import sys

REF = re.compile(r"`(\w+\.py):(\d+)-(\d+)` `([\w/]+)`")


def line_ranges(path: str) -> dict:
    """{name: (first, last)} for the module's top-level functions, classes and assignments."""
    with open(path) as f:
        tree = ast.parse(f.read())
    out = {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        for name in names:
            out[name] = (first, node.end_lineno)
    return out


def step_range(path: str, func: str, step: str):
    """(first, last) of the block `# --- <step>. ...` inside the top-level function `func`."""
    first_f, last_f = line_ranges(path)[func]
    with open(path) as f:
        lines = f.read().splitlines()[first_f - 1:last_f]
    marks = [i for i, l in enumerate(lines) if l.strip().startswith("# --- ")]
    start = next(i for i in marks if lines[i].strip().startswith(f"# --- {step}."))
    nxt = [i for i in marks if i > start]
    end = nxt[0] - 1 if nxt else len(lines) - 1
    while not lines[end].strip():
        end -= 1
    return first_f + start, first_f + end


def current(root: str, path: str, name: str):
    """(first, last) of `name` (a definition, or func/step) in root/path now."""
    full = os.path.join(root, path)
    return step_range(full, *name.split("/")) if "/" in name else line_ranges(full)[name]


def update(readme: str):
    root = os.path.dirname(os.path.abspath(readme))
    with open(readme) as f:
        text = f.read()

    def fix(m):
        first, last = current(root, m.group(1), m.group(4))
        return f"`{m.group(1)}:{first}-{last}` `{m.group(4)}`"
    with open(readme, "w") as f:
        f.write(REF.sub(fix, text))


def main(argv):
    if argv[:1] == ["--update"]:
        return update(argv[1])
    current_file = None
    for arg in argv:
        if arg.endswith(".py"):
            current_file = arg
            continue
        path, name = arg.split(":") if ":" in arg else (current_file, arg)
        first, last = step_range(path, *name.split("/")) if "/" in name else line_ranges(path)[name]
        print(f"`{path}:{first}-{last}` `{name}`")


if __name__ == "__main__":
    main(sys.argv[1:])
