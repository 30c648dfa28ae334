"""Measure the layout rules of the codebase (and fail when one is broken).

    python tools/structure.py            # report
    python tools/structure.py --check    # report, exit 1 on a violation (the suite runs this)

Rules:
- no function longer than 80 lines in ``decodekit/``, 100 in ``triton_kernels/``;
- no foreign private reach in the library: ``x._name`` where ``x`` is not ``self``/``cls``
  (dunders and module-level names of the package's own modules excepted);
- no bare column numbers into the sampler's packed tables (``iparams[..., 2]``) outside the
  layout module;
- at least four subpackages under ``decodekit/``;
- bench Python under 250 lines per benchmark area, plus as much again for the harness (which
  holds what they share).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"decodekit": 80, "triton_kernels": 100}
TABLES = ("iparams", "fparams")
LAYOUT_MODULE = "layout.py"
BENCH_LINES_PER_AREA = 250
# Private names of other libraries that decodekit has to touch, each with its reason.
THIRD_PARTY_PRIVATE = {
    # transformers' per-forward attention switch: the only way to run a registered attention
    # backend for one forward without re-validating the model (set_attn_implementation)
    "_attn_implementation",
}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.detail}"


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def long_functions(tree: ast.AST, path: str, limit: int) -> list[Violation]:
    """Functions (decorators excluded, docstring included) longer than ``limit`` lines."""
    out = []
    for fn in _functions(tree):
        n = fn.end_lineno - fn.lineno + 1
        if n > limit:
            out.append(Violation(path, fn.lineno, f"function over {limit} lines", f"{fn.name}: {n}"))
    return out


def foreign_private_reaches(tree: ast.AST, path: str) -> list[Violation]:
    """``x._name`` where ``x`` is not ``self``/``cls`` (``super()._x`` counts as own)."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or (name.startswith("__") and name.endswith("__")) \
                or name in THIRD_PARTY_PRIVATE:
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id in ("self", "cls"):
            continue
        if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
            continue
        out.append(Violation(path, node.lineno, "foreign private reach", ast.unparse(node)))
    return out


def bare_table_columns(tree: ast.AST, path: str) -> list[Violation]:
    """Subscripts of the packed sampler tables with an integer literal column."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Subscript):
            continue
        target = node.value
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
        if name not in TABLES:
            continue
        sl = node.slice
        cols = sl.elts[1:] if isinstance(sl, ast.Tuple) else []
        if any(isinstance(c, ast.Constant) and isinstance(c.value, int) for c in cols):
            out.append(Violation(path, node.lineno, "bare table column", ast.unparse(node)))
    return out


def check_source(source: str, path: str, limit: int) -> list[Violation]:
    """Every rule for one library file."""
    tree = ast.parse(source)
    found = long_functions(tree, path, limit) + foreign_private_reaches(tree, path)
    if Path(path).name != LAYOUT_MODULE:
        found += bare_table_columns(tree, path)
    return found


def python_lines(folder: Path) -> int:
    return sum(len(p.read_text("utf-8").splitlines()) for p in folder.rglob("*.py"))


def report(root: Path = ROOT) -> tuple[list[Violation], dict[str, int]]:
    violations: list[Violation] = []
    for pkg, limit in LIMITS.items():
        for p in sorted((root / pkg).rglob("*.py")):
            violations += check_source(p.read_text("utf-8"), str(p.relative_to(root)), limit)
    subpackages = [d for d in (root / "decodekit").iterdir() if (d / "__init__.py").is_file()]
    sizes = {"decodekit lines": python_lines(root / "decodekit"),
             "triton_kernels lines": python_lines(root / "triton_kernels"),
             "bench lines": python_lines(root / "bench"),
             "subpackages": len(subpackages)}
    if sizes["subpackages"] < 4:
        violations.append(Violation("decodekit", 0, "too few subpackages", str(sizes["subpackages"])))
    areas = [f for f in (root / "bench").glob("*.py") if not f.name.startswith("_")]
    limit = BENCH_LINES_PER_AREA * (len(areas) + 1)
    if sizes["bench lines"] >= limit:
        violations.append(Violation("bench", 0, f"bench Python over {limit} lines ({len(areas)} areas)",
                                    str(sizes["bench lines"])))
    return violations, sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a violation")
    args = parser.parse_args(argv)
    violations, sizes = report()
    for k, v in sizes.items():
        print(f"{k}: {v}")
    longest = []
    for pkg in LIMITS:
        for p in (ROOT / pkg).rglob("*.py"):
            for fn in _functions(ast.parse(p.read_text("utf-8"))):
                longest.append((fn.end_lineno - fn.lineno + 1, f"{p.relative_to(ROOT)}:{fn.name}"))
    print("longest functions:", ", ".join(f"{name} {n}" for n, name in sorted(longest, reverse=True)[:5]))
    for v in violations:
        print(v)
    print(f"{len(violations)} violation(s)")
    return 1 if args.check and violations else 0


if __name__ == "__main__":
    sys.exit(main())
