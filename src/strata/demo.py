"""`make demo`: a sample endpoint backed up twice into a store, then browsed and restored.

It runs the real `strata …` commands, echoing each one, so the transcript doubles as a
tour of the CLI; each in its own process, forked from this one once it has imported the
CLI (an exec of `strata` would spend half a second importing it again for each). The
server serves HTTPS on loopback with its self-signed certificate, and every command pins
that certificate's fingerprint, as a real deployment's do.

`STRATA_DEMO_SMALL=1` makes the same tour with two endpoints and a few MiB of data instead
of three and about a hundred (the README walk, tests/test_readme_walk.py, runs it so).
"""

from __future__ import annotations

import os
import random
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

SMALL = bool(os.environ.get("STRATA_DEMO_SMALL"))
WORDS = ("quarterly budget endpoint layer driver image snapshot restore policy laptop "
         "office travel invoice meeting roadmap customer support network update").split()


def run(*args: str, quiet: bool = False, codes: tuple[int, ...] = (0,),
        progress: bool = False) -> str:
    """Run a strata command, echoing it; its output too unless `quiet`. An exit code
    outside `codes` stops the demo (compliance exits 1 when it finds drift). `progress`:
    its bar (with an ETA) is drawn on the terminal, for the waits of more than a moment."""
    cmd = ["strata", *args]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    env = dict(os.environ)
    if not progress:
        env["STRATA_NO_PROGRESS"] = "1"
    code, out = _forked_strata(list(args), env)
    if code not in codes:
        raise subprocess.CalledProcessError(code, cmd, out)
    if not quiet:
        print(out, end="", flush=True)
    return out


def _forked_strata(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """(exit code, standard output) of `strata ARGS`, run in a child forked from this
    process: its own process, environment and exit code, as an exec of the `strata`
    command gives, without each of the tour's commands spending half a second of CPU
    importing the same modules again (the small tour: 32 CPU s with an exec each, 17.7
    forked)."""
    from strata.cli.main import import_commands

    import_commands()  # once: the modules are then in every child
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the demo
        code = 1
        try:
            os.close(read_end)
            os.dup2(write_end, 1)
            os.close(write_end)
            os.environ.clear()
            os.environ.update(env)
            sys.argv = ["strata", *args]
            from strata.cli.main import main_status

            code = main_status()
        except BaseException:  # in the set-up above
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode()


def document(rng: random.Random, paragraphs: int) -> str:
    return "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120)))
                       for _ in range(paragraphs))


def build_endpoint(root: Path) -> None:
    """A small machine: an OS part copied from this host, identity, and a user's files."""
    rng = random.Random(7)
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("laptop-042\n")
    (root / "etc/machine-id").write_text(f"{rng.getrandbits(128):032x}\n")
    for name in ("os-release", "passwd", "group", "services"):
        src = Path("/etc") / name
        if src.is_file():
            shutil.copy2(src, root / "etc" / name)
    usr = root / "usr/share/doc"
    usr.mkdir(parents=True)
    for pkg in sorted(Path("/usr/share/doc").iterdir())[:8 if SMALL else 60]:
        if pkg.is_dir():
            shutil.copytree(pkg, usr / pkg.name, symlinks=True)
    (root / "usr/bin").mkdir()
    for tool in ("ls", "cp", "tar", "gzip"):
        if Path("/usr/bin", tool).is_file():
            shutil.copy2(Path("/usr/bin", tool), root / "usr/bin" / tool)
    docs = root / "home/alice/Documents"
    docs.mkdir(parents=True)
    for i in range(12):
        (docs / f"report-{i:02d}.txt").write_text(document(rng, 30))
    photo = rng.randbytes((3 << 20) >> (3 if SMALL else 0))  # incompressible
    (docs / "photo.raw").write_bytes(photo)
    shutil.copy2(docs / "report-00.txt", root / "home/alice/report-copy.txt")  # a duplicate
    os.link(docs / "report-01.txt", root / "home/alice/report-hardlink.txt")
    os.symlink("Documents/report-02.txt", root / "home/alice/latest-report")
    (root / "home/alice/empty.txt").touch()
    with open(root / "home/alice/disk.img", "wb") as f:  # a sparse file
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"boot sector")
    (root / "var/cache/apt").mkdir(parents=True)
    (root / "var/cache/apt/pkgcache.bin").write_bytes(rng.randbytes(1 << 20))


