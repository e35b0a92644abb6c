"""Installed software: each endpoint's package list as its agent reports it (replaced
whole, in one transaction, only when its digest changes), and the fleet-wide report
"which endpoints have X, at which version". Rows are indexed by package name, so a
question about one package reads only that package's rows, however big the fleet."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, insert, select

from strata.errors import Invalid
from strata.model.software import (
    PackageOnEndpoint,
    SoftwareListInfo,
    SoftwareReport,
    SoftwareReportPage,
    SoftwareStored,
    SoftwareSummary,
    software_digest,
)
from strata.server.catalog.models import Endpoint, InstalledPackage, SoftwareList
from strata.server.context import ServerContext
from strata.server.rate_limit import TooManyRequests
from strata.server.services.background_report import BackgroundReport, report_for
from strata.server.services.lookup import find_endpoint

# A changed list is stored at most this often per endpoint: each replaces up to 20,000
# rows, which an endpoint must not make the catalog do in a loop.
MIN_SECONDS_BETWEEN_CHANGES = 60.0
ROWS_LIMIT = 5000  # rows of one answer (the CSV export of the console asks for them all)
SUMMARY_LIMIT = 5000
SUMMARY_SECONDS = 300.0


def store_software(ctx: ServerContext, ep: Endpoint, report: SoftwareReport, *,
                   now: datetime | None = None) -> SoftwareStored:
    """Replace the endpoint's package list (already bounded and checked by the model)."""
    now = now or datetime.now(UTC)
    digest = software_digest(report.packages)
    with ctx.write() as db:
        row = db.get(SoftwareList, ep.id)
        if row is not None and row.digest == digest:
            row.updated_at = now  # the same list again: nothing to rewrite
            return SoftwareStored(digest=digest, packages=row.packages)
        if row is not None and now - row.updated_at < timedelta(
                seconds=MIN_SECONDS_BETWEEN_CHANGES):
            wait = MIN_SECONDS_BETWEEN_CHANGES - (now - row.updated_at).total_seconds()
            raise TooManyRequests("the package list changes too often: send it again "
                                  "later", wait)
        db.execute(delete(InstalledPackage).where(InstalledPackage.endpoint_id == ep.id))
        if report.packages:
            db.execute(insert(InstalledPackage), [
                {"endpoint_id": ep.id, "name": p.name, "arch": p.arch, "version": p.version,
                 "manager": p.manager} for p in report.packages])
        if row is None:
            row = SoftwareList(endpoint_id=ep.id)
            db.add(row)
        row.digest, row.packages, row.updated_at = digest, len(report.packages), now
    return SoftwareStored(digest=digest, packages=len(report.packages))


def list_of(ctx: ServerContext, endpoint_id: str) -> SoftwareListInfo | None:
    """When the endpoint last sent its package list, and how many packages."""
    with ctx.session() as db:
        row = db.get(SoftwareList, endpoint_id)
        return None if row is None else SoftwareListInfo(packages=row.packages,
                                                         updated_at=row.updated_at)


def software_report(ctx: ServerContext, *, package: str = "", endpoint: str = "",
                    limit: int = ROWS_LIMIT) -> SoftwareReportPage:
    """With `package` (an exact name, or a prefix ending in `*`) and/or `endpoint`: the
    matching rows, by package then host. With neither: each package, on how many
    endpoints and at which versions."""
    if len(package) > 129 or (package.rstrip("*") and not _NAME_CHARS.issuperset(
            package.rstrip("*"))):
        raise Invalid(f"package {package[:40]!r}: give a package name, or a prefix and *")
    if not package and not endpoint:
        return summary_of(ctx).get(wait=True)  # type: ignore[return-value]
    with ctx.session() as db:
        reporting = db.scalar(select(func.count()).select_from(SoftwareList)) or 0
        q = (select(InstalledPackage, Endpoint.hostname)
             .join(Endpoint, Endpoint.id == InstalledPackage.endpoint_id))
        if package.endswith("*"):
            q = q.where(InstalledPackage.name.startswith(package.rstrip("*"), autoescape=True))
        elif package:
            q = q.where(InstalledPackage.name == package)
        if endpoint:
            q = q.where(InstalledPackage.endpoint_id == find_endpoint(db, endpoint).id)
        total = db.scalar(select(func.count()).select_from(q.subquery())) or 0
        rows = db.execute(q.order_by(InstalledPackage.name, Endpoint.hostname,
                                     InstalledPackage.endpoint_id, InstalledPackage.arch)
                          .limit(max(1, min(limit, ROWS_LIMIT)))).all()
        return SoftwareReportPage(
            rows=[PackageOnEndpoint(endpoint=p.endpoint_id, hostname=host, name=p.name,
                                    version=p.version, arch=p.arch, manager=p.manager)
                  for p, host in rows], total=total, reporting=reporting)


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+._-")


def compute_summary(ctx: ServerContext) -> SoftwareReportPage:
    """Per package: endpoints and versions (grouped queries over every row)."""
    with ctx.session() as db:
        reporting = db.scalar(select(func.count()).select_from(SoftwareList)) or 0
        grouped = db.execute(
            select(InstalledPackage.name, InstalledPackage.version,
                   func.count(func.distinct(InstalledPackage.endpoint_id)))
            .group_by(InstalledPackage.name, InstalledPackage.version)).all()
        per_name = dict(db.execute(  # multi-arch: one endpoint, two rows
            select(InstalledPackage.name,
                   func.count(func.distinct(InstalledPackage.endpoint_id)))
            .group_by(InstalledPackage.name)).all())
    versions: dict[str, dict[str, int]] = defaultdict(dict)
    for name, version, n in grouped:
        versions[name][version] = n
    summary = [SoftwareSummary(name=name, endpoints=per_name.get(name, 0),
                               versions=dict(sorted(v.items())))
               for name, v in sorted(versions.items())]
    return SoftwareReportPage(summary=summary[:SUMMARY_LIMIT], total=len(summary),
                              reporting=reporting)


def summary_of(ctx: ServerContext) -> BackgroundReport[SoftwareReportPage]:
    """The fleet summary groups every package row (2 million for 1,000 desktops): kept
    for SUMMARY_SECONDS, recomputed in the background."""
    return report_for(ctx, "software", lambda: compute_summary(ctx), SUMMARY_SECONDS)
