"""What every route module depends on: the node's context and a database session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Settings
from storage.db import session_scope
from storage.spool import Spool


@dataclass(frozen=True)
class ApiContext:
    """What the routes need of the node."""

    settings: Settings
    sessions: sessionmaker[Session]
    spool: Spool
    registry: CollectorRegistry


def _context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context
    return context


def _session(context: Annotated[ApiContext, Depends(_context)]) -> Iterator[Session]:
    with session_scope(context.sessions) as session:
        yield session


Context = Annotated[ApiContext, Depends(_context)]
Db = Annotated[Session, Depends(_session)]