def change_endpoint(root: Path) -> None:
    rng = random.Random(8)
    docs = root / "home/alice/Documents"
    with open(docs / "report-03.txt", "a") as f:
        f.write("\n\nAddendum: " + document(rng, 2))
    (docs / "report-04.txt").unlink()
    (docs / "notes-new.txt").write_text(document(rng, 10))


def same_tree(a: Path, b: Path) -> list[str]:
    """Differences between two trees (contents, links, modes): empty when identical."""
    problems = []
    for dirpath, dirs, files in os.walk(a):
        for name in dirs + files:
            pa = Path(dirpath, name)
            pb = b / pa.relative_to(a)
            sa, sb = pa.lstat(), pb.lstat() if os.path.lexists(pb) else None
            if sb is None:
                problems.append(f"missing {pb}")
            elif sa.st_mode != sb.st_mode or int(sa.st_mtime) != int(sb.st_mtime):
                problems.append(f"metadata differs: {pb}")
            elif pa.is_symlink():
                if os.readlink(pa) != os.readlink(pb):
                    problems.append(f"link differs: {pb}")
            elif pa.is_file() and pa.read_bytes() != pb.read_bytes():
                problems.append(f"content differs: {pb}")
    return problems


def store_tour(work: Path) -> None:
    """The store on its own: two backups of one endpoint, browse, diff, restore, check."""
    endpoint, store, restored = work / "endpoint", work / "store", work / "restored"
    print(f"Building a sample endpoint in {endpoint} ...")
    build_endpoint(endpoint)
    run("store", "init", str(store))
    run("store", "backup", str(store), str(endpoint), "--tag", "first", "--exclude",
        "/var/cache")
    print("\n# The user edits a report, deletes one and writes a new one.")
    change_endpoint(endpoint)
    run("store", "backup", str(store), str(endpoint), "--tag", "second", "--exclude",
        "/var/cache")
    run("store", "snapshots", str(store))
    run("store", "diff", str(store), *_ids(store)[-2:])
    run("store", "ls", str(store), "latest", "home/alice")
    run("store", "stats", str(store))
    run("store", "restore", str(store), "latest", str(restored))
    problems = same_tree(endpoint / "home", restored / "home") + \
        same_tree(endpoint / "usr", restored / "usr")
    blocks = os.stat(restored / "home/alice/disk.img").st_blocks * 512
    print(f"\nrestored tree identical to the endpoint: {'yes' if not problems else 'NO'}"
          f"; sparse disk.img uses {blocks // 1024} KiB on disk for 64 MiB")
    for p in problems[:10]:
        print("  ", p)
    run("store", "check", str(store), "--read-data")
    print(f"\nEverything is in {work}; try `strata store --help`.")
    if problems:
        sys.exit(1)


def build_fleet_endpoint(root: Path, name: str, seed: int, shared: Path) -> int:
    """An endpoint: the shared OS part, company documents, and this user's own files.
    Returns the bytes of the user's own files."""
    shutil.copytree(shared, root, symlinks=True)
    (root / "etc/hostname").write_text(f"{name}\n")
    (root / "etc/machine-id").write_text(f"{random.Random(seed).getrandbits(128):032x}\n")
    rng = random.Random(seed)
    home = root / "home" / name / "Documents"
    home.mkdir(parents=True)
    own = 0
    for i in range(8):
        text = document(rng, 25)
        (home / f"{name}-notes-{i}.txt").write_text(text)
        own += len(text)
    blob = rng.randbytes((2 << 20) >> (3 if SMALL else 0))  # a photo: only this user's
    (home / "photo.jpg").write_bytes(blob)
    return own + len(blob)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_administrator(work: Path, admin: Path) -> str:
    """A console account for the demo (random password, kept beside the demo's data)."""
    password = secrets.token_urlsafe(12)
    pw_file = work / "demo-admin.password"
    pw_file.write_text(password + "\n")
    pw_file.chmod(0o600)
    run("user", "create", "demo-admin", "--role", "administrator", "--password-file",
        str(pw_file), "--admin-token-file", str(admin))
    return f"sign in as demo-admin, password {password}"


