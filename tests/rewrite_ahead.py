"""`python tests/rewrite_ahead.py`: the test modules' bytecode, written ahead, before the
test workers start. Each worker imports every test module; pytest rewrites a test
module's asserts as it imports it and keeps the result in __pycache__, and Python does
the same for the helper modules: without this, the workers would all do it at once
(20 s of CPU on a fresh clone). A `pytest --collect-only` run did it before, but it
executed every module to do so (5 s of CPU); this only parses and compiles them (1 s).

It uses pytest's own rewriting (`_pytest.assertion.rewrite`, private: pytest is pinned in
pyproject.toml) with no configuration, as pytest does when `enable_assertion_pass_hook` is
not set; pytest checks a rewritten module's source hash before it uses it, and rewrites
anything this got wrong or left out.
"""

from __future__ import annotations

import py_compile
from pathlib import Path

from _pytest.assertion import rewrite

TESTS = Path(__file__).resolve().parent


class _Quiet:
    def trace(self, _message: str) -> None:
        pass


def main() -> None:
    for fn in sorted(TESTS.glob("*.py")):
        if fn.name.startswith("test_") or fn.name == "conftest.py":  # what pytest rewrites
            pyc = rewrite.get_cache_dir(fn) / (fn.name[:-3] + rewrite.PYC_TAIL)
            if rewrite._read_pyc(fn, pyc) is None and rewrite.try_makedirs(pyc.parent):
                source_hash, code = rewrite._rewrite_test(fn, None)  # type: ignore[arg-type]
                rewrite._write_pyc(_Quiet(), code, source_hash, pyc)  # type: ignore[arg-type]
        else:
            py_compile.compile(str(fn), doraise=True)


if __name__ == "__main__":
    main()
