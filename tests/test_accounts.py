"""Account databases merged by key (strata.layers.accounts): named cases for each rule,
and properties over generated account sets."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from strata.layers.accounts import (
    GROUP,
    GSHADOW,
    PASSWD,
    SHADOW,
    SUBUID,
    AccountsUnmergeable,
    Format,
    merge_database,
)
from tier import examples


def db(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


ROOT = "root:x:0:0:root:/root:/bin/bash"
DAEMON = "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin"
GAMES = "games:x:5:60:games:/usr/games:/usr/sbin/nologin"
ALICE = "alice:x:1000:1000:Alice Doe,,,:/home/alice:/bin/bash"
CHRONY = "_chrony:x:100:102:Chrony daemon:/var/lib/chrony:/usr/sbin/nologin"
OLD_PASSWD = db(ROOT, DAEMON, GAMES)

CASES = [
    pytest.param(PASSWD, OLD_PASSWD, db(ROOT, DAEMON, GAMES, ALICE),
                 db(ROOT, DAEMON, GAMES, CHRONY),
                 db(ROOT, DAEMON, GAMES, CHRONY, ALICE),
                 id="endpoint-account-survives-and-new-system-account-arrives"),
    pytest.param(PASSWD, OLD_PASSWD, db(ROOT, DAEMON, GAMES),
                 db(ROOT, "daemon:x:1:1:daemon:/usr/sbin:/bin/false", GAMES),
                 db(ROOT, "daemon:x:1:1:daemon:/usr/sbin:/bin/false", GAMES),
                 id="untouched-record-takes-the-new-version"),
    pytest.param(PASSWD, OLD_PASSWD, db(ROOT, DAEMON, GAMES), db(ROOT, DAEMON),
                 db(ROOT, DAEMON), id="untouched-record-the-new-base-dropped-goes"),
    pytest.param(PASSWD, OLD_PASSWD,
                 db(ROOT, DAEMON, "games:x:5:60:Games (kept):/usr/games:/bin/sh"),
                 db(ROOT, DAEMON),
                 db(ROOT, DAEMON, "games:x:5:60:Games (kept):/usr/games:/bin/sh"),
                 id="changed-record-the-new-base-dropped-stays"),
    pytest.param(PASSWD, OLD_PASSWD, db("root:x:0:0:root:/root:/bin/zsh", DAEMON, GAMES),
                 db("root:x:0:0:root:/var/root:/bin/bash", DAEMON, GAMES),
                 db("root:x:0:0:root:/var/root:/bin/zsh", DAEMON, GAMES),
                 id="endpoint-shell-kept-and-base-home-applied"),
    pytest.param(PASSWD, OLD_PASSWD, db(ROOT, "daemon:x:1:1:Local name:/srv/d:/bin/sh", GAMES),
                 db(ROOT, DAEMON, GAMES),
                 db(ROOT, "daemon:x:1:1:Local name:/usr/sbin:/bin/sh", GAMES),
                 id="home-is-the-base-business-even-when-changed-locally"),
    pytest.param(PASSWD, OLD_PASSWD, db(ROOT, DAEMON, GAMES),
                 db(ROOT, "daemon:x:2:2:daemon:/usr/sbin:/usr/sbin/nologin", GAMES),
                 db(ROOT, "daemon:x:2:2:daemon:/usr/sbin:/usr/sbin/nologin", GAMES),
                 id="base-renumbers-its-own-untouched-account"),
    pytest.param(PASSWD, None, db("root:x:0:0:root:/root:/bin/zsh", DAEMON, GAMES, ALICE),
                 db(ROOT, DAEMON, CHRONY),
                 db("root:x:0:0:root:/root:/bin/zsh", DAEMON, CHRONY, GAMES, ALICE),
                 id="two-way-keeps-every-local-record-and-local-fields"),
    pytest.param(PASSWD, OLD_PASSWD, db(ROOT, DAEMON, GAMES, ALICE, "+::::::"),
                 db("# system accounts", ROOT, DAEMON, GAMES, CHRONY),
                 db("# system accounts", ROOT, DAEMON, GAMES, CHRONY, ALICE, "+::::::"),
                 id="base-comments-kept-and-nis-compat-last"),
    pytest.param(SHADOW, db("root:*:19000:0:99999:7:::", "daemon:*:19000:0:99999:7:::"),
                 db("root:$y$j9T$abc:19500:0:99999:7:::", "daemon:*:19000:0:99999:7:::",
                    "alice:$y$j9T$xyz:19600:0:99999:7:::"),
                 db("root:*:19800:0:99999:7:::", "daemon:*:19800:0:99999:7:::",
                    "_chrony:!:19800::::::"),
                 db("root:$y$j9T$abc:19500:0:99999:7:::", "daemon:*:19800:0:99999:7:::",
                    "_chrony:!:19800::::::", "alice:$y$j9T$xyz:19600:0:99999:7:::"),
                 id="shadow-endpoint-password-hash-kept"),
    pytest.param(GROUP, db("root:x:0:", "sudo:x:27:ubuntu", "users:x:100:"),
                 db("root:x:0:", "sudo:x:27:alice", "users:x:100:alice", "alice:x:1000:"),
                 db("root:x:0:", "sudo:x:27:ubuntu,admin", "users:x:100:",
                    "_chrony:x:102:"),
                 db("root:x:0:", "sudo:x:27:admin,alice", "users:x:100:alice", "_chrony:x:102:",
                    "alice:x:1000:"),
                 id="group-members-added-kept-removed-honoured"),
    pytest.param(GROUP, None, db("root:x:0:", "sudo:x:27:alice"),
                 db("root:x:0:", "sudo:x:27:ubuntu"),
                 db("root:x:0:", "sudo:x:27:ubuntu,alice"),
                 id="group-two-way-members-union"),
    pytest.param(GSHADOW, db("sudo:*::"), db("sudo:*:alice:alice", "alice:!::"),
                 db("sudo:*::ops"), db("sudo:*:alice:ops,alice", "alice:!::"),
                 id="gshadow-administrators-and-members-merge"),
    pytest.param(SUBUID, db("ubuntu:100000:65536"), db("ubuntu:100000:65536", "alice:165536:65536"),
                 db("ubuntu:100000:65536"), db("ubuntu:100000:65536", "alice:165536:65536"),
                 id="subuid-endpoint-range-kept"),
    pytest.param(SUBUID, db("ubuntu:100000:65536"), db("ubuntu:100000:65536"), db(),
                 db(), id="subuid-untouched-range-dropped-with-the-base"),
]


@pytest.mark.parametrize(("fmt", "old", "endpoint", "new", "expect"), CASES)
def test_merge_cases(fmt: Format, old: bytes | None, endpoint: bytes, new: bytes,
                     expect: bytes) -> None:
    result = merge_database(fmt, old, endpoint, new)
    assert not result.clashes, result.clashes
    assert result.content.decode() == expect.decode()


CLASHES = [
    pytest.param(PASSWD, OLD_PASSWD, db(ROOT, DAEMON, GAMES, ALICE),
                 db(ROOT, DAEMON, GAMES, "newsvc:x:1000:1000::/nonexistent:/bin/false"),
                 ["passwd: uid 1000 is the endpoint's alice and the new base's newsvc"],
                 id="new-system-account-takes-a-local-uid"),
    pytest.param(PASSWD, OLD_PASSWD, db(ROOT, DAEMON, GAMES, ALICE),
                 db(ROOT, DAEMON, GAMES, "alice:x:1001:1001::/home/alice:/bin/bash"),
                 ["passwd: name alice is the endpoint's alice (uid 1000) and the new base's "
                  "alice (uid 1001)"], id="same-name-other-uid"),
    pytest.param(PASSWD, OLD_PASSWD, db(ROOT, "daemon:x:7:1:daemon:/usr/sbin:/bin/false", GAMES),
                 db(ROOT, "daemon:x:2:2:daemon:/usr/sbin:/usr/sbin/nologin", GAMES),
                 ["passwd: name daemon is the endpoint's daemon (uid 7) and the new base's "
                  "daemon (uid 2)"], id="both-renumbered-one-account"),
    pytest.param(GROUP, db("root:x:0:"), db("root:x:0:", "alice:x:1000:"),
                 db("root:x:0:", "docker:x:1000:"),
                 ["group: gid 1000 is the endpoint's alice and the new base's docker"],
                 id="new-system-group-takes-a-local-gid"),
    pytest.param(SUBUID, db(), db("alice:100000:65536"), db("ubuntu:100000:65536"),
                 ["subuid: range 100000-165535 is the endpoint's alice and the new base's "
                  "ubuntu (100000-165535)"], id="subordinate-ranges-overlap"),
    pytest.param(PASSWD, None, db(ROOT, GAMES), db(ROOT, "newsvc:x:5:5::/:/bin/false"),
                 ["passwd: uid 5 is the endpoint's games and the new base's newsvc"],
                 id="two-way-cannot-tell-a-dropped-account-so-it-clashes"),
]


@pytest.mark.parametrize(("fmt", "old", "endpoint", "new", "expect"), CLASHES)
def test_clashes_are_reported_with_names_and_ids(fmt: Format, old: bytes | None,
                                                  endpoint: bytes, new: bytes,
                                                  expect: list[str]) -> None:
    assert [str(c) for c in merge_database(fmt, old, endpoint, new).clashes] == expect


def test_accounts_that_already_shared_an_id_are_not_a_new_clash():
    both = db(ROOT, "toor:x:0:0:second root:/root:/bin/sh")
    assert not merge_database(PASSWD, None, both, db(ROOT)).clashes


@pytest.mark.parametrize(("data", "needle"), [
    (db(ROOT, "alice:x:1000:1000::/home/alice"), "line 2: 6 fields, expected 7"),
    (db(ROOT, ALICE, ALICE), "alice is named twice"),
    (db(ROOT, "bob:x:10a:1::/:/bin/sh"), "uid '10a' is not a number"),
    (db(ROOT, ":x:1:1::/:/bin/sh"), "line 2: no name"),
])
def test_malformed_databases_are_refused_with_the_line(data: bytes, needle: str) -> None:
    with pytest.raises(AccountsUnmergeable, match=needle):
        merge_database(PASSWD, OLD_PASSWD, data, OLD_PASSWD)


def test_a_database_beyond_the_size_bound_is_refused():
    with pytest.raises(AccountsUnmergeable, match="more than"):
        merge_database(SUBUID, None, b"a:1:1\n" * (3 << 20), db())


def test_crlf_and_missing_final_newline_are_read():
    result = merge_database(PASSWD, None, (ROOT + "\r\n" + ALICE).encode(), db(ROOT))
    assert result.content == db(ROOT, ALICE)


# -- properties --------------------------------------------------------------------------------

NAMES = st.text("abcdefghij", min_size=1, max_size=6)


def passwd_line(name: str, uid: int, shell: str = "/bin/sh", gecos: str = "") -> str:
    return f"{name}:x:{uid}:{uid}:{gecos}:/home/{name}:{shell}"


# The strategies three_copies draws from, made once: a strategy made inside a draw (one
# sampling these names) is made and checked again at every example, which cost hypothesis
# more than the drawing.
_SYSTEM = st.lists(NAMES, min_size=1, max_size=12, unique=True)
_SYSTEM_UIDS = st.lists(st.integers(0, 999), min_size=12, max_size=12, unique=True)
_PICKS = [st.lists(st.integers(0, 11), max_size=n) for n in range(4)]  # names, mod their number
_SHELL = st.sampled_from(["/bin/bash", "/bin/zsh"])
_LOCAL = st.lists(NAMES.map(lambda s: "u" + s), max_size=5, unique=True)
_LOCAL_UIDS = st.lists(st.integers(1000, 1100), min_size=5, max_size=5, unique=True)
_EXTRA = st.lists(NAMES.map(lambda s: "s" + s), max_size=4, unique=True)


@st.composite
def three_copies(draw: st.DrawFn) -> tuple[dict, dict, dict]:
    """O: system accounts (uid < 1000); E: O with some records changed or deleted and
    local accounts added (uid >= 1000); N: O with some dropped, changed, or added (uid
    < 1000), never reusing a uid E holds. name -> (uid, shell, gecos)."""
    names = draw(_SYSTEM)
    uids = draw(_SYSTEM_UIDS)

    def some(most: int) -> list[str]:
        return [names[i % len(names)] for i in draw(_PICKS[most])]

    old = {n: (u, "/usr/sbin/nologin", "") for n, u in zip(names, uids, strict=False)}
    endpoint = dict(old)
    for n in some(3):
        endpoint[n] = (old[n][0], draw(_SHELL), "local")
    for n in some(2):
        endpoint.pop(n, None)
    local = draw(_LOCAL)
    for n, u in zip(local, draw(_LOCAL_UIDS), strict=False):
        if n not in old:
            endpoint[n] = (u, "/bin/bash", "Local User")
    new = dict(old)
    for n in some(3):
        new.pop(n, None)
    for n in some(3):
        if n in new:
            new[n] = (new[n][0], "/bin/false", "changed by the base")
    used = {u for u, _, _ in endpoint.values()} | {u for u, _, _ in old.values()}
    extra = draw(_EXTRA)
    free = [u for u in range(1, 1000) if u not in used]
    for n, u in zip(extra, free, strict=False):
        if n not in old and n not in endpoint:
            new[n] = (u, "/usr/sbin/nologin", "")
    return old, endpoint, new


def render(accounts: dict) -> bytes:
    return db(*(passwd_line(n, u, sh, g) for n, (u, sh, g) in accounts.items()))


def parsed(content: bytes) -> list[list[str]]:
    return [line.split(":") for line in content.decode().splitlines()]


@settings(max_examples=examples(300), deadline=None)
@given(three_copies())
def test_properties_of_a_three_way_merge(copies):
    old, endpoint, new = copies
    result = merge_database(PASSWD, render(old), render(endpoint), render(new))
    assert not result.clashes, result.clashes
    rows = parsed(result.content)
    names = [r[0] for r in rows]
    out = {r[0]: r for r in rows}
    assert len(names) == len(set(names)), "duplicate names"
    assert len({r[2] for r in rows}) == len(rows), "duplicate uids"
    assert set(new) <= set(out), "a new base account is missing"
    assert set(endpoint) - set(old) <= set(out), "an account the endpoint added is gone"
    for n, rec in endpoint.items():
        if old.get(n) == rec:  # untouched by the endpoint: the new base decides
            if n in new:
                assert out[n] == passwd_line(n, *new[n]).split(":")
            else:
                assert n not in out
        elif n in old and n in new:  # changed locally: the shell is the endpoint's
            assert out[n][6] == rec[1] and out[n][2] == str(new[n][0])


@settings(max_examples=examples(200), deadline=None)
@given(three_copies())
def test_properties_of_a_two_way_merge(copies):
    _, endpoint, new = copies
    result = merge_database(PASSWD, None, render(endpoint), render(new))
    assume(not result.clashes)  # two-way keeps what N dropped, which may clash by design
    out = {r[0]: r for r in parsed(result.content)}
    assert set(new) | set(endpoint) == set(out)


@settings(max_examples=examples(200), deadline=None)
@given(three_copies(), st.data())
def test_a_new_account_on_a_local_uid_is_always_a_clash(copies, data):
    old, endpoint, new = copies
    local = [n for n in endpoint if n not in old]
    assume(local)
    victim = local[data.draw(st.integers(0, 15)) % len(local)]
    new = {**new, "zz-intruder": (endpoint[victim][0], "/bin/false", "")}
    clashes = merge_database(PASSWD, render(old), render(endpoint), render(new)).clashes
    assert any(c.what == f"uid {endpoint[victim][0]}" and c.endpoint == victim
               and c.base == "zz-intruder" for c in clashes), clashes


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(NAMES, max_size=6, unique=True), st.lists(NAMES, max_size=6, unique=True),
       st.lists(NAMES, max_size=6, unique=True))
def test_group_members_three_way(o, e, n):
    result = merge_database(GROUP, db(f"g:x:10:{','.join(o)}"), db(f"g:x:10:{','.join(e)}"),
                            db(f"g:x:10:{','.join(n)}"))
    members = set(filter(None, parsed(result.content)[0][3].split(",")))
    assert members == (set(n) - (set(o) - set(e))) | (set(e) - set(o))
