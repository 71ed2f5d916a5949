"""Reading a sweep's data and results: data checks, the learning-curve diagnosis, the report.

``hpo check-data``: :mod:`hpo.analysis.checks`, one ``checks_*`` module per task and what they
share (``checks_text``, ``checks_report``). ``hpo diagnose``: :mod:`hpo.analysis.diagnose`
with its curve rules, curve arithmetic and study-wide advice (``diagnose_*``). ``hpo report``:
the study report's plots and tables.

Imports no Ray or MLflow (tests/test_boundaries.py): it reads the data and the study and
runs nothing.
"""
