"""The node's HTTP API, Prometheus metrics and read-only dashboard (``[http]``)."""

from dicom_node.api.app import create_app
from dicom_node.api.auth import ApiToken, Role, resolve_token, resolve_tokens
from dicom_node.api.service import HttpService

__all__ = [
    "ApiToken",
    "HttpService",
    "Role",
    "create_app",
    "resolve_token",
    "resolve_tokens",
]
