"""``python -m dicom_node`` is the same as the ``dicom-node`` command."""

from dicom_node.cli import app

app(prog_name="dicom-node")
