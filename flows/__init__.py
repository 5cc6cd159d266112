"""Prefect flows: one per DVC stage, plus ``pipeline`` (the whole DAG through DVC).

Flows run without a server by default (Prefect starts a temporary local API) and report to
one when ``PREFECT_API_URL`` is set.
"""

#: Environment variable through which stage commands learn the pipeline run that started them.
PIPELINE_RUN_ENV = "SPARSEFLOW_PIPELINE_RUN_ID"
#: Tag of every stage flow run a pipeline run started: this prefix + the pipeline's flow run id.
PIPELINE_TAG_PREFIX = "pipeline-run:"
