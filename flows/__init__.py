"""Prefect flows: one per DVC stage, plus ``pipeline`` (the whole DAG through DVC).

Flows run without a server by default (Prefect starts a temporary local API) and report to
one when ``PREFECT_API_URL`` is set.
"""
