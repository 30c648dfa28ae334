"""The layout rules (tools/structure.py): checked on the codebase, and each checker shown to
catch a violation it is written for (negative controls)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("structure", REPO / "tools" / "structure.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["structure"] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def test_codebase_follows_the_layout_rules():
    proc = subprocess.run([sys.executable, "tools/structure.py", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 violation(s)" in proc.stdout


def test_checkers_catch_violations():
    S = _tool()
    long_fn = "def f():\n" + "    x = 1\n" * 85
    assert [v.rule for v in S.check_source(long_fn, "m.py", 80)] == ["function over 80 lines"]
    assert S.check_source(long_fn, "m.py", 100) == []
    reach = "def f(gen):\n    return gen._forward(1)\n"
    assert [v.detail for v in S.check_source(reach, "m.py", 80)] == ["gen._forward"]
    own = "class A:\n    def f(self):\n        return self._x + super()._y() + len.__name__\n"
    assert S.check_source(own, "m.py", 80) == []
    column = "def f(sp, idx):\n    return sp.iparams[idx, 2]\n"
    assert [v.rule for v in S.check_source(column, "m.py", 80)] == ["bare table column"]
    assert S.check_source(column, "layout.py", 80) == []
    named = "def f(sp, idx, I_NGEN):\n    return sp.iparams[idx, I_NGEN]\n"
    assert S.check_source(named, "m.py", 80) == []
