"""Layer rules: which of the six layers a path of an endpoint's tree belongs to.

IT-managed layers (base, driver, app) own exactly the paths their manifests contain.
The rules here decide the rest, and what a layer may never carry or touch:

* ``identity``: what makes the machine itself (hostname, machine-id, host keys, domain
  membership). Never captured into a layer, never overwritten by one.
* ``user_data``: home directories and profiles. Same protection.
* ``never``: what belongs to no layer at all (caches, temp, logs, swap, the agent state).
* ``do_not_override``: paths a layer never overwrites once the endpoint has them
  (per-machine configuration, a newer shared library the user needs).
* ``do_not_download``: paths a layer carries but endpoints never download.
* ``system``: where only IT layers should put files; a file there that no layer has is
  reported as "added outside policy" by compliance.
* ``configuration``: machine configuration a layer carries but the endpoint may edit. An
  update follows the three-way rule of OSTree's ``/etc`` merge (strata.layers.plan): a
  file the endpoint changed since the previous layers laid it down is kept and reported,
  an untouched one takes the new version. Account databases in it are merged by key
  (strata.layers.accounts).

Everything else an endpoint has is a user-installed application (``user-app``).
Patterns use the upload-exclusion syntax (strata.tree.excludes); a path matches when it
or one of its parent directories matches. Windows paths compare case-insensitively.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from strata.tree.excludes import ExcludeMatcher


class PathClass(StrEnum):
    IDENTITY = "identity"
    USER_DATA = "user-data"
    NEVER = "never"
    SYSTEM = "system"  # IT layers' ground: base, drivers, apps
    USER_APP = "user-app"


RULE_KEYS = ("identity", "user_data", "never", "do_not_override", "do_not_download", "system",
             "configuration")

LINUX_RULES: dict[str, list[str]] = {
    "identity": ["/etc/hostname", "/etc/hosts", "/etc/machine-id", "/var/lib/dbus/machine-id",
                 "/etc/ssh/ssh_host_*", "/etc/krb5.keytab", "/etc/sssd/", "/var/lib/sss/",
                 "/etc/adjtime", "/etc/NetworkManager/system-connections/"],
    "user_data": ["/home/", "/root/", "/srv/"],
    "never": ["/proc/", "/sys/", "/dev/", "/run/", "/tmp/", "/var/tmp/", "/var/cache/",
              "/var/log/", "/var/lib/strata-agent/", "/lost+found/", "/swapfile", "/swap.img",
              "/.strata-apply/", "/mnt/", "/media/"],
    "do_not_override": ["/etc/fstab", "/etc/crypttab", "/etc/network/interfaces",
                        "/etc/resolv.conf", "/etc/default/grub"],
    "do_not_download": ["/var/lib/apt/lists/", "/usr/share/doc/*/changelog*"],
    "system": ["/bin/", "/sbin/", "/lib/", "/lib32/", "/lib64/", "/usr/bin/", "/usr/sbin/",
               "/usr/lib/", "/usr/libexec/", "/boot/"],
    "configuration": ["/etc/"],
}

WINDOWS_RULES: dict[str, list[str]] = {
    "identity": ["/Windows/System32/config/SAM", "/Windows/System32/config/SECURITY",
                 "/Windows/System32/config/SYSTEM", "/ProgramData/Microsoft/Crypto/",
                 "/Windows/System32/Microsoft/Protect/", "/Windows/Panther/unattend.xml"],
    "user_data": ["/Users/", "/Documents and Settings/"],
    "never": ["/pagefile.sys", "/hiberfil.sys", "/swapfile.sys", "/$Recycle.Bin/",
              "/System Volume Information/", "/Windows/Temp/", "/Windows/Logs/",
              "/Windows/SoftwareDistribution/Download/", "/ProgramData/Strata/",
              "/.strata-apply/"],
    "do_not_override": ["/Windows/System32/drivers/etc/hosts", "/Windows/INF/setupapi.*.log"],
    "do_not_download": ["/Windows/Installer/", "/Windows/SoftwareDistribution/"],
    "system": ["/Windows/", "/Program Files/Common Files/Microsoft Shared/"],
    # Plain-file configuration only. The registry hives (Windows/System32/config/SOFTWARE,
    # DEFAULT) are configuration too, but a whole-file rule cannot merge them: every boot
    # rewrites them, so "changed on the endpoint" would hold every update back. They need
    # a merge by key, like the account databases (docs/windows.md).
    "configuration": ["/Windows/System32/drivers/etc/", "/ProgramData/"],
}

DEFAULT_RULES: dict[str, dict[str, list[str]]] = {"linux": LINUX_RULES,
                                                  "windows": WINDOWS_RULES}


def validate_rules(doc: Mapping) -> dict[str, dict[str, list[str]]]:
    """Check an administrator's rules document ({os: {key: [pattern, ...]}})."""
    out: dict[str, dict[str, list[str]]] = {}
    for os_name, rules in doc.items():
        if not isinstance(rules, Mapping):
            raise ValueError(f"rules for {os_name!r} must be a mapping")
        unknown = set(rules) - set(RULE_KEYS)
        if unknown:
            raise ValueError(f"unknown layer rule keys: {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(RULE_KEYS)})")
        clean = {}
        for key in RULE_KEYS:
            pats = rules.get(key, [])
            if not isinstance(pats, list) or not all(isinstance(p, str) and p.strip("/")
                                                      for p in pats):
                raise ValueError(f"{os_name}.{key} must be a list of non-empty patterns")
            ExcludeMatcher(pats)  # raises on a malformed pattern
            clean[key] = list(pats)
        out[str(os_name)] = clean
    return out