def demo_portal_user(work: Path, admin: Path) -> str:
    """bob's file portal account: his own folder in his own laptop's snapshots."""
    password = secrets.token_urlsafe(12)
    pw_file = work / "portal-bob.password"
    pw_file.write_text(password + "\n")
    pw_file.chmod(0o600)
    run("portal", "add", _endpoint_id(work, "bob"), "bob", "--password-file", str(pw_file),
        "--admin-token-file", str(admin))
    return f"sign in as bob, password {password}"


def fleet(work: Path) -> None:
    """A server, three endpoints that share an OS and company documents, centralized."""
    import json
    import ssl
    import time
    import urllib.request

    from strata.transport import certificate_file_fingerprint

    exe = str(Path(sys.executable).with_name("strata"))
    port = int(os.environ.get("STRATA_DEMO_PORT", "0")) or free_port()
    url = f"https://127.0.0.1:{port}"
    data = work / "server"
    print(f"$ strata server --data {data} --listen 127.0.0.1:{port} --tls &", flush=True)
    server = subprocess.Popen([exe, "server", "--data", str(data), "--listen",
                               f"127.0.0.1:{port}", "--tls"],
                              env={**os.environ, "STRATA_NO_PROGRESS": "1"},
                              # Its own session: a Ctrl-C reaches the demo alone, which then
                              # stops the server (else both raced for the same signal and the
                              # demo could miss it while waiting on the server).
                              start_new_session=True)
    try:
        cert = data / "tls" / "cert.pem"
        liveness = ssl.create_default_context()
        liveness.check_hostname, liveness.verify_mode = False, ssl.CERT_NONE
        for _ in range(300):
            try:  # its certificate, made at this first start, is checked below
                urllib.request.urlopen(url + "/api/v1/health", timeout=1, context=liveness)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"error: the server exited with {server.returncode}")
                time.sleep(0.1)
        tls = ssl.create_default_context(cafile=str(cert))
        tls_fp = certificate_file_fingerprint(cert)
        admin = data / "admin.token"
        # Every command below pins the server's certificate, as the README's commands do.
        os.environ.update(STRATA_SERVER=url, STRATA_SERVER_FINGERPRINT=tls_fp)
        console = demo_administrator(work, admin)
        print(f"\n# The web console is at {url}/ : {console}", flush=True)
        token = run("token", "create", "--uses", "3", "--admin-token-file", str(admin)).strip()
        token_file = work / "enroll.token"  # agents read it there: a token in argv shows in ps
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        print("\n# The image manager sets layer signing up (keys kept off the server): agents "
              "take only\n# layers and assignments signed with them, and pin the root's "
              "fingerprint at enrollment.")
        keys, passphrase = work / "signing-keys", work / "signing-passphrase"
        passphrase.write_text("demo passphrase, use a real one\n")
        passphrase.chmod(0o600)
        fingerprint = json.loads(run("signing", "init", "--keys", str(keys), "--passphrase-file",
                                     str(passphrase), "--admin-token-file", str(admin),
                                     "--json"))["fingerprint"]
        # From here on every layer command signs with them (`--keys DIR` does the same).
        os.environ.update(STRATA_SIGNING_KEYS=str(keys),
                          STRATA_SIGNING_PASSPHRASE_FILE=str(passphrase))
        shared = work / "os-image"
        build_endpoint(shared)
        shutil.rmtree(shared / "home")
        shutil.rmtree(shared / "var/cache")
        company = shared / "srv/company"
        company.mkdir(parents=True)
        rng = random.Random(99)
        for i in range(10):
            (company / f"policy-{i}.txt").write_text(document(rng, 40))
        rows = []
        names = ("alice", "bob") if SMALL else ("alice", "bob", "carol")
        for i, name in enumerate(names):
            root = work / "endpoints" / name
            own = build_fleet_endpoint(root, name, 100 + i, shared)
            state = work / "agents" / name
            run("agent", "enroll", "--token-file", str(token_file), "--server-fingerprint",
                tls_fp, "--root", str(root), "--state", str(state), "--root-fingerprint",
                fingerprint)
            out = json.loads(run("agent", "run", "--once", "--state", str(state), "--json",
                                 quiet=True))
            r = out["result"]
            rows.append((name, r["bytes_total"], own, r["bytes_new"], r["bytes_sent"]))
        print("\nWhat each endpoint sent (the OS and company documents travel once):")
        print(f"{'endpoint':10} {'tree':>10} {'own data':>10} {'new to server':>14} "
              f"{'on the wire':>12}")
        for name, total, own, new, sent in rows:
            print(f"{name:10} {total / 2**20:9.1f}M {own / 2**20:9.1f}M {new / 2**20:13.1f}M "
                  f"{sent / 2**20:11.2f}M  ({100 * sent / total:.1f}% of its tree)")
        print("\n# alice edits a document and backs up; only the change travels.")
        note = work / "endpoints/alice/home/alice/Documents/alice-notes-0.txt"
        note.write_text(note.read_text() + "\nOne more line.\n")
        run("agent", "backup", "--state", str(work / "agents/alice"))
        print("# bob deletes a file by mistake and restores it from his last snapshot.")
        lost = work / "endpoints/bob/home/bob/Documents/bob-notes-3.txt"
        lost.unlink()
        run("agent", "restore", "home/bob/Documents/bob-notes-3.txt", "--state",
            str(work / "agents/bob"))
        print(f"restored: {lost.exists()}")
        run("endpoint", "list", "--admin-token-file", str(admin))
        print("\n# The help desk gives bob his own files on the web (the file portal).")
        portal = demo_portal_user(work, admin)
        layer_tour(work, shared, admin, names)
        req = urllib.request.Request(url + "/api/v1/admin/stats",
                                     headers={"Authorization": "Bearer "
                                              + admin.read_text().strip()})
        stats = json.load(urllib.request.urlopen(req, context=tls))
        print(f"\nserver store: {stats['logical_bytes'] / 2**20:.1f} MiB in "
              f"{stats['snapshots']} snapshots kept in {stats['stored_bytes'] / 2**20:.1f} MiB: "
              f"dedup {stats['dedup_ratio']:.1f}x, compression {stats['compression_ratio']:.1f}x,"
              f" total saving {stats['space_saving_ratio']:.1f}x")
        print(f"\nThe server keeps serving at {url} (admin token in {admin}; its certificate's"
              f" fingerprint (SHA-256) is {tls_fp}: your browser asks once about this "
              "self-signed certificate).")
        print(f"Console: {url}/ ({console})")
        print(f"File portal: {url}/portal ({portal})")
        print(f"Try: STRATA_SERVER={url} STRATA_SERVER_FINGERPRINT={tls_fp} strata endpoint "
              f"list --admin-token-file {admin}")
        if os.environ.get("STRATA_DEMO_EXIT"):
            return
        print("Ctrl-C to stop.", flush=True)
        server.wait()
    except KeyboardInterrupt:
        print("\nstopping the server", flush=True)
    finally:
        server.terminate()
        server.wait()


