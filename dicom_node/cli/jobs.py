"""``dicom-node jobs …``: list, inspect and retry analyses.

``list`` and ``show`` read; ``retry`` puts failed or skipped jobs back in the queue
through :func:`storage.queue.requeue` (the same transition the HTTP API uses), audited
with the operator as actor (``cli:<user>``). What is shown identifies images by UID,
AE title and hash only — the database holds no patient names or IDs.
"""

from __future__ import annotations

import getpass
import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dicom_node.cli.common import (
    EXIT_FAILURE,
    ConfigOption,
    JsonOption,
    ids_or_every,
    load_for_command,
    send_row,
    shown,
    state_or_exit,
    with_database,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from storage.job_details import JobDetails
    from storage.models import AuditEvent, Instance, Job, Result

jobs_app = typer.Typer(
    help="The job queue: list, inspect and retry analyses.", no_args_is_help=True
)


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


@jobs_app.command("list")
def jobs_list(
    config: ConfigOption = None,
    json_output: JsonOption = False,
    state: Annotated[
        str | None,
        typer.Option("--state", help="received, queued, running, done, failed or skipped."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most rows shown.")] = 50,
) -> None:
    """Jobs, newest first."""
    settings = load_for_command(config)
    from storage.models import JobState

    wanted = state_or_exit(JobState, state)
    from storage.job_details import list_jobs

    rows = with_database(
        settings,
        lambda s: [_job_row(job, inst) for job, inst in list_jobs(s, state=wanted, limit=limit)],
    )
    if json_output:
        typer.echo(json.dumps(rows))
        return
    table = Table("id", "state", "attempts", "received", "finished", "SOP Instance UID", "error")
    for row in rows:
        table.add_row(
            str(row["id"]),
            row["state"],
            str(row["attempts"]),
            shown(row["received_at"]),
            shown(row["finished_at"]),
            row["sop_instance_uid"],
            (row["last_error"] or "")[:60],
        )
    Console().print(table)


def _job_row(job: Job, instance: Instance) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": job.kind,
        "state": job.state.value,
        "priority": job.priority,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "worker": job.worker,
        "last_error": job.last_error,
        "instance_id": job.instance_id,
        "sop_instance_uid": instance.sop_instance_uid,
        "received_at": _iso(instance.received_at),
        "created_at": _iso(job.created_at),
        "queued_at": _iso(job.queued_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
    }


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[int, typer.Argument(help="Job id.")],
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """One job: its image (UIDs, no patient data), results, sends and audit trail."""
    settings = load_for_command(config)
    from storage.job_details import job_details

    def load(session: Session) -> dict[str, Any] | None:
        details = job_details(session, job_id)
        return None if details is None else _details_document(details)

    document = with_database(settings, load)
    if document is None:
        typer.echo(f"dicom-node: no job {job_id}", err=True)
        raise typer.Exit(EXIT_FAILURE)
    if json_output:
        typer.echo(json.dumps(document))
        return
    _print_details(document)


def _details_document(details: JobDetails) -> dict[str, Any]:
    instance, series = details.instance, details.series
    return {
        "job": _job_row(details.job, instance),
        "instance": {
            "id": instance.id,
            "version": instance.version,
            "study_instance_uid": details.study.study_instance_uid,
            "series_instance_uid": series.series_instance_uid,
            "sop_instance_uid": instance.sop_instance_uid,
            "sop_class_uid": instance.sop_class_uid,
            "transfer_syntax_uid": instance.transfer_syntax_uid,
            "modality": series.modality,
            "body_part_examined": series.body_part_examined,
            "view_position": instance.view_position,
            "rows": instance.rows,
            "columns": instance.columns,
            "size_bytes": instance.size_bytes,
            "sha256": instance.sha256,
            "calling_ae": instance.calling_ae,
            "called_ae": instance.called_ae,
            "received_at": _iso(instance.received_at),
            "purged_at": _iso(instance.purged_at),
        },
        "results": [_result_row(result) for result in details.results],
        "sends": [send_row(send) for send in details.sends],
        "audit": [_audit_row(event) for event in details.audit],
    }


def _result_row(result: Result) -> dict[str, Any]:
    return {
        "id": result.id,
        "pipeline": result.pipeline,
        "model_key": result.model_key,
        "status": result.status.value,
        "reason": result.reason,
        "findings": result.findings,
        "in_domain": result.in_domain,
        "warnings": result.warnings,
        "sr_sop_instance_uid": result.sr_sop_instance_uid,
        "sc_sop_instance_uid": result.sc_sop_instance_uid,
        "created_at": _iso(result.created_at),
    }


def _audit_row(event: AuditEvent) -> dict[str, Any]:
    return {
        "occurred_at": _iso(event.occurred_at),
        "kind": event.kind,
        "actor": event.actor,
        "details": event.details,
    }


def _print_details(document: dict[str, Any]) -> None:
    console = Console()
    job, instance = document["job"], document["instance"]
    console.print(
        f"[bold]job {job['id']}[/bold] {job['state']} — attempt {job['attempts']} of "
        f"{job['max_attempts']}"
        + (f" — [red]{job['last_error']}[/red]" if job["last_error"] else ""),
        highlight=False,
    )
    console.print(
        f"instance {instance['sop_instance_uid']} (v{instance['version']}, "
        f"{instance['modality']} {instance['view_position'] or ''}, from {instance['calling_ae']}, "
        f"received {instance['received_at']})",
        highlight=False,
    )
    for result in document["results"]:
        findings = ", ".join(
            f"{f['meaning']} {f['probability']:.3f}{' PRESENT' if f['present'] else ''}"
            for f in result["findings"]
        )
        console.print(f"result {result['status']}: {findings or result['reason'] or '-'}")
    for send in document["sends"]:
        console.print(f"send {send['id']} → {send['destination']} {send['kind']}: {send['state']}")
    table = Table("when", "event", "actor", "details")
    for event in document["audit"]:
        details = json.dumps(event["details"]) if event["details"] else ""
        table.add_row(event["occurred_at"], event["kind"], event["actor"], details[:80])
    console.print(table)


@jobs_app.command("retry")
def jobs_retry(
    ids: Annotated[list[int] | None, typer.Argument(help="Ids of failed or skipped jobs.")] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    failed: Annotated[bool, typer.Option("--failed", help="Re-queue every failed job.")] = False,
) -> None:
    """Put failed (or skipped) jobs back in the queue with fresh attempts."""
    ids_or_every(ids, failed, "job ids or --failed")
    settings = load_for_command(config)
    actor = f"cli:{getpass.getuser()}"
    outcome = with_database(settings, lambda s: _retry(s, None if failed else ids, actor))
    requeued, refused = outcome
    if json_output:
        typer.echo(json.dumps({"requeued": requeued, "refused": refused}))
    else:
        typer.echo(f"re-queued {len(requeued)} job(s)" + (f": {requeued}" if requeued else ""))
        for reason in refused.values():
            typer.echo(f"dicom-node: {reason}", err=True)
    if refused:
        raise typer.Exit(EXIT_FAILURE)


def _retry(session: Session, ids: list[int] | None, actor: str) -> tuple[list[int], dict[str, str]]:
    """Re-queue; returns (re-queued ids, {id: why not}) — refusals change nothing."""
    from storage.models import Job
    from storage.queue import InvalidTransition, requeue, requeue_failed

    if ids is None:
        return requeue_failed(session, actor=actor), {}
    requeued: list[int] = []
    refused: dict[str, str] = {}
    for job_id in ids:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            refused[str(job_id)] = f"job {job_id} does not exist"
            continue
        try:
            requeued.append(requeue(session, job, actor=actor).id)
        except InvalidTransition as exc:
            refused[str(job_id)] = str(exc)
    return requeued, refused
