"""Console reports: installed software (a package across the fleet, one endpoint's
packages, or every package with its endpoints and versions) and storage per CVD. The
fleet-wide ones are computed in the background (services/background_report.py): a page
shows the last result at once, or says it is being computed and asks again by itself."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from strata.errors import StrataError
from strata.model.roles import Permission
from strata.model.software import SoftwareReportPage
from strata.server.console.render import csv_response, render
from strata.server.console.session import Page, Visitor
from strata.server.console.views import page
from strata.server.context import ServerContext
from strata.server.deps import get_ctx
from strata.server.services import software
from strata.server.services.storage_report import storage_report_of

router = APIRouter(include_in_schema=False)
ROWS_SHOWN = 200  # on the page; the CSV has up to software.ROWS_LIMIT
SUMMARY_SHOWN = 200  # packages on the summary page (most widespread first); CSV: all
CVDS_SHOWN = 200  # CVDs on the storage page (most unique bytes first); CSV: all


@router.get("/reports/software")
def software_page(request: Request, package: str = "", endpoint: str = "",
                  format: str = "", v: Visitor = Depends(Page(Permission.VIEW)),
                  ctx: ServerContext = Depends(get_ctx)) -> Response:
    package, endpoint = package.strip()[:130], endpoint.strip()[:64]
    error = ""
    report: SoftwareReportPage | None = None
    try:
        if package or endpoint:
            report = software.software_report(ctx, package=package, endpoint=endpoint,
                                              limit=software.ROWS_LIMIT if format == "csv"
                                              else ROWS_SHOWN)
        else:
            report = software.summary_of(ctx).get(wait=format == "csv")
    except StrataError as exc:
        error = str(exc)
    if format == "csv" and report is not None:
        if package or endpoint:
            return csv_response("software", ["endpoint", "hostname", "package", "version",
                                             "arch", "manager"],
                                [[r.endpoint, r.hostname, r.name, r.version, r.arch,
                                  r.manager] for r in report.rows])
        return csv_response("software-summary", ["package", "endpoints", "version",
                                                 "endpoints_at_version"],
                            [[s.name, s.endpoints, ver, n] for s in report.summary
                             for ver, n in s.versions.items()])
    summary = sorted(report.summary, key=lambda s: (-s.endpoints, s.name))[:SUMMARY_SHOWN] \
        if report is not None else []
    if request.headers.get("HX-Request") == "true":  # the summary, asked for again
        return render(request, "_software_summary.html", report=report, summary=summary)
    return page(request, "software.html", v, 422 if error else 200, report=report,
                package=package, endpoint=endpoint, error=error, summary=summary)


@router.get("/reports/storage")
def storage_page(request: Request, format: str = "",
                 v: Visitor = Depends(Page(Permission.VIEW)),
                 ctx: ServerContext = Depends(get_ctx)) -> Response:
    report = storage_report_of(ctx).get(wait=format == "csv")
    if format == "csv" and report is not None:
        return csv_response("storage", ["endpoint", "hostname", "snapshots", "logical_bytes",
                                        "unique_bytes", "unique_stored_bytes",
                                        "share_percent"],
                            [[c.endpoint, c.hostname, c.snapshots, c.logical_bytes,
                              c.unique_bytes, c.unique_stored_bytes, c.share]
                             for c in report.cvds])
    shown = report.cvds[:CVDS_SHOWN] if report is not None else []
    if request.headers.get("HX-Request") == "true":
        return render(request, "_storage_table.html", report=report, shown=shown)
    return page(request, "storage.html", v, report=report, shown=shown)
