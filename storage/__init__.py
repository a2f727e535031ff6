"""Persistence for the node: database models and migrations, the job queue, the spool.

This package is deliberately independent of the network edge (``dicom_node``) and of
``inference``: it knows about instances, jobs and files, never about associations or
models, so it can be reused by workers, the API and maintenance scripts alike.
"""