def layer_tour(work: Path, image: Path, admin: Path, names: tuple[str, ...]) -> None:
    """Single image management: capture the OS image as base layer v1, build v2 (a new
    package and an updated tool), push it to the fleet, apply, check compliance."""
    import json

    tok = ["--admin-token-file", str(admin)]
    print("\n# IT captures the reference machine's system as base layer corp-os:1.")
    run("layer", "capture", "--kind", "base", "--name", "corp-os", "--version", "1",
        "--from-dir", str(image), *tok)
    run("assign", "--all", "--base", "corp-os:1", *tok)
    for name in names:
        run("agent", "run", "--once", "--state", str(work / "agents" / name), quiet=True)
    v2 = work / "os-image-v2"
    shutil.copytree(image, v2, symlinks=True)
    pkg = v2 / "usr/lib/newpkg"
    pkg.mkdir(parents=True)
    added, budget = 0, (256 << 10) if SMALL else (4 << 20)
    for src in sorted(Path("/usr/lib/x86_64-linux-gnu").glob("*.so*"))[:40]:
        if SMALL and src.is_file() and added + src.stat().st_size > budget:
            continue  # a budget, not a floor: one big library would be most of it
        if src.is_file() and not src.is_symlink() and added < budget:
            shutil.copy2(src, pkg / src.name)
            added += src.stat().st_size
    (v2 / "usr/bin/corp-update").write_text("#!/bin/sh\necho corp-os 2\n")
    (v2 / "etc/os-release").write_text('PRETTY_NAME="Corp OS 2"\nVERSION_ID="2"\n')
    print(f"\n# IT builds corp-os:2: a new package ({added / 2**20:.1f} MiB) and a tool.")
    run("layer", "capture", "--kind", "base", "--name", "corp-os", "--version", "2",
        "--from-dir", str(v2), *tok)
    run("layer", "list", *tok)
    run("layer", "dry-run", "--endpoint", _endpoint_id(work, names[0]), "--base",
        "corp-os:2", *tok)
    run("assign", "--all", "--base", "corp-os:2", *tok)
    print("\n# Each agent checks in, downloads in the background only what it lacks, and "
          "reports ready.\n# (The first one takes a minute or two while the server "
          "compresses this batch once, hard, and sends it as it goes: its bar shows the "
          "ETA;\n# the others get the same bytes at once.)", flush=True)
    got = {}
    for name in names:
        state = work / "agents" / name
        run("agent", "run", "--once", "--state", str(state), quiet=True, progress=True)
        got[name] = json.loads((state / "update.json").read_text())["downloaded"]
    run("endpoint", "list", *tok)
    print("# At restart each agent applies: pre-update snapshot, then a journaled switch.")
    for name in names:
        run("agent", "apply", "--state", str(work / "agents" / name), progress=True)
    run("endpoint", "list", *tok)
    for name in names:
        print(f"{name}: downloaded {got[name] / 2**20:.2f} MiB for a "
              f"{added / 2**20:.1f} MiB package; user files kept: "
              f"{(work / 'endpoints' / name / 'home' / name / 'Documents/photo.jpg').exists()}")
    run("compliance", *tok, codes=(0, 1))


def _endpoint_id(work: Path, name: str) -> str:
    import json
    return json.loads((work / "agents" / name / "credential.json").read_text())["endpoint_id"]


def main() -> None:
    work = Path(os.environ.get("STRATA_DEMO_DIR", "demo-work")).resolve()
    # The transcript's tables at 110 columns: the CLI's consoles read it when imported.
    os.environ["COLUMNS"] = "110"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if "--store" in sys.argv:
        store_tour(work)
    else:
        fleet(work)


def _ids(store: Path) -> list[str]:
    import json

    code, out = _forked_strata(["store", "snapshots", str(store), "--json"], dict(os.environ))
    if code:
        raise subprocess.CalledProcessError(code, ["strata", "store", "snapshots"], out)
    return [s["id"][:8] for s in json.loads(out)]


if __name__ == "__main__":
    main()
