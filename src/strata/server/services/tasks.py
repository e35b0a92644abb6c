"""Tracked tasks: one operation over many endpoints (an assignment, a migration, a revert
or a provisioning) with each endpoint's progress, cancel and retry.

An endpoint's progress is its assignment's (the agent reports it) for as long as the
assignment is the task's; a later assignment "supersedes" it. Each member keeps the
assignment it had before the task and the one the task gave it, so that:

- cancel puts the old assignment back on the members that have not started (the server
  has had no progress report from them: state "assigned") and marks them cancelled. A
  member that has started (downloading, ready to apply, applying) finishes: cancel does
  not interrupt an agent. An agent that started just before the cancel, before its first
  report reached the server, drops the downloaded update at its next check-in, because
  the server no longer wants it (agent/update.py, `on_checkin`);
- retry puts the task's assignment again on its failed and cancelled members.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from strata.errors import Forbidden, Invalid, NotFound
from strata.model.admin import TaskEndpoint, TaskInfo
from strata.model.roles import Permission
from strata.server.catalog.models import Assignment, Endpoint, Task, TaskMember
from strata.server.context import ServerContext
from strata.server.services import audit
from strata.server.services.assignments import assignment_of, desired_state, set_state
from strata.server.services.users import Staff

# Who may cancel or retry a task: whoever may start one of its kind.
TASK_PERMISSION = {"assign": Permission.ASSIGN, "migrate": Permission.MIGRATE,
                   "revert": Permission.REVERT, "provision": Permission.PROVISION}
NOT_STARTED = "assigned"
ACTIVE = frozenset({"assigned", "downloading", "ready", "applying"})
# The per-state columns of a task list's CSV export.
CSV_STATES = ("assigned", "downloading", "ready", "applying", "applied", "failed",
              "cancelled", "superseded")
# The assignment fields a task sets (and a cancel puts back).
FIELDS = ("base_id", "app_ids", "driver_ids", "enforce", "operation")


def _fields(a: Assignment) -> dict[str, Any]:
    """A copy (a new row's unset columns read as None until it is flushed)."""
    return {"base_id": a.base_id, "app_ids": list(a.app_ids or []),
            "driver_ids": list(a.driver_ids) if a.driver_ids is not None else None,
            "enforce": bool(a.enforce), "operation": dict(a.operation or {}),
            "task_id": a.task_id}


def _put(a: Assignment, fields: dict[str, Any]) -> None:
    for name in FIELDS:
        if name in fields:
            setattr(a, name, fields[name])


# -- starting ------------------------------------------------------------------------------


def begin(db: Session, kind: str, params: dict[str, Any],
          eps: list[Endpoint]) -> tuple[Task, dict[str, dict[str, Any]]]:
    """A new task over `eps`, and each one's assignment as it is before the task; the
    caller then sets the task's assignment on them and calls `enlist`."""
    task = Task(kind=kind, params=params, endpoints=[e.id for e in eps])
    db.add(task)
    db.flush()
    previous = {}
    for ep in eps:
        had = db.get(Assignment, ep.id) is not None
        # An endpoint that had no assignment at all: a cancel removes the row again (an
        # empty assignment is not the same as none: drivers would follow the hardware).
        previous[ep.id] = {**_fields(assignment_of(db, ep)), "absent": not had}
    return task, previous


def enlist(db: Session, task: Task, eps: list[Endpoint],
           previous: dict[str, dict[str, Any]]) -> None:
    for ep in eps:
        a = assignment_of(db, ep)
        a.task_id = task.id
        db.add(TaskMember(task_id=task.id, endpoint_id=ep.id, state="queued",
                          previous=previous[ep.id], target=_fields(a), attempts=1))


# -- reading -------------------------------------------------------------------------------


def _member_state(member_state: str, a_task: int | None, a_state: str | None,
                  tid: int) -> str:
    if member_state == "cancelled":
        return "cancelled"
    if a_state is None or a_task != tid:
        return "superseded"  # a later assignment took the endpoint over
    return a_state


def _summary(counts: Counter[str]) -> tuple[float, str]:
    """(percent done, the task's state) from its members' states."""
    total = sum(counts.values())
    done = counts["applied"]
    progress = round(100.0 * done / total, 1) if total else 100.0
    if any(counts[s] for s in ACTIVE):
        state = "running"
    elif counts["failed"]:
        state = "failed"
    elif counts["cancelled"]:
        state = "cancelled"
    else:
        state = "done"
    return progress, state


def task_info(ctx: ServerContext, tid: int) -> TaskInfo:
    """A task and each of its endpoints' progress (three queries, whatever its size)."""
    with ctx.session() as db:
        task = db.get(Task, tid)
        if task is None:
            raise NotFound(f"no task {tid}")
        rows = db.execute(
            select(TaskMember.endpoint_id, TaskMember.state, TaskMember.attempts,
                   Assignment.task_id, Assignment.state, Assignment.percent,
                   Assignment.detail, Endpoint.hostname)
            .join(Endpoint, Endpoint.id == TaskMember.endpoint_id)
            .outerjoin(Assignment, Assignment.endpoint_id == TaskMember.endpoint_id)
            .where(TaskMember.task_id == tid)
            .order_by(Endpoint.hostname, TaskMember.endpoint_id)).all()
        members = []
        for eid, m_state, attempts, a_task, a_state, percent, detail, host in rows:
            state = _member_state(m_state, a_task, a_state, tid)
            mine = state not in ("cancelled", "superseded")
            members.append(TaskEndpoint(endpoint=eid, hostname=host or "", state=state,
                                        percent=round(percent or 0.0, 1) if mine else 0.0,
                                        detail=(detail or "") if mine else "",
                                        attempts=attempts))
        counts = Counter(m.state for m in members)
        progress, state = _summary(counts)
        return TaskInfo(id=task.id, kind=task.kind, params=task.params,
                        created_at=task.created_at, endpoints=members, size=len(members),
                        counts=dict(counts), progress=progress, state=state)


def recent_tasks(ctx: ServerContext, count: int) -> list[TaskInfo]:
    """The latest `count` tasks, newest first, with their counts but not each endpoint
    (one grouped query: a list of tasks over 1,000 endpoints each stays quick)."""
    with ctx.session() as db:
        tasks = list(db.scalars(select(Task).order_by(Task.id.desc()).limit(count)))
        if not tasks:
            return []
        grouped = db.execute(
            select(TaskMember.task_id, TaskMember.state, Assignment.task_id,
                   Assignment.state, func.count())
            .join(Endpoint, Endpoint.id == TaskMember.endpoint_id)
            .outerjoin(Assignment, Assignment.endpoint_id == TaskMember.endpoint_id)
            .where(TaskMember.task_id.in_([t.id for t in tasks]))
            .group_by(TaskMember.task_id, TaskMember.state, Assignment.task_id,
                      Assignment.state)).all()
        counts: dict[int, Counter[str]] = {t.id: Counter() for t in tasks}
        for tid, m_state, a_task, a_state, n in grouped:
            counts[tid][_member_state(m_state, a_task, a_state, tid)] += n
        out = []
        for t in tasks:
            progress, state = _summary(counts[t.id])
            out.append(TaskInfo(id=t.id, kind=t.kind, params=t.params, created_at=t.created_at,
                                endpoints=[], size=sum(counts[t.id].values()),
                                counts=dict(counts[t.id]), progress=progress, state=state))
        return out


def list_tasks(ctx: ServerContext, count: int = 1000) -> list[TaskInfo]:
    """Oldest first, as the API always listed them."""
    return list(reversed(recent_tasks(ctx, count)))


def check_may_change(ctx: ServerContext, tid: int, staff: Staff, verb: str) -> None:
    """Whoever may start a task of this kind may cancel or retry it (403 otherwise)."""
    with ctx.session() as db:
        task = db.get(Task, tid)
        if task is None:
            raise NotFound(f"no task {tid}")
        kind = task.kind
    needed = TASK_PERMISSION.get(kind, Permission.SERVER)
    if not staff.may(needed):
        raise Forbidden(f"your role ({staff.role}) does not allow this: to {verb} a {kind} "
                        f"task needs the {needed.value!r} permission")


# -- cancel and retry ----------------------------------------------------------------------


def _members(db: Session, tid: int) -> list[tuple[TaskMember, Assignment | None, Endpoint]]:
    task = db.get(Task, tid)
    if task is None:
        raise NotFound(f"no task {tid}")
    rows = db.execute(select(TaskMember, Endpoint)
                      .join(Endpoint, Endpoint.id == TaskMember.endpoint_id)
                      .where(TaskMember.task_id == tid)).all()
    # Locked (PostgreSQL): an agent's progress report waits until this decision is made.
    locked = {a.endpoint_id: a for a in db.scalars(
        select(Assignment).where(Assignment.endpoint_id.in_([ep.id for _, ep in rows]))
        .with_for_update())}
    return [(m, locked.get(ep.id), ep) for m, ep in rows]


def cancel(ctx: ServerContext, tid: int, staff: Staff) -> TaskInfo:
    """Skip the endpoints that have not started; the others finish (see the module)."""
    check_may_change(ctx, tid, staff, "cancel")
    with ctx.write() as db:
        cancelled, running = [], 0
        for m, a, ep in _members(db, tid):
            if m.state == "cancelled" or a is None or a.task_id != tid:
                continue
            if a.state != NOT_STARTED or not m.previous:
                # Under way (it finishes), or joined before members recorded what to
                # put back (a task from an older version: it cannot be cancelled).
                running += a.state in ACTIVE
                continue
            m.state = "cancelled"
            cancelled.append(ep.id)
            if m.previous.get("absent"):
                db.delete(a)  # no assignment before the task: none again
                continue
            _put(a, m.previous)
            a.task_id = m.previous.get("task_id")
            db.flush()
            # Back where it was: applied, if the endpoint already has that state.
            desired = desired_state(ctx, db, ep)
            if desired is not None and desired.key == a.applied_key:
                set_state(a, "applied", percent=100.0)
            else:
                set_state(a, "assigned", percent=0.0)
    ctx.invalidate()
    audit.record(ctx, staff.actor, "cancel-task", str(tid), cancelled=len(cancelled),
                 finishing=running)
    return task_info(ctx, tid)


def retry(ctx: ServerContext, tid: int, staff: Staff) -> TaskInfo:
    """Put the task's assignment again on its failed and cancelled endpoints."""
    check_may_change(ctx, tid, staff, "retry")
    with ctx.write() as db:
        again = []
        for m, a, ep in _members(db, tid):
            if m.state == "cancelled":
                # What a second cancel puts back: the assignment it has now, or none.
                m.previous = {**_fields(a), "absent": False} if a is not None \
                    else {"absent": True}
                a = a or assignment_of(db, ep)
            elif a is None or not (a.task_id == tid and a.state == "failed") \
                    or not m.target:
                continue
            _put(a, m.target)
            a.task_id = tid
            set_state(a, "assigned", percent=0.0)
            m.state = "queued"
            m.attempts += 1
            again.append(ep.id)
        if not again:
            raise Invalid(f"task {tid} has no failed or cancelled endpoint to retry")
    ctx.invalidate()
    audit.record(ctx, staff.actor, "retry-task", str(tid), endpoints=len(again))
    return task_info(ctx, tid)
