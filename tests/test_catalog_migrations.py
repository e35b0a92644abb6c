"""The catalog's migrations form one chain: branches merged from parallel work that each
add a revision after the same parent leave two heads, and no server can start."""

from __future__ import annotations

from alembic.config import Config
from alembic.script import ScriptDirectory

from strata.server.catalog.db import MIGRATIONS


def test_the_migrations_have_one_head_and_one_base():
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    scripts = ScriptDirectory.from_config(cfg)
    assert len(scripts.get_heads()) == 1, scripts.get_heads()
    assert len(scripts.get_bases()) == 1, scripts.get_bases()
    chain = list(scripts.walk_revisions())
    assert [s.revision for s in reversed(chain)] == sorted(s.revision for s in chain)