def os_family(os_name: str) -> str:
    return "windows" if os_name.lower().startswith("win") else "linux"


class _Matcher:
    """A pattern list that also matches beneath a matching directory (with a cache of
    directory answers, as a tree's paths share most of their parents)."""

    def __init__(self, patterns: list[str], fold_case: bool):
        self._fold = fold_case
        self._m = ExcludeMatcher([p.lower() for p in patterns] if fold_case else patterns)
        self._dirs: dict[bytes, bool] = {}

    def __call__(self, path: bytes, is_dir: bool = False) -> bool:
        if not self._m:
            return False
        if self._fold:
            path = path.lower()
        parent = path.rpartition(b"/")[0]
        if parent and self._dir(parent):
            return True
        return self._m.excluded(path, is_dir)

    def _dir(self, path: bytes) -> bool:
        hit = self._dirs.get(path)
        if hit is None:
            parent = path.rpartition(b"/")[0]
            hit = (bool(parent) and self._dir(parent)) or self._m.excluded(path, True)
            if len(self._dirs) > 100_000:
                self._dirs.clear()
            self._dirs[path] = hit
        return hit


@dataclass
class LayerRules:
    """Compiled rules for one OS family."""

    identity: _Matcher
    user_data: _Matcher
    never: _Matcher
    do_not_override: _Matcher
    do_not_download: _Matcher
    system: _Matcher
    configuration: _Matcher
    family: str = "linux"

    @classmethod
    def from_doc(cls, doc: Mapping[str, list[str]], family: str = "linux") -> LayerRules:
        fold = family == "windows"
        return cls(**{k: _Matcher(list(doc.get(k, [])), fold) for k in RULE_KEYS},
                   family=family)

    @classmethod
    def default(cls, family: str = "linux") -> LayerRules:
        return cls.from_doc(DEFAULT_RULES[family], family)

    def classify(self, path: bytes, is_dir: bool = False) -> PathClass:
        if self.never(path, is_dir):
            return PathClass.NEVER
        if self.identity(path, is_dir):
            return PathClass.IDENTITY
        if self.user_data(path, is_dir):
            return PathClass.USER_DATA
        if self.system(path, is_dir):
            return PathClass.SYSTEM
        return PathClass.USER_APP

    def layer_may_carry(self, path: bytes, is_dir: bool = False) -> bool:
        """False for what no IT layer may capture or lay down: identity, user data, and
        what belongs to no layer."""
        return self.classify(path, is_dir) not in (PathClass.NEVER, PathClass.IDENTITY,
                                                   PathClass.USER_DATA)

    def capture_excludes(self) -> list[str]:
        """Upload-exclusion patterns that keep a capture to what a layer may carry."""
        return [p for key in ("never", "identity", "user_data")
                for p in getattr(self, key)._m.patterns]
